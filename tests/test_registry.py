"""The signed registry: publish, resolve, fetch over a directory or HTTP, verify, extract."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from sandboxer import HostConfig, PluginManager
from sandboxer import _minisign
from sandboxer.errors import IntegrityError, PluginNotFound, RegistryError
from sandboxer.registry import Registry, fetch, publish, safe_extract, sign_index

pytestmark = pytest.mark.usefixtures("no_leaks")

PLUGIN = '''
def version():
    return "{version}"

def add(a, b):
    return a + b
'''


def make_plugin(root: Path, version: str, plugin_id: str = "acme.calc") -> Path:
    d = root / f"{plugin_id}-{version}"
    d.mkdir(parents=True)
    (d / "plugin.toml").write_text(
        f'[plugin]\nid = "{plugin_id}"\nversion = "{version}"\ntype = "python"\n'
        'entrypoint = "calc.py"\n')
    (d / "calc.py").write_text(PLUGIN.format(version=version))
    return d


@pytest.fixture
def keys() -> tuple[_minisign.PublicKey, _minisign.SecretKey]:
    return _minisign.generate_keypair()


@pytest.fixture
def registry(tmp_path: Path, keys: Any) -> Path:
    reg = tmp_path / "registry"
    for version in ("1.0.0", "1.2.0", "1.2.5", "2.0.0", "2.1.0-rc.1"):
        publish(make_plugin(tmp_path / "src", version), reg, keys[1])
    return reg


def test_publish_writes_index_blobs_and_signatures(tmp_path: Path, registry: Path,
                                                   keys: Any) -> None:
    index = json.loads((registry / "index.json").read_text())
    entry = index["plugins"]["acme.calc"]["versions"]["1.2.0"]
    blob = (registry / entry["blob"]).read_bytes()
    assert entry["sha256"] == hashlib.sha256(blob).hexdigest() and entry["size"] == len(blob)
    assert entry["blob"] == f"blobs/sha256/{entry['sha256']}"
    verified = _minisign.verify(blob, (registry / entry["signature"]).read_text(), [keys[0]])
    assert verified.trusted_comment == f"sandboxer acme.calc@1.2.0 sha256:{entry['sha256']}"
    index = Registry(registry).index([keys[0]], cache_dir=tmp_path / "cache")
    assert sorted(e.version for e in index.entries()) == [
        "1.0.0", "1.2.0", "1.2.5", "2.0.0", "2.1.0-rc.1"]
    # The index is signed too: five publishes, sequence 5.
    verified = _minisign.verify((registry / "index.json").read_bytes(),
                                (registry / "index.json.minisig").read_text(), [keys[0]])
    assert verified.trusted_comment == "sandboxer index seq=5" and index.sequence == 5


def test_archives_are_deterministic(tmp_path: Path, keys: Any) -> None:
    """Publishing the same directory twice gives the same bytes (and so the same digest)."""
    src = make_plugin(tmp_path / "src", "1.0.0")
    a = publish(src, tmp_path / "a", keys[1])
    (src / "calc.py").touch()
    b = publish(src, tmp_path / "b", keys[1])
    assert a.sha256 == b.sha256


def test_a_published_version_is_immutable(tmp_path: Path, registry: Path, keys: Any) -> None:
    src = make_plugin(tmp_path / "other", "1.2.0")
    (src / "calc.py").write_text("def add(a, b):\n    return 0\n")
    with pytest.raises(RegistryError, match="already published"):
        publish(src, registry, keys[1])


@pytest.mark.parametrize(("wanted", "version"), [
    ("1.2.0", "1.2.0"), ("latest", "2.0.0"), ("^1.2", "1.2.5"), ("~1.2.0", "1.2.5"),
    (">=1,<2", "1.2.5"), ("^1", "1.2.5"), ("2.1.0-rc.1", "2.1.0-rc.1"),
])
def test_fetch_resolves_versions_and_ranges(tmp_path: Path, registry: Path, keys: Any,
                                            wanted: str, version: str) -> None:
    entry, directory = fetch(Registry(registry), "acme.calc", wanted, trusted_keys=[keys[0]],
                             cache_dir=tmp_path / "cache")
    assert entry.version == version
    assert f'return "{version}"' in (directory / "calc.py").read_text()


def test_unknown_plugins_and_versions_are_not_found(tmp_path: Path, registry: Path,
                                                    keys: Any) -> None:
    with pytest.raises(PluginNotFound, match="no plugin"):
        fetch(Registry(registry), "acme.nope", "latest", trusted_keys=[keys[0]],
              cache_dir=tmp_path / "cache")
    with pytest.raises(PluginNotFound, match="available: 1.0.0"):
        fetch(Registry(registry), "acme.calc", "^3", trusted_keys=[keys[0]],
              cache_dir=tmp_path / "cache")


def _entry(registry: Path, version: str) -> dict[str, Any]:
    return json.loads((registry / "index.json").read_text())["plugins"]["acme.calc"][
        "versions"][version]


def test_a_tampered_archive_fails_the_sha256_check(tmp_path: Path, registry: Path,
                                                   keys: Any) -> None:
    blob = registry / _entry(registry, "1.2.0")["blob"]
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256 check failed"):
        fetch(Registry(registry), "acme.calc", "1.2.0", trusted_keys=[keys[0]],
              cache_dir=tmp_path / "cache")


def test_an_unknown_key_fails_the_signature_check(tmp_path: Path, registry: Path) -> None:
    stranger, _ = _minisign.generate_keypair()
    with pytest.raises(IntegrityError, match="(?i)key"):
        fetch(Registry(registry), "acme.calc", "1.2.0", trusted_keys=[stranger],
              cache_dir=tmp_path / "cache")


def test_a_signature_of_another_version_is_refused(tmp_path: Path, registry: Path,
                                                   keys: Any) -> None:
    """An index that points 1.2.0 at 1.0.0's (validly signed) archive is caught by the
    archive signature's trusted comment, even when a trusted key signed that index."""
    index_path = registry / "index.json"
    index = json.loads(index_path.read_text())
    versions = index["plugins"]["acme.calc"]["versions"]
    versions["1.2.0"] = dict(versions["1.0.0"])
    index_path.write_text(json.dumps(index))
    sign_index(registry, keys[1])
    with pytest.raises(IntegrityError, match="signature check failed"):
        fetch(Registry(registry), "acme.calc", "1.2.0", trusted_keys=[keys[0]],
              cache_dir=tmp_path / "cache")


