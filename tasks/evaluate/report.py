"""The report in the paper's layout: Table 1 (retrieval), Table 2 (unit
localisation), Table 3 (generation), one row per model beside a random
ranking, each figure with its 95% bootstrap interval and each table with its
number of queries; "—" where a model cannot do a task, "n/a" where it could
but its parts for it were never trained. The HTML page is ``page.py``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tasks.evaluate.config import EvalParams
from tasks.evaluate.localization import pooling_description
from tasks.evaluate.metrics import metric_names
from tasks.evaluate.stats import CI_LEVEL

DASH = "—"
NA = "n/a"
RANDOM_ROW = "Random ranking"
PRIOR_ROW = "Unit-rule prior (query-blind)"
PRIOR_NOTE = (
    f"{PRIOR_ROW}: the expected score of ranking the document's sentences that pass the paper's unit rules "
    "(8-20 tokens, no pronoun first word or subject) first, in random order, without reading the query. "
    "RIR units pass those rules by construction, so a localiser that has only learned the rules scores this."
)
GEN_COLUMNS = {"rir": [("rouge1", "ROUGE-1"), ("rougeL", "ROUGE-L")], "qa": [("em", "EM"), ("f1", "F1")]}
BASELINE_LOCALISATION = {
    "encoder": "sentence embeddings vs. the query embedding (cosine), same encoder as its retrieval row",
    "bm25": "BM25 over the document's own sentences",
}
TABLES = ("retrieval", "localization", "generation")
MAX_STEP_POINTS = 1000  # loss-curve points kept in report.json; long runs are thinned evenly


def metric_label(name: str) -> str:
    kind, k = name.split("@")
    return f"{'R' if kind == 'recall' else 'MAP'}@{k}"


def display_path(path: str | None, base: str | Path) -> str | None:
    """A path as the report shows it: relative to the report folder when inside
    it, else its last two components, so no absolute machine path is printed."""
    if not path:
        return path
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.resolve().relative_to(Path(base).resolve())) or "."
    except ValueError:
        return os.path.join(*p.parts[-2:]) if len(p.parts) > 2 else p.name


def _part(entry: dict | None, key: str) -> Any:
    return entry.get(key) if entry else None


def _training(records: list[dict]) -> dict | None:
    """The loss and held-out records of a run's metrics.jsonl, without paths or extras."""
    steps = [
        {k: r.get(k) for k in ("step", "epoch", "loss", "itc", "lm")} for r in records if r.get("event") == "step"
    ]
    if len(steps) > MAX_STEP_POINTS:
        stride = -(-len(steps) // MAX_STEP_POINTS)
        steps = steps[::stride] + ([steps[-1]] if (len(steps) - 1) % stride else [])
    evals = [
        {k: r.get(k) for k in ("step", "epoch", "n_queries", "layer", "localization", "generation",
                               "localization_by_layer", "best_layer", "lift_by_layer", "document_dependence")}
        for r in records
        if r.get("event") == "eval"
    ]
    starts = [r for r in records if r.get("event") == "start" and r.get("steps_per_epoch")]
    per_epoch = starts[-1]["steps_per_epoch"] if starts else None
    return {"steps": steps, "evals": evals, "steps_per_epoch": per_epoch} if steps or evals else None


def decoding_description(meta: dict) -> str:
    """How the generations were decoded (a report without the beam fields decoded greedily)."""
    beams, no_repeat = meta.get("generation_num_beams", 1), meta.get("generation_no_repeat_ngram_size", 0)
    search = "greedy decoding" if beams == 1 else f"beam search ({beams} beams)"
    blocked = f", no repeated {no_repeat}-gram" if no_repeat else ""
    return (f"{search[0].upper()}{search[1:]}{blocked}, stopping at the end of the sentence or after "
            f"{meta['generation_max_tokens']} new tokens")


def build_report(results: list[dict], params: EvalParams, training: dict[str, list[dict]] | None = None) -> dict[str, Any]:
    """report.json: every table's means (the original keys), their intervals
    (``<table>_ci``), the random rows (``<table>_random``), query counts and,
    when given, the training records of each GeAR model (name -> metrics.jsonl records)."""
    out_dir = params.output_dir
    rows = [r["system"]["name"] for r in results]
    set_names: list[str] = []
    sets: dict[str, dict] = {}
    for r in results:
        for name, entry in r["sets"].items():
            if name not in sets:
                set_names.append(name)
                sets[name] = {k: entry[k] for k in ("kind", "sizes", "funnel")}
                sets[name]["source"] = display_path(entry["source"], out_dir)
    tables: dict[str, dict] = {t: {} for t in TABLES}
    cis: dict[str, dict] = {t: {} for t in TABLES}
    n_queries: dict[str, dict] = {t: {} for t in TABLES}
    randoms: dict[str, dict] = {"retrieval": {}, "localization": {}}
    random_cis: dict[str, dict] = {"retrieval": {}, "localization": {}}
    punctuation: dict[str, dict] = {}
    priors: dict[str, dict] = {}
    prior_cis: dict[str, dict] = {}
    diagnostics: dict[str, dict] = {}
    by_layer: dict[str, dict] = {}
    by_layer_ci: dict[str, dict] = {}
    timing: dict[str, dict] = {}
    examples: dict[str, dict] = {}
    for r in results:
        name = r["system"]["name"]
        for s in set_names:
            entry = r["sets"].get(s, {})
            for table in TABLES:
                tables[table].setdefault(s, {})[name] = _part(entry.get(table), "metrics")
                cis[table].setdefault(s, {})[name] = _part(entry.get(table), "ci")
                if _part(entry.get(table), "metrics"):
                    n_queries[table][s] = entry[table]["n_queries"]
            for table in randoms:
                rand = entry.get(f"{table}_random")
                if rand and s not in randoms[table]:
                    randoms[table][s], random_cis[table][s] = rand["metrics"], rand.get("ci")
                    n_queries[table].setdefault(s, len(rand["per_query"]["qids"]))
            prior = entry.get("localization_prior")
            if prior and s not in priors:
                priors[s], prior_cis[s] = prior["metrics"], prior.get("ci")
            if entry.get("diagnostics"):
                diagnostics.setdefault(name, {})[s] = entry["diagnostics"]
            if entry.get("localization_by_layer"):
                layers = entry["localization_by_layer"]
                by_layer.setdefault(name, {})[s] = {l: _part(v, "metrics") for l, v in layers.items()}
                by_layer_ci.setdefault(name, {})[s] = {l: _part(v, "ci") for l, v in layers.items()}
            timing.setdefault(name, {})[s] = {
                task: entry[task]["timing"] for task in TABLES if entry.get(task) and entry[task].get("timing")
            }
            if entry.get("generation") and entry["generation"].get("punctuation_only") is not None:
                punctuation.setdefault(name, {})[s] = entry["generation"]["punctuation_only"]
            if entry.get("generation") and entry["generation"].get("examples"):
                examples.setdefault(name, {})[s] = entry["generation"]["examples"]
    models = []
    for r in results:
        kind = r["system"]["kind"]
        models.append(
            {
                "name": r["system"]["name"],
                "kind": kind,
                "path": display_path(r["system"]["path"], out_dir),
                "layer": r.get("layer"),
                "n_layers": r.get("n_layers"),
                "lm_weight": r.get("lm_weight"),
                "localisation": f"cross-attention, layer {r.get('layer')} of {r.get('n_layers')}"
                if kind == "gear"
                else BASELINE_LOCALISATION[kind],
                "elapsed_s": r.get("elapsed_s"),
            }
        )
    figure = next((r["figure"] for r in results if r.get("figure")), None)
    curves = {name: t for name, t in ((n, _training(recs)) for n, recs in (training or {}).items()) if t}
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
            "generation_num_beams": params.generation_num_beams,
            "generation_no_repeat_ngram_size": params.generation_no_repeat_ngram_size,
            "seed": params.seed,
            "interval": {"level": CI_LEVEL, "method": "percentile bootstrap over queries",
                         "resamples": params.bootstrap_resamples, "seed": params.seed},
            "random_row": RANDOM_ROW,
            "paths": "relative to this report's folder (else the last two components)",
        },
        "rows": rows,
        "models": models,
        "sets": sets,
        "set_order": set_names,
        "retrieval": tables["retrieval"],
        "localization": tables["localization"],
        "localization_by_layer": by_layer,
        "generation": tables["generation"],
        "retrieval_ci": cis["retrieval"],
        "localization_ci": cis["localization"],
        "localization_by_layer_ci": by_layer_ci,
        "generation_ci": cis["generation"],
        "retrieval_random": randoms["retrieval"],
        "retrieval_random_ci": random_cis["retrieval"],
        "localization_random": randoms["localization"],
        "localization_random_ci": random_cis["localization"],
        "localization_prior": priors,
        "localization_prior_ci": prior_cis,
        "diagnostics": diagnostics,
        "punctuation_only": punctuation,
        "n_queries": n_queries,
        "not_applicable": {r["system"]["name"]: r["not_applicable"] for r in results if r.get("not_applicable")},
        "training": curves,
        "timing": timing,
        "examples": examples,
        "figure": figure,
    }


