"""The layers, lowest first: gear_model (the model library) < tasks (the stage
cores and the stage runner) < flows (the Prefect DAG, the profiles) < gear_cli.

- nothing in tasks/ or gear_model/ imports flows/ (a stage does not know the
  DAG above it);
- no stage core imports Prefect: every module of tasks/ and gear_model/ loads
  without it, so the cores and their tests run without it. The stage runner
  (tasks/stage.py, tasks/runners.py) imports Prefect when a flow uses a task.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _modules(package: str) -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for p in (ROOT / package).rglob("*.py"))


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_nothing_below_flows_imports_flows():
    offenders = {str(path.relative_to(ROOT)): sorted(n for n in _imported(path) if n.split(".")[0] in ("flows", "gear_cli"))
                 for package in ("tasks", "gear_model") for path in (ROOT / package).rglob("*.py")}
    assert {path: names for path, names in offenders.items() if names} == {}


def test_stage_cores_import_no_prefect():
    """Each module in a fresh interpreter: Prefect is not in sys.modules after importing it."""
    modules = [m for m in _modules("tasks") + _modules("gear_model") if m != "gear_model.__main__"]
    code = (
        "import importlib, json, sys\n"
        "found = {}\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "    found[name] = 'prefect' in sys.modules\n"
        "    if found[name]: break\n"
        "print(json.dumps(found))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.splitlines()[-1])
    assert len(found) == len(modules) and not any(found.values()), [m for m, hit in found.items() if hit]


def test_a_stage_task_is_made_on_first_use():
    """``<stage>.task`` names the Prefect task without importing Prefect; using it builds it."""
    code = (
        "import sys\n"
        "from tasks.dedup import dedup, dedup_task\n"
        "assert 'prefect' not in sys.modules\n"
        "assert dedup_task.name == 'dedup' and 'prefect' in sys.modules\n"
        "assert dedup.task is dedup_task and dedup_task.task is dedup_task.task\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)
