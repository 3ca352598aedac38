"""Quality gate for raw LLM rewrites: clean the output, then keep it or drop
it with one reason. Pure functions; the stage counts each reason in the funnel.

Rules (checked in this order, first hit wins):

- ``empty``: nothing left after cleaning (also a backend's empty content);
- ``refusal``: "I'm sorry", "I cannot", "As an AI" ... (the model declined);
- ``preamble``: chatty lead-ins ("Sure", "Here is", "Certainly" ...) that are
  not a query; a plain label such as "Query:" is stripped, not dropped;
- ``echo``: the cleaned query equals the sentence after normalisation
  (lower case, punctuation removed, whitespace collapsed) — the model copied
  it — or nearly so: character similarity (difflib ratio of the normalised
  strings) >= ``echo_similarity`` (0.9; catches "1300 mi" -> "1300 miles" or
  one inserted comma, which SmolLM2 does often);
- ``fragment``: the cleaned query is a verbatim run of the sentence's words
  (after normalisation, at word boundaries), at least ``fragment_min_words``
  words long and at least ``fragment_min_share`` of the sentence's words
  (4 and one half): a cut-off copy such as "His combined works constitute a
  virtual encyclopedia" is no keyword query; also when words are glued
  ("virtualencyclopedia"): then the query without spaces is part of the
  sentence without spaces and has half its characters. (Added with constrained local
  decoding, which cannot echo a whole sentence but can stop part way.)
- ``too_long``: more words than the sentence, or more than ``max_query_words``;
- ``adds_information``: the paper's prompt says "do not add other information".
  A content word (not a stop word) of the query is *new* when its stem is not a
  stem of a sentence word and it is not a substring of the normalised sentence
  (which accepts split compounds and shortened names). More than
  ``max_new_words`` new words drops the query. The default tolerance of 1
  allows the paper's "unimportant words can be modified" (e.g. "born" for
  "was born in" → "birth").
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from pydantic import ConfigDict, Field

from tasks.params_model import ParamsModel

# ``truncated`` (the backend stopped at max_new_tokens: finish_reason "length")
# and ``backend_error`` (no usable answer) are decided by the stage from the
# backend's report, before ``judge`` sees the text.
REASONS = (
    "empty", "refusal", "preamble", "echo", "fragment", "too_long", "adds_information", "truncated", "backend_error"
)

_QUOTES = "\"'`“”‘’«»"
# Labels a model puts before the answer; stripped, the rest is kept.
_LABEL = re.compile(
    r"^\s*(?:[-*•]\s*|\d+[.)]\s*)?"
    r"(?:(?:search\s+)?(?:query|queries|phrase|keywords?|terms?)|answer|output|search|rewrite|rewritten\s+query)"
    r"\s*[:：-]\s*",
    re.IGNORECASE,
)
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
_REFUSAL = re.compile(
    r"^(?:i'?m sorry|i am sorry|sorry,|i cannot|i can'?t|i can not|i'?m unable|i am unable|"
    r"as an ai|as a language model|unfortunately)",
    re.IGNORECASE,
)
_PREAMBLE = re.compile(
    r"^(?:sure\b|certainly\b|of course\b|okay\b|ok\b|here is\b|here are\b|here's\b|"
    r"this is\b|the (?:search )?(?:query|phrase|keywords?) (?:is|are|would be)\b|"
    r"a (?:possible |good )?(?:search )?(?:query|phrase) (?:is|would be)\b|"
    r"users might|users may|i would|you could|you can|to search)",
    re.IGNORECASE,
)
_WORD = re.compile(r"[0-9a-z]+")

STOP_WORDS = frozenset(
    """a an the of in on at to for from by with and or but nor as is are was were be been being
    its it this that these those their his her he she they them we you i which who whom whose what
    when where why how not no into onto over under about after before during between than then
    there here also has have had do does did can could may might will would shall should
    s vs via per one""".split()
)


class GateConfig(ParamsModel):
    """The gate's thresholds; nested in the rewrite config as ``RewriteConfig.gate``
    (so it is part of the stage's cache key and of the Prefect UI form)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_query_words: int = Field(
        32, ge=1, le=256, description="Drop queries longer than this many words (or than the sentence)."
    )
    max_new_words: int = Field(
        1, ge=0, le=20, description="Content words not found in the sentence (after stemming) that a query may add."
    )
    echo_similarity: float = Field(
        0.9, ge=0.5, le=1.0, description="Drop near-copies of the sentence (difflib ratio of normalised text >= this)."
    )
    fragment_min_words: int = Field(
        4, ge=1, le=64, description="A verbatim run of the sentence this many words long (or more) may be a fragment."
    )
    fragment_min_share: float = Field(
        0.5, gt=0.0, le=1.0, description="... and a fragment when it also has at least this share of the sentence's words."
    )


