"""Search a corpus with a trained GeAR (paper section 1: search-result
highlighting, fine-grained citation).

Retrieval: the corpus's E_d embeddings in a FAISS inner-product index
(embeddings are L2-normalised, so the score is cosine), the query through
E_q. The top-k documents then go through the fusion encoder together, once:
the query's cross-attention at the model's layer ranks each document's
sentences (``GearModel.localize``'s pooling, "mean" by default: attention
mass per token), and the decoder generates each unit from the same fused
states, the k in one batch. The documents' E_d token states are kept beside
the index (up to ``MAX_STATES_MB``), so a query encodes neither a document
nor a sentence again: the paper's point against chunk-and-re-encode.

One call from a model folder::

    from gear_model.search import GearSearcher

    searcher = GearSearcher.from_model_dir("data/models/<key>/model", "docs.jsonl", cache_dir="data/search_index")
    for hit in searcher.search("some keywords", k=5):
        print(hit.title, hit.score, hit.sentences[0].text, hit.generated)

A corpus is a Parquet or JSONL file with a ``document`` (or ``text``) column
and optional ``doc_id``, ``title`` and ``sentence_spans``, or a folder of
``train``/``test`` files (a dataset version folder: its unique documents).
Documents without spans are split by ``gear_model.sentences`` (spaCy's senter,
the splitter evaluation uses). The index is content-addressed: its folder
name hashes the model folder's files, the corpus's documents and this code,
and it is written to a temporary folder and renamed into place, so a second
search reuses it and a killed build leaves nothing that looks done.

Bad input (an empty, over-long or non-text query; an empty or unreadable
corpus; a folder that is not a GeAR model) raises ``SearchInputError`` with
a one-line reason. No Prefect and nothing from tasks/ is imported here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAX_QUERY_CHARS = 1000
# E_d token states kept for the whole corpus, float32 (a 500-token document at
# hidden size 384 is 0.75 MiB); a larger corpus re-encodes its k hits per query.
MAX_STATES_MB = 2048
STATES_FILE = "doc_states.npy"
STARTS_FILE = "doc_state_starts.npy"
MAX_TOP_K = 100
DEFAULT_POOLING = "mean"
DEFAULT_MAX_NEW_TOKENS = 32
INDEX_FILE = "index.faiss"
DOC_IDS_FILE = "doc_ids.json"
COMPLETE_MARKER = "_SUCCESS.json"
CORPUS_SUFFIXES = (".parquet", ".jsonl")
TEXT_COLUMNS = ("document", "text")
# What the index's vectors depend on besides the model and the corpus: how
# documents are read and encoded.
_CODE_FILES = (Path(__file__), Path(__file__).with_name("model.py"))

Splitter = Callable[[str], list[tuple[int, int]]]


class SearchInputError(ValueError):
    """Input search cannot use; the message is one line naming what and why."""


# --------------------------------------------------------------------------
# Corpus.


@dataclass(frozen=True)
class Document:
    doc_id: str
    title: str
    text: str
    spans: tuple[tuple[int, int], ...] | None = None  # sentence spans, when the corpus has them


@dataclass
class Corpus:
    documents: list[Document]
    source: str

    def __post_init__(self) -> None:
        if not self.documents:
            raise SearchInputError(f"{self.source}: the corpus has no documents")

    def __len__(self) -> int:
        return len(self.documents)

    def fingerprint(self) -> str:
        """sha256 of the documents the index holds (ids, titles and texts, in order)."""
        h = hashlib.sha256()
        for d in self.documents:
            h.update(json.dumps([d.doc_id, d.title, d.text], ensure_ascii=False).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()

    @classmethod
    def load(cls, path: str | os.PathLike) -> Corpus:
        """A corpus file, or a folder of train/test files (their unique documents, train first)."""
        path = Path(path)
        if path.is_dir():
            files = [f for split in ("train", "test") for f in _first_existing(path, split)]
            if not files:
                raise SearchInputError(f"{path}: no train or test .parquet/.jsonl here to take documents from")
        elif path.is_file():
            files = [path]
        else:
            raise SearchInputError(f"{path}: corpus does not exist")
        documents: dict[str, Document] = {}
        by_text: dict[str, str] = {}
        for file in files:
            for record, row in _read_rows(file):
                doc = _document(row, file, record, by_text, len(documents))
                known = documents.setdefault(doc.doc_id, doc)
                if known.text != doc.text:
                    raise SearchInputError(f"{file} ({record}): doc_id {doc.doc_id!r} reused for a different text")
        return cls(list(documents.values()), str(path))


def _first_existing(folder: Path, split: str) -> list[Path]:
    for suffix in CORPUS_SUFFIXES:
        if (folder / f"{split}{suffix}").is_file():
            return [folder / f"{split}{suffix}"]
    return []


def _read_rows(path: Path):
    """(record, row dict) of a Parquet or JSONL file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types
            raise SearchInputError(f"{path}: unreadable Parquet: {' '.join(str(exc).split())}") from exc
        if not any(c in table.column_names for c in TEXT_COLUMNS):
            raise SearchInputError(f"{path}: missing column 'document' (or 'text')")
        for i, row in enumerate(table.to_pylist()):
            yield f"row {i}", row
    elif path.suffix == ".jsonl":
        from gear_model.jsonl import JsonlError, read_jsonl_objects

        try:
            for n, row in read_jsonl_objects(path):
                yield f"line {n}", row
        except JsonlError as exc:
            where = f" (line {exc.line})" if exc.line is not None else ""
            raise SearchInputError(f"{path}{where}: {exc.reason}") from exc
    else:
        raise SearchInputError(f"{path}: a corpus is a .parquet or .jsonl file, or a folder of them")


