"""Held-out evaluation during training (the paper's Fig. 4a/b curves).

Reads a dataset's test.parquet once and, given the model, measures unit
localisation (rank the document's sentences by the fusion cross-attention,
``GearModel.localize``) and, on a few queries, generation ROUGE. The full
tables with baselines and intervals are evaluate-gear's job; this is the
cheap signal a training run records per epoch, and what the learning-curve
benchmark plots.

With one relevant sentence per query, Recall@k is "true unit ranked in the
top k" and AP@k is the reciprocal rank when within k (MRR@k), so they are
computed from the true unit's rank directly.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

COLUMNS = ("query", "document", "unit", "unit_index", "sentence_spans")
KS = (1, 3, 5, 10)


class HeldOut:
    def __init__(self, path: str | Path, max_queries: int = 200, seed: int = 0):
        self.path = Path(path)
        if self.path.is_dir():
            self.path = self.path / "test.parquet"
        if not self.path.is_file():
            raise FileNotFoundError(f"no held-out triples at {self.path}")
        table = pq.read_table(self.path)
        missing = [c for c in COLUMNS if c not in table.column_names]
        if missing:
            raise ValueError(f"{self.path}: missing columns {missing}")
        rows = table.select(list(COLUMNS)).to_pylist()
        if len(rows) > max_queries:  # a seeded sample, the same at every evaluation
            rows = random.Random(seed).sample(rows, max_queries)
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def localization(self, model, layer: int | None = None, pooling: str = "mean") -> dict[str, Any]:
        by_doc: dict[str, list[dict]] = {}
        for r in self.rows:  # each document is encoded once for all its queries
            by_doc.setdefault(r["document"], []).append(r)
        ranks = []
        for document, rows in by_doc.items():
            spans = [(s["start"], s["end"]) for s in rows[0]["sentence_spans"]]
            scores = model.localize_many([r["query"] for r in rows], document, spans, layer, pooling=pooling)
            for r, row_scores in zip(rows, scores):
                order = np.argsort(-row_scores, kind="stable")
                ranks.append(int(np.nonzero(order == r["unit_index"])[0][0]))
        ranks_arr = np.array(ranks)
        sentences = np.array([len(r["sentence_spans"]) for r in self.rows])
        out: dict[str, Any] = {}
        for k in KS:
            out[f"recall@{k}"] = float((ranks_arr < k).mean()) if len(ranks) else 0.0
            out[f"map@{k}"] = float(np.where(ranks_arr < k, 1.0 / (ranks_arr + 1), 0.0).mean()) if len(ranks) else 0.0
            # What a uniformly random ordering of each document's sentences would score.
            out[f"random_recall@{k}"] = float((np.minimum(k, sentences) / sentences).mean()) if len(ranks) else 0.0
        return out

    def generation(self, model, n: int, max_new_tokens: int = 48) -> dict[str, float] | None:
        if n <= 0 or not self.rows:
            return None
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
        totals = {"rouge1": 0.0, "rougeL": 0.0}
        rows = self.rows[:n]
        for r in rows:
            generated = model.generate(r["query"], r["document"], max_new_tokens=max_new_tokens)
            result = scorer.score(r["unit"], generated)
            for name in totals:
                totals[name] += result[name].fmeasure
        return {name: 100.0 * v / len(rows) for name, v in totals.items()}
