"""Flow `rir-pipeline`: build-rir-dataset -> train-gear (GeAR, and the
contrastive-only baseline) -> evaluate-gear. Each step is a sub-flow with its
own caching, so a scheduled refresh over an unchanged dump reuses everything.
"""

from __future__ import annotations

from prefect import flow

from flows.build_rir_dataset import build_rir_dataset
from flows.evaluate_gear import evaluate_gear
from flows.params import PipelineParams
from flows.train_gear import train_gear

__all__ = ["PipelineParams", "rir_pipeline"]


@flow(name="rir-pipeline", log_prints=True)
def rir_pipeline(params: PipelineParams = PipelineParams()) -> str:
    """Returns the evaluation report folder (report.md, report.json, report.html)."""
    dataset_dir = build_rir_dataset(params.build)
    model_dir = train_gear(params.train.model_copy(update={"dataset": dataset_dir}))
    model_dirs = [model_dir]
    if params.localisation_run.loc_weight > 0:
        model_dirs.append(train_gear(params.localisation_run.training(params.train).model_copy(
            update={"dataset": dataset_dir})))
    contrastive_dir = None
    if params.train_contrastive_baseline:
        contrastive_dir = train_gear(params.train.model_copy(update={"dataset": dataset_dir, "lm_weight": 0.0}))
    report_dir = evaluate_gear(
        params.evaluate.model_copy(
            update={"model_dirs": model_dirs, "contrastive_model_dir": contrastive_dir, "dataset": dataset_dir}
        )
    )
    return str(report_dir)


if __name__ == "__main__":
    rir_pipeline()
