"""Stage select_units: clean articles -> documents and candidate units.

The paper's recipe (GeAR, Appendix A), with its figures as defaults:

* documents: sentences are taken in order until the next one would push the
  document past ``max_doc_tokens`` (500, i.e. < 512); sentences made of
  repeated line breaks or repeated phrases are dropped on the way; documents
  with fewer than 3 sentences or 200 tokens are dropped;
* candidate units: sentences of 8..20 tokens (inclusive) whose first word and
  whose grammatical subject are not pronouns from {this, these, it, that,
  those, they, he, she, we, you, I}; documents with fewer than 3 candidates
  are dropped.

Added here because the input is Wikipedia prose rather than curated text: a
candidate must end in final punctuation and look like a sentence (a subject,
no list or caption debris), and an article whose words are not English is
dropped (the parser and the recipe are English).

Tokens are counted with the encoder's WordPiece tokenizer, without special
tokens.

Sentences (``sentence_splitter: senter``, the default) come from spaCy's
sentence recogniser, far cheaper than its dependency parser, with
two repairs (recognised_sentences): a piece that does not end in final
punctuation, or that starts in lower case, is joined to the one before; and
a sentence holding a stop that may end an abbreviation ('m3/s. The', 'Bell.
Later') is parsed and cut where the parser cuts. The parser then runs only
on the candidates whose subject rule it can change: those holding a listed
pronoun (every candidate with ``require_subject``), each as one sentence.
Where it differs from the parser splitter, the differences are the
parser's: cuts inside a sentence with no stop ("tutored | Alexander the
Great", "NOTE: | Since"), fragments that start in lower case, and the
documents that lose their third candidate with those fragments
(docs/BENCHMARKS.md, "Sentence splitters: senter against parser", lists them).
``sentence_splitter: parser`` (the dependency parser splits and parses every
paragraph) is kept for comparison; the tagger, attribute ruler, NER and
lemmatizer do not change the candidates, so they are never loaded.

A document's text is its kept sentences joined by one space; ``sentence_spans``
and every unit's ``char_start``/``char_end`` index into that text.

The stage reads the articles, parses them in rounds, cuts documents and
emits them. spaCy's parser is most of the stage's time, so only the
paragraphs the document rule can use are parsed: each article's paragraphs are
WordPiece-counted, and parsed in rounds (one nlp.pipe over all articles per
round) of the fewest paragraphs whose tokens can fill the documents, until
they are closed. Sentences and documents are those of parsing the whole
text. Token counts use the ``tokenizers`` library on the encoder's
tokenizer.json (the same ids as transformers' AutoTokenizer, without its
import); a paragraph is tokenized once, and each of its sentences' counts is
read off the paragraph's token offsets (TokenSpans). Parsing is serialised
per process (a lock around nlp.pipe, for threads); worker processes parse in
parallel.
"""

from __future__ import annotations

import bisect
import itertools
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
from pydantic import Field

from tasks.assets import SPACY_MODEL, embedded_encoder_path
from tasks.common import MODEL_LOAD_LOCK, Funnel, PipelineInputError, freeze_long_lived
from tasks.contracts import DOCUMENTS_SCHEMA, UNITS_SCHEMA
from tasks import dump_reader, wikitext
from tasks import extract_docs as extract_docs_module
from tasks import shard as shard_module
from tasks.extract_docs import LeadPages
from tasks.params_model import ParamsModel
from tasks.records import Records
from tasks.stage import StageConfigError, StageRun, stage

STAGE = "select_units"
ARTICLE_STAGE = "select_units.articles"
SENTENCE_STAGE = "select_units.sentences"
DOC_STAGE = "select_units.documents"
CANDIDATE_STAGE = "select_units.candidates"
LEAD_STAGE = "select_units.leads"  # lead-only articles (ExtractConfig.max_chars) read whole, and why

PAPER_PRONOUNS = ["this", "these", "it", "that", "those", "they", "he", "she", "we", "you", "i"]
# Components the candidate rules do not use (the parser alone sets sentences and dependencies).
SPACY_EXCLUDE = ("tagger", "attribute_ruler", "ner", "lemmatizer")
# The sentence recogniser has its own small embedding layer: it runs without tok2vec and the parser.
SENTER_EXCLUDE = ("tok2vec", "tagger", "parser", "attribute_ruler", "ner", "lemmatizer")
SUBJECT_DEPS = frozenset({"nsubj", "nsubjpass", "expl"})
ANY_SUBJECT_DEPS = SUBJECT_DEPS | {"csubj", "csubjpass"}

# Common English function words: about a third of an English article's words
# are in this set, and next to none of an article in another language.
_FUNCTION_WORDS = frozenset(
    "the of and in to a is was for on as by with that from at an be are were which or his her its has have had not also this it".split()
)
_WORD = re.compile(r"[^\W\d_]+")
_CLOSERS = "\"'”’»)]"
_FINAL = (".", "!", "?")
_OPENERS_OK = "\"'“‘«(¿¡"
_LIST_DEBRIS = ("|", "•", "·", "\t")
_STOP_THEN_SPACE = re.compile(r"[.!?] ")


