"""Peak memory of the downstream stages (dedup, relevance per shard,
write_triples) at 1x and Nx the data: do they stay bounded by a shard?

The data is real text: the embedded dump through extract_docs and
select_units, cut into shards, then copied N times with every word given a
copy-specific suffix (so copies are neither near-duplicate documents nor
duplicate queries) and one keyword query per candidate unit (its first
content words). Each stage runs in its own process; its peak RSS is read
from the kernel (ru_maxrss).

    .venv/bin/python benchmarks/downstream.py --copies 10 --docs-per-shard 40
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_WORD = re.compile(r"[A-Za-z]+")
_QUERY_WORD = re.compile(r"[A-Za-z]+\d*")


def build_inputs(work: Path, copies: int, docs_per_shard: int) -> dict:
    """units and rewrite folders for `copies` copies of the embedded shards."""
    import polars as pl
    import pyarrow as pa

    from tasks.assets import embedded_dump_path
    from tasks.common import mark_complete, write_parquet
    from tasks.contracts import DOCUMENTS_SCHEMA, QUERIES_SCHEMA, UNITS_SCHEMA
    from tasks.extract_docs import ExtractConfig, extract_docs
    from tasks.select_units import UnitConfig, select_units
    from tasks.shard import ShardConfig, plan_shards

    (shard,) = plan_shards(embedded_dump_path(), ShardConfig(pages_per_shard=10_000), work_dir=work)
    units_dir = select_units([extract_docs(shard, ExtractConfig(), work)], UnitConfig(docs_per_article=3), work)
    docs = pl.read_parquet(units_dir / "documents.parquet")
    units = pl.read_parquet(units_dir / "units.parquet")
    ids = docs["doc_id"].to_list()
    groups = [ids[i : i + docs_per_shard] for i in range(0, len(ids), docs_per_shard)]

    def suffixed(text: str, k: int) -> str:
        return _WORD.sub(lambda m: f"{m.group(0)}{k}", text) if k else text

    shard_dirs, rewrite_dirs = [], []
    for k in range(copies):
        for g, group in enumerate(groups):
            d = docs.filter(pl.col("doc_id").is_in(group))
            u = units.filter(pl.col("doc_id").is_in(group))
            # Suffixes shift offsets, so each document's text and spans are rebuilt.
            rows_d, rows_u, rows_q = [], [], []
            for doc in d.iter_rows(named=True):
                sents = [doc["text"][s["start"]:s["end"]] for s in doc["sentence_spans"]]
                sents = [suffixed(s, k) for s in sents]
                text, spans = "", []
                for s in sents:
                    if text:
                        text += " "
                    spans.append({"start": len(text), "end": len(text) + len(s)})
                    text += s
                doc_id = f"{doc['doc_id']}-c{k}"
                rows_d.append({**doc, "doc_id": doc_id, "text": text, "sentence_spans": spans})
                for unit in u.filter(pl.col("doc_id") == doc["doc_id"]).iter_rows(named=True):
                    i = unit["sentence_index"]
                    rows_u.append({**unit, "doc_id": doc_id, "text": sents[i], "char_start": spans[i]["start"],
                                   "char_end": spans[i]["end"]})
                    words = [w for w in _QUERY_WORD.findall(sents[i]) if len(w) > 4][:4]  # with the copy's suffix
                    rows_q.append({"doc_id": doc_id, "sentence_index": i, "unit": sents[i], "query": ", ".join(words),
                                   "rewriter_model": "bench", "prompt_version": "bench"})
            sd = work / "units" / f"c{k}-s{g}"
            write_parquet(pa.Table.from_pylist(rows_d, DOCUMENTS_SCHEMA), sd / "documents.parquet", DOCUMENTS_SCHEMA)
            write_parquet(pa.Table.from_pylist(rows_u, UNITS_SCHEMA), sd / "units.parquet", UNITS_SCHEMA)
            mark_complete(sd, {})
            rd = work / "rewrite" / f"c{k}-s{g}"
            write_parquet(pa.Table.from_pylist(rows_q, QUERIES_SCHEMA), rd / "queries.parquet", QUERIES_SCHEMA)
            mark_complete(rd, {})
            shard_dirs.append(str(sd))
            rewrite_dirs.append(str(rd))
    return {"units": shard_dirs, "rewrite": rewrite_dirs, "documents": len(ids) * copies,
            "queries": units.height * copies, "shards": len(shard_dirs)}


def run_stage(stage: str, spec: dict) -> None:
    """In a child process: one stage, then its peak RSS and time as JSON."""
    from tasks.dedup import DedupConfig, dedup
    from tasks.relevance import RelevanceConfig, relevance_filter, relevance_score
    from tasks.write_triples import TriplesConfig, write_triples

    work = spec["work"]
    cfg = RelevanceConfig(max_length=256)
    started = time.perf_counter()
    if stage == "imports":  # the floor every stage process starts from (torch, polars, prefect)
        out = []
    elif stage == "dedup":
        out = [str(dedup(spec["rewrite"], spec["units"], DedupConfig(), work))]
    elif stage == "relevance":  # one worker's share: every shard, one after another
        out = [str(relevance_filter(relevance_score([u], spec["dedup"], cfg, work), cfg, work)) for u in spec["units"]]
    else:
        out = [str(write_triples(spec["relevance"], spec["units"], upstream_dirs=[spec["dedup"]], relevance_config=cfg,
                                 config=TriplesConfig(), work_dir=work))]
    print(json.dumps({"stage": stage, "seconds": round(time.perf_counter() - started, 2), "out": out,
                      "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def measure(copies: int, docs_per_shard: int, root: Path) -> dict:
    work = root / f"x{copies}"
    spec = {"work": str(work), **build_inputs(work, copies, docs_per_shard)}
    figures = {"copies": copies, "documents": spec["documents"], "queries": spec["queries"], "shards": spec["shards"]}
    for stage in ("imports", "dedup", "relevance", "write_triples"):
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run([sys.executable, __file__, "--stage", stage, "--spec", json.dumps(spec)],
                              capture_output=True, text=True, env=env, check=True)
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        figures[stage] = {"seconds": result["seconds"], "peak_rss_mib": result["peak_rss_mib"]}
        if stage == "dedup":
            spec["dedup"] = result["out"][0]
        elif stage == "relevance":
            spec["relevance"] = result["out"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=10, help="The large run's size, in copies of the 1x data.")
    parser.add_argument("--docs-per-shard", type=int, default=40)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        return run_stage(args.stage, json.loads(args.spec))
    with tempfile.TemporaryDirectory(prefix="gear-downstream-") as tmp:
        small, large = measure(1, args.docs_per_shard, Path(tmp)), measure(args.copies, args.docs_per_shard, Path(tmp))
    print(json.dumps({"1x": small, f"{args.copies}x": large}, indent=2))
    print(f"\n| stage | 1x: {small['queries']} queries, {small['shards']} shards | "
          f"{args.copies}x: {large['queries']} queries, {large['shards']} shards | RSS ratio |")
    print("|---|---:|---:|---:|")
    for stage in ("imports", "dedup", "relevance", "write_triples"):
        a, b = small[stage], large[stage]
        print(f"| {stage} | {a['peak_rss_mib']} MiB, {a['seconds']} s | {b['peak_rss_mib']} MiB, {b['seconds']} s | "
              f"{b['peak_rss_mib'] / a['peak_rss_mib']:.2f} |")


if __name__ == "__main__":
    main()
