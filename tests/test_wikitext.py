"""Wikitext cleaning on hand-written markup: what is kept, what is dropped and counted."""

from __future__ import annotations

import pytest

from tasks.wikitext import FORBIDDEN_MARKUP, clean_wikitext, is_list_title, page_kind, strip_residual_markup

PAGE = """{{Infobox river
| name = Exe
| image = [[File:Exe.jpg|thumb|The {{lang|en|Exe}} at [[Exeter]]]]
| length = {{convert|60|mi|km}}
}}
{{Use dmy dates}}
The '''River Exe''' is a river in [[England|south-west England]].<ref name="a">{{cite web|title={{nowrap|Rivers}}|url=http://x}}</ref> It rises on [[Exmoor]]<ref name="a"/> and flows south.<!-- a comment -->
__TOC__
== Course ==
[[Image:Map.png|thumb|left|A map of the [[River Exe|river]] basin.]]
The river is {{convert|60|mi}} long &amp; crosses [http://example.org Devon].

* [[Tiverton]], a town
# Exeter
; Term : definition
: An indented note
{| class="wikitable"
|-
! Town !! Population
|-
| Exeter || 130,000
|}
Its estuary reaches the sea at [[Exmouth]].

[[Category:Rivers of Devon]]
[[de:Exe (Fluss)]]
"""


def test_clean_keeps_prose_and_link_text():
    res = clean_wikitext(PAGE)
    assert res.text == (
        "The River Exe is a river in south-west England. It rises on Exmoor and flows south."
        "\n\n"
        "The river is 60 mi long & crosses Devon."
        "\n\n"
        "Its estuary reaches the sea at Exmouth."
    )


def test_clean_counts_what_it_drops():
    res = clean_wikitext(PAGE)
    assert res.list_items == 5  # *, #, ;, the ':' of the definition, ':' indent
    assert res.captions == 1  # the [[Image:...]] in the body (the infobox one goes with its template)
    assert res.headings == 1
    assert res.tables == 1
    # Templates inside dropped elements (the ref's {{cite web}}) are not walked.
    assert res.templates == ["infobox river", "use dmy dates", "convert"]
    assert res.magic_words == ["__TOC__"]


def test_clean_output_has_no_markup():
    text = clean_wikitext(PAGE).text
    for mark in FORBIDDEN_MARKUP + ("<!--", "__TOC__", "Category", "thumb", "Fluss", "Course", "Population"):
        assert mark not in text


@pytest.mark.parametrize(
    "wikitext, expected",
    [
        ("A [[Paris|capital]] and [[London]].", "A capital and London."),
        ("See [[:Category:Rivers|rivers]] here.", "See rivers here."),
        ("Nested {{a|{{b|{{c}}}}}} templates.", "Nested templates."),
        ("Refs<ref>{{cite book|title=[[X]]}}</ref> go.<ref name=b/>", "Refs go."),
        ("Words ''italic'' and '''bold'''.", "Words italic and bold."),
        ("Line one\ncontinues here.", "Line one continues here."),
        ("Born ({{IPA|x}}; 1900) in Rome ({{lang|it|Roma}}, ).", "Born (1900) in Rome (Roma)."),
        ("Empty ({{IPA|x}}) parens.", "Empty parens."),
        ("A<br/>B.", "A B."),
        ("x<math>\\frac{1}{2}</math> y.", "x y."),
    ],
)
def test_clean_cases(wikitext, expected):
    assert clean_wikitext(wikitext).text == expected


def test_fallback_removes_markup_the_parser_left_as_text():
    # What mwparserfromhell left unparsed on the embedded dump: ref spans, a cite
    # template and a file link with a linked caption.
    raw = (
        "A<ref name=a>{{cite web|t={{x}}}}</ref> b [[File:X.png|thumb|a [[b|c]] d]] "
        "[[Foo|bar]] [[Baz]] {{a|{{b}}}} end.<ref name=z/> {| x |} ok [[Category:Y]]"
    )
    out = strip_residual_markup(raw)
    for mark in FORBIDDEN_MARKUP:
        assert mark not in out
    assert out.split() == ["A", "b", "bar", "Baz", "end.", "ok"]


