"""The evaluation stage without Prefect: one system's results on every set
(cached in a content-addressed folder), then the report from all of them."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from tasks.common import PipelineInputError, write_json
from tasks.evaluate.config import EvalParams, SystemSpec
from tasks.evaluate.loaders import EvalSet, dataset_source, load_beir, load_dataset, load_squad
from tasks.stage import StageRun, stage

# The numbers depend on this package and on the model code that ranks, pools
# and generates (gear_model/), so both are in the results key.
_GEAR_MODEL_DIR = Path(__file__).resolve().parents[2] / "gear_model"
_EVAL_CODE = [*sorted(Path(__file__).parent.glob("*.py")), *sorted(_GEAR_MODEL_DIR.glob("*.py"))]
RESULTS_NAME = "results.json"
FIGURE_TOP_TOKENS = 10  # the paper's Figure 3 highlights the top 10 tokens


# --------------------------------------------------------------------------
# Inputs.


def _system_files(system: SystemSpec) -> list[Path]:
    return [Path(system.path)] if system.path else []


def _set_files(params: EvalParams) -> list[Path]:
    paths = [dataset_source(params.dataset)] if params.dataset else []
    return paths + [Path(p) for p in params.squad_json] + [Path(p) for p in params.beir_dirs]


def load_sets(params: EvalParams) -> list[EvalSet]:
    sets: list[EvalSet] = []
    n, seed = params.max_test_queries, params.seed
    if params.dataset:
        sets.append(load_dataset(params.dataset, n, seed, params.dataset_name))
    sets += [load_squad(p, n, seed) for p in params.squad_json]
    sets += [load_beir(p, max_queries=n, seed=seed) for p in params.beir_dirs]
    if not sets:
        raise PipelineInputError(params.output_dir, "no evaluation data: give dataset, squad_json or beir_dirs")
    seen: dict[str, int] = {}
    for s in sets:  # two files with the same stem still need distinct columns
        if s.name in seen:
            seen[s.name] += 1
            s.name = f"{s.name}-{seen[s.name]}"
        else:
            seen[s.name] = 1
    return sets


# --------------------------------------------------------------------------
# One system on every set.


NOT_TRAINED_FUSION = (
    "trained with lm_weight 0 (the model's config.json), so its fusion cross-attention blocks and decoder "
    "never received a gradient: localisation and generation would measure their random initialisation"
)


def saved_lm_weight(model_dir: str | Path) -> float | None:
    """lm_weight from a GeAR model directory's config.json ("gear" section); None if absent."""
    import json

    config = json.loads((Path(model_dir) / "config.json").read_text())
    value = config.get("gear", {}).get("lm_weight")
    return None if value is None else float(value)


def _load_system(system: SystemSpec):
    from tasks.common import MODEL_LOAD_LOCK

    with MODEL_LOAD_LOCK:  # one transformers load at a time per process (tasks/common.py)
        return _load_system_unlocked(system)


def _load_system_unlocked(system: SystemSpec):
    if system.kind == "gear":
        from gear_model.model import GearModel

        return GearModel.from_pretrained(system.path)
    if system.kind == "encoder":
        from tasks.evaluate.baselines import PretrainedEncoder

        return PretrainedEncoder(system.path, system.pooling, system.backend, query_instruction=system.query_instruction)
    return None


@stage("evaluate", EvalParams, key=EvalParams.set_config, reads={"system": _system_files}, keyed_by_value=["system"],
       key_files=_set_files, work_dir_from=lambda params: params.cache_dir, code=_EVAL_CODE, retries=1,
       task_run_name="evaluate-{system.name}")