# --------------------------------------------------------------------------
# Table rows (shared by Markdown, HTML and the Prefect table artifacts).


def cell(value: float | None, ci: list[float] | None, digits: int = 3) -> str:
    """'0.630 [0.550, 0.710]': the mean and its interval; the mean alone without one."""
    if value is None:
        return DASH
    text = f"{value:.{digits}f}"
    return f"{text} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else text


def _value(report: dict, table: str, set_name: str, model: str, name: str, digits: int = 3) -> str:
    if model == RANDOM_ROW:
        m, ci = report[f"{table}_random"].get(set_name), report[f"{table}_random_ci"].get(set_name)
    elif model == PRIOR_ROW:
        m, ci = report.get(f"{table}_prior", {}).get(set_name), report.get(f"{table}_prior_ci", {}).get(set_name)
    else:
        m, ci = report[table].get(set_name, {}).get(model), report[f"{table}_ci"].get(set_name, {}).get(model)
    if not m:
        return NA if table in report["not_applicable"].get(model, {}) else DASH
    return cell(m[name], (ci or {}).get(name), digits)


def _rows(report: dict, table: str) -> list[str]:
    """The random row leads the ranking tables: chance level first, then the systems."""
    has_random = table in ("retrieval", "localization") and any(report[f"{table}_random"].values())
    has_prior = table == "localization" and any(report.get("localization_prior", {}).values())
    return ([RANDOM_ROW] if has_random else []) + ([PRIOR_ROW] if has_prior else []) + report["rows"]


