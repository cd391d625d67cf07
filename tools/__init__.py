"""The command-line tools (python -m tools.<name>).

A Ctrl-C while `python -m` imports a command (about a second: NumPy, ml_dtypes, the
tokenizer) ends it with the line `tools.cli.run` prints, not an import traceback; `run`
hands Ctrl-C back to Python once the command starts. sys.argv[0] is "-m" only while
`python -m` finds the module, so importing `tools` from a program changes nothing.
"""

import os
import signal
import sys


def _interrupted_while_importing(signum: int, frame: object) -> None:
    print("interrupted.", file=sys.stderr)
    os._exit(130)  # nothing is written yet: no cleanup to run


if sys.argv[:1] == ["-m"] and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_while_importing)
