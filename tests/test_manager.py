"""PluginManager with trusted in-process python plugins: lifecycle, events, calls, reload."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import pytest

from sandboxer import (
    CallTimeout,
    HostConfig,
    IntegrityError,
    ManifestError,
    MethodNotFound,
    PluginCallError,
    PluginLoadError,
    PluginManager,
    PluginNotFound,
    PluginState,
    PluginStateError,
    ReloadError,
    SandboxConfig,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

TRUSTED = SandboxConfig(enabled=False)
S = PluginState

LIFECYCLE = """
import asyncio, json, pathlib

_log = None

def _record(what):
    with open(_log, "a") as f:
        f.write(what + "\\n")

def init(config):
    global _log
    _log = config["log"]
    _record("init")

def health_check():
    _record("health")
    return True

async def slow(seconds, tag):
    _record(f"start {tag}")
    await asyncio.sleep(seconds)
    _record(f"end {tag}")
    return tag

def echo(value):
    return value

async def shutdown():
    _record("shutdown")
"""


def log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


async def drain_events(stream, count: int) -> list:
    out = []
    async with asyncio.timeout(5):
        while len(out) < count:
            out.append(await stream.__anext__())
    return out


async def test_lifecycle_order_and_events(make_plugin, tmp_path):
    log = tmp_path / "log"
    root = make_plugin(LIFECYCLE)
    async with PluginManager() as mgr:
        events = mgr.events()
        p = await mgr.load(root, sandbox=TRUSTED, config={"log": str(log)})
        assert p.state is S.READY and p.generation == 1
        assert await p.call("echo", {"a": [1, 2]}) == {"a": [1, 2]}
        await mgr.unload(p.id)
        assert p.state is S.STOPPED
        assert await mgr.list() == []
        got = await drain_events(events, 6)
    assert log_lines(log) == ["init", "health", "shutdown"]
    assert [(e.previous, e.state) for e in got] == [
        (None, S.LOADING), (S.LOADING, S.INITIALIZING), (S.INITIALIZING, S.READY),
        (S.READY, S.DRAINING), (S.DRAINING, S.STOPPING), (S.STOPPING, S.STOPPED)]
    assert {e.plugin_id for e in got} == {"test.plugin"}
    assert all(e.type == "state" for e in got)


async def test_event_stream_ends_when_manager_closes(make_plugin):
    mgr = PluginManager()
    events = mgr.events()
    await mgr.load(make_plugin("def f():\n    return 1\n"), sandbox=TRUSTED)
    await mgr.aclose()
    await mgr.aclose()  # idempotent
    seen = [e async for e in events]
    assert seen[-1].state is S.STOPPED


async def test_unload_waits_for_calls_in_flight(make_plugin, tmp_path):
    log = tmp_path / "log"
    async with PluginManager(drain_timeout=5) as mgr:
        p = await mgr.load(make_plugin(LIFECYCLE), sandbox=TRUSTED, config={"log": str(log)})
        calls = [asyncio.create_task(p.call("slow", 0.3, f"c{i}")) for i in range(3)]
        await asyncio.sleep(0.05)
        assert p.statistics().in_flight == 3
        await mgr.unload(p.id)
        assert [c.result() for c in calls] == ["c0", "c1", "c2"]
    lines = log_lines(log)
    assert lines.index("shutdown") > max(lines.index(f"end c{i}") for i in range(3))


async def test_unload_is_bounded_by_drain_timeout(make_plugin, tmp_path):
    log = tmp_path / "log"
    async with PluginManager(drain_timeout=0.2) as mgr:
        p = await mgr.load(make_plugin(LIFECYCLE), sandbox=TRUSTED, config={"log": str(log)})
        call = asyncio.create_task(p.call("slow", 30, "stuck"))
        await asyncio.sleep(0.05)
        start = time.monotonic()
        await mgr.unload(p.id)
        assert time.monotonic() - start < 2
        with pytest.raises(PluginStateError, match="unloaded while slow was in flight"):
            await call
    assert log_lines(log) == ["init", "health", "start stuck", "shutdown"]


async def test_calls_refused_while_draining_and_after_unload(make_plugin, tmp_path):
    log = tmp_path / "log"
    async with PluginManager() as mgr:
        p = await mgr.load(make_plugin(LIFECYCLE), sandbox=TRUSTED, config={"log": str(log)})
        running = asyncio.create_task(p.call("slow", 0.2, "x"))
        await asyncio.sleep(0.02)
        unloading = asyncio.create_task(mgr.unload(p.id))
        await asyncio.sleep(0.02)
        assert p.state is S.DRAINING
        with pytest.raises(PluginStateError, match="draining"):
            await p.call("echo", 1)
        await unloading
        assert await running == "x"
        with pytest.raises(PluginStateError, match="stopped"):
            await p.call("echo", 1)
        with pytest.raises(PluginNotFound):
            await mgr.unload(p.id)


async def test_concurrent_loads_of_one_id_load_it_once(make_plugin):
    root = make_plugin("def f():\n    return 1\n")
    async with PluginManager() as mgr:
        results = await asyncio.gather(*(mgr.load(root, sandbox=TRUSTED) for _ in range(5)),
                                       return_exceptions=True)
        ok = [r for r in results if not isinstance(r, BaseException)]
        errors = [r for r in results if isinstance(r, BaseException)]
        assert len(ok) == 1 and len(errors) == 4
        assert all(isinstance(e, PluginLoadError) and "already loaded" in str(e) for e in errors)
        assert [p.id for p in await mgr.list()] == ["test.plugin"]


async def test_concurrent_unloads_of_one_id_both_return(make_plugin, tmp_path):
    log = tmp_path / "log"
    async with PluginManager() as mgr:
        p = await mgr.load(make_plugin(LIFECYCLE), sandbox=TRUSTED, config={"log": str(log)})
        call = asyncio.create_task(p.call("slow", 0.2, "x"))
        await asyncio.sleep(0.02)
        await asyncio.gather(mgr.unload(p.id), mgr.unload(p.id), mgr.unload(p.id))
        assert p.state is S.STOPPED and await call == "x"
    assert log_lines(log).count("shutdown") == 1


async def test_methods_are_public_functions_defined_in_the_module(make_plugin):
    code = """
    from json import dumps
    import os

    def visible(x):
        return x

    async def also_visible():
        return 2

    def _private():
        return 3

    class NotAMethod:
        pass

    def init(config):
        pass
    """
    async with PluginManager() as mgr:
        p = await mgr.load(make_plugin(code), sandbox=TRUSTED)
        assert p.methods == ("also_visible", "visible")
        for hidden in ("dumps", "_private", "NotAMethod", "init", "os"):
            with pytest.raises(MethodNotFound) as info:
                await p.call(hidden)
            assert info.value.code == -32601
            assert info.value.data == {"available": ["also_visible", "visible"]}


async def test_manifest_methods_list_restricts_and_must_exist(make_plugin):
    code = "def a():\n    return 'a'\n\ndef b():\n    return 'b'\n"
    async with PluginManager() as mgr:
        p = await mgr.load(make_plugin(code, extra='methods = ["a"]\n'), sandbox=TRUSTED)
        assert p.methods == ("a",)
        assert await p.call("a") == "a"
        with pytest.raises(MethodNotFound):
            await p.call("b")
        with pytest.raises(PluginLoadError, match="lists method 'missing'"):
            await mgr.load(make_plugin(code, id="other", extra='methods = ["missing"]\n'),
                           sandbox=TRUSTED)


async def test_plugin_exception_becomes_plugin_call_error(make_plugin):
    code = "def boom(msg):\n    raise KeyError(msg)\n"
    async with PluginManager() as mgr:
        p = await mgr.load(make_plugin(code), sandbox=TRUSTED)
        with pytest.raises(PluginCallError) as info:
            await p.call("boom", "nope")
        err = info.value
        assert type(err) is PluginCallError and err.code == 1 and err.plugin_id == "test.plugin"
        assert err.data["type"] == "KeyError" and "'nope'" in err.data["message"]
        assert 'raise KeyError(msg)' in err.data["traceback"]
        assert "sandboxer/" not in err.data["traceback"]
        assert p.statistics().failures == 1


async def test_bad_arguments_and_results(make_plugin):
    code = """
    def one(x):
        return x

    def returns_set():
        return {1, 2}

    def returns_bytes():
        return b"\\x00\\xff"

    def mutate(items):
        items.append(99)
        return len(items)
    """
    async with PluginManager() as mgr:
        p = await mgr.load(make_plugin(code), sandbox=TRUSTED)
        with pytest.raises(PluginCallError) as info:
            await p.call("one", 1, 2)
        assert info.value.code == -32602
        with pytest.raises(PluginCallError) as info:
            await p.call("one", object())
        assert info.value.code == -32602
        with pytest.raises(PluginCallError) as info:
            await p.call("returns_set")
        assert info.value.code == -32603 and "set" in str(info.value)
        assert await p.call("returns_bytes") == "AP8="
        mine = [1]
        assert await p.call("mutate", mine) == 2 and mine == [1]


async def test_timeouts_for_async_and_sync_methods(make_plugin):
    code = """
    import asyncio, time

    async def nap(s):
        await asyncio.sleep(s)
        return "rested"

    def block(s):
        time.sleep(s)
        return "blocked"
    """
    extra = '\n[sandbox]\ntimeout = "200ms"\n'
    async with PluginManager() as mgr:
        p = await mgr.load(make_plugin(code, extra=extra), sandbox=TRUSTED.replace(timeout=0.2))
        start = time.monotonic()
        with pytest.raises(CallTimeout) as info:
            await p.call("nap", 10)
        assert info.value.timeout == 0.2 and time.monotonic() - start < 1
        with pytest.raises(CallTimeout):
            await p.call("nap", 10, timeout=0.05)
        assert await p.call("nap", 0.01, timeout=2) == "rested"
        with pytest.raises(CallTimeout):
            await p.call("block", 0.5, timeout=0.05)
        assert await p.call("block", 0.01) == "blocked"


async def test_init_failure_and_unhealthy_plugins_fail_to_load(make_plugin):
    async with PluginManager() as mgr:
        events = mgr.events()
        with pytest.raises(PluginLoadError, match="init failed.*RuntimeError: no db"):
            await mgr.load(make_plugin("def init(c):\n    raise RuntimeError('no db')\n"),
                           sandbox=TRUSTED)
        got = await drain_events(events, 3)
        assert [e.state for e in got] == [S.LOADING, S.INITIALIZING, S.FAILED]
        assert "no db" in got[-1].error
        with pytest.raises(PluginLoadError, match="health check failed"):
            await mgr.load(make_plugin("def health_check():\n    return False\n"),
                           sandbox=TRUSTED)
        assert await mgr.list() == []


async def test_import_errors_and_exit_at_import_are_load_errors(make_plugin):
    async with PluginManager() as mgr:
        with pytest.raises(PluginLoadError, match="SyntaxError"):
            await mgr.load(make_plugin("def broken(:\n"), sandbox=TRUSTED)
        with pytest.raises(PluginLoadError, match="SystemExit"):
            await mgr.load(make_plugin("import sys\nsys.exit(3)\n"), sandbox=TRUSTED)
        with pytest.raises(ManifestError):
            await mgr.load(make_plugin("x = 1\n").parent / "nowhere", sandbox=TRUSTED)


async def test_health_checks_move_between_ready_and_degraded(make_plugin):
    code = "healthy = [True]\n\ndef health_check():\n    return healthy[0]\n\n" \
           "def set_health(v):\n    healthy[0] = v\n"
    async with PluginManager() as mgr:
        p = await mgr.load(make_plugin(code), sandbox=TRUSTED)
        await p.call("set_health", False)
        assert await mgr.check_health(p.id) is False and p.state is S.DEGRADED
        assert await p.call("set_health", True) is None  # degraded plugins still serve
        assert await mgr.check_health(p.id) is True and p.state is S.READY


# The same rule as on the wire (DESIGN section 7): only false, {"ok": false, …} or an error
# is unhealthy.
HEALTH_RESULTS = {
    "true": ("return True", True),
    "none": ("return None", True),
    "empty dict": ("return {}", True),
    "ok true": ("return {'ok': True}", True),
    "false": ("return False", False),
    "ok false": ("return {'ok': False, 'message': 'disk on fire'}", False),
    "raises": ("raise RuntimeError('disk on fire')", False),
}


@pytest.mark.parametrize("body,healthy", HEALTH_RESULTS.values(), ids=HEALTH_RESULTS.keys())
async def test_what_a_health_check_answer_means(make_plugin, body, healthy):
    root = make_plugin(f"def health_check():\n    {body}\n\ndef f():\n    return 1\n")
    async with PluginManager() as mgr:
        if healthy:
            p = await mgr.load(root, sandbox=TRUSTED)
            assert await mgr.check_health(p.id) is True
        else:
            with pytest.raises(PluginLoadError, match="health check failed") as info:
                await mgr.load(root, sandbox=TRUSTED)
            if "disk on fire" in body:
                assert "disk on fire" in str(info.value)


async def test_a_plugin_without_state_functions_reloads_fresh(make_plugin):
    root = make_plugin("calls = [0]\n\ndef count():\n    calls[0] += 1\n    return calls[0]\n")
    async with PluginManager() as mgr:
        p = await mgr.load(root, sandbox=TRUSTED)
        assert p.handle is not None and p.handle.has_state is False
        assert [await p.call("count") for _ in range(2)] == [1, 2]
        await mgr.reload(p.id)
        assert p.generation == 2 and await p.call("count") == 1


async def test_trust_needs_host_policy_and_only_python_or_native_may_be_trusted(
        make_plugin, tmp_path):
    root = make_plugin("def f():\n    return 1\n")
    async with PluginManager(HostConfig(allow_unsandboxed=False)) as mgr:
        with pytest.raises(PluginLoadError, match="does not allow unsandboxed"):
            await mgr.load(root, sandbox=TRUSTED)
    exe = tmp_path / "ext"
    exe.mkdir()
    (exe / "run").write_text("#!/bin/sh\n")
    (exe / "run").chmod(0o755)
    (exe / "plugin.toml").write_text('[plugin]\nid = "ext"\nversion = "1.0.0"\n'
                                     'type = "external"\nentrypoint = "run"\n')
    async with PluginManager() as mgr:
        with pytest.raises(PluginLoadError, match="always run sandboxed"):
            await mgr.load(exe, sandbox=TRUSTED)


async def test_manifest_sha256_is_verified_at_load(make_plugin):
    import hashlib
    code = "def f():\n    return 1\n"
    good = hashlib.sha256(code.encode()).hexdigest()
    async with PluginManager() as mgr:
        p = await mgr.load(make_plugin(code, extra=f'sha256 = "{good}"\n'), sandbox=TRUSTED)
        assert await p.call("f") == 1
        with pytest.raises(IntegrityError, match="sha256"):
            await mgr.load(make_plugin(code, id="tampered", extra=f'sha256 = "{"0" * 64}"\n'),
                           sandbox=TRUSTED)


async def test_bare_python_file_and_package_plugins(tmp_path):
    bare = tmp_path / "My_Tool.py"
    bare.write_text("def hi():\n    return 'hi'\n")
    pkg = tmp_path / "pkgplugin"
    (pkg / "impl").mkdir(parents=True)
    (pkg / "impl" / "__init__.py").write_text("from .core import answer\n__all__ = ['answer']\n")
    (pkg / "impl" / "core.py").write_text("def answer():\n    return 42\n")
    (pkg / "plugin.toml").write_text('[plugin]\nid = "pkg"\nversion = "0.1.0"\n'
                                     'type = "python"\nentrypoint = "impl"\n')
    async with PluginManager() as mgr:
        p = await mgr.load(bare, sandbox=TRUSTED)
        assert (p.id, p.version, await p.call("hi")) == ("my_tool", "0.0.0", "hi")
        q = await mgr.load(pkg, sandbox=TRUSTED)
        assert await q.call("answer") == 42


async def test_two_versions_resident_at_once(make_plugin):
    code = "VERSION = {v!r}\n\ndef version():\n    return VERSION\n"
    async with PluginManager() as mgr:
        a = await mgr.load(make_plugin(code.format(v="1"), id="a"), sandbox=TRUSTED)
        b = await mgr.load(make_plugin(code.format(v="2"), id="b"), sandbox=TRUSTED)
        assert (await a.call("version"), await b.call("version")) == ("1", "2")
        names = [n for n in sys.modules if n.startswith("_sandboxer_plugin_")]
        assert len(names) == 2


COUNTER = """
import asyncio
VERSION = {version!r}
count = 0

