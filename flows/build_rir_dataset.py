"""Flow `build-rir-dataset`: a Wikipedia dump -> the paper's RIR triples.

shard_dump -> extract_docs (per shard) -> select_units (per shard)
-> rewrite_queries -> dedup -> relevance_filter -> write_triples
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, unmapped
from pydantic import BaseModel, Field, field_validator

from tasks.assets import embedded_dump_path
from tasks.common import fingerprint, publish_funnel
from tasks.dedup import DedupConfig, dedup_task
from tasks.extract_docs import ExtractConfig, extract_docs
from tasks.relevance import RelevanceConfig, relevance_filter_task
from tasks.rewrite import RewriteConfig, rewrite_queries_task
from tasks.select_units import UnitConfig, select_units_task
from tasks.shard import ShardConfig, shard_dump
from tasks.write_triples import TriplesConfig, write_triples_task


class BuildDatasetParams(BaseModel):
    """Everything `build-rir-dataset` needs; the paper's figures are the defaults."""

    dump: str | None = Field(
        None,
        title="Wikipedia dump",
        description="Path of a MediaWiki XML dump (.xml, .xml.bz2, or a -multistream .bz2 with its index "
        "beside it). Empty: the 106-article enwiki excerpt shipped in the gensim package.",
    )
    output_dir: str = Field(
        "data",
        title="Output folder",
        description="Stage outputs go to <output_dir>/stages, the dataset to <output_dir>/datasets/<version>.",
    )
    shard: ShardConfig = Field(ShardConfig(), title="Sharding", description="How the dump is cut into shards (one Prefect task each).")
    extract: ExtractConfig = Field(ExtractConfig(), title="Wikitext extraction", description="Which pages are kept and how wikitext becomes plain prose.")
    units: UnitConfig = Field(UnitConfig(), title="Documents and candidate units (paper, Appendix A)", description="The paper's document and candidate-sentence rules (Appendix A) with its figures as defaults.")
    rewrite: RewriteConfig = Field(RewriteConfig(), title="Query rewriting (LLM)", description="The LLM that rewrites sampled units into keyword queries, its prompt and the quality gate.")
    dedup: DedupConfig = Field(DedupConfig(), title="De-duplication", description="Keyword de-duplication and reordering, duplicate queries, near-duplicate documents.")
    relevance: RelevanceConfig = Field(RelevanceConfig(), title="Relevance filter (BGE similarity)", description="The embedding model and threshold of the query-document relevance filter.")
    triples: TriplesConfig = Field(TriplesConfig(), title="Train/test split", description="The document-level train/test split and the dataset card.")

    @field_validator("dump")
    @classmethod
    def _dump_exists(cls, value: str | None) -> str | None:
        if value and not Path(value).is_file():
            raise ValueError(f"dump file not found: {value}")
        return value or None

    def dump_path(self) -> str:
        return self.dump or str(embedded_dump_path())

    @classmethod
    def for_cli(cls, dump: Path | None, output_dir: Path, docs_per_article: int = 1, rewriter_backend: str = "local"):
        return cls(
            dump=str(dump) if dump else None,
            output_dir=str(output_dir),
            units=UnitConfig(docs_per_article=docs_per_article),
            rewrite=RewriteConfig(backend=rewriter_backend),
        )


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
