"""train-gear's stage: launch ``gear_model.train`` (under torchrun for more than one process) and follow it.

The core (``run_training``) resolves the dataset, fixes the run's folder
``<output_dir>/models/<key>`` (the key hashes the resolved training config,
the number of processes, the content of train.parquet and of the init
checkpoint, and the code version), builds the torchrun command, streams the
trainer's log lines, follows the JSON-lines metrics it writes, and returns
``<run>/model``. A finished run is returned at once; an unfinished one resumes
from its latest checkpoint (so a task retry resumes too).
``<output_dir>/models/LATEST`` holds ``<key>/model`` of the newest finished run.

Multi-node: run the flow on every node with the same parameters and its own
``node_rank``; torchrun's c10d rendezvous at ``rdzv_endpoint`` joins them.
Resume across nodes needs ``output_dir`` on a shared filesystem.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, model_validator

from gear_model.config import EMBEDDED, CrossAttentionInit, Device, LocLayers, TrainConfig, figures, setting, words
from tasks.common import ConfigError, PipelineInputError, ProgressArtifact, in_prefect_run, is_complete, write_text
from tasks.contracts import LATEST, STAND_IN_TRIPLES, dataset_file
from tasks.params_model import ParamsModel
from tasks.stage import StageRun, stage

_GEAR_MODEL = Path(__file__).resolve().parent.parent / "gear_model"
STAGE = "train"
MODELS_DIR = "models"
# Fields that do not change the trained weights, so they stay out of the run key.
_NOT_IN_KEY = {"output_dir", "dataset", "init_checkpoint", "resume", "save_every", "save_every_epochs", "keep_last",
               "log_every", "num_threads", "stop_after_steps", "device", "doc_state_store"}
# Under the output dir: a frozen E_d's document states, shared by the run's
# trainings and its evaluation (gear_model/doc_states.py).
DOC_STATE_STORE = Path("cache") / "doc_states"
# TrainParams fields that only the launcher reads (torchrun's layout, whether
# to score the test split); every other field is a TrainConfig or GearConfig
# field of the same name and is passed on as it is.
_LAUNCH_ONLY = frozenset({"nproc_per_node", "nnodes", "node_rank", "rdzv_endpoint", "eval_heldout", "stand_in_query_words",
                          "stand_in_only", "stand_in_sampled"})


# The paper's run: every default of the form below is read from it (written once, in gear_model/config.py).
_PAPER = TrainConfig()
# BERT's dropout on attention probabilities: TrainConfig leaves it to the
# checkpoint (None), which a form cannot show, so the form writes BERT's value.
BERT_ATTENTION_DROPOUT = 0.1


def _paper(name: str) -> Any:
    return setting(_PAPER, name)


class TrainParams(ParamsModel):
    """Parameters of a GeAR training run (the train-gear form).

    The defaults are the paper's (Table 4), read from
    ``gear_model.config.TrainConfig``; every field but the launcher's
    (``_LAUNCH_ONLY``) is a ``TrainConfig`` or ``GearConfig`` setting of the
    same name. The ``demo`` profile is ``gear_model.config.EMBEDDED``; the CLI
    and the deployments apply a profile before these parameters are validated
    (flows/params.py: ``resolve_params``).
    """

    dataset: str | None = Field(
        None,
        description="Training triples: a train.parquet, a dataset version folder, a datasets/ folder with "
        "LATEST, or a build-dataset output dir (its latest version). Empty: the latest dataset under output_dir.",
    )
    output_dir: str = Field("data", description="Runs go to OUTPUT_DIR/models/<run key>/ (checkpoints, metrics, model).")
    init_checkpoint: str | None = Field(
        None,
        description="BERT checkpoint folder to initialise every part (production: a bert-base-uncased folder), "
        "or a GeAR model folder to continue from. Empty: the embedded all-MiniLM-L6-v2.",
    )
    epochs: int = Field(_paper("epochs"), ge=1, le=1000, description=f"Epochs ({figures('epochs')}).")
    batch_size: int = Field(
        _paper("batch_size"), ge=1, le=4096, description=f"Triples per device per micro-step ({figures('batch_size')}).")
    grad_accum: int = Field(_paper("grad_accum"), ge=1, le=1024, description="Gradient accumulation micro-steps per optimizer step.")
    lr: float = Field(_paper("lr"), gt=0, le=1.0, description=f"Peak learning rate after warm-up ({figures('lr')}).")
    warmup_steps: int = Field(
        _paper("warmup_steps"), ge=0,
        description=f"Warm-up steps from {words(_paper('lr_start'))} ({figures('warmup_steps')}; capped at "
        f"{_paper('warmup_frac'):.0%} of the run).")
    lm_weight: float = Field(
        _paper("lm_weight"), ge=0, le=100,
        description="Weight of the LM loss; 0 trains the contrastive-only baseline (GeAR w/o L_LM).")
    loc_weight: float = Field(
        _paper("loc_weight"), ge=0, le=100,
        description="Weight of the optional localisation loss L_loc (not in the paper; 0 = off): cross-entropy of the "
        "unit among its document's sentences, scored by the localisation layer's attention mass per token.")
    loc_layers: LocLayers = Field(
        _paper("loc_layers"),
        description="Where L_loc reads the fusion's attention: the localisation layer only, or every fusion layer "
        "(the loss's mean over them, so each layer learns to find the unit).")
    copy_from_query: bool = Field(
        _paper("copy_from_query"),
        description="A pointer-generator head on the decoder (not in the paper; off = the paper's decoder): each "
        "step mixes the vocabulary softmax with copying one of the query's words, gated by the decoder state.")
    lm_label_smoothing: float = Field(
        _paper("lm_label_smoothing"), ge=0.0, lt=1.0,
        description=f"Label smoothing of the LM targets ({figures('lm_label_smoothing')}; BLIP 0.1).")
    queue_size: int = Field(
        _paper("queue_size"), ge=0,
        description=f"Momentum feature queue ({figures('queue_size')}); must divide by batch_size x processes.")
    max_query_length: int = Field(
        _paper("max_query_length"), ge=8, le=512, description=f"Query tokens ({figures('max_query_length')}).")
    max_doc_length: int = Field(
        _paper("max_doc_length"), ge=8, le=512,
        description=f"Document tokens ({figures('max_doc_length')}: the documents are built up to 500; a unit "
        "beyond it is windowed in).")
    max_unit_length: int = Field(
        _paper("max_unit_length"), ge=8, le=512,
        description=f"Unit (generation target) tokens ({figures('max_unit_length')}).")
    max_steps: int = Field(
        _paper("max_steps"), ge=0, description="If > 0, train at most this many optimizer steps (the lr schedule follows).")
    save_every: int = Field(
        _paper("save_every"), ge=0,
        description=f"Checkpoint every N optimizer steps (0: epoch ends only; {figures('save_every')}).")
    save_every_epochs: int = Field(
        _paper("save_every_epochs"), ge=1, le=1000,
        description="Checkpoint at the end of every N-th epoch; a killed run resumes from the latest one (after "
        f"the last epoch the final model is written instead; {figures('save_every_epochs')}).")
    keep_last: int = Field(
        _paper("keep_last"), ge=1, le=1000, description=f"Checkpoints kept in the run folder ({figures('keep_last')}).")
    momentum_eval_mode: bool = Field(
        _paper("momentum_eval_mode"),
        description=f"Momentum encoders run without dropout (faster on CPU; off = BLIP; {figures('momentum_eval_mode')}).")
    attention_dropout: float = Field(
        BERT_ATTENTION_DROPOUT, ge=0.0, lt=1.0,
        description=f"Dropout on attention probabilities (BERT's and the paper's {BERT_ATTENTION_DROPOUT}; demo "
        f"{EMBEDDED['attention_dropout']:g}, measured faster on CPU).")
    new_module_lr_mult: float = Field(
        _paper("new_module_lr_mult"), gt=0, le=1000,
        description="Learning rate of the newly initialised fusion cross-attention as a multiple of lr "
        f"({figures('new_module_lr_mult')}, chosen with benchmarks/learning_curve.py).")
    decoder_lr_mult: float = Field(
        _PAPER.decoder_lr_multiplier(), gt=0, le=1000,
        description="Learning rate of the decoder's new parts (its cross-attention, and its LM-head transform and "
        "bias when the init checkpoint has no MLM head) as a multiple of lr; its loaded body and word embeddings "
        f"train at lr (paper {_PAPER.decoder_lr_multiplier():g}; demo {EMBEDDED['decoder_lr_mult']:g}, chosen "
        "with benchmarks/learning_curve.py).")
    freeze_doc_encoder: bool = Field(
        _paper("freeze_doc_encoder"),
        description=f"Keep the document encoder as initialised (no gradient, no momentum copy; {figures('freeze_doc_encoder')}).")
    cross_attention_init: CrossAttentionInit = Field(
        _paper("cross_attention_init"),
        description="Fusion cross-attention init: random (BERT init, as BLIP), a copy of the query encoder's "
        "self-attention of the same layer, or identity query/key projections (attention starts as token-state "
        f"similarity) ({figures('cross_attention_init')}).")
    eval_every: int = Field(
        _paper("eval_every"), ge=0, description="Score held-out localisation every N optimizer steps (0: at epoch ends only).")
    eval_every_epochs: int = Field(
        _paper("eval_every_epochs"), ge=1, le=1000,
        description="Score held-out localisation at the end of every N-th epoch (the last epoch always ends "
        f"with a score; {figures('eval_every_epochs')}).")
    eval_heldout: bool = Field(
        True, description="Score localisation (and ROUGE on a few queries) on the dataset's test split at every "
        "epoch end, for the per-epoch curves of the report (paper Fig. 4a/b).")
    eval_generation_queries: int = Field(
        _paper("eval_generation_queries"), ge=0, le=10_000,
        description="Held-out queries whose unit is generated and scored by ROUGE at each evaluation "
        f"({figures('eval_generation_queries')}).")
    stand_in_query_words: int = Field(
        0, ge=0, le=64,
        description="If > 0, also train on stand-in units (not in the paper): every sentence of a training document "
        "that passes the dataset's unit rules, queried by its first N content words (tasks/stand_in.py). They give "
        "the optional localisation loss many distinct units per document; 0: the dataset's triples only.")
    stand_in_only: bool = Field(
        False, description="Train on the stand-in units alone, without the dataset's triples (needs "
        "stand_in_query_words > 0). With L_loc, the dataset's few units per document are memorised, while the "
        "stand-ins teach localisation (docs/LEARNING_CURVE.md).")
    stand_in_sampled: bool = Field(
        False, description="Draw a stand-in query's N words from the whole sentence, in a shuffled order (seeded), "
        "not its first N in order: a keyword query whose order is not the unit's, as a rewriter's often is.")
    seed: int = Field(_paper("seed"), description="Seed for initialisation, data order and dropout.")
    num_threads: int = Field(
        0, ge=0, le=1024,
        description="CPU threads of each training process (0: torch's default, one per core). Does not change the "
        "run's key.")
    # The GPU layout defaults come from the worker's environment, so the job
    # variables of the gear-gpu pool (scripts/work-pools/gear-gpu.json) reach
    # torchrun; the factory runs where the run's parameters are validated (the
    # flow-run process), and validate_default applies the bounds to it.
    nproc_per_node: int = Field(
        default_factory=lambda: TrainParams._from_env("GEAR_GPUS_PER_NODE", 1), validate_default=True, ge=1, le=64,
        description="Processes per node (one per GPU; CPU: gloo processes). Default: GEAR_GPUS_PER_NODE of the "
        "worker's environment (the gear-gpu pool's gpus_per_node), else 1.")
    nnodes: int = Field(
        default_factory=lambda: TrainParams._from_env("GEAR_NNODES", 1), validate_default=True, ge=1, le=1024,
        description="Number of nodes (torchrun --nnodes). Default: GEAR_NNODES of the worker's environment "
        "(the gear-gpu pool's nnodes), else 1.")
    node_rank: int = Field(0, ge=0, description="This node's rank (torchrun --node_rank).")
    rdzv_endpoint: str = Field(
        default_factory=lambda: TrainParams._from_env("GEAR_RDZV_ENDPOINT", ""), validate_default=True,
        description="host:port of the c10d rendezvous for multi-node runs (empty: single node). Default: "
        "GEAR_RDZV_ENDPOINT of the worker's environment (the gear-gpu pool's rdzv_endpoint), else empty.")
    resume: bool = Field(_paper("resume"), description="Resume from the run's latest checkpoint if there is one.")
    device: Device = Field(
        _paper("device"), description="auto: CUDA (NCCL, bf16) when available, else CPU (gloo); cuda: CUDA or fail; cpu: CPU.")

    # Fields whose default is read from an environment variable when it is set
    # (and not empty): the Prefect form shows no default for them.
    ENV_DEFAULTS: ClassVar[dict[str, str]] = {
        "nproc_per_node": "GEAR_GPUS_PER_NODE", "nnodes": "GEAR_NNODES", "rdzv_endpoint": "GEAR_RDZV_ENDPOINT"}

    @model_validator(mode="after")
    def _stand_ins_to_train_on(self) -> TrainParams:
        if self.stand_in_only and not self.stand_in_query_words:
            raise ValueError("stand_in_only needs stand_in_query_words > 0 (the words of a stand-in query)")
        return self

    @staticmethod
    def _from_env(name: str, fallback: Any) -> Any:
        """The variable's text (validated as the field's type) when set and not empty, else ``fallback``."""
        value = os.environ.get(name, "").strip()
        return value if value else fallback

    def train_config(self, dataset_file: Path, run_dir: Path, triples_file: Path | None = None) -> TrainConfig:
        """The resolved ``TrainConfig`` of this run: every field of the same name
        (``TrainConfig``'s, or its model's ``GearConfig``), plus the resolved paths
        (``triples_file``: what the trainer reads, when not the dataset's train.parquet)."""
        heldout = dataset_file.with_name("test.parquet")
        return TrainConfig.from_dict({
            **self.model_dump(exclude=_LAUNCH_ONLY),  # from_dict routes the model's names to ``model``
            "eval_file": str(heldout) if self.eval_heldout and heldout.is_file() else "",
            "dataset": str(triples_file or dataset_file),
            "init_checkpoint": str(self.init_checkpoint or _embedded_encoder()),
            "output_dir": str(run_dir),
            "doc_state_store": str(Path(self.output_dir) / DOC_STATE_STORE) if self.freeze_doc_encoder else "",
        })

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def cpu_lanes(params: TrainParams, runs: int) -> tuple[int, int]:
    """(lanes, threads per training) for ``runs`` trainings with ``params``'
    layout: on CPU, one process on one node, up to one lane per core (at most
    ``runs``), the cores (or ``num_threads``) shared out; on a GPU one lane,
    as the runs would share its memory. Two runs on one core each finish
    sooner than one after the other on two, since a step of the demo's size
    does not keep two cores busy (docs/BENCHMARKS.md)."""
    if runs < 2 or params.world_size > 1 or params.device == "cuda":
        return 1, params.num_threads
    from gear_model.train import use_cuda_for

    if use_cuda_for(params.device):
        return 1, params.num_threads
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cores = params.num_threads or available
    lanes = max(1, min(runs, cores))
    return lanes, (cores // lanes if lanes > 1 else params.num_threads)


def _embedded_encoder() -> Path:
    from tasks.assets import embedded_encoder_path

    return embedded_encoder_path()


def resolve_train_file(dataset: str | os.PathLike | None, output_dir: str | os.PathLike) -> Path:
    """train.parquet of a file, a version folder, a datasets/ folder or a build-dataset output dir."""
    return dataset_file(dataset or output_dir, "train")


def dataset_doc_tokens(train_file: Path) -> int | None:
    """The document length (``units.max_doc_tokens``) the dataset was built with, from its card."""
    card = train_file.with_name("dataset_card.json")
    if not card.is_file():
        return None
    try:
        return int(json.loads(card.read_text())["lineage"]["params"]["units"]["max_doc_tokens"])
    except (KeyError, TypeError, ValueError):
        return None


def _run_identity(params: TrainParams) -> dict[str, Any]:
    """What the trained weights depend on: the resolved training config minus
    operational fields, and the number of processes (it sets the global batch)."""
    config = params.train_config(resolve_train_file(params.dataset, params.output_dir), Path("."))
    identity = {k: v for k, v in config.to_dict().items() if k not in _NOT_IN_KEY}
    # The held-out file is the train file's sibling (its content is in the dataset's); whether the run scores it is what counts.
    identity["eval_file"] = bool(config.eval_file)
    identity["world_size"] = params.world_size
    if params.stand_in_query_words:
        identity["stand_in_query_words"] = params.stand_in_query_words
        identity["stand_in_only"] = params.stand_in_only
        if params.stand_in_sampled:
            identity["stand_in_sampled"] = True
    return identity


def _run_inputs(params: TrainParams) -> list[Path]:
    train_file = resolve_train_file(params.dataset, params.output_dir)
    return [train_file, Path(params.train_config(train_file, Path(".")).init_checkpoint)]


def _run_folder(output_dir: str | os.PathLike, key: str) -> Path:
    return Path(output_dir) / MODELS_DIR / key


def _point_latest(run_dir: Path) -> None:
    write_text(f"{run_dir.name}/model\n", run_dir.parent / LATEST)


def run_dir_for(params: TrainParams) -> Path:
    """``<output_dir>/models/<key>``: the folder of the run these parameters make."""
    return train_model.output_dir(config=params)


def torchrun_command(params: TrainParams, config_file: Path) -> list[str]:
    """The trainer's command: under torchrun, or, for one process on one node, the trainer alone
    (torchrun's agent would only add its own start-up, about 2 s, to a run that needs no rendezvous)."""
    trainer = ["-m", "gear_model.train", "--config", str(config_file)]
    if params.world_size == 1:
        return [sys.executable, *trainer]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={params.nproc_per_node}"]
    if params.nnodes > 1:
        if not params.rdzv_endpoint:
            raise ConfigError("a multi-node run needs rdzv_endpoint (host:port)")
        cmd += [f"--nnodes={params.nnodes}", f"--node_rank={params.node_rank}", "--rdzv_backend=c10d",
                f"--rdzv_endpoint={params.rdzv_endpoint}", "--rdzv_id=gear-train"]
    else:
        cmd += ["--standalone", "--nnodes=1"]
    return cmd + trainer


class MetricsTail:
    """Reads the JSON lines a trainer appends to its metrics file, as they come."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.is_file() else 0
        self.partial = ""

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with self.path.open() as fh:
            fh.seek(self.offset)
            chunk = fh.read()
            self.offset = fh.tell()
        text = self.partial + chunk
        lines = text.split("\n")
        self.partial = lines.pop()  # an unfinished last line waits for the next read
        return [json.loads(line) for line in lines if line.strip()]


# Callbacks of the running trainer: set by run_training (tests, CLI), else the
# stage logs to Prefect's run logger and shows a progress bar.
_CALLBACKS: contextvars.ContextVar[tuple[Callable[[str], None], Callable[[dict[str, Any]], None] | None, dict[str, str]] | None] = \
    contextvars.ContextVar("train_callbacks", default=None)


def run_training(
    params: TrainParams,
    on_log: Callable[[str], None] = print,
    on_metrics: Callable[[dict[str, Any]], None] | None = None,
    env: dict[str, str] | None = None,
) -> Path:
    """Train (or resume, or reuse) the run of ``params``; returns its model folder."""
    run_dir = run_dir_for(params)
    if is_complete(run_dir):
        on_log(f"reusing finished run {run_dir}")
    token = _CALLBACKS.set((on_log, on_metrics, env or {}))
    try:
        return train_model(config=params) / "model"
    finally:
        _CALLBACKS.reset(token)


def _default_callbacks() -> tuple[Callable[[str], None], Callable[[dict[str, Any]], None], dict[str, str]]:
    on_log = print
    if in_prefect_run(task_only=True):
        from prefect.logging import get_run_logger

        on_log = get_run_logger().info
    progress = ProgressArtifact("train-gear: optimizer steps done (%)")

    def on_metrics(record: dict[str, Any]) -> None:
        if record.get("event") == "step":
            progress.update(record["step"], max(1, record["total_steps"]),
                            f"step {record['step']}/{record['total_steps']} loss {record['loss']:.4f} "
                            f"{record['samples_per_s']:.1f} samples/s eta {record['eta_s']:.0f}s")

    return on_log, on_metrics, {}


def _die_with_parent() -> None:
    """In the torchrun child: its own process group (so a cancel can stop the
    whole tree), and SIGTERM when the flow's process dies, even by SIGKILL."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@stage(STAGE, TrainParams, key=_run_identity, key_files=_run_inputs, folder=_run_folder,
       work_dir_from=lambda params: params.output_dir, in_place=True,
       publish=_point_latest, code=sorted(_GEAR_MODEL.glob("*.py")),
       retries=2, retry_delay_seconds=10)  # a lost node or a GPU out of memory: a retry resumes from the checkpoint
def train_model(run: StageRun, params: TrainParams) -> dict:
    """A GeAR run under torchrun in ``<output_dir>/models/<key>``: resumed from
    its latest checkpoint when one is there (so a task retry resumes too)."""
    on_log, on_metrics, env = _CALLBACKS.get() or _default_callbacks()
    run_dir = run.out
    train_file = resolve_train_file(params.dataset, params.output_dir)
    model_dir = run_dir / "model"
    triples_file = None
    if params.stand_in_query_words:
        from tasks.stand_in import write_training_triples

        triples_file = run_dir / STAND_IN_TRIPLES
        if not triples_file.is_file():
            counts = write_training_triples(train_file, params.stand_in_query_words, triples_file,
                                            keep_dataset=not params.stand_in_only, sampled=params.stand_in_sampled)
            on_log(f"stand-in units: {counts['stand_in_triples']} from {counts['documents']} training documents"
                   + (" (without the dataset's triples)" if params.stand_in_only else
                      f", after the dataset's {counts['dataset_triples']} triples") + f" ({triples_file.name})")
    config = params.train_config(train_file, run_dir, triples_file)
    config_file = run_dir / "train_config.json"
    config.save(config_file)

    global_batch = config.batch_size * params.world_size
    if config.queue_size % global_batch:
        raise ConfigError(f"queue_size {config.queue_size} is not divisible by the global batch {global_batch}")

    built = dataset_doc_tokens(train_file)
    if built is not None and config.max_doc_length < built + 2:
        on_log(
            f"documents were built up to {built} tokens but training reads {config.max_doc_length}: "
            "documents are windowed around their unit (counted as length_fit in the summary)"
        )
    cmd = torchrun_command(params, config_file)
    on_log("launching: " + " ".join(cmd))
    tail = MetricsTail(run_dir / "metrics.jsonl")
    last_lines: deque[str] = deque(maxlen=40)
    proc_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **env}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env=proc_env, cwd=str(Path(__file__).resolve().parent.parent), preexec_fn=_die_with_parent,
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if not line or line.startswith("Loading weights"):
                continue
            last_lines.append(line)
            on_log(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    records: list[dict[str, Any]] = []
    try:
        while True:
            finished = proc.poll() is not None
            for record in tail.read():
                records.append(record)
                if on_metrics is not None:
                    on_metrics(record)
            if finished:
                break
            time.sleep(0.5)
    except BaseException:
        _stop(proc)  # a cancelled task must not leave trainers running
        raise
    reader.join(timeout=10)
    if proc.returncode != 0:
        _raise_trainer_error(records, train_file)
        # Anything else (a lost node, CUDA out of memory, a killed process) may pass on a retry, which resumes.
        raise RuntimeError(f"training failed (exit {proc.returncode}); last lines:\n" + "\n".join(last_lines))
    if params.node_rank > 0:
        return {}  # rank 0's node writes the model
    done = [r for r in records if r.get("event") == "done"]
    if not (model_dir / "config.json").is_file() or not done:
        raise RuntimeError(f"training exited without writing {model_dir}; last lines:\n" + "\n".join(last_lines))
    steps = [r for r in records if r.get("event") == "step"]
    start = next((r for r in records if r.get("event") == "start"), None)
    evals = [r for r in records if r.get("event") == "eval"]
    run.info.update(model_dir=str(model_dir), steps=done[-1]["step"])
    return {"summary.json": summarise(steps, done[-1], start, evals)}


class TrainingDataError(PipelineInputError):
    """The trainer refused the dataset (gear_model.data.TrainingDataError): not retried."""


def _raise_trainer_error(records: list[dict[str, Any]], train_file: Path) -> None:
    """The trainer's own account of a failure that another attempt would repeat
    (its ``error`` event: bad triples or bad settings), raised as a final error."""
    error = next((r for r in reversed(records) if r.get("event") == "error"), None)
    if error is None:
        return
    if error.get("kind") == "data":
        message = error.get("message") or "the trainer refused the triples"
        raise TrainingDataError(train_file, message.removeprefix(f"{train_file}: "))
    raise ConfigError(error.get("message", "the trainer refused its config"))


def summarise(steps: list[dict[str, Any]], done: dict[str, Any], start: dict[str, Any] | None = None,
              evals: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    if not steps:
        return {"steps": done.get("step", 0), "length_fit": (start or {}).get("length_fit")}
    rates = [s["samples_per_s"] for s in steps[1:]] or [steps[0]["samples_per_s"]]
    return {
        "steps": done["step"],
        "length_fit": (start or {}).get("length_fit"),
        "first_loss": steps[0]["loss"],
        "final_loss": steps[-1]["loss"],
        "final_itc": steps[-1]["itc"],
        "final_lm": steps[-1]["lm"],
        "mean_samples_per_s": sum(rates) / len(rates),
        "precision": (start or {}).get("precision"),
        "elapsed_s": done.get("elapsed_s"),
        **({"final_heldout_recall@3": evals[-1]["localization"]["recall@3"],
            "heldout_random_recall@3": evals[-1]["localization"]["random_recall@3"]} if evals else {}),
    }


def read_metrics(model_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(model_dir).parent / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


train_model_task = train_model.task
