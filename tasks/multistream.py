"""Re-packing a dump as a multistream dump, so that its shards can seek.

bz2 cannot seek into decompressed offsets, so a single-stream ``.xml.bz2``
dump (or a UTF-16 one) is written once as Wikimedia writes multistream dumps:
a header stream, bz2 streams of ``PAGES_PER_STREAM`` pages, a closing stream,
and the ``offset:page_id:title`` index. ``multistream_copy`` keeps that copy in
a content-addressed folder of the work folder, keyed by the dump's
fingerprint and the copy's format, and reuses it on the next run.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import json
import logging
import os
from pathlib import Path

from tasks.common import atomic_path, fingerprint, is_complete, mark_complete
from tasks.dump_reader import (
    ID_TAG,
    TITLE_TAG,
    BadCompressedData,
    as_utf8,
    check_dump_file,
    dump_chunks,
    split_pages,
    truncated_error,
)

log = logging.getLogger(__name__)

PAGES_PER_STREAM = 100  # as Wikimedia's multistream dumps
# Version of the copy's format: part of its folder's key (not the code hash,
# so an edit of this file does not re-compress a 22 GB dump).
_REPACK_VERSION = "multistream-1"
REPACK_STAGE = "multistream"


class _PageHead:
    """Title and id of the page being cut, from its first bytes."""

    def __init__(self) -> None:
        self.head = b""

    def add(self, data: bytes) -> None:
        if len(self.head) < 65536 and b"</id>" not in self.head:
            self.head += data[: 65536 - len(self.head)]

    def parse(self) -> tuple[str, str | None]:
        title = TITLE_TAG.search(self.head)
        page_id = ID_TAG.search(self.head)
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
    check_dump_file(source)
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
            for part, data in split_pages(as_utf8(dump_chunks(source))):
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
        except BadCompressedData as exc:
            raise truncated_error(source, pages, last_title, exc) from exc
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
    check_dump_file(dump)
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
