"""The stage runner: one way to write a pipeline stage.

A stage module declares what it is and writes only its body::

    @stage("dedup", DedupConfig,
           reads={"rewrite_dir": ["queries.parquet"], "units_dirs": ["documents.parquet"]},
           writes={"queries.parquet": QUERIES_SCHEMA, "dropped.parquet": DROPPED_SCHEMA})
    def dedup(run: StageRun, rewrite_dir, units_dirs, config: DedupConfig):
        ...                      # count drops in run.funnel
        return {"queries.parquet": table, "dropped.parquet": dropped}

    dedup_task = dedup.task     # the Prefect task; `dedup(...)` is the plain core

The runner owns the rest:

- the content-addressed folder ``<work_dir>/stages/<stage>/<key>``, whose key
  hashes the stage name, its config minus operational fields
  (``config_identity``), the content of the files it reads, and its code;
- a file lock per folder (``<work_dir>/.locks/``: a second run on the same
  output waits, then reuses), the complete-folder short-circuit, and
  leftovers of killed runs;
- the body writes into ``.<key>.partial/`` (removed when the body fails,
  unless the stage is ``resumable``: then it is kept, so the next attempt
  resumes from the files it left there); returned tables are written with their
  schema, atomically, then the funnel, fsync, the marker, and one rename makes
  the folder visible complete;
- one Prefect task per stage (``stage.task``, made on first use, so a stage
  module imports no Prefect): one name, one cache key (the folder, trusted
  only while its marker is on disk), one retry policy. A stage retries only
  when it declares ``retries`` (an endpoint, a GPU run: what another attempt
  can fix); pure-CPU stages fail at once. Even then an error whose class says
  it is final (bad input, bad config, a bug) is not retried;
- ``publish``: what must happen on every run, cache hit or miss (moving a
  LATEST pointer, showing artifacts). Prefect skips a cached task's body, so
  the runner calls it from an on-completion hook on a cache hit.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pyarrow as pa
from filelock import FileLock, Timeout
from pydantic import BaseModel, ValidationError

from tasks.common import (
    SUCCESS_MARKER,
    ConfigError,
    Funnel,
    PipelineInputError,
    config_identity,
    failpoint,
    fingerprint,
    fsync_tree,
    is_complete,
    mark_complete,
    source_hash,
    stable_digest,
    write_json,
    write_parquet,
    write_text,
)
from tasks.contracts import as_paths

DEFAULT_WORK_DIR = "data"
PARTIAL_SUFFIX = ".partial"


class StageConfigError(ConfigError):
    """A stage's declaration or config that fails the same way on every attempt (not retried)."""


@dataclass
class StageRun:
    """What a stage body gets besides its inputs and config."""

    stage: str
    out: Path  # the folder being written (``.<key>.partial`` until it is complete)
    final: Path  # the folder it becomes (its name is the run's key)
    funnel: Funnel = field(default_factory=Funnel)
    info: dict[str, Any] = field(default_factory=dict)  # extra facts for the marker


