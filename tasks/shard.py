"""Split a MediaWiki dump into shards that workers read independently.

Two kinds of shard, both streamed (a full English dump is ~22 GB compressed,
so nothing here holds a dump in memory):

* multistream dumps (``...-multistream.xml.bz2`` plus its
  ``...-multistream-index.txt[.bz2]`` whose lines are ``offset:page_id:title``):
  a shard is a byte range covering whole bz2 streams (~100 pages each). A
  worker seeks to its range, decompresses the streams one after another and
  wraps them in the dump's header (the ``<mediawiki><siteinfo>`` of the first
  stream) and a closing tag, which makes a small valid XML document for mwxml.
* plain ``.xml`` / ``.xml.bz2`` dumps: a shard is a range of page ordinals
  [start, stop); a worker streams the dump and keeps only its pages. Planning
  counts ``<page>`` tags in one streaming pass.
"""

from __future__ import annotations

import bz2
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import BaseModel, ConfigDict, Field

from tasks.common import PipelineInputError, retry_unless_bad_input

_CHUNK = 1 << 20
_TITLE = re.compile(rb"<title>([^<]*)</title>")


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
    kind: Literal["streams", "pages"]
    # kind == "streams": byte range [byte_start, byte_end) of whole bz2 streams,
    # and the end of the header stream (the first page stream's offset).
    byte_start: int | None = None
    byte_end: int | None = None
    header_end: int | None = None
    # kind == "pages": page ordinals [page_start, page_stop); page_stop None = to the end.
    page_start: int | None = None
    page_stop: int | None = None
    # Planned page count (informational; the funnel counts what is read).
    pages: int | None = None

    @property
    def name(self) -> str:
        if self.kind == "streams":
            return f"shard{self.shard_id:05d}-bytes{self.byte_start}-{self.byte_end}"
        return f"shard{self.shard_id:05d}-pages{self.page_start}-{self.page_stop if self.page_stop is not None else 'end'}"


# --------------------------------------------------------------------------
# Planning.


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
                    raise PipelineInputError(index, f"line {lineno} is not 'offset:page_id:title'", record=line.strip()[:80])
                off = int(head)
                if offsets and offsets[-1][0] == off:
                    offsets[-1] = (off, offsets[-1][1] + 1)
                elif offsets and off < offsets[-1][0]:
                    raise PipelineInputError(index, f"offsets go backwards at line {lineno}", record=line.strip()[:80])
                else:
                    offsets.append((off, 1))
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


def open_dump_bytes(path: str | os.PathLike):
    """A binary stream of the dump's XML (bz2 decompressed on the fly)."""
    path = Path(path)
    if not path.exists():
        raise PipelineInputError(path, "dump file does not exist")
    if not path.is_file():
        raise PipelineInputError(path, "dump path is not a file")
    if path.stat().st_size == 0:
        raise PipelineInputError(path, "empty dump (0 bytes)")
    with path.open("rb") as fh:
        magic = fh.read(3)
    if magic == b"BZh":
        return bz2.open(path, "rb")
    return path.open("rb")


def count_pages(dump_path: str | os.PathLike) -> int:
    """Count ``<page>`` tags in one streaming pass (no XML parse)."""
    path = Path(dump_path)
    pages = 0
    last_title: str | None = None
    with open_dump_bytes(path) as fh:
        try:
            first = fh.read(_CHUNK)
            encoding = _detect_encoding(first)
            tag = "<page>".encode(encoding)
            if encoding != "utf-8":
                tag = tag.removeprefix(b"\xff\xfe").removeprefix(b"\xfe\xff")
            tail = b""
            chunk = first
            while chunk:
                buf = tail + chunk
                pages += buf.count(tag) - tail.count(tag)
                if encoding == "utf-8":
                    titles = _TITLE.findall(buf)
                    if titles:
                        last_title = titles[-1].decode("utf-8", "replace")
                tail = buf[-(len(tag) - 1) :]
                chunk = fh.read(_CHUNK)
        except (EOFError, OSError) as exc:
            where = f"after page {pages}" + (f" ({last_title!r})" if last_title else "")
            raise PipelineInputError(path, f"truncated or corrupt compressed data {where}: {exc}", record=last_title) from exc
    return pages


def plan_shards(dump_path: str | os.PathLike, config: ShardConfig | None = None) -> list[Shard]:
    """Shards covering the whole dump, in page order."""
    config = config or ShardConfig()
    dump = Path(dump_path)
    if not dump.exists():
        raise PipelineInputError(dump, "dump file does not exist")
    if dump.stat().st_size == 0:
        raise PipelineInputError(dump, "empty dump (0 bytes)")
    index = Path(config.index_path) if config.index_path else find_index(dump)
    shards = _plan_streams(dump, index, config) if index is not None else _plan_pages(dump, config)
    if config.max_shards is not None:
        shards = shards[: config.max_shards]
    return shards


