"""Plumbing shared by every stage: atomic writes, content fingerprints,
content-addressed stage directories with completion markers, the drop-reason
funnel, and the Prefect cache key that trusts a cache hit only when the
stage's output is still on disk.

A stage core looks like this::

    def run(inputs..., config, work_dir) -> Path:
        out = stage_output_dir(work_dir, "stage", config, [input paths], CODE_VERSION)
        if is_complete(out):
            return out            # a re-run does no work
        ... write files into out with the atomic helpers ...
        mark_complete(out, funnel)
        return out
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

SUCCESS_MARKER = "_SUCCESS.json"
# Files above this size are fingerprinted by size, head and tail rather than
# by a full hash (a full English dump is ~22 GB; hashing it on every run
# would cost minutes). Derived Parquet files are far smaller and hashed whole.
FULL_HASH_LIMIT = 256 * 1024 * 1024
_EDGE = 4 * 1024 * 1024


class PipelineInputError(RuntimeError):
    """Bad input: names the file, the record where known, and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str, record: str | None = None):
        self.path = str(path)
        self.record = record
        self.reason = reason
        where = f"{self.path} ({record})" if record else self.path
        super().__init__(f"{where}: {reason}")


# --------------------------------------------------------------------------
# Atomic writes: write to a temporary name in the same folder, then rename.


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
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
    files; large files hash size + first and last 4 MiB.
    """
    path = Path(path)
    if not path.exists():
        raise PipelineInputError(path, "does not exist")
    digest = hashlib.sha256()
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
            digest.update(str(child.relative_to(path)).encode())
            digest.update(fingerprint(child).encode())
        return digest.hexdigest()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with path.open("rb") as fh:
        if size <= FULL_HASH_LIMIT:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        else:
            digest.update(fh.read(_EDGE))
            fh.seek(size - _EDGE)
            digest.update(fh.read(_EDGE))
    return digest.hexdigest()


def source_hash(*files: str | os.PathLike) -> str:
    """Code version of a stage: the hash of its source files."""
    digest = hashlib.sha256()
    for f in files:
        digest.update(Path(f).read_bytes())
    return digest.hexdigest()[:12]


def stage_key(stage: str, config: Any, inputs: Iterable[str | os.PathLike], code_version: str) -> str:
    payload = {
        "stage": stage,
        "config": to_jsonable(config),
        "inputs": [fingerprint(p) for p in inputs],
        "code": code_version,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def stage_output_dir(
    work_dir: str | os.PathLike,
    stage: str,
    config: Any,
    inputs: Iterable[str | os.PathLike],
    code_version: str,
) -> Path:
    """The content-addressed folder of one stage run: work_dir/stages/<stage>/<key>."""
    return Path(work_dir) / "stages" / stage / stage_key(stage, config, inputs, code_version)


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

    def markdown(self) -> str:
        lines = ["| stage | count | n |", "|---|---|---:|"]
        lines += [f"| {r['stage']} | {r['count']} | {r['n']} |" for r in self.rows()]
        return "\n".join(lines)


# --------------------------------------------------------------------------
# Prefect cache keys.


def completed_output_cache_key(output_dir_fn: Callable[..., Path]) -> Callable[[Any, dict], str | None]:
    """A Prefect ``cache_key_fn`` for a stage whose output folder is content-addressed.

    ``output_dir_fn`` takes the task's parameters and returns the folder the
    stage would write. The key is that folder's path when the folder holds a
    completion marker; otherwise None (no cache lookup), so a deleted or
    half-written output is rebuilt instead of trusting a stale cache record.
    The folder name already hashes the stage name, its config, its inputs'
    content and its code version.
    """

    def key_fn(context: Any, parameters: dict[str, Any]) -> str | None:
        try:
            out = output_dir_fn(**parameters)
        except PipelineInputError:
            return None  # a missing input: let the task itself raise the clear error
        if not is_complete(out):
            return None
        return hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()

    return key_fn



def retry_unless_bad_input(task_: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: bad input fails the same way every time,
    so it fails at once; anything else (I/O, memory) may pass on a retry."""
    return not isinstance(state.result(raise_on_failure=False), PipelineInputError)


@task(name="publish_funnel")
def publish_funnel(stage_dirs: list[str | os.PathLike], key: str) -> dict[str, dict[str, int]]:
    """Merge the funnel.json files of stage folders into a Prefect table artifact."""
    funnel = Funnel()
    for d in stage_dirs:
        if (Path(d) / "funnel.json").is_file():
            funnel.merge(Funnel.load(Path(d) / "funnel.json"))
    create_table_artifact(funnel.rows(), key=key, description="Records kept and dropped per stage")
    return funnel.to_dict()
