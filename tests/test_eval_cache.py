"""The results key: every setting that changes a number is in it, and so is the model code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_helpers import make_tiny_gear, tiny_gear_dir, write_dataset  # noqa: F401 - fixture

from tasks.common import source_hash
from tasks.evaluate import EvalParams, evaluate_system
from tasks.evaluate.config import NOT_IN_RESULTS_KEY
from tasks.evaluate.core import CODE_VERSION


@pytest.fixture()
def params(tmp_path, tiny_gear_dir):  # noqa: F811
    write_dataset(tmp_path)
    return EvalParams(
        model_dirs=[str(tiny_gear_dir)], dataset=str(tmp_path), baselines=False, output_dir=str(tmp_path / "report"),
        work_dir=str(tmp_path / "work"), localization_pooling="sum", generation_max_tokens=3, max_generation_queries=2,
        bootstrap_resamples=200,
    )


def _results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_pooling_gets_a_new_results_folder_and_new_numbers(params):
    gear = params.systems()[0]
    summed = evaluate_system(gear, params)
    meaned = evaluate_system(gear, params.model_copy(update={"localization_pooling": "mean"}))
    assert summed != meaned
    a, b = (_results(d)["sets"]["RIR"]["localization"] for d in (summed, meaned))
    assert a["per_query"]["qids"] == b["per_query"]["qids"]
    assert a["per_query"] != b["per_query"]  # the same model and queries, ranked differently


@pytest.mark.parametrize(
    "update", [{"localization_pooling": "mean"}, {"layer": 1}, {"all_layers": True}, {"seed": 1},
               {"bootstrap_resamples": 500}, {"ks": [1, 2]}, {"generation_max_tokens": 4}, {"index_type": "hnsw"}],
)
def test_settings_that_change_numbers_change_the_key(params, update):
    gear = params.systems()[0]
    assert evaluate_system.output_dir(gear, params.model_copy(update=update)) != evaluate_system.output_dir(gear, params)


def test_placement_settings_do_not_change_the_key(params, tmp_path):
    gear = params.systems()[0]
    moved = params.model_copy(update={"output_dir": str(tmp_path / "elsewhere"), "batch_size": 7})
    assert evaluate_system.output_dir(gear, moved) == evaluate_system.output_dir(gear, params)


def test_the_key_is_built_by_exclusion():
    # A new EvalParams field lands in the key unless it is listed as not changing results.
    assert set(EvalParams().set_config()) == set(EvalParams.model_fields) - NOT_IN_RESULTS_KEY
    assert NOT_IN_RESULTS_KEY <= set(EvalParams.model_fields)  # no stale names


def test_code_version_covers_the_model_code():
    root = Path(__file__).resolve().parents[1]
    evaluate = sorted((root / "tasks" / "evaluate").glob("*.py"))
    model = sorted((root / "gear_model").glob("*.py"))
    assert model and CODE_VERSION == source_hash(root / "tasks" / "evaluate" / "core.py", *evaluate, *model)
    assert CODE_VERSION != source_hash(*evaluate)


def test_an_untrained_fusion_is_not_applicable_whatever_the_row_is_called(params, tmp_path):
    """Decided from the saved config.json (gear.lm_weight), not the row name."""
    contrastive = make_tiny_gear(tmp_path / "gear-cl", lm_weight=0.0)
    assert json.loads((contrastive / "config.json").read_text())["gear"]["lm_weight"] == 0.0
    spec = params.systems()[0].model_copy(update={"path": str(contrastive)})  # named "GeAR", generation on
    r = _results(evaluate_system(spec, params.model_copy(update={"all_layers": True})))
    rir = r["sets"]["RIR"]
    assert r["lm_weight"] == 0.0 and set(r["not_applicable"]) == {"localization", "generation"}
    assert rir["localization"] is None and rir["generation"] is None and rir["localization_by_layer"] is None
    assert r["figure"] is None
    assert rir["retrieval"]["metrics"]["recall@10"] == 1.0  # its encoders still retrieve
    assert rir["localization_random"]["metrics"]["recall@1"] == pytest.approx((3 * (1 / 3) + 2 * (1 / 4)) / 5)  # alps, alps, nile; jazz, jazz
