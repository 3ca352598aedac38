"""The local backend with the real embedded SmolLM2-135M-Instruct GGUF:
loads, returns one string per sentence, and left padding keeps batches exact
(greedy batch outputs equal single-sentence outputs, in the caller's order)."""

from __future__ import annotations

import pytest

from tasks.rewriters import RewriteConfig
from tasks.rewriters.quality import judge

SENTENCES = [
    "Abraham Lincoln was the 16th President of the United States from 1861 until 1865.",
    "Albedo is the fraction of sunlight that is reflected by a surface.",
    "The Alps stretch across eight countries in Europe.",
]


@pytest.mark.slow
def test_local_smollm2_batch_equals_single_and_keeps_order():
    from tasks.rewriters.local import LocalRewriter

    rw = LocalRewriter(RewriteConfig(backend="local", batch_size=3, max_new_tokens=24))
    assert rw.model_name.endswith(".gguf") and rw.tokenizer.padding_side == "left"
    batch = rw.rewrite(SENTENCES, seed=0)
    assert len(batch) == 3 and all(isinstance(o, str) for o in batch)
    assert rw.last_errors == [None, None, None]
    singles = [rw.rewrite([s], seed=0)[0] for s in SENTENCES]
    assert batch == singles
    # Outputs are single lines (generation stops at the first line break).
    assert all("\n" not in o.strip() for o in batch)
    for o, s in zip(batch, SENTENCES):
        judge(o, s)  # the gate accepts any string


@pytest.mark.slow
def test_prefix_cache_gives_the_same_greedy_outputs_as_full_prompts():
    """The cached prompt head (system prompt + worked examples) is an
    optimisation only: greedy outputs must equal those of full prompts."""
    from tasks.rewriters.local import LocalRewriter

    cached = LocalRewriter(RewriteConfig(backend="local", batch_size=3, max_new_tokens=24, prefix_cache=True))
    assert len(cached._prefix_ids) > 100  # the system prompt and both examples
    full = LocalRewriter(RewriteConfig(backend="local", batch_size=3, max_new_tokens=24, prefix_cache=False))
    assert full._prefix_cache is None
    batches = []
    cached.on_progress = batches.append  # the stage's progress hook: sentences done per batch
    assert cached.rewrite(SENTENCES, seed=0) == full.rewrite(SENTENCES, seed=0)
    assert batches == [3]
