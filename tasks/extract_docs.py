"""Stage extract_docs: one dump shard -> clean plain-text articles.

Streams the shard's pages with mwxml, keeps article-namespace pages that are
neither redirects nor disambiguation / set-index / "List of" pages, renders
their wikitext as plain prose (tasks/wikitext.py) and writes
``articles.parquet`` plus the shard's ``funnel.json``. Each keep/drop
decision is a rule (tasks/records.py), so every page that does not become an
article is counted under the reason of the rule that dropped it.

Only an article's lead is rendered by default (``max_chars``: whole sections
from the top until the clean text holds that many characters): the paper's
one 500-token document per article uses the first ~3,000 characters, and
cleaning the rest of the page would be most of the stage's time. The text kept is
exactly the start of the whole article's clean text (tasks/wikitext.py says
why), and a page is still recognised as a disambiguation / set-index page by
templates anywhere in it. ``cut_articles.json`` lists the page ids whose text
is a lead, and the shard they came from: select_units reads such a page whole
through ``LeadPages`` when its documents want more than its lead, so the
budget changes speed, not output. The ``clean_wikitext`` removal counts
cover the part rendered.
"""

from __future__ import annotations

import functools
import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mwxml
import pyarrow as pa
from pydantic import Field

from tasks import dump_reader, wikitext
from tasks import shard as shard_mod
from tasks.common import Funnel, PipelineInputError, freeze_long_lived
from tasks.contracts import ARTICLES_SCHEMA
from tasks.params_model import ParamsModel
from tasks.records import Records, Rule
from tasks.shard import Shard, open_shard
from tasks.stage import StageRun, stage

STAGE = "extract_docs"
CLEAN_STAGE = "clean_wikitext"  # counts of removed lines/elements, not pages
CUT_FILE = "cut_articles.json"  # the page ids whose text is a lead (ExtractConfig.max_chars)


class ExtractConfig(ParamsModel):
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
            first, stop = shard.page_window()
            ordinal = -1
            for page in dump:
                ordinal += 1
                if ordinal < first:
                    continue
                if stop is not None and ordinal >= stop:
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


@dataclass
class _Page:
    """A page as the rules see it: its wikitext, then its clean text."""

    page: Any  # mwxml's page
    text: str  # the wikitext of its last revision
    clean: wikitext.CleanResult | None = None


def _rules(config: ExtractConfig) -> tuple[tuple[Rule[_Page], ...], Rule[_Page], Rule[_Page]]:
    """(the rules before cleaning, the page-kind rule, the text-length rule): which pages become articles."""
    namespaces = set(config.namespaces)
    skipped = {kind for kind, skip in (("disambiguation", config.skip_disambiguation), ("set_index", config.skip_set_index),
                                       ("list_page", config.skip_list_pages)) if skip}

    def namespace(p: _Page) -> str | None:
        return None if p.page.namespace in namespaces else "non_article_namespace"

    def redirect(p: _Page) -> str | None:
        return "redirect" if p.page.redirect is not None or p.text.lstrip()[:9].upper() == "#REDIRECT" else None

    def page_kind(p: _Page) -> str | None:  # disambiguation, set-index and list pages are not prose
        kind = wikitext.page_kind(p.page.title, p.clean)
        return kind if kind in skipped else None

    def long_enough(p: _Page) -> str | None:
        return "empty_text" if len(p.clean.text) < config.min_text_chars else None

    return (namespace, redirect), page_kind, long_enough


def _count_removed(funnel: Funnel, result: wikitext.CleanResult) -> None:
    funnel.drop(CLEAN_STAGE, "list_item", result.list_items)
    funnel.drop(CLEAN_STAGE, "caption", result.captions)
    funnel.drop(CLEAN_STAGE, "heading", result.headings)
    funnel.drop(CLEAN_STAGE, "table", result.tables)
    funnel.drop(CLEAN_STAGE, "markup_residue_paragraph", result.markup_residue_paragraphs)


