"""Split a MediaWiki dump into shards that workers read independently.

Planning reads the dump at most once, and every shard starts reading at its
own place (no shard streams the dump from its start, except page ranges).
A shard is one of three kinds, each with only its own fields:

* ``StreamShard`` (multistream dumps: ``...-multistream.xml.bz2`` plus its
  ``...-multistream-index.txt[.bz2]`` whose lines are ``offset:page_id:title``):
  a byte range covering whole bz2 streams (~100 pages each). A worker seeks to
  its range, decompresses the streams one after another and wraps them in the
  dump's header (the ``<mediawiki><siteinfo>`` of the first stream) and a
  closing tag, which makes a small valid XML document for mwxml.
* ``ByteShard`` (uncompressed UTF-8 ``.xml`` dumps): planning records, in one
  streaming pass, the byte offset of every shard's first ``<page>`` and of the
  first ``<page>`` of all (the header's end); a worker reads the header and
  its own byte range and closes the document, as for a stream shard.
* single-stream ``.xml.bz2`` dumps (and UTF-16 ones) are re-packed once into a
  multistream copy in the work folder (tasks/multistream.py) and cut into
  ``StreamShard``s at the same page ordinals as the page ranges below.
* ``PageShard``: without a work folder, such a dump falls back to page ordinals
  [start, stop): every worker streams the dump from its start and keeps only
  its pages, so the whole dump is decompressed once per shard.

An export without a ``<siteinfo>`` block is read too (the namespace is on each
page's ``<ns>``): the reader gives mwxml an empty ``<siteinfo>``.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from tasks.common import PipelineInputError
from tasks.dump_reader import (
    CHUNK,
    CLOSE,
    IO_COUNTERS,
    ChainReader,
    as_utf8,
    check_dump_file,
    count_pages,
    dump_chunks,
    find_index,
    header_with_siteinfo,
    is_bz2,
    iter_streams,
    plain_encoding,
    read_chunks,
    read_stream_offsets,
    reset_io_counters,
    select_pages,
    split_pages,
    strip_close,
    with_siteinfo,
)
from tasks.multistream import PAGES_PER_STREAM, make_multistream, multistream_copy, write_multistream
from tasks.params_model import ParamsModel

log = logging.getLogger(__name__)


class ShardConfig(ParamsModel):
    """How to cut a dump into shards."""

    pages_per_shard: int = Field(
        1000, ge=1, le=10_000_000, description="Target number of pages per shard (multistream: rounded to whole bz2 streams of ~100 pages)."
    )
    index_path: str | None = Field(
        None,
        description="Multistream index (offset:page_id:title per line, .txt or .txt.bz2). "
        "Empty: look for '<dump stem>-index.txt[.bz2]' beside a '-multistream' dump, else shard by page ranges.",
    )
    max_shards: int | None = Field(
        None, ge=1, description="Keep only the first N shards (a quick partial run); empty for all."
    )


# --------------------------------------------------------------------------
# The kinds of shard.


class Shard(BaseModel):
    """One independent unit of work over a dump: a ``StreamShard``, ``ByteShard``
    or ``PageShard``, told apart by ``kind``. ``Shard(kind=..., ...)`` and
    ``Shard.model_validate`` build the kind named."""

    model_config = ConfigDict(frozen=True)

    kind: str
    shard_id: int = Field(ge=0)
    dump_path: str
    pages: int | None = None  # planned page count (informational; the funnel counts what is read)

    def __new__(cls, *args: Any, **data: Any):
        if cls is Shard:
            kind = _KINDS.get(data.get("kind"))
            if kind is None:
                return _ANY_SHARD.validate_python(data)  # raises: names the kinds there are
            cls = kind
        return super().__new__(cls)

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> Shard:
        return _ANY_SHARD.validate_python(obj, **kwargs) if cls is Shard else super().model_validate(obj, **kwargs)

    @classmethod
    def model_validate_json(cls, data: str | bytes, **kwargs: Any) -> Shard:
        return _ANY_SHARD.validate_json(data, **kwargs) if cls is Shard else super().model_validate_json(data, **kwargs)

    @property
    def name(self) -> str:
        raise NotImplementedError

    def files(self) -> list[str]:
        """The files this shard is read from (what its extract_docs run is keyed on)."""
        return [self.dump_path]

    def page_window(self) -> tuple[int, int | None]:
        """Ordinals [start, stop) of the pages of ``xml_chunks`` that belong to the shard (stop None: to the end)."""
        return 0, None

    def xml_chunks(self) -> Iterator[bytes]:
        """The shard's pages as the bytes of one complete XML document."""
        raise NotImplementedError


