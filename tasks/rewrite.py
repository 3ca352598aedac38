"""Stage ``rewrite_queries``: sample candidate units per document, rewrite each
into a keyword query with an LLM (GeAR Appendix A), and gate the outputs.

Input: ``select_units`` output folders (documents.parquet + units.parquet).
Output folder (content-addressed): queries.parquet (accepted rewrites),
rejected.parquet (dropped rewrites with their raw output and reason),
funnel.json, stats.json, and raw/ (one file per input shard with every
answer; its ``ok`` rows are final, its ``failed`` rows are sent again by the
next attempt). The stage is resumable: raw/ lives in the runner's partial
folder, which a failed attempt leaves in place.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from tasks.common import Funnel, ProgressArtifact, failpoint, fingerprint, stable_int, write_parquet
from tasks.contracts import QUERIES_SCHEMA, as_paths, read_units as read_unit_tables
from tasks.rewriters import PROMPT_VERSION, RewriteConfig, Rewriter, make_rewriter, prompt_fingerprint
from tasks.rewriters.base import error_kind
from tasks.rewriters.config import OPERATIONAL_FIELDS, redact_url
from tasks.rewriters.failures import FAILED, OK, check_failures, count_kinds
from tasks.rewriters.quality import REASONS, clean_output, is_keyword_form, judge
from tasks.stage import StageRun, stage

log = logging.getLogger(__name__)

STAGE = "rewrite_queries"
SAMPLE_STAGE = "sample_units"
# The backends, prompts and gate decide the outputs too.
_BACKEND_CODE = sorted((Path(__file__).parent / "rewriters").glob("*.py"))
REJECTED_SCHEMA = pa.schema(
    list(QUERIES_SCHEMA) + [pa.field("raw_output", pa.string()), pa.field("reason", pa.string())]
)
# One row per sampled unit of a shard. status "ok": the backend answered (the
# gate keeps or drops it; final); "failed": no usable answer (error_kind from
# tasks.rewriters.base.ERROR_KINDS, error the detail): never final, a later run
# sends it again and rewrites the shard's file. finish_reason: the backend's
# ("stop", "length" = cut at max_new_tokens, dropped as truncated), or null.
RAW_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("sentence_index", pa.int32()),
        ("unit", pa.string()),
        ("raw_output", pa.string()),
        ("status", pa.string()),
        ("error_kind", pa.string()),
        ("error", pa.string()),
        ("finish_reason", pa.string()),
    ]
)
UNIT_COLUMNS = ("doc_id", "sentence_index", "text")


def model_label(config: RewriteConfig) -> str:
    """The model as written into every query row: a served name, or a local file/folder name."""
    name = config.resolved_model()
    if config.backend == "local" and Path(name).exists():
        return Path(name).name
    return name


def model_identity(config: RewriteConfig) -> dict[str, str]:
    """The model's label, plus the content hash of a local model file/folder
    (not its path, so the key is the same on every machine)."""
    name = config.resolved_model()
    ident = {"model": model_label(config)}
    if config.backend == "local" and Path(name).exists():
        ident["model_fingerprint"] = fingerprint(name)  # computed once per process (tasks/common.py)
    return ident


def cache_config(config: RewriteConfig) -> dict[str, Any]:
    """What decides the outputs: config without operational knobs, model identity, prompt."""
    examples = config.worked_examples_on()
    return {
        **config.model_dump(mode="json", exclude=set(OPERATIONAL_FIELDS)),
        **model_identity(config),
        "use_worked_examples": examples,
        "prompt_version": PROMPT_VERSION,
        "prompt_fingerprint": prompt_fingerprint(examples),
    }


def _units_file(units_dir: Path) -> Path:
    return Path(units_dir) / "units.parquet"


def _units_files(units_dirs) -> list[Path]:
    # Sorted: the shards' order does not change the outputs, so not the key either.
    return sorted(_units_file(d) for d in as_paths(units_dirs))


def shard_groups(units_dirs, workers: int) -> list[list[Path]]:
    """The shards of each rewrite worker: by a stable hash of each shard's
    folder name (its content key), so that a new shard moves no other and
    every group's folder is reused. Empty groups are left out."""
    groups: list[list[Path]] = [[] for _ in range(workers)]
    for d in sorted(as_paths(units_dirs), key=lambda p: p.name):
        groups[stable_int(d.name) % workers].append(d)
    return [g for g in groups if g]