class UnitConfig(ParamsModel):
    """The paper's document and candidate rules (Appendix A) as parameters."""

    max_doc_tokens: int = Field(500, ge=16, le=100_000, description="Add sentences in order while the document stays within this many WordPiece tokens (paper: 500, < 512).")
    min_doc_sentences: int = Field(3, ge=1, le=1000, description="Drop documents with fewer sentences (paper: 3).")
    min_doc_tokens: int = Field(200, ge=0, le=100_000, description="Drop documents with fewer tokens (paper: 200).")
    min_unit_tokens: int = Field(8, ge=1, le=512, description="Shortest candidate unit, in tokens, inclusive (paper: 8).")
    max_unit_tokens: int = Field(20, ge=1, le=512, description="Longest candidate unit, in tokens, inclusive (paper: 20).")
    pronouns: list[str] = Field(list(PAPER_PRONOUNS), description="A candidate's first word and main-clause subject must not be one of these (lower case).")
    min_candidates: int = Field(3, ge=1, le=1000, description="Drop documents with fewer candidate units (paper: 3).")
    docs_per_article: int = Field(1, ge=1, le=10_000, description="1: one document per article, its first <= max_doc_tokens tokens (the paper). N > 1: cut an article into up to N consecutive documents.")
    require_final_punctuation: bool = Field(True, description="A candidate must end with . ! or ? (optionally before a closing quote/bracket).")
    require_subject: bool = Field(False, description="A candidate's main clause must have a subject (drops fragments; off by default: the parser-only pipeline misses some subjects, e.g. \"Alain Connes studies operator algebras.\").")
    english_only: bool = Field(True, description="Drop articles whose function-word ratio says they are not English.")
    min_english_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Share of English function words below which an article is 'not_english'.")
    max_repeat_run: int = Field(3, ge=2, le=100, description="A sentence where a 1-4 word phrase repeats this many times in a row is dropped as repeated.")
    tokenizer_path: str | None = Field(None, description="Folder or hub name of the encoder's WordPiece tokenizer (counts tokens); empty: the embedded all-MiniLM-L6-v2, which has bert-base-uncased's vocab.")
    spacy_model: str = Field(SPACY_MODEL, description="spaCy pipeline (package name or path) for sentences and the dependency parse.")
    sentence_splitter: Literal["parser", "senter"] = Field(
        "senter",
        description="senter: spaCy's sentence recogniser splits paragraphs (the parser settles stops that may end an "
        "abbreviation), and the dependency parser runs only on the candidate sentences whose subject rule it can "
        "change (those holding a listed pronoun; all candidates with require_subject), each parsed as one sentence. "
        "parser: the dependency parser splits and parses every paragraph (slower).")
    batch_size: int = Field(64, ge=1, le=10_000, description="Paragraphs per spaCy nlp.pipe batch.")
    chars_per_token_budget: int = Field(6, ge=2, le=100, description="WordPiece-count an article's paragraphs in windows of (tokens still needed)*this characters, to choose how many to parse next.")


def article_files(article_dirs_or_files: Any) -> list[Path]:
    """articles.parquet files from folders and/or files, in the order given."""
    items = [article_dirs_or_files] if isinstance(article_dirs_or_files, (str, os.PathLike)) else list(article_dirs_or_files)
    files = []
    for item in items:
        p = Path(item)
        f = p / "articles.parquet" if p.is_dir() else p
        if not f.is_file():
            raise PipelineInputError(f, "articles file does not exist")
        files.append(f)
    return files


# --------------------------------------------------------------------------
# Models, loaded once per process.


# Prefect's thread-pool runner may start several select_units tasks at once:
# two threads importing transformers at the same time can fail with
# "cannot import name 'AutoTokenizer'", and a spaCy pipeline is not
# documented as thread-safe, so loading and parsing (nlp.pipe) are serialised per process.
_LOAD_LOCK = MODEL_LOAD_LOCK
_PARSE_LOCK = threading.Lock()


@cache
def _load_nlp(model: str):
    import spacy

    nlp = spacy.load(model, exclude=list(SPACY_EXCLUDE))
    freeze_long_lived()  # a pipeline lives as long as its process
    return nlp


@cache
def _load_senter(model: str):
    import spacy

    nlp = spacy.load(model, exclude=list(SENTER_EXCLUDE))
    if "senter" not in nlp.component_names:
        raise StageConfigError(f"spaCy pipeline {model!r} has no 'senter' component: set units.sentence_splitter to 'parser'")
    nlp.enable_pipe("senter")
    freeze_long_lived()
    return nlp


@cache
def _load_tokenizer(path: str):
    fast = _wordpiece_tokenizer(Path(path))
    if fast is not None:
        return fast
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = 1 << 30  # we only count tokens; silence the length warning
    return tok


