"""Per-record filtering: a rule looks at one record and returns ``None`` to
keep it, or the reason it is dropped; ``Records`` applies a stage's rules and
counts every decision into the stage's funnel, so a stage body says what its
rules are and never writes its own counting.

A record is counted once as seen, once as kept or under the first rule that
drops it: the funnel of a stage always adds up (input = kept + drops).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from tasks.common import Funnel

R = TypeVar("R")
Rule = Callable[[R], "str | None"]  # None: keep; else the drop reason


def drop_reason(record: R, rules: Iterable[Rule[R]]) -> str | None:
    """The first reason one of ``rules`` gives for dropping ``record``; None when all keep it."""
    for rule in rules:
        reason = rule(record)
        if reason is not None:
            return reason
    return None


@dataclass
class Records:
    """One stage's keep/drop decisions, counted in ``funnel`` under ``stage``."""

    funnel: Funnel
    stage: str

    def seen(self, n: int = 1) -> None:
        self.funnel.seen(self.stage, n)

    def kept(self, n: int = 1) -> None:
        self.funnel.kept(self.stage, n)

    def drop(self, reason: str, n: int = 1) -> None:
        self.funnel.drop(self.stage, reason, n)

    def passes(self, record: R, *rules: Rule[R]) -> bool:
        """True when every rule keeps ``record``; else the first reason is counted as a drop."""
        return self.check(drop_reason(record, rules))

    def check(self, reason: str | None) -> bool:
        """Count a rule's verdict: True for keep (None), else the reason is counted as a drop."""
        if reason is None:
            return True
        self.drop(reason)
        return False


__all__ = ["Records", "Rule", "drop_reason"]
