"""Parameters of the evaluate-gear flow (the Prefect UI form) and the list
of systems (table rows) they describe."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from gear_model.decoding import DEFAULT_NO_REPEAT_NGRAM, DEFAULT_NUM_BEAMS
from tasks.contracts import STAND_IN_TRIPLES
from tasks.evaluate.metrics import DEFAULT_KS
from tasks.evaluate.stats import BOOTSTRAP_RESAMPLES
from tasks.params_model import ParamsModel

SystemKind = Literal["gear", "encoder", "bm25"]


log = logging.getLogger(__name__)


def resolve_model_dir(path: str, contrastive: bool = False) -> str:
    """A model dir, or a train-gear models/ folder: its newest GeAR run (``contrastive``:
    its newest lm_weight-0 run; ``latest_models``), else the run its LATEST names."""
    latest = Path(path) / "LATEST"
    if not (Path(path) / "config.json").is_file() and latest.is_file():
        found = latest_models(path)[1 if contrastive else 0]
        return found or str(Path(path) / latest.read_text().strip())
    return path


def _model_facts(model_dir: Path) -> tuple[float, str | None] | None:
    """(lm_weight, training dataset) of a GeAR model folder; None when its config.json is unreadable.
    A config without lm_weight counts as a GeAR run (the trainer's default weight is 1)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
        weight = float((config.get("gear") or {}).get("lm_weight", 1.0))
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("skipping model %s: unreadable config.json (%s)", model_dir, exc)
        return None
    dataset = None
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        train_config = json.loads((model_dir.parent / "train_config.json").read_text())
        dataset = train_config.get("dataset")
        if dataset and Path(dataset).name == STAND_IN_TRIPLES and train_config.get("eval_file"):
            # Stand-in units are written into the run's folder; their dataset is the held-out split's.
            dataset = str(Path(train_config["eval_file"]).with_name("train.parquet"))
    return weight, dataset


LOC_ROW = "GeAR + L_loc (not in the paper)"


def _saved_gear_config(model_dir: str | os.PathLike) -> dict:
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        return json.loads((Path(model_dir) / "config.json").read_text()).get("gear") or {}
    return {}


def _loc_weight(gear_config: dict) -> float:
    with contextlib.suppress(ValueError, TypeError):
        return float(gear_config.get("loc_weight", 0.0))
    return 0.0


def saved_loc_weight(model_dir: str | os.PathLike) -> float:
    """The optional localisation loss weight a GeAR model was trained with (0: the paper's losses)."""
    return _loc_weight(_saved_gear_config(model_dir))


def not_in_paper(model_dir: str | os.PathLike) -> list[str]:
    """What a saved GeAR model adds to the paper's recipe: "L_loc" (the
    localisation loss) and "copy" (a decoder that copies from the query)."""
    config = _saved_gear_config(model_dir)
    return (["L_loc"] if _loc_weight(config) > 0 else []) + (["copy"] if config.get("copy_from_query") else [])


def gear_row_name(model_dir: str | os.PathLike) -> str:
    """"GeAR" for the paper's recipe, else what it adds: "GeAR + L_loc (not in the paper)" (``LOC_ROW``),
    "GeAR + L_loc + copy (not in the paper)", "GeAR + copy (not in the paper)"."""
    extras = not_in_paper(model_dir)
    return "GeAR" if not extras else f"GeAR + {' + '.join(extras)} (not in the paper)"


def gear_row_names(model_dirs: list[str]) -> list[str]:
    """Row labels (``gear_row_name``); the run folder's name is added where two rows would share a label."""
    names = [gear_row_name(d) for d in model_dirs]
    return [f"{n} ({Path(d).parent.name if Path(d).name == 'model' else Path(d).name})" if names.count(n) > 1 else n
            for n, d in zip(names, model_dirs, strict=True)]


def latest_models(models_dir: str | os.PathLike) -> tuple[str | None, str | None]:
    """The model folders to evaluate from a train-gear models/ folder: (the newest GeAR
    run with lm_weight > 0, the newest contrastive-only run with lm_weight 0), each
    None when there is none.

    A run is ``<models_dir>/<key>/model`` with a config.json. The run LATEST names is
    the newest of its kind (train-gear moves LATEST on every run, cache hits too; a
    pipeline run trains the baseline last, so LATEST names it). Other runs count only
    when finished (their ``_SUCCESS.json``, whose time orders them), so a training
    still running or killed is never picked. The contrastive run trained on the GeAR
    run's dataset is preferred to a newer one trained on another.
    """
    from tasks.common import SUCCESS_MARKER

    root = Path(models_dir)
    if not root.is_dir():
        return None, None
    latest_file = root / "LATEST"
    named = latest_file.read_text().strip() if latest_file.is_file() else ""
    runs: list[tuple[bool, float, Path, float, str | None]] = []
    for run in root.iterdir():
        model = run / "model"
        if not run.is_dir() or not (model / "config.json").is_file():
            continue
        is_latest = named in (f"{run.name}/model", run.name)
        marker = run / SUCCESS_MARKER
        if not is_latest and not marker.is_file():
            continue  # unfinished
        facts = _model_facts(model)
        if facts is None:
            continue
        when = (marker if marker.is_file() else model / "config.json").stat().st_mtime
        runs.append((is_latest, when, model, *facts))
    runs.sort(key=lambda r: (r[0], r[1], r[2].parent.name), reverse=True)
    # The paper-recipe row prefers a run with nothing the paper does not have.
    gear = next((r for r in runs if r[3] > 0 and not not_in_paper(r[2])), None) or next(
        (r for r in runs if r[3] > 0), None)
    contrastive = [r for r in runs if r[3] == 0 and not not_in_paper(r[2])]
    if gear is not None and gear[4] is not None:
        same = [r for r in contrastive if r[4] == gear[4]]
        contrastive = same or contrastive
    return (str(gear[2]) if gear else None), (str(contrastive[0][2]) if contrastive else None)


def latest_loc_model(models_dir: str | os.PathLike, gear: str | None) -> str | None:
    """The newest finished GeAR + L_loc run under ``models_dir`` other than ``gear``,
    preferring one trained on ``gear``'s dataset; None when there is none."""
    from tasks.common import SUCCESS_MARKER

    root = Path(models_dir)
    if not root.is_dir():
        return None
    found = []
    for run in root.iterdir():
        model = run / "model"
        if (run / SUCCESS_MARKER).is_file() and str(model) != gear and saved_loc_weight(model) > 0:
            facts = _model_facts(model)
            if facts is not None and facts[0] > 0:
                found.append((facts[1], (run / SUCCESS_MARKER).stat().st_mtime, str(model)))
    if not found:
        return None
    dataset = _model_facts(Path(gear))[1] if gear and _model_facts(Path(gear)) else None
    found.sort(key=lambda r: (r[0] == dataset, r[1]), reverse=True)
    return found[0][2]


class SystemSpec(BaseModel):
    """One row of the tables: a model or baseline and what it is asked to do."""

    name: str = Field(description="Row label in the report.")
    kind: SystemKind = Field(description="gear: a GeAR model dir; encoder: a pre-trained encoder; bm25: BM25.")
    path: str | None = Field(None, description="Model directory (gear, encoder).")
    pooling: Literal["mean", "cls"] = Field("mean", description="Encoder pooling (encoder only).")
    backend: Literal["transformers", "flagembedding"] = Field("transformers", description="Encoder backend.")
    query_instruction: str = Field("", description="Prefix for queries (BGE: its retrieval instruction).")
    generation: bool = Field(False, description="Run information generation (GeAR only).")
    figure: bool = Field(False, description="Collect the Figure 3 attention example from this model.")


class EvalParams(ParamsModel):
    """Evaluate GeAR models beside baselines on the RIR test split and external sets
    (paper section 4, Tables 1-3); writes report.md, report.json and report.html."""

    model_dirs: list[str] = Field(
        [], description="GeAR model directories to evaluate (one table row each), or a train-gear models/ folder (its LATEST run)."
    )
    contrastive_model_dir: str | None = Field(
        None, description="Optional GeAR model trained with lm_weight 0 (the paper's 'GeAR w/o L_LM' row)."
    )
    dataset: str | None = Field(
        None,
        description="Labelled set: a built dataset (its output folder, datasets/ folder or version folder), or a "
        "Parquet/JSONL file, or a folder of test (and train) files, with query, document and unit columns.",
    )
    dataset_name: str | None = Field(
        None, description="The set's name in the tables; empty = RIR for a built dataset, else the file or folder name."
    )
    squad_json: list[str] = Field([], description="SQuAD-format JSON files (QA sets: EM/F1).")
    beir_dirs: list[str] = Field(
        [], description="BEIR folders (corpus.jsonl, queries.jsonl, qrels/test.tsv): retrieval only."
    )
    output_dir: str = Field("data/eval", description="Where report.md, report.json and report.html are written.")
    work_dir: str | None = Field(
        None, description="Folder for cached per-model results (stages/evaluate/<key>); default output_dir."
    )
    ks: list[int] = Field(list(DEFAULT_KS), description="Cut-offs k for Recall@k and MAP@k.")
    layer: int | None = Field(
        None, ge=1, le=48, description="1-based fusion layer for localisation (paper: 10 of 12); empty = the model's default (n_layers - 2)."
    )
    localization_pooling: Literal["sum", "mean"] = Field(
        "mean",
        description="How a sentence pools its tokens' cross-attention weights: sum (the attention mass on the "
        "sentence) or mean (mass per token). Candidate units are short (8-20 tokens), so a sum favours "
        "the long sentences around them; mean does not.",
    )
    all_layers: bool = Field(False, description="Also report localisation at every fusion layer (to pick the best).")
    baselines: bool = Field(True, description="Add the pre-trained encoder and BM25 rows.")
    baseline_encoder: str | None = Field(
        None, description="Pre-trained encoder directory; empty = the embedded all-MiniLM-L6-v2 (production: a BGE dir)."
    )
    baseline_pooling: Literal["mean", "cls"] = Field("mean", description="Baseline pooling (MiniLM: mean; BGE: cls).")
    baseline_backend: Literal["transformers", "flagembedding"] = Field(
        "transformers", description="Baseline backend (BGE: flagembedding)."
    )
    baseline_query_instruction: str = Field("", description="Query prefix for the baseline (BGE's retrieval instruction).")
    max_test_queries: int | None = Field(
        10_000, ge=1, description="Seeded sample of test queries per set for retrieval and localisation (paper: 10k); empty = all."
    )
    max_generation_queries: int | None = Field(
        500, ge=1, description="Seeded sample of those queries for generation (slowest part); empty = all."
    )
    generation_max_tokens: int = Field(64, ge=1, le=512, description="Decoding budget per generated unit (it stops at the end of the sentence).")
    generation_num_beams: int = Field(DEFAULT_NUM_BEAMS, ge=1, le=16, description="Beams of the decoding search (BLIP: 3; 1 is greedy).")
    generation_no_repeat_ngram_size: int = Field(
        DEFAULT_NO_REPEAT_NGRAM, ge=0, le=10, description="No n-gram of this size is generated twice (0: off)."
    )
    index_type: Literal["exact", "hnsw"] = Field(
        "exact", description="FAISS index: exact (IndexFlatIP) or hnsw (approximate, for large corpora)."
    )
    batch_size: int = Field(32, ge=1, le=4096, description="Encoding batch size.")
    seed: int = Field(0, description="Seed of the query samples and of the bootstrap intervals.")
    bootstrap_resamples: int = Field(
        BOOTSTRAP_RESAMPLES, ge=100, le=100_000,
        description="Resamples of the test queries behind each 95% interval (percentile bootstrap).",
    )

    @field_validator("ks")
    @classmethod
    def _ks(cls, ks: list[int]) -> list[int]:
        if not ks or any(k < 1 for k in ks):
            raise ValueError("ks must be positive cut-offs")
        return sorted(set(ks))

    @classmethod
    def for_cli(cls, model: Path | None, dataset: Path | None, output_dir: Path, **overrides) -> EvalParams:
        """``gear evaluate``: the model defaults to OUTPUT_DIR/models/LATEST (train-gear's
        newest run), the dataset to the newest under OUTPUT_DIR; the report goes to OUTPUT_DIR."""
        from tasks.common import PipelineInputError

        output_dir = Path(output_dir)
        if model is None:
            latest = output_dir / "models" / "LATEST"
            if not latest.is_file():
                raise PipelineInputError(latest, "no --model given and no trained model recorded here")
            model = output_dir / "models" / latest.read_text().strip()
        return cls(
            model_dirs=[str(model)], dataset=str(dataset or output_dir), output_dir=str(output_dir), **overrides
        )

    @property
    def cache_dir(self) -> Path:
        return Path(self.work_dir or self.output_dir)

    @property
    def models_dir(self) -> Path:
        """train-gear's models/ folder, searched when no model is named: ``<work_dir or output_dir>/models``."""
        return self.cache_dir / "models"

    def with_latest_models(self) -> EvalParams:
        """These parameters, or, when they name no GeAR model (``model_dirs`` and
        ``contrastive_model_dir`` empty), with the newest runs under ``models_dir`` filled
        in (``latest_models``): what the ``evaluate`` deployment evaluates."""
        if self.model_dirs or self.contrastive_model_dir:
            return self
        gear, contrastive = latest_models(self.models_dir)
        if gear is None and contrastive is None:
            log.warning("no trained GeAR model under %s (no LATEST or finished run): evaluating the baselines only",
                        self.models_dir)
            return self
        log.info("evaluating the newest trained models under %s: GeAR %s, contrastive-only %s",
                 self.models_dir, gear or "none", contrastive or "none")
        model_dirs = [gear] if gear else []
        loc = latest_loc_model(self.models_dir, gear)
        if loc:
            model_dirs.append(loc)
        return self.model_copy(update={"model_dirs": model_dirs, "contrastive_model_dir": contrastive})

    def systems(self) -> list[SystemSpec]:
        """Table rows in the paper's order: baselines, then GeAR variants. With no model
        named, the newest under ``models_dir`` (``with_latest_models``)."""
        from tasks.assets import embedded_encoder_path

        params = self.with_latest_models()
        rows: list[SystemSpec] = []
        if self.baselines:
            rows.append(SystemSpec(name="BM25", kind="bm25"))
            path = self.baseline_encoder or str(embedded_encoder_path())
            rows.append(
                SystemSpec(
                    name=f"{Path(path).name} (pre-trained)" if self.baseline_encoder else "MiniLM-L6 (pre-trained)",
                    kind="encoder",
                    path=path,
                    pooling=self.baseline_pooling,
                    backend=self.baseline_backend,
                    query_instruction=self.baseline_query_instruction,
                )
            )
        if params.contrastive_model_dir:
            rows.append(SystemSpec(name="GeAR w/o L_LM", kind="gear",
                                   path=resolve_model_dir(params.contrastive_model_dir, contrastive=True)))
        model_dirs = [resolve_model_dir(d) for d in params.model_dirs]
        for i, (model_dir, name) in enumerate(zip(model_dirs, gear_row_names(model_dirs), strict=True)):
            rows.append(SystemSpec(name=name, kind="gear", path=model_dir, generation=True, figure=i == 0))
        if not rows:
            raise ValueError("nothing to evaluate: give model_dirs or turn baselines on")
        return rows

    def set_config(self) -> dict:
        """What the per-system results depend on besides the system and the input files:
        every field but those in NOT_IN_RESULTS_KEY, so a new setting is in the key unless
        someone decides it is not."""
        return self.model_dump(exclude=NOT_IN_RESULTS_KEY)


# Fields that do not change a system's results.json. Everything else is in the
# results key (EvalParams.set_config), by exclusion so a new field cannot be forgotten.
NOT_IN_RESULTS_KEY = frozenset(
    {
        "output_dir",  # where the report goes, not what is in it
        "work_dir",  # where the cache lives
        "batch_size",  # padding per batch; attention masks keep each text's vector the same
        # Which systems are rows: each system's own spec (path, pooling, backend,
        # instruction) is the other half of the key (core.system_output_dir).
        "model_dirs",
        "contrastive_model_dir",
        "baselines",
        "baseline_encoder",
        "baseline_pooling",
        "baseline_backend",
        "baseline_query_instruction",
    }
)