class WordPieceCounter:
    """A BERT tokenizer.json run by the ``tokenizers`` library itself.

    It counts what ``AutoTokenizer`` counts (``add_special_tokens=False``, no
    truncation, no padding) without importing transformers (a large part of
    a worker's start-up)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, texts, add_special_tokens: bool = False):
        encs = self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in encs]}

    def token_spans(self, texts) -> list[TokenSpans]:
        """Each text's WordPiece tokens as character offsets and word (pre-token) numbers."""
        out = []
        for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False):
            offsets = e.offsets
            out.append(TokenSpans([a for a, _ in offsets], [b for _, b in offsets], e.word_ids))
        return out


@dataclass
class TokenSpans:
    """A paragraph's WordPiece tokens: where each starts and ends, and which word (pre-token) it is part of.

    BERT's normalizer works character by character and its pre-tokenizer cuts
    at whitespace and punctuation, so a sentence's tokens are the paragraph's
    tokens inside it, unless a word runs across its edge: count() says None
    then, and the sentence is counted on its own."""

    starts: list[int]
    ends: list[int]
    words: list[int | None]

    def count(self, start: int, end: int) -> int | None:
        """Tokens in text[start:end], or None when a word crosses either edge."""
        lo, hi = bisect.bisect_left(self.starts, start), bisect.bisect_left(self.starts, end)
        n = len(self.starts)
        if lo > 0 and (self.ends[lo - 1] > start or (lo < n and self.words[lo - 1] == self.words[lo])):
            return None
        if hi > lo and self.ends[hi - 1] > end:
            return None
        if 0 < hi < n and self.words[hi - 1] == self.words[hi]:
            return None
        return hi - lo


def _wordpiece_tokenizer(folder: Path) -> WordPieceCounter | None:
    """The folder's tokenizer.json when transformers would use it unchanged
    (a BERT tokenizer whose tokenizer_config agrees with its normalizer), else None."""
    import json

    spec, conf = folder / "tokenizer.json", folder / "tokenizer_config.json"
    if not (spec.is_file() and conf.is_file()):
        return None
    try:
        config = json.loads(conf.read_text(encoding="utf-8"))
        normalizer = json.loads(spec.read_text(encoding="utf-8")).get("normalizer") or {}
    except (OSError, ValueError):
        return None
    if config.get("tokenizer_class") not in ("BertTokenizer", "BertTokenizerFast") or normalizer.get("type") != "BertNormalizer":
        return None
    if (
        normalizer.get("lowercase") != config.get("do_lower_case", True)
        or normalizer.get("strip_accents") != config.get("strip_accents")
        or normalizer.get("handle_chinese_chars") != config.get("tokenize_chinese_chars", True)
    ):
        return None  # transformers would rewrite the normalizer
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(spec))
    tok.no_truncation()
    tok.no_padding()
    return WordPieceCounter(tok)


def load_nlp(model: str):
    """The spaCy pipeline with the parser only (cached per process)."""
    with _LOAD_LOCK:
        return _load_nlp(model)


def load_senter(model: str):
    """The spaCy pipeline with the sentence recogniser only (cached per process)."""
    with _LOAD_LOCK:
        return _load_senter(model)


def load_tokenizer(path: str | None):
    """The encoder's WordPiece tokenizer (cached per process); None: the embedded one."""
    with _LOAD_LOCK:
        return _load_tokenizer(path or str(embedded_encoder_path()))


def count_tokens(tokenizer, texts: Sequence[str]) -> list[int]:
    """WordPiece tokens per text, without [CLS]/[SEP]."""
    if not texts:
        return []
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [len(x) for x in ids]


# --------------------------------------------------------------------------
# Sentence features and rules.


@dataclass
class Sentence:
    text: str
    first_word: str  # lower case, "" when the sentence has no word
    subject_pronoun: bool | None  # None: not parsed yet (the senter splitter parses candidates later)
    has_subject: bool | None
    tokens: int = 0
    holds_pronoun: bool = True  # some token is a listed pronoun: only then can the subject rule fire


def _first_word(sent) -> str:
    return next((t.lower_ for t in sent if any(ch.isalnum() for ch in t.text)), "")


def _subjects(sent, pronouns: frozenset[str]) -> tuple[bool, bool]:
    """(the main clause's subject is a listed pronoun, it has a subject) from a parsed sentence."""
    subjects = [c for c in sent.root.children if c.dep_ in ANY_SUBJECT_DEPS]
    return any(c.dep_ in SUBJECT_DEPS and c.lower_ in pronouns for c in subjects), bool(subjects)


def sentence_features(sent, pronouns: frozenset[str]) -> Sentence:
    """What the rules need from one parsed spaCy sentence span."""
    subject_pronoun, has_subject = _subjects(sent, pronouns)
    return Sentence(sent.text.strip(), _first_word(sent), subject_pronoun, has_subject)


