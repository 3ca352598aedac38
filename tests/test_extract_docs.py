"""extract_docs on the embedded dump, shards, the stage cache and bad input."""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from tasks.assets import embedded_dump_path
from tasks.common import Funnel, PipelineInputError, read_marker
from tasks.extract_docs import ARTICLES_SCHEMA, ExtractConfig, extract_docs
from tasks.shard import Shard, ShardConfig, make_multistream, plan_shards
from tasks.wikitext import FORBIDDEN_MARKUP

BG_DUMP = embedded_dump_path().parent / "bgwiki-latest-pages-articles-shortened.xml.bz2"


@pytest.fixture(scope="session")
def ingest_work_dir(tmp_path_factory) -> Path:
    # One work dir for the session: the second module to extract the embedded dump gets a cache hit.
    return tmp_path_factory.getbasetemp() / "ingest-work"


@pytest.fixture(scope="module")
def embedded_articles(ingest_work_dir) -> Path:
    (shard,) = plan_shards(embedded_dump_path(), ShardConfig())
    return extract_docs(shard, ExtractConfig(), ingest_work_dir)


def _shard(path: Path, **kw) -> Shard:
    return Shard(shard_id=0, dump_path=str(path), kind="pages", page_start=0, page_stop=None, **kw)


def test_embedded_funnel(embedded_articles):
    funnel = Funnel.load(embedded_articles / "funnel.json").to_dict()["extract_docs"]
    assert funnel == {
        "input": 206,
        "dropped:redirect": 99,
        "dropped:non_article_namespace": 1,
        "dropped:disambiguation": 8,
        "dropped:list_page": 2,
        "kept": 96,
    }
    clean = Funnel.load(embedded_articles / "funnel.json").to_dict()["clean_wikitext"]
    assert clean["dropped:list_item"] > 1000 and clean["dropped:caption"] > 100


def test_embedded_articles_are_clean_prose(embedded_articles):
    table = pq.read_table(embedded_articles / "articles.parquet")
    assert table.schema.equals(ARTICLES_SCHEMA)
    df = pl.from_arrow(table)
    assert df.height == 96 and df["page_id"].n_unique() == 96
    assert (df["source_dump"] == embedded_dump_path().name).all()
    assert "Anarchism" in df["title"].to_list()
    assert not any(t.startswith("List of") for t in df["title"])
    for text in df["text"]:
        assert text and text == text.strip()
        for mark in FORBIDDEN_MARKUP:
            assert mark not in text
        assert "\n\n\n" not in text


def test_page_range_shard_gives_the_same_articles(embedded_articles, tmp_path):
    whole = pl.read_parquet(embedded_articles / "articles.parquet")
    middle = plan_shards(embedded_dump_path(), ShardConfig(pages_per_shard=40))[1]
    assert (middle.page_start, middle.page_stop) == (40, 80)
    part = pl.read_parquet(extract_docs(middle, ExtractConfig(), tmp_path) / "articles.parquet")
    assert 0 < part.height < whole.height
    first = whole["page_id"].to_list().index(part["page_id"][0])
    assert whole.slice(first, part.height).equals(part)
    funnel = Funnel.load(extract_docs.output_dir(middle, ExtractConfig(), tmp_path) / "funnel.json")
    assert funnel.get("extract_docs", "input") == 40


def test_multistream_shard_gives_the_same_articles(embedded_articles, tmp_path):
    dump, _ = make_multistream(embedded_dump_path(), tmp_path / "ms", pages_per_stream=25)
    shards = plan_shards(dump, ShardConfig(pages_per_shard=50))
    assert [s.kind for s in shards] == ["streams"] * 5 and [s.pages for s in shards] == [50, 50, 50, 25, 31]
    part = pl.read_parquet(extract_docs(shards[1], ExtractConfig(), tmp_path / "work") / "articles.parquet")
    whole = pl.read_parquet(embedded_articles / "articles.parquet")
    assert 0 < part.height < whole.height and set(part["source_dump"]) == {dump.name}
    first = whole["page_id"].to_list().index(part["page_id"][0])
    assert whole.slice(first, part.height).drop("source_dump").equals(part.drop("source_dump"))


