"""Local backend: a small instruct model on CPU through transformers.

A .gguf file is loaded with ``from_pretrained(folder, gguf_file=name)`` (the
weights are de-quantised to float32), its tokenizer from the same file. That
conversion takes seconds at every load, so its result is kept in a cache
folder (``gguf_cache_dir``) and read from there afterwards (``load_gguf``).

Every prompt is [shared head][sentence part]. The head (system prompt and
worked examples) goes through the model once; its key/value cache is copied
into every batch. Batches are LEFT padded between head and sentence part, so
every prompt ends where the new tokens start; sentences are sorted by token
length so that a batch wastes little padding, and outputs are put back in the
caller's order.

Decoding (``decode_loop="compact"``, the default) is a plain greedy loop
rather than ``generate()``, over a preallocated (static) KV cache: a row
leaves the batch (and its KV cache rows are dropped) once it has emitted a
stop token, so the batch does not keep paying for the longest output; its
greedy outputs equal generate()'s (tested). Attention passes grouped KV heads
to torch as they are (``gqa_attention``). With ``constrain_to_sentence`` a
logits processor (``SentenceKeywordsProcessor``) allows only the sentence's
own tokens, commas and stop tokens, within a word budget, and the LM head is
computed only for the batch's allowed tokens.

Why this shape: on CPU the time is in decode steps, and each step re-reads
every weight whatever the batch (so a larger batch is cheaper per row), a
DynamicCache would copy the whole KV cache to append one token (hence the
static cache), and transformers would copy every grouped KV head per query
head under a padding mask (hence ``gqa_attention``). On a machine shared with
other jobs, OpenMP threads that wait for a descheduled peer slow every step,
so the thread count is timed at load. benchmarks/rewrite.py measures the
settings (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
import time
from pathlib import Path

from tasks.rewriters.base import RewriteConfigError, Rewriter
from tasks.rewriters.config import RewriteConfig
from tasks.rewriters.prompts import build_messages

log = logging.getLogger(__name__)
# The thread probe: repeats per count, and how much faster one thread must be to win.
THREAD_PROBE_REPEATS = 5
THREAD_PROBE_MARGIN = 0.25


def choose_thread_count(timings: dict[int, float], cores: int) -> int:
    """All cores, unless the probe timed one thread faster by ``THREAD_PROBE_MARGIN``."""
    return 1 if timings[1] < (1 - THREAD_PROBE_MARGIN) * timings[cores] else cores


_WORD_SPLIT = re.compile(r"\s+")
_EDGE_PUNCT = re.compile(r"^[^\w]+|[^\w]+$")


GQA_ATTENTION = "gear_sdpa_gqa"


def _register_gqa_attention() -> None:
    """Register an attention implementation that is transformers' SDPA except
    that, with a padding mask, grouped-query heads are passed to torch's SDPA
    with ``enable_gqa=True`` instead of being copied out first. transformers
    copies them (``repeat_kv``) whenever a mask is given on CPU; with SmolLM2's
    3 key/value heads for 9 query heads that copy is the largest cost of a
    padded decode step, and passing the heads as they are gives bit-identical
    outputs."""
    import torch
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if GQA_ATTENTION in ALL_MASK_ATTENTION_FUNCTIONS:
        return

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        if attention_mask is None or query.shape[1] == key.shape[1] or kwargs.get("position_bias") is not None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, enable_gqa=True
        )
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(GQA_ATTENTION, attention)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)


def _make_processor_class():
    """Defined lazily: importing transformers costs seconds, and the other
    backends never need it."""
    import torch
    from transformers import LogitsProcessor

    class SentenceKeywordsProcessor(LogitsProcessor):
        """Constrained decoding to a keyword list drawn from the sentence.

        Per row, a token may be produced only if it is one of the sentence's
        own tokens (see ``LocalRewriter.allowed_token_ids``), a comma or a
        stop token, and:

        - ``first[row]`` (a word's first piece without a leading space) only
          as the first token: later, a word starts with a space, so the model
          cannot glue sentence words together ("virtualencyclopedia");
        - at most ``max_words[row]`` whitespace-separated words: once they are
          begun, a token that would begin another one is blocked, and commas
          (no dangling separator);
        - no stop token as the first token (no empty output);
        - no bigram twice when its second token holds a letter (no repeated
          keyword such as "theories, theories").

        So an echo or an over-long query cannot be produced, and a new word
        only by re-combining the sentence's sub-word pieces.

        ``vocab``: the token ids the scores are over (all ids for
        ``generate()``; the compact loop scores only the batch's allowed ids).
        Rows can be dropped with :meth:`keep` when they finish.
        """

        def __init__(self, allowed: list[tuple[set[int], set[int]]], max_words: list[int], vocab: torch.Tensor,
                     starts_word: torch.Tensor, is_comma: torch.Tensor, has_letter: torch.Tensor,
                     stop_ids: list[int]):
            self.vocab = vocab
            self.index = torch.full((starts_word.shape[0],), -1, dtype=torch.long)
            self.index[vocab] = torch.arange(len(vocab))
            later = torch.zeros(len(allowed), len(vocab), dtype=torch.bool)
            first = torch.zeros_like(later)
            for r, (first_ids, later_ids) in enumerate(allowed):
                first[r, self._columns(first_ids)] = True
                later[r, self._columns(later_ids)] = True
            self.first, self.later = first | later, later
            self.max_words = torch.tensor(max_words)
            self.words = torch.zeros(len(allowed), dtype=torch.long)
            self.starts_word_full = starts_word  # by token id, full vocabulary
            self.has_letter = has_letter
            self.blocked_at_budget = starts_word[vocab] | is_comma[vocab]  # by score column
            self.stop = torch.zeros(len(vocab), dtype=torch.bool)
            self.stop[self._columns(stop_ids)] = True
            self.history: list[list[int]] = [[] for _ in allowed]
            self.steps = 0

        def _columns(self, ids) -> torch.Tensor:
            cols = self.index[torch.tensor(sorted(ids), dtype=torch.long)] if ids else torch.zeros(0, dtype=torch.long)
            return cols[cols >= 0]

        def keep(self, rows: torch.Tensor) -> None:
            self.first, self.later = self.first[rows], self.later[rows]
            self.max_words, self.words = self.max_words[rows], self.words[rows]
            self.history = [self.history[r] for r in rows.tolist()]

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.steps == 0:
                ok = self.first & ~self.stop
            else:
                last = input_ids[:, -1]
                # Words begun so far: the first token begins one, later ones when they start with whitespace.
                self.words += 1 if self.steps == 1 else self.starts_word_full[last].long()
                ok = self.later.clone()
                ok[self.words >= self.max_words] &= ~self.blocked_at_budget
                for r, t in enumerate(last.tolist()):
                    h = self.history[r]
                    h.append(t)
                    seen = [b for a, b in zip(h[:-1], h[1:]) if a == t and self.has_letter[b]]
                    if seen:
                        cols = self._columns(seen)
                        ok[r, cols] = False
            self.steps += 1
            return scores.masked_fill(~ok, float("-inf"))

    return SentenceKeywordsProcessor


def gguf_cache_root(config: RewriteConfig) -> Path | None:
    """The folder of converted .gguf models (``RewriteConfig.gguf_cache_dir``); None: no cache."""
    if config.gguf_cache_dir == "off":
        return None
    if config.gguf_cache_dir:
        return Path(config.gguf_cache_dir).expanduser()
    return Path(os.environ.get("GEAR_CACHE_DIR") or Path.home() / ".cache" / "gear-rir").expanduser() / "gguf"


def load_gguf(path: Path, cache_root: Path | None):
    """(tokenizer, float32 model) of a .gguf file. With ``cache_root``, the first
    load saves the converted pair to ``cache_root/<content hash>-transformers-<version>``
    (published whole, by rename) and later loads read that folder."""
    import shutil
    import tempfile

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.common import fingerprint

    folder = None
    if cache_root is not None:
        folder = cache_root / f"{fingerprint(path)[:24]}-transformers-{transformers.__version__}"
        if folder.is_dir():
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder)
                return tokenizer, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            except Exception as exc:  # noqa: BLE001 - a damaged cache entry is converted again, not fatal
                log.warning("local rewriter: cached conversion %s is unreadable (%s); converting %s again",
                            folder, exc, path)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    if folder is None:
        return tokenizer, model
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
        try:
            # The weights are plain float32 once loaded; only the GGUF marker stops save_pretrained.
            quantizer, model.hf_quantizer = model.hf_quantizer, None
            quantization = model.config.__dict__.pop("quantization_config", None)
            try:
                model.save_pretrained(tmp)
            finally:
                model.hf_quantizer = quantizer
                if quantization is not None:
                    model.config.quantization_config = quantization
            tokenizer.save_pretrained(tmp)
            try:
                os.replace(tmp, folder)
            except OSError:
                if not folder.is_dir():  # else another process published it first
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as exc:  # noqa: BLE001 - the cache only saves time: a full disk must not fail the load
        log.warning("local rewriter: could not cache the conversion of %s in %s (%s)", path, folder.parent, exc)
    return tokenizer, model


class LocalRewriter(Rewriter):
    def __init__(self, config: RewriteConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.model_name = config.resolved_model()
        self.examples = config.worked_examples_on()
        self.constrain = config.constraint_on()
        self.last_errors = []
        path = Path(self.model_name)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise RewriteConfigError(f"local rewriter: GGUF file {path} does not exist")
            kwargs = {"gguf_file": path.name}
            source = str(path.parent)
        else:
            kwargs, source = {}, self.model_name
        started = time.perf_counter()
        if kwargs:
            self.tokenizer, self.model = load_gguf(path, gguf_cache_root(config))
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        self.model.eval()
        if config.gqa_attention and getattr(self.model.config, "num_key_value_heads", None) not in (
            None, getattr(self.model.config, "num_attention_heads", None)
        ):
            _register_gqa_attention()
            self.model.set_attn_implementation(GQA_ATTENTION)
        self.load_seconds = time.perf_counter() - started
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.tokenizer.eos_token_id
        texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
        self._stop_ids = sorted({eos, *(i for i, t in enumerate(texts) if "\n" in t)} - {None})
        # Per token id: does it begin a whitespace-separated word / hold a comma (the constraint's counters).
        n_vocab = self.model.get_output_embeddings().weight.shape[0]
        texts += [""] * max(0, n_vocab - len(texts))
        self._starts_word = torch.tensor([t[:1].isspace() for t in texts[:n_vocab]], dtype=torch.bool)
        self._is_comma = torch.tensor(["," in t for t in texts[:n_vocab]], dtype=torch.bool)
        self._has_letter = torch.tensor([any(c.isalpha() for c in t) for t in texts[:n_vocab]], dtype=torch.bool)
        self._comma_ids = [i for i in self.tokenizer(",", add_special_tokens=False)["input_ids"]]
        self._processor_cls = _make_processor_class() if self.constrain else None
        self.threads = self._set_threads(config.torch_threads) if config.torch_threads else self._calibrate_threads()
        self._prefix_ids: list[int] = []
        self._prefix_cache = None
        if config.prefix_cache:
            self._prefix_ids = self._shared_prefix_ids()
            with torch.inference_mode():
                prefix = torch.tensor([self._prefix_ids])
                self._prefix_cache = self.model(input_ids=prefix, use_cache=True).past_key_values
        log.info("local rewriter %s loaded in %.1f s (%d threads)", path.name, self.load_seconds, self.threads)

    # ------------------------------------------------------------------ threads

    @staticmethod
    def _set_threads(n: int | None) -> int:
        import torch

        n = n or os.cpu_count() or 1
        torch.set_num_threads(n)
        return n

    def _calibrate_threads(self) -> int:
        """Pick the intra-op thread count, 1 or all cores, by timing 24 matrix
        products of decode-step size with the model's largest weight (best of
        ``THREAD_PROBE_REPEATS``) with each; a forward pass would cost seconds
        on a busy machine at the wrong count. On a machine shared with other
        jobs, OpenMP threads that wait for a descheduled peer make a decode
        step several times slower at 2 threads than at 1; on an idle machine
        all cores win. A probe this short is noisy, so all cores stay unless
        one thread is faster by ``THREAD_PROBE_MARGIN``: a contended machine
        clears it by far, timing noise does not. Runs before the prompt head
        is encoded, so that this is already done at the chosen count."""
        import torch

        cores = os.cpu_count() or 1
        if cores == 1:
            return self._set_threads(1)
        weight = max((p for p in self.model.parameters() if p.dim() == 2 and p.shape[0] < 8192),
                     key=lambda p: p.numel())
        x = torch.ones(16, weight.shape[1], dtype=weight.dtype)
        timings = {}
        with torch.inference_mode():
            for n in (1, cores):
                torch.set_num_threads(n)
                best = float("inf")
                for _ in range(THREAD_PROBE_REPEATS):
                    t = time.perf_counter()
                    for _ in range(24):
                        x @ weight.T
                    best = min(best, time.perf_counter() - t)
                timings[n] = best
        chosen = choose_thread_count(timings, cores)
        log.info("local rewriter: forward probe %s s by thread count; using %d", {k: round(v, 3) for k, v in timings.items()}, chosen)
        return self._set_threads(chosen)

    # ------------------------------------------------------------------ prompts

    def _shared_prefix_ids(self) -> list[int]:
        """Token ids every prompt starts with: the common head of two prompts
        for unrelated sentences, less one token so that no sentence can merge
        with it into a different token."""
        a = self._encode(self._prompt("Alpha beta gamma."))
        b = self._encode(self._prompt("Zygotes quickly vex 42 jumping frogs!"))
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        return a[: max(n - 1, 0)]

    def _encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def _prompt(self, sentence: str) -> str:
        return self.tokenizer.apply_chat_template(
            build_messages(sentence, self.examples), tokenize=False, add_generation_prompt=True
        )

    # ------------------------------------------------------------------ constraint

    def word_budget(self, sentence: str) -> int:
        """Most words a constrained query may have: a share of the sentence's words."""
        n = len(sentence.split())
        return max(1, math.floor(self.config.constraint_max_word_fraction * n))

    def sentence_token_ids(self, sentence: str) -> tuple[set[int], set[int]]:
        """(first, later): the token ids a constrained query for ``sentence``
        may start with, and those it may use after its first token.

        Sources: the sentence itself, and each word alone (also stripped of
        edge punctuation) as is, lower-cased and capitalised, each with and
        without a leading space. A word's first piece without a leading space
        is only in ``first``: after the first token a new word begins with a
        space. Commas and the stop tokens are in ``later``."""
        words = [w for w in _WORD_SPLIT.split(sentence.strip()) if w]
        forms = set()
        for w in words:
            for v in {w, _EDGE_PUNCT.sub("", w)}:
                if v:
                    forms.update({v, v.lower(), v[:1].upper() + v[1:]})
        bare = sorted(forms)
        enc = self.tokenizer([sentence.strip(), *bare, *(" " + f for f in bare)], add_special_tokens=False)["input_ids"]
        whole, bare_ids, spaced = enc[0], enc[1 : 1 + len(bare)], enc[1 + len(bare) :]
        first = {seq[0] for seq in bare_ids if seq} | {whole[0]}
        later = set(whole[1:]) | {i for seq in spaced for i in seq} | {i for seq in bare_ids for i in seq[1:]}
        return first, later | set(self._comma_ids) | set(self._stop_ids)

    def allowed_token_ids(self, sentence: str) -> set[int]:
        """Every token id a constrained query for ``sentence`` may hold."""
        first, later = self.sentence_token_ids(sentence)
        return first | later

    def _processor(self, sentences: list[str], vocab):
        if self._processor_cls is None:
            return None
        return self._processor_cls(
            [self.sentence_token_ids(s) for s in sentences],
            [self.word_budget(s) for s in sentences],
            vocab,
            self._starts_word,
            self._is_comma,
            self._has_letter,
            self._stop_ids,
        )

    # ------------------------------------------------------------------ generation

    def _layout(self, prompts: list[str]):
        """For generate(): input_ids and attention mask for
        [head][padding][sentence part] (the head at the positions it has in
        the cache) and a copy of the head's cache for every row; without a
        cached head, plain left padding and no cache."""
        import torch

        head = self._prefix_ids
        ids = [self._encode(p) for p in prompts]
        pad = self.tokenizer.pad_token_id
        if self._prefix_cache is not None and all(x[: len(head)] == head for x in ids):
            tails = [x[len(head) :] for x in ids]
            width = max(len(t) for t in tails)
            input_ids = torch.tensor([head + [pad] * (width - len(t)) + t for t in tails])
            mask = torch.tensor([[1] * len(head) + [0] * (width - len(t)) + [1] * len(t) for t in tails])
            cache = copy.deepcopy(self._prefix_cache)
            cache.batch_repeat_interleave(len(prompts))
            return input_ids, mask, cache
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        return input_ids, mask, None

    def _generate_hf(self, prompts, sentences, sampling):
        """``generate()`` (``decode_loop="generate"``): transformers' own loop,
        the reference the compact loop is checked against."""
        import torch
        from transformers import LogitsProcessorList

        input_ids, mask, cache = self._layout(prompts)
        kwargs = {
            "max_new_tokens": self.config.max_new_tokens,
            "do_sample": sampling,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sampling:
            kwargs["temperature"] = self.config.temperature
        else:
            # A model's generation_config may carry sampling defaults; greedy must ignore them.
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.config.stop_at_newline:
            # Every token whose text holds a line break ends its sequence (cheaper than
            # stop_strings, which re-scans the vocabulary on each generate call).
            kwargs["eos_token_id"] = self._stop_ids
        proc = self._processor(sentences, torch.arange(self._starts_word.shape[0]))
        if proc is not None:
            kwargs["logits_processor"] = LogitsProcessorList([proc])
        if cache is not None:
            kwargs["past_key_values"] = cache
        out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        return [row.tolist() for row in out[:, input_ids.shape[1] :]]

    def _static_cache(self, n_rows: int, length: int):
        """A preallocated KV cache for ``n_rows`` rows with the cached head in
        every row. A DynamicCache concatenates on every step, i.e. copies the
        whole cache per token; with a ~360-token head in every row that copy
        cost more than the model's weights per decode step."""
        from transformers import StaticCache

        cache = StaticCache(config=self.model.config, max_cache_len=length)
        for i, layer in enumerate(self._prefix_cache.layers):
            k, v = layer.keys, layer.values
            cache.update(k.expand(n_rows, -1, -1, -1), v.expand(n_rows, -1, -1, -1), i)
        return cache

    @staticmethod
    def _keep_rows(cache, rows) -> None:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[rows], layer.values[rows]
            layer.batch_size = len(rows)

    def _generate_compact(self, prompts, sentences, sampling):
        """Greedy (or sampled) decoding that drops finished rows from the batch."""
        import torch

        head = self._prefix_ids
        ids = [self._encode(p) for p in prompts]
        n, pad = len(prompts), self.tokenizer.pad_token_id
        cached = self._prefix_cache is not None and all(x[: len(head)] == head for x in ids)
        past = len(head) if cached else 0
        tails = [x[past:] for x in ids]
        width = max(len(t) for t in tails)
        total = past + width + self.config.max_new_tokens
        step_ids = torch.tensor([[pad] * (width - len(t)) + t for t in tails])
        # Mask over the whole cache: head, the tails (left padded), then a column per new token.
        mask = torch.zeros(n, total, dtype=torch.long)
        mask[:, :past] = 1
        for r, t in enumerate(tails):
            mask[r, past + width - len(t) : past + width] = 1
        positions = (mask[:, : past + width].cumsum(-1) - 1).clamp(min=0)[:, past:]
        if cached:
            cache = self._static_cache(n, total)
        else:
            from transformers import StaticCache

            cache = StaticCache(config=self.model.config, max_cache_len=total)
        base = self.model.get_decoder()
        head_w = self.model.get_output_embeddings().weight
        if self._processor_cls is not None:
            # Score only the tokens some row may produce: the LM head is ~1/5 of the model's work per token.
            vocab = torch.tensor(sorted(set().union(*(self.allowed_token_ids(s) for s in sentences))))
            w = head_w[vocab]
        else:
            vocab, w = torch.arange(head_w.shape[0]), head_w
        proc = self._processor(sentences, vocab)
        stop = torch.zeros(head_w.shape[0], dtype=torch.bool)
        stop[self._stop_ids if self.config.stop_at_newline else [self.tokenizer.eos_token_id]] = True
        alive = torch.arange(n)  # original row of each batch row
        outputs: list[list[int]] = [[] for _ in range(n)]
        last_pos = positions[:, -1]
        col = past + width  # the cache column the next new token goes to
        for _ in range(self.config.max_new_tokens):
            out = base(
                input_ids=step_ids, attention_mask=mask[:, :total], position_ids=positions,
                past_key_values=cache, use_cache=True,
            )
            scores = out.last_hidden_state[:, -1, :] @ w.T
            if proc is not None:
                scores = proc(step_ids, scores)
            if sampling:
                choice = torch.multinomial(torch.softmax(scores / self.config.temperature, dim=-1), 1).squeeze(1)
            else:
                choice = scores.argmax(-1)
            tokens = vocab[choice]
            done = stop[tokens]
            for r, t in zip(alive.tolist(), tokens.tolist()):
                outputs[r].append(t)
            if bool(done.all()) or col >= total:
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                alive, tokens, last_pos, mask = alive[keep], tokens[keep], last_pos[keep], mask[keep]
                self._keep_rows(cache, keep)
                if proc is not None:
                    proc.keep(keep)
            mask[:, col] = 1
            col += 1
            step_ids = tokens[:, None]
            last_pos = last_pos + 1
            positions = last_pos[:, None]
        return outputs

    def rewrite(self, sentences: list[str], seed: int) -> list[str]:
        import torch

        prompts = [self._prompt(s) for s in sentences]
        lengths = [len(self._encode(p)) for p in prompts]
        # Longest first: the slowest batch runs while memory is fresh, and
        # similar token lengths share a batch (little padding).
        order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
        outputs: list[str] = [""] * len(prompts)
        sampling = self.config.temperature > 0
        compact = self.config.decode_loop == "compact"
        bs = self.config.batch_size
        with torch.inference_mode():
            for b, start in enumerate(range(0, len(order), bs)):
                idx = order[start : start + bs]
                if sampling:
                    torch.manual_seed(seed + b)
                gen = self._generate_compact if compact else self._generate_hf
                new = gen([prompts[i] for i in idx], [sentences[i] for i in idx], sampling)
                for i, text in zip(idx, self.tokenizer.batch_decode(new, skip_special_tokens=True)):
                    outputs[i] = text
                if self.on_progress:
                    self.on_progress(len(idx))
        self.last_errors = [None] * len(sentences)
        return outputs

    def close(self) -> None:
        self.model = None
        self._prefix_cache = None
