"""evaluate-gear: GeAR models beside baselines on the RIR test split and
external sets (paper section 4, Tables 1-3). Writes report.md, report.json
and report.html to ``params.output_dir`` and returns that folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.evaluate import EvalParams, evaluate_system_task, write_report
from tasks.evaluate.config import SystemSpec

__all__ = ["EvalParams", "evaluate_gear"]


@task(name="write-eval-report")  # reads results on this machine: nothing a retry would fix
def write_report_task(result_dirs: list[Path], params: EvalParams) -> Path:
    """Writes report.md/json/html and publishes the tables as Prefect artifacts."""
    from tasks.evaluate.report import generation_table, ranking_table

    out = write_report(result_dirs, params)
    report = json.loads((out / "report.json").read_text())
    for table, title in (("retrieval", "Table 1 document retrieval"), ("localization", "Table 2 unit localisation")):
        for s in report["set_order"]:
            if any(report[table].get(s, {}).values()):
                create_table_artifact(
                    key=_artifact_key(f"eval-{table}-{s}"), table=ranking_table(report, table, s), description=f"{title}, {s}"
                )
    if any(v for per_model in report["generation"].values() for v in per_model.values()):
        create_table_artifact(key="eval-generation", table=generation_table(report), description="Table 3 generation")
    create_markdown_artifact(key="eval-report", markdown=(out / "report.md").read_text(), description="GeAR evaluation report")
    return out


def _artifact_key(text: str) -> str:
    # Prefect keys: lowercase letters, digits and dashes only.
    key = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(p for p in key.split("-") if p)


def evaluate_systems(params: EvalParams, rows: Callable[[SystemSpec], bool] | None = None) -> list[Path]:
    """Each row's results folder (only the ``rows`` chosen, if given), one task
    per system; a system already evaluated with the same sets and settings is a
    cache hit."""
    return [evaluate_system_task(system, params) for system in params.systems() if rows is None or rows(system)]


@flow(name="evaluate-gear", log_prints=True)
def evaluate_gear(params: EvalParams = EvalParams()) -> str:
    return str(write_report_task(evaluate_systems(params), params))


if __name__ == "__main__":
    evaluate_gear()
