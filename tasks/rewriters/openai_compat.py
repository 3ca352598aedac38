"""OpenAI-compatible backend: POST /chat/completions to any server that speaks
the protocol (above all ``vllm serve``, shared by many workers).

- async httpx, at most ``concurrency`` requests in flight (a semaphore);
- per-request timeout; retries with exponential back-off and full jitter on
  429, 5xx, connection errors and timeouts, honouring ``Retry-After``;
- a transport failure that outlives its retries fails the shard
  (``RewriteBackendError``; the Prefect task retries the shard);
- a well-transported but unusable answer (malformed JSON, no choices, empty
  content, a 400 for this one prompt) is a per-item error: output "" and the
  reason in ``last_errors``; the stage counts it, the shard goes on;
- the API key comes from an environment variable or a Prefect Secret block
  and is never put in a repr, a log line or an error message.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time

import httpx

from tasks.rewriters.base import RewriteBackendError, RewriteConfigError, Rewriter
from tasks.rewriters.config import RewriteConfig
from tasks.rewriters.prompts import build_messages

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
# The request is wrong for every prompt (bad key, wrong URL or model): retrying
# or going on item by item only repeats the failure.
FATAL_STATUS = frozenset({401, 403, 404, 405})


class _Secret:
    """Holds the API key; prints as a mask."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None):
        self._value = value or None

    def get(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')" if self._value else "Secret(None)"

    __str__ = __repr__


def resolve_api_key(config: RewriteConfig) -> _Secret:
    if config.api_key_secret_block:
        from prefect.blocks.system import Secret

        return _Secret(Secret.load(config.api_key_secret_block).get())
    return _Secret(os.environ.get(config.api_key_env))


class _ItemError(Exception):
    """This one prompt got no usable answer; the shard goes on."""


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def parse_completion(body: bytes) -> str:
    """The first choice's message content; ``_ItemError`` says what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _ItemError(f"malformed JSON in response: {exc.__class__.__name__}") from None
    if not isinstance(data, dict):
        raise _ItemError("response is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _ItemError("response has no choices")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str) or not content.strip():
        raise _ItemError("response has empty content")
    return content


class OpenAIRewriter(Rewriter):
    def __init__(self, config: RewriteConfig):
        self.config = config
        self.model_name = config.resolved_model()
        self.use_examples = config.worked_examples_on()
        self.url = config.base_url.rstrip("/") + "/chat/completions"
        self._api_key = resolve_api_key(config)
        self.last_errors = []
        self.stats = {"requests": 0, "retries": 0}

    def __repr__(self) -> str:
        return f"OpenAIRewriter(url={self.url!r}, model={self.model_name!r}, api_key={self._api_key!r})"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._api_key.get():
            headers["Authorization"] = f"Bearer {self._api_key.get()}"
        return headers

    def _payload(self, sentence: str, seed: int) -> dict:
        payload = {
            "model": self.model_name,
            "messages": build_messages(sentence, self.use_examples),
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_new_tokens,
            "seed": seed,
            "n": 1,
        }
        if self.config.stop_at_newline:
            payload["stop"] = ["\n"]
        return payload

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = self.config.backoff_max_s
        if retry_after is not None:
            return min(retry_after, cap)
        # Full jitter: spreads the retries of many workers hitting one server.
        return random.uniform(0, min(cap, self.config.backoff_base_s * 2**attempt))

    async def _one(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, index: int, sentence: str, seed: int) -> str:
        payload = self._payload(sentence, seed)
        last = "no attempt"
        for attempt in range(self.config.max_retries + 1):
            try:
                async with sem:
                    self.stats["requests"] += 1
                    resp = await client.post(self.url, json=payload, headers=self._headers())
                if resp.status_code in RETRY_STATUS:
                    raise _Retryable(f"HTTP {resp.status_code}", parse_retry_after(resp.headers.get("retry-after")))
                if resp.status_code in FATAL_STATUS:
                    raise RewriteConfigError(
                        f"{self.url} answered HTTP {resp.status_code} for model {self.model_name!r} "
                        f"(check base_url, model and the API key source {self._key_source()})"
                    )
                if resp.status_code >= 400:
                    raise _ItemError(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return parse_completion(resp.content)
            except httpx.TimeoutException as exc:
                last, retry_after = f"timeout ({exc.__class__.__name__})", None
            except httpx.TransportError as exc:
                last, retry_after = f"connection error ({exc.__class__.__name__})", None
            except _Retryable as exc:
                last, retry_after = str(exc), exc.retry_after
            if attempt < self.config.max_retries:
                self.stats["retries"] += 1
                delay = self._backoff(attempt, retry_after)
                log.warning("item %d: %s; retry %d/%d in %.2f s", index, last, attempt + 1, self.config.max_retries, delay)
                await asyncio.sleep(delay)
        raise RewriteBackendError(
            f"{self.url}: item {index} failed after {self.config.max_retries + 1} attempts, last: {last}"
        )

    def _key_source(self) -> str:
        if self.config.api_key_secret_block:
            return f"Prefect Secret block {self.config.api_key_secret_block!r}"
        return f"env {self.config.api_key_env}"

    async def _run(self, sentences: list[str], seed: int) -> tuple[list[str], list[str | None]]:
        sem = asyncio.Semaphore(self.config.concurrency)
        limits = httpx.Limits(max_connections=self.config.concurrency, max_keepalive_connections=self.config.concurrency)
        async with httpx.AsyncClient(timeout=self.config.timeout_s, limits=limits) as client:

            async def guarded(i: int, s: str) -> tuple[str, str | None]:
                try:
                    return await self._one(client, sem, i, s, seed), None
                except _ItemError as exc:
                    return "", str(exc)

            tasks = [asyncio.create_task(guarded(i, s)) for i, s in enumerate(sentences)]
            try:
                results = await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        return [r[0] for r in results], [r[1] for r in results]

    def rewrite(self, sentences: list[str], seed: int) -> list[str]:
        if not sentences:
            self.last_errors = []
            return []
        coro = self._run(sentences, seed)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            outputs, errors = asyncio.run(coro)
        else:
            # Called from inside an event loop (e.g. an async flow): run in a thread of our own.
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                outputs, errors = pool.submit(asyncio.run, coro).result()
        self.last_errors = errors
        for i, err in enumerate(errors):
            if err:
                log.warning("item %d: %s", i, err)
        return outputs
