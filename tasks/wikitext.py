"""MediaWiki wikitext -> plain prose, in one pass over mwparserfromhell's tokens.

What the GeAR recipe needs from a page is its running prose: sentences a
search user might look for. So link text is kept (a piped link shows its
label), and everything that is not prose is left out: templates and
infoboxes, references, tables, files/images and their captions, categories,
interlanguage links, comments, magic words, headings, list items and
definition lists.

The renderer walks mwparserfromhell's token list once and appends kept text
to a list; only a construct whose rendering needs a node (a template that
renders as words, an HTML entity, <nowiki>) is built into one, alone, because
building the node tree is most of what parsing costs and most of the tree
renders as nothing. It renders what the whole parse tree renders (tested);
the rules of each construct (tags: ``_tag_rule``; links: ``_link_shows``) are
written once and used by both walks. mwparserfromhell leaves markup it
cannot parse as plain text (an unclosed ``<ref>``, ``{{cite}}`` or
``[[File:]]``), so a regex fallback runs over the result, and a paragraph
that still holds markup after it is dropped and counted: the output never
contains ``{{ }} [[ ]] <ref {| |}``.

Comments and ``<ref>`` elements are removed with regexes before parsing: they
never render, citation templates inside refs are a large part of the parse,
and a ref the parser cannot close would drop the prose after it. An unclosed
``<ref>`` is left to the parser. Bold/italic ticks it leaves unpaired become
what MediaWiki shows.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from mwparserfromhell import parser as _mwp_parser
from mwparserfromhell.parser import tokens as _tok
from mwparserfromhell.parser.builder import Builder
from mwparserfromhell.parser.tokenizer import Tokenizer as PyTokenizer
from mwparserfromhell.nodes import (
    Argument,
    Comment,
    ExternalLink,
    Heading,
    HTMLEntity,
    Tag,
    Template,
    Text,
    Wikilink,
)

# Strings that must never reach the output.
FORBIDDEN_MARKUP = ("{{", "}}", "[[", "]]", "<ref", "{|", "|}")

# Sentinel placed where a list item / definition line starts; the line is
# dropped when paragraphs are assembled. A control character cannot occur in
# a dump's text (XML 1.0 forbids it).
_LIST = "\x01"

# Tags whose contents are not prose.
_DROP_TAGS = frozenset(
    """ref references table tr td th caption gallery math chem ce score timeline
    imagemap syntaxhighlight source pre graph mapframe maplink templatedata
    includeonly hiero inputbox categorytree indicator section poem noinclude
    templatestyles""".split()
)
_LIST_TAGS = frozenset({"li", "dt", "dd"})
_MEDIA_PREFIXES = frozenset({"file", "image", "media"})
_INTERLANGUAGE = re.compile(r"^[a-z]{2,3}(?:-[a-z0-9]+)*$|^simple$")

# Disambiguation and set-index templates, by lower-cased name.
_DISAMBIGUATION = frozenset(
    {"disambiguation", "disambig", "disamb", "dab", "dis", "hndis", "geodis", "numberdis", "mathdab", "dmbox"}
)
_SET_INDEX = frozenset(
    {
        "set index article",
        "set index",
        "sia",
        "surname",
        "given name",
        "human name",
        "ship index",
        "shipindex",
        "mountain index",
        "lake index",
        "river index",
        "road index",
        "sport index",
        "plant common name",
        "species latin name",
        "chemistry index",
        "molecular formula index",
        "animal common name",
        "fungus common name",
    }
)

# A few inline templates render as words inside a sentence; dropping them
# would leave holes ("It is  long."), so they are rendered.
_RENDER_FIRST_ARG = frozenset({"nowrap", "nobr", "small", "smaller", "big", "sic", "nihongo", "ill", "interlanguage link", "abbr", "visible anchor"})
_RENDER_LAST_ARG = frozenset({"lang", "transl", "transliteration"})
_RENDER_CONVERT = frozenset({"convert", "cvt"})

_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_REF_SELF_CLOSING = re.compile(r"<ref\b[^>]*/>", re.I)
_REF_SPAN = re.compile(r"<ref\b[^>]*>.*?</ref\s*>", re.I | re.S)
_REF_OPEN = re.compile(r"<ref\b[^>]*>", re.I)
_REF_CLOSE = re.compile(r"</ref\s*>", re.I)
_INNER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_INNER_MEDIA_LINK = re.compile(r"\[\[\s*(?:file|image|media|category)\s*:[^\[\]]*\]\]", re.I)
_PIPED_LINK = re.compile(r"\[\[[^\[\]|]*\|([^\[\]]*)\]\]")
_PLAIN_LINK = re.compile(r"\[\[([^\[\]|]*)\]\]")
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*\b[^<>]*>")
_EMPTY_PARENS = re.compile(r"[(\[]\s*(?:[,;:]\s*)*[)\]]")
_PUNCT_AFTER_OPEN = re.compile(r"\(\s*[,;:]+\s*")
_PUNCT_BEFORE_CLOSE = re.compile(r"\s*[,;:]+\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")
_SPACE_AFTER_OPEN = re.compile(r"([(])\s+")
_SPACES = re.compile(r"[ \t\u00a0]+")
_TICKS = re.compile(r"'{2,}")


@dataclass
class CleanResult:
    """Plain prose and what the cleaner removed (counts feed the funnel)."""

    text: str
    templates: list[str] = field(default_factory=list)  # lower-cased names, in order
    list_items: int = 0
    captions: int = 0
    headings: int = 0
    tables: int = 0
    markup_residue_paragraphs: int = 0
    magic_words: list[str] = field(default_factory=list)
    truncated: bool = False  # only a lead of whole sections was rendered (``max_chars``)
    parsed_chars: int = 0  # characters of wikitext parsed


@dataclass
class _State:
    templates: list[str] = field(default_factory=list)
    list_items: int = 0
    captions: int = 0
    headings: int = 0
    tables: int = 0


def template_name(template: Template) -> str:
    """Normalised template name: lower case, underscores as spaces, no 'Template:' prefix."""
    return _normal_template_name(str(template.name))


def _normal_template_name(raw: str) -> str:
    name = raw.strip().replace("_", " ").lower()
    name = re.sub(r"\s+", " ", name)
    if name.startswith("template:"):
        name = name[len("template:") :].strip()
    return name


def _is_rendered_template(name: str) -> bool:
    return name in _RENDER_FIRST_ARG or name in _RENDER_LAST_ARG or name.startswith("lang-") or name in _RENDER_CONVERT


# --------------------------------------------------------------------------
# Rendering from the token stream.
#
# mwparserfromhell tokenizes in C and builds its node tree in Python; building
# is most of the cleaning time, and most of what it builds renders as nothing
# (infoboxes and other templates, tables, <math>, [[File:...]] links) or as
# its text alone (links, bold and italics). So the renderer walks the token
# list itself, with the same rules as _render below: every construct is a balanced
# run of tokens (the tokenizer emits one it cannot close as text), so it can
# be skipped, or its visible part (a link's label, a tag's contents) walked,
# without a node. A construct whose rendering needs a node (a template that
# renders as words, <nowiki>, an HTML entity, a name that is not plain text)
# is built alone by mwparserfromhell's Builder and rendered by _render: a
# node's rendering does not depend on what is around it, so the text and
# every count, template names in page order included, are those of rendering
# the whole tree (tested on every embedded page and on random cuts of them).

_OPENS = (_tok.TemplateOpen, _tok.ArgumentOpen, _tok.WikilinkOpen, _tok.ExternalLinkOpen, _tok.HeadingStart,
          _tok.CommentStart, _tok.TagOpenOpen, _tok.HTMLEntityStart)
_CLOSES = (_tok.TemplateClose, _tok.ArgumentClose, _tok.WikilinkClose, _tok.ExternalLinkClose, _tok.HeadingEnd,
           _tok.CommentEnd, _tok.TagCloseSelfclose, _tok.TagCloseClose, _tok.HTMLEntityEnd)
_OPEN_TYPES, _CLOSE_TYPES = frozenset(_OPENS), frozenset(_CLOSES)
# The tokenizer mwparserfromhell's own Parser picks: its C extension where built, else the
# pure-Python one, which emits the same tokens.
_Tokenizer = _mwp_parser.CTokenizer if _mwp_parser.use_c and _mwp_parser.CTokenizer else PyTokenizer


class _NeedsNode(Exception):
    """The walk cannot render this construct from its tokens (it needs its node, or holds a token
    where the walk does not expect one): the construct is built and rendered by _render instead."""


def _matching_closers(tokens: list) -> dict[int, int]:
    """Index of each opening token -> index of the token that closes it."""
    match: dict[int, int] = {}
    stack: list[int] = []
    for k, t in enumerate(tokens):
        kind = type(t)
        if kind in _OPEN_TYPES:
            stack.append(k)
        elif kind in _CLOSE_TYPES and stack:
            match[stack.pop()] = k
    return match


def _plain_text(tokens: list, start: int, end: int) -> str | None:
    """tokens[start:end] joined when they are all Text tokens, else None."""
    parts = []
    for k in range(start, end):
        t = tokens[k]
        if type(t) is not _tok.Text:
            return None
        parts.append(t["text"])
    return "".join(parts)


def _find(tokens: list, match: dict[int, int], start: int, end: int, kinds: tuple) -> int:
    """Index of the first token of ``kinds`` in tokens[start:end] outside nested constructs; ``end`` if none."""
    k = start
    while k < end:
        t = tokens[k]
        if isinstance(t, kinds):
            return k
        k = match.get(k, k) + 1 if type(t) in _OPEN_TYPES else k + 1
    return end


def _template_name_tokens(tokens: list, start: int, end: int) -> str | None:
    """The raw name of the template opened at ``start`` when it is plain text, else None."""
    parts = []
    for k in range(start + 1, end):
        t = tokens[k]
        if isinstance(t, (_tok.TemplateParamSeparator, _tok.TemplateClose)):
            break
        if type(t) is not _tok.Text:
            return None
        parts.append(t["text"])
    return "".join(parts)


def _parse(wikitext: str):
    """(tokens, their matching closers) of mwparserfromhell's C tokenizer."""
    tokens = _Tokenizer().tokenize(wikitext, 0, False)  # a tokenizer holds its state: one per call (threads)
    return tokens, _matching_closers(tokens)


