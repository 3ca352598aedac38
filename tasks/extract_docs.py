"""Stage extract_docs: one dump shard -> clean plain-text articles.

Streams the shard's pages with mwxml, keeps article-namespace pages that are
neither redirects nor disambiguation / set-index / "List of" pages, renders
their wikitext as plain prose (tasks/wikitext.py) and writes
``articles.parquet`` plus the shard's ``funnel.json``. Every page that does
not become an article is counted under a drop reason.

Only an article's lead is rendered by default (``max_chars``: whole sections
from the top until the clean text holds that many characters): the paper's
one 500-token document per article uses the first ~3,000 characters, and
cleaning the rest of the page was most of the stage's time. The text kept is
exactly the start of the whole article's clean text (tasks/wikitext.py says
why), and a page is still recognised as a disambiguation / set-index page by
templates anywhere in it. ``cut_articles.json`` lists the page ids whose text
is a lead, and the shard they came from: select_units reads such a page whole
when its documents want more than its lead, so the budget changes speed, not
output. The ``clean_wikitext`` removal counts cover the part rendered.
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import mwxml
import pyarrow as pa
from pydantic import BaseModel, Field

from tasks import shard as shard_mod
from tasks import wikitext
from tasks.common import PipelineInputError, freeze_long_lived
from tasks.contracts import ARTICLES_SCHEMA
from tasks.shard import Shard, open_shard
from tasks.stage import StageRun, stage

STAGE = "extract_docs"
CLEAN_STAGE = "clean_wikitext"  # counts of removed lines/elements, not pages
CUT_FILE = "cut_articles.json"  # the page ids whose text is a lead (ExtractConfig.max_chars)


class ExtractConfig(BaseModel):
    """Which pages become articles."""

    namespaces: list[int] = Field([0], description="Page namespaces to keep (0 = articles).")
    skip_disambiguation: bool = Field(True, description="Drop disambiguation pages ({{disambiguation}}, {{hndis}}, ...).")
    skip_set_index: bool = Field(True, description="Drop set-index pages ({{set index article}}, {{surname}}, ...).")
    skip_list_pages: bool = Field(True, description="Drop pages titled 'List of ...' / 'Lists of ...'.")
    min_text_chars: int = Field(1, ge=1, le=1_000_000, description="Drop articles whose clean text is shorter than this (characters).")
    max_bad_pages: int = Field(
        0, ge=0, le=1_000_000,
        description="Pages per shard whose wikitext cannot be parsed that may be skipped: counted as bad_page in "
        "the funnel and listed with their titles and reasons in bad_pages.json. 0: the first one fails the shard, "
        "naming the page. (Broken XML cannot be skipped: the parser cannot resume after it.)")
    max_chars: int | None = Field(
        4_000,
        ge=1,
        le=100_000_000,
        description=(
            "Render only an article's lead: whole sections from the top until the clean text holds this many characters "
            "(about 8 per document token: 4,000 for the paper's one 500-token document per article, 12,000 for 3); "
            "empty: whole articles. The text kept is exactly the start of the whole article's clean text, and "
            "select_units reads a page whole when its documents want more than its lead, so this sets only the speed."
        ),
    )


def _page_label(title: str | None, page_id: int | None) -> str | None:
    if title is None and page_id is None:
        return None
    return f"page {page_id} {title!r}"


def _iter_shard_pages(shard: Shard):
    """(page, last revision) for the shard's pages; bad XML becomes PipelineInputError."""
    path = shard.dump_path
    current: tuple[str | None, int | None] = (None, None)
    last_done: tuple[str | None, int | None] = (None, None)
    try:
        with open_shard(shard) as fh:
            try:
                dump = mwxml.Dump.from_file(fh)
            except PipelineInputError:
                raise
            except Exception as exc:  # mwxml/expat raise several types for a bad header
                raise PipelineInputError(path, f"malformed XML before the first page: {exc}") from exc
            ordinal = -1
            for page in dump:
                ordinal += 1
                if shard.kind == "pages":
                    if ordinal < shard.page_start:
                        continue
                    if shard.page_stop is not None and ordinal >= shard.page_stop:
                        break
                current = (page.title, page.id)
                revision = None
                for revision in page:
                    pass  # full-history dumps: the last revision is the current one
                yield page, revision
                last_done = current
    except PipelineInputError:
        raise
    except OSError as exc:
        if exc.errno is not None:
            # The operating system (too many open files, no space left, an I/O
            # error): not bad input, so the task is retried as it is.
            raise
        raise _bad_xml(path, exc, current, last_done) from exc
    except (ET.ParseError, EOFError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise _bad_xml(path, exc, current, last_done) from exc


def _bad_xml(path: str, exc: BaseException, current: tuple, last_done: tuple) -> PipelineInputError:
    """A malformed or truncated dump, named at the page being read (bz2's "Invalid data stream" is an OSError without errno)."""
    if current != last_done:
        where = _page_label(*current)
        reason = f"malformed or truncated input while reading this page: {exc}"
    else:
        where = _page_label(*last_done)
        reason = f"malformed or truncated input after {'this page' if where else 'the header'}: {exc}"
    return PipelineInputError(path, reason, record=where)


@functools.cache
def _freeze_imports() -> None:
    """Once per process, before its first shard: what is alive then (imports) lives as long as it."""
    freeze_long_lived()


def _shard_files(shard: Shard) -> list[str]:
    return [shard.dump_path] + ([shard.index_path] if shard.index_path else [])


@stage(
    STAGE,
    ExtractConfig,
    reads={"shard": _shard_files},
    keyed_by_value=["shard"],
    writes={"articles.parquet": ARTICLES_SCHEMA},
    code=[wikitext.__file__, shard_mod.__file__],
)
def extract_docs(run: StageRun, shard: Shard, config: ExtractConfig) -> dict:
    """One shard's pages -> ``articles.parquet`` (cached on the dump's content, the shard, config and code)."""
    _freeze_imports()
    funnel = run.funnel
    bad: list[dict[str, Any]] = []  # pages skipped under max_bad_pages, with their reason
    cols: dict[str, list[Any]] = {name: [] for name in ARTICLES_SCHEMA.names}
    source = Path(shard.dump_path).name
    namespaces = set(config.namespaces)
    pages = 0
    # An article shorter than min_text_chars is dropped, so the lead must be able to reach it.
    budget = None if config.max_chars is None else max(config.max_chars, config.min_text_chars)
    cut: list[int] = []
    for page, revision in _iter_shard_pages(shard):
        pages += 1
        funnel.seen(STAGE)
        if page.namespace not in namespaces:
            funnel.drop(STAGE, "non_article_namespace")
            continue
        text = (revision.text if revision is not None else None) or ""
        if page.redirect is not None or text.lstrip()[:9].upper() == "#REDIRECT":
            funnel.drop(STAGE, "redirect")
            continue
        try:
            result = wikitext.clean_wikitext(text, budget)
        except Exception as exc:  # a parser bug on one page must name the page
            if len(bad) >= config.max_bad_pages:
                raise PipelineInputError(shard.dump_path, f"cannot parse wikitext: {exc} "
                                         f"({len(bad)} bad pages skipped before, max_bad_pages {config.max_bad_pages})",
                                         record=_page_label(page.title, page.id)) from exc
            funnel.drop(STAGE, "bad_page")
            bad.append({"page_id": page.id, "title": page.title, "reason": f"cannot parse wikitext: {exc}"})
            continue
        kind = wikitext.page_kind(page.title, result)
        if kind == "disambiguation" and config.skip_disambiguation:
            funnel.drop(STAGE, "disambiguation")
            continue
        if kind == "set_index" and config.skip_set_index:
            funnel.drop(STAGE, "set_index")
            continue
        if kind == "list_page" and config.skip_list_pages:
            funnel.drop(STAGE, "list_page")
            continue
        funnel.drop(CLEAN_STAGE, "list_item", result.list_items)
        funnel.drop(CLEAN_STAGE, "caption", result.captions)
        funnel.drop(CLEAN_STAGE, "heading", result.headings)
        funnel.drop(CLEAN_STAGE, "table", result.tables)
        funnel.drop(CLEAN_STAGE, "markup_residue_paragraph", result.markup_residue_paragraphs)
        if len(result.text) < config.min_text_chars:
            funnel.drop(STAGE, "empty_text")
            continue
        funnel.kept(STAGE)
        if result.truncated:
            cut.append(page.id)
            funnel.drop(CLEAN_STAGE, "text_beyond_max_chars")
        cols["page_id"].append(page.id)
        cols["revision_id"].append(revision.id if revision is not None else -1)
        cols["title"].append(page.title)
        cols["text"].append(result.text)
        cols["source_dump"].append(source)
    if pages == 0:
        raise PipelineInputError(shard.dump_path, f"empty dump: no pages in {shard.name}")
    run.info.update(shard=shard.name, pages=pages, articles=len(cols["page_id"]), articles_cut=len(cut), bad_pages=len(bad))
    # Which articles hold only a lead (select_units reports a document that ran out of it).
    # The shard is kept so that select_units can read a page whole when its documents want more than its lead.
    return {"articles.parquet": pa.table(cols, schema=ARTICLES_SCHEMA),
            CUT_FILE: {"max_chars": budget, "page_ids": cut, "shard": shard.model_dump(mode="json")},
            "bad_pages.json": bad}


extract_docs_task = extract_docs.task


def whole_page_texts(shard: Shard, page_ids: set[int]) -> dict[int, str]:
    """The whole clean text of these pages of ``shard`` (for articles whose lead was too short)."""
    out: dict[int, str] = {}
    for page, revision in _iter_shard_pages(shard):
        if page.id in page_ids:
            out[page.id] = wikitext.clean_wikitext((revision.text if revision is not None else None) or "").text
            if len(out) == len(page_ids):
                break
    missing = sorted(page_ids - out.keys())
    if missing:
        raise PipelineInputError(shard.dump_path, f"pages {missing[:5]} of {shard.name} are not in the dump any more "
                                 "(select_units reads a page whole when its documents want more than its lead)")
    return out
