"""Split a MediaWiki dump into shards that workers read independently.

Planning reads the dump at most once, and every shard starts reading at its
own place (a full English dump is ~22 GB compressed, so nothing here holds a
dump in memory, and no shard streams the dump from its start):

* multistream dumps (``...-multistream.xml.bz2`` plus its
  ``...-multistream-index.txt[.bz2]`` whose lines are ``offset:page_id:title``):
  a shard is a byte range covering whole bz2 streams (~100 pages each). A
  worker seeks to its range, decompresses the streams one after another and
  wraps them in the dump's header (the ``<mediawiki><siteinfo>`` of the first
  stream) and a closing tag, which makes a small valid XML document for mwxml.
* uncompressed UTF-8 ``.xml`` dumps (kind ``bytes``): planning records, in one
  streaming pass, the byte offset of every shard's first ``<page>`` and of the
  first ``<page>`` of all (the header's end); a worker reads the header and
  its own byte range and closes the document, as for a multistream shard.
* single-stream ``.xml.bz2`` dumps (and UTF-16 ones): bz2 cannot seek into
  decompressed offsets, so the one planning pass writes what a multistream
  dump would have (a header stream, bz2 streams of 100 pages, a closing
  stream, and the ``offset:page_id:title`` index) into a content-addressed
  folder of the work folder, keyed by the dump's fingerprint, and reused on
  the next run; the dump is then sharded as a multistream dump, cut at the
  same page ordinals as the page ranges below.
* without a work folder, a ``.xml.bz2`` dump falls back to page ordinals
  [start, stop) (kind ``pages``): every worker streams the dump from its start
  and keeps only its pages, so the whole dump is decompressed once per shard.

An export without a ``<siteinfo>`` block is read too (the namespace is on each
page's ``<ns>``): the reader gives mwxml an empty ``<siteinfo>``.

``IO_COUNTERS`` counts the bytes read from dump files and the bytes of XML
they gave (decompressed), for tests and benchmarks.
"""

from __future__ import annotations

import bz2
import codecs
import hashlib
import html
import io
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks.common import PipelineInputError, atomic_path, fingerprint, is_complete, mark_complete

from tasks.stage import retry_unless_final

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_TITLE = re.compile(rb"<title>([^<]*)</title>")
_ID = re.compile(rb"<id>(\d+)</id>")
_PAGE = b"<page>"
_PAGE_END = b"</page>"
_CLOSE = b"</mediawiki>"
# Bytes held back between chunks: enough for a tag cut by a chunk boundary,
# its indentation, and the closing tags at the end of the dump.
_HOLD = 4096
PAGES_PER_STREAM = 100  # as Wikimedia's multistream dumps
# Version of the multistream copy's format: part of its folder's key (not the
# code hash, so an edit of this file does not re-compress a 22 GB dump).
_REPACK_VERSION = "multistream-1"
REPACK_STAGE = "multistream"


class ShardConfig(BaseModel):
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


class Shard(BaseModel):
    """One independent unit of work over a dump."""

    model_config = ConfigDict(frozen=True)

    shard_id: int = Field(ge=0)
    dump_path: str
    index_path: str | None = None
    kind: Literal["streams", "bytes", "pages"]
    # kind == "streams": byte range [byte_start, byte_end) of whole bz2 streams,
    # and the end of the header stream (the first page stream's offset).
    # kind == "bytes": byte range [byte_start, byte_end) of whole pages of an
    # uncompressed dump, and the offset of its first <page> (the header's end).
    byte_start: int | None = None
    byte_end: int | None = None
    header_end: int | None = None
    # kind == "streams" cut at page ordinals: pages of the first stream before
    # the shard's first page, and the shard's page count (None: every page of
    # the byte range).
    skip_pages: int = Field(0, ge=0)
    take_pages: int | None = Field(None, ge=1)
    # kind == "pages": page ordinals [page_start, page_stop); page_stop None = to the end.
    page_start: int | None = None
    page_stop: int | None = None
    # Planned page count (informational; the funnel counts what is read).
    pages: int | None = None
    # The dump this shard was planned from, when dump_path is its multistream copy.
    source_path: str | None = None

    @property
    def name(self) -> str:
        if self.kind in ("streams", "bytes"):
            cut = f"-skip{self.skip_pages}-take{self.take_pages}" if self.take_pages is not None else ""
            return f"shard{self.shard_id:05d}-bytes{self.byte_start}-{self.byte_end}{cut}"
        return f"shard{self.shard_id:05d}-pages{self.page_start}-{self.page_stop if self.page_stop is not None else 'end'}"


