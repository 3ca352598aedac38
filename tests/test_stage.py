"""The stage runner (tasks/stage.py) on a toy stage: the folder and its marker,
a second call that does no work, a resumable body that resumes, an in-place
body, publish on a Prefect cache hit, a stale partial folder, a lock held by
another process, and the retry policy.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pytest
from pydantic import BaseModel

from tasks.common import ConfigError, PipelineInputError, is_complete, mark_complete, read_marker
from tasks.stage import PARTIAL_SUFFIX, StageConfigError, StageRun, is_retryable, retry_unless_final, stage

SCHEMA = pa.schema([("n", pa.int64())])
calls: Counter[str] = Counter()  # body runs and publishes, by stage
published: list[Path] = []


class ToyConfig(BaseModel):
    n: int = 3
    threads: int = 1  # operational: not in the key
    fail_after: int | None = None  # raise after writing this many parts (a killed attempt)

    operational_fields: ClassVar[frozenset[str]] = frozenset({"threads", "fail_after"})


class Boom(RuntimeError):
    pass


@stage("toy", ToyConfig, reads={"source": ["input.txt"]}, writes={"numbers.parquet": SCHEMA})
def toy(run: StageRun, source, config: ToyConfig) -> dict:
    calls["toy"] += 1
    words = (Path(source) / "input.txt").read_text().split()
    run.funnel.seen("toy", len(words))
    run.funnel.kept("toy", config.n)
    return {"numbers.parquet": {"n": list(range(config.n))}, "summary.json": {"words": len(words)}}


@stage("toy_resumable", ToyConfig, reads={"source": ["input.txt"]}, resumable=True)
def toy_resumable(run: StageRun, source, config: ToyConfig) -> dict:
    """Writes one part file per item; a part already in its work folder is not redone."""
    for i in range(config.n):
        part = run.out / f"part-{i}.txt"
        if part.exists():
            continue
        if config.fail_after is not None and i == config.fail_after:
            raise Boom(f"killed before part {i}")
        calls["toy_resumable"] += 1
        part.write_text(str(i))
    return {"parts.json": sorted(p.name for p in run.out.glob("part-*.txt"))}


def _latest(folder: Path) -> None:
    calls["publish"] += 1
    published.append(folder)
    (folder.parent / "LATEST").write_text(folder.name + "\n")


@stage("toy_in_place", ToyConfig, reads={"source": ["input.txt"]}, in_place=True, publish=_latest,
       folder=lambda work_dir, key: Path(work_dir) / "runs" / key, work_dir_from=lambda config: "unused")
def toy_in_place(run: StageRun, source, config: ToyConfig) -> dict:
    """A run folder written where it stands (as training writes its checkpoints)."""
    assert run.out == run.final
    for i in range(config.n):
        if (run.out / f"step-{i}").exists():
            continue
        if config.fail_after is not None and i == config.fail_after:
            raise Boom(f"killed at step {i}")
        calls["toy_in_place"] += 1
        (run.out / f"step-{i}").write_text("done")
    return {"summary.json": {"steps": config.n}}


@pytest.fixture(autouse=True)
def _reset():
    calls.clear()
    published.clear()


@pytest.fixture
def source(tmp_path) -> Path:
    folder = tmp_path / "source"
    folder.mkdir()
    (folder / "input.txt").write_text("one two three four")
    return folder


def test_a_run_writes_a_complete_folder_and_a_second_call_does_no_work(source, tmp_path):
    work = tmp_path / "work"
    out = toy(source, ToyConfig(), work_dir=work)
    assert out.parent == work / "stages" / "toy" and out == toy.output_dir(source, ToyConfig(), work_dir=work)
    assert is_complete(out) and pa.parquet.read_table(out / "numbers.parquet").column("n").to_pylist() == [0, 1, 2]
    assert json.loads((out / "summary.json").read_text()) == {"words": 4}
    assert json.loads((out / "funnel.json").read_text()) == {"toy": {"input": 4, "kept": 3}}
    marker = read_marker(out)
    assert marker["stage"] == "toy" and marker["code_version"] == toy.code_version
    assert toy(source, ToyConfig(threads=8), work_dir=work) == out  # an operational field: the same folder
    assert calls["toy"] == 1
    assert toy(source, ToyConfig(n=2), work_dir=work) != out  # a field in the key: another folder
    (source / "input.txt").write_text("other words")  # the input's content is in the key, not its path
    assert toy(source, ToyConfig(), work_dir=work) != out
    assert calls["toy"] == 3
    assert not list((work / "stages" / "toy").glob(f".*{PARTIAL_SUFFIX}"))


def test_a_failed_body_leaves_nothing_unless_the_stage_resumes(source, tmp_path):
    work = tmp_path / "work"

    @stage("toy_fails", ToyConfig, reads={"source": ["input.txt"]})
    def toy_fails(run: StageRun, source, config: ToyConfig) -> dict:
        (run.out / "half.txt").write_text("half")
        raise Boom("killed")

    with pytest.raises(Boom):
        toy_fails(source, ToyConfig(), work_dir=work)
    assert list((work / "stages" / "toy_fails").iterdir()) == []


def test_a_resumable_stage_resumes_from_its_partial_folder(source, tmp_path):
    work = tmp_path / "work"
    out = toy_resumable.output_dir(source, ToyConfig(n=5), work_dir=work)
    with pytest.raises(Boom):
        toy_resumable(source, ToyConfig(n=5, fail_after=3), work_dir=work)  # fail_after is operational: same key
    partial = out.with_name(f".{out.name}{PARTIAL_SUFFIX}")
    assert sorted(p.name for p in partial.iterdir()) == ["part-0.txt", "part-1.txt", "part-2.txt"]
    assert not out.exists() and calls["toy_resumable"] == 3
    assert toy_resumable(source, ToyConfig(n=5), work_dir=work) == out
    assert calls["toy_resumable"] == 5  # parts 3 and 4 only
    assert json.loads((out / "parts.json").read_text()) == [f"part-{i}.txt" for i in range(5)]
    assert is_complete(out) and not partial.exists()


def test_an_in_place_stage_continues_in_its_folder_and_publishes_on_every_call(source, tmp_path):
    work = tmp_path / "work"
    with pytest.raises(Boom):
        toy_in_place(source, ToyConfig(n=4, fail_after=2), work_dir=work)
    out = toy_in_place.output_dir(source, ToyConfig(n=4), work_dir=work)
    assert out.parent == work / "runs" and (out / "step-1").exists() and not is_complete(out)
    assert calls["publish"] == 0  # nothing to publish from an unfinished run
    assert toy_in_place(source, ToyConfig(n=4), work_dir=work) == out
    assert calls["toy_in_place"] == 4 and is_complete(out)
    assert toy_in_place(source, ToyConfig(n=4), work_dir=work) == out  # complete: no work, published again
    assert calls["toy_in_place"] == 4 and calls["publish"] == 2
    assert (work / "runs" / "LATEST").read_text().strip() == out.name


def test_a_stale_partial_is_removed_and_one_being_written_is_kept(source, tmp_path):
    work = tmp_path / "work"
    folder = work / "stages" / "toy"
    stale, live = folder / f".deadbeef{PARTIAL_SUFFIX}", folder / f".cafef00d{PARTIAL_SUFFIX}"
    for partial in (stale, live):
        partial.mkdir(parents=True)
        (partial / "numbers.parquet").write_text("half a file")
    with _held_lock(work / ".locks" / "toy" / "cafef00d.lock"):  # another process is writing this one
        out = toy(source, ToyConfig(), work_dir=work)
    assert is_complete(out) and not stale.exists() and live.exists()
    # A partial of the run's own key (a killed attempt) is started afresh, its temporaries too.
    again = toy.output_dir(source, ToyConfig(n=7), work_dir=work)
    own = again.with_name(f".{again.name}{PARTIAL_SUFFIX}")
    own.mkdir()
    (own / ".numbers.parquet.x.tmp").write_text("cut short")
    (own / "leftover.txt").write_text("from the killed attempt")
    toy(source, ToyConfig(n=7), work_dir=work)
    assert is_complete(again) and not own.exists() and not (again / "leftover.txt").exists()


def test_a_lock_held_by_another_process_makes_the_call_wait_then_reuse(source, tmp_path):
    work = tmp_path / "work"
    out = toy.output_dir(source, ToyConfig(), work_dir=work)
    result: list[Path] = []
    with _held_lock(work / ".locks" / "toy" / f"{out.name}.lock"):
        waiting = threading.Thread(target=lambda: result.append(toy(source, ToyConfig(), work_dir=work)))
        waiting.start()
        time.sleep(1.0)
        assert waiting.is_alive() and calls["toy"] == 0  # it waits for the lock
        # The other process finishes the folder while it holds the lock.
        out.mkdir(parents=True)
        (out / "numbers.parquet").write_text("theirs")
        mark_complete(out, {"stage": "toy"})
    waiting.join(timeout=60)
    assert result == [out] and calls["toy"] == 0  # reused, not rebuilt
    assert (out / "numbers.parquet").read_text() == "theirs"


class _held_lock:
    """A file lock taken by another process, held until the block ends."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        code = textwrap.dedent(f"""
            import sys
            from filelock import FileLock
            with FileLock({str(self.path)!r}):
                print("locked", flush=True)
                sys.stdin.read()
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"
        return self

    def __exit__(self, *exc):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def test_the_errors_say_whether_to_retry():
    from pydantic import ValidationError

    from tasks.rewriters.base import RewriteConfigError, RewriteFailuresError
    from tasks.train import TrainingDataError
    from tasks.write_triples import DatasetInvariantError

    with pytest.raises(ValidationError) as invalid:
        ToyConfig(n="many")
    final = [PipelineInputError("x", "bad"), ConfigError("bad"), StageConfigError("bad"), invalid.value,
             ValueError("bad"), TypeError("bug"), KeyError("bug"), DatasetInvariantError(["broken"]),
             TrainingDataError("train.parquet", "missing columns"), RewriteConfigError("unknown model")]
    assert [e for e in final if is_retryable(e)] == []
    assert all(is_retryable(e) for e in (OSError("lost"), ConnectionError("reset"), TimeoutError(), MemoryError(),
                                         RuntimeError("training failed (exit 1)"),
                                         RewriteFailuresError("too many failed", 5, 10, {"timeout": 5})))

    class State:
        def __init__(self, exc):
            self.exc = exc

        def result(self):
            raise self.exc

    assert retry_unless_final(None, None, State(OSError("lost"))) is True
    assert retry_unless_final(None, None, State(ConfigError("bad"))) is False


