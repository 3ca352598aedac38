"""Shard planning and reading: page ranges for plain dumps, bz2 streams for multistream dumps."""

from __future__ import annotations

import bz2
import re
from pathlib import Path

import mwxml
import pytest

from tasks.assets import embedded_dump_path
from tasks.common import PipelineInputError
from tasks.shard import (
    Shard,
    ShardConfig,
    count_pages,
    find_index,
    make_multistream,
    open_shard,
    plan_shards,
    read_stream_offsets,
)

BG_DUMP = embedded_dump_path().parent / "bgwiki-latest-pages-articles-shortened.xml.bz2"


def _split_dump(path: Path) -> tuple[bytes, list[bytes], bytes]:
    """(header, one chunk per <page>, footer) of a small UTF-8 dump."""
    xml = bz2.decompress(path.read_bytes())
    first = xml.index(b"  <page>")
    last = xml.rindex(b"</page>") + len(b"</page>\n")
    pages = re.findall(rb"  <page>.*?</page>\n", xml[first:last], flags=re.S)
    assert b"".join(pages) == xml[first:last]
    return xml[:first], pages, xml[last:]


def _titles(shard: Shard) -> list[str]:
    with open_shard(shard) as fh:
        dump = mwxml.Dump.from_file(fh)
        return [page.title for page in dump]


@pytest.fixture(scope="module")
def multistream(tmp_path_factory):
    """A real multistream dump + index made from the embedded dump's pages, 20 per bz2 stream."""
    dump, index = make_multistream(embedded_dump_path(), tmp_path_factory.mktemp("multistream"), pages_per_stream=20)
    _, pages, _ = _split_dump(embedded_dump_path())
    titles = [re.search(rb"<title>(.*?)</title>", p).group(1).decode() for p in pages]
    return dump, index, titles


def test_multistream_repacks_the_same_xml(multistream):
    dump, _, _ = multistream
    # Concatenated streams decompress to the original document, byte for byte.
    assert bz2.decompress(dump.read_bytes()) == bz2.decompress(embedded_dump_path().read_bytes())


def test_plain_dump_is_cut_into_page_ranges():
    shards = plan_shards(embedded_dump_path(), ShardConfig(pages_per_shard=50))
    assert [(s.page_start, s.page_stop) for s in shards] == [(0, 50), (50, 100), (100, 150), (150, 200), (200, None)]
    assert sum(s.pages for s in shards) == 206
    assert all(s.kind == "pages" and s.index_path is None for s in shards)


def test_one_shard_when_the_dump_is_small():
    (shard,) = plan_shards(embedded_dump_path(), ShardConfig())
    assert (shard.page_start, shard.page_stop, shard.pages) == (0, None, 206)


def test_multistream_index_is_found_and_read(multistream):
    dump, index, titles = multistream
    assert find_index(dump) == index
    offsets = read_stream_offsets(index)
    assert [n for _, n in offsets] == [20] * 10 + [6]
    assert sum(n for _, n in offsets) == len(titles) == 206


def test_multistream_shards_are_valid_xml_and_cover_every_page_once(multistream):
    dump, index, titles = multistream
    shards = plan_shards(dump, ShardConfig(pages_per_shard=40))
    assert all(s.kind == "streams" for s in shards)
    assert [s.pages for s in shards] == [40, 40, 40, 40, 40, 6]
    # Byte ranges tile the file after the header stream.
    assert shards[0].byte_start == shards[0].header_end
    assert all(a.byte_end == b.byte_start for a, b in zip(shards, shards[1:]))
    assert shards[-1].byte_end == dump.stat().st_size
    read = [t for s in shards for t in _titles(s)]
    assert read == titles


def test_multistream_shard_keeps_the_site_info(multistream):
    dump, _, _ = multistream
    shard = plan_shards(dump, ShardConfig(pages_per_shard=40))[2]
    with open_shard(shard) as fh:
        assert mwxml.Dump.from_file(fh).site_info.dbname == "enwiki"


def test_truncated_multistream_names_the_byte_range(multistream, tmp_path):
    dump, index, _ = multistream
    cut = tmp_path / "cut-multistream.xml.bz2"
    data = dump.read_bytes()
    shards = plan_shards(dump, ShardConfig(pages_per_shard=40))
    # Cut inside the third shard's streams; its index entries still point there.
    cut.write_bytes(data[: shards[2].byte_start + 500])
    broken = shards[2].model_copy(update={"dump_path": str(cut)})
    with pytest.raises(PipelineInputError, match="truncated bz2 data in bytes") as err:
        _titles(broken)
    assert err.value.path == str(cut)
    # Planning refuses an index that points past the end of the file.
    with pytest.raises(PipelineInputError, match="past the end"):
        plan_shards(cut, ShardConfig(index_path=str(index)))


def test_utf16_dump_pages_are_counted():
    # gensim's Bulgarian excerpt is UTF-16 (it starts with a byte-order mark).
    assert count_pages(BG_DUMP) == 3


def test_missing_and_empty_dumps(tmp_path):
    with pytest.raises(PipelineInputError, match="does not exist") as err:
        plan_shards(tmp_path / "nope.xml.bz2")
    assert "nope.xml.bz2" in str(err.value)
    empty = tmp_path / "empty.xml"
    empty.write_bytes(b"")
    with pytest.raises(PipelineInputError, match="empty dump"):
        plan_shards(empty)
    no_pages = tmp_path / "nopages.xml.bz2"
    header, _, footer = _split_dump(embedded_dump_path())
    no_pages.write_bytes(bz2.compress(header + footer))
    with pytest.raises(PipelineInputError, match="no <page>"):
        plan_shards(no_pages)


def test_truncated_plain_bz2_is_reported_with_the_last_title(tmp_path):
    data = embedded_dump_path().read_bytes()
    cut = tmp_path / "cut.xml.bz2"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineInputError, match="truncated or corrupt") as err:
        plan_shards(cut)
    assert err.value.record  # the last title read before the cut
    assert err.value.record in str(err.value)
