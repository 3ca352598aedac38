"""Learning curves: held-out localisation while GeAR trains, for several settings.

Trains on a dataset's train split and runs the trainer's held-out
evaluation on its test split every N optimizer steps (localisation at every
fusion layer with intervals, the attention lift on the unit, d_doc, d_pair,
the LM loss, ROUGE), for each variant given; prints one JSON object per
variant and summary tables by step. docs/LEARNING_CURVE.md is made from its
runs (``plot_learning_curve.py`` draws them).

    python benchmarks/learning_curve.py --dataset data --max-steps 120 --eval-every 20 \\
        --variant base: --variant mult10:new_module_lr_mult=10 \\
        --variant frozen:freeze_doc_encoder=true,new_module_lr_mult=10

A variant is ``name:field=value,field=value`` over ``TrainConfig.embedded()``
(values are JSON, bare words are strings); ``--set`` applies to every variant.
``--paper`` starts from the paper's ``TrainConfig()`` instead (random
cross-attention init, every encoder trained, one lr), with the embedded
run's lengths, batch and queue.

``--stand-in N`` trains on many more distinct triples than the dataset has:
every sentence of every training document that passes the unit rules
becomes a unit, with a stand-in query of its first N content words (the
held-out split stays the dataset's own).
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


def stand_in_triples(train_file: Path, words: int, out_file: Path, keep_dataset: bool = False,
                     sampled: bool = False) -> Path:
    """Every rule-passing sentence of the training documents as a unit, queried by its first ``words``
    content words, or ``words`` drawn from the whole sentence (``sampled``); ``keep_dataset``: after the
    dataset's own triples, as ``TrainParams.stand_in_query_words``."""
    from tasks.stand_in import write_training_triples

    write_training_triples(train_file, words, out_file, keep_dataset=keep_dataset, sampled=sampled)
    return out_file


