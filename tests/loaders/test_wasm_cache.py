"""Compiled wasm modules on disk (sandboxer/loaders/wasm/_module_cache.py, under
``WasmEngine.module``).

A fresh engine, as a new process has, must load a module another engine compiled without
compiling it, and the module must work. wasmtime's ``Module.deserialize`` trusts its input,
so the cases below plant a *valid* artifact of another module (``mul``: its ``add`` returns
a*b) under the ``add`` module's key, behind exactly one defect each; the artifact is never
given to deserialize (a spy records every call), ``add`` is compiled again and answers 2+3.
The control case shows the forged entry without a defect is taken: each refusal is the
defect's. The C modules are compiled with clang for wasm32-wasi (tests/wasi_build.py), which
fails, never skips, without the toolchain.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import wasmtime

from conftest import REPO
from sandboxer import HostConfig, PluginManager
from sandboxer._disk_cache import Usage, entry
from sandboxer.loaders.wasm import _engine, _module_cache
from wasi_build import compile_wasi

pytestmark = pytest.mark.usefixtures("no_leaks")

NOBODY = 65534
SOURCES = {
    "add": '__attribute__((export_name("add"))) int add(int a, int b) { return a + b; }\n',
    "mul": '__attribute__((export_name("add"))) int add(int a, int b) { return a * b; }\n',
    "sub": '__attribute__((export_name("add"))) int add(int a, int b) { return a - b; }\n',
}


@pytest.fixture(scope="session")
def wasm(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Each module of SOURCES, built once per session: its path and bytes."""
    out = tmp_path_factory.mktemp("wasm-cache-build")
    paths = {name: compile_wasi(out, name, src, reactor=True) for name, src in SOURCES.items()}
    return SimpleNamespace(**{name: path.read_bytes() for name, path in paths.items()},
                           paths=paths)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own cache directory (not made yet), for every engine made from now."""
    where = tmp_path / "xdg" / "sandboxer" / "wasm"
    where.parent.parent.mkdir()
    monkeypatch.setattr(_module_cache, "_directory", lambda: str(where))
    return where


class Spy:
    """What wasmtime was asked to compile and to deserialize (the bytes given)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.compiled: list[bytes] = []
        self.deserialized: list[bytes] = []
        compile_module = wasmtime.Module.__init__
        deserialize = wasmtime.Module.__dict__["deserialize"].__func__

        def init(module: wasmtime.Module, engine: wasmtime.Engine, wasm: bytes) -> None:
            self.compiled.append(bytes(wasm))
            compile_module(module, engine, wasm)

        def spied(cls: type, engine: wasmtime.Engine, encoded: bytes) -> wasmtime.Module:
            self.deserialized.append(bytes(encoded))
            module: wasmtime.Module = deserialize(cls, engine, encoded)
            return module

        monkeypatch.setattr(wasmtime.Module, "__init__", init)
        monkeypatch.setattr(wasmtime.Module, "deserialize", classmethod(spied))


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Spy:
    return Spy(monkeypatch)


def plugin(root: Path, wasm: Path) -> Path:
    root.mkdir(parents=True)
    (root / "plugin.wasm").write_bytes(wasm.read_bytes())
    (root / "plugin.toml").write_text('[plugin]\nid = "test.cached"\nversion = "1.0.0"\n'
                                      'type = "wasm"\nentrypoint = "plugin.wasm"\n')
    return root


async def add_2_3(root: Path) -> int:
    """Load the plugin in a new manager (a new engine: nothing compiled in memory) and call
    its add(2, 3)."""
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(root)
        result = await p.call("add", 2, 3)
    assert isinstance(result, int)
    return result


def entries(where: Path) -> list[Path]:
    return sorted(where.glob("*.cwasm"))


def artifact_of(path: Path) -> bytes:
    return path.read_bytes().partition(b"\n")[2]


async def test_a_fresh_engine_loads_the_module_from_disk_without_compiling(
        tmp_path: Path, wasm: SimpleNamespace, cache: Path, spy: Spy) -> None:
    root = plugin(tmp_path / "p", wasm.paths["add"])
    assert await add_2_3(root) == 5
    assert spy.compiled == [wasm.add] and spy.deserialized == []
    [stored] = entries(cache)
    assert stored.stat().st_mode & 0o777 == 0o600 and cache.stat().st_mode & 0o777 == 0o700
    header = stored.read_bytes().partition(b"\n")[0].split()
    assert header == [b"sandboxer-wasm-1", stored.stem.encode(),
                      hashlib.sha256(artifact_of(stored)).hexdigest().encode()]
    assert await add_2_3(root) == 5
    assert spy.compiled == [wasm.add]  # not compiled again
    assert spy.deserialized == [artifact_of(stored)]


