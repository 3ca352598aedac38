"""FAISS indexes, BM25 and the baseline encoder backends."""

from __future__ import annotations

import numpy as np
import pytest

from eval_helpers import tiny_gear_dir  # noqa: F401 - fixture

from tasks.evaluate.loaders import EvalQuery, EvalSet
from tasks.evaluate.retrieval import build_index, evaluate_retrieval


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_hnsw_finds_what_the_exact_index_finds_on_a_small_corpus():
    rng = np.random.default_rng(0)
    docs, queries = _unit(rng.normal(size=(500, 16))), _unit(rng.normal(size=(20, 16)))
    _, exact = build_index(docs, "exact").search(queries, 5)
    _, approx = build_index(docs, "hnsw").search(queries, 5)
    assert (exact[:, 0] == approx[:, 0]).mean() >= 0.95
    with pytest.raises(ValueError, match="unknown index type"):
        build_index(docs, "ivf")


class _KeywordEncoder:
    """A constructed encoder: one dimension per keyword, so the ranking is known."""

    WORDS = ["alps", "nile", "jazz"]

    def _encode(self, texts, batch_size=32):
        rows = np.array([[t.lower().count(w) + 1e-3 * (i + 1) for i, w in enumerate(self.WORDS)] for t in texts])
        return _unit(rows)

    encode_queries = encode_documents = _encode


def _set() -> EvalSet:
    docs = {"a": "The Alps. Alps again.", "n": "The Nile.", "j": "Jazz and the Nile."}
    queries = [EvalQuery("q1", "nile", {"n": 1}), EvalQuery("q2", "jazz", {"j": 1}), EvalQuery("q3", "alps", {"a": 1})]
    return EvalSet("s", "beir", "mem", docs, queries)


@pytest.mark.parametrize("index_type", ["exact", "hnsw"])
def test_dense_retrieval_metrics(index_type):
    r = evaluate_retrieval(_set(), [1, 3], _KeywordEncoder(), index_type)
    assert r["metrics"] == {"recall@1": 1.0, "recall@3": 1.0, "map@1": 1.0, "map@3": 1.0}
    assert r["n_documents"] == 3 and r["timing"]["queries_per_s"] > 0


def test_bm25_retrieval_metrics():
    # "nile": n (short doc) beats j; "jazz": j; "alps": a.
    r = evaluate_retrieval(_set(), [1], encoder=None)
    assert r["metrics"] == {"recall@1": 1.0, "map@1": 1.0}


def test_flagembedding_backend_matches_plain_transformers_mean_pooling():
    from tasks.assets import embedded_encoder_path
    from tasks.evaluate.baselines import PretrainedEncoder

    texts = ["The cat sat on the mat.", "Mont Blanc is the highest peak of the Alps."]
    plain = PretrainedEncoder(embedded_encoder_path())
    flag = PretrainedEncoder(embedded_encoder_path(), backend="flagembedding")
    a, b = plain.encode_documents(texts), flag.encode_documents(texts)
    assert a.shape == (2, 384) and np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="pooling must be"):
        PretrainedEncoder(embedded_encoder_path(), pooling="max")


class _CountingEncoder(_KeywordEncoder):
    """The keyword encoder with a document-encoder fingerprint, counting its document passes."""

    def __init__(self, fingerprint: str):
        self.fingerprint, self.document_passes = fingerprint, 0

    def document_encoder_fingerprint(self) -> str:
        return self.fingerprint

    def encode_documents(self, texts, batch_size=32):
        self.document_passes += 1
        return self._encode(texts, batch_size)


def test_systems_that_share_a_document_encoder_embed_the_corpus_once():
    first, same, other = _CountingEncoder("frozen-e-d"), _CountingEncoder("frozen-e-d"), _CountingEncoder("trained-e-d")
    results = [evaluate_retrieval(_set(), [1, 3], e) for e in (first, same, other)]
    assert [e.document_passes for e in (first, same, other)] == [1, 0, 1]
    assert results[0]["metrics"] == results[1]["metrics"] == results[2]["metrics"]


def test_gear_document_fingerprint_follows_the_document_encoder(tiny_gear_dir):
    import torch

    from gear_model import GearModel

    a, b = GearModel.from_pretrained(tiny_gear_dir), GearModel.from_pretrained(tiny_gear_dir)
    assert a.document_encoder_fingerprint() == b.document_encoder_fingerprint()
    with torch.no_grad():  # E_q changes nothing a document vector depends on; E_d does
        next(b.query_encoder.parameters()).add_(1.0)
        assert a.document_encoder_fingerprint() == b.document_encoder_fingerprint()
        next(b.doc_encoder.parameters()).add_(1.0)
    assert a.document_encoder_fingerprint() != b.document_encoder_fingerprint()