@dataclass(frozen=True)
class Verdict:
    query: str  # the cleaned query (also filled when dropped, for the rejected table)
    reason: str | None  # None = kept

    @property
    def kept(self) -> bool:
        return self.reason is None


def first_line(text: str) -> str:
    """The first non-empty line: small models often add explanations below."""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def clean_output(raw: str) -> str:
    """First line, without bullets, "Query:"-style labels and wrapping quotes."""
    line = first_line(raw)
    for _ in range(2):  # a label inside quotes or quotes after a label
        line = _LABEL.sub("", line, count=1)
        line = _BULLET.sub("", line, count=1)
        line = line.strip().rstrip(".;").strip().strip(_QUOTES).strip()
    return line


def normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def stem(word: str) -> str:
    """A deliberately crude suffix stripper: enough to match plural/tense variants."""
    for suffix, repl in (("ies", "y"), ("ied", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("ly", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)] + repl
    return word


def content_words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]


def new_words(query: str, sentence: str) -> list[str]:
    """Content words of ``query`` that the sentence does not support."""
    sentence_norm = normalise(sentence)
    sentence_stems = {stem(w) for w in _WORD.findall(sentence.lower())}
    squashed = sentence_norm.replace(" ", "")
    out = []
    for w in content_words(query):
        if stem(w) in sentence_stems or w in squashed:
            continue
        out.append(w)
    return out


def is_echo(query: str, sentence: str, similarity: float = 0.9) -> bool:
    q, s = normalise(query), normalise(sentence)
    return q == s or difflib.SequenceMatcher(None, q, s, autojunk=False).ratio() >= similarity


def is_fragment(query: str, sentence: str, min_words: int = 4, min_share: float = 0.5) -> bool:
    """A verbatim run of the sentence's words covering a large share of it,
    also when the query glued words together (compared without spaces, by
    characters)."""
    q, s = normalise(query), normalise(sentence)
    n = len(q.split())
    if n >= min_words and n >= min_share * len(s.split()) and f" {q} " in f" {s} ":
        return True
    qs, ss = q.replace(" ", ""), s.replace(" ", "")
    return bool(qs) and len(qs) >= min_share * len(ss) and qs in ss


def judge(raw: str, sentence: str, config: GateConfig = GateConfig()) -> Verdict:
    """Clean one raw output and keep it or name the reason it is dropped."""
    query = clean_output(raw)
    if not normalise(query):
        return Verdict(query, "empty")
    if _REFUSAL.match(query):
        return Verdict(query, "refusal")
    if _PREAMBLE.match(query):
        return Verdict(query, "preamble")
    if is_echo(query, sentence, config.echo_similarity):
        return Verdict(query, "echo")
    if is_fragment(query, sentence, config.fragment_min_words, config.fragment_min_share):
        return Verdict(query, "fragment")
    n_words = len(query.split())
    if n_words > min(len(sentence.split()), config.max_query_words):
        return Verdict(query, "too_long")
    if len(new_words(query, sentence)) > config.max_new_words:
        return Verdict(query, "adds_information")
    return Verdict(query, None)


def is_keyword_form(query: str) -> bool:
    """Comma-separated keywords, the form the paper's prompt asks for."""
    return "," in query and all(part.strip() for part in query.split(","))
