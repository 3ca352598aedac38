"""`gear serve` driven in headless Chromium as a person would: type a test
query in the search box, and the result holding its unit is shown with its
best sentence outlined and a token heat-map; a document holding <script> and
an onerror= attribute shows as text and runs nothing; an empty query is a
400 page and the next search still works.

The real command in a subprocess on the tiny GeAR and a 7-document corpus.
Needs Debian's Chromium and playwright, as tests/test_ui_browser.py (CI sets
GEAR_REQUIRE_BROWSER=1 so a missing browser fails instead of skipping).
Screenshots go to test-output/browser-search/.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from eval_helpers import DOCS, QUERIES, document, tiny_gear_dir  # noqa: F401

from ui.browser import browser_skip_mark, chromium_page

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

if (_skip := browser_skip_mark()) is not None:
    pytestmark.append(_skip)

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "test-output" / "browser-search"
XSS_DOC = 'Harmless start. <script>window.__xss = 1</script> <img src=x onerror="window.__xss = 2"> end.'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gear_dir):  # noqa: F811
    root = tmp_path_factory.mktemp("serve")
    rows = []
    for doc_id, (title, _) in DOCS.items():
        text, spans = document(doc_id)
        rows.append({"doc_id": doc_id, "title": title, "document": text,
                     "sentence_spans": [{"start": s, "end": e} for s, e in spans]})
    rows.append({"doc_id": "xss", "title": "<img src=y onerror=\"window.__xss = 3\">", "document": XSS_DOC})
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = (root / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", "import gear_cli; gear_cli.app()", "serve", "--model", str(tiny_gear_dir),
         "--corpus", str(corpus), "--output-dir", str(root), "--port", str(port)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"gear serve did not start: {(root / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url, len(rows)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def search(page, url: str, query: str, k: int) -> None:
    page.goto(url + "/")
    page.fill("input[name=q]", query)
    page.fill("input[name=k]", str(k))
    page.press("input[name=q]", "Enter")
    page.wait_for_load_state("load")


def test_a_test_query_shows_its_units_document_with_a_sentence_highlighted(server):
    url, n_docs = server
    OUT.mkdir(parents=True, exist_ok=True)
    doc_id, unit_index, query, _ = next(q for q in QUERIES if q[3] == "test")
    text, spans = document(doc_id)
    with chromium_page(OUT) as page:
        search(page, url, query, n_docs)
        hit = page.locator(f"section.hit[data-doc-id='{doc_id}']")
        hit.wait_for(state="visible")
        assert page.locator("section.hit").count() == n_docs
        best = hit.locator(".sent.top1")
        assert best.count() == 1 and best.is_visible()
        assert best.inner_text() in {text[s:e] for s, e in spans}
        assert hit.locator(".sent").count() == 3 and hit.locator(".doc mark").count() == 10  # outlined + heat-map
        assert hit.locator(".doc").inner_text() == text
        assert "Generated:" in hit.locator(".gen").inner_text()
        page.screenshot(path=str(OUT / "results.png"), full_page=True)


def test_markup_in_a_document_shows_as_text_and_runs_nothing(server):
    url, n_docs = server
    OUT.mkdir(parents=True, exist_ok=True)
    with chromium_page(OUT) as page:
        search(page, url, "<script>window.__xss = 4</script> harmless", n_docs)
        hit = page.locator("section.hit[data-doc-id='xss']")
        hit.wait_for(state="visible")
        assert hit.locator(".doc").inner_text() == XSS_DOC
        assert 'onerror="window.__xss = 3"' in hit.locator("h2").inner_text()
        assert page.evaluate("typeof window.__xss") == "undefined"
        assert page.locator("script").count() == 0 and page.locator("img").count() == 0
        assert page.locator("input[name=q]").input_value() == "<script>window.__xss = 4</script> harmless"


def test_an_empty_query_is_refused_and_the_next_search_works(server):
    url, _ = server
    with chromium_page(OUT) as page:
        response = page.goto(url + "/?q=+&k=2")
        assert response.status == 400 and "the query is empty" in page.locator(".error").inner_text()
        search(page, url, "bebop 1940s", 2)
        assert page.locator("section.hit").count() == 2
