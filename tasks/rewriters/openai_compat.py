"""OpenAI-compatible backend: POST /chat/completions to any server that speaks
the protocol (above all ``vllm serve``, shared by many workers).

- async httpx, at most ``concurrency`` requests in flight (a semaphore);
- per-request timeout; retries with exponential back-off and full jitter on
  429, 5xx, connection errors and timeouts, honouring ``Retry-After``;
- every item that gets no usable answer is a per-item failure, output "" and
  ``"<kind>: <detail>"`` in ``last_errors`` (kinds in ``base.ERROR_KINDS``):
  a transport failure that outlives its retries (timeout, connection, 5xx,
  429), or a well-transported but unusable answer (not JSON, no choices,
  empty content, a 4xx for this one prompt; not retried here). The stage
  keeps such items out of its finished rows, sends them again on a re-run
  and fails past ``max_error_rate``;
- when ``max(8, concurrency)`` items in a row exhaust their retries on
  transport failures with no success between, the endpoint is down: the
  items not yet sent are not sent (kind ``aborted``), so a dead endpoint
  costs one round of retries, not one per item;
- 401/403/404/405 are wrong for every prompt (key, URL, model):
  ``RewriteConfigError`` at once;
- ``finish_reason`` is read: "length" (max_tokens reached) reaches the
  stage in ``last_finish_reasons`` and the gate drops it as ``truncated``;
- the API key comes from an environment variable or a Prefect Secret block
  and is never put in a repr, a log line or an error message; nor is the
  user info or query string of ``base_url`` (messages name ``redact_url``'s form).
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

from urllib.parse import urlsplit, urlunsplit

from tasks.rewriters.base import RewriteConfigError, Rewriter, item_error
from tasks.rewriters.config import RewriteConfig, redact_url
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

    def __init__(self, kind: str, detail: str):
        super().__init__(item_error(kind, detail))
        self.kind = kind


# Transport failures past their retries: several in a row mean the endpoint is down.
_TRANSPORT_KINDS = frozenset({"timeout", "connection", "http_5xx"})


def _status_kind(status: int) -> str:
    if status == 408:
        return "timeout"
    return "http_5xx" if status >= 500 else "http_4xx"


def completions_url(base_url: str) -> tuple[str, httpx.BasicAuth | None]:
    """``base_url`` + /chat/completions (a query string kept after the path), and
    the URL's user info as basic auth: out of the URL, so that no log line
    (httpx logs every request's URL) can show it."""
    parts = urlsplit(base_url)
    auth = None
    if parts.username is not None or parts.password is not None:
        from urllib.parse import unquote

        auth = httpx.BasicAuth(unquote(parts.username or ""), unquote(parts.password or ""))
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=host)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions")), auth


class _RedactUrl(logging.Filter):
    """Shows ``url`` (which may carry a key in its query string) as ``shown`` in
    the records of httpx's logger (its "HTTP Request: POST <url> ..." lines)."""

    def __init__(self, url: str, shown: str):
        super().__init__()
        self.url, self.shown = url, shown

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(str(a) == self.url for a in record.args):
            record.args = tuple(self.shown if str(a) == self.url else a for a in record.args)
        return True


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


def parse_choice(body: bytes) -> tuple[str, str | None]:
    """The first choice's message content and finish_reason; ``_ItemError`` says what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _ItemError("non_json", f"malformed JSON in response: {exc.__class__.__name__}") from None
    if not isinstance(data, dict):
        raise _ItemError("non_json", "response is not a JSON object")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _ItemError("no_choices", "response has no choices")
    message = choices[0].get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str) or not content.strip():
        raise _ItemError("empty", "response has empty content")
    finish = choices[0].get("finish_reason")
    return content, finish if isinstance(finish, str) else None


def parse_completion(body: bytes) -> str:
    """The first choice's message content; ``_ItemError`` says what is wrong."""
    return parse_choice(body)[0]


