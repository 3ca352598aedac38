"""The report in the paper's layout: Table 1 (retrieval), Table 2 (unit
localisation), Table 3 (generation), one row per model, "—" where a model
cannot do a task; plus a Figure 3 style HTML page."""

from __future__ import annotations

import html
from typing import Any

from tasks.evaluate.config import EvalParams
from tasks.evaluate.localization import pooling_description
from tasks.evaluate.metrics import metric_names

DASH = "—"
GEN_COLUMNS = {"rir": [("rouge1", "ROUGE-1"), ("rougeL", "ROUGE-L")], "qa": [("em", "EM"), ("f1", "F1")]}
BASELINE_LOCALISATION = {
    "encoder": "sentence embeddings vs. the query embedding (cosine), same encoder as its retrieval row",
    "bm25": "BM25 over the document's own sentences",
}


def metric_label(name: str) -> str:
    kind, k = name.split("@")
    return f"{'R' if kind == 'recall' else 'MAP'}@{k}"


def _metrics(entry: dict | None) -> dict | None:
    return entry.get("metrics") if entry else None


def build_report(results: list[dict], params: EvalParams) -> dict[str, Any]:
    rows = [r["system"]["name"] for r in results]
    set_names: list[str] = []
    sets: dict[str, dict] = {}
    for r in results:
        for name, entry in r["sets"].items():
            if name not in sets:
                set_names.append(name)
                sets[name] = {k: entry[k] for k in ("kind", "source", "sizes", "funnel")}
    tables: dict[str, dict] = {"retrieval": {}, "localization": {}, "generation": {}}
    by_layer: dict[str, dict] = {}
    timing: dict[str, dict] = {}
    examples: dict[str, dict] = {}
    for r in results:
        name = r["system"]["name"]
        for s in set_names:
            entry = r["sets"].get(s, {})
            for table in tables:
                tables[table].setdefault(s, {})[name] = _metrics(entry.get(table))
            if entry.get("localization_by_layer"):
                by_layer.setdefault(name, {})[s] = {l: _metrics(v) for l, v in entry["localization_by_layer"].items()}
            timing.setdefault(name, {})[s] = {
                task: entry[task]["timing"]
                for task in ("retrieval", "localization", "generation")
                if entry.get(task) and entry[task].get("timing")
            }
            if entry.get("generation") and entry["generation"].get("examples"):
                examples.setdefault(name, {})[s] = entry["generation"]["examples"]
    models = []
    for r in results:
        kind = r["system"]["kind"]
        models.append(
            {
                "name": r["system"]["name"],
                "kind": kind,
                "path": r["system"]["path"],
                "layer": r.get("layer"),
                "n_layers": r.get("n_layers"),
                "localisation": f"cross-attention, layer {r.get('layer')} of {r.get('n_layers')}"
                if kind == "gear"
                else BASELINE_LOCALISATION[kind],
                "elapsed_s": r.get("elapsed_s"),
            }
        )
    figure = next((r["figure"] for r in results if r.get("figure")), None)
    return {
        "title": "GeAR evaluation",
        "meta": {
            "ks": params.ks,
            "metrics": metric_names(params.ks),
            "index_type": params.index_type,
            "pooling": pooling_description(params.localization_pooling),
            "max_test_queries": params.max_test_queries,
            "max_generation_queries": params.max_generation_queries,
            "generation_max_tokens": params.generation_max_tokens,
            "seed": params.seed,
        },
        "rows": rows,
        "models": models,
        "sets": sets,
        "set_order": set_names,
        "retrieval": tables["retrieval"],
        "localization": tables["localization"],
        "localization_by_layer": by_layer,
        "generation": tables["generation"],
        "timing": timing,
        "examples": examples,
        "figure": figure,
    }


# --------------------------------------------------------------------------
# Table rows (shared by Markdown and the Prefect table artifacts).


def ranking_table(report: dict, table: str, set_name: str) -> list[dict[str, str]]:
    """Rows = models, columns = R@k then MAP@k, three decimals or a dash."""
    out = []
    for model in report["rows"]:
        m = report[table].get(set_name, {}).get(model)
        row = {"Model": model}
        for name in report["meta"]["metrics"]:
            row[metric_label(name)] = f"{m[name]:.3f}" if m else DASH
        out.append(row)
    return out


def _paper_k(report: dict, table: str, kind: str) -> int:
    """The cut-off of the paper's compact tables: Table 1 @5; Table 2 @1 (QA), @3 (RIR)."""
    want = 5 if table == "retrieval" else (3 if kind == "rir" else 1)
    ks = report["meta"]["ks"]
    return want if want in ks else min(ks, key=lambda k: abs(k - want))


def paper_table(report: dict, table: str) -> list[dict[str, str]]:
    """The paper's layout: rows = models, per set one R@k and one MAP@k column."""
    sets = [s for s in report["set_order"] if any(report[table].get(s, {}).values())]
    out = []
    for model in report["rows"]:
        row = {"Model": model}
        for s in sets:
            k = _paper_k(report, table, report["sets"][s]["kind"])
            m = report[table][s].get(model)
            row[f"{s} R@{k}"] = f"{m[f'recall@{k}']:.3f}" if m else DASH
            row[f"{s} M@{k}"] = f"{m[f'map@{k}']:.3f}" if m else DASH
        out.append(row)
    return out


def layer_table(report: dict, model: str, set_name: str) -> list[dict[str, str]]:
    layers = report["localization_by_layer"].get(model, {}).get(set_name, {})
    out = []
    for layer in sorted(layers, key=int):
        m = layers[layer]
        row = {"Layer": layer}
        for name in report["meta"]["metrics"]:
            row[metric_label(name)] = f"{m[name]:.3f}" if m else DASH
        out.append(row)
    return out


