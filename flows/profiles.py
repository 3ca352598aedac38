"""Named parameter presets of the flows, shared by the `gear` CLI and prefect.yaml.

A profile is a set of overrides of a flow's parameter model, whose defaults
are the paper's figures:

- ``paper``: no overrides (the paper's production figures, the model defaults);
- ``demo``: the embedded run of ``gear pipeline`` on the 106-article excerpt.

``overrides(profile, flow)`` gives them as a nested dict in the flow's
parameter shape (the keys of its Prefect form); ``fill_profile`` is what a
parameter model's before-validator calls when its input names a ``profile``:
the profile's values fill only the fields that were not given. The
deployments of prefect.yaml hold these overrides written out, so the form
shows the values a run gets (tests/test_profiles.py keeps them equal).

No Prefect import here, so ``gear --help`` stays fast.
"""

from __future__ import annotations

import copy
from typing import Any

PROFILES = ("demo", "paper")
# Older names: TrainParams' ``profile: embedded`` is the demo's training.
ALIASES = {"embedded": "demo"}
FLOWS = ("build-rir-dataset", "train-gear", "evaluate-gear", "rir-pipeline")

# The demo keeps the paper's document and unit rules but samples the
# 106-article excerpt more densely, so that its test split holds 100+ queries
# (at 19 queries one query moves a recall by 0.05 and no table can show a
# difference): up to 3 documents per article instead of 1, 5 candidate units
# per document instead of 3, and 40% of documents held out instead of 5%.
# Three documents use about three times the paper's lead (extract.max_chars).
DEMO_BUILD: dict[str, Any] = {
    "extract": {"max_chars": 12_000},
    "units": {"docs_per_article": 3},
    "rewrite": {"units_per_doc": 5},
    "triples": {"test_fraction": 0.4},
}
# Generation is the slowest part of evaluation (1.4 queries/s on 2 cores): the
# demo scores a seeded 48, and reports localisation at every fusion layer.
DEMO_EVALUATE: dict[str, Any] = {"all_layers": True, "max_generation_queries": 48}


def demo_training() -> dict[str, Any]:
    """train-gear's demo overrides: where ``TrainConfig.embedded()`` (the one
    definition of the embedded training run, chosen with
    benchmarks/learning_curve.py) differs from the paper's ``TrainConfig()``."""
    import dataclasses

    from gear_model.config import TrainConfig
    from tasks.train import TrainParams

    def flat(cfg: TrainConfig) -> dict[str, Any]:
        d = dataclasses.asdict(cfg)
        return {**d.pop("model"), **d}

    embedded, paper = flat(TrainConfig.embedded()), flat(TrainConfig())
    changed = {k: v for k, v in embedded.items() if v != paper[k]}
    missing = sorted(set(changed) - set(TrainParams.model_fields))
    if missing:
        raise RuntimeError(f"TrainConfig.embedded() sets {missing}, which TrainParams cannot express")
    return {k: changed[k] for k in TrainParams.model_fields if k in changed}  # in the form's order


def overrides(profile: str, flow: str) -> dict[str, Any]:
    """The profile's overrides of ``flow``'s parameter model (a fresh nested dict)."""
    name = ALIASES.get(profile, profile)
    if name not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: choose {' or '.join(PROFILES)}")
    if flow not in FLOWS:
        raise ValueError(f"unknown flow {flow!r}: one of {', '.join(FLOWS)}")
    if name == "paper":
        return {}
    if flow == "build-rir-dataset":
        return copy.deepcopy(DEMO_BUILD)
    if flow == "evaluate-gear":
        return copy.deepcopy(DEMO_EVALUATE)
    if flow == "train-gear":
        return demo_training()
    return {"build": overrides(name, "build-rir-dataset"), "train": overrides(name, "train-gear"),
            "evaluate": overrides(name, "evaluate-gear")}


def fill_profile(data: Any, flow: str) -> Any:
    """A parameter model's input with its ``profile`` key (if any) replaced by
    that profile's values for every field not given; other input as it is."""
    if not isinstance(data, dict) or "profile" not in data:
        return data
    data = dict(data)
    name = data.pop("profile")
    return fill(data, overrides(name, flow)) if name else data


def fill(given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``given`` with ``defaults`` under it, nested mappings merged key by key."""
    out = dict(given)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = fill(out[key], value)
    return out


__all__ = ["ALIASES", "DEMO_BUILD", "DEMO_EVALUATE", "FLOWS", "PROFILES", "demo_training", "fill", "fill_profile",
           "overrides"]
