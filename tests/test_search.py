"""`gear search`, `gear serve` and gear_model.search on the tiny GeAR: corpora,
the content-addressed index, ranked sentences, the --json shape, the page
(escaped) and bad input (status 2 in the CLI, 4xx from the server)."""

from __future__ import annotations

import html
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eval_helpers import document, tiny_gear_dir, write_dataset  # noqa: F401
from typer.testing import CliRunner

from gear_cli import app
from gear_model.search import (
    MAX_QUERY_CHARS,
    Corpus,
    GearSearcher,
    SearchInputError,
    check_query,
    index_key,
)

ROOT = Path(__file__).resolve().parents[1]
XSS_DOC = 'Harmless start. <script>window.__xss = 1</script> and <img src=x onerror="window.__xss = 2"> end.'
XSS_TITLE = "<b onmouseover=alert(1)>Title</b>"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A built dataset (6 documents with sentence spans) under an output folder."""
    root = tmp_path_factory.mktemp("search")
    write_dataset(root)
    return root


@pytest.fixture(scope="module")
def searcher(built, tiny_gear_dir):  # noqa: F811
    return GearSearcher.from_model_dir(tiny_gear_dir, built / "datasets" / "v1", cache_dir=built / "search_index",
                                       max_new_tokens=3)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------
# Corpus and query checks.


def test_a_dataset_folder_gives_its_unique_documents_with_spans(built):
    corpus = Corpus.load(built / "datasets" / "v1")
    assert sorted(d.doc_id for d in corpus.documents) == ["alps", "jazz", "moon", "nile", "rust", "tea"]
    jazz = next(d for d in corpus.documents if d.doc_id == "jazz")
    assert jazz.title == "Jazz" and list(jazz.spans) == document("jazz")[1]


def test_a_file_with_a_text_column_and_no_ids(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "One. Two."}, {"text": "Three."}, {"text": "One. Two."}]), path)
    corpus = Corpus.load(path)
    assert [(d.doc_id, d.text, d.title, d.spans) for d in corpus.documents] == [("d1", "One. Two.", "", None),
                                                                                 ("d2", "Three.", "", None)]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([], "the corpus has no documents"),
        ([{"body": "x"}], r"\(line 1\): missing column 'document' \(or 'text'\)"),
        ([{"document": "  "}], r"\(line 1\): empty document"),
        ([{"document": ["a"]}], r"\(line 1\): column 'document' should be text, got list"),
        ([{"doc_id": "a", "document": "x"}, {"doc_id": "a", "document": "y"}], r"\(line 2\): doc_id 'a' reused"),
    ],
)
def test_bad_corpora_are_one_line_errors(tmp_path, rows, message):
    with pytest.raises(SearchInputError, match=message):
        Corpus.load(write_jsonl(tmp_path / "c.jsonl", rows))


def test_a_binary_file_is_not_a_corpus(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(SearchInputError, match="not UTF-8 text"):
        Corpus.load(path)


@pytest.mark.parametrize(
    ("query", "message"),
    [("", "empty"), ("   ", "empty"), ("x" * (MAX_QUERY_CHARS + 1), "at most"), ("a\x00b", "control characters"),
     (b"bytes", "not text"), (None, "not text")],
)
def test_unusable_queries_are_refused(query, message):
    with pytest.raises(SearchInputError, match=message):
        check_query(query)


def test_a_folder_that_is_not_a_gear_model_is_refused(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(SearchInputError, match="not a GeAR model folder"):
        GearSearcher.from_model_dir(tmp_path, write_jsonl(tmp_path / "c.jsonl", [{"document": "x"}]))


def test_the_library_imports_neither_prefect_nor_the_pipeline():
    code = ("import sys, gear_model.search, gear_model.sentences; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('prefect', 'tasks', 'flows')]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


# --------------------------------------------------------------------------
# Index and results.


def test_the_index_is_cached_by_content_and_reused(built, tiny_gear_dir, searcher, tmp_path):  # noqa: F811
    folder = searcher.index.folder
    assert folder.parent == built / "search_index" and (folder / "_SUCCESS.json").is_file()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no partial folder left
    again = GearSearcher.from_model_dir(tiny_gear_dir, built / "datasets" / "v1", cache_dir=built / "search_index")
    assert again.index.reused and again.index.folder == folder and not searcher.index.reused
    corpus = Corpus.load(built / "datasets" / "v1")
    fewer = Corpus(corpus.documents[:-1], "fewer")
    assert index_key(tiny_gear_dir, fewer) != index_key(tiny_gear_dir, corpus) == folder.name
    changed = tmp_path / "gear"  # same files but one byte of the weights
    changed.mkdir()
    for f in Path(tiny_gear_dir).iterdir():
        (changed / f.name).write_bytes(f.read_bytes())
    weights = bytearray((changed / "model.safetensors").read_bytes())
    weights[-1] ^= 1
    (changed / "model.safetensors").write_bytes(bytes(weights))
    assert index_key(changed, corpus) != folder.name


def test_results_are_ranked_by_the_model(searcher):
    query = "highest peak Mont Blanc metres"
    hits = searcher.search(query, k=6)
    model, corpus = searcher.model, searcher.corpus
    # Retrieval: cosine of E_q(query) and E_d(document), best first, every document once.
    doc_vecs = model.encode_documents([d.text for d in corpus.documents])
    cosine = dict(zip((d.doc_id for d in corpus.documents), doc_vecs @ model.encode_queries([query])[0]))
    assert [h.doc_id for h in hits] == sorted(cosine, key=lambda d: -cosine[d])
    assert [h.score for h in hits] == pytest.approx([float(cosine[h.doc_id]) for h in hits], abs=1e-5)
    for hit in hits:
        doc = next(d for d in corpus.documents if d.doc_id == hit.doc_id)
        expected = model.localize(query, doc.text, doc.spans, searcher.layer, pooling="mean")
        assert [s.score for s in hit.sentences] == pytest.approx(sorted(expected.tolist(), reverse=True))
        assert sorted((s.start, s.end) for s in hit.sentences) == list(doc.spans)
        assert all(doc.text[s.start:s.end] == s.text for s in hit.sentences)
        assert hit.generated == model.generate(query, doc.text, max_new_tokens=3)
    assert set(searcher.timings) == {"retrieval", "localization", "generation"}


def test_the_index_holds_the_document_embeddings_and_token_states(searcher):
    import torch

    model, corpus, index = searcher.model, searcher.corpus, searcher.index
    vectors = index.index.reconstruct_n(0, len(corpus))
    assert vectors == pytest.approx(model.encode_documents([d.text for d in corpus.documents]), abs=1e-5)
    assert index.states is not None and index.reused is False
    for i, doc in enumerate(corpus.documents):
        batch = model.tokenizer([doc.text], truncation=True, max_length=model.gear_config.inference_max_doc_length,
                                return_tensors="pt")
        with torch.no_grad():
            states = model.doc_states(batch["input_ids"], batch["attention_mask"])[0].numpy()
        assert index.doc_states(i) == pytest.approx(states, abs=1e-4)


def test_without_kept_states_the_hits_are_encoded_per_query(searcher, tiny_gear_dir):  # noqa: F811
    from gear_model.search import DocumentIndex

    bare = DocumentIndex.build(searcher.model, searcher.corpus, max_states_mb=0)
    assert bare.states is None
    again = GearSearcher(searcher.model, searcher.corpus, bare, max_new_tokens=3)
    query = "Louis Armstrong trumpet"
    for kept, encoded in zip(searcher.search(query, 6), again.search(query, 6), strict=True):
        assert kept.doc_id == encoded.doc_id and kept.generated == encoded.generated
        assert [s.score for s in kept.sentences] == pytest.approx([s.score for s in encoded.sentences], abs=1e-5)


def test_a_corpus_without_spans_is_split_by_the_senter(tiny_gear_dir, tmp_path):  # noqa: F811
    path = write_jsonl(tmp_path / "c.jsonl", [{"doc_id": "x", "title": "X", "document": "First one here. Second one there."}])
    hit = GearSearcher.from_model_dir(tiny_gear_dir, path, max_new_tokens=1).search("second", k=3)[0]
    assert sorted(s.text for s in hit.sentences) == ["First one here.", "Second one there."]


# --------------------------------------------------------------------------
# CLI.


def run(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "HF_HUB_OFFLINE": "1"})


def test_cli_json_is_the_documented_shape(built, tiny_gear_dir, searcher):  # noqa: F811
    result = run("search", "glaciers mountain range", "--model", str(tiny_gear_dir), "--output-dir", str(built),
                 "--top-k", "2", "--json")
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert len(hits) == 2 and hits[0]["score"] >= hits[1]["score"]
    for hit in hits:
        assert set(hit) == {"doc_id", "title", "score", "generated", "sentences"}
        assert all(set(s) == {"text", "start", "end", "score"} for s in hit["sentences"])
        scores = [s["score"] for s in hit["sentences"]]
        assert scores == sorted(scores, reverse=True)
    assert "(reused)" in result.stderr  # the module's searcher built the index under the same output dir


def test_cli_text_output_marks_the_top_sentence(built, tiny_gear_dir):  # noqa: F811
    result = run("search", "bebop 1940s", "--model", str(tiny_gear_dir), "--output-dir", str(built), "--top-k", "1")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("1. ") and "score" in lines[0]
    assert lines[1].count("» ") == 1 and lines[1].count(" «") == 1 and "generated: " in lines[2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["   "], "error: the query is empty"),
        (["x" * (MAX_QUERY_CHARS + 1)], "at most"),
        (["ok", "--top-k", "0"], "top-k must be a whole number from 1 to 100"),
        (["ok", "--model", "{empty}", "--corpus", "{good}"], "not a GeAR model folder"),
        (["ok", "--corpus", "{corpus}"], "the corpus has no documents"),
    ],
)
def test_cli_bad_input_is_one_line_and_status_2(tmp_path, tiny_gear_dir, args, message):  # noqa: F811
    (tmp_path / "empty").mkdir()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n")
    good = write_jsonl(tmp_path / "good.jsonl", [{"document": "Some text."}])
    args = [a.format(empty=tmp_path / "empty", corpus=corpus, good=good) for a in args]
    if "--model" not in args:
        args += ["--model", str(tiny_gear_dir)]
    result = run("search", *args, "--output-dir", str(tmp_path))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


# --------------------------------------------------------------------------
# The page and the API (in-process client; the browser test drives the same app).


@pytest.fixture(scope="module")
def client(searcher):
    from fastapi.testclient import TestClient

    from tasks.search_app import create_app

    return TestClient(create_app(searcher))


def test_api_returns_the_json_shape(client, searcher):
    response = client.get("/api/search", params={"q": "Nile length kilometres", "k": 3})
    assert response.status_code == 200
    assert response.json() == json.loads(json.dumps([h.to_dict() for h in searcher.search("Nile length kilometres", 3)]))


def shown_text(fragment: str) -> str:
    """What a browser shows of an HTML fragment: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


