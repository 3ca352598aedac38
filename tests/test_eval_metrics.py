"""Metrics against values worked out by hand on tiny rankings."""

from __future__ import annotations

import pytest

from tasks.evaluate.metrics import (
    exact_match,
    metric_names,
    normalize_answer,
    qa_scores,
    ranking_metrics,
    rouge_scores,
    token_f1,
)

QRELS = {"q1": {"d1": 1}, "q2": {"d2": 1, "d3": 1}, "q3": {"d9": 1}, "q4": {"d1": 1}}
RANKINGS = {
    "q1": ["d4", "d1", "d5"],  # hit at rank 2
    "q2": ["d2", "d7", "d3", "d8"],  # hits at ranks 1 and 3 of two relevant
    "q3": ["d1", "d2"],  # no hit
    # q4: no results at all -> counts as zero, not skipped
    "q5": ["d1"],  # not judged -> ignored
}


def test_ranking_metrics_match_hand_computed_values():
    m = ranking_metrics(QRELS, RANKINGS, ks=[1, 3])
    assert list(m) == ["recall@1", "recall@3", "map@1", "map@3"]
    # recall@1: q2 finds 1 of 2 -> (0 + 0.5 + 0 + 0) / 4
    assert m["recall@1"] == pytest.approx(0.125)
    # recall@3: q1 1, q2 1 -> 2 / 4
    assert m["recall@3"] == pytest.approx(0.5)
    # AP@1: q2 = (1/1) / 2 relevant = 0.5 -> 0.5 / 4
    assert m["map@1"] == pytest.approx(0.125)
    # AP@3: q1 = 1/2; q2 = (1/1 + 2/3) / 2 = 5/6 -> (1/2 + 5/6) / 4
    assert m["map@3"] == pytest.approx((0.5 + 5 / 6) / 4)


def test_ranking_metrics_keep_the_given_order_and_drop_repeats():
    # d1 listed twice: its first position counts, the repeat does not push d2 down.
    m = ranking_metrics({"q": {"d2": 1}}, {"q": ["d1", "d1", "d2"]}, ks=[2])
    assert m["recall@2"] == 1.0 and m["map@2"] == pytest.approx(0.5)


def test_ranking_metrics_ignore_non_positive_judgements_and_need_one():
    m = ranking_metrics({"q": {"d1": 0, "d2": 1}}, {"q": ["d1", "d2"]}, ks=[1])
    assert m == {"recall@1": 0.0, "map@1": 0.0}
    with pytest.raises(ValueError, match="no query has a relevant item"):
        ranking_metrics({"q": {"d1": 0}}, {"q": ["d1"]}, ks=[1])


def test_metric_names_sorted_recall_then_map():
    assert metric_names([10, 1, 5, 3, 3]) == [
        "recall@1", "recall@3", "recall@5", "recall@10", "map@1", "map@3", "map@5", "map@10",
    ]


def test_squad_normalisation_em_and_f1():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("the Eiffel Tower.", ["Eiffel tower", "Paris"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel tower"]) == 0.0
    # pred {cat, sat}, gold {cat, sat, down}: P = 1, R = 2/3, F1 = 0.8
    assert token_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert token_f1("the cat sat", ["dog", "a cat sat down"]) == pytest.approx(0.8)  # best gold
    assert token_f1("nothing", ["cat"]) == 0.0
    scores = qa_scores(["the cat sat", "Paris"], [["a cat sat down"], ["paris"]])
    assert scores == {"em": pytest.approx(50.0), "f1": pytest.approx(90.0)}


def test_rouge_f_in_percent():
    # 3 of the reference's 6 tokens, all 3 predicted tokens match: P 1, R 0.5, F 2/3;
    # the LCS is those same 3 tokens.
    s = rouge_scores(["the cat sat"], ["the cat sat on the mat"])
    assert s["rouge1"] == pytest.approx(200 / 3)
    assert s["rougeL"] == pytest.approx(200 / 3)
    # word order matters to ROUGE-L only
    s = rouge_scores(["mat the on sat cat the"], ["the cat sat on the mat"])
    assert s["rouge1"] == pytest.approx(100.0)
    assert s["rougeL"] < 100.0
    with pytest.raises(ValueError):
        rouge_scores(["a"], [])


def test_per_query_metrics_equal_ranx_evaluate_on_random_rankings():
    """The padded-array path gives what ranx's Qrels/Run/evaluate give, query by query."""
    import random

    from ranx import Qrels, Run, evaluate

    from tasks.evaluate.metrics import per_query_ranking_metrics

    rng = random.Random(7)
    docs = [f"d{i}" for i in range(30)]
    qrels = {f"q{i}": {d: rng.choice([1, 2]) for d in rng.sample(docs, rng.randint(1, 4))} for i in range(40)}
    rankings = {q: rng.sample(docs, rng.randint(0, 12)) for q in qrels}
    ks = [1, 3, 5, 10]
    qids, ours = per_query_ranking_metrics(qrels, rankings, ks)
    run = Run({q: {d: float(len(r) - i) for i, d in enumerate(r)} or {"\x00none": 0.0} for q, r in rankings.items()})
    evaluate(Qrels(qrels), run, metric_names(ks), make_comparable=True, return_mean=False, save_results_in_run=True)
    for name in metric_names(ks):
        assert ours[name] == pytest.approx([run.scores[name][q] for q in qids]), name
