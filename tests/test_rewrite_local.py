"""The local backend with the real embedded SmolLM2-135M-Instruct GGUF: loads,
returns one string per sentence in the caller's order, and its speed-ups do
not change greedy outputs (the compact loop equals transformers' generate(),
the GQA attention equals transformers' SDPA, batches equal single sentences,
the cached prompt head equals full prompts). The constrained decoding keeps
its promises (sentence tokens only, within the word budget, never empty)."""

from __future__ import annotations

import os

import pytest

from tasks.rewriters import RewriteConfig
from tasks.rewriters.quality import judge, normalise

SENTENCES = [
    "Abraham Lincoln was the 16th President of the United States from 1861 until 1865.",
    "Albedo is the fraction of sunlight that is reflected by a surface.",
    "The Alps stretch across eight countries in Europe.",
    "Mont Blanc, at 4,808 metres, is the highest mountain of the Alps and of Western Europe.",
]


@pytest.fixture(scope="module")
def rewriter():
    from tasks.rewriters.local import LocalRewriter

    rw = LocalRewriter(RewriteConfig(backend="local", batch_size=4, max_new_tokens=24))
    yield rw
    rw.close()


def _with(rw, **changes):
    """The same loaded model under other settings read at rewrite time."""
    rw.config = rw.config.model_copy(update=changes)
    return rw


@pytest.mark.slow
def test_defaults_batch_equals_single_and_keeps_order(rewriter):
    rw = _with(rewriter, batch_size=4, decode_loop="compact")
    assert rw.model_name.endswith(".gguf") and rw.constrain and rw.threads in {1, os.cpu_count()}
    batches = []
    rw.on_progress = batches.append  # the stage's progress hook: sentences done per batch
    batch = rw.rewrite(SENTENCES, seed=0)
    rw.on_progress = None
    assert batches == [4] and rw.last_errors == [None] * 4
    assert len(batch) == 4 and all(isinstance(o, str) and "\n" not in o.strip() for o in batch)
    assert batch == [rw.rewrite([s], seed=0)[0] for s in SENTENCES]


@pytest.mark.slow
def test_compact_loop_equals_generate(rewriter):
    """Dropping finished rows and the static cache are speed only: greedy
    outputs equal generate()'s, constrained (the default) or not."""
    rw = _with(rewriter, batch_size=4, decode_loop="compact")
    compact = rw.rewrite(SENTENCES, seed=0)
    assert rw.rewrite(SENTENCES, seed=0) == compact  # deterministic
    assert _with(rw, decode_loop="generate").rewrite(SENTENCES, seed=0) == compact
    cls = rw._processor_cls
    try:
        rw._processor_cls = None  # unconstrained, as with constrain_to_sentence=False
        free_generate = rw.rewrite(SENTENCES, seed=0)
        assert _with(rw, decode_loop="compact").rewrite(SENTENCES, seed=0) == free_generate
    finally:
        rw._processor_cls = cls
    assert free_generate != compact  # the constraint does change what is written


@pytest.mark.slow
def test_gqa_attention_gives_the_same_outputs_as_transformers_sdpa(rewriter):
    from tasks.rewriters.local import GQA_ATTENTION

    rw = _with(rewriter, batch_size=4, decode_loop="compact")
    assert rw.model.config._attn_implementation == GQA_ATTENTION
    ours = rw.rewrite(SENTENCES, seed=0)
    try:
        rw.model.set_attn_implementation("sdpa")
        assert rw.rewrite(SENTENCES, seed=0) == ours
    finally:
        rw.model.set_attn_implementation(GQA_ATTENTION)