def run_variant(name: str, fields: dict, data: Path, args) -> dict:
    from gear_model.config import TrainConfig
    from gear_model.train import METRICS_FILE, train
    from tasks.assets import embedded_encoder_path

    with tempfile.TemporaryDirectory(prefix=f"curve-{name}-") as out:
        train_file = data / "train.parquet"
        if args.stand_in:
            train_file = stand_in_triples(train_file, args.stand_in, Path(out) / "stand_in.parquet", args.with_dataset,
                                          args.stand_in_sampled)
        make = paper_config if args.paper else TrainConfig.embedded
        cfg = make(
            **{
                "dataset": str(train_file),
                "init_checkpoint": str(embedded_encoder_path()),
                "output_dir": out,
                "eval_file": str(data / "test.parquet"),
                "eval_every": args.eval_every,
                "eval_generation_queries": args.generation_queries,
                "eval_generation_every_eval": True,
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
    return summarise(name, fields, records, wall)


def summarise(name: str, fields: dict, records: list[dict], wall: float | None = None) -> dict:
    """One variant's result line from its metrics.jsonl records (a stopped run's too)."""
    start = next(r for r in records if r["event"] == "start")
    steps = [r for r in records if r["event"] == "step"]
    evals = [r for r in records if r["event"] == "eval"]
    return {
        "variant": name,
        "fields": fields,
        "wall_s": round(wall, 1) if wall is not None else None,
        "train_s": round(sum(r["step_time_s"] for r in steps), 1),
        "s_per_step": round(sum(r["step_time_s"] for r in steps[1:]) / max(1, len(steps) - 1), 2),
        "eval_s": round(sum(r["eval_s"] for r in evals), 1),
        "n_train": start["n_train"],
        "length_fit": start.get("length_fit"),
        "lm_first_last": [round(steps[0]["lm"], 3), round(steps[-1]["lm"], 3)] if steps else None,
        "curve": [curve_point(r, steps) for r in evals],
        "n_heldout": evals[0]["n_queries"] if evals else 0,
    }


def paper_config(**overrides):
    """The paper's training (random cross-attention init, every encoder trained,
    one lr, ITC + LM) with the embedded run's lengths, batch, queue and lr."""
    from gear_model.config import TrainConfig

    embedded = TrainConfig.embedded()
    base = {"batch_size": embedded.batch_size, "lr": embedded.lr, "epochs": embedded.epochs,
            "eval_max_queries": embedded.eval_max_queries, "save_every": 0, "keep_last": 1,
            "model": {k: getattr(embedded.model, k) for k in ("queue_size", "max_query_length", "max_doc_length",
                                                               "max_unit_length")}}
    model = {**base.pop("model"), **(overrides.pop("model", None) or {})}
    return TrainConfig.from_dict({**base, **overrides, "model": model})


def curve_point(record: dict, steps: list[dict]) -> dict:
    """One held-out evaluation: R@k at the default and the best layer (with
    the interval), the lift on the unit there, the LM loss, d_doc and d_pair."""
    loc, best = record["localization"], record.get("best_layer")
    at_best = (record.get("localization_by_layer") or {}).get(str(best), {})
    dep = record.get("document_dependence") or {}
    gen = record.get("generation") or {}
    return {
        "step": record["step"],
        "train_s": round(sum(s["step_time_s"] for s in steps if s["step"] <= record["step"]), 1),
        "recall@1": round(loc["recall@1"], 3),
        "recall@3": round(loc["recall@3"], 3),
        "random_recall@3": round(loc["random_recall@3"], 3),
        "best_layer": best,
        "best_recall@3": round(at_best["recall@3"], 3) if at_best else None,
        "best_recall@3_ci": [round(x, 3) for x in at_best["ci"]["recall@3"]] if at_best.get("ci") else None,
        "lift_best": round(record["lift_by_layer"][str(best)], 2) if best else None,
        "lift_by_layer": {k: round(v, 2) for k, v in (record.get("lift_by_layer") or {}).items() if v is not None},
        "lm": round(dep["lm"], 3) if dep else None,
        "d_doc": round(dep["d_doc"], 3) if dep else None,
        "d_pair": round(dep["d_pair"], 3) if dep else None,
        "rougeL": round(gen["rougeL"], 1) if gen else None,
        "punctuation_only": gen.get("punctuation_only"),
        "examples": [e["generated"] for e in gen.get("examples", [])][:2],
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
    parser.add_argument("--paper", action="store_true", help="start from the paper's TrainConfig(), not the embedded one")
    parser.add_argument("--stand-in", type=int, default=0, metavar="N",
                        help="train on every rule-passing sentence of the training documents, queried by its first N content words")
    parser.add_argument("--stand-in-sampled", action="store_true",
                        help="with --stand-in: draw the N query words from the whole sentence, shuffled")
    parser.add_argument("--with-dataset", action="store_true",
                        help="with --stand-in: train on the dataset's triples followed by the stand-ins (as train-gear does)")
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
    for title, key, fmt in (("R@3 at the default layer", "recall@3", ".3f"), ("R@3 at the best layer", "best_recall@3", ".3f"),
                            ("lift on the unit at the best layer", "lift_best", ".2f"), ("d_doc (nats)", "d_doc", "+.3f"),
                            ("held-out LM loss", "lm", ".2f"), ("ROUGE-L", "rougeL", ".1f")):
        print(f"\n{title}, by optimizer step")
        print("| variant | s/step | " + " | ".join(f"step {s}" for s in steps) + " |")
        print("|---|---:|" + "---:|" * len(steps))
        for r in results:
            by_step = {c["step"]: c.get(key) for c in r["curve"]}
            cells = " | ".join(format(by_step[s], fmt) if by_step.get(s) is not None else "" for s in steps)
            print(f"| {r['variant']} | {r['s_per_step']} | {cells} |")


if __name__ == "__main__":
    main()
