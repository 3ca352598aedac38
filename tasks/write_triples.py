"""The published dataset: (query, document, unit) triples, split by document
(paper Appendix A: 95% train / 5% test, so no test document is seen in
training), under a version folder named by the hash of everything it came
from, with a dataset card (Markdown + JSON) that carries the whole funnel
from dump to triples, score histograms, samples and lineage.

Layout::

    <output_dir>/datasets/<version>/train.parquet, test.parquet, params.json,
                                    dataset_card.md, dataset_card.json
    <output_dir>/datasets/LATEST    the newest version id

The version folder is written under a temporary name and renamed when
complete, and LATEST is replaced atomically, so readers never see half a
dataset. ``resolve_dataset`` is how train and eval find it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
from prefect import task
from pydantic import BaseModel, Field

from tasks import dedup as dedup_mod
from tasks import relevance as relevance_mod
from tasks.common import (
    SUCCESS_MARKER,
    Funnel,
    PipelineInputError,
    completed_output_cache_key,
    fingerprint,
    is_complete,
    mark_complete,
    source_hash,
    to_jsonable,
    write_json,
    write_parquet,
    write_text,
)
from tasks.dedup import _as_list, query_key, read_documents

CODE_VERSION = source_hash(__file__)
STAGE = "write_triples"
LATEST = "LATEST"

SPAN = pa.struct([("start", pa.int32()), ("end", pa.int32())])
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


class TriplesConfig(BaseModel):
    """Train/test split and dataset card."""

    test_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of documents in the test split (paper: 5%).")
    seed: int = Field(13, ge=0, description="Seed of the document split (a hash of seed and doc_id, so it is stable across runs and shards).")
    min_test_documents: int = Field(1, ge=0, description="At least this many test documents when there are enough documents (small runs).")
    sample_triples: int = Field(5, ge=0, le=100, description="Sample triples shown in the dataset card.")
    histogram_bin_width: float = Field(0.05, gt=0.0, le=0.5, description="Bin width of the score histograms in the card.")


class DatasetInvariantError(RuntimeError):
    """The triples break a guarantee of the dataset; nothing was published."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("dataset invariants violated:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------
# Split and checks.


