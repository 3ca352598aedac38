"""The report has every row and column of the paper's three tables."""

from __future__ import annotations

import pytest

from tasks.evaluate.config import EvalParams
from tasks.evaluate.core import NOT_TRAINED_FUSION
from tasks.evaluate.page import highlight, render_html
from tasks.evaluate.report import build_report, display_path, ranking_table, render_markdown
from tasks.evaluate.stats import summarize

KS = [1, 3, 5, 10]
COLUMNS = [f"R@{k}" for k in KS] + [f"MAP@{k}" for k in KS]
NAMES = [f"{m}@{k}" for m in ("recall", "map") for k in KS]
ROWS = ["BM25", "MiniLM", "GeAR w/o L_LM", "GeAR"]


def _summary(values: list[float], names=NAMES) -> dict:
    """A results.json metric entry from per-query values (every metric the same values)."""
    return summarize([f"q{i}" for i in range(len(values))], {n: values for n in names}, resamples=200, seed=0)


def _ranking(values: list[float]) -> dict:
    return {**_summary(values), "n_queries": len(values), "timing": {"queries_s": 1.0, "queries_per_s": 2.0}}


def _result(name: str, kind: str, generation: bool, lm_weight: float | None = None) -> dict:
    sizes = {"documents": 3, "queries": 2, "unit_queries": 2}
    untrained = lm_weight == 0
    sets = {
        "RIR": {"kind": "rir", "source": "/data/ds/v1", "sizes": sizes, "funnel": {}, "retrieval": _ranking([0.5, 0.5]),
                "localization": None if untrained else _ranking([0.0, 0.5]), "localization_by_layer": None,
                "retrieval_random": _summary([1 / 3, 1 / 3]), "localization_random": _summary([0.2, 0.1]),
                "generation": {"metrics": {"rouge1": 40.0, "rougeL": 35.0}, "n_queries": 2,
                               "ci": {"rouge1": [30.0, 50.0], "rougeL": [20.0, 50.0]},
                               "examples": [{"query": "q", "gold": "g", "generated": "x"}]} if generation else None},
        "dev": {"kind": "qa", "source": "dev.json", "sizes": sizes, "funnel": {}, "retrieval": _ranking([0.75, 0.75]),
                "localization": None if untrained else _ranking([0.5, 0.5]),
                "localization_by_layer": {"1": _ranking([0.1, 0.1]), "2": _ranking([0.2, 0.2])} if generation else None,
                "retrieval_random": _summary([1 / 3, 1 / 3]), "localization_random": _summary([0.3, 0.3]),
                "generation": {"metrics": {"em": 10.0, "f1": 20.0}, "ci": None, "n_queries": 2} if generation else None},
        "nq": {"kind": "beir", "source": "nq", "sizes": {**sizes, "unit_queries": 0}, "funnel": {},
               "retrieval": _ranking([0.125, 0.125]), "localization": None, "localization_by_layer": None, "generation": None,
               "retrieval_random": _summary([0.5, 0.5]), "localization_random": None},
    }
    out = {"system": {"name": name, "kind": kind, "path": None if kind == "bm25" else f"/m/{name}"},
           "layer": 2 if kind == "gear" else None, "n_layers": 2 if kind == "gear" else None, "sets": sets,
           "figure": None, "elapsed_s": 1.0, "lm_weight": lm_weight}
    if untrained:
        out["not_applicable"] = {"localization": NOT_TRAINED_FUSION, "generation": NOT_TRAINED_FUSION}
    return out


@pytest.fixture()
def results():
    return [_result("BM25", "bm25", False), _result("MiniLM", "encoder", False),
            _result("GeAR w/o L_LM", "gear", False, lm_weight=0.0), _result("GeAR", "gear", True, lm_weight=1.0)]


@pytest.fixture()
def report(results):
    return build_report(results, EvalParams(ks=KS, output_dir="/m"))


def _table(md: str, caption: str) -> list[list[str]]:
    """The first Markdown table after a caption line, as rows of cells."""
    rows = []
    for line in md.split(caption, 1)[1].strip().splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows


