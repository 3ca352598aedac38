"""Shared helpers (no tests here) for the model and training tests: a tiny random-init BERT
(2 layers, hidden 32) with the embedded bert-base-uncased tokenizer, and small
synthetic triples."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from tasks.assets import embedded_encoder_path


def make_tiny_bert(path: Path, dropout: float = 0.0) -> Path:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    AutoTokenizer.from_pretrained(embedded_encoder_path()).save_pretrained(path)
    return path


def triples(n_docs: int, per_doc: int = 2) -> list[dict]:
    rows = []
    for d in range(n_docs):
        sentences = [f"The castle {d} stands by river {d}.", f"Kings lived there in {1500 + d}.",
                     f"It fell to siege number {d}.", f"Music festival {d} happens every summer."]
        document = " ".join(sentences)
        for k in range(per_doc):
            unit = sentences[(d + k) % len(sentences)]
            rows.append({"query": " ".join(unit.lower().split()[1:4]), "doc_id": f"doc{d}", "document": document,
                         "unit": unit, "title": f"Doc {d}", "split": "train"})
    return rows


def write_triples(path: Path, n_docs: int, per_doc: int = 2) -> Path:
    pq.write_table(pa.Table.from_pylist(triples(n_docs, per_doc)), path)
    return path


def ddp_grad_worker(rank: int, world: int, model_dir: str, port: int, out_file: str) -> None:
    """One process of the DDP gradient check: its share of one global batch, gradients after DDP averaging.

    With world == 1 it runs the whole batch without a process group.
    """
    import gc
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gear_model import GearConfig, GearModel
    from gear_model.data import Collate
    from gear_model.losses import GearPretrainer

    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = GearModel.from_encoder(model_dir, GearConfig(queue_size=16, max_query_length=16, max_doc_length=32,
                                                          max_unit_length=16))
    trainer = GearPretrainer(model).train()
    rows = triples(4, per_doc=2)  # 8 rows, two per document: same-document positives inside each share
    collate = Collate(model.tokenizer, 16, 32, 16)
    full = collate(rows)
    # Pad lengths must not depend on the split: pad every share to the full batch's lengths.
    share = len(rows) // world
    batch = {k: v[rank * share : (rank + 1) * share] for k, v in full.items()}
    wrapped = DDP(trainer, forward_sync_buffers=False) if world > 1 else trainer
    # Two steps, so the second uses a queue filled by the first.
    for step in range(2):
        out = wrapped(batch, alpha=0.4)
        trainer.zero_grad(set_to_none=True)
        out.loss.backward()
        if step == 0:
            with torch.no_grad():
                for p in trainer.parameters():
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-1e-2)  # a plain SGD step, same everywhere
    if rank == 0:
        grads = {n: p.grad.detach().clone() for n, p in trainer.named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "loss": out.loss.detach(), "queue": trainer.doc_queue.clone(),
                    "ids": trainer.id_queue.clone()}, out_file)
    if world > 1:
        # The reducer must go before the process group: freed after it, it destroys the group
        # while holding the GIL that gloo's worker threads need (the test hung at exit).
        del wrapped, out
        gc.collect()
        dist.destroy_process_group()
