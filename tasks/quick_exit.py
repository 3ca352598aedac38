"""A process's end without the interpreter's teardown of the modules it imported
(Prefect, spaCy, torch: half a second or more), for `gear` (gear_cli.main) and
for the fork server of the ingestion worker processes (tasks/runners.py:
WORKER_PRELOAD), which imports this module and so ends the same way.

The fork server holds the command's stdout and stderr (its workers write there)
and exits when the command does; while it tears down the spaCy it has imported,
a pipe reading `gear`'s output stays open. Only the standard library (and
tasks.worker_models, which imports nothing else) is imported here, so a command
that never loaded the project pays nothing for it at exit.
"""

from __future__ import annotations

import atexit
import os
import sys

from tasks.worker_models import in_fork_server


def exit_without_teardown(status: int) -> None:
    """Flush stdout and stderr, then end the process with ``status`` at once (call it
    from the last exit handler: the others, Prefect's log and event flushes, have run)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


# In the fork server itself, never in a process that imports this module for the
# function above: that one's exit status must stand.
if in_fork_server():
    atexit.register(exit_without_teardown, 0)
