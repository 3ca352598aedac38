"""The held-out diagnostics (d_doc, d_pair, lift) and the optional localisation loss."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_gear_model_fixtures import make_tiny_bert

from gear_model import GearConfig, GearModel, TrainConfig
from gear_model.data import Collate, TriplesDataset, token_sentences, window_sentences
from gear_model.diagnostics import attention_lift, document_dependence, is_punctuation_only, swap_order
from gear_model.losses import GearPretrainer, localisation_loss
from gear_model.train import train


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def document(d: int) -> tuple[str, list[tuple[int, int]]]:
    sentences = [f"The castle {d} stands by river {d}.", f"Kings lived there in {1500 + d}.",
                 f"A siege took the town number {d}.", f"Music festival {d} happens every summer."]
    spans, pos = [], 0
    for s in sentences:
        spans.append((pos, pos + len(s)))
        pos += len(s) + 1
    return " ".join(sentences), spans


def rows(n_docs: int, per_doc: int = 2) -> list[dict]:
    out = []
    for d in range(n_docs):
        text, spans = document(d)
        for k in range(per_doc):
            i = (d + k) % len(spans)
            unit = text[spans[i][0] : spans[i][1]]
            out.append({"query": " ".join(unit.lower().split()[1:4]), "doc_id": f"doc{d}", "document": text,
                        "unit": unit, "unit_index": i, "unit_start": spans[i][0], "unit_end": spans[i][1],
                        "sentence_spans": [{"start": a, "end": b} for a, b in spans]})
    return out


def test_swap_order_gives_every_row_another_document():
    docs = ["a", "a", "a", "b", "b", "c", "d"]
    for seed in range(20):
        order = swap_order(docs, seed)
        assert sorted(order) == list(range(len(docs)))
        assert all(docs[j] != docs[i] for i, j in enumerate(order))
    assert sorted(swap_order(["x", "x", "x"], 0)) == [0, 1, 2]  # one document: nothing else to pair with


def test_lift_is_one_for_uniform_attention_and_grows_with_mass_on_the_unit():
    # [CLS], five real tokens of one character each, [SEP].
    offsets = np.array([[0, 0], [0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [0, 0]])
    uniform = np.array([0.1, 0.16, 0.16, 0.16, 0.16, 0.16, 0.1])
    assert attention_lift(uniform, offsets, (4, 7)) == pytest.approx(1.0)
    on_unit = np.array([0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0])
    assert attention_lift(on_unit, offsets, (4, 7)) == pytest.approx(5 / 2)
    assert np.isnan(attention_lift(uniform, offsets, (20, 30)))  # truncated away


def test_document_dependence_is_zero_when_the_decoder_cannot_see_the_fusion(tiny_dir):
    model = GearModel.from_encoder(tiny_dir, GearConfig(max_query_length=16, max_unit_length=24))
    data = rows(4, per_doc=2)
    args = ([r["query"] for r in data], [r["document"] for r in data], [r["unit"] for r in data])
    seen = document_dependence(model, *args)
    assert seen["n"] == 8 and seen["d_pair"] != 0.0  # a random decoder still reads its inputs
    # Zero the decoder's cross-attention output: the unit's loss no longer depends on query or document.
    with torch.no_grad():
        for layer in model.decoder.bert.encoder.layer:
            layer.crossattention.output.dense.weight.zero_()
            layer.crossattention.output.dense.bias.zero_()
    blind = document_dependence(model, *args)
    assert blind["d_doc"] == pytest.approx(0.0, abs=1e-5) and blind["d_pair"] == pytest.approx(0.0, abs=1e-5)
    assert blind["lm"] == pytest.approx(blind["lm_doc_swapped"], abs=1e-5)


@pytest.mark.parametrize("copy_from_query", [False, True])
def test_the_pair_swapped_loss_reuses_the_true_pairs_fusion_and_equals_computing_it(tiny_dir, copy_from_query):
    """document_dependence takes the swapped pairs' fusion states from the true pass (same
    query, same document, other batch and padding); the losses equal a pass of their own."""
    from gear_model.diagnostics import lm_loss_per_row

    model = GearModel.from_encoder(tiny_dir, GearConfig(max_query_length=16, max_unit_length=24,
                                                        copy_from_query=copy_from_query))
    data = rows(5, per_doc=3)
    queries, docs, units = ([r["query"] for r in data], [r["document"] for r in data], [r["unit"] for r in data])
    # Different query lengths in one batch, so the reused rows are padded differently.
    queries = [q if i % 2 else q + " and more words here" for i, q in enumerate(queries)]
    got = document_dependence(model, queries, docs, units, seed=3)
    order = swap_order(docs, 3)
    true = lm_loss_per_row(model, queries, docs, units, batch_size=4)
    pair = lm_loss_per_row(model, [queries[j] for j in order], [docs[j] for j in order], units, batch_size=4)
    assert got["lm"] == pytest.approx(float(true.mean()), abs=1e-5)
    assert got["lm_pair_swapped"] == pytest.approx(float(pair.mean()), abs=1e-5)
    assert got["d_pair"] == pytest.approx(float((pair - true).mean()), abs=1e-5)


def test_punctuation_only():
    assert is_punctuation_only("") and is_punctuation_only(". . . ,") and not is_punctuation_only("a .")


def test_localisation_loss_is_log_n_for_uniform_attention_and_falls_as_the_unit_gains_mass():
    # One query word (index 1), 9 document tokens: [CLS], 3 sentences of 2 tokens, [SEP], 2 padding.
    doc_sentence = torch.tensor([[-1, 0, 0, 1, 1, 2, 2, -1, -1]])
    query_words = torch.tensor([[False, True, False]])
    uniform = torch.full((1, 2, 3, 9), 1 / 9)
    assert localisation_loss(uniform, query_words, doc_sentence, torch.tensor([1])).item() == pytest.approx(math.log(3))
    logits = torch.zeros(1, 2, 3, 9, requires_grad=True)
    weights = logits.softmax(-1)
    loss = localisation_loss(weights, query_words, doc_sentence, torch.tensor([1]))
    loss.backward()
    # More attention on the unit's tokens (sentence 1: tokens 3 and 4) lowers the loss.
    assert (logits.grad[0, :, 1, 3:5] < 0).all() and (logits.grad[0, :, 1, [1, 2, 5, 6]] > 0).all()
    # A row whose unit fell outside the document window is ignored.
    assert localisation_loss(uniform, query_words, doc_sentence, torch.tensor([-1])).item() == 0.0


def test_collate_marks_each_document_token_with_its_sentence(tiny_dir, tmp_path):
    model = GearModel.from_encoder(tiny_dir, GearConfig())
    data = rows(2, per_doc=1)
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "train.parquet")
    dataset = TriplesDataset(tmp_path / "train.parquet", model.tokenizer, 64, 24)
    assert dataset.has_sentences
    batch = Collate(model.tokenizer, 16, 64, 24)([dataset[0], dataset[1]])
    for i, r in enumerate(data):
        enc = model.tokenizer(r["document"], return_offsets_mapping=True)
        for t, (s, e) in enumerate(enc["offset_mapping"]):
            expected = next((j for j, sp in enumerate(r["sentence_spans"]) if e > s and sp["start"] <= s < sp["end"]), -1)
            assert batch["doc_sentence"][i, t].item() == expected
    assert batch["unit_sentence"].tolist() == [r["unit_index"] for r in data]


def test_a_document_window_moves_the_sentence_spans_with_it():
    spans = [(0, 10), (11, 20), (21, 30), (31, 40)]
    # Window [15, 35): sentences 1-3 overlap it, cut to the window and shifted to its start.
    assert window_sentences(spans, 2, 15, 35) == ([(0, 5), (6, 15), (16, 20)], 1)
    assert window_sentences(spans, 0, 15, 35)[1] == -1
    offsets = torch.tensor([[0, 0], [0, 4], [5, 9], [11, 15], [0, 0]])
    assert token_sentences(offsets, [(0, 10), (11, 20)]).tolist() == [-1, 0, 0, 1, -1]


def test_training_with_the_localisation_loss_logs_it_and_trains_the_fusion_only(tiny_dir, tmp_path):
    pq.write_table(pa.Table.from_pylist(rows(6, per_doc=2)), tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows(3, per_doc=2)), tmp_path / "test.parquet")
    cfg = TrainConfig(dataset=str(tmp_path / "train.parquet"), init_checkpoint=str(tiny_dir),
                      output_dir=str(tmp_path / "run"), epochs=1, batch_size=4, lr=1e-3, save_every=0,
                      num_threads=1, eval_file=str(tmp_path / "test.parquet"),
                      model=GearConfig(queue_size=8, max_query_length=16, max_doc_length=64, max_unit_length=24,
                                       lm_weight=0.0, loc_weight=1.0))
    model = GearModel.from_encoder(tiny_dir, cfg.gear_config())
    trainer = GearPretrainer(model)
    assert not any(p.requires_grad for p in model.decoder.parameters())
    assert all(p.requires_grad for p in model.fusion.parameters())
    batch = Collate(model.tokenizer, 16, 64, 24)([TriplesDataset(tmp_path / "train.parquet", model.tokenizer, 64, 24)[i]
                                                 for i in range(4)])
    out = trainer(batch, alpha=0.0)
    assert out.loc > 0 and out.lm == 0
    train(cfg)
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    assert steps and all(r["loc"] > 0 for r in steps)
    # The held-out evaluation runs for a model whose fusion trains, even without the LM loss.
    assert [r["step"] for r in records if r["event"] == "eval"] == [0, 3]


def test_a_low_localisation_temperature_rewards_ranking_the_unit_first():
    doc_sentence = torch.tensor([[-1, 0, 0, 1, 1, 2, 2, -1]])
    query_words = torch.tensor([[False, True, False]])
    # The unit (sentence 1) holds twice the per-token mass of each other sentence.
    per_token = torch.tensor([0.0, 0.125, 0.125, 0.25, 0.25, 0.125, 0.125, 0.0])
    weights = per_token.expand(1, 2, 3, 8)
    plain = localisation_loss(weights, query_words, doc_sentence, torch.tensor([1]))
    sharp = localisation_loss(weights, query_words, doc_sentence, torch.tensor([1]), temperature=0.1)
    assert plain.item() == pytest.approx(-math.log(0.5)) and sharp.item() < 0.01
    # A unit that trails keeps a high loss however low the temperature.
    assert localisation_loss(weights, query_words, doc_sentence, torch.tensor([0]), temperature=0.1).item() > 5


def test_a_model_trained_with_l_loc_is_its_own_row_and_never_the_contrastive_baseline(tmp_path):
    from tasks.common import SUCCESS_MARKER
    from tasks.evaluate.config import LOC_ROW, EvalParams, gear_row_names, latest_models

    def run(key: str, lm: float, loc: float) -> str:
        model = tmp_path / "models" / key / "model"
        model.mkdir(parents=True)
        (model / "config.json").write_text(json.dumps({"gear": {"lm_weight": lm, "loc_weight": loc}}))
        (model.parent / SUCCESS_MARKER).write_text("{}")
        return str(model)

    paper, with_loc, loc_only, contrastive = run("a", 1.0, 0.0), run("b", 1.0, 1.0), run("c", 0.0, 1.0), run("d", 0.0, 0.0)
    assert gear_row_names([paper, with_loc]) == ["GeAR", LOC_ROW]
    assert gear_row_names([paper, run("e", 1.0, 0.0)]) == ["GeAR (a)", "GeAR (e)"]
    gear, baseline = latest_models(tmp_path / "models")
    assert baseline == contrastive and gear in (paper, str(tmp_path / "models" / "e" / "model"))
    assert loc_only not in (gear, baseline)
    # With no model named, evaluation takes the newest paper-recipe run and the L_loc run beside it.
    filled = EvalParams(output_dir=str(tmp_path / "eval"), work_dir=str(tmp_path)).with_latest_models()
    assert filled.model_dirs == [gear, with_loc]


def test_held_out_evaluations_reuse_document_states_until_the_document_encoder_changes(tiny_dir):
    from gear_model.heldout import HeldOut

    model = GearModel.from_encoder(tiny_dir, GearConfig(max_query_length=16, max_unit_length=24)).eval()
    held = HeldOut.from_rows(rows(3, per_doc=2))
    calls = []
    hook = model.doc_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        first = held.measure(model, generation_queries=2, max_new_tokens=4)
        first_passes = len(calls)
        calls.clear()
        again = held.measure(model, generation_queries=2, max_new_tokens=4)
        assert calls == [] and json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)
        with torch.no_grad():  # E_d trained: its states are read afresh
            next(model.doc_encoder.parameters()).mul_(1.5)
        held.measure(model, generation_queries=2, max_new_tokens=4)
        assert len(calls) == first_passes
    finally:
        hook.remove()


def test_document_state_store_round_trip_read_only_and_size_cap(tmp_path):
    from gear_model.doc_states import DocumentStateStore

    ids, states = torch.tensor([101, 7, 8, 102]), torch.randn(4, 6)
    store = DocumentStateStore(tmp_path, "f" * 64)
    assert store.get(ids) is None
    store.put(ids, states)
    assert torch.equal(DocumentStateStore(tmp_path, "f" * 64).get(ids), states)  # another process reads it
    assert DocumentStateStore(tmp_path, "e" * 64).get(ids) is None  # another E_d: another folder
    reader = DocumentStateStore(tmp_path, "f" * 64, read_only=True)
    reader.put(torch.tensor([1]), torch.randn(1, 6))
    assert reader.get(torch.tensor([1])) is None
    full = DocumentStateStore(tmp_path, "f" * 64, max_bytes=store.bytes)
    full.put(torch.tensor([2]), torch.randn(1, 6))
    assert full.get(torch.tensor([2])) is None and not list(tmp_path.rglob("*.tmp"))


def test_the_run_s_processes_encode_each_document_once_through_the_store(tiny_dir, tmp_path):
    from gear_model.doc_states import DocumentStateStore
    from gear_model.heldout import HeldOut

    cfg = GearConfig(max_query_length=16, max_unit_length=24)
    data = rows(3, per_doc=2)
    plain = [{k: r[k] for k in ("query", "document", "unit", "doc_id")} for r in data]
    batch = Collate(GearModel.from_encoder(tiny_dir, cfg).tokenizer, 16, 64, 24)(plain)

    def encoder_passes(model, run):
        calls = []
        hook = model.doc_encoder.register_forward_hook(lambda *_: calls.append(1))
        try:
            return run(), len(calls)
        finally:
            hook.remove()

    torch.manual_seed(0)
    gear = GearModel.from_encoder(tiny_dir, cfg)
    first = GearPretrainer(gear, freeze_doc_encoder=True).eval()
    first.doc_state_store = DocumentStateStore(tmp_path, gear.document_encoder_fingerprint())
    states, passes = encoder_passes(gear, lambda: first.frozen_doc_states(batch["doc_ids"], batch["doc_mask"]))
    assert passes == 3  # each document alone, once
    # Alone, unpadded and in fp32: the same bits as the document encoded in any other batch or precision.
    for row in (0, 2):
        ids = batch["doc_ids"][row][batch["doc_mask"][row].bool()]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            alone = gear.document_states_alone(ids)
        assert alone.dtype == torch.float32 and torch.equal(states[row, : len(ids)], alone)
    torch.manual_seed(1)  # the contrastive baseline: other fresh modules, the same frozen E_d
    contrastive = GearModel.from_encoder(tiny_dir, GearConfig(max_query_length=16, max_unit_length=24, lm_weight=0.0))
    second = GearPretrainer(contrastive, freeze_doc_encoder=True).eval()
    second.doc_state_store = DocumentStateStore(tmp_path, contrastive.document_encoder_fingerprint())
    again, passes = encoder_passes(contrastive, lambda: second.frozen_doc_states(batch["doc_ids"], batch["doc_mask"]))
    assert passes == 0 and torch.equal(again, states)
    # The held-out evaluation reads the documents training stored: no E_d pass.
    without_store, passes = encoder_passes(gear, lambda: HeldOut.from_rows(data).measure(gear))
    assert passes == 4  # each document for localisation, then one batch for d_doc/d_pair
    with_store, passes = encoder_passes(gear, lambda: _measured(data, gear, tmp_path))
    assert passes == 0
    for layer, scores in without_store["localization_by_layer"].items():
        assert with_store["localization_by_layer"][layer]["recall@3"] == scores["recall@3"]
    assert with_store["document_dependence"] == without_store["document_dependence"]


def _measured(data, model, store):
    from gear_model.heldout import HeldOut

    held = HeldOut.from_rows(data)
    held.state_store = store
    return held.measure(model)


def test_document_vectors_and_batched_states_come_from_the_store(tiny_dir, tmp_path):
    from gear_model.doc_states import DocumentStateStore
    from gear_model.diagnostics import document_states
    from gear_model.model import DocumentStateMemo

    model = GearModel.from_encoder(tiny_dir, GearConfig(max_query_length=16, max_unit_length=24)).eval()
    texts = [document(d)[0] for d in range(3)] + ["A short one."]
    plain = model.encode_documents(texts, batch_size=2)
    calls = []
    hook = model.doc_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        store = DocumentStateStore(tmp_path, model.document_encoder_fingerprint())
        with model.reusing_document_states(DocumentStateMemo(store=store)):
            first = model.encode_documents(texts, batch_size=2)  # two padded batches: each document encoded alone, stored
        assert len(calls) == 4
        with model.reusing_document_states(DocumentStateMemo(store=store)):  # a new process: all from the store
            again = model.encode_documents(texts, batch_size=3)
            states = document_states(model, texts)
        assert len(calls) == 4
    finally:
        hook.remove()
    np.testing.assert_allclose(first, plain, atol=1e-6)
    np.testing.assert_allclose(again, plain, atol=1e-5)
    assert set(states) == set(texts)


@pytest.mark.parametrize("loc_layers", ["localisation", "all"])
def test_the_localisation_loss_reaches_the_layers_it_reads(tiny_dir, tmp_path, loc_layers):
    pq.write_table(pa.Table.from_pylist(rows(2, per_doc=2)), tmp_path / "train.parquet")
    model = GearModel.from_encoder(tiny_dir, GearConfig(queue_size=8, max_query_length=16, max_doc_length=64,
                                                        max_unit_length=24, lm_weight=0.0, loc_weight=1.0,
                                                        loc_layers=loc_layers))
    trainer = GearPretrainer(model)
    batch = Collate(model.tokenizer, 16, 64, 24)([TriplesDataset(tmp_path / "train.parquet", model.tokenizer, 64, 24)[i]
                                                 for i in range(4)])
    trainer(batch, alpha=0.0).loss.backward()
    reached = [cross.self.query.weight.grad is not None and cross.self.query.weight.grad.abs().sum().item() > 0
               for cross in model.fusion.cross]
    layer = model.resolve_layer(None)
    if loc_layers == "all":
        assert all(reached)
    else:  # layers after the localisation layer do not shape its attention
        assert reached[:layer] == [True] * layer and not any(reached[layer:])


def test_held_out_generation_runs_at_step_0_and_at_the_last_evaluation_only(tiny_dir, tmp_path):
    pq.write_table(pa.Table.from_pylist(rows(4, per_doc=2)), tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows(2, per_doc=2)), tmp_path / "test.parquet")

    def evals(run: str, every: bool) -> list[tuple[int, bool]]:
        cfg = TrainConfig(dataset=str(tmp_path / "train.parquet"), init_checkpoint=str(tiny_dir),
                          output_dir=str(tmp_path / run), epochs=3, batch_size=4, lr=1e-3, save_every=0, num_threads=1,
                          eval_file=str(tmp_path / "test.parquet"), eval_generation_queries=1, eval_generation_every_eval=every,
                          model=GearConfig(queue_size=8, max_query_length=16, max_doc_length=64, max_unit_length=24))
        train(cfg)
        records = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["generation"] is not None) for r in records if r["event"] == "eval"]

    assert evals("ends", False) == [(0, True), (2, False), (4, False), (6, True)]
    assert evals("every", True) == [(0, True), (2, True), (4, True), (6, True)]


def test_runs_sharing_a_store_take_the_documents_in_their_own_order_with_the_same_figures(tiny_dir, tmp_path,
                                                                                         monkeypatch):
    """Two processes that evaluate at once split the encoding: each takes the held-out
    documents in an order of its own; the figures are those of the plain order."""
    import gear_model.heldout as heldout

    model = GearModel.from_encoder(tiny_dir, GearConfig(max_query_length=16, max_unit_length=24)).eval()
    data = rows(6, per_doc=2)
    plain = heldout.HeldOut.from_rows(data).localization(model)
    seen: dict[int, list[str]] = {}
    encode = model.doc_token_weights
    for pid in (101, 202):
        monkeypatch.setattr(heldout.os, "getpid", lambda pid=pid: pid)
        monkeypatch.setattr(model, "doc_token_weights",
                            lambda queries, document, **kw: seen.setdefault(pid, []).append(document)
                            or encode(queries, document, **kw))
        held = heldout.HeldOut.from_rows(data)
        held.state_store = tmp_path / str(pid)
        shared = held.localization(model)
        assert shared["localization_by_layer"] == plain["localization_by_layer"]
        assert shared["lift_by_layer"] == plain["lift_by_layer"]
    assert sorted(seen[101]) == sorted(seen[202]) and seen[101] != seen[202]