def test_unbalanced_markup_never_survives():
    # Unclosed template and link: the paragraph with residue is dropped and counted.
    res = clean_wikitext("Good paragraph here.\n\nBad {{unclosed [[link and <ref>text.\n\nAnother good one.")
    for mark in FORBIDDEN_MARKUP:
        assert mark not in res.text
    assert res.text.startswith("Good paragraph here.")
    assert res.text.endswith("Another good one.")


@pytest.mark.parametrize(
    "title, wikitext, kind",
    [
        ("Alien", "'''Alien''' may refer to:\n* [[Alien (film)]]\n{{disambiguation}}", "disambiguation"),
        ("Ada", "{{Dab}}", "disambiguation"),
        ("John Smith", "{{hndis|Smith, John}}", "disambiguation"),
        ("Aa River", "{{geodis}}", "disambiguation"),
        ("Foo", "{{Disambiguation|geo|surname}}", "disambiguation"),
        ("Bar", "text\n__DISAMBIG__", "disambiguation"),
        ("HMS Foo", "{{Set index article|ship}}", "set_index"),
        ("Smith", "{{surname}}", "set_index"),
        ("Mount X", "{{Mountain index}}", "set_index"),
        ("List of anthropologists", "Text.", "list_page"),
        ("Lists of rivers", "Text.", "list_page"),
        ("Anarchism", "{{Infobox|x}} Anarchism is a philosophy.", None),
    ],
)
def test_page_kind(title, wikitext, kind):
    assert page_kind(title, clean_wikitext(wikitext)) == kind


def test_list_title_is_a_prefix_rule():
    assert is_list_title("List of Atlas Shrugged characters")
    assert not is_list_title("Schindler's List")


# --------------------------------------------------------------------------
# Lead-only cleaning (max_chars): the text is exactly the start of the whole page's.


def _embedded_pages() -> list[tuple[str, str]]:
    import bz2

    import mwxml

    from tasks.assets import embedded_dump_path

    pages = []
    for page in mwxml.Dump.from_file(bz2.open(embedded_dump_path())):
        revision = None
        for revision in page:
            pass
        text = (revision.text if revision else None) or ""
        if page.namespace == 0 and page.redirect is None and not text.lstrip().upper().startswith("#REDIRECT"):
            pages.append((page.title, text))
    return pages


def _is_paragraph_prefix(whole: str, lead: str) -> bool:
    return whole.startswith(lead) and (len(whole) == len(lead) or whole[len(lead) : len(lead) + 2] == "\n\n")


def test_lead_is_the_start_of_the_whole_clean_text_on_the_embedded_dump():
    pages = _embedded_pages()
    whole = [clean_wikitext(text) for _, text in pages]
    for max_chars in (2_000, 12_000):
        cut = 0
        for (title, text), full in zip(pages, whole):
            lead = clean_wikitext(text, max_chars)
            assert page_kind(title, lead) == page_kind(title, full), title
            if lead.truncated:
                cut += 1
                assert len(lead.text) >= max_chars and lead.parsed_chars < len(text)
                assert _is_paragraph_prefix(full.text, lead.text), title
                assert full.templates[: len(lead.templates)] == lead.templates
            else:
                assert lead.text == full.text, title
        assert cut >= 50  # most of the excerpt's articles are longer than both budgets


SECTIONS = "Lead sentence one is here.\n\n" + "".join(f"== S{i} ==\nSection {i} has some words in it.\n" for i in range(6))


def test_lead_stops_at_a_section_once_the_budget_is_reached():
    res = clean_wikitext(SECTIONS, max_chars=40)
    assert res.truncated
    assert res.text == "Lead sentence one is here.\n\nSection 0 has some words in it."
    assert clean_wikitext(SECTIONS, max_chars=None).text.startswith(res.text + "\n\n")


def test_lead_never_cuts_inside_an_open_construct():
    # The template spans the first two headings: the first cut that closes everything is after it.
    page = "Start of the article text here.\n{{Infobox x\n|a=1\n== Not a cut ==\n|b=2\n}}\nMore prose follows in the lead.\n" + SECTIONS
    lead, whole = clean_wikitext(page, max_chars=40), clean_wikitext(page)
    assert lead.truncated and _is_paragraph_prefix(whole.text, lead.text)
    assert "More prose follows in the lead." in lead.text
    # Bold spanning a heading (mwparserfromhell pairs ticks across lines).
    page = "The '''bold text\n== H ==\ncontinues''' on and on for a while.\n" + SECTIONS
    lead, whole = clean_wikitext(page, max_chars=30), clean_wikitext(page)
    assert _is_paragraph_prefix(whole.text, lead.text)


