"""Endpoint failures are failures (issue 13): the rewrite stage, run with the
real openai client against a real local chat-completions server that answers
junk (tasks/rewriters/testing.py), fails past max_error_rate naming the
endpoint (no credentials) and the counts by kind; the finished items are kept
and a second run against a healthy server sends exactly the failed ones; an
answer cut at max_tokens is a counted ``truncated`` drop; failures never
leave an empty output silently."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest

from tasks.common import is_complete
from tasks.rewrite import RAW_SCHEMA, rewrite_queries
from tasks.rewriters import RewriteConfig
from tasks.rewriters.base import RewriteFailuresError
from tasks.rewriters.testing import FakeChatServer
from tasks.rewriters.vllm_engine import read_outputs
from test_rewrite import _write_shard  # the units folders the stage reads

SECRETS = ("alice", "sk-in-url-777", "qs-secret-888")


def _secret_url(srv: FakeChatServer) -> str:
    """The server's URL with credentials in the user info and the query string."""
    return srv.base_url.replace("http://", "http://alice:sk-in-url-777@") + "?api-key=qs-secret-888"


def _cfg(base_url: str, **kw) -> RewriteConfig:
    base = {"backend": "openai", "base_url": base_url, "units_per_doc": 10, "timeout_s": 0.3,
            "max_retries": 1, "backoff_base_s": 0.0}
    return RewriteConfig(**{**base, **kw})


@pytest.fixture
def junk_shards(tmp_path):
    a = _write_shard(tmp_path / "shard-a", {
        "A1": ["Anarchism is a political philosophy of self-governed societies.",
               "Proudhon was the first person to call himself an anarchist.",
               "[length] The Paris Commune of 1871 inspired many anarchist writers."],
        "A2": ["Albedo measures the fraction of sunlight reflected by a surface.",
               "Climate models include albedo feedback from melting ice."],
    })
    b = _write_shard(tmp_path / "shard-b", {
        "B1": ["[html] The Alps stretch across eight countries in Europe.",
               "Mont Blanc is the highest mountain of the Alps.",
               "[empty] Glaciers carved the valleys of the Alps."],
        "B2": ["[400] The Rhine rises in the Swiss Alps.",
               "[slow] Lake Geneva lies on the border of France and Switzerland.",
               "Zermatt is a car-free village below the Matterhorn."],
    })
    return [a, b]


def _raw_dir(out: Path) -> Path:
    """raw/ of a finished folder, or of the partial folder a failed attempt left."""
    return (out if out.is_dir() else rewrite_queries.work_folder(out)) / "raw"


def _raw(out: Path) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in sorted(_raw_dir(out).glob("*.parquet"))])


def test_junk_fails_the_stage_then_only_the_failed_items_are_sent_again(junk_shards, tmp_path):
    work = tmp_path / "work"
    with FakeChatServer(slow_s=1.0) as srv:
        cfg = _cfg(_secret_url(srv))
        with pytest.raises(RewriteFailuresError) as err:
            rewrite_queries(junk_shards, cfg, work)
        first_requests = srv.requests
    message = str(err.value)
    assert "4 of 11 rewrites failed (36.4% > max_error_rate 2.0%)" in message
    assert f"at {srv.base_url} " in message  # the endpoint, without user info or query string
    for secret in SECRETS:
        assert secret not in message
    assert "empty 1, http_4xx 1, non_json 1, timeout 1" in message
    assert err.value.counts == {"empty": 1, "http_4xx": 1, "non_json": 1, "timeout": 1}
    assert (err.value.failed, err.value.total) == (4, 11)
    assert first_requests == 12  # 11 units, the slow one tried twice

    out = rewrite_queries.output_dir(junk_shards, cfg, work)
    assert not is_complete(out) and not (out / "queries.parquet").exists()
    raw = _raw(out)
    assert pl.read_parquet_schema(next(_raw_dir(out).glob("*.parquet"))) == pl.Schema(RAW_SCHEMA)
    failed = raw.filter(pl.col("status") == "failed").sort("unit")
    assert dict(zip(failed["unit"].str.slice(0, 7), failed["error_kind"])) == {
        "[400] T": "http_4xx", "[empty]": "empty", "[html] ": "non_json", "[slow] ": "timeout"
    }
    assert failed["error"].str.starts_with(failed["error_kind"] + ": ").all()
    assert raw.filter(pl.col("status") == "ok").height == 7
    assert raw.filter(pl.col("finish_reason") == "length")["unit"].to_list() == [
        "[length] The Paris Commune of 1871 inspired many anarchist writers."
    ]

    # The endpoint is fixed (another port: base_url is operational, the folder is the same).
    with FakeChatServer(healthy=True) as healthy:
        cfg2 = _cfg(healthy.base_url)
        assert rewrite_queries.output_dir(junk_shards, cfg2, work) == out
        assert rewrite_queries(junk_shards, cfg2, work) == out
        assert healthy.requests == 4  # exactly the failed items
        assert set(healthy.attempts) == set(failed["unit"])
    assert is_complete(out)
    assert _raw(out)["status"].to_list() == ["ok"] * 11  # the shard files were rewritten
    funnel = json.loads((out / "funnel.json").read_text())["rewrite_queries"]
    assert funnel["input"] == 11 and funnel["dropped:truncated"] == 1 and "dropped:backend_error" not in funnel
    assert funnel["kept"] + sum(v for k, v in funnel.items() if k.startswith("dropped:")) == 11
    rejected = pl.read_parquet(out / "rejected.parquet")
    cut = rejected.filter(pl.col("reason") == "truncated")
    assert cut["unit"].to_list() == ["[length] The Paris Commune of 1871 inspired many anarchist writers."]
    assert cut["raw_output"].to_list() == ["The, Paris, Al"]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["rewrites"] == 4 and stats["truncated_rate"] == pytest.approx(1 / 11)
    assert stats["backend_errors_by_kind"] == {}
    params = (out / "params.json").read_text()
    assert all(secret not in params for secret in SECRETS)  # the run that finished used a clean URL anyway


