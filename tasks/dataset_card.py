"""The dataset card of a published RIR dataset: counts per split, the whole
funnel from dump to triples, the relevance-score histogram (kept and
dropped), sample triples and lineage, as JSON (dataset_card.json) and as
Markdown (dataset_card.md); and the same card as Prefect artifacts."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from tasks.common import Funnel, to_jsonable
from tasks.contracts import TRIPLES_SCHEMA


def score_histogram(scored: pl.DataFrame, width: float) -> dict[str, Any]:
    scores = scored["score"].to_numpy().astype(np.float64)
    lo = float(np.floor(min(scores.min(), 0.0) / width) * width) if scores.size else 0.0
    hi = float(np.ceil(max(scores.max(), 1.0) / width) * width) if scores.size else 1.0
    edges = np.round(np.arange(lo, hi + width / 2, width), 6)
    kept = scored.filter(pl.col("kept"))["score"].to_numpy()
    dropped = scored.filter(~pl.col("kept"))["score"].to_numpy()
    return {
        "edges": edges.tolist(),
        "kept": np.histogram(kept, edges)[0].tolist(),
        "dropped": np.histogram(dropped, edges)[0].tolist(),
    }


def _histogram_markdown(hist: dict[str, Any], bar: int = 40) -> str:
    top = max(max(hist["kept"], default=0), max(hist["dropped"], default=0), 1)
    lines = ["```", f"{'score':>13}  {'kept':>6} {'dropped':>7}"]
    for i, (k, d) in enumerate(zip(hist["kept"], hist["dropped"])):
        if not k and not d:
            continue
        lo, hi = hist["edges"][i], hist["edges"][i + 1]
        lines.append(f"[{lo:+.2f},{hi:+.2f})  {k:6d} {d:7d}  {'#' * round(bar * k / top)}{'.' * round(bar * d / top)}")
    lines += ["```", "`#` kept, `.` dropped (below the threshold)."]
    return "\n".join(lines)


def build_card(version: str, counts: dict[str, int], scored: pl.DataFrame, samples: list[dict], funnel: Funnel,
               lineage: dict[str, Any], params: dict[str, Any], config: Any) -> tuple[dict, str]:
    """The card as JSON and as Markdown: counts, funnel, score histogram, samples, lineage.

    ``scored``: the score and kept flag of every scored pair (two columns: the
    card needs no text, so a full dump's pairs fit); ``samples``: sample triples."""
    hist = score_histogram(scored, config.histogram_bin_width)
    card = {
        "version": version,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "counts": dict(counts),
        "threshold": params["threshold"],
        "funnel": funnel.to_dict(),
        "score_histogram": hist,
        "score_summary": {
            name: ({"n": len(s), "mean": round(float(np.mean(s)), 4), "min": round(float(np.min(s)), 4),
                    "max": round(float(np.max(s)), 4)} if len(s) else {"n": 0})
            for name, s in (("kept", scored.filter(pl.col("kept"))["score"].to_numpy()),
                            ("dropped", scored.filter(~pl.col("kept"))["score"].to_numpy()))
        },
        "samples": samples,
        "lineage": lineage,
        "params": params,
        "schema": {f.name: str(f.type) for f in TRIPLES_SCHEMA},
    }
    c = card["counts"]
    md = [
        f"# RIR dataset `{version}`",
        "",
        "(query, document, unit) triples built by the GeAR pipeline (arXiv 2501.02772, Appendix A).",
        "",
        "| split | triples | documents |",
        "|---|---:|---:|",
        f"| train | {c['train_triples']} | {c['train_documents']} |",
        f"| test | {c['test_triples']} | {c['test_documents']} |",
        "",
        "## Funnel (dump to triples)",
        "",
        funnel.markdown(),
        "",
        f"## Relevance scores (threshold {params['threshold']}, model `{params['relevance'].get('model')}`)",
        "",
        _histogram_markdown(hist),
        "",
        "## Samples",
        "",
        "| split | title | query | unit | score |",
        "|---|---|---|---|---:|",
    ]
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    md += [f"| {s['split']} | {esc(s['title'])} | {esc(s['query'])} | {esc(s['unit'])} | {s['score']:.3f} |" for s in samples]
    md += ["", "## Lineage", "", "```json", json.dumps(to_jsonable(lineage), indent=2, sort_keys=True), "```", ""]
    return card, "\n".join(md)


def publish_card_artifacts(version_dir: Path) -> None:
    """The card, funnel and samples as Prefect artifacts (shown on the flow run's page)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    card = json.loads((version_dir / "dataset_card.json").read_text())
    create_markdown_artifact((version_dir / "dataset_card.md").read_text(), key="rir-dataset-card",
                             description=f"RIR dataset {card['version']}")
    create_table_artifact(Funnel(card["funnel"]).rows(), key="rir-funnel", description="Records kept and dropped per stage")
    create_table_artifact(card["samples"], key="rir-samples", description="Sample triples")
