"""The entry point every command in tools/ shares."""

from __future__ import annotations

import sys
from collections.abc import Callable


def run(main: Callable[[], int]) -> None:
    """Exit with `main()`'s status. Ctrl-C ends a command with one line and status 130, as a
    shell reports it, not a traceback: by then the command's own cleanup has run (staging
    folders removed, a started server stopped), as it does for any exception."""
    try:
        status = main()
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        status = 130
    sys.exit(status)
