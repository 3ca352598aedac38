"""Flow `rir-pipeline`: build-rir-dataset -> train-gear (GeAR, and the
contrastive-only baseline) -> evaluate-gear. Each step is a sub-flow with its
own caching, so a scheduled refresh over an unchanged dump reuses everything.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import BaseModel, Field

from flows.build_rir_dataset import BuildDatasetParams, build_rir_dataset
from flows.demo import DEMO_DOCS_PER_ARTICLE, DEMO_GENERATION_QUERIES, DEMO_TEST_FRACTION, DEMO_UNITS_PER_DOC
from flows.evaluate_gear import EvalParams, evaluate_gear
from flows.train_gear import TrainParams, train_gear


class PipelineParams(BaseModel):
    """The whole chain. Dataset, model and report paths are filled in from
    the step before, so leave `train.dataset`, `evaluate.model_dirs` and
    `evaluate.dataset` empty."""

    build: BuildDatasetParams = Field(BuildDatasetParams(), title="Dataset", description="Parameters of build-rir-dataset.")
    train: TrainParams = Field(TrainParams(), title="Training", description="Parameters of train-gear; the dataset is filled in from the build.")
    train_contrastive_baseline: bool = Field(
        True,
        title="Train the contrastive-only baseline",
        description="Also train the same model with LM weight 0 (the paper's 'GeAR w/o L_LM') for the tables.",
    )
    evaluate: EvalParams = Field(
        EvalParams(), title="Evaluation", description="Parameters of evaluate-gear; models and dataset are filled in."
    )

    @classmethod
    def for_cli(
        cls,
        dump: Path | None,
        output_dir: Path,
        docs_per_article: int = DEMO_DOCS_PER_ARTICLE,
        test_fraction: float = DEMO_TEST_FRACTION,
        epochs: int | None = None,
        units_per_doc: int = DEMO_UNITS_PER_DOC,
    ) -> PipelineParams:
        """``gear pipeline``: the embedded demo (see the DEMO_* constants)."""
        out = str(output_dir)
        build = BuildDatasetParams.for_cli(dump=dump, output_dir=output_dir, docs_per_article=docs_per_article)
        build.triples = build.triples.model_copy(update={"test_fraction": test_fraction})
        build.rewrite = build.rewrite.model_copy(update={"units_per_doc": units_per_doc})
        return cls(
            build=build,
            train=TrainParams(output_dir=out, epochs=epochs),
            # Generation is the slowest part of evaluation (1.4 queries/s here): the demo scores a seeded 48.
            evaluate=EvalParams(output_dir=str(Path(out) / "eval"), work_dir=out, all_layers=True,
                                max_generation_queries=DEMO_GENERATION_QUERIES),
        )


@flow(name="rir-pipeline", log_prints=True)
def rir_pipeline(params: PipelineParams = PipelineParams()) -> str:
    """Returns the evaluation report folder (report.md, report.json, report.html)."""
    dataset_dir = build_rir_dataset(params.build)
    model_dir = train_gear(params.train.model_copy(update={"dataset": dataset_dir}))
    contrastive_dir = None
    if params.train_contrastive_baseline:
        contrastive_dir = train_gear(params.train.model_copy(update={"dataset": dataset_dir, "lm_weight": 0.0}))
    report_dir = evaluate_gear(
        params.evaluate.model_copy(
            update={"model_dirs": [model_dir], "contrastive_model_dir": contrastive_dir, "dataset": dataset_dir}
        )
    )
    return str(report_dir)


if __name__ == "__main__":
    rir_pipeline()
