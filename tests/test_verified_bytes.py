"""Only verified bytes run (issue 23): a plugin file swapped at any moment of a load never runs.

A plugin's files are checked (the manifest's sha256, a recorded tree checksum, a registry's
signed archive) and copied into the sandbox's private tmpfs; the launcher hashes the bytes it
writes and refuses to exec unless they are the checked ones. Each test swaps a file at one
window of the load (after the supervisor's check, before the copy; during the copy; after
the copy, before the exec or import) and shows that the swapped bytes never run: the load
either succeeds and the plugin reports the marker of the original file, or it fails with
IntegrityError.

The main plugin is written as a stranger would: a plain POSIX sh external plugin, with a
manifest whose sha256 was computed with sha256sum, no SDK. Each plugin reports a marker taken
from its own file; the swapped file differs only in that marker (same length, so an in-place
overwrite is a real mid-file change).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import wasmtime

import sandboxer.manager
import sandboxer.registry
from sandboxer import HostConfig, PluginManager, _minisign
from sandboxer.errors import IntegrityError
from sandboxer.loaders import out_of_process
from sandboxer.loaders.wasm import WasmEngine
from sandboxer.registry import publish
from sandboxer.sandbox import launcher_mounts, pool

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="sandboxed plugins need root here"),
    pytest.mark.usefixtures("no_leaks"),
]

ORIGINAL, SWAPPED = "original", "swapped!"  # same length: an in-place swap keeps the size

SH_PLUGIN = r"""#!/bin/sh
# Answers "marker" with the word below, over the sandboxer wire protocol (fd $SANDBOXER_RPC_FD).
MARKER=@MARKER@
fd=${SANDBOXER_RPC_FD:-3}
send() { printf '%s\n' "$1" >&"$fd"; }
send "{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"sandboxer.handshake\",\"params\":{\"cookie\":\"$SANDBOXER_MAGIC_COOKIE\",\"protocols\":[1],\"plugin\":{\"name\":\"marker\",\"version\":\"1.0.0\"},\"methods\":[\"marker\"]}}"
IFS= read -r answer <&"$fd" || exit 1
while IFS= read -r line <&"$fd"; do
    case $line in *'"method"'*) ;; *) continue ;; esac
    method=${line#*'"method":"'}; method=${method%%'"'*}
    id=${line#*'"id":'}; id=${id%%[!0-9]*}
    case $method in
        sandboxer.cancel) ;;
        marker) send "{\"jsonrpc\":\"2.0\",\"id\":$id,\"result\":\"$MARKER\"}" ;;
        *) send "{\"jsonrpc\":\"2.0\",\"id\":$id,\"error\":{\"code\":-32601,\"message\":\"no\"}}" ;;
    esac
