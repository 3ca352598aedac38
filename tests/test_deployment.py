"""prefect.yaml on a real Prefect server and process worker (issue 3 and 6).

The stack is started with the operator scripts (scripts/prefect-server.sh,
scripts/deploy.sh, scripts/prefect-worker.sh) on a free loopback port with
its state in a temporary folder, then:

- every deployment of prefect.yaml registers, with its schedule, pool and a
  parameter form in which every field has a description and a default (the
  GPU layout's defaults come from the gear-gpu pool's environment instead);
  scheduled deployments and the GPU training run one at a time;
- invalid parameters are refused when the run is created (no run, no work);
  a dataset path that does not exist fails the run at once, naming the path;
- `prefect deployment run build-rir-dataset/weekly-refresh` on the embedded
  dump writes triples that satisfy the dataset's contract.

Run alone: .venv/bin/pytest -m deployment tests/test_deployment.py
Logs of the server and worker are printed (and copied to
test-output/deployment/) when a test fails.
"""

from __future__ import annotations

import json

import polars as pl
import pyarrow.parquet as pq
import pytest

from tasks.train import TrainParams
from ui.stack import PrefectStack, dumps, output_dir_for, parse_run_id

pytestmark = [pytest.mark.deployment, pytest.mark.slow, pytest.mark.timeout(2400)]

DEPLOYMENTS = {
    "build-rir-dataset/weekly-refresh": "gear-local",
    "train-gear/train": "gear-local",
    "train-gear/train-gpu": "gear-gpu",
    "evaluate-gear/evaluate": "gear-local",
    "rir-pipeline/scheduled-refresh": "gear-local",
}
SCHEDULED = {"build-rir-dataset/weekly-refresh", "rir-pipeline/scheduled-refresh"}
BUILD_TIMEOUT_S = 1500  # the embedded build on 2 busy cores


@pytest.fixture(scope="module")
def out_dir():
    return output_dir_for("deployment")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, out_dir):
    s = PrefectStack(tmp_path_factory.mktemp("prefect-deploy") / "home")
    try:
        with s.diagnostics(out_dir):
            s.start_server()
            s.deploy()  # every deployment in prefect.yaml, as an operator does
            s.start_worker("gear-local")
        yield s
    finally:
        s.stop()
        (out_dir / "timings.json").write_text(json.dumps(s.timings, indent=2))
        print("prefect stack timings:", json.dumps(s.timings))


def _definitions(schema: dict) -> dict:
    return schema.get("definitions") or schema.get("$defs") or {}


def test_every_deployment_registers_with_pool_schedule_and_form(stack):
    for name, pool in DEPLOYMENTS.items():
        dep = stack.deployment(name)
        assert dep["work_pool_name"] == pool, name
        assert dep["enforce_parameter_schema"] is True, name
        crons = [s["schedule"].get("cron") for s in dep["schedules"] if s.get("active")]
        if name in SCHEDULED:
            assert crons and all(crons), f"{name}: no active cron schedule in {dep['schedules']}"
        # The UI form: one typed model parameter; every field described, with a default.
        schema = dep["parameter_openapi_schema"]
        assert list(schema["properties"]) == ["params"], name
        models = _definitions(schema)
        assert models, f"{name}: parameters are not a pydantic model"
        for model_name, model in models.items():
            if "properties" not in model:  # enums and the like
                continue
            assert model.get("description"), f"{name}: model {model_name} has no description"
            for field, spec in model["properties"].items():
                assert spec.get("description"), f"{name}: {model_name}.{field} has no description"
                if model_name == "TrainParams" and field in TrainParams.ENV_DEFAULTS:
                    # Defaults from the worker's environment (the gear-gpu pool): none in the form.
                    assert TrainParams.ENV_DEFAULTS[field] in spec["description"], field
                else:
                    assert "default" in spec, f"{name}: {model_name}.{field} has no default"
                assert spec.get("title"), f"{name}: {model_name}.{field} has no title"

    # Scheduled runs (and the GPU training) wait for the previous run of their deployment.
    for name in SCHEDULED | {"train-gear/train-gpu"}:
        dep = stack.deployment(name)
        limit = dep.get("concurrency_limit") or (dep.get("global_concurrency_limit") or {}).get("limit")
        assert limit == 1, f"{name}: concurrency limit {limit!r}"
        assert (dep.get("concurrency_options") or {}).get("collision_strategy") == "ENQUEUE", name

    # The GPU layout is the pool's: the deployment leaves nproc_per_node to GEAR_GPUS_PER_NODE.
    gpu = stack.deployment("train-gear/train-gpu")
    assert gpu["job_variables"]["gpus_per_node"] == 8 and "nproc_per_node" not in gpu["parameters"]["params"]
    pool = stack.client.get("/work_pools/gear-gpu").json()
    variables = pool["base_job_template"]["variables"]["properties"]
    assert {"gpus_per_node", "nnodes", "cuda_visible_devices"} <= set(variables)
    assert pool["base_job_template"]["job_configuration"]["env"]["GEAR_GPUS_PER_NODE"] == "{{ gpus_per_node }}"