def split_features(sent, pronouns: frozenset[str], pronoun_tokens=None, doc_text: str | None = None) -> Sentence:
    """A sentence from the sentence recogniser: no parse yet.

    ``pronoun_tokens`` and ``doc_text``: its Doc's pronoun_tokens and text, when known
    (an array op and a slice instead of a loop over the sentence's tokens)."""
    holds = (pronoun_tokens[sent.start : sent.end].any() if pronoun_tokens is not None
             else any(t.lower_ in pronouns for t in sent))
    text = sent.text if doc_text is None else doc_text[sent.start_char : sent.end_char]
    return Sentence(text.strip(), _first_word(sent), None, None, holds_pronoun=bool(holds))


def pronoun_tokens(doc, pronouns: frozenset[str]):
    """Boolean array: which of the Doc's tokens are a listed pronoun (by their lower-case form)."""
    import numpy as np
    from spacy.attrs import LOWER

    return np.isin(doc.to_array(LOWER), [doc.vocab.strings.add(p) for p in pronouns])


def is_repeated(text: str, max_run: int) -> bool:
    """True when some 1-4 word phrase occurs ``max_run`` times in a row ("la la la")."""
    words = text.lower().split()
    n_words = len(words)
    for n in range(1, 5):
        # An n-word phrase repeated max_run times is a run of n * (max_run - 1)
        # positions whose word equals the word n later: one pass per n.
        need, run = n * (max_run - 1), 0
        for p in range(n_words - n):
            run = run + 1 if words[p] == words[p + n] else 0
            if run >= need:
                return True
    return False


def junk_reason(text: str, config: UnitConfig) -> str | None:
    """Why a sentence cannot be part of a document (paper: repeated line breaks / phrases)."""
    if not any(ch.isalpha() for ch in text):
        return "no_letters"
    # Clean paragraphs hold no line break, so one inside a sentence is layout debris.
    if "\n" in text:
        return "line_breaks"
    if is_repeated(text, config.max_repeat_run):
        return "repeated_phrase"
    return None


def ends_with_final_punctuation(text: str) -> bool:
    return text.rstrip().rstrip(_CLOSERS).endswith(_FINAL)


def surface_reason(s: Sentence, config: UnitConfig, pronouns: frozenset[str]) -> str | None:
    """The candidate rules that need no parse, in candidate_reason's order."""
    if s.tokens < config.min_unit_tokens:
        return "too_short"
    if s.tokens > config.max_unit_tokens:
        return "too_long"
    if config.require_final_punctuation and not ends_with_final_punctuation(s.text):
        return "no_final_punctuation"
    if (not s.text[0].isalnum() and s.text[0] not in _OPENERS_OK) or any(m in s.text for m in _LIST_DEBRIS):
        return "list_or_caption"
    if s.first_word in pronouns:
        return "first_word_pronoun"
    return None


def needs_parse(s: Sentence, config: UnitConfig, pronouns: frozenset[str]) -> bool:
    """A sentence not parsed yet whose candidacy the parse can still change."""
    return s.subject_pronoun is None and (config.require_subject or s.holds_pronoun) and surface_reason(s, config, pronouns) is None


def candidate_reason(s: Sentence, config: UnitConfig, pronouns: frozenset[str]) -> str | None:
    """None if the sentence is a candidate unit, else the first rule it fails."""
    reason = surface_reason(s, config, pronouns)
    if reason:
        return reason
    if s.subject_pronoun:
        return "subject_pronoun"
    if config.require_subject and not s.has_subject:
        return "no_subject"
    return None


def unit_rule_reasons(texts: Sequence[str], config: UnitConfig | None = None) -> list[str | None]:
    """Why each sentence would not be a candidate unit under ``config``'s rules
    (None: it would be one), each sentence parsed on its own as the senter
    splitter parses candidates. For scoring rankings against the rules'
    prior, outside the stage."""
    config = config or UnitConfig()
    pronouns = frozenset(config.pronouns)
    nlp = load_nlp(config.spacy_model)
    texts = [t.strip() for t in texts]
    sentences = []
    with _PARSE_LOCK:  # spaCy's tokenizer writes to its cache
        for text, n in zip(texts, count_tokens(load_tokenizer(config.tokenizer_path), texts), strict=True):
            doc = nlp.make_doc(text)
            sentences.append(Sentence(text, _first_word(doc), None, None, tokens=n,
                                      holds_pronoun=any(t.lower_ in pronouns for t in doc)))
    _parse_subjects(nlp, [s for s in sentences if needs_parse(s, config, pronouns)], pronouns, config.batch_size)
    return [candidate_reason(s, config, pronouns) for s in sentences]


def english_ratio(text: str) -> float:
    words = _WORD.findall(text[:20_000].lower())
    return sum(w in _FUNCTION_WORDS for w in words) / len(words) if words else 0.0


# --------------------------------------------------------------------------
# The stage.


@dataclass
class _Article:
    page_id: int
    revision_id: int
    title: str
    source_dump: str
    paragraphs: list[str]
    lead: tuple[str, int] | None  # its text is only a lead (ExtractConfig.max_chars): its name in LeadPages
    sentences: list[Sentence] = field(default_factory=list)
    para_tokens: list[int] = field(default_factory=list)  # WordPiece tokens of paragraphs[:len(para_tokens)]
    para_spans: list[TokenSpans | None] = field(default_factory=list)  # and where they are (None: not known)
    parsed: int = 0  # paragraphs parsed so far
    english: float = 1.0  # its English ratio (1.0 when english_only is off)


