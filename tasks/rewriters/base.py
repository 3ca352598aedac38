"""The one interface every rewriter backend implements."""

from __future__ import annotations

import abc
from collections.abc import Callable

# Why one item got no usable answer (the prefix of its ``last_errors`` entry).
ERROR_KINDS = (
    "http_4xx",  # the server refused this prompt (400, 413, 422, 429 past the retries ...)
    "http_5xx",  # server errors past the retries
    "timeout",  # no answer within timeout_s, past the retries
    "connection",  # could not connect / connection dropped, past the retries
    "non_json",  # 200 but the body is not the JSON the protocol promises
    "no_choices",  # JSON without a first choice
    "empty",  # a choice with empty content / an engine output with no text
    "aborted",  # not sent: the endpoint had been failing for every item just before
)


def item_error(kind: str, detail: str) -> str:
    """A ``last_errors`` entry: ``"<kind>: <detail>"`` (kind from ERROR_KINDS)."""
    if kind not in ERROR_KINDS:
        raise ValueError(f"unknown error kind {kind!r}")
    return f"{kind}: {detail}"


def error_kind(error: str | None) -> str | None:
    """The kind of a ``last_errors`` entry (``"other"`` for a free-form message)."""
    if not error:
        return None
    head = error.split(":", 1)[0].strip()
    return head if head in ERROR_KINDS else "other"


class RewriteBackendError(RuntimeError):
    """The backend could not produce outputs for a shard (after its retries)."""


class RewriteConfigError(RewriteBackendError):
    """Misconfigured (missing model file, rejected API key, unknown URL or model):
    retrying the task cannot help, so the Prefect task does not retry it."""

    retryable = False  # read by the stage runner's retry condition


class BackendUnavailableError(RewriteConfigError):
    """The backend's optional dependency is not installed here."""


class RewriteFailuresError(RewriteBackendError):
    """Too many rewrites got no usable answer (or none at all is left). The
    finished items are kept in the stage's raw/ files; a re-run (the Prefect
    task's retry) sends only the failed ones again. ``counts``: failed items
    by error kind; ``failed``/``total``: items."""

    def __init__(self, message: str, failed: int, total: int, counts: dict[str, int]):
        super().__init__(message)
        self.failed, self.total, self.counts = failed, total, dict(counts)


class Rewriter(abc.ABC):
    """Turns sentences into raw model outputs, one per sentence, in order.

    ``last_errors`` is aligned with the last ``rewrite`` call's outputs: None,
    or why that one item has no usable output, as ``"<kind>: <detail>"``
    (``item_error``; its output is then ""). Such items are *failed*, not
    final: the stage keeps them out of its finished rows, sends them again on
    a re-run and fails when there are more than ``max_error_rate`` of them.

    ``last_finish_reasons`` (optional, aligned too): why generation stopped,
    as the OpenAI protocol and vLLM name it ("stop", "length" = hit
    max_new_tokens ...), or None where the backend cannot tell. A "length"
    output is a final ``truncated`` drop of the gate.
    """

    model_name: str
    last_errors: list[str | None]
    last_finish_reasons: list[str | None] | None = None
    # Set by the stage: called with the number of sentences a backend has just
    # finished inside one ``rewrite`` call (backends that work in batches).
    on_progress: Callable[[int], None] | None = None

    @abc.abstractmethod
    def rewrite(self, sentences: list[str], seed: int) -> list[str]:
        """Raw outputs, ``len(sentences)`` of them, in the same order."""

    def close(self) -> None:
        """Free the model / connections (optional)."""