@pytest.mark.parametrize(
    "deployment, params, field",
    [
        ("train-gear/train", {"batch_size": -4}, "params.batch_size"),
        ("train-gear/train", {"max_steps": -1}, "params.max_steps"),
        ("evaluate-gear/evaluate", {"batch_size": 0}, "params.batch_size"),
        ("build-rir-dataset/weekly-refresh", "THRESHOLD_OUT_OF_RANGE", None),
    ],
)
def test_invalid_parameters_are_refused_before_any_run(stack, deployment, params, field):
    if params == "THRESHOLD_OUT_OF_RANGE":
        params, field = _threshold_override(stack, 1.5)
    runs_before = len(stack.flow_runs(deployment))
    # The documented CLI path ...
    cli = stack.prefect("deployment", "run", deployment, "--param", f"params={dumps(params)}", check=False)
    assert cli.returncode != 0, cli.stdout
    said = " ".join((cli.stdout + cli.stderr).split())
    assert f"Validation failed for field '{field}'" in said, said
    # ... and the API the UI and run_deployment use.
    r = stack.create_run(deployment, {"params": params})
    assert r.status_code == 409, r.text
    assert field in r.json()["detail"]
    assert len(stack.flow_runs(deployment)) == runs_before  # nothing was created, so nothing runs


def _threshold_override(stack, value: float) -> tuple[dict, str]:
    """Set the build's relevance threshold, wherever the build model keeps it."""
    schema = stack.deployment("build-rir-dataset/weekly-refresh")["parameter_openapi_schema"]
    models = _definitions(schema)
    params_model = models[schema["properties"]["params"]["$ref"].split("/")[-1]] if "$ref" in schema["properties"]["params"] else None
    assert params_model, "build-rir-dataset's params is not a model"

    def find(model: dict, path: list[str]):
        for field, spec in model.get("properties", {}).items():
            if field == "threshold" or field.endswith("_threshold") and "relevance" in field:
                return path + [field]
            ref = spec.get("$ref") or next((a.get("$ref") for a in spec.get("allOf", []) + spec.get("anyOf", []) if "$ref" in a), None)
            if ref:
                sub = models[ref.split("/")[-1]]
                if field in ("relevance", "relevance_filter") or "relevance" in ref.lower():
                    found = find(sub, path + [field])
                    if found:
                        return found
        return None

    path = find(params_model, [])
    assert path, "no relevance threshold in build-rir-dataset's parameters"
    override: dict = {}
    node = override
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    return override, "params." + ".".join(path)


def test_missing_dataset_path_fails_the_run_at_once(stack, tmp_path):
    missing = tmp_path / "no-such-dataset"
    out = tmp_path / "out"
    proc = stack.prefect(
        "deployment", "run", "train-gear/train",
        "--param", f"params={dumps({'dataset': str(missing), 'output_dir': str(out), 'max_steps': 1})}",
    )
    run = stack.wait_for_run(parse_run_id(proc.stdout), timeout=600)
    assert run["state"]["type"] == "FAILED", run["state"]
    logs = stack.wait_for_logs(run["id"], str(missing), "not a dataset")
    assert str(missing) in logs and "not a dataset" in logs, logs
    assert not (out / "models").exists()  # refused before any training work


def test_build_rir_dataset_deployment_writes_triples(stack, tmp_path, out_dir):
    output = tmp_path / "data"
    params = BUILD_PARAMS(output)
    proc = stack.prefect(
        "deployment", "run", "build-rir-dataset/weekly-refresh", "--param", f"params={dumps(params)}",
    )
    run_id = parse_run_id(proc.stdout)
    with stack.diagnostics(out_dir):
        run = stack.wait_for_run(run_id, timeout=BUILD_TIMEOUT_S)
        assert run["state"]["type"] == "COMPLETED", f"{run['state']}\n{stack.run_logs(run_id)}"
    (out_dir / "build-run.log").write_text(stack.run_logs(run_id, limit=1000))

    version = (output / "datasets" / "LATEST").read_text().strip()
    folder = output / "datasets" / version
    for name in ("train.parquet", "test.parquet", "dataset_card.md", "dataset_card.json", "params.json"):
        assert (folder / name).is_file(), name
    from tasks.write_triples import TRIPLES_SCHEMA

    train = pl.read_parquet(folder / "train.parquet")
    test = pl.read_parquet(folder / "test.parquet")
    assert pq.read_schema(folder / "train.parquet").remove_metadata().equals(TRIPLES_SCHEMA)
    assert train.height > 0
    both = pl.concat([train, test])
    for row in both.iter_rows(named=True):
        assert row["document"][row["unit_start"]:row["unit_end"]] == row["unit"]
    assert not set(train["doc_id"]) & set(test["doc_id"])
    assert both["query"].n_unique() == both.height
    card = json.loads((folder / "dataset_card.json").read_text())
    assert card, "empty dataset card"
    # The funnel and samples are on the run's page.
    assert stack.artifacts(run_id), "build-rir-dataset published no artifacts"


def BUILD_PARAMS(output) -> dict:  # noqa: N802 (a table of the test's knobs)
    """The override that keeps the embedded build quick: output under tmp."""
    return {"output_dir": str(output)}
