"""Shard planning and reading: bz2 streams for multistream dumps, byte ranges
for uncompressed dumps, a multistream copy for single-stream .xml.bz2 dumps
(page ranges without a work folder), all read as the page ranges were."""

from __future__ import annotations

import bz2
import json
import pickle
import re
from pathlib import Path

import mwxml
import pytest
from fixtures_dumps import page_record, reference_pages, repeated_dump, without_siteinfo

from tasks.assets import embedded_dump_path
from tasks.common import SUCCESS_MARKER, PipelineInputError
from tasks.extract_docs import _iter_shard_pages
from tasks.shard import (
    Shard,
    ShardConfig,
    count_pages,
    find_index,
    make_multistream,
    open_shard,
    plan_page_ranges,
    plan_shards,
    read_stream_offsets,
    reset_io_counters,
    split_pages,
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
    assert all(s.kind == "pages" and not hasattr(s, "index_path") for s in shards)


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
    # The 6-page remainder and the shard before it are split evenly, at a stream boundary.
    assert [s.pages for s in shards] == [40, 40, 40, 40, 20, 26]
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


# --------------------------------------------------------------------------
# One planning pass; every shard reads only its own part.


def _pages(shards: list[Shard]) -> list[list[tuple]]:
    """Each shard's pages as the extraction stage reads them."""
    return [[page_record(p, r) for p, r in _iter_shard_pages(s)] for s in shards]


def _ranges(shards: list[Shard]) -> list[tuple[int, int | None]]:
    return [(s.page_start, s.page_stop) for s in shards]


@pytest.mark.parametrize("pages_per_shard", [50, 30])  # 30: shards start and end inside 100-page streams
@pytest.mark.parametrize("form", ["xml.bz2", "xml"])
def test_one_pass_shards_hold_the_same_pages_as_page_ranges(form, pages_per_shard, embedded_plain_xml, tmp_path):
    dump = embedded_dump_path() if form == "xml.bz2" else embedded_plain_xml
    config = ShardConfig(pages_per_shard=pages_per_shard)
    old = plan_page_ranges(dump, config)
    new = plan_shards(dump, config, work_dir=tmp_path)
    assert [s.kind for s in new] == ["streams" if form == "xml.bz2" else "bytes"] * len(old)
    assert [s.pages for s in new] == [s.pages for s in old]
    expected = reference_pages(embedded_dump_path(), _ranges(old))
    assert sum(map(len, expected)) == 206
    # Ids, titles, namespaces, revisions and text, shard by shard, in order.
    assert _pages(new) == expected
    if pages_per_shard == 50:  # today's reader itself (quadratic: once is enough)
        assert _pages(old) == expected


def test_uncompressed_dump_byte_ranges_tile_the_pages(embedded_plain_xml):
    shards = plan_shards(embedded_plain_xml, ShardConfig(pages_per_shard=50))
    xml = embedded_plain_xml.read_bytes()
    assert shards[0].byte_start == shards[0].header_end == xml.index(b"  <page>")
    assert all(a.byte_end == b.byte_start for a, b in zip(shards, shards[1:]))
    assert shards[-1].byte_end == xml.rindex(b"</page>\n") + len(b"</page>\n")
    assert all(xml[s.byte_start : s.byte_end].count(b"<page>") == s.pages for s in shards)
    # No work folder is needed, and nothing is written.
    assert all(s.kind == "bytes" and not hasattr(s, "index_path") and not hasattr(s, "source_path") for s in shards)


def _chunked(data: bytes, size: int):
    return iter(data[i : i + size] for i in range(0, len(data), size))


def _joined(parts) -> dict[int, bytes]:
    joined: dict[int, bytes] = {}
    for part, data in parts:
        assert data
        joined[part] = joined.get(part, b"") + data
    return joined


def test_split_pages_keeps_every_byte_at_any_chunking(embedded_plain_xml):
    xml = embedded_plain_xml.read_bytes()
    head = xml[: xml.index(b"  <page>") + 30_000]  # the header and a few pages
    whole = _joined(split_pages(iter([head])))
    assert set(whole) == {-1, 0, 1} and b"".join(whole.values()) == head
    for size in (1, 3, 7):
        assert _joined(split_pages(_chunked(head, size))) == whole
    for size in (4096, 1 << 16, 1 << 20):
        parts = list(split_pages(_chunked(xml, size)))
        assert b"".join(d for _, d in parts) == xml
        joined = _joined(parts)
        assert joined[-1].endswith(b"</siteinfo>\n") and joined[-2] == b"</mediawiki>\n"
        assert all(joined[k].startswith(b"  <page>") and joined[k].endswith(b"</page>\n") for k in range(206))
        assert sorted(joined) == [-2, -1, *range(206)]


def test_single_stream_bz2_gets_a_reused_multistream_copy(tmp_path):
    dump = embedded_dump_path()
    shards = plan_shards(dump, ShardConfig(pages_per_shard=50), work_dir=tmp_path)
    copy = Path(shards[0].dump_path)
    folder = copy.parent
    assert folder.parent == tmp_path / "stages" / "multistream"
    assert copy.name == dump.name  # the articles' source_dump stays the dump's name
    assert shards[0].source_path == str(dump) and shards[0].index_path == str(folder / f"{dump.name}.index.txt.bz2")
    assert json.loads((folder / SUCCESS_MARKER).read_text())["pages"] == 206
    assert [n for _, n in read_stream_offsets(shards[0].index_path)] == [100, 100, 6]
    # The copy decompresses to the dump's XML, byte for byte; only the streams differ.
    assert bz2.decompress(copy.read_bytes()) == bz2.decompress(dump.read_bytes())
    assert [f.name for f in folder.iterdir() if f.name.startswith(".")] == []
    # The next run reuses it: nothing is decompressed but the index.
    mtime = copy.stat().st_mtime_ns
    reset_io_counters()
    again = plan_shards(dump, ShardConfig(pages_per_shard=50), work_dir=tmp_path)
    assert again == shards and copy.stat().st_mtime_ns == mtime
    assert reset_io_counters() == {"file_bytes": 0, "xml_bytes": 0}


def test_shards_survive_serialisation(embedded_plain_xml, tmp_path):
    shards = (
        plan_shards(embedded_dump_path(), ShardConfig(pages_per_shard=60), work_dir=tmp_path)
        + plan_shards(embedded_plain_xml, ShardConfig(pages_per_shard=60))
        + plan_page_ranges(embedded_dump_path(), ShardConfig(pages_per_shard=60))
    )
    assert {s.kind for s in shards} == {"streams", "bytes", "pages"}
    for s in shards:
        assert Shard.model_validate_json(s.model_dump_json()) == s
        assert Shard.model_validate(json.loads(s.model_dump_json())) == s
        assert pickle.loads(pickle.dumps(s)) == s
    assert len({s.name for s in shards}) == len(shards)


def _bytes_for_all_shards(dump: Path, config: ShardConfig, work_dir: Path | None, legacy: bool = False) -> tuple[dict, int]:
    """(bytes read from files and bytes of XML they gave, planning and then
    reading every shard; pages read). A one-pass shard is read to its end (its
    document holds only its pages); a page range as the extraction stage
    reads it (up to its last page)."""
    reset_io_counters()
    if legacy:
        pages = sum(len(p) for p in _pages(plan_page_ranges(dump, config)))
    else:
        pages = 0
        for shard in plan_shards(dump, config, work_dir=work_dir):
            with open_shard(shard) as fh:
                pages += fh.read().count(b"<page>")
    return reset_io_counters(), pages


@pytest.mark.parametrize("form", ["xml.bz2", "xml"])
def test_planning_and_reading_grow_linearly_with_the_dump(form, tmp_path):
    """A 10x dump costs ~10x the bytes (today's page ranges: ~quadratic)."""
    compress = form == "xml.bz2"
    # The excerpt's first 40 pages (400 kB of XML) x 5 and x 50: 200 and 2,000 pages.
    small = repeated_dump(embedded_dump_path(), tmp_path / f"x1.{form}", copies=5, compress=compress, pages=40)
    big = repeated_dump(embedded_dump_path(), tmp_path / f"x10.{form}", copies=50, compress=compress, pages=40)
    config = ShardConfig(pages_per_shard=100)
    io1, pages1 = _bytes_for_all_shards(small, config, tmp_path / "w1")
    io10, pages10 = _bytes_for_all_shards(big, config, tmp_path / "w10")
    assert (pages1, pages10) == (200, 2000)
    xml1 = len(bz2.decompress(small.read_bytes())) if compress else small.stat().st_size
    for key in ("file_bytes", "xml_bytes"):
        assert 9 * io1[key] <= io10[key] <= 11 * io1[key], (key, io1, io10)
    # Planning reads the dump once and the shards read it once more in all
    # (bz2: planning also writes the copy; the shards read the copy).
    assert io1["xml_bytes"] <= 2.1 * xml1
    # The measure is not blind: today's page ranges of 25 pages read the 200
    # pages ~4.5 times over (every shard streams the dump up to its last page).
    legacy1, _ = _bytes_for_all_shards(small, ShardConfig(pages_per_shard=25), None, legacy=True)
    assert legacy1["xml_bytes"] >= 4 * xml1


# --------------------------------------------------------------------------
# Exports without <siteinfo>, UTF-16 dumps, index errors.


def test_export_without_siteinfo_is_read_by_every_kind_of_shard(tmp_path):
    config = ShardConfig(pages_per_shard=120)  # two shards, the second starts inside a stream
    expected = reference_pages(embedded_dump_path(), _ranges(plan_page_ranges(embedded_dump_path(), config)))
    stripped_bz2 = without_siteinfo(embedded_dump_path(), tmp_path / "nosite.xml.bz2")
    stripped_xml = without_siteinfo(embedded_dump_path(), tmp_path / "nosite.xml", compress=False)
    multistream, _ = make_multistream(stripped_bz2, tmp_path / "ms", pages_per_stream=20)
    plans = {
        "streams (copy)": plan_shards(stripped_bz2, config, work_dir=tmp_path / "work"),
        "bytes": plan_shards(stripped_xml, config),
        "pages": plan_page_ranges(stripped_bz2, config),
        "streams (multistream dump)": plan_shards(multistream, ShardConfig(pages_per_shard=60)),
    }
    assert [s[0].kind for s in plans.values()] == ["streams", "bytes", "pages", "streams"]
    for name, shards in plans.items():
        read = _pages(shards)
        # Namespaces come from each page's <ns>: the same records as with the siteinfo.
        assert [r for shard in read for r in shard] == [r for shard in expected for r in shard], name
    with open_shard(plans["bytes"][1]) as fh:
        assert mwxml.Dump.from_file(fh).site_info.dbname is None


def test_a_file_that_is_not_a_mediawiki_export_is_refused(tmp_path):
    bogus = tmp_path / "bogus.xml"
    bogus.write_bytes(b"<root>\n  <page>\n    <title>A</title>\n  </page>\n</root>\n")
    (shard,) = plan_shards(bogus)
    with pytest.raises(PipelineInputError, match="no <mediawiki> start tag"):
        _pages([shard])


def test_utf16_dump_gets_a_utf8_multistream_copy(tmp_path):
    config = ShardConfig(pages_per_shard=2)
    shards = plan_shards(BG_DUMP, config, work_dir=tmp_path)
    assert [(s.kind, s.pages) for s in shards] == [("streams", 2), ("streams", 1)]
    assert bz2.decompress(Path(shards[0].dump_path).read_bytes()).decode("utf-8") == bz2.decompress(BG_DUMP.read_bytes()).decode("utf-16")
    expected = reference_pages(BG_DUMP, _ranges(plan_page_ranges(BG_DUMP, config)))
    assert _pages(shards) == expected == _pages(plan_page_ranges(BG_DUMP, config))


def test_index_errors_give_the_line_number_not_the_line(tmp_path):
    index = tmp_path / "x-multistream-index.txt"
    index.write_text("600:10:AccessibleComputing\nprivate note: Jane Roe's diagnosis\n")
    with pytest.raises(PipelineInputError, match=r"line 2 is not 'offset:page_id:title'") as err:
        read_stream_offsets(index)
    assert "Jane" not in str(err.value) and "Jane" not in (err.value.record or "")
    index.write_text("600:10:A\n500:11:Secret title\n")
    with pytest.raises(PipelineInputError, match="offsets go backwards at line 2") as err:
        read_stream_offsets(index)
    assert "Secret" not in str(err.value)


def test_a_cut_single_stream_dump_leaves_no_copy_behind(tmp_path):
    data = embedded_dump_path().read_bytes()
    cut = tmp_path / "cut.xml.bz2"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineInputError, match="truncated or corrupt") as err:
        plan_shards(cut, work_dir=tmp_path / "work")
    assert err.value.record and err.value.record in str(err.value)
    (folder,) = (tmp_path / "work" / "stages" / "multistream").iterdir()
    assert list(folder.iterdir()) == []  # no marker, no copy, no temporary file
