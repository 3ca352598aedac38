"""evaluate-gear: GeAR models beside baselines on the RIR test split and
external sets (paper section 4, Tables 1-3). Writes report.md, report.json
and report.html to ``params.output_dir`` and returns that folder."""

from __future__ import annotations

from prefect import flow

from tasks.evaluate import EvalParams, evaluate_system_task, write_report_task

__all__ = ["EvalParams", "evaluate_gear"]


@flow(name="evaluate-gear", log_prints=True)
def evaluate_gear(params: EvalParams = EvalParams()) -> str:
    result_dirs = [evaluate_system_task(system, params) for system in params.systems()]
    report_dir = write_report_task(result_dirs, params)
    return str(report_dir)


if __name__ == "__main__":
    evaluate_gear()