def test_lead_keeps_the_page_kind_of_the_whole_page():
    page = SECTIONS * 3 + "\n{{disambiguation}}\n"
    assert page_kind("X", clean_wikitext(page, max_chars=40)) == "disambiguation"
    page = SECTIONS * 3 + "\n__DISAMBIG__\n"
    assert page_kind("X", clean_wikitext(page, max_chars=40)) == "disambiguation"
    page = SECTIONS * 3 + "\n{{Surname}}\n"
    assert page_kind("X", clean_wikitext(page, max_chars=40)) == "set_index"
    assert page_kind("X", clean_wikitext(SECTIONS * 3 + "{{Reflist}}", max_chars=40)) is None


def test_refs_and_comments_go_before_parsing_and_an_unclosed_ref_swallows_nothing():
    text = (
        "Alpha is a letter.<ref>never closed\n\n"
        "Beta is a letter.<!-- [[not a link]] --> It comes second.<ref name=\"b\">{{cite|t=[[x]]}}</ref> "
        "Gamma follows.<ref name=\"b\" />"
    )
    out = clean_wikitext(text).text
    assert "Beta is a letter. It comes second. Gamma follows." in out
    assert "cite" not in out and "not a link" not in out
    assert not any(m in out for m in FORBIDDEN_MARKUP)


@pytest.mark.parametrize("text, expected", [
    ("the value of X'' is", "the value of X is"),  # an unpaired italic
    ("Proposal''''s", "Proposal's"),  # an apostrophe before bold
    ("''''''x", "'x"),  # one more than bold italic
])
def test_unpaired_bold_and_italic_ticks_are_formatting(text, expected):
    assert strip_residual_markup(text) == expected


def _tree_and_token_renderings(text: str):
    """(text, counts) of rendering mwparserfromhell's whole tree, and of wikitext's token walk."""
    import mwparserfromhell

    from tasks import wikitext

    tree_st, tree_out = wikitext._State(), []
    wikitext._render(mwparserfromhell.parse(text).nodes, tree_out, tree_st)
    st, out = wikitext._State(), []
    wikitext._render_tokens(*wikitext._parse(text), out, st)
    return ("".join(tree_out), tree_st), ("".join(out), st)


def test_the_token_walk_renders_what_the_whole_tree_renders():
    """On every embedded page the text and every count, template names in order included, are
    those of rendering mwparserfromhell's whole tree."""
    from tasks import wikitext

    for title, text in _embedded_pages():
        tree, walked = _tree_and_token_renderings(wikitext.strip_refs_and_comments(text))
        assert walked == tree, title


def test_the_token_walk_renders_what_the_tree_renders_on_broken_markup():
    """Random cuts of real pages leave links, templates, tags and tables open at every depth (the
    tokenizer then emits odd token runs); the walk still renders what the tree renders."""
    import random

    from tasks import wikitext

    pages = [wikitext.strip_refs_and_comments(text) for _, text in _embedded_pages()]
    rng = random.Random(7)
    for _ in range(300):
        page = rng.choice(pages)
        a = rng.randrange(len(page))
        piece = page[a : a + rng.randint(50, 3_000)]
        piece += rng.choice(["", "]]", "}}", "</i>", "|", "''", "[[x|", "{{a|b=[[c"])
        tree, walked = _tree_and_token_renderings(piece)
        assert walked == tree, piece


@pytest.mark.parametrize("text", [
    "[[a|b|c]] [[x|y [[z]]]] [[{{t}}|lab]] [[File:x.jpg|thumb|cap [[y]]]] [[de:Foo]] [[:Category:C|cc]] [[#Sec]] [[P#s]]",
    "<b>bold <i>it</i></b> <nowiki>[[raw]]</nowiki> <br/> <ref>r</ref> <span class=\"x\" title={{t}}>in span</span>",
    "* item\n# num\n; term : def\n&amp; &#x41; &#66; &nbsp;x",
    "[http://e.org title ''it''] [http://e.org] http://bare.org {{nowrap|kept [[w]]}} {{lang|fr|mot}} {{convert|3|km}}",
    "{{{arg|d}}} <!-- c --> == H {{t}} == {| class=x\n| a\n|} <math>x</math> <poem>p</poem>",
])
def test_the_token_walk_on_every_kind_of_construct(text):
    tree, walked = _tree_and_token_renderings(text)
    assert walked == tree


