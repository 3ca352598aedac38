"""select_units: the paper's document and candidate rules, span integrity, cache, bad input."""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.assets import embedded_dump_path
from tasks.common import Funnel, PipelineInputError, read_marker, write_parquet
from tasks.extract_docs import ARTICLES_SCHEMA, ExtractConfig, extract_docs
from tasks.select_units import (
    CANDIDATE_STAGE,
    DOC_STAGE,
    DOCUMENTS_SCHEMA,
    PAPER_PRONOUNS,
    SENTENCE_STAGE,
    UNITS_SCHEMA,
    UnitConfig,
    candidate_reason,
    count_tokens,
    is_repeated,
    load_nlp,
    load_tokenizer,
    select_units,
    select_units_task,
    sentence_features,
)
from tasks.shard import ShardConfig, plan_shards

PRONOUNS = frozenset(PAPER_PRONOUNS)
BG_DUMP = embedded_dump_path().parent / "bgwiki-latest-pages-articles-shortened.xml.bz2"


@pytest.fixture(scope="session")
def ingest_work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "ingest-work"


@pytest.fixture(scope="module")
def config() -> UnitConfig:
    return UnitConfig()


@pytest.fixture(scope="module")
def tokenizer(config):
    return load_tokenizer(config.tokenizer_path)


@pytest.fixture(scope="module")
def embedded(ingest_work_dir, config) -> tuple[Path, Path]:
    (shard,) = plan_shards(embedded_dump_path(), ShardConfig())
    articles = extract_docs(shard, ExtractConfig(), ingest_work_dir)
    return articles, select_units([articles], config, ingest_work_dir)


def analyse(text: str, config: UnitConfig, tokenizer):
    sents = list(load_nlp(config.spacy_model)(text).sents)
    assert len(sents) == 1, sents
    s = sentence_features(sents[0], PRONOUNS)
    (s.tokens,) = count_tokens(tokenizer, [s.text])
    return s


# --------------------------------------------------------------------------
# Candidate rules at their boundaries.

BOUNDARY = [
    (7, "The river flows through the town.", "too_short"),
    (8, "The river flows through the old town.", None),
    (20, "The river flows slowly through the old market town of Exeter in the green and hilly county of Devon.", None),
    (21, "The river flows slowly through the old market town of Exeter in the green and very hilly county of Devon.", "too_long"),
]


@pytest.mark.parametrize("tokens, text, reason", BOUNDARY)
def test_token_limits_are_inclusive(tokens, text, reason, config, tokenizer):
    s = analyse(text, config, tokenizer)
    assert s.tokens == tokens  # WordPiece count, no [CLS]/[SEP]
    assert candidate_reason(s, config, PRONOUNS) == reason


@pytest.mark.parametrize(
    "text, reason",
    [
        ("In 1990 they moved to the capital city of France.", "subject_pronoun"),
        ("Because of the war, he left the country for good.", "subject_pronoun"),
        ("Later, we found the old mill beside the river in Devon.", "subject_pronoun"),
        ("It was built in 1990 by the local council of the town.", "first_word_pronoun"),
        ("This bridge was built in 1990 by the local council.", "first_word_pronoun"),  # paper: first word, whatever its role
        ("In 1990 the family moved to the capital city of France.", None),
        ("The man said that he would return to the village soon.", None),  # pronoun subject of a subordinate clause
        ("The old mill was sold to them by the council in 1990.", None),  # pronoun object
        ("The river flows through the old town of Exeter in Devon", "no_final_punctuation"),
        ("“The river flows through the old town of Exeter in Devon.”", None),
    ],
)
def test_pronoun_and_punctuation_rules(text, reason, config, tokenizer):
    s = analyse(text, config, tokenizer)
    assert config.min_unit_tokens <= s.tokens <= config.max_unit_tokens
    assert candidate_reason(s, config, PRONOUNS) == reason


def test_repeated_phrases():
    assert is_repeated("la la la la and so on", 3)
    assert is_repeated("New York New York New York is a song", 3)
    assert not is_repeated("The river flows through the river valley of the river", 3)


def test_repeated_phrases_match_the_definition():
    """is_repeated's one-pass scan against the rule as written: some 1-4 word phrase, max_run times in a row."""
    import random

    def by_definition(text, max_run):
        w = text.lower().split()
        return any(all(w[i + k * n : i + (k + 1) * n] == w[i : i + n] for k in range(1, max_run))
                   for n in range(1, 5) for i in range(len(w) - n * max_run + 1))

    rng = random.Random(12)
    for _ in range(5000):
        words = [rng.choice("ab" if rng.random() < 0.7 else "abcde") for _ in range(rng.randint(0, 16))]
        text, max_run = " ".join(words), rng.randint(2, 5)
        assert is_repeated(text, max_run) == by_definition(text, max_run), (text, max_run)


