"""Flow `build-rir-dataset`: a Wikipedia dump -> the paper's RIR triples.

shard_dump -> extract_docs (per shard) -> select_units (per shard)
-> rewrite_queries -> dedup -> relevance_filter -> write_triples
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, unmapped

from flows.params import BuildDatasetParams
from tasks.common import fingerprint, publish_funnel
from tasks.dedup import dedup_task
from tasks.extract_docs import extract_docs
from tasks.relevance import relevance_filter_task
from tasks.rewrite import rewrite_queries_task
from tasks.select_units import select_units_task
from tasks.shard import shard_dump
from tasks.write_triples import write_triples_task

__all__ = ["BuildDatasetParams", "build_rir_dataset"]


def _lineage(params: BuildDatasetParams, dump: str) -> dict[str, Any]:
    """What the dataset version id hashes: the dump's content identity (not
    its path, so the same dump elsewhere gives the same version) and every
    stage config (not the output folder)."""
    return {
        "dump_name": Path(dump).name,
        "dump_fingerprint": fingerprint(dump),
        "params": params.model_dump(mode="json", exclude={"dump", "output_dir"}),
    }


@flow(name="build-rir-dataset", log_prints=True)
def build_rir_dataset(params: BuildDatasetParams = BuildDatasetParams()) -> str:
    """Build (or refresh) the RIR dataset; returns the dataset version folder."""
    dump = params.dump_path()
    work_dir = params.output_dir
    shards = shard_dump(dump, params.shard)
    article_dirs = extract_docs.map(shards, config=unmapped(params.extract), work_dir=unmapped(work_dir))
    unit_dirs = select_units_task.map(
        [[d] for d in article_dirs.result()], config=unmapped(params.units), work_dir=unmapped(work_dir)
    ).result()
    publish_funnel(list(article_dirs.result()) + list(unit_dirs), key="ingest-funnel")
    rewrite_dir = rewrite_queries_task(unit_dirs, params.rewrite, work_dir)
    dedup_dir = dedup_task(rewrite_dir, unit_dirs, params.dedup, work_dir)
    relevance_dir = relevance_filter_task(dedup_dir, unit_dirs, params.relevance, work_dir)
    dataset_dir = write_triples_task(
        relevance_dir,
        unit_dirs,
        params.triples,
        params.output_dir,
        upstream_dirs=[*article_dirs.result(), *unit_dirs, rewrite_dir, dedup_dir],
        lineage=_lineage(params, dump),
    )
    return str(dataset_dir)


if __name__ == "__main__":
    build_rir_dataset()
