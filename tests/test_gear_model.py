"""GearModel and its losses on a tiny random-init BERT (2 layers, hidden 32)."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_gear_model_fixtures import ddp_grad_worker, make_tiny_bert, triples

from gear_model import GearConfig, GearModel
from gear_model.data import Collate
from gear_model.losses import NO_DOC, GearPretrainer, doc_keys, positive_targets

DOC = "The castle stands by the river. Kings lived there in 1500. It fell to a siege in 1600."
SPANS = [(0, 30), (31, 58), (59, len(DOC))]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def model(tiny_dir):
    torch.manual_seed(0)
    return GearModel.from_encoder(tiny_dir, GearConfig(queue_size=8, max_query_length=16, max_doc_length=32,
                                                       max_unit_length=16)).eval()


def batch_of(model, rows):
    return Collate(model.tokenizer, 16, 32, 16)(rows)


def test_from_encoder_builds_every_part(model, tiny_dir):
    assert model.n_layers == 2
    assert model.tokenizer.convert_tokens_to_ids("[DEC]") == model.dec_token_id == 30522
    assert model.decoder.config.vocab_size == 30523
    # Decoder LM head tied to its (resized) word embeddings; E_q and E_d are separate copies.
    dec = model.decoder
    assert dec.cls.predictions.decoder.weight.data_ptr() == dec.bert.embeddings.word_embeddings.weight.data_ptr()
    assert model.query_encoder.embeddings.word_embeddings.weight.data_ptr() != \
        model.doc_encoder.embeddings.word_embeddings.weight.data_ptr()
    assert torch.equal(model.query_encoder.embeddings.word_embeddings.weight,
                       model.doc_encoder.embeddings.word_embeddings.weight)
    assert len(model.fusion.cross) == 2
    assert abs(model.temp.item() - 0.07) < 1e-6


def test_encoders_give_normalised_float32_embeddings(model):
    q = model.encode_queries(["castle river", "kings 1500", "siege"], batch_size=2)
    d = model.encode_documents([DOC, "Another short document."], batch_size=1)
    assert q.shape == (3, 32) and d.shape == (2, 32)
    assert q.dtype == np.float32 and d.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)
    # Batching and padding do not change an embedding.
    np.testing.assert_allclose(model.encode_queries(["kings 1500"]), q[1:2], atol=1e-5)
    assert model.encode_queries([]).shape == (0, 32)


def test_fusion_is_bidirectional_and_decoder_causal(model):
    tok = model.tokenizer
    q = tok(["castle river kings", "castle river queens"], return_tensors="pt")
    d = tok([DOC, DOC], return_tensors="pt")
    with torch.no_grad():
        states = model.doc_states(d["input_ids"], d["attention_mask"])
        fused, _ = model.fuse(q["input_ids"], q["attention_mask"], states, d["attention_mask"])
    # Only the third word differs; a bidirectional fusion changes the first positions too.
    assert not torch.allclose(fused[0, 1], fused[1, 1], atol=1e-4)

    u = tok(["kings lived there", "kings lived here"], return_tensors="pt")
    ids, labels = model.decoder_inputs(u["input_ids"], u["attention_mask"])
    assert (ids[:, 0] == model.dec_token_id).all() and (labels[:, 0] == -100).all()
    with torch.no_grad():
        logits = model.decoder(input_ids=ids, attention_mask=u["attention_mask"], encoder_hidden_states=fused[:1].expand(2, -1, -1),
                               encoder_attention_mask=q["attention_mask"][:1].expand(2, -1)).logits
    # Positions before the differing token see the same prefix: identical under a causal mask.
    assert torch.allclose(logits[0, :3], logits[1, :3], atol=1e-5)
    assert not torch.allclose(logits[0, 3], logits[1, 3], atol=1e-4)


def test_cross_attention_rows_sum_to_one_and_ignore_padding(model):
    tok = model.tokenizer
    q = tok(["castle river", "kings"], padding=True, return_tensors="pt")
    d = tok([DOC, "Short one."], padding=True, return_tensors="pt")
    from gear_model.fusion import eager_attention

    with torch.no_grad(), eager_attention(model.query_encoder.config):
        states = model.doc_states(d["input_ids"], d["attention_mask"])
        _, weights = model.fuse(q["input_ids"], q["attention_mask"], states, d["attention_mask"], return_layer=2)
    assert weights.shape == (2, 2, q["input_ids"].shape[1], d["input_ids"].shape[1])
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    padded = d["attention_mask"][1] == 0
    assert padded.any() and (weights[1][..., padded] == 0).all()
    assert model.query_encoder.config._attn_implementation == "sdpa"  # switched back

    att = model.cross_attention("castle river", DOC, layer=1)
    assert att.weights.shape[0] == 2 and att.weights.shape[2] == att.offsets.shape[0]
    np.testing.assert_allclose(att.weights.sum(-1), 1.0, atol=1e-5)
    assert att.query_mask.tolist() == [False, True, True, False]
    starts, ends = att.offsets[1:-1].T
    assert DOC[starts[0]:ends[0]].lower() == "the"
    with pytest.raises(ValueError, match="1-based"):
        model.cross_attention("castle", DOC, layer=0)


def test_localize_scores_each_sentence_by_attention_mass(model):
    scores = model.localize("kings 1500", DOC, SPANS)
    assert scores.shape == (3,) and scores.dtype == np.float32
    assert (scores > 0).all()
    # The three sentences cover every word token: their masses add up to the
    # non-special share of the attention (< 1, because [CLS]/[SEP] get some).
    assert 0.5 < scores.sum() <= 1.0 + 1e-5
    assert model.resolve_layer(None) == 1  # n_layers - 2, floored at 1
    assert model.localize("kings", DOC, [(200, 300)]).tolist() == [0.0]  # outside the text
    as_dicts = [{"start": a, "end": b} for a, b in SPANS]  # the triples' SPAN struct
    np.testing.assert_array_equal(model.localize("kings 1500", DOC, as_dicts), scores)


def test_save_load_round_trip_gives_identical_outputs(model, tmp_path):
    model.save_pretrained(tmp_path / "m")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in (tmp_path / "m").iterdir()}
    loaded = GearModel.from_pretrained(tmp_path / "m")
    assert loaded.gear_config == model.gear_config
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(loaded.encode_queries(["castle"]), model.encode_queries(["castle"]))
    np.testing.assert_array_equal(loaded.encode_documents([DOC]), model.encode_documents([DOC]))
    np.testing.assert_array_equal(loaded.localize("kings", DOC, SPANS), model.localize("kings", DOC, SPANS))
    assert loaded.generate("kings", DOC, max_new_tokens=6) == model.generate("kings", DOC, max_new_tokens=6)



def _with_token_boost(model, token: str, boost: float = 50.0):
    """The decoder's output bias raised for one token (restored by the caller)."""
    bias = model.decoder.cls.predictions.bias
    saved = bias.detach().clone()
    with torch.no_grad():
        bias[model.tokenizer.convert_tokens_to_ids(token)] += boost
    return saved


