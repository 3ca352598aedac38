"""One command as a whole process: its wall time, its peak RSS, and the times of its log lines.

Used by ``benchmarks/ingest.py --cli``. Peak RSS comes two ways:

* ``peak_rss_mb``: the largest single process of the command's tree, from the
  kernel (``wait4``'s ``ru_maxrss``: the command and every descendant it
  waited for), which misses nothing between samples;
* ``peak_tree_rss_mb``: the largest sum of RSS over the whole tree at once,
  sampled every ``poll_s`` with psutil, plus any processes ``extra_pids``
  names (a server the command starts in its own session, which leaves the
  tree). Pages that forked workers share count once per process, so this is
  an upper bound.

CPU seconds are the kernel's too: the command's and every descendant's it
waited for, plus every descendant it left running when it ended (a fork
server and its workers), which this process, a child subreaper, adopts and
reaps. Processes that ``extra_pids`` names (the local API server) are left out.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil

# Prefect's console lines start with the local time of the record.
_STAMP = re.compile(r"^(\d\d:\d\d:\d\d\.\d\d\d) \| (\w+)\s*\| (.*)$")


def _stamp_at(stamp: str, started: float) -> float:
    """Seconds from ``started`` to a Prefect ``HH:MM:SS.mmm`` stamp of the same day (or the next, past midnight)."""
    day = dt.date.fromtimestamp(started)
    at = dt.datetime.combine(day, dt.time.fromisoformat(stamp)).timestamp()
    return at + 86400 if at < started - 3600 else at


def _tree_rss(root: psutil.Process, extra: Iterable[int], descendants: set[int]) -> tuple[int, int]:
    """(sum, largest) RSS in bytes over ``root``, its descendants and the ``extra`` pids;
    adds the descendants' pids to ``descendants``."""
    procs = [root]
    try:
        procs += root.children(recursive=True)
    except psutil.Error:
        pass
    seen = {p.pid for p in procs}
    descendants.update(seen - {root.pid})
    procs += [psutil.Process(pid) for pid in extra if pid not in seen and psutil.pid_exists(pid)]
    total = largest = 0
    for p in procs:
        try:
            rss = p.memory_info().rss
        except psutil.Error:
            continue
        total += rss
        largest = max(largest, rss)
    return total, largest


def _adopt_orphans() -> bool:
    """Make this process the child subreaper of its descendants (Linux), so that the
    processes a command leaves running when it ends come back here to be reaped."""
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _reap_orphans(count: set[int], timeout_s: float = 60) -> tuple[float, int]:
    """(CPU seconds, largest RSS in bytes) of the adopted processes in ``count`` (the
    command's descendants but its servers), reaped as they end. Other adopted processes
    that have ended (an earlier command's server) are reaped and not counted; running
    ones are not waited for."""
    cpu, rss = 0.0, 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            pid, _, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            if not [c for c in psutil.Process().children() if c.pid in count]:
                break
            time.sleep(0.05)
            continue
        if pid in count:
            cpu += usage.ru_utime + usage.ru_stime
            rss = max(rss, usage.ru_maxrss * 1024)
    return cpu, rss


def measure(argv: list[str], *, cwd: str | Path, env: dict[str, str], marks: dict[str, str] | None = None,
            extra_pids: Callable[[], Iterable[int]] = lambda: (), poll_s: float = 0.2,
            timeout_s: float = 3600) -> dict:
    """Run ``argv`` to its end; its wall time, peak RSS, exit status, the seconds from its launch to the first
    Prefect log line containing each ``marks`` value (keyed as ``marks``), and its output's last lines.

    ``extra_pids`` is asked at every sample for processes outside the tree to count in ``peak_tree_rss_mb``.
    """
    marks = marks or {}
    found: dict[str, float] = {}
    lines: list[str] = []
    started = time.time()
    t0 = time.perf_counter()
    # Its own session, so that a run past its timeout can be ended with all its children.
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def read() -> None:
        for line in proc.stdout:
            arrived = time.time() - started
            lines.append(line)
            m = _STAMP.match(line)
            for key, text in marks.items():
                if key not in found and text in line:
                    # The record's own time where Prefect printed it, else when the line arrived.
                    found[key] = _stamp_at(m.group(1), started) - started if m else arrived

    adopting = _adopt_orphans()
    servers: set[int] = set()  # every pid extra_pids named: not the command's CPU
    descendants: set[int] = set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    root = psutil.Process(proc.pid)
    peak_sum = peak_one = 0
    status = None
    rusage = None
    while True:
        # wait4 rather than Popen.wait: its rusage is this command's alone (the largest of its waited-for tree).
        pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        extra = list(extra_pids())
        servers.update(extra)
        try:
            total, largest = _tree_rss(root, extra, descendants)
        except psutil.Error:
            total = largest = 0
        peak_sum, peak_one = max(peak_sum, total), max(peak_one, largest)
        if time.perf_counter() - t0 > timeout_s:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(poll_s)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    orphan_cpu, orphan_rss = _reap_orphans(descendants - servers - set(extra_pids())) if adopting else (0.0, 0)
    reader.join(timeout=10)
    return {
        "rc": proc.returncode,
        "wall_s": wall,
        **{f"{k}_s": v for k, v in found.items()},
        "cpu_s": rusage.ru_utime + rusage.ru_stime + orphan_cpu,
        "peak_rss_mb": max(rusage.ru_maxrss * 1024, orphan_rss, peak_one) / 2**20,  # Linux: ru_maxrss in KiB
        "peak_tree_rss_mb": peak_sum / 2**20,
        "output": lines,
    }