def _next_slice(art: _Article, need: int, tokenizer, chars_per_token: int) -> int:
    """How many paragraphs after ``art.parsed`` to parse next: the fewest whose
    WordPiece tokens exceed ``need`` (or all that are left).

    Only how much is parsed at a time depends on this, never the result: a
    document still open after a slice gets the next one."""
    n, total = art.parsed, 0
    while n < len(art.paragraphs):
        if n == len(art.para_tokens):
            # Count a window of paragraphs at a time (an article can be long; one tokenizer call per window).
            window, chars = [], 0
            for p in art.paragraphs[n:]:
                window.append(p)
                chars += len(p)
                if chars > max(need, 64) * chars_per_token:
                    break
            if hasattr(tokenizer, "token_spans"):
                spans = tokenizer.token_spans(window)
                art.para_tokens += [len(x.starts) for x in spans]
                art.para_spans += spans
            else:
                art.para_tokens += count_tokens(tokenizer, window)
                art.para_spans += [None] * len(window)
        total += art.para_tokens[n]
        n += 1
        if total > need:
            break
    return n - art.parsed


def recognised_sentences(docs: list, parser=None, batch_size: int = 64, texts: list[str] | None = None) -> list[list]:
    """Each Doc's sentences from the sentence recogniser, mended where it is often wrong:

    * a piece is joined to the one before while that one does not end in final
      punctuation (the recogniser splits after openers and inside words:
      'frequently "[' + 'contemplated] the ...', 'Non' + '-visual astronomy'),
      or when it starts with a lower-case letter ('etc.)' + 'along with ...');
    * the recogniser misses boundaries after a stop that could end an
      abbreviation ('2161 m3/s. The Peace River', 'Linear B. The', 'Bell.
      Later'): a sentence holding such a stop before a capitalised word or a
      number is parsed by ``parser``, and cut where the parser starts a
      sentence there (as the parser splitter would).

    ``texts``: the Docs' texts, when the caller has them (Doc.text joins its tokens anew at each call).
    """
    texts = [doc.text for doc in docs] if texts is None else texts
    spans = [_joined_spans(doc, text) for doc, text in zip(docs, texts)]
    unsure = [(d, k, stops) for d, doc_spans in enumerate(spans) for k, (a, b) in enumerate(doc_spans)
              if parser is not None and (stops := _possible_stops(docs[d], a, b, texts[d]))]
    pieces = {}  # (doc, span) -> the parser's cuts of that span
    unsure_texts = (docs[d][spans[d][k][0] : spans[d][k][1]].text for d, k, _ in unsure)
    for (d, k, stops), sentence_doc in zip(unsure, parser.pipe(unsure_texts, batch_size=batch_size) if unsure else ()):
        a, b = spans[d][k]
        if len(sentence_doc) == b - a:  # (else it was tokenised differently on its own: keep the recogniser's sentence)
            cuts = [a] + [i + 1 for i in stops if sentence_doc[i + 1 - a].is_sent_start] + [b]
            pieces[d, k] = list(zip(cuts, cuts[1:]))
    return [[docs[d][a:b] for k, span in enumerate(doc_spans) for a, b in pieces.get((d, k), [span])]
            for d, doc_spans in enumerate(spans)]


def _joined_spans(doc, text: str) -> list[tuple[int, int]]:
    """The recogniser's sentences as [start, end) token offsets, joined as recognised_sentences says."""
    spans: list[list[int]] = []
    open_ = False  # the last span does not end in final punctuation
    for sent in doc.sents:
        sent_text = text[sent.start_char : sent.end_char]  # (sent.text, without making its tokens)
        if spans and (open_ or sent_text[:1].islower()):
            spans[-1][1] = sent.end
        else:
            spans.append([sent.start, sent.end])
        open_ = not ends_with_final_punctuation(sent_text)
    return [(a, b) for a, b in spans]


def _possible_stops(doc, start: int, end: int, text: str | None = None) -> list[int]:
    """Tokens inside [start, end) ending in . ! or ? before a space and a capitalised word or a number,
    or an opening bracket or quote and one ('5 plus 2. (Incidentally, ...')."""
    # A stop is a token's last character followed by its trailing space: a span without ". ", "! "
    # or "? " has none, and most have none: searching the text is cheaper than walking the tokens.
    if end - start < 3 or not _STOP_THEN_SPACE.search(doc.text if text is None else text, doc[start].idx, doc[end - 1].idx):
        return []
    stops = []
    for i in range(start + 1, end - 1):
        if doc[i].text.endswith(_FINAL) and doc[i].whitespace_:
            after = doc[i + 1].text if doc[i + 1].text not in _OPENERS_OK or i + 2 >= end else doc[i + 2].text
            if after[:1].isupper() or after[:1].isdigit():
                stops.append(i)
    return stops


