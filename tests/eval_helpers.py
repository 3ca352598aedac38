"""Tiny evaluation fixtures: an RIR triples dataset, SQuAD JSON, a BEIR
folder and a tiny random-init GeAR model (real tokenizer, 2 layers)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from tasks.common import mark_complete, write_parquet

SPAN = pa.struct([("start", pa.int32()), ("end", pa.int32())])
TRIPLES_SCHEMA = pa.schema(
    [
        ("query", pa.string()), ("doc_id", pa.string()), ("title", pa.string()), ("document", pa.string()),
        ("unit", pa.string()), ("unit_index", pa.int32()), ("unit_start", pa.int32()), ("unit_end", pa.int32()),
        ("sentence_spans", pa.list_(SPAN)), ("score", pa.float32()), ("rewriter_model", pa.string()),
        ("prompt_version", pa.string()), ("dump_name", pa.string()), ("split", pa.string()),
    ]
)

DOCS = {
    "alps": ("Alps", ["The Alps are a mountain range in Europe.", "Mont Blanc is their highest peak at 4808 metres.",
                      "Glaciers cover large parts of the range."]),
    "nile": ("Nile", ["The Nile flows north through Egypt.", "It is about 6650 kilometres long.",
                      "Ancient cities grew along its banks."]),
    "jazz": ("Jazz", ["Jazz began in New Orleans.", "Louis Armstrong played the trumpet.",
                      "Improvisation is central to the style.", "Bebop appeared in the 1940s."]),
    "moon": ("Moon", ["The Moon orbits the Earth.", "Apollo 11 landed there in 1969."]),
    "rust": ("Rust", ["Rust is a systems programming language.", "Its borrow checker prevents data races.",
                      "Cargo builds Rust packages."]),
    "tea": ("Tea", ["Tea is brewed from Camellia sinensis leaves.", "Green tea is not oxidised.",
                    "Black tea is fully oxidised."]),
}
# (doc_id, unit_index, query, split)
QUERIES = [
    ("alps", 1, "highest peak Mont Blanc metres", "test"),
    ("alps", 2, "glaciers mountain range", "test"),
    ("nile", 1, "Nile length kilometres", "test"),
    ("jazz", 3, "bebop 1940s", "test"),
    ("moon", 1, "Apollo 11 landing year", "train"),
    ("rust", 1, "borrow checker data races", "train"),
    ("tea", 1, "green tea oxidation", "train"),
    ("jazz", 0, "jazz origin New Orleans", "test"),
]


def document(doc_id: str) -> tuple[str, list[tuple[int, int]]]:
    text, spans, pos = "", [], 0
    for i, sent in enumerate(DOCS[doc_id][1]):
        if i:
            text += " "
            pos += 1
        spans.append((pos, pos + len(sent)))
        text += sent
        pos += len(sent)
    return text, spans


def write_dataset(root: Path) -> Path:
    """A dataset version folder (train.parquet, test.parquet, completion marker).
    A document belongs to one split only, as write_triples guarantees."""
    version = root / "datasets" / "v1"
    rows = {"train": [], "test": []}
    for doc_id, unit_index, query, split in QUERIES:
        text, spans = document(doc_id)
        start, end = spans[unit_index]
        rows[split].append(
            {
                "query": query, "doc_id": doc_id, "title": DOCS[doc_id][0], "document": text, "unit": text[start:end],
                "unit_index": unit_index, "unit_start": start, "unit_end": end,
                "sentence_spans": [{"start": s, "end": e} for s, e in spans], "score": 0.9,
                "rewriter_model": "test", "prompt_version": "v0", "dump_name": "test", "split": split,
            }
        )
    for split, split_rows in rows.items():
        write_parquet(pa.Table.from_pylist(split_rows, schema=TRIPLES_SCHEMA), version / f"{split}.parquet", TRIPLES_SCHEMA)
    mark_complete(version, {})
    (root / "datasets" / "LATEST").write_text("v1\n")
    return version


def squad_blob() -> dict:
    ctx1 = "The Eiffel Tower is in Paris. It was finished in 1889. Gustave Eiffel's company built it."
    ctx2 = "Python was created by Guido van Rossum. It first appeared in 1991."
    return {
        "version": "1.1",
        "data": [
            {"title": "Eiffel", "paragraphs": [{"context": ctx1, "qas": [
                {"id": "e1", "question": "When was the Eiffel Tower finished?",
                 "answers": [{"text": "1889", "answer_start": ctx1.index("1889")}]},
                {"id": "e2", "question": "Who built the Eiffel Tower?",
                 "answers": [{"text": "Gustave Eiffel's company", "answer_start": ctx1.index("Gustave")},
                             {"text": "Eiffel's company", "answer_start": ctx1.index("Eiffel's")}]},
                {"id": "e3", "question": "How tall is it?", "answers": [], "is_impossible": True},
            ]}]},
            {"title": "Python", "paragraphs": [{"context": ctx2, "qas": [
                {"id": "p1", "question": "Who created Python?",
                 "answers": [{"text": "Guido van Rossum", "answer_start": ctx2.index("Guido")}]},
            ]}]},
        ],
    }


def write_squad(path: Path, blob: dict | None = None) -> Path:
    path.write_text(json.dumps(squad_blob() if blob is None else blob))
    return path


def write_beir(folder: Path, qrels: str | None = None) -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    corpus = [
        {"_id": "d1", "title": "Cats", "text": "Cats are small domesticated carnivores."},
        {"_id": "d2", "title": "Dogs", "text": "Dogs were domesticated from wolves."},
        {"_id": "d3", "title": "", "text": "Parrots can mimic human speech."},
    ]
    queries = [{"_id": "q1", "text": "domesticated wolves"}, {"_id": "q2", "text": "birds that talk"},
               {"_id": "q3", "text": "unjudged query"}]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (folder / "qrels" / "test.tsv").write_text(qrels or "query-id\tcorpus-id\tscore\nq1\td2\t1\nq2\td3\t2\nq2\td1\t0\n")
    return folder


def make_tiny_gear(out_dir: Path, layers: int = 2, lm_weight: float = 1.0) -> Path:
    """A random-init 2-layer GeAR with the real bert-base-uncased vocabulary."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from gear_model.config import GearConfig
    from gear_model.model import GearModel
    from tasks.assets import embedded_encoder_path

    torch.manual_seed(0)
    bert_dir = out_dir.parent / f"{out_dir.name}-bert"
    config = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=128)
    BertModel(config, add_pooling_layer=False).save_pretrained(bert_dir)
    AutoTokenizer.from_pretrained(str(embedded_encoder_path())).save_pretrained(bert_dir)
    gear_config = GearConfig(lm_weight=lm_weight, max_query_length=32, max_doc_length=128, max_unit_length=32,
                             inference_max_doc_length=128)
    return GearModel.from_encoder(bert_dir, gear_config).save_pretrained(out_dir)


@pytest.fixture(scope="session")
def tiny_gear_dir(tmp_path_factory) -> Path:
    """Built once per session even when several test modules import this fixture."""
    out = tmp_path_factory.getbasetemp() / "eval-tiny-gear"
    if not (out / "model.safetensors").is_file():
        make_tiny_gear(out)
    return out
