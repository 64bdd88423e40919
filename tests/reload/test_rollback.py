"""A reload that fails with nothing to roll back to: the old generation died meanwhile."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from sandboxer import PluginCrashed, PluginManager, PluginState, ReloadError

pytestmark = pytest.mark.usefixtures("no_leaks")

OLD = """\
import os

def die():
    os._exit(3)
"""

# Generation 2 holds its init until the test has killed generation 1, then fails it: the
# reload fails after the generation it would roll back to is gone.
NEW = """\
import os, time

def init(config):
    for _ in range(1000):
        if os.path.exists("/plugin/go"):
            break
        time.sleep(0.01)
    raise RuntimeError("generation 2 never starts")
"""


def write(root: Path, code: str, version: str) -> None:
    root.mkdir(exist_ok=True)
    (root / "plugin.py").write_text(code)
    (root / "plugin.toml").write_text(
        f'[plugin]\nid = "rollback.probe"\nversion = "{version}"\ntype = "python"\n'
        'entrypoint = "plugin.py"\n')


async def test_unload_after_a_failed_reload_whose_old_generation_died_leaves_nothing(
        tmp_path: Path) -> None:
    root = tmp_path / "p"
    write(root, OLD, "1.0.0")
    async with PluginManager() as mgr:
        events = mgr.events()
        p = await mgr.load(root)
        assert p.sandbox is not None and p.sandbox.enabled
        old_pid = p.handle.pid  # type: ignore[union-attr]
        old_group = p.handle.cgroup_path  # type: ignore[union-attr]
        assert old_group is not None and os.path.isdir(old_group)
        write(root, NEW, "2.0.0")
        reload = asyncio.ensure_future(mgr.reload(p.id))
        async with asyncio.timeout(10):
            async for event in events:
                if event.state is PluginState.RELOADING:
                    break
        with pytest.raises(PluginCrashed):
            await p.call("die")  # generation 1 still takes the calls, and dies of this one
        (root / "go").touch()
        with pytest.raises(ReloadError):
            await reload
        assert p.state is PluginState.FAILED
        await mgr.unload(p.id)
        # unload returns once generation 1 is closed: its process reaped, its cgroup removed
        assert not os.path.exists(f"/proc/{old_pid}"), "generation 1's process outlived unload"
        assert not os.path.exists(old_group), "generation 1's cgroup outlived unload"
