"""Stage write_triples: the published dataset, (query, document, unit)
triples split by document (paper Appendix A: 95% train / 5% test, so no test
document is seen in training), under a version folder named by the hash of
everything it came from, with a dataset card (tasks/dataset_card.py).

Layout::

    <output_dir>/datasets/<version>/train.parquet, test.parquet, params.json,
                                    dataset_card.md, dataset_card.json
    <output_dir>/datasets/LATEST    the version of the newest build

The stage runner writes the version folder under a hidden name and renames
it when complete. ``publish_dataset`` then points LATEST at it, on every run,
cache hit or not, so LATEST names the version the flow returned. Nothing
is published when a guarantee of the dataset fails (``check_triples``).
"""

from __future__ import annotations

import heapq
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
from pydantic import Field

from tasks import dedup as dedup_mod
from tasks import relevance as relevance_mod
from tasks.common import (
    SUCCESS_MARKER,
    Funnel,
    PipelineInputError,
    failpoint,
    in_prefect_run,
    read_marker,
    stable_int,
    stable_unit_interval,
    to_jsonable,
    write_text,
)
from tasks.contracts import (
    DATASETS_DIR,
    LATEST,
    TRIPLES_SCHEMA,
    as_paths,
    read_documents,
    read_scored,
    read_units,
    resolve_dataset,
)
from tasks.dataset_card import build_card, publish_card_artifacts
from tasks.dedup import DedupConfig, query_key
from tasks.params_model import ParamsModel
from tasks.relevance import RelevanceConfig
from tasks.stage import StageRun, stage

__all__ = ["TRIPLES_SCHEMA", "DatasetInvariantError", "NoTriplesError", "TriplesConfig", "build_triples", "check_triples",
           "published_from", "resolve_dataset", "split_documents", "write_triples", "write_triples_task"]

STAGE = "write_triples"


class TriplesConfig(ParamsModel):
    """Train/test split and dataset card."""

    test_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of documents in the test split (paper: 5%).")
    seed: int = Field(13, ge=0, description="Seed of the document split (a hash of seed and doc_id, so it is stable across runs and shards).")
    min_test_documents: int = Field(1, ge=0, description="At least this many test documents when there are enough documents (small runs).")
    sample_triples: int = Field(5, ge=0, le=100, description="Sample triples shown in the dataset card.")
    histogram_bin_width: float = Field(0.05, gt=0.0, le=0.5, description="Bin width of the score histograms in the card.")


class DatasetInvariantError(RuntimeError):
    """The triples break a guarantee of the dataset; nothing was published."""

    retryable = False

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("dataset invariants violated:\n  - " + "\n  - ".join(problems))


NO_TRIPLES = "no triples: every pair was dropped (see the funnel), and an empty dataset is never published"


class NoTriplesError(DatasetInvariantError):
    """Every pair was dropped: a condition of the data, not a broken run.
    ``funnel`` holds the counts of every stage, so the reader sees which rule
    dropped them (the CLI prints it as a table)."""

    def __init__(self, funnel: Funnel):
        super().__init__([NO_TRIPLES])
        self.funnel = funnel

    def __reduce__(self):
        return (type(self), (self.funnel,))


# --------------------------------------------------------------------------
# Split and checks.


def split_documents(doc_ids: Sequence[str], config: TriplesConfig | None = None) -> set[str]:
    """The test documents. Each document's side depends only on (seed, doc_id),
    except that small runs get topped up to ``min_test_documents`` with the
    documents of smallest hash (always leaving one for training)."""
    config = config or TriplesConfig()
    ranked = sorted(set(doc_ids), key=lambda d: (stable_unit_interval(config.seed, d), d))
    n_hash = sum(1 for d in ranked if stable_unit_interval(config.seed, d) < config.test_fraction)
    n_test = max(n_hash, min(config.min_test_documents, len(ranked) - 1)) if config.test_fraction > 0 else 0
    return set(ranked[:n_test])


