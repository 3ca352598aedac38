"""Rewrite benchmark: rewrites/s, peak RSS and gate rates per backend that runs here.

- local: the embedded SmolLM2-135M-Instruct GGUF through transformers on
  ~24 real candidate units of the embedded dump (built by the ingest stages:
  shard -> extract_docs -> select_units, then one sampled unit per document);
- openai: the async client against the local fake chat-completions server
  (measures the client itself: concurrency, JSON, the event loop), with and
  without simulated server latency.

Each backend runs in a child process so peak RSS is its own. Prints JSON,
then a summary table.

    .venv/bin/python benchmarks/rewrite.py [--n 24] [--compare-prompts]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_candidates(work: str, n: int, seed: int) -> list[str]:
    """One sampled candidate unit per document of the embedded dump, n of them."""
    import polars as pl

    from tasks.assets import embedded_dump_path
    from tasks.extract_docs import ExtractConfig, extract_shard
    from tasks.rewrite import read_units, sample_units
    from tasks.select_units import UnitConfig, select_units
    from tasks.shard import ShardConfig, plan_shards

    shards = plan_shards(str(embedded_dump_path()), ShardConfig())
    articles = [extract_shard(s, ExtractConfig(), work) for s in shards]
    units_dirs = [select_units([a], UnitConfig(), work) for a in articles]
    units = pl.concat([read_units(d) for d in units_dirs])
    sampled = sample_units(units, 1, seed)
    return sampled["text"].to_list()[:n]


def gate_rates(sentences: list[str], outputs: list[str], errors: list) -> dict:
    from tasks.rewriters.quality import REASONS, is_keyword_form, judge

    n = len(sentences)
    counts = dict.fromkeys(REASONS, 0)
    kept = keyword = good = 0
    for s, o, e in zip(sentences, outputs, errors):
        if e:
            counts["backend_error"] += 1
            continue
        v = judge(o, s)  # the stage's default gate settings
        keyword += is_keyword_form(v.query)
        if v.kept:
            kept += 1
            good += is_keyword_form(v.query)
        else:
            counts[v.reason] += 1
    return {
        "n": n,
        "kept_rate": round(kept / n, 3),
        "keyword_form_rate": round(keyword / n, 3),  # before the gate
        "good_rate": round(good / n, 3),  # kept and comma-separated keywords
        **{f"{r}_rate": round(c / n, 3) for r, c in counts.items()},
    }


def run_local(sentences: list[str], use_examples: bool, batch_size: int) -> dict:
    from tasks.rewriters import RewriteConfig
    from tasks.rewriters.local import LocalRewriter

    t0 = time.perf_counter()
    rw = LocalRewriter(RewriteConfig(backend="local", use_worked_examples=use_examples, batch_size=batch_size))
    load = time.perf_counter() - t0
    t1 = time.perf_counter()
    outputs = rw.rewrite(sentences, seed=0)
    seconds = time.perf_counter() - t1
    return {
        "backend": "local",
        "model": Path(rw.model_name).name,
        "worked_examples": use_examples,
        "batch_size": batch_size,
        "torch_threads": __import__("torch").get_num_threads(),
        "load_seconds": round(load, 2),
        "seconds": round(seconds, 2),
        "seconds_per_rewrite": round(seconds / len(sentences), 3),
        "rewrites_per_s": round(len(sentences) / seconds, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        **gate_rates(sentences, outputs, rw.last_errors),
        "samples": [{"sentence": s, "output": o} for s, o in zip(sentences, outputs)],
    }


def run_openai(sentences: list[str], repeat: int, latency_s: float, concurrency: int) -> dict:
    from tasks.rewriters import RewriteConfig
    from tasks.rewriters.openai_compat import OpenAIRewriter
    from tasks.rewriters.testing import FakeChatServer

    batch = [f"{s} ({i})" for i in range(repeat) for s in sentences]
    with FakeChatServer(latency_s=latency_s) as srv:
        rw = OpenAIRewriter(RewriteConfig(backend="openai", base_url=srv.base_url, concurrency=concurrency))
        t0 = time.perf_counter()
        outputs = rw.rewrite(batch, seed=0)
        seconds = time.perf_counter() - t0
    return {
        "backend": "openai (fake local server)",
        "server_latency_s": latency_s,
        "concurrency": concurrency,
        "requests": len(batch),
        "seconds": round(seconds, 2),
        "rewrites_per_s": round(len(batch) / seconds, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "max_in_flight": srv.max_in_flight,
        "errors": sum(1 for e in rw.last_errors if e),
    }


def _child(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=24, help="candidate units to rewrite with the local backend")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--compare-prompts", action="store_true", help="also run the paper's prompt without worked examples")
    p.add_argument("--work", default=None, help="work dir for the ingest stages (cached between runs)")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--candidates", help=argparse.SUPPRESS)
    p.add_argument("--examples", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--latency", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.stage:
        if args.stage != "candidates":
            sentences = json.loads(Path(args.candidates).read_text())
        if args.stage == "local":
            print(json.dumps(run_local(sentences, bool(args.examples), args.batch_size)))
        elif args.stage == "openai":
            print(json.dumps(run_openai(sentences, repeat=84, latency_s=args.latency, concurrency=32)))
        elif args.stage == "candidates":
            work = args.work or str(Path(tempfile.gettempdir()) / "gear-bench-rewrite")
            Path(args.candidates).write_text(json.dumps(build_candidates(work, args.n, seed=0)))
            print(json.dumps({"ok": True}))
        return

    with tempfile.TemporaryDirectory() as tmp:
        cand = str(Path(tmp) / "candidates.json")
        extra = ["--work", args.work] if args.work else []
        _child(["--stage", "candidates", "--candidates", cand, "--n", str(args.n), *extra])
        n = len(json.loads(Path(cand).read_text()))
        runs = [_child(["--stage", "local", "--candidates", cand, "--examples", "1", "--batch-size", str(args.batch_size)])]
        if args.compare_prompts:
            runs.append(_child(["--stage", "local", "--candidates", cand, "--examples", "0", "--batch-size", str(args.batch_size)]))
        for latency in (0.0, 0.02):
            runs.append(_child(["--stage", "openai", "--candidates", cand, "--latency", str(latency)]))
    load = os.getloadavg()
    print(json.dumps({"candidates": n, "cpu_count": os.cpu_count(), "loadavg_after": load, "runs": runs}, indent=2))
    print("\n| backend | prompt / server | rewrites/s | s/rewrite | load s | peak RSS MB | echo | kept | good |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in runs:
        if r["backend"] == "local":
            what = "paper + 2 worked examples" if r["worked_examples"] else "paper only"
            print(
                f"| local {r['model']} | {what} | {r['rewrites_per_s']} | {r['seconds_per_rewrite']} | {r['load_seconds']} "
                f"| {r['peak_rss_mb']} | {r['echo_rate']:.0%} | {r['kept_rate']:.0%} | {r['good_rate']:.0%} |"
            )
        else:
            print(
                f"| {r['backend']} | latency {r['server_latency_s']} s, {r['requests']} req, conc {r['concurrency']} "
                f"| {r['rewrites_per_s']} | - | - | {r['peak_rss_mb']} | - | - | - |"
            )


if __name__ == "__main__":
    main()
