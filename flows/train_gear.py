"""train-gear: train a GeAR model on a dataset's train split with torchrun.

Returns the model folder (``GearModel.from_pretrained`` loads it):
``<output_dir>/models/<run key>/model``; ``<output_dir>/models/LATEST`` names
the newest. Loss curves and progress are Prefect artifacts.
"""

from __future__ import annotations

from prefect import flow

from tasks.train import TrainParams, report_training_task, train_model_task

__all__ = ["TrainParams", "train_gear"]


@flow(name="train-gear", log_prints=True)
def train_gear(params: TrainParams = TrainParams()) -> str:
    model_dir = train_model_task(config=params) / "model"
    report_training_task(model_dir)
    return str(model_dir)


if __name__ == "__main__":
    train_gear(TrainParams())
