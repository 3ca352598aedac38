"""Real MediaWiki dumps for tests and benchmarks, built from the embedded
excerpt (a bz2 export of 206 pages, 106 articles): uncompressed copies,
larger dumps whose pages are the excerpt's repeated under new titles and page
ids, exports stripped of their ``<siteinfo>``, and today's page-range reader
as the reference the sharded readers must match.

Deliberately independent of tasks/shard.py's byte cutting: pages are found
with a regular expression over the decompressed document.
"""

from __future__ import annotations

import bz2
import re
from collections.abc import Iterator
from pathlib import Path

import mwxml

_PAGE = re.compile(rb"[ \t]*<page>.*?</page>\n?", flags=re.S)
_ID = re.compile(rb"<id>(\d+)</id>")
# Page and revision ids of copy k are shifted by k * ID_STEP (the excerpt's
# page ids are below 40,000, its revision ids below 10^9).
ID_STEP = 1_000_000_000


def dump_xml(path: str | Path) -> bytes:
    """The decompressed XML of a small dump."""
    data = Path(path).read_bytes()
    return bz2.decompress(data) if data[:3] == b"BZh" else data


def split_xml(xml: bytes) -> tuple[bytes, list[bytes], bytes]:
    """(header, one chunk per <page> with its indentation and newline, footer)."""
    pages = list(_PAGE.finditer(xml))
    if not pages:
        return xml, [], b""
    first, last = pages[0].start(), pages[-1].end()
    chunks = [m.group(0) for m in pages]
    assert b"".join(chunks) == xml[first:last], "pages are not contiguous"
    return xml[:first], chunks, xml[last:]


def _renamed(page: bytes, copy: int) -> bytes:
    """The page as copy ``copy``: title suffixed, page and revision ids shifted."""
    if copy == 0:
        return page
    page = re.sub(rb"<title>([^<]*)</title>", lambda m: b"<title>" + m.group(1) + b" (copy %d)</title>" % copy, page, count=1)
    return _ID.sub(lambda m: b"<id>%d</id>" % (int(m.group(1)) + copy * ID_STEP), page, count=2)


def write_dump(out: str | Path, header: bytes, pages: Iterator[bytes], footer: bytes, compress: bool) -> Path:
    """Write a dump as one bz2 stream (``compress``) or as plain XML, streaming."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as fh:
        comp = bz2.BZ2Compressor(9) if compress else None
        for part in (header, *pages, footer):
            fh.write(comp.compress(part) if comp else part)
        if comp:
            fh.write(comp.flush())
    return out


def repeated_dump(source: str | Path, out: str | Path, copies: int, compress: bool = True, pages: int | None = None) -> Path:
    """A dump of ``copies`` copies of the source's first ``pages`` pages (all
    by default); copy 0 is the original, copy k's pages get new titles and ids."""
    header, chunks, footer = split_xml(dump_xml(source))
    chunks = chunks[:pages] if pages is not None else chunks
    return write_dump(out, header, (_renamed(p, k) for k in range(copies) for p in chunks), footer, compress)


def without_siteinfo(source: str | Path, out: str | Path, compress: bool = True) -> Path:
    """The source export with its ``<siteinfo>`` block removed."""
    header, chunks, footer = split_xml(dump_xml(source))
    stripped = re.sub(rb"[ \t]*<siteinfo>.*?</siteinfo>\n?", b"", header, flags=re.S)
    assert stripped != header and b"<siteinfo" not in stripped
    return write_dump(out, stripped, iter(chunks), footer, compress)


def reference_pages(dump: str | Path, ranges: list[tuple[int, int | None]]) -> list[list[tuple]]:
    """Today's page-range reading, independently of tasks/shard.py: mwxml over
    the whole decompressed dump, pages [start, stop) of each range."""
    import io

    whole = [page_record(page, revision) for page, revision in _all_pages(io.BytesIO(dump_xml(dump)))]
    return [whole[start:stop] for start, stop in ranges]


def _all_pages(fh) -> Iterator[tuple]:
    for page in mwxml.Dump.from_file(fh):
        revision = None
        for revision in page:
            pass
        yield page, revision


def page_record(page, revision) -> tuple:
    """What must be identical between two readings of a page."""
    return (page.id, page.title, page.namespace, page.redirect, revision.id if revision else None, revision.text if revision else None)
