"""Ingest benchmark: extract_docs and select_units on a dump (default: the embedded one).

Each stage runs in its own child process so its peak memory (ru_maxrss) is its
own; gensim's Wikipedia extraction (``gensim.scripts.segment_wiki``) runs on
the same dump and cores as the reference. Prints JSON, then a short table.

    .venv/bin/python benchmarks/ingest.py [--dump PATH]
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
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def stage_extract(dump: str, work: str) -> dict:
    from tasks.common import Funnel
    from tasks.extract_docs import ExtractConfig, extract_docs
    from tasks.shard import ShardConfig, plan_shards

    t0 = time.perf_counter()
    shards = plan_shards(dump, ShardConfig())
    t_plan = time.perf_counter() - t0
    outs = [extract_docs(s, ExtractConfig(), work) for s in shards]
    seconds = time.perf_counter() - t0
    funnel = Funnel()
    for o in outs:
        funnel.merge(Funnel.load(o / "funnel.json"))
    pages, articles = funnel.get("extract_docs", "input"), funnel.get("extract_docs", "kept")
    return {
        "stage": "extract_docs",
        "seconds": round(seconds, 3),
        "plan_seconds": round(t_plan, 3),
        "shards": len(shards),
        "pages": pages,
        "articles": articles,
        "pages_per_s": round(pages / seconds, 1),
        "articles_per_s": round(articles / seconds, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "outputs": [str(o) for o in outs],
        "funnel": funnel.to_dict(),
    }


def stage_select(article_dirs: list[str], work: str) -> dict:
    from tasks.common import Funnel
    from tasks.select_units import DOC_STAGE, SENTENCE_STAGE, UnitConfig, load_nlp, load_tokenizer, select_units

    config = UnitConfig()
    t0 = time.perf_counter()
    load_nlp(config.spacy_model)
    load_tokenizer(config.tokenizer_path)
    t_load = time.perf_counter() - t0
    t1 = time.perf_counter()
    outs = [select_units([d], config, work) for d in article_dirs]
    seconds = time.perf_counter() - t1
    funnel = Funnel()
    for o in outs:
        funnel.merge(Funnel.load(o / "funnel.json"))
    articles = funnel.get("select_units.articles", "input")
    sentences = funnel.get(SENTENCE_STAGE, "input")
    return {
        "stage": "select_units",
        "seconds": round(seconds, 3),
        "model_load_seconds": round(t_load, 3),
        "articles": articles,
        "documents": funnel.get(DOC_STAGE, "kept"),
        "sentences": sentences,
        "units": funnel.get("select_units.candidates", "kept"),
        "articles_per_s": round(articles / seconds, 1),
        "sentences_per_s": round(sentences / seconds, 1),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "funnel": funnel.to_dict(),
    }


def _child(args: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"stage {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_gensim(dump: str, tmp: str) -> dict:
    out = Path(tmp) / "gensim.json.gz"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "gensim.scripts.segment_wiki", "-i", "-f", dump, "-o", str(out)],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": proc.stderr[-500:]}
    import gzip

    with gzip.open(out, "rt") as fh:
        articles = sum(1 for _ in fh)
    return {"seconds": round(seconds, 3), "articles": articles}


def main() -> None:
    from tasks.assets import embedded_dump_path

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", default=None, help="dump to read (default: the embedded excerpt)")
    parser.add_argument("--stage", choices=["extract", "select"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--inputs", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    dump = args.dump or str(embedded_dump_path())
    if args.stage == "extract":
        print(json.dumps(stage_extract(dump, args.work)))
        return
    if args.stage == "select":
        print(json.dumps(stage_select(args.inputs, args.work)))
        return

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        extract = _child(["--dump", dump, "--stage", "extract", "--work", tmp])
        select = _child(["--stage", "select", "--work", tmp, "--inputs", *extract.pop("outputs")])
        gensim = run_gensim(dump, tmp)
    result = {
        "dump": Path(dump).name,
        "cpu_count": os.cpu_count(),
        "extract_docs": extract,
        "select_units": select,
        "gensim_segment_wiki": gensim,
        "extract_vs_gensim_time_ratio": round(extract["seconds"] / gensim["seconds"], 2) if "seconds" in gensim else None,
    }
    print(json.dumps(result, indent=2, ensure_ascii=False))
    rows = [
        ("extract_docs", extract["seconds"], f"{extract['pages_per_s']} pages/s, {extract['articles_per_s']} articles/s", "-", extract["peak_rss_mb"]),
        (
            "select_units",
            select["seconds"],
            f"{select['articles_per_s']} articles/s",
            f"{select['sentences_per_s']}",
            select["peak_rss_mb"],
        ),
        ("gensim segment_wiki", gensim.get("seconds"), f"{gensim.get('articles')} articles", "-", "-"),
    ]
    print()
    print(f"{'stage':<22}{'seconds':>9}  {'throughput':<40}{'sent/s':>9}{'peak MB':>10}")
    for name, sec, thr, sps, mem in rows:
        print(f"{name:<22}{sec!s:>9}  {thr:<40}{sps!s:>9}{mem!s:>10}")
    print(
        f"\nselect_units model load: {select['model_load_seconds']} s (not in its seconds); "
        f"documents {select['documents']}, units {select['units']}; "
        f"extract_docs / gensim time ratio: {result['extract_vs_gensim_time_ratio']}"
    )


if __name__ == "__main__":
    main()
