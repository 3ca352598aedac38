"""Evaluation stage (paper section 4, Tables 1-3): one cached stage per
system (model or baseline, ``core.evaluate_system``), then the report
(``core.write_report``). The report's Prefect task and artifacts live with
the flow (flows/evaluate_gear.py)."""

from __future__ import annotations

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
]
