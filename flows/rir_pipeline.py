"""Flow `rir-pipeline`: build-rir-dataset -> train-gear (GeAR, the optional
GeAR + L_loc run and the contrastive-only baseline) -> evaluate-gear. Each
step is a sub-flow with its own caching, so a scheduled refresh over an
unchanged dump reuses everything.

On CPU the trainings run in lanes side by side, each on its share of the
cores (``tasks.train.cpu_lanes``): the L_loc run in one lane, GeAR then the
baseline in the other. Each training is its own process; a lane is a thread
that waits on it. While the L_loc run still trains, the other lane evaluates
the rows that generate nothing (the baselines), on its own share of the
cores; the evaluation after the lanes finds them cached and adds the GeAR
rows on all the cores.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from prefect import flow

from flows.build_rir_dataset import build_rir_dataset
from flows.evaluate_gear import evaluate_gear, evaluate_systems
from flows.params import PipelineParams
from flows.train_gear import train_gear
from tasks.common import torch_threads
from tasks.train import TrainParams, cpu_lanes

__all__ = ["PipelineParams", "rir_pipeline"]


@flow(name="rir-pipeline", log_prints=True)
def rir_pipeline(params: PipelineParams = PipelineParams()) -> str:
    """Returns the evaluation report folder (report.md, report.json, report.html)."""
    dataset_dir = build_rir_dataset(params.build)
    gear = params.train.model_copy(update={"dataset": dataset_dir})
    loc = params.localisation_run.training(gear) if params.localisation_run.loc_weight > 0 else None
    baseline = gear.model_copy(update={"lm_weight": 0.0}) if params.train_contrastive_baseline else None
    gear_dir, loc_dir, contrastive_dir = train_in_lanes(
        gear, loc, baseline,
        early_evaluation=lambda g, c: evaluate_systems(evaluation_params(params, dataset_dir, g, None, c),
                                                       rows=lambda system: not system.generation))
    return str(evaluate_gear(evaluation_params(params, dataset_dir, gear_dir, loc_dir, contrastive_dir)))


def evaluation_params(params: PipelineParams, dataset_dir: str, gear_dir: str, loc_dir: str | None,
                      contrastive_dir: str | None):
    """The pipeline's evaluation of these models on the dataset it built."""
    return params.evaluate.model_copy(update={
        "model_dirs": [gear_dir, *([loc_dir] if loc_dir else [])],
        "contrastive_model_dir": contrastive_dir,
        "dataset": dataset_dir,
    })


def train_in_lanes(gear: TrainParams, loc: TrainParams | None, baseline: TrainParams | None,
                   early_evaluation: Callable[[str, str | None], object] | None = None):
    """The model folders of (GeAR, GeAR + L_loc, baseline), None for a run not asked
    for; in at most two lanes. The baseline trains last in its lane, so
    models/LATEST ends on it or on L_loc. With two lanes and the L_loc run,
    that lane then runs ``early_evaluation(gear_dir, baseline_dir)`` on its
    share of the cores while the L_loc run trains."""
    lanes, threads = cpu_lanes(gear, min(2, sum(r is not None for r in (gear, loc, baseline))))
    if lanes == 1:
        return tuple(train_gear(r) if r is not None else None for r in (gear, loc, baseline))
    gear, loc, baseline = (r.model_copy(update={"num_threads": threads}) if r is not None else None
                           for r in (gear, loc, baseline))
    other_lane = [loc] if loc is not None else [baseline]
    main_lane = [gear] + ([baseline] if loc is not None and baseline is not None else [])
    with ThreadPoolExecutor(1) as pool:
        # The lane's thread runs its flows in a copy of this flow's context, so they are its sub-flows.
        other = pool.submit(contextvars.copy_context().run, lambda: [train_gear(r) for r in other_lane])
        done = {id(r): train_gear(r) for r in main_lane}
        if loc is not None and early_evaluation is not None:
            with torch_threads(threads):
                early_evaluation(done[id(gear)], done.get(id(baseline)))
        done.update({id(r): d for r, d in zip(other_lane, other.result())})
    return tuple(done.get(id(r)) if r is not None else None for r in (gear, loc, baseline))


if __name__ == "__main__":
    rir_pipeline()
