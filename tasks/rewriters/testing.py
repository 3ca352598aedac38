"""A small real HTTP server that speaks OpenAI's /v1/chat/completions, for the
openai backend's tests and benchmark (no engine can run here).

It answers with keywords taken from the sentence. A marker at the start of
the sentence scripts a failure, counted per sentence so "once" markers fail
only the first attempt:

    [timeout-once] [429-once] [500-once] [503-always] [malformed] [empty]
    [nochoices] [echo] [400]

and junk a broken or overloaded endpoint gives:

    [slow]   always answers after ``slow_s`` (past a shorter client timeout)
    [html]   200 with an HTML page instead of JSON (a proxy's error page)
    [length] keywords cut off, ``finish_reason: "length"`` (max_tokens reached)

``healthy=True`` ignores every marker and answers all sentences well (the
same endpoint after it was fixed); ``requests`` counts the requests received.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_MARK = re.compile(r"^\[([a-z0-9-]+)\]\s*")


def _sentence(payload: dict) -> str:
    return payload["messages"][-1]["content"].strip()


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # many clients at once (some timing out) must all reach the handler


class FakeChatServer:
    """``with FakeChatServer() as srv: srv.base_url`` -> http://127.0.0.1:PORT/v1"""

    def __init__(
        self,
        latency_s: float = 0.0,
        slow_s: float = 2.0,
        retry_after: str = "0.3",
        api_key: str | None = None,
        healthy: bool = False,
    ):
        self.api_key = api_key  # when set, other keys get 401
        self.healthy = healthy
        self.latency_s = latency_s
        self.slow_s = slow_s
        self.retry_after = retry_after
        self.attempts: Counter[str] = Counter()
        self.auth_headers: list[str | None] = []
        self.request_times: dict[str, list[float]] = {}
        self.payloads: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                payload = json.loads(self.rfile.read(length))
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server._handle(self, payload)
                finally:
                    with server._lock:
                        server.in_flight -= 1

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def requests(self) -> int:
        with self._lock:
            return sum(self.attempts.values())

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    @staticmethod
    def completion(content: str | None, finish_reason: str = "stop") -> bytes:
        return json.dumps(
            {
                "id": "chatcmpl-test",
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}
                ],
            }
        ).encode()

    def _handle(self, h, payload: dict) -> None:
        sentence = _sentence(payload)
        with self._lock:
            self.attempts[sentence] += 1
            attempt = self.attempts[sentence]
            self.auth_headers.append(h.headers.get("Authorization"))
            self.request_times.setdefault(sentence, []).append(time.monotonic())
            self.payloads.append(payload)
        if self.api_key and h.headers.get("Authorization") != f"Bearer {self.api_key}":
            return h._send(401, b'{"error": "invalid api key"}')
        m = _MARK.match(sentence)
        mark = "" if self.healthy else (m.group(1) if m else "")
        if self.latency_s:
            time.sleep(self.latency_s)
        if (mark == "timeout-once" and attempt == 1) or mark == "slow":
            time.sleep(self.slow_s)
        elif mark == "429-once" and attempt == 1:
            return h._send(429, b'{"error": "rate limited"}', {"Retry-After": self.retry_after})
        elif mark == "500-once" and attempt == 1:
            return h._send(500, b'{"error": "boom"}')
        elif mark == "503-always":
            return h._send(503, b'{"error": "overloaded"}')
        elif mark == "400":
            return h._send(400, b'{"error": "prompt too long"}')
        elif mark == "malformed":
            return h._send(200, b'{"choices": [ {"message": ')
        elif mark == "nochoices":
            return h._send(200, b'{"choices": []}')
        elif mark == "empty":
            return h._send(200, self.completion(""))
        elif mark == "html":
            return h._send(200, b"<html><body><h1>502 Bad Gateway</h1></body></html>")
        if mark == "echo":  # the whole sentence back, as small models often do
            return h._send(200, self.completion(sentence))
        text = sentence[m.end():] if m else sentence
        words = [w.strip(".,;") for w in text.split()]
        if mark == "length":  # cut off mid-query, as at max_tokens
            return h._send(200, self.completion(", ".join(w for w in words[:2] if w) + ", Al", "length"))
        return h._send(200, self.completion(", ".join(w for w in words[:4] if w)))
