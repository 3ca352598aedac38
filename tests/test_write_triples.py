"""Triples, split, invariants, version folder, card and resolve_dataset."""

from __future__ import annotations

import json
import random

import polars as pl
import pyarrow.parquet as pq
import pytest

from tasks.common import PipelineInputError, mark_complete, write_parquet
from tasks.dedup import DedupConfig, dedup
from tasks.contracts import SCORED_SCHEMA
from tasks.relevance import RelevanceConfig, relevance, relevance_filter
from tasks.write_triples import (
    TRIPLES_SCHEMA,
    DatasetInvariantError,
    TriplesConfig,
    build_triples,
    check_triples,
    resolve_dataset,
    split_documents,
    write_triples,
    write_triples_task,
)
from test_dedup import DOCS, GOOD_QUERIES, make_rewrite_dir, make_units_dir

SCORES = [0.62, 0.41, 0.55, 0.18, 0.47, 0.36, 0.71, 0.52]  # one per GOOD_QUERIES row; 0.18 is dropped at 0.3


def many_docs(n: int) -> dict:
    """n documents made of the fixture's sentences under new ids."""
    base = list(DOCS.values())
    return {f"doc{i:03d}#0": base[i % len(base)] for i in range(n)}


@pytest.fixture()
def stages(tmp_path):
    """select_units, rewrite, dedup and relevance folders, with fixed scores (no model)."""
    units = make_units_dir(tmp_path / "units", DOCS)
    rewrite = make_rewrite_dir(tmp_path / "rewrite", DOCS, GOOD_QUERIES)
    dd = dedup(rewrite, units, DedupConfig(), tmp_path / "work")
    q = pl.read_parquet(dd / "queries.parquet").sort("doc_id", "sentence_index")
    score = {(d, i): s for (d, i, _), s in zip(GOOD_QUERIES, SCORES)}
    q = q.with_columns(pl.Series("score", [score[(d, i)] for d, i in q.select("doc_id", "sentence_index").iter_rows()],
                                 dtype=pl.Float32))
    scored_dir = tmp_path / "work" / "stages" / "relevance_score" / "fixedscores0001"
    scored_dir.mkdir(parents=True)
    write_parquet(q.to_arrow(), scored_dir / "scored.parquet", SCORED_SCHEMA)
    mark_complete(scored_dir, {"config": {"model": "fixed-scores", "pooling": "mean"}, "model_path": "fixed"})
    relevance = relevance_filter(scored_dir, RelevanceConfig(threshold=0.3), tmp_path / "work")
    return {"units": units, "rewrite": rewrite, "dedup": dd, "relevance": relevance, "out": tmp_path / "output"}


def publish(stages, config=None, lineage=None):
    return write_triples(stages["relevance"], [stages["units"]],
                         upstream_dirs=[stages["units"], stages["rewrite"], stages["dedup"]],
                         lineage=lineage or {"dump": {"name": "testwiki-20260101", "fingerprint": "abc123"}},
                         relevance_config=RelevanceConfig(threshold=0.3),
                         config=config or TriplesConfig(), work_dir=stages["out"])


# --------------------------------------------------------------------------
# Split.


def test_split_by_document_is_stable_and_near_the_fraction():
    ids = [f"page{i}#0" for i in range(4000)]
    test = split_documents(ids, TriplesConfig())
    assert 0.04 <= len(test) / len(ids) <= 0.06
    shuffled = list(ids)
    random.Random(3).shuffle(shuffled)
    assert split_documents(shuffled, TriplesConfig()) == test  # order-free
    assert split_documents(ids[:2000], TriplesConfig()) == {d for d in test if d in set(ids[:2000])}  # per-doc decision
    assert split_documents(ids, TriplesConfig(seed=14)) != test
    assert 0.18 <= len(split_documents(ids, TriplesConfig(test_fraction=0.2))) / len(ids) <= 0.22


def test_small_runs_get_a_test_document_but_keep_one_for_training():
    assert len(split_documents(["a", "b", "c"], TriplesConfig())) == 1
    assert split_documents(["a"], TriplesConfig()) == set()
    assert split_documents(["a", "b", "c"], TriplesConfig(min_test_documents=0, test_fraction=0.0)) == set()