def test_only_stages_that_call_out_retry():
    from tasks.dedup import dedup
    from tasks.extract_docs import extract_docs
    from tasks.relevance import relevance_filter, relevance_score
    from tasks.rewrite import rewrite_queries
    from tasks.train import train_model
    from tasks.write_triples import write_triples

    assert toy.retries == 0
    assert [s.name for s in (extract_docs, dedup, relevance_filter, write_triples) if s.retries] == []
    assert all(s.retries for s in (rewrite_queries, relevance_score, train_model))


def test_publish_runs_on_a_prefect_cache_hit_and_final_errors_are_not_retried(source, tmp_path, prefect_harness):
    """Prefect skips a cached task's body, so the runner publishes from its completion hook."""
    from prefect import flow

    work = tmp_path / "work"

    @flow
    def thrice() -> list:
        return [toy_in_place.task(source, ToyConfig(n=2), work_dir=work, return_state=True) for _ in range(3)]

    # 1: the body runs (no complete folder, no cache key); 2: the core finds the
    # folder complete and publishes (its result is cached now); 3: a cache hit.
    states = thrice()
    assert [s.name for s in states] == ["Completed", "Completed", "Cached"]
    folder = Path(states[0].result())
    assert calls["toy_in_place"] == 2 and calls["publish"] == 3 and published == [folder] * 3

    attempts: Counter[str] = Counter()

    @stage("toy_flaky", ToyConfig, reads={"source": ["input.txt"]}, retries=2, retry_delay_seconds=0)
    def toy_flaky(run: StageRun, source, config: ToyConfig) -> dict:
        attempts[config.n] += 1
        if config.n == 1:
            raise ConfigError("n must not be 1")
        if attempts[config.n] == 1:
            raise OSError("the endpoint hung up")
        return {}

    @flow
    def flaky(n: int):
        return toy_flaky.task(source, ToyConfig(n=n), work_dir=work, return_state=True)

    assert flaky(2).is_completed() and attempts[2] == 2  # retried once, then done
    with pytest.raises(ConfigError):
        flaky(1)
    assert attempts[1] == 1  # a config error: no retry
