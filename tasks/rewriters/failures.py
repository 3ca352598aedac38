"""What the rewrite stage does with items that got no usable answer.

Raw rows carry a ``status``: ``ok`` (an answer, kept or dropped by the gate:
final) or ``failed`` (no usable answer: never final, sent again by the next
run). ``check_failures`` fails the stage when there are too many failed
items, or when failures leave no query at all; its message names the
endpoint (``RewriteConfig.endpoint_label``: no credentials) and the counts
by kind, never an API key or a server's answer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from tasks.rewriters.base import RewriteFailuresError
from tasks.rewriters.config import RewriteConfig

OK = "ok"
FAILED = "failed"
STATUSES = (OK, FAILED)


def count_kinds(kinds: Iterable[str | None]) -> dict[str, int]:
    """Failed items by error kind, most frequent first (ties by name)."""
    counts = Counter(k or "other" for k in kinds)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in counts.items()) or "none"


def check_failures(
    counts: dict[str, int], total: int, kept: int, config: RewriteConfig, model: str, where: str,
    *, not_attempted: int = 0,
) -> None:
    """Raise ``RewriteFailuresError`` when more than ``config.max_error_rate``
    of ``total`` items failed, when failures leave no kept query, or when the
    endpoint was found down (``not_attempted`` items of later shards unsent)."""
    failed = sum(counts.values())
    if not failed and not not_attempted:
        return
    rate = failed / total if total else 1.0
    over = rate > config.max_error_rate
    if not over and kept and not not_attempted:
        return
    if not_attempted:
        why = f"the endpoint stopped answering; {not_attempted} sampled units of later shards were not sent"
    elif over:
        why = f"{rate:.1%} > max_error_rate {config.max_error_rate:.1%}"
    else:
        why = "no rewrite is left to keep"
    message = (
        f"rewrite_queries: {failed} of {total} rewrites failed ({why}) at {config.endpoint_label()} "
        f"[backend {config.backend}, model {model}]; failed by kind: {describe(counts)}. "
        f"The {total - failed} finished rewrites are kept in {where}; a re-run (or the task's retry) "
        f"sends only the failed ones again."
    )
    raise RewriteFailuresError(message, failed=failed, total=total + not_attempted, counts=counts)
