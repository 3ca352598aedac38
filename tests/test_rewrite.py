"""Rewrite stage: prompts, quality gate, unit sampling, the vLLM backend's
request building, and the stage end to end through the openai backend
against a real local chat-completions server."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.common import is_complete
from tasks.rewrite import (
    QUERIES_SCHEMA,
    REJECTED_SCHEMA,
    cache_config,
    rewrite_queries,
    rewrite_queries_task,
    sample_units,
    shard_seed,
    using_rewriter,
)
from tasks.rewriters import PAPER_PROMPT, PROMPT_VERSION, RewriteConfig, build_messages, prompt_fingerprint
from tasks.rewriters.base import BackendUnavailableError
from tasks.rewriters.prompts import WORKED_EXAMPLES
from tasks.rewriters.quality import GateConfig, clean_output, is_keyword_form, judge, new_words, stem
from tasks.rewriters.testing import FakeChatServer
from tasks.rewriters.vllm_engine import VllmRewriter, conversations, engine_kwargs, sampling_kwargs

PAPER_TEXT = (
    "You are a helpful assistant, please help the user to complete the following tasks directly, "
    "and answer briefly and fluently. This is a sentence from Wikipedia. Assuming that users want "
    "to search for this sentence on a search engine, write a phrase that users might use to search "
    "(including some keywords), separated by commas. Retain the key information of the subject, "
    "object, and noun. Unimportant words can be modified, but do not add other information."
)
S = "Abraham Lincoln was the 16th President of the United States from March 1861 until his assassination in April 1865."


# --------------------------------------------------------------------------- prompts


def test_paper_prompt_is_verbatim_as_the_system_message():
    assert PAPER_PROMPT == PAPER_TEXT
    msgs = build_messages(S, use_worked_examples=False)
    assert msgs == [{"role": "system", "content": PAPER_TEXT}, {"role": "user", "content": S}]


def test_worked_examples_are_earlier_turns_that_keep_capitals():
    msgs = build_messages(S, use_worked_examples=True)
    assert len(WORKED_EXAMPLES) == 6
    assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * 6 + ["user"]
    assert msgs[0]["content"] == PAPER_TEXT and msgs[-1]["content"] == S
    # A number takes the first N (2 = the earlier prompt); 0 is the paper's prompt alone.
    assert build_messages(S, 2) == msgs[:5] + [msgs[-1]]
    assert build_messages(S, 0) == build_messages(S, False) == [msgs[0], msgs[-1]]
    assert msgs[1]["content"] == WORKED_EXAMPLES[0][0]
    first_answer = msgs[2]["content"]
    assert first_answer == WORKED_EXAMPLES[0][1] and "Gustave Eiffel" in first_answer
    # The examples' answers pass our own gate.
    for sentence, answer in WORKED_EXAMPLES:
        assert judge(answer, sentence).kept, answer
        # ... and what the local constraint allows: at most 0.6 of the sentence's words.
        assert len(answer.split()) <= 0.6 * len(sentence.split()), answer


def test_prompt_text_is_part_of_the_cache_key():
    assert prompt_fingerprint(True) != prompt_fingerprint(False)
    local = cache_config(RewriteConfig())
    assert local["prompt_version"] == PROMPT_VERSION and local["use_worked_examples"] is True
    assert local["model"].endswith(".gguf") and len(local["model_fingerprint"]) == 64
    # The default decides per backend: the paper's prompt alone for the production model.
    assert cache_config(RewriteConfig(backend="openai"))["use_worked_examples"] is False
    assert cache_config(RewriteConfig(backend="openai"))["model"] == "meta-llama/Llama-3.1-70B-Instruct"
    # Operational knobs do not change the key; output-relevant ones do.
    base = cache_config(RewriteConfig(backend="openai"))
    assert cache_config(RewriteConfig(backend="openai", concurrency=3, timeout_s=5)) == base
    assert cache_config(RewriteConfig(backend="openai", temperature=0.7)) != base
    local_ops = cache_config(RewriteConfig(batch_size=3, decode_loop="generate", gqa_attention=False, torch_threads=1))
    assert local_ops == local
    assert cache_config(RewriteConfig(constraint_max_word_fraction=0.5)) != local
    assert cache_config(RewriteConfig(use_worked_examples=2))["prompt_fingerprint"] != local["prompt_fingerprint"]
    # The failure tolerance is operational; the nested gate decides outputs and is in the key.
    assert cache_config(RewriteConfig(backend="openai", max_error_rate=0.5)) == base
    assert base["gate"] == GateConfig().model_dump() and "max_error_rate" not in base
    assert cache_config(RewriteConfig(backend="openai", gate=GateConfig(max_new_words=2))) != base
    assert cache_config(RewriteConfig(backend="openai", gate={"fragment_min_share": 0.6})) != base


def test_gate_config_nests_once_and_old_flat_fields_still_load():
    cfg = RewriteConfig(gate={"max_query_words": 10})
    assert cfg.gate == GateConfig(max_query_words=10) and cfg.gate.max_new_words == 1
    with pytest.warns(DeprecationWarning, match="gate"):
        old = RewriteConfig.model_validate({"max_query_words": 10, "echo_similarity": 0.95, "max_new_words": 0})
    assert old.gate == GateConfig(max_query_words=10, echo_similarity=0.95, max_new_words=0)
    assert "max_query_words" not in old.model_dump()
    with pytest.raises(ValueError, match="both"):
        RewriteConfig.model_validate({"max_query_words": 10, "gate": {"max_query_words": 11}})
    with pytest.raises(ValueError):
        GateConfig(max_query_words=0)  # bounds are checked
    with pytest.raises(ValueError):
        RewriteConfig(gate={"max_querry_words": 3})  # a typo is an error, not a silent default


def test_constraint_is_local_only_and_on_by_default():
    assert RewriteConfig().constraint_on() and RewriteConfig().batch_size == 32
    assert not RewriteConfig(constrain_to_sentence=False).constraint_on()
    # openai/vllm keep the paper's setup: its prompt alone, nothing constrained.
    for backend in ("openai", "vllm"):
        cfg = RewriteConfig(backend=backend)
        assert not cfg.constraint_on() and not cfg.worked_examples_on()
        assert not RewriteConfig(backend=backend, constrain_to_sentence=True).constraint_on()
        assert build_messages(S, cfg.worked_examples_on()) == [
            {"role": "system", "content": PAPER_TEXT}, {"role": "user", "content": S}
        ]


# --------------------------------------------------------------------------- quality gate


@pytest.mark.parametrize(
    "raw, expected",
    [
        ('"Abraham Lincoln, 16th President"\nThis query keeps the subject.', "Abraham Lincoln, 16th President"),
        ("Query: Lincoln, President", "Lincoln, President"),
        ("Search query: 'Lincoln, President'.", "Lincoln, President"),
        ("- Keywords: Lincoln, assassination", "Lincoln, assassination"),
        ("\n\n  Lincoln, 1861  \n", "Lincoln, 1861"),
    ],
)
def test_clean_output(raw, expected):
    assert clean_output(raw) == expected


@pytest.mark.parametrize(
    "raw, reason",
    [
        ("", "empty"),
        ("   \n\n", "empty"),
        ('""', "empty"),
        ("I'm sorry, but I cannot help with that.", "refusal"),
        ("As an AI language model, I think Lincoln", "refusal"),
        ("Sure! Lincoln, President", "preamble"),
        ("Here is a search phrase: Lincoln, President", "preamble"),
        (S, "echo"),
        (S.upper().rstrip("."), "echo"),
        (S.replace("States", "States,").replace("16th", "16"), "echo"),  # a near-copy
        ("Query: " + S.lower(), "echo"),
        (", ".join(["Lincoln president"] * 12), "too_long"),
        ("Lincoln, President, Gettysburg Address, Civil War", "adds_information"),
        ("Abraham Lincoln, 16th President, United States, assassination 1865", None),
        ("Lincoln, presidents, assassinated, 1865, Lincoln's", None),  # stems and possessives
        ("Lincoln, US president, assassination", None),  # one new word is tolerated
    ],
)
def test_gate_reasons(raw, reason):
    assert judge(raw, S).reason == reason


# Real candidate units of the embedded dump with outputs of the kinds SmolLM2
# writes for them (most verbatim from old- and new-settings runs); the
# decisions are pinned so that the gate can only be changed on purpose.
PINNED = [
    # (sentence, raw output, reason)
    ("The first known use of this word was in 1539.", "The first known use of this word was in 1539.", "echo"),
    ("Algeria is a regional and middle power.", "Algeria is a regional and middle power", "echo"),
    ("At 1300 mi, Alabama has one of the longest navigable inland waterways in the nation.",
     "At 1300 miles, Alabama has one of the longest navigable inland waterways in the nation.", "echo"),
    ("His combined works constitute a virtual encyclopedia of Greek knowledge.",
     "His combined works constitute a virtual encyclopedia.", "fragment"),
    ("His combined works constitute a virtual encyclopedia of Greek knowledge.",
     "His combined works constitute a virtualencyclopedia.", "fragment"),  # glued words
    ("Much debate exists as to whether \"true\" altruism is possible in human psychology.",
     "much debate exists as to whether true.", "fragment"),
    ("In art, Rand promoted romantic realism.",
     "Rand, art, romantic realism, Ayn Rand, promoted, realism, romantic, art", "too_long"),
    ("The farm is preserved as part of the Lincoln Boyhood National Memorial.",
     "Lincoln farm, boyhood home, Indiana, national memorial, preserved", "adds_information"),
    ("The farm is preserved as part of the Lincoln Boyhood National Memorial.",
     "Sure, here are some keywords: farm, Lincoln", "preamble"),
    ("The farm is preserved as part of the Lincoln Boyhood National Memorial.",
     "The farm, Lincoln Boyhood National Memorial", None),
    ("His father Nicomachus was the personal physician to King Amyntas of Macedon.",
     "Nicomachus, King Amyntas of Macedon, his father", None),
    ("In art, Rand promoted romantic realism.", "In art, Rand.", None),  # 3 of 6 words: short, not a fragment
    ("Flying A was one of the first motion pictures studios in California history.",
     "Flying A, first motion pictures, California, history", None),
]


@pytest.mark.parametrize("sentence, raw, reason", PINNED)
def test_gate_decisions_are_pinned(sentence, raw, reason):
    assert judge(raw, sentence).reason == reason


def test_gate_tolerance_and_caps_are_configurable():
    assert new_words("Lincoln, Gettysburg Address", S) == ["gettysburg", "address"]
    assert judge("Lincoln, Gettysburg Address", S, GateConfig(max_new_words=2)).kept
    assert judge("Lincoln, Gettysburg Address", S, GateConfig(max_new_words=0)).reason == "adds_information"
    assert judge("Lincoln, 16th President, 1861", S, GateConfig(max_query_words=3)).reason == "too_long"
    assert stem("countries") == "country" and stem("presidents") == "president"
    # A split compound or shortened form of a sentence word is not new.
    assert new_words("football club", "The Arsenal Football Club is based in London.") == []
    near = "At 1300 miles, Alabama has one of the longest navigable inland waterways in the nation."
    src = "At 1300 mi, Alabama has one of the longest navigable inland waterways in the nation."
    assert judge(near, src).reason == "echo" and judge(near, src, GateConfig(echo_similarity=1.0)).kept
    assert is_keyword_form("Lincoln, President") and not is_keyword_form("Lincoln President")


# --------------------------------------------------------------------------- sampling


def _units(doc_ids: list[str], per_doc: int = 5) -> pl.DataFrame:
    rows = [
        {"doc_id": d, "sentence_index": i, "text": f"{d} sentence number {i} about topic"}
        for d in doc_ids
        for i in range(per_doc)
    ]
    return pl.DataFrame(rows, schema={"doc_id": pl.String, "sentence_index": pl.Int32, "text": pl.String})


def test_sampling_is_seeded_per_document_and_independent_of_shards():
    units = _units([f"d{i}" for i in range(20)])
    a = sample_units(units, 3, seed=7)
    assert a.height == 60 and a.group_by("doc_id").len()["len"].to_list() == [3] * 20
    # Same seed, shuffled rows and split into shards: the same choice per document.
    key = ["doc_id", "sentence_index"]
    shuffled = units.sample(fraction=1.0, shuffle=True, seed=1)
    first = pl.col("doc_id").is_in([f"d{i}" for i in range(0, 20, 2)])
    parts = pl.concat([sample_units(shuffled.filter(first), 3, 7), sample_units(shuffled.filter(~first), 3, 7)])
    assert parts.sort(key).equals(a)
    one_by_one = pl.concat([sample_units(units.filter(pl.col("doc_id") == d), 3, 7) for d in units["doc_id"].unique()])
    assert one_by_one.sort(key).equals(a)
    # A different seed picks differently; fewer candidates than asked keeps all.
    assert not sample_units(units, 3, seed=8).equals(a)
    assert sample_units(_units(["x"], per_doc=2), 3, 0).height == 2
    assert shard_seed(7, ["b", "a"]) == shard_seed(7, ["a", "b"]) != shard_seed(8, ["a", "b"])


# --------------------------------------------------------------------------- vLLM backend (engine not installable here)


def test_vllm_request_building():
    cfg = RewriteConfig(backend="vllm", temperature=0.0, max_new_tokens=40, seed=3)
    assert engine_kwargs(cfg) == {
        "model": "meta-llama/Llama-3.1-70B-Instruct",
        "tensor_parallel_size": 8,
        "dtype": "auto",
        "gpu_memory_utilization": 0.9,
        "max_model_len": 4096,
        "seed": 3,
    }
    assert sampling_kwargs(cfg, seed=1234) == {"n": 1, "temperature": 0.0, "max_tokens": 40, "seed": 1234, "stop": ["\n"]}
    convs = conversations(["one sentence.", "two sentence."], use_worked_examples=False)
    assert len(convs) == 2 and convs[1][-1]["content"].endswith("two sentence.")


def test_vllm_missing_gives_a_clear_error():
    pytest.importorskip("torch")  # any environment without vllm
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vllm is installed here")
    with pytest.raises(BackendUnavailableError, match=r"gear-rir\[vllm\]"):
        VllmRewriter(RewriteConfig(backend="vllm"))


# --------------------------------------------------------------------------- the stage end to end


def _write_shard(folder: Path, docs: dict[str, list[str]]) -> Path:
    folder.mkdir(parents=True)
    doc_rows, unit_rows = [], []
    for doc_id, sentences in docs.items():
        text = " ".join(sentences)
        spans, pos = [], 0
        for i, s in enumerate(sentences):
            start = text.index(s, pos)
            spans.append({"start": start, "end": start + len(s)})
            unit_rows.append(
                {"doc_id": doc_id, "sentence_index": i, "text": s, "char_start": start,
                 "char_end": start + len(s), "token_count": len(s.split())}
            )
            pos = start + len(s)
        doc_rows.append(
            {"doc_id": doc_id, "page_id": 1, "revision_id": 1, "part": 0, "title": doc_id, "text": text,
             "sentence_spans": spans, "token_count": len(text.split()), "source_dump": "test"}
        )
    pq.write_table(pa.Table.from_pylist(doc_rows), folder / "documents.parquet")
    pq.write_table(
        pa.Table.from_pylist(unit_rows).cast(
            pa.schema([("doc_id", pa.string()), ("sentence_index", pa.int32()), ("text", pa.string()),
                       ("char_start", pa.int32()), ("char_end", pa.int32()), ("token_count", pa.int32())])
        ),
        folder / "units.parquet",
    )
    return folder


@pytest.fixture
def shards(tmp_path):
    a = _write_shard(tmp_path / "shard-a", {
        "A1": ["Anarchism is a political philosophy of self-governed societies.",
               "Anarchists advocate voluntary institutions over hierarchical ones.",
               "The Paris Commune of 1871 inspired many anarchist writers.",
               "Proudhon was the first person to call himself an anarchist."],
        "A2": ["Albedo measures the fraction of sunlight reflected by a surface.",
               "[echo] Fresh snow has an albedo close to nine tenths.",
               "Climate models include albedo feedback from melting ice."],
    })
    b = _write_shard(tmp_path / "shard-b", {
        "B1": ["[empty] The Alps stretch across eight countries in Europe.",
               "Mont Blanc is the highest mountain of the Alps.",
               "[malformed] Glaciers carved the valleys of the Alps."],
    })
    return [a, b]


def test_rewrite_queries_end_to_end(shards, tmp_path):
    work = tmp_path / "work"
    with FakeChatServer() as srv:
        # 2 of the 9 answers are junk (B1); tolerated here, the default 2% would fail the stage
        # (tests/test_rewrite_failures.py).
        cfg = RewriteConfig(
            backend="openai", base_url=srv.base_url, units_per_doc=3, backoff_base_s=0.01, max_error_rate=0.25
        )
        progress = []
        with using_rewriter(on_progress=lambda done, total: progress.append((done, total))):
            out = rewrite_queries(shards, cfg, work)
        requests = sum(srv.attempts.values())
        # The openai backend reports per shard: shard A's 6 sampled units, then all 9.
        assert progress == [(6, 9), (9, 9)]
        # A re-run (any shard order) finds the finished folder and sends nothing.
        assert rewrite_queries(list(reversed(shards)), cfg, work) == out
        assert sum(srv.attempts.values()) == requests == 9
    assert out == rewrite_queries.output_dir(shards, cfg, work) and is_complete(out)
    queries = pq.read_table(out / "queries.parquet")
    rejected = pq.read_table(out / "rejected.parquet")
    assert queries.schema.equals(QUERIES_SCHEMA) and rejected.schema.equals(REJECTED_SCHEMA)
    q, r = pl.from_arrow(queries), pl.from_arrow(rejected)
    assert q.height + r.height == 9  # 3 per document
    assert set(q["rewriter_model"]) == {"meta-llama/Llama-3.1-70B-Instruct"}
    assert set(q["prompt_version"]) == {PROMPT_VERSION}
    units = pl.concat([pl.read_parquet(s / "units.parquet") for s in shards])
    joined = q.join(units, on=["doc_id", "sentence_index"])
    assert (joined["unit"] == joined["text"]).all()
    reasons = dict(zip(r["reason"], r["raw_output"])) if r.height else {}
    funnel = json.loads((out / "funnel.json").read_text())["rewrite_queries"]
    assert funnel["input"] == 9 and funnel["kept"] == q.height
    assert sum(v for k, v in funnel.items() if k.startswith("dropped:")) == r.height
    # The scripted failures of B1 (all 3 of its units are sampled) are counted, not fatal.
    assert funnel["dropped:backend_error"] == 2 and "malformed JSON" in " ".join(r["raw_output"])
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rewrites"] == 9 and stats["backend_error_rate"] == pytest.approx(2 / 9)
    assert stats["backend_errors_by_kind"] == {"empty": 1, "non_json": 1}
    sample = json.loads((out / "funnel.json").read_text())["sample_units"]
    assert sample == {"input": 10, "kept": 9, "dropped:not_sampled": 1}
    assert reasons["echo"] == "[echo] Fresh snow has an albedo close to nine tenths."
    assert funnel["dropped:echo"] == 1


def test_task_cache_key_trusts_only_a_finished_folder(shards, tmp_path):
    key_fn = rewrite_queries_task.cache_key_fn
    with FakeChatServer() as srv:
        cfg = RewriteConfig(backend="openai", base_url=srv.base_url, max_error_rate=0.25)
        params = {"units_dirs": shards, "config": cfg, "work_dir": tmp_path / "w"}
        assert key_fn(None, params) is None
        out = rewrite_queries_task.fn(**params)
    assert key_fn(None, params) is not None
    (out / "_SUCCESS.json").unlink()
    assert key_fn(None, params) is None
    other = RewriteConfig(backend="openai", base_url=srv.base_url, seed=1, max_error_rate=0.25)
    assert rewrite_queries.output_dir(shards, other, tmp_path / "w") != out


def test_finished_shards_are_not_rewritten_on_retry(shards, tmp_path):
    work = tmp_path / "w"
    with FakeChatServer() as srv:
        cfg = RewriteConfig(backend="openai", base_url=srv.base_url, max_error_rate=0.25)
        out = rewrite_queries(shards, cfg, work)
        # As if the task died after the shards: its partial folder holds raw/ only.
        partial = rewrite_queries.work_folder(out)
        out.rename(partial)
        for name in ("_SUCCESS.json", "queries.parquet", "rejected.parquet", "funnel.json"):
            (partial / name).unlink()
        before = sum(srv.attempts.values())
        assert rewrite_queries(shards, cfg, work) == out
        # Shard A is finished; of shard B only its 2 failed items (never final) are sent again.
        assert sum(srv.attempts.values()) == before + 2
        assert srv.attempts["[empty] The Alps stretch across eight countries in Europe."] == 2
    assert (out / "queries.parquet").is_file()


def test_bad_input_names_the_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="units.parquet"):
        rewrite_queries([tmp_path / "empty"], RewriteConfig(backend="openai"), tmp_path / "w")


def test_prefect_task_caches_and_does_not_retry_bad_input(prefect_harness, shards, tmp_path):
    import asyncio

    from prefect import flow
    from prefect.client.orchestration import get_client

    states = []

    @flow
    def run(units_dirs, config, work_dir):
        # The task's own state, kept in process: returning it from the flow would
        # make the flow read it back from the API, without its data.
        states.append(rewrite_queries_task(units_dirs, config, work_dir, return_state=True))

    with FakeChatServer() as srv:
        cfg = RewriteConfig(backend="openai", base_url=srv.base_url, max_error_rate=0.25)
        # The key exists once the folder is complete: the 2nd run finds the folder
        # (no work) and records the key, the 3rd is a Prefect cache hit.
        for _ in range(3):
            run(shards, cfg, tmp_path / "w")
        first, second, third = states
        assert first.is_completed() and second.is_completed() and third.name == "Cached"
        assert first.result() == third.result() == rewrite_queries.output_dir(shards, cfg, tmp_path / "w")
        assert sum(srv.attempts.values()) == 9
        (tmp_path / "empty").mkdir()
        run([tmp_path / "empty"], cfg, tmp_path / "w")
        bad = states[-1]

    async def run_count(state):
        async with get_client() as client:
            return (await client.read_task_run(state.state_details.task_run_id)).run_count

    assert bad.is_failed() and "units.parquet" in str(bad.message)
    assert asyncio.run(run_count(bad)) == 1  # bad input: no retry
