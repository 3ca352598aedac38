"""Checkpoints: durable atomic writes, keep-last-k, and a resume that falls
back to the previous checkpoint when the latest cannot be read."""

from __future__ import annotations

import logging

import pytest
import torch

from gear_model.checkpoint import (
    UnreadableCheckpointError,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_latest_checkpoint,
    rng_state,
    save_checkpoint,
)


def _state(step: int) -> dict:
    """A real (tiny) training state: a model, AdamW after `step` steps, a schedule, RNG states."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    for _ in range(step):
        loss = model(torch.randn(5, 8)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return {
        "trainer": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "epoch": 0,
        "micro_in_epoch": step,
        "world_size": 1,
        "rng": [rng_state()],
    }


def test_latest_readable_checkpoint_is_loaded(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(_state(step), tmp_path, step, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002.pt", "step_00000003.pt"]
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == ["step_00000002.pt", "step_00000003.pt"]  # no .tmp left
    path, state = load_latest_checkpoint(tmp_path)
    assert path == latest_checkpoint(tmp_path) and state["step"] == 3
    assert torch.equal(state["trainer"]["0.weight"], _state(3)["trainer"]["0.weight"])
    assert load_latest_checkpoint(tmp_path / "nothing-here") is None


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_unreadable_latest_falls_back_to_the_previous_one(tmp_path, caplog, damage):
    save_checkpoint(_state(4), tmp_path, 4, keep_last=3)
    latest = save_checkpoint(_state(6), tmp_path, 6, keep_last=3)
    data = latest.read_bytes()
    latest.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00not a checkpoint" * 64, "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger="gear_model.checkpoint"):
        path, state = load_latest_checkpoint(tmp_path)
    assert path.name == "step_00000004.pt" and state["step"] == 4
    # The optimizer state comes back whole (a resume can continue from it).
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.load_state_dict(state["optimizer"])
    assert optimizer.state_dict()["state"][0]["step"].item() == 4
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "step_00000006.pt" in record.getMessage() and "step_00000004.pt" in record.getMessage()
    assert latest.exists()  # nothing is deleted; the next save of step 6 replaces it


def test_a_checkpoint_without_the_required_keys_is_skipped(tmp_path, caplog):
    save_checkpoint(_state(1), tmp_path, 1, keep_last=3)
    save_checkpoint({"trainer": {}}, tmp_path, 2, keep_last=3)
    with caplog.at_level(logging.WARNING, logger="gear_model.checkpoint"):
        path, state = load_latest_checkpoint(tmp_path, required=("trainer", "optimizer", "step"))
    assert state["step"] == 1 and "lacks optimizer, step" in caplog.text


def test_no_readable_checkpoint_is_an_error_naming_them(tmp_path):
    for step in (1, 2):
        p = save_checkpoint(_state(step), tmp_path, step, keep_last=3)
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(UnreadableCheckpointError, match="step_00000001.pt.*step_00000002.pt|step_00000002.pt.*step_00000001.pt"):
        load_latest_checkpoint(tmp_path)


def test_a_failed_save_leaves_no_file(tmp_path):
    save_checkpoint(_state(1), tmp_path, 1, keep_last=3)
    with pytest.raises(Exception):
        save_checkpoint({"not picklable": lambda: None}, tmp_path, 2, keep_last=3)
    assert [p.name for p in checkpoint_dir(tmp_path).iterdir()] == ["step_00000001.pt"]


def test_after_a_fallback_new_saves_are_not_pruned_for_the_unreadable_one(tmp_path):
    """keep_last=1, step 30 unreadable: the run resumes from step 20 and saves
    step 25, which must be kept (not pruned as older than step 30)."""
    save_checkpoint(_state(2) | {"step": 20}, tmp_path, 20, keep_last=2)
    bad = save_checkpoint(_state(3) | {"step": 30}, tmp_path, 30, keep_last=2)
    bad.write_bytes(bad.read_bytes()[:200])
    assert load_latest_checkpoint(tmp_path)[1]["step"] == 20
    save_checkpoint(_state(2) | {"step": 25}, tmp_path, 25, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000025.pt"]
    assert load_latest_checkpoint(tmp_path)[1]["step"] == 25
