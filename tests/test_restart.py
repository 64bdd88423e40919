"""The restart policy (issue 21, in the library): a plugin that fails on its own comes back
after a backoff, a crash loop ends in quarantine, and an explicit restart clears it.

The plugins are what a stranger writes from the README: a bare .py file of plain functions,
and a plugin directory whose manifest asks for restarts. Everything runs sandboxed, and
(``no_leaks``) leaves no process, cgroup, mount or fd behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sandboxer import (
    ConfigError,
    HostConfig,
    ManifestError,
    PluginCrashed,
    PluginManager,
    PluginState,
    PluginStateError,
    load_plugin,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

S = PluginState

FLAKY = """\
import os

def ping():
    return "pong"

def die():
    os._exit(7)
"""

BROKEN = """\
import os
os._exit(3)  # dies at import: every start fails
"""


class Watch:
    """Every state a plugin goes through, with when (monotonic seconds)."""

    def __init__(self, mgr: PluginManager) -> None:
        self.states: list[tuple[float, PluginState]] = []
        self._stream = mgr.events()
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for event in self._stream:
            if event.type == "state":
                self.states.append((time.monotonic(), event.state))

    def seen(self) -> list[PluginState]:
        return [state for _, state in self.states]

    async def until(self, predicate: Callable[[list[PluginState]], bool], timeout: float = 30):
        async with asyncio.timeout(timeout):
            while not predicate(self.seen()):
                await asyncio.sleep(0.01)

    async def close(self) -> None:
        await self._stream.aclose()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def _bare(tmp_path: Path) -> Path:
    path = tmp_path / "flaky.py"
    path.write_text(FLAKY)
    return path


def _asking(tmp_path: Path, policy: str) -> Path:
    root = tmp_path / "asking"
    root.mkdir()
    (root / "plugin.py").write_text(FLAKY)
    (root / "plugin.toml").write_text(
        textwrap.dedent(f"""\
            [plugin]
            id = "stranger.asking"
            version = "1.0.0"
            type = "python"
            entrypoint = "plugin.py"
            restart = "{policy}"
            """)
    )
    return root


async def test_a_crashed_bare_file_comes_back_under_on_failure(tmp_path: Path) -> None:
    config = HostConfig(restart="on-failure", restart_backoff=0.05)
    async with PluginManager(config=config) as mgr:
        watch = Watch(mgr)
        p = await mgr.load(_bare(tmp_path))
        with pytest.raises(PluginCrashed):
            await p.call("die")
        await watch.until(lambda seen: seen.count(S.READY) == 2)
        assert watch.seen()[3:] == [S.FAILED, S.LOADING, S.INITIALIZING, S.READY]
        assert p.generation == 2 and await p.call("ping") == "pong"
        # killed from outside, the same
        assert p.handle is not None
        os.kill(p.handle.pid, signal.SIGKILL)
        await watch.until(lambda seen: seen.count(S.READY) == 3)
        assert p.generation == 3 and await p.call("ping") == "pong"
        assert p.statistics().restarts == 2
        await watch.close()


async def test_never_is_the_default_and_an_explicit_restart_still_works(tmp_path: Path) -> None:
    async with PluginManager() as mgr:
        watch = Watch(mgr)
        p = await mgr.load(_bare(tmp_path))
        with pytest.raises(PluginCrashed):
            await p.call("die")
        await watch.until(lambda seen: S.FAILED in seen)
        await asyncio.sleep(1.0)  # a restart would have come after 0.5 s
        assert p.state is S.FAILED and p.generation == 1
        with pytest.raises(PluginStateError, match="failed and takes no calls"):
            await p.call("ping")
        assert await mgr.restart(p.id) is p
        assert p.state is S.READY and p.generation == 2 and await p.call("ping") == "pong"
        with pytest.raises(PluginStateError, match="only a failed or quarantined plugin"):
            await mgr.restart(p.id)
        await watch.close()


async def test_a_crash_loop_backs_off_and_ends_in_quarantine(tmp_path: Path) -> None:
    """The manifest asks for restarts (the host's default is never). Its file is then
    broken and the running generation crashes: each restart fails, each after twice the
    wait of the one before, and the third failure quarantines it. Repaired, an explicit
    restart brings it back."""
    root = _asking(tmp_path, "on-failure")
    config = HostConfig(restart_backoff=0.2, quarantine_after=3, quarantine_window=60)
    async with PluginManager(config=config) as mgr:
        watch = Watch(mgr)
        p = await mgr.load(root)
        (root / "plugin.py").write_text(BROKEN)
        with pytest.raises(PluginCrashed):
            await p.call("die")
        await watch.until(lambda seen: S.QUARANTINED in seen)
        failed_at = [t for t, state in watch.states if state is S.FAILED]
        loading_at = [t for t, state in watch.states if state is S.LOADING][1:]  # restarts
        assert len(failed_at) == 3 and len(loading_at) == 2
        assert loading_at[0] - failed_at[0] >= 0.2 and loading_at[1] - failed_at[1] >= 0.4
        assert p.state is S.QUARANTINED and "quarantined" in str(p.error)
        with pytest.raises(PluginStateError, match="quarantined"):
            await p.call("ping")
        await asyncio.sleep(1.0)
        assert watch.seen().count(S.LOADING) == 3  # the first load and two restarts: no more
        (root / "plugin.py").write_text(FLAKY)
        await mgr.restart(p.id)
        assert p.state is S.READY and await p.call("ping") == "pong"
        await watch.close()


async def test_unload_calls_off_a_restart_waiting_out_its_backoff(tmp_path: Path) -> None:
    config = HostConfig(restart="on-failure", restart_backoff=30)
    async with PluginManager(config=config) as mgr:
        watch = Watch(mgr)
        p = await mgr.load(_bare(tmp_path))
        with pytest.raises(PluginCrashed):
            await p.call("die")
        await watch.until(lambda seen: S.FAILED in seen)
        async with asyncio.timeout(10):
            await mgr.unload(p.id)
        await watch.until(lambda seen: seen[-1] is S.STOPPED)
        assert watch.seen()[-3:] == [S.FAILED, S.STOPPING, S.STOPPED]
        assert watch.seen().count(S.LOADING) == 1
        await watch.close()


async def test_a_manifest_can_refuse_restarts_the_host_would_make(tmp_path: Path) -> None:
    config = HostConfig(restart="on-failure", restart_backoff=0.05)
    async with PluginManager(config=config) as mgr:
        watch = Watch(mgr)
        p = await mgr.load(_asking(tmp_path, "never"))
        with pytest.raises(PluginCrashed):
            await p.call("die")
        await watch.until(lambda seen: S.FAILED in seen)
        await asyncio.sleep(0.5)
        assert p.state is S.FAILED and p.generation == 1
        await watch.close()


def test_bad_restart_settings_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='restart.*"never" or "on-failure"'):
        PluginManager(config=HostConfig(restart="always"))
    with pytest.raises(ConfigError, match="host.restart"):
        HostConfig.from_mapping({"host": {"restart": "sometimes"}})
    with pytest.raises(ConfigError, match="host.quarantine_after"):
        HostConfig.from_mapping({"host": {"quarantine_after": 0}})
    assert HostConfig.from_mapping({"host": {"restart": "on-failure"}}).restart == "on-failure"
    root = _asking(tmp_path, "always")
    with pytest.raises(ManifestError, match="plugin.restart"):
        load_plugin(root)
    (root / "plugin.toml").write_text(
        (root / "plugin.toml").read_text().replace('"always"', "[1]")
    )
    with pytest.raises(ManifestError, match="plugin.restart"):
        load_plugin(root)
