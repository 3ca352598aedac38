"""The openai backend against a real HTTP server on 127.0.0.1 that speaks the
chat-completions protocol (tasks/rewriters/testing.py): success, timeouts,
429 with Retry-After, 5xx, malformed JSON, empty content, exhausted retries,
bounded concurrency, and an API key that is sent but never shown."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from tasks.rewriters import RewriteBackendError, RewriteConfig
from tasks.rewriters.openai_compat import OpenAIRewriter, parse_completion, parse_retry_after, _ItemError
from tasks.rewriters.prompts import PAPER_PROMPT
from tasks.rewriters.testing import FakeChatServer

KEY = "sk-test-Very-Secret-4242"


def _cfg(srv: FakeChatServer, **kw) -> RewriteConfig:
    base = {"backend": "openai", "base_url": srv.base_url, "backoff_base_s": 0.0, "max_retries": 3, "timeout_s": 5.0}
    return RewriteConfig(**{**base, **kw})


def test_success_keeps_order_and_sends_the_request_we_mean():
    sentences = [f"Sentence number {i} about Topic{i} and more." for i in range(12)]
    with FakeChatServer() as srv:
        rw = OpenAIRewriter(_cfg(srv, max_new_tokens=40, temperature=0.0, model="served-model"))
        out = rw.rewrite(sentences, seed=99)
    assert out == [f"Sentence, number, {i}, about" for i in range(12)]
    assert rw.last_errors == [None] * 12
    p = srv.payloads[0]
    assert p["model"] == "served-model" and p["max_tokens"] == 40 and p["temperature"] == 0.0
    assert p["seed"] == 99 and p["stop"] == ["\n"] and p["n"] == 1
    assert p["messages"][0] == {"role": "system", "content": PAPER_PROMPT}  # no worked examples by default
    assert p["messages"][1]["role"] == "user" and len(p["messages"]) == 2


def test_timeout_is_retried():
    with FakeChatServer(slow_s=1.5) as srv:
        rw = OpenAIRewriter(_cfg(srv, timeout_s=0.3))
        out = rw.rewrite(["[timeout-once] Mont Blanc is high."], seed=0)
    assert out == ["Mont, Blanc, is, high"]
    assert srv.attempts["[timeout-once] Mont Blanc is high."] == 2 and rw.stats["retries"] == 1


def test_429_then_success_honours_retry_after():
    with FakeChatServer(retry_after="0.5") as srv:
        rw = OpenAIRewriter(_cfg(srv))
        out = rw.rewrite(["[429-once] Snow reflects sunlight."], seed=0)
        t = srv.request_times["[429-once] Snow reflects sunlight."]
    assert out == ["Snow, reflects, sunlight"]
    assert len(t) == 2 and t[1] - t[0] >= 0.45  # waited as told, though back-off base is 0


def test_retry_after_is_capped_and_parsed():
    assert parse_retry_after("2") == 2.0 and parse_retry_after(None) is None and parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    with FakeChatServer(retry_after="30") as srv:
        rw = OpenAIRewriter(_cfg(srv, backoff_max_s=0.1))
        assert rw.rewrite(["[429-once] Capped wait here."], seed=0) == ["Capped, wait, here"]


def test_500_then_success():
    with FakeChatServer() as srv:
        rw = OpenAIRewriter(_cfg(srv, backoff_base_s=0.05))
        out = rw.rewrite(["Fine sentence here.", "[500-once] Second sentence here."], seed=0)
    assert out == ["Fine, sentence, here", "Second, sentence, here"]
    assert srv.attempts["[500-once] Second sentence here."] == 2


@pytest.mark.parametrize(
    "marker, message",
    [("[malformed]", "malformed JSON"), ("[empty]", "empty content"), ("[nochoices]", "no choices"), ("[400]", "HTTP 400")],
)
def test_unusable_answers_are_per_item_errors(marker, message):
    with FakeChatServer() as srv:
        rw = OpenAIRewriter(_cfg(srv))
        out = rw.rewrite(["Good one here.", f"{marker} Bad one here.", "Good two here."], seed=0)
    assert out == ["Good, one, here", "", "Good, two, here"]
    assert rw.last_errors[0] is None and message in rw.last_errors[1] and rw.last_errors[2] is None
    assert srv.attempts[f"{marker} Bad one here."] == 1  # not retried: the server answered


def test_exhausted_retries_fail_the_item_clearly():
    """A transport failure past its retries fails that item (the stage sends it
    again next run and fails past max_error_rate), not the other items."""
    with FakeChatServer() as srv:
        rw = OpenAIRewriter(_cfg(srv, max_retries=2))
        out = rw.rewrite(["Fine sentence.", "[503-always] Never answered."], seed=0)
    assert out == ["Fine, sentence", ""] and rw.last_errors[0] is None
    assert rw.last_errors[1] == "http_5xx: failed after 3 attempts, last: HTTP 503"
    assert srv.attempts["[503-always] Never answered."] == 3
    assert rw.last_finish_reasons == ["stop", None]


def test_connection_refused_is_retried_then_fails():
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rw = OpenAIRewriter(RewriteConfig(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_base_s=0))
    assert rw.rewrite(["Anything."], seed=0) == [""]
    assert rw.last_errors[0].startswith("connection: failed after 2 attempts, last: connection error")
    assert rw.stats["requests"] == 2


def test_a_dead_endpoint_is_not_retried_item_by_item():
    """After max(8, concurrency) items in a row exhaust their retries, the rest is not sent."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = RewriteConfig(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, backoff_base_s=0,
                        concurrency=2)
    rw = OpenAIRewriter(cfg)
    assert rw.rewrite([f"Item {i}." for i in range(40)], seed=0) == [""] * 40
    kinds = [e.split(":")[0] for e in rw.last_errors]
    assert kinds.count("connection") >= 8 and kinds.count("aborted") >= 20
    # Without the breaker every item would be tried twice (80 requests).
    assert rw.stats["requests"] <= 80 - 20 and rw.stats["aborted"] == kinds.count("aborted")


