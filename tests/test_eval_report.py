"""The report has every row and column of the paper's three tables."""

from __future__ import annotations

import pytest

from tasks.evaluate.config import EvalParams
from tasks.evaluate.report import build_report, highlight, render_html, render_markdown

KS = [1, 3, 5, 10]
COLUMNS = [f"R@{k}" for k in KS] + [f"MAP@{k}" for k in KS]


def _ranking(value: float) -> dict:
    return {"metrics": {f"{m}@{k}": value for m in ("recall", "map") for k in KS}, "n_queries": 2,
            "timing": {"queries_s": 1.0, "queries_per_s": 2.0}}


def _result(name: str, kind: str, generation: bool) -> dict:
    sizes = {"documents": 3, "queries": 2, "unit_queries": 2}
    sets = {
        "RIR": {"kind": "rir", "source": "ds", "sizes": sizes, "funnel": {}, "retrieval": _ranking(0.5),
                "localization": _ranking(0.25), "localization_by_layer": None,
                "generation": {"metrics": {"rouge1": 40.0, "rougeL": 35.0}, "n_queries": 2,
                               "examples": [{"query": "q", "gold": "g", "generated": "x"}]} if generation else None},
        "dev": {"kind": "qa", "source": "dev.json", "sizes": sizes, "funnel": {}, "retrieval": _ranking(0.75),
                "localization": _ranking(0.5), "localization_by_layer": {"1": _ranking(0.1), "2": _ranking(0.2)} if generation else None,
                "generation": {"metrics": {"em": 10.0, "f1": 20.0}, "n_queries": 2} if generation else None},
        "nq": {"kind": "beir", "source": "nq", "sizes": {**sizes, "unit_queries": 0}, "funnel": {},
               "retrieval": _ranking(0.125), "localization": None, "localization_by_layer": None, "generation": None},
    }
    return {"system": {"name": name, "kind": kind, "path": None if kind == "bm25" else f"/m/{name}"},
            "layer": 2 if kind == "gear" else None, "n_layers": 2 if kind == "gear" else None, "sets": sets,
            "figure": None, "elapsed_s": 1.0}


@pytest.fixture()
def report():
    results = [_result("BM25", "bm25", False), _result("MiniLM", "encoder", False),
               _result("GeAR w/o L_LM", "gear", False), _result("GeAR", "gear", True)]
    return build_report(results, EvalParams(ks=KS))


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
            assert table[0] == ["Model", *COLUMNS]
            assert [row[0] for row in table[2:]] == ["BM25", "MiniLM", "GeAR w/o L_LM", "GeAR"]
    t1_rir = _table(md.split("## Table 1", 1)[1], "**RIR**")
    assert t1_rir[2][1:] == ["0.500"] * 8
    assert "**nq**" not in md.split("## Table 2", 1)[1].split("## Table 3", 1)[0]  # no units in BEIR


def test_paper_layout_tables(report):
    md = render_markdown(report)
    t1 = _table(md.split("## Table 1", 1)[1], "Paper layout:")
    assert t1[0] == ["Model", "RIR R@5", "RIR M@5", "dev R@5", "dev M@5", "nq R@5", "nq M@5"]
    assert [r[0] for r in t1[2:]] == ["BM25", "MiniLM", "GeAR w/o L_LM", "GeAR"]
    t2 = _table(md.split("## Table 2", 1)[1], "Paper layout:")
    assert t2[0] == ["Model", "RIR R@3", "RIR M@3", "dev R@1", "dev M@1"]  # the paper's cut-offs
    assert t2[2][1:] == ["0.250", "0.250", "0.500", "0.500"]


def test_generation_table_dashes_models_that_cannot_generate(report):
    md = render_markdown(report)
    table = _table(md.split("## Table 3", 1)[1], "percent.")
    assert table[0] == ["Model", "RIR ROUGE-1", "RIR ROUGE-L", "dev EM", "dev F1"]
    rows = {row[0]: row[1:] for row in table[2:]}
    assert rows["GeAR"] == ["40.0", "35.0", "10.0", "20.0"]
    assert rows["BM25"] == rows["MiniLM"] == rows["GeAR w/o L_LM"] == ["—"] * 4


def test_json_has_the_same_cells_and_layer_table(report):
    assert report["rows"] == ["BM25", "MiniLM", "GeAR w/o L_LM", "GeAR"]
    assert report["retrieval"]["nq"]["GeAR"]["recall@10"] == 0.125
    assert report["localization"]["nq"]["BM25"] is None
    assert report["generation"]["RIR"]["MiniLM"] is None
    assert set(report["localization_by_layer"]["GeAR"]["dev"]) == {"1", "2"}
    md = render_markdown(report)
    layers = _table(md, "Localisation by fusion layer, GeAR on dev:")
    assert [r[0] for r in layers[2:]] == ["1", "2"] and layers[0][1:] == COLUMNS
    assert "averaged over heads" in md  # the pooling is stated


def test_html_highlights_given_tokens_and_escapes_text():
    doc = "Tom & Jerry met in 1940. <b>Cartoon</b>"
    out = highlight(doc, [{"start": 19, "end": 23, "weight": 0.5}, {"start": 0, "end": 3, "weight": 0.1}])
    assert out.count("<mark") == 2 and "Tom</mark> &amp; Jerry" in out and "&lt;b&gt;" in out
    assert "1940</mark>" in out


def test_html_without_a_figure_says_so(report):
    assert "No GeAR model" in render_html(report)


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
