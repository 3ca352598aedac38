"""A real local Prefect stack for tests: server, process worker, deployments.

It drives the same scripts a person uses (scripts/prefect-server.sh,
scripts/prefect-worker.sh, scripts/deploy.sh, scripts/prefect.sh) with the
state folder in a temporary directory and a free loopback port, and talks to
the API over plain HTTP, so the test process's own Prefect settings (and the
session's test harness) are left alone.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def output_dir_for(name: str) -> Path:
    """Where a test leaves screenshots and logs: <repo>/test-output/<name> (git-ignored)."""
    root = Path(os.environ.get("GEAR_TEST_OUTPUT", REPO / "test-output"))
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    return out


class PrefectStack:
    def __init__(self, home: Path, port: int | None = None):
        self.home = Path(home)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.url}/api"
        self.env = dict(os.environ)
        # The test process may carry settings of its own harness; the stack
        # gets only what the scripts set.
        for key in list(self.env):
            if key.startswith("PREFECT_"):
                del self.env[key]
        self.env.update(
            GEAR_PREFECT_HOME=str(self.home),
            GEAR_PREFECT_PORT=str(self.port),
            GEAR_PREFECT_HOST="127.0.0.1",
            # Poll often so a test does not wait the default 10-15 s per run.
            PREFECT_WORKER_QUERY_SECONDS="2",
            PREFECT_WORKER_HEARTBEAT_SECONDS="10",
        )
        # The prefect beside the interpreter running the tests.
        if (Path(sys.executable).parent / "prefect").exists():
            self.env["GEAR_PREFECT_BIN"] = str(Path(sys.executable).parent)
        self.timings: dict[str, float] = {}
        self.client = httpx.Client(base_url=self.api, timeout=30)

    # ---------------------------------------------------------------- scripts

    def sh(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            list(args), cwd=REPO, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                f"\n--- stderr\n{proc.stderr[-4000:]}\n{self.log_tails()}"
            )
        return proc

    def timed(self, label: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        t0 = time.monotonic()
        proc = self.sh(*args, timeout=timeout)
        self.timings[label] = round(time.monotonic() - t0, 1)
        return proc

    def start_server(self, timeout: float = 240) -> None:
        self.timed("server_start_s", str(SCRIPTS / "prefect-server.sh"), "start", str(int(timeout)), timeout=timeout + 30)

    def start_worker(self, pool: str = "gear-local") -> None:
        self.timed("worker_start_s", str(SCRIPTS / "prefect-worker.sh"), "start", pool, timeout=240)

    def deploy(self, *names: str, timeout: float = 600) -> str:
        return self.timed("deploy_s", str(SCRIPTS / "deploy.sh"), *names, timeout=timeout).stdout

    def prefect(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return self.sh(str(SCRIPTS / "prefect.sh"), *args, timeout=timeout, check=check)

    def stop(self) -> None:
        """Stop worker(s) and server; falls back to killing their process groups."""
        run_dir = self.home / "run"
        for pidfile in sorted(run_dir.glob("worker-*.pid")):
            pool = pidfile.stem.removeprefix("worker-")
            self.sh(str(SCRIPTS / "prefect-worker.sh"), "stop", pool, timeout=60, check=False)
        self.sh(str(SCRIPTS / "prefect-server.sh"), "stop", timeout=60, check=False)
        for pidfile in run_dir.glob("*.pid"):  # scripts failed to stop it
            try:
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)
            except (ValueError, ProcessLookupError, PermissionError):
                pass
        self.client.close()

    # -------------------------------------------------------------------- API

    def deployment(self, name: str) -> dict[str, Any]:
        flow, dep = name.split("/")
        r = self.client.get(f"/deployments/name/{flow}/{dep}")
        r.raise_for_status()
        return r.json()

    def create_run(self, name: str, parameters: dict[str, Any]) -> httpx.Response:
        dep = self.deployment(name)
        return self.client.post(f"/deployments/{dep['id']}/create_flow_run", json={"parameters": parameters})

    def flow_run(self, run_id: str) -> dict[str, Any]:
        r = self.client.get(f"/flow_runs/{run_id}")
        r.raise_for_status()
        return r.json()

    def flow_runs(self, deployment_name: str) -> list[dict[str, Any]]:
        dep = self.deployment(deployment_name)
        r = self.client.post(
            "/flow_runs/filter",
            json={"deployments": {"id": {"any_": [dep["id"]]}}, "sort": "EXPECTED_START_TIME_DESC"},
        )
        r.raise_for_status()
        return r.json()

    def wait_for_run(self, run_id: str, timeout: float) -> dict[str, Any]:
        t0 = time.monotonic()
        while True:
            run = self.flow_run(run_id)
            state = (run.get("state") or {}).get("type")
            if state in TERMINAL:
                self.timings.setdefault("runs_s", {})[run_id] = round(time.monotonic() - t0, 1)
                return run
            if time.monotonic() - t0 > timeout:
                raise AssertionError(
                    f"flow run {run_id} still {state} after {timeout:.0f}s\n{self.run_logs(run_id)}\n{self.log_tails()}"
                )
            time.sleep(2)

    def run_logs(self, run_id: str, limit: int = 200) -> str:
        try:
            r = self.client.post(
                "/logs/filter",
                json={"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_ASC", "limit": limit},
            )
            return "\n".join(f"{x['timestamp'][11:19]} {x['name']}: {x['message']}" for x in r.json())
        except Exception as exc:  # diagnostics only
            return f"(no run logs: {exc})"

    def wait_for_logs(self, run_id: str, *needles: str, timeout: float = 30.0) -> str:
        """The run's logs once they hold every needle (or at the timeout): a run's last log
        lines reach the API in a batch that can land after its final state."""
        deadline = time.monotonic() + timeout
        while True:
            logs = self.run_logs(run_id)
            if all(n in logs for n in needles) or time.monotonic() > deadline:
                return logs
            time.sleep(0.5)

    def artifacts(self, run_id: str) -> list[dict[str, Any]]:
        r = self.client.post("/artifacts/filter", json={"artifacts": {"flow_run_id": {"any_": [run_id]}}})
        r.raise_for_status()
        return r.json()

    # ------------------------------------------------------------ diagnostics

    def log_tails(self, n: int = 60) -> str:
        parts = []
        for log in sorted((self.home / "logs").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-n:]
            parts.append(f"--- {log} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    @contextmanager
    def diagnostics(self, out_dir: Path | None = None) -> Iterator[None]:
        """On failure, print server and worker logs (pytest shows them) and copy them to out_dir."""
        try:
            yield
        except BaseException:
            print(self.log_tails(200))
            if out_dir is not None:
                for log in (self.home / "logs").glob("*.log"):
                    (out_dir / log.name).write_text(log.read_text(errors="replace"))
            raise


def parse_run_id(cli_output: str) -> str:
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", cli_output)
    assert m, f"no flow run id in:\n{cli_output}"
    return m.group(1)


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
