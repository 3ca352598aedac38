"""The shared local Prefect API of `gear` commands (``LocalApi``): one
server subprocess per PREFECT_HOME, on a copy of a migrated database template.

It imports nothing but the standard library: the server process imports
this module and then Prefect's server (``serve_local_api``), not the CLI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Python run as a subprocess: migrate an empty Prefect database and register the block
# types, the two things the server's start-up does to a new database (prefect/server/api/server.py).
_MIGRATE = """
import asyncio
from prefect.server.database import provide_database_interface
from prefect.server.models.block_registration import run_block_auto_registration

async def main():
    db = provide_database_interface()
    await db.create_db()
    async with await db.session() as session:
        await run_block_auto_registration(session=session)
    await (await db.engine()).dispose()

asyncio.run(main())
"""


def _sqlite_copy(source: Path, target: Path) -> None:
    """A consistent copy of an SQLite database (its write-ahead log included)."""
    import sqlite3

    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def migrated_template() -> Path:
    """An empty Prefect database with every migration applied and every block type registered,
    made once per Prefect version and set of installed Prefect collections (the block types
    the server would register at its start come from them).

    A new database costs the temporary server seconds of migrations at every start; a
    copy of this file costs milliseconds. It lives in PREFECT_HOME and is only ever
    copied from, so any number of `gear` processes share it; it is published by rename,
    so two processes making it at once each publish a whole file."""
    import hashlib
    from importlib.metadata import entry_points, version

    collections = sorted(f"{ep.dist.name}={ep.dist.version}" for ep in entry_points(group="prefect.collections") if ep.dist)
    key = hashlib.sha256("\n".join(collections).encode()).hexdigest()[:8]
    home = prefect_home()
    template = home / f"gear-api-template-prefect-{version('prefect')}-{key}.db"
    if template.is_file():
        return template
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".gear-api-template-", dir=home) as tmp:
        fresh = Path(tmp) / "prefect.db"
        env = {**os.environ, "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{fresh}"}
        subprocess.run([sys.executable, "-c", _MIGRATE], env=env, check=True, stdout=subprocess.DEVNULL)
        _sqlite_copy(fresh, Path(tmp) / "published.db")
        os.replace(Path(tmp) / "published.db", template)
    return template


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


class LocalApi:
    """The Prefect API of `gear` commands run without PREFECT_API_URL: one server subprocess
    per PREFECT_HOME, shared by the commands that run at once or one after another.

    Without PREFECT_API_URL, Prefect would start a temporary server in every process the
    first time a flow asks for its API (importing the whole server in that process, then
    starting it in another and migrating a new database: seconds before the first task),
    on PREFECT_HOME's prefect.db, one SQLite file that two runs at once fight over. Instead
    the first `gear` starts the same server (uvicorn on Prefect's app factory, UI off,
    ephemeral services; ``serve_local_api``) before its own imports, so the two overlap, on
    a copy of ``migrated_template()`` in a temporary folder (no migrations), and later
    commands find it in ``PREFECT_HOME/gear-api-<prefect version>/server.json``. One server
    owns the database, so commands at once never contend for its lock. PREFECT_API_URL
    points the run at it; every process the run starts (worker processes, local Dask or
    Ray clusters) inherits the address.

    Every `gear` holds a shared lock on ``clients.lock`` for its whole life (the kernel
    drops it when the process ends, however it ends); the server stops, and removes its
    database, once it has been able to take that lock exclusively for
    GEAR_API_IDLE_SECONDS (default 300; 0: as soon as no `gear` uses it). Result storage
    and the stage folders (what makes a re-run cheap) stay where they are.
    """

    def __init__(self) -> None:
        import fcntl
        from importlib.metadata import version

        self.home = prefect_home() / f"gear-api-{version('prefect')}"
        self.home.mkdir(parents=True, exist_ok=True)
        # Kept open for this process's life: while any `gear` holds it, the server stays.
        self._clients = open(self.home / "clients.lock", "a+")
        fcntl.flock(self._clients, fcntl.LOCK_SH)
        self.port = self.pid = 0
        self.database_url = ""
        self._find_or_launch()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _find_or_launch(self, replace: int | None = None) -> None:
        """The running server of this PREFECT_HOME, else a new one (``replace``: a pid known dead)."""
        import fcntl
        import json

        with open(self.home / "start.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                info = json.loads((self.home / "server.json").read_text())
            except (OSError, ValueError):
                info = None
            if info is None or info["pid"] == replace or not _alive(info["pid"]):
                info = self._launch()
        self.port, self.pid, self.database_url = info["port"], info["pid"], info["database"]
        os.environ["PREFECT_API_URL"] = self.api_url
        # The server serves no UI: no "View at" link to a page that is not there.
        os.environ.setdefault("PREFECT_UI_URL", "")

    def _launch(self) -> dict[str, Any]:
        import json
        import socket

        with socket.socket() as sock:  # a free port; should another process take it first, wait() relaunches
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        folder = tempfile.mkdtemp(prefix="gear-prefect-")  # the server's database; it removes it when it stops
        env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_UI_URL")}
        with open(self.home / "server.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", "import sys; from flows.local_api import serve_local_api; serve_local_api(*sys.argv[1:])",
                 str(self.home), str(port), folder],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        info = {"port": port, "pid": proc.pid, "database": f"sqlite+aiosqlite:///{folder}/prefect.db"}
        tmp = self.home / f".server.json.{os.getpid()}"
        tmp.write_text(json.dumps(info))
        os.replace(tmp, self.home / "server.json")
        return info

    def wait(self) -> None:
        """Return once the API answers its health check (raise if the server cannot start)."""
        import urllib.request

        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS") or 90)
        deadline, relaunches = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if not _alive(self.pid):
                if relaunches == 3:
                    raise RuntimeError(f"the Prefect API server exited before answering (see {self.home / 'server.log'})")
                relaunches += 1
                self._find_or_launch(replace=self.pid)
                continue
            time.sleep(0.05)
        raise RuntimeError(f"the Prefect API server did not answer within {timeout:.0f} s "
                           f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS; see {self.home / 'server.log'})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A child of this process that has exited stays a zombie until reaped.
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def serve_local_api(home: str, port: str, folder: str) -> None:
    """The shared server of ``LocalApi`` (run in its own process and session): Prefect's API
    on ``port`` over a copy of the migrated template in ``folder``, until no `gear` has held
    ``clients.lock`` for GEAR_API_IDLE_SECONDS; then ``folder`` is removed."""
    import fcntl
    import json
    import signal
    import threading

    folder = Path(folder)
    try:
        _sqlite_copy(migrated_template(), folder / "prefect.db")
        os.environ.update({"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
                           "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{folder}/prefect.db",
                           # The template is migrated and has the block types: no alembic check, no
                           # collection imports and registry hash for the memo of a registration that is off.
                           "PREFECT_SERVER_DATABASE_MIGRATE_ON_START": "false",
                           "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
                           "PREFECT_SERVER_MEMOIZE_BLOCK_AUTO_REGISTRATION": "false"})
        import uvicorn

        server = uvicorn.Server(uvicorn.Config("prefect.server.api.server:create_app", factory=True, host="127.0.0.1",
                                               port=int(port), log_level="error", lifespan="on"))
        idle_s = float(os.environ.get("GEAR_API_IDLE_SECONDS") or 300)
        info = Path(home) / "server.json"

        def forget() -> None:
            """Remove server.json if it names this server."""
            try:
                if json.loads(info.read_text())["pid"] == os.getpid():
                    info.unlink()
            except (OSError, ValueError):
                pass

        def stop_when_idle() -> None:
            clients = open(Path(home) / "clients.lock", "a+")
            idle_since = None
            while not server.should_exit:
                time.sleep(0.5)
                try:
                    fcntl.flock(clients, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    idle_since = None
                    continue
                idle_since = idle_since or time.monotonic()
                if time.monotonic() - idle_since >= idle_s:
                    # The exclusive lock is kept until this process ends: a `gear` that starts
                    # now waits for it, then finds no server.json and starts a new server.
                    forget()
                    server.should_exit = True
                    return
                fcntl.flock(clients, fcntl.LOCK_UN)

        # uvicorn stops on SIGTERM, then raises it again under the handler it found: let that
        # one end the process through Python, so this cleans up as when the server goes idle.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        threading.Thread(target=stop_when_idle, daemon=True).start()
        try:
            server.run()
        finally:
            forget()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
