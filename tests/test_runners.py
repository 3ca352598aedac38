"""The task runner switch: the same build under threads, worker processes, a
real local Dask cluster and Ray gives byte-identical triples; ``until`` stops
after a stage; a refresh over an unchanged dump does no work."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from tasks.runners import TaskRunnerConfig, batches, parts_per_shard
from tasks.rewrite import shard_groups
from tasks.rewriters.testing import FakeChatServer
from test_build_flow import slice_params


def _digests(dataset_dir: str) -> dict[str, str]:
    return {name: hashlib.sha256((Path(dataset_dir) / name).read_bytes()).hexdigest()
            for name in ("train.parquet", "test.parquet")}


def _params(out, base_url, runner: TaskRunnerConfig, **updates):
    from tasks.shard import ShardConfig

    # Three shards of 10 pages, two rewrite workers: mapping has something to spread.
    return slice_params(out, base_url, shard=ShardConfig(pages_per_shard=10, max_shards=3), runner=runner,
                        rewrite=slice_params(out, base_url).rewrite.model_copy(update={"workers": 2}), **updates)


@pytest.fixture(scope="module")
def reference(prefect_harness, tmp_path_factory):
    """The build under the default runner (bounded threads)."""
    from flows.build_rir_dataset import build_rir_dataset

    out = tmp_path_factory.mktemp("threads")
    with FakeChatServer() as srv:
        dataset = build_rir_dataset(_params(out, srv.base_url, TaskRunnerConfig(kind="threads", workers=2)))
    return _digests(dataset)


@pytest.mark.slow
def test_dask_local_cluster_gives_byte_identical_triples(reference, tmp_path):
    from distributed import LocalCluster

    from flows.build_rir_dataset import build_rir_dataset

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            FakeChatServer() as srv:
        runner = TaskRunnerConfig(kind="dask", address=cluster.scheduler_address)
        dataset = build_rir_dataset(_params(tmp_path, srv.base_url, runner))
        assert len(cluster.workers) == 2
    assert _digests(dataset) == reference


@pytest.mark.slow
def test_one_shard_scored_in_parts_gives_the_triples_of_one_worker(prefect_harness, tmp_path):
    """One shard and two workers: relevance scoring splits the shard in two
    tasks, and the dataset is the one a single worker builds, byte for byte."""
    from flows.build_rir_dataset import build_rir_dataset

    with FakeChatServer() as srv:
        one = build_rir_dataset(slice_params(tmp_path / "one", srv.base_url, runner=TaskRunnerConfig(workers=1)))
        two = build_rir_dataset(slice_params(tmp_path / "two", srv.base_url, runner=TaskRunnerConfig(workers=2)))
    assert len(list((tmp_path / "two" / "stages" / "relevance_score").iterdir())) == 2
    assert len(list((tmp_path / "one" / "stages" / "relevance_score").iterdir())) == 1
    assert _digests(two) == _digests(one)


@pytest.mark.slow
def test_worker_processes_give_byte_identical_triples(reference, tmp_path):
    from flows.build_rir_dataset import build_rir_dataset

    with FakeChatServer() as srv:
        dataset = build_rir_dataset(_params(tmp_path, srv.base_url, TaskRunnerConfig(kind="processes", workers=2)))
    assert _digests(dataset) == reference


@pytest.mark.slow
def test_ray_local_gives_byte_identical_triples(reference, tmp_path):
    pytest.importorskip("prefect_ray")
    from flows.build_rir_dataset import build_rir_dataset

    with FakeChatServer() as srv:
        dataset = build_rir_dataset(_params(tmp_path, srv.base_url, TaskRunnerConfig(kind="ray", workers=2)))
    assert _digests(dataset) == reference


@pytest.mark.slow
def test_until_stops_after_the_stage_and_a_refresh_of_the_same_dump_does_nothing(reference, tmp_path):
    from flows.build_rir_dataset import build_rir_dataset

    threads = TaskRunnerConfig(kind="threads", workers=2)
    with FakeChatServer() as srv:
        folders = build_rir_dataset(_params(tmp_path, srv.base_url, threads, until="select_units"))
        assert srv.requests == 0  # no LLM time spent
        assert len(folders) == 3 and all((Path(f) / "units.parquet").is_file() for f in folders)
        assert not (tmp_path / "datasets").exists()
        dataset = build_rir_dataset(_params(tmp_path, srv.base_url, threads))  # reuses the selected units
        assert _digests(dataset) == reference
        served = srv.requests
        # The scheduled refresh over the same dump content: no work, the latest dataset returned.
        shutil.rmtree(tmp_path / "stages" / "dedup")
        again = build_rir_dataset(_params(tmp_path, srv.base_url, threads, only_new_dump=True))
        assert again == dataset and srv.requests == served
        assert not (tmp_path / "stages" / "dedup").exists()  # nothing ran


def test_a_dump_folder_or_glob_picks_the_newest_dump(tmp_path):
    from flows.params import BuildDatasetParams
    from tasks.assets import embedded_dump_path

    for date in ("20250101", "20250301", "20250201"):
        shutil.copy(embedded_dump_path(), tmp_path / f"enwiki-{date}-pages-articles.xml.bz2")
    (tmp_path / "enwiki-20250401-pages-articles-multistream-index.txt.bz2").write_bytes(b"")
    newest = str(tmp_path / "enwiki-20250301-pages-articles.xml.bz2")
    assert BuildDatasetParams(dump=str(tmp_path)).dump_path() == newest
    assert BuildDatasetParams(dump=str(tmp_path / "enwiki-*-pages-articles.xml.bz2")).dump_path() == newest
    with pytest.raises(ValueError, match="dump file not found"):
        BuildDatasetParams(dump=str(tmp_path / "frwiki-*.xml.bz2"))


def test_runner_choice_comes_from_the_environment_for_deployments(monkeypatch):
    monkeypatch.setenv("GEAR_TASK_RUNNER", "dask")
    monkeypatch.setenv("GEAR_WORKERS", "16")
    monkeypatch.setenv("GEAR_RUNNER_ADDRESS", "tcp://scheduler:8786")
    config = TaskRunnerConfig()
    assert (config.kind, config.n_workers, config.address) == ("dask", 16, "tcp://scheduler:8786")
    assert TaskRunnerConfig(kind="threads").kind == "threads"  # a field given explicitly wins
    monkeypatch.delenv("GEAR_WORKERS")
    assert TaskRunnerConfig().n_workers >= 1


def test_a_shard_is_split_only_when_workers_outnumber_shards():
    four = TaskRunnerConfig(kind="threads", workers=4)
    assert [parts_per_shard(n, four) for n in (1, 2, 3, 4, 100)] == [4, 2, 1, 1, 1]
    assert parts_per_shard(1, TaskRunnerConfig(kind="threads", workers=1)) == 1


def test_batches_and_groups_are_stable():
    cfg = TaskRunnerConfig(kind="threads", workers=2, tasks_per_worker=2)
    items = list(range(10))
    parts = batches(items, cfg)
    assert len(parts) == 4 and [x for b in parts for x in b] == items
    dirs = [Path(f"/w/stages/select_units/{k:016x}") for k in range(40)]
    groups = shard_groups(dirs, 3)
    assert sorted(p for g in groups for p in g) == sorted(dirs)
    # A new shard moves no other shard to another group (their folders are reused).
    with_new = shard_groups(dirs + [Path("/w/stages/select_units/ffffffffffffffff")], 3)
    moved = [p for g_old, g_new in zip(groups, with_new) for p in g_old if p not in g_new]
    assert moved == []


def test_cli_flags_reach_the_runner_and_until(monkeypatch):
    import yaml
    from typer.testing import CliRunner

    from gear_cli import app

    for var in ("GEAR_TASK_RUNNER", "GEAR_WORKERS", "GEAR_RUNNER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    result = CliRunner().invoke(app, ["build-dataset", "--task-runner", "dask", "--address", "tcp://s:8786",
                                      "--workers", "3", "--until", "select_units", "--dry-run"])
    assert result.exit_code == 0, result.output
    params = yaml.safe_load(result.output)
    assert params["runner"]["kind"] == "dask" and params["runner"]["address"] == "tcp://s:8786"
    assert params["runner"]["workers"] == 3 and params["until"] == "select_units"
    bad = CliRunner().invoke(app, ["build-dataset", "--task-runner", "mpi", "--dry-run"])
    assert bad.exit_code == 2


def test_gil_bound_stage_calls_run_in_worker_processes_with_the_same_output(tmp_path, monkeypatch):
    """Under the threads runner with 2 workers, extract_docs runs in a worker
    process: a fault patched into this process does not reach it, and it writes
    the same bytes as the call made here."""
    from tasks import wikitext
    from tasks.assets import embedded_dump_path
    from tasks.common import PipelineInputError
    from tasks.extract_docs import ExtractConfig, extract_docs
    from tasks.runners import run_stage_call, worker_processes
    from tasks.shard import ShardConfig, plan_shards

    (shard,) = plan_shards(embedded_dump_path(), ShardConfig(max_shards=1, pages_per_shard=20))
    here = extract_docs(shard, ExtractConfig(), tmp_path / "here")

    def broken(*args, **kwargs):
        raise AssertionError("ran in the calling process")

    monkeypatch.setattr(wikitext, "clean_wikitext", broken)
    with worker_processes(TaskRunnerConfig(kind="threads", workers=2)):
        there = run_stage_call(extract_docs, dict(shard=shard, config=ExtractConfig(), work_dir=str(tmp_path / "there")))
    assert there.name == here.name  # the same key
    for name in ("articles.parquet", "funnel.json"):
        assert (there / name).read_bytes() == (here / name).read_bytes()
    with pytest.raises(PipelineInputError, match="ran in the calling process"):  # without the pool, it runs here
        run_stage_call(extract_docs, dict(shard=shard, config=ExtractConfig(), work_dir=str(tmp_path / "again")))


def test_bad_input_in_a_worker_process_comes_back_as_itself(tmp_path):
    from tasks.common import PipelineInputError
    from tasks.stage import is_retryable
    from tasks.runners import run_stage_call, worker_processes
    from tasks.select_units import UnitConfig, select_units

    missing = tmp_path / "no-such-shard"
    with worker_processes(TaskRunnerConfig(kind="threads", workers=2)), \
            pytest.raises(PipelineInputError, match="does not exist") as err:
        run_stage_call(select_units, dict(article_dirs_or_files=[str(missing)], config=UnitConfig(),
                                          work_dir=str(tmp_path)))
    assert err.value.path.startswith(str(missing)) and not is_retryable(err.value)
    assert "_RemoteTraceback" in repr(err.value.__cause__)  # the worker's traceback rides along


def test_the_worker_server_preloads_every_gil_bound_stage():
    import importlib
    import pkgutil

    import tasks
    from tasks.runners import WORKER_PRELOAD
    from tasks.stage import Stage

    gil_bound = set()
    for info in pkgutil.iter_modules(tasks.__path__, "tasks."):
        module = importlib.import_module(info.name)
        gil_bound |= {v.module for v in vars(module).values() if isinstance(v, Stage) and v.gil_bound}
    assert gil_bound == {"tasks.extract_docs", "tasks.select_units"}
    assert gil_bound <= set(WORKER_PRELOAD)


def _run_probe_module(folder: Path, name: str, source: str, *args: str, **env: str) -> str:
    """``python -m name args`` (a deployment's way of running its flow) on ``source``
    written to ``folder``, with the project importable; its stdout."""
    import os
    import subprocess
    import sys
    import textwrap

    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(folder), str(root)])}
    return subprocess.run([sys.executable, "-m", name, *args], env=env, cwd=folder, capture_output=True,
                          text=True, timeout=120, check=True).stdout.strip()


def test_workers_of_a_module_run_with_dash_m_inherit_its_imports(tmp_path):
    """A deployment's flow run is ``python -m prefect.engine``: each forked worker re-runs
    that module, and must find what it imports already imported by the fork server."""
    (tmp_path / "probe_dependency.py").write_text(
        "import os\nwith open(os.environ['PROBE_LOG'], 'a') as log:\n    log.write(f'{os.getpid()}\\n')\n")
    log = tmp_path / "imports.log"
    out = _run_probe_module(tmp_path, "probe_main", """
        import os
        import probe_dependency
        import tasks.runners as runners

        if __name__ == "__main__":
            with runners.worker_processes(runners.TaskRunnerConfig(kind="threads", workers=2)):
                workers = {runners._pool.submit(os.getpid).result() for _ in range(4)}
            print(" ".join(map(str, workers)))
    """, PROBE_LOG=str(log))
    workers = set(out.split())
    importers = log.read_text().split()
    assert workers and len(importers) == 2  # the main process and the fork server, no worker
    assert not workers & set(importers)


def test_workers_fork_with_the_runs_unit_models_loaded(tmp_path):
    """start_worker_server with the run's UnitConfig: the fork server loads its spaCy
    pipelines and tokenizer, and a worker has them before its first select_units call;
    without one it loads nothing, and the variable that carried it is gone from the caller."""
    source = """
        import os
        import sys

        import tasks.runners as runners
        from tasks.worker_models import UNIT_CONFIG_ENV


        def loaded():
            from tasks import select_units as su

            return [f.cache_info().currsize for f in (su._load_nlp, su._load_senter, su._load_tokenizer)]


        if __name__ == "__main__":
            from tasks.select_units import UnitConfig

            config = runners.TaskRunnerConfig(kind="threads", workers=2)
            runners.start_worker_server(config, UnitConfig() if sys.argv[1] == "with" else None)
            with runners.worker_processes(config):
                print(runners._pool.submit(loaded).result(), UNIT_CONFIG_ENV in os.environ)
    """
    seen = [_run_probe_module(tmp_path, "probe_models", source, given) for given in ("with", "without")]
    assert seen == ["[1, 1, 1] False", "[0, 0, 0] False"]
