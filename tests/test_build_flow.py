"""build-rir-dataset as a Prefect flow, end to end on a slice of the embedded
dump, with the openai backend against a real local chat server (the LLM is
not what these tests are about)."""

from __future__ import annotations

import polars as pl
import pytest

from flows.params import BuildDatasetParams
from tasks.relevance import RelevanceConfig
from tasks.rewriters import RewriteConfig
from tasks.rewriters.testing import FakeChatServer
from tasks.shard import ShardConfig


def slice_params(output_dir, base_url: str, **updates) -> BuildDatasetParams:
    """The first 30 pages of the embedded dump, one unit per document."""
    params = BuildDatasetParams(
        output_dir=str(output_dir),
        shard=ShardConfig(pages_per_shard=30, max_shards=1),
        rewrite=RewriteConfig(backend="openai", base_url=base_url, units_per_doc=1, backoff_base_s=0.01),
        relevance=RelevanceConfig(max_length=256),
    )
    return params.model_copy(update=updates)


@pytest.mark.slow
def test_latest_names_the_version_the_flow_returned_even_on_a_cache_hit(prefect_harness, tmp_path):
    """build -> build at threshold 0.35 -> build with the defaults again:
    LATEST names the first version again, and it follows every later run,
    cache hit or not."""
    from flows.build_rir_dataset import build_rir_dataset

    out = tmp_path / "data"
    latest = out / "datasets" / "LATEST"
    with FakeChatServer() as srv:
        first = build_rir_dataset(slice_params(out, srv.base_url))
        assert latest.read_text().strip() == first.rsplit("/", 1)[-1]
        requests = srv.requests
        stricter = slice_params(out, srv.base_url, relevance=RelevanceConfig(max_length=256, threshold=0.35))
        second = build_rir_dataset(stricter)
        assert second != first and latest.read_text().strip() == second.rsplit("/", 1)[-1]
        third = build_rir_dataset(slice_params(out, srv.base_url))
        assert third == first
        assert latest.read_text().strip() == first.rsplit("/", 1)[-1]
        # Prefect stores a cache record only for a key it could compute before
        # the run, i.e. once the folder was complete: runs 3 and 4 store them,
        # so run 5 is a true cache hit of write_triples (its body is skipped)
        # and the runner's on-completion hook must move LATEST.
        assert build_rir_dataset(stricter) == second and latest.read_text().strip() == second.rsplit("/", 1)[-1]
        assert build_rir_dataset(slice_params(out, srv.base_url)) == first
        assert latest.read_text().strip() == first.rsplit("/", 1)[-1]
        assert srv.requests == requests  # a new threshold re-rewrites nothing
    kept_first = pl.read_parquet(f"{first}/train.parquet").height + pl.read_parquet(f"{first}/test.parquet").height
    kept_second = pl.read_parquet(f"{second}/train.parquet").height + pl.read_parquet(f"{second}/test.parquet").height
    assert 0 < kept_second <= kept_first
    # Nothing half-made or temporary is visible in the datasets folder.
    assert sorted(p.name for p in (out / "datasets").iterdir()) == sorted(
        ["LATEST", first.rsplit("/", 1)[-1], second.rsplit("/", 1)[-1]]
    )


def test_an_operational_field_changes_neither_lineage_nor_version(tmp_path):
    """The endpoint URL, its key and concurrency are not part of what a dataset is."""
    from flows.build_rir_dataset import _lineage
    from tasks.assets import embedded_dump_path

    dump = str(embedded_dump_path())
    a = slice_params(tmp_path, "http://user:secret@host-a:8000/v1")
    b = slice_params(tmp_path, "http://host-b:9000/v1")
    b = b.model_copy(update={"rewrite": b.rewrite.model_copy(update={"concurrency": 3, "timeout_s": 5.0})})
    assert _lineage(a, dump) == _lineage(b, dump)
    assert "secret" not in str(_lineage(a, dump))
    c = slice_params(tmp_path, "http://host-b:9000/v1", relevance=RelevanceConfig(max_length=256, threshold=0.4))
    assert _lineage(c, dump) != _lineage(b, dump)
