"""Named parameter presets of the flows, shared by the `gear` CLI and prefect.yaml.

A profile is a set of overrides of a flow's parameter model, whose defaults
are the paper's figures:

- ``paper``: no overrides (the paper's production figures, the model defaults);
- ``demo``: the embedded run of ``gear pipeline`` on the 106-article excerpt.

``overrides(profile, flow)`` gives them as a nested dict in the flow's
parameter shape (the keys of its Prefect form). They are applied once, where
parameters are resolved: the CLI (flows/params.py: ``resolve_params``) fills
the fields not given with them, and the deployments of prefect.yaml hold them
written out, so the form shows the values a run gets (tests/test_profiles.py
keeps them equal). The parameter models themselves know no profile, and
nothing in tasks/ imports this module.

The demo's training is ``gear_model.config.EMBEDDED``, its one definition.
No Prefect import here, so ``gear --help`` stays fast.
"""

from __future__ import annotations

import copy
from typing import Any

PROFILES = ("demo", "paper")
# Other names: ``embedded`` is the demo (its training is the embedded run).
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
# The demo also trains "GeAR + L_loc + copy (not in the paper)" (flows/params.py:
# LocalisationRun): from the paper's random fusion cross-attention, so that
# its localisation is all learned, on stand-in units of the training documents,
# with a decoder that copies from the query.
DEMO_LOCALISATION_RUN: dict[str, Any] = {"loc_weight": 1.0}
# Generation is the slowest part of evaluation: the demo scores a seeded 48
# queries, and reports localisation at every fusion layer.
DEMO_EVALUATE: dict[str, Any] = {"all_layers": True, "max_generation_queries": 48}


def demo_training() -> dict[str, Any]:
    """train-gear's demo overrides: ``gear_model.config.EMBEDDED`` (the one
    definition of the embedded training run, chosen with
    benchmarks/learning_curve.py) in the form's flat shape and order."""
    from gear_model.config import EMBEDDED
    from tasks.train import TrainParams

    flat = {**EMBEDDED.get("model", {}), **{k: v for k, v in EMBEDDED.items() if k != "model"}}
    missing = sorted(set(flat) - set(TrainParams.model_fields))
    if missing:
        raise RuntimeError(f"gear_model.config.EMBEDDED sets {missing}, which TrainParams cannot express")
    return {k: copy.deepcopy(flat[k]) for k in TrainParams.model_fields if k in flat}


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
            "localisation_run": copy.deepcopy(DEMO_LOCALISATION_RUN), "evaluate": overrides(name, "evaluate-gear")}


def fill(given: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``given`` with ``defaults`` under it, nested mappings merged key by key."""
    out = dict(given)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = fill(out[key], value)
    return out


__all__ = ["ALIASES", "DEMO_BUILD", "DEMO_EVALUATE", "FLOWS", "PROFILES", "demo_training", "fill", "overrides"]