def n_label(report: dict, table: str, set_name: str) -> str:
    return f"n={report['n_queries'][table].get(set_name, 0)}"


def ranking_table(report: dict, table: str, set_name: str) -> list[dict[str, str]]:
    """Rows = random ranking and models, columns = R@k then MAP@k with intervals."""
    first = f"Model ({report['n_queries'][table].get(set_name, 0)} queries)"
    return [
        {first: model, **{metric_label(n): _value(report, table, set_name, model, n) for n in report["meta"]["metrics"]}}
        for model in _rows(report, table)
    ]


def _paper_k(report: dict, table: str, kind: str) -> int:
    """The cut-off of the paper's compact tables: Table 1 @5; Table 2 @1 (QA), @3 (RIR)."""
    want = 5 if table == "retrieval" else (3 if kind == "rir" else 1)
    ks = report["meta"]["ks"]
    return want if want in ks else min(ks, key=lambda k: abs(k - want))


def _table_sets(report: dict, table: str) -> list[str]:
    return [s for s in report["set_order"] if report["n_queries"][table].get(s)]


def paper_table(report: dict, table: str) -> list[dict[str, str]]:
    """The paper's layout: rows = models, per set one R@k and one MAP@k column (n in the header)."""
    out = []
    for model in _rows(report, table):
        row = {"Model": model}
        for s in _table_sets(report, table):
            k = _paper_k(report, table, report["sets"][s]["kind"])
            n = n_label(report, table, s)
            row[f"{s} R@{k} ({n})"] = _value(report, table, s, model, f"recall@{k}")
            row[f"{s} M@{k} ({n})"] = _value(report, table, s, model, f"map@{k}")
        out.append(row)
    return out