def test_ref_spans_are_those_of_a_lazy_match_without_a_ref_opener_inside():
    """The ref pattern, written for speed, removes what '<ref ...>' + the shortest run holding no
    '<ref' + '</ref>' removes, on random mixes of openers, closers and near misses."""
    import random
    import re

    from tasks import wikitext

    lazy = re.compile(r"<ref\b[^>]*(?<!/)>(?:(?!<ref\b).)*?</ref\s*>", re.I | re.S)
    parts = ["<ref>", "<ref name=a>", "<REF>", "</ref>", "</ref >", "</Ref>", "</reference>", "<refx>", "<ref/>",
             "<ref name=b/>", "x", "\n", "<", "/", ">", " ", "<br>"]
    rng = random.Random(3)
    for _ in range(20_000):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 12)))
        assert wikitext._REF_SPAN_FLAT.sub("", text) == lazy.sub("", text), text


# Constructs of MediaWiki pages the embedded excerpt has few or none of (parser functions, entities,
# galleries, HTML blocks, wiki-markup lists and rules, interwiki links, template arguments, stray markup).
SNIPPETS = ["<nowiki/>", "{{!}}", "{{#if:{{{a|}}}|yes [[L]]|no}}", "<span style=\"x\">in ''span''</span>", "<div class=a>div [[b|c]]</div>",
 "<gallery>\nFile:a.jpg|cap\n</gallery>", "&nbsp;", "&#x263A;", "&amp;", "[[File:a.png|thumb|cap with [[link]] and {{t}}]]",
 "[[Category:X|sort]]", "[[wikt:word|word]]", "[[w:en:Foo]]", "__NOTOC__", "<poem>\nline\n</poem>", "<blockquote>quote ''q''</blockquote>",
 "{| class=wikitable\n|-\n| a || b\n|}", "----", "* item [[x]]\n", "# n\n", "; t : d\n", ": indent\n", "<small>small</small>", "<sup>1</sup>",
 "<br />", "<br>", "</br>", "<ref>r</ref>", "<references/>", "<math>x^2</math>", "<nowiki>[[x]]</nowiki>", "<pre>p</pre>",
 "{{lang|fr|''mot''}}", "{{nowrap|a [[b]]}}", "{{convert|5|km|mi}}", "{{ill|A|de|B}}", "{{Infobox\n|a=[[b]]\n}}", "'''''bi'''''",
 "''it", "'''bold", "[http://x.org]", "[http://x.org label [[y]]]", "http://bare.org/x", "<!-- c -->", "== H ==\n", "=== H3 ===\n",
 "[[:File:x.png|see]]", "[[#anchor|a]]", "[[Page#sec]]", "[[ Page with space ]]", "[[a|]]", "[[a|b|c]]", "<i>i</i>", "<b>b</b>",
 "<li>li</li>", "<ul><li>x</li></ul>", "<center>c</center>", "<abbr title=\"t\">ab</abbr>", "{{{1}}}", "{{{1|def [[x]]}}}",
 "<onlyinclude>o</onlyinclude>", "<noinclude>n</noinclude>", "<includeonly>i</includeonly>", "<score>s</score>", "<syntaxhighlight lang=py>x</syntaxhighlight>",
 "<span>unclosed", "</span>", "<ref name=x/>", "[[", "]]", "{{", "}}", "{|", "|}", "|", "!", "<", ">", "''", "'''", "\n\n", " text ", "Prose."]


def test_the_token_walk_renders_what_the_tree_renders_on_mixed_constructs():
    import random

    rng = random.Random(11)
    for _ in range(1_500):
        piece = "".join(rng.choice(SNIPPETS) for _ in range(rng.randint(1, 15)))
        tree, walked = _tree_and_token_renderings(piece)
        assert walked == tree, piece
