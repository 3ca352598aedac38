"""Training sees its targets: document windows around late units, counted
drops, the new-module learning rate, a frozen document encoder, the
cross-attention init and the held-out evaluation a run records."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_gear_model_fixtures import make_tiny_bert, write_triples
from transformers import AutoTokenizer

from gear_model import GearConfig, GearModel, TrainConfig
from gear_model.data import TriplesDataset, unit_window
from gear_model.heldout import HeldOut
from gear_model.losses import GearPretrainer
from gear_model.train import parameter_groups, train
from tasks.assets import embedded_encoder_path


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(embedded_encoder_path()))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def long_document(n_sentences: int = 30) -> tuple[str, list[tuple[int, int]]]:
    sentences = [f"Sentence number {i} talks about the harbour of town {i}." for i in range(n_sentences)]
    spans, pos = [], 0
    for s in sentences:
        spans.append((pos, pos + len(s)))
        pos += len(s) + 1
    return " ".join(sentences), spans


def write_rows(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_unit_window_keeps_a_late_unit_inside(tokenizer):
    document, spans = long_document()
    offsets = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) > 64
    start, end = spans[-3]  # near the end: cut away by plain truncation at 64 tokens
    a, b = unit_window(offsets, start, end, budget=62)
    assert b - a <= 62
    assert offsets[a][0] <= start and offsets[b - 1][1] >= end
    # The window starts at a word, not inside a WordPiece run.
    assert a == 0 or offsets[a][0] > offsets[a - 1][1]
    # Its place is seeded, not centred: the unit sits at different offsets for different seeds.
    starts = {unit_window(offsets, start, end, budget=62, seed=s)[0] for s in range(20)}
    assert len(starts) > 3
    for s_ in range(20):
        a, b = unit_window(offsets, start, end, budget=62, seed=s_)
        assert offsets[a][0] <= start and offsets[b - 1][1] >= end and b - a <= 62
    # A unit inside the first tokens needs no window; an over-long one cannot fit.
    assert unit_window(offsets, *spans[0], budget=62) == (0, 62)
    assert unit_window(offsets, spans[0][0], spans[10][1], budget=62) is None
    assert unit_window(offsets[:40], *spans[1], budget=62) == (0, 40)


def test_dataset_windows_late_units_and_counts_drops(tokenizer, tmp_path):
    document, spans = long_document()
    rows = []
    for i in (0, 25, 28):
        start, end = spans[i]
        rows.append({"query": f"harbour town {i}", "document": document, "unit": document[start:end], "doc_id": "d",
                     "unit_start": start, "unit_end": end})
    # A unit longer than the decoder's target length is dropped, not truncated.
    rows.append({"query": "harbour", "document": document, "unit": document[spans[1][0]:spans[4][1]], "doc_id": "d",
                 "unit_start": spans[1][0], "unit_end": spans[4][1]})
    ds = TriplesDataset(write_rows(tmp_path / "train.parquet", rows), tokenizer, max_doc_length=64, max_unit_length=24)
    assert ds.stats == {"fits": 1, "windowed": 2, "dropped_unit_too_long_for_doc_window": 0,
                        "dropped_unit_longer_than_max_unit_length": 1}
    assert len(ds) == 3
    for row in ds:
        # What the model sees after truncation to 64 tokens still holds the whole unit.
        enc = tokenizer(row["document"], truncation=True, max_length=64, return_offsets_mapping=True)
        visible_end = max(e for _, e in enc["offset_mapping"])
        unit_at = row["document"].find(row["unit"])
        assert unit_at >= 0 and unit_at + len(row["unit"]) <= visible_end
    # A unit that is not where its span says is bad input, named.
    bad = dict(rows[0], unit_start=5)
    with pytest.raises(ValueError, match="row 0: the unit is not found at its span"):
        TriplesDataset(write_rows(tmp_path / "bad.parquet", [bad]), tokenizer, 64, 24)


def test_only_what_the_checkpoint_did_not_hold_gets_the_new_module_learning_rate(tiny_dir):
    from transformers import BertLMHeadModel

    model = GearModel.from_encoder(tiny_dir, GearConfig(queue_size=8))
    # What the checkpoint lacks, asked of transformers directly: the decoder's
    # cross-attention and, with no MLM head in the tiny BERT, its LM-head transform and bias.
    _, loading = BertLMHeadModel.from_pretrained(str(tiny_dir), is_decoder=True, add_cross_attention=True,
                                                 output_loading_info=True)
    decoder_new = {f"decoder.{k}" for k in loading["missing_keys"]} & {
        f"decoder.{n}" for n, _ in model.decoder.named_parameters()}
    assert decoder_new and all("crossattention" in n or n.startswith("decoder.cls.") for n in decoder_new)
    fusion = {f"fusion.{n}" for n, _ in model.fusion.named_parameters()}
    assert model.fresh_parameters == decoder_new | fusion

    cfg = TrainConfig(lr=1e-4, new_module_lr_mult=20.0, decoder_lr_mult=30.0)
    groups = parameter_groups(GearPretrainer(model), cfg)
    lr_of = {name: g["lr"] for g in groups for p in g["params"] for name, q in model.named_parameters() if q is p}
    for name, lr in lr_of.items():
        expected = 2e-3 if name in fusion else 3e-3 if name in decoder_new else 1e-4
        assert lr == pytest.approx(expected), name
    # The loaded decoder body and the tied word embeddings ([DEC] row included) stay at the base lr.
    assert lr_of["decoder.bert.encoder.layer.0.attention.self.query.weight"] == pytest.approx(1e-4)
    assert lr_of["decoder.bert.embeddings.word_embeddings.weight"] == pytest.approx(1e-4)
    assert lr_of["decoder.cls.predictions.transform.dense.weight"] == pytest.approx(3e-3)
    assert lr_of["decoder.bert.encoder.layer.1.crossattention.self.key.weight"] == pytest.approx(3e-3)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert by_id[id(model.temp)]["weight_decay"] == 0.0 and by_id[id(model.temp)]["lr"] == pytest.approx(1e-4)
    assert groups[0]["part"] == "pretrained"
    # Every trainable parameter is in exactly one group.
    n = sum(len(g["params"]) for g in groups)
    assert n == len({id(p) for p in GearPretrainer(model).parameters() if p.requires_grad})


def test_a_checkpoint_with_an_mlm_head_leaves_only_cross_attention_new(tmp_path, tiny_dir):
    from transformers import AutoTokenizer, BertForMaskedLM

    bert = BertForMaskedLM.from_pretrained(str(tiny_dir))  # adds an MLM head to the tiny checkpoint
    bert.save_pretrained(tmp_path / "mlm")
    AutoTokenizer.from_pretrained(str(tiny_dir)).save_pretrained(tmp_path / "mlm")
    model = GearModel.from_encoder(tmp_path / "mlm", GearConfig(queue_size=8))
    decoder_new = {n for n in model.fresh_parameters if n.startswith("decoder.")}
    assert decoder_new and all("crossattention" in n for n in decoder_new)
    # A saved GeAR model has nothing new: continuing it trains every part at the base lr.
    model.save_pretrained(tmp_path / "gear")
    assert GearModel.from_pretrained(tmp_path / "gear").fresh_parameters == frozenset()


def test_frozen_doc_encoder_gets_no_gradient_and_no_momentum_copy(tiny_dir):
    from gear_model.data import Collate
    from test_gear_model_fixtures import triples

    model = GearModel.from_encoder(tiny_dir, GearConfig(queue_size=8, max_doc_length=32))
    trainer = GearPretrainer(model, freeze_doc_encoder=True).train()
    assert trainer.doc_encoder_m is None and not model.doc_encoder.training
    before = [p.clone() for p in model.doc_encoder.parameters()]
    batch = Collate(model.tokenizer, 16, 32, 16)(triples(4, per_doc=1))
    out = trainer(batch, alpha=0.4)
    out.loss.backward()
    assert all(p.grad is None for p in model.doc_encoder.parameters())
    assert model.query_encoder.embeddings.word_embeddings.weight.grad is not None
    assert all(torch.equal(a, b) for a, b in zip(before, model.doc_encoder.parameters()))
    # The cached states are what E_d gives on the padded batch, at every real token.
    fresh = model.doc_states(batch["doc_ids"], batch["doc_mask"])
    cached = trainer.frozen_doc_states(batch["doc_ids"], batch["doc_mask"])
    real = batch["doc_mask"].bool()
    assert len(trainer._doc_state_cache) == 4
    assert torch.allclose(fresh[real], cached[real], atol=1e-5) and not cached[~real].any()


def test_cross_attention_can_start_as_a_copy_of_self_attention(tiny_dir):
    model = GearModel.from_encoder(tiny_dir, GearConfig(), cross_attention_init="self_attention")
    for cross, layer in zip(model.fusion.cross, model.query_encoder.encoder.layer):
        assert torch.equal(cross.self.key.weight, layer.attention.self.key.weight)
        assert cross.self.key.weight.data_ptr() != layer.attention.self.key.weight.data_ptr()  # a copy, not shared
    fresh = GearModel.from_encoder(tiny_dir, GearConfig())
    assert not torch.equal(fresh.fusion.cross[0].self.key.weight, fresh.query_encoder.encoder.layer[0].attention.self.key.weight)
    with pytest.raises(ValueError, match="cross_attention_init"):
        GearModel.from_encoder(tiny_dir, GearConfig(), cross_attention_init="zeros")


def test_identity_cross_attention_starts_as_token_similarity(tiny_dir):
    model = GearModel.from_encoder(tiny_dir, GearConfig(), cross_attention_init="identity")
    hidden = model.query_encoder.config.hidden_size
    for cross in model.fusion.cross:
        assert torch.equal(cross.self.query.weight, torch.eye(hidden)) and not cross.self.key.bias.any()
        assert not torch.equal(cross.self.value.weight, torch.eye(hidden))  # values keep BERT's init
    # A query token attends most to the document token whose state is most like its own.
    cross = model.fusion.cross[0]
    doc = torch.randn(1, 6, hidden)
    query = doc[:, [4]] * 3  # the same direction as document token 4
    from gear_model.fusion import eager_attention
    with eager_attention(model.query_encoder.config):
        _, weights = cross(query, encoder_hidden_states=doc)
    assert int(weights[0].mean(0)[0].argmax()) == 4


def test_heldout_scores_against_the_random_ranking(tiny_dir, tmp_path):
    document, spans = long_document(6)
    rows = [{"query": f"harbour town {i}", "document": document, "unit": document[s:e], "unit_index": i,
             "sentence_spans": [{"start": a, "end": b} for a, b in spans]} for i, (s, e) in enumerate(spans)]
    path = write_rows(tmp_path / "test.parquet", rows)
    model = GearModel.from_encoder(tiny_dir, GearConfig())
    held = HeldOut(tmp_path, max_queries=100)
    measured = held.localization(model)
    loc = measured["localization"]
    # Every layer is scored, with an interval around each recall, and the default layer is one of them.
    assert set(measured["localization_by_layer"]) == {"1", "2"} and measured["best_layer"] in (1, 2)
    assert {k: v for k, v in measured["localization_by_layer"][str(model.resolve_layer(None))].items()
            if k != "ci"} == {k: v for k, v in loc.items() if not k.startswith("random") and k != "ci"}
    for layer in measured["localization_by_layer"].values():
        low, high = layer["ci"]["recall@3"]
        assert low <= layer["recall@3"] <= high
    assert all(lift > 0 for lift in measured["lift_by_layer"].values())
    # Six sentences: a random order puts the unit in the top 3 half the time.
    assert loc["random_recall@3"] == pytest.approx(0.5) and loc["random_recall@1"] == pytest.approx(1 / 6)
    # Every query's unit is some rank: recall@10 covers all 6 sentences.
    assert loc["recall@10"] == 1.0 and 0.0 <= loc["recall@1"] <= loc["recall@3"] <= 1.0
    assert loc["map@1"] == pytest.approx(loc["recall@1"])
    assert len(HeldOut(path, max_queries=4)) == 4


def test_training_records_heldout_evaluations(tiny_dir, tmp_path):
    write_triples(tmp_path / "train.parquet", n_docs=6, per_doc=2)
    document, spans = long_document(5)
    rows = [{"query": f"harbour {i}", "document": document, "unit": document[s:e], "unit_index": i,
             "sentence_spans": [{"start": a, "end": b} for a, b in spans]} for i, (s, e) in enumerate(spans)]
    write_rows(tmp_path / "test.parquet", rows)
    cfg = TrainConfig(dataset=str(tmp_path / "train.parquet"), init_checkpoint=str(tiny_dir), output_dir=str(tmp_path / "run"),
                      epochs=2, batch_size=4, lr=1e-3, save_every=0, num_threads=1, new_module_lr_mult=5.0,
                      model=GearConfig(queue_size=8, max_query_length=16, max_doc_length=32, max_unit_length=16),
                      eval_file=str(tmp_path / "test.parquet"), eval_every=2, eval_generation_queries=2)
    train(cfg)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    # 3 steps per epoch: step 0 (start), 2 (every), 3 (epoch end), 4 (every), 6 (epoch end).
    assert [(r["step"], r["reason"]) for r in evals] == [
        (0, "start"), (2, "every"), (3, "epoch_end"), (4, "every"), (6, "epoch_end")]
    assert all(r["n_queries"] == 5 and 0 <= r["localization"]["recall@3"] <= 1 for r in evals)
    # Beam search runs where the "what training added" rows read it: at step 0 and at the end.
    assert [r["step"] for r in evals if r["generation"] is not None] == [0, 6]
    assert all({"rouge1", "rougeL", "punctuation_only"} <= set(r["generation"]) for r in evals if r["generation"])
    # Every evaluation, step 0 included, says whether the document matters and where the attention goes.
    assert all(set(r["document_dependence"]) >= {"d_doc", "d_pair", "lm"} and len(r["lift_by_layer"]) == 2
               for r in evals)
    start = next(r for r in records if r["event"] == "start")
    assert start["length_fit"]["fits"] + start["length_fit"]["windowed"] == start["n_train"] == 12
    steps = [r for r in records if r["event"] == "step"]
    assert steps[-1]["lr_fusion"] == pytest.approx(5 * steps[-1]["lr"]) == steps[-1]["lr_decoder"]


def test_all_layers_in_one_pass_match_one_layer_at_a_time(tiny_dir):
    document, spans = long_document(5)
    model = GearModel.from_encoder(tiny_dir, GearConfig())
    every = model.localize_many(["harbour town 3"], document, spans, pooling="mean", all_layers=True)[0]
    assert every.shape == (model.n_layers, 5)
    for layer in range(1, model.n_layers + 1):
        one = model.localize("harbour town 3", document, spans, layer, pooling="mean")
        assert abs(every[layer - 1] - one).max() < 1e-6


def test_many_queries_of_one_document_match_one_at_a_time(tiny_dir):
    document, spans = long_document(5)
    model = GearModel.from_encoder(tiny_dir, GearConfig())
    queries = ["harbour town 3", "sentence number one talks", "town"]
    many = model.localize_many(queries, document, spans, pooling="mean")
    every = model.localize_many(queries, document, spans, pooling="sum", all_layers=True)
    assert many.shape == (3, 5) and every.shape == (3, model.n_layers, 5)
    for i, q in enumerate(queries):
        assert abs(many[i] - model.localize(q, document, spans, pooling="mean")).max() < 1e-5
        for layer in range(1, model.n_layers + 1):
            assert abs(every[i, layer - 1] - model.localize(q, document, spans, layer, pooling="sum")).max() < 1e-5


def test_decoder_cross_attention_can_start_as_a_copy_of_its_self_attention(tiny_dir):
    model = GearModel.from_encoder(tiny_dir, GearConfig(queue_size=8), decoder_cross_attention_init="self_attention")
    for layer in model.decoder.bert.encoder.layer:
        assert torch.equal(layer.crossattention.self.query.weight, layer.attention.self.query.weight)
        assert torch.equal(layer.crossattention.output.dense.weight, layer.attention.output.dense.weight)
    # A copy is still new to cross-attention: it keeps the new-module learning rate.
    assert "decoder.bert.encoder.layer.0.crossattention.self.query.weight" in model.fresh_parameters
    with pytest.raises(ValueError, match="decoder_cross_attention_init"):
        GearModel.from_encoder(tiny_dir, GearConfig(queue_size=8), decoder_cross_attention_init="identity")