class _ByteRange(Shard):
    # byte range [byte_start, byte_end) of the shard's bytes, and the end of the
    # dump's header (the first page's offset)
    byte_start: int
    byte_end: int
    header_end: int

    def _range_name(self, cut: str = "") -> str:
        return f"shard{self.shard_id:05d}-bytes{self.byte_start}-{self.byte_end}{cut}"

    def xml_chunks(self) -> Iterator[bytes]:
        path = Path(self.dump_path)
        if not path.is_file():
            raise PipelineInputError(path, "dump file does not exist")
        return self._chunks()

    def _chunks(self) -> Iterator[bytes]:
        raise NotImplementedError


class StreamShard(_ByteRange):
    """Whole bz2 streams of a multistream dump: header stream + the range + ``</mediawiki>``."""

    kind: Literal["streams"] = "streams"
    index_path: str
    # Cut at page ordinals: pages of the first stream before the shard's first
    # page, and the shard's page count (None: every page of the byte range).
    skip_pages: int = Field(0, ge=0)
    take_pages: int | None = Field(None, ge=1)
    # The dump this shard was planned from, when dump_path is its multistream copy.
    source_path: str | None = None

    @property
    def name(self) -> str:
        return self._range_name(f"-skip{self.skip_pages}-take{self.take_pages}" if self.take_pages is not None else "")

    def files(self) -> list[str]:
        return [self.dump_path, self.index_path]

    def _chunks(self) -> Iterator[bytes]:
        header = b"".join(iter_streams(self.dump_path, 0, self.header_end))
        yield header_with_siteinfo(header.replace(CLOSE, b""), self.dump_path)
        body = iter_streams(self.dump_path, self.byte_start, self.byte_end)
        if self.take_pages is not None:
            yield from select_pages(body, self.skip_pages, self.take_pages)
        else:
            yield from strip_close(body)
        yield b"\n" + CLOSE + b"\n"


class ByteShard(_ByteRange):
    """Whole pages of an uncompressed UTF-8 dump: header + the range + ``</mediawiki>``."""

    kind: Literal["bytes"] = "bytes"

    @property
    def name(self) -> str:
        return self._range_name()

    def _chunks(self) -> Iterator[bytes]:
        path = Path(self.dump_path)
        size = path.stat().st_size
        if self.byte_end > size:
            raise PipelineInputError(path, f"truncated dump: {self.name} ends at byte {self.byte_end}, the file has {size} bytes")
        header = b"".join(read_chunks(path, 0, self.header_end))
        yield header_with_siteinfo(header, path)
        yield from read_chunks(path, self.byte_start, self.byte_end)
        yield b"\n" + CLOSE + b"\n"


class PageShard(Shard):
    """Page ordinals [page_start, page_stop) of a dump read from its start (page_stop None: to the end)."""

    kind: Literal["pages"] = "pages"
    page_start: int = Field(0, ge=0)
    page_stop: int | None = None

    @property
    def name(self) -> str:
        return f"shard{self.shard_id:05d}-pages{self.page_start}-{self.page_stop if self.page_stop is not None else 'end'}"

    def page_window(self) -> tuple[int, int | None]:
        return self.page_start, self.page_stop

    def xml_chunks(self) -> Iterator[bytes]:
        path = Path(self.dump_path)
        check_dump_file(path)
        return with_siteinfo(as_utf8(dump_chunks(path)), path)


