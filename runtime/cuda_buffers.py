"""Small CUDA runtime helpers for the TensorRT backend, through cuda-python (`cuda.bindings`).

Device and pinned host buffers, one stream, event timing, async copies, the "one engine call"
step (uploads → execute → downloads) and CUDA graph capture of such a step. `cuda.bindings`
is imported on first use, so importing this module never needs cuda-python or a GPU.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

_RT: Any = None
INSTALL_CUDA = "pip install -e '.[cuda]'"


class CudaError(RuntimeError):
    """A CUDA runtime call failed, or cuda-python is missing."""


def _import_cudart() -> ModuleType | ImportError:
    """`cuda.bindings.runtime`, imported on first use, or the ImportError that says why it
    cannot be: `cudart` raises it as a CudaError, `gpu_unavailable_reason` says it."""
    global _RT
    if _RT is None:
        try:
            from cuda.bindings import runtime
        except ImportError as e:
            return e
        _RT = runtime
    return _RT


def cudart() -> Any:
    """`cuda.bindings.runtime`, imported on first use."""
    rt = _import_cudart()
    if isinstance(rt, ImportError):
        raise CudaError(
            f"the TensorRT backend needs cuda-python ({rt}); install it: {INSTALL_CUDA}"
        )
    return rt


def check(result: Any, call: str) -> Any:
    """cuda.bindings calls return (error, *values): raise `CudaError` naming `call` unless the
    error is cudaSuccess; return None, the one value, or the tuple of values."""
    rt = cudart()
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if err != rt.cudaError_t.cudaSuccess:
        name = rt.cudaGetErrorName(err)[1]
        text = rt.cudaGetErrorString(err)[1]
        raise CudaError(f"{call} failed: {name.decode()} ({text.decode()})")
    return None if not values else values[0] if len(values) == 1 else values


def cuda(call: str, *args: Any) -> Any:
    """`cuda("cudaMalloc", n)`: call `cuda.bindings.runtime.<call>` and `check` the result."""
    return check(getattr(cudart(), call)(*args), call)


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    major: int
    minor: int
    total_bytes: int

    @property
    def cc(self) -> tuple[int, int]:
        return (self.major, self.minor)


def device_info(index: int | None = None) -> DeviceInfo:
    """Name and compute capability of GPU `index` (default: the current device)."""
    index = cuda("cudaGetDevice") if index is None else index
    prop = cuda("cudaGetDeviceProperties", index)
    name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) else prop.name
    return DeviceInfo(index, name, prop.major, prop.minor, prop.totalGlobalMem)


def free_bytes() -> int:
    """Device memory free on the current GPU now (cudaMemGetInfo)."""
    free, _total = cuda("cudaMemGetInfo")
    return int(free)


def gpu_unavailable_reason() -> str | None:
    """None when cuda-python imports and a CUDA device is present; else why not, as a clause
    that the callers' sentences ("... needs a CUDA GPU, but <reason>") and test skips end in."""
    if isinstance(rt := _import_cudart(), ImportError):
        return f"cuda-python cannot be imported ({rt}; install it: {INSTALL_CUDA})"
    try:
        count = cuda("cudaGetDeviceCount")
    except CudaError as e:
        return str(e)
    return None if count > 0 else "no CUDA device is present"


class DeviceBuffer:
    """`nbytes` of device memory (cudaMalloc); `ptr` is the address TensorRT binds."""

    def __init__(self, nbytes: int):
        self.nbytes = int(nbytes)
        self.ptr = int(cuda("cudaMalloc", max(self.nbytes, 1)))

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            cuda("cudaFree", ptr)


