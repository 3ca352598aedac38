"""Evaluation sets: the RIR triples, SQuAD-format JSON and BEIR folders.

Each loader returns an ``EvalSet``: a corpus (doc_id -> text), the test
queries with their relevant documents, and, where the data has them, the
document's sentence spans, the true unit (localisation target) and the
gold text (generation target). Malformed input raises PipelineInputError
naming the file and the record; nothing is dropped without a funnel count.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tasks.common import Funnel, PipelineInputError
from tasks.contracts import resolve_dataset

TRIPLE_COLUMNS = ("query", "doc_id", "document", "unit", "unit_index", "sentence_spans")


@dataclass
class EvalQuery:
    qid: str
    query: str
    relevant: dict[str, int]  # qrels: doc_id -> relevance (> 0)
    doc_id: str | None = None  # the document holding the unit
    unit_index: int | None = None  # true sentence for localisation
    target: str | None = None  # gold text for ROUGE (RIR: the unit)
    answers: list[str] = field(default_factory=list)  # gold answers for EM/F1 (QA)


@dataclass
class EvalSet:
    name: str
    kind: str  # "rir" (ROUGE), "qa" (EM/F1), "beir" (retrieval only)
    source: str
    documents: dict[str, str]
    queries: list[EvalQuery]
    sentence_spans: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    funnel: Funnel = field(default_factory=Funnel)

    @property
    def has_units(self) -> bool:
        return self.kind in ("rir", "qa")

    def qrels(self) -> dict[str, dict[str, int]]:
        return {q.qid: dict(q.relevant) for q in self.queries}

    def unit_queries(self) -> list[EvalQuery]:
        return [q for q in self.queries if q.unit_index is not None and q.doc_id in self.sentence_spans]

    def sizes(self) -> dict[str, int]:
        return {"documents": len(self.documents), "queries": len(self.queries), "unit_queries": len(self.unit_queries())}


def sample(items: list, limit: int | None, seed: int) -> list:
    """A seeded subset of at most ``limit`` items, in their original order."""
    if limit is None or len(items) <= limit:
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


# --------------------------------------------------------------------------
# RIR triples (the write_triples contract).


def _read_triples(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise PipelineInputError(path, "missing triples file")
    try:
        table = pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
        raise PipelineInputError(path, f"unreadable Parquet: {exc}") from exc
    missing = [c for c in TRIPLE_COLUMNS if c not in table.column_names]
    if missing:
        raise PipelineInputError(path, f"missing columns {missing}")
    return table.select(list(TRIPLE_COLUMNS)).to_pylist()


def load_triples(
    path: str | Path, max_queries: int | None = None, seed: int = 0, name: str = "RIR"
) -> EvalSet:
    """Corpus = all documents of train + test (the paper's Appendix B.2),
    queries = the test triples (a seeded sample of ``max_queries``)."""
    folder = resolve_dataset(path)
    funnel = Funnel()
    documents: dict[str, str] = {}
    spans: dict[str, list[tuple[int, int]]] = {}
    test_rows: list[dict[str, Any]] = []
    for split in ("train", "test"):
        file = folder / f"{split}.parquet"
        if split == "train" and not file.exists():
            funnel.add("load_triples", "train_split_absent")
            continue
        rows = _read_triples(file)
        for i, row in enumerate(rows):
            doc_id, text = row["doc_id"], row["document"]
            if doc_id in documents:
                if documents[doc_id] != text:
                    raise PipelineInputError(file, "doc_id reused for a different document text", f"row {i}, doc_id {doc_id}")
                continue
            documents[doc_id] = text
            spans[doc_id] = [(int(s["start"]), int(s["end"])) for s in row["sentence_spans"]]
        if split == "test":
            test_rows = rows
    funnel.add("load_triples", "documents", len(documents))
    funnel.seen("load_triples", len(test_rows))
    rows = sample(test_rows, max_queries, seed)
    if len(rows) < len(test_rows):
        funnel.drop("load_triples", "over_max_test_queries", len(test_rows) - len(rows))
    queries = []
    for i, row in enumerate(rows):
        n_sent = len(spans[row["doc_id"]])
        if not 0 <= row["unit_index"] < n_sent:
            raise PipelineInputError(
                folder / "test.parquet", f"unit_index {row['unit_index']} outside {n_sent} sentences", f"doc_id {row['doc_id']}"
            )
        queries.append(
            EvalQuery(
                qid=f"q{i}",
                query=row["query"],
                relevant={row["doc_id"]: 1},
                doc_id=row["doc_id"],
                unit_index=int(row["unit_index"]),
                target=row["unit"],
            )
        )
    funnel.kept("load_triples", len(queries))
    return EvalSet(name, "rir", str(folder), documents, queries, spans, funnel)


# --------------------------------------------------------------------------
# SQuAD-format JSON.


def _require(obj: Any, key: str, kind: type, path: Path, record: str) -> Any:
    if not isinstance(obj, dict):
        raise PipelineInputError(path, f"expected an object, got {type(obj).__name__}", record)
    if key not in obj:
        raise PipelineInputError(path, f"missing key {key!r}", record)
    value = obj[key]
    if not isinstance(value, kind):
        raise PipelineInputError(path, f"key {key!r} should be {kind.__name__}, got {type(value).__name__}", record)
    return value


_NLP = None


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Sentence character spans (end exclusive, trailing space trimmed) by spaCy's senter."""
    global _NLP
    if _NLP is None:
        import spacy

        from tasks.assets import SPACY_MODEL

        _NLP = spacy.load(SPACY_MODEL, exclude=["parser", "ner", "lemmatizer", "attribute_ruler", "tagger"])
        _NLP.enable_pipe("senter")
    spans = []
    for sent in _NLP(text).sents:
        start, end = sent.start_char, sent.end_char
        while end > start and text[end - 1].isspace():
            end -= 1
        if end > start:
            spans.append((start, end))
    return spans


def load_squad(path: str | Path, max_queries: int | None = None, seed: int = 0, name: str | None = None) -> EvalSet:
    """Contexts are the documents, questions the queries, the sentence holding
    the first answer's start the unit, and all answers the EM/F1 gold."""
    path = Path(path)
    if not path.is_file():
        raise PipelineInputError(path, "SQuAD file does not exist")
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PipelineInputError(path, f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    data = _require(blob, "data", list, path, "top level")
    funnel = Funnel()
    documents: dict[str, str] = {}
    spans: dict[str, list[tuple[int, int]]] = {}
    raw: list[tuple[str, str, str, list[str], int]] = []  # qid, question, doc_id, answers, answer_start
    seen_ids: set[str] = set()
    for a, article in enumerate(data):
        paragraphs = _require(article, "paragraphs", list, path, f"data[{a}]")
        for p, paragraph in enumerate(paragraphs):
            record = f"data[{a}].paragraphs[{p}]"
            context = _require(paragraph, "context", str, path, record)
            qas = _require(paragraph, "qas", list, path, record)
            doc_id = f"d{a}-{p}"
            documents[doc_id] = context
            for j, qa in enumerate(qas):
                rec = f"{record}.qas[{j}]"
                question = _require(qa, "question", str, path, rec)
                qid = str(qa.get("id", f"{a}-{p}-{j}"))
                if qid in seen_ids:  # one id, two questions: their judgements would merge
                    raise PipelineInputError(path, f"duplicate question id {qid!r}", rec)
                seen_ids.add(qid)
                answers = _require(qa, "answers", list, path, rec)
                funnel.seen("load_squad")
                if not answers:  # SQuAD 2.0 unanswerable: no unit to find
                    funnel.drop("load_squad", "unanswerable")
                    continue
                texts = []
                for k, ans in enumerate(answers):
                    texts.append(_require(ans, "text", str, path, f"{rec}.answers[{k}]"))
                start = _require(answers[0], "answer_start", int, path, f"{rec}.answers[0]")
                if context[start : start + len(texts[0])] != texts[0]:
                    raise PipelineInputError(
                        path, f"answer_start {start} does not point at answer {texts[0]!r} in the context", rec
                    )
                raw.append((qid, question, doc_id, texts, start))
    if not raw:
        raise PipelineInputError(path, "no answerable question")
    raw = sample(raw, max_queries, seed)
    queries = []
    for qid, question, doc_id, answers, start in raw:
        if doc_id not in spans:
            spans[doc_id] = split_sentences(documents[doc_id])
        unit = next((i for i, (s, e) in enumerate(spans[doc_id]) if s <= start < e), None)
        if unit is None:  # the answer starts in inter-sentence whitespace
            unit = next((i for i, (s, _) in enumerate(spans[doc_id]) if s > start), len(spans[doc_id]) - 1)
        queries.append(EvalQuery(qid, question, {doc_id: 1}, doc_id, unit, None, answers))
    funnel.kept("load_squad", len(queries))
    funnel.add("load_squad", "documents", len(documents))
    return EvalSet(name or path.stem, "qa", str(path), documents, queries, spans, funnel)


# --------------------------------------------------------------------------
# BEIR folders: corpus.jsonl, queries.jsonl, qrels/test.tsv.


def _read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    if not path.is_file():
        raise PipelineInputError(path, "missing BEIR file")
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PipelineInputError(path, f"invalid JSON: {exc.msg}", f"line {n}") from exc
            for key in keys:
                _require(row, key, str, path, f"line {n}")
            rows.append(row)
    return rows


def load_beir(folder: str | Path, split: str = "test", max_queries: int | None = None, seed: int = 0, name: str | None = None) -> EvalSet:
    """Retrieval only: documents are title + text, queries those in the qrels split."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineInputError(folder, "BEIR folder does not exist")
    corpus_file, queries_file, qrels_file = folder / "corpus.jsonl", folder / "queries.jsonl", folder / "qrels" / f"{split}.tsv"
    documents = {}
    for row in _read_jsonl(corpus_file, ("_id", "text")):
        title = row.get("title") or ""
        documents[row["_id"]] = f"{title}\n{row['text']}" if title else row["text"]
    query_text = {row["_id"]: row["text"] for row in _read_jsonl(queries_file, ("_id", "text"))}
    if not qrels_file.is_file():
        raise PipelineInputError(qrels_file, "missing BEIR qrels file")
    funnel = Funnel()
    qrels: dict[str, dict[str, int]] = {}
    with qrels_file.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        for n, line in enumerate(reader, 1):
            if not line or (n == 1 and line[0] == "query-id"):
                continue
            if len(line) != 3:
                raise PipelineInputError(qrels_file, f"expected 3 tab-separated fields, got {len(line)}", f"line {n}")
            qid, doc_id, score = line
            try:
                rel = int(score)
            except ValueError:
                raise PipelineInputError(qrels_file, f"score {score!r} is not an integer", f"line {n}") from None
            if qid not in query_text:
                raise PipelineInputError(qrels_file, f"query {qid!r} is not in {queries_file.name}", f"line {n}")
            if doc_id not in documents:
                raise PipelineInputError(qrels_file, f"document {doc_id!r} is not in {corpus_file.name}", f"line {n}")
            funnel.seen("load_beir")
            if rel <= 0:
                funnel.drop("load_beir", "non_positive_relevance")
                continue
            qrels.setdefault(qid, {})[doc_id] = rel
    if not qrels:
        raise PipelineInputError(qrels_file, "no positive relevance judgement")
    qids = sample(sorted(qrels), max_queries, seed)
    queries = [EvalQuery(q, query_text[q], qrels[q]) for q in qids]
    funnel.add("load_beir", "queries", len(queries))
    funnel.add("load_beir", "documents", len(documents))
    return EvalSet(name or folder.name, "beir", str(folder), documents, queries, {}, funnel)
