"""Can the fusion cross-attention learn to localise from the data this project
builds? A controlled fit, beside the learning curves (docs/LEARNING_CURVE.md).

Starts from the demo's GeAR initialisation (``TrainConfig.embedded()``:
identity query/key projections in the fusion cross-attention), freezes every
parameter except the fusion cross-attention's query and key projections, and
trains them with the localisation loss alone (``losses.localisation_loss``,
averaged over the fusion layers), on either the dataset's own training
triples or on stand-in triples: every rule-passing sentence of every
training document as a unit, queried by its first N content words
(``learning_curve.stand_in_triples``). After each epoch it measures the
trainer's held-out localisation on the dataset's test split (R@3 at every
fusion layer with 95% intervals, and the lift on the unit), so a gain is
read against the same model's step-0 figure.

    python benchmarks/localisation_fit.py --dataset data --epochs 4 --lr 3e-3 --stand-in 5
    python benchmarks/localisation_fit.py --dataset data --epochs 3 --lr 1e-3          # the dataset's own triples

Prints one JSON line per evaluation, then a table of R@3 by layer and epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def evaluate(model, held, epoch: int, step: int, loss: float | None, seconds: float | None) -> dict:
    model.eval()
    result = held.localization(model, "mean", 1000)
    by_layer = result["localization_by_layer"]
    best = result["best_layer"]
    record = {
        "epoch": epoch, "step": step, "train_loss": loss, "epoch_s": seconds, "best_layer": best,
        "recall@3_by_layer": {l: round(v["recall@3"], 4) for l, v in by_layer.items()},
        "recall@3_ci_by_layer": {l: [round(x, 4) for x in v["ci"]["recall@3"]] for l, v in by_layer.items()},
        "lift_by_layer": {l: None if v is None else round(v, 3) for l, v in result["lift_by_layer"].items()},
        "random_recall@3": round(result["localization"]["random_recall@3"], 4),
    }
    print(json.dumps(record), flush=True)
    return record


def main() -> None:
    import torch

    from gear_model.config import TrainConfig
    from gear_model.data import Collate, TriplesDataset
    from gear_model.fusion import eager_attention
    from gear_model.heldout import HeldOut
    from gear_model.losses import localisation_loss
    from gear_model.train import build_model
    from learning_curve import dataset_folder, stand_in_triples
    from tasks.train import _embedded_encoder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="data", help="dataset version folder, datasets/ folder or build output dir")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--temperature", type=float, default=0.1, help="localisation_loss temperature")
    parser.add_argument("--stand-in", type=int, default=0, metavar="N",
                        help="train on every rule-passing sentence of the training documents, queried by its first N content words")
    parser.add_argument("--init", default="identity", help="fusion cross-attention init (identity, random, self_attention)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = dataset_folder(args.dataset)
    cfg = TrainConfig.embedded(init_checkpoint=str(_embedded_encoder()), cross_attention_init=args.init)
    model = build_model(cfg)
    held = HeldOut(data / "test.parquet", cfg.eval_max_queries, cfg.seed)
    with tempfile.TemporaryDirectory() as tmp:
        train_file = data / "train.parquet"
        if args.stand_in:
            train_file = stand_in_triples(train_file, args.stand_in, Path(tmp) / "stand_in.parquet")
        dataset = TriplesDataset(train_file, model.tokenizer, cfg.max_doc_length, cfg.max_unit_length)
        rows = [dataset[i] for i in range(len(dataset))]
    if not dataset.has_sentences:
        raise SystemExit(f"{train_file}: the localisation loss needs sentence_spans and unit_index")
    collate = Collate(model.tokenizer, cfg.max_query_length, cfg.max_doc_length, cfg.max_unit_length)

    model.requires_grad_(False)
    params = []
    for cross in model.fusion.cross:
        for projection in (cross.self.query, cross.self.key):
            projection.requires_grad_(True)
            params += list(projection.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    print(json.dumps({"event": "start", "train_file": str(train_file), "triples": len(rows),
                      "documents": len({r["doc_id"] for r in rows}), "held_out": len(held),
                      "trainable": sum(p.numel() for p in params), **vars(args)}), flush=True)

    records = [evaluate(model, held, 0, 0, None, None)]
    step = 0
    for epoch in range(1, args.epochs + 1):
        random.Random(args.seed + epoch).shuffle(rows)
        model.train()
        model.doc_encoder.eval()
        t0, total, batches = time.time(), 0.0, 0
        for i in range(0, len(rows), args.batch_size):
            batch = collate(rows[i : i + args.batch_size])
            with torch.no_grad():
                doc_states = model.doc_states(batch["doc_ids"], batch["doc_mask"])
            with eager_attention(model.query_encoder.config):
                _, weights = model.fuse(batch["query_ids"], batch["query_mask"], doc_states, batch["doc_mask"], return_layer=0)
            words = model.query_word_mask(batch["query_ids"])
            loss = sum(localisation_loss(w, words, batch["doc_sentence"], batch["unit_sentence"], args.temperature)
                       for w in weights) / len(weights)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, batches, step = total + loss.item(), batches + 1, step + 1
        records.append(evaluate(model, held, epoch, step, total / max(batches, 1), time.time() - t0))

    layers = list(records[0]["recall@3_by_layer"])
    print(f"\nheld-out R@3 by fusion layer ({len(held)} queries; random {records[0]['random_recall@3']:.3f})")
    print("| epoch | step | train loss | " + " | ".join(f"layer {l}" for l in layers) + " | best |")
    print("|---:|---:|---:|" + "---:|" * (len(layers) + 1))
    for r in records:
        loss = "" if r["train_loss"] is None else f"{r['train_loss']:.3f}"
        cells = " | ".join(f"{r['recall@3_by_layer'][l]:.3f}" for l in layers)
        print(f"| {r['epoch']} | {r['step']} | {loss} | {cells} | {r['best_layer']} |")


if __name__ == "__main__":
    main()
