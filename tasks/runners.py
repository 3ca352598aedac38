"""Where a flow's mapped stages run: threads, worker processes, a Dask or a
Ray cluster, chosen by config (a flow parameter, or environment variables
for deployments), never by a code edit.

``TaskRunnerConfig`` is the choice; ``task_runner(config)`` builds the
Prefect task runner; ``map_stage`` sends a stage over many inputs in batches
(one Prefect task per batch of shards, not one tiny task per shard) and
returns the folders in input order. Under the threads runner, the calls of
the stages that hold the GIL (``Stage(gil_bound=True)``: pure-Python parsing)
run in ``worker_processes``, forked from one server that has imported them.
Every worker must see the same output folder: on a cluster that is a shared
POSIX path, and every process reports to one Prefect server
(``PREFECT_API_URL``).
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from pydantic import BaseModel, Field, model_validator

from tasks.params_model import ParamsModel

if TYPE_CHECKING:  # the `gear` CLI reads the runner kinds without loading the stage runner
    from tasks.stage import Stage

RunnerKind = Literal["threads", "processes", "dask", "ray"]
RUNNERS: tuple[str, ...] = get_args(RunnerKind)


# For deployments: the work pool's environment picks the runner (a field given explicitly wins).
_ENV = {"kind": "GEAR_TASK_RUNNER", "workers": "GEAR_WORKERS", "address": "GEAR_RUNNER_ADDRESS"}


class TaskRunnerConfig(ParamsModel):
    """Where the mapped stages (extraction, unit selection, rewriting, relevance scoring) run."""

    kind: RunnerKind = Field(
        "threads",
        description="threads: one process, bounded threads (extraction and unit selection, pure Python, run in "
        "worker processes forked from a fork server that has imported them); processes: worker processes on this machine "
        "(spaCy and the tokenizer load once per worker); dask / ray: a cluster (a running one at `address`, "
        "else a local one of `workers` processes). $GEAR_TASK_RUNNER overrides the default.",
    )
    workers: int = Field(
        0, ge=0, le=100_000,
        description="Threads or processes (a local cluster's workers); 0: the core count. $GEAR_WORKERS overrides the default.",
    )
    address: str = Field(
        "",
        description="A running cluster: a Dask scheduler (tcp://host:8786) or a Ray head (ray://host:10001); "
        "empty: start a local one. $GEAR_RUNNER_ADDRESS overrides the default.",
    )
    tasks_per_worker: int = Field(
        4, ge=1, le=1000,
        description="Shards are batched so that each worker gets about this many tasks (fewer, larger tasks "
        "than one per shard; enough to balance uneven shards).",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_environment(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {**{k: os.environ[v] for k, v in _ENV.items() if os.environ.get(v)}, **data}

    @property
    def n_workers(self) -> int:
        return self.workers or os.cpu_count() or 1


def task_runner(config: TaskRunnerConfig):
    """The Prefect task runner for ``config`` (use it as a context manager)."""
    if config.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=config.n_workers)
    if config.kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=config.n_workers)
    if config.kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as exc:  # pragma: no cover - the extra is installed by scripts/install.sh
            raise ImportError("task runner 'dask' needs the dask extra: pip install -e '.[dask]'") from exc
        if config.address:
            return DaskTaskRunner(address=config.address)
        # One thread per worker process: the stages are CPU-bound Python.
        return DaskTaskRunner(cluster_kwargs={"n_workers": config.n_workers, "threads_per_worker": 1, "processes": True})
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:  # pragma: no cover
        raise ImportError("task runner 'ray' needs the ray extra: pip install -e '.[ray]'") from exc
    if config.address:
        return RayTaskRunner(address=config.address)
    return RayTaskRunner(init_kwargs={"num_cpus": config.n_workers, "include_dashboard": False})


def parts_per_shard(n_shards: int, config: TaskRunnerConfig) -> int:
    """Into how many parts a stage that can split a shard splits each one, so
    that fewer shards than workers still keep every worker busy."""
    return max(1, config.n_workers // max(1, n_shards))


def batches(items: Sequence[Any], config: TaskRunnerConfig) -> list[list[Any]]:
    """Consecutive batches: about ``workers * tasks_per_worker`` of them."""
    if not items:
        return []
    n = min(len(items), config.n_workers * config.tasks_per_worker)
    size = math.ceil(len(items) / n)
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def map_stage(runner: Any, stage: Stage, items: Sequence[Any], config: BaseModel, work_dir: str,
              runner_config: TaskRunnerConfig, **fixed: Any) -> list[Path]:
    """Run ``stage`` once per item (its first input, or a dict of inputs;
    ``fixed`` gives the same value of its other inputs to every run), a batch
    of items per task, on ``runner``; the output folders in the order of ``items``."""
    from prefect import unmapped

    futures = runner.map(stage.batch_task, {"items": batches(items, runner_config), "config": unmapped(config),
                                            "work_dir": unmapped(work_dir), "fixed": unmapped(fixed)})
    return [Path(p) for future in futures for p in future.result()]


# -- worker processes for the GIL-bound stage bodies under the threads runner

# What the worker processes' fork server imports once: the modules of the ``gil_bound``
# stages, the libraries their bodies import lazily (spaCy alone takes 1.7 s),
# tasks.worker_models (the run's unit-selection models, loaded) and tasks.quick_exit
# (the server's own exit).
WORKER_PRELOAD = ("tasks.extract_docs", "tasks.select_units", "spacy", "tokenizers", "tasks.worker_models",
                  "tasks.quick_exit")

_POOL_LOCK = threading.Lock()
_pool: Any = None  # the ProcessPoolExecutor of the open ``worker_processes``, else None


def _uses_worker_processes(config: TaskRunnerConfig) -> bool:
    return config.kind == "threads" and config.n_workers >= 2


def start_worker_server(config: TaskRunnerConfig, units: BaseModel | None = None) -> None:
    """Start the fork server of ``worker_processes`` now, in the background (the CLI
    calls this before it waits for the Prefect API, so the imports overlap that wait);
    ``units``: the run's UnitConfig, whose models the server loads for its workers.
    A server already running stays as it is."""
    if not _uses_worker_processes(config):
        return
    import multiprocessing
    from multiprocessing import forkserver

    from tasks.worker_models import UNIT_CONFIG_ENV

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(WORKER_PRELOAD) + _main_module())
    # The server takes this process's environment when it starts, and only then.
    saved = os.environ.pop(UNIT_CONFIG_ENV, None)
    if units is not None:
        os.environ[UNIT_CONFIG_ENV] = units.model_dump_json()
    try:
        forkserver.ensure_running()
    finally:
        os.environ.pop(UNIT_CONFIG_ENV, None)
        if saved is not None:
            os.environ[UNIT_CONFIG_ENV] = saved


def _main_module() -> list[str]:
    """The module this process runs as ``python -m NAME`` (a deployment's flow run runs
    under ``python -m prefect.engine``), as a preload: every forked worker re-runs the
    main module so that pickles can name its functions, and a fork server that has
    imported it once leaves each worker only the module's body to run (0.03 s, not the
    1 s of importing Prefect again). A script's path needs nothing: the CLI's is cheap."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    name = getattr(spec, "name", None)
    return [name] if name and not (name == "__main__" or name.endswith(".__main__")) else []


