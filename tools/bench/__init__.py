"""Benchmarks: TensorRT engine latency on a GPU; engine builds and the NumPy executor on the CPU.

`python -m tools.bench --help` describes the modes. `__main__` is the command line; `gpu`,
`cpu`, `build` and `random_model` run its modes; `timing` holds the shapes and timing loops,
`roofline` the bytes a decode step reads, `report` the JSON report and the printed tables.
"""


class BenchError(RuntimeError):
    """A benchmark request that cannot be carried out as given."""


class NoGpu(BenchError):
    """GPU mode on a machine without a usable CUDA GPU (exit status 2, as a usage error)."""