def test_second_call_does_no_work(embedded_articles, ingest_work_dir):
    marker = embedded_articles / "_SUCCESS.json"
    before = (marker.stat().st_mtime_ns, (embedded_articles / "articles.parquet").stat().st_mtime_ns)
    (shard,) = plan_shards(embedded_dump_path(), ShardConfig())
    start = time.perf_counter()
    again = extract_docs(shard, ExtractConfig(), ingest_work_dir)
    assert time.perf_counter() - start < 0.5  # a full extraction takes seconds
    assert again == embedded_articles
    assert (marker.stat().st_mtime_ns, (embedded_articles / "articles.parquet").stat().st_mtime_ns) == before
    assert read_marker(again)["articles"] == 96


def test_prefect_cache_key_trusts_only_a_finished_folder(embedded_articles, ingest_work_dir):
    (shard,) = plan_shards(embedded_dump_path(), ShardConfig())
    params = {"shard": shard, "config": ExtractConfig(), "work_dir": str(ingest_work_dir)}
    key_fn = extract_docs.task.cache_key_fn
    assert extract_docs.output_dir(**params) == embedded_articles
    assert key_fn(None, params) is not None
    # A different config is a different folder, not yet built: no cache lookup.
    assert key_fn(None, {**params, "config": ExtractConfig(skip_list_pages=False)}) is None
    assert extract_docs.task.retries == 0  # pure CPU: a retry would fail the same way


def test_config_change_rebuilds(tmp_path):
    (shard,) = plan_shards(embedded_dump_path(), ShardConfig(pages_per_shard=40))[:1]
    a = extract_docs(shard, ExtractConfig(), tmp_path)
    b = extract_docs(shard, ExtractConfig(skip_list_pages=False), tmp_path)
    assert a != b


# --------------------------------------------------------------------------
# Bad input.


def test_missing_file(tmp_path):
    with pytest.raises(PipelineInputError, match="does not exist") as err:
        extract_docs(_shard(tmp_path / "missing.xml.bz2"), ExtractConfig(), tmp_path)
    assert err.value.path.endswith("missing.xml.bz2")


def test_truncated_bz2_names_the_page(tmp_path):
    data = embedded_dump_path().read_bytes()
    cut = tmp_path / "truncated.xml.bz2"
    cut.write_bytes(data[: int(len(data) * 0.2)])
    with pytest.raises(PipelineInputError) as err:
        extract_docs(_shard(cut), ExtractConfig(), tmp_path / "work")
    assert err.value.path == str(cut)
    assert err.value.record and err.value.record.startswith("page ")
    assert "truncated" in str(err.value) or "Compressed file ended" in str(err.value)
    # Nothing half-written is marked complete.
    assert not list((tmp_path / "work").rglob("_SUCCESS.json"))


MALFORMED = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">
  <siteinfo><sitename>W</sitename><dbname>testwiki</dbname><base>x</base><generator>g</generator><case>first-letter</case>
  <namespaces><namespace key="0" case="first-letter" /></namespaces></siteinfo>
  <page><title>Good page</title><ns>0</ns><id>1</id>
    <revision><id>11</id><model>wikitext</model><format>text/x-wiki</format><text>Fine text.</text></revision></page>
  <page><title>Broken page</title><ns>0</ns><id>2</id>
    <revision><id>12</id><model>wikitext</model><format>text/x-wiki</format><text>Oops</textt></revision></page>
