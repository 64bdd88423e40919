"""Escape probes against the limits and the process tree: fork, memory and CPU bombs, disk
and fd exhaustion, kill(-1), and a process left behind in a session of its own.

A probe that takes the hostile plugin down gets a fleet of its own (``fresh_fleet``); the
neighbour must answer afterwards all the same, and nothing of the hostile plugin may outlive
its unload (the ``no_leaks`` fixture checks the cgroups, this module the host's processes).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sandboxer import CallTimeout, MemoryLimitExceeded, PluginState

from .conftest import Fleet, unique_marker

pytestmark = [pytest.mark.usefixtures("no_leaks"), pytest.mark.asyncio(loop_scope="module")]


def host_processes_with(marker: str) -> list[int]:
    """Host pids whose command line carries ``marker`` (this process's own excluded)."""
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if needle in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


async def wait_for_state(fleet: Fleet, state: PluginState, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while fleet.hostile.state is not state:
        assert time.monotonic() < deadline, f"still {fleet.hostile.state}, not {state}"
        await asyncio.sleep(0.05)


def host_uid_of(fleet: Fleet) -> int:
    pid = fleet.hostile.handle.pid  # type: ignore[union-attr]  # the launcher, in the user ns
    return int(Path(f"/proc/{pid}/uid_map").read_text().split()[1])


async def test_a_fork_bomb_stops_at_the_pids_limit(fresh_fleet: Fleet) -> None:
    result = await fresh_fleet.probe("fork_bomb", timeout=30)
    assert result["errno"] == "EAGAIN", result
    assert 0 < result["made"] < fresh_fleet.hostile.sandbox.pids_limit  # type: ignore[union-attr]
    assert await fresh_fleet.probe("ping") == "pong"


async def test_a_memory_bomb_is_stopped_at_the_memory_limit(fresh_fleet: Fleet) -> None:
    limit = fresh_fleet.hostile.sandbox.memory_limit  # type: ignore[union-attr]
    with pytest.raises(MemoryLimitExceeded) as info:
        await fresh_fleet.hostile.call("memory_bomb", 4 * (limit >> 20), timeout=60)
    assert info.value.limit == limit
    await wait_for_state(fresh_fleet, PluginState.FAILED)
    await fresh_fleet.assert_contained()


async def test_a_cpu_spin_is_cut_off_by_the_call_timeout(fresh_fleet: Fleet) -> None:
    start = time.monotonic()
    with pytest.raises(CallTimeout):
        await fresh_fleet.hostile.call("spin", timeout=1.0)
    await wait_for_state(fresh_fleet, PluginState.FAILED)  # it ignored the cancel: killed
    assert time.monotonic() - start < 5
    await fresh_fleet.assert_contained()


@pytest.mark.parametrize(("path", "size"), [("/tmp/fill", 64 << 20), ("/dev/shm/fill", 16 << 20)],
                         ids=["tmp", "dev-shm"])
async def test_a_disk_fill_stops_at_the_tmpfs_size(fleet: Fleet, path: str, size: int) -> None:
    result = await fleet.probe("fill", path, timeout=60)
    assert result["errno"] == "ENOSPC", result
    assert size - (4 << 20) < result["written"] <= size


async def test_fd_exhaustion_stops_at_the_nofile_limit(fleet: Fleet) -> None:
    result = await fleet.probe("exhaust_fds")
    assert result["errno"] == "EMFILE", result
    nofile = fleet.hostile.sandbox.nofile  # type: ignore[union-attr]
    assert nofile - 16 < result["opened"] < nofile
    assert await fleet.probe("ping") == "pong"  # it closed them and goes on


async def test_kill_everyone_reaches_only_the_sandbox(fresh_fleet: Fleet) -> None:
    """kill(-1, SIGKILL) signals every process the caller may signal: with a pid namespace,
    only the sandbox's own. The witness runs on the host as the plugin's own host uid, so
    without the pid namespace it would die."""
    uid = host_uid_of(fresh_fleet) if os.geteuid() == 0 else os.geteuid()
    witness = subprocess.Popen(["sleep", "60"], user=uid, stdin=subprocess.DEVNULL)
    try:
        outcome = await fresh_fleet.probe("kill_everyone", int(signal.SIGKILL))
        await asyncio.sleep(0.2)
        assert witness.poll() is None, "kill(-1) in the sandbox killed a host process"
    finally:
        witness.kill()
        witness.wait()
    assert outcome in ({"ok": None}, {"errno": "ESRCH"}), outcome


async def test_a_setsid_orphan_does_not_outlive_the_plugin(fresh_fleet: Fleet) -> None:
    marker = unique_marker("orphan")
    inside = await fresh_fleet.probe("orphan", marker)
    assert isinstance(inside, int) and inside > 2, inside
    left = host_processes_with(marker)
    assert len(left) == 1, f"the orphan should be running on the host now: {left}"
    await fresh_fleet.manager.unload(fresh_fleet.hostile.id)
    deadline = time.monotonic() + 3
    while host_processes_with(marker) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert host_processes_with(marker) == [], "a process of the plugin outlived its unload"
    await fresh_fleet.assert_contained()
