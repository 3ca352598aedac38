"""The decoder that copies from the query (``copy_from_query``, not in the paper),
on a tiny random-init BERT."""

from __future__ import annotations

import json

import pytest
import torch
from test_gear_model_fixtures import make_tiny_bert

from gear_model import GearConfig, GearModel
from gear_model.copying import QueryCopyingLMHeadModel

DOC = "The castle stands by the river. Kings lived there in 1500. It fell to a siege in 1600."


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def build(tiny_dir, copy: bool) -> GearModel:
    torch.manual_seed(0)
    return GearModel.from_encoder(tiny_dir, GearConfig(queue_size=8, max_query_length=16, max_doc_length=32,
                                                       max_unit_length=16, copy_from_query=copy)).eval()


@pytest.fixture(scope="module")
def model(tiny_dir):
    return build(tiny_dir, copy=True)


def fused_pair(model, queries, units):
    q = model._tokenize(queries, 16)
    d = model._tokenize([DOC] * len(queries), 32)
    u = model._tokenize(units, 16)
    states = model.doc_states(d["input_ids"], d["attention_mask"])
    fused, _ = model.fuse(q["input_ids"], q["attention_mask"], states, d["attention_mask"])
    return q, u, fused


def test_the_copy_head_is_new_and_learns_at_the_new_parts_rate(model, tiny_dir):
    assert isinstance(model.decoder, QueryCopyingLMHeadModel)
    copy_names = {f"decoder.{n}" for n, _ in model.decoder.named_parameters() if n.startswith(("copy_query", "copy_gate"))}
    assert copy_names == {"decoder.copy_query.weight", "decoder.copy_query.bias", "decoder.copy_gate.weight",
                          "decoder.copy_gate.bias"}
    assert copy_names <= model.fresh_parameters
    # Everything else of the decoder is what the paper's decoder loads from the checkpoint.
    plain = build(tiny_dir, copy=False)
    assert not isinstance(plain.decoder, QueryCopyingLMHeadModel)
    assert model.fresh_parameters - copy_names == plain.fresh_parameters


def test_each_step_is_a_distribution_that_gives_the_query_words_more_mass(model, tiny_dir):
    queries, units = ["castle, river", "kings"], ["the castle stands by the river", "kings lived there"]
    with torch.no_grad():
        q, u, fused = fused_pair(model, queries, units)
        ids, _ = model.decoder_inputs(u["input_ids"], u["attention_mask"])
        log_p = model.decoder(input_ids=ids, attention_mask=u["attention_mask"], encoder_hidden_states=fused,
                              encoder_attention_mask=q["attention_mask"], **model.copy_sources(q["input_ids"])).logits
        plain = model.decoder(input_ids=ids, attention_mask=u["attention_mask"], encoder_hidden_states=fused,
                              encoder_attention_mask=q["attention_mask"]).logits.log_softmax(-1)
    torch.testing.assert_close(log_p.logsumexp(-1), torch.zeros(log_p.shape[:2]), atol=1e-4, rtol=0)
    castle = model.tokenizer.convert_tokens_to_ids("castle")
    siege = model.tokenizer.convert_tokens_to_ids("siege")
    # "castle" is in the first query: copying adds to it; "siege" is in neither query: copying takes from it.
    assert (log_p[0, :, castle] > plain[0, :, castle]).all()
    assert (log_p[:, :, siege] < plain[:, :, siege]).all()
    # Special tokens, padding and punctuation are never copied: they gain nothing beyond the vocabulary's share.
    for token in (model.tokenizer.cls_token, model.tokenizer.sep_token, model.tokenizer.pad_token, ","):
        token_id = model.tokenizer.convert_tokens_to_ids(token)
        assert (log_p[..., token_id] < plain[..., token_id]).all(), token


def test_an_open_gate_writes_only_the_querys_words(model):
    saved = model.decoder.copy_gate.bias.detach().clone()
    try:
        with torch.no_grad():
            model.decoder.copy_gate.bias.fill_(30.0)
        query = "castle river kings"
        text = model.generate(query, DOC, max_new_tokens=10)
        allowed = set(model.tokenizer(query, add_special_tokens=False)["input_ids"])
        written = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert written and set(written) <= allowed
        # Batched decoding (padded queries of different lengths) gives what each pair alone gives.
        queries = ["castle river kings", "siege", "who built the castle by the river"]
        alone = [model.generate(q, DOC, max_new_tokens=10) for q in queries]
        assert model.generate_many(queries, [DOC] * 3, max_new_tokens=10) == alone
    finally:
        with torch.no_grad():
            model.decoder.copy_gate.bias.copy_(saved)


def test_lm_loss_needs_the_query_ids_and_trains_the_copy_head_under_bf16(model):
    q, u, fused = fused_pair(model, ["castle river"], ["the castle stands by the river"])
    with pytest.raises(ValueError, match="query's token ids"):
        model.lm_loss(fused, q["attention_mask"], u["input_ids"], u["attention_mask"])
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.lm_loss(fused, q["attention_mask"], u["input_ids"], u["attention_mask"], q_ids=q["input_ids"])
    assert torch.isfinite(loss)
    loss.backward()
    assert model.decoder.copy_gate.weight.grad.abs().sum() > 0
    assert model.decoder.copy_query.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_a_saved_copying_model_loads_as_one_and_labels_its_row(model, tmp_path):
    from tasks.evaluate.config import LOC_ROW, gear_row_name, gear_row_names

    out = model.save_pretrained(tmp_path / "models" / "run" / "model")
    loaded = GearModel.from_pretrained(out)
    assert isinstance(loaded.decoder, QueryCopyingLMHeadModel)
    assert loaded.generate("castle river", DOC, max_new_tokens=8) == model.generate("castle river", DOC, max_new_tokens=8)
    assert gear_row_name(out) == "GeAR + copy (not in the paper)"
    config = json.loads((out / "config.json").read_text())
    config["gear"]["loc_weight"] = 1.0
    (out / "config.json").write_text(json.dumps(config))
    assert gear_row_names([str(out)]) == ["GeAR + L_loc + copy (not in the paper)"]
    config["gear"]["copy_from_query"] = False
    (out / "config.json").write_text(json.dumps(config))
    assert gear_row_names([str(out)]) == [LOC_ROW]


def test_the_paper_row_prefers_a_run_without_copying(tmp_path):
    from tasks.common import SUCCESS_MARKER
    from tasks.evaluate.config import latest_models

    def run(key: str, copy: bool) -> str:
        model = tmp_path / "models" / key / "model"
        model.mkdir(parents=True)
        (model / "config.json").write_text(json.dumps({"gear": {"lm_weight": 1.0, "copy_from_query": copy}}))
        (model.parent / SUCCESS_MARKER).write_text("{}")
        return str(model)

    paper = run("a", False)
    run("b", True)
    (tmp_path / "models" / "LATEST").write_text("b/model")
    assert latest_models(tmp_path / "models")[0] == paper