def test_paper_defaults():
    c = UnitConfig()
    assert (c.max_doc_tokens, c.min_doc_sentences, c.min_doc_tokens) == (500, 3, 200)
    assert (c.min_unit_tokens, c.max_unit_tokens, c.min_candidates, c.docs_per_article) == (8, 20, 3, 1)
    assert set(c.pronouns) == {"this", "these", "it", "that", "those", "they", "he", "she", "we", "you", "i"}


# --------------------------------------------------------------------------
# Document rules, on hand-made articles.


def _sentence(i: int) -> str:
    return f"The river number {i} flows slowly through the old market town of Exeter in Devon."


def _write_articles(path: Path, rows: list[dict]) -> Path:
    cols = {name: [r.get(name) for r in rows] for name in ARTICLES_SCHEMA.names}
    return write_parquet(pa.table(cols, schema=ARTICLES_SCHEMA), path, ARTICLES_SCHEMA)


def _article(page_id: int, title: str, sentences: list[str]) -> dict:
    return {"page_id": page_id, "revision_id": 1, "title": title, "text": " ".join(sentences), "source_dump": "hand.xml"}


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory, config, tokenizer):
    folder = tmp_path_factory.mktemp("hand")
    long_sentences = [_sentence(i) for i in range(60)]
    per = count_tokens(tokenizer, long_sentences)
    assert len(set(per)) <= 2 and sum(per) > 900  # two documents of <= 500 tokens
    pronoun_start = [f"It flows slowly through the old market town number {i} in the county." for i in range(20)]
    rows = [
        _article(1, "Two sentences", [_sentence(1), _sentence(2)]),
        _article(2, "Short", [f"The town number {i} has a mill." for i in range(6)]),
        _article(3, "Few candidates", [_sentence(0), _sentence(1)] + pronoun_start),
        _article(4, "Long", ["The chant goes on and on and on and on by the river.", long_sentences[0]] + long_sentences),
    ]
    articles = _write_articles(folder / "articles.parquet", rows)
    return articles, long_sentences, per


def test_document_rules(hand_made, config, tmp_path):
    articles, long_sentences, per = hand_made
    out = select_units([articles], config, tmp_path)
    funnel = Funnel.load(out / "funnel.json")
    assert funnel.get(DOC_STAGE, "dropped:too_few_sentences") == 1
    assert funnel.get(DOC_STAGE, "dropped:too_few_tokens") == 1
    assert funnel.get(DOC_STAGE, "dropped:too_few_candidates") == 1
    assert funnel.get(SENTENCE_STAGE, "dropped:repeated_phrase") == 1
    assert funnel.get(SENTENCE_STAGE, "dropped:duplicate_sentence") == 1
    docs = pl.read_parquet(out / "documents.parquet")
    assert docs["title"].to_list() == ["Long"]
    (doc,) = docs.iter_rows(named=True)
    # Sentences in order until the next one would pass 500 tokens.
    n = len(doc["sentence_spans"])
    assert doc["token_count"] == sum(per[:n]) <= 500 < sum(per[: n + 1])
    assert doc["text"] == " ".join(long_sentences[:n])
    assert doc["doc_id"] == "4-0" and doc["part"] == 0


def test_docs_per_article_cuts_consecutive_documents(hand_made, tmp_path):
    articles, long_sentences, per = hand_made
    out = select_units([articles], UnitConfig(docs_per_article=5), tmp_path)
    docs = pl.read_parquet(out / "documents.parquet").filter(pl.col("page_id") == 4)
    assert docs["part"].to_list() == list(range(docs.height)) and docs.height >= 2
    assert all(t <= 500 for t in docs["token_count"])
    # Consecutive: together the parts are the article's kept sentences in order.
    assert " ".join(docs["text"]) == " ".join(long_sentences)


# --------------------------------------------------------------------------
# The embedded dump.