def test_failures_that_leave_nothing_raise_even_when_tolerated(tmp_path):
    shard = _write_shard(tmp_path / "s", {"D": ["[html] One sentence here.", "[empty] Another sentence here."]})
    with FakeChatServer() as srv:
        with pytest.raises(RewriteFailuresError, match=r"2 of 2 rewrites failed \(no rewrite is left to keep\)"):
            rewrite_queries([shard], _cfg(srv.base_url, max_error_rate=1.0), tmp_path / "w")


def test_tolerated_failures_complete_and_are_counted(junk_shards, tmp_path):
    with FakeChatServer(slow_s=1.0) as srv:
        out = rewrite_queries(junk_shards, _cfg(srv.base_url, max_error_rate=0.5), tmp_path / "w")
    funnel = json.loads((out / "funnel.json").read_text())["rewrite_queries"]
    assert funnel["dropped:backend_error"] == 4 and funnel["dropped:truncated"] == 1
    stats = json.loads((out / "stats.json").read_text())
    assert stats["backend_errors_by_kind"] == {"empty": 1, "http_4xx": 1, "non_json": 1, "timeout": 1}


def test_a_dead_endpoint_stops_the_stage_after_one_shard(tmp_path):
    first = _write_shard(tmp_path / "a", {f"A{i}": [f"Sentence {i} about things."] for i in range(12)})
    second = _write_shard(tmp_path / "b", {"B": ["Never sent sentence."]})
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(f"http://bob:sk-dead-999@127.0.0.1:{port}/v1", max_retries=0, concurrency=1)
    with pytest.raises(RewriteFailuresError) as err:
        rewrite_queries([first, second], cfg, tmp_path / "w")
    message = str(err.value)
    assert "12 of 12 rewrites failed (the endpoint stopped answering; 1 sampled units of later shards were not sent)" in message
    assert f"at http://127.0.0.1:{port}/v1 " in message and "connection 8, aborted 4" in message
    assert "bob" not in message and "sk-dead" not in message
    out = rewrite_queries.output_dir([first, second], cfg, tmp_path / "w")
    assert len(list(_raw_dir(out).glob("*.parquet"))) == 1  # the second shard was not attempted


def test_vllm_outputs_report_finish_reasons():
    """vLLM cannot run here: RequestOutput-shaped records (``.outputs[0].text``,
    ``.finish_reason``) exercise the mapping."""
    done = SimpleNamespace(outputs=[SimpleNamespace(text="Alps, Europe", finish_reason="stop")])
    cut = SimpleNamespace(outputs=[SimpleNamespace(text="Alps, Eu", finish_reason="length")])
    empty = SimpleNamespace(outputs=[SimpleNamespace(text=" ", finish_reason="stop")])
    texts, errors, finishes = read_outputs([done, cut, empty])
    assert texts == ["Alps, Europe", "Alps, Eu", " "] and finishes == ["stop", "length", "stop"]
    assert errors[:2] == [None, None] and errors[2].startswith("empty: engine returned no text")