def test_no_trusted_keys_means_no_fetch(tmp_path: Path, registry: Path) -> None:
    with pytest.raises(IntegrityError, match="no trusted keys"):
        fetch(Registry(registry), "acme.calc", "1.2.0", trusted_keys=[],
              cache_dir=tmp_path / "cache")


def test_a_changed_cache_is_extracted_again(tmp_path: Path, registry: Path, keys: Any) -> None:
    cache = tmp_path / "cache"
    _, first = fetch(Registry(registry), "acme.calc", "1.2.0", trusted_keys=[keys[0]],
                     cache_dir=cache)
    (first / "calc.py").write_text("def add(a, b):\n    return 'evil'\n")
    _, second = fetch(Registry(registry), "acme.calc", "1.2.0", trusted_keys=[keys[0]],
                      cache_dir=cache)
    assert 'return "1.2.0"' in (second / "calc.py").read_text()


async def test_load_from_registry_loads_the_resolved_version(tmp_path: Path, registry: Path,
                                                             keys: Any) -> None:
    pub = tmp_path / "trusted.pub"
    pub.write_text(keys[0].to_file_text())
    host = HostConfig(registry=str(registry), trusted_keys=(str(pub),),
                      cache_dir=str(tmp_path / "cache"))
    async with PluginManager(host) as mgr:
        p = await mgr.load_from_registry("acme.calc", "^1.2")
        assert (p.version, await p.call("version"), await p.call("add", 2, 3)) == (
            "1.2.5", "1.2.5", 5)


