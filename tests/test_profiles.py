"""Profiles (flows/profiles.py): one definition shared by the `gear` CLI and prefect.yaml.

- every deployment that runs a profile holds that profile's overrides, written
  out, and resolves to the same parameters as the CLI command it names;
- the demo training is exactly ``TrainConfig.embedded()``, the paper profile
  is the model defaults, and a profile fills only the fields not given;
- profiles are applied where parameters are resolved (``resolve_params``),
  never by the parameter models, which know no profile and refuse a
  ``profile`` key (as any unknown key) with a message that says where
  profiles are applied;
- TrainParams has a concrete default for every setting (no "type None" field
  in the Prefect form), reads it from TrainConfig (written once) and passes
  every one on to TrainConfig by name.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.params import BuildDatasetParams, ParamsError, PipelineParams, resolve_params
from flows.profiles import PROFILES, overrides
from gear_cli import app
from gear_model.config import EMBEDDED, GearConfig, TrainConfig, setting
from tasks.evaluate import EvalParams
from tasks.train import _LAUNCH_ONLY, DOC_STATE_STORE, TrainParams

ROOT = Path(__file__).resolve().parent.parent

# deployment -> (its profile, its flow, the `gear` command line that is the same run)
PROFILED_DEPLOYMENTS = {
    "build-rir-dataset/weekly-refresh": ("paper", "build-rir-dataset", ["build-dataset", "--set", "only_new_dump=true"]),
    "train-gear/train": ("demo", "train-gear", ["train"]),
    # Its GPU layout (nproc_per_node, nnodes) comes from the gear-gpu pool's job variables (tests/test_operations.py).
    "train-gear/train-gpu": ("paper", "train-gear", ["train", "--profile", "paper", "--device", "cuda"]),
    "rir-pipeline/scheduled-refresh": ("demo", "rir-pipeline", ["pipeline"]),
}
MODELS = {"build-rir-dataset": BuildDatasetParams, "train-gear": TrainParams, "evaluate-gear": EvalParams,
          "rir-pipeline": PipelineParams}
FLOW_NAMES = {"build_rir_dataset": "build-rir-dataset", "train_gear": "train-gear", "evaluate_gear": "evaluate-gear",
              "rir_pipeline": "rir-pipeline"}


def deployments() -> dict[str, dict]:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return {f"{FLOW_NAMES[d['entrypoint'].rsplit(':', 1)[1]]}/{d['name']}": d for d in spec["deployments"]}


def is_within(part: dict, whole: dict, path: str = "") -> list[str]:
    """Where ``part`` (nested) is not found in ``whole`` with the same values."""
    missing = []
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(whole.get(key), dict):
            missing += is_within(value, whole[key], f"{path}{key}.")
        elif key not in whole or whole[key] != value:
            missing.append(f"{path}{key}: profile {value!r}, deployment {whole.get(key, '<absent>')!r}")
    return missing


@pytest.mark.parametrize("name", sorted(PROFILED_DEPLOYMENTS))
def test_deployment_holds_its_profile_and_is_the_cli_run(name):
    profile, flow, command = PROFILED_DEPLOYMENTS[name]
    deployment = deployments()[name]
    params = (deployment.get("parameters") or {}).get("params", {})
    assert not is_within(overrides(profile, flow), params), is_within(overrides(profile, flow), params)

    result = CliRunner().invoke(app, [*command, "--dry-run"])
    assert result.exit_code == 0, result.output
    from_cli = yaml.safe_load(result.stdout)
    from_deployment = MODELS[flow].model_validate(params).model_dump(mode="json")
    assert from_cli == from_deployment


def test_every_deployment_entrypoint_is_known():
    assert set(PROFILED_DEPLOYMENTS) <= set(deployments())
    assert "profile" not in str(deployments()["train-gear/train"]["parameters"])  # written out, not named


def flat(cfg: TrainConfig) -> dict:
    d = dataclasses.asdict(cfg)
    return {**d.pop("model"), **d}


def test_demo_training_is_the_embedded_run(tmp_path):
    train_file = tmp_path / "train.parquet"
    params = resolve_params(TrainParams, "demo", flags={"init_checkpoint": "/ckpt"})
    demo = params.train_config(train_file, tmp_path / "run")
    # The frozen E_d's states are kept under the output folder (an operational path, outside the run key).
    expected = TrainConfig.embedded(dataset=str(train_file), init_checkpoint="/ckpt", output_dir=str(tmp_path / "run"),
                                    doc_state_store=str(Path(params.output_dir) / DOC_STATE_STORE))
    assert demo == expected
    assert resolve_params(TrainParams, "embedded") == resolve_params(TrainParams, "demo")  # the demo's other name
    assert overrides("demo", "train-gear")["decoder_lr_mult"] == EMBEDDED["decoder_lr_mult"]


def test_paper_profile_is_the_model_defaults(tmp_path):
    for flow, model in MODELS.items():
        assert overrides("paper", flow) == {}
        assert resolve_params(model, "paper") == model()
    paper = flat(TrainParams().train_config(tmp_path / "train.parquet", tmp_path))
    defaults = flat(TrainConfig(dataset=str(tmp_path / "train.parquet"), init_checkpoint=paper["init_checkpoint"],
                                output_dir=str(tmp_path)))
    # TrainParams writes out two settings that TrainConfig leaves to the checkpoint / to new_module_lr_mult.
    assert {k: (defaults[k], v) for k, v in paper.items() if defaults[k] != v} == {
        "attention_dropout": (None, 0.1), "decoder_lr_mult": (None, 1.0)}


def test_a_profile_fills_only_the_fields_not_given():
    params = resolve_params(TrainParams, "demo", flags={"epochs": 2})
    assert (params.epochs, params.batch_size, params.cross_attention_init) == (2, 8, "identity")
    pipeline = resolve_params(PipelineParams, "demo", sets=["build.units.docs_per_article=1", "evaluate.layer=2"])
    assert pipeline.build.units.docs_per_article == 1  # given
    assert pipeline.build.units.max_doc_tokens == 500  # the model default
    assert pipeline.build.rewrite.units_per_doc == 5 and pipeline.build.triples.test_fraction == 0.4  # the profile
    assert (pipeline.evaluate.layer, pipeline.evaluate.max_generation_queries) == (2, 48)
    assert (pipeline.evaluate.output_dir, pipeline.evaluate.work_dir) == ("data/eval", "data")
    assert resolve_params(PipelineParams, "demo").train == resolve_params(TrainParams, "demo")
    with pytest.raises(ParamsError, match="unknown profile 'laptop'"):
        resolve_params(TrainParams, "laptop")
    assert set(PROFILES) == {"demo", "paper"}


def test_the_models_know_no_profile():
    """A profile is applied once, where parameters are resolved: no model reads one."""
    for model in MODELS.values():
        assert "_profile" not in model.__pydantic_decorators__.model_validators
        assert "profile" not in model.model_fields


PROFILE_HINT = "a profile is applied by the CLI (`gear <command> --profile demo`)"


def test_a_profile_key_is_an_error_that_says_where_profiles_are_applied():
    """``profile: demo`` in a deployment's or an API call's parameters would otherwise be
    dropped, and the run would get the paper defaults without a word."""
    import jsonschema
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.callables import parameter_schema
    from pydantic import ValidationError

    from flows.params import format_errors
    from flows.train_gear import train_gear

    for model in MODELS.values():
        with pytest.raises(ValidationError) as caught:
            model.model_validate({"profile": "demo"})
        (line,) = format_errors(caught.value, model)
        assert line.startswith("parameters: 'profile' is not a parameter: " + PROFILE_HINT), line
        assert "prefect.yaml's deployments" in line and "pass the values themselves" in line
    with pytest.raises(ValidationError, match="'profile' is not a parameter"):
        PipelineParams.model_validate({"train": {"profile": "demo"}})
    # A flow run validates its parameters: the deployment's run fails with the message, not on the defaults.
    with pytest.raises(ParameterTypeError, match=re.escape("'profile' is not a parameter: " + PROFILE_HINT)):
        train_gear.validate_parameters({"params": {"profile": "demo", "epochs": 2}})
    # The server refuses it before any run (enforce_parameter_schema), naming the key.
    schema = parameter_schema(train_gear).model_dump_for_openapi()
    with pytest.raises(jsonschema.ValidationError, match="'profile' was unexpected"):
        jsonschema.validate({"params": {"profile": "demo"}}, schema)
    # The CLI's --config / --set name it too, and point at --profile.
    with pytest.raises(ParamsError, match=re.escape("--set profile=demo: unknown parameter 'profile' (a profile is applied")):
        resolve_params(TrainParams, sets=["profile=demo"])


def test_any_unknown_key_is_an_error_naming_it():
    """pydantic's default drops unknown keys; the parameter models and their nested configs refuse them."""
    from pydantic import ValidationError

    from flows.params import format_errors

    for model, data, expected in [
        (TrainParams, {"epoch": 3}, "epoch: is not a parameter (got 3)"),
        (EvalParams, {"layers": 2}, "layers: is not a parameter (got 2)"),
        (BuildDatasetParams, {"relevance": {"treshold": 0.3}}, "relevance.treshold: is not a parameter (got 0.3)"),
        (PipelineParams, {"build": {"units": {"docs": 1}}}, "build.units.docs: is not a parameter (got 1)"),
        (BuildDatasetParams, {"rewrite": {"gate": {"max_words": 5}}}, "rewrite.gate.max_words: is not a parameter (got 5)"),
        (BuildDatasetParams, {"runner": {"kinds": "dask"}}, "runner.kinds: is not a parameter (got 'dask')"),
    ]:
        with pytest.raises(ValidationError) as caught:
            model.model_validate(data)
        assert format_errors(caught.value, model) == [expected]