def _parse(nlp, batches: list[tuple[str, int]], pronouns: frozenset[str], batch_size: int,
           parser=None, token_spans: Sequence[TokenSpans | None] | None = None) -> dict[int, list[Sentence]]:
    """(paragraph, article index) -> each article's sentences, in order; spaCy Docs are not kept.

    ``nlp`` is the parser, or the sentence recogniser with ``parser`` for the boundaries it may miss.
    ``token_spans``: each paragraph's WordPiece tokens where known; a sentence's count is read off them."""
    out: dict[int, list[Sentence]] = {}
    # A spaCy pipeline is not documented as thread-safe: one parse at a time per process.
    with _PARSE_LOCK:
        stream = nlp.pipe(batches, as_tuples=True, batch_size=batch_size, n_process=1)
        start = 0  # index in batches of the chunk's first paragraph
        while chunk := list(itertools.islice(stream, batch_size)):
            texts = [batches[start + k][0] for k in range(len(chunk))]  # (a Doc's text is its input's)
            spans = token_spans[start : start + len(chunk)] if token_spans else [None] * len(chunk)
            start += len(chunk)
            if parser is None:
                sentences = [[(sentence_features(sent, pronouns), sent) for sent in doc.sents] for doc, _ in chunk]
            else:
                docs = [doc for doc, _ in chunk]
                sentences = []
                for doc, text, sents in zip(docs, texts, recognised_sentences(docs, parser, batch_size, texts)):
                    marks = pronoun_tokens(doc, pronouns)
                    sentences.append([(split_features(sent, pronouns, marks, text), sent) for sent in sents])
            for (_, i), text, paragraph_spans, found in zip(chunk, texts, spans, sentences):
                kept = out.setdefault(i, [])
                for s, sent in found:
                    if not s.text:
                        continue
                    if paragraph_spans is not None:
                        raw = text[sent.start_char : sent.end_char]
                        a = sent.start_char + len(raw) - len(raw.lstrip())  # where s.text (stripped) starts
                        s.tokens = paragraph_spans.count(a, a + len(s.text)) or 0  # (0: counted on its own later)
                    kept.append(s)
    return out


def _parse_subjects(nlp, sentences: list[Sentence], pronouns: frozenset[str], batch_size: int) -> None:
    """Parse each sentence as one sentence (its boundaries are the recogniser's) and set its subject features."""
    if not sentences:
        return
    # The tokenizer too: spaCy's tokenizer writes to its cache, and shards of one process run in threads.
    with _PARSE_LOCK:
        docs = []
        for s in sentences:
            doc = nlp.make_doc(s.text)
            for k, token in enumerate(doc):
                token.is_sent_start = k == 0  # the parser keeps preset boundaries: one root per sentence
            docs.append(doc)
        for s, doc in zip(sentences, nlp.pipe(docs, batch_size=batch_size)):
            s.subject_pronoun, s.has_subject = _subjects(doc[:], pronouns)


def _read_whole(arts: list[_Article], leads: LeadPages, funnel: Funnel, reason: str) -> None:
    """Replace these lead-only articles' paragraphs with those of their whole page."""
    texts = leads.whole_texts([art.lead for art in arts])
    for art in arts:
        whole = _paragraphs_of(texts[art.lead])
        if whole[: len(art.paragraphs)] != art.paragraphs:
            # (the lead is always the start of the whole text: should that fail, start the article again)
            art.sentences, art.para_tokens, art.para_spans, art.parsed = [], [], [], 0
        art.paragraphs = whole  # the sentences parsed so far are those of the whole page's first paragraphs
        art.lead = None
        funnel.add(LEAD_STAGE, reason)


def _paragraphs_of(text: str) -> list[str]:
    return [p for p in text.split("\n\n") if p.strip()]


def _cut_documents(sentences: list[Sentence], config: UnitConfig, funnel: Funnel) -> tuple[list[list[Sentence]], bool]:
    """Consecutive documents of whole sentences; second value: the last one is still open."""
    seen: set[str] = set()

    def junk(s: Sentence) -> str | None:
        return junk_reason(s.text, config)

    def duplicate(s: Sentence) -> str | None:
        return "duplicate_sentence" if s.text in seen else None

    def too_long(s: Sentence) -> str | None:
        return "longer_than_max_doc_tokens" if s.tokens > config.max_doc_tokens else None

    records = Records(funnel, SENTENCE_STAGE)
    parts: list[list[Sentence]] = []
    cur: list[Sentence] = []
    cur_tokens = 0
    for s in sentences:
        records.seen()
        if not records.passes(s, junk, duplicate, too_long):
            continue
        seen.add(s.text)
        if cur_tokens + s.tokens > config.max_doc_tokens:
            parts.append(cur)
            if len(parts) == config.docs_per_article:
                # The paper stops here: the sentence that would cross the limit ends the article.
                records.drop("beyond_max_doc_tokens")
                return parts, False
            cur, cur_tokens = [], 0
        cur.append(s)
        cur_tokens += s.tokens
    if cur:
        parts.append(cur)
    return parts, True


