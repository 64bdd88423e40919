"""The VM suite for a guest booted with systemd's legacy cgroup v1 layout
(systemd.unified_cgroup_hierarchy=0): the limits through sandboxer's v1 backend. Run inside
the guest by tests/vm/test_stage.py, like guest_v2.py; figures go to ``record_property``.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import FORK_BOMB
from sandboxer import MemoryLimitExceeded, PluginManager, load_plugin

from .guest_v2 import cycle_plugins, keyed, load_unload_cycles, python_plugin, quarter_cpu_spinner

pytestmark = pytest.mark.timeout(600)

CGROUP_ROOT = Path("/sys/fs/cgroup")
Record = Callable[[str, object], None]


def hierarchy_of(pid: int | str, controller: str) -> Path:
    """The cgroup directory of ``pid`` in the v1 hierarchy that holds ``controller``."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            mount = next(d for d in CGROUP_ROOT.iterdir() if controller in d.name.split(","))
            return mount / path.lstrip("/")
    raise AssertionError(f"process {pid} is in no {controller} hierarchy")


def sandboxer_cgroups() -> list[str]:
    return [str(p) for p in CGROUP_ROOT.glob("*/**/sandboxer-*") if p.is_dir()]


@pytest.fixture(autouse=True)
def no_cgroup_left() -> Any:
    yield
    assert sandboxer_cgroups() == [], "sandboxer cgroups left behind"


def test_the_guest_has_the_systemd_v1_layout(record_property: Record) -> None:
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    v1 = {m[1].rpartition("/")[2] for m in mounts if m[2] == "cgroup"}
    assert {"memory", "pids"} <= v1 and any("cpuacct" in h for h in v1), v1
    out = subprocess.run(["sandboxer", "doctor", "--json"], capture_output=True, text=True,
                         timeout=300, check=False)
    cgroups = json.loads(out.stdout)["cgroups"]
    record_property("hierarchies", " ".join(sorted(v1)))
    record_property("doctor_cgroups", json.dumps(cgroups))
    assert cgroups["ok"] and cgroups["version"] == 1, cgroups


async def test_memory_limit_oom_is_reported_with_its_peak(tmp_path: Path,
                                                          record_property: Record) -> None:
    code = "def hog(mib):\n    block = bytearray(mib << 20)\n    return len(block)\n"
    limit = 96 << 20
    async with PluginManager() as mgr:
        root = python_plugin(tmp_path / "p", code)
        sandbox = mgr.resolve_sandbox(load_plugin(root)).replace(memory_limit=limit)
        p = await mgr.load(root, sandbox=sandbox)
        group = hierarchy_of(p.handle.pid, "memory")  # type: ignore[union-attr]
        assert int((group / "memory.limit_in_bytes").read_text()) == limit
        with pytest.raises(MemoryLimitExceeded) as info:
            await p.call("hog", 400, timeout=120)
    record_property("memory_limit_bytes", limit)
    record_property("memory_peak_bytes", info.value.peak)
    assert info.value.limit == limit
    assert info.value.peak is not None and limit - (8 << 20) <= info.value.peak <= limit


async def test_cfs_quota_holds_a_spinning_plugin_to_a_quarter_cpu(
        tmp_path: Path, record_property: Record) -> None:
    async with quarter_cpu_spinner(tmp_path) as p:
        cpu = hierarchy_of(p.handle.pid, "cpu")  # type: ignore[union-attr]
        acct = hierarchy_of(p.handle.pid, "cpuacct")  # type: ignore[union-attr]
        assert int((cpu / "cpu.cfs_quota_us").read_text()) == 25000
        before, throttled = int((acct / "cpuacct.usage").read_text()), keyed(cpu / "cpu.stat")
        start = time.monotonic()
        await p.call("spin", 4.0, timeout=60)
        used = (int((acct / "cpuacct.usage").read_text()) - before) / 1e9
        wall = time.monotonic() - start
        throttles = keyed(cpu / "cpu.stat")["nr_throttled"] - throttled["nr_throttled"]
    record_property("cpu_s_per_s", round(used / wall, 3))
    record_property("nr_throttled", throttles)
    assert 0.15 <= used / wall <= 0.3, f"{used:.2f} CPU-s in {wall:.2f} s"
    assert throttles > 0


async def test_pids_max_stops_a_fork_bomb(tmp_path: Path, record_property: Record) -> None:
    code = FORK_BOMB
    async with PluginManager() as mgr:
        p = await mgr.load(python_plugin(tmp_path / "p", code))
        group = hierarchy_of(p.handle.pid, "pids")  # type: ignore[union-attr]
        pids_max = int((group / "pids.max").read_text())
        result = await p.call("bomb", timeout=120)
        current = int((group / "pids.current").read_text())
    record_property("pids_max", pids_max)
    record_property("forks_made", result["made"])
    assert result["errno"] == 11 and 0 < result["made"] < pids_max, result
    assert current <= pids_max


async def test_load_unload_cycles_leave_no_cgroup(tmp_path: Path, record_property: Record) -> None:
    seconds = await load_unload_cycles(cycle_plugins(tmp_path, 2), 10)
    record_property("cycles", 20)
    record_property("seconds_per_cycle", round(seconds, 3))
    assert sandboxer_cgroups() == []