def check_triples(triples: pl.DataFrame, threshold: float, dedup_config: DedupConfig | None = None,
                  allow_empty: bool = False) -> None:
    """Raise DatasetInvariantError unless every guarantee holds (within this frame)."""
    problems: list[str] = []
    if triples.height == 0 and not allow_empty:
        problems.append(NO_TRIPLES)

    def example(frame: pl.DataFrame) -> str:
        r = frame.row(0, named=True)
        return f"doc_id={r['doc_id']!r} unit_index={r['unit_index']}"

    nulls = [c for c in TRIPLES_SCHEMA.names if triples[c].null_count()]
    if nulls:
        problems.append(f"null values in {nulls}")
    bad_slice = triples.filter(
        pl.col("document").str.slice(pl.col("unit_start"), pl.col("unit_end") - pl.col("unit_start")) != pl.col("unit")
    )
    if bad_slice.height:
        problems.append(f"{bad_slice.height} unit(s) are not document[unit_start:unit_end], e.g. {example(bad_slice)}")
    span = pl.col("sentence_spans").list.get(pl.col("unit_index"), null_on_oob=True)
    bad_span = triples.filter(
        span.is_null() | (span.struct.field("start") != pl.col("unit_start")) | (span.struct.field("end") != pl.col("unit_end"))
    )
    if bad_span.height:
        problems.append(f"{bad_span.height} unit span(s) differ from sentence_spans[unit_index], e.g. {example(bad_span)}")
    both = set(triples.filter(pl.col("split") == "train")["doc_id"]) & set(triples.filter(pl.col("split") == "test")["doc_id"])
    if both:
        problems.append(f"{len(both)} document(s) in both splits, e.g. {sorted(both)[0]!r}")
    bad_split = triples.filter(~pl.col("split").is_in(["train", "test"]))
    if bad_split.height:
        problems.append(f"{bad_split.height} row(s) with an unknown split")
    keys = triples["query"].map_elements(lambda q: query_key(q, dedup_config), return_dtype=pl.String)
    if keys.is_duplicated().any():
        problems.append(f"{int(keys.is_duplicated().sum())} row(s) share a normalised query, e.g. {keys.filter(keys.is_duplicated())[0]!r}")
    low = triples.filter(pl.col("score") < threshold)
    if low.height:
        problems.append(f"{low.height} score(s) below the threshold {threshold}, e.g. {example(low)}")
    if problems:
        raise DatasetInvariantError(problems)


# --------------------------------------------------------------------------
# Assembling the triples.