@stage(STAGE, UnitConfig, reads={"article_dirs_or_files": article_files},
       writes={"documents.parquet": DOCUMENTS_SCHEMA, "units.parquet": UNITS_SCHEMA},
       code=[extract_docs_module.__file__, wikitext.__file__, shard_module.__file__, dump_reader.__file__],  # LeadPages reads pages whole
       gil_bound=True)
def select_units(run: StageRun, article_dirs_or_files: Any, config: UnitConfig) -> dict:
    """Documents and candidate units of one shard's articles (documents.parquet, units.parquet)."""
    if config.min_unit_tokens > config.max_unit_tokens:
        raise StageConfigError(f"min_unit_tokens {config.min_unit_tokens} > max_unit_tokens {config.max_unit_tokens}")
    return _select(article_files(article_dirs_or_files), run, config)


@dataclass
class _Models:
    """What the stage runs, loaded once per process."""

    parser: Any  # the spaCy pipeline with the dependency parser
    splitter: Any  # what cuts paragraphs into sentences: the sentence recogniser, or the parser
    tokenizer: Any
    pronouns: frozenset[str]

    @classmethod
    def load(cls, config: UnitConfig) -> _Models:
        parser = load_nlp(config.spacy_model)
        splitter = load_senter(config.spacy_model) if config.sentence_splitter == "senter" else parser
        return cls(parser, splitter, load_tokenizer(config.tokenizer_path), frozenset(p.lower() for p in config.pronouns))

    @property
    def boundary_parser(self):
        """The parser that settles the recogniser's doubtful stops (None when the parser splits)."""
        return None if self.splitter is self.parser else self.parser


def load_models(config: UnitConfig) -> None:
    """Load the models ``config`` names into this process's caches (the fork server of
    the worker processes does, so that each worker starts with them: tasks/worker_models.py)."""
    _Models.load(config)


def _select(files: list[Path], run: StageRun, config: UnitConfig) -> dict:
    """read -> parse in rounds -> cut documents -> emit."""
    models = _Models.load(config)
    leads = LeadPages(files)
    articles = _read_articles(files, config, leads, run.funnel)
    _parse_in_rounds(articles, models, config, leads, run.funnel)
    documents = [_cut_documents_counted(art.sentences, models.tokenizer, config, run.funnel)[0] for art in articles]
    # The senter splitter's sentences get a parse where the subject rule needs one:
    # the candidates of documents long enough to be kept.
    _parse_subjects(models.parser, [s for parts in documents for part in parts if _too_short(part, config) is None
                                    for s in part if needs_parse(s, config, models.pronouns)], models.pronouns, config.batch_size)
    doc_cols, unit_cols = _emit(articles, documents, config, models.pronouns, run.funnel)
    run.info.update(documents=len(doc_cols["doc_id"]), units=len(unit_cols["doc_id"]))
    return {"documents.parquet": doc_cols, "units.parquet": unit_cols}


def _read_articles(files: list[Path], config: UnitConfig, leads: LeadPages, funnel: Funnel) -> list[_Article]:
    """The articles of ``files`` that the article rules keep (English, with text)."""
    records = Records(funnel, ARTICLE_STAGE)
    articles: list[_Article] = []
    for f in files:
        table = pq.read_table(f, columns=["page_id", "revision_id", "title", "text", "source_dump"])
        for row in table.to_pylist():
            records.seen()
            key = (str(f), row["page_id"])
            articles.append(_Article(row["page_id"], row["revision_id"], row["title"], row["source_dump"], _paragraphs_of(row["text"]),
                                     key if leads.is_lead(*key) else None,
                                     english=english_ratio(row["text"]) if config.english_only else 1.0))
    # A lead whose English ratio is near the threshold is decided on the whole page.
    unsure = [art for art in articles if config.english_only and art.lead is not None and art.english < 2 * config.min_english_ratio]
    _read_whole(unsure, leads, funnel, "read_whole_page_for_english_ratio")
    for art in unsure:
        art.english = english_ratio("\n\n".join(art.paragraphs))

    def english(art: _Article) -> str | None:
        return "not_english" if art.english < config.min_english_ratio else None

    def has_text(art: _Article) -> str | None:
        return None if art.paragraphs else "empty_text"

    return [art for art in articles if records.passes(art, english, has_text)]


