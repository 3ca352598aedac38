"""Reading MediaWiki dump bytes: files, bz2 streams, encodings, and pages cut as bytes.

Nothing here holds a dump in memory (a full English dump is ~22 GB
compressed): readers stream chunks of at most ``CHUNK`` bytes. A bz2 file may
hold concatenated streams (a multistream dump); a UTF-16 dump is re-encoded
as UTF-8 (``as_utf8``), so everything downstream sees UTF-8 XML.

``IO_COUNTERS`` counts the bytes read from dump files and the bytes of XML
they gave (decompressed), for tests and benchmarks.
"""

from __future__ import annotations

import bz2
import codecs
import io
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from tasks.common import PipelineInputError

CHUNK = 1 << 20
TITLE_TAG = re.compile(rb"<title>([^<]*)</title>")
ID_TAG = re.compile(rb"<id>(\d+)</id>")
_PAGE = b"<page>"
_PAGE_END = b"</page>"
CLOSE = b"</mediawiki>"
# Bytes held back between chunks: enough for a tag cut by a chunk boundary,
# its indentation, and the closing tags at the end of the dump.
_HOLD = 4096


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


def detect_encoding(head: bytes) -> str:
    if head.startswith(b"\xff\xfe"):
        return "utf-16-le"
    if head.startswith(b"\xfe\xff"):
        return "utf-16-be"
    return "utf-8"


def check_dump_file(path: Path) -> None:
    if not path.exists():
        raise PipelineInputError(path, "dump file does not exist")
    if not path.is_file():
        raise PipelineInputError(path, "dump path is not a file")
    if path.stat().st_size == 0:
        raise PipelineInputError(path, "empty dump (0 bytes)")


def is_bz2(path: Path) -> bool:
    with path.open("rb") as fh:
        return fh.read(3) == b"BZh"


def read_chunks(path: Path, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Bytes of an uncompressed dump in [start, end), counted as read and as XML."""
    for raw in raw_chunks(path, start, end):
        _count(xml_bytes=len(raw))
        yield raw


class BadCompressedData(EOFError):
    """A cut or corrupt bz2 file (bad input, unlike an I/O error). An EOFError,
    as bz2.open raises for a cut file, so readers that name the page they were
    reading (tasks/extract_docs.py) catch it."""


def decompressed(compressed: Iterator[bytes]) -> Iterator[bytes]:
    """Decompress concatenated bz2 streams, at most ``CHUNK`` bytes at a
    time (a reader that stops early decompresses little more than it used),
    counted. A cut or corrupt input raises ``BadCompressedData``."""
    dec = bz2.BZ2Decompressor()
    mid_stream = False  # the current decompressor has input but no end-of-stream yet
    for raw in compressed:
        data = raw
        while True:
            try:
                out = dec.decompress(data, max_length=CHUNK)
            except OSError as exc:
                raise BadCompressedData(str(exc)) from exc
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
        raise BadCompressedData("compressed file ended before the end-of-stream marker was reached")


def raw_chunks(path: Path, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Bytes of ``path`` in [start, end) as read from disk, counted."""
    with path.open("rb") as fh:
        fh.seek(start)
        remaining = None if end is None else end - start
        while remaining is None or remaining > 0:
            raw = fh.read(CHUNK if remaining is None else min(CHUNK, remaining))
            if not raw:
                break
            if remaining is not None:
                remaining -= len(raw)
            _count(file_bytes=len(raw))
            yield raw


def dump_chunks(path: Path) -> Iterator[bytes]:
    """The dump's XML bytes (a bz2 file, concatenated streams included, is
    decompressed), counted. A cut or corrupt bz2 file raises ``BadCompressedData``."""
    if is_bz2(path):
        yield from decompressed(raw_chunks(path))
    else:
        yield from read_chunks(path)


_XML_DECL_ENCODING = re.compile(rb"""^(<\?xml[^>]*?encoding\s*=\s*)["'][^"']*["']""")


def as_utf8(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The XML re-encoded as UTF-8 (a UTF-16 dump has a byte-order mark)."""
    first = b""
    for first in chunks:
        if first:
            break
    encoding = detect_encoding(first)
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
    check_dump_file(path)
    pages = 0
    last_title: str | None = None
    tail = b""
    try:
        for chunk in as_utf8(dump_chunks(path)):
            buf = tail + chunk
            pages += buf.count(_PAGE) - tail.count(_PAGE)
            titles = TITLE_TAG.findall(buf)
            if titles:
                last_title = titles[-1].decode("utf-8", "replace")
            tail = buf[-(len(_PAGE) - 1) :]
    except BadCompressedData as exc:
        raise truncated_error(path, pages, last_title, exc) from exc
    return pages


def truncated_error(path: Path, pages: int, last_title: str | None, exc: BaseException) -> PipelineInputError:
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



# --------------------------------------------------------------------------
# Pieces of a shard's XML document.


def iter_streams(path: str | os.PathLike, start: int, end: int) -> Iterator[bytes]:
    """Decompressed bytes of the concatenated bz2 streams in [start, end)."""
    path = Path(path)
    try:
        yield from decompressed(raw_chunks(path, start, end))
    except BadCompressedData as exc:
        size = path.stat().st_size
        if end > size or "ended before" in str(exc):
            raise PipelineInputError(path, f"truncated bz2 data in bytes {start}-{end} (file has {size} bytes)") from exc
        raise PipelineInputError(path, f"corrupt bz2 stream in bytes {start}-{end}: {exc}") from exc
    if end > path.stat().st_size:
        raise PipelineInputError(path, f"truncated bz2 data in bytes {start}-{end} (file has {path.stat().st_size} bytes)")


class ChainReader(io.RawIOBase):
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


def strip_close(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Drop a ``</mediawiki>`` closing tag that belongs to the last stream of the dump."""
    # The tag ends the dump, so holding back the last 64 bytes is enough.
    tail = b""
    for chunk in chunks:
        buf = tail + chunk
        tail = buf[-64:]
        if len(buf) > 64:
            yield buf[:-64]
    yield tail.replace(CLOSE, b"")


def select_pages(chunks: Iterator[bytes], skip: int, take: int) -> Iterator[bytes]:
    """Only the bytes of pages skip .. skip + take - 1 (ordinals within ``chunks``)."""
    for part, data in split_pages(chunks):
        if part >= skip + take or part == -2:
            return
        if part >= skip:
            yield data


_EMPTY_SITEINFO = b"\n  <siteinfo>\n  </siteinfo>"


def header_with_siteinfo(header: bytes, path: str | os.PathLike) -> bytes:
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


def with_siteinfo(chunks: Iterator[bytes], path: str | os.PathLike) -> Iterator[bytes]:
    """A whole dump's bytes with ``header_with_siteinfo`` applied to its header."""
    head = b""
    for chunk in chunks:
        head += chunk
        if b"<page" in head or b"<siteinfo" in head or len(head) > 16 * CHUNK:
            break
    if head:
        cut = head.find(b"<page")
        cut = len(head) if cut < 0 else cut
        yield header_with_siteinfo(head[:cut], path) + head[cut:]
    yield from chunks





def plain_encoding(path: Path) -> str:
    """The encoding of an uncompressed dump, by its byte-order mark."""
    with path.open("rb") as fh:
        return detect_encoding(fh.read(2))
