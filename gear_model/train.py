"""Train GeAR. Reads top to bottom: config, distributed set-up, data, model,
optimizer, resume, loop, checkpoints, final model.

    python -m gear_model.train --config cfg.json              # one process
    torchrun --nproc_per_node 8 -m gear_model.train --config cfg.json
    torchrun --nnodes 2 --node_rank 0 --rdzv_endpoint host:29500 ... (multi-node)

The config is a JSON ``TrainConfig`` (``--set key=value`` overrides a field;
``--set model.queue_size=8`` or ``--set queue_size=8`` one of its GearConfig).
Rank 0 writes one JSON object per line to ``<output_dir>/metrics.jsonl``
(``event`` = start | step | checkpoint | done) and the final model to
``<output_dir>/model`` (``GearModel.save_pretrained`` + train_config.json).

A run that fails the same way on every attempt says so: bad triples exit with
``EXIT_DATA`` and bad settings with ``EXIT_CONFIG``, after an ``error`` event
(``kind`` data | config) in metrics.jsonl, which is what the launcher reads
(torchrun reports any failing worker as exit 1).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from gear_model.checkpoint import load_latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from gear_model.config import LOC_LAYERS, GearConfig, TrainConfig, TrainConfigError
from gear_model.data import Collate, ResumableSampler, TrainingDataError, TriplesDataset
from gear_model.doc_states import DocumentStateStore
from gear_model.heldout import HeldOut
from gear_model.losses import GearPretrainer
from gear_model.model import GearModel

METRICS_FILE = "metrics.jsonl"
# Exit statuses of a failure that another attempt would repeat (sysexits.h's EX_DATAERR and EX_CONFIG).
EXIT_DATA = 65
EXIT_CONFIG = 78
MODEL_DIR = "model"


def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warm-up lr_start -> lr, then cosine lr -> lr_end (Table 4).

    The warm-up is ``warmup_steps`` capped at ``warmup_frac`` of the run, so a
    short run is not all warm-up.
    """
    warmup = min(cfg.warmup_steps, max(1, int(cfg.warmup_frac * total_steps)))
    if step < warmup:
        return cfg.lr_start + (cfg.lr - cfg.lr_start) * step / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return cfg.lr_end + 0.5 * (cfg.lr - cfg.lr_end) * (1 + math.cos(math.pi * progress))


def build_model(cfg: TrainConfig) -> GearModel:
    """From a BERT checkpoint directory, or continue from a GeAR model directory."""
    init = Path(cfg.init_checkpoint)
    config_file = init / "config.json"
    if config_file.is_file() and "gear" in json.loads(config_file.read_text()):
        model = GearModel.from_pretrained(init)
        model.gear_config = GearConfig.from_dict({**model.gear_config.to_dict(), **_gear_fields(cfg)})
        return model.train()
    return GearModel.from_encoder(init, cfg.gear_config(), cross_attention_init=cfg.cross_attention_init,
                                  decoder_cross_attention_init=cfg.decoder_cross_attention_init)


def parameter_groups(trainer: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices only (not biases, LayerNorm or
    the temperature), and a multiple of lr for what no checkpoint initialised
    (``GearModel.fresh_parameters``): ``new_module_lr_mult`` for the fusion
    cross-attention, ``decoder_lr_mult`` (default the same) for the decoder's
    new parts (its cross-attention, and its LM-head transform and bias when
    the checkpoint has no MLM head). The decoder's loaded body and the word
    embeddings it ties to its LM head (the ``[DEC]`` row with them) train at
    the base lr like the encoders: a multiplier meant for fresh weights
    would wipe them. Group 0 is the pre-trained weights'."""
    fresh = trainer.model.fresh_parameters
    part_mult = {"pretrained": 1.0, "fusion": cfg.new_module_lr_mult, "decoder": cfg.decoder_lr_multiplier()}
    groups: dict[tuple[str, bool], list] = {}
    for name, p in trainer.named_parameters():
        if not p.requires_grad:
            continue
        own = name.removeprefix("model.")
        part = "pretrained" if own not in fresh else "fusion" if own.startswith("fusion.") else "decoder"
        groups.setdefault((part, p.dim() >= 2), []).append(p)
    order = list(part_mult)
    return [
        {"params": params, "weight_decay": cfg.weight_decay if decays else 0.0, "lr": cfg.lr * part_mult[part], "part": part}
        for (part, decays), params in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1]))
    ]


def _gear_fields(cfg: TrainConfig) -> dict:
    """The run's model settings that replace a continued model's (not its localisation layer or [DEC] token)."""
    return {k: v for k, v in cfg.model.to_dict().items() if k not in ("localize_layer", "dec_token")}


