"""A thin, typed layer over `INetworkDefinition` for the handful of operations a decoder needs.

Networks are strongly typed, so every helper states its dtype. Weights handed to TensorRT
must outlive the build, so `Graph.constants` keeps each array it passes in, by layer name;
the reference executor reads constants from there too, because TensorRT's Python bindings
cannot hand bfloat16 weights back as arrays.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import ml_dtypes
import numpy as np

DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}


def trt_dtype(trt: ModuleType, dtype: np.dtype) -> Any:
    table = {
        np.dtype(np.float32): trt.float32,
        np.dtype(np.float16): trt.float16,
        np.dtype(ml_dtypes.bfloat16): trt.bfloat16,
        np.dtype(np.int32): trt.int32,
        np.dtype(np.int64): trt.int64,
        np.dtype(np.bool_): trt.bool,
    }
    return table[np.dtype(dtype)]


class Graph:
    """Builds layers on `network`; names each layer after the module it belongs to."""

    def __init__(self, trt: ModuleType, network: Any):
        self.trt = trt
        self.network = network
        self.constants: dict[str, np.ndarray] = {}
        self.scope = ""

    def named(self, layer: Any, name: str) -> Any:
        layer.name = f"{self.scope}{name}" if self.scope else name
        return layer

    # Leaves ---------------------------------------------------------------------------------
    def constant(self, array: np.ndarray, name: str) -> Any:
        """A constant tensor backed by `array` without a copy (it must stay contiguous)."""
        array = np.ascontiguousarray(array)
        weights = self.trt.Weights(trt_dtype(self.trt, array.dtype), array.ctypes.data, array.size)
        layer = self.named(self.network.add_constant(array.shape, weights), name)
        self.constants[layer.name] = array
        return layer.get_output(0)

    def scalar(self, value: float, dtype: np.dtype, rank: int, name: str) -> Any:
        """A broadcastable [1]*rank constant."""
        return self.constant(np.full((1,) * rank, value, dtype=dtype), name)

    # Elementwise ----------------------------------------------------------------------------
    def elementwise(self, a: Any, b: Any, op: str, name: str) -> Any:
        layer = self.network.add_elementwise(a, b, getattr(self.trt.ElementWiseOperation, op))
        return self.named(layer, name).get_output(0)

    def add(self, a: Any, b: Any, name: str) -> Any:
        return self.elementwise(a, b, "SUM", name)

    def mul(self, a: Any, b: Any, name: str) -> Any:
        return self.elementwise(a, b, "PROD", name)

    def unary(self, x: Any, op: str, name: str) -> Any:
        return self.named(
            self.network.add_unary(x, getattr(self.trt.UnaryOperation, op)), name
        ).get_output(0)

    def activation(self, x: Any, kind: str, name: str) -> Any:
        layer = self.network.add_activation(x, getattr(self.trt.ActivationType, kind))
        return self.named(layer, name).get_output(0)

    def cast(self, x: Any, dtype: np.dtype, name: str) -> Any:
        target = trt_dtype(self.trt, dtype)
        if x.dtype == target:
            return x
        return self.named(self.network.add_cast(x, target), name).get_output(0)

    def mean_last(self, x: Any, name: str) -> Any:
        axes = 1 << (len(x.shape) - 1)
        layer = self.network.add_reduce(x, self.trt.ReduceOperation.AVG, axes, True)
        return self.named(layer, name).get_output(0)

    # Shapes ---------------------------------------------------------------------------------
    def shuffle(
        self, x: Any, name: str, reshape: tuple[int, ...] | None = None, transpose=None
    ) -> Any:
        """Reshape (0 copies the input dim, -1 infers) then transpose."""
        layer = self.network.add_shuffle(x)
        if reshape is not None:
            layer.reshape_dims = reshape
        if transpose is not None:
            layer.second_transpose = transpose
        return self.named(layer, name).get_output(0)

    def split_last(self, x: Any, sizes: list[int], name: str) -> list[Any]:
        """Slices of the last dimension; the leading (dynamic) dims come from the input's shape."""
        rank = len(x.shape)
        shape = self.named(self.network.add_shape(x), f"{name}.shape").get_output(0)
        lead = self.named(self.network.add_slice(shape, (0,), (rank - 1,), (1,)), f"{name}.lead")
        outputs, offset = [], 0
        for i, size in enumerate(sizes):
            width = self.constant(np.array([size], dtype=np.int64), f"{name}.{i}.width")
            concat = self.network.add_concatenation([lead.get_output(0), width])
            out_shape = self.named(concat, f"{name}.{i}.size").get_output(0)
            layer = self.network.add_slice(
                x, (0,) * (rank - 1) + (offset,), (1,) * rank, (1,) * rank
            )
            layer.set_input(2, out_shape)
            outputs.append(self.named(layer, f"{name}.{i}").get_output(0))
            offset += size
        return outputs

    # Linear algebra -------------------------------------------------------------------------
    def linear(self, x: Any, weight: np.ndarray, bias: np.ndarray | None, name: str) -> Any:
        """x @ weight.T (+ bias) with `weight` in HF layout [out, in]; no transposed copy."""
        rank = len(x.shape)
        w = self.constant(weight.reshape((1,) * (rank - 2) + weight.shape), f"{name}.weight")
        none, transpose = self.trt.MatrixOperation.NONE, self.trt.MatrixOperation.TRANSPOSE
        y = self.named(self.network.add_matrix_multiply(x, none, w, transpose), name).get_output(0)
        if bias is not None:
            b = self.constant(bias.reshape((1,) * (rank - 1) + bias.shape), f"{name}.bias")
            y = self.add(y, b, f"{name}.add_bias")
        return y