def build_triples(relevance_dir: Path, units_dirs: Sequence[Path], config: TriplesConfig,
                  test_docs: set[str] | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(triples with a split column, all scored pairs with their kept flag).
    ``test_docs``: the dataset's test documents (default: split these pairs' own)."""
    scored_path = Path(relevance_dir) / "scored.parquet"
    scored = read_scored(relevance_dir, with_kept=True)
    kept = scored.filter(pl.col("kept"))
    docs = read_documents(units_dirs, ["doc_id", "title", "text", "sentence_spans", "source_dump"])
    units = read_units(units_dirs, ["doc_id", "sentence_index", "text", "char_start", "char_end"])
    joined = kept.join(docs, on="doc_id", how="left").join(
        units.rename({"text": "unit_text"}), on=["doc_id", "sentence_index"], how="left"
    )
    lost = joined.filter(pl.col("text").is_null() | pl.col("unit_text").is_null())
    if lost.height:
        r = lost.row(0, named=True)
        raise PipelineInputError(scored_path, "pair has no document or unit in the select_units folders",
                                 record=f"{r['doc_id']}#{r['sentence_index']}")
    changed = joined.filter(pl.col("unit") != pl.col("unit_text"))
    if changed.height:
        r = changed.row(0, named=True)
        raise PipelineInputError(scored_path, "unit text differs from units.parquet (inputs from different runs?)",
                                 record=f"{r['doc_id']}#{r['sentence_index']}")
    if test_docs is None:
        test_docs = split_documents(joined["doc_id"].to_list(), config)
    triples = joined.select(
        "query",
        "doc_id",
        "title",
        pl.col("text").alias("document"),
        pl.col("unit_text").alias("unit"),
        pl.col("sentence_index").alias("unit_index"),
        pl.col("char_start").alias("unit_start"),
        pl.col("char_end").alias("unit_end"),
        "sentence_spans",
        "score",
        "rewriter_model",
        "prompt_version",
        pl.col("source_dump").alias("dump_name"),
        pl.when(pl.col("doc_id").is_in(list(test_docs))).then(pl.lit("test")).otherwise(pl.lit("train")).alias("split"),
    ).sort("doc_id", "unit_index")
    return triples, scored


# --------------------------------------------------------------------------
# The stage.


def _stage_entry(path: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {"stage": path.parent.name, "key": path.name, "path": str(path)}
    if (path / SUCCESS_MARKER).is_file():
        info = read_marker(path)
        if isinstance(info, dict) and "code_version" in info:
            entry["code_version"] = info["code_version"]
    return entry


def _datasets_folder(output_dir: str | os.PathLike, version: str) -> Path:
    return Path(output_dir) / DATASETS_DIR / version


def publish_dataset(version_dir: Path) -> None:
    """Point LATEST at this version and show its card in the Prefect UI (if in a run)."""
    failpoint("write_triples:publish")
    for leftover in version_dir.parent.glob(f".{LATEST}.*.tmp"):  # a write of LATEST that a kill cut short
        leftover.unlink(missing_ok=True)
    write_text(version_dir.name + "\n", version_dir.parent / LATEST)
    if in_prefect_run():
        publish_card_artifacts(version_dir)


def _pairs(relevance_dirs: list[Path], units_dirs: list[Path]) -> list[tuple[Path, list[Path]]]:
    """Each relevance folder with the select_units folders it was scored from:
    shard by shard when there is one per shard, else one folder for all."""
    if len(relevance_dirs) == len(units_dirs):
        return [(r, [u]) for r, u in zip(relevance_dirs, units_dirs)]
    if len(relevance_dirs) == 1:
        return [(relevance_dirs[0], units_dirs)]
    raise PipelineInputError(relevance_dirs[0], f"{len(relevance_dirs)} relevance folders for {len(units_dirs)} "
                             "select_units folders: give one per shard, or one for all")


class _Samples:
    """The card's sample triples: the ``n`` with the smallest seeded hash of
    (doc_id, unit_index), whatever order the shards come in (bounded memory)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.heap = n, seed, []

    def offer(self, triples: pl.DataFrame) -> None:
        for row in triples.select("split", "doc_id", "unit_index", "title", "query", "unit", "score").iter_rows(named=True):
            rank = -stable_unit_interval(self.seed, row["doc_id"], row["unit_index"])
            item = (rank, row["doc_id"], row["unit_index"], row)
            if len(self.heap) < self.n:
                heapq.heappush(self.heap, item)
            elif item[:3] > self.heap[0][:3]:
                heapq.heapreplace(self.heap, item)

    def rows(self) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "unit_index"} for *_, r in sorted(self.heap, key=lambda x: x[:3], reverse=True)]


