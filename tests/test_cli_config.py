"""The `gear` CLI's parameters: --profile < --config < --set < dedicated flags
(flows/params.py: resolve_params), choices in --help, one line per bad field
and exit status 2. Nothing here runs a flow (--dry-run prints the parameters)."""

from __future__ import annotations

import subprocess
import sys
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.params import BuildDatasetParams, ParamsError, PipelineParams, resolve_params
from tasks.extract_docs import ExtractConfig
from gear_cli import app
from tasks.evaluate import EvalParams
from tasks.relevance import RelevanceConfig
from tasks.rewrite import RewriteConfig
from tasks.select_units import UnitConfig
from tasks.train import TrainParams
from tasks.write_triples import TriplesConfig

ROOT = Path(__file__).resolve().parent.parent
VLLM = "http://vllm.internal:8000/v1"
LLAMA = "meta-llama/Llama-3.1-70B-Instruct"


def run(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "build.yaml"
    path.write_text(
        "relevance:\n  threshold: 0.35\n"
        f"rewrite:\n  backend: openai\n  model: {LLAMA}\n  base_url: {VLLM}\n"
        "units:\n  docs_per_article: 4\n"
    )
    return path


def test_config_and_set_resolve_to_the_expected_params(tmp_path):
    params = resolve_params(
        BuildDatasetParams, "demo", write_config(tmp_path),
        ["rewrite.concurrency=8", "relevance.threshold=0.4", "relevance.model=BAAI/bge-base-en-v1.5"],
        {"units.docs_per_article": 2},
    )
    assert params == BuildDatasetParams(
        extract=ExtractConfig(max_chars=12_000),  # the demo profile
        units=UnitConfig(docs_per_article=2),  # flag > --config > profile (3)
        rewrite=RewriteConfig(backend="openai", model=LLAMA, base_url=VLLM, concurrency=8, units_per_doc=5),
        relevance=RelevanceConfig(threshold=0.4, model="BAAI/bge-base-en-v1.5"),  # --set > --config
        triples=TriplesConfig(test_fraction=0.4),  # the demo profile
    )


@pytest.mark.parametrize(
    "config, sets, flags, expected",
    [
        (False, [], {}, 3),  # profile
        (True, [], {}, 4),  # --config over the profile
        (True, ["units.docs_per_article=5"], {}, 5),  # --set over --config
        (True, ["units.docs_per_article=5"], {"units.docs_per_article": 6}, 6),  # a flag over --set
        (False, ["units={docs_per_article: 7}"], {}, 7),  # a mapping value merges into the model
    ],
)
def test_layers_apply_in_order(tmp_path, config, sets, flags, expected):
    params = resolve_params(BuildDatasetParams, "demo", write_config(tmp_path) if config else None, sets, flags)
    assert params.units.docs_per_article == expected
    assert params.rewrite.units_per_doc == 5  # the rest of the profile stays


def test_dry_run_prints_what_resolve_params_gives(tmp_path):
    config = write_config(tmp_path)
    result = run("build-dataset", "--config", str(config), "--set", "rewrite.concurrency=8", "--docs-per-article", "2",
                 "--dry-run")
    assert result.exit_code == 0, result.output
    printed = BuildDatasetParams.model_validate(yaml.safe_load(result.stdout))
    assert printed == resolve_params(BuildDatasetParams, "paper", config, ["rewrite.concurrency=8"],
                                     {"units.docs_per_article": 2})
    # The printed YAML is itself a --config file for the same run.
    again = tmp_path / "again.yaml"
    again.write_text(result.stdout)
    assert resolve_params(BuildDatasetParams, None, again) == printed


def test_a_bad_value_is_one_line_per_field_and_exit_2():
    result = run("build-dataset", "--set", "relevance.threshold=1.5", "--set", "rewrite.backend=gpt",
                 "--set", "triples.test_fraction=half", "--dry-run")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert sorted(lines) == sorted([
        "error: relevance.threshold: must be ≤ 1 (got 1.5)",
        "error: rewrite.backend: must be 'local', 'openai' or 'vllm' (got 'gpt')",
        "error: triples.test_fraction: must be a number (got 'half')",
    ])
    assert "pydantic" not in result.output and "http" not in result.output


def test_an_unknown_key_is_an_error_naming_it(tmp_path):
    result = run("build-dataset", "--set", "relevance.treshold=0.3", "--dry-run")
    assert result.exit_code == 2
    assert result.stderr.strip() == ("error: --set relevance.treshold=0.3: unknown parameter 'relevance.treshold' "
                                     "(relevance has no such field; did you mean relevance.threshold?)")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    result = run("pipeline", "--config", str(bad), "--dry-run")
    assert result.exit_code == 2 and "unknown parameter 'train.epoch'" in result.stderr, result.output
    with pytest.raises(ParamsError, match="expected KEY=VALUE"):
        resolve_params(TrainParams, None, None, ["epochs"])
    bad.write_text("- a list\n")
    with pytest.raises(ParamsError, match="must be a mapping"):
        resolve_params(TrainParams, None, bad)
    bad.write_text("epochs: [1\n")
    with pytest.raises(ParamsError, match="not valid YAML at line"):
        resolve_params(TrainParams, None, bad)


def test_help_lists_the_choices():
    for command in ("build-dataset", "train", "evaluate", "pipeline"):
        result = run(command, "--help")
        assert result.exit_code == 0, result.output
        for option in ("--profile", "--config", "--set", "--dry-run"):
            assert option in result.stdout, (command, option)
        assert "demo|paper" in result.stdout, command
    assert "local|openai|vllm" in run("build-dataset", "--help").stdout
    assert "local|openai|vllm" in run("pipeline", "--help").stdout
    assert "auto|cpu|cuda" in run("train", "--help").stdout
    assert run("build-dataset", "--rewriter-backend", "gpt").exit_code == 2  # refused by the choice itself


def test_pipeline_flags_reach_every_step(tmp_path):
    out = tmp_path / "out"
    result = run("pipeline", "--output-dir", str(out), "--epochs", "2", "--test-fraction", "0.3",
                 "--units-per-doc", "4", "--dry-run")
    assert result.exit_code == 0, result.output
    params = PipelineParams.model_validate(yaml.safe_load(result.stdout))
    assert (params.build.output_dir, params.train.output_dir) == (str(out), str(out))
    assert (params.evaluate.output_dir, params.evaluate.work_dir) == (str(out / "eval"), str(out))
    assert (params.train.epochs, params.build.triples.test_fraction, params.build.rewrite.units_per_doc) == (2, 0.3, 4)
    assert params.train.batch_size == 8 and params.build.units.docs_per_article == 3  # the demo profile


def test_train_and_evaluate_resolve_their_defaults(tmp_path):
    result = run("train", "--epochs", "2", "--set", "lr=0.0003", "--dry-run")
    assert result.exit_code == 0, result.output
    assert TrainParams.model_validate(yaml.safe_load(result.stdout)) == resolve_params(
        TrainParams, "demo", flags={"epochs": 2, "lr": 3e-4})
    result = run("evaluate", "--output-dir", str(tmp_path), "--dry-run")
    assert result.exit_code == 0, result.output
    params = EvalParams.model_validate(yaml.safe_load(result.stdout))
    assert params.model_dirs == [str(tmp_path / "models")] and params.dataset == str(tmp_path)
    assert params.output_dir == str(tmp_path)
    result = run("evaluate", "--output-dir", str(tmp_path))  # no trained model there: a one-line reason, status 1
    assert result.exit_code == 1 and "no --model given and no trained model recorded here" in result.stderr


def test_gear_help_is_fast_and_imports_no_flow():
    code = "import sys, gear_cli; assert 'prefect' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_a_build_with_no_triples_prints_its_funnel_not_a_traceback(monkeypatch):
    """A data condition: one line, the funnel, the rule that dropped the most; --debug adds the traceback."""
    import flows.build_rir_dataset
    from tasks.common import Funnel
    from tasks.write_triples import NoTriplesError

    funnel = Funnel({"extract_docs": {"input": 3, "kept": 1, "dropped:non_article_namespace": 2},
                     "select_units.articles": {"input": 1, "dropped:not_english": 1},
                     "clean_wikitext": {"dropped:list_item": 26}})

    def no_triples(params):
        raise NoTriplesError(funnel)

    monkeypatch.setenv("GEAR_SHARED_PREFECT_DB", "1")  # no local API: the flow is replaced
    monkeypatch.setattr(flows.build_rir_dataset, "build_rir_dataset", no_triples)
    result = run("build-dataset")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "error: no triples: every pair was dropped (see the funnel), and an empty dataset is never published"
    assert "| select_units.articles | dropped:not_english | 1 |" in lines
    assert lines[-1] == "the rule that dropped the most: select_units.articles not_english (1 of 1)"
    assert "Traceback" not in result.stderr
    assert "Traceback" in run("--debug", "build-dataset").stderr


def test_evaluate_takes_the_newest_gear_and_gear_l_loc_runs_of_the_output_dir(tmp_path):
    import json

    from tasks.common import SUCCESS_MARKER
    from tasks.contracts import STAND_IN_TRIPLES

    data = tmp_path / "datasets" / "v1"

    def trained(key: str, lm: float, loc: float, dataset: str) -> str:
        model = tmp_path / "models" / key / "model"
        model.mkdir(parents=True)
        (model / "config.json").write_text(json.dumps({"gear": {"lm_weight": lm, "loc_weight": loc}}))
        (model.parent / "train_config.json").write_text(json.dumps(
            {"dataset": dataset, "eval_file": str(data / "test.parquet")}))
        (model.parent / SUCCESS_MARKER).write_text("{}")
        return str(model)

    gear = trained("a", 1.0, 0.0, str(data / "train.parquet"))
    other = trained("b", 1.0, 1.0, str(tmp_path / "datasets" / "v0" / "train.parquet"))
    # A run on stand-in units trains on a file in its own folder; it belongs to the dataset it was made from.
    with_loc = trained("c", 1.0, 1.0, str(tmp_path / "models" / "c" / STAND_IN_TRIPLES))
    os.utime(Path(other).parent / SUCCESS_MARKER, (2e9, 2e9))  # the newest, but of another dataset
    contrastive = trained("d", 0.0, 0.0, str(data / "train.parquet"))
    result = run("evaluate", "--output-dir", str(tmp_path), "--dry-run")
    assert result.exit_code == 0, result.output
    params = EvalParams.model_validate(yaml.safe_load(result.stdout))
    assert params.model_dirs == [gear, with_loc] and params.contrastive_model_dir == contrastive