# --------------------------------------------------------------------------
# Publishing.


def test_write_triples_schema_invariants_and_layout(stages):
    version_dir = publish(stages)
    datasets = stages["out"] / "datasets"
    assert version_dir.parent == datasets
    assert (datasets / "LATEST").read_text().strip() == version_dir.name
    for name in ("train.parquet", "test.parquet", "params.json", "dataset_card.md", "dataset_card.json", "_SUCCESS.json"):
        assert (version_dir / name).is_file(), name
    assert not [p for p in datasets.iterdir() if p.name.startswith(".")]  # no temp folder left
    train, test = (pq.read_table(version_dir / f"{s}.parquet") for s in ("train", "test"))
    assert train.schema.equals(TRIPLES_SCHEMA, check_metadata=False)
    assert test.schema.equals(TRIPLES_SCHEMA, check_metadata=False)
    both = pl.concat([pl.from_arrow(train), pl.from_arrow(test)])
    assert both.height == sum(s >= 0.3 for s in SCORES) == 7
    assert set(train.column("split").to_pylist()) == {"train"} and set(test.column("split").to_pylist()) == {"test"}
    assert not set(train.column("doc_id").to_pylist()) & set(test.column("doc_id").to_pylist())
    assert test.num_rows >= 1
    for r in both.iter_rows(named=True):
        assert r["document"][r["unit_start"]:r["unit_end"]] == r["unit"]
        assert r["sentence_spans"][r["unit_index"]] == {"start": r["unit_start"], "end": r["unit_end"]}
        assert r["score"] >= 0.3
        assert (r["rewriter_model"], r["prompt_version"], r["dump_name"]) == ("test-rewriter", "paper-v1", "testwiki-20260101")
    assert resolve_dataset(stages["out"]) == version_dir
    assert resolve_dataset(datasets) == version_dir
    assert resolve_dataset(version_dir) == version_dir


def test_card_has_funnel_histogram_samples_and_lineage(stages):
    version_dir = publish(stages)
    card = json.loads((version_dir / "dataset_card.json").read_text())
    f = card["funnel"]
    assert f["rewrite"]["dropped:echo"] == 1 and f["select_units"]["kept"] == len(DOCS)
    assert f["dedup"]["kept"] == len(GOOD_QUERIES)
    assert f["relevance"] == {"input": 8, "kept": 7, "dropped:below_threshold": 1}
    assert f["write_triples"]["kept"] == 7
    assert f["split"]["train"] + f["split"]["test"] == 7
    h = card["score_histogram"]
    assert sum(h["kept"]) == 7 and sum(h["dropped"]) == 1 and len(h["edges"]) == len(h["kept"]) + 1
    assert card["threshold"] == 0.3
    assert 1 <= len(card["samples"]) <= 5
    lin = card["lineage"]
    assert lin["dump"] == {"name": "testwiki-20260101", "fingerprint": "abc123"}
    assert lin["rewriter_models"] == ["test-rewriter"] and lin["prompt_versions"] == ["paper-v1"]
    assert {s["stage"] for s in lin["stages"]} >= {"dedup", "relevance"}
    assert "dedup" in lin["code_versions"]
    md = (version_dir / "dataset_card.md").read_text()
    assert "| relevance | dropped:below_threshold | 1 |" in md and "## Samples" in md and "```" in md
    params = json.loads((version_dir / "params.json").read_text())
    assert params["triples"]["test_fraction"] == 0.05 and params["version"] == version_dir.name


def test_rerun_reuses_the_version_and_config_change_makes_a_new_one(stages):
    v1 = publish(stages)
    mtime = (v1 / "train.parquet").stat().st_mtime_ns
    assert publish(stages) == v1 and (v1 / "train.parquet").stat().st_mtime_ns == mtime
    v2 = publish(stages, TriplesConfig(seed=99))
    assert v2 != v1 and (stages["out"] / "datasets" / "LATEST").read_text().strip() == v2.name
    v3 = publish(stages, lineage={"dump": {"name": "testwiki-20260201", "fingerprint": "def456"}})
    assert v3 not in (v1, v2)
    assert resolve_dataset(v1) == v1  # older versions stay readable