@stage(
    STAGE,
    TriplesConfig,
    reads={"relevance_dirs": ["scored.parquet"], "units_dirs": ["documents.parquet", "units.parquet"],
           "upstream_dirs": ["funnel.json"]},
    writes={"train.parquet": TRIPLES_SCHEMA, "test.parquet": TRIPLES_SCHEMA},
    code=[dedup_mod.__file__, relevance_mod.__file__],
    folder=_datasets_folder,
    publish=publish_dataset,
)
def write_triples(
    run: StageRun,
    relevance_dirs,
    units_dirs,
    upstream_dirs: Sequence = (),
    lineage: Mapping[str, Any] | None = None,
    dedup_config: DedupConfig | None = None,
    relevance_config: RelevanceConfig | None = None,
    config: TriplesConfig | None = None,
) -> dict:
    """The dataset version folder; the version is the runner's key.

    ``relevance_dirs``: relevance_filter folders (scored.parquet with ``kept``),
    one per shard in the order of ``units_dirs``, or one for all of them.
    ``upstream_dirs``: earlier stage folders whose funnel.json files join the card.
    ``lineage``: the dump's identity and every stage config (part of the version).
    ``dedup_config`` / ``relevance_config``: the run's, for the invariant checks
    (query identity, the threshold).

    Shard by shard, so memory is bounded by one shard's triples: only the
    kept doc ids (for the split), every pair's score (for the histogram) and
    one hash per query (for the duplicate check) are held for the whole dataset.
    """
    dedup_config = dedup_config or DedupConfig()
    relevance_config = relevance_config or RelevanceConfig()
    threshold = relevance_config.resolved_threshold()
    units, relevance = as_paths(units_dirs), as_paths(relevance_dirs)
    pairs = _pairs(relevance, units)
    scores = pl.concat([read_scored(r, with_kept=True).select("doc_id", "score", "kept") for r in relevance])
    test_docs = split_documents(scores.filter(pl.col("kept"))["doc_id"].unique().to_list(), config)

    writers = {split: pq.ParquetWriter(run.out / f"{split}.parquet", TRIPLES_SCHEMA, compression="zstd")
               for split in ("train", "test")}
    counts = {"train_triples": 0, "test_triples": 0}
    documents: dict[str, set[str]] = {"train": set(), "test": set()}
    names: dict[str, set[str]] = {"dump_name": set(), "rewriter_model": set(), "prompt_version": set()}
    seen_queries: dict[int, str] = {}
    samples = _Samples(config.sample_triples, config.seed)
    try:
        for relevance_dir, shard_units in pairs:
            triples, _ = build_triples(relevance_dir, shard_units, config, test_docs)
            check_triples(triples, threshold, dedup_config, allow_empty=True)
            for key, where in zip(triples["query"].to_list(), (triples["doc_id"] + "#" + triples["unit_index"].cast(pl.String)).to_list()):
                h = stable_int(query_key(key, dedup_config))
                if h in seen_queries:
                    raise DatasetInvariantError([f"two rows share a normalised query ({seen_queries[h]} and {where})"])
                seen_queries[h] = where
            for split in ("train", "test"):
                part = triples.filter(pl.col("split") == split)
                if part.height:
                    writers[split].write_table(part.to_arrow().select(TRIPLES_SCHEMA.names).cast(TRIPLES_SCHEMA))
                counts[f"{split}_triples"] += part.height
                documents[split].update(part["doc_id"].to_list())
            for column, found in names.items():
                found.update(triples[column].to_list())
            samples.offer(triples)
    finally:
        for writer in writers.values():
            writer.close()
    stage_dirs = list(dict.fromkeys([Path(p) for p in upstream_dirs] + units + relevance))
    if not seen_queries:
        raise NoTriplesError(Funnel.from_folders(stage_dirs))
    counts |= {"train_documents": len(documents["train"]), "test_documents": len(documents["test"])}

    funnel = run.funnel.merge(Funnel.from_folders(stage_dirs))
    kept_pairs = int(scores["kept"].sum())
    if funnel.get("dedup", "kept") and funnel.get("dedup", "kept") != scores.height:
        raise DatasetInvariantError([f"{scores.height} pairs were scored of the {funnel.get('dedup', 'kept')} queries "
                                     "dedup kept: a query's document is in none of the select_units folders"])
    funnel.seen(STAGE, kept_pairs)
    funnel.kept(STAGE, len(seen_queries))
    funnel.add("split", "train", counts["train_triples"])
    funnel.add("split", "test", counts["test_triples"])

    version = run.final.name
    full_lineage = {
        **to_jsonable(dict(lineage or {})),
        "dump_names": sorted(names["dump_name"]),
        "rewriter_models": sorted(names["rewriter_model"]),
        "prompt_versions": sorted(names["prompt_version"]),
        "stages": [_stage_entry(d) for d in stage_dirs],
        "code_versions": {"write_triples": write_triples.code_version, "dedup": dedup_mod.dedup.code_version,
                          "relevance": relevance_mod.relevance_filter.code_version},
    }
    scoring = read_marker(relevance[0]).get("scoring", {})
    params = {
        "version": version,
        "triples": config.model_dump(mode="json"),
        "threshold": threshold,
        "dedup": dedup_config.model_dump(mode="json"),
        "relevance": scoring.get("config", {}) | {"model_path": scoring.get("model_path")},
        "lineage": full_lineage,
    }
    card, card_md = build_card(version, counts, scores, samples.rows(), funnel, full_lineage, params, config)
    run.info.update(version=version, counts=counts)
    # train.parquet and test.parquet are written above, shard by shard.
    return {"params.json": params, "dataset_card.json": card, "dataset_card.md": card_md}


write_triples_task = write_triples.task


def published_from(dump_fingerprint: str, output_dir: str | os.PathLike) -> Path | None:
    """The latest published dataset if it was built from a dump with this content, else None."""
    try:
        latest = resolve_dataset(Path(output_dir))
    except PipelineInputError:
        return None
    lineage = json.loads((latest / "params.json").read_text()).get("lineage", {})
    return latest if lineage.get("dump_fingerprint") == dump_fingerprint else None
