"""Python programs outside and under ``sandboxer exec``: multiprocessing under each start
method (fork, spawn, forkserver), concurrent.futures, a Manager, shared memory and
semaphores; and a program that talks to itself (asyncio over 127.0.0.1, UDP over ::1, unix
sockets, threads, subprocess pipelines, signals, fork, sqlite3, ssl, zoneinfo)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import same

pytestmark = pytest.mark.timeout(240)


def test_multiprocessing_runs_the_same_under_every_start_method(programs: Path) -> None:
    outside, _ = same(["python3", f"{programs}/multiproc.py"], allow=[str(programs)],
                      timeout=120)
    for method in ("fork", "spawn", "forkserver"):
        assert f"{method} barrier ['past the barrier', 'past the barrier']" in outside.stdout
        assert f"{method} exit code 5" in outside.stdout
    assert "manager [('a', 1), ('b', 2)] [1, 2, 3] set" in outside.stdout


def test_a_program_talking_to_itself_runs_the_same(programs: Path) -> None:
    outside, _ = same(["python3", f"{programs}/selftalk.py"], allow=[str(programs)])
    assert "asyncio tcp OVER TCP" in outside.stdout and "udp6 over udp6" in outside.stdout
