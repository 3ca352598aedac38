"""The flows' parameter models and how a run's parameters are resolved.

``BuildDatasetParams`` (build-rir-dataset) and ``PipelineParams``
(rir-pipeline) live here; train-gear's ``TrainParams`` and evaluate-gear's
``EvalParams`` live beside their stages. Each is the Prefect form of its flow,
with the paper's figures as defaults.

``resolve_params`` is what the `gear` CLI does before it runs a flow, and
what a test can call without running one. Layers, lowest first:

    model defaults < profile < config file (YAML) < --set items < dedicated flags

A config file and the ``--set`` keys use the form's shape: nested mappings,
or dotted keys (``relevance.threshold``). An unknown key is an error naming
it; a value the model refuses is one line per field
(``relevance.threshold: must be ≤ 1 (got 1.5)``), raised as ``ParamsError``.
"""

from __future__ import annotations

import difflib
import glob
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from flows.profiles import fill, overrides
from gear_model.config import CrossAttentionInit, LocLayers
from tasks.assets import embedded_dump_path
from tasks.dedup import DedupConfig
from tasks.evaluate import EvalParams
from tasks.extract_docs import ExtractConfig
from tasks.params_model import PROFILE_KEY_HINT, ParamsModel
from tasks.relevance import RelevanceConfig
from tasks.rewrite import RewriteConfig
from tasks.runners import TaskRunnerConfig
from tasks.select_units import UnitConfig
from tasks.shard import ShardConfig
from tasks.train import TrainParams
from tasks.write_triples import TriplesConfig


StageUntil = Literal["extract_docs", "select_units", "rewrite_queries", "dedup", "relevance_filter"]
STAGES_UNTIL: tuple[str, ...] = typing.get_args(StageUntil)
_DUMP_SUFFIXES = (".xml", ".xml.bz2", ".bz2")


def newest_dump(pattern: str) -> Path:
    """A dump file itself; else the newest match of a glob or the newest dump
    in a folder, newest by name (enwiki-YYYYMMDD-... sorts by date), index
    files left out."""
    path = Path(pattern)
    if path.is_file():
        return path
    if path.is_dir():
        candidates = [p for p in path.iterdir() if p.is_file() and p.name.endswith(_DUMP_SUFFIXES)]
    else:
        candidates = [Path(p) for p in glob.glob(pattern) if Path(p).is_file()]
    candidates = [p for p in candidates if "-index" not in p.name]
    if not candidates:
        raise ValueError(f"dump file not found: {pattern} (no such file, and no dump in a folder or glob of that name)")
    return max(candidates, key=lambda p: p.name)