def test_retrieval_and_localisation_tables_have_every_row_and_column(report):
    md = render_markdown(report)
    for section, sets in (("## Table 1", ["RIR", "dev", "nq"]), ("## Table 2", ["RIR", "dev"])):
        body = md.split(section, 1)[1]
        for s in sets:
            table = _table(body, f"**{s}**")
            assert table[0] == ["Model (2 queries)", *COLUMNS]  # the query count is in the header
            assert [row[0] for row in table[2:]] == ["Random ranking", *ROWS]
    t1_rir = _table(md.split("## Table 1", 1)[1], "**RIR**")
    assert t1_rir[3][1:] == ["0.500 [0.500, 0.500]"] * 8  # BM25: the mean and its interval
    assert t1_rir[2][1:] == ["0.333 [0.333, 0.333]"] * 8  # random ranking of the corpus
    t2_rir = _table(md.split("## Table 2", 1)[1], "**RIR**")
    # two queries scoring 0 and 0.5: resamples average 0, 0.25 or 0.5
    assert t2_rir[6][1:] == ["0.250 [0.000, 0.500]"] * 8
    assert t2_rir[2][1] == "0.150 [0.100, 0.200]"
    assert "**nq**" not in md.split("## Table 2", 1)[1].split("## Table 3", 1)[0]  # no units in BEIR


def test_paper_layout_tables(report):
    md = render_markdown(report)
    t1 = _table(md.split("## Table 1", 1)[1], "Paper layout:")
    assert t1[0] == ["Model", "RIR R@5 (n=2)", "RIR M@5 (n=2)", "dev R@5 (n=2)", "dev M@5 (n=2)", "nq R@5 (n=2)", "nq M@5 (n=2)"]
    assert [r[0] for r in t1[2:]] == ["Random ranking", *ROWS]
    t2 = _table(md.split("## Table 2", 1)[1], "Paper layout:")
    assert t2[0] == ["Model", "RIR R@3 (n=2)", "RIR M@3 (n=2)", "dev R@1 (n=2)", "dev M@1 (n=2)"]  # the paper's cut-offs
    rows = {r[0]: r[1:] for r in t2[2:]}
    assert rows["GeAR"] == ["0.250 [0.000, 0.500]"] * 2 + ["0.500 [0.500, 0.500]"] * 2


def test_contrastive_only_row_is_not_applicable_with_a_footnote(report):
    md = render_markdown(report)
    t2 = _table(md.split("## Table 2", 1)[1], "**RIR**")
    rows = {r[0]: r[1:] for r in t2[2:]}
    assert rows["GeAR w/o L_LM"] == ["n/a"] * 8
    assert rows["BM25"] != ["n/a"] * 8
    table2 = md.split("## Table 2", 1)[1].split("## Table 3", 1)[0]
    assert "n/a: GeAR w/o L_LM was trained with lm_weight 0" in table2
    assert report["localization"]["RIR"]["GeAR w/o L_LM"] is None  # report.json keeps its types
    assert set(report["not_applicable"]["GeAR w/o L_LM"]) == {"localization", "generation"}


def test_not_applicable_follows_the_saved_config_not_the_name(results):
    # the same name with a trained fusion is an ordinary row; an untrained one under any name is n/a
    results[2] = _result("GeAR w/o L_LM", "gear", False, lm_weight=0.5)
    results[3] = _result("GeAR", "gear", True, lm_weight=0.0)
    report = build_report(results, EvalParams(ks=KS))
    rows = {r["Model (2 queries)"]: r for r in ranking_table(report, "localization", "RIR")}
    assert rows["GeAR w/o L_LM"]["R@3"] == "0.250 [0.000, 0.500]"
    assert rows["GeAR"]["R@3"] == "n/a"
    assert list(report["not_applicable"]) == ["GeAR"]


