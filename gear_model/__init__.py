"""GeAR model library (no Prefect import).

``GearModel`` (model.py) is the inference and save/load API; training is
``python -m gear_model.train --config cfg.json`` (train.py), also under torchrun.
"""

from gear_model.config import GearConfig, TrainConfig
from gear_model.model import CrossAttention, GearModel

__all__ = ["CrossAttention", "GearConfig", "GearModel", "TrainConfig"]