_KINDS: dict[str, type[Shard]] = {"streams": StreamShard, "bytes": ByteShard, "pages": PageShard}
_ANY_SHARD: TypeAdapter[Shard] = TypeAdapter(Annotated[Union[StreamShard, ByteShard, PageShard], Field(discriminator="kind")])


def open_shard(shard: Shard):
    """A binary file of the shard's pages as a complete XML document (a page
    shard's is the whole dump: its reader keeps the pages of ``page_window``)."""
    return io.BufferedReader(ChainReader(shard.xml_chunks()), buffer_size=CHUNK)


# --------------------------------------------------------------------------
# Planning.


def plan_shards(
    dump_path: str | os.PathLike, config: ShardConfig | None = None, work_dir: str | os.PathLike | None = None
) -> list[Shard]:
    """Shards covering the whole dump, in page order, planned in at most one pass.

    ``work_dir`` holds the multistream copy of a single-stream ``.xml.bz2``
    (or UTF-16) dump; without it such a dump is cut into page ordinal ranges
    (each worker then streams the dump from its start).
    """
    config = config or ShardConfig()
    dump = Path(dump_path)
    check_dump_file(dump)
    index = Path(config.index_path) if config.index_path else find_index(dump)
    if index is not None:
        shards = _plan_streams(dump, index, config)
    elif not is_bz2(dump) and plain_encoding(dump) == "utf-8":
        shards = _plan_bytes(dump, config)
    elif work_dir is not None:
        copy, copy_index = multistream_copy(dump, work_dir)
        shards = _plan_streams(copy, copy_index, config, exact=True, source=dump)
    else:
        log.warning("%s: no multistream index and no work folder: page-range shards, each streams the dump from its start", dump)
        shards = plan_page_ranges(dump, config)
    if config.max_shards is not None:
        shards = shards[: config.max_shards]
    return shards


def _plan_streams(dump: Path, index: Path, config: ShardConfig, exact: bool = False, source: Path | None = None) -> list[StreamShard]:
    """Whole-stream shards of about ``pages_per_shard`` pages; ``exact``:
    shards cut at page ordinals k * pages_per_shard, as ``plan_page_ranges``."""
    offsets = read_stream_offsets(index)
    size = dump.stat().st_size
    if offsets[-1][0] >= size:
        raise PipelineInputError(index, f"offset {offsets[-1][0]} is past the end of {dump} ({size} bytes)")
    common = {
        "dump_path": str(dump),
        "index_path": str(index),
        "header_end": offsets[0][0],
        "source_path": str(source) if source is not None else None,
    }
    return _plan_exact(offsets, size, config, common) if exact else _plan_whole_streams(offsets, size, config, common)


def _plan_whole_streams(offsets: list[tuple[int, int]], size: int, config: ShardConfig, common: dict) -> list[StreamShard]:
    """Consecutive streams grouped until a group holds ``pages_per_shard`` pages; the
    remainder and the group before it are then split evenly, so no shard is a sliver
    that leaves a worker idle while another reads a whole shard (1,030 pages in 100-page
    streams: 500 + 530 pages, not 1,000 + 30)."""
    groups: list[list[int]] = [[]]
    pages = 0
    for i, (_, n) in enumerate(offsets):
        if pages >= config.pages_per_shard:
            groups.append([])
            pages = 0
        groups[-1].append(i)
        pages += n
    if len(groups) >= 2:
        tail = groups[-2] + groups[-1]
        counts = [offsets[i][1] for i in tail]
        total, before = sum(counts), 0
        best_cut, best_gap = len(groups[-2]), total
        for cut in range(1, len(tail)):
            before += counts[cut - 1]
            if abs(total - 2 * before) < best_gap:
                best_cut, best_gap = cut, abs(total - 2 * before)
        groups[-2:] = [tail[:best_cut], tail[best_cut:]]
    shards: list[StreamShard] = []
    for group in groups:
        first, last = group[0], group[-1]
        # The last shard runs to the end of the file, which takes in the
        # closing stream (``</mediawiki>``); the reader ignores it.
        end = size if last == len(offsets) - 1 else offsets[last + 1][0]
        shards.append(StreamShard(shard_id=len(shards), byte_start=offsets[first][0], byte_end=end,
                                  pages=sum(offsets[i][1] for i in group), **common))
    return shards