# -- safe extraction: each malicious archive refused --------------------------------------------
def _tar(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buf.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    return info


@pytest.mark.parametrize(("archive", "problem"), [
    (_tar((_info("/etc/evil"), b"x")), "absolute path"),
    (_tar((_info("../evil"), b"x")), "outside"),
    (_tar((_info("a/../../evil"), b"x")), "outside"),
    (_tar((_info("link", tarfile.SYMTYPE, "/etc/passwd"), None)), "link"),
    (_tar((_info("link", tarfile.SYMTYPE, "../../outside"), None)), "link"),
    (_tar((_info("plugin.toml"), b"x"), (_info("hard", tarfile.LNKTYPE, "/etc/passwd"), None)),
     "link"),
    (_tar((_info("dev", tarfile.CHRTYPE), None)), "device"),
    (_tar((_info("fifo", tarfile.FIFOTYPE), None)), "device"),
    (b"not a tarball at all", "cannot be read|damaged"),
], ids=["absolute", "dotdot", "nested-dotdot", "symlink-abs", "symlink-rel", "hardlink",
        "device", "fifo", "garbage"])
def test_malicious_archives_are_refused(tmp_path: Path, archive: bytes, problem: str) -> None:
    with pytest.raises(IntegrityError, match=problem):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil").exists() and not (tmp_path.parent / "evil").exists()


def test_an_archive_far_larger_unpacked_is_refused(tmp_path: Path) -> None:
    bomb = _tar((_info("zeros"), bytes(8 << 20)))
    assert len(bomb) < 64 << 10  # tiny packed
    with pytest.raises(IntegrityError, match="unpacks to more than"):
        safe_extract(bomb, tmp_path / "out", max_unpacked=4 << 20)


def test_too_many_members_are_refused(tmp_path: Path) -> None:
    many = _tar(*[(_info(f"f{i}"), b"") for i in range(50)])
    with pytest.raises(IntegrityError, match="more than 20 members"):
        safe_extract(many, tmp_path / "out", max_members=20)


# -- over HTTP ----------------------------------------------------------------------------------
class _Handler(http.server.SimpleHTTPRequestHandler):
    truncate: set[str] = set()

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        if self.path.lstrip("/") in self.truncate:
            body = Path(self.directory, self.path.lstrip("/")).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def http_registry(registry: Path) -> Iterator[tuple[str, type[_Handler]]]:
    handler = type("Handler", (_Handler,), {"truncate": set()})

    def make(*args: Any, **kwargs: Any) -> _Handler:
        return handler(*args, directory=str(registry), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_fetch_over_http(tmp_path: Path, http_registry: Any, keys: Any) -> None:
    url, _ = http_registry
    entry, directory = fetch(Registry(url), "acme.calc", "^1", trusted_keys=[keys[0]],
                             cache_dir=tmp_path / "cache")
    assert entry.version == "1.2.5" and (directory / "plugin.toml").is_file()


def test_http_404_is_a_registry_error(tmp_path: Path, registry: Path, http_registry: Any,
                                      keys: Any) -> None:
    url, _ = http_registry
    (registry / _entry(registry, "1.2.0")["blob"]).unlink()
    with pytest.raises(RegistryError, match="HTTP 404"):
        fetch(Registry(url), "acme.calc", "1.2.0", trusted_keys=[keys[0]],
              cache_dir=tmp_path / "cache")
    with pytest.raises(RegistryError, match="index.json: HTTP 404"):
        Registry(url + "nowhere/").index([keys[0]], cache_dir=tmp_path / "cache")


def test_a_truncated_download_is_an_integrity_error(tmp_path: Path, registry: Path,
                                                    http_registry: Any, keys: Any) -> None:
    url, handler = http_registry
    handler.truncate.add(_entry(registry, "1.2.0")["blob"])
    with pytest.raises(IntegrityError, match="truncated"):
        fetch(Registry(url), "acme.calc", "1.2.0", trusted_keys=[keys[0]],
              cache_dir=tmp_path / "cache")


def test_http_wrong_checksum_bad_signature_unknown_key(tmp_path: Path, registry: Path,
                                                       http_registry: Any, keys: Any) -> None:
    url, _ = http_registry
    stranger_pub, stranger_sec = _minisign.generate_keypair()
    with pytest.raises(IntegrityError, match="(?i)key"):
        fetch(Registry(url), "acme.calc", "1.0.0", trusted_keys=[stranger_pub],
              cache_dir=tmp_path / "c1")
    entry = _entry(registry, "1.0.0")
    blob = (registry / entry["blob"]).read_bytes()
    # a signature by the right key id but over other bytes: a bad signature
    (registry / entry["signature"]).write_text(_minisign.sign(
        blob + b"x", keys[1],
        trusted_comment=f"sandboxer acme.calc@1.0.0 sha256:{entry['sha256']}"))
    with pytest.raises(IntegrityError, match="(?i)signature"):
        fetch(Registry(url), "acme.calc", "1.0.0", trusted_keys=[keys[0]],
              cache_dir=tmp_path / "c2")
    (registry / entry["blob"]).write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))
    with pytest.raises(IntegrityError, match="sha256 check failed"):
        fetch(Registry(url), "acme.calc", "1.0.0", trusted_keys=[keys[0]],
              cache_dir=tmp_path / "c3")