def test_generation_table_dashes_models_that_cannot_generate(report):
    md = render_markdown(report)
    table = _table(md.split("## Table 3", 1)[1], "percent.")
    assert table[0] == ["Model", "RIR ROUGE-1 (n=2)", "RIR ROUGE-L (n=2)", "dev EM (n=2)", "dev F1 (n=2)"]
    rows = {row[0]: row[1:] for row in table[2:]}
    assert rows["GeAR"] == ["40.0 [30.0, 50.0]", "35.0 [20.0, 50.0]", "10.0", "20.0"]
    assert rows["BM25"] == rows["MiniLM"] == ["—"] * 4
    assert rows["GeAR w/o L_LM"] == ["n/a"] * 4


def test_json_has_the_same_cells_intervals_and_random_rows(report):
    assert report["rows"] == ROWS
    assert [m["name"] for m in report["models"]] == ROWS and [m["kind"] for m in report["models"]] == ["bm25", "encoder", "gear", "gear"]
    assert report["retrieval"]["nq"]["GeAR"]["recall@10"] == 0.125
    assert report["retrieval_ci"]["nq"]["GeAR"]["recall@10"] == [0.125, 0.125]
    assert report["localization"]["RIR"]["GeAR"]["recall@3"] == 0.25
    assert report["localization_ci"]["RIR"]["GeAR"]["recall@3"] == [0.0, 0.5]
    assert report["localization"]["nq"]["BM25"] is None
    assert report["localization_random"]["RIR"]["recall@3"] == pytest.approx(0.15)
    assert report["localization_random_ci"]["RIR"]["recall@3"] == pytest.approx([0.1, 0.2])
    assert "nq" not in report["localization_random"] and report["retrieval_random"]["nq"]["map@1"] == 0.5
    assert report["n_queries"]["localization"] == {"RIR": 2, "dev": 2}
    assert report["generation"]["RIR"]["MiniLM"] is None
    assert report["generation_ci"]["RIR"]["GeAR"]["rougeL"] == [20.0, 50.0]
    assert set(report["localization_by_layer"]["GeAR"]["dev"]) == {"1", "2"}
    assert report["localization_by_layer_ci"]["GeAR"]["dev"]["2"]["recall@3"] == [0.2, 0.2]
    assert report["sets"]["RIR"]["sizes"] == {"documents": 3, "queries": 2, "unit_queries": 2}
    md = render_markdown(report)
    layers = _table(md, "Localisation by fusion layer, GeAR on dev:")
    assert [r[0] for r in layers[2:]] == ["1", "2", "random"] and layers[0][1:] == COLUMNS
    assert "averaged over heads" in md  # the pooling is stated


def test_paths_are_shown_relative_to_the_report_folder(report):
    # output_dir /m: a model inside it is shown relative, a path outside by its last two parts
    assert {m["name"]: m["path"] for m in report["models"]}["GeAR"] == "GeAR"
    assert report["sets"]["RIR"]["source"] == "ds/v1"
    assert display_path("/home/someone/runs/models/abc/model", "/elsewhere") == "abc/model"
    assert display_path("rel/dir", "/elsewhere") == "rel/dir"


def test_html_highlights_given_tokens_and_escapes_text():
    doc = "Tom & Jerry met in 1940. <b>Cartoon</b>"
    out = highlight(doc, [{"start": 19, "end": 23, "weight": 0.5}, {"start": 0, "end": 3, "weight": 0.1}])
    assert out.count("<mark") == 2 and "Tom</mark> &amp; Jerry" in out and "&lt;b&gt;" in out
    assert "1940</mark>" in out


def test_html_without_a_figure_says_so(report):
    assert "No GeAR model" in render_html(report)


def _training_records(lm: bool) -> list[dict]:
    """metrics.jsonl as gear_model.train writes it: start, steps, held-out evaluations, a checkpoint with a path."""
    records = [{"event": "start", "step": 0, "steps_per_epoch": 4, "total_steps": 8}]
    for step in range(1, 9):
        itc = 2.0 / step
        records.append({"event": "step", "step": step, "epoch": (step - 1) // 4, "loss": itc + (5.0 / step if lm else 0.0),
                        "itc": itc, "lm": 5.0 / step if lm else 0.0, "lr": 1e-4})
        if step % 4 == 0:
            records.append({"event": "eval", "step": step, "epoch": step // 4, "n_queries": 2,
                            "localization": {"recall@1": 0.1 * step, "recall@3": 0.1 * step, "random_recall@3": 0.3},
                            "generation": {"rouge1": 3.0 * step, "rougeL": 2.0 * step} if lm else None})
            records.append({"event": "checkpoint", "step": step, "path": "/home/someone/run/checkpoints/step-4"})
    return records


