"""Configuration of the GeAR model and of a training run.

``GearConfig`` travels with a saved model (it is the ``gear`` part of its
config.json); ``TrainConfig`` is one training run and is written, resolved,
next to every checkpoint and into the final model directory.

Defaults are the paper's (Table 4, Appendix C), written once: a
``TrainConfig`` holds the ``GearConfig`` it trains (``model``).
``EMBEDDED`` is the demo's difference from them, the laptop-sized run on the
embedded MiniLM encoder (``TrainConfig.embedded()``); train-gear's form
(tasks/train.py), its demo profile (flows/profiles.py) and the help texts
read both from here (``setting``, ``figures``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

DEC_TOKEN = "[DEC]"
# Where a run trains: auto = CUDA when available, else CPU.
Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[str, ...] = get_args(Device)
# How the fusion cross-attention starts (``TrainConfig.cross_attention_init``).
CrossAttentionInit = Literal["random", "self_attention", "identity"]
# Where the optional localisation loss reads the fusion's attention (``GearConfig.loc_layers``).
LocLayers = Literal["localisation", "all"]
LOC_LAYERS: tuple[str, ...] = get_args(LocLayers)


class TrainConfigError(ValueError):
    """A training config that cannot make a run: the same on every attempt."""


@dataclass
class GearConfig:
    """Model-level settings beyond the BERT config of the backbone."""

    # Learned contrastive temperature: BLIP's init and clamp range.
    temp_init: float = 0.07
    temp_min: float = 0.001
    temp_max: float = 0.5
    # Momentum (MoCo/BLIP) encoders and the feature queue.
    momentum: float = 0.995
    queue_size: int = 57_600
    # Soft-target weight from the momentum encoders, ramped 0 -> alpha over
    # the first ``alpha_ramp_epochs`` epochs.
    alpha: float = 0.4
    alpha_ramp_epochs: float = 2.0
    # Weight of the LM loss; 0 = contrastive-only ("GeAR w/o L_LM") and the
    # decoder forward is skipped.
    lm_weight: float = 1.0
    # BLIP's label smoothing of the LM targets (0: the paper's plain cross-entropy).
    lm_label_smoothing: float = 0.0
    # Weight of the optional localisation loss L_loc (not in the paper; 0 =
    # off): cross-entropy of the unit among its document's sentences, scored
    # as localisation scores them (attention mass per token at the
    # localisation layer). Needs the triples' sentence spans.
    loc_weight: float = 0.0
    # Temperature of L_loc's softmax over the sentences' log attention mass per
    # token: below 1 it rewards ranking the unit first over concentrating mass on it.
    loc_temperature: float = 0.1
    # Where L_loc reads the attention: "localisation" (the localisation layer
    # only) or "all" (the mean of the loss over every fusion layer, so each
    # layer learns to find the unit and evaluation can read the best one).
    loc_layers: str = "localisation"
    # A pointer-generator head on the decoder (not in the paper; gear_model/copying.py):
    # each step mixes the vocabulary softmax with copying a word of the query.
    copy_from_query: bool = False
    # Token lengths used for training; inference defaults (documents) use
    # ``inference_max_doc_length``.
    max_query_length: int = 512
    max_doc_length: int = 512
    max_unit_length: int = 512
    inference_max_doc_length: int = 512
    # Fusion layer used for localisation, 1-based like the paper ("layer 10
    # of 12"); None = n_layers - 2 (10 for 12 layers, 4 for 6).
    localize_layer: int | None = None
    dec_token: str = DEC_TOKEN

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GearConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# GearConfig's names, which ``from_dict`` also reads at the top level (the flat
# shape of TrainParams, ``--set`` items and flat train_config.json files) and
# routes to ``model``.
_MODEL_KEYS = frozenset(f.name for f in dataclasses.fields(GearConfig))


@dataclass
class TrainConfig:
    """One training run: the model it trains (``model``, a ``GearConfig``) and
    the schedule, data and checkpoint settings. Paper defaults; see
    ``embedded()`` for the laptop run.

    ``to_dict()`` nests the model settings under ``"model"``; ``from_dict``
    also reads the flat shape (``lm_weight``, ``queue_size``,
    ``max_doc_length``, ... at the top level), as TrainParams gives it."""

    # Data and model.
    dataset: str = ""  # train.parquet, or a dataset version folder holding it
    init_checkpoint: str = ""  # any BERT checkpoint directory, or a GeAR model dir
    output_dir: str = "runs/gear"
    # The model's own settings (loss weights, momentum, queue, lengths): saved
    # with the model as the "gear" part of its config.json.
    model: GearConfig = dataclasses.field(default_factory=GearConfig)
    # Schedule (Table 4).
    epochs: int = 10
    batch_size: int = 16  # per device (per process)
    grad_accum: int = 1
    lr: float = 1e-5  # peak
    lr_start: float = 1e-6  # warm-up start
    lr_end: float = 1e-6  # cosine floor
    warmup_steps: int = 1000  # capped at warmup_frac of the total optimizer steps
    warmup_frac: float = 0.1
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 0.0  # 0 = off (the paper reports none)
    max_steps: int = 0  # >0: train at most this many optimizer steps (schedule follows)
    stop_after_steps: int = 0  # >0: checkpoint and exit after this many steps (simulates a kill)
    # Learning rate of the parts no checkpoint initialised
    # (``GearModel.fresh_parameters``: the fusion cross-attention, the
    # decoder's cross-attention and, without an MLM head in the checkpoint,
    # its LM-head transform) as a multiple of ``lr``; the paper uses one lr (1.0).
    new_module_lr_mult: float = 1.0
    # The decoder's new parts' own multiplier, when it should differ from the
    # fusion cross-attention's (None: new_module_lr_mult for both).
    decoder_lr_mult: float | None = None
    # Fusion cross-attention init: "random" (BERT init, as BLIP/ALBEF),
    # "self_attention" (a copy of E_q's self-attention of the same layer) or
    # "identity" (identity query/key projections: a token-similarity prior).
    cross_attention_init: str = "random"
    # The decoder's cross-attention init: "random" (BERT init, as BLIP) or
    # "self_attention" (a copy of the decoder's own self-attention per layer).
    decoder_cross_attention_init: str = "random"
    # Keep E_d as initialised (no gradient, no dropout, no momentum copy).
    # Off in the paper; a measured option for CPU-sized runs.
    freeze_doc_encoder: bool = False
    # Speed options (measured; off = ALBEF/BLIP behaviour).
    momentum_eval_mode: bool = False  # momentum encoders forward in eval mode (no dropout)
    attention_dropout: float | None = None  # override attention_probs_dropout_prob
    hidden_dropout: float | None = None  # override hidden_dropout_prob
    # Held-out evaluation during training (Fig. 4a/b): localisation on
    # ``eval_file`` (a test.parquet) every ``eval_every`` steps (0: epoch ends
    # only) and at the end; ROUGE on the first ``eval_generation_queries``.
    eval_file: str = ""
    eval_every: int = 0
    # Epoch-end evaluations at every N-th epoch (the last epoch always ends with one).
    eval_every_epochs: int = 1
    eval_max_queries: int = 200
    eval_generation_queries: int = 32
    # Generation (beam search) is most of an evaluation's time: by default it
    # runs at step 0 and at the last evaluation, what the "what training
    # added" rows read; True also runs it at every evaluation in between.
    eval_generation_every_eval: bool = False
    # d_doc / d_pair on a seeded sample of this many held-out queries: each
    # costs three passes through the decoder and its vocabulary-wide LM head.
    eval_dependence_queries: int = 64
    eval_pooling: str = "mean"
    # A folder where a frozen E_d's document states are kept on disk, shared by
    # the run's processes (the contrastive baseline, the held-out evaluation,
    # evaluate-gear) so each document goes through E_d once; "" = in memory only.
    doc_state_store: str = ""
    # Checkpoints and logging.
    save_every: int = 1000  # optimizer steps; 0 = only at epoch ends
    # Epoch-end checkpoints at every N-th epoch (after the last, the final model is written instead).
    save_every_epochs: int = 1
    keep_last: int = 2
    resume: bool = True  # resume from the latest checkpoint in output_dir if there is one
    log_every: int = 1
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda (cuda without CUDA is an error)
    bf16: bool = True  # bf16 autocast of the training step, on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX)
    num_threads: int = 0  # CPU threads per process; 0 = torch's default

    @classmethod
    def embedded(cls, **overrides: Any) -> TrainConfig:
        """The demo's run (``EMBEDDED`` over the paper's defaults); ``overrides``
        are ``from_dict`` items (flat model names such as ``queue_size`` included)."""
        return cls.from_dict(_merge(EMBEDDED, overrides))

    def decoder_lr_multiplier(self) -> float:
        """The decoder's lr multiple: ``decoder_lr_mult``, or ``new_module_lr_mult`` when unset."""
        return self.new_module_lr_mult if self.decoder_lr_mult is None else self.decoder_lr_mult

    def gear_config(self) -> GearConfig:
        """A copy of the model settings (what a model built for this run carries)."""
        return dataclasses.replace(self.model)

    # Read-only views of ``model``'s training-relevant settings, for callers
    # written against the flat shape (``config.queue_size``).
    lm_weight = property(lambda self: self.model.lm_weight)
    queue_size = property(lambda self: self.model.queue_size)
    max_query_length = property(lambda self: self.model.max_query_length)
    max_doc_length = property(lambda self: self.model.max_doc_length)
    max_unit_length = property(lambda self: self.model.max_unit_length)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """From ``to_dict()``'s shape, or the flat one (model names at the top level)."""
        names = {f.name for f in dataclasses.fields(cls)}
        top = {k: v for k, v in d.items() if k in names and k != "model"}
        model = d.get("model") or {}
        model = model.to_dict() if isinstance(model, GearConfig) else dict(model)
        model.update({k: v for k, v in d.items() if k in _MODEL_KEYS and k not in names})
        unknown = sorted(set(d) - names - _MODEL_KEYS) + sorted(f"model.{k}" for k in set(model) - _MODEL_KEYS)
        if unknown:
            raise ValueError(f"unknown training config keys: {unknown}")
        return cls(**top, model=GearConfig(**model))

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)


