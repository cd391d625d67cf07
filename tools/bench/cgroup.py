"""--build --memory-limit: a build's child process in a memory cgroup of its own.

Peak RSS also counts the clean checkpoint pages the builder has read from the mapped file.
While memory is free the kernel leaves them mapped; when it is short it takes them back and
the builder reads them again. A cgroup's limit counts everything the process makes the
machine hold, page cache included, so a build that finishes under a limit of 2.0x its
checkpoint needs no more memory than that, whatever its unconstrained RSS.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from tools.bench import BenchError

CGROUP_ROOT = Path("/sys/fs/cgroup")
NEEDS = (
    "--memory-limit needs a memory cgroup this user can create (root, with cgroup v1's memory "
    "controller or cgroup v2 with memory delegated); run without --memory-limit otherwise"
)


def own_cgroup(proc_self_cgroup: str, root: Path = CGROUP_ROOT) -> tuple[Path, bool]:
    """This process's memory cgroup folder, and whether it is cgroup v2, from the text of
    /proc/self/cgroup ("ID:memory:/path" on v1, "0::/path" on v2)."""
    for line in proc_self_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return root / "memory" / path.lstrip("/"), False
    for line in proc_self_cgroup.splitlines():
        if line.startswith("0::"):
            return root / line[3:].lstrip("/"), True
    raise BenchError(f"{NEEDS} (no memory controller in /proc/self/cgroup).")


class MemoryCgroup:
    """A child cgroup of this process's own, capped at `limit` bytes (page cache included,
    no swap), removed by `remove` once its process has exited."""

    def __init__(self, limit: int, root: Path = CGROUP_ROOT) -> None:
        parent, self.v2 = own_cgroup(Path("/proc/self/cgroup").read_text(), root)
        self.path = parent / f"trt-netdef-bench-{os.getpid()}"
        try:
            self.path.mkdir()
            if self.v2:
                (self.path / "memory.max").write_text(str(limit))
                if (self.path / "memory.swap.max").exists():
                    (self.path / "memory.swap.max").write_text("0")
            else:
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
        except OSError as e:
            self.remove()
            raise BenchError(f"{NEEDS} ({e.strerror}: {e.filename}).") from None

    def join(self) -> None:
        """Move the calling process in (a Popen preexec_fn: the child before it execs)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def stats(self) -> dict[str, int]:
        """Peak usage in bytes, how often usage reached the limit, and OOM kills."""
        if self.v2:
            events = dict(line.split() for line in self._read("memory.events").splitlines())
            return {
                "peak_bytes": int(self._read("memory.peak")),
                "limit_hits": int(events["max"]),
                "oom_kills": int(events["oom_kill"]),
            }
        oom = dict(line.split() for line in self._read("memory.oom_control").splitlines())
        return {
            "peak_bytes": int(self._read("memory.max_usage_in_bytes")),
            "limit_hits": int(self._read("memory.failcnt")),
            "oom_kills": int(oom.get("oom_kill", 0)),
        }

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.rmdir()

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()


def uncache(files: list[Path]) -> None:
    """Drop the files' pages from the page cache, so the build reads them again and they are
    counted inside its cgroup (pages cached earlier stay charged to whoever read them)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