def _render_tokens(tokens: list, match: dict[int, int], out: list[str], st: _State, check_closed: bool = False) -> bool:
    """Render a whole token list (the top level of a page or section) into ``out``.

    With ``check_closed`` it stops and returns False at a top-level Text token
    holding markup (the tokenizer gave up on a construct it could not close)."""
    i, n = 0, len(tokens)
    while i < n:
        t = tokens[i]
        kind = type(t)
        if kind is _tok.Text:
            text = t["text"]  # (a token is a dict: item access skips its __getattr__)
            if check_closed and _OPEN_MARKUP.search(text):
                return False
            out.append(text)
            i += 1
            continue
        end = match.get(i, -1) if kind in _OPEN_TYPES else -1
        if end < 0:  # (not seen: the tokenizer balances what it emits) the builder says what it makes of the rest
            _render(Builder().build(tokens[i:]).nodes, out, st)
            break
        _render_construct(tokens, match, i, end, out, st)
        i = end + 1
    return True


def _walk(tokens: list, match: dict[int, int], start: int, end: int, out: list[str], st: _State) -> None:
    """Render tokens[start:end], the inside of a construct (a link's label, a tag's contents)."""
    i = start
    while i < end:
        t = tokens[i]
        kind = type(t)
        if kind is _tok.Text:
            out.append(t["text"])
            i += 1
        elif kind in _OPEN_TYPES and match.get(i, end) < end:
            _render_construct(tokens, match, i, match[i], out, st)
            i = match[i] + 1
        else:
            raise _NeedsNode  # a separator or closer where the enclosing construct's rules put it


