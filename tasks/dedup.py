"""De-duplication (paper Appendix A: "We de-duplicate the keywords in the
rewritten query and then reorder them"), plus two dataset-level passes the
paper leaves implicit but a refresh over a new dump needs:

- per query: split the keywords on commas, normalise them, drop repeated
  keywords (the first surface form wins), then shuffle them with an RNG
  seeded by ``seed`` and the query's (doc_id, sentence_index), so the order
  does not depend on shard order or on which worker ran;
- near-duplicate documents: MinHash LSH over word shingles of the document
  text; every query of a later duplicate (by doc_id order) is dropped;
- duplicate queries: two queries with the same normalised keyword set are
  one query; the first by (doc_id, sentence_index) is kept.

Every drop is counted in the funnel and written to ``dropped.parquet``.
"""

from __future__ import annotations

import random
import re
import string
import unicodedata

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from tasks.common import PipelineInputError, stable_int
from tasks.contracts import QUERIES_SCHEMA, as_paths, read_documents, read_queries
from tasks.params_model import ParamsModel
from tasks.stage import StageRun, stage

STAGE = "dedup"

DROPPED_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("sentence_index", pa.int32()),
        ("query", pa.string()),
        ("reason", pa.string()),
        ("duplicate_of", pa.string()),
    ]
)
NEAR_DUP_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("duplicate_of", pa.string()), ("jaccard", pa.float32())]
)

# Keyword separators: the prompt asks for commas; LLMs sometimes use
# semicolons or one keyword per line, which mean the same thing.
_SPLIT = re.compile(r"[,;\n，、]+")
_PUNCT = re.compile(rf"[{re.escape(string.punctuation)}\u2010-\u2027\u00ab\u00bb\u201c-\u201f]+")
_SPACE = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)


class DedupConfig(ParamsModel):
    """How queries and documents are de-duplicated."""

    seed: int = Field(13, ge=0, description="Seed of the per-query keyword reorder (combined with doc_id and sentence index).")
    reorder_keywords: bool = Field(True, description="Shuffle each query's keywords after de-duplication, as the paper does.")
    lowercase_for_comparison: bool = Field(True, description="Compare keywords case-insensitively (the kept surface form keeps its case).")
    strip_punctuation: bool = Field(True, description="Ignore punctuation when comparing keywords and queries.")
    near_duplicate_documents: bool = Field(True, description="Drop the queries of documents that are near-duplicates of an earlier document.")
    minhash_num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations (more = finer Jaccard estimate, slower).")
    lsh_threshold: float = Field(0.8, gt=0.0, lt=1.0, description="Jaccard similarity of word shingles above which two documents are near-duplicates.")
    shingle_size: int = Field(5, ge=1, le=20, description="Words per shingle for the document MinHash.")


# --------------------------------------------------------------------------
# Keyword post-processing (pure functions, also used by write_triples).


def surface_form(keyword: str) -> str:
    """The keyword as written, tidied: NFKC, single spaces, no edge punctuation."""
    kw = _SPACE.sub(" ", unicodedata.normalize("NFKC", keyword)).strip()
    return kw.strip(string.punctuation + " \u201c\u201d\u2018\u2019\u00ab\u00bb").strip()


def keyword_key(keyword: str, config: DedupConfig | None = None) -> str:
    """The form two keywords are compared in."""
    config = config or DedupConfig()
    kw = unicodedata.normalize("NFKC", keyword)
    if config.lowercase_for_comparison:
        kw = kw.casefold()
    if config.strip_punctuation:
        kw = _PUNCT.sub(" ", kw)
    return _SPACE.sub(" ", kw).strip()


def split_keywords(query: str, config: DedupConfig | None = None) -> list[str]:
    """Keywords in order, repeats (by ``keyword_key``) and empties removed."""
    seen: set[str] = set()
    out: list[str] = []
    for raw in _SPLIT.split(query):
        kw = surface_form(raw)
        key = keyword_key(kw, config)
        if not key or key in seen:
            continue
        seen.add(key)
        out.append(kw)
    return out


def query_key(query: str, config: DedupConfig | None = None) -> str:
    """Order-free normalised form of a query: its sorted keyword keys.

    Keywords are shuffled per query, so two rewrites with the same keywords
    in another order are the same query.
    """
    return ", ".join(sorted({keyword_key(k, config) for k in split_keywords(query, config)}))


def normalise_query(query: str, doc_id: str, sentence_index: int, config: DedupConfig | None = None) -> str:
    """Split, de-duplicate and (seeded) reorder one query's keywords; '' if none left."""
    config = config or DedupConfig()
    keywords = split_keywords(query, config)
    if config.reorder_keywords:
        random.Random(stable_int(config.seed, doc_id, sentence_index)).shuffle(keywords)
    return ", ".join(keywords)


