"""The data contracts between stages: every Parquet schema one stage writes
and another reads, the readers that check them, and the one resolver of a
published dataset. docs/ARCHITECTURE.md's contract table points here.

Spans are ``SPAN`` structs, end exclusive, so ``text[start:end]`` is the sentence.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import polars as pl
import pyarrow as pa

from tasks.common import PipelineInputError, is_complete

SPAN = pa.struct([("start", pa.int32()), ("end", pa.int32())])

# 1. extract_docs (per shard) -> articles.parquet: clean plain prose,
#    paragraphs joined by "\n\n", no markup, headings, lists, captions or tables.
ARTICLES_SCHEMA = pa.schema(
    [
        ("page_id", pa.int64()),
        ("revision_id", pa.int64()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("source_dump", pa.string()),
    ]
)

# 2. select_units (per shard) -> documents.parquet and units.parquet;
#    documents.text[char_start:char_end] == units.text exactly.
DOCUMENTS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("page_id", pa.int64()),
        ("revision_id", pa.int64()),
        ("part", pa.int32()),
        ("title", pa.string()),
        ("text", pa.string()),
        ("sentence_spans", pa.list_(SPAN)),
        ("token_count", pa.int32()),
        ("source_dump", pa.string()),
    ]
)
UNITS_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("sentence_index", pa.int32()),
        ("text", pa.string()),
        ("char_start", pa.int32()),
        ("char_end", pa.int32()),
        ("token_count", pa.int32()),
    ]
)

# 3. rewrite_queries -> queries.parquet (the raw accepted rewrite), and
# 4. dedup -> queries.parquet (keywords split, normalised, de-duplicated, reordered).
QUERIES_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("sentence_index", pa.int32()),
        ("unit", pa.string()),
        ("query", pa.string()),
        ("rewriter_model", pa.string()),
        ("prompt_version", pa.string()),
    ]
)

# 5. relevance_score -> scored.parquet (every pair, so a new threshold needs
#    no embedding); relevance_filter -> scored.parquet with the kept flag.
SCORED_SCHEMA = pa.schema(list(QUERIES_SCHEMA) + [pa.field("score", pa.float32())])
FILTERED_SCHEMA = pa.schema(list(SCORED_SCHEMA) + [pa.field("kept", pa.bool_())])

# 6. write_triples -> <output_dir>/datasets/<version>/{train,test}.parquet.
TRIPLES_SCHEMA = pa.schema(
    [
        ("query", pa.string()),
        ("doc_id", pa.string()),
        ("title", pa.string()),
        ("document", pa.string()),
        ("unit", pa.string()),
        ("unit_index", pa.int32()),
        ("unit_start", pa.int32()),
        ("unit_end", pa.int32()),
        ("sentence_spans", pa.list_(SPAN)),
        ("score", pa.float32()),
        ("rewriter_model", pa.string()),
        ("prompt_version", pa.string()),
        ("dump_name", pa.string()),
        ("split", pa.string()),
    ]
)

DATASETS_DIR = "datasets"
LATEST = "LATEST"  # in datasets/ (and models/): the newest finished version's name
# In a training run's folder: its triples when it trains on stand-in units (tasks/stand_in.py).
STAND_IN_TRIPLES = "train_with_stand_ins.parquet"


def as_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def _read(folders: Sequence[Path], name: str, schema: pa.Schema, columns: Sequence[str] | None, producer: str) -> pl.DataFrame:
    columns = list(columns or schema.names)
    frames = []
    for folder in folders:
        path = Path(folder) / name
        if not path.is_file():
            raise PipelineInputError(path, f"missing {name} (not a {producer} folder?)")
        found = pl.read_parquet_schema(path)
        missing = [c for c in columns if c not in found]
        if missing:
            raise PipelineInputError(path, f"missing columns {missing}")
        frames.append(pl.read_parquet(path, columns=columns))
    empty = pl.DataFrame(schema=pl.Schema(pa.schema([schema.field(c) for c in columns])))
    frame = pl.concat(frames) if frames else empty
    return frame.cast({c: empty.schema[c] for c in columns})


def read_documents(units_dirs: Sequence[str | os.PathLike], columns: Sequence[str] | None = None) -> pl.DataFrame:
    """documents.parquet of select_units folders; a doc_id in two rows is bad input."""
    docs = _read(as_paths(units_dirs), "documents.parquet", DOCUMENTS_SCHEMA, columns, "select_units")
    if "doc_id" in docs.columns:
        dup = docs.filter(pl.col("doc_id").is_duplicated())
        if dup.height:
            raise PipelineInputError(as_paths(units_dirs)[0], "doc_id appears in more than one document row", record=dup["doc_id"][0])
    return docs


def read_units(units_dirs: Sequence[str | os.PathLike], columns: Sequence[str] | None = None) -> pl.DataFrame:
    """units.parquet (candidate units) of select_units folders."""
    return _read(as_paths(units_dirs), "units.parquet", UNITS_SCHEMA, columns, "select_units")


def read_queries(query_dirs: Sequence[str | os.PathLike], columns: Sequence[str] | None = None) -> pl.DataFrame:
    """queries.parquet of rewrite_queries or dedup folders."""
    return _read(as_paths(query_dirs), "queries.parquet", QUERIES_SCHEMA, columns, "rewrite_queries or dedup")


def read_scored(folder: str | os.PathLike, with_kept: bool = False) -> pl.DataFrame:
    """scored.parquet of a relevance_score folder (or, with_kept, of a relevance_filter folder)."""
    schema = FILTERED_SCHEMA if with_kept else SCORED_SCHEMA
    return _read([Path(folder)], "scored.parquet", schema, None, "relevance_filter" if with_kept else "relevance_score")


def resolve_dataset(path: str | os.PathLike) -> Path:
    """The dataset version folder named by ``path``: the folder itself, a
    datasets/ folder (its LATEST) or a build output folder (datasets/LATEST)."""
    path = Path(path)
    if (path / "train.parquet").is_file():
        found = path
    elif (path / LATEST).is_file():
        found = path / (path / LATEST).read_text().strip()
    elif (path / DATASETS_DIR / LATEST).is_file():
        found = path / DATASETS_DIR / (path / DATASETS_DIR / LATEST).read_text().strip()
    else:
        raise PipelineInputError(path, "not a dataset: no train.parquet, LATEST or datasets/LATEST here")
    if not is_complete(found) or not (found / "train.parquet").is_file():
        raise PipelineInputError(found, "dataset version folder is incomplete or missing")
    return found


def dataset_file(path: str | os.PathLike, split: str = "train") -> Path:
    """``<split>.parquet`` of a triples file, a version folder, a datasets/ folder or a build output folder."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / f"{split}.parquet").is_file():  # a version folder, or triples made by hand
        return path / f"{split}.parquet"
    return resolve_dataset(path) / f"{split}.parquet"
