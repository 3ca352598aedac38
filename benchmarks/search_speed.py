"""Search speed per query: GeAR (`gear search`) against the sentence-split baseline.

GeAR: retrieval (E_q + FAISS over the E_d index), localisation (one fusion
pass over the top-k documents' kept E_d token states, their sentences ranked
by cross-attention) and generation (each unit, by ``GearModel.decode``, the k in one batch),
timed by ``GearSearcher``; and localisation again with the hits re-encoded
by E_d per query (what a corpus too big to keep its token states gets). Baseline: the untouched encoder retrieves from its own FAISS
index, then encodes every sentence of every candidate document and ranks them
by cosine to the query (``tasks/evaluate/localization.py: embedding_scorer``);
it generates nothing. Both on the same queries and corpus, in one process,
query by query in turn.

    .venv/bin/python benchmarks/search_speed.py [--model DIR] [--corpus PATH] [--queries 30] [--top-k 5]

Model: --model, else the newest GeAR run under data/models, else an untrained
GeAR built from the embedded MiniLM with identity-initialised cross-attention
(the trained model's architecture, so its speed). Corpus and queries: the
latest dataset under data (its documents; queries from its test split), else
--corpus with --queries-file. Prints JSON figures, then a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS = ("retrieval", "localization", "generation")


def test_queries(dataset: Path, n: int, seed: int) -> list[str]:
    import pyarrow.parquet as pq

    from tasks.evaluate.loaders import sample

    return sample(pq.read_table(dataset / "test.parquet", columns=["query"]).column("query").to_pylist(), n, seed)


def gear_run(searcher, queries: list[str], k: int, generate: bool = True) -> list[dict[str, float]]:
    out = []
    for q in queries:
        searcher.search(q, k, generate=generate)
        out.append(dict(searcher.timings))
    return out


def baseline_run(encoder, index, searcher, queries: list[str], k: int, batch_size: int) -> list[dict[str, float]]:
    """Retrieve with the untouched encoder, then encode every sentence of each candidate."""
    import numpy as np

    from tasks.evaluate.loaders import EvalQuery
    from tasks.evaluate.localization import embedding_scorer

    score = embedding_scorer(encoder, batch_size)
    corpus = searcher.corpus
    out = []
    for i, q in enumerate(queries):
        t0 = time.perf_counter()
        vector = encoder.encode_queries([q], batch_size=1)
        _, rows = index.search(np.ascontiguousarray(vector, dtype=np.float32), k)
        t1 = time.perf_counter()
        for row in rows[0]:
            doc = corpus.documents[int(row)]
            score(EvalQuery(f"q{i}", q, {doc.doc_id: 1}), doc.text, list(searcher.sentence_spans(int(row))))
        out.append({"retrieval": t1 - t0, "localization": time.perf_counter() - t1, "generation": 0.0})
    return out


def summary(per_query: list[dict[str, float]]) -> dict[str, float]:
    out = {f"{step}_s": statistics.mean(t[step] for t in per_query) for step in STEPS}
    out["total_s"] = sum(out[f"{step}_s"] for step in STEPS)
    out["retrieval_localization_s"] = out["retrieval_s"] + out["localization_s"]
    for name in ("retrieval", "localization", "total", "retrieval_localization"):
        seconds = out[f"{name}_s"]
        out[f"{name}_queries_per_s"] = 1 / seconds if seconds else None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="GeAR model dir (default: newest under data/models, else untrained on MiniLM)")
    ap.add_argument("--corpus", help="corpus file or dataset folder (default: the latest dataset under data)")
    ap.add_argument("--queries-file", help="one query per line (default: the dataset's test queries)")
    ap.add_argument("--output-dir", default="data", help="where the default model and dataset are looked up")
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (default: gear search's)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import faiss
    import torch

    from gear_model.model import GearModel
    from gear_model.search import DEFAULT_MAX_NEW_TOKENS, DocumentIndex, GearSearcher
    from tasks.assets import embedded_encoder_path
    from tasks.contracts import resolve_dataset
    from tasks.evaluate.baselines import PretrainedEncoder
    from tasks.evaluate.config import latest_models

    root = Path(args.output_dir)
    corpus = Path(args.corpus) if args.corpus else resolve_dataset(root)
    if args.queries_file:
        queries = [line.strip() for line in Path(args.queries_file).read_text().splitlines() if line.strip()][: args.queries]
    else:
        queries = test_queries(corpus, args.queries, args.seed)
    max_new_tokens = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or latest_models(root / "models")[0]
        model_note = str(model_dir)
        if model_dir is None:
            model_dir = GearModel.from_encoder(embedded_encoder_path(), cross_attention_init="identity").save_pretrained(
                Path(tmp) / "gear")
            model_note = "untrained GeAR on the embedded MiniLM (identity cross-attention init): no trained model found"
        t0 = time.perf_counter()
        searcher = GearSearcher.from_model_dir(model_dir, corpus, batch_size=args.batch_size, max_new_tokens=max_new_tokens)
        gear_index_s = time.perf_counter() - t0
        encoder = PretrainedEncoder(embedded_encoder_path())
        t0 = time.perf_counter()
        base_index = faiss.IndexFlatIP(encoder.model.config.hidden_size)
        base_index.add(encoder.encode_documents([d.text for d in searcher.corpus.documents], batch_size=args.batch_size))
        base_index_s = time.perf_counter() - t0

        # The same index without the kept token states: each query re-encodes its hits.
        reencoding = GearSearcher(searcher.model, searcher.corpus, DocumentIndex(searcher.index.index),
                                  max_new_tokens=max_new_tokens)
        # One warm-up query each (first-call allocations, lazy imports), then the timed queries.
        gear_run(searcher, queries[:1], args.top_k)
        gear_run(reencoding, queries[:1], args.top_k, generate=False)
        baseline_run(encoder, base_index, searcher, queries[:1], args.top_k, args.batch_size)
        # Interleaved per query, so that load from other jobs on a shared machine falls on all alike.
        gear, gear_reencoding, baseline = [], [], []
        for q in queries:
            gear += gear_run(searcher, [q], args.top_k)
            gear_reencoding += gear_run(reencoding, [q], args.top_k, generate=False)
            baseline += baseline_run(encoder, base_index, searcher, [q], args.top_k, args.batch_size)

    spans = [len(searcher.sentence_spans(i)) for i in range(len(searcher.corpus))]
    figures = {
        "model": model_note,
        "corpus": str(corpus),
        "documents": len(searcher.corpus),
        "sentences_per_document": statistics.mean(spans),
        "queries": len(queries),
        "top_k": args.top_k,
        "max_new_tokens": max_new_tokens,
        "torch_threads": torch.get_num_threads(),
        "index_build_s": {"gear": gear_index_s, "baseline": base_index_s},
        "gear": summary(gear),
        "gear_reencoding_hits_no_generation": summary(gear_reencoding),
        "baseline": summary(baseline),
    }
    print(json.dumps(figures, indent=2))
    print()
    print(f"per query, top {args.top_k} of {figures['documents']} documents "
          f"({figures['sentences_per_document']:.1f} sentences each), {len(queries)} queries, "
          f"{figures['torch_threads']} torch threads")
    print(f"{'system':<34} {'retrieval':>10} {'localisation':>13} {'generation':>11} {'ret+loc q/s':>12} {'total q/s':>10}")
    rows = (("GeAR (cross-attention)", figures["gear"]),
            ("GeAR, hits re-encoded, no gen.", figures["gear_reencoding_hits_no_generation"]),
            ("sentence-split MiniLM (as is)", figures["baseline"]))
    for name, s in rows:
        print(f"{name:<34} {s['retrieval_s'] * 1000:>8.1f}ms {s['localization_s'] * 1000:>11.1f}ms "
              f"{s['generation_s'] * 1000:>9.1f}ms {s['retrieval_localization_queries_per_s']:>12.2f} "
              f"{s['total_queries_per_s']:>10.2f}")


if __name__ == "__main__":
    main()