def _plan_streams(dump: Path, index: Path, config: ShardConfig) -> list[Shard]:
    offsets = read_stream_offsets(index)
    size = dump.stat().st_size
    if offsets[-1][0] >= size:
        raise PipelineInputError(index, f"offset {offsets[-1][0]} is past the end of {dump} ({size} bytes)")
    header_end = offsets[0][0]
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
            shards.append(
                Shard(
                    shard_id=len(shards),
                    dump_path=str(dump),
                    index_path=str(index),
                    kind="streams",
                    byte_start=group_start,
                    byte_end=end,
                    header_end=header_end,
                    pages=group_pages,
                )
            )
            group_start, group_pages = None, 0
    return shards


def _plan_pages(dump: Path, config: ShardConfig) -> list[Shard]:
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
# Reading one multistream shard as a valid XML document.


def iter_streams(path: str | os.PathLike, start: int, end: int) -> Iterator[bytes]:
    """Decompressed bytes of the concatenated bz2 streams in [start, end)."""
    path = Path(path)
    with path.open("rb") as fh:
        fh.seek(start)
        remaining = end - start
        dec = bz2.BZ2Decompressor()
        mid_stream = False  # the current decompressor has input but no end-of-stream yet
        while remaining > 0:
            raw = fh.read(min(_CHUNK, remaining))
            if not raw:
                break
            remaining -= len(raw)
            while raw:
                try:
                    out = dec.decompress(raw)
                except OSError as exc:
                    raise PipelineInputError(path, f"corrupt bz2 stream in bytes {start}-{end}: {exc}") from exc
                mid_stream = True
                if out:
                    yield out
                if dec.eof:
                    raw = dec.unused_data
                    dec = bz2.BZ2Decompressor()
                    mid_stream = False
                else:
                    raw = b""
    if remaining > 0 or mid_stream:
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


_CLOSE = b"</mediawiki>"


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


def open_shard(shard: Shard):
    """A binary file of the shard's pages as a complete XML document.

    Multistream: header stream + the shard's streams + ``</mediawiki>``.
    Page ranges: the whole dump stream (the reader skips other pages).
    """
    if shard.kind == "pages":
        return open_dump_bytes(shard.dump_path)
    path = Path(shard.dump_path)
    if not path.is_file():
        raise PipelineInputError(path, "dump file does not exist")
    return io.BufferedReader(_ChainReader(_multistream_chunks(shard)), buffer_size=_CHUNK)


def _multistream_chunks(shard: Shard) -> Iterator[bytes]:
    header = b"".join(iter_streams(shard.dump_path, 0, shard.header_end))
    if b"<siteinfo" not in header:
        raise PipelineInputError(shard.dump_path, "the first bz2 stream holds no <siteinfo> header (not a multistream dump?)")
    yield header.replace(_CLOSE, b"")
    yield from _strip_close(iter_streams(shard.dump_path, shard.byte_start, shard.byte_end))
    yield b"\n" + _CLOSE + b"\n"


# --------------------------------------------------------------------------
# Building a multistream dump (tests, and trying the sharded path on a small dump).


def make_multistream(source_dump: str | os.PathLike, out_dir: str | os.PathLike, pages_per_stream: int = 100) -> tuple[Path, Path]:
    """Re-pack a plain UTF-8 dump as Wikimedia does: a header stream, one bz2
    stream per ``pages_per_stream`` pages, a closing stream, plus the
    ``offset:page_id:title`` index. Streams line by line."""
    source = Path(source_dump)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = source.name.split(".xml")[0].removesuffix(".bz2")
    dump = out_dir / f"{stem}-multistream.xml.bz2"
    index = out_dir / f"{stem}-multistream-index.txt.bz2"
    header: list[bytes] = []
    group: list[bytes] = []
    page: list[bytes] = []
    entries: list[tuple[str, str]] = []
    in_page = False
    with open_dump_bytes(source) as src, dump.open("wb") as out, bz2.open(index, "wt", encoding="utf-8") as idx:

        def flush() -> None:
            offset = out.tell()
            for page_id, title in entries:
                idx.write(f"{offset}:{page_id}:{title}\n")
            out.write(bz2.compress(b"".join(group)))
            group.clear()
            entries.clear()

        for line in src:
            stripped = line.strip()
            if not in_page and stripped == b"<page>":
                if header:
                    out.write(bz2.compress(b"".join(header)))
                    header = []
                in_page = True
            if in_page:
                page.append(line)
                if stripped == b"</page>":
                    text = b"".join(page)
                    title = _TITLE.search(text)
                    page_id = re.search(rb"<id>(\d+)</id>", text)
                    entries.append((page_id.group(1).decode() if page_id else "0", title.group(1).decode() if title else ""))
                    group.append(text)
                    page, in_page = [], False
                    if len(entries) == pages_per_stream:
                        flush()
            elif group or entries:
                flush()
                header.append(line)  # the footer
            else:
                header.append(line)
        if entries:
            flush()
        out.write(bz2.compress(b"".join(header)))
    return dump, index



@task(name="shard_dump", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_unless_bad_input)
def shard_dump(dump_path: str, config: ShardConfig) -> list[Shard]:
    """Plan the dump's shards (multistream byte ranges, else page ranges)."""
    return plan_shards(dump_path, config)
