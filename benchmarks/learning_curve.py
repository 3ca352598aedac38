"""Learning curves: held-out localisation while GeAR trains, for several settings.

Trains on a dataset's train split and scores unit localisation (R@1, R@3 at
the model's default fusion layer, mean pooling) on its test split every N
optimizer steps, for each variant given; prints one JSON object per variant
and a summary table (R@3 by step, seconds per step, wall time). This is how
the embedded training profile was chosen (README, "What the embedded run
gives").

    python benchmarks/learning_curve.py --dataset data --max-steps 120 --eval-every 20 \\
        --variant base: --variant mult10:new_module_lr_mult=10 \\
        --variant frozen:freeze_doc_encoder=true,new_module_lr_mult=10

A variant is ``name:field=value,field=value`` over ``TrainConfig.embedded()``
(values are JSON, bare words are strings); ``--set`` applies to every variant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_fields(text: str) -> dict:
    fields = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        try:
            fields[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            fields[key.strip()] = value
    return fields


def dataset_folder(path: str) -> Path:
    """A version folder with train/test.parquet, or a build output dir / datasets folder with LATEST."""
    p = Path(path)
    for folder in (p, p / "datasets"):
        if (folder / "train.parquet").is_file():
            return folder
        if (folder / "LATEST").is_file():
            return folder / (folder / "LATEST").read_text().strip()
    raise SystemExit(f"no dataset at {path} (want train.parquet/test.parquet, or datasets/LATEST)")


def run_variant(name: str, fields: dict, data: Path, args) -> dict:
    from gear_model.config import TrainConfig
    from gear_model.train import METRICS_FILE, train
    from tasks.assets import embedded_encoder_path

    with tempfile.TemporaryDirectory(prefix=f"curve-{name}-") as out:
        cfg = TrainConfig.embedded(
            **{
                "dataset": str(data / "train.parquet"),
                "init_checkpoint": str(embedded_encoder_path()),
                "output_dir": out,
                "eval_file": str(data / "test.parquet"),
                "eval_every": args.eval_every,
                "eval_generation_queries": args.generation_queries,
                "max_steps": args.max_steps,
                "epochs": 1000,
                "resume": False,
                "num_threads": args.threads,
                **parse_fields(args.set),
                **fields,
            }
        )
        t0 = time.time()
        train(cfg)
        wall = time.time() - t0
        records = [json.loads(line) for line in (Path(out) / METRICS_FILE).read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    steps = [r for r in records if r["event"] == "step"]
    evals = [r for r in records if r["event"] == "eval"]
    return {
        "variant": name,
        "fields": fields,
        "wall_s": round(wall, 1),
        "train_s": round(sum(r["step_time_s"] for r in steps), 1),
        "s_per_step": round(sum(r["step_time_s"] for r in steps[1:]) / max(1, len(steps) - 1), 2),
        "eval_s": round(sum(r["eval_s"] for r in evals), 1),
        "n_train": start["n_train"],
        "length_fit": start.get("length_fit"),
        "lm_first_last": [round(steps[0]["lm"], 3), round(steps[-1]["lm"], 3)] if steps else None,
        "curve": [
            {
                "step": r["step"],
                "train_s": round(sum(s["step_time_s"] for s in steps if s["step"] <= r["step"]), 1),
                "recall@1": round(r["localization"]["recall@1"], 3),
                "recall@3": round(r["localization"]["recall@3"], 3),
                "random_recall@3": round(r["localization"]["random_recall@3"], 3),
                "rougeL": round(r["generation"]["rougeL"], 1) if r.get("generation") else None,
            }
            for r in evals
        ],
        "n_heldout": evals[0]["n_queries"] if evals else 0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="data", help="dataset version folder, datasets/ folder or build output dir")
    parser.add_argument("--variant", action="append", default=[], help="name:field=value,... (repeatable)")
    parser.add_argument("--set", default="", help="field=value,... applied to every variant")
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--generation-queries", type=int, default=0, help="ROUGE on this many held-out queries per eval")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    data = dataset_folder(args.dataset)
    variants = args.variant or ["embedded:"]
    results = []
    for spec in variants:
        name, _, fields = spec.partition(":")
        result = run_variant(name, parse_fields(fields), data, args)
        print(json.dumps(result), flush=True)
        results.append(result)
    print(f"\nheld-out localisation R@3 (random {results[0]['curve'][0]['random_recall@3'] if results[0]['curve'] else '?'}, "
          f"{results[0]['n_heldout']} queries), by optimizer step")
    steps = sorted({c["step"] for r in results for c in r["curve"]})
    print("| variant | s/step | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|---:|" + "---:|" * len(steps))
    for r in results:
        by_step = {c["step"]: c["recall@3"] for c in r["curve"]}
        cells = " | ".join(f"{by_step[s]:.3f}" if s in by_step else "" for s in steps)
        print(f"| {r['variant']} | {r['s_per_step']} | {cells} |")


if __name__ == "__main__":
    main()
