"""Stand-in training triples (tasks/stand_in.py) and the train stage's option for them."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.common import PipelineInputError
from tasks.stand_in import COLUMNS, content_words, write_training_triples
from tasks.train import TrainParams, run_dir_for

SENTENCES = [
    "The castle of Edinburgh stands on a rock above the old town.",  # passes the unit rules
    "Yes.",  # too short
    "It was built by the kings of Scotland in the twelfth century.",  # pronoun first word
    "The old town grew along the ridge that runs down from the castle rock.",  # passes
    "Edinburgh " + "and its many surrounding villages and small market towns " * 4 + "grew.",  # too long
]


def dataset(folder, units=(0,), units_config=None):
    document = " ".join(SENTENCES)
    spans, pos = [], 0
    for s in SENTENCES:
        spans.append({"start": pos, "end": pos + len(s)})
        pos += len(s) + 1
    rows = [{"query": f"written query {i}", "doc_id": "Edinburgh#0", "title": "Edinburgh", "document": document,
             "unit": SENTENCES[i], "unit_index": i, "unit_start": spans[i]["start"], "unit_end": spans[i]["end"],
             "sentence_spans": spans, "score": 0.9} for i in units]
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "train.parquet")
    if units_config is not None:
        (folder / "dataset_card.json").write_text(json.dumps({"lineage": {"params": {"units": units_config}}}))
    return folder / "train.parquet"


def test_content_words_drop_stop_words_and_punctuation():
    assert content_words("The castle of Edinburgh stands on a rock, above the town.") == [
        "castle", "edinburgh", "stands", "rock", "town"]


def test_every_rule_passing_sentence_becomes_a_unit_after_the_dataset_triples(tmp_path):
    train_file = dataset(tmp_path / "data")
    counts = write_training_triples(train_file, 3, tmp_path / "out.parquet")
    rows = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert counts == {"dataset_triples": 1, "stand_in_triples": 2, "documents": 1}
    assert list(rows[0]) == list(COLUMNS)
    assert rows[0]["query"] == "written query 0"  # the dataset's own triples come first, unchanged
    stand_ins = rows[1:]
    assert [r["unit_index"] for r in stand_ins] == [0, 3]
    assert [r["query"] for r in stand_ins] == ["castle edinburgh stands", "old town grew"]
    for r in stand_ins:
        assert r["document"][r["unit_start"]:r["unit_end"]] == r["unit"] == SENTENCES[r["unit_index"]]
    only = write_training_triples(train_file, 3, tmp_path / "only.parquet", keep_dataset=False)
    assert only["dataset_triples"] == 0 and pq.read_table(tmp_path / "only.parquet").num_rows == 2


def test_sampled_stand_in_queries_draw_words_from_the_whole_sentence_the_same_way_every_time(tmp_path):
    from tasks.stand_in import stand_in_query

    words = content_words(SENTENCES[3])  # old town grew ridge runs castle rock
    drawn = stand_in_query(words, 4, sampled=True, seed="Edinburgh#0:3")
    assert drawn == stand_in_query(words, 4, sampled=True, seed="Edinburgh#0:3")
    assert len(drawn.split()) == 4 and set(drawn.split()) <= set(words)
    # Across seeds the words come from all over the sentence and in other orders than the sentence's.
    draws = [stand_in_query(words, 4, sampled=True, seed=str(i)).split() for i in range(20)]
    assert {w for d in draws for w in d} == set(words)
    assert any(d != sorted(d, key=words.index) for d in draws)
    assert stand_in_query(words, 40, sampled=True, seed="x").split() != [] and \
        sorted(stand_in_query(words, 40, sampled=True, seed="x").split()) == sorted(words)
    assert stand_in_query(words, 3, sampled=False, seed="x") == "old town grew"
    train_file = dataset(tmp_path / "data")
    write_training_triples(train_file, 3, tmp_path / "out.parquet", sampled=True)
    again = write_training_triples(train_file, 3, tmp_path / "again.parquet", sampled=True)
    assert again["stand_in_triples"] == 2
    assert pq.read_table(tmp_path / "out.parquet").equals(pq.read_table(tmp_path / "again.parquet"))


def test_stand_ins_follow_the_unit_rules_the_dataset_was_built_with(tmp_path):
    # A card that allowed units of up to 60 tokens makes the long sentence a unit too.
    train_file = dataset(tmp_path / "data", units_config={"max_unit_tokens": 60, "docs_per_article": 3})
    write_training_triples(train_file, 5, tmp_path / "out.parquet")
    assert [r["unit_index"] for r in pq.read_table(tmp_path / "out.parquet").to_pylist()[1:]] == [0, 3, 4]


def test_a_dataset_without_sentence_spans_is_refused_with_its_path(tmp_path):
    train_file = dataset(tmp_path / "data")
    pq.write_table(pq.read_table(train_file).drop(["sentence_spans"]), train_file)
    with pytest.raises(PipelineInputError, match="train.parquet.*sentence_spans"):
        write_training_triples(train_file, 5, tmp_path / "out.parquet")


def test_stand_ins_are_part_of_the_run_key_only_when_asked_for(tmp_path):
    dataset(tmp_path / "data")
    params = TrainParams(dataset=str(tmp_path / "data"), output_dir=str(tmp_path), init_checkpoint=str(tmp_path))
    plain = run_dir_for(params)
    assert run_dir_for(params.model_copy(update={"stand_in_query_words": 0})) == plain
    five = run_dir_for(params.model_copy(update={"stand_in_query_words": 5}))
    assert five != plain and five != run_dir_for(params.model_copy(update={"stand_in_query_words": 3}))
    # The trainer's config reads the stand-in file, and scores the dataset's own test split.
    cfg = params.train_config(tmp_path / "data" / "train.parquet", tmp_path / "run", tmp_path / "run" / "s.parquet")
    assert cfg.dataset == str(tmp_path / "run" / "s.parquet")


def test_stand_in_only_needs_stand_ins_and_makes_its_own_run(tmp_path):
    dataset(tmp_path / "data")
    with pytest.raises(ValueError, match="stand_in_only needs stand_in_query_words"):
        TrainParams(stand_in_only=True)
    params = TrainParams(dataset=str(tmp_path / "data"), output_dir=str(tmp_path), init_checkpoint=str(tmp_path),
                         stand_in_query_words=5)
    assert run_dir_for(params) != run_dir_for(params.model_copy(update={"stand_in_only": True}))
    assert run_dir_for(params) != run_dir_for(params.model_copy(update={"stand_in_sampled": True}))


def test_the_pipeline_localisation_run_is_the_training_with_its_changes():
    from flows.params import LocalisationRun

    train = TrainParams(epochs=7, lr=2e-4, cross_attention_init="identity")
    run = LocalisationRun(loc_weight=1.0).training(train)
    assert (run.loc_weight, run.loc_layers, run.cross_attention_init, run.stand_in_only, run.epochs) == (
        1.0, "all", "random", True, 4)
    assert run.lr == 2e-4 and train.loc_weight == 0.0  # the rest is the pipeline's training, which stays as it was
