"""train-gear: train a GeAR model on a dataset's train split with torchrun.

Returns the model folder (``GearModel.from_pretrained`` loads it):
``<output_dir>/models/<run key>/model``; ``<output_dir>/models/LATEST`` names
the newest. Loss curves and progress are Prefect artifacts.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.train import TrainParams, read_metrics, train_model_task

__all__ = ["TrainParams", "train_gear"]


@task(name="report-training")
def report_training_task(model_dir: Path) -> str:
    """Loss curves as a Prefect table artifact (at most ~200 rows) and a summary."""
    steps = [r for r in read_metrics(model_dir) if r.get("event") == "step"]
    stride = max(1, len(steps) // 200)
    rows = [
        {k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()
         if k in ("step", "epoch", "loss", "itc", "lm", "lr", "temp", "samples_per_s")}
        for r in steps[::stride] + ([steps[-1]] if steps and (len(steps) - 1) % stride else [])
    ]
    create_table_artifact(rows, key="train-gear-loss", description="train-gear loss curve (loss = itc + lm_weight x lm)")
    summary_file = Path(model_dir).parent / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    lines = ["# train-gear", "", f"Model: `{model_dir}`", "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in summary.items()]
    markdown = "\n".join(lines)
    create_markdown_artifact(markdown, key="train-gear-summary", description="train-gear summary")
    return markdown


@flow(name="train-gear", log_prints=True)
def train_gear(params: TrainParams = TrainParams()) -> str:
    model_dir = train_model_task(config=params) / "model"
    report_training_task(model_dir)
    return str(model_dir)


if __name__ == "__main__":
    train_gear(TrainParams())
