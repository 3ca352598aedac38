"""Evaluation speed: queries/s of retrieval (dense exact and HNSW, BM25) and
of unit localisation (GeAR cross-attention, sentence-embedding baseline),
and peak memory. A trimmed sibling of tasks/evaluate/core.py on a seeded
synthetic corpus (real English word pieces), so it needs no dataset.

    .venv/bin/python benchmarks/eval.py [--docs 1000] [--queries 200] [--model DIR]

Without --model it builds an untrained GeAR from the embedded MiniLM
(6 layers, 384 hidden): the embedded run's architecture, so the speed is
the trained model's. Prints JSON figures, then a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.evaluate.loaders import EvalQuery, EvalSet  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def synthetic_set(n_docs: int, n_queries: int, sentences: int, words: int, seed: int) -> EvalSet:
    """Documents of random lower-case vocabulary words; a query is 4 words of one sentence."""
    from transformers import AutoTokenizer

    from tasks.assets import embedded_encoder_path

    vocab = [w for w in AutoTokenizer.from_pretrained(str(embedded_encoder_path())).get_vocab() if w.isalpha() and len(w) > 3]
    rng = random.Random(seed)
    documents, spans = {}, {}
    for d in range(n_docs):
        text, doc_spans = "", []
        for s in range(sentences):
            sent = " ".join(rng.choice(vocab) for _ in range(words)).capitalize() + "."
            start = len(text) + (1 if s else 0)
            text = f"{text} {sent}" if s else sent
            doc_spans.append((start, start + len(sent)))
        documents[f"d{d}"], spans[f"d{d}"] = text, doc_spans
    queries = []
    for i in range(n_queries):
        doc_id = f"d{rng.randrange(n_docs)}"
        unit = rng.randrange(sentences)
        s, e = spans[doc_id][unit]
        query = " ".join(rng.sample(documents[doc_id][s:e].rstrip(".").split(), 4))
        queries.append(EvalQuery(f"q{i}", query, {doc_id: 1}, doc_id, unit, documents[doc_id][s:e]))
    return EvalSet("synthetic", "rir", "benchmark", documents, queries, spans)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--localize-queries", type=int, default=100)
    ap.add_argument("--sentences", type=int, default=8, help="sentences per document")
    ap.add_argument("--words", type=int, default=12, help="words per sentence")
    ap.add_argument("--model", help="a GeAR model dir (default: untrained GeAR on the embedded MiniLM)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    from gear_model.model import GearModel
    from tasks.assets import embedded_encoder_path
    from tasks.evaluate.baselines import PretrainedEncoder
    from tasks.evaluate.loaders import sample
    from tasks.evaluate.localization import embedding_scorer, evaluate_localization, gear_scorer, random_localization
    from tasks.evaluate.retrieval import evaluate_retrieval

    figures: dict = {"torch_threads": torch.get_num_threads(), "docs": args.docs, "queries": args.queries}
    eval_set = synthetic_set(args.docs, args.queries, args.sentences, args.words, args.seed)
    ks = [1, 3, 5, 10]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model_dir = args.model
        else:
            model_dir = GearModel.from_encoder(embedded_encoder_path()).save_pretrained(Path(tmp) / "gear")
        model = GearModel.from_pretrained(model_dir)
        figures["model"] = str(args.model or "untrained GeAR on embedded MiniLM")
        figures["rss_after_load_mib"] = peak_rss_mib()

        rows = []
        for name, encoder, index in (("GeAR exact", model, "exact"), ("GeAR hnsw", model, "hnsw"), ("BM25", None, "exact")):
            r = evaluate_retrieval(eval_set, ks, encoder, index, args.batch_size)
            t = r["timing"]
            rows.append({"task": "retrieval", "system": name, "queries_per_s": t["queries_per_s"],
                         "docs_per_s": args.docs / t["encode_documents_s"] if "encode_documents_s" in t else None,
                         "index_s": t["index_s"], "recall@10": r["metrics"]["recall@10"]})
        figures["rss_after_retrieval_mib"] = peak_rss_mib()

        loc_set = EvalSet(eval_set.name, eval_set.kind, eval_set.source, eval_set.documents,
                          sample(eval_set.queries, args.localize_queries, args.seed), eval_set.sentence_spans)
        r = evaluate_localization(loc_set, gear_scorer(model, None), ks)
        rows.append({"task": "localisation", "system": f"GeAR layer {model.resolve_layer(None)}",
                     "queries_per_s": r["timing"]["queries_per_s"], "recall@1": r["metrics"]["recall@1"]})
        baseline = PretrainedEncoder(embedded_encoder_path())
        r = evaluate_localization(loc_set, embedding_scorer(baseline, args.batch_size), ks)
        rows.append({"task": "localisation", "system": "MiniLM sentence similarity",
                     "queries_per_s": r["timing"]["queries_per_s"], "recall@1": r["metrics"]["recall@1"]})
        # what a random sentence order scores on the same queries, to read recall@1 against
        figures["localisation_random_recall@1"] = random_localization(loc_set, ks)["metrics"]["recall@1"]
        figures["peak_rss_mib"] = peak_rss_mib()
        figures["results"] = rows

    print(json.dumps(figures, indent=2))
    print()
    print(f"{'task':<13} {'system':<28} {'queries/s':>10} {'docs/s':>8}")
    for row in rows:
        docs = f"{row['docs_per_s']:.1f}" if row.get("docs_per_s") else "-"
        print(f"{row['task']:<13} {row['system']:<28} {row['queries_per_s']:>10.1f} {docs:>8}")
    print(f"peak RSS {figures['peak_rss_mib']:.0f} MiB ({figures['docs']} docs, torch threads {figures['torch_threads']})")


if __name__ == "__main__":
    main()
