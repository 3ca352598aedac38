"""report.html: the one page a person opens. The three tables with their
intervals and query counts, the plots (training loss, localisation by fusion
layer, localisation and ROUGE per epoch) and the Figure 3 attention example
(a document with each query's top-10 cross-attention tokens). Self-contained:
images are data URIs, no script, no external file."""

from __future__ import annotations

import html

from tasks.evaluate import plots
from tasks.evaluate.report import (
    PRIOR_NOTE,
    PRIOR_ROW,
    RANDOM_ROW,
    TRAINING_ADDED_NOTE,
    decoding_description,
    data_rows,
    diagnostics_table,
    footnotes,
    generation_table,
    interval_note,
    layer_table,
    ranking_table,
    training_added_table,
)

STYLE = (
    "body{font-family:Georgia,serif;max-width:72em;margin:2em auto;padding:0 1em;line-height:1.5}"
    "table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border-bottom:1px solid #ddd;padding:.25em .6em}"
    "th{text-align:left;background:#f4f4f4}td.num{text-align:right;white-space:nowrap}"
    "td small{color:#666}tr.random td{color:#666;font-style:italic}"
    ".doc{border:1px solid #ccc;padding:1em;white-space:pre-wrap}"
    ".gen{background:#eef6ee;padding:.5em;border-left:4px solid #4a4}"
    ".note{color:#666;font-size:.9em}img{max-width:100%}"
    "mark{color:inherit;padding:0 1px}"
)


def _cell(text: str) -> str:
    """A table cell; an interval is set smaller beside its mean."""
    if " [" in text and text.endswith("]"):
        mean, ci = text.split(" [", 1)
        return f"<td class='num'>{html.escape(mean)} <small>[{html.escape(ci)}</small></td>"
    num = text.replace(".", "", 1).isdigit() or text in ("—", "n/a")
    return f"<td{' class=num' if num else ''}>{html.escape(text)}</td>"