def test_train_params_defaults_are_the_train_config_defaults():
    """Written once: each default of the train-gear form is TrainConfig's (or its GearConfig's),
    except the two that TrainConfig leaves to the checkpoint and to new_module_lr_mult (None)."""
    paper = TrainConfig()
    own = {"dataset", "output_dir", "init_checkpoint", "attention_dropout", "decoder_lr_mult"} | _LAUNCH_ONLY
    for name, field in TrainParams.model_fields.items():
        if name not in own:
            assert field.default == setting(paper, name), name
    assert TrainParams().decoder_lr_mult == paper.decoder_lr_multiplier()
    epochs = TrainParams.model_fields["epochs"].description
    assert f"paper {paper.epochs}, demo {TrainConfig.embedded().epochs}" in epochs


def test_train_params_have_concrete_defaults_and_reach_the_train_config():
    schema = TrainParams.model_json_schema()["properties"]
    optional = {name for name, spec in schema.items() if any(s.get("type") == "null" for s in spec.get("anyOf", []))}
    assert optional == {"dataset", "init_checkpoint"}  # empty = the latest dataset / the embedded encoder
    # The GPU layout's defaults come from the worker's environment (the gear-gpu pool): the form shows
    # none, and the description names the variable.
    from_env = TrainParams.ENV_DEFAULTS
    assert set(from_env) == {"nproc_per_node", "nnodes", "rdzv_endpoint"}
    assert all(name in schema[field]["description"] and "default" not in schema[field] for field, name in from_env.items())
    assert all(spec.get("default") is not None for name, spec in schema.items() if name not in optional | set(from_env))
    assert "profile" not in schema  # an input key, not a form field
    names = {f.name for f in dataclasses.fields(TrainConfig)} | {f.name for f in dataclasses.fields(GearConfig)}
    assert set(TrainParams.model_fields) - names == _LAUNCH_ONLY
    cfg = TrainParams(epochs=3, queue_size=32, batch_size=4, attention_dropout=0.05).train_config(Path("t.parquet"), Path("r"))
    assert (cfg.epochs, cfg.model.queue_size, cfg.batch_size, cfg.attention_dropout) == (3, 32, 4, 0.05)


def test_deployment_parameters_pass_the_flows_prefect_schema():
    """What the server checks with enforce_parameter_schema (a quoted or 1e-4 float would fail here)."""
    import jsonschema
    from prefect.utilities.callables import parameter_schema

    from flows.build_rir_dataset import build_rir_dataset
    from flows.evaluate_gear import evaluate_gear
    from flows.rir_pipeline import rir_pipeline
    from flows.train_gear import train_gear

    flows = {"build-rir-dataset": build_rir_dataset, "train-gear": train_gear, "evaluate-gear": evaluate_gear,
             "rir-pipeline": rir_pipeline}
    for name, deployment in deployments().items():
        schema = parameter_schema(flows[name.split("/")[0]]).model_dump_for_openapi()
        jsonschema.validate(deployment.get("parameters") or {}, schema)
    schema = parameter_schema(train_gear).model_dump_for_openapi()
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"params": {"lr": "1e-4"}}, schema)