@stage(
    STAGE,
    ExtractConfig,
    reads={"shard": lambda shard: shard.files()},
    keyed_by_value=["shard"],
    writes={"articles.parquet": ARTICLES_SCHEMA},
    code=[wikitext.__file__, shard_mod.__file__, dump_reader.__file__],
    gil_bound=True,
)
def extract_docs(run: StageRun, shard: Shard, config: ExtractConfig) -> dict:
    """One shard's pages -> ``articles.parquet`` (cached on the dump's content, the shard, config and code)."""
    _freeze_imports()
    pages = Records(run.funnel, STAGE)
    before_cleaning, page_kind, long_enough = _rules(config)
    bad: list[dict[str, Any]] = []  # pages skipped under max_bad_pages, with their reason
    cols: dict[str, list[Any]] = {name: [] for name in ARTICLES_SCHEMA.names}
    source = Path(shard.dump_path).name
    n_pages = 0
    # An article shorter than min_text_chars is dropped, so the lead must be able to reach it.
    budget = None if config.max_chars is None else max(config.max_chars, config.min_text_chars)
    cut: list[int] = []
    for page, revision in _iter_shard_pages(shard):
        n_pages += 1
        pages.seen()
        p = _Page(page, (revision.text if revision is not None else None) or "")
        if not pages.passes(p, *before_cleaning):
            continue
        try:
            p.clean = wikitext.clean_wikitext(p.text, budget)
        except Exception as exc:  # a parser bug on one page must name the page
            if len(bad) >= config.max_bad_pages:
                raise PipelineInputError(shard.dump_path, f"cannot parse wikitext: {exc} "
                                         f"({len(bad)} bad pages skipped before, max_bad_pages {config.max_bad_pages})",
                                         record=_page_label(page.title, page.id)) from exc
            pages.drop("bad_page")
            bad.append({"page_id": page.id, "title": page.title, "reason": f"cannot parse wikitext: {exc}"})
            continue
        if not pages.passes(p, page_kind):
            continue
        _count_removed(run.funnel, p.clean)  # what cleaning removed from a page of prose, long enough or not
        if not pages.passes(p, long_enough):
            continue
        pages.kept()
        if p.clean.truncated:
            cut.append(page.id)
            run.funnel.drop(CLEAN_STAGE, "text_beyond_max_chars")
        cols["page_id"].append(page.id)
        cols["revision_id"].append(revision.id if revision is not None else -1)
        cols["title"].append(page.title)
        cols["text"].append(p.clean.text)
        cols["source_dump"].append(source)
    if n_pages == 0:
        raise PipelineInputError(shard.dump_path, f"empty dump: no pages in {shard.name}")
    run.info.update(shard=shard.name, pages=n_pages, articles=len(cols["page_id"]), articles_cut=len(cut), bad_pages=len(bad))
    # Which articles hold only a lead, and their shard: LeadPages reads such a page whole.
    return {"articles.parquet": pa.table(cols, schema=ARTICLES_SCHEMA),
            CUT_FILE: {"max_chars": budget, "page_ids": cut, "shard": shard.model_dump(mode="json")},
            "bad_pages.json": bad}


extract_docs_task = extract_docs.task


# --------------------------------------------------------------------------
# The whole text of pages whose article is only a lead.


class LeadPages:
    """The articles whose text in ``articles.parquet`` is only a lead
    (``ExtractConfig.max_chars``), and a way to read their whole clean text.

    extract_docs lists them in ``cut_articles.json`` beside ``articles.parquet``
    with the shard they came from; an article is named by (articles file, page id)."""

    def __init__(self, articles_files: Iterable[str | os.PathLike]):
        self._shards: dict[tuple[str, int], Shard] = {}
        for f in articles_files:
            listing = Path(f).parent / CUT_FILE
            if not listing.is_file():
                continue
            info = json.loads(listing.read_text(encoding="utf-8"))
            if not info.get("page_ids"):
                continue
            if "shard" not in info:
                raise PipelineInputError(listing, "lists lead-only articles but not their shard (written by an older extract_docs: rerun it)")
            shard = Shard.model_validate(info["shard"])
            self._shards.update(((str(f), int(pid)), shard) for pid in info["page_ids"])

    def is_lead(self, articles_file: str | os.PathLike, page_id: int) -> bool:
        return (str(articles_file), page_id) in self._shards

    def whole_texts(self, articles: Iterable[tuple[str, int]]) -> dict[tuple[str, int], str]:
        """The whole clean text of these lead-only articles, reading each shard once."""
        by_shard: dict[Shard, set[int]] = {}
        for key in articles:
            by_shard.setdefault(self._shards[key], set()).add(key[1])
        texts: dict[Shard, dict[int, str]] = {shard: _whole_page_texts(shard, ids) for shard, ids in by_shard.items()}
        return {key: texts[self._shards[key]][key[1]] for key in articles}


def _whole_page_texts(shard: Shard, page_ids: set[int]) -> dict[int, str]:
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
