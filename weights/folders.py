"""Outputs written whole: staged under a hidden partial name beside their final path, renamed
into place, and guarded by a lock so that concurrent identical writers do the work once.

A partial path is `.<name>.<8 hex>.partial`. While the lock of `<name>` is held nobody else is
writing one, so any partial of that name left over is from a process that died (`kill -9`,
power loss) and is removed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import threading
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path


def partial_path(final: Path) -> Path:
    """A fresh hidden name beside `final` to write it under."""
    final = Path(final)
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.partial")


def remove_stale_partials(final: Path, say: Callable[[str], None], what: str = "runs") -> None:
    """Delete the partials of `final` that dead writers left, and `say` so ("Removed what
    interrupted `what` left in ..."); call only under `locked(final)`."""
    final = Path(final)
    pattern = re.compile(rf"\.{re.escape(final.name)}\.[0-9a-f]{{8}}\.partial")
    stale = sorted(
        p for p in final.parent.glob(f".{final.name}.*.partial") if pattern.fullmatch(p.name)
    )
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    if stale:
        names = ", ".join(p.name for p in stale)
        say(f"Removed what interrupted {what} left in {final.parent}: {names}.")


@contextmanager
def locked(final: Path, on_wait: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Hold the lock of `final` (`.<name>.lock` beside it, removed on release); `on_wait` is
    called once if another process holds it, before waiting for it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = final.with_name(f".{final.name}.lock")
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:  # the holder before us removes the file: then lock the one now at that path
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def interrupts_deferred(
    on_interrupt: Callable[[BaseException], None] | None = None,
) -> Iterator[None]:
    """A block that must not stop halfway (folders swapped into place; a TensorRT call whose
    Python callbacks would swallow the exception): what a Ctrl-C or SIGTERM handler raises
    inside it (Python's KeyboardInterrupt, tools.cli's Terminated) is handed to
    `on_interrupt`, or by default raised when the block has ended. Handlers run when the
    signal comes, as before; one that raises nothing is unaffected. Main thread only, where
    Python runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in INTERRUPTS}
    previous = {sig: h for sig, h in previous.items() if callable(h)}  # not SIG_DFL/SIG_IGN
    raised: list[BaseException] = []

    def handler(signum: int, frame: object) -> None:
        try:
            previous[signum](signum, frame)
        except BaseException as e:
            raised.append(e)
            if on_interrupt is not None:
                on_interrupt(e)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
    if raised and on_interrupt is None:
        raise raised[0]


@contextmanager
def staged_file(final: Path) -> Iterator[Path]:
    """A partial path to write instead of `final`, renamed into place when the block ends
    without error, else removed: `final` is either what it was or the whole new file. A
    symbolic link is written through (its target replaced), as opening it would."""
    final = Path(os.path.realpath(final))
    tmp = partial_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged_folder(final: Path, owned: Collection[str] = ()) -> Iterator[Path]:
    """A new partial folder to write instead of `final`, which takes its place when the block
    ends without error, else is removed: `final` is either what it was or the whole new
    folder. An existing `final` must be an empty folder (the rename refuses any other), or
    with `owned` one holding only files of those names, as the caller checks last inside the
    block (it may have changed meanwhile): that one is renamed aside, the new folder renamed
    into place, and the old one then emptied of the `owned` files and removed, so nothing else
    is ever deleted (one that holds another file once aside, or a failed rename of the new
    folder, puts it back and raises). A Ctrl-C or SIGTERM waits for the swap, which halfway
    could leave neither folder in place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(final)
    tmp.mkdir()  # not mkdtemp: the folder should get the umask's permissions, not 0700
    try:
        yield tmp
        with interrupts_deferred():
            old = partial_path(final) if owned and final.exists() else None
            if old is not None:
                os.replace(final, old)
                try:
                    # Checked again once aside, where nothing can be put in by its path: a
                    # file of someone else's would stay in a partial folder that the next
                    # writer's remove_stale_partials deletes.
                    if foreign := sorted(n for n in os.listdir(old) if not _owned(old / n, owned)):
                        raise OSError(errno.ENOTEMPTY, f"it now holds {foreign[0]}", str(final))
                    os.replace(tmp, final)
                except BaseException:
                    os.replace(old, final)  # `final` as it was
                    raise
                for name in owned:
                    (old / name).unlink(missing_ok=True)
                old.rmdir()
            else:
                os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed into place


def _owned(path: Path, owned: Collection[str]) -> bool:
    """Whether `staged_folder` may delete `path`: one of the `owned` names, and no folder."""
    return path.name in owned and (path.is_symlink() or not path.is_dir())
