"""vLLM backend: the in-process ``vllm.LLM`` engine on this worker's GPUs.

All prompts of a shard go to the engine in ONE ``LLM.chat`` call (a list of
conversations), so vLLM's scheduler batches them continuously; sampling is
explicit (``SamplingParams`` with the per-shard seed). Each output's
``finish_reason`` ("stop", "length" ...) goes to ``last_finish_reasons``, so
an output cut at max_tokens is dropped as ``truncated``. vLLM is an optional
extra (``pip install 'gear-rir[vllm]'``, CUDA only) and is imported only here.
"""

from __future__ import annotations

import logging
from typing import Any

from tasks.rewriters.base import BackendUnavailableError, Rewriter, item_error
from tasks.rewriters.config import RewriteConfig
from tasks.rewriters.prompts import build_messages

log = logging.getLogger(__name__)


def engine_kwargs(config: RewriteConfig) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM(...)``."""
    kwargs: dict[str, Any] = {
        "model": config.resolved_model(),
        "tensor_parallel_size": config.tensor_parallel_size,
        "dtype": config.dtype,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "seed": config.seed,
    }
    if config.max_model_len is not None:
        kwargs["max_model_len"] = config.max_model_len
    return kwargs


def sampling_kwargs(config: RewriteConfig, seed: int) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams(...)``; temperature 0 is greedy in vLLM."""
    kwargs: dict[str, Any] = {
        "n": 1,
        "temperature": config.temperature,
        "max_tokens": config.max_new_tokens,
        "seed": seed,
    }
    if config.stop_at_newline:
        kwargs["stop"] = ["\n"]
    return kwargs


def conversations(sentences: list[str], use_worked_examples: bool) -> list[list[dict[str, str]]]:
    return [build_messages(s, use_worked_examples) for s in sentences]


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise BackendUnavailableError(
            "backend 'vllm' needs the vllm package (CUDA only): pip install 'gear-rir[vllm]' on a GPU "
            "worker, or use backend 'openai' against a `vllm serve` endpoint"
        ) from exc
    return vllm


class VllmRewriter(Rewriter):
    def __init__(self, config: RewriteConfig, engine: Any | None = None):
        """``engine``: an already built ``vllm.LLM`` (reuse across shards of one worker)."""
        self.config = config
        self.model_name = config.resolved_model()
        self.use_examples = config.worked_examples_on()
        self.last_errors = []
        self.last_finish_reasons = []
        self._vllm = _import_vllm()
        if engine is None:
            log.info("starting vLLM engine: %s", engine_kwargs(config))
            engine = self._vllm.LLM(**engine_kwargs(config))
        self.engine = engine

    def rewrite(self, sentences: list[str], seed: int) -> list[str]:
        if not sentences:
            self.last_errors, self.last_finish_reasons = [], []
            return []
        params = self._vllm.SamplingParams(**sampling_kwargs(self.config, seed))
        results = self.engine.chat(
            conversations(sentences, self.use_examples), sampling_params=params, use_tqdm=False
        )
        outputs, errors, finishes = read_outputs(results)
        if len(outputs) != len(sentences):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(sentences)} prompts")
        self.last_errors, self.last_finish_reasons = errors, finishes
        return outputs


def read_outputs(results: list[Any]) -> tuple[list[str], list[str | None], list[str | None]]:
    """Texts, per-item errors and finish reasons of ``LLM.chat``'s RequestOutputs
    (``.outputs[0].text`` / ``.finish_reason`` of vLLM's CompletionOutput)."""
    outputs, errors, finishes = [], [], []
    for r in results:
        first = r.outputs[0] if getattr(r, "outputs", None) else None
        text = getattr(first, "text", None) or ""
        finish = getattr(first, "finish_reason", None)
        outputs.append(text)
        finishes.append(finish if isinstance(finish, str) else None)
        errors.append(None if text.strip() else item_error("empty", f"engine returned no text (finish_reason {finish})"))
    return outputs, errors, finishes
