"""Imported by the fork server of the ingestion worker processes (tasks/runners.py:
WORKER_PRELOAD) and nowhere else: the server's exit skips the interpreter's teardown.

The fork server holds the command's stdout and stderr (its workers write there)
and exits when the command does; tearing down the spaCy it has imported takes
it half a second or more, during which a pipe reading `gear`'s output stays
open. It has nothing to flush but those streams.
"""

from __future__ import annotations

import atexit
import os
import sys


def _exit_now() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


# Only in the fork server itself (multiprocessing starts it as `python -c "from
# multiprocessing.forkserver import main; main(...)"`), never in a process that
# imports this module for another reason: its exit status must stand.
if sys.argv[:1] == ["-c"] and "multiprocessing.forkserver" in sys.modules:
    atexit.register(_exit_now)