class OpenAIRewriter(Rewriter):
    def __init__(self, config: RewriteConfig):
        self.config = config
        self.model_name = config.resolved_model()
        self.use_examples = config.worked_examples_on()
        self.url, self._auth = completions_url(config.base_url)  # the query may hold a key: requests only
        self.endpoint = redact_url(self.url)  # what messages show
        self._api_key = resolve_api_key(config)
        self.last_errors = []
        self.last_finish_reasons = []
        self.stats = {"requests": 0, "retries": 0, "aborted": 0}
        self.abort_after = max(8, config.concurrency)

    def __repr__(self) -> str:
        return f"OpenAIRewriter(url={self.endpoint!r}, model={self.model_name!r}, api_key={self._api_key!r})"

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

    async def _one(
        self, client: httpx.AsyncClient, sem: asyncio.Semaphore, index: int, sentence: str, seed: int
    ) -> tuple[str, str | None]:
        payload = self._payload(sentence, seed)
        last, kind = "no attempt", "connection"
        for attempt in range(self.config.max_retries + 1):
            try:
                async with sem:
                    if self._down.is_set():
                        self.stats["aborted"] += 1
                        raise _ItemError(
                            "aborted", f"not sent: {self.abort_after} items in a row had failed at {self.endpoint}"
                        )
                    self.stats["requests"] += 1
                    resp = await client.post(self.url, json=payload, headers=self._headers())
                if resp.status_code in RETRY_STATUS:
                    raise _Retryable(f"HTTP {resp.status_code}", parse_retry_after(resp.headers.get("retry-after")))
                if resp.status_code in FATAL_STATUS:
                    raise RewriteConfigError(
                        f"{self.endpoint} answered HTTP {resp.status_code} for model {self.model_name!r} "
                        f"(check base_url, model and the API key source {self._key_source()})"
                    )
                if resp.status_code >= 400:
                    raise _ItemError(_status_kind(resp.status_code), f"HTTP {resp.status_code}: {resp.text[:200]}")
                return parse_choice(resp.content)
            except httpx.TimeoutException as exc:
                last, kind, retry_after = f"timeout ({exc.__class__.__name__})", "timeout", None
            except httpx.TransportError as exc:
                last, kind, retry_after = f"connection error ({exc.__class__.__name__})", "connection", None
            except _Retryable as exc:
                last, retry_after = str(exc), exc.retry_after
                kind = _status_kind(int(last.split()[-1]))
            if attempt < self.config.max_retries and not self._down.is_set():
                self.stats["retries"] += 1
                delay = self._backoff(attempt, retry_after)
                log.warning("item %d: %s; retry %d/%d in %.2f s", index, last, attempt + 1, self.config.max_retries, delay)
                await asyncio.sleep(delay)
        raise _ItemError(kind, f"failed after {attempt + 1} attempts, last: {last}")

    def _key_source(self) -> str:
        if self.config.api_key_secret_block:
            return f"Prefect Secret block {self.config.api_key_secret_block!r}"
        return f"env {self.config.api_key_env}"

    async def _run(self, sentences: list[str], seed: int) -> list[tuple[str, str | None, str | None]]:
        sem = asyncio.Semaphore(self.config.concurrency)
        limits = httpx.Limits(max_connections=self.config.concurrency, max_keepalive_connections=self.config.concurrency)
        self._down = asyncio.Event()
        failing = [0]  # items in a row that exhausted their retries on transport failures

        redact = _RedactUrl(self.url, self.endpoint) if self.url != self.endpoint else None
        if redact:
            logging.getLogger("httpx").addFilter(redact)
        try:
            return await self._gather(sentences, seed, sem, limits, failing)
        finally:
            if redact:
                logging.getLogger("httpx").removeFilter(redact)

    async def _gather(self, sentences, seed, sem, limits, failing) -> list[tuple[str, str | None, str | None]]:
        async with httpx.AsyncClient(timeout=self.config.timeout_s, limits=limits, auth=self._auth) as client:

            async def guarded(i: int, s: str) -> tuple[str, str | None, str | None]:
                try:
                    text, finish = await self._one(client, sem, i, s, seed)
                except _ItemError as exc:
                    if exc.kind in _TRANSPORT_KINDS:
                        failing[0] += 1
                        if failing[0] >= self.abort_after and not self._down.is_set():
                            log.error(
                                "%s: %d items in a row failed (last: %s); not sending the rest of this batch",
                                self.endpoint, failing[0], exc,
                            )
                            self._down.set()
                    return "", str(exc), None
                failing[0] = 0
                return text, None, finish

            tasks = [asyncio.create_task(guarded(i, s)) for i, s in enumerate(sentences)]
            try:
                results = await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
        return results

    def rewrite(self, sentences: list[str], seed: int) -> list[str]:
        if not sentences:
            self.last_errors, self.last_finish_reasons = [], []
            return []
        coro = self._run(sentences, seed)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            results = asyncio.run(coro)
        else:
            # Called from inside an event loop (e.g. an async flow): run in a thread of our own.
            import concurrent.futures

            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                results = pool.submit(asyncio.run, coro).result()
        outputs = [r[0] for r in results]
        self.last_errors = [r[1] for r in results]
        self.last_finish_reasons = [r[2] for r in results]
        aborted = 0
        for i, err in enumerate(self.last_errors):
            if err and err.startswith("aborted:"):
                aborted += 1
            elif err:
                log.warning("%s: item %d: %s", self.endpoint, i, err)
        if aborted:
            log.warning("%s: %d items not sent (the endpoint was failing)", self.endpoint, aborted)
        return outputs
