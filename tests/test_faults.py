"""The fault-injection suite (issue 13 item 7): real `gear build-dataset`
processes killed by SIGKILL at the stage runner's failpoints
(tasks/common.py ``failpoint``; ``GEAR_FAILPOINT=<name>`` makes the process
group die there) and re-run in the same output folder; two builds started
at once on one folder; a chat endpoint that answers junk and then times out;
a killed training run resumed from a corrupted latest checkpoint.

Every build runs on a slice of the embedded dump (3 shards of 20 pages, up to
3 documents per article, 2 units per document: 14 rewritten units over two
non-empty shards, both splits non-empty) with the openai backend against
tasks/rewriters/testing.py's FakeChatServer (a real local HTTP server, in this
process, so it outlives the killed builds and counts every request).

The CLI processes are started in their own session (``start_new_session``),
so a failpoint's ``killpg`` ends the build and its children, never pytest.
Except for the concurrency test (which runs the CLI exactly as a user does:
each process starts its temporary Prefect API on one shared PREFECT_HOME),
the builds talk to the session's Prefect test API (PREFECT_API_URL), which
saves the ~15 s start of a temporary server per process; what is under test
(the stage folders, locks, markers and LATEST) is the same either way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import polars as pl
import pytest

from tasks.rewriters.testing import FakeChatServer

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
GEAR = REPO / ".venv" / "bin" / "gear"
PYTHON = REPO / ".venv" / "bin" / "python"
RUN_TIMEOUT_S = 300

# The slice: see the module docstring (the --dry-run keys of `gear build-dataset`).
SLICE = [
    "shard.pages_per_shard=20",
    "shard.max_shards=3",
    "units.docs_per_article=3",
    "rewrite.backend=openai",
    "rewrite.units_per_doc=2",
    "rewrite.backoff_base_s=0.01",
    "relevance.max_length=256",
    "triples.test_fraction=0.4",
]


# --------------------------------------------------------------------------
# Running the CLI.


class Run:
    """A finished CLI process: return code, output, wall time."""

    def __init__(self, proc: subprocess.Popen, started: float):
        try:
            self.stdout, self.stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            self.stdout, self.stderr = proc.communicate()
            pytest.fail(f"gear did not finish within {RUN_TIMEOUT_S} s:\n{self.stderr[-3000:]}")
        self.returncode = proc.returncode
        self.seconds = time.monotonic() - started
        self.pid = proc.pid  # also its process group (a session of its own)

    @property
    def dataset(self) -> Path:
        found = re.findall(r"^dataset: (.+)$", self.stdout, flags=re.M)
        assert found, f"no 'dataset:' line (rc {self.returncode}):\n{self.stdout[-2000:]}\n{self.stderr[-3000:]}"
        return Path(found[-1])

    def __repr__(self) -> str:
        return f"<gear rc={self.returncode} {self.seconds:.1f}s>"


def _env(prefect_home: Path, prefect_api: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GEAR_FAILPOINT", "PREFECT_API_URL")}
    env.update(PREFECT_HOME=str(prefect_home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    if prefect_api:
        env["PREFECT_API_URL"] = prefect_api
    return env


def start_build(out: Path, base_url: str, env: dict[str, str], *sets: str, argv: list[str] | None = None) -> tuple:
    cmd = [*(argv or [str(GEAR)]), "build-dataset", "--output-dir", str(out)]
    for item in [*SLICE, f"rewrite.base_url={base_url}", *sets]:
        cmd += ["--set", item]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return proc, started


def build(out: Path, base_url: str, env: dict[str, str], *sets: str, argv: list[str] | None = None) -> Run:
    return Run(*start_build(out, base_url, env, *sets, argv=argv))


def digests(dataset_dir: Path) -> dict[str, str]:
    return {name: hashlib.sha256((dataset_dir / name).read_bytes()).hexdigest() for name in ("train.parquet", "test.parquet")}


def partials(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob(".*.partial")) if folder.exists() else []


def assert_clean_published(out: Path, reference: dict) -> None:
    """The re-run's dataset is the reference, LATEST names it, nothing half-made is visible."""
    datasets = out / "datasets"
    version = reference["version"]
    assert (datasets / "LATEST").read_text().strip() == version
    assert digests(datasets / version) == reference["digests"]
    assert sorted(p.name for p in datasets.iterdir()) == sorted(["LATEST", version])  # no .partial, no other version
    assert [p for p in datasets.rglob(".*.tmp")] == []
    assert all((d / "_SUCCESS.json").is_file() for d in datasets.iterdir() if d.is_dir())
    assert partials(out / "stages") == []
    assert [p for p in (out / "stages").rglob(".*.tmp")] == []