# The embedded run: sized for the embedded demo dataset (~300 triples) on 2 CPU
# cores in a few minutes; only where it differs from the paper's defaults.
# Chosen with ``benchmarks/learning_curve.py`` (docs/LEARNING_CURVE.md):
# documents at their built length (the paper's 512: every unit visible), a
# frozen E_d whose states are computed once, identity query/key projections in
# the fusion cross-attention (a random init stays near chance in this budget,
# with or without L_loc), the fusion at the base lr (10x and 30x erode what the
# init gives) and 30x the lr for the decoder's new parts, which start from
# scratch. Its localisation is the initialisation's: training leaves it where
# step 0 puts it. The demo profile of train-gear (flows/profiles.py) is this.
EMBEDDED: dict[str, Any] = dict(
    epochs=4,
    batch_size=8,
    lr=1e-4,
    decoder_lr_mult=30.0,
    cross_attention_init="identity",
    freeze_doc_encoder=True,
    momentum_eval_mode=True,
    attention_dropout=0.0,
    eval_generation_queries=16,
    eval_every_epochs=2,
    save_every=0,
    save_every_epochs=2,
    keep_last=1,
    model={"queue_size": 64, "max_query_length": 32, "max_unit_length": 48},
)


def setting(config: TrainConfig, name: str) -> Any:
    """A setting of a run by its flat name: ``TrainConfig``'s, or its model's."""
    return getattr(config.model if name in _MODEL_KEYS else config, name)