def test_invariant_check_rejects_broken_data(stages):
    triples, _ = build_triples(stages["relevance"], [stages["units"]], TriplesConfig())
    check_triples(triples, 0.3)  # the real thing passes

    broken_span = triples.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(pl.col("unit_start") + 1).otherwise(pl.col("unit_start")).alias("unit_start")
    )
    with pytest.raises(DatasetInvariantError, match=r"not document\[unit_start:unit_end\]"):
        check_triples(broken_span, 0.3)
    leak = triples.with_columns(pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("test")).otherwise(pl.lit("train")).alias("split"))
    leak = pl.concat([leak, leak.head(1).with_columns(pl.lit("train").alias("split"), pl.lit("x, y").alias("query"))])
    with pytest.raises(DatasetInvariantError, match="in both splits"):
        check_triples(leak, 0.3)
    dup = pl.concat([triples, triples.head(1).with_columns(pl.col("query").str.to_uppercase())])
    with pytest.raises(DatasetInvariantError, match="share a normalised query"):
        check_triples(dup, 0.3)
    with pytest.raises(DatasetInvariantError, match="below the threshold"):
        check_triples(triples, 0.5)


def test_broken_input_publishes_nothing(stages, tmp_path):
    # A units.parquet whose spans are off by one: caught before publishing.
    units = stages["units"]
    u = pl.read_parquet(units / "units.parquet").with_columns(pl.col("char_start") + 1)
    write_parquet(u.to_arrow(), units / "units.parquet")
    with pytest.raises(DatasetInvariantError, match="unit_start"):
        publish(stages)
    assert not (stages["out"] / "datasets" / "LATEST").exists()
    assert not (stages["out"] / "datasets").exists() or not list((stages["out"] / "datasets").iterdir())


def test_resolve_dataset_rejects_non_datasets(tmp_path):
    with pytest.raises(PipelineInputError, match="not a dataset"):
        resolve_dataset(tmp_path)
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / "LATEST").write_text("missing\n")
    with pytest.raises(PipelineInputError, match="incomplete or missing"):
        resolve_dataset(tmp_path)


def test_end_to_end_with_the_real_scorer(tmp_path):
    """dedup -> relevance (embedded MiniLM) -> write_triples on the fixture."""
    docs = many_docs(24)
    units = make_units_dir(tmp_path / "units", docs)
    topics = {d: i % len(DOCS) for i, d in enumerate(docs)}
    base_queries = {k: [(i, q) for d, i, q in GOOD_QUERIES if d == k] for k in DOCS}
    names = list(DOCS)
    rows = []
    for d, t in topics.items():
        for i, q in base_queries[names[t]]:
            rows.append((d, i, f"{q}, {d.split('#')[0]}"))  # a per-doc keyword keeps queries distinct
    rewrite = make_rewrite_dir(tmp_path / "rewrite", docs, rows)
    # Documents repeat the fixture text: near-duplicate detection off, or it would (rightly) keep 4.
    dd = dedup(rewrite, units, DedupConfig(near_duplicate_documents=False), tmp_path / "work")
    relevance_dir = relevance(dd, units, RelevanceConfig(max_length=128), tmp_path / "work")
    out = write_triples(relevance_dir, units, upstream_dirs=[units, rewrite, dd],
                        config=TriplesConfig(test_fraction=0.2), work_dir=tmp_path / "output")
    train, test = (pl.read_parquet(out / f"{s}.parquet") for s in ("train", "test"))
    assert train.height + test.height >= 0.75 * len(rows)
    assert test["doc_id"].n_unique() >= 2 and not set(train["doc_id"]) & set(test["doc_id"])


def test_task_publishes_artifacts_and_caches(stages, prefect_harness):
    from prefect import flow
    from prefect.artifacts import Artifact

    @flow
    def publish_flow():
        return write_triples_task(stages["relevance"], [stages["units"]], upstream_dirs=[stages["dedup"]],
                                  lineage={"dump": {"name": "t"}}, config=TriplesConfig(), work_dir=stages["out"])

    first = publish_flow()
    assert (first / "train.parquet").is_file()
    assert Artifact.get("rir-funnel") is not None and Artifact.get("rir-dataset-card") is not None
    assert publish_flow() == first