# --------------------------------------------------------------------------
# I/O accounting.

IO_COUNTERS: dict[str, int] = {"file_bytes": 0, "xml_bytes": 0}
_IO_LOCK = threading.Lock()


def _count(file_bytes: int = 0, xml_bytes: int = 0) -> None:
    with _IO_LOCK:
        IO_COUNTERS["file_bytes"] += file_bytes
        IO_COUNTERS["xml_bytes"] += xml_bytes


def reset_io_counters() -> dict[str, int]:
    """Zero ``IO_COUNTERS``; return what they held."""
    with _IO_LOCK:
        before = dict(IO_COUNTERS)
        for key in IO_COUNTERS:
            IO_COUNTERS[key] = 0
    return before


# --------------------------------------------------------------------------
# Reading dump bytes.


def find_index(dump_path: str | os.PathLike) -> Path | None:
    """The multistream index beside a multistream dump, if there is one."""
    dump = Path(dump_path)
    name = dump.name
    for suffix in (".xml.bz2", ".bz2"):
        if name.endswith(suffix) and "multistream" in name:
            stem = name[: -len(suffix)]
            for cand in (f"{stem}-index.txt.bz2", f"{stem}-index.txt"):
                if (dump.parent / cand).is_file():
                    return dump.parent / cand
    return None


def _open_text(path: Path):
    if path.suffix == ".bz2":
        return io.TextIOWrapper(bz2.open(path, "rb"), encoding="utf-8")
    return path.open("r", encoding="utf-8")


def read_stream_offsets(index_path: str | os.PathLike) -> list[tuple[int, int]]:
    """(offset, pages in that stream) for each stream, in file order, from the index.

    Only one entry per stream is kept in memory (~230k for a full English dump).
    Errors give the line number, never the line (a title may be private text).
    """
    index = Path(index_path)
    if not index.is_file():
        raise PipelineInputError(index, "multistream index does not exist")
    offsets: list[tuple[int, int]] = []
    try:
        with _open_text(index) as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                head = line.split(":", 1)[0]
                if not head.isdigit():
                    raise PipelineInputError(index, f"line {lineno} is not 'offset:page_id:title'", record=f"line {lineno}")
                off = int(head)
                if offsets and offsets[-1][0] == off:
                    offsets[-1] = (off, offsets[-1][1] + 1)
                elif offsets and off < offsets[-1][0]:
                    raise PipelineInputError(index, f"offsets go backwards at line {lineno}", record=f"line {lineno}")
                else:
                    offsets.append((off, 1))
    except UnicodeDecodeError as exc:
        raise PipelineInputError(index, f"index is not UTF-8 text (byte {exc.start} of a block)") from None
    except (EOFError, OSError) as exc:
        raise PipelineInputError(index, f"cannot read index: {exc}") from exc
    if not offsets:
        raise PipelineInputError(index, "multistream index is empty")
    return offsets


def _detect_encoding(head: bytes) -> str:
    if head.startswith(b"\xff\xfe"):
        return "utf-16-le"
    if head.startswith(b"\xfe\xff"):
        return "utf-16-be"
    return "utf-8"


def _check_dump_file(path: Path) -> None:
    if not path.exists():
        raise PipelineInputError(path, "dump file does not exist")
    if not path.is_file():
        raise PipelineInputError(path, "dump path is not a file")
    if path.stat().st_size == 0:
        raise PipelineInputError(path, "empty dump (0 bytes)")


