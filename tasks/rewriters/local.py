"""Local backend: a small instruct model on CPU through transformers.

A .gguf file is loaded with ``from_pretrained(folder, gguf_file=name)`` (the
weights are de-quantised to float32), its tokenizer from the same file.
Generation is batched with LEFT padding, so every prompt ends where the new
tokens start; sentences are sorted by length inside a call to waste little
padding, and outputs are put back in the caller's order.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from pathlib import Path

from tasks.rewriters.base import RewriteConfigError, Rewriter
from tasks.rewriters.config import RewriteConfig
from tasks.rewriters.prompts import build_messages

log = logging.getLogger(__name__)


class LocalRewriter(Rewriter):
    def __init__(self, config: RewriteConfig):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config = config
        self.model_name = config.resolved_model()
        self.use_examples = config.worked_examples_on()
        self.last_errors = []
        path = Path(self.model_name)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise RewriteConfigError(f"local rewriter: GGUF file {path} does not exist")
            kwargs = {"gguf_file": path.name}
            source = str(path.parent)
        else:
            kwargs, source = {}, self.model_name
        threads = config.torch_threads or os.cpu_count() or 1
        torch.set_num_threads(threads)
        started = time.perf_counter()
        self.tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        self.model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
        self.model.eval()
        self.load_seconds = time.perf_counter() - started
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        eos = self.tokenizer.eos_token_id
        newline_ids = [i for i in range(len(self.tokenizer)) if "\n" in self.tokenizer.decode([i])]
        self._stop_ids = sorted({eos, *newline_ids} - {None})
        self._prefix_ids: list[int] = []
        self._prefix_cache = None
        if config.prefix_cache:
            self._prefix_ids = self._shared_prefix_ids()
            with torch.inference_mode():
                prefix = torch.tensor([self._prefix_ids])
                self._prefix_cache = self.model(input_ids=prefix, use_cache=True).past_key_values
        log.info("local rewriter %s loaded in %.1f s (%d threads)", path.name, self.load_seconds, threads)

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

    def _generate_with_prefix(self, prompts: list[str], gen_kwargs: dict):
        """Generate for prompts that share the cached head: the batch is laid
        out as [head][padding][sentence part], so the head sits at the same
        positions as in the cache; generate() derives positions from the
        attention mask, which skips the padding. Returns None when a prompt
        does not start with the head (then the caller pads normally)."""
        import torch

        head = self._prefix_ids
        ids = [self._encode(p) for p in prompts]
        if self._prefix_cache is None or any(x[: len(head)] != head for x in ids):
            return None
        tails = [x[len(head) :] for x in ids]
        width = max(len(t) for t in tails)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([head + [pad] * (width - len(t)) + t for t in tails])
        mask = torch.tensor([[1] * len(head) + [0] * (width - len(t)) + [1] * len(t) for t in tails])
        cache = copy.deepcopy(self._prefix_cache)
        cache.batch_repeat_interleave(len(prompts))
        out = self.model.generate(input_ids=input_ids, attention_mask=mask, past_key_values=cache, **gen_kwargs)
        return out[:, input_ids.shape[1] :]

    def _prompt(self, sentence: str) -> str:
        return self.tokenizer.apply_chat_template(
            build_messages(sentence, self.use_examples), tokenize=False, add_generation_prompt=True
        )

    def rewrite(self, sentences: list[str], seed: int) -> list[str]:
        import torch

        prompts = [self._prompt(s) for s in sentences]
        # Longest first: the slowest batch runs while memory is fresh, and
        # similar lengths share a batch (less padding).
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        outputs: list[str] = [""] * len(prompts)
        sampling = self.config.temperature > 0
        gen_kwargs = {
            "max_new_tokens": self.config.max_new_tokens,
            "do_sample": sampling,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sampling:
            gen_kwargs["temperature"] = self.config.temperature
        else:
            # A model's generation_config may carry sampling defaults; greedy must ignore them.
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.config.stop_at_newline:
            # Every token whose text holds a line break ends its sequence (cheaper than
            # stop_strings, which re-scans the vocabulary on each generate call).
            gen_kwargs["eos_token_id"] = self._stop_ids
        bs = self.config.batch_size
        with torch.inference_mode():
            for b, start in enumerate(range(0, len(order), bs)):
                idx = order[start : start + bs]
                if sampling:
                    torch.manual_seed(seed + b)
                new = self._generate_with_prefix([prompts[i] for i in idx], gen_kwargs)
                if new is None:
                    enc = self.tokenizer(
                        [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False
                    )
                    out = self.model.generate(**enc, **gen_kwargs)
                    new = out[:, enc["input_ids"].shape[1] :]
                for i, text in zip(idx, self.tokenizer.batch_decode(new, skip_special_tokens=True)):
                    outputs[i] = text
                if self.on_progress:
                    self.on_progress(len(idx))
        self.last_errors = [None] * len(sentences)
        return outputs

    def close(self) -> None:
        self.model = None
        self._prefix_cache = None
