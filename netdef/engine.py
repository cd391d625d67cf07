"""Turn a `DecoderNetwork` into a serialized engine with its optimization profiles."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .decoder import DecoderNetwork
from .tensorrt_module import compute_capability, is_rtx


class EngineBuildError(RuntimeError):
    """The TensorRT builder returned no engine."""


def builder_config(
    dn: DecoderNetwork,
    target: str | None = None,
    optimization_level: int | None = None,
    timing_cache: bytes | None = None,
) -> Any:
    """Builder config with one optimization profile per `dn.profiles` entry, in order."""
    trt = dn.trt
    config = dn.builder.create_builder_config()
    for spec in dn.profiles:
        profile = dn.builder.create_optimization_profile()
        for name, (lo, opt, hi) in spec.shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    if optimization_level is not None:
        config.builder_optimization_level = optimization_level
    if timing_cache is not None:
        config.set_timing_cache(config.create_timing_cache(timing_cache), ignore_mismatch=True)
    if is_rtx(trt) and target is not None:  # ahead-of-time build for one GPU generation
        config.num_compute_capabilities = 1
        config.set_compute_capability(compute_capability(trt, target), 0)
    return config


def build_engine(
    dn: DecoderNetwork,
    path: Path,
    *,
    target: str | None = None,
    optimization_level: int | None = None,
    timing_cache: Path | None = None,
    progress_monitor: Any = None,
) -> int:
    """Build and stream the engine straight to `path` (it never sits whole in host memory).

    `timing_cache` is read if it exists and written back after the build. Returns the engine
    size in bytes.
    """
    trt = dn.trt
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    config = builder_config(dn, target, optimization_level, cache_bytes if timing_cache else None)
    if progress_monitor is not None:
        config.progress_monitor = progress_monitor

    class _FileWriter(trt.IStreamWriter):
        def __init__(self, f):
            trt.IStreamWriter.__init__(self)
            self.f, self.size = f, 0

        def write(self, data: memoryview) -> int:
            n = self.f.write(data)
            self.size += n
            return n

    with open(path, "wb") as f:
        writer = _FileWriter(f)
        ok = dn.builder.build_serialized_network_to_stream(dn.network, config, writer)
    if not ok or writer.size == 0:
        raise EngineBuildError(
            "TensorRT could not build the engine (see the builder log above); "
            "check the target GPU and try a smaller --max-seq-len or --max-batch."
        )
    if timing_cache:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return writer.size
