"""Unit localisation (Table 2): rank a document's sentences for a query.

GeAR ranks them by the fusion encoder's cross-attention at one layer
(``GearModel.localize``; the paper uses layer 10 of 12). The pooling, which
``token_weights`` / ``sentence_scores`` mirror for tests and the Figure 3
page, is:

- heads: mean;
- query tokens: mean over the query's word tokens ([CLS]/[SEP] left out),
  which leaves one weight per document token, a distribution over the
  document;
- sentence tokens: sum of the weights of the tokens that start inside the
  sentence's character span, i.e. the attention mass the query puts on the
  sentence (tokens past the truncation limit count 0).

Baselines: sentence embeddings against the query embedding (a dense
encoder), or BM25 over the document's sentences.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from tasks.evaluate.loaders import EvalQuery, EvalSet
from tasks.evaluate.metrics import metric_names, per_query_ranking_metrics
from tasks.evaluate.stats import BOOTSTRAP_RESAMPLES, random_ranking_expectation, summarize

POOLING_DESCRIPTION = (
    "cross-attention of the chosen fusion layer, averaged over heads, then over the query's word tokens "
    "([CLS]/[SEP] excluded); a sentence scores the sum of the weights of the document tokens that start "
    "inside it (the attention mass on the sentence)"
)
MEAN_POOLING_DESCRIPTION = POOLING_DESCRIPTION.replace(
    "the sum of the weights", "the mean of the weights"
).replace("(the attention mass on the sentence)", "(attention mass per token, so long sentences gain nothing by length)")


def pooling_description(pooling: str) -> str:
    return MEAN_POOLING_DESCRIPTION if pooling == "mean" else POOLING_DESCRIPTION

Scorer = Callable[[EvalQuery, str, list[tuple[int, int]]], np.ndarray]


def token_weights(weights: np.ndarray, query_mask: np.ndarray | None = None) -> np.ndarray:
    """(heads, Lq, Ld) attention -> (Ld,) weight per document token."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 3:
        raise ValueError(f"expected (heads, query_tokens, doc_tokens) weights, got shape {weights.shape}")
    per_query_token = weights.mean(0)
    if query_mask is not None and np.any(query_mask):
        per_query_token = per_query_token[np.asarray(query_mask, dtype=bool)]
    return per_query_token.mean(0)


def sentence_scores(
    per_token: np.ndarray, offsets: np.ndarray, sentence_spans: Sequence[tuple[int, int]]
) -> np.ndarray:
    """Sum of token weights per sentence; a token belongs where it starts.
    Special tokens have the empty offset (0, 0) and belong nowhere."""
    offsets = np.asarray(offsets)
    starts, ends = offsets[:, 0], offsets[:, 1]
    real = ends > starts
    out = np.zeros(len(sentence_spans), dtype=np.float64)
    for i, (start, end) in enumerate(sentence_spans):
        out[i] = per_token[real & (starts >= start) & (starts < end)].sum()
    return out