def test_embedded_outputs_and_span_integrity(embedded, config, tokenizer):
    _, out = embedded
    docs_t, units_t = pq.read_table(out / "documents.parquet"), pq.read_table(out / "units.parquet")
    assert docs_t.schema.equals(DOCUMENTS_SCHEMA) and units_t.schema.equals(UNITS_SCHEMA)
    docs, units = pl.from_arrow(docs_t), pl.from_arrow(units_t)
    assert docs["doc_id"].n_unique() == docs.height
    texts = dict(zip(docs["doc_id"], docs["text"]))
    for doc in docs.iter_rows(named=True):
        spans = doc["sentence_spans"]
        sentences = [doc["text"][s["start"] : s["end"]] for s in spans]
        assert " ".join(sentences) == doc["text"]
        assert len(spans) >= 3 and 200 <= doc["token_count"] <= 500
        assert doc["token_count"] == sum(count_tokens(tokenizer, sentences))
    for unit in units.iter_rows(named=True):
        assert texts[unit["doc_id"]][unit["char_start"] : unit["char_end"]] == unit["text"]
        assert 8 <= unit["token_count"] <= 20
        assert unit["text"].split()[0].lower().strip("\"'“(") not in PRONOUNS
        assert unit["text"].rstrip("\"'”’)]").endswith((".", "!", "?"))
    assert units.group_by("doc_id").len()["len"].min() >= 3
    assert units["token_count"].to_list() == count_tokens(tokenizer, units["text"].to_list())


def test_embedded_funnel_adds_up(embedded):
    _, out = embedded
    funnel = Funnel.load(out / "funnel.json")
    counts = funnel.to_dict()
    for stage in (DOC_STAGE, CANDIDATE_STAGE, SENTENCE_STAGE, "select_units.articles"):
        c = counts[stage]
        assert c["input"] == c["kept"] + sum(v for k, v in c.items() if k.startswith("dropped:")), stage
    marker = read_marker(out)
    assert marker["documents"] == counts[DOC_STAGE]["kept"] == pl.read_parquet(out / "documents.parquet").height
    assert marker["units"] == counts[CANDIDATE_STAGE]["kept"]
    # Reference: a prototype kept 82 documents / 588 candidates before dropping
    # disambiguation/list pages, list items and unpunctuated candidates.
    assert 50 <= marker["documents"] <= 82 and 250 <= marker["units"] <= 588


def test_second_call_does_no_work(embedded, ingest_work_dir, config):
    articles, out = embedded
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    start = time.perf_counter()
    assert select_units([articles], config, ingest_work_dir) == out
    assert time.perf_counter() - start < 0.5
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    key_fn = select_units_task.cache_key_fn
    params = {"article_dirs_or_files": [str(articles)], "config": config, "work_dir": str(ingest_work_dir)}
    assert key_fn(None, params) is not None
    assert key_fn(None, {**params, "config": UnitConfig(min_candidates=4)}) is None


def test_missing_articles(tmp_path, config):
    with pytest.raises(PipelineInputError, match="does not exist"):
        select_units([tmp_path / "nowhere"], config, tmp_path)


def test_non_english_dump_survives_with_a_reason(tmp_path, config):
    (shard,) = plan_shards(BG_DUMP, ShardConfig())
    articles = extract_docs(shard, ExtractConfig(), tmp_path)
    out = select_units([articles], config, tmp_path)
    counts = Funnel.load(out / "funnel.json").to_dict()
    assert counts["select_units.articles"] == {"input": 1, "dropped:not_english": 1}
    assert pl.read_parquet(out / "documents.parquet").height == 0
    assert pl.read_parquet(out / "units.parquet").height == 0


def test_concurrent_calls_in_threads(hand_made, tmp_path):
    # Prefect's default task runner is a thread pool: two shards may run at once.
    from concurrent.futures import ThreadPoolExecutor

    articles, _, _ = hand_made
    configs = [UnitConfig(), UnitConfig(min_candidates=2)]
    with ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda c: select_units([articles], c, tmp_path), configs))
    assert outs[0] != outs[1]
    assert [pl.read_parquet(o / "documents.parquet")["title"].to_list() for o in outs] == [["Long"], ["Few candidates", "Long"]]


# --------------------------------------------------------------------------
# The fast path (lead-only extraction, paragraphs parsed in rounds, tokenizers
# without transformers) writes what the whole-article path wrote.

# Content hashes of the embedded dump's outputs. parser: before the fast path
# (whole articles from extract_docs, 6 characters per token of spaCy budget,
# transformers' tokenizer), so the fast path and the lead budget change nothing.
# senter: the default since the recogniser's repairs (its differences from the
# parser are listed in docs/BENCHMARKS.md, "Sentence splitters: senter against parser").
REFERENCE = {
    ("parser", 1): {"documents.parquet": "e7b4c635a45e9178", "units.parquet": "66a39a19718a53f8", "funnel.json": "ceaed48027928e95"},
    ("parser", 3): {"documents.parquet": "2b4a8d43fcccd91d", "units.parquet": "fbd3877d3c8c2411", "funnel.json": "6e1cbe1aad3bf01f"},
    ("senter", 1): {"documents.parquet": "533e4ddf8fa57fcd", "units.parquet": "8d420f656e2d96ca", "funnel.json": "c09cb494e9683c86"},
    ("senter", 3): {"documents.parquet": "936b8084a77fc3ba", "units.parquet": "528be7bf3420ccb0", "funnel.json": "b8270f999a39d532"},
}


