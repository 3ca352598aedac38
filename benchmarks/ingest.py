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

``--cli`` measures what a user runs instead: the whole process ``gear
build-dataset --dump D --output-dir <fresh> --until select_units --workers 2``
against ``python -m gensim.scripts.segment_wiki -w 2 -f D -o <out>`` on the
same multistream dump, alternating (the first of each pair alternates too), at
206, 1,030 and 4,120 pages; wall time, the ratio to gensim, CPU and peak RSS
of each. Its fixed cost is the seconds from launch to the flow run's
beginning and to its first task (Prefect's "Created task run" record), and a
3-page build's whole wall time. Each `gear` runs as a user's first command
(``--api cold``: it starts the local Prefect API and the script waits for it
to stop before the next run) in a fresh PREFECT_HOME, after one untimed
warm-up of each command (the API's migrated database template, made once per
machine, and a warm disk cache). The full comparison:

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ingest.py --cli --repeat 3

(about 10 minutes on 2 quiet cores; ``--sizes 206 --repeat 1`` is a smoke run).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import resource
import shutil
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


# -- --cli: the whole `gear build-dataset` process against segment_wiki --------

EXCERPT_PAGES = 206  # pages of the embedded excerpt, the unit of --sizes
FIXED_PAGES = 3  # the smallest build: its wall time is nearly all fixed cost
# The log lines that mark the CLI's fixed cost (task runs log "Created task run" at DEBUG, turned on below).
CLI_MARKS = {"flow_begins": "Beginning flow run", "first_task": "Created task run"}
_FUNNEL_ROW = re.compile(r"^\| ([\w.]+) \| ([\w:.-]+) \| (\d+) \|$")


def _cli_env(home: Path, idle_s: int) -> dict[str, str]:
    """A user's environment without PREFECT_* (so `gear` starts its own local API) in a fresh PREFECT_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PREFECT_HOME=str(home), GEAR_API_IDLE_SECONDS=str(idle_s),
               PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL="DEBUG")
    return env


def _api_pids(home: Path) -> list[int]:
    """The local API servers that `gear` records under PREFECT_HOME (each runs in its own session, outside the tree)."""
    pids = []
    for info in home.rglob("server.json"):
        try:
            pids.append(int(json.loads(info.read_text())["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return pids


def _wait_no_api(home: Path, timeout_s: float = 60) -> None:
    """Wait for the local API to stop, so that a cold run starts its own and no server's shutdown
    takes CPU from the next run."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while any(psutil.pid_exists(p) for p in _api_pids(home)) and time.monotonic() < deadline:
        time.sleep(0.2)


def _stop_api(home: Path) -> None:
    import signal

    for pid in _api_pids(home):
        try:
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    _wait_no_api(home)


def _gear_argv(code_root: str | None) -> tuple[list[str], Path]:
    """The `gear` command and its working folder: the venv's entry point, or another checkout's gear_cli.py."""
    entry = Path(sys.executable).parent / "gear"
    if code_root is None and entry.exists():
        return [str(entry)], ROOT
    # Run as a script, its folder heads sys.path: that checkout's modules come first.
    root = Path(code_root or ROOT).resolve()
    return [sys.executable, str(root / "gear_cli.py")], root


def _run_cli(dump: Path, out: Path, args, home: Path, timed: bool = True) -> dict:
    from process_tree import measure

    gear, cwd = _gear_argv(args.code_root)
    argv = [*gear, "build-dataset", "--dump", str(dump), "--output-dir", str(out), "--until", "select_units",
            "--workers", str(args.cli_workers)]
    res = measure(argv, cwd=cwd, env=_cli_env(home, 0 if args.api == "cold" else 600), marks=CLI_MARKS,
                  extra_pids=lambda: _api_pids(home), timeout_s=args.run_timeout)
    if res["rc"] != 0:
        raise SystemExit(f"gear build-dataset on {dump.name} failed (rc {res['rc']}):\n{''.join(res['output'][-40:])}")
    funnel = {}
    for line in res.pop("output"):
        m = _FUNNEL_ROW.match(line.strip())
        if m:
            funnel[f"{m.group(1)}:{m.group(2)}"] = int(m.group(3))
    res["documents"] = funnel.get("select_units.documents:kept")
    res["units"] = funnel.get("select_units.candidates:kept")
    shutil.rmtree(out, ignore_errors=True)
    if args.api == "cold":
        _wait_no_api(home)
    return _rounded(res)


def _run_gensim(dump: Path, out: Path, args) -> dict:
    from process_tree import measure

    argv = [sys.executable, "-m", "gensim.scripts.segment_wiki", "-w", str(args.cli_workers), "-f", str(dump),
            "-o", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = measure(argv, cwd=ROOT, env=env, timeout_s=args.run_timeout)
    if res["rc"] != 0:
        raise SystemExit(f"gensim on {dump.name} failed (rc {res['rc']}):\n{''.join(res['output'][-40:])}")
    res.pop("output")
    with gzip.open(out, "rt") as fh:
        res["articles"] = sum(1 for _ in fh)
    out.unlink()
    return _rounded(res)


def _rounded(res: dict) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()}


def _median(runs: list[dict]) -> dict:
    import statistics

    keys = [k for k, v in runs[0].items()
            if k != "rc" and isinstance(v, (int, float)) and all(r.get(k) is not None for r in runs)]
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in keys}