def _render_construct(tokens: list, match: dict[int, int], start: int, end: int, out: list[str], st: _State) -> None:
    """Render the construct tokens[start:end + 1] as _render renders its node."""
    mark = (len(out), len(st.templates), st.list_items, st.captions, st.headings, st.tables)
    try:
        _render_construct_tokens(tokens, match, start, end, out, st)
    except _NeedsNode:
        del out[mark[0] :]
        del st.templates[mark[1] :]
        st.list_items, st.captions, st.headings, st.tables = mark[2:]
        _render(Builder().build(tokens[start : end + 1]).nodes, out, st)


def _render_construct_tokens(tokens: list, match: dict[int, int], start: int, end: int, out: list[str], st: _State) -> None:
    kind = type(tokens[start])
    if kind is _tok.TemplateOpen:
        raw = _template_name_tokens(tokens, start, end)
        if raw is None:
            raise _NeedsNode
        name = _normal_template_name(raw)
        if _is_rendered_template(name):
            raise _NeedsNode
        st.templates.append(name)
    elif kind is _tok.WikilinkOpen:
        sep = _find(tokens, match, start + 1, end, (_tok.WikilinkSeparator,))
        title = _plain_text(tokens, start + 1, sep)
        if title is None:
            raise _NeedsNode
        has_text = sep < end
        shown = _link_shows(title, has_text, st)
        if shown is None:
            return
        if has_text:
            _walk(tokens, match, sep + 1, end, out, st)
        else:
            out.append(shown)
    elif kind is _tok.TagOpenOpen:
        _render_tag_tokens(tokens, match, start, end, out, st)
    elif kind is _tok.ExternalLinkOpen:
        sep = _find(tokens, match, start + 1, end, (_tok.ExternalLinkSeparator,))
        if sep < end:
            _walk(tokens, match, sep + 1, end, out, st)
    elif kind is _tok.HeadingStart:
        _heading(out, st)
    elif kind in (_tok.CommentStart, _tok.ArgumentOpen):
        return
    else:  # an HTML entity (normalized by its node)
        raise _NeedsNode


