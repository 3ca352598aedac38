"""Relevance scorer: pairs/s and peak memory on CPU, and the threshold
calibration table (threshold vs share of true pairs kept vs share of random
pairs kept).

True pair: a keyword query and the document its unit came from. Random pair:
the same query and another document (seeded). A good threshold keeps most
true pairs and almost no random ones.

Data, in order of preference:
  --queries-dir DIR --units-dir DIR [...]   real pipeline output (rewrite or
                                            dedup folder + select_units folders)
  (default)                                 the embedded dump, cut into
      documents of whole sentences (<= 500 WordPiece tokens), candidate units
      of 8-20 tokens, each turned into a keyword query by simple means: runs
      of non-stop-words joined by commas (a stand-in for the LLM rewrite).

    .venv/bin/python benchmarks/relevance.py [--pooling mean] [--model PATH]
"""

from __future__ import annotations

import argparse
import bz2
import json
import random
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.relevance import RelevanceConfig, RelevanceScorer  # noqa: E402

THRESHOLDS = [0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7]
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def keyword_query(sentence: str, stop: set[str]) -> str:
    """Runs of content words, comma-separated: 'Paris is the capital of France' -> 'Paris, capital, France'."""
    words = re.findall(r"[\w'-]+", sentence)
    runs, cur = [], []
    for w in words:
        if w.lower() in stop or w.isdigit() and len(w) < 3:
            if cur:
                runs.append(" ".join(cur))
            cur = []
        else:
            cur.append(w)
    if cur:
        runs.append(" ".join(cur))
    return ", ".join(runs)


def embedded_pairs(max_docs: int, seed: int) -> tuple[list[str], list[str], list[int]]:
    """(queries, documents, doc index of each query) from the embedded dump."""
    import mwparserfromhell
    import mwxml
    from spacy.lang.en.stop_words import STOP_WORDS
    from transformers import AutoTokenizer

    from tasks.assets import embedded_dump_path, embedded_encoder_path

    tok = AutoTokenizer.from_pretrained(str(embedded_encoder_path()))
    rng = random.Random(seed)
    docs: list[str] = []
    queries: list[str] = []
    owner: list[int] = []
    dump = mwxml.Dump.from_file(bz2.open(embedded_dump_path()))
    for page in dump:
        if page.namespace != 0 or page.redirect:
            continue
        rev = next(iter(page))
        wikicode = mwparserfromhell.parse(rev.text or "")
        for node in wikicode.filter_templates(recursive=False) + wikicode.filter_tags(recursive=False):
            try:
                wikicode.remove(node)
            except ValueError:
                pass
        plain = wikicode.strip_code()
        paras = [p.strip() for p in plain.split("\n") if len(p.strip()) > 80 and not p.lstrip().startswith(("=", "*", "|", "{"))]
        sents, n_tok = [], 0
        for s in (s for p in paras for s in _SENT.split(p)):
            t = len(tok.tokenize(s))
            if n_tok + t >= 500:
                break
            sents.append((s, t))
            n_tok += t
        cands = [s for s, t in sents if 8 <= t <= 20 and s.split()[0].lower() not in
                 {"this", "these", "it", "that", "those", "they", "he", "she", "we", "you", "i"}]
        if len(sents) < 3 or n_tok < 200 or len(cands) < 3:
            continue
        docs.append(" ".join(s for s, _ in sents))
        for s in rng.sample(cands, 3):
            q = keyword_query(s, STOP_WORDS)
            if q:
                queries.append(q)
                owner.append(len(docs) - 1)
        if len(docs) >= max_docs:
            break
    return queries, docs, owner


