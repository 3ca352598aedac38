"""Evaluation sets: the RIR triples, labelled sets made by hand (Parquet or
JSONL rows of query, document and unit), SQuAD-format JSON and BEIR folders.

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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from tasks.common import Funnel, PipelineInputError, is_complete
from tasks.assets import SPACY_MODEL
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
# Labelled sets made by hand: (query, document, unit) rows in Parquet or JSONL.

LABELLED_COLUMNS = ("query", "document", "unit")
LABELLED_SUFFIXES = (".parquet", ".jsonl")
BUILT_SET_NAME = "RIR"  # what build-rir-dataset makes; any other set is named after its file or folder


def _labelled_split_files(folder: Path) -> dict[str, Path]:
    """{split: file} of a hand-made folder: train and test, each .parquet or .jsonl."""
    out = {}
    for split in ("train", "test"):
        for suffix in LABELLED_SUFFIXES:
            if (folder / f"{split}{suffix}").is_file():
                out[split] = folder / f"{split}{suffix}"
                break
    return out


def dataset_source(path: str | Path) -> Path:
    """The file or folder a ``dataset`` parameter names, whose content keys the cached results:
    a labelled file; a hand-made folder (test.parquet or test.jsonl, optional train, no
    completion marker needed); else a built dataset's version folder (``resolve_dataset``:
    the folder, a datasets/ folder or a build output folder)."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in LABELLED_SUFFIXES:
            raise PipelineInputError(path, f"a labelled set is a {' or '.join(LABELLED_SUFFIXES)} file")
        return path
    if path.is_dir() and not is_complete(path):
        files = _labelled_split_files(path)
        if "test" in files:
            return path
        if files:
            raise PipelineInputError(path, "no test.parquet or test.jsonl here (the queries to evaluate)")
    return resolve_dataset(path)


def _read_jsonl_rows(path: Path) -> list[dict[str, Any]]:
    from gear_model.jsonl import JsonlError, read_jsonl_objects

    try:
        return [{**row, "_record": f"line {n}"} for n, row in read_jsonl_objects(path)]
    except JsonlError as exc:
        args = (path, exc.reason) + ((f"line {exc.line}",) if exc.line is not None else ())
        raise PipelineInputError(*args) from exc


def read_labelled_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a labelled Parquet or JSONL file, each with ``query``, ``document`` and
    ``unit`` text (checked here: a missing column or a value that is not text is an error
    naming the file, the column and the row) and ``_record`` (where it is, for messages)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineInputError(path, "labelled set file does not exist")
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
            raise PipelineInputError(path, f"unreadable Parquet: {exc}") from exc
        for column in LABELLED_COLUMNS:
            if column not in table.column_names:
                raise PipelineInputError(path, f"missing column {column!r} (needs {', '.join(LABELLED_COLUMNS)})")
        rows = table.to_pylist()
        for i, row in enumerate(rows):
            row["_record"] = f"row {i}"
    elif path.suffix == ".jsonl":
        rows = _read_jsonl_rows(path)
        for row in rows:
            for column in LABELLED_COLUMNS:
                if column not in row:
                    raise PipelineInputError(path, f"missing column {column!r} (needs {', '.join(LABELLED_COLUMNS)})",
                                             row["_record"])
    else:
        raise PipelineInputError(path, f"a labelled set is a {' or '.join(LABELLED_SUFFIXES)} file")
    for row in rows:
        for column in LABELLED_COLUMNS:
            if not isinstance(row[column], str):
                raise PipelineInputError(path, f"column {column!r} should be text, got {type(row[column]).__name__}",
                                         row["_record"])
        for column in ("query", "document"):
            if not row[column].strip():
                raise PipelineInputError(path, f"empty {column}", row["_record"])
        if row.get("doc_id") is not None and not isinstance(row["doc_id"], (str, int)):
            raise PipelineInputError(path, f"column 'doc_id' should be text, got {type(row['doc_id']).__name__}",
                                     row["_record"])
    return rows


def check_dataset(path: str | Path) -> Path:
    """Fail early, before any model loads, on a dataset that cannot be evaluated: the
    source (``dataset_source``) with, for a labelled set, every row's columns checked."""
    source = dataset_source(path)
    if source.is_file():
        read_labelled_rows(source)
    elif not is_complete(source):
        for file in _labelled_split_files(source).values():
            read_labelled_rows(file)
    return source


def locate_unit(document: str, unit: str, spans: list[tuple[int, int]]) -> int | None:
    """Index of the sentence holding ``unit``: the unit is looked up verbatim, then with any
    run of whitespace matching any other and case ignored (hand-copied text rarely keeps the
    line breaks); the sentence that overlaps the match most wins. None when not found."""
    unit = unit.strip()
    if not unit or not spans:
        return None
    start = document.find(unit)
    if start >= 0:
        end = start + len(unit)
    else:
        match = re.search(r"\s+".join(map(re.escape, unit.split())), document, re.IGNORECASE)
        if match is None:
            return None
        start, end = match.span()
    overlaps = [min(e, end) - max(s, start) for s, e in spans]
    best = max(range(len(spans)), key=overlaps.__getitem__)
    return best if overlaps[best] > 0 else None


