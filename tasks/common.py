"""Helpers shared by every stage: atomic writes, content fingerprints and
stable hashes, config identity (what a cache key hashes), completion
markers, the drop-reason funnel and the error classes that say whether a
retry can help. The stage runner (tasks/stage.py) puts them together; a
stage body rarely needs more than ``Funnel``.

No Prefect import: a stage core runs, and its tests run, without Prefect.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import json
import os
import sys
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

SUCCESS_MARKER = "_SUCCESS.json"
_UMASK = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
os.umask(_UMASK)
# Files above this size are fingerprinted by size, head and tail rather than
# by a full hash (a full English dump is ~22 GB; hashing it on every run
# would cost minutes). Derived Parquet files are far smaller and hashed whole.
FULL_HASH_LIMIT = 256 * 1024 * 1024
_EDGE = 4 * 1024 * 1024


# transformers' from_pretrained swaps torch.nn.init functions and the default
# device for the duration of a load (fast init on the meta device). Two loads
# at once in one process (mapped stages on the threads runner) can leave
# those swaps in place, so later loads keep uninitialised weights on the meta
# device. Every model load in the stages holds this lock.
MODEL_LOAD_LOCK = threading.RLock()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads for work done in this thread, then back to
    what they were (n < 1: unchanged). A thread takes the process's count on
    its first use of torch and then keeps its own (an OpenMP setting of the
    thread), so the count is set in the thread that computes, by every thread
    that computes (two relevance parts at once, a lane's evaluation)."""
    import torch

    before = torch.get_num_threads()
    if n >= 1:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def freeze_long_lived() -> None:
    """Put every object alive now (modules, loaded models) out of the cyclic garbage collector's reach.

    Ingestion allocates millions of short-lived containers (tokens, nodes,
    spans), and each full collection would walk spaCy's pipelines and every
    import again; frozen, they are out of its way (docs/BENCHMARKS.md, "What
    makes it fast", gives the gain). Objects frozen are still freed by
    reference counting; a full collection first, so that no garbage is frozen."""
    gc.collect()
    gc.freeze()


# --------------------------------------------------------------------------
# Errors. ``retryable`` says whether another attempt can succeed: the stage
# runner's retry condition (tasks/stage.py) reads it, so a stage that retries
# (an endpoint, a GPU run) does not repeat a failure that is the same every time.


class PipelineInputError(RuntimeError):
    """Bad input: names the file, the record where known, and the reason."""

    retryable = False

    def __init__(self, path: str | os.PathLike, reason: str, record: str | None = None):
        self.path = str(path)
        self.record = record
        self.reason = reason
        where = f"{self.path} ({record})" if record else self.path
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # crosses process boundaries (worker processes, Dask, Ray) as itself
        return (type(self), (self.path, self.reason, self.record))


class ConfigError(ValueError):
    """A configuration that cannot make a run: it fails the same way on every attempt."""

    retryable = False


def explains_itself(exc: BaseException) -> bool:
    """Whether an error's message is the whole story for the person who ran the
    pipeline (bad input, bad config, a data condition with its funnel), so the
    CLI prints it without a traceback; anything else is a bug to trace."""
    return isinstance(exc, (PipelineInputError, ConfigError)) or isinstance(getattr(exc, "funnel", None), Funnel)


def in_prefect_run(task_only: bool = False) -> bool:
    """Whether this code runs inside a Prefect task run (or, unless
    ``task_only``, a flow run). A process that has not imported Prefect is in
    none, so a plain core never imports it to find out."""
    if "prefect" not in sys.modules:
        return False
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or (not task_only and FlowRunContext.get() is not None)