def _unit_interval(seed: int, doc_id: str) -> float:
    digest = hashlib.sha256(f"{seed}\x1f{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(doc_ids: Sequence[str], config: TriplesConfig | None = None) -> set[str]:
    """The test documents. Each document's side depends only on (seed, doc_id),
    except that small runs get topped up to ``min_test_documents`` with the
    documents of smallest hash (always leaving one for training)."""
    config = config or TriplesConfig()
    ranked = sorted(set(doc_ids), key=lambda d: (_unit_interval(config.seed, d), d))
    n_hash = sum(1 for d in ranked if _unit_interval(config.seed, d) < config.test_fraction)
    n_test = max(n_hash, min(config.min_test_documents, len(ranked) - 1)) if config.test_fraction > 0 else 0
    return set(ranked[:n_test])


def check_triples(triples: pl.DataFrame, threshold: float, dedup_config: dedup_mod.DedupConfig | None = None) -> None:
    """Raise DatasetInvariantError unless every guarantee holds."""
    problems: list[str] = []

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


def _read_units(units_dirs: Sequence[Path]) -> pl.DataFrame:
    frames = []
    for d in units_dirs:
        path = Path(d) / "units.parquet"
        if not path.is_file():
            raise PipelineInputError(path, "missing units.parquet (not a select_units folder?)")
        frames.append(pl.read_parquet(path, columns=["doc_id", "sentence_index", "text", "char_start", "char_end"]))
    return pl.concat(frames).cast({"sentence_index": pl.Int32})


def build_triples(relevance_dir: Path, units_dirs: Sequence[Path], config: TriplesConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(triples with a split column, all scored pairs with their kept flag)."""
    scored_path = Path(relevance_dir) / "scored.parquet"
    if not scored_path.is_file():
        raise PipelineInputError(scored_path, "missing scored.parquet (not a relevance folder?)")
    scored = pl.read_parquet(scored_path)
    if "kept" not in scored.columns:
        raise PipelineInputError(scored_path, "no 'kept' column: pass the relevance filter folder, not the scoring folder")
    kept = scored.filter(pl.col("kept")).cast({"sentence_index": pl.Int32})
    docs = read_documents(units_dirs, ["doc_id", "title", "text", "sentence_spans", "source_dump"])
    units = _read_units(units_dirs)
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
# Card.


def score_histogram(scored: pl.DataFrame, width: float) -> dict[str, Any]:
    scores = scored["score"].to_numpy().astype(np.float64)
    lo = float(np.floor(min(scores.min(), 0.0) / width) * width) if scores.size else 0.0
    hi = float(np.ceil(max(scores.max(), 1.0) / width) * width) if scores.size else 1.0
    edges = np.round(np.arange(lo, hi + width / 2, width), 6)
    kept = scored.filter(pl.col("kept"))["score"].to_numpy()
    dropped = scored.filter(~pl.col("kept"))["score"].to_numpy()
    return {
        "edges": edges.tolist(),
        "kept": np.histogram(kept, edges)[0].tolist(),
        "dropped": np.histogram(dropped, edges)[0].tolist(),
    }


def _histogram_markdown(hist: dict[str, Any], bar: int = 40) -> str:
    top = max(max(hist["kept"], default=0), max(hist["dropped"], default=0), 1)
    lines = ["```", f"{'score':>13}  {'kept':>6} {'dropped':>7}"]
    for i, (k, d) in enumerate(zip(hist["kept"], hist["dropped"])):
        if not k and not d:
            continue
        lo, hi = hist["edges"][i], hist["edges"][i + 1]
        lines.append(f"[{lo:+.2f},{hi:+.2f})  {k:6d} {d:7d}  {'#' * round(bar * k / top)}{'.' * round(bar * d / top)}")
    lines += ["```", "`#` kept, `.` dropped (below the threshold)."]
    return "\n".join(lines)


def build_card(version: str, triples: pl.DataFrame, scored: pl.DataFrame, funnel: Funnel,
               lineage: dict[str, Any], params: dict[str, Any], config: TriplesConfig) -> tuple[dict, str]:
    train, test = triples.filter(pl.col("split") == "train"), triples.filter(pl.col("split") == "test")
    hist = score_histogram(scored, config.histogram_bin_width)
    samples = triples.sample(n=min(config.sample_triples, triples.height), seed=config.seed, shuffle=True) \
        .select("split", "doc_id", "title", "query", "unit", "score").to_dicts() if triples.height else []
    card = {
        "version": version,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "counts": {
            "train_triples": train.height, "test_triples": test.height,
            "train_documents": train["doc_id"].n_unique(), "test_documents": test["doc_id"].n_unique(),
        },
        "threshold": params["threshold"],
        "funnel": funnel.to_dict(),
        "score_histogram": hist,
        "score_summary": {
            name: ({"n": len(s), "mean": round(float(np.mean(s)), 4), "min": round(float(np.min(s)), 4),
                    "max": round(float(np.max(s)), 4)} if len(s) else {"n": 0})
            for name, s in (("kept", scored.filter(pl.col("kept"))["score"].to_numpy()),
                            ("dropped", scored.filter(~pl.col("kept"))["score"].to_numpy()))
        },
        "samples": samples,
        "lineage": lineage,
        "params": params,
        "schema": {f.name: str(f.type) for f in TRIPLES_SCHEMA},
    }
    c = card["counts"]
    md = [
        f"# RIR dataset `{version}`",
        "",
        "(query, document, unit) triples built by the GeAR pipeline (arXiv 2501.02772, Appendix A).",
        "",
        "| split | triples | documents |",
        "|---|---:|---:|",
        f"| train | {c['train_triples']} | {c['train_documents']} |",
        f"| test | {c['test_triples']} | {c['test_documents']} |",
        "",
        "## Funnel (dump to triples)",
        "",
        funnel.markdown(),
        "",
        f"## Relevance scores (threshold {params['threshold']}, model `{params['relevance'].get('model')}`)",
        "",
        _histogram_markdown(hist),
        "",
        "## Samples",
        "",
        "| split | title | query | unit | score |",
        "|---|---|---|---|---:|",
    ]
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    md += [f"| {s['split']} | {esc(s['title'])} | {esc(s['query'])} | {esc(s['unit'])} | {s['score']:.3f} |" for s in samples]
    md += ["", "## Lineage", "", "```json", json.dumps(to_jsonable(lineage), indent=2, sort_keys=True), "```", ""]
    return card, "\n".join(md)


# --------------------------------------------------------------------------
# Version and publishing.


def _stage_entry(path: Path) -> dict[str, Any]:
    entry: dict[str, Any] = {"stage": path.parent.name, "key": path.name, "path": str(path)}
    marker = path / SUCCESS_MARKER
    if marker.is_file():
        info = json.loads(marker.read_text())
        if isinstance(info, dict) and "code_version" in info:
            entry["code_version"] = info["code_version"]
    return entry


def dataset_version(relevance_dir, units_dirs, config: TriplesConfig | None = None,
                    lineage: Mapping[str, Any] | None = None) -> str:
    """Hash of the inputs' content, the split config, the flow's lineage
    (dump identity and every stage config) and the code versions."""
    config = config or TriplesConfig()
    payload = {
        "scored": fingerprint(Path(relevance_dir) / "scored.parquet"),
        "relevance_key": Path(relevance_dir).name,
        "units": [fingerprint(Path(u) / n) for u in _as_list(units_dirs) for n in ("documents.parquet", "units.parquet")],
        "config": to_jsonable(config),
        "lineage": to_jsonable(dict(lineage or {})),
        "code": {"write_triples": CODE_VERSION, "dedup": dedup_mod.CODE_VERSION, "relevance": relevance_mod.CODE_VERSION},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def triples_output_dir(relevance_dir, units_dirs, config: TriplesConfig | None = None, output_dir="output",
                       upstream_dirs: Sequence = (), lineage: Mapping[str, Any] | None = None) -> Path:
    return Path(output_dir) / "datasets" / dataset_version(relevance_dir, units_dirs, config, lineage)


def _set_latest(datasets_dir: Path, version: str) -> None:
    write_text(version + "\n", datasets_dir / LATEST)


def write_triples(
    relevance_dir: str | os.PathLike,
    units_dirs: str | os.PathLike | Sequence[str | os.PathLike],
    config: TriplesConfig | None = None,
    output_dir: str | os.PathLike = "output",
    upstream_dirs: Sequence[str | os.PathLike] = (),
    lineage: Mapping[str, Any] | None = None,
) -> Path:
    """Publish the dataset version folder and point LATEST at it; return the folder.

    ``relevance_dir``: the relevance filter folder (scored.parquet with ``kept``).
    ``upstream_dirs``: every earlier stage folder (shards, extract, select,
    rewrite, dedup); their funnel.json files are merged into the card.
    ``lineage``: deterministic facts from the flow (dump name and fingerprint,
    stage configs); part of the version id.
    """
    config = config or TriplesConfig()
    units = _as_list(units_dirs)
    relevance_dir = Path(relevance_dir)
    version = dataset_version(relevance_dir, units, config, lineage)
    datasets = Path(output_dir) / "datasets"
    final = datasets / version
    if is_complete(final):
        _set_latest(datasets, version)
        return final

    triples, scored = build_triples(relevance_dir, units, config)
    rel_params = json.loads((relevance_dir / "params.json").read_text()) if (relevance_dir / "params.json").is_file() else {}
    threshold = float(rel_params.get("threshold", scored.filter(pl.col("kept"))["score"].min() or 0.0))
    check_triples(triples, threshold)

    funnel = Funnel()
    # Units folders count even when the flow leaves them out of upstream_dirs;
    # a folder named twice is merged once.
    stage_dirs = list(dict.fromkeys([Path(p) for p in upstream_dirs] + units + [relevance_dir]))
    for d in stage_dirs:
        if (d / "funnel.json").is_file():
            funnel.merge(Funnel.load(d / "funnel.json"))
    funnel.seen(STAGE, scored.filter(pl.col("kept")).height)
    funnel.kept(STAGE, triples.height)
    funnel.add("split", "train", int((triples["split"] == "train").sum()))
    funnel.add("split", "test", int((triples["split"] == "test").sum()))

    full_lineage = {
        **to_jsonable(dict(lineage or {})),
        "dump_names": sorted(set(triples["dump_name"].to_list())),
        "rewriter_models": sorted(set(triples["rewriter_model"].to_list())),
        "prompt_versions": sorted(set(triples["prompt_version"].to_list())),
        "stages": [_stage_entry(d) for d in stage_dirs],
        "code_versions": {"write_triples": CODE_VERSION, "dedup": dedup_mod.CODE_VERSION,
                          "relevance": relevance_mod.CODE_VERSION},
    }
    params = {
        "version": version,
        "triples": config.model_dump(mode="json"),
        "threshold": threshold,
        "relevance": rel_params.get("scoring", {}).get("config", {}) | {"model_path": rel_params.get("scoring", {}).get("model_path")},
        "relevance_dir": str(relevance_dir),
        "units_dirs": [str(u) for u in units],
        "lineage": full_lineage,
    }
    card, card_md = build_card(version, triples, scored, funnel, full_lineage, params, config)

    datasets.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", dir=datasets))
    try:
        for split in ("train", "test"):
            part = triples.filter(pl.col("split") == split)
            write_parquet(part.to_arrow(), tmp / f"{split}.parquet", TRIPLES_SCHEMA)
        write_json(params, tmp / "params.json")
        write_json(card, tmp / "dataset_card.json")
        write_text(card_md, tmp / "dataset_card.md")
        funnel.save(tmp / "funnel.json")
        mark_complete(tmp, {"stage": STAGE, "version": version, "code_version": CODE_VERSION, "counts": card["counts"]})
        if final.exists():  # an unfinished leftover (complete ones returned above)
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    _set_latest(datasets, version)
    return final


def resolve_dataset(path: str | os.PathLike) -> Path:
    """The dataset version folder for an output dir (via datasets/LATEST), a
    datasets/ dir (via LATEST) or a version dir itself."""
    path = Path(path)
    if (path / "train.parquet").is_file():
        found = path
    elif (path / LATEST).is_file():
        found = path / (path / LATEST).read_text().strip()
    elif (path / "datasets" / LATEST).is_file():
        found = path / "datasets" / (path / "datasets" / LATEST).read_text().strip()
    else:
        raise PipelineInputError(path, "not a dataset: no train.parquet, LATEST or datasets/LATEST here")
    if not is_complete(found) or not (found / "train.parquet").is_file():
        raise PipelineInputError(found, "dataset version folder is incomplete or missing")
    return found


@task(
    name="write-triples",
    retries=2,
    retry_delay_seconds=5,
    cache_key_fn=completed_output_cache_key(triples_output_dir),
    persist_result=True,
)
def write_triples_task(relevance_dir, units_dirs, config: TriplesConfig | None = None, output_dir="output",
                       upstream_dirs: Sequence = (), lineage: Mapping[str, Any] | None = None) -> Path:
    out = write_triples(relevance_dir, units_dirs, config, output_dir, upstream_dirs, lineage)
    _publish_artifacts(out)
    return out


def _publish_artifacts(version_dir: Path) -> None:
    """The card, funnel and samples as Prefect artifacts (UI)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    card = json.loads((version_dir / "dataset_card.json").read_text())
    create_markdown_artifact((version_dir / "dataset_card.md").read_text(), key="rir-dataset-card",
                             description=f"RIR dataset {card['version']}")
    create_table_artifact(Funnel(card["funnel"]).rows(), key="rir-funnel", description="Records kept and dropped per stage")
    create_table_artifact(card["samples"], key="rir-samples", description="Sample triples")