def _document(row: dict[str, Any], path: Path, record: str, by_text: dict[str, str], n: int) -> Document:
    column = next((c for c in TEXT_COLUMNS if c in row), None)
    if column is None:
        raise SearchInputError(f"{path} ({record}): missing column 'document' (or 'text')")
    text = row[column]
    if not isinstance(text, str):
        raise SearchInputError(f"{path} ({record}): column {column!r} should be text, got {type(text).__name__}")
    if not text.strip():
        raise SearchInputError(f"{path} ({record}): empty document")
    doc_id = row.get("doc_id")
    if doc_id is None:
        doc_id = by_text.setdefault(text, f"d{n + 1}")
    elif not isinstance(doc_id, (str, int)):
        raise SearchInputError(f"{path} ({record}): column 'doc_id' should be text, got {type(doc_id).__name__}")
    title = row.get("title")
    spans = row.get("sentence_spans")
    if spans is not None:
        try:
            spans = tuple((int(s["start"]), int(s["end"])) if isinstance(s, dict) else (int(s[0]), int(s[1])) for s in spans)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise SearchInputError(f"{path} ({record}): sentence_spans should be (start, end) pairs") from exc
    return Document(str(doc_id), title if isinstance(title, str) else "", text, spans or None)


# --------------------------------------------------------------------------
# Model and index.


def load_gear(model_dir: str | os.PathLike, device: str = "cpu"):
    """``GearModel.from_pretrained``, with a one-line ``SearchInputError`` for a folder that is not a GeAR model."""
    from gear_model.model import CONFIG_NAME, WEIGHTS_NAME, GearModel

    model_dir = Path(model_dir)
    config = model_dir / CONFIG_NAME
    if not model_dir.is_dir():
        raise SearchInputError(f"{model_dir}: model folder does not exist")
    if not config.is_file() or not (model_dir / WEIGHTS_NAME).is_file():
        raise SearchInputError(f"{model_dir}: not a GeAR model folder (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        if "gear" not in json.loads(config.read_text(encoding="utf-8")):
            raise SearchInputError(f"{model_dir}: not a GeAR model folder (no 'gear' section in {CONFIG_NAME})")
        return GearModel.from_pretrained(model_dir, device=device)
    except SearchInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a broken folder fails in json, safetensors or transformers
        raise SearchInputError(f"{model_dir}: cannot load the GeAR model: {' '.join(str(exc).split())[:300]}") from exc


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def index_key(model_dir: str | os.PathLike, corpus: Corpus) -> str:
    """Content address of a corpus's index: the model folder's files (weights, config,
    tokenizer) by content, the corpus's documents and the code that encodes them."""
    h = hashlib.sha256()
    for file in sorted(p for p in Path(model_dir).iterdir() if p.is_file()):
        h.update(f"{file.name}\0{_file_digest(file)}\n".encode())
    h.update(corpus.fingerprint().encode())
    for file in _CODE_FILES:
        h.update(_file_digest(file).encode())
    return h.hexdigest()[:24]


def _tokenize_documents(model, texts: Sequence[str], **kw):
    """Documents as ``GearModel.encode_documents`` and ``cross_attention`` tokenize them."""
    return model.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                           max_length=model.gear_config.inference_max_doc_length, **kw)