def test_html_is_the_whole_report_tables_plots_and_no_absolute_paths(results, tmp_path):
    import base64
    import re

    for r in results:  # models and sets where a real run has them: absolute paths inside and outside the output
        if r["system"]["path"]:
            r["system"]["path"] = str(tmp_path / "out" / "models" / r["system"]["name"] / "model")
        r["sets"]["RIR"]["source"] = str(tmp_path / "out" / "datasets" / "v1")
        r["sets"]["dev"]["source"] = "/srv/private/squad/dev.json"
    training = {"GeAR": _training_records(lm=True), "GeAR w/o L_LM": _training_records(lm=False)}
    report = build_report(results, EvalParams(ks=KS, output_dir=str(tmp_path / "out")), training)
    page = render_html(report)
    for heading in ("Table 1: document retrieval", "Table 2: unit localisation", "Table 3: information generation"):
        assert f"<h2>{heading}</h2>" in page
    # 3 retrieval + 2 localisation + 1 by-layer + what training added + 1 generation + the data table
    assert page.count("<table>") == 9
    assert "<h3>What training added</h3>" in page and "GeAR, step 0 (init)" in page
    assert "<td>Random ranking</td>" in page and "0.250 <small>[0.000, 0.500]</small>" in page
    assert "Model (2 queries)" in page and "n/a: GeAR w/o L_LM was trained with lm_weight 0" in page
    images = re.findall(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 3  # loss curves, localisation by layer (GeAR on dev), per epoch
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "No training loss recorded" not in page and "No held-out evaluation" not in page
    assert report["training"]["GeAR"]["steps_per_epoch"] == 4 and len(report["training"]["GeAR"]["evals"]) == 2
    for text in (page, render_markdown(report)):
        assert str(tmp_path) not in text and "/srv/" not in text and "/home/" not in text
        assert not re.search(r"(?<![\w.>])/(home|tmp|srv|work|root|m)/", text)
    assert "models/GeAR/model" in page and "squad/dev.json" in page


def test_html_notes_each_plot_it_cannot_draw(report):
    page = render_html(report)  # no training records given
    assert "No training loss recorded" in page and "No held-out evaluation recorded" in page
    assert page.count("<img") == 1  # the by-layer plot still has its data


def test_long_training_logs_are_thinned_for_the_report(results):
    records = [{"event": "step", "step": s, "epoch": 0, "loss": 1.0, "itc": 1.0, "lm": 0.0} for s in range(1, 5002)]
    report = build_report(results, EvalParams(ks=KS), {"GeAR": records})
    steps = [r["step"] for r in report["training"]["GeAR"]["steps"]]
    assert len(steps) <= 1001 and steps[0] == 1 and steps[-1] == 5001


def test_cli_params_default_to_the_latest_model_and_dataset(tmp_path):
    from tasks.common import PipelineInputError

    with pytest.raises(PipelineInputError, match="no --model given"):
        EvalParams.for_cli(model=None, dataset=None, output_dir=tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "LATEST").write_text("abc123/model\n")
    params = EvalParams.for_cli(model=None, dataset=None, output_dir=tmp_path)
    assert params.model_dirs == [str(tmp_path / "models" / "abc123" / "model")]
    assert params.dataset == str(tmp_path) and params.output_dir == str(tmp_path)
    params = EvalParams.for_cli(model=tmp_path / "m", dataset=tmp_path / "d", output_dir=tmp_path / "r", all_layers=True)
    assert params.model_dirs == [str(tmp_path / "m")] and params.dataset == str(tmp_path / "d") and params.all_layers
    # a models/ folder stands for its newest run (what a deployment can name)
    params = EvalParams(model_dirs=[str(tmp_path / "models")], baselines=False)
    assert [s.path for s in params.systems()] == [str(tmp_path / "models" / "abc123" / "model")]
