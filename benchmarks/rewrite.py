"""Rewrite benchmark: rewrites/s, peak RSS and gate rates, old vs new local settings.

- local: the embedded SmolLM2-135M-Instruct GGUF through transformers on real
  candidate units of the embedded dump (built by the ingest stages: shard ->
  extract_docs -> select_units, then one sampled unit per document; or read
  from ``--units``, a select_units output folder). Two settings:

  * ``old``: the settings before constrained decoding (2 worked examples, no
    constraint, transformers ``generate()``, transformers' SDPA that copies
    grouped KV heads, batch 8, all cores);
  * ``new``: RewriteConfig's defaults.

  They run in alternating pairs (old, new, old, new, ...) so that a machine
  shared with other jobs slows both alike; the table gives each run and the
  new/old speed ratio per pair. ``--ablate`` adds one run per lever.
- openai: the async client against the local fake chat-completions server
  (the client's own overhead), with and without simulated server latency.

Each run is a child process, so load time and peak RSS are its own. Prints
JSON, then a summary table.

    .venv/bin/python benchmarks/rewrite.py [--n 32] [--pairs 2] [--units DIR] [--ablate] [--no-openai]
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

# The settings before this benchmark's comparison was introduced (HEAD b476e49 defaults).
OLD = {
    "use_worked_examples": 2,
    "constrain_to_sentence": False,
    "decode_loop": "generate",
    "gqa_attention": False,
    "batch_size": 8,
    "torch_threads": os.cpu_count() or 1,
}
NEW: dict = {}  # RewriteConfig's defaults
ABLATIONS = {
    "old, 1 thread": {**OLD, "torch_threads": 1},
    "old + gqa + compact, bs 32": {**OLD, "gqa_attention": True, "decode_loop": "compact", "batch_size": 32, "torch_threads": None},
    "new, 2 examples": {"use_worked_examples": 2},
    "new, no constraint": {"constrain_to_sentence": False},
    "new, word share 0.5": {"constraint_max_word_fraction": 0.5},
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def build_candidates(work: str, n: int, seed: int, units: str | None) -> list[str]:
    """One sampled candidate unit per document of the embedded dump, n of them."""
    import polars as pl

    from tasks.rewrite import read_units, sample_units

    if units:
        units_dirs = [Path(units)]
    else:
        from tasks.assets import embedded_dump_path
        from tasks.extract_docs import ExtractConfig, extract_docs
        from tasks.select_units import UnitConfig, select_units
        from tasks.shard import ShardConfig, plan_shards

        shards = plan_shards(str(embedded_dump_path()), ShardConfig())
        articles = [extract_docs(s, ExtractConfig(), work) for s in shards]
        units_dirs = [select_units([a], UnitConfig(), work) for a in articles]
    table = pl.concat([read_units(d) for d in units_dirs])
    return sample_units(table, 1, seed)["text"].to_list()[:n]


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


def run_local(sentences: list[str], settings: dict) -> dict:
    import torch

    from tasks.rewriters import RewriteConfig
    from tasks.rewriters.local import LocalRewriter

    cfg = RewriteConfig(backend="local", **settings)
    t0 = time.perf_counter()
    rw = LocalRewriter(cfg)
    load = time.perf_counter() - t0
    t1 = time.perf_counter()
    outputs = rw.rewrite(sentences, seed=0)
    seconds = time.perf_counter() - t1
    return {
        "backend": "local",
        "model": Path(rw.model_name).name,
        "settings": settings,
        "worked_examples": cfg.worked_examples_on(),
        "constrained": cfg.constraint_on(),
        "batch_size": cfg.batch_size,
        "torch_threads": torch.get_num_threads(),
        "load_seconds": round(load, 2),
        "seconds": round(seconds, 2),
        "seconds_per_rewrite": round(seconds / len(sentences), 3),
        "rewrites_per_s": round(len(sentences) / seconds, 3),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "loadavg": os.getloadavg()[0],
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
        rw.rewrite(batch, seed=0)
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


def _local(cand: str, name: str, settings: dict) -> dict:
    r = _child(["--stage", "local", "--candidates", cand, "--settings", json.dumps(settings)])
    r["name"] = name
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32, help="candidate units to rewrite per local run")
    p.add_argument("--pairs", type=int, default=2, help="alternating (old, new) pairs of local runs")
    p.add_argument("--units", default=None, help="a select_units output folder to take candidates from")
    p.add_argument("--ablate", action="store_true", help="also run each lever on its own (one run each)")
    p.add_argument("--no-openai", action="store_true", help="skip the openai client runs")
    p.add_argument("--work", default=None, help="work dir for the ingest stages (cached between runs)")
    p.add_argument("--stage", help=argparse.SUPPRESS)
    p.add_argument("--candidates", help=argparse.SUPPRESS)
    p.add_argument("--settings", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--latency", type=float, default=0.0, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.stage:
        if args.stage != "candidates":
            sentences = json.loads(Path(args.candidates).read_text())
        if args.stage == "local":
            print(json.dumps(run_local(sentences, json.loads(args.settings))))
        elif args.stage == "openai":
            print(json.dumps(run_openai(sentences, repeat=84, latency_s=args.latency, concurrency=32)))
        elif args.stage == "candidates":
            work = args.work or str(Path(tempfile.gettempdir()) / "gear-bench-rewrite")
            Path(args.candidates).write_text(json.dumps(build_candidates(work, args.n, 0, args.units)))
            print(json.dumps({"ok": True}))
        return

    with tempfile.TemporaryDirectory() as tmp:
        cand = str(Path(tmp) / "candidates.json")
        extra = (["--work", args.work] if args.work else []) + (["--units", args.units] if args.units else [])
        _child(["--stage", "candidates", "--candidates", cand, "--n", str(args.n), *extra])
        n = len(json.loads(Path(cand).read_text()))
        runs, pairs = [], []
        for i in range(args.pairs):
            old, new = _local(cand, "old", OLD), _local(cand, "new", NEW)
            runs += [old, new]
            pairs.append({
                "pair": i,
                "speedup_new_over_old": round(old["seconds_per_rewrite"] / new["seconds_per_rewrite"], 2),
                "load_ratio_new_over_old": round(new["load_seconds"] / old["load_seconds"], 2),
            })
        if args.ablate:
            runs += [_local(cand, name, s) for name, s in ABLATIONS.items()]
        if not args.no_openai:
            for latency in (0.0, 0.02):
                runs.append(_child(["--stage", "openai", "--candidates", cand, "--latency", str(latency)]))
    print(json.dumps({"candidates": n, "cpu_count": os.cpu_count(), "loadavg_after": os.getloadavg(),
                      "runs": runs, "pairs": pairs}, indent=2))
    reasons = ("echo", "fragment", "too_long", "adds_information", "preamble", "empty")
    print("\n| run | threads | bs | rewrites/s | s/rewrite | load s | peak RSS MB | loadavg | kept | "
          + " | ".join(reasons) + " | good |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(reasons) + "---:|")
    for r in runs:
        if r["backend"] == "local":
            print(
                f"| {r['name']} | {r['torch_threads']} | {r['batch_size']} | {r['rewrites_per_s']} | {r['seconds_per_rewrite']} "
                f"| {r['load_seconds']} | {r['peak_rss_mb']} | {r['loadavg']:.1f} | {r['kept_rate']:.0%} | "
                + " | ".join(f"{r[f'{x}_rate']:.0%}" for x in reasons) + f" | {r['good_rate']:.0%} |"
            )
        else:
            print(f"| {r['backend']}, latency {r['server_latency_s']} s, {r['requests']} req | - | - | {r['rewrites_per_s']} "
                  f"| - | - | {r['peak_rss_mb']} | - | - |" + " - |" * len(reasons) + " - |")
    for pr in pairs:
        print(f"pair {pr['pair']}: new is {pr['speedup_new_over_old']}x old's rewrites/s; load time ratio {pr['load_ratio_new_over_old']}")


if __name__ == "__main__":
    main()