async def increment():
    global count
    await asyncio.sleep(0.001)
    count += 1
    return [VERSION, count]

def get():
    return count

def export_state():
    return {{"count": count}}

def import_state(state, from_version):
    global count
    {import_body}
"""


def write_counter(root: Path, version: str, import_body: str = "count = state['count']",
                  manifest_version: str | None = None) -> None:
    (root / "plugin.py").write_text(COUNTER.format(version=version, import_body=import_body))
    manifest = (root / "plugin.toml").read_text()
    old = manifest.split('version = "')[1].split('"')[0]
    (root / "plugin.toml").write_text(
        manifest.replace(f'version = "{old}"', f'version = "{manifest_version or version}"'))


async def test_reload_migrates_state_without_failing_calls(make_plugin):
    root = make_plugin(COUNTER.format(version="1.0.0", import_body="count = state['count']"))
    async with PluginManager() as mgr:
        events = mgr.events()
        p = await mgr.load(root, sandbox=TRUSTED)
        results: list[list] = []
        stop = asyncio.Event()

        async def hammer() -> None:
            while not stop.is_set():
                results.append(await p.call("increment"))

        workers = [asyncio.create_task(hammer()) for _ in range(4)]
        for i in range(2, 6):
            await asyncio.sleep(0.02)
            write_counter(root, f"{i}.0.0")
            await mgr.reload(p.id)
            assert p.version == f"{i}.0.0" and p.generation == i
        stop.set()
        await asyncio.gather(*workers)
        assert await p.call("get") == len(results)
        versions_seen = [int(v.split(".")[0]) for v, _ in results]
        assert versions_seen == sorted(versions_seen) and versions_seen[-1] == 5
        kinds = [e.type async for e in _until(events, lambda e: e.type == "reloaded"
                                                and e.generation == 5)]
        assert kinds.count("reloaded") == 4


async def _until(stream, predicate):
    async with asyncio.timeout(5):
        async for event in stream:
            yield event
            if predicate(event):
                return


@pytest.mark.parametrize("breakage", [
    "syntax_error", "init_raises", "unhealthy", "import_state_raises", "id_changed"])
async def test_failed_reload_rolls_back(make_plugin, breakage):
    root = make_plugin(COUNTER.format(version="1.0.0", import_body="count = state['count']"))
    async with PluginManager() as mgr:
        p = await mgr.load(root, sandbox=TRUSTED)
        for _ in range(3):
            await p.call("increment")
        events = mgr.events()
        if breakage == "syntax_error":
            (root / "plugin.py").write_text("def broken(:\n")
        elif breakage == "init_raises":
            write_counter(root, "2.0.0")
            with open(root / "plugin.py", "a") as f:
                f.write("\ndef init(config):\n    raise RuntimeError('bad init')\n")
        elif breakage == "unhealthy":
            write_counter(root, "2.0.0")
            with open(root / "plugin.py", "a") as f:
                f.write("\ndef health_check():\n    return False\n")
        elif breakage == "import_state_raises":
            write_counter(root, "2.0.0", import_body="raise ValueError('cannot migrate')")
        else:
            text = (root / "plugin.toml").read_text().replace("test.plugin", "other.id")
            (root / "plugin.toml").write_text(text)
        with pytest.raises(ReloadError) as info:
            await mgr.reload(p.id)
        assert info.value.cause is not None
        assert p.state is S.READY and p.version == "1.0.0" and p.generation == 1
        assert p.error is info.value
        assert await p.call("increment") == ["1.0.0", 4]
        got = [e async for e in _until(events, lambda e: e.type == "reload_failed")]
        assert [e.state for e in got] == [S.RELOADING, S.READY, S.READY]
        assert got[-1].type == "reload_failed" and "rolled back" in got[-1].error
        assert len([n for n in sys.modules if n.startswith("_sandboxer_plugin_")]) == 1


async def test_loaded_plugin_json_uses_the_spec_keys(make_plugin):
    async with PluginManager() as mgr:
        p = await mgr.load(make_plugin("def f():\n    return 1\n"), sandbox=TRUSTED)
        doc = p.to_json()
        assert {"plugin", "state", "loadedAt", "error"} <= set(doc)
        assert doc["state"] == "ready" and doc["error"] is None
        assert doc["plugin"]["id"] == "test.plugin" and doc["sandbox"]["enabled"] is False
        assert doc["loadedAt"].endswith("+00:00")


async def test_periodic_health_checks_degrade_then_fail(make_plugin):
    code = "healthy = [True]\n\ndef health_check():\n    return healthy[0]\n\n" \
           "def set_health(v):\n    healthy[0] = v\n"
    config = HostConfig(health_interval=0.05, health_failures=3)
    async with PluginManager(config) as mgr:
        events = mgr.events()
        p = await mgr.load(make_plugin(code), sandbox=TRUSTED)
        await p.call("set_health", False)
        got = [e async for e in _until(events, lambda e: e.state is S.FAILED)]
        states = [e.state for e in got]
        assert states[-2:] == [S.DEGRADED, S.FAILED]
        assert "3 in a row" in got[-1].error
        with pytest.raises(PluginStateError, match="failed"):
            await p.call("set_health", True)
        assert [q.state for q in await mgr.list()] == [S.FAILED]
        await mgr.unload(p.id)
        assert p.state is S.STOPPED


async def test_a_recovering_plugin_goes_back_to_ready(make_plugin):
    code = "calls = [0]\n\ndef health_check():\n    calls[0] += 1\n    return calls[0] != 2\n"
    config = HostConfig(health_interval=0.05, health_failures=3)
    async with PluginManager(config) as mgr:
        events = mgr.events()
        p = await mgr.load(make_plugin(code), sandbox=TRUSTED)  # check 1 at load: healthy
        got = [e async for e in _until(events, lambda e: e.previous is S.DEGRADED)]
        assert [e.state for e in got][-2:] == [S.DEGRADED, S.READY]
        assert p.state is S.READY
