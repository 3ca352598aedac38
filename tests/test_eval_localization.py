"""Localisation pooling on constructed attention, and agreement with GearModel.localize."""

from __future__ import annotations

import numpy as np
import pytest

from eval_helpers import tiny_gear_dir  # noqa: F401 - fixture

from tasks.evaluate.loaders import EvalQuery, EvalSet
from tasks.evaluate.localization import (
    bm25_scorer,
    evaluate_localization,
    rank_sentences,
    sentence_scores,
    token_weights,
)

# Document "abc def ghi jkl mno": sentence 0 = tokens t1 t2, sentence 1 = t3 t4 t5.
OFFSETS = np.array([[0, 0], [0, 3], [4, 7], [8, 11], [12, 15], [16, 19], [0, 0]])  # [CLS] t1..t5 [SEP]
SPANS = [(0, 7), (8, 19)]
QUERY_MASK = np.array([False, True, False])  # [CLS] word [SEP]


def constructed_weights() -> np.ndarray:
    """(heads=2, Lq=3, Ld=7). The query word: head 0 all on t2, head 1 uniform.
    [CLS]/[SEP] query rows put everything on t4 (they must not count)."""
    w = np.zeros((2, 3, 7))
    w[0, 1, 2] = 1.0
    w[1, 1, :] = 1 / 7
    w[:, 0, 4] = 1.0
    w[:, 2, 4] = 1.0
    return w


def test_pooling_means_heads_and_word_tokens_and_sums_sentence_tokens():
    per_token = token_weights(constructed_weights(), QUERY_MASK)
    # t2: (1 + 1/7) / 2 = 4/7; every other token 1/14.
    assert per_token[2] == pytest.approx(4 / 7)
    assert per_token[4] == pytest.approx(1 / 14)
    scores = sentence_scores(per_token, OFFSETS, SPANS)
    # sentence 0 = t1 + t2 = 1/14 + 8/14; sentence 1 = 3 * 1/14; specials belong nowhere.
    assert scores == pytest.approx([9 / 14, 3 / 14])
    assert rank_sentences(scores) == ["0", "1"]


def test_special_query_tokens_would_change_the_answer():
    # Without the mask, [CLS]/[SEP] rows drag the mass onto t4 (sentence 1).
    scores = sentence_scores(token_weights(constructed_weights()), OFFSETS, SPANS)
    assert rank_sentences(scores) == ["1", "0"]


def test_token_weights_rejects_wrong_shape():
    with pytest.raises(ValueError, match="heads, query_tokens, doc_tokens"):
        token_weights(np.ones((3, 7)))


def test_rank_sentences_breaks_ties_by_document_order():
    assert rank_sentences(np.array([0.2, 0.5, 0.2, 0.5])) == ["1", "3", "0", "2"]


def _tiny_set() -> EvalSet:
    doc = "Cats purr softly. Dogs bark loudly at night. Birds sing."
    spans = [(0, 17), (18, 44), (45, 56)]
    queries = [
        EvalQuery("a", "dogs bark", {"d": 1}, "d", 1),
        EvalQuery("b", "birds sing", {"d": 1}, "d", 2),
        EvalQuery("c", "purring cats", {"d": 1}, "d", 0),
    ]
    return EvalSet("tiny", "rir", "mem", {"d": doc}, queries, {"d": spans})


def test_evaluate_localization_scores_the_true_unit_rank():
    s = _tiny_set()
    heavy = {"a": 1, "b": 0, "c": 0}  # a: right; b: true unit ranked 3rd; c: right

    def scorer(q, document, spans):
        out = np.array([0.3, 0.2, 0.1])
        out[heavy[q.qid]] = 1.0
        return out

    r = evaluate_localization(s, scorer, ks=[1, 3])
    assert r["n_queries"] == 3
    assert r["metrics"]["recall@1"] == pytest.approx(2 / 3)
    assert r["metrics"]["recall@3"] == pytest.approx(1.0)
    assert r["metrics"]["map@3"] == pytest.approx((1 + 1 / 3 + 1) / 3)


def test_bm25_sentence_baseline_finds_the_matching_sentence():
    r = evaluate_localization(_tiny_set(), bm25_scorer(), ks=[1])
    # every query shares a word with its own sentence only ("cats", "dogs", "birds")
    assert r["metrics"]["recall@1"] == pytest.approx(1.0)


def test_scorer_must_return_one_score_per_sentence():
    with pytest.raises(ValueError, match="2 scores for 3 sentences"):
        evaluate_localization(_tiny_set(), lambda q, d, s: np.zeros(2), ks=[1])


