"""Flow `build-rir-dataset`: a Wikipedia dump -> the paper's RIR triples.

shard_dump -> extract_docs (per shard) -> select_units (per shard)
-> rewrite_queries -> dedup -> relevance_score -> relevance_filter -> write_triples

Every step is a stage on the runner (tasks/stage.py): cached in a
content-addressed folder under ``output_dir``, retried, and locked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, unmapped

from flows.params import BuildDatasetParams
from tasks.common import config_identity, fingerprint, publish_funnel
from tasks.dedup import dedup_task
from tasks.extract_docs import extract_docs_task
from tasks.relevance import relevance_filter_task, relevance_score_task
from tasks.rewrite import rewrite_queries_task
from tasks.select_units import select_units_task
from tasks.shard import shard_dump
from tasks.write_triples import write_triples_task

__all__ = ["BuildDatasetParams", "build_rir_dataset"]


def _lineage(params: BuildDatasetParams, dump: str) -> dict[str, Any]:
    """What the dataset version id hashes: the dump's content identity (not
    its path, so the same dump elsewhere gives the same version) and every
    stage config without its operational fields (no endpoint URL, key,
    concurrency or timeout: they change neither the data nor the version)."""
    identity = config_identity(params)
    for placement in ("dump", "output_dir"):
        identity.pop(placement, None)
    return {"dump_name": Path(dump).name, "dump_fingerprint": fingerprint(dump), "params": identity}


@flow(name="build-rir-dataset", log_prints=True)
def build_rir_dataset(params: BuildDatasetParams = BuildDatasetParams()) -> str:
    """Build (or refresh) the RIR dataset; returns the dataset version folder."""
    dump = params.dump_path()
    work_dir = params.output_dir
    shards = shard_dump(dump, params.shard, work_dir)
    article_dirs = extract_docs_task.map(shards, config=unmapped(params.extract), work_dir=unmapped(work_dir)).result()
    unit_dirs = select_units_task.map(
        [[d] for d in article_dirs], config=unmapped(params.units), work_dir=unmapped(work_dir)
    ).result()
    publish_funnel([*article_dirs, *unit_dirs], key="ingest-funnel")
    rewrite_dir = rewrite_queries_task(unit_dirs, params.rewrite, work_dir)
    dedup_dir = dedup_task(rewrite_dir, unit_dirs, params.dedup, work_dir)
    scored_dir = relevance_score_task(dedup_dir, unit_dirs, params.relevance, work_dir)
    relevance_dir = relevance_filter_task(scored_dir, params.relevance, work_dir)
    dataset_dir = write_triples_task(
        relevance_dir,
        unit_dirs,
        upstream_dirs=[*article_dirs, *unit_dirs, rewrite_dir, dedup_dir],
        lineage=_lineage(params, dump),
        dedup_config=params.dedup,
        relevance_config=params.relevance,
        config=params.triples,
        work_dir=work_dir,
    )
    return str(dataset_dir)


if __name__ == "__main__":
    build_rir_dataset()