def _render_tag_tokens(tokens: list, match: dict[int, int], start: int, end: int, out: list[str], st: _State) -> None:
    head_end = _find(tokens, match, start + 1, end, (_tok.TagAttrStart, _tok.TagCloseOpen, _tok.TagCloseSelfclose))
    name = _plain_text(tokens, start + 1, head_end)
    if name is None:
        raise _NeedsNode
    tag = _tag_rule(name, tokens[start].wiki_markup, out, st)
    if tag is None:
        return
    body = _find(tokens, match, head_end, end, (_tok.TagCloseOpen, _tok.TagCloseSelfclose))
    if body >= end or isinstance(tokens[body], _tok.TagCloseSelfclose):
        return  # self-closing (or, not seen, no contents)
    if tag == "nowiki":
        raise _NeedsNode  # its contents are shown as written
    close = _find(tokens, match, body + 1, end, (_tok.TagOpenClose,))
    if close >= end:
        raise _NeedsNode
    _walk(tokens, match, body + 1, close, out, st)


def _tag_rule(name: str, wiki_markup: str | None, out: list[str], st: _State) -> str | None:
    """The rules of a tag by its name, for both walks: a list item (``*``, ``#``, ``;``, ``:``
    markup), a table and a line break render as a mark, a tag of _DROP_TAGS as nothing (None
    for these); else the lower-cased name of a tag whose contents render (``nowiki``: as written)."""
    tag = name.strip().lower()
    if tag in _LIST_TAGS and wiki_markup:
        st.list_items += 1
        out.append(_LIST)
        return None
    if tag == "table":
        st.tables += 1
        return None
    if tag == "br":
        out.append(" ")
        return None
    return None if tag in _DROP_TAGS else tag


def _heading(out: list[str], st: _State) -> None:
    """A heading renders as a paragraph break (its text is not prose)."""
    st.headings += 1
    out.append("\n")


def _link_shows(raw_title: str, has_text: bool, st: _State) -> str | None:
    """What a wikilink with this title shows: None for nothing (a media, category or interlanguage
    link; a media link's caption is counted), else its title (used when it has no text of its own)."""
    title = raw_title.strip()
    if title.startswith(":"):  # [[:Category:X|x]] is an ordinary visible link
        title = title[1:]
    elif ":" in title:
        prefix = title.split(":", 1)[0].strip()
        low = prefix.lower()
        if low in _MEDIA_PREFIXES:
            if has_text:
                st.captions += 1
            return None
        if low == "category":
            return None
        if not has_text and _INTERLANGUAGE.match(prefix):
            return None  # [[de:Foo]]: interlanguage link, not shown in the article body
    return title.split("#", 1)[0] if not title.startswith("#") else title[1:]


