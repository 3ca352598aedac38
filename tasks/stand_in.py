"""Stand-in training triples (not in the paper): every sentence of a training
document that passes the unit rules becomes a unit, queried by its first N
content words.

The dataset holds a few rewritten units per document (the demo: up to 5 of
the 10-20 sentences that pass the rules). A localisation objective trained on
them alone memorises those units; one that sees every rule-passing sentence
of the same documents learns to find the sentence a query is about
(docs/LEARNING_CURVE.md, section 4). No LLM is involved and no test document
is read: the stand-ins come from the training split's own documents, under
the unit rules the dataset was built with (its card's ``units``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# What the trainer reads of a triple, and what a stand-in has.
COLUMNS = ("query", "document", "unit", "doc_id", "unit_index", "unit_start", "unit_end", "sentence_spans")


def unit_rules(train_file: Path):
    """The ``UnitConfig`` the dataset was built with (its card's ``units``), else the paper's."""
    from tasks.select_units import UnitConfig

    card = train_file.with_name("dataset_card.json")
    try:
        built = json.loads(card.read_text())["lineage"]["params"]["units"]
    except (OSError, ValueError, KeyError, TypeError):
        return UnitConfig()
    return UnitConfig(**{k: v for k, v in built.items() if k in UnitConfig.model_fields})


def content_words(text: str) -> list[str]:
    """The sentence's words in order, lower-cased, without punctuation or spaCy's English stop words."""
    from spacy.lang.en.stop_words import STOP_WORDS

    words = (w.strip(".,;:()[]\"'!?").lower() for w in text.split())
    return [w for w in words if w.isalnum() and w not in STOP_WORDS]


def stand_in_query(words: list[str], query_words: int, sampled: bool, seed: str) -> str:
    """The first ``query_words`` content words in order, or (``sampled``) as many
    drawn from the whole sentence in a shuffled order, seeded by ``seed``: a
    keyword query whose order is not the sentence's, as a rewriter's often is."""
    if not sampled:
        return " ".join(words[:query_words])
    rng = random.Random(seed)
    return " ".join(rng.sample(words, min(query_words, len(words))))


def stand_in_rows(triples: pa.Table, query_words: int, config, sampled: bool = False) -> list[dict[str, Any]]:
    """One stand-in triple per rule-passing sentence (under ``config``, a ``UnitConfig``) of each document of ``triples``."""
    from tasks.select_units import unit_rule_reasons

    documents: dict[str, dict[str, Any]] = {}
    for row in triples.select(["doc_id", "document", "sentence_spans"]).to_pylist():
        documents.setdefault(row["doc_id"], row)
    rows = []
    for doc_id, doc in documents.items():
        spans = [(span["start"], span["end"]) for span in doc["sentence_spans"]]
        texts = [doc["document"][a:b] for a, b in spans]
        for index, reason in enumerate(unit_rule_reasons(texts, config)):
            words = content_words(texts[index])
            if reason is None and words:
                query = stand_in_query(words, query_words, sampled, seed=f"{doc_id}:{index}")
                rows.append({"query": query, "document": doc["document"], "unit": texts[index],
                             "doc_id": doc_id, "unit_index": index, "unit_start": spans[index][0],
                             "unit_end": spans[index][1], "sentence_spans": doc["sentence_spans"]})
    return rows


def write_training_triples(train_file: Path, query_words: int, out_file: Path, keep_dataset: bool = True,
                           sampled: bool = False) -> dict[str, int]:
    """``out_file``: the dataset's triples (``keep_dataset``) followed by the
    stand-ins of its documents, in the trainer's columns; written atomically.
    Returns the counts. A dataset without sentence spans cannot have them."""
    from tasks.common import PipelineInputError, write_parquet

    table = pq.read_table(train_file)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise PipelineInputError(train_file, f"stand-in units need the columns {missing} (rebuild the dataset)")
    table = table.select(list(COLUMNS))
    stand_ins = pa.Table.from_pylist(stand_in_rows(table, query_words, unit_rules(train_file), sampled), schema=table.schema)
    write_parquet(pa.concat_tables([table, stand_ins]) if keep_dataset else stand_ins, out_file)
    return {"dataset_triples": table.num_rows if keep_dataset else 0, "stand_in_triples": stand_ins.num_rows,
            "documents": len(set(table.column("doc_id").to_pylist()))}