def override_dropout(model: GearModel, cfg: TrainConfig) -> None:
    """Optional dropout overrides (a measured speed option; None keeps the checkpoint's)."""
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Dropout):
            continue
        is_attention = name.endswith("self.dropout")  # dropout on attention probabilities
        if is_attention and cfg.attention_dropout is not None:
            module.p = cfg.attention_dropout
        elif not is_attention and cfg.hidden_dropout is not None:
            module.p = cfg.hidden_dropout


def use_cuda_for(device: str) -> bool:
    """Whether a run on ``device`` (auto | cpu | cuda) uses CUDA; ``cuda`` without CUDA is an error, not CPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise TrainConfigError(f"device must be auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device is 'cuda' but CUDA is not available here (torch "
            f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use device 'auto' or 'cpu'"
        )
    return device != "cpu" and torch.cuda.is_available()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX). Without
    it, oneDNN emulates bf16 and autocast would be slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def training_precision(bf16: bool, use_cuda: bool) -> str:
    """"bf16" (autocast) or "fp32": bf16 when asked for, on CUDA or on a CPU with native bf16."""
    return "bf16" if bf16 and (use_cuda or cpu_has_native_bf16()) else "fp32"


def train(cfg: TrainConfig) -> Path:
    # ---------------------------------------------------------------- set-up
    use_cuda = use_cuda_for(cfg.device)  # before any process group, folder or model
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, world, local_rank = 0, 1, 0
    master = rank == 0
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    precision = training_precision(cfg.bf16, use_cuda)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    )
    out_dir = Path(cfg.output_dir)
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "train_config.json")

    if cfg.model.loc_layers not in LOC_LAYERS:
        raise TrainConfigError(f"loc_layers must be one of {LOC_LAYERS}, not {cfg.model.loc_layers!r}")
    global_batch = cfg.batch_size * world
    if cfg.model.queue_size % global_batch:
        raise TrainConfigError(
            f"queue_size {cfg.model.queue_size} must be divisible by the global batch "
            f"{global_batch} (batch_size {cfg.batch_size} x {world} processes)"
        )

    # ---------------------------------------------------------------- model
    # Same seed on every rank while building, so fresh weights, the momentum
    # copies and the random queue agree; then a per-rank seed for dropout.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    override_dropout(model, cfg)
    trainer = GearPretrainer(
        model, momentum_eval_mode=cfg.momentum_eval_mode, freeze_doc_encoder=cfg.freeze_doc_encoder
    ).to(device).train()
    if cfg.freeze_doc_encoder and cfg.doc_state_store:
        trainer.doc_state_store = DocumentStateStore(cfg.doc_state_store, model.document_encoder_fingerprint())
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)

    # ---------------------------------------------------------------- data
    dataset = TriplesDataset(cfg.dataset, model.tokenizer, cfg.model.max_doc_length, cfg.model.max_unit_length)
    if len(dataset) == 0:
        raise TrainingDataError(f"{cfg.dataset}: no triple fits the training lengths ({dataset.stats})")
    # A contrastive-only run never trains its fusion, so it has no localisation to follow.
    heldout = (
        HeldOut(cfg.eval_file, cfg.eval_max_queries, cfg.seed, 
                state_store=cfg.doc_state_store if cfg.freeze_doc_encoder and cfg.doc_state_store else None)
        if master and cfg.eval_file and (cfg.model.lm_weight > 0 or cfg.model.loc_weight > 0) else None
    )
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, seed=cfg.seed)
    collate = Collate(model.tokenizer, cfg.model.max_query_length, cfg.model.max_doc_length, cfg.model.max_unit_length)
    # drop_last: every step must enqueue a full global batch. Its own generator,
    # so starting an epoch draws nothing from the global RNG (resume stays exact).
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate, drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    micro_per_epoch = len(dataset) // world // cfg.batch_size
    steps_per_epoch = micro_per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise TrainingDataError(
            f"{len(dataset)} triples give no full step of {global_batch * cfg.grad_accum} "
            f"(batch_size x processes x grad_accum)"
        )
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)

    # ---------------------------------------------------------------- optimizer
    groups = parameter_groups(trainer, cfg)
    params = [p for g in groups for p in g["params"]]
    # The fused kernel runs on CPU too, where the per-tensor loop is the
    # default and costs more than the forward pass of a small batch.
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    # One schedule shape for every group, scaled by the group's own peak lr.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg, total_steps) / cfg.lr)

    # ---------------------------------------------------------------- resume
    step, epoch, micro_in_epoch = 0, 0, 0
    # An unreadable latest checkpoint (a kill mid-write on a filesystem
    # without atomic rename) falls back to the one before it, with a warning.
    found = load_latest_checkpoint(
        out_dir, map_location=device,
        required=("trainer", "optimizer", "scheduler", "step", "epoch", "micro_in_epoch", "world_size", "rng"),
    ) if cfg.resume else None
    if found is not None:
        ckpt_path, ckpt = found
        trainer.load_state_dict(ckpt["trainer"])
        model.decoder.tie_weights()
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, epoch, micro_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["micro_in_epoch"]
        if ckpt["world_size"] == world:
            set_rng_state(ckpt["rng"][rank])
        if master:
            print(f"resumed from {ckpt_path} at step {step} (epoch {epoch}, batch {micro_in_epoch})", flush=True)
        del ckpt

    # The queues are identical on every rank by construction (all-gathered
    # before enqueue), so buffers need no per-forward broadcast.
    ddp_trainer = (
        DDP(trainer, device_ids=[local_rank] if use_cuda else None, forward_sync_buffers=False)
        if distributed else trainer
    )

    metrics = (out_dir / METRICS_FILE).open("a") if master else None

    def log(record: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()

    def checkpoint(reason: str) -> None:
        states = [None] * world
        if distributed:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if master:
            state = {
                "trainer": trainer.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "epoch": epoch,
                "micro_in_epoch": micro_in_epoch,
                "world_size": world,
                "rng": states,
                "config": cfg.to_dict(),
            }
            path = save_checkpoint(state, out_dir, step, cfg.keep_last)
            log({"event": "checkpoint", "step": step, "path": str(path), "reason": reason})
        if distributed:
            dist.barrier()

    def evaluate(reason: str, last: bool = False) -> None:
        """Rank 0 scores the held-out split; the others wait."""
        if heldout is not None:
            t0 = time.time()
            generate = cfg.eval_generation_every_eval or reason == "start" or last
            record = {
                "event": "eval", "step": step, "epoch": epoch, "reason": reason, "n_queries": len(heldout),
                "layer": model.resolve_layer(None), "pooling": cfg.eval_pooling,
                **heldout.measure(model, cfg.eval_pooling, cfg.eval_generation_queries if generate else 0,
                                  cfg.model.max_unit_length, dependence_queries=cfg.eval_dependence_queries),
            }
            record["eval_s"] = time.time() - t0
            log(record)
            loc, best, dep = record["localization"], record["best_layer"], record["document_dependence"]
            best_r3 = record["localization_by_layer"][str(best)]["recall@3"]
            gen = record["generation"] or {}
            print(
                f"eval step {step}: localisation R@3 {loc['recall@3']:.3f} at layer {record['layer']}, "
                f"{best_r3:.3f} at best layer {best} (random {loc['random_recall@3']:.3f}); "
                f"lift {record['lift_by_layer'][str(best)]:.2f}; LM {dep['lm']:.2f}, d_doc {dep['d_doc']:+.3f}, "
                f"d_pair {dep['d_pair']:+.3f}"
                + (f"; ROUGE-L {gen['rougeL']:.1f}" if gen else "") + f" on {len(heldout)} held-out queries",
                flush=True,
            )
            trainer.train()
        if distributed:
            dist.barrier()

    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in params)
    log({
        "event": "start", "step": step, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
        "world_size": world, "global_batch": global_batch * cfg.grad_accum, "n_train": len(dataset),
        "parameters": n_params, "trainable_parameters": n_trainable, "device": str(device), "precision": precision,
        "length_fit": dataset.stats,
    })
    if master:
        print(
            f"training {n_params / 1e6:.1f}M parameters ({n_trainable / 1e6:.1f}M trainable) on {len(dataset)} "
            f"triples: {total_steps} steps ({steps_per_epoch}/epoch), global batch {global_batch * cfg.grad_accum}, "
            f"{world} x {device}; lengths: {dataset.stats}",
            flush=True,
        )

    # ---------------------------------------------------------------- loop
    if step == 0:
        evaluate("start")  # the untrained point: what training adds is read against it
    stopped = False
    t_start = time.time()
    steps_this_run = 0
    while epoch < cfg.epochs and step < total_steps and not stopped:
        sampler.set_epoch(epoch)
        sampler.skip = micro_in_epoch * cfg.batch_size
        batches = iter(loader)
        while micro_in_epoch + cfg.grad_accum <= micro_per_epoch and step < total_steps:
            t0 = time.time()
            alpha = cfg.model.alpha * min(1.0, step / max(1.0, cfg.model.alpha_ramp_epochs * steps_per_epoch))
            sums = torch.zeros(4, device=device)
            for micro in range(cfg.grad_accum):
                batch = {k: v.to(device, non_blocking=True) for k, v in next(batches).items()}
                last = micro == cfg.grad_accum - 1
                sync = contextlib.nullcontext() if (last or not distributed) else ddp_trainer.no_sync()
                with sync:
                    with autocast:
                        out = ddp_trainer(batch, alpha)
                    (out.loss / cfg.grad_accum).backward()
                sums += torch.stack([out.loss.detach(), out.itc, out.lm, out.loc]).float() / cfg.grad_accum
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            micro_in_epoch += cfg.grad_accum
            step += 1
            steps_this_run += 1

            if distributed:
                dist.all_reduce(sums)
                sums /= world
            if step % cfg.log_every == 0 or step == total_steps:
                dt = time.time() - t0
                elapsed = time.time() - t_start
                per_step = elapsed / steps_this_run
                loss, itc, lm, loc = sums.tolist()
                record = {
                    "event": "step", "step": step, "epoch": epoch, "loss": loss, "itc": itc, "lm": lm, "loc": loc,
                    "lr": lr, "lr_fusion": lr * cfg.new_module_lr_mult,
                    "lr_decoder": lr * cfg.decoder_lr_multiplier(),
                    "alpha": alpha, "temp": model.temp.item(), "step_time_s": dt,
                    "samples_per_s": global_batch * cfg.grad_accum / dt, "steps_per_s": 1 / dt, "elapsed_s": elapsed,
                    "eta_s": per_step * (total_steps - step), "total_steps": total_steps,
                }
                log(record)
                if master:
                    print(
                        f"step {step}/{total_steps} epoch {epoch} loss {loss:.4f} (itc {itc:.4f} lm {lm:.4f}"
                        + (f" loc {loc:.4f}) " if cfg.model.loc_weight > 0 else ") ") +
                        f"lr {lr:.2e} {record['samples_per_s']:.1f} samples/s eta {record['eta_s']:.0f}s",
                        flush=True,
                    )
            if cfg.stop_after_steps and steps_this_run >= cfg.stop_after_steps:
                checkpoint("stop_after_steps")
                stopped = True
                break
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint("every")
            ends_epoch = micro_in_epoch + cfg.grad_accum > micro_per_epoch  # the epoch-end evaluation follows
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps and not ends_epoch:
                evaluate("every")
        if not stopped:
            epoch += 1
            micro_in_epoch = 0
            last = epoch >= cfg.epochs or step >= total_steps
            if last or epoch % max(1, cfg.eval_every_epochs) == 0:
                evaluate("epoch_end", last=last)
            if not last and epoch % max(1, cfg.save_every_epochs) == 0:  # after the last, the final model
                checkpoint("epoch_end")

    # ---------------------------------------------------------------- final model
    model_dir = out_dir / MODEL_DIR
    if master and not stopped:
        tmp = out_dir / f".{MODEL_DIR}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        cfg.save(tmp / "train_config.json")
        shutil.rmtree(model_dir, ignore_errors=True)
        os.replace(tmp, model_dir)
        log({"event": "done", "step": step, "model_dir": str(model_dir), "elapsed_s": time.time() - t_start})
        print(f"model saved to {model_dir}", flush=True)
    elif master:
        log({"event": "stopped", "step": step, "elapsed_s": time.time() - t_start})
    if metrics is not None:
        metrics.close()
    if distributed:
        # DDP's reducer holds the process group. Freed after destroy_process_group, it would destroy
        # the group while holding the GIL that gloo's worker threads need to finish (a hang at exit).
        del ddp_trainer
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return model_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m gear_model.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="JSON file with TrainConfig fields")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field (JSON value); model settings as model.NAME or NAME")
    args = parser.parse_args(argv)
    fields = json.loads(Path(args.config).read_text())
    for item in args.set:
        key, _, text = item.partition("=")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        if key.startswith("model."):
            fields.setdefault("model", {})[key.removeprefix("model.")] = value
        else:
            fields[key] = value
    cfg = TrainConfig.from_dict(fields)
    try:
        train(cfg)
    except (TrainingDataError, TrainConfigError) as exc:
        kind, status = ("data", EXIT_DATA) if isinstance(exc, TrainingDataError) else ("config", EXIT_CONFIG)
        if int(os.environ.get("RANK", "0")) == 0:
            out_dir = Path(cfg.output_dir)
            out_dir.mkdir(parents=True, exist_ok=True)
            with (out_dir / METRICS_FILE).open("a") as fh:
                fh.write(json.dumps({"event": "error", "kind": kind, "message": str(exc)}) + "\n")
        print(f"{kind} error: {exc}", file=sys.stderr)
        sys.exit(status)


if __name__ == "__main__":
    sys.exit(main())