# Errors that are the same on every attempt unless their class says otherwise
# (``retryable``): bad values and programming errors. OSError, MemoryError and
# RuntimeError (a lost connection, an out-of-memory GPU, a crashed trainer) may
# pass on another attempt.
_FINAL = (ValueError, TypeError, LookupError, AttributeError, NotImplementedError, AssertionError)


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt can succeed: the exception's ``retryable``
    where its class says (tasks/common.py), else False for bad values and bugs."""
    retryable = getattr(exc, "retryable", None)
    if retryable is not None:
        return bool(retryable)
    return not isinstance(exc, _FINAL)  # pydantic.ValidationError is a ValueError


def retry_unless_final(task_: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only what ``is_retryable`` allows."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classify, do not handle
        return is_retryable(exc)
    return True


class PrefectTask:
    """A Prefect task made on first use. A stage module names its task
    (``dedup_task = dedup.task``) without importing Prefect; the flow that
    calls it, or reads one of its attributes, builds it."""

    def __init__(self, make: Callable[[], Any], stage: Stage):
        self._make = make
        self._stage = stage

    @cached_property
    def task(self) -> Any:
        return self._make()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.task(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.task, name)

    def __reduce__(self):
        return (_import_stage_task, (self._stage.module, self._stage.attr))

    def __repr__(self) -> str:
        return f"<Prefect task of {self._stage!r}>"


class Stage:
    """A declared stage; calling it runs the plain core (no Prefect)."""

    def __init__(
        self,
        name: str,
        config_model: type[BaseModel],
        body: Callable[..., Mapping[str, Any] | None],
        *,
        reads: Mapping[str, Sequence[str] | Callable[[Any], Iterable[str | os.PathLike]]] | None = None,
        writes: Mapping[str, pa.Schema] | None = None,
        code: Sequence[str | os.PathLike] = (),
        key: Callable[[BaseModel], Any] = config_identity,
        key_files: Callable[[BaseModel], Iterable[str | os.PathLike]] | None = None,
        keyed_by_value: Sequence[str] = (),
        folder: Callable[[str | os.PathLike, str], Path] | None = None,
        work_dir_from: Callable[[BaseModel], str | os.PathLike] | None = None,
        in_place: bool = False,
        resumable: bool = False,
        publish: Callable[[Path], None] | None = None,
        task_run_name: str | None = None,
        retries: int = 0,
        retry_delay_seconds: float | list[float] = 5,
        gil_bound: bool = False,
    ):
        self.name = name
        self.config_model = config_model
        self.body = body
        self.reads = dict(reads or {})
        self.writes = dict(writes or {})
        self.key_config = key
        self.key_files = key_files
        self.keyed_by_value = set(keyed_by_value)
        self.folder = folder or (lambda work_dir, key_: Path(work_dir) / "stages" / name / key_)
        self.work_dir_from = work_dir_from
        self.in_place = in_place
        self.resumable = resumable
        self.publish = publish
        self.task_run_name = task_run_name
        self.retries = retries
        self.retry_delay_seconds = retry_delay_seconds
        # Pure-Python work that holds the GIL: under the threads runner its calls go to
        # worker processes (tasks/runners.py: worker_processes, WORKER_PRELOAD).
        self.gil_bound = gil_bound
        self.code_version = source_hash(inspect.getsourcefile(body), *code)
        self.module = body.__module__
        self.attr = body.__name__
        params = list(inspect.signature(body).parameters.values())
        # body(run, <inputs...>, config): the inputs are the stage's positional parameters.
        self.input_names = [p.name for p in params[1:-1]]
        self.input_defaults = {p.name: p.default for p in params[1:-1] if p.default is not inspect.Parameter.empty}
        self.__signature__ = inspect.Signature(
            [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=self.input_defaults.get(n, inspect.Parameter.empty))
             for n in self.input_names]
            + [inspect.Parameter("config", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
               inspect.Parameter("work_dir", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)]
        )
        self.__doc__ = body.__doc__

    # -- pickling by reference (process pools, Dask, Ray ship tasks to workers)
    def __reduce__(self):
        return (_import_stage, (self.module, self.attr))

    def __repr__(self) -> str:
        return f"<stage {self.name}>"

    # -- arguments
    def bind(self, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], BaseModel, str]:
        bound = self.__signature__.bind(*args, **kwargs)
        bound.apply_defaults()
        values = dict(bound.arguments)
        config = values.pop("config")
        work_dir = values.pop("work_dir")
        if config is None:
            config = self.config_model()
        elif not isinstance(config, self.config_model):
            config = self.config_model.model_validate(config)
        if work_dir is None:
            work_dir = self.work_dir_from(config) if self.work_dir_from else DEFAULT_WORK_DIR
        return values, config, str(work_dir)

    def input_files(self, inputs: Mapping[str, Any], config: BaseModel) -> list[Path]:
        """The files whose content keys the run; a missing one is bad input, named."""
        files: list[Path] = []
        for name in self.input_names:
            spec = self.reads.get(name)
            if spec is None:
                continue
            if callable(spec):
                files += [Path(f) for f in spec(inputs[name])]
            else:
                files += [folder / f for folder in as_paths(inputs[name]) for f in spec]
        if self.key_files is not None:
            files += [Path(f) for f in self.key_files(config)]
        for f in files:
            if not f.exists():
                raise PipelineInputError(f, f"input of {self.name} does not exist")
        return files

    def key(self, inputs: Mapping[str, Any], config: BaseModel) -> str:
        files = self.input_files(inputs, config)
        # Read inputs key by the content of their files (not their paths);
        # the others (a lineage record), and any named in keyed_by_value (a shard's range), by value.
        values = {n: config_identity(v) for n, v in inputs.items() if n not in self.reads or n in self.keyed_by_value}
        return stable_digest(
            {"stage": self.name, "config": self.key_config(config), "values": values,
             "inputs": [fingerprint(f) for f in files], "code": self.code_version}
        )

    def output_dir(self, *args: Any, **kwargs: Any) -> Path:
        """The folder a run with these arguments writes (it may not exist yet)."""
        inputs, config, work_dir = self.bind(*args, **kwargs)
        return self.folder(work_dir, self.key(inputs, config))

    # -- the plain core
    def __call__(self, *args: Any, **kwargs: Any) -> Path:
        inputs, config, work_dir = self.bind(*args, **kwargs)
        out = self.folder(work_dir, self.key(inputs, config))
        if not is_complete(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            lock = Path(work_dir) / ".locks" / self.name / f"{out.name}.lock"
            lock.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(lock):
                if not is_complete(out):  # another run may have finished it while we waited
                    self._remove_stale_partials(out, Path(work_dir))
                    self._build(out, inputs, config)
        if self.publish is not None:
            self.publish(out)
        return out

    def _remove_stale_partials(self, out: Path, work_dir: Path) -> None:
        """Partial folders that killed runs of this stage left under other keys
        (a resumable stage keeps them: they hold answers a re-run resumes from).
        One is stale when nobody holds its lock."""
        if self.resumable or self.in_place:
            return
        for partial in out.parent.glob(f".*{PARTIAL_SUFFIX}"):
            key = partial.name[1 : -len(PARTIAL_SUFFIX)]
            if key == out.name:
                continue
            try:
                with FileLock(work_dir / ".locks" / self.name / f"{key}.lock", timeout=0):
                    shutil.rmtree(partial, ignore_errors=True)
            except Timeout:
                pass  # another run is writing it

    def work_folder(self, out: Path) -> Path:
        """Where a run of ``out`` writes until it is complete (what a resumable stage resumes from)."""
        return out if self.in_place else out.with_name(f".{out.name}{PARTIAL_SUFFIX}")

    def _build(self, out: Path, inputs: Mapping[str, Any], config: BaseModel) -> None:
        work = self.work_folder(out)
        if not self.in_place and out.exists():
            shutil.rmtree(out)  # no marker (checked under the lock): unfinished, so nothing in it is trusted
        if not (self.resumable or self.in_place) and work.exists():
            shutil.rmtree(work)  # what a killed attempt left; only a resumable body reuses it
        work.mkdir(parents=True, exist_ok=True)
        remove_temporaries(work)
        run = StageRun(self.name, work, out)
        failpoint(f"{self.name}:start")
        try:
            produced = self.body(run, *(inputs[n] for n in self.input_names), config) or {}
            for name, obj in produced.items():
                self._write(work / name, obj)
        except BaseException:
            if not (self.resumable or self.in_place):
                shutil.rmtree(work, ignore_errors=True)  # nothing half-made stays behind
            raise
        run.funnel.save(work / "funnel.json")
        failpoint(f"{self.name}:written")
        fsync_tree(work)
        mark_complete(work, {"stage": self.name, "code_version": self.code_version,
                             "config": self.key_config(config), "funnel": run.funnel.to_dict(), **run.info})
        failpoint(f"{self.name}:marked")
        if not self.in_place:
            os.replace(work, out)
            fsync_tree(out.parent, files=False)

    def _write(self, path: Path, obj: Any) -> None:
        if path.suffix == ".parquet":
            if path.name not in self.writes:
                raise StageConfigError(f"{self.name} returned {path.name}, which it does not declare in writes=")
            table = obj.to_arrow() if hasattr(obj, "to_arrow") else obj
            if isinstance(table, Mapping):
                table = pa.table(table, schema=self.writes[path.name])
            write_parquet(table, path, self.writes[path.name])
        elif isinstance(obj, str):
            write_text(obj, path)
        else:
            write_json(obj, path)

    # -- Prefect
    @cached_property
    def task(self) -> PrefectTask:
        """The Prefect task of this stage (Prefect is imported when a flow first uses it)."""
        return PrefectTask(self._prefect_task, self)

    def _prefect_task(self):
        from prefect import task

        stage = self

        def run_stage(*args: Any, **kwargs: Any) -> Path:
            return stage(*args, **kwargs)

        run_stage.__signature__ = self.__signature__  # Prefect binds parameters by it
        run_stage.__name__ = run_stage.__qualname__ = f"{self.name}_task"
        run_stage.__module__ = self.module
        run_stage.__doc__ = self.__doc__
        return task(
            run_stage,
            name=self.name,
            task_run_name=self.task_run_name,
            retries=self.retries,
            retry_delay_seconds=self.retry_delay_seconds,
            retry_condition_fn=retry_unless_final,
            cache_key_fn=self._cache_key,
            persist_result=True,
            on_completion=[self._publish_on_cache_hit] if self.publish else None,
        )

    @cached_property
    def batch_task(self):
        """A Prefect task that runs this stage on a batch of items (each the
        value of its first input, or a dict of inputs) and returns their
        folders in order: one task per batch of shards, for the task runners
        of tasks/runners.py."""
        from prefect import task

        stage = self

        def run_batch(items: list, config: Any = None, work_dir: Any = None, fixed: dict | None = None) -> list[Path]:
            from tasks.runners import run_stage_call

            return [run_stage_call(stage, dict(config=config, work_dir=work_dir, **stage._item_inputs(item), **(fixed or {})))
                    for item in items]

        run_batch.__name__ = run_batch.__qualname__ = f"{self.name}_batch_task"
        run_batch.__module__ = self.module
        return task(
            run_batch,
            name=f"{self.name}-batch",
            retries=self.retries,
            retry_delay_seconds=self.retry_delay_seconds,
            retry_condition_fn=retry_unless_final,
            cache_key_fn=self._batch_cache_key,
            persist_result=True,
        )

    def _item_inputs(self, item: Any) -> dict[str, Any]:
        """A mapped item as inputs: a dict names them, anything else is the first input."""
        return dict(item) if isinstance(item, dict) else {self.input_names[0]: item}

    def _batch_cache_key(self, context: Any, parameters: dict[str, Any]) -> str | None:
        keys = [self._cache_key(context, {**self._item_inputs(item), "config": parameters.get("config"),
                                          "work_dir": parameters.get("work_dir"), **(parameters.get("fixed") or {})})
                for item in parameters["items"]]
        return None if not keys or None in keys else stable_digest(keys)

    def _cache_key(self, context: Any, parameters: dict[str, Any]) -> str | None:
        try:
            out = self.output_dir(**parameters)
        except (PipelineInputError, ValidationError):
            return None  # let the task body raise the clear error
        if not is_complete(out):
            return None  # a deleted or half-written output is rebuilt, not trusted
        return stable_digest(str(out.resolve()))

    def _publish_on_cache_hit(self, task_: Any, task_run: Any, state: Any) -> None:
        if state.name == "Cached":  # a miss ran the body, which published
            self.publish(Path(state.result()))


def stage(name: str, config_model: type[BaseModel], **options: Any) -> Callable[[Callable[..., Any]], Stage]:
    """Declare a stage from its body (see the module docstring)."""

    def wrap(body: Callable[..., Any]) -> Stage:
        return Stage(name, config_model, body, **options)

    return wrap


def _import_stage(module: str, attr: str) -> Stage:
    return getattr(importlib.import_module(module), attr)


def _import_stage_task(module: str, attr: str) -> PrefectTask:
    return _import_stage(module, attr).task


def remove_temporaries(folder: Path) -> int:
    """Delete the temporary files a killed write left (``.<name>.*.tmp``)."""
    n = 0
    for tmp in folder.rglob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            n += 1
    return n


__all__ = ["DEFAULT_WORK_DIR", "SUCCESS_MARKER", "PrefectTask", "Stage", "StageConfigError", "StageRun", "is_retryable",
           "retry_unless_final", "stage"]