def test_finish_reason_and_junk_kinds_are_reported():
    with FakeChatServer(slow_s=1.0) as srv:
        rw = OpenAIRewriter(_cfg(srv, timeout_s=0.2, max_retries=1))
        out = rw.rewrite(["[length] Mont Blanc is high.", "[html] Alps.", "[slow] Slow one.", "Fine one."], seed=0)
    assert out == ["Mont, Blanc, Al", "", "", "Fine, one"]
    assert rw.last_finish_reasons == ["length", None, None, "stop"]
    assert [e and e.split(":")[0] for e in rw.last_errors] == [None, "non_json", "timeout", None]
    assert srv.attempts["[slow] Slow one."] == 2 and srv.attempts["[html] Alps."] == 1


def test_url_credentials_are_used_but_never_shown(caplog):
    caplog.set_level(logging.DEBUG)
    with FakeChatServer() as srv:
        url = srv.base_url.replace("http://", "http://alice:sk-in-url-777@") + "?api-key=qs-secret-888"
        rw = OpenAIRewriter(_cfg(srv, base_url=url))
        assert rw.url.endswith("/v1/chat/completions?api-key=qs-secret-888")  # the query string stays after the path
        assert rw.rewrite(["[400] Refused one.", "Fine one."], seed=0) == ["", "Fine, one"]
    assert srv.auth_headers[0].startswith("Basic ")  # httpx sends the user info as basic auth
    shown = repr(rw) + caplog.text + str(rw.last_errors)
    assert rw.endpoint == srv.base_url + "/chat/completions" and rw.endpoint in repr(rw)
    for secret in ("alice", "sk-in-url-777", "qs-secret-888"):
        assert secret not in shown


def test_concurrency_is_bounded():
    with FakeChatServer(latency_s=0.05) as srv:
        rw = OpenAIRewriter(_cfg(srv, concurrency=3))
        out = rw.rewrite([f"Item {i} text." for i in range(24)], seed=0)
    assert len(out) == 24 and srv.max_in_flight <= 3 and srv.max_in_flight >= 2


def test_works_when_called_inside_an_event_loop():
    with FakeChatServer() as srv:
        rw = OpenAIRewriter(_cfg(srv))

        async def flow_body():
            return rw.rewrite(["Inside a loop."], seed=0)

        assert asyncio.run(flow_body()) == ["Inside, a, loop"]


def test_api_key_is_sent_but_never_shown(monkeypatch, caplog):
    monkeypatch.setenv("GEAR_TEST_KEY", KEY)
    caplog.set_level(logging.DEBUG)
    with FakeChatServer(api_key=KEY) as srv:
        rw = OpenAIRewriter(_cfg(srv, api_key_env="GEAR_TEST_KEY"))
        assert rw.rewrite(["[500-once] Keyed request."], seed=0) == ["Keyed, request"]
        assert srv.auth_headers == [f"Bearer {KEY}"] * 2
        assert KEY not in repr(rw) and "********" in repr(rw)
        # A wrong key: a clear, fatal error that names where the key came from, not the key.
        monkeypatch.setenv("GEAR_TEST_KEY", "sk-wrong-Other-Secret")
        bad = OpenAIRewriter(_cfg(srv, api_key_env="GEAR_TEST_KEY"))
        with pytest.raises(RewriteBackendError) as err:
            bad.rewrite(["Keyed request two."], seed=0)
    assert "HTTP 401" in str(err.value) and "GEAR_TEST_KEY" in str(err.value)
    assert "sk-wrong" not in str(err.value) and "sk-wrong" not in repr(bad)
    assert KEY not in caplog.text and "sk-wrong" not in caplog.text
    assert "retry 1/3" in caplog.text  # the retry was logged (without the key)


def test_parse_completion():
    assert parse_completion(FakeChatServer.completion("a, b")) == "a, b"
    for body in (b"[]", b'{"choices": [{"message": {}}]}', b'{"choices": [{"message": {"content": null}}]}'):
        with pytest.raises(_ItemError):
            parse_completion(body)


def test_api_key_from_a_prefect_secret_block(prefect_harness):
    from prefect.blocks.system import Secret

    Secret(value=KEY).save("gear-rewrite-test-key", overwrite=True)
    with FakeChatServer(api_key=KEY) as srv:
        rw = OpenAIRewriter(_cfg(srv, api_key_secret_block="gear-rewrite-test-key", api_key_env="UNSET_VAR_XYZ"))
        assert rw.rewrite(["Secret block key."], seed=0) == ["Secret, block, key"]
    assert KEY not in repr(rw)
