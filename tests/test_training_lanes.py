"""Trainings side by side on CPU (tasks.train.cpu_lanes, flows.rir_pipeline.train_in_lanes)."""

from __future__ import annotations

import threading
import time

import pytest

import flows.rir_pipeline as pipeline
from tasks.train import TrainParams, cpu_lanes, run_dir_for


def test_cpu_trainings_share_the_cores_and_a_gpu_or_a_process_group_trains_one_at_a_time(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)), raising=False)
    cpu = TrainParams(device="cpu")
    assert cpu_lanes(cpu, 3) == (2, 1)
    assert cpu_lanes(cpu, 2) == (2, 1)
    assert cpu_lanes(cpu, 1) == (1, 0)
    assert cpu_lanes(cpu.model_copy(update={"num_threads": 8}), 2) == (2, 4)  # the threads asked for, shared out
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
    assert cpu_lanes(cpu, 3) == (1, 0)  # one core: one lane
    assert cpu_lanes(TrainParams(device="cuda"), 3) == (1, 0)
    assert cpu_lanes(TrainParams(device="cpu", nproc_per_node=2), 3) == (1, 0)


def test_threads_are_not_part_of_the_run_key(tmp_path):
    from test_stand_in import dataset

    dataset(tmp_path / "data")
    params = TrainParams(dataset=str(tmp_path / "data"), output_dir=str(tmp_path), init_checkpoint=str(tmp_path))
    assert run_dir_for(params) == run_dir_for(params.model_copy(update={"num_threads": 1}))


@pytest.mark.parametrize("with_loc,with_baseline", [(True, True), (True, False), (False, True), (False, False)])
def test_the_lanes_train_every_run_once_with_its_share_of_the_cores(monkeypatch, with_loc, with_baseline):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(2)), raising=False)
    trained: list[tuple[str, int, str, float, float]] = []

    def train_gear(params: TrainParams) -> str:
        name = "loc" if params.loc_weight else "baseline" if params.lm_weight == 0 else "gear"
        start = time.perf_counter()
        time.sleep(0.2)
        trained.append((name, params.num_threads, threading.current_thread().name, start, time.perf_counter()))
        return f"models/{name}"

    monkeypatch.setattr(pipeline, "train_gear", train_gear)
    gear = TrainParams(device="cpu")
    loc = gear.model_copy(update={"loc_weight": 1.0}) if with_loc else None
    baseline = gear.model_copy(update={"lm_weight": 0.0}) if with_baseline else None
    import torch

    evaluated = []
    threads_before = torch.get_num_threads()
    out = pipeline.train_in_lanes(
        gear, loc, baseline,
        early_evaluation=lambda g, c: evaluated.append(
            (g, c, threading.current_thread().name, time.perf_counter(), torch.get_num_threads())))
    # It computes on its lane's share of the cores; this thread gets its count back.
    assert all(e[4] == 1 for e in evaluated) and torch.get_num_threads() == threads_before
    # The other rows are evaluated early only while the L_loc run trains, after GeAR and the baseline.
    if with_loc and with_baseline:
        assert [e[:2] for e in evaluated] == [("models/gear", "models/baseline")]
    elif with_loc:
        assert [e[:2] for e in evaluated] == [("models/gear", None)]
    else:
        assert evaluated == []
    assert out == ("models/gear", "models/loc" if with_loc else None, "models/baseline" if with_baseline else None)
    by_name = {t[0]: t for t in trained}
    assert len(trained) == len(by_name) == 1 + with_loc + with_baseline
    if not (with_loc or with_baseline):
        assert by_name["gear"][1] == 0  # alone: torch's default threads
        return
    assert {t[1] for t in trained} == {1}
    other = "loc" if with_loc else "baseline"
    # GeAR and the other lane's first run overlap in time, in two threads.
    assert by_name["gear"][2] != by_name[other][2]
    assert by_name["gear"][3] < by_name[other][4] and by_name[other][3] < by_name["gear"][4]
    if with_loc and with_baseline:  # the baseline follows GeAR in its lane, and the early evaluation follows it
        assert by_name["baseline"][2] == by_name["gear"][2] and by_name["baseline"][3] >= by_name["gear"][4]
        assert evaluated[0][2] == by_name["gear"][2] and evaluated[0][3] >= by_name["baseline"][4]
