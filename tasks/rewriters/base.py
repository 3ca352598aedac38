"""The one interface every rewriter backend implements."""

from __future__ import annotations

import abc
from collections.abc import Callable


class RewriteBackendError(RuntimeError):
    """The backend could not produce outputs for a shard (after its retries)."""


class RewriteConfigError(RewriteBackendError):
    """Misconfigured (missing model file, rejected API key, unknown URL or model):
    retrying the task cannot help, so the Prefect task does not retry it."""


class BackendUnavailableError(RewriteConfigError):
    """The backend's optional dependency is not installed here."""


class Rewriter(abc.ABC):
    """Turns sentences into raw model outputs, one per sentence, in order.

    ``last_errors`` is aligned with the last ``rewrite`` call's outputs: None,
    or why that one item has no output (its output is then ""). The stage
    counts such items as ``backend_error`` instead of failing the shard.
    """

    model_name: str
    last_errors: list[str | None]
    # Set by the stage: called with the number of sentences a backend has just
    # finished inside one ``rewrite`` call (backends that work in batches).
    on_progress: Callable[[int], None] | None = None

    @abc.abstractmethod
    def rewrite(self, sentences: list[str], seed: int) -> list[str]:
        """Raw outputs, ``len(sentences)`` of them, in the same order."""

    def close(self) -> None:
        """Free the model / connections (optional)."""
