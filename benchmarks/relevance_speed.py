"""Document-embedding speed of the relevance stage's scorer on CPU, by batch size and thread count.

Embeds the same documents of the embedded dump (the stage's path:
``RelevanceScorer.encode_documents``, FlagEmbedding, 512-token limit) under
each setting, the settings alternating for ``--repeat`` rounds, and prints
seconds per setting with the largest embedding difference from the first
setting (scores must not depend on an operational field).

    .venv/bin/python benchmarks/relevance_speed.py [--docs 180] [--settings 1x64 1x8 1x1 2x1] [--repeat 2]

A setting is THREADSxBATCH.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from relevance import embedded_pairs  # noqa: E402

from tasks.relevance import RelevanceConfig, RelevanceScorer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=180, help="at most this many articles of the embedded dump (78 of its articles qualify)")
    ap.add_argument("--settings", nargs="+", default=["1x64", "1x8", "1x1", "2x1"])
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    _, docs, _ = embedded_pairs(args.docs, seed=0)
    settings = [tuple(int(x) for x in s.split("x")) for s in args.settings]
    seconds: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    first: np.ndarray | None = None
    max_diff: dict[tuple[int, int], float] = {}
    for _ in range(args.repeat):
        for threads, batch in settings:
            scorer = RelevanceScorer(RelevanceConfig(cpu_threads=threads, batch_size=batch, device="cpu"))
            started = time.perf_counter()
            emb = scorer.encode_documents(docs)
            seconds[(threads, batch)].append(time.perf_counter() - started)
            first = emb if first is None else first
            max_diff[(threads, batch)] = float(np.abs(emb - first).max())
    rows = []
    for threads, batch in settings:
        row = {"threads": threads, "batch": batch, "documents": len(docs),
               "median_s": statistics.median(seconds[(threads, batch)]), "runs_s": seconds[(threads, batch)],
               "max_abs_diff_from_first": max_diff[(threads, batch)]}
        rows.append(row)
        print(json.dumps(row))
    base = rows[0]["median_s"]
    print(f"\n| threads x batch | seconds ({len(docs)} documents, median of {args.repeat}) | vs {settings[0][0]}x{settings[0][1]} | max |diff| |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['threads']}x{r['batch']} | {r['median_s']:.1f} | {r['median_s'] / base:.2f} | {r['max_abs_diff_from_first']:.1e} |")


if __name__ == "__main__":
    main()