def _pairs(dump: Path, tmp: Path, args, home: Path, label: str) -> dict:
    """``args.repeat`` alternating pairs of the CLI and gensim on one dump, the first of each pair alternating,
    so that a slow spell of a shared machine hits both alike."""
    cli, gensim = [], []
    for i in range(args.repeat):
        order = ("cli", "gensim") if i % 2 == 0 else ("gensim", "cli")
        for kind in order:
            if kind == "cli":
                cli.append(_run_cli(dump, tmp / f"out-{label}-{i}", args, home))
            else:
                gensim.append(_run_gensim(dump, tmp / f"gensim-{label}-{i}.json.gz", args))
            r = (cli if kind == "cli" else gensim)[-1]
            print(f"{label}: {kind} #{i + 1}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MiB",
                  file=sys.stderr, flush=True)
    ratios = [round(c["wall_s"] / g["wall_s"], 2) for c, g in zip(cli, gensim)]
    import statistics

    return {"cli": {"median": _median(cli), "runs": cli}, "gensim": {"median": _median(gensim), "runs": gensim},
            "ratio": round(statistics.median(ratios), 2), "ratios": ratios}


def _size_dump(pages: int, out: Path) -> Path:
    if pages < EXCERPT_PAGES:
        return build_dumps(1, out, pages=pages)[0]
    if pages % EXCERPT_PAGES:
        raise SystemExit(f"--sizes: {pages} is neither under {EXCERPT_PAGES} nor a multiple of it")
    return build_dumps(pages // EXCERPT_PAGES, out)[0]


def cli_main(args) -> None:
    gear, cwd = _gear_argv(args.code_root)
    result: dict = {"mode": "cli", "cpu_count": os.cpu_count(), "workers": args.cli_workers, "api": args.api,
                    "repeat": args.repeat, "code_root": str(cwd), "gear": " ".join(gear)}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-cli-") as tmp:
        tmp = Path(tmp)
        home = tmp / "prefect-home"
        try:
            fixed_dump = _size_dump(FIXED_PAGES, tmp / f"p{FIXED_PAGES}")
            dumps = {p: _size_dump(p, tmp / f"p{p}") for p in args.sizes}
            if not args.no_warmup:
                # Untimed: the API's migrated database template (once per machine and Prefect version), and
                # the imports, models and dumps in the disk cache, as for any command after the first.
                _run_cli(fixed_dump, tmp / "out-warmup", args, home)
                _run_gensim(fixed_dump, tmp / "gensim-warmup.json.gz", args)
            result["fixed"] = {"pages": FIXED_PAGES, **_pairs(fixed_dump, tmp, args, home, f"{FIXED_PAGES} pages")}
            result["sizes"] = {str(p): {"pages": p, **_pairs(d, tmp, args, home, f"{p} pages")} for p, d in dumps.items()}
        finally:
            _stop_api(home)
    sizes = result["sizes"]
    lo, hi = str(min(args.sizes)), str(max(args.sizes))
    if lo != hi:
        # What a page costs beyond the fixed cost, from the smallest to the largest dump.
        span = (int(hi) - int(lo)) / 1000
        result["marginal_s_per_1000_pages"] = {
            k: round((sizes[hi][k]["median"]["wall_s"] - sizes[lo][k]["median"]["wall_s"]) / span, 2)
            for k in ("cli", "gensim")}
        result["cli_peak_rss_largest_over_smallest"] = round(
            sizes[hi]["cli"]["median"]["peak_rss_mb"] / sizes[lo]["cli"]["median"]["peak_rss_mb"], 2)
    print(json.dumps(result, indent=2))

    def cell(m: dict, key: str) -> str:
        return f"{m[key]:.1f}" if key in m else ""

    print(f"\nwhole processes on the same multistream dump, {args.cli_workers} workers each, API {args.api}, "
          f"median of {args.repeat}; cli = gear build-dataset --until select_units, gensim = segment_wiki\n")
    print("| pages | run | wall s | vs gensim | flow begins s | first task s | CPU s | peak RSS MiB (largest process) "
          "| peak RSS MiB (tree) | documents / articles |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in [result["fixed"], *sizes.values()]:
        c, g = row["cli"]["median"], row["gensim"]["median"]
        print(f"| {row['pages']:,} | cli | {c['wall_s']:.1f} | {row['ratio']}x | {cell(c, 'flow_begins_s')} | "
              f"{cell(c, 'first_task_s')} | {c['cpu_s']:.1f} | {c['peak_rss_mb']:.0f} | {c['peak_tree_rss_mb']:.0f} | "
              f"{c.get('documents', '')} |")
        print(f"| {row['pages']:,} | gensim | {g['wall_s']:.1f} | 1x | | | {g['cpu_s']:.1f} | {g['peak_rss_mb']:.0f} | "
              f"{g['peak_tree_rss_mb']:.0f} | {g['articles']} |")
    f = result["fixed"]["cli"]["median"]
    print(f"\nfixed cost of the CLI: first task {f.get('first_task_s', float('nan')):.1f} s after launch (flow run "
          f"{f.get('flow_begins_s', float('nan')):.1f} s); a {FIXED_PAGES}-page build {f['wall_s']:.1f} s in all"
          + (f"; marginal seconds per 1,000 pages: {result['marginal_s_per_1000_pages']}; CLI peak RSS "
             f"{hi} / {lo} pages: {result['cli_peak_rss_largest_over_smallest']}x" if lo != hi else ""))


def main() -> None:
    # The whole docstring, so that --help shows the command of the full --cli comparison.
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=2, help="copies of the 206-page excerpt in the dump (20: 4,120 pages)")
    ap.add_argument("--rss-pages", type=int, default=60, help="base of the RSS point: the excerpt's first N pages, then 10 copies of them")
    ap.add_argument("--pages-per-shard", type=int, default=100)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--code-root", default=None, help="checkout whose tasks/ to run (default: this one)")
    ap.add_argument("--splitters", nargs="*", default=["senter", "parser"], choices=["parser", "senter"],
                    help="units.sentence_splitter values to measure (RSS: the first)")
    ap.add_argument("--skip-gensim", action="store_true")
    ap.add_argument("--skip-speed", action="store_true", help="only the memory points (1x and 10x, multistream and plain)")
    ap.add_argument("--cli", action="store_true",
                    help="whole `gear build-dataset --until select_units` against whole segment_wiki (see above)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[206, 1030, 4120],
                    help=f"--cli: dump sizes in pages (under {EXCERPT_PAGES} or a multiple of it)")
    ap.add_argument("--cli-workers", type=int, default=2, help="--cli: workers of both (gear --workers, gensim -w)")
    ap.add_argument("--repeat", type=int, default=1, help="--cli: alternating pairs per size (the median is reported)")
    ap.add_argument("--api", choices=["cold", "warm"], default="cold",
                    help="--cli: cold: each gear starts the local Prefect API; warm: it finds one running")
    ap.add_argument("--no-warmup", action="store_true", help="--cli: no untimed first run of each command")
    ap.add_argument("--run-timeout", type=float, default=1800, help="--cli: seconds before a run is killed")
    ap.add_argument("--child-splitter", default="parser", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["ours", "gensim"], help=argparse.SUPPRESS)
    ap.add_argument("--dump", help=argparse.SUPPRESS)
    ap.add_argument("--child-workers", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child_main(args)
        return
    _paths(None)
    if args.cli:
        cli_main(args)
        return

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