# --------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def prefect_api(prefect_harness) -> str:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("prefect-home")


@pytest.fixture(scope="module")
def reference(prefect_api, prefect_home, tmp_path_factory) -> dict:
    """One uninterrupted build of the slice: its dataset, its requests."""
    out = tmp_path_factory.mktemp("reference")
    with FakeChatServer() as srv:
        run = build(out, srv.base_url, _env(prefect_home, prefect_api))
        assert run.returncode == 0, run.stderr[-3000:]
        attempts = Counter(srv.attempts)
    dataset = run.dataset
    ref = {"out": out, "version": dataset.name, "digests": digests(dataset), "requests": sum(attempts.values()),
           "units": set(attempts), "seconds": run.seconds}
    # 14 units on the embedded dump; enough that junk (6) and timeouts share them.
    assert ref["requests"] == len(ref["units"]) >= 10 and set(attempts.values()) == {1}
    counts = json.loads((dataset / "dataset_card.json").read_text())["counts"]
    assert counts["train_triples"] > 0 and counts["test_triples"] > 0
    print(f"\n[faults] reference: rc 0 in {run.seconds:.1f} s, {ref['requests']} requests, "
          f"version {ref['version']}, counts {counts}")
    return ref


# --------------------------------------------------------------------------
# 1. SIGKILL at a failpoint, then a re-run in the same folder.


def _kill_then_rerun(out: Path, failpoint: str, reference: dict, env: dict[str, str]):
    with FakeChatServer() as srv:
        killed = build(out, srv.base_url, {**env, "GEAR_FAILPOINT": failpoint})
        killed_requests = srv.requests
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-3000:])
    assert "dataset:" not in killed.stdout
    assert group_is_gone(killed.pid)  # the kill took its children (e.g. Prefect's) with it
    left = {"partials": [str(p.relative_to(out)) for p in partials(out)],
            "datasets": sorted(p.name for p in (out / "datasets").iterdir()) if (out / "datasets").exists() else []}
    seen_after_kill = inspect_after_kill(out)
    with FakeChatServer() as srv:
        rerun = build(out, srv.base_url, env)
        rerun_requests = srv.requests
        rerun_units = set(srv.attempts)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.dataset == out / "datasets" / reference["version"]
    assert_clean_published(out, reference)
    print(f"\n[faults] {failpoint}: killed rc {killed.returncode} after {killed.seconds:.1f} s "
          f"({killed_requests} requests), left {left}; re-run rc {rerun.returncode} in {rerun.seconds:.1f} s, "
          f"{rerun_requests} requests (full run {reference['requests']})")
    return {"killed_requests": killed_requests, "rerun_requests": rerun_requests, "rerun_units": rerun_units,
            "left": left, **seen_after_kill}