# --------------------------------------------------------------------------
# Near-duplicate documents.


def shingles(text: str, size: int) -> set[str]:
    words = _WORD.findall(unicodedata.normalize("NFKC", text).casefold())
    if len(words) <= size:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


_MINHASH_SCHEME = "affine32"  # datasketch's default; named, since signatures are rebuilt from their values


def minhash_signature(text: str, config: DedupConfig) -> np.ndarray:
    """The MinHash of a document's word shingles (num_perm hash values)."""
    from datasketch import MinHash

    mh = MinHash(num_perm=config.minhash_num_perm, seed=1, scheme=_MINHASH_SCHEME)
    mh.update_batch([s.encode() for s in shingles(text, config.shingle_size)])
    return mh.hashvalues


def near_duplicates(signatures: dict[str, np.ndarray], config: DedupConfig) -> pl.DataFrame:
    """(doc_id, duplicate_of, jaccard) for each document that is a near-duplicate
    of an earlier one in doc_id order; the earliest of a group is kept. Only
    the signatures are held (num_perm x 4 bytes a document), not the texts."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=config.lsh_threshold, num_perm=config.minhash_num_perm)
    kept: dict[str, MinHash] = {}
    rows = []
    for doc_id in sorted(signatures):
        mh = MinHash(num_perm=config.minhash_num_perm, seed=1, hashvalues=signatures[doc_id], scheme=_MINHASH_SCHEME)
        # Every LSH candidate counts (that is what the threshold tunes); the
        # closest earlier document by estimated Jaccard is named.
        best, best_j = None, -1.0
        for cand in sorted(lsh.query(mh)):
            j = mh.jaccard(kept[cand])
            if j > best_j:
                best, best_j = cand, j
        if best is not None:
            rows.append((doc_id, best, best_j))
        else:
            lsh.insert(doc_id, mh)
            kept[doc_id] = mh
    return pl.DataFrame(
        rows, schema={"doc_id": pl.String, "duplicate_of": pl.String, "jaccard": pl.Float32}, orient="row"
    )


def near_duplicate_documents(docs: pl.DataFrame, config: DedupConfig) -> pl.DataFrame:
    """``near_duplicates`` of a frame of (doc_id, text)."""
    return near_duplicates({d: minhash_signature(t, config) for d, t in docs.select("doc_id", "text").iter_rows()}, config)


# --------------------------------------------------------------------------
# Stage.


_ROW_KEY = ["doc_id", "sentence_index"]


def _normalised(frame: pl.DataFrame, config: DedupConfig) -> pl.DataFrame:
    """frame + query_norm (split, de-duplicated, reordered keywords) + the
    keyword counts before and after, per row."""
    norm, before, after = [], [], []
    for doc_id, idx, q in frame.select("doc_id", "sentence_index", "query").iter_rows():
        before.append(sum(1 for x in _SPLIT.split(q or "") if keyword_key(surface_form(x), config)))
        nq = normalise_query(q or "", doc_id, idx, config)
        after.append(len(split_keywords(nq, config)))
        norm.append(nq)
    return frame.with_columns(pl.Series("query_norm", norm, dtype=pl.String),
                              pl.Series("_kw_in", before, dtype=pl.Int64), pl.Series("_kw_kept", after, dtype=pl.Int64))


@stage(
    STAGE,
    DedupConfig,
    reads={"rewrite_dir": ["queries.parquet"], "units_dirs": ["documents.parquet"]},
    writes={"queries.parquet": QUERIES_SCHEMA, "dropped.parquet": DROPPED_SCHEMA, "near_duplicates.parquet": NEAR_DUP_SCHEMA},
)
def dedup(run: StageRun, rewrite_dir, units_dirs, config: DedupConfig) -> dict:
    """De-duplicate keywords, queries and documents into queries.parquet
    (contract 4), dropped.parquet and near_duplicates.parquet.

    In bounded memory: a first pass over each rewrite folder keeps only
    (doc_id, sentence_index) and two 64-bit hashes per query, documents are
    read shard by shard for their MinHash signatures, and a second pass
    writes each folder's kept queries."""
    funnel = run.funnel
    folders = as_paths(rewrite_dir)

    # 1. Keywords within each query; keep only the keys of every query.
    keys = []
    for folder in folders:
        part = _normalised(read_queries([folder], ["doc_id", "sentence_index", "query"]), config)
        funnel.add("dedup_keywords", "input", int(part["_kw_in"].sum()))
        funnel.add("dedup_keywords", "kept", int(part["_kw_kept"].sum()))
        funnel.drop("dedup_keywords", "repeated_keyword", int((part["_kw_in"] - part["_kw_kept"]).sum()))
        keys.append(part.select(
            *_ROW_KEY,
            pl.col("query").map_elements(stable_int, return_dtype=pl.UInt64).alias("_raw"),
            pl.col("query_norm").map_elements(lambda q: stable_int(query_key(q, config)), return_dtype=pl.UInt64).alias("_key"),
            (pl.col("query_norm") == "").alias("_empty"),
        ))
    keys = pl.concat(keys).sort(*_ROW_KEY, "_raw")
    funnel.seen(STAGE, keys.height)
    reasons = [keys.filter("_empty").select(*_ROW_KEY, "_raw", pl.lit("empty_after_normalisation").alias("reason"),
                                            pl.lit(None, pl.String).alias("duplicate_of"))]
    keys = keys.filter(~pl.col("_empty"))

    # 2. Near-duplicate documents (only documents that still have queries matter).
    near = pl.DataFrame(schema={"doc_id": pl.String, "duplicate_of": pl.String, "jaccard": pl.Float32})
    if config.near_duplicate_documents and keys.height:
        wanted = keys["doc_id"].unique().implode()
        signatures: dict[str, np.ndarray] = {}
        for units in as_paths(units_dirs):
            docs = read_documents([units], ["doc_id", "text"]).filter(pl.col("doc_id").is_in(wanted))
            signatures.update((d, minhash_signature(t, config)) for d, t in docs.iter_rows())
        missing = keys.filter(~pl.col("doc_id").is_in(list(signatures)))
        if missing.height:
            raise PipelineInputError(as_paths(units_dirs)[0], "query refers to a document not in documents.parquet", record=missing["doc_id"][0])
        near = near_duplicates(signatures, config)
        reasons.append(keys.join(near, on="doc_id").select(*_ROW_KEY, "_raw", pl.lit("near_duplicate_document").alias("reason"),
                                                           "duplicate_of"))
        keys = keys.join(near, on="doc_id", how="anti")

    # 3. Duplicate queries across the dataset: keep the first by (doc_id, sentence_index).
    keys = keys.with_row_index("_row")
    first = keys.group_by("_key").agg(
        pl.col("_row").min().alias("_first_row"),
        (pl.col("doc_id") + "#" + pl.col("sentence_index").cast(pl.String)).sort_by("_row").first().alias("_first"),
    )
    keys = keys.join(first, on="_key").sort("_row")
    is_first = pl.col("_row") == pl.col("_first_row")
    reasons.append(keys.filter(~is_first).select(*_ROW_KEY, "_raw", pl.lit("duplicate_query").alias("reason"),
                                                 pl.col("_first").alias("duplicate_of")))
    kept = keys.filter(is_first).select(*_ROW_KEY, "_raw")
    dropped_keys = pl.concat(reasons)
    for reason, n in dropped_keys.group_by("reason").len().iter_rows():
        funnel.drop(STAGE, reason, n)
    funnel.kept(STAGE, kept.height)

    # 4. Each folder's kept queries, normalised again (it is deterministic), and the drops with their text.
    dropped = []
    with pq.ParquetWriter(run.out / "queries.parquet", QUERIES_SCHEMA, compression="zstd") as writer:
        for folder in folders:
            rows = _normalised(read_queries([folder]), config).with_columns(
                pl.col("query").map_elements(stable_int, return_dtype=pl.UInt64).alias("_raw"))
            keep = rows.join(kept, on=[*_ROW_KEY, "_raw"], how="semi").sort(*_ROW_KEY, "_raw")
            writer.write_table(keep.with_columns(pl.col("query_norm").alias("query")).select(QUERIES_SCHEMA.names)
                               .to_arrow().cast(QUERIES_SCHEMA))
            gone = rows.join(dropped_keys, on=[*_ROW_KEY, "_raw"])
            dropped.append(gone.select(
                *_ROW_KEY,
                pl.when(pl.col("reason") == "empty_after_normalisation").then(pl.col("query"))
                .otherwise(pl.col("query_norm")).alias("query"),
                "reason", "duplicate_of"))
    dropped_df = pl.concat(dropped).sort(*_ROW_KEY) if dropped else pl.DataFrame(schema={n: pl.String for n in DROPPED_SCHEMA.names})
    return {
        "dropped.parquet": dropped_df.cast({"sentence_index": pl.Int32}),
        "near_duplicates.parquet": near,
    }


dedup_task = dedup.task