# -- the command line ---------------------------------------------------------------------------
def _cli(*args: str, cache: Path) -> Any:
    import os
    import subprocess
    import sys
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    return subprocess.run([sys.executable, "-m", "sandboxer.cli", *args], capture_output=True,
                          text=True, timeout=120, env=env)


def test_cli_keygen_publish_list_fetch_and_call(tmp_path: Path) -> None:
    cache, keys_dir, reg = tmp_path / "cache", tmp_path / "keys", tmp_path / "reg"
    run = _cli("registry", "keygen", str(keys_dir), cache=cache)
    assert run.returncode == 0, run.stderr
    pub, key = keys_dir / "sandboxer.pub", keys_dir / "sandboxer.key"
    assert pub.read_text().startswith("untrusted comment: minisign public key")
    assert key.stat().st_mode & 0o777 == 0o600
    assert _cli("registry", "keygen", str(keys_dir), cache=cache).returncode == 2  # no clobber
    for version in ("1.0.0", "1.4.0"):
        src = make_plugin(tmp_path / "src", version)
        run = _cli("registry", "publish", str(src), "--registry", str(reg), "--key", str(key),
                   cache=cache)
        assert run.returncode == 0 and f"acme.calc@{version}" in run.stdout, run.stderr
    run = _cli("registry", "list", "--registry", str(reg), "--json", cache=cache)
    assert run.returncode == 2 and "no trusted keys" in run.stdout  # the index is verified
    run = _cli("registry", "list", "--registry", str(reg), "--trusted-key", str(pub), "--json",
               cache=cache)
    assert [e["version"] for e in json.loads(run.stdout)] == ["1.0.0", "1.4.0"]
    run = _cli("registry", "list", "--registry", str(reg), "--trusted-key", str(pub),
               cache=cache)
    assert run.stdout.splitlines()[0].endswith(
        f"index sequence 2, signed by key {_minisign.PublicKey.from_file(pub).key_id_hex} "
        f"({pub})"), run.stdout
    run = _cli("registry", "fetch", "acme.calc@~1.0", "--registry", str(reg),
               "--trusted-key", str(pub), cache=cache)
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()).is_relative_to(cache / "sandboxer")
    run = _cli("call", "acme.calc@^1", "version", "--registry", str(reg), "--trusted-key",
               str(pub), cache=cache)
    assert (run.returncode, run.stdout) == (0, "1.4.0\n"), run.stderr


def test_cli_integrity_and_signature_failures_exit_2_naming_the_check(tmp_path: Path,
                                                                      registry: Path,
                                                                      keys: Any) -> None:
    cache = tmp_path / "cache"
    stranger, _ = _minisign.generate_keypair()
    other_pub = tmp_path / "other.pub"
    other_pub.write_text(stranger.to_file_text())
    run = _cli("call", "acme.calc@1.2.0", "version", "--registry", str(registry),
               "--trusted-key", str(other_pub), cache=cache)
    assert run.returncode == 2 and "unknown key id" in run.stderr, run.stderr
    trusted = tmp_path / "trusted.pub"
    trusted.write_text(keys[0].to_file_text())
    blob = registry / _entry(registry, "1.2.0")["blob"]
    blob.write_bytes(blob.read_bytes()[:-3] + b"xyz")
    run = _cli("registry", "fetch", "acme.calc@1.2.0", "--registry", str(registry),
               "--trusted-key", str(trusted), cache=cache)
    assert run.returncode == 2 and "sha256 check failed" in run.stderr, run.stderr
    run = _cli("call", "acme.calc@1.2.0", "version", cache=cache)
    assert run.returncode == 2 and "--registry" in run.stderr


def test_cli_takes_registry_and_keys_from_the_host_config(tmp_path: Path, registry: Path,
                                                          keys: Any) -> None:
    import os
    import subprocess
    import sys
    pub = tmp_path / "trusted.pub"
    pub.write_text(keys[0].to_file_text())
    config = tmp_path / "sandboxer.toml"
    config.write_text(f'[host]\nregistry = "{registry}"\ntrusted_keys = ["{pub}"]\n'
                      f'cache_dir = "{tmp_path / "cache"}"\n')
    run = subprocess.run([sys.executable, "-m", "sandboxer.cli", "call", "acme.calc@~1.2",
                          "version"], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SANDBOXER_CONFIG": str(config)})
    assert (run.returncode, run.stdout) == (0, "1.2.5\n"), run.stderr
    assert (tmp_path / "cache" / "blobs").is_dir()

