"""Operating the pipeline (issue 13, "Operations" and "two CLI runs"):

- the evaluate deployment, which names no model, evaluates the newest trained
  GeAR run and the newest contrastive-only run (fake model folders: config.json only);
- the gear-gpu pool's job variables reach the flow run's environment merged with a
  deployment's own `env`, and from there TrainParams' torchrun layout;
- the scheduled deployments (and the GPU training) run one at a time;
- the project's module loggers reach a run's Prefect logs;
- ProgressArtifact draws a terminal bar under the `gear` CLI;
- two `gear` processes at once share one local Prefect API (one server owns its
  database, so nothing contends for its lock) and both succeed; the server stops and
  removes its database once no `gear` uses it, and a later command reuses it until then.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from typer.testing import CliRunner

from gear_cli import app
from tasks.common import SUCCESS_MARKER, ProgressArtifact
from tasks.evaluate import EvalParams
from tasks.evaluate.config import latest_models
from tasks.train import TrainParams, torchrun_command

ROOT = Path(__file__).resolve().parent.parent


def deployments() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


def fake_run(models: Path, key: str, lm_weight: float | None, age_s: float, finished: bool = True,
             dataset: str = "data/datasets/v1/train.parquet") -> Path:
    """A train-gear run folder as tasks/train.py leaves it, minus the weights."""
    model = models / key / "model"
    model.mkdir(parents=True)
    gear = {"n_layers": 6} if lm_weight is None else {"n_layers": 6, "lm_weight": lm_weight}
    (model / "config.json").write_text(json.dumps({"gear": gear}))
    (models / key / "train_config.json").write_text(json.dumps({"dataset": dataset}))
    stamp = time.time() - age_s
    os.utime(model / "config.json", (stamp, stamp))
    if finished:
        (models / key / SUCCESS_MARKER).write_text("{}")
        os.utime(models / key / SUCCESS_MARKER, (stamp, stamp))
    return model


# --------------------------------------------------------------- 1. newest models


def test_evaluate_without_models_takes_the_newest_gear_and_contrastive_runs(tmp_path):
    models = tmp_path / "models"
    fake_run(models, "old-gear", 1.0, age_s=300)
    newest_gear = fake_run(models, "new-gear", 0.5, age_s=200)
    old_cl = fake_run(models, "old-cl", 0.0, age_s=250)
    fake_run(models, "running", 1.0, age_s=10, finished=False)  # newer, but not finished: never picked
    baseline = fake_run(models, "cl", 0.0, age_s=100)
    (models / "LATEST").write_text("cl/model\n")  # a pipeline trains the baseline last

    assert latest_models(models) == (str(newest_gear), str(baseline))
    params = EvalParams(work_dir=str(tmp_path), output_dir=str(tmp_path / "eval"), baselines=False)
    rows = [(s.name, s.path, s.generation) for s in params.systems()]
    assert rows == [("GeAR w/o L_LM", str(baseline), False), ("GeAR", str(newest_gear), True)]

    # The baseline trained on the GeAR run's dataset wins over a newer one on another dataset.
    (models / "LATEST").write_text("new-gear/model\n")
    other = fake_run(models, "cl-other-data", 0.0, age_s=50, dataset="data/datasets/v2/train.parquet")
    fake_run(models, "gear-no-weight", None, age_s=400)  # an lm_weight-less config is a GeAR run (older)
    assert latest_models(models) == (str(newest_gear), str(baseline))
    # ... and a newer GeAR run on that dataset pairs with it.
    newer = fake_run(models, "gear-v2", 1.0, age_s=40, dataset="data/datasets/v2/train.parquet")
    (models / "LATEST").write_text("gear-v2/model\n")
    assert latest_models(models) == (str(newer), str(other))
    assert old_cl.is_dir()


def test_named_models_are_kept_and_no_models_means_baselines_only(tmp_path, caplog):
    models = tmp_path / "models"
    fake_run(models, "g", 1.0, age_s=10)
    named = EvalParams(model_dirs=[str(tmp_path / "mine")], work_dir=str(tmp_path), baselines=False)
    assert [s.path for s in named.systems()] == [str(tmp_path / "mine")]
    # A models/ folder whose LATEST names the baseline still gives its GeAR run as the GeAR row.
    fake_run(models, "c", 0.0, age_s=5)
    (models / "LATEST").write_text("c/model\n")
    as_folder = EvalParams(model_dirs=[str(models)], contrastive_model_dir=str(models), baselines=False)
    assert [(s.name, s.path) for s in as_folder.systems()] == [
        ("GeAR w/o L_LM", str(models / "c" / "model")), ("GeAR", str(models / "g" / "model"))]

    empty = EvalParams(output_dir=str(tmp_path / "nothing-here"))
    with caplog.at_level(logging.WARNING, logger="tasks.evaluate.config"):
        names = [s.name for s in empty.systems()]
    assert names == ["BM25", "MiniLM-L6 (pre-trained)"]
    assert "no trained GeAR model under" in caplog.text


def test_the_evaluate_deployment_and_gear_evaluate_look_in_the_models_folder(tmp_path):
    params = EvalParams.model_validate(deployments()["evaluate"]["parameters"]["params"])
    assert not params.model_dirs and params.models_dir == Path("data/models")  # train-gear's output_dir: data

    models = tmp_path / "models"
    gear = fake_run(models, "g", 1.0, age_s=20)
    baseline = fake_run(models, "c", 0.0, age_s=10)
    (models / "LATEST").write_text("c/model\n")
    result = CliRunner().invoke(app, ["evaluate", "--output-dir", str(tmp_path), "--dry-run"])
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert (resolved["model_dirs"], resolved["contrastive_model_dir"]) == ([str(gear)], str(baseline))


# ------------------------------------------------------- 2. GPU layout from the pool


GPU_ENV = ("GEAR_GPUS_PER_NODE", "GEAR_NNODES", "GEAR_RDZV_ENDPOINT")


def test_train_params_take_the_gpu_layout_from_the_environment(monkeypatch):
    for name in GPU_ENV:
        monkeypatch.delenv(name, raising=False)
    plain = TrainParams()
    assert (plain.nproc_per_node, plain.nnodes, plain.rdzv_endpoint) == (1, 1, "")
    monkeypatch.setenv("GEAR_GPUS_PER_NODE", "4")
    monkeypatch.setenv("GEAR_NNODES", "2")
    monkeypatch.setenv("GEAR_RDZV_ENDPOINT", "10.0.0.1:29500")
    params = TrainParams()
    assert (params.nproc_per_node, params.nnodes, params.rdzv_endpoint, params.world_size) == (4, 2, "10.0.0.1:29500", 8)
    assert TrainParams(nproc_per_node=2, nnodes=1).world_size == 2  # a given value wins
    monkeypatch.setenv("GEAR_GPUS_PER_NODE", "")
    assert TrainParams().nproc_per_node == 1  # empty counts as unset
    monkeypatch.setenv("GEAR_GPUS_PER_NODE", "0")
    with pytest.raises(ValidationError, match="nproc_per_node"):
        TrainParams()  # the bounds apply to the environment's value too
    assert set(TrainParams.ENV_DEFAULTS.values()) == set(GPU_ENV)


def test_gpu_pool_job_variables_reach_torchrun_merged_with_the_deployment_env(monkeypatch, tmp_path):
    """Prefect's own job-configuration code on the pool template and the train-gpu deployment."""
    import asyncio

    from prefect.workers.process import ProcessJobConfiguration

    template = json.loads((ROOT / "scripts" / "work-pools" / "gear-gpu.json").read_text())
    deployment = deployments()["train-gpu"]
    job_variables = dict(deployment["work_pool"]["job_variables"])
    run_vars = {"env": {"NCCL_DEBUG": "INFO"}, "rdzv_endpoint": "gpu-0:29400"}  # a custom run's job variables
    merged = {**job_variables, **run_vars, "env": {**job_variables["env"], **run_vars["env"]}}
    config = asyncio.run(ProcessJobConfiguration.from_template_and_values(template, merged, client=object()))
    env = config.env
    assert env["GEAR_GPUS_PER_NODE"] == "8" and env["GEAR_NNODES"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7" and env["GEAR_RDZV_ENDPOINT"] == "gpu-0:29400"
    assert env["OMP_NUM_THREADS"] == "8"  # the deployment's env is merged, not dropped
    assert env["NCCL_DEBUG"] == "INFO"  # a run's env wins over the pool's default

    # The flow run validates its parameters in that environment.
    for name, value in env.items():
        if name.startswith(("GEAR_", "CUDA_")):
            monkeypatch.setenv(name, value)
    params = TrainParams.model_validate(deployment["parameters"]["params"])
    assert "nproc_per_node" not in deployment["parameters"]["params"]  # the pool decides
    cmd = torchrun_command(params, tmp_path / "train_config.json")
    assert "--nproc_per_node=8" in cmd and "--standalone" in cmd


# --------------------------------------------------------------- 3. one at a time


def test_scheduled_deployments_run_one_at_a_time():
    for name, deployment in deployments().items():
        if deployment.get("schedules") or name == "train-gpu":
            limit = deployment.get("concurrency_limit")
            assert isinstance(limit, dict), f"{name}: no concurrency_limit"
            assert limit["limit"] == 1 and limit["collision_strategy"] == "ENQUEUE", name


# ------------------------------------------------------------ 4. loggers in the UI


def test_project_module_loggers_reach_the_run_logs(prefect_harness):
    from prefect import flow, get_client, task
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import get_current_settings

    import tasks.rewrite
    import tasks.rewriters.openai_compat

    extra = set(get_current_settings().logging.extra_loggers or [])
    assert {"tasks", "gear_model"} <= extra, "prefect.toml's logging.extra_loggers (run pytest from the repo)"
    for module in (tasks.rewrite, tasks.rewriters.openai_compat):
        assert module.log.name.split(".")[0] in extra  # logging.getLogger(__name__) is covered

    @task
    def warn() -> None:
        logging.getLogger("tasks.rewrite").warning("operations-test: endpoint gave up after 3 tries")
        tasks.rewriters.openai_compat.log.error("operations-test: openai_compat error line")

    @flow(name="operations-logging")
    def run() -> None:
        warn()

    state = run(return_state=True)
    assert state.is_completed()
    APILogWorker.drain_all(timeout=30)
    flow_run_id = state.state_details.flow_run_id
    messages: list[str] = []
    with get_client(sync_client=True) as client:
        for _ in range(40):
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
            messages = [f"{log.name}: {log.message}" for log in logs]
            if sum("operations-test" in m for m in messages) == 2:
                break
            time.sleep(0.25)
    assert "tasks.rewrite: operations-test: endpoint gave up after 3 tries" in messages, messages
    assert "tasks.rewriters.openai_compat: operations-test: openai_compat error line" in messages, messages


# ------------------------------------------------------------ 5. progress on the CLI


def test_progress_draws_a_bar_under_the_cli_and_nothing_otherwise(monkeypatch, capsys):
    monkeypatch.delenv("GEAR_CLI_PROGRESS", raising=False)
    quiet = ProgressArtifact("rewrite_queries: sampled units rewritten (%)")
    for i in range(1, 4):
        quiet.update(i, 3)
    assert quiet.id is None and quiet.bar is None  # outside a task run: no artifact either
    assert capsys.readouterr().err == ""

    monkeypatch.setenv("GEAR_CLI_PROGRESS", "1")
    bar = ProgressArtifact("rewrite_queries: sampled units rewritten (%)")
    for i in range(1, 6):
        bar.update(i, 5, f"unit {i}")
    err = capsys.readouterr().err
    assert "rewrite_queries: sampled units rewritten" in err and "5/5" in err and "unit 5" in err
    assert bar.bar is None  # closed at the end


def test_progress_artifact_and_bar_inside_a_task_run(prefect_harness, monkeypatch, capsys):
    from prefect import flow, get_client, task
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    monkeypatch.setenv("GEAR_CLI_PROGRESS", "1")

    @task
    def work() -> None:
        bar = ProgressArtifact("operations-test: items (%)")
        assert bar.id is not None
        for i in range(1, 11):
            bar.update(i, 10)

    @flow(name="operations-progress")
    def run() -> None:
        work()

    state = run(return_state=True)
    assert state.is_completed()
    assert "10/10" in capsys.readouterr().err
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert [a.type for a in artifacts] == ["progress"] and artifacts[0].data == 100.0


# ------------------------------------------------------------ 6. two CLI runs at once


def _selftest_env(tmp_path: Path, idle_s: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "GEAR_"))}
    # One PREFECT_HOME for all, as runs by one user share ~/.prefect.
    env.update(PREFECT_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1", GEAR_API_IDLE_SECONDS=str(idle_s))
    return env


def _selftest_lines(outputs: list[str]) -> list[tuple[str, str]]:
    """(api, database) of each `selftest: ok` line."""
    found = re.findall(r"^selftest: ok \(3\); api (\S+); database (\S+)$", "\n".join(outputs), flags=re.M)
    assert len(found) == len(outputs), outputs
    return found


def _server_gone(home: Path, database_url: str, timeout_s: float = 60) -> bool:
    folder = Path(database_url.split("///", 1)[1]).parent
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not folder.exists() and not list(home.glob("gear-api-*/server.json")):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_two_gear_runs_at_once_share_one_api_which_stops_when_unused(tmp_path):
    env = _selftest_env(tmp_path, idle_s=0)
    gear = [sys.executable, "-c", "import gear_cli; gear_cli.app()", "selftest"]
    procs = [subprocess.Popen(gear, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=400)
        outputs.append(out)
        assert proc.returncode == 0, out
    (api_a, db_a), (api_b, db_b) = _selftest_lines(outputs)
    assert api_a == api_b and db_a == db_b  # one server, one database
    assert all("database is locked" not in out for out in outputs)
    assert _server_gone(tmp_path / "home", db_a)  # no `gear` left: stopped, its database removed
    assert not (tmp_path / "home" / "prefect.db").exists()  # the shared database was never touched


@pytest.mark.slow
def test_a_later_gear_run_reuses_the_running_api(tmp_path):
    """The first run is the `gear` console script, the second imports gear_cli: both reach the API
    through the command callback, and the second finds the first's still running."""
    env = _selftest_env(tmp_path, idle_s=60)
    console = Path(sys.executable).with_name("gear")
    commands = [[str(console), "selftest"], [sys.executable, "-c", "import gear_cli; gear_cli.app()", "selftest"]]
    assert console.is_file()
    outputs = [subprocess.run(gear, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400) for gear in commands]
    assert [r.returncode for r in outputs] == [0, 0], [r.stderr for r in outputs]
    (api_a, db_a), (api_b, db_b) = _selftest_lines([r.stdout for r in outputs])
    assert (api_a, db_a) == (api_b, db_b)
    info = json.loads(next((tmp_path / "home").glob("gear-api-*/server.json")).read_text())
    os.kill(info["pid"], signal.SIGTERM)  # stopped from outside, it cleans up as when idle
    assert _server_gone(tmp_path / "home", db_a, timeout_s=30)


def test_the_local_api_module_imports_only_the_standard_library():
    """The server process imports flows.local_api, not the CLI, before Prefect's server:
    it may not pull in a heavy package."""
    code = ("import sys, flows.local_api; heavy = {'typer', 'pydantic', 'prefect', 'torch', 'polars', 'gear_cli'}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_flow_runs_on_the_local_api_send_no_heartbeats_and_a_server_of_ones_own_keeps_them(monkeypatch):
    from types import SimpleNamespace

    from prefect.settings import get_current_settings

    import gear_cli

    monkeypatch.setattr(gear_cli, "_quiet_explained_failures", lambda: None)
    default = get_current_settings().flows.heartbeat_frequency
    monkeypatch.setattr(gear_cli, "_local_api", None)  # PREFECT_API_URL was set: Prefect's default stands
    gear_cli._api_ready()
    assert default is not None and get_current_settings().flows.heartbeat_frequency == default
    monkeypatch.setattr(gear_cli, "_local_api", SimpleNamespace(wait=lambda: None))
    try:
        gear_cli._api_ready()
        assert get_current_settings().flows.heartbeat_frequency is None
    finally:
        gear_cli._process_settings.close()
    assert get_current_settings().flows.heartbeat_frequency == default
