"""Shard planning benchmark: one-pass plans vs page ranges, 1x vs 10x.

Builds real-text dumps from the embedded excerpt (its 206 pages repeated with
new titles and page ids): 1x (2 copies, 412 pages) and 10x (20 copies, 4,120
pages), each as a plain single-stream .xml.bz2; the 10x one also as a
multistream dump with its index. For each, plans the shards and then reads
every shard's bytes, and reports the time and the bytes read from files and
decompressed (tasks.shard.IO_COUNTERS):

* one-pass plan of the .xml.bz2 (writes the multistream copy; a second plan reuses it);
* page ranges (today's plan without a work folder): every shard streams the
  dump from its start up to its last page;
* the multistream dump with its index (reads only the index).

Prints JSON, then a table.   .venv/bin/python benchmarks/shard_plan.py [--pages-per-shard N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from fixtures_dumps import repeated_dump  # noqa: E402

from tasks.assets import embedded_dump_path  # noqa: E402
from tasks.dump_reader import as_utf8, dump_chunks  # noqa: E402
from tasks.shard import (  # noqa: E402
    ShardConfig,
    make_multistream,
    open_shard,
    plan_page_ranges,
    plan_shards,
    reset_io_counters,
    split_pages,
)


def _read_one_pass(shards) -> int:
    pages = 0
    for shard in shards:
        with open_shard(shard) as fh:
            while chunk := fh.read(1 << 20):
                pages += chunk.count(b"<page>")
    return pages


def _read_page_range(shard) -> int:
    """What a page-range worker reads: the dump from its start to its last page."""
    pages = 0
    chunks = as_utf8(dump_chunks(Path(shard.dump_path)))
    try:
        last = None
        for part, _ in split_pages(chunks):
            if part == -2 or (shard.page_stop is not None and part >= shard.page_stop):
                break
            if part >= shard.page_start and part != last:
                pages += 1
            last = part
    finally:
        chunks.close()
    return pages


def measure(label: str, size: str, plan, read) -> dict:
    reset_io_counters()
    t0 = time.perf_counter()
    shards = plan()
    t_plan = time.perf_counter() - t0
    plan_io = reset_io_counters()
    t1 = time.perf_counter()
    pages = read(shards)
    t_read = time.perf_counter() - t1
    read_io = reset_io_counters()
    return {
        "plan": label,
        "dump": size,
        "shards": len(shards),
        "pages": pages,
        "plan_seconds": round(t_plan, 2),
        "plan_file_mb": round(plan_io["file_bytes"] / 1e6, 1),
        "plan_xml_mb": round(plan_io["xml_bytes"] / 1e6, 1),
        "read_seconds": round(t_read, 2),
        "read_file_mb": round(read_io["file_bytes"] / 1e6, 1),
        "read_xml_mb": round(read_io["xml_bytes"] / 1e6, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages-per-shard", type=int, default=1000)
    args = ap.parse_args()
    config = ShardConfig(pages_per_shard=args.pages_per_shard)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        dumps = {
            "1x": repeated_dump(embedded_dump_path(), tmp / "x1.xml.bz2", copies=2),
            "10x": repeated_dump(embedded_dump_path(), tmp / "x10.xml.bz2", copies=20),
        }
        multistream, _ = make_multistream(dumps["10x"], tmp / "ms")
        build_s = time.perf_counter() - t0
        for size, dump in dumps.items():
            work = tmp / f"work-{size}"
            rows.append(measure("one pass (first run)", size, lambda: plan_shards(dump, config, work_dir=work), _read_one_pass))
            rows.append(measure("one pass (copy reused)", size, lambda: plan_shards(dump, config, work_dir=work), lambda s: sum(x.pages for x in s)))
            rows.append(measure("page ranges", size, lambda: plan_page_ranges(dump, config), lambda s: sum(map(_read_page_range, s))))
        rows.append(measure("multistream + index", "10x", lambda: plan_shards(multistream, config), _read_one_pass))
        xml_mb = {k: round(sum(len(c) for c in as_utf8(dump_chunks(d))) / 1e6, 1) for k, d in dumps.items()}
    print(json.dumps({"pages_per_shard": args.pages_per_shard, "build_seconds": round(build_s, 1), "xml_mb": xml_mb, "rows": rows}, indent=2))
    cols = ["plan", "dump", "shards", "pages", "plan_seconds", "plan_xml_mb", "read_seconds", "read_file_mb", "read_xml_mb"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main()