def read_units(units_dir: Path) -> pl.DataFrame:
    """The candidate units of one select_units folder (doc_id, sentence_index, text)."""
    return read_unit_tables([units_dir], UNIT_COLUMNS)


def sample_units(units: pl.DataFrame, units_per_doc: int, seed: int) -> pl.DataFrame:
    """``units_per_doc`` units per document, chosen at random but reproducibly.

    Each unit's draw is a hash of (seed, doc_id, sentence_index), so the
    choice for a document depends only on the seed and that document — not on
    shard boundaries, row order or other documents. Documents with fewer
    candidates keep all of them. Sorted by (doc_id, sentence_index).
    """
    if units.is_empty():
        return units
    draw = [
        stable_int(seed, d, i)
        for d, i in zip(units["doc_id"].to_list(), units["sentence_index"].to_list())
    ]
    return (
        units.with_columns(pl.Series("_draw", draw, dtype=pl.UInt64))
        .sort(["doc_id", "_draw"])
        .group_by("doc_id", maintain_order=True)
        .head(units_per_doc)
        .drop("_draw")
        .sort(["doc_id", "sentence_index"])
    )


def shard_seed(seed: int, doc_ids: list[str]) -> int:
    """Generation seed of one shard: from the config seed and its documents, not its position."""
    return stable_int(seed, *sorted(set(doc_ids))) % (2**31)


def _rewrite_shard(
    rewriter: Rewriter, sampled: pl.DataFrame, seed: int, cached: pl.DataFrame | None = None
) -> tuple[pl.DataFrame, int]:
    """The shard's raw rows (RAW_SCHEMA, sampled's order) and how many were sent.

    ``cached``: the shard's rows from an earlier attempt; its ``ok`` rows are
    final and kept, only the other sampled units (failed or missing) are sent.
    """
    key = ["doc_id", "sentence_index"]
    done = None
    todo = sampled
    if cached is not None:
        done = cached.filter(pl.col("status") == OK).join(sampled.select(key), on=key, how="semi")
        todo = sampled.join(done.select(key), on=key, how="anti")
    sentences = todo["text"].to_list()
    outputs = rewriter.rewrite(sentences, seed) if sentences else []
    if len(outputs) != len(sentences):
        raise RuntimeError(f"{rewriter.model_name}: {len(outputs)} outputs for {len(sentences)} sentences")
    errors = list(getattr(rewriter, "last_errors", None) or [None] * len(outputs))
    finishes = list(getattr(rewriter, "last_finish_reasons", None) or [None] * len(outputs))
    if len(errors) != len(outputs) or len(finishes) != len(outputs):
        raise RuntimeError(f"{rewriter.model_name}: per-item reports do not match its {len(outputs)} outputs")
    new = pl.DataFrame(
        {
            "doc_id": todo["doc_id"],
            "sentence_index": todo["sentence_index"],
            "unit": todo["text"],
            "raw_output": pl.Series(outputs, dtype=pl.String),
            "status": pl.Series([FAILED if e else OK for e in errors], dtype=pl.String),
            "error_kind": pl.Series([error_kind(e) for e in errors], dtype=pl.String),
            "error": pl.Series(errors, dtype=pl.String),
            "finish_reason": pl.Series(finishes, dtype=pl.String),
        },
        schema=pl.Schema(RAW_SCHEMA),
    )
    raw = pl.concat([done.select(new.columns).cast(new.schema), new]) if done is not None else new
    order = sampled.select(key).with_row_index("_order")
    return raw.join(order, on=key).sort("_order").drop("_order"), len(sentences)


