"""Loaders: the RIR triples, SQuAD JSON and BEIR folders, and their refusals."""

from __future__ import annotations

import json

import pytest
from eval_helpers import squad_blob, write_beir, write_dataset, write_squad

from tasks.common import PipelineInputError
from tasks.evaluate.loaders import load_beir, load_squad, load_triples


def test_triples_corpus_is_train_plus_test_and_queries_are_test(tmp_path):
    write_dataset(tmp_path)
    s = load_triples(tmp_path)  # resolved through datasets/LATEST
    assert s.kind == "rir" and len(s.documents) == 6
    assert len(s.queries) == 5 and {q.doc_id for q in s.queries} == {"alps", "nile", "jazz"}
    q = next(q for q in s.queries if q.query == "bebop 1940s")
    assert q.relevant == {"jazz": 1} and q.unit_index == 3 and q.target == "Bebop appeared in the 1940s."
    start, end = s.sentence_spans["jazz"][3]
    assert s.documents["jazz"][start:end] == q.target
    assert s.funnel.get("load_triples", "input") == 5 and s.funnel.get("load_triples", "kept") == 5


def test_triples_sample_is_seeded_and_counted(tmp_path):
    write_dataset(tmp_path)
    a, b = load_triples(tmp_path, max_queries=2, seed=1), load_triples(tmp_path, max_queries=2, seed=1)
    assert [q.query for q in a.queries] == [q.query for q in b.queries] and len(a.queries) == 2
    assert a.funnel.get("load_triples", "dropped:over_max_test_queries") == 3
    assert len(a.documents) == 6  # the corpus is never sampled


def test_triples_missing_column_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    version = write_dataset(tmp_path)
    table = pq.read_table(version / "test.parquet").drop(["unit_index"])
    pq.write_table(table, version / "test.parquet")
    with pytest.raises(PipelineInputError, match=r"test\.parquet: missing columns \['unit_index'\]"):
        load_triples(version)


def test_squad_units_answers_and_unanswerable_count(tmp_path):
    s = load_squad(write_squad(tmp_path / "dev.json"))
    assert s.name == "dev" and s.kind == "qa" and len(s.documents) == 2
    by_id = {q.qid: q for q in s.queries}
    assert set(by_id) == {"e1", "e2", "p1"}
    assert by_id["e1"].unit_index == 1 and by_id["e1"].answers == ["1889"]
    assert by_id["e2"].unit_index == 2 and len(by_id["e2"].answers) == 2
    assert by_id["p1"].unit_index == 0
    doc = s.documents[by_id["e1"].doc_id]
    start, end = s.sentence_spans[by_id["e1"].doc_id][1]
    assert doc[start:end] == "It was finished in 1889."
    assert s.funnel.get("load_squad", "dropped:unanswerable") == 1


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b.pop("data"), r"\(top level\): missing key 'data'"),
        (lambda b: b["data"][0]["paragraphs"][0]["qas"][1].pop("question"),
         r"\(data\[0\]\.paragraphs\[0\]\.qas\[1\]\): missing key 'question'"),
        (lambda b: b["data"][1]["paragraphs"][0].__setitem__("context", 7),
         r"\(data\[1\]\.paragraphs\[0\]\): key 'context' should be str"),
        (lambda b: b["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].__setitem__("answer_start", 3),
         r"qas\[0\]\): answer_start 3 does not point at answer '1889'"),
        (lambda b: b["data"][1]["paragraphs"][0]["qas"][0].__setitem__("id", "e1"),
         r"\(data\[1\]\.paragraphs\[0\]\.qas\[0\]\): duplicate question id 'e1'"),
    ],
)
def test_squad_malformed_records_are_refused_by_name(tmp_path, mutate, message):
    blob = squad_blob()
    mutate(blob)
    path = write_squad(tmp_path / "bad.json", blob)
    with pytest.raises(PipelineInputError, match=message) as err:
        load_squad(path)
    assert err.value.path == str(path)


def test_squad_bad_json_and_missing_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"data": [')
    with pytest.raises(PipelineInputError, match=r"broken\.json: invalid JSON"):
        load_squad(path)
    with pytest.raises(PipelineInputError, match="does not exist"):
        load_squad(tmp_path / "absent.json")


def test_beir_qrels_queries_and_title_text(tmp_path):
    s = load_beir(write_beir(tmp_path / "nq"))
    assert s.name == "nq" and s.kind == "beir" and not s.has_units
    assert s.documents["d2"] == "Dogs\nDogs were domesticated from wolves."
    assert s.documents["d3"] == "Parrots can mimic human speech."
    assert s.qrels() == {"q1": {"d2": 1}, "q2": {"d3": 2}}  # q3 unjudged; the 0 judgement dropped
    assert s.funnel.get("load_beir", "dropped:non_positive_relevance") == 1


@pytest.mark.parametrize(
    "qrels, message",
    [
        ("query-id\tcorpus-id\tscore\nq1\td404\t1\n", r"test\.tsv \(line 2\): document 'd404' is not in corpus\.jsonl"),
        ("q404\td1\t1\n", r"test\.tsv \(line 1\): query 'q404' is not in queries\.jsonl"),
        ("q1\td1\n", r"expected 3 tab-separated fields, got 2"),
        ("q1\td1\thigh\n", r"score 'high' is not an integer"),
        ("q1\td1\t0\n", r"no positive relevance judgement"),
    ],
)
def test_beir_bad_qrels_are_refused(tmp_path, qrels, message):
    with pytest.raises(PipelineInputError, match=message):
        load_beir(write_beir(tmp_path / "set", qrels=qrels))


def test_beir_bad_jsonl_missing_key_and_missing_file(tmp_path):
    folder = write_beir(tmp_path / "set")
    with (folder / "corpus.jsonl").open("a") as fh:
        fh.write("{not json\n")
    with pytest.raises(PipelineInputError, match=r"corpus\.jsonl \(line 4\): invalid JSON"):
        load_beir(folder)
    folder = write_beir(tmp_path / "set2")
    (folder / "queries.jsonl").write_text(json.dumps({"_id": "q1"}) + "\n")
    with pytest.raises(PipelineInputError, match=r"queries\.jsonl \(line 1\): missing key 'text'"):
        load_beir(folder)
    (folder / "corpus.jsonl").unlink()
    with pytest.raises(PipelineInputError, match=r"corpus\.jsonl: missing BEIR file"):
        load_beir(folder)