class BuildDatasetParams(ParamsModel):
    """Everything `build-rir-dataset` needs; the paper's figures are the defaults."""

    # How and how far it runs, not what the dataset is: out of its version and lineage.
    operational_fields: ClassVar[frozenset[str]] = frozenset({"runner", "until", "only_new_dump"})

    dump: str | None = Field(
        None,
        title="Wikipedia dump",
        description="A MediaWiki XML dump (.xml, .xml.bz2, or a -multistream .bz2 with its index beside it), "
        "or a folder or glob where new dumps land (e.g. dumps/enwiki-*-pages-articles-multistream.xml.bz2): "
        "the newest match by name is used. Empty: the 106-article enwiki excerpt shipped in the gensim package.",
    )
    output_dir: str = Field(
        "data",
        title="Output folder",
        description="Stage outputs go to <output_dir>/stages, the dataset to <output_dir>/datasets/<version>.",
    )
    shard: ShardConfig = Field(ShardConfig(), title="Sharding", description="How the dump is cut into shards (one Prefect task each).")
    extract: ExtractConfig = Field(ExtractConfig(), title="Wikitext extraction", description="Which pages are kept and how wikitext becomes plain prose.")
    units: UnitConfig = Field(UnitConfig(), title="Documents and candidate units (paper, Appendix A)", description="The paper's document and candidate-sentence rules (Appendix A) with its figures as defaults.")
    rewrite: RewriteConfig = Field(RewriteConfig(), title="Query rewriting (LLM)", description="The LLM that rewrites sampled units into keyword queries, its prompt and the quality gate.")
    dedup: DedupConfig = Field(DedupConfig(), title="De-duplication", description="Keyword de-duplication and reordering, duplicate queries, near-duplicate documents.")
    relevance: RelevanceConfig = Field(RelevanceConfig(), title="Relevance filter (BGE similarity)", description="The embedding model and threshold of the query-document relevance filter.")
    triples: TriplesConfig = Field(TriplesConfig(), title="Train/test split", description="The document-level train/test split and the dataset card.")
    runner: TaskRunnerConfig = Field(
        TaskRunnerConfig(), title="Task runner",
        description="Where extraction, unit selection and rewriting run: threads, processes, a Dask or a Ray cluster.")
    until: StageUntil | None = Field(
        None, title="Stop after stage",
        description="Stop after this stage and return its folders (inspect candidates before paying for LLM time). "
        "Empty: build and publish the dataset.")
    only_new_dump: bool = Field(
        False, title="Only a new dump",
        description="When the dump's content fingerprint equals the one the latest published dataset was built "
        "from, record 'no new dump' and end without work (the scheduled refresh).")

    @field_validator("dump")
    @classmethod
    def _dump_exists(cls, value: str | None) -> str | None:
        if value:
            newest_dump(value)  # a missing file or an empty folder/glob is refused at once
        return value or None

    def dump_path(self) -> str:
        return str(newest_dump(self.dump)) if self.dump else str(embedded_dump_path())


# Where the pipeline's evaluation writes by default: the report under the
# build's output folder, the per-model cache beside the other stages. Also
# filled in when the input gives `evaluate` only in part (pydantic would take
# EvalParams' own defaults for the rest, not this field's).
_PIPELINE_EVALUATE = {"output_dir": "data/eval", "work_dir": "data"}


class LocalisationRun(ParamsModel):
    """What the "GeAR + L_loc + copy (not in the paper)" run changes in the pipeline's
    training: the localisation loss, a decoder that copies from the query, the
    fusion cross-attention's init and learning rate, and stand-in units
    (tasks/stand_in.py). Its own step-0
    evaluation reads what training added to that init."""

    loc_weight: float = Field(
        0.0, ge=0.0, le=100.0,
        description="Weight of L_loc (train.loc_weight) in this run; 0: no run.")
    loc_layers: LocLayers = Field(
        "all", description="Where L_loc reads the attention: every fusion layer (their mean), or the localisation "
        "layer only.")
    copy_from_query: bool = Field(
        True, description="A decoder that can copy the query's words (pointer-generator head, not in the paper): "
        "a query rewrites its unit, and a decoder trained on a few hundred units rarely learns their rare words.")
    cross_attention_init: CrossAttentionInit = Field(
        "random", description="Fusion cross-attention init of this run (random: the paper's, so its localisation "
        "starts at chance and all of it is learned).")
    new_module_lr_mult: float = Field(
        30.0, gt=0, le=1000, description="Learning rate of the fresh fusion cross-attention as a multiple of train.lr.")
    epochs: int = Field(4, ge=1, le=1000, description="Epochs of this run.")
    stand_in_query_words: int = Field(
        8, ge=0, le=64,
        description="Stand-in units: every rule-passing sentence of a training document, queried by N of its "
        "content words (0: none).")
    stand_in_sampled: bool = Field(
        True, description="Draw a stand-in query's words from the whole sentence in a shuffled order; off: its first "
        "N words in order, which a copying decoder learns to echo in order (docs/LEARNING_CURVE.md).")
    stand_in_only: bool = Field(
        True, description="Train on the stand-ins alone; off: after the dataset's triples, whose few units per "
        "document L_loc memorises (docs/LEARNING_CURVE.md, section 5).")

    def training(self, train: TrainParams) -> TrainParams:
        """The pipeline's training with this run's changes."""
        return train.model_copy(update=self.model_dump())