def words(value: Any) -> str:
    """A setting's value as a help text writes it: on/off, 57,600, 1e-5, 0.4."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        text = f"{value:.0e}" if 0 < abs(value) < 1e-3 else f"{value:g}"
        return text.replace("e-0", "e-")
    return str(value)


def figures(name: str) -> str:
    """The paper's and the demo's value of a setting, for a help text:
    "paper 10, demo 4", or "paper and demo 512" where they agree."""
    paper, demo = words(setting(TrainConfig(), name)), words(setting(TrainConfig.embedded(), name))
    return f"paper and demo {paper}" if paper == demo else f"paper {paper}, demo {demo}"


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` over ``base``; a flat model name (``queue_size``) lands in ``base["model"]``."""
    out = {**base, "model": dict(base.get("model") or {})}
    for key, value in overrides.items():
        if key == "model":
            out["model"].update(value.to_dict() if isinstance(value, GearConfig) else value)
        elif key in _MODEL_KEYS:
            out["model"][key] = value
        else:
            out[key] = value
    return out


__all__ = ["DEC_TOKEN", "DEVICES", "LOC_LAYERS", "CrossAttentionInit", "LocLayers", "TrainConfigError", "EMBEDDED", "Device", "GearConfig", "TrainConfig", "figures", "setting", "words"]
