"""Attacks on registry trust: whoever serves a registry (a mirror, a proxy, a stale copy)
rolling it back or rewriting its index, and a publisher's key signing for ids it was not
trusted for (issue 16, point 9).

Each probe plays the attacker with the tools a real one has: copies of earlier signed
registry files, edits to index.json, a key of its own, a key the host trusts only for other
ids. The host's side is the public surface (``fetch``, ``PluginManager.load_from_registry``,
the ``sandboxer`` command), and an attack counts as stopped only when the user sees it
refused with the reason, never merely by some other error on the way. These probes need no
sandbox fleet: registry trust is decided before any plugin code exists on the host.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from sandboxer import HostConfig, PluginManager, SandboxConfig, _minisign
from sandboxer.errors import IntegrityError
from sandboxer.registry import Registry, fetch, publish

pytestmark = pytest.mark.usefixtures("no_leaks")
TRUSTED = SandboxConfig(enabled=False)  # the refusals come before any plugin runs

SOURCE = '''
def version():
    return "{version}"
'''


def make_plugin(root: Path, plugin_id: str, version: str) -> Path:
    d = root / f"{plugin_id}-{version}"
    d.mkdir(parents=True)
    (d / "plugin.toml").write_text(
        f'[plugin]\nid = "{plugin_id}"\nversion = "{version}"\ntype = "python"\n'
        'entrypoint = "main.py"\n')
    (d / "main.py").write_text(SOURCE.format(version=version))
    return d


def write_key(path: Path, key: _minisign.PublicKey) -> Path:
    path.write_text(key.to_file_text())
    return path


def cli(*args: str, cache: Path, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    env.pop("SANDBOXER_CONFIG", None)
    if config is not None:
        env["SANDBOXER_CONFIG"] = str(config)
    return subprocess.run([sys.executable, "-m", "sandboxer.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.fixture
def publisher() -> tuple[_minisign.PublicKey, _minisign.SecretKey]:
    return _minisign.generate_keypair()


class _Mirror(http.server.SimpleHTTPRequestHandler):
    """Serves whichever directory ``root[0]`` names at the moment: the attacker switches it."""

    root: list[Path] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, directory=str(self.root[0]), **kwargs)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def mirror() -> Iterator[tuple[str, list[Path]]]:
    """An HTTP mirror and the list whose first item is the directory it serves."""
    root: list[Path] = []
    handler = type("Mirror", (_Mirror,), {"root": root})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# -- (a) rollback: an older signed index after a newer one was seen ----------------------------
def test_a_mirror_replaying_an_older_signed_index_is_refused(
        tmp_path: Path, publisher: Any, mirror: Any) -> None:
    """The registry published 1.0.0, then 2.0.0 (a security fix, say). The host fetched
    "latest" and got 2.0.0. The mirror then serves its copy from before 2.0.0: every file in
    it was genuinely signed by the publisher, but "latest" is 1.0.0 there again."""
    pub, sec = publisher
    url, served = mirror
    registry, cache = tmp_path / "registry", tmp_path / "cache"
    publish(make_plugin(tmp_path / "src", "acme.tool", "1.0.0"), registry, sec)
    snapshot = tmp_path / "mirror-copy"
    shutil.copytree(registry, snapshot)                 # what the mirror kept
    publish(make_plugin(tmp_path / "src", "acme.tool", "2.0.0"), registry, sec)

    served[:] = [registry]
    entry, _ = fetch(Registry(url), "acme.tool", "latest", trusted_keys=[pub], cache_dir=cache)
    assert entry.version == "2.0.0"

    served[:] = [snapshot]
    with pytest.raises(IntegrityError, match=r"rollback: index sequence 1 is older than 2 "
                                             r"seen before") as refused:
        fetch(Registry(url), "acme.tool", "latest", trusted_keys=[pub], cache_dir=cache)
    assert url in str(refused.value) and "up-to-date" in str(refused.value)
    # Re-reading the newest index (the same sequence) is fine, and the refusal changed
    # nothing: the host still gets 2.0.0 from an honest copy.
    served[:] = [registry]
    entry, _ = fetch(Registry(url), "acme.tool", "latest", trusted_keys=[pub], cache_dir=cache)
    assert entry.version == "2.0.0"


@pytest.mark.asyncio(loop_scope="module")
async def test_a_rollback_is_refused_by_the_command_and_the_manager(tmp_path: Path,
                                                                    publisher: Any) -> None:
    """The same replay against a registry directory, seen through `sandboxer call` (which
    remembers the sequence in $XDG_CACHE_HOME) and PluginManager.load_from_registry."""
    pub, sec = publisher
    registry, cache = tmp_path / "registry", tmp_path / "cache"
    key = write_key(tmp_path / "publisher.pub", pub)
    publish(make_plugin(tmp_path / "src", "acme.tool", "1.0.0"), registry, sec)
    old = {name: (registry / name).read_bytes()
           for name in ("index.json", "index.json.minisig") if (registry / name).exists()}
    publish(make_plugin(tmp_path / "src", "acme.tool", "2.0.0"), registry, sec)
    run = cli("call", "acme.tool@latest", "version", "--registry", str(registry),
              "--trusted-key", str(key), "--no-sandbox", cache=cache)
    assert (run.returncode, run.stdout) == (0, "2.0.0\n"), run.stderr
    for name, data in old.items():                      # the replay
        (registry / name).write_bytes(data)
    run = cli("call", "acme.tool@latest", "version", "--registry", str(registry),
              "--trusted-key", str(key), "--no-sandbox", cache=cache)
    assert run.returncode == 2 and "rollback: index sequence 1 is older than 2" in run.stderr, (
        run.returncode, run.stdout, run.stderr)

    host = HostConfig(registry=str(registry), trusted_keys=(str(key),),
                      cache_dir=str(cache / "sandboxer"))          # the state the CLI kept
    async with PluginManager(host) as mgr:
        with pytest.raises(IntegrityError, match="rollback: index sequence 1 is older than 2"):
            await mgr.load_from_registry("acme.tool", "latest", sandbox=TRUSTED)
        assert await mgr.list() == []


# -- (b) an edited index that points "latest" at an older version ------------------------------
def test_an_index_edited_to_make_an_older_version_latest_is_refused(
        tmp_path: Path, publisher: Any) -> None:
    """The mirror drops 2.0.0 from index.json so "latest" resolves to 1.0.0, whose archive
    and archive signature are genuine; it keeps the index signature it has."""
    pub, sec = publisher
    registry, cache = tmp_path / "registry", tmp_path / "cache"
    for version in ("1.0.0", "2.0.0"):
        publish(make_plugin(tmp_path / "src", "acme.tool", version), registry, sec)
    index = json.loads((registry / "index.json").read_text())
    del index["plugins"]["acme.tool"]["versions"]["2.0.0"]
    (registry / "index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    with pytest.raises(IntegrityError, match="index.json failed its signature check") as refused:
        fetch(Registry(registry), "acme.tool", "latest", trusted_keys=[pub], cache_dir=cache)
    assert "altered" in str(refused.value)
    assert not (cache / "plugins").exists()             # nothing was fetched or extracted


# -- (c) an unsigned index, or one re-signed by a key the host does not trust -------------------
def _drop_latest(registry: Path) -> bytes:
    index = json.loads((registry / "index.json").read_text())
    del index["plugins"]["acme.tool"]["versions"]["2.0.0"]
    raw = json.dumps(index).encode()
    (registry / "index.json").write_bytes(raw)
    return raw


@pytest.mark.parametrize("attack", ["unsigned", "resigned-by-unknown-key"])
def test_an_unsigned_or_foreign_signed_index_is_refused(tmp_path: Path, publisher: Any,
                                                         attack: str) -> None:
    pub, sec = publisher
    registry, cache = tmp_path / "registry", tmp_path / "cache"
    for version in ("1.0.0", "2.0.0"):
        publish(make_plugin(tmp_path / "src", "acme.tool", version), registry, sec)
    raw = _drop_latest(registry)
    signature = registry / "index.json.minisig"
    if attack == "unsigned":
        signature.unlink(missing_ok=True)
        expected = r"index.json is not signed \(index.json.minisig is missing\)"
    else:
        _, stranger = _minisign.generate_keypair()
        signature.write_text(_minisign.sign(raw, stranger,
                                            trusted_comment="sandboxer index seq=1000"))
        expected = (f"unknown key id: signed by key {stranger.key_id_hex}, not the trusted key "
                    f"{pub.key_id_hex}")
    with pytest.raises(IntegrityError, match=expected):
        fetch(Registry(registry), "acme.tool", "latest", trusted_keys=[pub], cache_dir=cache)
    key = write_key(tmp_path / "publisher.pub", pub)
    run = cli("registry", "list", "--registry", str(registry), "--trusted-key", str(key),
              "--json", cache=cache)
    assert run.returncode == 2 and json.loads(run.stdout)["ok"] is False, run.stdout
    assert "index.json" in json.loads(run.stdout)["error"]["message"]


# -- (d) a key trusted only for acme.* signs evil.tool -------------------------------------------
@pytest.fixture
def scoped(tmp_path: Path) -> dict[str, Any]:
    """An operator key trusted for every id, and acme's key trusted for acme.* and acme. acme
    publishes acme.tool, then evil.tool: twice, once signing the index itself (as publish
    does) and once with the operator re-signing the index afterwards."""
    operator_pub, operator_sec = _minisign.generate_keypair()
    acme_pub, acme_sec = _minisign.generate_keypair()
    out: dict[str, Any] = {
        "operator": write_key(tmp_path / "operator.pub", operator_pub),
        "acme": write_key(tmp_path / "acme.pub", acme_pub), "acme_id": acme_pub.key_id_hex}
    for layout in ("acme-signs-index", "operator-signs-index"):
        registry = tmp_path / layout
        publish(make_plugin(tmp_path / layout / "src", "acme.tool", "1.0.0"), registry, acme_sec)
        publish(make_plugin(tmp_path / layout / "src", "evil.tool", "1.0.0"), registry, acme_sec)
        if layout == "operator-signs-index":
            raw = (registry / "index.json").read_bytes()
            (registry / "index.json.minisig").write_text(
                _minisign.sign(raw, operator_sec, trusted_comment="sandboxer index seq=3"))
        out[layout] = registry
    return out


@pytest.mark.parametrize("layout", ["acme-signs-index", "operator-signs-index"])
def test_a_key_scoped_to_acme_cannot_sign_evil_tool(tmp_path: Path, scoped: dict[str, Any],
                                                     layout: str) -> None:
    registry, cache = scoped[layout], tmp_path / "cache"
    keys = ["--trusted-key", f"{scoped['acme']}=acme.*,acme", "--trusted-key",
            str(scoped["operator"])]
    run = cli("registry", "fetch", "evil.tool@1.0.0", "--registry", str(registry), *keys,
              cache=cache)
    assert run.returncode == 2, (run.stdout, run.stderr)
    # The refusal names the key, the plugin id and the patterns.
    for part in (f"key {scoped['acme_id']}", "evil.tool", "only for ids [acme.*, acme]"):
        assert part in run.stderr, run.stderr
    assert not list((cache / "sandboxer").glob("plugins/evil.tool*"))
    run = cli("registry", "fetch", "acme.tool@1.0.0", "--registry", str(registry), *keys,
              cache=cache)
    assert run.returncode == 0, run.stderr
    assert (Path(run.stdout.strip()) / "plugin.toml").read_text().count('"acme.tool"') == 1


@pytest.mark.asyncio(loop_scope="module")
async def test_a_scoped_key_in_the_host_config(tmp_path: Path, scoped: dict[str, Any]) -> None:
    """The same through the host config's table form and load_from_registry."""
    config = tmp_path / "sandboxer.toml"
    config.write_text(
        "[host]\n"
        f'registry = "{scoped["operator-signs-index"]}"\n'
        f'cache_dir = "{tmp_path / "cache"}"\n'
        f'trusted_keys = ["{scoped["operator"]}", '
        f'{{key = "{scoped["acme"]}", ids = ["acme.*", "acme"]}}]\n')
    host = HostConfig.load(config)
    async with PluginManager(host) as mgr:
        with pytest.raises(IntegrityError, match=f"signed by key {scoped['acme_id']} "
                                                 r"\(.*acme.pub\), which is trusted only for "
                                                 r"ids \[acme\.\*, acme\], not for "
                                                 "evil.tool"):
            await mgr.load_from_registry("evil.tool", "1.0.0", sandbox=TRUSTED)
        plugin = await mgr.load_from_registry("acme.tool", "1.0.0", sandbox=TRUSTED)
        assert await plugin.call("version") == "1.0.0"