def test_decoding_stops_at_the_end_of_the_sentence(model):
    saved = _with_token_boost(model, ".")
    try:
        # Every step prefers ".": the unit ends at the first one, not after the budget.
        assert model.generate("kings", DOC, max_new_tokens=20) == "."
        assert model.generate("kings", DOC, max_new_tokens=20, num_beams=1) == "."
    finally:
        with torch.no_grad():
            model.decoder.cls.predictions.bias.copy_(saved)


def test_decoding_repeats_no_ngram_and_batches_like_one_query(model):
    saved = _with_token_boost(model, "castle", 8.0)
    try:
        text = model.generate("kings", DOC, max_new_tokens=24, no_repeat_ngram_size=2)
        ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        bigrams = list(zip(ids, ids[1:]))
        assert "castle" in text and len(bigrams) == len(set(bigrams))
        # Search's batched decoding gives each row what one query alone gives.
        q, _, fused, _ = model._fuse_one("kings", DOC)
        twice = model.decode(fused.expand(2, -1, -1), q["attention_mask"], 24, no_repeat_ngram_size=2)
        assert twice == [text, text]
    finally:
        with torch.no_grad():
            model.decoder.cls.predictions.bias.copy_(saved)

def test_generating_many_pairs_at_once_gives_what_each_pair_alone_gives(model):
    saved = _with_token_boost(model, "castle", 3.0)
    try:
        # Queries of different lengths: the shorter ones' fused states are padded and masked.
        queries = ["kings", "who built the castle on the rock above the old town", "siege", "music festival summer"]
        documents = [DOC, DOC, DOC[: len(DOC) // 2], DOC]
        alone = [model.generate(q, d, max_new_tokens=12) for q, d in zip(queries, documents)]
        assert model.generate_many(queries, documents, max_new_tokens=12, batch_size=3) == alone
        assert model.generate_many([], []) == []
        with pytest.raises(ValueError, match="2 queries but 1 documents"):
            model.generate_many(queries[:2], documents[:1])
    finally:
        with torch.no_grad():
            model.decoder.cls.predictions.bias.copy_(saved)


def test_momentum_update_and_queue_arithmetic(model):
    trainer = GearPretrainer(model)
    online = next(model.query_encoder.parameters())
    target = next(trainer.query_encoder_m.parameters())
    assert not target.requires_grad and torch.equal(online, target)
    before = target.detach().clone()
    with torch.no_grad():
        online.add_(1.0)
    trainer.momentum_update()
    torch.testing.assert_close(target, 0.995 * before + 0.005 * online.detach())
    with torch.no_grad():
        online.sub_(1.0)

    assert trainer.doc_queue.shape == (32, 8) and (trainer.id_queue == NO_DOC).all()
    for step in range(3):
        feats = F.normalize(torch.randn(4, 32), dim=-1)
        trainer.enqueue(feats, feats, torch.arange(4) + 10 * step)
        assert int(trainer.queue_ptr) == (4 * (step + 1)) % 8
    # The third batch overwrote the first: slots 0-3 hold step 2, slots 4-7 step 1.
    assert trainer.id_queue.tolist() == [20, 21, 22, 23, 10, 11, 12, 13]
    torch.testing.assert_close(trainer.doc_queue[:, :4], feats.T)
    with pytest.raises(ValueError, match="not divisible"):
        trainer.enqueue(torch.zeros(3, 32), torch.zeros(3, 32), torch.arange(3))


def test_same_document_triples_are_positives_not_negatives():
    local = doc_keys(["a", "a", "b"])
    queue_ids = torch.tensor([int(doc_keys(["b"])[0]), NO_DOC])
    targets = positive_targets(local, torch.cat([local, queue_ids]))
    # a's two triples are each other's positives; b's queue entry is b's positive.
    torch.testing.assert_close(targets, torch.tensor([
        [0.5, 0.5, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.5, 0.5, 0.0],
    ]))
    assert doc_keys(["a"]).item() == doc_keys(["a"]).item() >= 0


def test_contrastive_only_skips_decoder(tiny_dir):
    torch.manual_seed(0)
    model = GearModel.from_encoder(tiny_dir, GearConfig(queue_size=0, lm_weight=0.0))
    trainer = GearPretrainer(model).train()
    out = trainer(batch_of(model, triples(2)), alpha=0.0)
    out.loss.backward()
    assert out.lm.item() == 0.0 and torch.equal(out.loss.detach(), out.itc)
    assert all(p.grad is None for p in model.decoder.parameters())
    assert all(p.grad is None for p in model.fusion.parameters())
    assert model.query_encoder.embeddings.word_embeddings.weight.grad is not None


@pytest.mark.slow
def test_tiny_model_overfits_and_generates_the_unit(tiny_dir):
    torch.manual_seed(0)
    model = GearModel.from_encoder(tiny_dir, GearConfig(queue_size=0, max_query_length=16, max_doc_length=32,
                                                        max_unit_length=16))
    trainer = GearPretrainer(model).train()
    rows = triples(4, per_doc=1)
    batch = batch_of(model, rows)
    optimizer = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(90):
        out = trainer(batch, alpha=0.0)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] / 10, losses[::10]
    model.eval()
    for row in rows:
        assert model.generate(row["query"], row["document"], max_new_tokens=16) == row["unit"].lower()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_gradients_match_one_process(tmp_path):
    tiny = make_tiny_bert(tmp_path / "tiny")
    ddp_grad_worker(0, 1, str(tiny), 0, str(tmp_path / "one.pt"))
    mp.spawn(ddp_grad_worker, args=(2, str(tiny), _free_port(), str(tmp_path / "two.pt")), nprocs=2, join=True)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 50
    worst = max((one["grads"][k] - two["grads"][k]).abs().max().item() for k in one["grads"])
    scale = max(one["grads"][k].abs().max().item() for k in one["grads"])
    assert worst < 1e-4 * max(1.0, scale), worst  # float32 reduction order; a wrong gradient is off by >1e-2
    # Both runs enqueued the same global batches in the same order.
    torch.testing.assert_close(one["queue"], two["queue"])
    assert torch.equal(one["ids"], two["ids"])


def test_reused_document_states_change_no_output_and_encode_each_document_once(model):
    from gear_model.model import DocumentStateMemo

    calls = []
    hook = model.doc_encoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        plain = (model.localize("kings", DOC, SPANS), model.generate("kings", DOC, max_new_tokens=5))
        n_plain = len(calls)
        calls.clear()
        with model.reusing_document_states() as memo:
            reused = [(model.localize(q, DOC, SPANS), model.generate(q, DOC, max_new_tokens=5)) for q in ("kings", "castle")]
        assert len(calls) == 1 and len(memo) == 1 and n_plain == 2  # one E_d pass for two queries' three reads
        np.testing.assert_array_equal(reused[0][0], plain[0])
        assert reused[0][1] == plain[1]
        calls.clear()
        model.train()  # a training pass never reads the memo
        try:
            with model.reusing_document_states(memo):
                d = model._tokenize([DOC], 32)
                model.doc_states(d["input_ids"], d["attention_mask"])
        finally:
            model.eval()
        assert len(calls) == 1
    finally:
        hook.remove()
    small = DocumentStateMemo(max_bytes=100)
    small.put(("a",), torch.zeros(10))  # 40 bytes
    small.put(("b",), torch.zeros(10))
    assert small.get(("a",)) is not None  # "a" is now the most recently used
    small.put(("c",), torch.zeros(10))  # 120 bytes: the least recently used ("b") goes
    assert small.get(("b",)) is None and small.get(("a",)) is not None and small.bytes == 80