def rank_sentences(scores: np.ndarray) -> list[str]:
    """Sentence indices (as ranx ids) best first; ties keep document order."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return [str(i) for i in order]


def evaluate_localization(
    eval_set: EvalSet, scorer: Scorer, ks: Sequence[int], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict:
    """Recall@k / MAP@k of the true unit among its document's sentences, per
    query and averaged, with bootstrap intervals."""
    queries = eval_set.unit_queries()
    if not queries:
        return {"metrics": None, "n_queries": 0}
    rankings, qrels = {}, {}
    t0 = time.perf_counter()
    for q in queries:
        spans = eval_set.sentence_spans[q.doc_id]
        scores = scorer(q, eval_set.documents[q.doc_id], spans)
        if len(scores) != len(spans):
            raise ValueError(f"scorer returned {len(scores)} scores for {len(spans)} sentences (query {q.qid})")
        rankings[q.qid] = rank_sentences(scores)
        qrels[q.qid] = {str(q.unit_index): 1}
    elapsed = time.perf_counter() - t0
    qids, per_query = per_query_ranking_metrics(qrels, rankings, ks)
    return {
        **summarize(qids, per_query, resamples, seed),
        "n_queries": len(queries),
        "timing": {"queries_s": elapsed, "queries_per_s": len(queries) / elapsed if elapsed > 0 else float("inf")},
    }


def random_localization(
    eval_set: EvalSet, ks: Sequence[int], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict | None:
    """Expected scores of a uniformly random sentence order, per query (its
    document's sentence count n: R@k = min(k, n)/n, AP@k = H_min(k,n)/n)."""
    queries = eval_set.unit_queries()
    if not queries:
        return None
    expected = [random_ranking_expectation(len(eval_set.sentence_spans[q.doc_id]), 1, ks) for q in queries]
    per_query = {name: [e[name] for e in expected] for name in expected[0]}
    return summarize([q.qid for q in queries], per_query, resamples, seed)


def unit_rule_prior(
    eval_set: EvalSet, ks: Sequence[int], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict | None:
    """Expected scores of a ranking that never reads the query: the document's
    sentences that pass the paper's unit rules (8-20 tokens, no pronoun first
    word or subject: ``select_units.unit_rule_reasons``) first, in random
    order, then the others in random order. RIR units pass those rules by
    construction, so a model can score this far above the random row by
    learning the rules alone; a learned figure means something above it."""
    from tasks.select_units import unit_rule_reasons

    queries = eval_set.unit_queries()
    if not queries:
        return None
    doc_ids = sorted({q.doc_id for q in queries})
    texts = [eval_set.documents[d][s:e] for d in doc_ids for s, e in eval_set.sentence_spans[d]]
    reasons = iter(unit_rule_reasons(texts))
    passes = {d: [next(reasons) is None for _ in eval_set.sentence_spans[d]] for d in doc_ids}
    per_query: dict[str, list[float]] = {}
    for q in queries:
        flags = passes[q.doc_id]
        n_pass = sum(flags)
        # The unit's rank is uniform over its block: 1..n_pass if it passes, else n_pass+1..n.
        first, size = (0, n_pass) if flags[q.unit_index] else (n_pass, len(flags) - n_pass)
        for k in sorted(set(ks)):
            top = max(0, min(k, first + size) - first)
            per_query.setdefault(f"recall@{k}", []).append(top / size)
            per_query.setdefault(f"map@{k}", []).append(sum(1.0 / r for r in range(first + 1, first + top + 1)) / size)
    ordered = {name: per_query[name] for name in metric_names(ks)}
    return summarize([q.qid for q in queries], ordered, resamples, seed)


# --------------------------------------------------------------------------
# Scorers.


def gear_layer_scores(
    model, eval_set: EvalSet, pooling: str = "sum"
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Every fusion layer's sentence scores per query, (n_layers, n_sentences),
    and the attention lift on each query's unit per layer, (n_layers,)
    (``gear_model.diagnostics.attention_lift``): one forward pass per
    document for all its queries and layers."""
    from gear_model.diagnostics import attention_lift
    from gear_model.model import pool_sentences, sentence_membership

    by_doc: dict[str, list[EvalQuery]] = {}
    for q in eval_set.unit_queries():
        by_doc.setdefault(q.doc_id, []).append(q)
    scores_out: dict[str, np.ndarray] = {}
    lifts: dict[str, np.ndarray] = {}
    for doc_id, queries in by_doc.items():
        spans = eval_set.sentence_spans[doc_id]
        weights, offsets = model.doc_token_weights(
            [q.query for q in queries], eval_set.documents[doc_id], all_layers=True
        )
        scores = pool_sentences(weights, sentence_membership(offsets, spans), pooling)
        for q, w, row_scores in zip(queries, weights, scores, strict=True):
            scores_out[q.qid] = row_scores
            lifts[q.qid] = attention_lift(w, offsets, spans[q.unit_index])
    return scores_out, lifts


def precomputed_scorer(scores: dict[str, np.ndarray], layer: int) -> Scorer:
    """Scores of ``gear_layer_scores`` at one 1-based layer, as a scorer."""

    def score(q: EvalQuery, document: str, spans: list[tuple[int, int]]) -> np.ndarray:
        return scores[q.qid][layer - 1]

    return score


def gear_scorer(model, layer: int | None, pooling: str = "sum") -> Scorer:
    def score(q: EvalQuery, document: str, spans: list[tuple[int, int]]) -> np.ndarray:
        return model.localize(q.query, document, spans, layer, pooling=pooling)

    return score


def embedding_scorer(encoder, batch_size: int = 64, eval_set: EvalSet | None = None) -> Scorer:
    """Sentences through the document encoder, the query through the query encoder; cosine.

    Given ``eval_set``, the first call encodes the sentences of all its unit
    queries' documents, and the queries, in one pass each: batches of similar
    lengths from the whole set, not one padded batch per document (and the
    time counts in the localisation's queries/s)."""

    def spans_key(document: str, spans) -> tuple:
        return document, tuple(map(tuple, spans))

    # A document's sentences are encoded once for all the queries about it.
    sentence_vectors: dict[tuple[str, tuple[tuple[int, int], ...]], np.ndarray] = {}
    query_vectors: dict[str, np.ndarray] = {}

    def encode_set() -> None:
        queries = eval_set.unit_queries()
        keys = list(dict.fromkeys(spans_key(eval_set.documents[q.doc_id], eval_set.sentence_spans[q.doc_id])
                                  for q in queries))
        sentences = [document[a:b] for document, spans in keys for a, b in spans]
        vectors = encoder.encode_documents(sentences, batch_size=batch_size) if sentences else None
        start = 0
        for key in keys:
            sentence_vectors[key] = vectors[start : start + len(key[1])]
            start += len(key[1])
        texts = list(dict.fromkeys(q.query for q in queries))
        if texts:
            query_vectors.update(zip(texts, encoder.encode_queries(texts, batch_size=batch_size)))

    def score(q: EvalQuery, document: str, spans: list[tuple[int, int]]) -> np.ndarray:
        nonlocal eval_set
        if eval_set is not None:
            encode_set()
            eval_set = None
        key = spans_key(document, spans)
        if key not in sentence_vectors:
            sentence_vectors[key] = encoder.encode_documents([document[s:e] for s, e in spans], batch_size=batch_size)
        if q.query not in query_vectors:
            query_vectors[q.query] = encoder.encode_queries([q.query], batch_size=1)[0]
        return sentence_vectors[key] @ query_vectors[q.query]

    return score


def bm25_scorer() -> Scorer:
    """BM25 over the document's own sentences (IDF from that document)."""
    from tasks.evaluate.retrieval import bm25_index, bm25_search

    def score(q: EvalQuery, document: str, spans: list[tuple[int, int]]) -> np.ndarray:
        sents = [document[s:e] for s, e in spans]
        out = np.zeros(len(sents), dtype=np.float64)
        hits = bm25_search(bm25_index(sents), [q.query], len(sents))[0]
        for rank, i in enumerate(hits):
            out[i] = len(sents) - rank  # keep BM25's order; non-matching sentences stay at 0
        return out

    return score