class PinnedBuffer:
    """Page-locked host memory (cudaMallocHost) seen as a NumPy array `array` of shape, dtype.

    `array` is a view of that memory: never keep it (or slices of it) past `free()`."""

    def __init__(self, shape: int | Sequence[int], dtype: Any):
        self.dtype = np.dtype(dtype)
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        self.ptr = int(cuda("cudaMallocHost", max(self.nbytes, 1)))
        raw = (ctypes.c_uint8 * self.nbytes).from_address(self.ptr)
        self.array: np.ndarray = np.frombuffer(raw, np.uint8).view(self.dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self.array = np.empty(0, self.dtype)
            cuda("cudaFreeHost", ptr)


class Stream:
    """One non-blocking CUDA stream; `handle` is the int TensorRT's execute_async_v3 takes."""

    def __init__(self):
        rt = cudart()
        self._stream = cuda("cudaStreamCreateWithFlags", rt.cudaStreamNonBlocking)
        self.handle = int(self._stream)

    def synchronize(self) -> None:
        cuda("cudaStreamSynchronize", self._stream)

    def free(self) -> None:
        if self.handle:
            self.handle = 0
            cuda("cudaStreamDestroy", self._stream)


def _copy(dst: int, src: int, nbytes: int, stream: Stream, kind: str) -> None:
    rt = cudart()
    cuda("cudaMemcpyAsync", dst, src, nbytes, getattr(rt.cudaMemcpyKind, kind), stream.handle)


def h2d(dst: DeviceBuffer, src: PinnedBuffer, nbytes: int, stream: Stream) -> None:
    _copy(dst.ptr, src.ptr, nbytes, stream, "cudaMemcpyHostToDevice")


def d2h(dst: PinnedBuffer, src: DeviceBuffer, nbytes: int, stream: Stream) -> None:
    _copy(dst.ptr, src.ptr, nbytes, stream, "cudaMemcpyDeviceToHost")


def d2d(dst: DeviceBuffer, src: DeviceBuffer, nbytes: int, stream: Stream) -> None:
    _copy(dst.ptr, src.ptr, nbytes, stream, "cudaMemcpyDeviceToDevice")


# (device destination, pinned source or another device buffer, bytes)
Upload = tuple[DeviceBuffer, PinnedBuffer | DeviceBuffer, int]
Download = tuple[PinnedBuffer, DeviceBuffer, int]  # (pinned destination, device source, bytes)


def enqueue_step(
    stream: Stream,
    uploads: Sequence[Upload],
    execute: Callable[[Stream], None],
    downloads: Sequence[Download],
) -> None:
    """One engine call on `stream`: async copies of the inputs (H2D, or D2D from a device
    buffer), `execute`, async D2H of the outputs.

    Only enqueues (no synchronization), so it can be captured into a `CudaGraph`."""
    for dst, src, nbytes in uploads:
        (d2d if isinstance(src, DeviceBuffer) else h2d)(dst, src, nbytes, stream)
    execute(stream)
    for dst, src, nbytes in downloads:
        d2h(dst, src, nbytes, stream)


class Event:
    """A CUDA event without timing: `record` it after work on a stream, then `synchronize`
    waits for that work alone (later work on the stream may still run)."""

    def __init__(self):
        rt = cudart()
        self._event = cuda("cudaEventCreateWithFlags", rt.cudaEventDisableTiming)

    def record(self, stream: Stream) -> None:
        cuda("cudaEventRecord", self._event, stream.handle)

    def synchronize(self) -> None:
        cuda("cudaEventSynchronize", self._event)

    def free(self) -> None:
        if self._event is not None:
            cuda("cudaEventDestroy", self._event)
            self._event = None


class EventTimer:
    """Two CUDA events around work on a stream: `start`, `stop`, then `elapsed_ms()`."""

    def __init__(self):
        self._start = cuda("cudaEventCreate")
        self._end = cuda("cudaEventCreate")

    def start(self, stream: Stream) -> None:
        cuda("cudaEventRecord", self._start, stream.handle)

    def stop(self, stream: Stream) -> None:
        cuda("cudaEventRecord", self._end, stream.handle)

    def elapsed_ms(self) -> float:
        """Waits for the stop event; milliseconds between the two events."""
        cuda("cudaEventSynchronize", self._end)
        return float(cuda("cudaEventElapsedTime", self._start, self._end))

    def free(self) -> None:
        for event in (self._start, self._end):
            if event is not None:
                cuda("cudaEventDestroy", event)
        self._start = self._end = None


class CudaGraph:
    """Work captured from a stream once, replayed with one cudaGraphLaunch.

    The graph keeps every address and size it was captured with; memory copies read the
    host/device buffers' contents at launch time, so new inputs go into the same buffers."""

    def __init__(self, graph: Any, graph_exec: Any):
        self._graph, self._exec = graph, graph_exec

    @classmethod
    def capture(cls, stream: Stream, enqueue: Callable[[], None]) -> CudaGraph:
        rt = cudart()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        cuda("cudaStreamBeginCapture", stream.handle, mode)
        try:
            enqueue()
        except BaseException:
            graph = rt.cudaStreamEndCapture(stream.handle)[1]  # leave capture mode, then drop
            if graph is not None:
                rt.cudaGraphDestroy(graph)
            raise
        graph = cuda("cudaStreamEndCapture", stream.handle)
        try:
            graph_exec = cuda("cudaGraphInstantiate", graph, 0)
        except CudaError:
            cuda("cudaGraphDestroy", graph)
            raise
        return cls(graph, graph_exec)

    def launch(self, stream: Stream) -> None:
        cuda("cudaGraphLaunch", self._exec, stream.handle)

    def free(self) -> None:
        if self._exec is not None:
            cuda("cudaGraphExecDestroy", self._exec)
            cuda("cudaGraphDestroy", self._graph)
            self._exec = self._graph = None


def bandwidth(mib: int, repeats: int = 5) -> dict[str, float]:
    """GB/s (10^9 bytes copied per second; D2D moves twice that through memory) of H2D,
    D2H (pinned host memory) and D2D copies of `mib` MiB; best of `repeats`."""
    nbytes = mib << 20
    stream, timer = Stream(), EventTimer()
    host, a, b = PinnedBuffer(nbytes, np.uint8), DeviceBuffer(nbytes), DeviceBuffer(nbytes)
    try:
        host.array[:] = 1
        out = {}
        for name, copy in (
            ("H2D", lambda: h2d(a, host, nbytes, stream)),
            ("D2H", lambda: d2h(host, a, nbytes, stream)),
            ("D2D", lambda: d2d(b, a, nbytes, stream)),
        ):
            copy()  # warm up
            best = float("inf")
            for _ in range(repeats):
                timer.start(stream)
                copy()
                timer.stop(stream)
                best = min(best, timer.elapsed_ms())
            out[name] = nbytes / best / 1e6
        return out
    finally:
        for r in (host, a, b, timer, stream):
            r.free()
