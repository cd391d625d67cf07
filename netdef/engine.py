"""Turn a `DecoderNetwork` into a serialized engine with its optimization profiles."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path
from typing import Any

from weights.folders import interrupts_deferred

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
    size in bytes. Whatever stops the build (a Ctrl-C, a full disk) is raised here and
    leaves no file at `path`.
    """
    trt = dn.trt
    cache_bytes = timing_cache.read_bytes() if timing_cache and timing_cache.is_file() else b""
    config = builder_config(dn, target, optimization_level, cache_bytes if timing_cache else None)
    stop = Callbacks()
    config.progress_monitor = stop.monitor(trt, progress_monitor)
    try:
        # A Ctrl-C or SIGTERM stops the build through the monitor, not inside a callback.
        with DirectFile(path) as f, interrupts_deferred(stop.stop):
            ok = dn.builder.build_serialized_network_to_stream(
                dn.network, config, stop.writer(trt, f)
            )
            size = f.size
        stop.raise_first(path)
        if not ok or size == 0:
            raise EngineBuildError(
                "TensorRT could not build the engine (see the builder log above); "
                "check the target GPU and try a smaller --max-seq-len or --max-batch."
            )
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if timing_cache:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return size


class Callbacks:
    """The builder's Python callbacks (the engine writer, the progress monitor), guarded.

    TensorRT catches what a Python callback raises, logs it and goes on: a Ctrl-C that
    landed in the writer left a truncated engine that the build reported as written, and
    one in the monitor was lost or failed the build as "could not build". Here the first
    exception, or a Ctrl-C or SIGTERM (`weights.folders.interrupts_deferred`), is kept; from
    then on the monitor cancels the build and the writer writes nothing, and `raise_first`
    raises it once the builder has returned."""

    def __init__(self) -> None:
        self.first: BaseException | None = None

    def stop(self, e: BaseException) -> None:
        self.first = self.first or e

    def guard(self, call: Any, *args: Any) -> Any:
        try:
            return None if self.first else call(*args)
        except BaseException as e:  # kept; raise_first raises it
            self.stop(e)
            return None

    def writer(self, trt: Any, f: DirectFile) -> Any:
        guard = self.guard

        class Writer(trt.IStreamWriter):
            def __init__(self) -> None:
                trt.IStreamWriter.__init__(self)

            def write(self, data: memoryview) -> int:
                return guard(f.write, data) or 0

        return Writer()

    def monitor(self, trt: Any, inner: Any) -> Any:
        """`inner`'s progress (if any), and the way an exception cancels the build."""
        guard, callbacks = self.guard, self

        class Monitor(trt.IProgressMonitor):
            def __init__(self) -> None:
                trt.IProgressMonitor.__init__(self)

            def phase_start(self, phase_name: str, parent_phase: str | None, steps: int) -> None:
                if inner is not None:
                    guard(inner.phase_start, phase_name, parent_phase, steps)

            def step_complete(self, phase_name: str, step: int) -> bool:
                go_on = inner is None or guard(inner.step_complete, phase_name, step) is not False
                return go_on and callbacks.first is None

            def phase_finish(self, phase_name: str) -> None:
                if inner is not None:
                    guard(inner.phase_finish, phase_name)

        return Monitor()

    def raise_first(self, path: Path) -> None:
        """Raise what a callback raised: an OSError as a build error naming the file."""
        if isinstance(self.first, OSError):
            raise EngineBuildError(
                f"writing the engine to {path} failed: {self.first.strerror or self.first}."
            ) from None
        if self.first is not None:
            raise self.first


class DirectFile:
    """A file written front to back that bypasses the page cache (O_DIRECT) where the OS and
    file system allow it, else a plain buffered file.

    Why: the engine is as large as the checkpoint, and buffered writes of it were throttled
    to the disk's writeback rate. On the 2-core build VM (ext4, docs/benchmarks.md) 2 GB
    took 3.5-6 s buffered and 1.0 s direct, a sixth of a Gemma-3-1B build. Direct writes
    need block-aligned memory, sizes and offsets, so the data goes through an aligned
    buffer; the last partial block is written buffered."""

    BLOCK = 4096  # a multiple of every common logical block size

    def __init__(self, path: Path, buffer_bytes: int = 16 << 20):
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self.direct = self._set_direct(True)
        self.buf = mmap.mmap(-1, buffer_bytes)  # page-aligned
        self.fill = 0
        self.size = 0

    def _set_direct(self, on: bool) -> bool:
        """Switch O_DIRECT on or off; False where unsupported (no O_DIRECT, or EINVAL)."""
        if not hasattr(os, "O_DIRECT"):  # not Linux
            return False
        import fcntl  # POSIX only

        flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
        except OSError:
            return False
        return on

    def write(self, data: memoryview) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            n = min(len(view) - done, len(self.buf) - self.fill)
            self.buf[self.fill : self.fill + n] = view[done : done + n]
            self.fill += n
            done += n
            if self.fill == len(self.buf):
                self._drain(self.fill)
        self.size += done
        return done

    def _drain(self, n: int) -> None:
        """Write the buffer's first `n` bytes; a file system that refuses a direct write
        (EINVAL) gets buffered ones from then on."""
        view, done = memoryview(self.buf)[:n], 0
        try:
            while done < n:
                try:
                    done += os.write(self.fd, view[done:])
                except OSError as e:
                    if not (self.direct and e.errno == errno.EINVAL):
                        raise
                    self.direct = self._set_direct(False)
        finally:
            view.release()
        self.fill = 0

    def close(self) -> None:
        """Write what is buffered (the last partial block buffered) and close the file."""
        try:
            tail = self.fill % self.BLOCK
            whole = self.fill - tail
            if whole:
                self._drain(whole)
                self.buf.move(0, whole, tail)
                self.fill = tail
            if self.fill:
                self.direct = self._set_direct(False)
                self._drain(self.fill)
        finally:
            os.close(self.fd)
            self.buf.close()

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
