"""Plugins through the manager with the real sandbox: isolation, limits, crashes, cleanup."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, FORK_BOMB
from sandboxer import (
    CallTimeout,
    HostConfig,
    MemoryLimitExceeded,
    PluginCrashed,
    PluginManager,
    PluginState,
    PluginStateError,
    SandboxConfig,
    SandboxUnavailable,
    load_plugin,
)

pytestmark = pytest.mark.usefixtures("no_leaks")
S = PluginState


def python_plugin(root: Path, code: str, *, plugin_id: str = "probe", extra: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "plugin.py").write_text(code)
    (root / "plugin.toml").write_text(
        f'[plugin]\nid = "{plugin_id}"\nversion = "1.0.0"\ntype = "python"\n'
        f'entrypoint = "plugin.py"\n{extra}')
    return root


@pytest.fixture(scope="module")
def native_c() -> Path:
    subprocess.run(["make", "-s", "-C", str(EXAMPLES / "native-c")], check=True, timeout=120)
    return EXAMPLES / "native-c"


async def test_python_plugin_runs_in_the_sandbox(tmp_path):
    code = ("import os\n"
            "def who():\n"
            "    return {'uid': os.getuid(), 'pid': os.getpid(), 'cwd': os.getcwd(),\n"
            "            'hostname': os.uname().nodename, 'etc': sorted(os.listdir('/etc'))}\n")
    async with PluginManager() as mgr:
        p = await mgr.load(python_plugin(tmp_path / "p", code))
        assert p.sandbox is not None and p.sandbox.enabled
        assert p.fallbacks == () and p.to_json()["fallbacks"] == []  # fully enforced
        who = await p.call("who")
        assert who["uid"] == 1000 and who["cwd"] == "/plugin" and who["hostname"] == "sandbox"
        assert "shadow" not in who["etc"] and "passwd" in who["etc"]
        assert who["pid"] < 10  # a fresh pid namespace
        stats = p.statistics()
        assert stats.peak_memory_bytes and stats.peak_memory_bytes > 1 << 20
        assert stats.cpu_time_s and stats.cpu_time_s > 0


async def test_native_crash_fails_the_plugin_and_spares_its_neighbour(native_c, tmp_path):
    async with PluginManager() as mgr:
        events = mgr.events()
        neighbour = await mgr.load(EXAMPLES / "hello")
        crasher = await mgr.load(native_c)
        group = crasher.handle.cgroup_path
        assert group is not None and os.path.isdir(group)
        assert await crasher.call("add", 2, 3) == 5
        with pytest.raises(PluginCrashed) as info:
            await crasher.call("crash")
        assert info.value.signal == 11
        async with asyncio.timeout(5):
            async for event in events:
                if event.plugin_id == crasher.id and event.state is S.FAILED:
                    break
        assert crasher.state is S.FAILED and isinstance(crasher.error, PluginCrashed)
        with pytest.raises(PluginStateError):
            await crasher.call("add", 1, 1)
        assert await neighbour.call("greet", "still here") == "Hello, still here!"
        await mgr.unload(crasher.id)
        # unload waits for the failed generation's close (it may still be running): its
        # cgroup is gone the moment unload returns (the neighbour's, and the warm
        # sandboxes', are not)
        assert not os.path.exists(group), "the crashed plugin's cgroup outlived unload"


async def test_memory_limit_is_reported_with_limit_and_peak(tmp_path):
    code = "def hog(mib):\n    block = bytearray(mib << 20)\n    return len(block)\n"
    async with PluginManager() as mgr:
        root = python_plugin(tmp_path / "p", code)
        sandbox = mgr.resolve_sandbox(load_plugin(root)).replace(memory_limit=96 << 20)
        p = await mgr.load(root, sandbox=sandbox)
        assert await p.call("hog", 8) == 8 << 20
        with pytest.raises(MemoryLimitExceeded) as info:
            await p.call("hog", 400)
        assert info.value.limit == 96 << 20
        assert info.value.peak is not None and info.value.peak >= 90 << 20


async def test_cpu_quota_throttles_a_spinning_plugin(tmp_path):
    code = ("import time\n"
            "def spin(seconds):\n"
            "    end = time.monotonic() + seconds\n"
            "    while time.monotonic() < end:\n"
            "        pass\n")
    async with PluginManager() as mgr:
        root = python_plugin(tmp_path / "p", code, extra='\n[sandbox]\ncpu_limit = 0.25\n')
        p = await mgr.load(root)
        before = p.statistics().cpu_time_s or 0.0
        start = time.monotonic()
        await p.call("spin", 2.0, timeout=10)
        wall = time.monotonic() - start
        used = (p.statistics().cpu_time_s or 0.0) - before
        assert used / wall <= 0.3, f"{used:.2f} CPU-s in {wall:.2f} s"


async def test_a_call_that_ignores_its_timeout_gets_the_plugin_killed(tmp_path):
    code = "import time\ndef stuck():\n    time.sleep(30)\n\ndef ok():\n    return 1\n"
    async with PluginManager() as mgr:
        events = mgr.events()
        p = await mgr.load(python_plugin(tmp_path / "p", code))
        start = time.monotonic()
        with pytest.raises(CallTimeout):
            await p.call("stuck", timeout=0.5)
        assert time.monotonic() - start < 1.5
        async with asyncio.timeout(5):
            async for event in events:
                if event.state is S.FAILED:
                    break
        assert time.monotonic() - start < 3
        assert "ignored the cancel" in str(p.error)


async def test_fork_bomb_is_stopped_by_the_pids_limit(tmp_path):
    code = FORK_BOMB
    async with PluginManager() as mgr:
        root = python_plugin(tmp_path / "p", code, extra='\n[sandbox]\nprofile = "default"\n')
        p = await mgr.load(root)
        result = await p.call("bomb", timeout=20)
        assert result["errno"] == 11  # EAGAIN from the pids cgroup
        assert result["made"] < 128


async def test_unload_leaves_nothing_behind_over_many_cycles(tmp_path):
    root = python_plugin(tmp_path / "p", "def f():\n    return 1\n")
    async with PluginManager(HostConfig()) as mgr:
        for _ in range(5):
            p = await mgr.load(root)
            assert await p.call("f") == 1
            await mgr.unload(p.id)


async def test_trusted_and_sandboxed_generations_of_one_plugin_answer_alike(tmp_path):
    code = "def echo(x):\n    return x\n\ndef boom():\n    raise ValueError('no')\n"
    root = python_plugin(tmp_path / "p", code)
    value = {"a": [1, 2.5, None, True, "é"], "b": {}}
    async with PluginManager() as mgr:
        sandboxed = await mgr.load(root)
        sandboxed_answer = await sandboxed.call("echo", value)
        with pytest.raises(Exception) as sandboxed_error:
            await sandboxed.call("boom")
        await mgr.unload(sandboxed.id)
        trusted = await mgr.load(root, sandbox=SandboxConfig(enabled=False))
        assert await trusted.call("echo", value) == sandboxed_answer == value
        with pytest.raises(Exception) as trusted_error:
            await trusted.call("boom")
    assert type(trusted_error.value) is type(sandboxed_error.value)
    assert trusted_error.value.data["type"] == sandboxed_error.value.data["type"] == "ValueError"


async def test_a_trusted_native_plugin_runs_in_its_own_process(native_c):
    """Trusted (sandbox disabled by the operator) native code still gets a process of its
    own, so its segfault cannot take the supervisor down."""
    async with PluginManager() as mgr:
        p = await mgr.load(native_c, sandbox=SandboxConfig(enabled=False))
        assert await p.call("greet", "trusted") == "Hello, trusted!"
        with pytest.raises(PluginCrashed):
            await p.call("crash")


async def test_the_host_configs_setup_timeout_bounds_the_sandbox_setup(tmp_path):
    root = python_plugin(tmp_path / "p", "def f():\n    return 1\n")
    async with PluginManager(HostConfig(setup_timeout=0.001)) as mgr:
        with pytest.raises(SandboxUnavailable, match="did not finish within 0.001s"):
            await mgr.load(root)
