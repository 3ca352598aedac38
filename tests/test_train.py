"""Training: lr schedule, checkpoints and resume, the torchrun launcher and the train-gear flow."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_gear_model_fixtures import make_tiny_bert, write_triples

from flows.profiles import overrides
from gear_model import GearModel, TrainConfig
from gear_model.checkpoint import list_checkpoints, load_checkpoint
from gear_model.train import lr_at, train
from tasks.train import MODELS_DIR, TrainParams, resolve_train_file, run_dir_for, run_training, torchrun_command

DEMO = overrides("demo", "train-gear")  # the demo profile, as `gear train` resolves it


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # Dropout on, so resume must restore the RNG state to match.
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), dropout=0.1)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dataset")
    write_triples(folder / "train.parquet", n_docs=6, per_doc=2)  # 12 triples
    return folder


def tiny_config(tiny_dir, dataset_dir, out, **kw) -> TrainConfig:
    base = dict(dataset=str(dataset_dir), init_checkpoint=str(tiny_dir), output_dir=str(out), epochs=2, batch_size=4,
                lr=1e-3, lr_start=1e-5, lr_end=1e-5, queue_size=8, max_query_length=16, max_doc_length=32,
                max_unit_length=16, save_every=2, keep_last=2, num_threads=1)
    base.update(kw)
    return TrainConfig.from_dict(base)


def read_steps(out) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "step"]


def test_lr_warms_up_then_decays_by_cosine():
    cfg = TrainConfig()  # Table 4: 1e-6 -> 1e-5 over 1000 steps, cosine to 1e-6
    assert lr_at(0, cfg, 100_000) == pytest.approx(1e-6)
    assert lr_at(500, cfg, 100_000) == pytest.approx(5.5e-6)
    assert lr_at(1000, cfg, 100_000) == pytest.approx(1e-5)
    assert lr_at(100_000, cfg, 100_000) == pytest.approx(1e-6)
    mid = 1000 + (100_000 - 1000) // 2
    assert lr_at(mid, cfg, 100_000) == pytest.approx(5.5e-6, rel=1e-3)
    # A short run warms up over at most 10% of its steps.
    assert lr_at(10, cfg, 100) == pytest.approx(1e-5)
    assert all(lr_at(s, cfg, 100) >= lr_at(s + 1, cfg, 100) for s in range(10, 99))
    assert not any(math.isnan(lr_at(s, cfg, 1)) for s in range(2))


def test_epoch_end_checkpoints_come_every_n_th_epoch_and_not_after_the_last(tiny_dir, dataset_dir, tmp_path):
    """save_every_epochs 2 over 5 epochs of 3 steps: checkpoints after epochs 2 and 4 only
    (after the last, the final model is written instead)."""
    out = tmp_path / "run"
    train(tiny_config(tiny_dir, dataset_dir, out, epochs=5, save_every=0, save_every_epochs=2, keep_last=5))
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["reason"]) for r in events if r["event"] == "checkpoint"] == [(6, "epoch_end"), (12, "epoch_end")]
    assert [load_checkpoint(p)["epoch"] for p in list_checkpoints(out)] == [2, 4]
    assert (out / "model").is_dir() and DEMO["save_every_epochs"] == 2 and TrainConfig().save_every_epochs == 1


def test_kill_and_resume_reaches_the_same_loss(tiny_dir, dataset_dir, tmp_path):
    # 12 triples, batch 4: 3 steps per epoch, 6 in all.
    full = tmp_path / "full"
    train(tiny_config(tiny_dir, dataset_dir, full))
    killed = tmp_path / "killed"
    assert train(tiny_config(tiny_dir, dataset_dir, killed, stop_after_steps=4)) == killed / "model"
    assert not (killed / "model").exists()  # stopped runs write no model
    ckpt = load_checkpoint(list_checkpoints(killed)[-1])
    assert (ckpt["step"], ckpt["epoch"], ckpt["micro_in_epoch"]) == (4, 1, 1)
    assert ckpt["trainer"]["id_queue"].shape == (8,) and int(ckpt["trainer"]["queue_ptr"]) == 0
    train(tiny_config(tiny_dir, dataset_dir, killed))  # resumes from step 4

    a, b = read_steps(full), read_steps(killed)
    assert [r["step"] for r in a] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6), (ra, rb)
        assert rb["lr"] == pytest.approx(ra["lr"])
    assert a[-1]["lm"] < a[0]["lm"]  # (itc rises while real features replace the random queue)
    m_full, m_killed = GearModel.from_pretrained(full / "model"), GearModel.from_pretrained(killed / "model")
    for (name, x), y in zip(m_full.state_dict().items(), m_killed.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=name)
    # keep_last=2 after the checkpoints at steps 2, 3 (epoch end), 4, 6.
    assert [p.name for p in list_checkpoints(full)] == ["step_00000004.pt", "step_00000006.pt"]
    assert json.loads((full / "model" / "train_config.json").read_text())["epochs"] == 2


def test_queue_must_divide_by_the_global_batch(tiny_dir, dataset_dir, tmp_path):
    with pytest.raises(ValueError, match="divisible by the global batch 4"):
        train(tiny_config(tiny_dir, dataset_dir, tmp_path / "bad", queue_size=10))


def test_params_resolve_to_a_train_config_and_command(tiny_dir, dataset_dir, tmp_path):
    params = TrainParams(**DEMO | dict(dataset=str(dataset_dir), output_dir=str(tmp_path), init_checkpoint=str(tiny_dir),
                                       epochs=1, nproc_per_node=2))
    assert resolve_train_file(params.dataset, params.output_dir) == dataset_dir / "train.parquet"
    cfg = params.train_config(dataset_dir / "train.parquet", tmp_path / "run")
    assert (cfg.epochs, cfg.batch_size, cfg.max_doc_length, cfg.queue_size) == (1, 8, 512, 64)
    assert (cfg.cross_attention_init, cfg.freeze_doc_encoder, cfg.decoder_lr_mult) == ("identity", True, 30.0)
    assert TrainParams().train_config(dataset_dir, tmp_path).max_doc_length == 512
    run_dir = run_dir_for(params)
    assert run_dir.parent == tmp_path / MODELS_DIR
    assert run_dir_for(params.model_copy(update={"resume": False})) == run_dir  # not part of the key
    assert run_dir_for(params.model_copy(update={"lr": 2e-5})) != run_dir
    cmd = torchrun_command(params, tmp_path / "c.json")
    assert "--nproc_per_node=2" in cmd and "--standalone" in cmd
    assert cmd[-4:] == ["-m", "gear_model.train", "--config", str(tmp_path / "c.json")]
    multi = params.model_copy(update={"nnodes": 2, "node_rank": 1, "rdzv_endpoint": "head:29500"})
    cmd = torchrun_command(multi, tmp_path / "c.json")
    assert {"--nnodes=2", "--node_rank=1", "--rdzv_backend=c10d", "--rdzv_endpoint=head:29500"} <= set(cmd)
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        torchrun_command(multi.model_copy(update={"rdzv_endpoint": ""}), tmp_path / "c.json")
    # One process on one node needs no rendezvous: the trainer runs alone, without torchrun's agent.
    single = torchrun_command(params.model_copy(update={"nproc_per_node": 1}), tmp_path / "c.json")
    assert single[1:] == ["-m", "gear_model.train", "--config", str(tmp_path / "c.json")]


def _tiny_params(tiny_dir, dataset_dir, out, **kw) -> TrainParams:
    base = DEMO | dict(dataset=str(dataset_dir), output_dir=str(out), init_checkpoint=str(tiny_dir), epochs=1, batch_size=2,
                       queue_size=8, max_query_length=16, max_doc_length=32, max_unit_length=16)
    base.update(kw)
    return TrainParams(**base)


@pytest.mark.slow
def test_torchrun_two_gloo_processes_train_and_write_a_model(tiny_dir, dataset_dir, tmp_path):
    params = _tiny_params(tiny_dir, dataset_dir, tmp_path, nproc_per_node=2, device="cpu")
    logs, records = [], []
    model_dir = run_training(params, on_log=logs.append, on_metrics=records.append)
    assert model_dir == run_dir_for(params) / "model"
    steps = [r for r in records if r["event"] == "step"]
    start = next(r for r in records if r["event"] == "start")
    assert start["world_size"] == 2 and start["global_batch"] == 4 and start["total_steps"] == 3
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["samples_per_s"] > 0 for r in steps)
    assert any("step 3/3" in line for line in logs)
    assert (tmp_path / MODELS_DIR / "LATEST").read_text().strip() == f"{model_dir.parent.name}/model"
    model = GearModel.from_pretrained(model_dir)
    assert model.encode_queries(["castle"]).shape == (1, 32)
    # A second run with the same parameters reuses the finished one.
    logs.clear()
    assert run_training(params, on_log=logs.append) == model_dir
    assert logs == [f"reusing finished run {model_dir.parent}"]


@pytest.mark.slow
def test_train_gear_flow_returns_the_model_dir(prefect_harness, tiny_dir, dataset_dir, tmp_path):
    from flows.train_gear import train_gear

    params = _tiny_params(tiny_dir, dataset_dir, tmp_path, max_steps=2, lm_weight=0.0)
    model_dir = train_gear(params)
    assert isinstance(model_dir, str) and model_dir.endswith("/model")
    summary = json.loads((run_dir_for(params) / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_lm"] == 0.0
    assert GearModel.from_pretrained(model_dir).gear_config.lm_weight == 0.0


def test_metrics_tail_waits_for_complete_lines(tmp_path):
    from tasks.train import MetricsTail

    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.read() == []  # no file yet
    path.write_text('{"step": 1}\n{"step"')
    assert tail.read() == [{"step": 1}]
    with path.open("a") as fh:
        fh.write(': 2}\n')
    assert tail.read() == [{"step": 2}]


def test_dataset_reads_triples_and_names_what_is_missing(dataset_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gear_model.data import TriplesDataset

    ds = TriplesDataset(dataset_dir)  # a folder holding train.parquet
    assert len(ds) == 12 and set(ds[0]) == {"query", "document", "unit", "doc_id"}
    pq.write_table(pa.table({"query": ["q"], "document": ["d"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"missing columns \['unit', 'doc_id'\]"):
        TriplesDataset(tmp_path / "bad.parquet")
    with pytest.raises(FileNotFoundError, match="no training triples"):
        TriplesDataset(tmp_path / "nowhere")


def test_train_config_round_trips_and_reads_the_flat_shape(tmp_path):
    from gear_model import GearConfig

    cfg = TrainConfig.embedded(dataset="t.parquet", max_doc_length=256, model={"lm_weight": 0.5})
    assert cfg.model == GearConfig(queue_size=64, max_query_length=32, max_doc_length=256, max_unit_length=48,
                                   lm_weight=0.5)
    cfg.save(tmp_path / "train_config.json")
    assert TrainConfig.load(tmp_path / "train_config.json") == cfg
    assert json.loads((tmp_path / "train_config.json").read_text())["model"]["queue_size"] == 64
    # A train_config.json written before TrainConfig held a GearConfig (model settings at the top level).
    flat = {k: v for k, v in cfg.to_dict().items() if k != "model"} | cfg.model.to_dict()
    assert TrainConfig.from_dict(flat) == cfg
    with pytest.raises(ValueError, match=r"unknown training config keys: \['epoch', 'model.queue'\]"):
        TrainConfig.from_dict({"epoch": 3, "model": {"queue": 1}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_cuda_is_an_error(tiny_dir, dataset_dir, tmp_path):
    import subprocess
    import sys

    from gear_model.train import use_cuda_for

    assert use_cuda_for("auto") is False and use_cuda_for("cpu") is False
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="device is 'cuda' but CUDA is not available"):
        train(tiny_config(tiny_dir, dataset_dir, out, device="cuda"))
    assert not out.exists()  # refused before any folder, process group or model
    # The same from `python -m gear_model.train --config` (flat keys and a --set of a model field).
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"dataset": str(dataset_dir), "init_checkpoint": str(tiny_dir),
                                  "output_dir": str(out), "queue_size": 8}))
    proc = subprocess.run([sys.executable, "-m", "gear_model.train", "--config", str(config), "--set", "device=cuda",
                           "--set", "model.max_doc_length=32"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "device is 'cuda' but CUDA is not available" in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_use_cuda_for_cuda_on_a_gpu():
    from gear_model.train import use_cuda_for

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    assert use_cuda_for("cuda") is True and use_cuda_for("auto") is True and use_cuda_for("cpu") is False


@pytest.mark.slow
def test_bad_triples_fail_at_once_with_the_trainers_reason(tiny_dir, tmp_path):
    """A data error in the trainer: its own exit status and error event, raised as a final input error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gear_model.train import EXIT_DATA, main
    from tasks.stage import is_retryable
    from tasks.train import TrainingDataError

    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"query": ["q"], "document": ["d"], "doc_id": ["1"]}), bad / "train.parquet")  # no unit
    params = _tiny_params(tiny_dir, bad, tmp_path / "out", device="cpu")
    logs: list[str] = []
    with pytest.raises(TrainingDataError, match="missing columns") as failed:
        run_training(params, on_log=logs.append)
    assert not is_retryable(failed.value) and str(bad / "train.parquet") in str(failed.value)
    assert sum(line.startswith("launching:") for line in logs) == 1
    config = tmp_path / "cfg.json"
    tiny_config(tiny_dir, bad, tmp_path / "direct").save(config)
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(config)])
    assert exited.value.code == EXIT_DATA
    events = [json.loads(line) for line in (tmp_path / "direct" / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "error" and events[-1]["kind"] == "data"


def test_bf16_autocast_only_where_the_hardware_multiplies_bf16(monkeypatch):
    import gear_model.train as trainer

    assert trainer.training_precision(True, use_cuda=True) == "bf16"
    assert trainer.training_precision(False, use_cuda=True) == "fp32"
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: False)  # emulated bf16 is slower than fp32
    assert trainer.training_precision(True, use_cuda=False) == "fp32"
    monkeypatch.setattr(trainer, "cpu_has_native_bf16", lambda: True)
    assert trainer.training_precision(True, use_cuda=False) == "bf16"
    assert trainer.training_precision(False, use_cuda=False) == "fp32"


def start_record(out) -> dict:
    records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    return next(r for r in records if r["event"] == "start")


def test_the_start_record_says_which_precision_trained(tiny_dir, dataset_dir, tmp_path):
    from gear_model.train import cpu_has_native_bf16

    out = tmp_path / "fp32"
    train(tiny_config(tiny_dir, dataset_dir, out, bf16=False, epochs=1))
    start = start_record(out)
    assert start["precision"] == "fp32"
    out = tmp_path / "auto"
    train(tiny_config(tiny_dir, dataset_dir, out, epochs=1))
    start = start_record(out)
    assert start["precision"] == ("bf16" if cpu_has_native_bf16() else "fp32")