def _is_bz2(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(3) == b"BZh"


def open_dump_bytes(path: str | os.PathLike):
    """A binary stream of the dump's XML (bz2 decompressed on the fly)."""
    path = Path(path)
    _check_dump_file(path)
    if _is_bz2(path):
        return bz2.open(path, "rb")
    return path.open("rb")


def _read_chunks(path: Path, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Bytes of an uncompressed dump in [start, end), counted as read and as XML."""
    for raw in _raw_chunks(path, start, end):
        _count(xml_bytes=len(raw))
        yield raw


class _BadCompressedData(EOFError):
    """A cut or corrupt bz2 file (bad input, unlike an I/O error). An EOFError,
    as bz2.open raises for a cut file, so readers that name the page they were
    reading (tasks/extract_docs.py) catch it."""


def _decompressed(raw_chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Decompress concatenated bz2 streams, at most ``_CHUNK`` bytes at a
    time (a reader that stops early decompresses little more than it used),
    counted. A cut or corrupt input raises ``_BadCompressedData``."""
    dec = bz2.BZ2Decompressor()
    mid_stream = False  # the current decompressor has input but no end-of-stream yet
    for raw in raw_chunks:
        data = raw
        while True:
            try:
                out = dec.decompress(data, max_length=_CHUNK)
            except OSError as exc:
                raise _BadCompressedData(str(exc)) from exc
            mid_stream = mid_stream or bool(data)
            data = b""
            if out:
                _count(xml_bytes=len(out))
                yield out
            if dec.eof:
                data = dec.unused_data
                dec = bz2.BZ2Decompressor()
                mid_stream = False
                if not data:
                    break
            elif dec.needs_input:
                break
    if mid_stream:
        raise _BadCompressedData("compressed file ended before the end-of-stream marker was reached")


def _raw_chunks(path: Path, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Bytes of ``path`` in [start, end) as read from disk, counted."""
    with path.open("rb") as fh:
        fh.seek(start)
        remaining = None if end is None else end - start
        while remaining is None or remaining > 0:
            raw = fh.read(_CHUNK if remaining is None else min(_CHUNK, remaining))
            if not raw:
                break
            if remaining is not None:
                remaining -= len(raw)
            _count(file_bytes=len(raw))
            yield raw


def _dump_chunks(path: Path) -> Iterator[bytes]:
    """The dump's XML bytes (a bz2 file, concatenated streams included, is
    decompressed), counted. A cut or corrupt bz2 file raises ``_BadCompressedData``."""
    if _is_bz2(path):
        yield from _decompressed(_raw_chunks(path))
    else:
        yield from _read_chunks(path)


_XML_DECL_ENCODING = re.compile(rb"""^(<\?xml[^>]*?encoding\s*=\s*)["'][^"']*["']""")


def _as_utf8(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The XML re-encoded as UTF-8 (a UTF-16 dump has a byte-order mark)."""
    first = b""
    for first in chunks:
        if first:
            break
    encoding = _detect_encoding(first)
    if encoding == "utf-8":
        if first:
            yield first
        yield from chunks
        return
    decoder = codecs.getincrementaldecoder("utf-16")()  # reads and drops the byte-order mark
    head = decoder.decode(first).encode("utf-8")
    yield _XML_DECL_ENCODING.sub(rb'\1"utf-8"', head)
    for chunk in chunks:
        out = decoder.decode(chunk)
        if out:
            yield out.encode("utf-8")
    tail = decoder.decode(b"", final=True)
    if tail:
        yield tail.encode("utf-8")


def count_pages(dump_path: str | os.PathLike) -> int:
    """Count ``<page>`` tags in one streaming pass (no XML parse)."""
    path = Path(dump_path)
    _check_dump_file(path)
    pages = 0
    last_title: str | None = None
    tail = b""
    try:
        for chunk in _as_utf8(_dump_chunks(path)):
            buf = tail + chunk
            pages += buf.count(_PAGE) - tail.count(_PAGE)
            titles = _TITLE.findall(buf)
            if titles:
                last_title = titles[-1].decode("utf-8", "replace")
            tail = buf[-(len(_PAGE) - 1) :]
    except _BadCompressedData as exc:
        raise _truncated(path, pages, last_title, exc) from exc
    return pages


def _truncated(path: Path, pages: int, last_title: str | None, exc: BaseException) -> PipelineInputError:
    where = f"after page {pages}" + (f" ({last_title!r})" if last_title else "")
    return PipelineInputError(path, f"truncated or corrupt compressed data {where}: {exc}", record=last_title)


# --------------------------------------------------------------------------
# Cutting XML bytes at pages.


def split_pages(chunks: Iterator[bytes]) -> Iterator[tuple[int, bytes]]:
    """Cut a UTF-8 dump's bytes into parts, streaming: ``(part, data)`` with
    part -1 for the header (before the first ``<page>``), k >= 0 for the bytes
    of the k-th page (from the start of its ``<page>`` line to the next one),
    and -2 for the footer after the last ``</page>``. Joined, the data is the
    input, byte for byte; a part may come in several pieces, none empty.

    A literal ``<page>`` only occurs as the tag (XML text escapes ``<``).
    """
    part = -1
    next_page = 0
    buf = b""
    for chunk in chunks:
        buf = buf + chunk if buf else chunk
        start = 0
        pos = 0
        while (i := buf.find(_PAGE, pos)) >= 0:
            cut = i
            while cut > start and buf[cut - 1] in b" \t":
                cut -= 1
            if cut > start:
                yield part, buf[start:cut]
            part, next_page = next_page, next_page + 1
            start, pos = cut, i + len(_PAGE)
        hold = max(start, pos, len(buf) - _HOLD)
        if hold > start:
            yield part, buf[start:hold]
        buf = buf[hold:]
    if not buf:
        return
    end = buf.rfind(_PAGE_END) if part >= 0 else -1
    if end < 0:
        yield part, buf
        return
    end += len(_PAGE_END)
    if buf[end : end + 1] == b"\n":
        end += 1
    if end > 0:
        yield part, buf[:end]
    if end < len(buf):
        yield -2, buf[end:]


class _PageHead:
    """Title and id of the page being cut, from its first bytes."""

    def __init__(self) -> None:
        self.head = b""

    def add(self, data: bytes) -> None:
        if len(self.head) < 65536 and b"</id>" not in self.head:
            self.head += data[: 65536 - len(self.head)]

    def parse(self) -> tuple[str, str | None]:
        title = _TITLE.search(self.head)
        page_id = _ID.search(self.head)
        return (
            page_id.group(1).decode() if page_id else "0",
            html.unescape(title.group(1).decode("utf-8", "replace")) if title else None,
        )


def write_multistream(
    source_dump: str | os.PathLike,
    dump_out: str | os.PathLike,
    index_out: str | os.PathLike,
    pages_per_stream: int = PAGES_PER_STREAM,
    index_bz2: bool | None = None,
) -> dict[str, int]:
    """Re-pack a dump as Wikimedia does, in one streaming pass: a header
    stream, one bz2 stream per ``pages_per_stream`` pages, a closing stream,
    and the ``offset:page_id:title`` index (bz2 text if ``index_out`` ends in
    ``.bz2``, or ``index_bz2``). A UTF-16 dump is re-encoded as UTF-8. Returns page and stream
    counts. Bad input raises PipelineInputError naming the last page read."""
    source = Path(source_dump)
    _check_dump_file(source)
    pages = streams = 0
    last_title: str | None = None
    if index_bz2 is None:
        index_bz2 = str(index_out).endswith(".bz2")
    index_file = bz2.open(index_out, "wt", encoding="utf-8") if index_bz2 else open(index_out, "w", encoding="utf-8")
    with open(dump_out, "wb") as out, index_file as idx:
        comp: bz2.BZ2Compressor | None = None
        stream_offset = 0
        stream_pages = 0
        entries: list[str] = []
        page = _PageHead()
        current = None

        def end_stream() -> None:
            nonlocal comp, streams
            if comp is not None:
                out.write(comp.flush())
                streams += 1
                for entry in entries:
                    idx.write(f"{stream_offset}:{entry}\n")
                entries.clear()
                comp = None

        def end_page() -> None:
            nonlocal last_title
            page_id, title = page.parse()
            entries.append(f"{page_id}:{title or ''}")
            last_title = title or last_title

        try:
            for part, data in split_pages(_as_utf8(_dump_chunks(source))):
                if part != current:  # a new part starts with this piece
                    if current is not None and current >= 0:
                        end_page()
                    if part == -2 or current == -1 or (part >= 0 and stream_pages == pages_per_stream):
                        end_stream()
                    if comp is None:
                        comp = bz2.BZ2Compressor(9)
                        stream_offset, stream_pages = out.tell(), 0
                    if part >= 0:
                        pages += 1
                        stream_pages += 1
                        page = _PageHead()
                    current = part
                if part >= 0:
                    page.add(data)
                out.write(comp.compress(data))
            if current is not None and current >= 0:
                end_page()
            end_stream()
        except _BadCompressedData as exc:
            raise _truncated(source, pages, last_title, exc) from exc
    return {"pages": pages, "streams": streams}


def make_multistream(source_dump: str | os.PathLike, out_dir: str | os.PathLike, pages_per_stream: int = PAGES_PER_STREAM) -> tuple[Path, Path]:
    """A ``<stem>-multistream.xml.bz2`` dump and its ``-index.txt.bz2`` in
    ``out_dir`` (tests, and trying the sharded path on a small dump)."""
    source = Path(source_dump)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = source.name.split(".xml")[0].removesuffix(".bz2")
    dump = out_dir / f"{stem}-multistream.xml.bz2"
    index = out_dir / f"{stem}-multistream-index.txt.bz2"
    write_multistream(source, dump, index, pages_per_stream)
    return dump, index


def multistream_copy(dump_path: str | os.PathLike, work_dir: str | os.PathLike, pages_per_stream: int = PAGES_PER_STREAM) -> tuple[Path, Path]:
    """The dump's multistream copy and index in
    ``work_dir/stages/multistream/<key>/`` (key: the dump's fingerprint and
    the copy's format), written in one pass the first time, atomically, and
    reused afterwards. The copy keeps the dump's file name (the articles'
    ``source_dump``); the index is ``<name>.index.txt.bz2``."""
    dump = Path(dump_path)
    _check_dump_file(dump)
    key = {"dump": fingerprint(dump), "pages_per_stream": pages_per_stream, "format": _REPACK_VERSION}
    out = Path(work_dir) / "stages" / REPACK_STAGE / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    copy, index = out / dump.name, out / f"{dump.name}.index.txt.bz2"
    if is_complete(out) and copy.is_file() and index.is_file():
        return copy, index
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(copy) as tmp_copy, atomic_path(index) as tmp_index:
        counts = write_multistream(dump, tmp_copy, tmp_index, pages_per_stream, index_bz2=True)
    mark_complete(out, {"source": str(dump), "pages_per_stream": pages_per_stream, **counts})
    log.info("wrote a multistream copy of %s (%d pages, %d streams) to %s", dump, counts["pages"], counts["streams"], out)
    return copy, index


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
    _check_dump_file(dump)
    index = Path(config.index_path) if config.index_path else find_index(dump)
    if index is not None:
        shards = _plan_streams(dump, index, config)
    elif not _is_bz2(dump) and _plain_encoding(dump) == "utf-8":
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


def _plain_encoding(path: Path) -> str:
    with path.open("rb") as fh:
        return _detect_encoding(fh.read(2))


def _plan_streams(dump: Path, index: Path, config: ShardConfig, exact: bool = False, source: Path | None = None) -> list[Shard]:
    """Whole-stream shards of at least ``pages_per_shard`` pages; ``exact``:
    shards cut at page ordinals k * pages_per_shard, as ``plan_page_ranges``."""
    offsets = read_stream_offsets(index)
    size = dump.stat().st_size
    if offsets[-1][0] >= size:
        raise PipelineInputError(index, f"offset {offsets[-1][0]} is past the end of {dump} ({size} bytes)")
    common = {
        "dump_path": str(dump),
        "index_path": str(index),
        "kind": "streams",
        "header_end": offsets[0][0],
        "source_path": str(source) if source is not None else None,
    }
    return _plan_exact(offsets, size, config, common) if exact else _plan_whole_streams(offsets, size, config, common)


def _plan_whole_streams(offsets: list[tuple[int, int]], size: int, config: ShardConfig, common: dict) -> list[Shard]:
    shards: list[Shard] = []
    group_start, group_pages = None, 0
    for i, (off, n) in enumerate(offsets):
        if group_start is None:
            group_start = off
        group_pages += n
        last = i == len(offsets) - 1
        if group_pages >= config.pages_per_shard or last:
            # The last shard runs to the end of the file, which takes in the
            # closing stream (``</mediawiki>``); the reader ignores it.
            end = size if last else offsets[i + 1][0]
            shards.append(Shard(shard_id=len(shards), byte_start=group_start, byte_end=end, pages=group_pages, **common))
            group_start, group_pages = None, 0
    return shards


def _plan_exact(offsets: list[tuple[int, int]], size: int, config: ShardConfig, common: dict) -> list[Shard]:
    total = sum(n for _, n in offsets)
    per = config.pages_per_shard
    shards: list[Shard] = []
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
            Shard(
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


def _plan_bytes(dump: Path, config: ShardConfig) -> list[Shard]:
    """One pass over an uncompressed UTF-8 dump: the offset of every
    ``pages_per_shard``-th page, the header's end and the footer's start."""
    starts: list[int] = []
    offset = 0
    header_end = footer = None
    pages = 0
    current = None
    for part, data in split_pages(_read_chunks(dump)):
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
        Shard(
            shard_id=i,
            dump_path=str(dump),
            kind="bytes",
            byte_start=bounds[i],
            byte_end=bounds[i + 1],
            header_end=header_end,
            pages=min(config.pages_per_shard, pages - i * config.pages_per_shard),
        )
        for i in range(len(starts))
    ]


def plan_page_ranges(dump_path: str | os.PathLike, config: ShardConfig | None = None) -> list[Shard]:
    """Page ordinal ranges [start, stop) (one counting pass; each worker then
    streams the dump from its start: quadratic in the dump's size)."""
    config = config or ShardConfig()
    dump = Path(dump_path)
    total = count_pages(dump)
    if total == 0:
        raise PipelineInputError(dump, "empty dump: no <page> elements")
    shards = []
    for start in range(0, total, config.pages_per_shard):
        stop = min(start + config.pages_per_shard, total)
        shards.append(
            Shard(
                shard_id=len(shards),
                dump_path=str(dump),
                kind="pages",
                page_start=start,
                page_stop=None if stop == total else stop,
                pages=stop - start,
            )
        )
    return shards


# --------------------------------------------------------------------------
# Reading one shard as a valid XML document.


def iter_streams(path: str | os.PathLike, start: int, end: int) -> Iterator[bytes]:
    """Decompressed bytes of the concatenated bz2 streams in [start, end)."""
    path = Path(path)
    try:
        yield from _decompressed(_raw_chunks(path, start, end))
    except _BadCompressedData as exc:
        size = path.stat().st_size
        if end > size or "ended before" in str(exc):
            raise PipelineInputError(path, f"truncated bz2 data in bytes {start}-{end} (file has {size} bytes)") from exc
        raise PipelineInputError(path, f"corrupt bz2 stream in bytes {start}-{end}: {exc}") from exc
    if end > path.stat().st_size:
        raise PipelineInputError(path, f"truncated bz2 data in bytes {start}-{end} (file has {path.stat().st_size} bytes)")


class _ChainReader(io.RawIOBase):
    """A read-only binary file over an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()  # stop reading the dump (closes its file)
        super().close()


def _strip_close(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Drop a ``</mediawiki>`` closing tag that belongs to the last stream of the dump."""
    # The tag ends the dump, so holding back the last 64 bytes is enough.
    tail = b""
    for chunk in chunks:
        buf = tail + chunk
        tail = buf[-64:]
        if len(buf) > 64:
            yield buf[:-64]
    yield tail.replace(_CLOSE, b"")


def _select_pages(chunks: Iterator[bytes], skip: int, take: int) -> Iterator[bytes]:
    """Only the bytes of pages skip .. skip + take - 1 (ordinals within ``chunks``)."""
    for part, data in split_pages(chunks):
        if part >= skip + take or part == -2:
            return
        if part >= skip:
            yield data


_EMPTY_SITEINFO = b"\n  <siteinfo>\n  </siteinfo>"


def _header_with_siteinfo(header: bytes, path: str | os.PathLike) -> bytes:
    """The dump's header with an empty ``<siteinfo>`` when it has none (mwxml
    requires the block; pages carry their namespace in ``<ns>``)."""
    if b"<siteinfo" in header:
        return header
    start = header.find(b"<mediawiki")
    end = header.find(b">", start) if start >= 0 else -1
    if end < 0:
        raise PipelineInputError(path, "no <mediawiki> start tag before the first page (not a MediaWiki XML export?)")
    if header[end - 1 : end] == b"/":
        raise PipelineInputError(path, "empty dump: <mediawiki/> holds no pages")
    return header[: end + 1] + _EMPTY_SITEINFO + header[end + 1 :]


def _with_siteinfo(chunks: Iterator[bytes], path: str | os.PathLike) -> Iterator[bytes]:
    """A whole dump's bytes with ``_header_with_siteinfo`` applied to its header."""
    head = b""
    for chunk in chunks:
        head += chunk
        if b"<page" in head or b"<siteinfo" in head or len(head) > 16 * _CHUNK:
            break
    if head:
        cut = head.find(b"<page")
        cut = len(head) if cut < 0 else cut
        yield _header_with_siteinfo(head[:cut], path) + head[cut:]
    yield from chunks


def open_shard(shard: Shard):
    """A binary file of the shard's pages as a complete XML document.

    Multistream and byte ranges: header + the shard's bytes + ``</mediawiki>``.
    Page ranges: the whole dump stream (the reader skips other pages).
    """
    path = Path(shard.dump_path)
    if shard.kind == "pages":
        _check_dump_file(path)
        chunks = _with_siteinfo(_as_utf8(_dump_chunks(path)), path)
    else:
        if not path.is_file():
            raise PipelineInputError(path, "dump file does not exist")
        chunks = _multistream_chunks(shard) if shard.kind == "streams" else _byte_range_chunks(shard)
    return io.BufferedReader(_ChainReader(chunks), buffer_size=_CHUNK)


def _multistream_chunks(shard: Shard) -> Iterator[bytes]:
    header = b"".join(iter_streams(shard.dump_path, 0, shard.header_end))
    yield _header_with_siteinfo(header.replace(_CLOSE, b""), shard.dump_path)
    body = iter_streams(shard.dump_path, shard.byte_start, shard.byte_end)
    if shard.take_pages is not None:
        yield from _select_pages(body, shard.skip_pages, shard.take_pages)
    else:
        yield from _strip_close(body)
    yield b"\n" + _CLOSE + b"\n"


def _byte_range_chunks(shard: Shard) -> Iterator[bytes]:
    path = Path(shard.dump_path)
    size = path.stat().st_size
    if shard.byte_end > size:
        raise PipelineInputError(path, f"truncated dump: {shard.name} ends at byte {shard.byte_end}, the file has {size} bytes")
    header = b"".join(_read_chunks(path, 0, shard.header_end))
    yield _header_with_siteinfo(header, path)
    yield from _read_chunks(path, shard.byte_start, shard.byte_end)
    yield b"\n" + _CLOSE + b"\n"


@task(name="shard_dump", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_final)
def shard_dump(dump_path: str, config: ShardConfig, work_dir: str) -> list[Shard]:
    """Plan the dump's shards in one pass (multistream byte ranges; a plain
    dump's byte offsets, or a reused multistream copy of it under work_dir).

    Not a stage: it returns shard descriptions, not a folder. Its one output
    on disk, the multistream copy, has its own content-addressed folder."""
    return plan_shards(dump_path, config, work_dir=work_dir)