</mediawiki>
"""


def test_malformed_xml_names_the_page(tmp_path):
    bad = tmp_path / "malformed.xml"
    bad.write_text(MALFORMED)
    with pytest.raises(PipelineInputError, match="malformed") as err:
        extract_docs(_shard(bad), ExtractConfig(), tmp_path)
    assert "Broken page" in str(err.value) and "malformed.xml" in str(err.value)


def test_malformed_header(tmp_path):
    bad = tmp_path / "garbage.xml"
    bad.write_text("this is not xml <page>")
    with pytest.raises(PipelineInputError, match="garbage.xml"):
        extract_docs(_shard(bad), ExtractConfig(), tmp_path)


def test_empty_dump(tmp_path):
    empty = tmp_path / "empty.xml"
    empty.write_text(MALFORMED.split("  <page>")[0] + "</mediawiki>\n")
    with pytest.raises(PipelineInputError, match="empty dump"):
        extract_docs(_shard(empty), ExtractConfig(), tmp_path)
    zero = tmp_path / "zero.xml.bz2"
    zero.write_bytes(b"")
    with pytest.raises(PipelineInputError, match="empty dump"):
        extract_docs(_shard(zero), ExtractConfig(), tmp_path)


def test_non_english_dump_does_not_crash(tmp_path):
    (shard,) = plan_shards(BG_DUMP, ShardConfig())
    out = extract_docs(shard, ExtractConfig(), tmp_path)
    funnel = Funnel.load(out / "funnel.json").to_dict()["extract_docs"]
    assert funnel == {"input": 3, "dropped:non_article_namespace": 2, "kept": 1}
    (title,) = pl.read_parquet(out / "articles.parquet")["title"].to_list()
    assert title == "Григориански календар"


def test_lead_only_articles_start_as_the_whole_articles(embedded_articles, tmp_path):
    import json

    (shard,) = plan_shards(embedded_dump_path(), ShardConfig())
    whole = extract_docs(shard, ExtractConfig(max_chars=None), tmp_path)
    lead = pl.read_parquet(embedded_articles / "articles.parquet")
    full = pl.read_parquet(whole / "articles.parquet")
    assert lead["page_id"].to_list() == full["page_id"].to_list()  # the same pages are kept
    cut = set(json.loads((embedded_articles / "cut_articles.json").read_text())["page_ids"])
    assert json.loads((whole / "cut_articles.json").read_text())["page_ids"] == []
    assert len(cut) >= 40
    for pid, a, b in zip(lead["page_id"], lead["text"], full["text"]):
        if pid in cut:
            # (the rest of the page may hold no prose at all: references, lists)
            assert len(a) >= ExtractConfig().max_chars and b.startswith(a) and b[len(a) : len(a) + 2] in ("", "\n\n")
        else:
            assert a == b
    counts = Funnel.load(embedded_articles / "funnel.json").to_dict()
    assert counts["clean_wikitext"]["dropped:text_beyond_max_chars"] == len(cut)
    assert counts["extract_docs"] == Funnel.load(whole / "funnel.json").to_dict()["extract_docs"]


def test_bad_pages_fail_by_default_and_are_skipped_and_listed_under_max_bad_pages(tmp_path, monkeypatch):
    """The wikitext parser cannot be made to fail on real input, so one page's parse is made to fail."""
    import json

    from tasks import wikitext

    real = wikitext.clean_wikitext

    def failing(text, *args, **kwargs):
        if "anarchism" in text[:2000].lower() and "political philosophy" in text.lower():
            raise RecursionError("maximum recursion depth exceeded")
        return real(text, *args, **kwargs)

    monkeypatch.setattr(wikitext, "clean_wikitext", failing)
    (shard,) = plan_shards(embedded_dump_path(), ShardConfig())
    with pytest.raises(PipelineInputError, match=r"cannot parse wikitext.*max_bad_pages 0") as err:
        extract_docs(shard, ExtractConfig(), tmp_path)
    assert "Anarchism" in str(err.value)
    out = extract_docs(shard, ExtractConfig(max_bad_pages=3), tmp_path)
    bad = json.loads((out / "bad_pages.json").read_text())
    assert [b["title"] for b in bad] == ["Anarchism"] and "recursion" in bad[0]["reason"]
    assert Funnel.load(out / "funnel.json").get("extract_docs", "dropped:bad_page") == 1


def test_an_operating_system_error_is_retried_not_bad_input(tmp_path, monkeypatch):
    import errno

    from tasks import extract_docs as module
    from tasks.stage import retry_unless_final

    def too_many_files(shard):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(module, "open_shard", too_many_files)
    (shard,) = plan_shards(embedded_dump_path(), ShardConfig())
    with pytest.raises(OSError) as err:
        extract_docs(shard, ExtractConfig(), tmp_path)
    assert not isinstance(err.value, PipelineInputError)

    class State:
        def result(self):
            raise err.value

    assert retry_unless_final(None, None, State()) is True
