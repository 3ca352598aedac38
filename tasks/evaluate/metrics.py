"""Metrics of the paper's three tables.

Ranking metrics (Tables 1 and 2) come from ranx, not from our own loops;
this module only turns ordered result lists into ranx's Qrels/Run. Text
metrics (Table 3): ROUGE-1/ROUGE-L F from rouge-score for RIR, and the
official SQuAD v1.1 exact match / token F1 for QA sets.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable, Mapping, Sequence

DEFAULT_KS: tuple[int, ...] = (1, 3, 5, 10)


def metric_names(ks: Iterable[int]) -> list[str]:
    """ranx metric names in report column order: all recalls, then all MAPs."""
    ks = sorted(set(ks))
    return [f"recall@{k}" for k in ks] + [f"map@{k}" for k in ks]


def ranking_metrics(
    qrels: Mapping[str, Mapping[str, int]],
    rankings: Mapping[str, Sequence[str]],
    ks: Iterable[int] = DEFAULT_KS,
) -> dict[str, float]:
    """Recall@k and MAP@k, averaged over the queries of ``qrels`` (see
    ``per_query_ranking_metrics``)."""
    _, per_query = per_query_ranking_metrics(qrels, rankings, ks)
    return {name: float(sum(v) / len(v)) for name, v in per_query.items()}


def per_query_ranking_metrics(
    qrels: Mapping[str, Mapping[str, int]],
    rankings: Mapping[str, Sequence[str]],
    ks: Iterable[int] = DEFAULT_KS,
) -> tuple[list[str], dict[str, list[float]]]:
    """Each judged query's Recall@k and AP@k: (query ids, metric -> values in that order).

    ``rankings`` maps a query id to its result ids, best first. Scores given
    to ranx are derived from the rank, so ranx keeps exactly our order (ties
    in raw scores were already broken by the caller). A query of ``qrels``
    with no results counts as all-zero. ranx's AP@k divides by the number of
    relevant items (with one relevant item, MAP@k is MRR@k). Queries without
    a positive judgement are left out.

    The figures come from ranx's own metric kernels, given padded arrays:
    its Qrels/Run dictionaries are numba typed containers whose methods
    compile in every new process (seconds), while the kernels are compiled
    once and cached on disk.
    """
    import numpy as np
    from ranx.metrics import average_precision, recall

    qrels = {q: {d: int(r) for d, r in rels.items() if int(r) > 0} for q, rels in qrels.items()}
    qrels = {q: rels for q, rels in qrels.items() if rels}
    if not qrels:
        raise ValueError("no query has a relevant item: nothing to evaluate")
    qids = list(qrels)
    ranked = [list(dict.fromkeys(rankings.get(q, ()))) for q in qids]  # drop repeats, keep first
    # ranx's metric kernels read each query as rows of (numeric id, score), the run's
    # rows best first. Padding rows carry id -1, which no judged item has, and
    # relevance 0, which the kernels drop from the judgements.
    ids: dict[str, int] = {}
    judged = np.zeros((len(qids), max(map(len, qrels.values())), 2))
    judged[:, :, 0] = -1.0
    results = np.zeros((len(qids), max(1, max(map(len, ranked))), 2))
    results[:, :, 0] = -1.0
    for i, (q, docs) in enumerate(zip(qids, ranked)):
        for j, (d, r) in enumerate(qrels[q].items()):
            judged[i, j] = (ids.setdefault(d, len(ids)), r)
        for j, d in enumerate(docs):
            results[i, j] = (ids.setdefault(d, len(ids)), len(docs) - j)
    ks = sorted(set(ks))
    per_query = {f"recall@{k}": recall(judged, results, k) for k in ks}
    per_query |= {f"map@{k}": average_precision(judged, results, k) for k in ks}
    return qids, {name: [float(v) for v in per_query[name]] for name in metric_names(ks)}


# --------------------------------------------------------------------------
# SQuAD v1.1 answer normalisation, exact match and token F1.

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and English articles, squeeze spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer."""
    if not answers:
        raise ValueError("exact_match needs at least one gold answer")
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """Best bag-of-tokens F1 against the gold answers, as in the SQuAD script."""
    if not answers:
        raise ValueError("token_f1 needs at least one gold answer")
    pred_tokens = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold_tokens = normalize_answer(answer).split()
        if not pred_tokens or not gold_tokens:
            best = max(best, float(pred_tokens == gold_tokens))
            continue
        common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
        same = sum(common.values())
        if same == 0:
            continue
        precision = same / len(pred_tokens)
        recall = same / len(gold_tokens)
        best = max(best, 2 * precision * recall / (precision + recall))
    return best


def qa_per_query(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """Each prediction's EM and F1 in percent."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answer lists")
    return {
        "em": [100.0 * exact_match(p, a) for p, a in zip(predictions, answers)],
        "f1": [100.0 * token_f1(p, a) for p, a in zip(predictions, answers)],
    }


def qa_scores(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean EM and F1 in percent (the paper's Table 3 scale)."""
    return _means(qa_per_query(predictions, answers))


def rouge_per_query(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """Each prediction's ROUGE-1 and ROUGE-L F-measure in percent (Porter stemming on)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    out: dict[str, list[float]] = {"rouge1": [], "rougeL": []}
    for pred, ref in zip(predictions, references):
        result = scorer.score(ref, pred)  # score(target, prediction)
        for name in out:
            out[name].append(100.0 * result[name].fmeasure)
    return out


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1 and ROUGE-L F-measure in percent."""
    return _means(rouge_per_query(predictions, references))


def _means(per_query: dict[str, list[float]]) -> dict[str, float]:
    return {name: (sum(v) / len(v) if v else 0.0) for name, v in per_query.items()}
