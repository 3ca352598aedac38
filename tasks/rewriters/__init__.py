"""Query rewriters: one interface (``Rewriter``), three backends, the prompts
and the quality gate. ``make_rewriter(config)`` builds the configured backend."""

from __future__ import annotations

from tasks.rewriters.base import (
    BackendUnavailableError,
    RewriteBackendError,
    RewriteConfigError,
    RewriteFailuresError,
    Rewriter,
)
from tasks.rewriters.config import PRODUCTION_MODEL, RewriteConfig
from tasks.rewriters.prompts import PAPER_PROMPT, PROMPT_VERSION, build_messages, prompt_fingerprint


def make_rewriter(config: RewriteConfig) -> Rewriter:
    """The configured backend, with its model loaded (once; reuse it for every batch)."""
    if config.backend == "local":
        from tasks.common import MODEL_LOAD_LOCK
        from tasks.rewriters.local import LocalRewriter

        with MODEL_LOAD_LOCK:  # one model load at a time per process (tasks/common.py)
            return LocalRewriter(config)
    if config.backend == "openai":
        from tasks.rewriters.openai_compat import OpenAIRewriter

        return OpenAIRewriter(config)
    from tasks.rewriters.vllm_engine import VllmRewriter

    return VllmRewriter(config)


__all__ = [
    "BackendUnavailableError",
    "PAPER_PROMPT",
    "PRODUCTION_MODEL",
    "PROMPT_VERSION",
    "RewriteBackendError",
    "RewriteConfig",
    "RewriteConfigError",
    "RewriteFailuresError",
    "Rewriter",
    "build_messages",
    "make_rewriter",
    "prompt_fingerprint",
]