def _content_hash(path: Path) -> str:
    import hashlib
    import json

    if path.suffix == ".json":
        rows = Funnel.load(path).to_dict()
        rows.pop("select_units.leads", None)  # pages read whole past their lead: how, not what
    else:
        rows = pq.read_table(path).to_pylist()
    return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


@pytest.mark.parametrize("splitter", ["parser", "senter"])
@pytest.mark.parametrize("docs_per_article", [1, 3])
def test_embedded_outputs_are_the_reference(embedded, ingest_work_dir, docs_per_article, splitter):
    articles, out = embedded
    if (splitter, docs_per_article) != ("senter", 1):
        out = select_units([articles], UnitConfig(docs_per_article=docs_per_article, sentence_splitter=splitter), ingest_work_dir)
    reference = REFERENCE[splitter, docs_per_article]
    assert {name: _content_hash(out / name) for name in reference} == reference
    if docs_per_article == 1:
        assert "select_units.leads" not in Funnel.load(out / "funnel.json").to_dict()  # the paper's lead suffices


def test_a_tokenizer_without_offsets_gives_the_reference(embedded, tmp_path, monkeypatch):
    """Sentences are counted on their own when the tokenizer cannot give its paragraphs' token
    offsets (transformers' AutoTokenizer here): the same documents and units."""
    from transformers import AutoTokenizer

    import tasks.select_units as su

    auto = AutoTokenizer.from_pretrained(str(su.embedded_encoder_path()))
    auto.model_max_length = 1 << 30
    assert not hasattr(auto, "token_spans")
    monkeypatch.setattr(su, "load_tokenizer", lambda path: auto)
    articles, _ = embedded
    out = select_units([articles], UnitConfig(), tmp_path)
    reference = REFERENCE["senter", 1]
    assert {name: _content_hash(out / name) for name in reference} == reference


@pytest.mark.parametrize("docs_per_article", [1, 3])
def test_a_lead_too_short_for_its_documents_is_read_whole(tmp_path, docs_per_article):
    """The lead budget sets only the speed: a page whose documents want more than its lead is read whole."""
    (shard,) = plan_shards(embedded_dump_path(), ShardConfig())
    config = UnitConfig(docs_per_article=docs_per_article)
    outs = {}
    for max_chars in (None, 300):
        articles = extract_docs(shard, ExtractConfig(max_chars=max_chars), tmp_path / str(max_chars))
        outs[max_chars] = select_units([articles], config, tmp_path / str(max_chars))
    for name in ("documents.parquet", "units.parquet"):
        assert pq.read_table(outs[300] / name).equals(pq.read_table(outs[None] / name))
    short, whole = (Funnel.load(outs[k] / "funnel.json").to_dict() for k in (300, None))
    assert short.pop("select_units.leads")["read_whole_page_for_documents"] > 50
    assert short == whole  # every other count is that of whole articles


def test_a_lead_whose_dump_is_gone_fails_naming_the_dump(tmp_path):
    import shutil

    dump = tmp_path / "dump.xml.bz2"
    shutil.copy(embedded_dump_path(), dump)
    (shard,) = plan_shards(dump, ShardConfig())
    articles = extract_docs(shard, ExtractConfig(max_chars=300), tmp_path)
    dump.unlink()
    with pytest.raises(PipelineInputError, match="dump.xml.bz2"):
        select_units([articles], UnitConfig(), tmp_path)


# --------------------------------------------------------------------------
# The senter splitter (units.sentence_splitter: senter).


def test_senter_pieces_without_final_punctuation_join_the_next(config):
    from tasks.select_units import load_senter, recognised_sentences

    senter = load_senter(config.spacy_model)
    text = ('He was described by his brother, Julian, as someone who frequently "[contemplated] the strangeness of things." '
            "Non-visual amateur astronomy includes the use of radio telescopes. It is popular.")
    raw = [s.text for s in senter(text).sents]
    joined = [s.text for s in recognised_sentences([senter(text)])[0]]
    assert len(raw) > 3  # the recogniser splits after '"[' and inside 'Non-visual'
    assert joined == [
        'He was described by his brother, Julian, as someone who frequently "[contemplated] the strangeness of things."',
        "Non-visual amateur astronomy includes the use of radio telescopes.",
        "It is popular.",
    ]