def evaluate_system(run: StageRun, system: SystemSpec, params: EvalParams) -> dict:
    """Tables 1-3 numbers of one system on every set -> <stage dir>/results.json."""
    from tasks.evaluate.generation import evaluate_generation
    from tasks.evaluate.localization import (
        bm25_scorer,
        embedding_scorer,
        evaluate_localization,
        gear_layer_scores,
        precomputed_scorer,
        random_localization,
        unit_rule_prior,
    )
    from gear_model.model import DocumentStateMemo
    from tasks.evaluate.retrieval import evaluate_retrieval, random_retrieval

    t0 = time.perf_counter()
    sets = load_sets(params)
    model = _load_system(system)
    layer = model.resolve_layer(params.layer) if system.kind == "gear" else None
    results: dict[str, Any] = {"system": system.model_dump(), "layer": layer, "sets": {}, "figure": None}
    # A GeAR trained without the LM loss has an untrained fusion and decoder:
    # its localisation and generation are not applicable, whatever its row is called.
    fusion_trained = True
    if system.kind == "gear":
        results["n_layers"] = model.n_layers
        results["lm_weight"] = saved_lm_weight(system.path)
        fusion_trained = results["lm_weight"] != 0
        if not fusion_trained:
            results["not_applicable"] = {"localization": NOT_TRAINED_FUSION, "generation": NOT_TRAINED_FUSION}
    boot = {"resamples": params.bootstrap_resamples, "seed": params.seed}
    # GeAR reads each document for localisation, diagnostics, generation and the figure: E_d runs once per document.
    reuse = model.reusing_document_states(DocumentStateMemo(store=trained_states(model, params))) \
        if system.kind == "gear" else contextlib.nullcontext()
    with reuse:
        for s in sets:
            entry: dict[str, Any] = {"kind": s.kind, "source": s.source, "sizes": s.sizes(), "funnel": s.funnel.to_dict()}
            encoder = model if system.kind in ("gear", "encoder") else None
            entry["retrieval"] = evaluate_retrieval(s, params.ks, encoder, params.index_type, params.batch_size, **boot)
            entry["localization"] = entry["localization_by_layer"] = entry["generation"] = None
            if s.has_units and fusion_trained:
                if system.kind == "gear":
                    by_layer, lifts = gear_layer_scores(model, s, params.localization_pooling)

                    def at(l: int) -> dict:
                        return evaluate_localization(s, precomputed_scorer(by_layer, l), params.ks, **boot)

                    if params.all_layers:
                        entry["localization_by_layer"] = {str(l): at(l) for l in range(1, model.n_layers + 1)}
                        entry["localization"] = entry["localization_by_layer"][str(layer)]
                    else:
                        entry["localization"] = at(layer)
                elif system.kind == "encoder":
                    scorer = embedding_scorer(model, params.batch_size, s)
                    entry["localization"] = evaluate_localization(s, scorer, params.ks, **boot)
                else:
                    entry["localization"] = evaluate_localization(s, bm25_scorer(), params.ks, **boot)
                if system.kind == "gear":
                    entry["diagnostics"] = gear_diagnostics(model, s, lifts, params.seed)
                if system.generation:
                    entry["generation"] = evaluate_generation(
                        model, s, params.max_generation_queries, params.generation_max_tokens, params.seed,
                        params.bootstrap_resamples, **decoding_options(params),
                    )
            # The random rows need no model; every system's results carry them for its own queries.
            entry["retrieval_random"] = random_retrieval(s, params.ks, **boot)
            entry["localization_random"] = random_localization(s, params.ks, **boot) if s.has_units else None
            entry["localization_prior"] = unit_rule_prior(s, params.ks, **boot) if s.has_units else None
            results["sets"][s.name] = entry
        if system.figure and fusion_trained:
            results["figure"] = figure_example(model, sets, layer, params.generation_max_tokens, params.localization_pooling,
                                               decoding_options(params))
    results["elapsed_s"] = time.perf_counter() - t0
    run.info.update(system=system.name, elapsed_s=results["elapsed_s"])
    return {RESULTS_NAME: results}


CODE_VERSION = evaluate_system.code_version
evaluate_system_task = evaluate_system.task


def trained_states(model, params: EvalParams):
    """The document states that training stored for this model's E_d under
    the output folder (``tasks.train.DOC_STATE_STORE``), read-only: an
    evaluation adds nothing to it. None when training stored none."""
    from gear_model.doc_states import DocumentStateStore
    from tasks.train import DOC_STATE_STORE

    store = DocumentStateStore(params.cache_dir / DOC_STATE_STORE, model.document_encoder_fingerprint(), read_only=True)
    return store if store.dir.is_dir() else None