class PipelineParams(ParamsModel):
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
    localisation_run: LocalisationRun = Field(
        LocalisationRun(),
        title="GeAR + L_loc + copy (not in the paper)",
        description="An optional second GeAR run: the training above with the localisation loss L_loc and a decoder "
        "that copies from the query, reported as its own row beside the paper-recipe GeAR. Off while its loc_weight "
        "is 0.",
    )
    evaluate: EvalParams = Field(
        EvalParams(**_PIPELINE_EVALUATE),
        title="Evaluation",
        description="Parameters of evaluate-gear; models and dataset are filled in. The report goes to "
        "<output_dir>/eval, its per-model cache beside the other stages (work_dir: the build's output_dir).",
    )

    @model_validator(mode="before")
    @classmethod
    def _evaluate_beside_the_build(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("evaluate"), dict):
            data = {**data, "evaluate": fill(data["evaluate"], _PIPELINE_EVALUATE)}
        return data

    @field_validator("build")
    @classmethod
    def _builds_a_dataset(cls, build: BuildDatasetParams) -> BuildDatasetParams:
        if build.until or build.only_new_dump:
            raise ValueError("the pipeline trains on the dataset it builds: leave until and only_new_dump empty "
                             "(run build-rir-dataset for those)")
        return build


# --------------------------------------------------------------------------
# Resolution (the CLI's --profile, --config, --set and flags).


# The flow each parameter model is the form of (profiles are per flow).
FLOWS: dict[type[BaseModel], str] = {BuildDatasetParams: "build-rir-dataset", TrainParams: "train-gear",
                                     EvalParams: "evaluate-gear", PipelineParams: "rir-pipeline"}


class ParamsError(ValueError):
    """Parameters that cannot make a run; ``lines`` is one reason per field or key."""

    def __init__(self, lines: Iterable[str]):
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


