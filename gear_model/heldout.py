"""Held-out evaluation during training (the paper's Fig. 4a/b curves).

Reads a dataset's test.parquet once and, given the model, measures unit
localisation at every fusion layer (rank the document's sentences by the
fusion cross-attention, as ``GearModel.localize`` does), with 95% bootstrap
intervals; whether the model reads the document (``diagnostics``: the
attention lift on the unit by layer, d_doc and d_pair); and, on a few
queries, generation ROUGE. The full tables with baselines are
evaluate-gear's job; this is the cheap signal a training run records at
step 0 and per epoch, and what the learning-curve benchmark plots.

With one relevant sentence per query, Recall@k is "true unit ranked in the
top k" and AP@k is the reciprocal rank when within k (MRR@k), so they are
computed from the true unit's rank directly.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from gear_model.diagnostics import attention_lift, bootstrap_interval, document_dependence, is_punctuation_only
from gear_model.doc_states import DocumentStateStore
from gear_model.model import DocumentStateMemo, pool_sentences, sentence_membership

COLUMNS = ("query", "document", "unit", "unit_index", "sentence_spans")
KS = (1, 3, 5, 10)


class HeldOut:
    def __init__(self, path: str | Path, max_queries: int = 200, seed: int = 0, state_store: str | Path | None = None):
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
        self.seed = seed
        # E_d states of the held-out documents, kept across evaluations while E_d
        # is unchanged (a frozen E_d: every evaluation after the first reuses them).
        self._states = DocumentStateMemo()
        self._states_of: str | None = None
        self.state_store = state_store  # a DocumentStateStore root shared with the run's other processes

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], seed: int = 0) -> HeldOut:
        """From rows already in memory (the ``COLUMNS`` keys), e.g. an evaluation set."""
        held = cls.__new__(cls)
        held.path, held.rows, held.seed = None, list(rows), seed
        held._states, held._states_of, held.state_store = DocumentStateMemo(), None, None
        return held

    def __len__(self) -> int:
        return len(self.rows)

    def measure(self, model, pooling: str = "mean", generation_queries: int = 0, max_new_tokens: int = 48,
                resamples: int = 1000, dependence_queries: int | None = None) -> dict[str, Any]:
        """Everything one held-out evaluation records (see the module docstring).
        ``dependence_queries``: d_doc and d_pair on a seeded sample of at most
        this many queries (three LM passes each; None: all)."""
        fingerprint = model.document_encoder_fingerprint()
        if fingerprint != self._states_of:
            store = DocumentStateStore(self.state_store, fingerprint) if self.state_store else None
            self._states, self._states_of = DocumentStateMemo(store=store), fingerprint
        with model.reusing_document_states(self._states):
            out = self.localization(model, pooling, resamples)
            rows = self.rows
            if dependence_queries is not None and len(rows) > dependence_queries:
                rows = random.Random(self.seed).sample(rows, dependence_queries)
            out["document_dependence"] = document_dependence(
                model, [r["query"] for r in rows], [r["document"] for r in rows], [r["unit"] for r in rows],
                seed=self.seed,
            )
            out["generation"] = self.generation(model, generation_queries, max_new_tokens)
        return out

    def localization(self, model, pooling: str = "mean", resamples: int = 1000) -> dict[str, Any]:
        """R@k / MAP@k at every fusion layer (intervals on R@k), the lift by
        layer, the best layer by R@3, and ``localization``: the model's
        default layer, with the random ranking's expected scores beside it."""
        by_doc: dict[str, list[int]] = {}
        for i, r in enumerate(self.rows):  # each document is encoded once for all its queries
            by_doc.setdefault(r["document"], []).append(i)
        documents = list(by_doc.items())
        if self.state_store:
            # Runs that share a store and start together (the pipeline's training lanes) each
            # take the documents in an order of their own: each document is then encoded by
            # whichever reaches it first and read from the store by the other, instead of
            # twice. The figures do not depend on the order.
            random.Random(os.getpid()).shuffle(documents)
        n_layers = model.n_layers
        ranks = np.zeros((len(self.rows), n_layers), dtype=np.int64)
        lifts = np.full((len(self.rows), n_layers), np.nan)
        for document, idx in documents:
            rows = [self.rows[i] for i in idx]
            spans = [(s["start"], s["end"]) for s in rows[0]["sentence_spans"]]
            weights, offsets = model.doc_token_weights([r["query"] for r in rows], document, all_layers=True)
            scores = pool_sentences(weights, sentence_membership(offsets, spans), pooling)  # (n, layers, sentences)
            for j, (i, r) in enumerate(zip(idx, rows)):
                order = np.argsort(-scores[j], axis=-1, kind="stable")
                ranks[i] = np.argmax(order == r["unit_index"], axis=-1)
                lifts[i] = attention_lift(weights[j], offsets, spans[r["unit_index"]])
        by_layer = {str(l + 1): self._metrics(ranks[:, l], resamples) for l in range(n_layers)}
        default = model.resolve_layer(None)
        best = max(range(1, n_layers + 1), key=lambda l: (by_layer[str(l)].get("recall@3", 0.0), -l))
        sentences = np.array([len(r["sentence_spans"]) for r in self.rows])
        out: dict[str, Any] = {**by_layer[str(default)]}
        for k in KS:  # what a uniformly random ordering of each document's sentences would score
            out[f"random_recall@{k}"] = float((np.minimum(k, sentences) / sentences).mean()) if len(sentences) else 0.0
        return {
            "localization": out, "localization_by_layer": by_layer, "best_layer": best,
            "lift_by_layer": {str(l + 1): float(np.nanmean(lifts[:, l])) if np.isfinite(lifts[:, l]).any() else None
                              for l in range(n_layers)},
        }

    def _metrics(self, ranks: np.ndarray, resamples: int) -> dict[str, Any]:
        out: dict[str, Any] = {"ci": {}}
        for k in KS:
            hits = (ranks < k).astype(np.float64)
            out[f"recall@{k}"] = float(hits.mean()) if len(ranks) else 0.0
            out[f"map@{k}"] = float(np.where(ranks < k, 1.0 / (ranks + 1), 0.0).mean()) if len(ranks) else 0.0
            out["ci"][f"recall@{k}"] = bootstrap_interval(hits, resamples, self.seed)
        return out

    def generation(self, model, n: int, max_new_tokens: int = 48) -> dict[str, Any] | None:
        if n <= 0 or not self.rows:
            return None
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
        totals = {"rouge1": 0.0, "rougeL": 0.0}
        rows = self.rows[:n]
        punctuation_only, examples = 0, []
        generations = model.generate_many([r["query"] for r in rows], [r["document"] for r in rows],
                                          max_new_tokens=max_new_tokens)
        for r, generated in zip(rows, generations, strict=True):
            result = scorer.score(r["unit"], generated)
            for name in totals:
                totals[name] += result[name].fmeasure
            punctuation_only += is_punctuation_only(generated)
            if len(examples) < 3:
                examples.append({"query": r["query"], "unit": r["unit"], "generated": generated})
        return {**{name: 100.0 * v / len(rows) for name, v in totals.items()},
                "punctuation_only": punctuation_only, "n": len(rows), "examples": examples}