@pytest.mark.slow
def test_constraint_keeps_sentence_tokens_and_word_budget(rewriter):
    rw = _with(rewriter, batch_size=4, decode_loop="compact")
    outputs = rw.rewrite(SENTENCES, seed=0)
    for sentence, out in zip(SENTENCES, outputs):
        ids = rw.tokenizer(out, add_special_tokens=False)["input_ids"]
        assert set(ids) <= rw.allowed_token_ids(sentence), out
        assert 1 <= len(out.split()) <= rw.word_budget(sentence), out
        assert normalise(out) and normalise(out) != normalise(sentence)
        assert judge(out, sentence).reason not in {"echo", "too_long", "empty", "preamble", "refusal"}
    assert rw.word_budget(SENTENCES[2]) == 4  # 8 words x 0.6, rounded down


@pytest.mark.slow
def test_prefix_cache_gives_the_same_greedy_outputs_as_full_prompts(rewriter):
    """The cached prompt head (system prompt + worked examples) is an
    optimisation only: greedy outputs must equal those of full prompts."""
    from tasks.rewriters.local import LocalRewriter

    rw = _with(rewriter, batch_size=4, decode_loop="compact")
    assert len(rw._prefix_ids) > 300  # the system prompt and all six examples
    full = LocalRewriter(RewriteConfig(backend="local", batch_size=4, max_new_tokens=24, prefix_cache=False,
                                       torch_threads=rw.threads))
    assert full._prefix_cache is None
    assert full.rewrite(SENTENCES, seed=0) == rw.rewrite(SENTENCES, seed=0)


def test_the_thread_probe_keeps_all_cores_through_timing_noise():
    from tasks.rewriters.local import choose_thread_count

    assert choose_thread_count({1: 0.009, 2: 0.010}, 2) == 2  # noise: all cores
    assert choose_thread_count({1: 0.009, 2: 0.006}, 2) == 2
    assert choose_thread_count({1: 0.009, 2: 0.030}, 2) == 1  # a contended machine: one thread


@pytest.mark.slow
def test_cached_gguf_conversion_gives_the_same_model_and_outputs(tmp_path):
    """The first load publishes the converted weights and tokenizer; a load from
    that folder has identical weights, tokens and greedy rewrites."""
    import torch

    from tasks.rewriters.local import LocalRewriter

    config = RewriteConfig(backend="local", batch_size=4, max_new_tokens=24, gguf_cache_dir=str(tmp_path))
    direct = LocalRewriter(config.model_copy(update={"gguf_cache_dir": "off"}))
    first = LocalRewriter(config)  # converts, and publishes the conversion
    published = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(published) == 1 and (published[0] / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written folder left
    cached = LocalRewriter(config)
    assert cached.load_seconds < first.load_seconds
    want = direct.model.state_dict()
    got = cached.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    text = SENTENCES[0] + " " + SENTENCES[3]
    assert cached.tokenizer(text)["input_ids"] == direct.tokenizer(text)["input_ids"]
    assert cached.rewrite(SENTENCES, seed=0) == direct.rewrite(SENTENCES, seed=0)
    for rw in (direct, first, cached):
        rw.close()


@pytest.mark.slow
def test_a_cache_that_cannot_be_written_or_read_only_costs_the_conversion(tmp_path, monkeypatch, caplog):
    """A full disk while publishing (safetensors raises its own error type) and a
    damaged entry each leave the load working, with a warning, and no half-written folder."""
    import torch
    import transformers

    from tasks.assets import embedded_rewriter_gguf
    from tasks.rewriters.local import load_gguf

    gguf = embedded_rewriter_gguf()

    def disk_full(self, *args, **kwargs):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as m:
        m.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
        tokenizer, model = load_gguf(gguf, tmp_path)
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    assert list(tmp_path.iterdir()) == []
    assert "could not cache the conversion" in caplog.text

    tokenizer, model = load_gguf(gguf, tmp_path)  # publishes
    (entry,) = list(tmp_path.iterdir())
    (entry / "model.safetensors").write_bytes(b"not a safetensors file")
    caplog.clear()
    tokenizer, again = load_gguf(gguf, tmp_path)
    assert "is unreadable" in caplog.text
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
