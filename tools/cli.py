"""The entry point every command in tools/ shares."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from netdef.contract import DEFAULT_DTYPE, MODEL_DTYPES


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as a Ctrl-C is (the same cleanup runs); tools.serve drains instead."""


def terminate(signum: int, frame: object) -> None:
    raise Terminated


SIGPIPE_STATUS = 141  # 128 + SIGPIPE: what a shell reports for git or cat cut off by `head`


class LineTracking:
    """A text stream that knows whether its last write left a line open: a Ctrl-C between
    print's text and its newline, or during a progress bar, would glue "interrupted." to it."""

    def __init__(self, stream: TextIO):
        self.stream, self.line_open = stream, False

    def write(self, text: str) -> int:
        if text:
            self.line_open = not text.endswith("\n")
        return self.stream.write(text)

    def writelines(self, lines: Iterable[str]) -> None:  # each line through write, tracked
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, ...
        return getattr(self.stream, name)


def run(main: Callable[[], int]) -> None:
    """Exit with `main()`'s status. Ctrl-C ends a command with one line and status 130, as a
    shell reports it, not a traceback: by then the command's own cleanup has run (staging
    folders removed, a started server stopped), as it does for any exception. SIGTERM does
    the same with `terminated.` and status 143. A closed stdout (`| head`) ends it quietly
    with status 141, as SIGPIPE ends git, after the same cleanup."""
    signal.signal(signal.SIGTERM, terminate)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored in a background job
        signal.signal(signal.SIGINT, signal.default_int_handler)  # tools/__init__.py's, if any
    sys.stderr = stderr = LineTracking(sys.stderr)
    try:
        status = main()
        if not flush_stdout():  # here, not at exit, where a closed pipe is a traceback
            status = SIGPIPE_STATUS
    except KeyboardInterrupt as e:
        status = 143 if isinstance(e, Terminated) else 130
        exit_on_ctrl_c(status)  # a second Ctrl-C: the line is said, the cleanup done
        end = "\n" if stderr.line_open else ""  # a cut line is ended first
        print(end + ("terminated." if status == 143 else "interrupted."), file=sys.stderr)
    except BrokenPipeError:  # a write to the closed stdout, inside the command
        flush_stdout()
        status = SIGPIPE_STATUS
    exit_on_ctrl_c(status)  # one during the interpreter's shutdown: the work is done
    sys.exit(status)


def flush_stdout() -> bool:
    """Flush stdout; False if its reader has closed it, which then points at devnull, so that
    no later write or the interpreter's flush at exit fails again (Python's recipe, the
    signal module's "Note on SIGPIPE")."""
    try:
        sys.stdout.flush()
        return True
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return False


def exit_on_ctrl_c(status: int) -> None:
    """From now on a Ctrl-C (or SIGTERM) ends the process at once with `status`, its output
    flushed."""
    flush_stdout()
    sys.stderr.flush()
    for sig in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, lambda *_: os._exit(status))


def flag_named(e: Exception) -> str:
    """An error's message led by the flag of the one option it is about (the `field` of a
    SamplingError or OptionsError): `--max-seq-len: max_seq_len=0 must be at least 1.`"""
    field = getattr(e, "field", None)
    return f"--{field.replace('_', '-')}: {e}" if field else str(e)


def path_arg(text: str) -> Path:
    """argparse's type for a path: an empty one (an unset shell variable, `"$ARTIFACT"`) is
    refused, where Path("") would be the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("the path is empty (an unset shell variable?).")
    return Path(text)


def at_least(p: argparse.ArgumentParser, args: argparse.Namespace, lows: dict[str, float]) -> None:
    """argparse's usage error for the first given flag below its least value."""
    for flag, low in lows.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value < low:
            p.error(f"{flag} must be at least {low}.")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """What tools.generate and tools.serve run: MODEL and its backend; --dtype and
    --max-seq-len build a model folder's network for the reference backend."""
    p.add_argument(
        "model",
        type=path_arg,
        help="artifact folder from tools.build, or an HF folder with --backend reference",
    )
    p.add_argument(
        "--backend",
        choices=["tensorrt", "reference"],
        default="tensorrt",
        help="default: %(default)s",
    )
    p.add_argument(
        "--dtype",
        choices=list(MODEL_DTYPES),
        help=f"a model folder's dtype on the reference backend (default {DEFAULT_DTYPE})",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        help="a model folder's cache length on the reference backend (default: its context)",
    )
