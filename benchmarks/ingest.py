"""Ingest benchmark: extract_docs + select_units at scale, against gensim's segment_wiki.

Builds a real-text dump from the embedded excerpt (its 206 pages repeated
under new titles and page ids, ``--copies`` times), written as a multistream
dump with its index and as a plain single-stream .xml.bz2. On that dump, with
equal worker counts, it measures:

* ours: a ProcessPoolExecutor of N workers over the multistream shards, each
  task running the plain stage cores extract_docs then select_units (paper
  mode: 1 document per article) on one shard; models load once per worker
  and that is counted;
* gensim: ``python -m gensim.scripts.segment_wiki -w N`` on the plain .xml.bz2;
* both sentence splitters (``--splitters senter parser``: units.sentence_splitter, the default first);
* scaling from 1 to 2 workers, and ours' peak RSS (the largest process) at 1x
  and 10x a smaller base dump (``--rss-pages``).

Every measurement runs in its own child process, so wall, CPU (children
included) and peak RSS are its own. Prints JSON figures, then one table, and
projects the full English dump (6.8 M articles) in core-hours.

    .venv/bin/python benchmarks/ingest.py [--copies 2] [--rss-pages 60] [--pages-per-shard 100] [--code-root DIR]

``--copies 20`` gives the 4,120-page dump (about 10 minutes on 2 cores).
``--code-root`` runs another checkout's tasks/ (a before/after comparison).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL_ENGLISH_ARTICLES = 6_800_000


def _paths(code_root: str | None) -> None:
    for p in (ROOT / "tests", Path(code_root) if code_root else ROOT):
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))


# -- worker side (a process of the pool) -------------------------------------


def _ingest_shard(shard, work: str, splitter: str) -> dict:
    from tasks.common import Funnel
    from tasks.extract_docs import ExtractConfig, extract_docs
    from tasks.select_units import UnitConfig, select_units

    articles = extract_docs(shard, ExtractConfig(), work)
    units = select_units([articles], UnitConfig(docs_per_article=1, sentence_splitter=splitter), work)
    ex, sel = Funnel.load(articles / "funnel.json"), Funnel.load(units / "funnel.json")
    return {
        "pages": ex.get("extract_docs", "input"),
        "articles": ex.get("extract_docs", "kept"),
        "documents": sel.get("select_units.documents", "kept"),
        "units": sel.get("select_units.candidates", "kept"),
        "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def _init_worker(code_root: str | None) -> None:
    _paths(code_root)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def child_ours(dump: str, workers: int, pages_per_shard: int, code_root: str | None, splitter: str) -> dict:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from tasks.shard import ShardConfig, plan_shards

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-work-") as work:
        # A plain .xml.bz2 is split in one pass into a multistream copy in the work folder, as the flow does.
        shards = plan_shards(dump, ShardConfig(pages_per_shard=pages_per_shard), work_dir=work)
        plan_s = time.perf_counter() - t0
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(code_root,)) as pool:
            results = list(pool.map(_ingest_shard, shards, [work] * len(shards), [splitter] * len(shards)))
    wall = time.perf_counter() - t0
    total = {k: sum(r[k] for r in results) for k in ("pages", "articles", "documents", "units")}
    return {"shards": len(shards), "plan_s": plan_s, "wall_s": wall, **total, "worker_rss_mb": max(r["rss_mb"] for r in results)}


def child_gensim(dump: str, workers: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-gensim-") as tmp:
        out = Path(tmp) / "gensim.json.gz"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "gensim.scripts.segment_wiki", "-f", dump, "-o", str(out), "-w", str(workers)],
            capture_output=True, text=True,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"gensim failed: {proc.stderr[-2000:]}")
        with gzip.open(out, "rt") as fh:
            articles = sum(1 for _ in fh)
    return {"wall_s": wall, "articles": articles}


def _child_main(args) -> None:
    _paths(args.code_root)
    if args.child == "ours":
        res = child_ours(args.dump, args.child_workers, args.pages_per_shard, args.code_root, args.child_splitter)
    else:
        res = child_gensim(args.dump, args.child_workers)
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    res["cpu_s"] = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    res["peak_rss_mb"] = max(me.ru_maxrss, kids.ru_maxrss) / 1024  # the largest single process (Linux: KiB)
    print(json.dumps(res))


# -- driver ---------------------------------------------------------------------


def _run_child(kind: str, dump: Path, workers: int, args, splitter: str = "parser") -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--dump", str(dump), "--child-workers", str(workers),
           "--pages-per-shard", str(args.pages_per_shard), "--child-splitter", splitter]
    if args.code_root:
        cmd += ["--code-root", args.code_root]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} -w {workers} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["articles_per_s"] = res["articles"] / res["wall_s"]
    res["articles_per_s_per_core"] = res["articles_per_s"] / workers
    res["articles_per_cpu_s"] = res["articles"] / res["cpu_s"]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()}


def build_dumps(copies: int, out: Path, pages: int | None = None) -> tuple[Path, Path]:
    """(multistream dump with its index beside it, plain .xml.bz2) of ``copies`` copies of the excerpt('s first ``pages`` pages)."""
    from fixtures_dumps import repeated_dump

    from tasks.assets import embedded_dump_path
    from tasks.shard import make_multistream

    plain = repeated_dump(embedded_dump_path(), out / f"enwiki-x{copies}.xml.bz2", copies=copies, pages=pages)
    multistream, _index = make_multistream(plain, out / "ms")
    return multistream, plain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=2, help="copies of the 206-page excerpt in the dump (20: 4,120 pages)")
    ap.add_argument("--rss-pages", type=int, default=60, help="base of the RSS point: the excerpt's first N pages, then 10 copies of them")
    ap.add_argument("--pages-per-shard", type=int, default=100)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--code-root", default=None, help="checkout whose tasks/ to run (default: this one)")
    ap.add_argument("--splitters", nargs="*", default=["senter", "parser"], choices=["parser", "senter"],
                    help="units.sentence_splitter values to measure (RSS: the first)")
    ap.add_argument("--skip-gensim", action="store_true")
    ap.add_argument("--skip-speed", action="store_true", help="only the memory points (1x and 10x, multistream and plain)")
    ap.add_argument("--child-splitter", default="parser", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["ours", "gensim"], help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    ap.add_argument("--child-workers", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child_main(args)
        return
    _paths(None)

    result: dict = {"cpu_count": os.cpu_count(), "copies": args.copies, "pages_per_shard": args.pages_per_shard,
                    "code_root": args.code_root or str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        multistream, plain = build_dumps(args.copies, tmp / "main")
        result["build_s"] = round(time.perf_counter() - t0, 1)
        # Alternating ours and gensim at each worker count, so that a slow spell of a shared machine hits both.
        ours: dict = {sp: {} for sp in args.splitters}
        gensim: dict = {}
        for w in ([] if args.skip_speed else args.workers):
            for sp in args.splitters:
                ours[sp][w] = _run_child("ours", multistream, w, args, sp)
            if not args.skip_gensim:
                gensim[w] = _run_child("gensim", plain, w, args)
        rss_base, rss_base_plain = build_dumps(1, tmp / "rss1", pages=args.rss_pages)
        rss_10x, rss_10x_plain = build_dumps(10, tmp / "rss10", pages=args.rss_pages)
        sp0 = args.splitters[0]
        rss = {"1x": _run_child("ours", rss_base, 1, args, sp0), "10x": _run_child("ours", rss_10x, 1, args, sp0),
               "1x plain": _run_child("ours", rss_base_plain, 1, args, sp0),
               "10x plain": _run_child("ours", rss_10x_plain, 1, args, sp0)}
    result.update(ours={sp: {str(k): v for k, v in r.items()} for sp, r in ours.items()},
                  gensim={str(k): v for k, v in gensim.items()}, rss={"base_pages": args.rss_pages, "splitter": sp0, **rss})
    w_lo, w_hi = min(args.workers), max(args.workers)
    result["rss_10x_over_1x"] = {kind: round(rss[f"10x{kind}"]["peak_rss_mb"] / rss[f"1x{kind}"]["peak_rss_mb"], 2)
                                 for kind in ("", " plain")}
    # Linear growth of a plain dump: planning (the one-pass split) and planning + extraction at 10x over 1x
    # (10 is linear, 100 quadratic; the whole run also holds a fixed start-up of models and imports).
    result["plain_10x_over_1x"] = {k: round(rss["10x plain"][k] / rss["1x plain"][k], 2) for k in ("plan_s", "wall_s")}
    if args.skip_speed:
        print(json.dumps(result, indent=2))
        return
    result["scaling"] = {sp: round(r[w_lo]["wall_s"] / r[w_hi]["wall_s"], 2) if w_hi != w_lo else None for sp, r in ours.items()}
    result["vs_gensim"] = {sp: {str(w): round(r[w]["articles_per_s"] / gensim[w]["articles_per_s"], 2) for w in gensim}
                           for sp, r in ours.items()}
    result["full_english_core_hours"] = {sp: round(FULL_ENGLISH_ARTICLES / r[w_lo]["articles_per_s_per_core"] / 3600, 1)
                                         for sp, r in ours.items()}
    if gensim:
        result["full_english_core_hours_gensim"] = round(FULL_ENGLISH_ARTICLES / gensim[w_lo]["articles_per_s_per_core"] / 3600, 1)
    print(json.dumps(result, indent=2))

    pages = ours[sp0][w_lo]["pages"]
    print(f"\n{pages} pages ({args.copies} copies of the excerpt), {args.pages_per_shard} pages per shard; "
          f"ours = extract_docs + select_units (paper mode), gensim = segment_wiki\n")
    print("| run | workers | articles | wall s | CPU s | peak RSS MiB | articles/s | articles/s/core | vs gensim |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for sp, w, r in [(sp, w, r) for sp, rs in ours.items() for w, r in rs.items()]:
        vs = result["vs_gensim"][sp].get(str(w), "")
        print(f"| ours, {sp} | {w} | {r['articles']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['articles_per_s']:.1f} | {r['articles_per_s_per_core']:.1f} | {vs}x |")
    for w, r in gensim.items():
        print(f"| gensim | {w} | {r['articles']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['articles_per_s']:.1f} | {r['articles_per_s_per_core']:.1f} | 1x |")
    for size, r in rss.items():
        print(f"| ours, {sp0}, RSS {size} ({r['pages']} pages, plan {r['plan_s']:.1f} s) | 1 | {r['articles']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['articles_per_s']:.1f} | {r['articles_per_s_per_core']:.1f} | |")
    print(f"\nscaling {w_lo} -> {w_hi} workers: {result['scaling']}; peak RSS 10x / 1x: {result['rss_10x_over_1x']}; "
          f"plain dump 10x / 1x: {result['plain_10x_over_1x']}; "
          f"full English dump ({FULL_ENGLISH_ARTICLES:,} articles), core-hours: {result['full_english_core_hours']}"
          + (f" (gensim segment_wiki: {result['full_english_core_hours_gensim']})" if gensim else ""))


if __name__ == "__main__":
    main()
