"""Evaluation stage (paper section 4, Tables 1-3): Prefect tasks over the
plain functions in ``core``. One cached task per system (model or
baseline), then one task writing the report and its artifacts."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.evaluate.config import EvalParams, SystemSpec
from tasks.evaluate.core import CODE_VERSION, evaluate_system, evaluate_system_task, load_sets, write_report

__all__ = [
    "CODE_VERSION",
    "EvalParams",
    "SystemSpec",
    "evaluate_system",
    "evaluate_system_task",
    "load_sets",
    "write_report",
    "write_report_task",
]


@task(name="write-eval-report", retries=2, retry_delay_seconds=2)
def write_report_task(result_dirs: list[Path], params: EvalParams) -> Path:
    """Writes report.md/json/html and publishes the tables as Prefect artifacts."""
    import json

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
