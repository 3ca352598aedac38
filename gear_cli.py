"""`gear`: run the pipeline's flows locally, without a Prefect server.

Each subcommand builds the flow's typed parameters and calls the flow, which
starts a temporary Prefect API for the run; the same flows run unchanged
from the deployments in prefect.yaml. On failure the command exits non-zero
with a one-line reason.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

# Before Prefect is imported: prefect.toml is only read from the working
# directory, so give the same settings to a `gear` started anywhere.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typer

from flows.demo import DEMO_DOCS_PER_ARTICLE, DEMO_TEST_FRACTION, DEMO_UNITS_PER_DOC

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])

DumpOpt = Annotated[Optional[Path], typer.Option("--dump", help="MediaWiki XML dump (.xml, .xml.bz2, multistream .bz2). Default: the enwiki excerpt shipped in gensim.")]
OutputOpt = Annotated[Path, typer.Option("--output-dir", help="Folder for stage outputs, datasets, models and reports.")]


def _fail(exc: BaseException) -> None:
    reason = " ".join(str(exc).split()) or type(exc).__name__
    typer.echo(f"error: {type(exc).__name__}: {reason}", err=True)
    raise typer.Exit(code=1)


@app.command("build-dataset")
def build_dataset(
    dump: DumpOpt = None,
    output_dir: OutputOpt = Path("data"),
    docs_per_article: Annotated[int, typer.Option(help="Cut each article into up to N consecutive documents (paper: 1).")] = 1,
    rewriter_backend: Annotated[str, typer.Option(help="Query rewriter backend: local, openai or vllm.")] = "local",
) -> None:
    """Wikipedia dump -> RIR (query, document, unit) triples and a dataset card."""
    try:
        from flows.build_rir_dataset import BuildDatasetParams, build_rir_dataset

        params = BuildDatasetParams.for_cli(
            dump=dump, output_dir=output_dir, docs_per_article=docs_per_article, rewriter_backend=rewriter_backend
        )
        dataset_dir = build_rir_dataset(params)
    except Exception as exc:  # noqa: BLE001 - one-line reason for any failure
        _fail(exc)
    typer.echo(f"dataset: {dataset_dir}")
    card = Path(dataset_dir) / "dataset_card.md"
    if card.is_file():
        typer.echo(card.read_text().split("\n## ", 2)[0])


@app.command("train")
def train(
    dataset: Annotated[Optional[Path], typer.Option(help="An --output-dir of build-dataset (its latest dataset), a datasets/ folder or one version's folder. Default: latest under data/.")] = None,
    output_dir: OutputOpt = Path("data"),
    epochs: Annotated[Optional[int], typer.Option(help="Override the number of epochs.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")] = None,
    nproc_per_node: Annotated[int, typer.Option(help="Processes per node for torchrun.")] = 1,
) -> None:
    """Train GeAR on a dataset's train split; prints the model folder."""
    try:
        from flows.train_gear import TrainParams, train_gear

        overrides = {k: v for k, v in {"epochs": epochs, "max_steps": max_steps}.items() if v is not None}
        params = TrainParams(
            dataset=str(dataset or output_dir), output_dir=str(output_dir), nproc_per_node=nproc_per_node, **overrides
        )
        model_dir = train_gear(params)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    typer.echo(f"model: {model_dir}")


@app.command("evaluate")
def evaluate(
    model: Annotated[Optional[Path], typer.Option(help="GeAR model folder. Default: the latest under OUTPUT_DIR/models.")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="Dataset (as for `gear train`). Default: latest under OUTPUT_DIR.")] = None,
    output_dir: OutputOpt = Path("data"),
) -> None:
    """Evaluate a model on retrieval, localisation and generation; writes report.md/json."""
    try:
        from flows.evaluate_gear import EvalParams, evaluate_gear

        params = EvalParams.for_cli(model=model, dataset=dataset, output_dir=output_dir)
        report_dir = evaluate_gear(params)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    report = Path(report_dir) / "report.md"
    typer.echo(report.read_text() if report.is_file() else f"report: {report_dir}")


@app.command("pipeline")
def pipeline(
    dump: DumpOpt = None,
    output_dir: OutputOpt = Path("data"),
    docs_per_article: Annotated[
        int,
        typer.Option(
            help="Cut each article into up to N consecutive <=500-token documents. The paper makes one per "
            "article; the demo makes up to 3, so the 106-article embedded dump gives ~180 documents."
        ),
    ] = DEMO_DOCS_PER_ARTICLE,
    units_per_doc: Annotated[
        int, typer.Option(help="Candidate units rewritten per document (paper: 3; the demo samples 5).")
    ] = DEMO_UNITS_PER_DOC,
    test_fraction: Annotated[
        float,
        typer.Option(
            help="Share of documents held out for the test split. The paper holds out 5% of 2.3M documents; "
            "the demo holds out 40% so that the test split has 100+ queries."
        ),
    ] = DEMO_TEST_FRACTION,
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs (default: the embedded training profile's).")] = None,
) -> None:
    """build-rir-dataset -> train-gear -> evaluate-gear on the embedded defaults; prints the tables."""
    try:
        from flows.rir_pipeline import PipelineParams, rir_pipeline

        params = PipelineParams.for_cli(
            dump=dump, output_dir=output_dir, docs_per_article=docs_per_article, test_fraction=test_fraction,
            epochs=epochs, units_per_doc=units_per_doc,
        )
        report_dir = rir_pipeline(params)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    report = Path(report_dir) / "report.md"
    typer.echo(report.read_text() if report.is_file() else f"report: {report_dir}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