def test_page_shows_heat_map_and_outlined_sentences(client, searcher):
    query = "Apollo 11 landing year"
    page = client.get("/", params={"q": query, "k": 6}).text
    assert page.count("<section class='hit'") == 6 and page.count("class='sent top1'") == 6
    assert page.count("<mark style=") == 6 * 10  # the 10 heaviest tokens of each document (Figure 3)
    best = {h.doc_id: h for h in searcher.search(query, 6)}
    for doc_id, hit in best.items():
        section = page[page.index(f"data-doc-id='{doc_id}'"):]
        section = section[:section.index("</section>")]
        start = section.index("class='sent top1'")
        assert shown_text(section[section.index(">", start) + 1:section.index("</span>", start)]) == hit.sentences[0].text
        assert shown_text(section[section.index("<div class='doc'>"):section.index("</div>")]) == hit.document


@pytest.mark.parametrize(
    ("params", "message"),
    [({"q": ""}, "empty"), ({"q": "x" * (MAX_QUERY_CHARS + 1)}, "at most"), ({"q": "ok", "k": "lots"}, "whole number"),
     ({"q": "ok", "k": "0"}, "from 1 to 100"), ({"q": "a\x01b"}, "control characters")],
)
def test_bad_requests_are_400_and_the_server_keeps_serving(client, params, message):
    for path in ("/api/search", "/"):
        response = client.get(path, params=params)
        assert response.status_code == 400 and message in response.text
    assert client.get("/api/search", params={"q": "tea", "k": 1}).status_code == 200


def test_document_title_and_query_text_are_escaped(tiny_gear_dir, tmp_path):  # noqa: F811
    from fastapi.testclient import TestClient

    from tasks.search_app import create_app

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"doc_id": "x'><i>", "title": XSS_TITLE, "document": XSS_DOC}])
    searcher = GearSearcher.from_model_dir(tiny_gear_dir, corpus, max_new_tokens=1)
    query = "<script>alert('q')</script>"
    page = TestClient(create_app(searcher)).get("/", params={"q": query, "k": 1}).text
    assert "<script" not in page and "<img" not in page and "<b " not in page and "<i>" not in page
    body = page[page.index("<body>"):]
    assert XSS_DOC in shown_text(body) and XSS_TITLE in shown_text(body) and query in shown_text(body)
