"""End to end on tiny fixtures: every system, every set, the report files,
the cache, and the evaluate-gear flow under Prefect."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from eval_helpers import make_tiny_gear, tiny_gear_dir, write_beir, write_dataset, write_squad  # noqa: F401

from tasks.evaluate import EvalParams, evaluate_system, write_report

pytestmark = pytest.mark.slow  # ~1-2 min on 2 shared cores: MiniLM, BM25 and two tiny GeARs on three sets


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_gear_dir):  # noqa: F811
    root = tmp_path_factory.mktemp("eval-e2e")
    write_dataset(root)
    params = EvalParams(
        model_dirs=[str(tiny_gear_dir)],
        contrastive_model_dir=str(make_tiny_gear(root / "gear-cl", lm_weight=0.0)),
        dataset=str(root),
        squad_json=[str(write_squad(root / "dev.json"))],
        beir_dirs=[str(write_beir(root / "nq"))],
        output_dir=str(root / "report"),
        work_dir=str(root / "work"),
        all_layers=True,
        generation_max_tokens=6,
    )
    dirs = [evaluate_system(s, params) for s in params.systems()]
    return params, dirs, write_report(dirs, params)


def test_report_files_have_every_model_set_and_table(evaluated):
    params, _, out = evaluated
    report = json.loads((out / "report.json").read_text())
    rows = ["BM25", "MiniLM-L6 (pre-trained)", "GeAR w/o L_LM", "GeAR"]
    assert report["rows"] == rows
    assert report["set_order"] == ["RIR", "dev", "nq"]
    assert report["sets"]["RIR"]["sizes"] == {"documents": 6, "queries": 5, "unit_queries": 5}
    for s in ("RIR", "dev", "nq"):
        for model in rows:
            m = report["retrieval"][s][model]
            assert set(m) == {f"{x}@{k}" for x in ("recall", "map") for k in (1, 3, 5, 10)}
            assert all(0.0 <= v <= 1.0 for v in m.values())
            assert m["recall@10"] == 1.0 or s == "nq"  # <= 10 documents: everything is retrieved
    trained = [r for r in rows if r != "GeAR w/o L_LM"]
    for model in trained:
        assert report["localization"]["RIR"][model]["recall@5"] == 1.0  # <= 4 sentences per document
        assert report["localization_ci"]["RIR"][model]["recall@5"] == [1.0, 1.0]
        lo, hi = report["localization_ci"]["RIR"][model]["recall@1"]
        assert lo <= report["localization"]["RIR"][model]["recall@1"] <= hi
    for model in rows:
        assert report["localization"]["nq"][model] is None
        assert report["retrieval_ci"]["nq"][model]["recall@1"] is not None
    # lm_weight 0 in its config.json: the fusion never trained, so no localisation or generation
    assert report["localization"]["RIR"]["GeAR w/o L_LM"] is None
    assert set(report["not_applicable"]["GeAR w/o L_LM"]) == {"localization", "generation"}
    # random rows: 3 documents of 3 sentences and 2 of 4 among the 5 test queries; 6 documents in the corpus
    assert report["localization_random"]["RIR"]["recall@1"] == pytest.approx((3 / 3 + 2 / 4) / 5)
    assert report["retrieval_random"]["RIR"]["recall@1"] == pytest.approx(1 / 6)
    assert report["n_queries"]["localization"]["RIR"] == 5 and report["n_queries"]["retrieval"]["nq"] == 2
    assert set(report["generation"]["RIR"]["GeAR"]) == {"rouge1", "rougeL"}
    assert set(report["generation_ci"]["RIR"]["GeAR"]) == {"rouge1", "rougeL"}
    assert set(report["generation"]["dev"]["GeAR"]) == {"em", "f1"}
    assert report["generation"]["RIR"]["GeAR w/o L_LM"] is None
    # Each generation with no letter or digit is counted, per model and set.
    assert 0 <= report["punctuation_only"]["GeAR"]["RIR"] <= report["n_queries"]["generation"]["RIR"]
    # The query-blind prior sits beside the random row, and GeAR's diagnostics are reported.
    assert report["localization_prior"]["RIR"]["recall@3"] >= report["localization_random"]["RIR"]["recall@3"]
    assert set(report["diagnostics"]["GeAR"]["RIR"]) == {"lift_by_layer", "document_dependence"}
    assert set(report["localization_by_layer"]["GeAR"]["RIR"]) == {"1", "2"}
    md = (out / "report.md").read_text()
    for heading in ("## Table 1", "## Table 2", "## Table 3", "Localisation by fusion layer, GeAR on RIR"):
        assert heading in md
    assert all(f"| {r} |" in md for r in [*rows, "Random ranking"])
    assert "| Model (5 queries) |" in md


def test_html_has_tables_plots_and_no_machine_paths(evaluated):
    params, _, out = evaluated
    page = (out / "report.html").read_text()
    assert page.count("<h2>Table") == 3 and "<td>Random ranking</td>" in page
    assert page.count("data:image/png;base64,") == 2  # by-layer plots of GeAR on RIR and dev; no training log here
    assert "No training loss recorded" in page
    # the tiny model lies outside the output folder, the contrastive one beside it, MiniLM in site-packages
    roots = {str(Path(params.output_dir).parent), str(Path(params.model_dirs[0]).parent), str(Path(__file__).parents[1])}
    for name in ("report.html", "report.md", "report.json"):
        text = (out / name).read_text()
        assert not [r for r in roots if r in text]


def test_html_shows_two_queries_with_top10_tokens_and_generations(evaluated):
    _, _, out = evaluated
    page = (out / "report.html").read_text()
    assert page.count("<h2>Query") == 2
    blocks = page.split("<h2>Query")[1:]
    assert all(len(re.findall("<mark", b)) == 10 for b in blocks)
    assert page.count("<b>Generated:</b>") == 2


def test_rerun_uses_the_completed_stage_folders(evaluated):
    params, dirs, _ = evaluated
    before = [(d / "results.json").stat().st_mtime_ns for d in dirs]
    again = [evaluate_system(s, params) for s in params.systems()]
    assert again == dirs
    assert [(d / "results.json").stat().st_mtime_ns for d in dirs] == before


def test_changed_setting_gets_a_new_folder(evaluated):

    params, dirs, _ = evaluated
    bm25 = params.systems()[0]
    assert evaluate_system.output_dir(bm25, params) == dirs[0]
    assert evaluate_system.output_dir(bm25, params.model_copy(update={"ks": [1, 2]})) != dirs[0]


def test_flow_writes_the_report_and_artifacts(evaluated, prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.evaluate_gear import evaluate_gear

    params, _, _ = evaluated
    params = params.model_copy(update={"output_dir": str(tmp_path / "flow-report")})
    out = evaluate_gear(params)  # the per-system folders are complete: only the report is written
    assert out == str(tmp_path / "flow-report")
    for name in ("report.md", "report.json", "report.html"):
        assert (tmp_path / "flow-report" / name).is_file()

    import asyncio

    async def keys():
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts()}

    found = asyncio.run(keys())
    assert {"eval-report", "eval-generation", "eval-retrieval-rir", "eval-localization-dev"} <= found


def test_flow_refuses_malformed_input_without_retrying(evaluated, prefect_harness, tmp_path):
    from flows.evaluate_gear import evaluate_gear
    from tasks.common import PipelineInputError

    bad = write_beir(tmp_path / "bad", qrels="q1\td404\t1\n")
    params = EvalParams(beir_dirs=[str(bad)], output_dir=str(tmp_path / "out"), baselines=True)
    params = params.model_copy(update={"work_dir": str(tmp_path / "work")})
    with pytest.raises(PipelineInputError, match="document 'd404' is not in corpus.jsonl"):
        evaluate_gear(params)
    assert not (tmp_path / "out" / "report.md").exists()

    import asyncio

    from prefect.client.orchestration import get_client

    async def failed_runs():
        async with get_client() as client:
            return [r for r in await client.read_task_runs() if r.state and r.state.is_failed()]

    runs = [r for r in asyncio.run(failed_runs()) if r.name.startswith("evaluate-")]
    assert runs and all(r.run_count == 1 for r in runs)  # a malformed file is not retried