def layer_table(report: dict, model: str, set_name: str) -> list[dict[str, str]]:
    layers = report["localization_by_layer"].get(model, {}).get(set_name, {})
    cis = report.get("localization_by_layer_ci", {}).get(model, {}).get(set_name, {})
    first = f"Layer ({report['n_queries']['localization'].get(set_name, 0)} queries)"
    out = []
    for layer in sorted(layers, key=int):
        m, ci = layers[layer], cis.get(layer) or {}
        out.append({first: layer, **{metric_label(n): cell(m[n] if m else None, ci.get(n)) for n in report["meta"]["metrics"]}})
    if layers and report["localization_random"].get(set_name):
        out.append({first: "random", **{metric_label(n): _value(report, "localization", set_name, RANDOM_ROW, n)
                                        for n in report["meta"]["metrics"]}})
    if layers and report.get("localization_prior", {}).get(set_name):
        out.append({first: "unit-rule prior", **{metric_label(n): _value(report, "localization", set_name, PRIOR_ROW, n)
                                                 for n in report["meta"]["metrics"]}})
    return out


def _r3(entry: dict | None) -> str:
    """R@3 with its interval from a held-out evaluation's metrics (training records)."""
    if not entry:
        return DASH
    return cell(entry.get("recall@3"), (entry.get("ci") or {}).get("recall@3"))


def _number(value: float | None, fmt: str) -> str:
    return DASH if value is None else format(value, fmt)


def training_added_table(report: dict) -> list[dict[str, str]]:
    """Each GeAR run's held-out evaluation at step 0 (the initialisation) beside
    its last one: what training added. From the run's metrics.jsonl."""
    out = []
    for model, t in (report.get("training") or {}).items():
        evals = [e for e in t.get("evals", []) if e.get("localization")]
        if not evals:
            continue
        for label, e in (("step 0 (init)", evals[0]), (f"step {evals[-1]['step']} (trained)", evals[-1])):
            layers = e.get("localization_by_layer") or {}
            best = e.get("best_layer")
            lift = (e.get("lift_by_layer") or {}).get(str(best)) if best else None
            dep = e.get("document_dependence") or {}
            gen = e.get("generation") or {}
            out.append({
                f"Model ({e.get('n_queries')} held-out queries)": f"{model}, {label}",
                f"R@3, layer {e.get('layer')}": _r3(layers.get(str(e.get("layer"))) or e["localization"]),
                "best layer": _number(best, "d"),
                "R@3, best layer": _r3(layers.get(str(best))) if best else DASH,
                "lift, best layer": _number(lift, ".2f"),
                "LM loss": _number(dep.get("lm"), ".2f"),
                "d_doc": _number(dep.get("d_doc"), "+.3f"),
                "d_pair": _number(dep.get("d_pair"), "+.3f"),
                "ROUGE-L": _number(gen.get("rougeL"), ".1f"),
            })
        if len(evals) == 1:
            out.pop()
    return out


TRAINING_ADDED_NOTE = (
    "What training added: the held-out evaluation the trainer records at step 0, before any update, beside its "
    "last one (same queries). lift: attention mass on the unit's tokens over the unit's share of the document's "
    "tokens (1 = no preference). d_doc / d_pair: rise of the held-out LM loss (nats) when each query's document, "
    "or its query and document, are swapped for another's; d_doc near 0 means the decoder does not read the document."
)


def diagnostics_table(report: dict) -> list[dict[str, str]]:
    """Per GeAR model and set: lift by fusion layer, d_doc and d_pair (gear_model/diagnostics.py)."""
    out = []
    for model, per_set in (report.get("diagnostics") or {}).items():
        for s, d in per_set.items():
            dep = d.get("document_dependence") or {}
            row = {"Model": model, "Set": s, "d_doc": _number(dep.get("d_doc"), "+.3f"),
                   "d_pair": _number(dep.get("d_pair"), "+.3f")}
            for layer, lift in sorted((d.get("lift_by_layer") or {}).items(), key=lambda kv: int(kv[0])):
                row[f"lift L{layer}"] = _number(lift, ".2f")
            out.append(row)
    return out


def generation_table(report: dict) -> list[dict[str, str]]:
    """Rows = models; per set the paper's columns (RIR: ROUGE-1/L, QA: EM/F1), n in the header."""
    out = []
    for model in report["rows"]:
        row = {"Model": model}
        for s in report["set_order"]:
            for key, label in GEN_COLUMNS.get(report["sets"][s]["kind"], []):
                row[f"{s} {label} ({n_label(report, 'generation', s)})"] = _value(report, "generation", s, model, key, 1)
        out.append(row)
    return out


def punctuation_lines(report: dict) -> list[str]:
    """How many of each model's generations hold no letter or digit."""
    return [f"{model} on {s}: {n} of {report['n_queries']['generation'].get(s, 0)} generations are punctuation only."
            for model, per_set in report.get("punctuation_only", {}).items() for s, n in per_set.items()]


