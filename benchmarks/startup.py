"""Start-up benchmark: seconds from the shell prompt to a `gear` command's first task.

Runs, each as a whole fresh process (cold Python, warm disk cache), without
PREFECT_API_URL (as a user runs `gear`):

* ``gear build-dataset --until select_units`` on the 3-page Bulgarian excerpt
  in gensim's test data, to the end (the whole command's wall time too);
* ``gear train`` on a built dataset, stopped once its first task has started;
* ``gear evaluate`` on the same dataset, stopped once its first task has started.

The first task's start is Prefect's "Created task run" record (logged at
DEBUG on ``prefect.task_runs``, which this script turns on); the temporary
server's start and the flow run's beginning are read from the same log, so
each command's time splits into: before the Prefect API is asked for
(imports, parameters), the API's start, and the flow run up to its first task.

    .venv/bin/python benchmarks/startup.py [--repeat 3] [--dataset data] [--code-root DIR]

``--dataset`` is a build output folder (default ``data``, which `gear
pipeline` fills); without one, train and evaluate are skipped. ``--code-root``
runs another checkout's gear_cli.py (a before/after comparison: e.g. ``git
worktree add /tmp/before <rev>``). Prints JSON figures, then one table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DUMP = "bgwiki-latest-pages-articles-shortened.xml.bz2"
# Prefect's console lines start with the local time of the record.
_STAMP = re.compile(r"^(\d\d:\d\d:\d\d\.\d\d\d) \| (\w+)\s*\| (.*)$")


def _when(stamp: str, day: dt.date) -> float:
    return dt.datetime.combine(day, dt.time.fromisoformat(stamp)).timestamp()


def run_once(argv: list[str], cwd: Path, stop_at_first_task: bool, timeout_s: float = 600) -> dict:
    """One command in a fresh process; the times of its log marks, in seconds from its start."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL="DEBUG")
    started = time.time()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    marks: dict[str, float] = {}
    tail: list[str] = []
    deadline = time.monotonic() + timeout_s
    for line in proc.stdout:
        tail = (tail + [line])[-40:]
        m = _STAMP.match(line)
        if m:
            at = _when(m.group(1), dt.date.fromtimestamp(started)) - started
            text = m.group(3)
            if "Starting temporary server" in text or "Prefect API: starting" in text:
                marks.setdefault("api_start", at)
            elif "Beginning flow run" in text:
                marks.setdefault("flow_begins", at)
            elif "Created task run" in text:
                marks.setdefault("first_task", at)
                if stop_at_first_task:
                    break
        if time.monotonic() > deadline:
            break
    marks["wall"] = time.time() - started
    if stop_at_first_task and proc.poll() is None:
        # Ctrl-C, as a user stops it (its exit hooks stop the API and remove its database); then for sure.
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    proc.stdout.read()
    rc = proc.wait()
    if "first_task" not in marks:
        raise RuntimeError(f"{' '.join(argv[-6:])}: no task started (rc {rc}):\n{''.join(tail)}")
    if not stop_at_first_task and rc != 0:
        raise RuntimeError(f"{' '.join(argv[-6:])}: rc {rc}:\n{''.join(tail)}")
    return {k: round(v, 2) for k, v in marks.items()}


def commands(gear: list[str], dataset: Path | None, work: Path) -> dict[str, tuple[list[str], bool]]:
    import gensim

    dump = Path(gensim.__file__).parent / "test" / "test_data" / DUMP
    out = {"build-dataset (3 pages, --until select_units)": (
        [*gear, "build-dataset", "--until", "select_units", "--dump", str(dump), "--output-dir", str(work / "build")],
        False)}
    if dataset is not None:
        out["train (to its first task)"] = (
            [*gear, "train", "--dataset", str(dataset), "--output-dir", str(work / "train"), "--max-steps", "1"], True)
        out["evaluate (to its first task)"] = (
            [*gear, "evaluate", "--dataset", str(dataset), "--model", str(work / "no-model"),
             "--output-dir", str(work / "eval")], True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="Runs per command (the median is reported).")
    ap.add_argument("--dataset", type=Path, default=ROOT / "data", help="A build output folder for train and evaluate.")
    ap.add_argument("--code-root", type=Path, default=None, help="Another checkout whose gear_cli.py to run.")
    args = ap.parse_args()
    code_root = (args.code_root or ROOT).resolve()
    # The checkout's own modules first: -c puts the working directory at the head of sys.path.
    gear = [sys.executable, "-c", "import sys, gear_cli; sys.exit(gear_cli.app())"]
    dataset = args.dataset.resolve() if (args.dataset / "datasets" / "LATEST").is_file() else None
    if dataset is None:
        print(f"no dataset under {args.dataset}: train and evaluate skipped", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gear-startup-") as tmp:
        for name, (argv, stop) in commands(gear, dataset, Path(tmp)).items():
            runs = []
            for i in range(args.repeat):
                work = Path(tmp) / f"{len(rows)}-{i}"
                argv_i = [a.replace(tmp, str(work)) if a.startswith(tmp) else a for a in argv]
                runs.append(run_once(argv_i, code_root, stop))
            med = {k: round(statistics.median(r[k] for r in runs if k in r), 2)
                   for k in runs[0] if all(k in r for r in runs)}
            rows.append({"command": name, "code_root": str(code_root), "median": med, "runs": runs})
            print(json.dumps(rows[-1]), flush=True)
    print()
    print(f"code: {code_root}; median of {args.repeat} runs, seconds from the command")
    print("| command | API asked for | flow run begins | first task | whole command |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        m = r["median"]
        whole = "(stopped)" if "first task)" in r["command"] else f"{m['wall']:.2f}"
        print(f"| {r['command']} | {m.get('api_start', float('nan')):.2f} | {m.get('flow_begins', float('nan')):.2f} | "
              f"{m['first_task']:.2f} | {whole} |")


if __name__ == "__main__":
    main()