def resolve_params(
    model_cls: type[BaseModel],
    profile: str | None = None,
    config_file: str | Path | None = None,
    sets: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> BaseModel:
    """``model_cls`` from the layers: its defaults < ``profile`` (flows/profiles.py) < ``config_file`` (YAML
    in the model's shape) < ``sets`` ("dotted.key=value", the value read as YAML)
    < ``flags`` (dotted key -> value, only the flags that were given)."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if config_file is not None:
        layers.append((str(config_file), read_config(config_file)))
    for item in sets:
        layers.append((f"--set {item}", nest(*parse_set(item))))
    for key, value in (flags or {}).items():
        layers.append((f"option {key}", nest(key, value)))
    problems = [f"{source}: {line}" for source, layer in layers for line in unknown_keys(model_cls, layer)]
    if problems:
        raise ParamsError(problems)
    data: dict[str, Any] = {}
    for _, layer in layers:
        data = fill(layer, data)  # a later layer wins
    if profile:
        try:
            data = fill(data, overrides(profile, FLOWS[model_cls]))  # the profile fills what is still missing
        except ValueError as exc:
            raise ParamsError([f"--profile {profile}: {exc}"]) from None
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        raise ParamsError(format_errors(exc, model_cls)) from None


def read_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ParamsError([f"{path}: cannot read ({exc.strerror or exc})"]) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ParamsError([f"{path}: not valid YAML{at}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError([f"{path}: must be a mapping of parameter names to values, not {type(data).__name__}"])
    return data


def parse_set(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)``; the value is a YAML scalar, list or mapping (JSON works)."""
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ParamsError([f"--set {item}: expected KEY=VALUE, e.g. relevance.threshold=0.35"])
    try:
        return key, yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise ParamsError([f"--set {item}: the value is not a YAML/JSON value"]) from None


def nest(dotted: str, value: Any) -> dict[str, Any]:
    """``nest("a.b", 1) == {"a": {"b": 1}}``."""
    *parents, last = dotted.split(".")
    out: dict[str, Any] = {last: value}
    for part in reversed(parents):
        out = {part: out}
    return out


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The parameter model a field holds (``Model`` or ``Model | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    return found[0] if len(found) == 1 else None


def unknown_keys(model_cls: type[BaseModel], data: Mapping[str, Any], prefix: str = "") -> list[str]:
    """One line per key of ``data`` that is not a field of ``model_cls`` (nested models walked)."""
    lines = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        field = model_cls.model_fields.get(key) if isinstance(key, str) else None
        if field is None and key == "profile":
            lines.append(f"unknown parameter {path!r} ({PROFILE_KEY_HINT})")
            continue
        if field is None:
            close = difflib.get_close_matches(str(key), list(model_cls.model_fields), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            where = f"{prefix[:-1]} has no such field" if prefix else f"not a parameter of {model_cls.__name__}"
            lines.append(f"unknown parameter {path!r} ({where}{hint})")
            continue
        sub = _submodel(field.annotation)
        if sub is not None and isinstance(value, Mapping):
            lines += unknown_keys(sub, value, prefix=f"{path}.")
    return lines


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _message(error: Mapping[str, Any]) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    bounds = {"greater_than_equal": ("≥", "ge"), "greater_than": (">", "gt"),
              "less_than_equal": ("≤", "le"), "less_than": ("<", "lt")}
    if kind in bounds:
        sign, name = bounds[kind]
        return f"must be {sign} {_number(ctx[name])}"
    simple = {
        "int_parsing": "must be an integer", "int_type": "must be an integer", "int_from_float": "must be an integer",
        "float_parsing": "must be a number", "float_type": "must be a number",
        "bool_parsing": "must be true or false", "bool_type": "must be true or false",
        "string_type": "must be a string", "list_type": "must be a list", "missing": "is required",
        "model_type": "must be a mapping", "dict_type": "must be a mapping", "model_attributes_type": "must be a mapping",
        "extra_forbidden": "is not a parameter",
    }
    if kind in simple:
        return simple[kind]
    if kind == "literal_error":
        return f"must be {ctx.get('expected', 'one of the listed values')}"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    msg = str(error.get("msg", kind))
    return msg[:1].lower() + msg[1:]


def _path(loc: tuple, model_cls: type[BaseModel]) -> str:
    """The dotted field path of a pydantic error location, without union-member tags."""
    parts, current = [], model_cls
    for item in loc:
        if isinstance(item, int):
            parts.append(str(item))
        elif current is not None and item in current.model_fields:
            parts.append(item)
            current = _submodel(current.model_fields[item].annotation)
        # anything else names a member of a union (``int``, ``bool``): not part of the path
    return ".".join(parts) or "parameters"


def format_errors(exc: ValidationError, model_cls: type[BaseModel]) -> list[str]:
    """One line per field: ``path: reason (got value)``; several reasons of a field joined by ' or '."""
    by_path: dict[str, list[str]] = {}
    got: dict[str, Any] = {}
    for error in exc.errors():
        loc = tuple(error["loc"])
        path = _path(loc, model_cls)
        if error["type"] == "extra_forbidden":  # the key is no field, so _path cannot name it
            path = f"{_path(loc[:-1], model_cls)}.{loc[-1]}" if len(loc) > 1 else str(loc[-1])
        message = _message(error)
        if message not in by_path.setdefault(path, []):
            by_path[path].append(message)
        if error["type"] != "missing" and not isinstance(error.get("input"), (dict, list)):
            got.setdefault(path, error.get("input"))
    return [f"{path}: {' or '.join(messages)}" + (f" (got {got[path]!r})" if path in got else "")
            for path, messages in by_path.items()]


def dump_yaml(params: BaseModel) -> str:
    """The parameters as a --config file (every field, the form's shape)."""
    return yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


__all__ = ["FLOWS", "BuildDatasetParams", "ParamsError", "PipelineParams", "dump_yaml", "format_errors", "nest", "parse_set",
           "read_config", "resolve_params", "unknown_keys"]