def _plan_exact(offsets: list[tuple[int, int]], size: int, config: ShardConfig, common: dict) -> list[StreamShard]:
    total = sum(n for _, n in offsets)
    per = config.pages_per_shard
    shards: list[StreamShard] = []
    s = 0  # the stream holding the shard's first page
    first = 0  # ordinal of stream s's first page
    for start in range(0, total, per):
        while first + offsets[s][1] <= start:
            first += offsets[s][1]
            s += 1
        stop = min(start + per, total)
        t, t_first = s, first  # the stream holding the shard's last page
        while t_first + offsets[t][1] < stop:
            t_first += offsets[t][1]
            t += 1
        end = size if t == len(offsets) - 1 else offsets[t + 1][0]
        shards.append(
            StreamShard(
                shard_id=len(shards),
                byte_start=offsets[s][0],
                byte_end=end,
                skip_pages=start - first,
                take_pages=stop - start,
                pages=stop - start,
                **common,
            )
        )
    return shards


def _plan_bytes(dump: Path, config: ShardConfig) -> list[ByteShard]:
    """One pass over an uncompressed UTF-8 dump: the offset of every
    ``pages_per_shard``-th page, the header's end and the footer's start."""
    starts: list[int] = []
    offset = 0
    header_end = footer = None
    pages = 0
    current = None
    for part, data in split_pages(read_chunks(dump)):
        if part != current:
            if part >= 0:
                if part == 0:
                    header_end = offset
                if part % config.pages_per_shard == 0:
                    starts.append(offset)
                pages += 1
            elif part == -2:
                footer = offset
            current = part
        offset += len(data)
    if pages == 0 or header_end is None:
        raise PipelineInputError(dump, "empty dump: no <page> elements")
    end = footer if footer is not None else offset
    bounds = starts + [end]
    return [
        ByteShard(
            shard_id=i,
            dump_path=str(dump),
            byte_start=bounds[i],
            byte_end=bounds[i + 1],
            header_end=header_end,
            pages=min(config.pages_per_shard, pages - i * config.pages_per_shard),
        )
        for i in range(len(starts))
    ]


def plan_page_ranges(dump_path: str | os.PathLike, config: ShardConfig | None = None) -> list[PageShard]:
    """Page ordinal ranges [start, stop) (one counting pass; each worker then
    streams the dump from its start: quadratic in the dump's size)."""
    config = config or ShardConfig()
    dump = Path(dump_path)
    total = count_pages(dump)
    if total == 0:
        raise PipelineInputError(dump, "empty dump: no <page> elements")
    shards: list[PageShard] = []
    for start in range(0, total, config.pages_per_shard):
        stop = min(start + config.pages_per_shard, total)
        shards.append(
            PageShard(
                shard_id=len(shards),
                dump_path=str(dump),
                page_start=start,
                page_stop=None if stop == total else stop,
                pages=stop - start,
            )
        )
    return shards


# --------------------------------------------------------------------------


def shard_dump(dump_path: str, config: ShardConfig, work_dir: str) -> list[Shard]:
    """Plan the dump's shards in one pass (multistream byte ranges; a plain
    dump's byte offsets, or a reused multistream copy of it under work_dir).

    Not a stage: it returns shard descriptions, not a folder. Its one output
    on disk, the multistream copy, has its own content-addressed folder.
    build-rir-dataset runs it as a Prefect task (flows/build_rir_dataset.py)."""
    return plan_shards(dump_path, config, work_dir=work_dir)


__all__ = [
    "IO_COUNTERS", "PAGES_PER_STREAM", "ByteShard", "PageShard", "Shard", "ShardConfig", "StreamShard", "count_pages",
    "find_index", "make_multistream", "multistream_copy", "open_shard", "plan_page_ranges", "plan_shards",
    "read_stream_offsets", "reset_io_counters", "shard_dump", "split_pages", "write_multistream",
]
