"""`gear`: run the pipeline's flows locally, without a Prefect server.

Each subcommand resolves the flow's typed parameters and calls the flow on
a local Prefect API (LocalApi) or PREFECT_API_URL's; the same flows run
unchanged from the deployments in prefect.yaml. Parameters are resolved in
layers, lowest first (flows/params.py: resolve_params):

    model defaults (the paper's) < --profile < --config FILE.yaml < --set KEY=VALUE < dedicated flags

--config takes a YAML file in the flow's parameter shape (the keys of its
Prefect form); --set takes a dotted key and a YAML/JSON value and may be
repeated; --dry-run prints the resolved parameters (a --config file) and
stops. Bad parameters exit with status 2 and one line per field; any other
failure exits with status 1 and a one-line reason.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

# Before Prefect is imported: prefect.toml is only read from the working
# directory, so give the same settings to a `gear` started anywhere.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
# The project's module loggers (logging.getLogger(__name__) in tasks/ and
# gear_model/) reach the run's Prefect logs too (prefect.toml says the same).
PROJECT_LOGGERS = "tasks,gear_model"
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", PROJECT_LOGGERS)
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import typing

import typer

from flows.local_api import LocalApi
from flows.profiles import DEMO_BUILD, PROFILES
from gear_model.config import DEVICES, figures
from tasks.rewriters.config import RewriteConfig
from tasks.runners import RUNNERS

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])

# Settings that point a run at a Prefect API or database of its own choosing:
# with any of them set, `gear` leaves the Prefect set-up alone.
_PREFECT_TARGETS = ("PREFECT_API_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")
# The commands that run a flow (and so need a Prefect API).
_FLOW_COMMANDS = frozenset({"build-dataset", "train", "evaluate", "pipeline", "selftest"})
_local_api: LocalApi | None = None


def start_local_api() -> LocalApi | None:
    """Point this process at the shared local Prefect API (``LocalApi``, started if none
    runs), unless PREFECT_API_URL or a database URL is set (a real server; the
    deployments), GEAR_SHARED_PREFECT_DB=1 (Prefect's own temporary server on
    PREFECT_HOME's database), or Prefect is already imported (its settings are read at
    import)."""
    global _local_api
    if os.environ.get("GEAR_SHARED_PREFECT_DB") == "1" or "prefect" in sys.modules:
        return None
    if any(os.environ.get(name) for name in _PREFECT_TARGETS):
        return None
    _local_api = LocalApi()
    return _local_api


def _api_ready() -> None:
    """Before a flow runs (Prefect is imported, its logging set up): wait for
    the API that ``start_local_api`` started, if any."""
    _quiet_explained_failures()
    if _local_api is not None:
        # Done while the server may still be starting, not after: FastAPI's encoder, with
        # which a flow call serialises its parameters (prefect/flows.py; a 0.2 s import),
        # and settings without heartbeats (0.1 s).
        importlib.import_module("fastapi.encoders")
        _no_flow_heartbeats()
        _local_api.wait()


def _no_flow_heartbeats() -> None:
    """For the rest of this process, flow runs on the local API send no heartbeats.

    A heartbeat tells a server's automations that a run is alive; the local API has
    none to tell. Each flow run joins its heartbeat thread at its end, and the thread
    sleeps in one-second steps: up to a second lost per flow run. A server of one's
    own (PREFECT_API_URL) keeps Prefect's default."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    _process_settings.enter_context(temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}))


# Settings entered once and left in force until the process ends.
_process_settings = contextlib.ExitStack()


def _start_worker_server(runner: Any, units: Any) -> None:
    """Before the flow module's imports and the wait for the API: the fork server of
    the ingestion stages' worker processes imports spaCy and loads the run's unit
    models (``units``) on the other core meanwhile."""
    from tasks.runners import start_worker_server

    start_worker_server(runner, units)


_debug = False


@app.callback()
def _before_any_command(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="On a failure, show the traceback (and Prefect's), not only the reason.")] = False,
) -> None:
    """Runs before every command: the local Prefect API for a command that runs a flow
    (not for --dry-run or --help), and progress bars on stderr (ProgressArtifact)
    when it is a terminal."""
    global _debug
    _debug = debug
    if ctx.invoked_subcommand in _FLOW_COMMANDS and not {"--dry-run", "--help"} & set(sys.argv[1:]):
        start_local_api()
    os.environ.setdefault("GEAR_CLI_PROGRESS", "1" if sys.stderr.isatty() else "0")