def _parse_in_rounds(articles: list[_Article], models: _Models, config: UnitConfig, leads: LeadPages, funnel: Funnel) -> None:
    """Parse each article's sentences until its documents are closed or its text ends.

    Rounds parse a few paragraphs per article (one nlp.pipe over all articles
    each round). A paragraph is parsed on its own, so its sentences do not
    depend on how many were parsed with it, and the documents are those of
    parsing the whole text. A lead-only article whose documents want more than
    its lead is read whole and goes on."""
    need = config.max_doc_tokens * config.docs_per_article
    todo = list(range(len(articles)))
    while todo:
        batch: list[tuple[str, int]] = []
        batch_spans: list[TokenSpans | None] = []
        for i in todo:
            art = articles[i]
            kept = sum(s.tokens for s in art.sentences)
            n = _next_slice(art, max(need - kept, 0), models.tokenizer, config.chars_per_token_budget)
            batch += [(p, i) for p in art.paragraphs[art.parsed : art.parsed + n]]
            batch_spans += art.para_spans[art.parsed : art.parsed + n]
            art.para_spans[art.parsed : art.parsed + n] = [None] * n  # (used once, by this parse)
            art.parsed += n
        parsed = _parse(models.splitter, batch, models.pronouns, config.batch_size, models.boundary_parser, batch_spans)
        more_text, short_leads = [], []
        for i in todo:
            art = articles[i]
            art.sentences += parsed.get(i, [])
            if not _cut_documents_counted(art.sentences, models.tokenizer, config, Funnel())[1]:
                continue  # its documents are closed
            if art.parsed < len(art.paragraphs):
                more_text.append(i)  # the slice ran out before the documents were full: parse another one
            elif art.lead is not None:
                short_leads.append(i)  # the text was only a lead and the documents want more of the page
        _read_whole([articles[i] for i in short_leads], leads, funnel, "read_whole_page_for_documents")
        todo = more_text + short_leads


def _emit(articles: list[_Article], documents: list[list[list[Sentence]]], config: UnitConfig, pronouns: frozenset[str],
          funnel: Funnel) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
    """The documents' and units' columns; an article is kept when one of its documents is."""
    records = Records(funnel, ARTICLE_STAGE)
    doc_cols: dict[str, list[Any]] = {n: [] for n in DOCUMENTS_SCHEMA.names}
    unit_cols: dict[str, list[Any]] = {n: [] for n in UNITS_SCHEMA.names}
    for k, art in enumerate(articles):
        parts, documents[k] = documents[k], []
        art.sentences = []
        kept_any = False
        for part_no, part in enumerate(parts):
            if _emit_document(art, part_no, part, config, pronouns, funnel, doc_cols, unit_cols):
                kept_any = True
        if records.check(None if kept_any else "no_document_kept"):
            records.kept()
    return doc_cols, unit_cols


def _cut_documents_counted(sentences: list[Sentence], tokenizer, config: UnitConfig, funnel: Funnel):
    missing = [s for s in sentences if s.tokens == 0]
    for s, n in zip(missing, count_tokens(tokenizer, [s.text for s in missing])):
        s.tokens = n
    return _cut_documents(sentences, config, funnel)


def _too_short(part: list[Sentence], config: UnitConfig) -> str | None:
    """Why a document is dropped before its candidates are looked at (paper: < 3 sentences or < 200 tokens)."""
    if len(part) < config.min_doc_sentences:
        return "too_few_sentences"
    if sum(s.tokens for s in part) < config.min_doc_tokens:
        return "too_few_tokens"
    return None


def _emit_document(art: _Article, part_no: int, part: list[Sentence], config: UnitConfig, pronouns, funnel: Funnel, doc_cols, unit_cols) -> bool:
    docs, units = Records(funnel, DOC_STAGE), Records(funnel, CANDIDATE_STAGE)
    docs.seen()
    tokens = sum(s.tokens for s in part)
    funnel.add(SENTENCE_STAGE, "kept", len(part))
    if not docs.check(_too_short(part, config)):
        return False

    def candidate(s: Sentence) -> str | None:
        return candidate_reason(s, config, pronouns)

    candidates = []
    for idx, s in enumerate(part):
        units.seen()
        if units.passes(s, candidate):
            candidates.append(idx)
    if len(candidates) < config.min_candidates:
        docs.drop("too_few_candidates")
        units.drop("in_document_with_too_few_candidates", len(candidates))
        return False
    docs.kept()
    units.kept(len(candidates))

    doc_id = f"{art.page_id}-{part_no}"
    spans, pieces, pos = [], [], 0
    for s in part:
        if pieces:
            pos += 1
        spans.append({"start": pos, "end": pos + len(s.text)})
        pieces.append(s.text)
        pos += len(s.text)
    text = " ".join(pieces)
    doc_cols["doc_id"].append(doc_id)
    doc_cols["page_id"].append(art.page_id)
    doc_cols["revision_id"].append(art.revision_id)
    doc_cols["part"].append(part_no)
    doc_cols["title"].append(art.title)
    doc_cols["text"].append(text)
    doc_cols["sentence_spans"].append(spans)
    doc_cols["token_count"].append(tokens)
    doc_cols["source_dump"].append(art.source_dump)
    for idx in candidates:
        s, span = part[idx], spans[idx]
        unit_cols["doc_id"].append(doc_id)
        unit_cols["sentence_index"].append(idx)
        unit_cols["text"].append(s.text)
        unit_cols["char_start"].append(span["start"])
        unit_cols["char_end"].append(span["end"])
        unit_cols["token_count"].append(s.tokens)
    return True


select_units_task = select_units.task