def test_nothing_kept_publishes_nothing(stages, tmp_path):
    """An empty dataset is never published, and LATEST stays where it was."""
    first = publish(stages)
    scored_dir = stages["relevance"].parents[1] / "relevance_score" / "fixedscores0001"
    strict = relevance_filter(scored_dir, RelevanceConfig(threshold=0.99), tmp_path / "work")
    with pytest.raises(DatasetInvariantError, match="no triples"):
        write_triples(strict, [stages["units"]], relevance_config=RelevanceConfig(threshold=0.99), work_dir=stages["out"])
    datasets = stages["out"] / "datasets"
    assert (datasets / "LATEST").read_text().strip() == first.name
    assert sorted(p.name for p in datasets.iterdir()) == sorted(["LATEST", first.name])


def test_a_query_scored_in_no_shard_stops_the_build(stages, tmp_path):
    """Scoring is mapped per shard: the shards together must cover every query dedup kept."""
    only_one = make_units_dir(tmp_path / "one", {"autism#0": DOCS["autism#0"]})
    partial = relevance(stages["dedup"], only_one, RelevanceConfig(max_length=128), tmp_path / "work")
    with pytest.raises(DatasetInvariantError, match="in none of the select_units folders"):
        write_triples(partial, [only_one], upstream_dirs=[stages["dedup"]], work_dir=tmp_path / "out")
    assert not (tmp_path / "out" / "datasets" / "LATEST").exists()


def test_shard_by_shard_equals_all_at_once(tmp_path):
    """Per-shard relevance folders give the same triples as one folder over all shards."""
    docs = many_docs(12)
    names = list(DOCS)
    rows = [(d, i, f"{q}, {d.split('#')[0]}") for n, d in enumerate(docs)
            for k, i, q in GOOD_QUERIES if k == names[n % len(names)]]
    shard_a = make_units_dir(tmp_path / "ua", dict(list(docs.items())[:6]))
    shard_b = make_units_dir(tmp_path / "ub", dict(list(docs.items())[6:]))
    rewrite = make_rewrite_dir(tmp_path / "rewrite", docs, rows)
    dd = dedup(rewrite, [shard_a, shard_b], DedupConfig(near_duplicate_documents=False), tmp_path / "work")
    cfg = RelevanceConfig(max_length=128)
    whole = write_triples(relevance(dd, [shard_a, shard_b], cfg, tmp_path / "work"), [shard_a, shard_b],
                          upstream_dirs=[dd], config=TriplesConfig(test_fraction=0.3), work_dir=tmp_path / "o1")
    per_shard = [relevance(dd, s, cfg, tmp_path / "work") for s in (shard_a, shard_b)]
    split = write_triples(per_shard, [shard_a, shard_b], upstream_dirs=[dd], config=TriplesConfig(test_fraction=0.3),
                          work_dir=tmp_path / "o2")
    for name in ("train.parquet", "test.parquet"):
        a, b = pl.read_parquet(whole / name), pl.read_parquet(split / name)
        assert a.sort("doc_id", "unit_index").equals(b.sort("doc_id", "unit_index"))
    card_a, card_b = (json.loads((d / "dataset_card.json").read_text()) for d in (whole, split))
    assert card_a["counts"] == card_b["counts"] and card_a["score_histogram"] == card_b["score_histogram"]


def test_a_killed_runs_leftovers_are_removed_by_the_next_publish(stages):
    """A hidden partial version of another key and a cut LATEST write, as a kill leaves them."""
    datasets = stages["out"] / "datasets"
    (datasets / ".0123456789abcdef.partial").mkdir(parents=True)
    (datasets / ".0123456789abcdef.partial" / "train.parquet").write_bytes(b"half")
    (datasets / ".LATEST.abc123.tmp").write_text("half")
    version_dir = publish(stages)
    assert sorted(p.name for p in datasets.iterdir()) == sorted(["LATEST", version_dir.name])


def test_published_files_get_the_umask_permissions(stages):
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)
    version_dir = publish(stages)
    for path in [version_dir.parent / "LATEST", *version_dir.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
    assert stat.S_IMODE(version_dir.stat().st_mode) == 0o777 & ~umask
