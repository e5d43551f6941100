"""A busy machine made on purpose: processes spinning on every core the caller may use.

``start_detached`` starts them through a launcher that exits at once, so they are not the caller's
descendants (the noise guard counts a process's descendants as its own work, and these must be others);
``stop`` ends them by pid. Each spinner also stops by itself after ``seconds``.

Loaded into a pytest run with ``-p spinner`` (tests/ on PYTHONPATH), it keeps the cores busy for the
duration of each test's call phase only.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

SPIN = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
LAUNCH = ("import subprocess, sys\n"
          "procs = [subprocess.Popen([sys.executable, '-c', sys.argv[1]], stdin=subprocess.DEVNULL, "
          "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(int(sys.argv[2]))]\n"
          "print(' '.join(str(p.pid) for p in procs))\n")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def start_detached(count: int | None = None, seconds: float = 60) -> list[int]:
    """``count`` spinners (default: one per core), not descendants of this process; their pids."""
    out = subprocess.run([sys.executable, "-c", LAUNCH, SPIN.format(seconds=seconds), str(count or cores())],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return [int(pid) for pid in out.split()]


def start_children(count: int | None = None, seconds: float = 60) -> list[subprocess.Popen]:
    """The same, as children of this process (its own work, for the noise guard)."""
    return [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)]) for _ in range(count or cores())]


def stop(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    pids = start_detached(seconds=120)
    try:
        return (yield)
    finally:
        stop(pids)
