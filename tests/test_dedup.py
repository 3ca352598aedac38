"""Keyword post-processing, duplicate queries and near-duplicate documents.

The helpers at the top build select_units and rewrite folders by the data
contracts (TEAM_BRIEF.md); test_relevance and test_write_triples use them too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from tasks.common import Funnel, mark_complete, write_parquet
from tasks.dedup import (
    DedupConfig,
    PipelineInputError,
    dedup,
    keyword_key,
    normalise_query,
    query_key,
    split_keywords,
)

SPAN = pa.struct([("start", pa.int32()), ("end", pa.int32())])
DOCUMENTS_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("page_id", pa.int64()), ("revision_id", pa.int64()), ("part", pa.int32()),
    ("title", pa.string()), ("text", pa.string()), ("sentence_spans", pa.list_(SPAN)),
    ("token_count", pa.int32()), ("source_dump", pa.string()),
])
UNITS_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("sentence_index", pa.int32()), ("text", pa.string()),
    ("char_start", pa.int32()), ("char_end", pa.int32()), ("token_count", pa.int32()),
])
QUERIES_SCHEMA = pa.schema([
    ("doc_id", pa.string()), ("sentence_index", pa.int32()), ("unit", pa.string()), ("query", pa.string()),
    ("rewriter_model", pa.string()), ("prompt_version", pa.string()),
])

# Real prose (paraphrased Wikipedia facts), so the encoder tests mean something.
DOCS = {
    "anarchism#0": ("Anarchism", [
        "Anarchism is a political philosophy that rejects involuntary forms of hierarchy.",
        "It calls for the abolition of the state, which it holds to be harmful.",
        "Proudhon was the first person to call himself an anarchist in 1840.",
        "Anarchist schools of thought differ on economics and on the use of violence.",
        "The Spanish Revolution of 1936 saw anarchist collectives run factories and farms.",
    ]),
    "autism#0": ("Autism", [
        "Autism is a neurodevelopmental condition that affects social interaction and communication.",
        "Signs of autism usually appear in the first two years of a child's life.",
        "Genetic factors account for most of the risk of developing autism.",
        "Early behavioural therapy can help autistic children learn social and language skills.",
        "The diagnostic criteria for autism were broadened in the DSM-5 in 2013.",
    ]),
    "albedo#0": ("Albedo", [
        "Albedo is the fraction of sunlight that a surface diffusely reflects.",
        "Fresh snow has a high albedo while dark ocean water has a very low albedo.",
        "Changes in ice cover alter the albedo of the Earth and therefore its climate.",
        "Astronomers use albedo to estimate the size of asteroids from their brightness.",
        "The average albedo of the Earth is about thirty percent.",
    ]),
    "apollo#0": ("Apollo", [
        "Apollo is a god of archery, music, healing and the sun in Greek mythology.",
        "Apollo was the son of Zeus and Leto and the twin brother of Artemis.",
        "The oracle of Apollo at Delphi was consulted across the Greek world.",
        "Roman religion adopted Apollo without changing his Greek name.",
        "Statues of Apollo show a beardless young man of ideal beauty.",
    ]),
}


def make_units_dir(path: Path, docs: dict[str, tuple[str, list[str]]], dump: str = "testwiki-20260101") -> Path:
    """A select_units folder: documents.parquet + units.parquet (every sentence a unit)."""
    doc_rows, unit_rows = [], []
    for n, (doc_id, (title, sentences)) in enumerate(docs.items()):
        text, spans = "", []
        for i, s in enumerate(sentences):
            if text:
                text += " "
            spans.append({"start": len(text), "end": len(text) + len(s)})
            text += s
            unit_rows.append({"doc_id": doc_id, "sentence_index": i, "text": s, "char_start": spans[-1]["start"],
                              "char_end": spans[-1]["end"], "token_count": len(s.split())})
        doc_rows.append({"doc_id": doc_id, "page_id": 100 + n, "revision_id": 1000 + n, "part": 0, "title": title,
                         "text": text, "sentence_spans": spans, "token_count": len(text.split()), "source_dump": dump})
    path.mkdir(parents=True, exist_ok=True)
    write_parquet(pa.Table.from_pylist(doc_rows, DOCUMENTS_SCHEMA), path / "documents.parquet", DOCUMENTS_SCHEMA)
    write_parquet(pa.Table.from_pylist(unit_rows, UNITS_SCHEMA), path / "units.parquet", UNITS_SCHEMA)
    f = Funnel()
    f.seen("select_units", len(doc_rows))
    f.kept("select_units", len(doc_rows))
    f.save(path / "funnel.json")
    mark_complete(path, {"stage": "select_units"})
    return path


def make_rewrite_dir(path: Path, docs: dict, rows: list[tuple[str, int, str]]) -> Path:
    """A rewrite folder: queries.parquet for (doc_id, sentence_index, query) rows."""
    recs = [{"doc_id": d, "sentence_index": i, "unit": docs[d][1][i], "query": q,
             "rewriter_model": "test-rewriter", "prompt_version": "paper-v1"} for d, i, q in rows]
    path.mkdir(parents=True, exist_ok=True)
    write_parquet(pa.Table.from_pylist(recs, QUERIES_SCHEMA), path / "queries.parquet", QUERIES_SCHEMA)
    f = Funnel()
    f.seen("rewrite", len(recs) + 1)
    f.kept("rewrite", len(recs))
    f.drop("rewrite", "echo", 1)
    f.save(path / "funnel.json")
    mark_complete(path, {"stage": "rewrite"})
    return path


GOOD_QUERIES = [
    ("anarchism#0", 0, "anarchism, political philosophy, rejects hierarchy"),
    ("anarchism#0", 2, "Proudhon, first anarchist, 1840"),
    ("autism#0", 0, "autism, neurodevelopmental condition, social interaction, communication"),
    ("autism#0", 2, "genetic factors, autism risk"),
    ("albedo#0", 0, "albedo, fraction of sunlight, surface reflects"),
    ("albedo#0", 3, "astronomers, albedo, asteroid size, brightness"),
    ("apollo#0", 1, "Apollo, son of Zeus, Leto, twin brother, Artemis"),
    ("apollo#0", 2, "oracle of Apollo, Delphi, Greek world"),
]


# --------------------------------------------------------------------------
# Per-query keyword post-processing.


def test_split_keywords_drops_repeats_and_keeps_first_surface_form():
    q = "Paris, paris , PARIS!, capital of  France,, France; “France”\nEiffel Tower"
    assert split_keywords(q) == ["Paris", "capital of France", "France", "Eiffel Tower"]


def test_keyword_key_normalises_unicode_case_and_punctuation():
    assert keyword_key("ＵＳＡ") == keyword_key("usa")  # NFKC full-width
    assert keyword_key("New-York!") == keyword_key("new york")
    assert keyword_key("New-York", DedupConfig(strip_punctuation=False)) != keyword_key("new york")
    assert keyword_key("Paris", DedupConfig(lowercase_for_comparison=False)) != keyword_key("paris")


def test_reorder_is_seeded_per_query_and_preserves_keywords():
    q = "alpha, beta, gamma, delta, epsilon, zeta, eta, theta, beta"
    a = normalise_query(q, "doc#0", 3)
    assert a == normalise_query(q, "doc#0", 3)  # deterministic
    assert sorted(a.split(", ")) == sorted(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"])
    # Other seeds / other queries give other orders (8! orders: a clash is 1 in 40320).
    orders = {normalise_query(q, "doc#0", 3, DedupConfig(seed=s)) for s in range(10)}
    assert len(orders) > 1
    assert normalise_query(q, "doc#0", 4) != a or normalise_query(q, "doc#1", 3) != a
    no_shuffle = normalise_query(q, "doc#0", 3, DedupConfig(reorder_keywords=False))
    assert no_shuffle == "alpha, beta, gamma, delta, epsilon, zeta, eta, theta"


def test_query_key_ignores_order_case_and_repeats():
    assert query_key("Zeus, Apollo, apollo") == query_key("apollo, ZEUS") == "apollo, zeus"
    assert query_key(" , ;") == ""


# --------------------------------------------------------------------------
# The stage.


def _frame(out: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(out / name)


def test_dedup_stage_drops_each_kind_with_its_reason(tmp_path):
    docs = dict(DOCS)
    # A mirrored copy of "albedo" (other case, one sentence added): near-duplicate.
    title, sents = DOCS["albedo#0"]
    docs["zz-albedo-mirror#0"] = (title, [s.upper() for s in sents] + ["See also albedo."])
    units = make_units_dir(tmp_path / "units", docs)
    rows = GOOD_QUERIES + [
        ("apollo#0", 3, "Roman religion, apollo, Greek name, Apollo"),   # repeated keyword inside
        ("autism#0", 4, "Communication, Autism, social interaction, neurodevelopmental condition"),  # = autism#0/0 reordered
        ("anarchism#0", 4, " , ;  "),                                    # nothing left
        ("zz-albedo-mirror#0", 1, "fresh snow, high albedo, ocean water"),
        ("zz-albedo-mirror#0", 2, "ice cover, Earth albedo, climate"),
    ]
    rewrite = make_rewrite_dir(tmp_path / "rewrite", docs, rows)
    out = dedup(rewrite, [units], DedupConfig(), tmp_path / "work")

    kept = _frame(out, "queries.parquet")
    dropped = _frame(out, "dropped.parquet")
    funnel = json.loads((out / "funnel.json").read_text())["dedup"]
    assert funnel == {
        "input": 13, "kept": 9,
        "dropped:duplicate_query": 1,
        "dropped:empty_after_normalisation": 1,
        "dropped:near_duplicate_document": 2,
    }
    reasons = {(r["doc_id"], r["sentence_index"]): (r["reason"], r["duplicate_of"]) for r in dropped.iter_rows(named=True)}
    assert reasons[("autism#0", 4)] == ("duplicate_query", "autism#0#0")
    assert reasons[("anarchism#0", 4)][0] == "empty_after_normalisation"
    assert reasons[("zz-albedo-mirror#0", 1)] == ("near_duplicate_document", "albedo#0")
    near = _frame(out, "near_duplicates.parquet")
    assert near["doc_id"].to_list() == ["zz-albedo-mirror#0"] and near["jaccard"][0] >= 0.8
    # Keyword-level repeats are counted too.
    kw = json.loads((out / "funnel.json").read_text())["dedup_keywords"]
    assert kw["dropped:repeated_keyword"] >= 1 and kw["input"] == kw["kept"] + kw["dropped:repeated_keyword"]
    apollo = kept.filter((pl.col("doc_id") == "apollo#0") & (pl.col("sentence_index") == 3))["query"][0]
    assert sorted(apollo.split(", ")) == ["Greek name", "Roman religion", "apollo"]
    # Same columns as the rewrite contract; units untouched.
    assert kept.columns == ["doc_id", "sentence_index", "unit", "query", "rewriter_model", "prompt_version"]
    assert kept.filter(pl.col("doc_id") == "albedo#0").height == 2


def test_near_duplicate_threshold_is_config(tmp_path):
    docs = dict(DOCS)
    title, sents = DOCS["apollo#0"]
    docs["zz-apollo-edit#0"] = (title, sents[:3] + ["Apollo had many temples across the Mediterranean.",
                                                       "Apollo is often shown with a lyre and a bow."])
    units = make_units_dir(tmp_path / "units", docs)
    rows = GOOD_QUERIES + [("zz-apollo-edit#0", 3, "Apollo temples, Mediterranean")]
    rewrite = make_rewrite_dir(tmp_path / "rewrite", docs, rows)
    strict = dedup(rewrite, units, DedupConfig(lsh_threshold=0.9), tmp_path / "work")
    loose = dedup(rewrite, units, DedupConfig(lsh_threshold=0.3), tmp_path / "work")
    assert strict != loose
    assert "zz-apollo-edit#0" in _frame(strict, "queries.parquet")["doc_id"].to_list()
    assert "zz-apollo-edit#0" not in _frame(loose, "queries.parquet")["doc_id"].to_list()


def test_dedup_output_does_not_depend_on_shard_or_row_order(tmp_path):
    a = {k: DOCS[k] for k in ("anarchism#0", "autism#0")}
    b = {k: DOCS[k] for k in ("albedo#0", "apollo#0")}
    u1, u2 = make_units_dir(tmp_path / "u1", a), make_units_dir(tmp_path / "u2", b)
    rows = GOOD_QUERIES + [("apollo#0", 4, "anarchism, rejects hierarchy, political philosophy")]  # dup of anarchism#0/0
    shuffled = list(rows)
    random.Random(1).shuffle(shuffled)
    r1 = make_rewrite_dir(tmp_path / "r1", DOCS, rows)
    r2 = make_rewrite_dir(tmp_path / "r2", DOCS, shuffled)
    o1 = dedup(r1, [u1, u2], DedupConfig(), tmp_path / "w1")
    o2 = dedup(r2, [u2, u1], DedupConfig(), tmp_path / "w2")
    assert _frame(o1, "queries.parquet").equals(_frame(o2, "queries.parquet"))
    assert _frame(o1, "dropped.parquet")["duplicate_of"].to_list() == ["anarchism#0#0"]


def test_rerun_does_no_work_and_missing_input_is_named(tmp_path):
    units = make_units_dir(tmp_path / "units", DOCS)
    rewrite = make_rewrite_dir(tmp_path / "rewrite", DOCS, GOOD_QUERIES)
    out = dedup(rewrite, units, DedupConfig(), tmp_path / "work")
    mtime = (out / "queries.parquet").stat().st_mtime_ns
    assert dedup.output_dir(rewrite, units, DedupConfig(), tmp_path / "work") == out
    assert dedup(rewrite, units, DedupConfig(), tmp_path / "work") == out
    assert (out / "queries.parquet").stat().st_mtime_ns == mtime
    # A query whose document is absent is bad input, not a silent drop.
    other = make_units_dir(tmp_path / "other", {k: DOCS[k] for k in ("autism#0",)})
    with pytest.raises(PipelineInputError, match="not in documents.parquet"):
        dedup(rewrite, other, DedupConfig(), tmp_path / "work")
    with pytest.raises(PipelineInputError, match="queries.parquet"):
        dedup(tmp_path / "nowhere", units, DedupConfig(), tmp_path / "work2")


def test_task_cache_key_needs_a_finished_output(tmp_path):
    from tasks.dedup import dedup_task

    units = make_units_dir(tmp_path / "units", DOCS)
    rewrite = make_rewrite_dir(tmp_path / "rewrite", DOCS, GOOD_QUERIES)
    params = {"rewrite_dir": rewrite, "units_dirs": [units], "config": DedupConfig(), "work_dir": tmp_path / "work"}
    assert dedup_task.name == "dedup"
    assert dedup_task.cache_key_fn(None, params) is None  # nothing on disk: no cache lookup
    out = dedup_task.fn(**params)
    key = dedup_task.cache_key_fn(None, params)
    assert key and key == dedup_task.cache_key_fn(None, params)
    (out / "_SUCCESS.json").unlink()
    assert dedup_task.cache_key_fn(None, params) is None