def _render_template(tpl: Template, name: str, out: list[str], st: _State) -> None:
    positional = [p for p in tpl.params if not p.showkey]
    if not positional:
        return
    if name in _RENDER_FIRST_ARG:
        _render(positional[0].value.nodes, out, st)
    elif name in _RENDER_LAST_ARG or name.startswith("lang-"):
        _render(positional[-1].value.nodes, out, st)
    elif name in _RENDER_CONVERT and len(positional) >= 2:
        out.append(f"{positional[0].value.strip_code().strip()} {positional[1].value.strip_code().strip()}")


def _render(nodes, out: list[str], st: _State) -> None:
    for node in nodes:
        if isinstance(node, Text):
            out.append(node.value)
        elif isinstance(node, Wikilink):
            _render_link(node, out, st)
        elif isinstance(node, Template):
            name = template_name(node)
            st.templates.append(name)
            _render_template(node, name, out, st)
        elif isinstance(node, Tag):
            tag = _tag_rule(str(node.tag), node.wiki_markup, out, st)
            if tag is None or node.self_closing:
                continue
            if tag == "nowiki":
                out.append(str(node.contents))
            elif node.contents is not None:
                _render(node.contents.nodes, out, st)
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, ExternalLink):
            if node.title is not None:
                _render(node.title.nodes, out, st)
        elif isinstance(node, Heading):
            _heading(out, st)
        elif isinstance(node, (Comment, Argument)):
            continue
        # Any other node type (none today) carries no prose.


def _render_link(link: Wikilink, out: list[str], st: _State) -> None:
    shown = _link_shows(str(link.title), link.text is not None, st)
    if shown is None:
        return
    if link.text is not None:
        _render(link.text.nodes, out, st)
    else:
        out.append(shown)


def _fallback(text: str, st: _State) -> str:
    """Regex pass for markup mwparserfromhell left as plain text."""
    if "<" in text:
        text = _REF_SELF_CLOSING.sub("", text)
        text = _REF_SPAN.sub("", text)
        text = _REF_OPEN.sub("", text)
        text = _REF_CLOSE.sub("", text)
    if "{{" in text:
        while True:
            new = _INNER_TEMPLATE.sub("", text)
            if new == text:
                break
            text = new
    if "{|" in text:
        text, n = _TABLE.subn("", text)
        st.tables += n
    if "[[" in text:
        # Innermost first: a caption's own links resolve, then its file link
        # has no nested brackets and the media rule removes it.
        for _ in range(20):
            before = text
            text, n = _INNER_MEDIA_LINK.subn("", text)
            st.captions += n
            text = _PLAIN_LINK.sub(_link_text, text)
            text = _PIPED_LINK.sub(_link_text, text)
            if text == before:
                break
    if "<" in text:
        text = _HTML_TAG.sub("", text)
    if "''" in text:
        text = _TICKS.sub(_ticks, text)
    return text


def _ticks(m: re.Match) -> str:
    # Bold/italic ticks mwparserfromhell did not pair (it pairs across lines, MediaWiki
    # per line): 2, 3 and 5 are formatting, 4 is an apostrophe before bold, more than 5
    # the extra apostrophes before bold italic.
    n = len(m.group(0))
    return "'" if n == 4 else "'" * (n - 5) if n > 5 else ""


def _link_text(m: re.Match) -> str:
    target = m.group(0)[2:].split("|", 1)[0]
    prefix = target.split(":", 1)[0].strip().lower() if ":" in target else ""
    if prefix in _MEDIA_PREFIXES or prefix == "category":
        return m.group(0)  # left for the media/category rule
    return m.group(1)