@contextlib.contextmanager
def worker_processes(config: TaskRunnerConfig, units: BaseModel | None = None) -> Iterator[None]:
    """While open, a ``gil_bound`` stage's batch task (a thread of the threads runner)
    runs each item's stage call in one of ``config.n_workers`` worker processes,
    so pure-Python parsing uses every core, not one. The workers fork from
    multiprocessing's fork server, which imports ``WORKER_PRELOAD`` once: a worker
    starts in milliseconds, not the seconds a fresh interpreter takes to import
    spaCy; with ``units`` (the run's UnitConfig) it forks them with its models loaded.
    A no-op for one worker and for the other runners (their workers are processes
    already)."""
    global _pool
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = None
    with _POOL_LOCK:  # one pool per process: a flow inside another's uses the outer one
        if _uses_worker_processes(config) and _pool is None:
            start_worker_server(config, units)
            pool = _pool = ProcessPoolExecutor(max_workers=config.n_workers,
                                               mp_context=multiprocessing.get_context("forkserver"))
    try:
        yield
    finally:
        if pool is not None:
            with _POOL_LOCK:
                _pool = None
            pool.shutdown(wait=True, cancel_futures=True)


def run_stage_call(stage: Stage, kwargs: dict[str, Any]) -> Any:
    """``stage(**kwargs)``: in a worker process while ``worker_processes`` is open
    and the stage is ``gil_bound``, else here."""
    pool = _pool
    if pool is None or not stage.gil_bound:
        return stage(**kwargs)
    return pool.submit(_call_in_worker, stage, kwargs, dict(os.environ)).result()


def _call_in_worker(stage: Stage, kwargs: dict[str, Any], environ: dict[str, str]) -> Any:
    """A stage call in a worker: under the caller's environment of the moment (the fork
    server keeps the one it started with), raising an exception that comes back whole."""
    for name in set(os.environ) - set(environ):
        del os.environ[name]
    os.environ.update(environ)
    try:
        return stage(**kwargs)
    except Exception as exc:
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:  # noqa: BLE001 - an exception that cannot cross processes as itself
            raise RuntimeError(f"{type(exc).__name__}: {exc}") from None
        raise