done
exit 0
"""


def sh_source(marker: str, padding: int) -> bytes:
    """The sh plugin with ``marker``, padded with comment lines after its ``exit`` to
    ``padding`` bytes (a large file takes a while to copy)."""
    text = SH_PLUGIN.replace("@MARKER@", marker).encode()
    line = b"# " + b"p" * 1021 + b"\n"
    return text + line * max(0, (padding - len(text)) // len(line))


def sh_plugin(root: Path, *, padding: int = 0, plugin_id: str = "stranger.marker") -> Path:
    """A plugin directory as a stranger writes it: plugin.toml with the sha256 of its script."""
    root.mkdir(parents=True)
    script = root / "plugin.sh"
    script.write_bytes(sh_source(ORIGINAL, padding))
    script.chmod(0o755)
    (root / "plugin.toml").write_text(
        f'[plugin]\nid = "{plugin_id}"\nversion = "1.0.0"\ntype = "external"\n'
        f'entrypoint = "plugin.sh"\nsha256 = "{hashlib.sha256(script.read_bytes()).hexdigest()}"\n'
    )
    return root


def py_plugin(root: Path, plugin_id: str = "stranger.pymarker", marker: str = ORIGINAL) -> Path:
    root.mkdir(parents=True)
    (root / "main.py").write_text(f'MARKER = "{marker}"\n\ndef marker():\n    return MARKER\n')
    digest = hashlib.sha256((root / "main.py").read_bytes()).hexdigest()
    (root / "plugin.toml").write_text(
        f'[plugin]\nid = "{plugin_id}"\nversion = "1.0.0"\ntype = "python"\n'
        f'entrypoint = "main.py"\nsha256 = "{digest}"\n'
    )
    return root


def swapped(path: Path) -> bytes:
    return path.read_bytes().replace(ORIGINAL.encode(), SWAPPED.encode(), 1)


def swap_by_rename(path: Path, data: bytes) -> None:
    """Another file put in its place (what an editor or an attacker with the directory does)."""
    tmp = path.with_name(f".{path.name}.swap")
    tmp.write_bytes(data)
    tmp.chmod(path.stat().st_mode & 0o777)
    os.replace(tmp, path)


def swap_in_place(path: Path, data: bytes) -> None:
    """The same file (same inode) overwritten: an fd opened before sees the new bytes."""
    with open(path, "r+b") as f:
        f.write(data)


def cold() -> HostConfig:
    return HostConfig(warm_sandboxes=0)


def after(original: Any, then: Any) -> Any:
    """``original`` (sync or async) wrapped to run ``then()`` once it returned."""
    if asyncio.iscoroutinefunction(original):

        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            result = await original(*args, **kwargs)
            then(result)
            return result

        return wrapped_async

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        then(result)
        return result

    return wrapped


# -- window 1: after the supervisor's check, before the copy ---------------------------------


@pytest.mark.parametrize("swap", [swap_by_rename, swap_in_place], ids=["rename", "in-place"])
async def test_a_file_swapped_after_the_check_is_refused_by_the_copy(tmp_path, monkeypatch, swap):
    root = sh_plugin(tmp_path / "p")
    script = root / "plugin.sh"
    bad = swapped(script)
    monkeypatch.setattr(
        sandboxer.manager,
        "verify_integrity",
        after(sandboxer.manager.verify_integrity, lambda _: swap(script, bad)),
    )
    async with PluginManager(config=cold()) as mgr:
        with pytest.raises(IntegrityError, match="copied into the sandbox") as caught:
            await mgr.load(root)
        assert "plugin.sh" in str(caught.value) and "manifest's sha256" in str(caught.value)
        assert caught.value.plugin_id == "stranger.marker"
        assert await mgr.list() == []


async def test_a_warm_handover_refuses_a_file_swapped_after_the_check(tmp_path, monkeypatch):
    root = py_plugin(tmp_path / "p")
    main = root / "main.py"
    bad = swapped(main)
    monkeypatch.setattr(
        sandboxer.manager,
        "verify_integrity",
        after(sandboxer.manager.verify_integrity, lambda _: swap_by_rename(main, bad)),
    )
    handovers: list[str] = []
    real_hand_over = pool.hand_over

    async def hand_over(*args: Any, **kwargs: Any) -> None:
        handovers.append("made")
        try:
            await real_hand_over(*args, **kwargs)
        except IntegrityError:
            handovers.append("refused")
            raise

    monkeypatch.setattr(pool, "hand_over", hand_over)
    async with PluginManager() as mgr:
        await mgr.warm_up()
        with pytest.raises(IntegrityError, match="copied into the sandbox"):
            await mgr.load(root)
    assert handovers == ["made", "refused"]  # the warm sandbox's PID 1 refused the copy


async def test_a_recorded_checksum_is_required_of_the_copy(tmp_path, monkeypatch):
    """A checksum recorded before the load (discovery's, given to load) covers every file:
    a data file swapped after it was taken fails the load, though the manifest's sha256
    (the entrypoint's) still matches."""
    root = sh_plugin(tmp_path / "p")
    (root / "data.txt").write_text("the data the checksum saw\n")
    checksum = sandboxer.checksum(root)
    (root / "data.txt").write_text("other data\n")
    async with PluginManager(config=cold()) as mgr:
        with pytest.raises(IntegrityError, match="the checksum recorded for it"):
            await mgr.load(root, checksum=checksum)
        (root / "data.txt").write_text("the data the checksum saw\n")
        loaded = await mgr.load(root, checksum=checksum)
        assert await loaded.call("marker") == ORIGINAL


# -- window 2: during the copy ----------------------------------------------------------------


async def test_a_swapper_racing_the_copy_never_gets_its_bytes_run(tmp_path):
    """A 4 MiB plugin script, swapped again and again (renames and in-place overwrites)
    while it is loaded over and over: every load that succeeds ran the original; the others
    failed with IntegrityError; and the swapper did hit some loads."""
    root = sh_plugin(tmp_path / "p", padding=4 << 20)
    script = root / "plugin.sh"
    good, bad = script.read_bytes(), swapped(script)
    stop = threading.Event()
    swaps = 0

    def swapper() -> None:
        nonlocal swaps
        while not stop.is_set():
            swap = swap_by_rename if swaps % 2 else swap_in_place
            swap(script, bad)
            swap(script, good)
            swaps += 1
            stop.wait(0.002)

    seen: list[str] = []
    refused: list[str] = []
    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        async with PluginManager(config=cold()) as mgr:
            for _ in range(12):
                try:
                    loaded = await mgr.load(root)
                except IntegrityError as exc:
                    refused.append(str(exc))
                    continue
                seen.append(await loaded.call("marker"))
                await mgr.unload(loaded.id)
    finally:
        stop.set()
        thread.join()
    assert SWAPPED not in seen
    assert set(seen) <= {ORIGINAL}
    assert swaps > 0 and refused, (swaps, seen)  # the swapper did race the loads
    assert len(seen) + len(refused) == 12
    print(f"swaps {swaps}; ran the original {len(seen)}; refused {len(refused)}, of which "
          f"{sum('copied into the sandbox' in r for r in refused)} by the copy's check")


# -- window 3: after the copy, before the exec (or the import) -------------------------------


async def test_a_file_changed_after_the_copy_does_not_reach_the_plugin(tmp_path, monkeypatch):
    """Overwritten in place right after the launch (the sandbox built, the copy made, the
    script started): sh reads its script as it goes, yet it reads the copy."""
    root = sh_plugin(tmp_path / "p", padding=64 << 10)
    script = root / "plugin.sh"
    bad = swapped(script)
    monkeypatch.setattr(
        out_of_process,
        "launch_confined",
        after(out_of_process.launch_confined, lambda _: swap_in_place(script, bad)),
    )
    async with PluginManager(config=cold()) as mgr:
        loaded = await mgr.load(root)
        assert script.read_bytes() == bad
        assert await loaded.call("marker") == ORIGINAL


async def test_a_file_changed_after_a_warm_handover_is_not_imported(tmp_path, monkeypatch):
    root = py_plugin(tmp_path / "p")
    main = root / "main.py"
    bad = swapped(main)
    monkeypatch.setattr(pool, "hand_over", after(pool.hand_over, lambda _: swap_in_place(main, bad)))
    async with PluginManager() as mgr:
        await mgr.warm_up()
        loaded = await mgr.load(root)
        assert loaded.started_warm and main.read_bytes() == bad
        assert await loaded.call("marker") == ORIGINAL


# -- the registry -----------------------------------------------------------------------------


@pytest.fixture
def signed(tmp_path: Path) -> HostConfig:
    public, secret = _minisign.generate_keypair()
    pub = tmp_path / "trusted.pub"
    pub.write_text(public.to_file_text())
    publish(py_plugin(tmp_path / "src", "acme.marker"), tmp_path / "registry", secret)
    return HostConfig(
        registry=str(tmp_path / "registry"),
        trusted_keys=(str(pub),),
        cache_dir=str(tmp_path / "cache"),
        warm_sandboxes=0,
    )


async def test_a_registry_cache_swapped_after_verification_is_not_what_runs(
    tmp_path, monkeypatch, signed
):
    """The cached archive is swapped for other bytes right after its signature verified, and
    the extracted directory is changed once fetch returned: the archive is extracted from
    the verified bytes in memory, and the load requires what those bytes unpack to."""
    cache = tmp_path / "cache"
    other = tmp_path / "other.tar.gz"
    publish(py_plugin(tmp_path / "evil", "acme.marker", SWAPPED), tmp_path / "evil-registry",
            _minisign.generate_keypair()[1])
    (other,) = (tmp_path / "evil-registry" / "blobs" / "sha256").glob("[0-9a-f]*[0-9a-f]")
    real_verify = sandboxer.registry._minisign.verify

    def verify_then_swap(data: bytes, *args: Any, **kwargs: Any) -> Any:
        result = real_verify(data, *args, **kwargs)
        for blob in (cache / "blobs").glob("*"):
            if blob.read_bytes() == data:
                shutil.copyfile(other, blob)
        return result

    async with PluginManager(config=signed) as mgr:
        first = await mgr.load_from_registry("acme.marker", "1.0.0")  # fills the cache
        assert await first.call("marker") == ORIGINAL
        await mgr.unload("acme.marker")
        monkeypatch.setattr(sandboxer.registry._minisign, "verify", verify_then_swap)
        second = await mgr.load_from_registry("acme.marker", "1.0.0")
        assert await second.call("marker") == ORIGINAL
        await mgr.unload("acme.marker")

        # The extraction changed after fetch returned it: the pinned checksum refuses it.
        def tamper(fetched: Any) -> None:
            (fetched.directory / "main.py").write_text(
                f'MARKER = "{SWAPPED}"\n\ndef marker():\n    return MARKER\n')
            manifest = fetched.directory / "plugin.toml"
            digest = hashlib.sha256((fetched.directory / "main.py").read_bytes()).hexdigest()
            text = manifest.read_text()
            manifest.write_text(text[: text.index("sha256")] + f'sha256 = "{digest}"\n')

        monkeypatch.setattr(sandboxer.registry, "fetch_verified",
                            after(sandboxer.registry.fetch_verified, tamper))
        with pytest.raises(IntegrityError, match="copied into the sandbox"):
            await mgr.load_from_registry("acme.marker", "1.0.0")


# -- wasm: compiled from the bytes that were hashed ------------------------------------------

MARKER_WAT = "(module (func (export \"marker\") (result i32) i32.const {n}))"


def wasm_plugin(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "marker.wasm").write_bytes(wasmtime.wat2wasm(MARKER_WAT.format(n=1111)))
    digest = hashlib.sha256((root / "marker.wasm").read_bytes()).hexdigest()
    (root / "plugin.toml").write_text(
        '[plugin]\nid = "stranger.wasm"\nversion = "1.0.0"\ntype = "wasm"\n'
        f'entrypoint = "marker.wasm"\nsha256 = "{digest}"\n'
    )
    return root


async def test_a_wasm_module_swapped_after_the_check_is_refused(tmp_path, monkeypatch):
    root = wasm_plugin(tmp_path / "w")
    module = root / "marker.wasm"
    bad = wasmtime.wat2wasm(MARKER_WAT.format(n=2222))
    monkeypatch.setattr(
        sandboxer.manager,
        "verify_integrity",
        after(sandboxer.manager.verify_integrity, lambda _: swap_by_rename(module, bad)),
    )
    async with PluginManager() as mgr:
        with pytest.raises(IntegrityError, match="module read to be compiled"):
            await mgr.load(root)


async def test_a_wasm_module_swapped_after_hashing_is_not_what_runs(tmp_path, monkeypatch):
    """Swapped once the loader has read and hashed it (at compile time): the module compiled
    is the one hashed, and the compile cache is keyed by that digest."""
    root = wasm_plugin(tmp_path / "w")
    module = root / "marker.wasm"
    good = module.read_bytes()
    bad = wasmtime.wat2wasm(MARKER_WAT.format(n=2222))
    compiled: list[str] = []
    real_module = WasmEngine.module

    def swap_then_compile(self: WasmEngine, data: bytes, digest: str) -> Any:
        swap_by_rename(module, bad)
        compiled.append(digest)
        return real_module(self, data, digest)

    monkeypatch.setattr(WasmEngine, "module", swap_then_compile)
    async with PluginManager() as mgr:
        loaded = await mgr.load(root)
        assert await loaded.call("marker") == 1111
    assert compiled == [hashlib.sha256(good).hexdigest()]


# -- the launcher's checksum is the supervisor's ----------------------------------------------


def test_the_launcher_computes_the_same_tree_checksum(tmp_path):
    """launcher_mounts (standard library only) writes the tree checksum's format itself:
    the same digest as sandboxer.checksum for a tree with nested files, links (inside, out,
    dangling, to a directory), a fifo, a file named like a directory, and __pycache__."""
    root = tmp_path / "t"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "__pycache__").mkdir()
    (root / "a" / "__pycache__" / "x.pyc").write_bytes(b"planted")
    (root / "a.txt").write_text("a")
    (root / "a" / "b" / "c").write_bytes(bytes(range(256)))
    (root / "a" / "in").symlink_to("b/c")
    (root / "out").symlink_to("/etc/passwd")
    (root / "dangling").symlink_to("nowhere")
    (root / "dirlink").symlink_to("a")
    os.mkfifo(root / "fifo")
    (root / "a b\u00e9").write_text("unicode name")
    source = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ((_, entries),) = launcher_mounts.open_copies(
            {"copies": [{"target": "", "fd": 0, "name": "t", "max_entries": 100}]}, [source])
    finally:
        os.close(source)
    digests: dict[str, tuple[str, str]] = {}
    for rel, kind, _, payload in entries:
        if kind == "f":
            with os.fdopen(int(payload), "rb") as f:
                digests[rel] = ("f", hashlib.sha256(f.read()).hexdigest())
        elif kind == "l":
            digests[rel] = ("l", hashlib.sha256(os.fsencode(str(payload))).hexdigest())
        else:
            digests[rel] = (kind, "")
    assert not any("__pycache__" in rel for rel in digests)  # never copied
    assert "sha256:" + launcher_mounts.tree_digest(digests) == sandboxer.checksum(root)
    assert launcher_mounts.tree_digest(digests, "a/") == \
        sandboxer.checksum(root / "a").removeprefix("sha256:")
    assert launcher_mounts.IGNORED_DIRS == sandboxer._digest.IGNORED_DIRS


def test_an_entrypoint_link_is_checked_where_it_leads_inside_the_copy():
    digests = {"bin": ("d", ""), "bin/run": ("l", "x"), "bin/real": ("f", "ab" * 32),
               "up": ("l", "y")}
    links = {"bin/run": "real", "up": "../../etc/passwd"}
    launcher_mounts.verify_copy("/plugin", digests, links,
                                [{"path": "bin/run", "sha256": "ab" * 32, "what": "it"}],
                                bare=False)
    for path, why in (("up", "link out of the plugin directory"), ("nope", "missing")):
        with pytest.raises(launcher_mounts.SetupFailed) as caught:
            launcher_mounts.verify_copy("/plugin", digests, links,
                                        [{"path": path, "sha256": "ab" * 32, "what": "it"}],
                                        bare=False)
        assert why in caught.value.error and caught.value.step.name == "VERIFY"
    with pytest.raises(launcher_mounts.SetupFailed) as caught:
        launcher_mounts.verify_copy("/plugin", digests, links,
                                    [{"path": "bin/real", "sha256": "cd" * 32, "what": "it"}],
                                    bare=False)
    assert "none of them ran" in caught.value.error


def test_a_bad_checksum_argument_is_refused():
    async def load() -> None:
        async with PluginManager() as mgr:
            await mgr.load("/nonexistent", checksum="md5:abc")

    with pytest.raises(ValueError, match="sha256"):
        asyncio.run(load())

