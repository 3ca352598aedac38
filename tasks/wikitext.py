"""MediaWiki wikitext -> plain prose, in one pass over mwparserfromhell's nodes.

What the GeAR recipe needs from a page is its running prose: sentences a
search user might look for. So link text is kept (a piped link shows its
label), and everything that is not prose is left out: templates and
infoboxes, references, tables, files/images and their captions, categories,
interlanguage links, comments, magic words, headings, list items and
definition lists.

The renderer walks the parse tree once and appends kept text to a list
(calling ``Wikicode.remove()`` per node was measured at 15.9 s against 4.2 s
for this approach on the embedded dump). mwparserfromhell leaves markup it
cannot parse as plain text (on the embedded dump: eleven ``<ref>`` spans, a
``{{cite}}`` and a ``[[File:]]`` link), so a regex fallback runs over the
result, and a paragraph that still holds markup after it is dropped and
counted: the output never contains ``{{ }} [[ ]] <ref {| |}``.

Comments and ``<ref>`` elements are removed with regexes before parsing: they
never render, citation templates inside refs were a quarter of the parse
time, and refs the parser could not close had dropped prose with them (two
paragraphs on the embedded dump). An unclosed ``<ref>`` is left to the parser.
Bold/italic ticks it leaves unpaired become what MediaWiki shows.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from mwparserfromhell.parser import tokens as _tok
from mwparserfromhell.parser.builder import Builder
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
# Parsing without building what is never rendered.
#
# mwparserfromhell tokenizes in C and builds the node tree in Python; building
# was most of the parse time, and most of what it built (infoboxes and other
# templates, tables, <math>, [[File:...]] links ...) renders as nothing. So the
# token list is walked once first: a template, table, dropped tag or media link
# at the top level is a balanced run of tokens (the tokenizer emits a construct it cannot close as
# text), and it is cut out before the builder runs, its name counted as the
# renderer would have counted it. The nodes left are those the whole tree
# would have had at the top level, so rendering them gives the same text.

_OPENS = (_tok.TemplateOpen, _tok.ArgumentOpen, _tok.WikilinkOpen, _tok.ExternalLinkOpen, _tok.HeadingStart,
          _tok.CommentStart, _tok.TagOpenOpen, _tok.HTMLEntityStart)
_CLOSES = (_tok.TemplateClose, _tok.ArgumentClose, _tok.WikilinkClose, _tok.ExternalLinkClose, _tok.HeadingEnd,
           _tok.CommentEnd, _tok.TagCloseSelfclose, _tok.TagCloseClose, _tok.HTMLEntityEnd)
try:
    from mwparserfromhell.parser._tokenizer import CTokenizer as _Tokenizer
except ImportError:  # no C extension: the pure-Python tokenizer emits the same tokens
    from mwparserfromhell.parser.tokenizer import Tokenizer as _Tokenizer


def _construct_end(tokens: list, start: int) -> int:
    """Index of the token closing the construct opened at ``start``; -1 if none."""
    depth = 0
    for k in range(start, len(tokens)):
        t = tokens[k]
        if isinstance(t, _OPENS):
            depth += 1
        elif isinstance(t, _CLOSES):
            depth -= 1
            if depth == 0:
                return k
    return -1


def _template_name_tokens(tokens: list, start: int, end: int) -> str | None:
    """The raw name of the template opened at ``start`` when it is plain text, else None."""
    parts = []
    for k in range(start + 1, end):
        t = tokens[k]
        if isinstance(t, (_tok.TemplateParamSeparator, _tok.TemplateClose)):
            break
        if not isinstance(t, _tok.Text):
            return None
        parts.append(t.text)
    return "".join(parts)


def _media_link(tokens: list, start: int, end: int) -> bool | None:
    """For the wikilink opened at ``start``: None unless it is a plain-text [[File:/Image:/Media:...]]
    link; else whether it has a caption (the renderer drops such a link and counts its caption)."""
    head = tokens[start + 1] if start + 1 < end else None
    if not isinstance(head, _tok.Text) or not isinstance(tokens[start + 2], (_tok.WikilinkSeparator, _tok.WikilinkClose)):
        return None
    title = head.text.strip()
    if title.startswith(":") or ":" not in title or title.split(":", 1)[0].strip().lower() not in _MEDIA_PREFIXES:
        return None
    return isinstance(tokens[start + 2], _tok.WikilinkSeparator)


@dataclass
class _Cut:
    """What _parse cut out of a token list, as the renderer would have counted it."""

    names: list[tuple[int, str]] = field(default_factory=list)  # (index of the next kept top-level node, template name)
    tables: int = 0
    captions: int = 0


def _parse(wikitext: str):
    """(the top-level nodes left, _Cut)."""
    tokens = _Tokenizer().tokenize(wikitext, 0, False)  # a tokenizer holds its state: one per call (threads)
    kept: list = []
    top = 0  # top-level nodes kept so far: the builder makes one of each top-level token or construct
    cut = _Cut()
    i, n = 0, len(tokens)
    while i < n:
        if not isinstance(tokens[i], _OPENS):
            kept.append(tokens[i])
            top += 1
            i += 1
            continue
        end = _construct_end(tokens, i)
        if end < 0:
            kept.extend(tokens[i:])  # (not seen: the tokenizer balances what it emits)
            break
        if not _cut_out(tokens, i, end, top, cut):
            kept.extend(tokens[i : end + 1])  # kept whole, with what is inside it
            top += 1
        i = end + 1
    return Builder().build(kept).nodes, cut


def _cut_out(tokens: list, start: int, end: int, top: int, cut: _Cut) -> bool:
    """Whether the construct tokens[start:end + 1] renders as nothing; if so it is counted into ``cut``."""
    t = tokens[start]
    if isinstance(t, _tok.TemplateOpen):
        raw = _template_name_tokens(tokens, start, end)
        name = None if raw is None else _normal_template_name(raw)
        if name is None or _is_rendered_template(name):
            return False
        cut.names.append((top, name))
        return True
    if isinstance(t, _tok.TagOpenOpen):
        head = tokens[start + 1] if start + 1 < end else None
        # The name is one Text token (else the builder's str(tag) may differ: leave it to it).
        plain = isinstance(head, _tok.Text) and not isinstance(tokens[start + 2], _tok.Text)
        tag = head.text.strip().lower() if plain else None
        if tag != "table" and tag not in _DROP_TAGS:
            return False
        cut.tables += tag == "table"
        return True
    if isinstance(t, _tok.WikilinkOpen):
        media = _media_link(tokens, start, end)
        if media is None:
            return False
        cut.captions += media
        return True
    return False


def _render_parsed(nodes, cut: _Cut, out: list[str], st: _State) -> None:
    """_render over the nodes _parse left, counting what it cut in page order."""
    st.tables += cut.tables
    st.captions += cut.captions
    names = cut.names
    j = 0
    for k, node in enumerate(nodes):
        while j < len(names) and names[j][0] <= k:
            st.templates.append(names[j][1])
            j += 1
        _render([node], out, st)
    st.templates.extend(name for _, name in names[j:])


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
            tag = str(node.tag).strip().lower()
            if tag in _LIST_TAGS and node.wiki_markup:
                st.list_items += 1
                out.append(_LIST)
            elif tag == "table":
                st.tables += 1
            elif tag == "br":
                out.append(" ")
            elif tag in _DROP_TAGS or node.self_closing:
                continue
            elif tag == "nowiki":
                out.append(str(node.contents))
            elif node.contents is not None:
                _render(node.contents.nodes, out, st)
        elif isinstance(node, HTMLEntity):
            out.append(node.normalize())
        elif isinstance(node, ExternalLink):
            if node.title is not None:
                _render(node.title.nodes, out, st)
        elif isinstance(node, Heading):
            st.headings += 1
            out.append("\n")
        elif isinstance(node, (Comment, Argument)):
            continue
        # Any other node type (none today) carries no prose.


def _render_link(link: Wikilink, out: list[str], st: _State) -> None:
    title = str(link.title).strip()
    if title.startswith(":"):  # [[:Category:X|x]] is an ordinary visible link
        title = title[1:]
    elif ":" in title:
        prefix = title.split(":", 1)[0].strip()
        low = prefix.lower()
        if low in _MEDIA_PREFIXES:
            if link.text is not None:
                st.captions += 1
            return
        if low == "category":
            return
        if link.text is None and _INTERLANGUAGE.match(prefix):
            return  # [[de:Foo]]: interlanguage link, not shown in the article body
    if link.text is not None:
        _render(link.text.nodes, out, st)
    else:
        out.append(title.split("#", 1)[0] if not title.startswith("#") else title[1:])


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
    st = _State()
    nodes, cut = _parse(wikitext)
    out: list[str] = []
    _render_parsed(nodes, cut, out, st)
    return _finish(out, st, len(wikitext), nodes)[0]


def _finish(out: list[str], st: _State, parsed: int, nodes=None) -> tuple[CleanResult, list[str]]:
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
# On the embedded dump this happens once, beyond any document's text.

_HEADING_LINE = re.compile(r"^=[^\n]*=[ \t]*$", re.M)
# Markup that, as top-level text, means the tokenizer left a construct open.
_OPEN_MARKUP = ("{{", "}}", "{|", "|}", "[[", "]]", "''", "<!--")
_OPEN_TAG = re.compile(r"</?[A-Za-z]")
_TEMPLATE_OPEN = re.compile(r"\{\{([^{}|<\n]*)")


def _segment_is_closed(nodes) -> bool:
    for node in nodes:
        if isinstance(node, Text) and (any(m in node.value for m in _OPEN_MARKUP) or _OPEN_TAG.search(node.value)):
            return False
    return True


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
# A ref span that holds no other ref opener (an unclosed <ref> must not swallow the prose up to the next ref's closer).
_REF_SPAN_FLAT = re.compile(r"<ref\b[^>]*(?<!/)>(?:(?!<ref\b).)*?</ref\s*>", re.I | re.S)


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
        nodes, removed = _parse(wikitext[start:cut])
        if not _segment_is_closed(nodes):
            continue  # a construct is open at the cut: take the next section with it
        before = len(out)
        _render_parsed(nodes, removed, out, st)
        rendered += sum(len(x) for x in out[before:])
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