async def test_a_new_process_loads_it_without_compiling(
        tmp_path: Path, wasm: SimpleNamespace, cache: Path) -> None:
    """The same in another interpreter: nothing of the first engine is in memory there."""
    root = plugin(tmp_path / "p", wasm.paths["add"])
    assert await add_2_3(root) == 5
    script = textwrap.dedent(f"""\
        import asyncio, wasmtime
        from sandboxer import HostConfig, PluginManager
        from sandboxer.loaders.wasm import _module_cache
        _module_cache._directory = lambda: {str(cache)!r}
        def refuse(*args):
            raise SystemExit("compiled")
        wasmtime.Module.__init__ = refuse
        async def main():
            async with PluginManager(HostConfig()) as mgr:
                p = await mgr.load({str(root)!r})
                print(await p.call("add", 2, 3))
        asyncio.run(main())
        """)
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=REPO)
    assert (ran.returncode, ran.stdout) == (0, "5\n"), ran.stderr


def _forge(cache: Path, wasm: SimpleNamespace) -> Path:
    """The add module's entry, then mul's artifact written in its place as a well-formed
    entry for add's key."""
    [stored] = entries(cache)
    engine = _engine.WasmEngine(workers=1)
    try:
        forged = wasmtime.Module(engine.engine, wasm.mul).serialize()
    finally:
        engine.close()
    stored.write_bytes(entry(_module_cache.FORMAT, stored.stem, bytes(forged)))
    return stored


def _flipped(stored: Path) -> None:
    data = bytearray(stored.read_bytes())
    data[-100] ^= 0x01  # in the artifact: its SHA-256 is no longer the header's
    stored.write_bytes(bytes(data))


def _another_key(stored: Path) -> None:
    stored.write_bytes(entry(_module_cache.FORMAT, "0" * 64, artifact_of(stored)))


def _truncated(stored: Path) -> None:
    stored.write_bytes(stored.read_bytes()[:-64])


def _a_link(stored: Path) -> None:
    elsewhere = stored.parent.parent / "elsewhere.cwasm"
    stored.rename(elsewhere)
    stored.symlink_to(elsewhere)