def _paragraphs(text: str, st: _State) -> tuple[list[str], int]:
    """Lines -> paragraphs (blank-line separated); list lines dropped."""
    paragraphs: list[str] = []
    current: list[str] = []
    residue = 0

    def flush() -> None:
        nonlocal residue
        if not current:
            return
        para = " ".join(current)
        para = _SPACES.sub(" ", para)
        para = _EMPTY_PARENS.sub("", para)
        para = _PUNCT_AFTER_OPEN.sub("(", para)  # "(; 1900)" after a dropped pronunciation template
        para = _PUNCT_BEFORE_CLOSE.sub(")", para)
        para = _SPACE_BEFORE_PUNCT.sub(r"\1", para)
        para = _SPACE_AFTER_OPEN.sub(r"\1", para)
        para = _SPACES.sub(" ", para).strip()
        current.clear()
        if not para or not any(ch.isalnum() for ch in para):
            return
        if any(m in para for m in FORBIDDEN_MARKUP):
            residue += 1
            return
        paragraphs.append(para)

    for line in text.split("\n"):
        stripped = line.strip()
        if not stripped:
            flush()
            continue
        if stripped.startswith(_LIST):
            flush()  # a list interrupts a paragraph
            continue
        if stripped[0] in "*#;:":  # list markup the parser left as text
            st.list_items += 1
            flush()
            continue
        if stripped.startswith("|") or stripped.startswith("!"):
            flush()  # stray table rows
            continue
        current.append(stripped.replace(_LIST, " "))
    flush()
    return paragraphs, residue


def _clean_whole(wikitext: str) -> CleanResult:
    st, out = _State(), []
    _render_tokens(*_parse(wikitext), out, st)
    return _finish(out, st, len(wikitext))[0]


def _finish(out: list[str], st: _State, parsed: int) -> tuple[CleanResult, list[str]]:
    text = "".join(out)
    magic = _MAGIC_WORD.findall(text)
    if magic:
        text = _MAGIC_WORD.sub("", text)
    text = html.unescape(text) if "&" in text else text
    text = _fallback(text, st)
    paragraphs, residue = _paragraphs(text, st)
    result = CleanResult(
        text="\n\n".join(paragraphs),
        templates=st.templates,
        list_items=st.list_items,
        captions=st.captions,
        headings=st.headings,
        tables=st.tables,
        markup_residue_paragraphs=residue,
        magic_words=magic,
        parsed_chars=parsed,
    )
    return result, paragraphs


# --------------------------------------------------------------------------
# Lead-only cleaning: parse whole sections from the top until the clean text
# holds ``max_chars`` characters.
#
# A prefix of the wikitext that ends just before a heading line parses to the
# same nodes as that part of the whole page, provided every construct opened
# in it is also closed in it: mwparserfromhell's tokenizer reads left to
# right and closes a template, link, tag, comment or table at its first valid
# closer, so text after the cut can only change the parse of something left
# open. An open construct shows up as markup in a top-level Text node (the
# tokenizer gives up on it and keeps it as text); such a prefix is not used
# (the cut moves to the next heading). The heading itself renders as a
# paragraph break, so the prefix's paragraphs are the first paragraphs of the
# whole page's. Disambiguation and set-index pages are recognised by
# templates anywhere in the page: the rest of the page is scanned for template
# names (a superset of what the parser would find), and a page with such a
# name, or __DISAMBIG__, is parsed whole.
#
# One known difference: mwparserfromhell pairs bold/italic ticks across lines
# and headings (MediaWiki resets them at every line), so a whole-page parse
# can keep stray apostrophes ("A Modest Proposal'''s" on the embedded dump)
# where the section-wise parse renders what MediaWiki shows ("Proposal's").

_HEADING_LINE = re.compile(r"^=[^\n]*=[ \t]*$", re.M)
# Markup that, as top-level text, means the tokenizer left a construct open.
_OPEN_MARKUP = re.compile(r"\{\{|\}\}|\{\||\|\}|\[\[|\]\]|''|<!--|</?[A-Za-z]")
_TEMPLATE_OPEN = re.compile(r"\{\{([^{}|<\n]*)")


def _rest_may_change_kind(rest: str) -> bool:
    """True when the unparsed rest of a page may hold what makes it a disambiguation / set-index page."""
    if "__DISAMBIG__" in rest:
        return True
    if "{{" not in rest:
        return False
    for m in _TEMPLATE_OPEN.finditer(rest):
        name = _normal_template_name(m.group(1))
        if not name or is_disambiguation_template(name) or is_set_index_template(name):
            return True  # (an empty name: a computed one, e.g. {{ {{x}} }})
    return False