# --------------------------------------------------------------------------
# Atomic writes: write to a temporary name in the same folder, then rename.


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success.

    The file gets the permissions the user's umask gives any new file (mkstemp
    makes it 0600), so a team sharing an output folder can read it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_parquet(table: pa.Table, path: str | os.PathLike, schema: pa.Schema | None = None) -> Path:
    if schema is not None:
        table = table.select(schema.names).cast(schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return Path(path)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_jsonable(obj), indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return Path(path)


def write_text(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def to_jsonable(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return {k: to_jsonable(getattr(obj, k)) for k in obj.__dataclass_fields__}
    return obj


# --------------------------------------------------------------------------
# Content identity.


def fingerprint(path: str | os.PathLike) -> str:
    """A content hash of a file, or of every file under a folder.

    Folders hash their files' relative names and contents, skipping temporary
    files; large files hash size + first and last 4 MiB. A file's hash is
    computed once per process for a given inode, size and mtime: every
    extract_docs shard keys on the same dump, and a stage's key is computed
    both for Prefect's cache and by the stage itself. Writes here are atomic
    renames, so a changed file is a new inode.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineInputError(path, "does not exist")
    if path.is_dir():
        digest = hashlib.sha256()
        for child in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest.update(str(child.relative_to(path)).encode())
            digest.update(fingerprint(child).encode())
        return digest.hexdigest()
    st = path.stat()
    return _file_fingerprint(str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1 << 16)
def _file_fingerprint(path: str, inode: int, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    digest.update(str(size).encode())
    with open(path, "rb") as fh:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(fh.read(_EDGE))
            fh.seek(size - _EDGE)
            digest.update(fh.read(_EDGE))
    return digest.hexdigest()


def stable_digest(obj: Any, length: int = 16) -> str:
    """A hex digest of a JSON-able value that is the same in every process
    (Python's hash() is salted per process)."""
    blob = obj.encode() if isinstance(obj, str) else json.dumps(to_jsonable(obj), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def stable_int(*parts: Any) -> int:
    """A 64-bit integer from parts (seeds, ids), the same in every process."""
    blob = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")


def stable_unit_interval(*parts: Any) -> float:
    """A number in [0, 1) from parts, the same in every process."""
    return stable_int(*parts) / 2**64


def config_identity(config: Any) -> Any:
    """What a config contributes to a cache key: every field except the
    operational ones (``operational_fields`` on the model class: threads,
    batch sizes, endpoints, timeouts), which change how fast or how robustly
    outputs are made, not what they are. Nested models are treated alike."""
    if isinstance(config, BaseModel):
        skip = getattr(type(config), "operational_fields", frozenset())
        return {name: config_identity(getattr(config, name)) for name in type(config).model_fields if name not in skip}
    if isinstance(config, Mapping):
        return {str(k): config_identity(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [config_identity(v) for v in config]
    return to_jsonable(config)


def source_hash(*files: str | os.PathLike) -> str:
    """Code version of a stage: the hash of its source files."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(Path(f).read_bytes())
    return digest.hexdigest()[:12]


def fsync_tree(folder: str | os.PathLike, files: bool = True) -> None:
    """Flush a folder's files (and the folder entries) to disk, so the marker
    written after it never describes data still in the page cache."""
    folder = Path(folder)
    if files:
        for f in folder.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())] if files else [folder]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def failpoint(name: str) -> None:
    """Fault injection for the fault suite (tests/test_faults.py): when
    GEAR_FAILPOINT names this point, the process group dies here by SIGKILL,
    as a machine loss or an OOM kill would end it. A no-op otherwise."""
    if os.environ.get("GEAR_FAILPOINT") == name:
        import signal

        os.killpg(os.getpgrp(), signal.SIGKILL)


def is_complete(out_dir: str | os.PathLike) -> bool:
    return (Path(out_dir) / SUCCESS_MARKER).is_file()


def mark_complete(out_dir: str | os.PathLike, info: Mapping[str, Any] | None = None) -> None:
    """Written last, so a folder without it is an unfinished run to redo."""
    write_json(dict(info or {}), Path(out_dir) / SUCCESS_MARKER)


def read_marker(out_dir: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(out_dir) / SUCCESS_MARKER).read_text())


# --------------------------------------------------------------------------
# The funnel: how many records entered each stage, how many were kept, and
# how many were dropped for each reason.


class Funnel:
    def __init__(self, counts: Mapping[str, Mapping[str, int]] | None = None):
        self.counts: dict[str, dict[str, int]] = defaultdict(dict)
        for stage, reasons in (counts or {}).items():
            self.counts[stage] = dict(reasons)

    def add(self, stage: str, key: str, n: int = 1) -> None:
        self.counts[stage][key] = self.counts[stage].get(key, 0) + n

    def seen(self, stage: str, n: int = 1) -> None:
        self.add(stage, "input", n)

    def kept(self, stage: str, n: int = 1) -> None:
        self.add(stage, "kept", n)

    def drop(self, stage: str, reason: str, n: int = 1) -> None:
        self.add(stage, f"dropped:{reason}", n)

    def get(self, stage: str, key: str) -> int:
        return self.counts.get(stage, {}).get(key, 0)

    @classmethod
    def from_folders(cls, folders: Iterable[str | os.PathLike]) -> Funnel:
        """The merged funnel.json files of stage folders (a folder named twice counts once)."""
        funnel = cls()
        for d in dict.fromkeys(Path(f) for f in folders):
            if (d / "funnel.json").is_file():
                funnel.merge(cls.load(d / "funnel.json"))
        return funnel

    def merge(self, other: Funnel) -> Funnel:
        for stage, reasons in other.counts.items():
            for key, n in reasons.items():
                self.add(stage, key, n)
        return self

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {stage: dict(sorted(reasons.items())) for stage, reasons in self.counts.items()}

    @classmethod
    def load(cls, path: str | os.PathLike) -> Funnel:
        return cls(json.loads(Path(path).read_text()))

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(self.to_dict(), path)

    def rows(self) -> list[dict[str, Any]]:
        """One row per (stage, count) for tables and artifacts."""
        out = []
        for stage, reasons in self.counts.items():
            for key, n in sorted(reasons.items(), key=lambda kv: (not kv[0] in ("input", "kept"), kv[0])):
                out.append({"stage": stage, "count": key, "n": n})
        return out

    def worst_rule(self) -> tuple[str, str, int, int] | None:
        """(stage, reason, dropped, input) of the drop rule that removed the
        largest share of its stage's input records (the earliest stage on a
        tie); None when no rule dropped any. Stages that count no input (the
        paragraph rules of clean_wikitext) are not records and do not compete."""
        worst, share = None, 0.0
        for stage, reasons in self.counts.items():
            seen = reasons.get("input", 0)
            for key, n in sorted(reasons.items()):
                if seen and n and key.startswith("dropped:") and n / seen > share:
                    worst, share = (stage, key.removeprefix("dropped:"), n, seen), n / seen
        return worst

    def markdown(self) -> str:
        lines = ["| stage | count | n |", "|---|---|---:|"]
        lines += [f"| {r['stage']} | {r['count']} | {r['n']} |" for r in self.rows()]
        return "\n".join(lines)


class ProgressArtifact:
    """Progress of a long stage: a Prefect progress artifact on the task run's page,
    updated at most once per ``step`` percent (each update is an API call; a no-op
    outside a task run), and, when the process runs under the `gear` CLI
    (``GEAR_CLI_PROGRESS=1``, which the CLI sets when stderr is a terminal), a tqdm
    bar on stderr updated on every call. The bar closes when ``done`` reaches
    ``total`` (or on ``close()``)."""

    CLI_ENV = "GEAR_CLI_PROGRESS"

    def __init__(self, description: str, step: float = 1.0):
        self.step, self.shown, self.id, self.bar = step, 0.0, None, None
        self.label = description
        if in_prefect_run(task_only=True):
            from prefect.artifacts import create_progress_artifact

            self.id = create_progress_artifact(0.0, description=description)
        if os.environ.get(self.CLI_ENV) == "1":
            from tqdm import tqdm

            # Drawn on the stderr of the moment (the CLI's terminal); tqdm redraws at most 10 times a second.
            self.bar = tqdm(total=None, desc=description.removesuffix(" (%)"), file=sys.stderr, dynamic_ncols=True, leave=True,
                            mininterval=0.1)

    def update(self, done: int, total: int, description: str | None = None) -> None:
        if self.bar is not None:
            if self.bar.total != total:
                self.bar.total = total
            self.bar.n = done
            if description:
                self.bar.set_postfix_str(description, refresh=False)
            if done >= total:
                self.close()  # draws the last state
            else:
                self.bar.update(0)  # redraws when tqdm's mininterval has passed
        pct = 100.0 * done / total if total else 100.0
        if self.id is None or (pct - self.shown < self.step and done < total):
            return
        from prefect.artifacts import update_progress_artifact

        self.shown = pct
        update_progress_artifact(self.id, pct, description=description)

    def close(self) -> None:
        """End the terminal bar (the artifact keeps its last value)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
