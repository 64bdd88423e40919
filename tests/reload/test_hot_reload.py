"""Hot reload driven by file changes: PluginManager(hot_reload=True)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from sandboxer import HostConfig, PluginManager, SandboxConfig

pytestmark = pytest.mark.usefixtures("no_leaks")

PY = '''
count = 0

def version():
    return "{version}"

def incr():
    global count
    count += 1
    return count

def export_state():
    return count

def import_state(state, from_version):
    global count
    count = state
'''


def write_python(d: Path, version: str, body: str | None = None) -> None:
    d.mkdir(exist_ok=True)
    (d / "p.py").write_text(body if body is not None else PY.format(version=version))
    (d / "plugin.toml").write_text(
        f'[plugin]\nid = "hot.py"\nversion = "{version}"\ntype = "python"\n'
        'entrypoint = "p.py"\n')


async def _until(condition: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


async def test_a_changed_plugin_is_reloaded_with_its_state(tmp_path: Path) -> None:
    d = tmp_path / "plugin"
    write_python(d, "1.0.0")
    async with PluginManager(HostConfig(), hot_reload=True, reload_debounce=0.05) as mgr:
        p = await mgr.load(d, sandbox=SandboxConfig(enabled=False))
        assert [await p.call("incr") for _ in range(3)] == [1, 2, 3]
        write_python(d, "1.1.0")

        async def upgraded() -> bool:
            return await p.call("version") == "1.1.0"
        await _until(upgraded)
        assert (p.version, p.generation) == ("1.1.0", 2)
        assert await p.call("incr") == 4  # the counter moved across


async def test_broken_files_roll_back_and_are_not_retried_until_they_change(
        tmp_path: Path) -> None:
    d = tmp_path / "plugin"
    write_python(d, "1.0.0")
    async with PluginManager(HostConfig(), hot_reload=True, reload_debounce=0.05) as mgr:
        events = mgr.events()
        p = await mgr.load(d, sandbox=SandboxConfig(enabled=False))
        await p.call("incr")
        write_python(d, "1.1.0", body="def version(:\n")  # a syntax error
        seen: list[Any] = []

        async def failed() -> bool:
            while True:
                try:
                    event = await asyncio.wait_for(events.__anext__(), 0.05)
                except TimeoutError:
                    return any(e.type == "reload_failed" for e in seen)
                seen.append(event)
        await _until(failed)
        assert p.error is not None and "1.0.0" == await p.call("version")
        assert await p.call("incr") == 2  # the old generation kept its state
        generation = p.generation
        (d / "p.py").touch()  # same content: not retried
        await asyncio.sleep(0.4)
        assert p.generation == generation
        write_python(d, "1.2.0")

        async def fixed() -> bool:
            return await p.call("version") == "1.2.0"
        await _until(fixed)
        assert await p.call("incr") == 3


async def test_a_wasm_plugin_is_reloaded_when_its_module_changes(tmp_path: Path) -> None:
    path = tmp_path / "m.wasm"

    def write(n: int) -> None:
        path.write_bytes(wasmtime.wat2wasm(
            f'(module (func (export "n") (result i32) (i32.const {n})))'))
    write(1)
    async with PluginManager(HostConfig(), hot_reload=True, reload_debounce=0.05) as mgr:
        p = await mgr.load(path)
        assert await p.call("n") == 1
        write(2)

        async def changed() -> bool:
            return await p.call("n") == 2
        await _until(changed)


async def test_without_hot_reload_nothing_watches(tmp_path: Path) -> None:
    d = tmp_path / "plugin"
    write_python(d, "1.0.0")
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(d, sandbox=SandboxConfig(enabled=False))
        write_python(d, "1.1.0")
        await asyncio.sleep(0.5)
        assert await p.call("version") == "1.0.0" and p.generation == 1