def gear_diagnostics(model, eval_set: EvalSet, lifts: dict[str, Any], seed: int) -> dict:
    """Whether the model reads the document (gear_model/diagnostics.py): the
    mean attention lift on the unit by fusion layer (``lifts``: per query, from
    the localisation pass), d_doc and d_pair."""
    import numpy as np

    from gear_model.diagnostics import document_dependence

    queries = eval_set.unit_queries()
    per_layer = np.array([lifts[q.qid] for q in queries], dtype=np.float64).reshape(len(queries), -1)
    lift_by_layer = {str(l + 1): float(np.nanmean(per_layer[:, l])) if np.isfinite(per_layer[:, l]).any() else None
                     for l in range(per_layer.shape[1])}
    documents = [eval_set.documents[q.doc_id] for q in queries]
    units = [doc[a:b] for doc, q in zip(documents, queries, strict=True)
             for a, b in [eval_set.sentence_spans[q.doc_id][q.unit_index]]]
    dependence = document_dependence(model, [q.query for q in queries], documents, units, seed)
    return {"lift_by_layer": lift_by_layer, "document_dependence": dependence}


def decoding_options(params: EvalParams) -> dict[str, int]:
    return {"num_beams": params.generation_num_beams, "no_repeat_ngram_size": params.generation_no_repeat_ngram_size}


def figure_example(model, sets: list[EvalSet], layer: int, max_new_tokens: int, pooling: str = "sum",
                   decoding: dict[str, int] | None = None) -> dict | None:
    """Figure 3: one document, two queries, the top-10 cross-attention tokens of
    each and the generated text. Picks the document with the most test queries
    about different sentences."""
    from tasks.evaluate.localization import token_weights

    for s in sets:
        by_doc: dict[str, list] = {}
        for q in s.unit_queries():
            by_doc.setdefault(q.doc_id, []).append(q)
        if not by_doc:
            continue
        doc_id = max(by_doc, key=lambda d: (len({q.unit_index for q in by_doc[d]}), len(by_doc[d]), d))
        chosen, units = [], set()
        for q in by_doc[doc_id]:
            if q.unit_index not in units:
                chosen.append(q)
                units.add(q.unit_index)
            if len(chosen) == 2:
                break
        document = s.documents[doc_id]
        spans = s.sentence_spans[doc_id]
        examples = []
        for q in chosen:
            att = model.cross_attention(q.query, document, layer)
            weights = token_weights(att.weights, att.query_mask)
            real = att.offsets[:, 1] > att.offsets[:, 0]
            order = [i for i in weights.argsort()[::-1] if real[i]][:FIGURE_TOP_TOKENS]
            scores = model.localize(q.query, document, spans, layer, pooling=pooling)
            examples.append(
                {
                    "query": q.query,
                    "top_tokens": [
                        {"start": int(att.offsets[i, 0]), "end": int(att.offsets[i, 1]), "weight": float(weights[i]),
                         "text": document[att.offsets[i, 0] : att.offsets[i, 1]]}
                        for i in order
                    ],
                    "true_unit_index": q.unit_index,
                    "predicted_unit_index": int(scores.argmax()) if len(scores) else None,
                    "gold": q.target if s.kind == "rir" else " | ".join(q.answers),
                    "generated": model.generate(q.query, document, max_new_tokens=max_new_tokens, **(decoding or {})),
                }
            )
        return {"set": s.name, "doc_id": doc_id, "document": document, "sentence_spans": spans, "layer": layer,
                "queries": examples}
    return None


# --------------------------------------------------------------------------
# The report from every system's results.


def write_report(result_dirs: list[str | Path], params: EvalParams) -> Path:
    """report.md, report.json and report.html in params.output_dir."""
    import json

    from tasks.common import write_text
    from tasks.evaluate.page import render_html
    from tasks.evaluate.report import build_report, render_markdown

    results = [json.loads((Path(d) / RESULTS_NAME).read_text()) for d in result_dirs]
    report = build_report(results, params, training_records(results))
    out = Path(params.output_dir)
    write_json(report, out / "report.json")
    write_text(render_markdown(report), out / "report.md")
    write_text(render_html(report), out / "report.html")
    return out


def training_records(results: list[dict]) -> dict[str, list[dict]]:
    """Each GeAR row's training log (<model_dir>/../metrics.jsonl), read when the
    report is written so a re-report shows what the run has recorded by then."""
    from tasks.train import read_metrics

    out = {}
    for r in results:
        system = r["system"]
        if system["kind"] == "gear" and system.get("path") and Path(system["path"]).is_dir():
            records = read_metrics(system["path"])
            if records:
                out[system["name"]] = records
    return out