def gate(raw: pl.DataFrame, config: RewriteConfig, model: str, funnel: Funnel) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Split raw outputs into accepted queries and rejected ones, counting every reason.

    Failed rows (no usable answer) are ``backend_error``; an answer the backend
    cut at max_new_tokens (finish_reason "length") is ``truncated``; the rest
    is judged by the gate (``config.gate``)."""
    gate_cfg = config.gate
    kept, rejected = [], []
    keyword_form = 0
    for row in raw.iter_rows(named=True):
        base = {
            "doc_id": row["doc_id"],
            "sentence_index": row["sentence_index"],
            "unit": row["unit"],
            "rewriter_model": model,
            "prompt_version": PROMPT_VERSION,
        }
        if row["status"] != OK:
            reason, query = "backend_error", ""
        elif row["finish_reason"] == "length":
            reason, query = "truncated", clean_output(row["raw_output"] or "")
        else:
            verdict = judge(row["raw_output"] or "", row["unit"], gate_cfg)
            reason, query = verdict.reason, verdict.query
        funnel.seen(STAGE)
        if reason is None:
            funnel.kept(STAGE)
            keyword_form += is_keyword_form(query)
            kept.append({**base, "query": query})
        else:
            funnel.drop(STAGE, reason)
            rejected.append({**base, "query": query, "raw_output": row["raw_output"] or row["error"] or "", "reason": reason})
    n = raw.height
    rates = {f"{r}_rate": (funnel.get(STAGE, f"dropped:{r}") / n if n else 0.0) for r in REASONS}
    rates["kept_rate"] = len(kept) / n if n else 0.0
    rates["keyword_form_rate"] = keyword_form / n if n else 0.0  # kept AND comma-separated
    queries = pl.DataFrame(kept, schema=pl.Schema(QUERIES_SCHEMA)) if kept else pl.DataFrame(schema=pl.Schema(QUERIES_SCHEMA))
    rej = pl.DataFrame(rejected, schema=pl.Schema(REJECTED_SCHEMA)) if rejected else pl.DataFrame(schema=pl.Schema(REJECTED_SCHEMA))
    return queries, rej, rates


# A loaded backend and a progress callback for the next rewrite_queries call
# in this context (tests, benchmarks): see ``using_rewriter``.
_SUPPLIED: contextvars.ContextVar[tuple[Rewriter | None, Callable[[int, int], None] | None]] = \
    contextvars.ContextVar("rewriter", default=(None, None))


@contextlib.contextmanager
def using_rewriter(rewriter: Rewriter | None = None, on_progress: Callable[[int, int], None] | None = None) -> Iterator[None]:
    """Within the block, rewrite_queries uses ``rewriter`` (already loaded; the
    caller closes it) instead of building the configured one, and calls
    ``on_progress(done, total)`` as sampled units are rewritten."""
    token = _SUPPLIED.set((rewriter, on_progress))
    try:
        yield
    finally:
        _SUPPLIED.reset(token)


@stage(STAGE, RewriteConfig, key=cache_config, reads={"units_dirs": _units_files},
       writes={"queries.parquet": QUERIES_SCHEMA, "rejected.parquet": REJECTED_SCHEMA},
       code=_BACKEND_CODE, resumable=True, retries=2, retry_delay_seconds=[30, 120])  # an LLM endpoint: a retry resumes
def rewrite_queries(run: StageRun, units_dirs, config: RewriteConfig) -> dict:
    """Rewrite sampled units of every input shard (the configured backend is built once)."""
    units_dirs = as_paths(units_dirs)
    out = run.out
    funnel = run.funnel
    rewriter, on_progress = _SUPPLIED.get()
    if on_progress is None:
        bar = ProgressArtifact("rewrite_queries: sampled units rewritten (%)")
        on_progress = bar.update
    owned = rewriter is None
    model = model_label(config)
    timing = {"load_seconds": 0.0, "rewrite_seconds": 0.0, "rewrites": 0}
    raws = []
    shards = []
    for units_dir in sorted(units_dirs, key=str):
        units = read_units(units_dir)
        sampled = sample_units(units, config.units_per_doc, config.seed)
        funnel.seen(SAMPLE_STAGE, units.height)
        funnel.kept(SAMPLE_STAGE, sampled.height)
        funnel.drop(SAMPLE_STAGE, "not_sampled", units.height - sampled.height)
        shards.append((units_dir, sampled))
    progress = _Progress(sum(s.height for _, s in shards), on_progress)
    not_attempted = 0
    try:
        for n_shard, (units_dir, sampled) in enumerate(shards):
            raw_path = out / "raw" / f"{fingerprint(_units_file(units_dir))[:16]}.parquet"
            cached = pl.read_parquet(raw_path) if raw_path.is_file() else None
            if cached is not None and set(cached.columns) != set(RAW_SCHEMA.names):
                cached = None  # not this code's columns: nothing in it is known final
            if cached is not None and cached.height == sampled.height and (cached["status"] == OK).all():
                raws.append(cached)  # finished by an earlier attempt of this task
                progress.shard_done(sampled.height)
                continue
            if sampled.is_empty():
                raws.append(pl.DataFrame(schema=pl.Schema(RAW_SCHEMA)))
                continue
            if rewriter is None:
                started = time.perf_counter()
                rewriter = make_rewriter(config)
                timing["load_seconds"] = time.perf_counter() - started
            rewriter.on_progress = progress.items_done
            started = time.perf_counter()
            raw, sent = _rewrite_shard(rewriter, sampled, shard_seed(config.seed, sampled["doc_id"].to_list()), cached)
            timing["rewrite_seconds"] += time.perf_counter() - started
            timing["rewrites"] += sent
            progress.shard_done(sampled.height)
            # Failed rows are written too (the finished ones must survive), but
            # as failed: the next attempt sends them again and rewrites this file.
            write_parquet(raw.to_arrow(), raw_path, RAW_SCHEMA)
            failpoint("rewrite_queries:shard-written")
            raws.append(raw)
            if (raw["error_kind"] == "aborted").any():  # the endpoint is down: later shards would fail too
                not_attempted = sum(s.height for _, s in shards[n_shard + 1 :])
                break
    finally:
        if owned and rewriter is not None:
            rewriter.close()
    raw_all = pl.concat(raws) if raws else pl.DataFrame(schema=pl.Schema(RAW_SCHEMA))
    raw_all = raw_all.sort(["doc_id", "sentence_index"])
    queries, rejected, rates = gate(raw_all, config, model, funnel)
    failed_kinds = count_kinds(raw_all.filter(pl.col("status") != OK)["error_kind"].to_list())
    check_failures(failed_kinds, raw_all.height, queries.height, config, model, str(out / "raw"),
                   not_attempted=not_attempted)
    stats = {
        "rewriter_model": model,
        "backend": config.backend,
        "prompt_version": PROMPT_VERSION,
        "use_worked_examples": config.worked_examples_on(),
        **timing,
        "seconds_per_rewrite": timing["rewrite_seconds"] / timing["rewrites"] if timing["rewrites"] else None,
        **rates,
        "backend_errors_by_kind": failed_kinds,  # tolerated: at most max_error_rate of the rewrites
    }
    run.info.update(queries=queries.height, rejected=rejected.height, **rates)
    log.info("rewrite_queries: %d kept, %d rejected -> %s", queries.height, rejected.height, run.final)
    shown = config.model_copy(update={"base_url": redact_url(config.base_url)})  # no credentials in lineage
    return {"queries.parquet": queries, "rejected.parquet": rejected, "stats.json": stats,
            "params.json": {"config": shown, "cache_config": cache_config(config)}}


class _Progress:
    """Counts rewritten units for ``on_progress``; backends that report
    batches advance it as they go, the shard's end settles the rest."""

    def __init__(self, total: int, callback: Callable[[int, int], None] | None):
        self.total, self.callback = total, callback
        self.done = self.shard_start = 0

    def items_done(self, n: int) -> None:
        self.done += n
        if self.callback:
            self.callback(self.done, self.total)

    def shard_done(self, shard_size: int) -> None:
        self.shard_start += shard_size
        if self.done != self.shard_start:
            self.done = self.shard_start
            if self.callback:
                self.callback(self.done, self.total)


rewrite_queries_task = rewrite_queries.task