# The choices of the options are the models' own (their Literals), read from
# modules that import neither Prefect nor torch, so `gear --help` stays fast.
Profile = Enum("Profile", {name: name for name in PROFILES}, type=str)
Profile.__doc__ = "flows/profiles.py: demo (the embedded run) or paper (the paper's figures, the model defaults)."
RewriterBackend = Enum("RewriterBackend", {b: b for b in typing.get_args(RewriteConfig.model_fields["backend"].annotation)},
                       type=str)
TaskRunner = Enum("TaskRunner", {k: k for k in RUNNERS}, type=str)
Device = Enum("Device", {d: d for d in DEVICES}, type=str)


class Stage(str, Enum):
    """BuildDatasetParams.until: the stages a build can stop after."""

    extract_docs = "extract_docs"
    select_units = "select_units"
    rewrite_queries = "rewrite_queries"
    dedup = "dedup"
    relevance_filter = "relevance_filter"


def _profile_opt(why: str):
    return typer.Option("--profile", help=f"Parameter preset: demo (the embedded run) or paper (the paper's figures). {why}")


ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", dir_okay=False, metavar="FILE.yaml",
                 help="YAML file of the flow's parameters (the keys of its Prefect form), over the profile."),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", metavar="KEY=VALUE",
                 help="Override one parameter: a dotted key and a YAML/JSON value, e.g. relevance.threshold=0.35. "
                 "Repeatable; over --config."),
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved parameters as YAML (a --config file) and stop.")]
DumpOpt = Annotated[Optional[Path], typer.Option("--dump", help="MediaWiki XML dump (.xml, .xml.bz2, multistream .bz2). Default: the enwiki excerpt shipped in gensim.")]
OutputOpt = Annotated[Optional[Path], typer.Option("--output-dir", help="Folder for stage outputs, datasets, models and reports (default: data).")]
BackendOpt = Annotated[Optional[RewriterBackend], typer.Option("--rewriter-backend", help="Query rewriter backend (rewrite.backend).")]
RunnerOpt = Annotated[Optional[TaskRunner], typer.Option("--task-runner", help="Where the mapped stages run (runner.kind; default threads, or $GEAR_TASK_RUNNER). Threads share one core for extraction and unit selection; processes use every core, and pay off from about 1,500 pages.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", help="Threads, processes or local cluster workers (runner.workers; default: the core count).")]
AddressOpt = Annotated[Optional[str], typer.Option("--address", help="A running Dask scheduler or Ray head (runner.address); empty: a local cluster.")]


def _fail(exc: BaseException) -> None:
    """A failed run: one line with the reason; for a data condition, its funnel
    and the rule that dropped the most; with --debug, the traceback too."""
    from tasks.common import Funnel

    if _debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    funnel = getattr(exc, "funnel", None)
    if isinstance(funnel, Funnel):
        reason = str(exc).splitlines()[-1].strip(" -") or type(exc).__name__
        typer.echo(f"error: {reason}", err=True)
        typer.echo(funnel.markdown(), err=True)
        worst = funnel.worst_rule()
        if worst is not None:
            stage, rule, n, seen = worst
            typer.echo(f"the rule that dropped the most: {stage} {rule} ({n} of {seen})", err=True)
        raise typer.Exit(code=1)
    reason = " ".join(str(exc).split()) or type(exc).__name__
    typer.echo(f"error: {type(exc).__name__}: {reason}", err=True)
    raise typer.Exit(code=1)