def test_pooling_agrees_with_gear_model_localize(tiny_gear_dir):
    from gear_model.model import GearModel

    model = GearModel.from_pretrained(tiny_gear_dir)
    s = _tiny_set()
    doc, spans = s.documents["d"], s.sentence_spans["d"]
    for layer in (1, 2):
        att = model.cross_attention("dogs bark", doc, layer)
        ours = sentence_scores(token_weights(att.weights, att.query_mask), att.offsets, spans)
        assert ours == pytest.approx(model.localize("dogs bark", doc, spans, layer), abs=1e-6)
        # Mean pooling is the attention mass divided by the sentence's token count.
        starts, ends = att.offsets[:, 0], att.offsets[:, 1]
        counts = np.array([((ends > starts) & (starts >= a) & (starts < b)).sum() for a, b in spans])
        mean = model.localize("dogs bark", doc, spans, layer, pooling="mean")
        assert mean == pytest.approx(ours / np.maximum(counts, 1), abs=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        model.localize("dogs bark", doc, spans, 1, pooling="max")


def test_random_row_is_the_expected_score_of_a_random_sentence_order():
    from tasks.evaluate.localization import random_localization

    # Documents of 3 and 5 sentences; two queries on the first, one on the second.
    spans3, spans5 = [(0, 1), (2, 3), (4, 5)], [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    queries = [EvalQuery("a", "x", {"d3": 1}, "d3", 0), EvalQuery("b", "y", {"d3": 1}, "d3", 2),
               EvalQuery("c", "z", {"d5": 1}, "d5", 4)]
    s = EvalSet("hand", "rir", "mem", {"d3": "a b c", "d5": "a b c d e"}, queries, {"d3": spans3, "d5": spans5})
    r = random_localization(s, ks=[1, 3, 10])
    # R@k = min(k, n)/n; AP@k = (1/n) * sum_{r <= min(k, n)} 1/r
    assert r["per_query"]["qids"] == ["a", "b", "c"]
    assert r["per_query"]["recall@1"] == pytest.approx([1 / 3, 1 / 3, 1 / 5])
    assert r["metrics"]["recall@1"] == pytest.approx((2 / 3 + 1 / 5) / 3)
    assert r["metrics"]["recall@3"] == pytest.approx((1 + 1 + 3 / 5) / 3)
    assert r["metrics"]["recall@10"] == pytest.approx(1.0)
    assert r["metrics"]["map@1"] == r["metrics"]["recall@1"]
    assert r["metrics"]["map@3"] == pytest.approx((2 * (11 / 6) / 3 + (11 / 6) / 5) / 3)
    assert r["metrics"]["map@10"] == pytest.approx((2 * (11 / 6) / 3 + (137 / 60) / 5) / 3)
    lo, hi = r["ci"]["recall@3"]
    assert lo < r["metrics"]["recall@3"] < hi and lo >= 0.6 - 1e-12 and hi <= 1.0


def test_random_row_matches_ranx_on_shuffled_sentences():
    """The closed form against ranx scoring many uniformly random orders of the same documents."""
    rng = np.random.default_rng(1)
    from tasks.evaluate.localization import random_localization

    s = _tiny_set()

    closed = random_localization(s, ks=[1, 2])["metrics"]
    trials = [evaluate_localization(s, lambda q, d, spans: rng.random(len(spans)), ks=[1, 2])["metrics"] for _ in range(400)]
    for name, value in closed.items():
        # 400 trials x 3 queries: a standard error of about 0.014 at these values
        assert np.mean([t[name] for t in trials]) == pytest.approx(value, abs=0.05)


def test_evaluate_localization_keeps_per_query_values_and_an_interval():
    s = _tiny_set()
    heavy = {"a": 1, "b": 0, "c": 0}

    def scorer(q, document, spans):
        out = np.array([0.3, 0.2, 0.1])
        out[heavy[q.qid]] = 1.0
        return out

    r = evaluate_localization(s, scorer, ks=[1, 3], resamples=500, seed=3)
    assert r["per_query"]["qids"] == ["a", "b", "c"]
    assert r["per_query"]["recall@1"] == [1.0, 0.0, 1.0]
    assert r["per_query"]["map@3"] == pytest.approx([1.0, 1 / 3, 1.0])
    lo, hi = r["ci"]["recall@1"]
    assert lo <= r["metrics"]["recall@1"] <= hi and (lo, hi) != (hi, hi)
    assert r["ci"]["recall@3"] == [1.0, 1.0]  # every query hits: no spread
    again = evaluate_localization(s, scorer, ks=[1, 3], resamples=500, seed=3)
    assert again["ci"] == r["ci"]


def test_unit_rule_prior_ranks_the_sentences_that_pass_the_unit_rules_first():
    from tasks.evaluate.loaders import EvalQuery, EvalSet
    from tasks.evaluate.localization import unit_rule_prior
    from tasks.select_units import unit_rule_reasons

    sentences = [
        "The castle of Edinburgh stands on a rock above the old town.",  # passes: 8-20 tokens
        "Yes.",  # too short
        "It was built by the kings of Scotland in the twelfth century.",  # pronoun first word
        "The old town grew along the ridge that runs down from the castle rock.",  # passes
        "Edinburgh " + "and its many surrounding villages and small market towns " * 4 + "grew.",  # too long
    ]
    assert [r is None for r in unit_rule_reasons(sentences)] == [True, False, False, True, False]
    document = " ".join(sentences)
    spans, pos = [], 0
    for s in sentences:
        spans.append((pos, pos + len(s)))
        pos += len(s) + 1
    queries = [EvalQuery(qid="passing", query="castle rock", relevant={"d": 1}, doc_id="d", unit_index=0),
               EvalQuery(qid="failing", query="kings", relevant={"d": 1}, doc_id="d", unit_index=2)]
    eval_set = EvalSet(name="t", kind="rir", source="-", documents={"d": document}, queries=queries,
                       sentence_spans={"d": spans})
    prior = unit_rule_prior(eval_set, [1, 3])
    per_query = prior["per_query"]
    # Two sentences pass: a passing unit is first half the time and always in the top 3.
    assert per_query["recall@1"] == pytest.approx([0.5, 0.0]) and per_query["recall@3"][0] == pytest.approx(1.0)
    # A failing unit sits uniformly at rank 3, 4 or 5.
    assert per_query["recall@3"][1] == pytest.approx(1 / 3) and per_query["map@3"][1] == pytest.approx(1 / 9)
    assert per_query["map@1"][0] == pytest.approx(0.5) and per_query["map@3"][0] == pytest.approx((1 + 1 / 2) / 2)