def _row_spans(row: dict[str, Any], path: Path) -> list[tuple[int, int]] | None:
    spans = row.get("sentence_spans")
    if spans is None:
        return None
    try:
        return [(int(s["start"]), int(s["end"])) if isinstance(s, dict) else (int(s[0]), int(s[1])) for s in spans]
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise PipelineInputError(path, f"sentence_spans should be (start, end) pairs: {exc}", row["_record"]) from exc


def load_labelled(
    files: dict[str, Path], max_queries: int | None = None, seed: int = 0, name: str | None = None,
    source: str | Path | None = None,
) -> EvalSet:
    """A labelled set: ``files`` is {"test": file} or {"train": file, "test": file}.

    Corpus = every document of the files (so train documents are distractors), queries =
    the test rows (a seeded sample of ``max_queries``). ``doc_id`` is optional (one id per
    distinct document text); ``title`` is ignored. The unit's sentence comes from the row's
    ``sentence_spans`` and ``unit_index`` when it has both, else the document is split by
    ``split_sentences`` and the unit looked up in it (``locate_unit``). A query whose unit is
    not found stays a retrieval query and is counted under ``locate_units``
    (``unit_not_in_document``), not scored for localisation or generation.
    """
    test_file = files["test"]
    funnel = Funnel()
    documents: dict[str, str] = {}
    given_spans: dict[str, list[tuple[int, int]]] = {}
    by_text: dict[str, str] = {}
    test_rows: list[dict[str, Any]] = []
    for split in ("train", "test"):
        if split not in files:
            continue
        path = files[split]
        rows = read_labelled_rows(path)
        for row in rows:
            text = row["document"]
            if row.get("doc_id") is not None:
                doc_id = str(row["doc_id"])
            else:
                doc_id = by_text.setdefault(text, f"d{len(by_text) + 1}")
                while doc_id in documents and documents[doc_id] != text:  # a given id took this name
                    doc_id = by_text[text] = f"{doc_id}+"
            if documents.setdefault(doc_id, text) != text:
                raise PipelineInputError(path, "doc_id reused for a different document text", f"{row['_record']}, doc_id {doc_id}")
            spans = _row_spans(row, path)
            if spans is not None:
                given_spans.setdefault(doc_id, spans)
            row["_doc_id"], row["_spans"] = doc_id, spans
        if split == "test":
            test_rows = rows
    if not test_rows:
        raise PipelineInputError(test_file, "no rows to evaluate")
    funnel.add("load_labelled", "documents", len(documents))
    funnel.seen("load_labelled", len(test_rows))
    rows = sample(test_rows, max_queries, seed)
    if len(rows) < len(test_rows):
        funnel.drop("load_labelled", "over_max_test_queries", len(test_rows) - len(rows))
    funnel.kept("load_labelled", len(rows))
    spans: dict[str, list[tuple[int, int]]] = {}
    queries = []
    funnel.seen("locate_units", len(rows))
    for i, row in enumerate(rows):
        doc_id, text = row["_doc_id"], row["document"]
        if doc_id not in spans:
            spans[doc_id] = given_spans.get(doc_id) or split_sentences(text)
        unit_index = row.get("unit_index")
        if row["_spans"] is not None and isinstance(unit_index, int) and not isinstance(unit_index, bool):
            if not 0 <= unit_index < len(spans[doc_id]):
                raise PipelineInputError(test_file, f"unit_index {unit_index} outside {len(spans[doc_id])} sentences",
                                         row["_record"])
        else:  # an index without the spans it counts in means nothing here
            unit_index = locate_unit(text, row["unit"], spans[doc_id])
        if unit_index is None:
            funnel.drop("locate_units", "empty_unit" if not row["unit"].strip() else "unit_not_in_document")
        else:
            funnel.kept("locate_units")
        queries.append(EvalQuery(f"q{i}", row["query"], {doc_id: 1}, doc_id, unit_index, row["unit"]))
    return EvalSet(name or test_file.stem, "rir", str(source or test_file), documents, queries, spans, funnel)


def load_dataset(path: str | Path, max_queries: int | None = None, seed: int = 0, name: str | None = None) -> EvalSet:
    """The set a ``dataset`` parameter names (``dataset_source``): a built dataset is read by
    ``load_triples`` and called RIR; a labelled file or hand-made folder by ``load_labelled``
    and called after the file (its stem) or the folder. ``name`` overrides either."""
    source = dataset_source(path)
    if source.is_file():
        return load_labelled({"test": source}, max_queries, seed, name or source.stem)
    if is_complete(source):
        return load_triples(source, max_queries, seed, name or BUILT_SET_NAME)
    return load_labelled(_labelled_split_files(source), max_queries, seed, name or source.name, source)


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


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Sentence character spans (end exclusive, trailing space trimmed) by spaCy's senter
    (``gear_model.sentences``, which search uses too)."""
    from gear_model.sentences import split_sentences as senter_spans

    return senter_spans(text, SPACY_MODEL)


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
    rows = _read_jsonl_rows(path)
    for row in rows:
        record = row.pop("_record")
        for key in keys:
            _require(row, key, str, path, record)
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
