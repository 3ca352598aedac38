"""Document retrieval (Table 1): dense search with FAISS, or BM25.

Dense: the corpus goes through E_d (``encode_documents``), queries through
E_q (``encode_queries``); both are L2-normalised, so inner product is
cosine. ``IndexFlatIP`` is exact; ``hnsw`` (IndexHNSWFlat, inner-product
metric) is the approximate option for corpora too big to scan per query.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from tasks.evaluate.loaders import EvalSet
from tasks.evaluate.metrics import metric_names, per_query_ranking_metrics
from tasks.evaluate.stats import BOOTSTRAP_RESAMPLES, random_ranking_expectation, summarize

HNSW_M = 32  # graph degree; with efSearch 128 recall@10 stays near exact on 1M vectors
HNSW_EF_SEARCH = 128
HNSW_EF_CONSTRUCTION = 200


class Encoder(Protocol):
    def encode_queries(self, texts: Sequence[str], batch_size: int = ...) -> np.ndarray: ...
    def encode_documents(self, texts: Sequence[str], batch_size: int = ...) -> np.ndarray: ...


def build_index(vectors: np.ndarray, index_type: str = "exact"):
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    dim = vectors.shape[1]
    if index_type == "exact":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    else:
        raise ValueError(f"unknown index type {index_type!r} (exact or hnsw)")
    index.add(vectors)
    return index


# Document vectors of the last few (encoder fingerprint, corpus) pairs: systems
# that share a document encoder (a frozen E_d) embed a corpus once per process.
_DOCUMENT_VECTORS: dict[tuple[str, str, int], np.ndarray] = {}
_DOCUMENT_VECTORS_KEPT = 4


def document_vectors(encoder: Encoder, texts: list[str], batch_size: int) -> np.ndarray:
    """``encoder.encode_documents(texts)``, reused when an encoder with the same
    ``document_encoder_fingerprint`` has embedded the same texts before."""
    fingerprint = getattr(encoder, "document_encoder_fingerprint", None)
    if fingerprint is None:
        return encoder.encode_documents(texts, batch_size=batch_size)
    import hashlib

    corpus = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    key = (fingerprint(), corpus, batch_size)
    if key not in _DOCUMENT_VECTORS:
        while len(_DOCUMENT_VECTORS) >= _DOCUMENT_VECTORS_KEPT:
            _DOCUMENT_VECTORS.pop(next(iter(_DOCUMENT_VECTORS)))
        _DOCUMENT_VECTORS[key] = encoder.encode_documents(texts, batch_size=batch_size)
    return _DOCUMENT_VECTORS[key]


def dense_rankings(
    encoder: Encoder,
    eval_set: EvalSet,
    depth: int,
    index_type: str = "exact",
    batch_size: int = 32,
) -> tuple[dict[str, list[str]], dict[str, float]]:
    """Top-``depth`` doc ids per query, and timings in seconds."""
    doc_ids = list(eval_set.documents)
    t0 = time.perf_counter()
    doc_vecs = document_vectors(encoder, [eval_set.documents[d] for d in doc_ids], batch_size)
    t1 = time.perf_counter()
    index = build_index(doc_vecs, index_type)
    t2 = time.perf_counter()
    query_vecs = encoder.encode_queries([q.query for q in eval_set.queries], batch_size=batch_size)
    _, idx = index.search(np.ascontiguousarray(query_vecs, dtype=np.float32), min(depth, len(doc_ids)))
    t3 = time.perf_counter()
    rankings = {q.qid: [doc_ids[i] for i in row if i >= 0] for q, row in zip(eval_set.queries, idx)}
    return rankings, {"encode_documents_s": t1 - t0, "index_s": t2 - t1, "queries_s": t3 - t2}


def bm25_rankings(eval_set: EvalSet, depth: int) -> tuple[dict[str, list[str]], dict[str, float]]:
    """BM25 (bm25s, Lucene variant, English stop words) over the whole corpus."""
    doc_ids = list(eval_set.documents)
    t0 = time.perf_counter()
    retriever = bm25_index([eval_set.documents[d] for d in doc_ids])
    t1 = time.perf_counter()
    hits = bm25_search(retriever, [q.query for q in eval_set.queries], min(depth, len(doc_ids)))
    t2 = time.perf_counter()
    rankings = {q.qid: [doc_ids[i] for i in row] for q, row in zip(eval_set.queries, hits)}
    return rankings, {"index_s": t1 - t0, "queries_s": t2 - t1}


def bm25_index(texts: Sequence[str]):
    import bm25s

    # bm25s logs every index build at DEBUG; localisation builds one per query.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False)
    return retriever


def bm25_search(retriever, queries: Sequence[str], k: int) -> list[list[int]]:
    """Ranked corpus positions per query; a query with no known term ranks nothing."""
    import bm25s

    tokens = bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
    docs, scores = retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
    # bm25s pads with arbitrary zero-score documents: only positive scores are hits.
    return [[int(d) for d, s in zip(drow, srow) if s > 0] for drow, srow in zip(docs, scores)]


def evaluate_retrieval(
    eval_set: EvalSet,
    ks: Sequence[int],
    encoder: Encoder | None = None,
    index_type: str = "exact",
    batch_size: int = 32,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> dict:
    """Recall@k / MAP@k of a dense encoder, or of BM25 when ``encoder`` is None,
    per query and averaged with bootstrap intervals."""
    depth = max(ks)
    if encoder is None:
        rankings, timing = bm25_rankings(eval_set, depth)
    else:
        rankings, timing = dense_rankings(encoder, eval_set, depth, index_type, batch_size)
    qids, per_query = per_query_ranking_metrics(eval_set.qrels(), rankings, ks)
    n = len(eval_set.queries)
    timing["queries_per_s"] = n / timing["queries_s"] if timing["queries_s"] > 0 else float("inf")
    return {
        **summarize(qids, per_query, resamples, seed),
        "n_queries": n,
        "n_documents": len(eval_set.documents),
        "timing": timing,
    }


def random_retrieval(eval_set: EvalSet, ks: Sequence[int], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Expected scores of a uniformly random ordering of the whole corpus, per
    judged query (R relevant of N documents: recall@k = min(k, N)/N)."""
    n_docs = len(eval_set.documents)
    qids, expected = [], []
    for q in eval_set.queries:
        n_relevant = sum(1 for r in q.relevant.values() if r > 0)
        if n_relevant:  # the queries ranx scores: those with a positive judgement
            qids.append(q.qid)
            expected.append(random_ranking_expectation(n_docs, n_relevant, ks))
    per_query = {name: [e[name] for e in expected] for name in metric_names(ks)}
    return summarize(qids, per_query, resamples, seed)