def generation_table(report: dict) -> list[dict[str, str]]:
    """Rows = models; per set the paper's columns (RIR: ROUGE-1/L, QA: EM/F1)."""
    out = []
    for model in report["rows"]:
        row = {"Model": model}
        for s in report["set_order"]:
            for key, label in GEN_COLUMNS.get(report["sets"][s]["kind"], []):
                m = report["generation"].get(s, {}).get(model)
                row[f"{s} {label}"] = f"{m[key]:.1f}" if m else DASH
        out.append(row)
    return out


def markdown_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "_(no rows)_"
    cols = list(rows[0])
    # Numbers (and dashes) right-aligned, text left-aligned.
    numeric = [all(_is_number(r[c]) for r in rows) for c in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return value == DASH
    return True


def _set_caption(report: dict, s: str, kind: str) -> str:
    sizes = report["sets"][s]["sizes"]
    if kind == "retrieval":
        return f"**{s}**: {sizes['queries']} queries over {sizes['documents']} documents"
    return f"**{s}**: {sizes['unit_queries']} queries, each ranking its own document's sentences"


def render_markdown(report: dict) -> str:
    meta = report["meta"]
    parts = [f"# {report['title']}", ""]
    parts.append("Models: " + "; ".join(f"{m['name']} ({m['kind']}{', ' + m['path'] if m['path'] else ''})" for m in report["models"]))
    parts.append(f"\nFAISS index: {meta['index_type']}. Ranking metrics by ranx (MAP@k divides by the number of relevant items).")
    parts += ["", "## Table 1: document retrieval", ""]
    parts += ["Paper layout:", "", markdown_table(paper_table(report, "retrieval")), ""]
    for s in report["set_order"]:
        parts += [_set_caption(report, s, "retrieval"), "", markdown_table(ranking_table(report, "retrieval", s)), ""]
    parts += ["## Table 2: unit localisation", ""]
    parts.append(f"GeAR pooling: {meta['pooling']}.")
    for m in report["models"]:
        parts.append(f"- {m['name']}: {m['localisation']}")
    parts.append("")
    unit_sets = [s for s in report["set_order"] if report["sets"][s]["kind"] in ("rir", "qa")]
    if unit_sets:
        parts += ["Paper layout:", "", markdown_table(paper_table(report, "localization")), ""]
    for s in unit_sets:
        parts += [_set_caption(report, s, "localization"), "", markdown_table(ranking_table(report, "localization", s)), ""]
    if not unit_sets:
        parts += ["_No set with sentence-level units._", ""]
    for model, per_set in report["localization_by_layer"].items():
        for s in per_set:
            parts += [f"Localisation by fusion layer, {model} on {s}:", "", markdown_table(layer_table(report, model, s)), ""]
    parts += ["## Table 3: information generation", ""]
    parts.append(f"Greedy decoding, at most {meta['generation_max_tokens']} new tokens; percent. RIR: ROUGE F vs. the unit; QA: SQuAD EM/F1 vs. the answers.")
    parts += ["", markdown_table(generation_table(report)) if unit_sets else "_No set with generation targets._", ""]
    for model, per_set in report["examples"].items():
        for s, items in per_set.items():
            parts += [f"Examples, {model} on {s}:", ""]
            for ex in items:
                parts.append(f"- query: {ex['query']!r}\n  - gold: {ex['gold']!r}\n  - generated: {ex['generated']!r}")
            parts.append("")
    parts += ["## Data", ""]
    data_rows = [
        {"Set": s, "Kind": v["kind"], "Documents": str(v["sizes"]["documents"]), "Queries": str(v["sizes"]["queries"]),
         "Unit queries": str(v["sizes"]["unit_queries"]), "Source": v["source"]}
        for s, v in report["sets"].items()
    ]
    parts += [markdown_table(data_rows), ""]
    speed_rows = []
    for model, per_set in report["timing"].items():
        for s, tasks in per_set.items():
            row = {"Model": model, "Set": s}
            for task in ("retrieval", "localization", "generation"):
                qps = tasks.get(task, {}).get("queries_per_s")
                row[f"{task} q/s"] = f"{qps:.1f}" if qps is not None else DASH
            speed_rows.append(row)
    parts += ["## Speed", "", markdown_table(speed_rows), ""]
    if report["figure"]:
        parts += ["Figure 3 style attention example: report.html", ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------
# Figure 3: a document with each query's top-10 cross-attention tokens.


def highlight(document: str, tokens: list[dict]) -> str:
    """The document as HTML with the given character spans marked, darker = heavier."""
    if not tokens:
        return html.escape(document)
    hi, lo = max(t["weight"] for t in tokens), min(t["weight"] for t in tokens)
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


def render_html(report: dict) -> str:
    fig = report["figure"]
    head = (
        "<!doctype html><html><head><meta charset='utf-8'><title>GeAR attention</title><style>"
        "body{font-family:Georgia,serif;max-width:60em;margin:2em auto;line-height:1.5}"
        ".doc{border:1px solid #ccc;padding:1em;white-space:pre-wrap}"
        ".gen{background:#eef6ee;padding:.5em;border-left:4px solid #4a4}"
        "mark{color:inherit;padding:0 1px}</style></head><body>"
    )
    if not fig:
        return head + "<h1>GeAR attention</h1><p>No GeAR model with a sentence-level set was evaluated.</p></body></html>\n"
    parts = [
        head,
        "<h1>Information localisation and generation (Figure 3 style)</h1>",
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
    parts.append("</body></html>\n")
    return "\n".join(parts)
