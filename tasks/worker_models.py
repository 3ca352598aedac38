"""The models of unit selection, loaded once in the fork server of the worker
processes (tasks/runners.py: WORKER_PRELOAD, start_worker_server), so that every
worker forks with them instead of loading its own: the spaCy pipelines and the
tokenizer take 0.8 s, on the path of each worker's first select_units call.

The run that starts the fork server names its UnitConfig in
$GEAR_WORKER_UNIT_CONFIG (JSON). Imported anywhere but in the fork server, or
without that variable, this module does nothing. A model that fails to load here
is left to the stage, which loads it again in the worker and reports the failure.
"""

from __future__ import annotations

import os
import sys

UNIT_CONFIG_ENV = "GEAR_WORKER_UNIT_CONFIG"


def in_fork_server() -> bool:
    """Whether this process is multiprocessing's fork server, which starts as
    `python -c "from multiprocessing.forkserver import main; main(...)"` and imports
    its preload modules before it forks any worker."""
    return sys.argv[:1] == ["-c"] and "multiprocessing.forkserver" in sys.modules


def _load_named_models() -> None:
    spec = os.environ.get(UNIT_CONFIG_ENV)
    if not spec:
        return
    try:
        from tasks.select_units import UnitConfig, load_models

        load_models(UnitConfig.model_validate_json(spec))
    except Exception:  # noqa: BLE001 - the fork server must start; the stage reports the failure
        pass


if in_fork_server():
    _load_named_models()
