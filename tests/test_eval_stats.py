"""Bootstrap intervals and the closed-form random-ranking expectation."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.evaluate.metrics import per_query_ranking_metrics, ranking_metrics
from tasks.evaluate.stats import bootstrap_ci, random_ranking_expectation, summarize


def test_interval_contains_the_mean_and_is_reproducible():
    values = np.random.default_rng(0).binomial(1, 0.4, size=60).astype(float)
    ci = bootstrap_ci({"recall@3": values}, resamples=1000, seed=7)["recall@3"]
    assert ci[0] < values.mean() < ci[1]
    assert bootstrap_ci({"recall@3": values}, resamples=1000, seed=7)["recall@3"] == ci  # seeded
    assert bootstrap_ci({"recall@3": values}, resamples=1000, seed=8)["recall@3"] != ci
    # a 95% interval of a Bernoulli mean at n = 60 is about +-1.96 * sqrt(p(1-p)/n) wide
    half = 1.96 * np.sqrt(values.mean() * (1 - values.mean()) / len(values))
    assert (ci[1] - ci[0]) / 2 == pytest.approx(half, rel=0.2)


def test_interval_narrows_with_more_queries():
    rng = np.random.default_rng(1)
    widths = []
    for n in (20, 200, 2000):
        lo, hi = bootstrap_ci({"m": rng.binomial(1, 0.3, size=n).astype(float)}, seed=0)["m"]
        widths.append(hi - lo)
    assert widths[0] > 2 * widths[1] > 4 * widths[2] > 0  # ~1/sqrt(n): each 10x more queries ~3.2x narrower


def test_metrics_share_resamples_and_degenerate_inputs():
    values = np.random.default_rng(2).random(30)
    both = bootstrap_ci({"a": values, "b": values}, resamples=300, seed=0)
    assert both["a"] == both["b"]  # paired: the same query resamples for every metric
    assert bootstrap_ci({"a": [0.5]}, seed=0)["a"] == [0.5, 0.5]
    assert bootstrap_ci({"a": []}, seed=0) == {"a": None}
    s = summarize(["x", "y"], {"a": [0.0, 1.0]}, resamples=200)
    assert s["metrics"] == {"a": 0.5} and s["per_query"] == {"qids": ["x", "y"], "a": [0.0, 1.0]}


def test_random_expectation_hand_values():
    # one relevant among 4: R@k = min(k, 4)/4, AP@k = H_min(k,4)/4
    e = random_ranking_expectation(4, 1, [1, 2, 10])
    assert list(e) == ["recall@1", "recall@2", "recall@10", "map@1", "map@2", "map@10"]
    assert e["recall@1"] == 0.25 and e["recall@2"] == 0.5 and e["recall@10"] == 1.0
    assert e["map@2"] == pytest.approx(1.5 / 4) and e["map@10"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    # two relevant among 3, AP@2 (divided by 2 relevant) of the 3 equally likely orders:
    # RRN (1/1 + 2/2)/2 = 1, RNR (1/1)/2 = 1/2, NRR (1/2)/2 = 1/4 -> mean 7/12
    assert random_ranking_expectation(3, 2, [2])["map@2"] == pytest.approx(7 / 12)
    assert random_ranking_expectation(1, 1, [5]) == {"recall@5": 1.0, "map@5": 1.0}
    with pytest.raises(ValueError):
        random_ranking_expectation(3, 4, [1])


def test_random_expectation_matches_ranx_on_random_orders():
    """Many queries with 2 relevant of 7 documents, each ranked by a random permutation, scored by ranx."""
    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(7)]
    qrels = {f"q{i}": {"d0": 1, "d3": 1} for i in range(4000)}
    rankings = {q: list(rng.permutation(docs)) for q in qrels}
    measured = ranking_metrics(qrels, rankings, [1, 3, 5])
    expected = random_ranking_expectation(7, 2, [1, 3, 5])
    for name in expected:
        assert measured[name] == pytest.approx(expected[name], abs=0.02), name


def test_per_query_values_follow_the_qrels_order():
    qrels = {"z": {"d1": 1}, "a": {"d2": 1}, "m": {"d3": 1}}
    rankings = {"z": ["d1"], "a": ["d1", "d2"], "m": ["d9"]}
    qids, per_query = per_query_ranking_metrics(qrels, rankings, [1, 2])
    assert qids == ["z", "a", "m"]  # ours, not ranx's sorted order
    assert per_query["recall@1"] == [1.0, 0.0, 0.0]
    assert per_query["map@2"] == [1.0, 0.5, 0.0]
