"""Information generation (Table 3): decode the unit from query and document.

RIR sets score ROUGE-1 / ROUGE-L F against the unit; QA sets score SQuAD
EM / F1 against the answers (percent, as in the paper).
"""

from __future__ import annotations

import time

from gear_model.diagnostics import is_punctuation_only
from tasks.evaluate.loaders import EvalSet, sample
from tasks.evaluate.metrics import qa_per_query, rouge_per_query
from tasks.evaluate.stats import BOOTSTRAP_RESAMPLES, summarize

N_EXAMPLES = 5  # generations kept in the report for reading


def evaluate_generation(
    model, eval_set: EvalSet, max_queries: int | None, max_new_tokens: int, seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES, **decoding,
) -> dict:
    """Per-query scores in percent, their means and bootstrap intervals
    (``decoding``: ``GearModel.generate``'s beam options)."""
    queries = [q for q in eval_set.unit_queries() if (q.target if eval_set.kind == "rir" else q.answers)]
    queries = sample(queries, max_queries, seed)
    if not queries:
        return {"metrics": None, "n_queries": 0}
    t0 = time.perf_counter()
    predictions = model.generate_many([q.query for q in queries], [eval_set.documents[q.doc_id] for q in queries],
                                      max_new_tokens=max_new_tokens, **decoding)
    elapsed = time.perf_counter() - t0
    if eval_set.kind == "rir":
        per_query = rouge_per_query(predictions, [q.target for q in queries])
        gold = [q.target for q in queries]
    else:
        per_query = qa_per_query(predictions, [q.answers for q in queries])
        gold = [" | ".join(q.answers) for q in queries]
    examples = [
        {"query": q.query, "gold": g, "generated": p} for q, g, p in list(zip(queries, gold, predictions))[:N_EXAMPLES]
    ]
    return {
        **summarize([q.qid for q in queries], per_query, resamples, seed),
        "n_queries": len(queries),
        "examples": examples,
        # A decoder that has not learned words emits runs of full stops; count them.
        "punctuation_only": sum(is_punctuation_only(p) for p in predictions),
        "timing": {"queries_s": elapsed, "queries_per_s": len(queries) / elapsed if elapsed > 0 else float("inf")},
    }
