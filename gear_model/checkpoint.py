"""Training checkpoints: atomic and durable, keep-last-k, loadable with
weights_only=True, and a resume that falls back to the previous checkpoint
when the latest cannot be read.

A checkpoint holds the trainer (model, momentum encoders, queues), the
optimizer, the scheduler, the step, the epoch and the data position, the
resolved config and every process's RNG states. The final model directory is
written separately with ``GearModel.save_pretrained``.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})\.pt$")
# What torch.load raises for a truncated or corrupt file (a zip archive that
# ends early or fails its CRC, an unpickling error, a short read).
_UNREADABLE = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, KeyError)


class UnreadableCheckpointError(RuntimeError):
    """No checkpoint in the folder can be read."""


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary files are ignored)."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], output_dir: str | Path, step: int, keep_last: int) -> Path:
    """Write ``step_<step>.pt`` atomically and durably, then keep the newest ``keep_last``.

    The data goes to a temporary file that is fsynced (and its folder entry)
    before the rename; the folder is fsynced again after it, so after a crash
    the checkpoint's name points at complete data (a killed save leaves only a
    .tmp file, which is ignored). Checkpoints of later steps are removed: they
    are the steps this run is re-doing after a resume from an earlier one (the
    latest was unreadable), and a resume must not prefer them.
    """
    folder = checkpoint_dir(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    tmp = folder / f".{path.name}.tmp"
    try:
        with tmp.open("wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(folder)  # the temporary file's entry
        os.replace(tmp, path)
        _fsync_dir(folder)  # the rename
    finally:
        tmp.unlink(missing_ok=True)
    kept = []
    for other in list_checkpoints(output_dir):
        if _step_of(other) > step:
            other.unlink(missing_ok=True)
        else:
            kept.append(other)
    for old in kept[: -max(1, keep_last)]:
        old.unlink(missing_ok=True)
    return path


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=True)


def load_latest_checkpoint(
    output_dir: str | Path,
    map_location: str | torch.device = "cpu",
    required: Iterable[str] = ("step",),
) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that can be read, as (path, state); None when there is none.

    A checkpoint that cannot be read (truncated, corrupt, or without the
    ``required`` keys) is skipped for the one before it, with a warning naming
    both; nothing is deleted (the next save of that step replaces it). If
    every checkpoint is unreadable, UnreadableCheckpointError names them all.
    """
    found = list_checkpoints(output_dir)
    bad: list[tuple[Path, str]] = []
    for path in reversed(found):
        try:
            state = load_checkpoint(path, map_location=map_location)
            if not isinstance(state, dict):
                raise ValueError(f"holds a {type(state).__name__}, not a checkpoint dict")
            missing = [k for k in required if k not in state]
            if missing:
                raise KeyError(f"lacks {', '.join(missing)}")
        except _UNREADABLE as exc:
            bad.append((path, f"{type(exc).__name__}: {exc}".splitlines()[0][:200]))
            continue
        for skipped, reason in bad:
            log.warning("checkpoint %s is unreadable (%s); resuming from the previous one, %s", skipped, reason, path)
        return path, state
    if bad:
        names = "; ".join(f"{p} ({reason})" for p, reason in bad)
        raise UnreadableCheckpointError(f"no readable checkpoint in {checkpoint_dir(output_dir)}: {names}")
    return None


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _as_tuple(x: Any) -> Any:
    # random.setstate wants tuples all the way down.
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
