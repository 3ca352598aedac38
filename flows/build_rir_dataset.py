"""Flow `build-rir-dataset`: a Wikipedia dump -> the paper's RIR triples.

shard_dump -> extract_docs (per shard) -> select_units (per shard)
-> rewrite_queries (per shard group) -> dedup -> relevance_score (per shard, or per part of one)
-> relevance_filter (per shard)
-> write_triples

Every step after shard planning is a stage on the runner (tasks/stage.py):
cached in a content-addressed folder under ``output_dir`` and locked; the
stages that call an endpoint or a model retry (rewrite_queries,
relevance_score), the rest are pure CPU and fail at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.params import BuildDatasetParams
from tasks.common import Funnel, config_identity, fingerprint
from tasks.dedup import dedup_task
from tasks.extract_docs import extract_docs
from tasks.relevance import relevance_filter, relevance_score
from tasks.rewrite import rewrite_queries, shard_groups
from tasks.runners import map_stage, parts_per_shard, task_runner, worker_processes
from tasks.select_units import select_units
from tasks.shard import shard_dump as plan_shards
from tasks.write_triples import published_from, write_triples_task

__all__ = ["BuildDatasetParams", "build_rir_dataset"]


# The flow's own tasks; the stages' come from the stage runner (``<stage>.task``).
# Planning reads the dump on this machine's CPU: nothing a retry would fix.
shard_dump = task(plan_shards, name="shard_dump")


@task(name="publish_funnel")
def publish_funnel(stage_dirs: list[str | os.PathLike], key: str) -> dict[str, dict[str, int]]:
    """Merge the funnel.json files of stage folders into a Prefect table artifact."""
    funnel = Funnel.from_folders(stage_dirs)
    create_table_artifact(funnel.rows(), key=key, description="Records kept and dropped per stage")
    return funnel.to_dict()


@task(name="stop-after")
def stop_after(stage: str, folders: list[str | os.PathLike]) -> list[str]:
    """A flow's ``until``: the stage's merged funnel as an artifact, and its folders."""
    publish_funnel.fn(folders, key=f"until-{stage.replace('_', '-')}")
    return [str(f) for f in folders]


@task(name="check-new-dump")
def published_from_same_dump(dump: str, output_dir: str) -> str | None:
    """The refresh's check: the latest dataset if it was built from this
    dump's content (recorded as "no new dump"), else None."""
    found = published_from(fingerprint(dump), output_dir)
    if found is not None:
        create_markdown_artifact(f"No new dump: `{Path(dump).name}` has the content the latest dataset "
                                 f"`{found.name}` was built from; nothing was rebuilt.", key="rir-refresh")
    return str(found) if found else None


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
def build_rir_dataset(params: BuildDatasetParams = BuildDatasetParams()) -> str | list[str]:
    """Build (or refresh) the RIR dataset; returns the dataset version folder
    (with ``until``: the folders of that stage)."""
    dump = params.dump_path()
    work_dir = params.output_dir
    if params.only_new_dump and (same := published_from_same_dump(dump, work_dir)):
        return same
    with task_runner(params.runner) as runner, worker_processes(params.runner, params.units):
        shards = shard_dump(dump, params.shard, work_dir)
        article_dirs = map_stage(runner, extract_docs, shards, params.extract, work_dir, params.runner)
        if params.until == "extract_docs":
            return stop_after("extract_docs", article_dirs)
        unit_dirs = map_stage(runner, select_units, [[d] for d in article_dirs], params.units, work_dir, params.runner)
        publish_funnel([*article_dirs, *unit_dirs], key="ingest-funnel")
        if params.until == "select_units":
            return stop_after("select_units", unit_dirs)
        groups = shard_groups(unit_dirs, params.rewrite.workers)
        rewrite_dirs = map_stage(runner, rewrite_queries, groups, params.rewrite, work_dir, params.runner)
        if params.until == "rewrite_queries":
            return stop_after("rewrite_queries", rewrite_dirs)
        dedup_dir = dedup_task(rewrite_dirs, unit_dirs, params.dedup, work_dir)
        if params.until == "dedup":
            return stop_after("dedup", [dedup_dir])
        # A shard is scored in parts when there are fewer shards than workers; its filter joins them.
        k = parts_per_shard(len(unit_dirs), params.runner)
        parts = [{"units_dirs": [d], "part": [i, k] if k > 1 else None} for d in unit_dirs for i in range(k)]
        scored_dirs = map_stage(runner, relevance_score, parts, params.relevance, work_dir, params.runner,
                                dedup_dir=dedup_dir)
        shard_scores = [scored_dirs[i : i + k] for i in range(0, len(scored_dirs), k)]
        relevance_dirs = map_stage(runner, relevance_filter, shard_scores, params.relevance, work_dir, params.runner)
    if params.until == "relevance_filter":
        return stop_after("relevance_filter", relevance_dirs)
    dataset_dir = write_triples_task(
        relevance_dirs,
        unit_dirs,
        upstream_dirs=[*article_dirs, *unit_dirs, *rewrite_dirs, dedup_dir],
        lineage=_lineage(params, dump),
        dedup_config=params.dedup,
        relevance_config=params.relevance,
        config=params.triples,
        work_dir=work_dir,
    )
    return str(dataset_dir)


if __name__ == "__main__":
    build_rir_dataset()
