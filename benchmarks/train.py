"""Training-step throughput of GeAR: a trimmed sibling of gear_model/train.py.

CPU (always): the embedded MiniLM GeAR at the embedded default lengths
(batch 16, query 32 / doc 128 / unit 48), with the momentum encoders in train
mode (BLIP) and in eval mode without attention dropout (the embedded default),
the latter also in bf16 autocast where the CPU has native bf16 (as the trainer runs).
GPU (when CUDA is available): a bert-base-sized GeAR (random init from
BertConfig(), no download) in bf16 autocast at batch 16 x 512 tokens, with a
model-FLOPs-utilisation estimate.

    python benchmarks/train.py [--steps 5] [--warmup 1] [--gpu-only] [--cpu-only]

Prints one JSON object per configuration, then a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gear_model import GearConfig, GearModel  # noqa: E402
from gear_model.losses import GearPretrainer  # noqa: E402
from gear_model.train import cpu_has_native_bf16, override_dropout  # noqa: E402

# bf16 dense peak (no sparsity) for MFU, by device-name substring.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def synthetic_batch(tokenizer, batch: int, q_len: int, d_len: int, u_len: int, device) -> dict[str, torch.Tensor]:
    """Random word ids at full length (the worst case: no padding)."""
    def ids(length: int) -> torch.Tensor:
        x = torch.randint(1000, 29000, (batch, length))
        x[:, 0], x[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
        return x

    out = {}
    for name, length in (("query", q_len), ("doc", d_len), ("unit", u_len)):
        out[f"{name}_ids"] = ids(length)
        out[f"{name}_mask"] = torch.ones(batch, length, dtype=torch.long)
    out["doc_key"] = torch.arange(batch)
    return {k: v.to(device) for k, v in out.items()}


def model_flops_per_step(model: GearModel, batch: int, q_len: int, d_len: int, u_len: int) -> float:
    """6 x params x tokens for the trained passes + 2 x params x tokens for the momentum forwards,
    plus attention score/value matmuls (the usual Kaplan/PaLM accounting)."""
    cfg = model.query_encoder.config
    h, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    layer_params = 12 * h * h  # attention 4h^2 + FFN 8h^2 (intermediate 4h)
    cross_params = 4 * h * h
    vocab = model.decoder.config.vocab_size

    def encoder(tokens: int, kv_len: int, cross_len: int = 0, cross: bool = False) -> float:
        p = n_layers * (layer_params + (cross_params if cross else 0))
        attn = n_layers * 4 * tokens * h * kv_len + (n_layers * 4 * tokens * h * cross_len if cross else 0)
        return 2 * p * tokens + attn

    fwd_q = encoder(batch * q_len, q_len)
    fwd_d = encoder(batch * d_len, d_len)
    fwd_fusion = encoder(batch * q_len, q_len, d_len, cross=True)
    fwd_dec = encoder(batch * u_len, u_len, q_len, cross=True) + 2 * h * vocab * batch * u_len
    trained = fwd_q + fwd_d + fwd_fusion + fwd_dec
    momentum = fwd_q + fwd_d
    return 3 * trained + momentum


def bench(name: str, model: GearModel, device, batch: int, lengths: tuple[int, int, int], steps: int, warmup: int,
          bf16: bool, momentum_eval_mode: bool, attention_dropout: float | None) -> dict:
    from gear_model.config import TrainConfig

    override_dropout(model, TrainConfig(attention_dropout=attention_dropout))
    trainer = GearPretrainer(model, momentum_eval_mode=momentum_eval_mode).to(device).train()
    optimizer = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=1e-5,
                                  fused=device.type == "cuda")
    data = synthetic_batch(model.tokenizer, batch, *lengths, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            out = trainer(data, alpha=0.4)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    result = {
        "name": name, "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "batch": batch, "query_len": lengths[0], "doc_len": lengths[1], "unit_len": lengths[2],
        "bf16": bf16, "momentum_eval_mode": momentum_eval_mode, "attention_dropout": attention_dropout,
        "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "step_s_median": round(step_s, 4), "samples_per_s": round(batch / step_s, 2), "loss": round(out.loss.item(), 4),
    }
    if device.type == "cuda":
        result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        flops = model_flops_per_step(model, batch, *lengths)
        result["model_tflops_per_step"] = round(flops / 1e12, 2)
        result["achieved_tflops"] = round(flops / step_s / 1e12, 1)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name()), None)
        result["mfu"] = round(flops / step_s / peak, 3) if peak else None
    else:
        # ru_maxrss is the process's peak (KiB on Linux), so CPU runs go in order of size.
        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    del trainer, optimizer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--gpu-only", action="store_true")
    parser.add_argument("--init", default=None, help="BERT checkpoint dir for the CPU runs (default: embedded MiniLM)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    results = []
    if not args.gpu_only:
        from tasks.assets import embedded_encoder_path

        init = args.init or embedded_encoder_path()
        lengths = (32, 128, 48)  # TrainConfig.embedded()
        configs = [("cpu-minilm-blip", False, None, False), ("cpu-minilm-embedded", True, 0.0, False)]
        if cpu_has_native_bf16():  # what the trainer runs here (TrainConfig.bf16)
            configs.append(("cpu-minilm-embedded-bf16", True, 0.0, True))
        for name, eval_mode, attn_drop, bf16 in configs:
            torch.manual_seed(0)
            model = GearModel.from_encoder(init, GearConfig(queue_size=64))
            results.append(bench(name, model, torch.device("cpu"), 16, lengths, args.steps, args.warmup,
                                 bf16=bf16, momentum_eval_mode=eval_mode, attention_dropout=attn_drop))
            print(json.dumps(results[-1]), flush=True)
    if torch.cuda.is_available() and not args.cpu_only:
        from transformers import AutoTokenizer, BertConfig

        from tasks.assets import embedded_encoder_path

        with tempfile.TemporaryDirectory() as tmp:
            # bert-base-uncased's shape (12 x 768, vocab 30522) with random weights: no download.
            torch.manual_seed(0)
            from transformers import BertModel

            BertModel(BertConfig(), add_pooling_layer=False).save_pretrained(tmp)
            AutoTokenizer.from_pretrained(embedded_encoder_path()).save_pretrained(tmp)
            model = GearModel.from_encoder(tmp, GearConfig(queue_size=57_600))
        results.append(bench("gpu-bert-base-bf16", model, torch.device("cuda"), 16, (512, 512, 512), args.steps + 6,
                             3, bf16=True, momentum_eval_mode=False, attention_dropout=None))
        print(json.dumps(results[-1]), flush=True)

    cols = ["name", "device", "step_s_median", "samples_per_s", "peak_rss_gib", "peak_mem_gib", "mfu"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