def _others_file(stored: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")  # a failure under CI=true (conftest)
    os.chown(stored, NOBODY, NOBODY)


def _group_writable(stored: Path) -> None:
    stored.chmod(0o660)


def _a_directory(stored: Path) -> None:
    stored.unlink()
    stored.mkdir()


@pytest.mark.parametrize("defect", [
    pytest.param(_flipped, id="one-byte-of-the-artifact-flipped"),
    pytest.param(_another_key, id="the-header-names-another-key"),
    pytest.param(_truncated, id="a-truncated-file"),
    pytest.param(_a_link, id="a-link-in-place-of-the-file"),
    pytest.param(_others_file, id="a-file-of-another-uid"),
    pytest.param(_group_writable, id="a-group-writable-file"),
    pytest.param(_a_directory, id="a-directory-in-place-of-the-file"),
])
async def test_an_artifact_not_beyond_doubt_is_never_deserialized(
        tmp_path: Path, wasm: SimpleNamespace, cache: Path,
        defect: Callable[[Path], None]) -> None:
    root = plugin(tmp_path / "p", wasm.paths["add"])
    assert await add_2_3(root) == 5
    stored = _forge(cache, wasm)
    defect(stored)
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        assert await add_2_3(root) == 5  # add's own code, compiled again
    assert spy.deserialized == [] and spy.compiled == [wasm.add]
    if stored.is_dir():
        assert os.listdir(stored.parent) == [stored.name]  # left alone; nothing stored
        return
    # The bad entry went (deleted, or replaced by the store); the new one is add's and is
    # what the next engine loads, without compiling.
    assert stored.stat().st_uid == os.geteuid() and not stored.is_symlink()
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        assert await add_2_3(root) == 5
    assert spy.compiled == [] and spy.deserialized == [artifact_of(stored)]
    elsewhere = stored.parent.parent / "elsewhere.cwasm"
    if elsewhere.exists():  # what the link led to is untouched
        assert artifact_of(elsewhere) != artifact_of(stored)


async def test_a_well_formed_entry_of_the_owner_is_deserialized(
        tmp_path: Path, wasm: SimpleNamespace, cache: Path, spy: Spy) -> None:
    """The control for the cases above: the forged entry without a defect is taken (its
    owner is trusted with the supervisor's memory), so each refusal above is the defect's."""
    root = plugin(tmp_path / "p", wasm.paths["add"])
    assert await add_2_3(root) == 5
    stored = _forge(cache, wasm)
    spy.compiled.clear()
    assert await add_2_3(root) == 6  # mul's code
    assert spy.compiled == [] and spy.deserialized == [artifact_of(stored)]


def _dir_a_link(where: Path) -> None:
    real = where.parent / "real"
    where.rename(real)
    where.symlink_to(real)


def _dir_others(where: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")  # a failure under CI=true (conftest)
    os.chown(where, NOBODY, NOBODY)


@pytest.mark.parametrize("defect", [
    pytest.param(_dir_a_link, id="a-link"),
    pytest.param(_dir_others, id="another-uids"),
    pytest.param(lambda where: where.chmod(0o770), id="group-writable"),
    pytest.param(lambda where: where.chmod(0o703), id="other-writable"),
])
async def test_a_cache_directory_not_the_users_alone_is_not_used(
        tmp_path: Path, wasm: SimpleNamespace, cache: Path,
        defect: Callable[[Path], None]) -> None:
    root = plugin(tmp_path / "p", wasm.paths["add"])
    assert await add_2_3(root) == 5
    stored = _forge(cache, wasm)
    defect(cache)
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    with pytest.MonkeyPatch.context() as mp:
        spy = Spy(mp)
        assert await add_2_3(root) == 5
    assert spy.deserialized == [] and spy.compiled == [wasm.add]
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before  # nothing written
    assert artifact_of(stored) != b""
    usage = _module_cache.usage()
    assert isinstance(usage, str) and str(cache) in usage


async def test_eviction_keeps_the_total_under_the_bound_oldest_first(
        tmp_path: Path, wasm: SimpleNamespace, cache: Path, spy: Spy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    add, sub = plugin(tmp_path / "add", wasm.paths["add"]), plugin(tmp_path / "sub",
                                                                   wasm.paths["sub"])
    assert await add_2_3(add) == 5
    [stored] = entries(cache)
    size = stored.stat().st_size
    # Entries of other modules: 4 of add's size; room for 4 such entries in all.
    monkeypatch.setattr(_module_cache, "MAX_BYTES", 4 * size + size // 2)
    old = [cache / f"{i:064x}.cwasm" for i in range(4)]
    for i, path in enumerate(old):
        path.write_bytes(b"\0" * size)
        os.utime(path, ns=(0, (i + 1) * 10**9))
    os.utime(stored, ns=(0, 10**8))  # the oldest of all, until it is used
    assert await add_2_3(add) == 5  # a hit: add's entry is touched, the newest now
    assert len(spy.compiled) == 1
    assert await add_2_3(sub) == -1  # stored: the two oldest make room
    sub_key = _module_cache.ModuleCache(str(cache), _engine.ENGINE_SETTINGS).key(
        hashlib.sha256(wasm.sub).hexdigest())
    assert {p.name for p in entries(cache)} == {old[2].name, old[3].name, stored.name,
                                                f"{sub_key}.cwasm"}
    assert sum(p.stat().st_size for p in cache.iterdir()) <= _module_cache.MAX_BYTES


STORE_AT_ONCE = """\
import hashlib, os, sys, time, wasmtime
from sandboxer import _disk_cache
from sandboxer.loaders.wasm import _engine, _module_cache
where, ready, wasm = sys.argv[1:4]
_module_cache._directory = lambda: where
store = _disk_cache.DiskCache.store

def together(self, key, payload):
    # both processes have missed and compiled; both store at once
    open(os.path.join(ready, str(os.getpid())), "w").close()
    give_up = time.monotonic() + 30
    while len(os.listdir(ready)) < 2 and time.monotonic() < give_up:
        time.sleep(0.001)
    store(self, key, payload)
    print("stored", end=" ")

_disk_cache.DiskCache.store = together
engine = _engine.WasmEngine(workers=1)
data = open(wasm, "rb").read()
digest = hashlib.sha256(data).hexdigest()
module = engine.module(data, digest)
s = wasmtime.Store(engine.engine)
s.set_fuel(10**6)
s.set_epoch_deadline(1)
print(wasmtime.Instance(s, module, []).exports(s)["add"](s, 2, 3))
engine.release(digest)
engine.close()
"""


async def test_two_processes_storing_one_module_at_once_both_succeed(
        tmp_path: Path, wasm: SimpleNamespace, cache: Path, spy: Spy) -> None:
    ready = tmp_path / "ready"
    ready.mkdir()
    both = [subprocess.Popen([sys.executable, "-c", STORE_AT_ONCE, str(cache), str(ready),
                              str(wasm.paths["add"])], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO) for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in both]
    assert [(p.returncode, out) for p, (out, _) in zip(both, outputs)] == \
        [(0, "stored 5\n")] * 2, [err for _, err in outputs]
    assert sorted(os.listdir(ready)) == sorted(str(p.pid) for p in both)
    [stored] = entries(cache)
    assert os.listdir(cache) == [stored.name]  # no temporary left
    assert await add_2_3(plugin(tmp_path / "p", wasm.paths["add"])) == 5
    assert spy.compiled == [] and spy.deserialized == [artifact_of(stored)]


def test_the_key_covers_the_module_the_settings_wasmtime_and_the_kernel(
        wasm: SimpleNamespace, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _engine.ENGINE_SETTINGS
    def key(module: bytes, settings: tuple[tuple[str, object], ...] = settings) -> str | None:
        return _module_cache.ModuleCache(str(cache), settings).key(
            hashlib.sha256(module).hexdigest())

    assert key(wasm.add) == key(wasm.add) and len(key(wasm.add) or "") == 64
    assert key(wasm.mul) != key(wasm.add)
    for i, (name, value) in enumerate(settings):
        changed = settings[:i] + ((name, not value if isinstance(value, bool) else 1),) + \
            settings[i + 1:]
        assert key(wasm.add, changed) != key(wasm.add), name
    here, real = key(wasm.add), os.uname()
    for changed in ((real.release + "+1", real.version, real.machine),
                    (real.release, real.version + " again", real.machine),
                    (real.release, real.version, "aarch64")):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "uname", lambda: os.uname_result(
                (real.sysname, real.nodename, *changed)))
            assert key(wasm.add) != here, changed
    library = _module_cache._wasmtime_library()
    assert library is not None and library.startswith(wasmtime_version() + " ")
    assert "/_libwasmtime.so " in library
    monkeypatch.setattr(_module_cache, "_wasmtime_library", lambda: library + "0")
    assert key(wasm.add) != here  # another build of the library, or another version
    monkeypatch.setattr(_module_cache, "_wasmtime_library", lambda: None)
    assert key(wasm.add) is None  # not told apart: nothing cached


def wasmtime_version() -> str:
    from importlib.metadata import version

    return version("wasmtime")


def test_the_engine_is_configured_from_its_settings_alone() -> None:
    """The key is only as good as ENGINE_SETTINGS is complete: no Config attribute set
    anywhere else in the engine's module, and each setting a real Config property."""
    import ast

    tree = ast.parse(Path(_engine.__file__).read_text())
    assigned = [node for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AugAssign))
                for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                and target.value.id == "config"]
    assert assigned == []
    for name, _ in _engine.ENGINE_SETTINGS:
        assert isinstance(getattr(wasmtime.Config, name, None), property), name


async def test_doctor_reports_the_cache(tmp_path: Path, wasm: SimpleNamespace, cache: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from sandboxer import _doctor

    assert _doctor._wasm_cache() == {"directory": str(cache), "entries": 0, "bytes": 0,
                                     "max_bytes": _module_cache.MAX_BYTES}
    assert await add_2_3(plugin(tmp_path / "p", wasm.paths["add"])) == 5
    [stored] = entries(cache)
    assert _doctor._wasm()["cache"] == {"directory": str(cache), "entries": 1,
                                        "bytes": stored.stat().st_size,
                                        "max_bytes": _module_cache.MAX_BYTES}
    assert _module_cache.usage() == Usage(str(cache), 1, stored.stat().st_size)
    monkeypatch.setattr(_module_cache, "_directory", lambda: None)
    monkeypatch.setattr(_module_cache, "_locate", lambda: (None, "/x is not ours"))
    assert _doctor._wasm_cache() == {"directory": None, "reason": "/x is not ours"}


@pytest.mark.parametrize("mode,owner,usable", [
    pytest.param(0o700, 4242, True, id="the-users-own"),
    pytest.param(0o755, 4242, True, id="the-users-own-readable-by-all"),
    pytest.param(0o775, 4242, False, id="group-writable"),
    pytest.param(0o700, 0, False, id="another-users"),
])
def test_a_rootless_user_gets_a_cache_under_their_own_cache_home(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int, owner: int,
        usable: bool) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")  # a failure under CI=true (conftest)
    home = tmp_path / "xdg-cache"
    home.mkdir(mode=mode)
    home.chmod(mode)
    os.chown(home, owner, owner)
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "geteuid", lambda: 4242)
        where, why = _module_cache._locate()
    if usable:
        assert (where, why) == (str(home / "sandboxer" / "wasm"), "")
    else:
        assert where is None and str(home) in why
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored: the XDG default
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".cache").mkdir(mode=0o700)
    os.chown(tmp_path / ".cache", 4242, 4242)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "geteuid", lambda: 4242)
        assert _module_cache._locate() == (str(tmp_path / ".cache" / "sandboxer" / "wasm"), "")
    assert _module_cache._locate() == ("/var/cache/sandboxer/wasm", "")  # root
