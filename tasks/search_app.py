"""`gear serve`: a search page over ``gear_model.search.GearSearcher``.

``GET /`` is a search box; with ``?q=...`` it lists the top-k documents, each
with its title and scores, the document with its cross-attention heat-map
(the report's Figure 3 shading, ``tasks/evaluate/page.py: highlight``) and
its top sentences outlined, and the generated unit. ``GET /api/search?q=&k=``
returns the ``gear search --json`` list. A query the searcher refuses (empty,
over-long, not text; a bad k) is a 400 with a one-line reason; the server
keeps serving. Every text shown is HTML-escaped. The page has no script.
"""

from __future__ import annotations

import html
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse

from gear_model.search import DEFAULT_POOLING, GearSearcher, SearchHit, SearchInputError
from tasks.evaluate.core import FIGURE_TOP_TOKENS
from tasks.evaluate.page import STYLE, highlight

TOP_SENTENCES = 3  # outlined in the document and listed with their scores
DEFAULT_K = 5
PAGE_STYLE = STYLE + (
    "form{margin:1em 0 2em}input[name=q]{width:60%;font-size:1.1em;padding:.3em}input[name=k]{width:4em}"
    ".hit{margin-bottom:2.5em}.hit h2{margin-bottom:.2em}.hit h2 small{color:#666;font-weight:normal;font-size:.6em}"
    ".sent{border-bottom:3px solid #36c;padding-bottom:1px}.sent.top1{border:2px solid #36c;background:#e8f0ff}"
    ".ranked .score{font-family:monospace;color:#555;margin-right:.6em}.error{color:#a00;font-weight:bold}"
)


def _parse_k(k: Any) -> int:
    try:
        return int(k)
    except (TypeError, ValueError):
        raise SearchInputError(f"top-k must be a whole number, got {str(k)[:20]!r}") from None


def document_html(hit: SearchHit, top_tokens: int = FIGURE_TOP_TOKENS, top_sentences: int = TOP_SENTENCES) -> str:
    """The document with its ``top_tokens`` heaviest tokens shaded by weight and its
    ``top_sentences`` best sentences outlined (class ``sent top<rank>``)."""
    heavy = sorted(hit.tokens, key=lambda t: -t[2])[:top_tokens]
    marks = [{"start": s, "end": e, "weight": w} for s, e, w in heavy]
    scale = (min(t["weight"] for t in marks), max(t["weight"] for t in marks)) if marks else None
    outlined = sorted((s.start, s.end, rank) for rank, s in enumerate(hit.sentences[:top_sentences], 1))

    def piece(start: int, end: int) -> str:
        inside = [dict(t, start=t["start"] - start, end=min(t["end"], end) - start) for t in marks if start <= t["start"] < end]
        return highlight(hit.document[start:end], inside, scale)

    out, pos = [], 0
    for start, end, rank in outlined:
        if start < pos:  # sentence spans do not overlap; be safe
            continue
        out.append(piece(pos, start))
        score = hit.sentences[rank - 1].score
        out.append(f"<span class='sent top{rank}' title='sentence rank {rank}, score {score:.4f}'>{piece(start, end)}</span>")
        pos = end
    out.append(piece(pos, len(hit.document)))
    return "".join(out)


def hit_html(rank: int, hit: SearchHit) -> str:
    e = html.escape
    sentences = "".join(
        f"<li><span class='score'>{s.score:.4f}</span>{e(s.text)}</li>" for s in hit.sentences[:TOP_SENTENCES]
    )
    return (
        f"<section class='hit' data-doc-id='{e(hit.doc_id)}'>"
        f"<h2>{rank}. {e(hit.title or hit.doc_id)} <small>{e(hit.doc_id)} · retrieval score {hit.score:.3f}</small></h2>"
        f"<div class='doc'>{document_html(hit)}</div>"
        f"<p class='gen'><b>Generated:</b> {e(hit.generated)}</p>"
        f"<p><b>Top sentences</b> (cross-attention, {e(DEFAULT_POOLING)} per token):</p><ol class='ranked'>{sentences}</ol>"
        "</section>"
    )


def page_html(query: str = "", k: int = DEFAULT_K, hits: list[SearchHit] | None = None, error: str | None = None,
              corpus_size: int | None = None, layer: int | None = None) -> str:
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(query + ' - ' if query else '')}GeAR search</title>"
        f"<style>{PAGE_STYLE}</style></head><body>",
        "<h1>GeAR search</h1>",
        f"<p class='note'>{corpus_size if corpus_size is not None else '?'} documents. Documents by E_d embedding (FAISS, "
        f"cosine); in each, the {FIGURE_TOP_TOKENS} tokens with the highest cross-attention weight (fusion layer "
        f"{layer if layer is not None else '?'}) are shaded, darker = heavier, and the {TOP_SENTENCES} best sentences "
        "are outlined, the best boxed.</p>",
        "<form method='get' action='/'>"
        f"<input name='q' type='search' value='{e(query)}' placeholder='keywords' autofocus> "
        f"top <input name='k' type='number' min='1' max='100' value='{k}'> "
        "<button type='submit'>Search</button></form>",
    ]
    if error:
        parts.append(f"<p class='error'>{e(error)}</p>")
    elif hits is not None:
        parts.append(f"<p class='note'>{len(hits)} result(s) for <q>{e(query)}</q>.</p>" if hits else "<p>No result.</p>")
        parts += [hit_html(i, h) for i, h in enumerate(hits, 1)]
    parts.append("</body></html>\n")
    return "\n".join(parts)


def create_app(searcher: GearSearcher):
    """The FastAPI app over one loaded searcher (model, corpus, index)."""
    app = FastAPI(title="GeAR search", docs_url=None, redoc_url=None, openapi_url=None)
    size, layer = len(searcher.corpus), searcher.layer

    @app.get("/", response_class=HTMLResponse)
    def index(request: Request) -> HTMLResponse:
        params = request.query_params
        if "q" not in params:
            return HTMLResponse(page_html(corpus_size=size, layer=layer))
        query, k_text = params.get("q", ""), params.get("k", str(DEFAULT_K))
        try:
            k = _parse_k(k_text)
            hits = searcher.search(query, k)
        except SearchInputError as exc:
            return HTMLResponse(page_html(query[:1000], DEFAULT_K, error=str(exc), corpus_size=size, layer=layer),
                                status_code=400)
        return HTMLResponse(page_html(query, k, hits, corpus_size=size, layer=layer))

    @app.get("/api/search")
    def api_search(request: Request) -> JSONResponse:
        params = request.query_params
        try:
            hits = searcher.search(params.get("q", ""), _parse_k(params.get("k", str(DEFAULT_K))))
        except SearchInputError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        return JSONResponse([h.to_dict() for h in hits])

    return app
