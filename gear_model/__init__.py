"""GeAR model library (no Prefect import).

``GearModel`` (model.py) is the inference and save/load API; training is
``python -m gear_model.train --config cfg.json`` (train.py), also under torchrun.
"""

from gear_model.config import GearConfig, TrainConfig

__all__ = ["CrossAttention", "GearConfig", "GearModel", "TrainConfig"]


def __getattr__(name: str):
    # model.py imports torch and transformers (seconds); reading a config
    # (gear_model.config, e.g. the CLI resolving train parameters) needs neither.
    if name in ("CrossAttention", "GearModel"):
        from gear_model import model

        return getattr(model, name)
    raise AttributeError(f"module 'gear_model' has no attribute {name!r}")