def test_senter_parses_only_the_candidates_the_subject_rule_can_change(config, tokenizer):
    from tasks import select_units as su

    senter = su.load_senter(config.spacy_model)
    texts = ["In the summer of 1990 he moved to the capital city of France.",
             "In the summer of 1990 the family moved to the capital city of France."]
    sentences = [su.split_features(next(senter(t).sents), PRONOUNS) for t in texts]
    for s, n in zip(sentences, count_tokens(tokenizer, texts)):
        s.tokens = n
    assert [su.needs_parse(s, config, PRONOUNS) for s in sentences] == [True, False]
    su._parse_subjects(load_nlp(config.spacy_model), [s for s in sentences if su.needs_parse(s, config, PRONOUNS)], PRONOUNS, 8)
    assert [s.subject_pronoun for s in sentences] == [True, None]  # the second one was never parsed
    assert [candidate_reason(s, config, PRONOUNS) for s in sentences] == ["subject_pronoun", None]
    # With require_subject every candidate needs its parse.
    strict = config.model_copy(update={"require_subject": True})
    assert su.needs_parse(sentences[1], strict, PRONOUNS)


def test_senter_units_match_the_parsers_on_the_embedded_dump(embedded, ingest_work_dir, config):
    articles, senter_out = embedded
    parser_out = select_units([articles], config.model_copy(update={"sentence_splitter": "parser"}), ingest_work_dir)
    units = {name: {(u["doc_id"], u["text"]) for u in pq.read_table(out / "units.parquet").to_pylist()}
             for name, out in (("parser", parser_out), ("senter", senter_out))}
    common = units["parser"] & units["senter"]
    # Measured: 346 shared of 356 and 346; the differences are sentence boundaries
    # (docs/BENCHMARKS.md, "Sentence splitters", lists them), never the subject parse of a shared sentence.
    assert len(common) / len(units["parser"] | units["senter"]) >= 0.95
    assert ("308-0", "Alexander the Great starting from 343 BC.") in units["parser"] - units["senter"]  # "tutored | Alexander"
    assert Funnel.load(senter_out / "funnel.json").to_dict()[CANDIDATE_STAGE]["kept"] == len(units["senter"])


def test_senter_repairs_lower_case_starts_and_settles_abbreviation_stops_with_the_parser(config):
    from tasks.select_units import load_senter, recognised_sentences

    senter, parser = load_senter(config.spacy_model), load_nlp(config.spacy_model)
    text = ("The largest river is the Peace River with an average flow of 2161 m3/s. The Peace River rises in the "
            "Rocky Mountains. He served as chief of staff to Gen. Smith in 1832. "
            "There is disagreement as to whether the species is monotypic. or can be divided into two subspecies.")
    raw = [s.text for s in senter(text).sents]
    assert "2161 m3/s. The Peace River" in next(s for s in raw if "m3/s" in s)  # the recogniser misses this stop
    assert [s.text for s in recognised_sentences([senter(text)], parser)[0]] == [
        "The largest river is the Peace River with an average flow of 2161 m3/s.",
        "The Peace River rises in the Rocky Mountains.",
        "He served as chief of staff to Gen. Smith in 1832.",  # the parser keeps an abbreviation's stop
        "There is disagreement as to whether the species is monotypic. or can be divided into two subspecies.",
    ]
    # Without the parser the recogniser's sentences are only joined.
    assert len(recognised_sentences([senter(text)])[0]) < 4


def test_a_sentences_tokens_are_read_off_its_paragraphs(tokenizer):
    """TokenSpans.count gives what counting the sentence on its own gives, for every run of whole
    words of a paragraph with accents, CJK, ligatures, zero-width and non-breaking characters, and
    says None where a word is cut."""
    import re

    text = "Café naïve Straße 10km. 中文 测试, it's e.g.\u00a0U.S.A. fine. x\u200by ﬁne İstanbul (2001–2003) internationalisation."
    spans = tokenizer.token_spans([text])[0]
    assert len(spans.starts) == count_tokens(tokenizer, [text])[0]
    edges = [0] + [m.end() for m in re.finditer(r"\s+", text)] + [len(text)]
    for i, a in enumerate(edges):
        for b in edges[i + 1 :]:
            piece = text[a:b].rstrip()
            assert spans.count(a, a + len(piece)) == count_tokens(tokenizer, [piece])[0], piece
    word = text.index("internationalisation")
    assert spans.count(0, word + 5) is None and spans.count(word + 5, len(text)) is None