def group_is_gone(pgid: int, wait_s: float = 5.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def inspect_after_kill(out: Path) -> dict:
    """What the killed run left, before the re-run touches it."""
    stages, datasets = out / "stages", out / "datasets"
    raw = [f for f in stages.glob("rewrite_queries/.*.partial/raw/*.parquet")]
    dataset_partials = sorted(datasets.glob(".*.partial"))
    return {
        "extract_partials": len(list(stages.glob("extract_docs/.*.partial"))),
        "rewrite_raw_ok": sum(pl.read_parquet(f).filter(pl.col("status") == "ok").height for f in raw),
        "dataset_partials": dataset_partials,
        "marked_partials": [p.name for p in dataset_partials if (p / "_SUCCESS.json").is_file()],
        "versions": sorted(p for p in datasets.glob("*") if p.is_dir() and not p.name.startswith(".")),
        "latest": (datasets / "LATEST").exists(),
    }


@pytest.mark.slow
def test_kill_during_extraction_then_rerun_publishes_the_reference(reference, prefect_api, prefect_home, tmp_path):
    seen = _kill_then_rerun(tmp_path, "extract_docs:written", reference, _env(prefect_home, prefect_api))
    assert seen["killed_requests"] == 0  # died before any rewrite
    assert seen["extract_partials"] >= 1  # the shard's files were written, unmarked, in its hidden folder
    assert seen["versions"] == [] and not seen["latest"]
    assert seen["rerun_requests"] == reference["requests"] and seen["rerun_units"] == reference["units"]


@pytest.mark.slow
def test_kill_during_rewriting_reuses_the_finished_shard(reference, prefect_api, prefect_home, tmp_path):
    seen = _kill_then_rerun(tmp_path, "rewrite_queries:shard-written", reference, _env(prefect_home, prefect_api))
    done = seen["rewrite_raw_ok"]
    assert 0 < done < reference["requests"]  # one shard finished and kept in the partial folder
    assert seen["killed_requests"] == done  # nothing of a later shard was sent before the kill
    # The re-run sends exactly the units of the unfinished shards, each once.
    assert seen["rerun_requests"] == reference["requests"] - done < reference["requests"]
    assert len(seen["rerun_units"]) == seen["rerun_requests"]
    assert seen["versions"] == [] and not seen["latest"]


@pytest.mark.slow
def test_kill_after_the_dataset_marker_then_rerun_publishes_the_reference(reference, prefect_api, prefect_home, tmp_path):
    seen = _kill_then_rerun(tmp_path, "write_triples:marked", reference, _env(prefect_home, prefect_api))
    # Marked but not renamed: only the hidden partial folder exists, nothing that looks like a version.
    assert [p.name for p in seen["dataset_partials"]] == [f".{reference['version']}.partial"]
    assert seen["marked_partials"] == [f".{reference['version']}.partial"]  # killed after the marker
    assert seen["versions"] == [] and not seen["latest"]
    assert seen["rerun_requests"] == 0  # every stage before write_triples was complete


@pytest.mark.slow
def test_kill_before_latest_moves_then_rerun_publishes_the_reference(reference, prefect_api, prefect_home, tmp_path):
    seen = _kill_then_rerun(tmp_path, "write_triples:publish", reference, _env(prefect_home, prefect_api))
    # The version folder is complete, but LATEST was never written.
    assert [p.name for p in seen["versions"]] == [reference["version"]] and not seen["latest"]
    assert seen["dataset_partials"] == []
    assert seen["rerun_requests"] == 0


# --------------------------------------------------------------------------
# 2. Two builds at once on one output folder.


@pytest.mark.slow
def test_two_concurrent_builds_share_one_folder_and_rewrite_each_unit_once(reference, tmp_path):
    out = tmp_path / "data"
    # As a user runs it: no API URL, so each process starts its temporary Prefect
    # API on the same PREFECT_HOME (a fresh one: both migrate the same database).
    env = _env(tmp_path / "prefect-home", None)
    with FakeChatServer(latency_s=0.05) as srv:
        started = [start_build(out, srv.base_url, env) for _ in range(2)]
        runs = [Run(*s) for s in started]
        attempts = Counter(srv.attempts)
    print(f"\n[faults] concurrent: rc {[r.returncode for r in runs]}, {[round(r.seconds, 1) for r in runs]} s, "
          f"{sum(attempts.values())} requests for {len(attempts)} units (reference {reference['requests']}); "
          f"'database is locked' in stderr: {[r.stderr.count('database is locked') for r in runs]}")
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    assert runs[0].dataset == runs[1].dataset == out / "datasets" / reference["version"]
    assert sum(attempts.values()) == reference["requests"] and set(attempts) == reference["units"]
    assert set(attempts.values()) == {1}  # no LLM call was done twice
    assert_clean_published(out, reference)


# --------------------------------------------------------------------------
# 3. An endpoint that answers junk, then times out.


class JunkThenTimeoutServer(FakeChatServer):
    """The first ``junk`` distinct sentences get junk, by kind in turn: a
    non-JSON HTML page, an empty completion, a 400; every later sentence
    gets no answer within the client's timeout. A sentence keeps its fate on
    every retry."""

    KINDS = ("html", "empty", "400")

    def __init__(self, junk: int, **kw):
        super().__init__(**kw)
        # socketserver listens with a backlog of 5: more parallel connections
        # than that would time out in connect() without reaching the handler.
        self._httpd.socket.listen(128)
        self.junk = junk
        self.fate: dict[str, str] = {}

    def _handle(self, h, payload: dict) -> None:
        sentence = payload["messages"][-1]["content"].strip()
        with self._lock:
            self.attempts[sentence] += 1
            if sentence not in self.fate:
                n = len(self.fate)
                self.fate[sentence] = self.KINDS[n % len(self.KINDS)] if n < self.junk else "slow"
            fate = self.fate[sentence]
        if fate == "html":
            return h._send(200, b"<html><body><h1>502 Bad Gateway</h1></body></html>")
        if fate == "empty":
            return h._send(200, self.completion(""))
        if fate == "400":
            return h._send(400, b'{"error": "prompt too long"}')
        time.sleep(self.slow_s)
        return h._send(200, self.completion("too, late"))


# The real CLI, with one change: the rewrite stage's Prefect retry delays
# (30 s, then 120 s: tasks/rewrite.py) set to 0, so the retries still happen
# but the failing build ends in seconds, not minutes.
_NO_RETRY_DELAY = (
    "import sys, gear_cli; import tasks.rewrite as rw; "
    "rw.rewrite_queries.retry_delay_seconds = 0; vars(rw.rewrite_queries).pop('batch_task', None); "
    "sys.argv[0] = 'gear'; sys.exit(gear_cli.main())"
)


@pytest.mark.slow
def test_a_junk_endpoint_fails_the_build_and_leaves_latest_alone(reference, prefect_api, prefect_home, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(reference["out"], out)  # the good dataset, built with a healthy server
    env = _env(prefect_home, prefect_api)
    with FakeChatServer(healthy=True) as srv:
        good = build(out, srv.base_url, env)  # in this folder: a cache hit that publishes LATEST here
        assert good.returncode == 0 and srv.requests == 0, good.stderr[-3000:]
    latest = out / "datasets" / "LATEST"
    before = latest.read_bytes()
    assert before.decode().strip() == reference["version"]
    versions_before = sorted(p.name for p in (out / "datasets").iterdir())

    with JunkThenTimeoutServer(junk=6, slow_s=1.5) as srv:
        bad = build(out, srv.base_url, env, "rewrite.seed=1", "rewrite.timeout_s=0.4", "rewrite.max_retries=1",
                    argv=[str(PYTHON), "-c", _NO_RETRY_DELAY])
        attempts, fate = Counter(srv.attempts), dict(srv.fate)
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    by_fate = Counter()
    for sentence, n in attempts.items():
        by_fate[fate[sentence]] += n
    print(f"\n[faults] junk: rc {bad.returncode} in {bad.seconds:.1f} s, {sum(attempts.values())} requests for "
          f"{len(attempts)} units, fates {Counter(fate.values())}, requests by fate "
          f"{dict(by_fate)}; last line: {lines[-1] if lines else None}")
    assert bad.returncode == 1
    assert "dataset:" not in bad.stdout
    message = lines[-1]
    n, slow = reference["requests"], reference["requests"] - 6  # the same number of units under seed 1
    assert message.startswith(f"error: RewriteFailuresError: rewrite_queries: {n} of {n} rewrites failed")
    assert f"at {srv.base_url} " in message  # the endpoint
    assert f"failed by kind: timeout {slow}, empty 2, http_4xx 2, non_json 2." in message  # the counts
    assert Counter(fate.values()) == {"html": 2, "empty": 2, "400": 2, "slow": slow}
    # Three attempts of the Prefect task (retries=2), each resending every failed item:
    # junk once per attempt (not retried by the client), timeouts 1 + max_retries times.
    assert dict(by_fate) == {"html": 6, "empty": 6, "400": 6, "slow": slow * 2 * 3}
    # LATEST still names the good version, and no new version (or half of one) exists.
    assert latest.read_bytes() == before
    assert sorted(p.name for p in (out / "datasets").iterdir()) == versions_before == sorted(["LATEST", reference["version"]])
    assert digests(out / "datasets" / reference["version"]) == reference["digests"]


# --------------------------------------------------------------------------
# 4. A killed training run resumed from a corrupted latest checkpoint.


@pytest.mark.slow
def test_killed_training_resumes_from_the_checkpoint_before_a_corrupt_one(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_gear_model_fixtures import make_tiny_bert, write_triples

    from gear_model import GearModel, TrainConfig
    from gear_model.checkpoint import list_checkpoints, load_checkpoint

    tiny = make_tiny_bert(tmp_path / "tiny-bert", dropout=0.1)
    (tmp_path / "dataset").mkdir()
    write_triples(tmp_path / "dataset" / "train.parquet", n_docs=6, per_doc=2)  # 12 triples: 3 steps an epoch
    out = tmp_path / "run"
    cfg = TrainConfig.from_dict(dict(
        dataset=str(tmp_path / "dataset"), init_checkpoint=str(tiny), output_dir=str(out), epochs=4, batch_size=4,
        lr=1e-3, lr_start=1e-5, lr_end=1e-5, queue_size=8, max_query_length=16, max_doc_length=32,
        max_unit_length=16, save_every=1, keep_last=3, num_threads=1))
    total_steps = 12
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(cfg.to_dict()))
    cmd = [str(PYTHON), "-m", "gear_model.train", "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")

    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    while len(list_checkpoints(out)) < 2 and proc.poll() is None and time.monotonic() - t0 < RUN_TIMEOUT_S:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "model").exists()  # killed before the end
    found = list_checkpoints(out)
    assert len(found) >= 2
    corrupt, previous = found[-1], found[-2]
    previous_step = load_checkpoint(previous)["step"]
    size = corrupt.stat().st_size
    with corrupt.open("r+b") as fh:
        fh.truncate(size // 2)

    t1 = time.monotonic()
    resumed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                             start_new_session=True)
    print(f"\n[faults] training: killed at {[p.name for p in found]} after {t1 - t0:.1f} s; truncated "
          f"{corrupt.name} {size} -> {size // 2} bytes; resume rc {resumed.returncode} in "
          f"{time.monotonic() - t1:.1f} s from step {previous_step}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {previous} at step {previous_step} " in resumed.stdout
    warning = [line for line in resumed.stderr.splitlines() if "is unreadable" in line]
    assert warning and f"checkpoint {corrupt} is unreadable" in warning[0]
    assert f"resuming from the previous one, {previous}" in warning[0]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    done = [r for r in records if r["event"] == "done"]
    assert done and done[-1]["step"] == total_steps
    # The resumed run re-did the corrupt checkpoint's step and went on from there.
    steps = [r["step"] for r in records if r["event"] == "step"]
    assert steps[-(total_steps - previous_step):] == list(range(previous_step + 1, total_steps + 1))
    model = GearModel.from_pretrained(out / "model")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert load_checkpoint(list_checkpoints(out)[-1])["step"] == total_steps