def pipeline_pairs(queries_dir: Path, units_dirs: list[Path]) -> tuple[list[str], list[str], list[int]]:
    import polars as pl

    q = pl.read_parquet(queries_dir / "queries.parquet")
    d = pl.concat([pl.read_parquet(u / "documents.parquet", columns=["doc_id", "text"]) for u in units_dirs])
    d = d.join(q.select("doc_id").unique(), on="doc_id").sort("doc_id")
    row = {k: i for i, k in enumerate(d["doc_id"].to_list())}
    return q["query"].to_list(), d["text"].to_list(), [row[k] for k in q["doc_id"].to_list()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--pooling", default="mean", choices=["mean", "cls"])
    ap.add_argument("--instruction", default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="empty: the stage's default for the device")
    ap.add_argument("--max-docs", type=int, default=200)
    ap.add_argument("--random-per-query", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--queries-dir", type=Path)
    ap.add_argument("--units-dir", type=Path, nargs="*")
    args = ap.parse_args()

    if args.queries_dir:
        queries, docs, owner = pipeline_pairs(args.queries_dir, args.units_dir or [])
        source = f"pipeline output {args.queries_dir}"
    else:
        queries, docs, owner = embedded_pairs(args.max_docs, args.seed)
        source = "embedded dump, keyword form of real candidate units (stop-word runs)"

    config = RelevanceConfig(model=args.model, pooling=args.pooling, query_instruction=args.instruction,
                             batch_size=args.batch_size, device="cpu")
    t0 = time.perf_counter()
    scorer = RelevanceScorer(config)
    load_s = time.perf_counter() - t0

    # Throughput of the stage's own path: each distinct doc and query embedded once.
    t0 = time.perf_counter()
    d_emb = scorer.encode_documents(docs)
    t_docs = time.perf_counter() - t0
    t0 = time.perf_counter()
    q_emb = scorer.encode_queries(queries)
    t_q = time.perf_counter() - t0
    owner_arr = np.asarray(owner)
    true_scores = np.einsum("ij,ij->i", q_emb, d_emb[owner_arr])

    rng = np.random.default_rng(args.seed)
    rand_scores = []
    for i, o in enumerate(owner):
        others = rng.choice(len(docs) - 1, size=min(args.random_per_query, len(docs) - 1), replace=False)
        others = others + (others >= o)  # skip the query's own document
        rand_scores.append(q_emb[i] @ d_emb[others].T)
    rand_scores = np.concatenate(rand_scores)

    table = [
        {"threshold": t, "true_kept_pct": round(100 * float((true_scores >= t).mean()), 2),
         "random_kept_pct": round(100 * float((rand_scores >= t).mean()), 3)}
        for t in THRESHOLDS
    ]
    figures = {
        "model": config.model_path(), "pooling": args.pooling, "instruction": args.instruction,
        "data": source, "documents": len(docs), "queries": len(queries),
        "true_pairs": int(true_scores.size), "random_pairs": int(rand_scores.size),
        "load_s": round(load_s, 2),
        "documents_per_s": round(len(docs) / t_docs, 1),
        "queries_per_s": round(len(queries) / t_q, 1),
        # A stage run embeds each document once and each query once:
        "pairs_per_s": round(len(queries) / (t_docs + t_q), 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "true_score_mean": round(float(true_scores.mean()), 4),
        "random_score_mean": round(float(rand_scores.mean()), 4),
        "random_score_p99": round(float(np.quantile(rand_scores, 0.99)), 4),
        "calibration": table,
    }
    print(json.dumps(figures, indent=2))
    print(f"\n{source}: {len(docs)} documents, {len(queries)} true pairs, {rand_scores.size} random pairs")
    print(f"pairs/s {figures['pairs_per_s']} (docs/s {figures['documents_per_s']}, queries/s {figures['queries_per_s']}), "
          f"peak RSS {figures['peak_rss_mb']} MB, load {figures['load_s']} s")
    print("| threshold | true pairs kept % | random pairs kept % |")
    print("|---:|---:|---:|")
    for r in table:
        print(f"| {r['threshold']:.2f} | {r['true_kept_pct']:.1f} | {r['random_kept_pct']:.3f} |")


if __name__ == "__main__":
    main()