def footnotes(report: dict, table: str) -> list[str]:
    """Why a row reads n/a (localisation and generation of an untrained fusion)."""
    return [f"n/a: {model} was {why[table]}." for model, why in report["not_applicable"].items() if table in why]


def interval_note(report: dict) -> str:
    iv = report["meta"]["interval"]
    return (f"Each figure: mean over the test queries [{iv['level']:.0%} interval: {iv['method']}, "
            f"{iv['resamples']} resamples, seed {iv['seed']}]. n = number of queries.")


def markdown_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "_(no rows)_"
    cols = list(rows[0])
    # Numbers (with their intervals, dashes, n/a) right-aligned, text left-aligned.
    numeric = [all(_is_number(r[c]) for r in rows) for c in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _is_number(value: str) -> bool:
    try:
        float(value.split(" [", 1)[0])
    except ValueError:
        return value in (DASH, NA)
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
    parts.append(f"{interval_note(report)} {RANDOM_ROW}: the expected score of a uniformly random order (documents of the corpus; sentences of the query's document).")
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
    parts += [*footnotes(report, "localization"), ""] if footnotes(report, "localization") else []
    if any(report.get("localization_prior", {}).values()):
        parts += [PRIOR_NOTE, ""]
    for model, per_set in report["localization_by_layer"].items():
        for s in per_set:
            parts += [f"Localisation by fusion layer, {model} on {s}:", "", markdown_table(layer_table(report, model, s)), ""]
    if training_added_table(report):
        parts += ["### What training added", "", TRAINING_ADDED_NOTE, "", markdown_table(training_added_table(report)), ""]
    if diagnostics_table(report):
        parts += ["### Does GeAR read the document?", "", markdown_table(diagnostics_table(report)), ""]
    parts += ["## Table 3: information generation", ""]
    parts.append(f"{decoding_description(meta)}; percent. RIR: ROUGE F vs. the unit; QA: SQuAD EM/F1 vs. the answers.")
    parts += ["", markdown_table(generation_table(report)) if unit_sets else "_No set with generation targets._", ""]
    parts += [*punctuation_lines(report), ""] if punctuation_lines(report) else []
    parts += [*footnotes(report, "generation"), ""] if footnotes(report, "generation") else []
    for model, per_set in report["examples"].items():
        for s, items in per_set.items():
            parts += [f"Examples, {model} on {s}:", ""]
            for ex in items:
                parts.append(f"- query: {ex['query']!r}\n  - gold: {ex['gold']!r}\n  - generated: {ex['generated']!r}")
            parts.append("")
    parts += ["## Data", "", markdown_table(data_rows(report)), ""]
    parts += ["Left out (the loaders' funnel):", "", *left_out_lines(report), ""] if left_out_lines(report) else []
    parts += ["## Speed", "", markdown_table(speed_rows(report)), ""]
    parts += ["Plots (training loss, localisation by layer and per epoch) and the Figure 3 attention example: report.html", ""]
    return "\n".join(parts)


def data_rows(report: dict) -> list[dict[str, str]]:
    return [
        {"Set": s, "Kind": v["kind"], "Documents": str(v["sizes"]["documents"]), "Queries": str(v["sizes"]["queries"]),
         "Unit queries": str(v["sizes"]["unit_queries"]), "Source": v["source"]}
        for s, v in report["sets"].items()
    ]


def left_out_lines(report: dict) -> list[str]:
    """One line per count a set's loader dropped (e.g. a labelled unit not found in its
    document: still a retrieval query, left out of localisation and generation)."""
    out = []
    for s, v in report["sets"].items():
        for stage, counts in (v.get("funnel") or {}).items():
            for key, n in counts.items():
                if key.startswith("dropped:") and n:
                    out.append(f"- {s}, {stage}: {key.removeprefix('dropped:').replace('_', ' ')}: {n}")
    return out


def speed_rows(report: dict) -> list[dict[str, str]]:
    out = []
    for model, per_set in report["timing"].items():
        for s, tasks in per_set.items():
            row = {"Model": model, "Set": s}
            for task in TABLES:
                qps = tasks.get(task, {}).get("queries_per_s")
                row[f"{task} q/s"] = f"{qps:.1f}" if qps is not None else DASH
            out.append(row)
    return out