_COMMENT = re.compile(r"<!--.*?-->", re.S)
# A ref span that holds no other ref opener (an unclosed <ref> must not swallow the prose up to the next ref's closer);
# written as runs of [^<] between the '<'s that open neither a ref nor its closer, which matches the same spans as
# a lazy dot with a lookahead at every character without the lookahead's cost.
_REF_SPAN_FLAT = re.compile(r"<ref\b[^>]*(?<!/)>[^<]*(?:<(?!ref\b|/ref\s*>)[^<]*)*</ref\s*>", re.I)


def strip_refs_and_comments(wikitext: str) -> str:
    """Remove comments and <ref> elements before parsing."""
    if "<!--" in wikitext:
        wikitext = _COMMENT.sub("", wikitext)
    if "<ref" in wikitext or "<REF" in wikitext or "<Ref" in wikitext:
        wikitext = _REF_SELF_CLOSING.sub("", wikitext)
        wikitext = _REF_SPAN_FLAT.sub("", wikitext)
    return wikitext


def clean_wikitext(wikitext: str, max_chars: int | None = None) -> CleanResult:
    """Render wikitext as plain prose; paragraphs joined by a blank line.

    ``max_chars``: render only whole sections from the top, until the clean
    text holds at least this many characters (``truncated`` says whether the
    page had more); the text is then exactly the first paragraphs of the whole
    page's clean text, and ``page_kind`` of the result is the whole page's.
    The removal counts (and ``templates``) cover only the part rendered.
    """
    wikitext = strip_refs_and_comments(wikitext)
    if max_chars is None or len(wikitext) <= max_chars:
        return _clean_whole(wikitext)
    cuts = [m.start() for m in _HEADING_LINE.finditer(wikitext)]
    if not cuts:
        return _clean_whole(wikitext)
    cuts.append(len(wikitext))
    st = _State()
    out: list[str] = []
    start, rendered = 0, 0
    for cut in cuts:
        if cut == start:
            continue
        if cut == len(wikitext):
            break  # the rest is the last section: the whole page it is
        # Sections from `start` to `cut` (the segment starts at a line start,
        # as a page does, so it parses as it does inside the page).
        seg_out, seg_st = [], _State()
        if not _render_tokens(*_parse(wikitext[start:cut]), seg_out, seg_st, check_closed=True):
            continue  # a construct is open at the cut: take the next section with it
        out += seg_out
        st.templates += seg_st.templates
        st.list_items += seg_st.list_items
        st.captions += seg_st.captions
        st.headings += seg_st.headings
        st.tables += seg_st.tables
        rendered += sum(map(len, seg_out))
        start = cut
        if rendered < max_chars:
            continue  # the clean text cannot be longer than what was rendered
        # `st` is copied: _finish's fallback counts into it, and more sections may follow.
        result, _ = _finish(list(out), _State(list(st.templates), st.list_items, st.captions, st.headings, st.tables), cut)
        if len(result.text) < max_chars:
            continue
        if _rest_may_change_kind(wikitext[cut:]):
            break
        result.truncated = True
        return result
    return _clean_whole(wikitext)


def is_disambiguation_template(name: str) -> bool:
    name = name.strip().lower().replace("_", " ")
    if name in _DISAMBIGUATION:
        return True
    return name.endswith(" disambiguation") or name.endswith(" dab")


def is_set_index_template(name: str) -> bool:
    name = name.strip().lower().replace("_", " ")
    return name in _SET_INDEX or name.endswith(" set index") or name.endswith(" set index article")


def is_list_title(title: str) -> bool:
    low = title.strip().lower()
    return low.startswith("list of ") or low.startswith("lists of ")


def page_kind(title: str, result: CleanResult) -> str | None:
    """'disambiguation', 'set_index', 'list_page' for pages that are not prose, else None."""
    if "__DISAMBIG__" in result.magic_words or any(is_disambiguation_template(t) for t in result.templates):
        return "disambiguation"
    if any(is_set_index_template(t) for t in result.templates):
        return "set_index"
    if is_list_title(title):
        return "list_page"
    return None


def strip_residual_markup(text: str) -> str:
    """The regex fallback alone, for markup a parser left as plain text."""
    return _fallback(text, _State())