def html_table(rows: list[dict[str, str]], caption: str = "") -> str:
    if not rows:
        return "<p class='note'>(no rows)</p>"
    cols = list(rows[0])
    out = ["<table>"]
    if caption:
        out.append(f"<caption style='text-align:left'>{caption}</caption>")
    out.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + "</tr>")
    for r in rows:
        first = str(r[cols[0]])
        cls = " class='random'" if first in (RANDOM_ROW, "random", PRIOR_ROW, "unit-rule prior") else ""
        out.append(f"<tr{cls}><td>{html.escape(first)}</td>" + "".join(_cell(str(r[c])) for c in cols[1:]) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _notes(report: dict, table: str) -> list[str]:
    return [f"<p class='note'>{html.escape(n)}</p>" for n in footnotes(report, table)]


def _img(uri: str, alt: str) -> str:
    return f"<figure><img src='{uri}' alt='{html.escape(alt)}'><figcaption class='note'>{html.escape(alt)}</figcaption></figure>"


def tables_section(report: dict) -> list[str]:
    esc = html.escape
    parts = ["<h2>Table 1: document retrieval</h2>"]
    for s in report["set_order"]:
        if report["n_queries"]["retrieval"].get(s):
            sizes = report["sets"][s]["sizes"]
            caption = f"<b>{esc(s)}</b>: {sizes['queries']} queries over {sizes['documents']} documents"
            parts.append(html_table(ranking_table(report, "retrieval", s), caption))
    parts += ["<h2>Table 2: unit localisation</h2>", f"<p>GeAR pooling: {esc(report['meta']['pooling'])}.</p><ul>"]
    parts += [f"<li>{esc(m['name'])}: {esc(m['localisation'])}</li>" for m in report["models"]]
    parts.append("</ul>")
    unit_sets = [s for s in report["set_order"] if report["sets"][s]["kind"] in ("rir", "qa")]
    for s in unit_sets:
        caption = f"<b>{esc(s)}</b>: {report['sets'][s]['sizes']['unit_queries']} queries, each ranking its own document's sentences"
        parts.append(html_table(ranking_table(report, "localization", s), caption))
    if not unit_sets:
        parts.append("<p class='note'>No set with sentence-level units.</p>")
    parts += _notes(report, "localization")
    if any(report.get("localization_prior", {}).values()):
        parts.append(f"<p class='note'>{esc(PRIOR_NOTE)}</p>")
    for model, per_set in report["localization_by_layer"].items():
        for s in per_set:
            parts.append(html_table(layer_table(report, model, s), f"Localisation by fusion layer, {esc(model)} on {esc(s)}"))
    if training_added_table(report):
        parts += ["<h3>What training added</h3>", f"<p class='note'>{esc(TRAINING_ADDED_NOTE)}</p>",
                  html_table(training_added_table(report))]
    if diagnostics_table(report):
        parts += ["<h3>Does GeAR read the document?</h3>", html_table(diagnostics_table(report))]
    parts += ["<h2>Table 3: information generation</h2>",
              f"<p>{esc(decoding_description(report['meta']))}; percent. "
              "RIR: ROUGE F vs. the unit; QA: SQuAD EM/F1 vs. the answers.</p>"]
    parts.append(html_table(generation_table(report)) if unit_sets else "<p class='note'>No set with generation targets.</p>")
    parts += _notes(report, "generation")
    for model, per_set in report["examples"].items():
        for s, items in per_set.items():
            parts.append(f"<details><summary>Generated examples, {esc(model)} on {esc(s)}</summary><ul>")
            parts += [f"<li>query: {esc(ex['query'])}<br>gold: {esc(ex['gold'] or '')}<br>output: {esc(ex['generated'])}</li>"
                      for ex in items]
            parts.append("</ul></details>")
    parts += ["<h2>Data</h2>", html_table(data_rows(report))]
    return parts


def plots_section(report: dict) -> list[str]:
    """Each plot, or one line saying which records it would need."""
    training = report.get("training") or {}
    parts = ["<h2>Plots</h2>", "<h3>Training loss</h3>"]
    uri = plots.loss_curves(training)
    parts.append(_img(uri, "Loss per optimizer step (total = ITC + lm_weight x LM)") if uri else
                 "<p class='note'>No training loss recorded (no metrics.jsonl step records beside the model).</p>")
    parts.append("<h3>Localisation by fusion layer (paper Fig. 4c)</h3>")
    layer_plots = plots.layer_curves(report)
    parts += [_img(u, caption) for caption, u in layer_plots] or [
        "<p class='note'>No localisation by layer (evaluate with all_layers on).</p>"]
    parts.append("<h3>Localisation and generation per epoch (paper Fig. 4a/b)</h3>")
    # An untrained fusion's held-out curve would plot noise, as its table rows say n/a.
    trained = {name: t for name, t in training.items() if "localization" not in report["not_applicable"].get(name, {})}
    uri = plots.epoch_curves(trained)
    parts.append(_img(uri, "Held-out localisation R@3 and ROUGE-L during training") if uri else
                 "<p class='note'>No held-out evaluation recorded during training (metrics.jsonl eval records).</p>")
    uri = plots.diagnostic_curves(trained)
    if uri:
        parts.append(_img(uri, "Whether the model reads the document, per epoch: R@3 at the best fusion layer, "
                               "attention lift on the unit at that layer, d_doc and d_pair (step 0 = the initialisation)"))
    return parts


def highlight(document: str, tokens: list[dict], scale: tuple[float, float] | None = None) -> str:
    """The document as HTML with the given character spans marked, darker = heavier.
    ``scale``: the (lowest, highest) weight the shades span; default the given tokens'
    (a page cut into pieces passes the whole document's, so one shade means one weight)."""
    if not tokens:
        return html.escape(document)
    lo, hi = scale or (min(t["weight"] for t in tokens), max(t["weight"] for t in tokens))
    marks = sorted(tokens, key=lambda t: t["start"])
    out, pos = [], 0
    for t in marks:
        if t["start"] < pos:  # overlapping spans cannot happen with offsets; be safe
            continue
        out.append(html.escape(document[pos : t["start"]]))
        alpha = 0.25 + 0.75 * ((t["weight"] - lo) / (hi - lo) if hi > lo else 1.0)
        out.append(
            f'<mark style="background: rgba(230, 60, 40, {alpha:.2f})" title="weight {t["weight"]:.4f}">'
            f"{html.escape(document[t['start']:t['end']])}</mark>"
        )
        pos = t["end"]
    out.append(html.escape(document[pos:]))
    return "".join(out)


def figure_section(report: dict) -> list[str]:
    fig = report["figure"]
    if not fig:
        return ["<h2>Figure 3</h2><p>No GeAR model with a sentence-level set was evaluated "
                "(or its fusion was not trained), so there is no attention example.</p>"]
    parts = [
        "<h2>Information localisation and generation (Figure 3 style)</h2>",
        f"<p>Set {html.escape(fig['set'])}, document {html.escape(str(fig['doc_id']))}; "
        f"fusion layer {fig['layer']}; the {len(fig['queries'][0]['top_tokens']) if fig['queries'] else 0} document tokens "
        f"with the highest cross-attention weight ({html.escape(report['meta']['pooling'])}) are highlighted.</p>",
    ]
    for n, q in enumerate(fig["queries"], 1):
        parts += [
            f"<h2>Query {n}: {html.escape(q['query'])}</h2>",
            f"<div class='doc'>{highlight(fig['document'], q['top_tokens'])}</div>",
            f"<p class='gen'><b>Generated:</b> {html.escape(q['generated'])}</p>",
            f"<p><b>Gold:</b> {html.escape(q['gold'] or '')}<br>"
            f"<b>Localised sentence:</b> {q['predicted_unit_index']} (true: {q['true_unit_index']})</p>",
        ]
    return parts


def render_html(report: dict) -> str:
    models = "; ".join(
        f"{html.escape(m['name'])} ({m['kind']}{', ' + html.escape(m['path']) if m['path'] else ''})" for m in report["models"]
    )
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report['title'])}</title>"
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(report['title'])}</h1>",
        f"<p>Models: {models}. Paths are relative to this page's folder, or shown by their last two folder names.</p>",
        f"<p>{html.escape(interval_note(report))} {RANDOM_ROW}: the expected score of a uniformly random order "
        "(of the corpus for retrieval, of the query's own document's sentences for localisation).</p>",
        *tables_section(report),
        *plots_section(report),
        *figure_section(report),  # last: its per-query blocks run to the end of the page
        "</body></html>\n",
    ]
    return "\n".join(parts)
