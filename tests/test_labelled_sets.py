"""`gear evaluate --dataset` on labelled sets made by hand: Parquet or JSONL rows
of (query, document, unit), with or without sentence spans, evaluated through
the CLI with the tiny GeAR."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eval_helpers import tiny_gear_dir, write_dataset  # noqa: F401
from typer.testing import CliRunner

from gear_cli import app
from tasks.common import PipelineInputError
from tasks.evaluate.loaders import check_dataset, dataset_source, load_dataset, locate_unit

ALPS = "The Alps are a mountain range in Europe. Mont Blanc is their highest peak at 4808 metres. Glaciers cover large parts."
NILE = "The Nile flows north through Egypt. It is about 6650 kilometres long. Ancient cities grew along its banks."
JAZZ = "Jazz began in New Orleans. Louis Armstrong played the trumpet. Bebop appeared in the 1940s."
ROWS = [
    {"query": "highest peak Mont Blanc", "document": ALPS, "unit": "Mont Blanc is their highest peak at 4808 metres."},
    # Copied by hand: other line breaks and case than the document.
    {"query": "Nile length", "document": NILE, "unit": "it is about 6650\nkilometres long."},
    {"query": "bebop decade", "document": JAZZ, "unit": "Bebop appeared in the 1940s."},
    {"query": "trumpet player", "document": JAZZ, "unit": "Miles Davis played the trumpet."},  # not in the document
]


def write_set(path: Path, rows=ROWS) -> Path:
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_locate_unit_finds_the_sentence_or_says_none():
    spans = [(0, 40), (41, 89), (90, len(ALPS))]
    assert locate_unit(ALPS, "Mont Blanc is their highest peak at 4808 metres.", spans) == 1
    assert locate_unit(ALPS, "  glaciers   cover LARGE\tparts. ", spans) == 2
    assert locate_unit(ALPS, "The Pyrenees are in Spain.", spans) is None
    assert locate_unit(ALPS, "", spans) is None


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_a_file_without_spans_is_split_and_its_units_found(tmp_path, suffix):
    s = load_dataset(write_set(tmp_path / f"my_set{suffix}"))
    assert s.name == "my_set" and s.kind == "rir"
    assert len(s.documents) == 3 and len(s.queries) == 4
    units = {q.query: (q.unit_index, q.doc_id) for q in s.queries}
    assert units["highest peak Mont Blanc"][0] == 1
    assert units["Nile length"][0] == 1
    assert units["bebop decade"][0] == 2
    assert units["trumpet player"][0] is None  # still a retrieval query, not a localisation one
    assert units["bebop decade"][1] == units["trumpet player"][1]  # one id per document text
    assert len(s.unit_queries()) == 3
    assert s.funnel.get("locate_units", "dropped:unit_not_in_document") == 1
    assert s.funnel.get("locate_units", "kept") == 3
    # The spans are the senter's: the located sentence is the unit.
    q = next(q for q in s.queries if q.query == "highest peak Mont Blanc")
    start, end = s.sentence_spans[q.doc_id][q.unit_index]
    assert s.documents[q.doc_id][start:end] == ROWS[0]["unit"]


def test_given_spans_and_unit_index_are_used_and_checked(tmp_path):
    rows = [dict(ROWS[0], doc_id="alps", sentence_spans=[{"start": 0, "end": 40}, {"start": 41, "end": len(ALPS)}],
                 unit_index=0)]
    s = load_dataset(write_set(tmp_path / "spans.parquet", rows), name="Mine")
    assert s.name == "Mine" and s.queries[0].unit_index == 0 and s.sentence_spans["alps"][1] == (41, len(ALPS))
    rows[0]["unit_index"] = 5
    with pytest.raises(PipelineInputError, match=r"spans.parquet \(row 0\): unit_index 5 outside 2 sentences"):
        load_dataset(write_set(tmp_path / "spans.parquet", rows))


def test_a_hand_made_folder_needs_no_completion_marker(tmp_path):
    folder = tmp_path / "handmade"
    folder.mkdir()
    write_set(folder / "test.jsonl", ROWS[:2])
    write_set(folder / "train.parquet", ROWS[2:])
    assert dataset_source(folder) == folder
    s = load_dataset(folder)
    assert s.name == "handmade" and len(s.documents) == 3 and len(s.queries) == 2  # train documents are distractors


def test_a_built_dataset_is_still_rir(tmp_path):
    write_dataset(tmp_path)
    s = load_dataset(tmp_path)
    assert s.name == "RIR" and s.funnel.get("load_triples", "kept") == 5
    assert load_dataset(tmp_path, name="wiki").name == "wiki"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"query": "q", "document": "d."}], r"bad.jsonl \(line 1\): missing column 'unit'"),
        ([{"query": "q", "document": 3, "unit": "u"}], r"bad.jsonl \(line 1\): column 'document' should be text, got int"),
        ([{"query": " ", "document": "d.", "unit": "u"}], r"bad.jsonl \(line 1\): empty query"),
    ],
)
def test_bad_rows_name_the_file_row_and_column(tmp_path, rows, message):
    with pytest.raises(PipelineInputError, match=message):
        check_dataset(write_set(tmp_path / "bad.jsonl", rows))


def test_a_binary_file_is_not_a_labelled_set(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"query": "q"}\n\xff\xfe binary')
    with pytest.raises(PipelineInputError, match=r"bad.jsonl: not UTF-8 text"):
        check_dataset(path)


def test_a_parquet_without_a_column_is_refused(tmp_path):
    path = write_set(tmp_path / "bad.parquet", [{"query": "q", "unit": "u"}])
    with pytest.raises(PipelineInputError, match=r"bad.parquet: missing column 'document'"):
        check_dataset(path)


def run(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "HF_HUB_OFFLINE": "1"})


def test_cli_refuses_a_missing_column_with_one_line_and_status_2(tmp_path):
    path = write_set(tmp_path / "bad.parquet", [{"query": "q", "document": "d."}])
    result = run("evaluate", "--model", str(tmp_path), "--dataset", str(path), "--output-dir", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: {path}: missing column 'unit' (needs query, document, unit)"


@pytest.mark.slow
def test_cli_evaluates_a_hand_made_set(tmp_path, tiny_gear_dir, prefect_harness):  # noqa: F811
    path = write_set(tmp_path / "my_set.parquet")
    out = tmp_path / "out"
    result = run("evaluate", "--model", str(tiny_gear_dir), "--dataset", str(path), "--output-dir", str(out),
                 "--set", "baselines=false", "--set", "generation_max_tokens=4", "--set", "bootstrap_resamples=100")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["set_order"] == ["my_set"]
    assert report["sets"]["my_set"]["sizes"] == {"documents": 3, "queries": 4, "unit_queries": 3}
    assert report["sets"]["my_set"]["funnel"]["locate_units"]["dropped:unit_not_in_document"] == 1
    assert report["n_queries"]["retrieval"]["my_set"] == 4 and report["n_queries"]["localization"]["my_set"] == 3
    markdown = (out / "report.md").read_text()
    tables = [line for line in markdown.splitlines() if line.startswith("|")]
    assert tables and not [line for line in tables if "RIR" in line] and "**RIR**" not in markdown
    assert any("my_set" in line for line in tables)
    assert "**my_set**" in markdown and "- my_set, locate_units: unit not in document: 1" in markdown


def test_the_splitter_names_the_pipelines_spacy_package():
    from gear_model.sentences import SPACY_MODEL
    from tasks.assets import SPACY_MODEL as ASSETS_MODEL

    assert SPACY_MODEL == ASSETS_MODEL  # gear_model/ cannot import tasks/, so the name is written twice
