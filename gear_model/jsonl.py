"""JSON Lines input: one JSON object per non-blank line, UTF-8.

The search corpus reader and the evaluation loaders read the same format and
word their errors for their own callers, so the reader reports what is wrong
(``JsonlError``: reason and line) and lets each caller raise its own error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class JsonlError(ValueError):
    """A line that is not a JSON object, or a file that is not UTF-8 (``line`` None)."""

    def __init__(self, reason: str, line: int | None = None):
        super().__init__(reason if line is None else f"line {line}: {reason}")
        self.reason, self.line = reason, line


def read_jsonl_objects(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of ``path``."""
    try:
        with Path(path).open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise JsonlError(f"invalid JSON: {exc.msg}", n) from exc
                if not isinstance(row, dict):
                    raise JsonlError(f"expected a JSON object, got {type(row).__name__}", n)
                yield n, row
    except UnicodeDecodeError as exc:
        raise JsonlError("not UTF-8 text") from exc