def _quiet_explained_failures() -> None:
    """Prefect logs a failed run's exception with its traceback on the console.
    For an error that explains itself (tasks.common.explains_itself: bad input,
    bad config, a data condition) ``_fail`` prints the reason instead, so those
    records stay off the console (the API's copy keeps them); --debug keeps all."""
    import logging

    from tasks.common import explains_itself

    if _debug:
        return

    class Explained(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not (record.exc_info and record.exc_info[1] is not None and explains_itself(record.exc_info[1]))

    loggers = [logging.getLogger()] + [logger for name, logger in logging.Logger.manager.loggerDict.items()
                                       if name.startswith("prefect") and isinstance(logger, logging.Logger)]
    for handler in {h for logger in loggers for h in logger.handlers if isinstance(h, logging.StreamHandler)}:
        handler.addFilter(Explained())


def _bad_input(exc: BaseException) -> None:
    """Input the command cannot use (a file, a column, a query): one line, status 2."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    typer.echo(f"error: {reason}", err=True)
    raise typer.Exit(code=2)


def _input_or_exit(check):
    """``check()``, or exit 2 with its one-line reason when it rejects the input."""
    from tasks.common import PipelineInputError

    try:
        return check()
    except PipelineInputError as exc:
        _bad_input(exc)


def _given(**flags: Any) -> dict[str, Any]:
    """Dotted parameter key -> value of the flags that were given (``__`` in a name stands for ``.``)."""
    out = {}
    for name, value in flags.items():
        if value is None:
            continue
        out[name.replace("__", ".")] = value.value if isinstance(value, Enum) else str(value) if isinstance(value, Path) else value
    return out


def resolve(command: str, profile: Profile | None, config: Path | None, sets: list[str] | None, flags: dict[str, Any]):
    """The parameters a command runs with (what --dry-run prints); raises ParamsError."""
    from flows.params import BuildDatasetParams, PipelineParams, resolve_params

    if command == "build-dataset":
        model_cls = BuildDatasetParams
    elif command == "train":
        from tasks.train import TrainParams as model_cls
    elif command == "evaluate":
        from tasks.evaluate import EvalParams as model_cls
    else:
        model_cls = PipelineParams
    return resolve_params(model_cls, profile.value if profile else None, config, sets or (), flags)


def _params_or_exit(command: str, profile, config, sets, flags, dry_run: bool):
    from flows.params import ParamsError, dump_yaml

    try:
        params = resolve(command, profile, config, sets, flags)
    except ParamsError as exc:
        for line in exc.lines:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(code=2) from None
    if dry_run:
        typer.echo(dump_yaml(params), nl=False)
        raise typer.Exit(code=0)
    return params


@app.command("build-dataset")
def build_dataset(
    profile: Annotated[Profile, _profile_opt("Default: paper (the paper's document, unit and split rules).")] = Profile.paper,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    dump: DumpOpt = None,
    output_dir: OutputOpt = None,
    docs_per_article: Annotated[Optional[int], typer.Option(help=f"Cut each article into up to N consecutive documents (units.docs_per_article; paper 1, demo {DEMO_BUILD['units']['docs_per_article']}).")] = None,
    rewriter_backend: BackendOpt = None,
    task_runner: RunnerOpt = None,
    workers: WorkersOpt = None,
    address: AddressOpt = None,
    until: Annotated[Optional[Stage], typer.Option("--until", help="Stop after this stage and print its funnel (e.g. select_units: inspect the candidates before paying for LLM time).")] = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Wikipedia dump -> RIR (query, document, unit) triples and a dataset card."""
    flags = _given(dump=dump, output_dir=output_dir, units__docs_per_article=docs_per_article,
                   rewrite__backend=rewriter_backend, runner__kind=task_runner, runner__workers=workers,
                   runner__address=address, until=until)
    params = _params_or_exit("build-dataset", profile, config, set_, flags, dry_run)
    try:
        _start_worker_server(params.runner, params.units)
        from flows.build_rir_dataset import build_rir_dataset

        _api_ready()
        dataset_dir = build_rir_dataset(params)
    except Exception as exc:  # noqa: BLE001 - one-line reason for any failure
        _fail(exc)
    if isinstance(dataset_dir, list):  # --until: that stage's folders and their funnel
        from tasks.common import Funnel

        typer.echo(f"stopped after {params.until}: {len(dataset_dir)} folder(s) under {Path(dataset_dir[0]).parent}"
                   if dataset_dir else f"stopped after {params.until}: no folders")
        typer.echo(Funnel.from_folders(dataset_dir).markdown())
        return
    typer.echo(f"dataset: {dataset_dir}")
    card = Path(dataset_dir) / "dataset_card.md"
    if card.is_file():
        typer.echo(card.read_text().split("\n## ", 2)[0])


@app.command("train")
def train(
    profile: Annotated[Profile, _profile_opt("Default: demo (the embedded training run, minutes on a CPU).")] = Profile.demo,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    dataset: Annotated[Optional[Path], typer.Option(help="An --output-dir of build-dataset (its latest dataset), a datasets/ folder or one version's folder. Default: latest under the output dir.")] = None,
    output_dir: OutputOpt = None,
    epochs: Annotated[Optional[int], typer.Option(help=f"Number of epochs ({figures('epochs')}).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")] = None,
    nproc_per_node: Annotated[Optional[int], typer.Option(help="Processes per node for torchrun (one per GPU).")] = None,
    device: Annotated[Optional[Device], typer.Option(help="auto: CUDA when available, else CPU; cuda: CUDA or fail.")] = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Train GeAR on a dataset's train split; prints the model folder."""
    flags = _given(dataset=dataset, output_dir=output_dir, epochs=epochs, max_steps=max_steps,
                   nproc_per_node=nproc_per_node, device=device)
    params = _params_or_exit("train", profile, config, set_, flags, dry_run)
    try:
        from flows.train_gear import train_gear

        _api_ready()
        model_dir = train_gear(params)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    typer.echo(f"model: {model_dir}")


@app.command("evaluate")
def evaluate(
    profile: Annotated[Profile, _profile_opt("Default: paper (10k test queries, 500 generated).")] = Profile.paper,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    model: Annotated[Optional[Path], typer.Option(help="GeAR model folder (model_dirs). Default: the newest GeAR run under OUTPUT_DIR/models, "
                 "and the newest lm_weight-0 run there as the contrastive-only row.")] = None,
    dataset: Annotated[Optional[Path], typer.Option(help="A built dataset (as for `gear train`), or a labelled Parquet/JSONL "
                 "file (or a folder of test and train files) with query, document and unit columns. Default: latest under OUTPUT_DIR.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="The set's name in the tables (dataset_name). Default: RIR for a "
                    "built dataset, else the file's stem or the folder's name.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Where the report goes and where the newest model and dataset are looked up. Default: models and dataset from data/, the report to the output_dir parameter (data/eval).")] = None,
    dry_run: DryRunOpt = False,
) -> None:
    """Evaluate a model on retrieval, localisation and generation; writes report.md/json."""
    flags = _given(model_dirs=[str(model)] if model else None, dataset=dataset, dataset_name=name, output_dir=output_dir)
    params = _params_or_exit("evaluate", profile, config, set_, flags, dry_run=False)
    # What `gear evaluate` finds by itself when neither flags nor --config/--set name it:
    # train-gear's newest run and build-dataset's newest dataset under OUTPUT_DIR (default data).
    root = Path(output_dir or "data")
    fill: dict[str, Any] = {}
    if not params.model_dirs:
        from tasks.evaluate.config import latest_loc_model, latest_models

        # The newest GeAR run, the newest GeAR + L_loc run and contrastive-only baseline when there are
        # ones (as the evaluate deployment finds them: EvalParams.with_latest_models).
        gear, contrastive = latest_models(root / "models")
        loc = latest_loc_model(root / "models", gear)
        fill["model_dirs"] = [gear or str(root / "models"), *([loc] if loc else [])]
        if contrastive and not params.contrastive_model_dir:
            fill["contrastive_model_dir"] = contrastive
    if not params.dataset:
        fill["dataset"] = str(root)
    if fill:
        params = params.model_copy(update=fill)
    if dry_run:
        from flows.params import dump_yaml

        typer.echo(dump_yaml(params), nl=False)
        raise typer.Exit(code=0)
    if dataset is not None:  # a set named on the command line is checked before any model loads
        from tasks.evaluate.loaders import check_dataset

        _input_or_exit(lambda: check_dataset(params.dataset))
    try:
        from tasks.common import PipelineInputError

        latest = root / "models" / "LATEST"
        if "model_dirs" in fill and not latest.is_file():
            raise PipelineInputError(latest, "no --model given and no trained model recorded here")
        from flows.evaluate_gear import evaluate_gear

        _api_ready()
        report_dir = evaluate_gear(params)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    report = Path(report_dir) / "report.md"
    typer.echo(report.read_text() if report.is_file() else f"report: {report_dir}")


@app.command("pipeline")
def pipeline(
    profile: Annotated[Profile, _profile_opt("Default: demo (the embedded run, about 15 min on 2 CPU cores).")] = Profile.demo,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    dump: DumpOpt = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Folder of every stage, dataset and model; the report goes to OUTPUT_DIR/eval (default: data).")] = None,
    docs_per_article: Annotated[
        Optional[int],
        typer.Option(help="Cut each article into up to N consecutive <=500-token documents (build.units.docs_per_article). "
                     f"The paper makes one per article; the demo makes up to {DEMO_BUILD['units']['docs_per_article']}, so the "
                     "106-article embedded dump gives ~180 documents."),
    ] = None,
    units_per_doc: Annotated[
        Optional[int], typer.Option(help="Candidate units rewritten per document (build.rewrite.units_per_doc; "
                                    f"paper {RewriteConfig.model_fields['units_per_doc'].default}, demo {DEMO_BUILD['rewrite']['units_per_doc']}).")
    ] = None,
    test_fraction: Annotated[
        Optional[float],
        typer.Option(help="Share of documents held out for the test split (build.triples.test_fraction). The paper holds "
                     f"out 5% of 2.3M documents; the demo holds out {DEMO_BUILD['triples']['test_fraction']:.0%} so that the test "
                     "split has 100+ queries."),
    ] = None,
    epochs: Annotated[Optional[int], typer.Option(help=f"Training epochs (train.epochs; {figures('epochs')}).")] = None,
    rewriter_backend: BackendOpt = None,
    task_runner: RunnerOpt = None,
    workers: WorkersOpt = None,
    address: AddressOpt = None,
    dry_run: DryRunOpt = False,
) -> None:
    """build-rir-dataset -> train-gear -> evaluate-gear (demo profile by default); prints the tables."""
    out = str(output_dir) if output_dir is not None else None
    flags = _given(
        build__dump=dump, build__output_dir=out, train__output_dir=out,
        evaluate__output_dir=str(Path(out) / "eval") if out else None, evaluate__work_dir=out,
        build__units__docs_per_article=docs_per_article, build__rewrite__units_per_doc=units_per_doc,
        build__triples__test_fraction=test_fraction, build__rewrite__backend=rewriter_backend, train__epochs=epochs,
        build__runner__kind=task_runner, build__runner__workers=workers, build__runner__address=address,
    )
    params = _params_or_exit("pipeline", profile, config, set_, flags, dry_run)
    try:
        _start_worker_server(params.build.runner, params.build.units)
        from flows.rir_pipeline import rir_pipeline

        _api_ready()
        report_dir = rir_pipeline(params)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    report = Path(report_dir) / "report.md"
    typer.echo(report.read_text() if report.is_file() else f"report: {report_dir}")


def _open_searcher(model: Path | None, corpus: Path | None, output_dir: Path | None):
    """The searcher of `gear search` / `gear serve`: the model and corpus given, else the newest
    under OUTPUT_DIR as `gear evaluate` finds them (models/: latest_models; the latest dataset's
    documents); the index cached under OUTPUT_DIR/search_index. Bad input exits 2."""
    from gear_model.search import GearSearcher, SearchInputError
    from tasks.common import PipelineInputError

    root = Path(output_dir or "data")
    try:
        from tasks.contracts import resolve_dataset
        from tasks.evaluate.config import latest_models, resolve_model_dir

        if model is None:
            model_dir = latest_models(root / "models")[0]
            if model_dir is None:
                raise SearchInputError(f"{root / 'models'}: no trained GeAR model here (give --model)")
        else:
            model_dir = resolve_model_dir(str(model))
        corpus = corpus or root
        if corpus.is_dir() and not any((corpus / f"{split}{suffix}").is_file()
                                       for split in ("train", "test") for suffix in (".parquet", ".jsonl")):
            corpus = resolve_dataset(corpus)  # a build output or datasets/ folder: its latest version's documents
        searcher = GearSearcher.from_model_dir(model_dir, corpus, cache_dir=root / "search_index")
    except (SearchInputError, PipelineInputError) as exc:
        _bad_input(exc)
    index = searcher.index
    typer.echo(f"{len(searcher.corpus)} documents, model {model_dir}, index {index.folder} "
               f"({'reused' if index.reused else 'built'})", err=True)
    return searcher


def _print_hits(hits, context: int = 1, others: int = 2) -> None:
    """Each hit: title and score, its top sentence highlighted between its neighbours, the
    generated unit and the next-best sentences. Off a terminal (no colours) the top sentence
    stands between » and «."""
    from rich.console import Console
    from rich.text import Text

    console = Console(highlight=False, soft_wrap=True)
    opening, closing = ("", "") if console.is_terminal else ("» ", " «")
    for rank, hit in enumerate(hits, 1):
        console.print(Text.assemble((f"{rank}. {hit.title or hit.doc_id}", "bold"), f"  [{hit.doc_id}]  ",
                                    (f"score {hit.score:.3f}", "cyan")))
        top, doc = hit.sentences[0], hit.document
        by_start = sorted(hit.sentences, key=lambda s: s.start)
        at = next(i for i, s in enumerate(by_start) if s.start == top.start)
        before, after = by_start[max(0, at - context):at], by_start[at + 1:at + 1 + context]
        left = before[0].start if before else top.start
        right = after[-1].end if after else top.end
        line = Text("   … " if left > 0 else "   ", "dim")
        line.append(doc[left:top.start], "dim")
        line.append(f"{opening}{doc[top.start:top.end]}{closing}", "bold black on yellow")
        line.append(doc[top.end:right], "dim")
        line.append(" …" if doc[right:].strip() else "", "dim")
        console.print(line)
        if hit.generated:
            console.print(Text.assemble("   generated: ", (hit.generated, "green")))
        for s in hit.sentences[1:1 + others]:
            console.print(Text.assemble("   ", (f"{s.score:.4f} ", "cyan"), s.text))
        console.print()


@app.command("search")
def search(
    query: Annotated[str, typer.Argument(help="What to look for (keywords or a question).")],
    model: Annotated[Optional[Path], typer.Option(help="GeAR model folder (or a train-gear models/ folder). Default: the newest GeAR run under OUTPUT_DIR/models.")] = None,
    corpus: Annotated[Optional[Path], typer.Option(help="Documents: a Parquet/JSONL file with a document (or text) column and optional doc_id, title, sentence_spans; or a dataset folder. Default: the latest dataset under OUTPUT_DIR.")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="Where the model and dataset are looked up and the index is cached (OUTPUT_DIR/search_index). Default: data.")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Documents to return.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list, best first: doc_id, title, score, generated, sentences (ranked best first: text, start, end, score).")] = False,
) -> None:
    """Search a corpus with a trained GeAR: top-k documents, each with its most relevant sentence highlighted."""
    from gear_model.search import SearchInputError, check_query, check_top_k

    try:  # before any model loads
        check_query(query)
        check_top_k(top_k)
    except SearchInputError as exc:
        _bad_input(exc)
    searcher = _open_searcher(model, corpus, output_dir)
    hits = searcher.search(query, top_k)
    if as_json:
        import json

        typer.echo(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=2))
    else:
        _print_hits(hits)


@app.command("serve")
def serve(
    model: Annotated[Optional[Path], typer.Option(help="GeAR model folder (as for `gear search`).")] = None,
    corpus: Annotated[Optional[Path], typer.Option(help="Documents (as for `gear search`).")] = None,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", help="As for `gear search`. Default: data.")] = None,
    host: Annotated[str, typer.Option(help="Address to bind; 127.0.0.1 keeps the page on this machine.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8765,
) -> None:
    """A search page (and GET /api/search?q=&k=) over a trained GeAR and a corpus."""
    searcher = _open_searcher(model, corpus, output_dir)
    import uvicorn

    from tasks.search_app import create_app

    typer.echo(f"GeAR search on http://{host}:{port}/ (Ctrl-C stops)", err=True)
    uvicorn.run(create_app(searcher), host=host, port=port, log_level="warning")


@app.command("selftest", hidden=True)
def selftest(
    warn: Annotated[bool, typer.Option(help="Also log a warning through the tasks logger.")] = False,
) -> None:
    """Run a tiny flow on this process's Prefect API (the same start-up as every command, seconds of work)."""
    try:
        import logging

        from prefect import flow, task

        @task(name="gear-selftest-add")
        def add(a: int, b: int) -> int:
            if warn:
                logging.getLogger("tasks.selftest").warning("gear selftest: a warning from the tasks logger")
            return a + b

        @flow(name="gear-selftest")
        def tiny() -> int:
            return add(1, 2)

        _api_ready()
        result = tiny()
    except Exception as exc:  # noqa: BLE001
        _fail(exc)
    database = (_local_api.database_url if _local_api else None) or os.environ.get(
        "PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_HOME's prefect.db")
    typer.echo(f"selftest: ok ({result}); api {os.environ.get('PREFECT_API_URL') or 'temporary'}; database {database}")


_exit_status: int | None = None


def _exit_without_teardown() -> None:
    """The last exit handler: end the process with the command's status, skipping the
    interpreter's teardown (tasks/quick_exit.py)."""
    if _exit_status is None:  # an exception escaped the app: Python reports it and exits as usual
        return
    from tasks.quick_exit import exit_without_teardown

    exit_without_teardown(_exit_status)


def main() -> None:  # pragma: no cover - console entry point
    """The `gear` command: the typer app, then a quick exit."""
    import atexit

    global _exit_status
    atexit.register(_exit_without_teardown)  # registered first, so it runs last
    try:
        app()
        _exit_status = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            _exit_status = exc.code or 0
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