@dataclass
class DocumentIndex:
    """A FAISS inner-product index of the corpus's E_d embeddings (row i = document i) and,
    when they fit in ``MAX_STATES_MB``, every document's E_d token states: ``states`` rows
    ``starts[i]:starts[i + 1]`` are document i's tokens (memory-mapped when cached)."""

    index: Any
    folder: Path | None = None  # where it is cached; None when built in memory only
    reused: bool = False
    states: np.ndarray | None = None
    starts: np.ndarray | None = None

    def doc_states(self, i: int) -> np.ndarray | None:
        if self.states is None:
            return None
        return np.array(self.states[int(self.starts[i]):int(self.starts[i + 1])], dtype=np.float32)  # off the memory map

    @classmethod
    def build(cls, model, corpus: Corpus, batch_size: int = 32, max_states_mb: float = MAX_STATES_MB) -> DocumentIndex:
        """E_d over the corpus once: the pooled embeddings go into the index (exactly
        ``GearModel.encode_documents``: mean pooling, L2-normalised) and the token states are kept."""
        import faiss
        import torch
        import torch.nn.functional as F

        from gear_model.model import mean_pool

        model.eval()
        texts = [d.text for d in corpus.documents]
        vectors, chunks, kept_bytes = [], [], 0
        with torch.no_grad():
            for b in range(0, len(texts), batch_size):
                batch = _tokenize_documents(model, texts[b:b + batch_size]).to(model.device)
                mask = batch["attention_mask"]
                states = model.doc_states(batch["input_ids"], mask)
                vectors.append(F.normalize(mean_pool(states, mask).float(), dim=-1).cpu().numpy())
                if chunks is not None:
                    for j, n in enumerate(mask.sum(1).tolist()):
                        chunks.append(states[j, :n].float().cpu().numpy())
                        kept_bytes += chunks[-1].nbytes
                    if kept_bytes > max_states_mb * 2**20:
                        chunks = None  # too big to keep: each query re-encodes its hits
        vectors = np.ascontiguousarray(np.concatenate(vectors), dtype=np.float32)
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        if chunks is None:
            return cls(index)
        starts = np.concatenate([[0], np.cumsum([len(c) for c in chunks])]).astype(np.int64)
        return cls(index, states=np.concatenate(chunks), starts=starts)

    @classmethod
    def open(cls, model, model_dir: str | os.PathLike, corpus: Corpus, cache_dir: str | os.PathLike,
             batch_size: int = 32) -> DocumentIndex:
        """The cached index of (model, corpus) under ``cache_dir``, built and published once."""
        folder = Path(cache_dir) / index_key(model_dir, corpus)
        found = cls._load(folder, corpus)
        if found is not None:
            return found
        built = cls.build(model, corpus, batch_size)
        built.folder = cls._publish(built, folder, corpus, model_dir)
        return built

    @classmethod
    def _load(cls, folder: Path, corpus: Corpus) -> DocumentIndex | None:
        import faiss

        if not (folder / COMPLETE_MARKER).is_file():
            return None
        doc_ids = json.loads((folder / DOC_IDS_FILE).read_text(encoding="utf-8"))
        if doc_ids != [d.doc_id for d in corpus.documents]:  # the key covers this; a hand-edited folder does not
            return None
        found = cls(faiss.read_index(str(folder / INDEX_FILE)), folder, reused=True)
        if (folder / STATES_FILE).is_file():
            found.states = np.load(folder / STATES_FILE, mmap_mode="r")
            found.starts = np.load(folder / STARTS_FILE)
        return found

    @staticmethod
    def _publish(built: DocumentIndex, folder: Path, corpus: Corpus, model_dir) -> Path:
        """Write into a hidden temporary folder beside ``folder``, fsync, then rename it into place.
        When another process published the same key first, its folder is kept (same content)."""
        import faiss

        folder.parent.mkdir(parents=True, exist_ok=True)
        work = folder.parent / f".{folder.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        work.mkdir()
        try:
            faiss.write_index(built.index, str(work / INDEX_FILE))
            (work / DOC_IDS_FILE).write_text(json.dumps([d.doc_id for d in corpus.documents]), encoding="utf-8")
            if built.states is not None:
                np.save(work / STATES_FILE, built.states)
                np.save(work / STARTS_FILE, built.starts)
            info = {"model_dir": str(model_dir), "corpus": corpus.source, "documents": len(corpus),
                    "corpus_sha256": corpus.fingerprint(), "token_states": built.states is not None}
            (work / COMPLETE_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
            for file in work.iterdir():
                with file.open("rb") as fh:
                    os.fsync(fh.fileno())
            try:
                os.rename(work, folder)
            except OSError:
                if not (folder / COMPLETE_MARKER).is_file():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return folder


# --------------------------------------------------------------------------
# Search.


@dataclass
class SentenceHit:
    text: str
    start: int
    end: int
    score: float


@dataclass
class SearchHit:
    """One retrieved document: its retrieval score, its sentences ranked best first by
    the fusion cross-attention, the generated unit and the per-token attention weights
    (``tokens``: (start, end, weight) character spans, for a heat-map)."""

    doc_id: str
    title: str
    score: float
    generated: str
    document: str
    sentences: list[SentenceHit]
    tokens: list[tuple[int, int, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The shape of ``gear search --json`` and ``GET /api/search``."""
        return {
            "doc_id": self.doc_id,
            "title": self.title,
            "score": self.score,
            "generated": self.generated,
            "sentences": [{"text": s.text, "start": s.start, "end": s.end, "score": s.score} for s in self.sentences],
        }


def check_query(query: Any) -> str:
    """The query, or SearchInputError when it is not usable text."""
    if not isinstance(query, str):
        raise SearchInputError(f"the query is not text ({type(query).__name__})")
    if not query.strip():
        raise SearchInputError("the query is empty")
    if len(query) > MAX_QUERY_CHARS:
        raise SearchInputError(f"the query is {len(query)} characters long; at most {MAX_QUERY_CHARS}")
    if any(unicodedata.category(c) in ("Cc", "Cs") and c not in "\t\n\r" for c in query):
        raise SearchInputError("the query is not text (it holds control characters)")
    return query.strip()


def check_top_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_TOP_K:
        raise SearchInputError(f"top-k must be a whole number from 1 to {MAX_TOP_K}, got {k!r}")
    return k


class GearSearcher:
    """Top-k documents for a query, each with its sentences ranked and its unit generated."""

    def __init__(self, model, corpus: Corpus, index: DocumentIndex, split: Splitter | None = None,
                 layer: int | None = None, pooling: str = DEFAULT_POOLING,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS):
        if pooling not in ("sum", "mean"):
            raise ValueError(f"pooling must be 'sum' or 'mean', not {pooling!r}")
        self.model, self.corpus, self.index = model, corpus, index
        self.layer = model.resolve_layer(layer)
        self.pooling, self.max_new_tokens = pooling, max_new_tokens
        self._split = split
        self._spans: dict[int, tuple[tuple[int, int], ...]] = {}
        self._lock = threading.Lock()  # one search at a time: the server calls from a thread pool
        self.timings: dict[str, float] = {}  # seconds per step of the last search

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, corpus: Corpus | str | os.PathLike,
                       cache_dir: str | os.PathLike | None = None, split: Splitter | None = None,
                       device: str = "cpu", batch_size: int = 32, **options) -> GearSearcher:
        """Load the model and corpus and open (or build) the index. ``cache_dir``: where the
        content-addressed index folder is kept; None builds it in memory for this searcher.
        ``options``: ``layer``, ``pooling``, ``max_new_tokens``."""
        corpus = corpus if isinstance(corpus, Corpus) else Corpus.load(corpus)
        model = load_gear(model_dir, device)
        if cache_dir is None:
            index = DocumentIndex.build(model, corpus, batch_size)
        else:
            index = DocumentIndex.open(model, model_dir, corpus, cache_dir, batch_size)
        return cls(model, corpus, index, split, **options)

    def sentence_spans(self, i: int) -> tuple[tuple[int, int], ...]:
        """Document i's sentence spans: the corpus's, else split once and kept."""
        if i not in self._spans:
            doc = self.corpus.documents[i]
            if doc.spans is not None:
                self._spans[i] = doc.spans
            else:
                split = self._split
                if split is None:
                    from gear_model.sentences import split_sentences as split
                self._spans[i] = tuple(split(doc.text)) or ((0, len(doc.text)),)
        return self._spans[i]

    def retrieve(self, query: str, k: int) -> list[tuple[int, float]]:
        """(document row, cosine) of the top k."""
        vector = self.model.encode_queries([query])
        scores, rows = self.index.index.search(np.ascontiguousarray(vector, dtype=np.float32), min(k, len(self.corpus)))
        return [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]

    def _doc_states(self, rows: list[int], mask):
        """(k, Ld, H) E_d token states of the documents, padded: the kept ones, or encoded now."""
        import torch

        kept = [self.index.doc_states(i) for i in rows]
        lengths = mask.sum(1).tolist()
        if all(st is not None and len(st) == n for st, n in zip(kept, lengths)):
            out = torch.zeros(len(rows), mask.shape[1], kept[0].shape[1], dtype=torch.float32)
            for j, st in enumerate(kept):
                out[j, :len(st)] = torch.from_numpy(st)
            return out.to(self.model.device)
        return None

    def read(self, query: str, rows: list[int]):
        """One fusion pass over (query, each document): per document its sentences ranked by
        the cross-attention and its tokens' weights, and the fused states (k, Lq, H) with the
        query mask and ids, from which ``generate`` decodes. Same numbers as ``GearModel.localize``."""
        import torch

        from gear_model.fusion import eager_attention
        from gear_model.model import CrossAttention, sentence_scores_from_attention

        model, k = self.model, len(rows)
        docs = [self.corpus.documents[i] for i in rows]
        q = model.tokenizer([query], truncation=True, max_length=model.gear_config.max_query_length,
                            return_tensors="pt").to(model.device)
        d = _tokenize_documents(model, [doc.text for doc in docs], return_offsets_mapping=True).to(model.device)
        with torch.no_grad():
            states = self._doc_states(rows, d["attention_mask"])
            if states is None:
                states = model.doc_states(d["input_ids"], d["attention_mask"])
            q_ids, q_mask = q["input_ids"].expand(k, -1), q["attention_mask"].expand(k, -1)
            with eager_attention(model.query_encoder.config):
                fused, weights = model.fuse(q_ids, q_mask, states, d["attention_mask"], self.layer)
        special = set(model.tokenizer.all_special_ids)
        query_mask = np.array([t not in special for t in q["input_ids"][0].tolist()], dtype=bool)
        weights = weights.float().cpu().numpy()
        offsets = d["offset_mapping"].cpu().numpy().astype(np.int64)
        read = []
        for j, (doc, i) in enumerate(zip(docs, rows)):
            att = CrossAttention(weights[j], offsets[j], query_mask)  # padding: offsets (0, 0), weight 0
            spans = self.sentence_spans(i)
            scores = sentence_scores_from_attention(att, spans, self.pooling)
            order = sorted(range(len(spans)), key=lambda n: (-float(scores[n]), n))
            sentences = [SentenceHit(doc.text[spans[n][0]:spans[n][1]], spans[n][0], spans[n][1], float(scores[n]))
                         for n in order]
            per_query_token = att.weights.mean(0)
            per_token = (per_query_token[query_mask] if query_mask.any() else per_query_token).mean(0)
            tokens = [(int(a), int(b), float(w)) for (a, b), w in zip(att.offsets, per_token) if b > a]
            read.append((sentences, tokens))
        return read, fused, q["attention_mask"], q["input_ids"]

    def generate(self, fused, query_mask, query_ids) -> list[str]:
        """Each hit's unit decoded from its fused states, all k in one batch
        (``GearModel.decode``, as evaluation decodes)."""
        return self.model.decode(fused, query_mask, self.max_new_tokens, q_ids=query_ids)

    def search(self, query: str, k: int = 5, generate: bool = True) -> list[SearchHit]:
        """The top-k documents for ``query``, best first (see ``SearchHit``)."""
        query, k = check_query(query), check_top_k(k)
        with self._lock:
            t0 = time.perf_counter()
            found = self.retrieve(query, k)
            t1 = time.perf_counter()
            read, fused, query_mask, query_ids = self.read(query, [i for i, _ in found])
            t2 = time.perf_counter()
            units = self.generate(fused, query_mask, query_ids) if generate else [""] * len(found)
            self.timings = {"retrieval": t1 - t0, "localization": t2 - t1, "generation": time.perf_counter() - t2}
        hits = []
        for (i, score), (sentences, tokens), unit in zip(found, read, units):
            doc = self.corpus.documents[i]
            hits.append(SearchHit(doc.doc_id, doc.title, score, unit, doc.text, sentences, tokens))
        return hits
