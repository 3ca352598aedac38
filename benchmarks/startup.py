"""Start-up benchmark: seconds from the shell prompt to a `gear` command's first task.

Runs, each as a whole fresh process (cold Python, warm disk cache), without
PREFECT_API_URL (as a user runs `gear`):

* ``gear build-dataset --until select_units`` on the 3-page Bulgarian excerpt
  in gensim's test data, to the end (the whole command's wall time too);
* ``gear train`` on a built dataset, stopped once its first task has started;
* ``gear evaluate`` on the same dataset, stopped once its first task has started.

Each command runs in two settings: with no local Prefect API running, so the
command starts one (``cold API``: GEAR_API_IDLE_SECONDS=0, and the script waits
for the server to stop between runs), and with the API another `gear` left
running (``warm API``). PREFECT_HOME is a fresh folder; an untimed `gear
selftest` first makes its migrated database template, as a first command on a
machine does once. A checkout without the shared API (``--code-root`` of an
older revision) starts its own server in every run whatever the setting.

The first task's start is Prefect's "Created task run" record (logged at
DEBUG on ``prefect.task_runs``, which this script turns on); the flow run's
beginning is read from the same log.

    .venv/bin/python benchmarks/startup.py [--repeat 3] [--dataset data] [--code-root DIR] [--api cold warm]

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
# The shared local API's record of its server (flows/local_api.py: LocalApi).
_SERVER_INFO = "gear-api-*/server.json"


def _when(stamp: str, day: dt.date) -> float:
    return dt.datetime.combine(day, dt.time.fromisoformat(stamp)).timestamp()


def _env(home: Path, idle_s: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", PREFECT_HOME=str(home), GEAR_API_IDLE_SECONDS=str(idle_s),
               PREFECT_LOGGING_LOGGERS_PREFECT_TASK_RUNS_LEVEL="DEBUG")
    return env


def run_once(argv: list[str], cwd: Path, env: dict[str, str], stop_at_first_task: bool,
             timeout_s: float = 600) -> dict:
    """One command in a fresh process; the times of its log marks, in seconds from its start."""
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
            if "Beginning flow run" in m.group(3):
                marks.setdefault("flow_begins", at)
            elif "Created task run" in m.group(3):
                marks.setdefault("first_task", at)
                if stop_at_first_task:
                    break
        if time.monotonic() > deadline:
            break
    marks["wall"] = time.time() - started
    if stop_at_first_task and proc.poll() is None:
        # Ctrl-C, as a user stops it (its exit hooks run); then for sure.
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


def _servers(home: Path) -> list[dict]:
    out = []
    for path in home.glob(_SERVER_INFO):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
    return out


def _wait_no_server(home: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while _servers(home) and time.monotonic() < deadline:
        time.sleep(0.2)


def _stop_servers(home: Path) -> None:
    for info in _servers(home):
        try:
            os.kill(info["pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
    _wait_no_server(home)


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
    ap.add_argument("--repeat", type=int, default=3, help="Runs per command and setting (the median is reported).")
    ap.add_argument("--dataset", type=Path, default=ROOT / "data", help="A build output folder for train and evaluate.")
    ap.add_argument("--code-root", type=Path, default=None, help="Another checkout whose gear_cli.py to run.")
    ap.add_argument("--api", nargs="+", choices=("cold", "warm"), default=["cold", "warm"],
                    help="cold: each command starts the local API; warm: it finds one running.")
    args = ap.parse_args()
    code_root = (args.code_root or ROOT).resolve()
    # What a user runs: the venv's `gear`; another checkout's gear_cli.py as a script (its
    # folder heads sys.path, so that checkout's modules come first).
    entry = Path(sys.executable).parent / "gear"
    gear = [str(entry)] if args.code_root is None and entry.exists() else [sys.executable, str(code_root / "gear_cli.py")]
    dataset = args.dataset.resolve() if (args.dataset / "datasets" / "LATEST").is_file() else None
    if dataset is None:
        print(f"no dataset under {args.dataset}: train and evaluate skipped", file=sys.stderr)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gear-startup-") as tmp:
        home = Path(tmp) / "prefect-home"
        # Untimed: the migrated template (made once per machine and Prefect version).
        subprocess.run([*gear, "selftest"], cwd=code_root, env=_env(home, 0), check=True, capture_output=True)
        _wait_no_server(home)
        try:
            for api in args.api:
                idle_s = 0 if api == "cold" else 600
                if api == "warm":
                    subprocess.run([*gear, "selftest"], cwd=code_root, env=_env(home, idle_s), check=True,
                                   capture_output=True)
                for name, (argv, stop) in commands(gear, dataset, Path(tmp)).items():
                    runs = []
                    for i in range(args.repeat):
                        work = Path(tmp) / f"{len(rows)}-{i}"
                        argv_i = [a.replace(tmp, str(work)) if a.startswith(tmp) else a for a in argv]
                        runs.append(run_once(argv_i, code_root, _env(home, idle_s), stop))
                        if api == "cold":
                            _wait_no_server(home)
                    med = {k: round(statistics.median(r[k] for r in runs), 2)
                           for k in runs[0] if all(k in r for r in runs)}
                    rows.append({"command": name, "api": api, "code_root": str(code_root), "median": med, "runs": runs})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            _stop_servers(home)
    print()
    print(f"code: {code_root}; median of {args.repeat} runs, seconds from the command")
    print("| command | local API | flow run begins | first task | whole command |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        m = r["median"]
        whole = "(stopped)" if "first task)" in r["command"] else f"{m['wall']:.2f}"
        print(f"| {r['command']} | {r['api']} | {m.get('flow_begins', float('nan')):.2f} | {m['first_task']:.2f} | {whole} |")


if __name__ == "__main__":
    main()
