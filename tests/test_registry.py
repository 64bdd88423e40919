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
from hypothesis import given
from hypothesis import strategies as st

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


# -- the signed index: sequence, signature, minisign compatibility -----------------------------
def _sequence(registry: Path) -> str:
    return _minisign.unverified_trusted_comment((registry / "index.json.minisig").read_text())


def test_the_index_sequence_grows_by_one_at_every_publish_and_sign(tmp_path: Path,
                                                                   keys: Any) -> None:
    reg = tmp_path / "registry"
    publish(make_plugin(tmp_path / "src", "1.0.0"), reg, keys[1])
    assert _sequence(reg) == "sandboxer index seq=1"
    publish(make_plugin(tmp_path / "src", "1.1.0"), reg, keys[1])
    assert _sequence(reg) == "sandboxer index seq=2"
    # Another key (an operator's) signs the same index on: the sequence is the registry's.
    _, operator = _minisign.generate_keypair()
    assert sign_index(reg, operator) == 3
    assert _sequence(reg) == "sandboxer index seq=3"
    index = Registry(reg).index([operator.public_key], cache_dir=tmp_path / "cache")
    assert (index.sequence, index.signer.key) == (3, operator.public_key)
    assert [e.version for e in index.entries()] == ["1.0.0", "1.1.0"]
    assert not list(reg.glob(".index.json*")), "temporary files left behind"


def test_sign_index_signs_a_registry_made_before_indexes_were_signed(tmp_path: Path,
                                                                     registry: Path,
                                                                     keys: Any) -> None:
    (registry / "index.json.minisig").unlink()
    with pytest.raises(IntegrityError, match="sandboxer registry sign-index --registry"):
        fetch(Registry(registry), "acme.calc", "latest", trusted_keys=[keys[0]],
              cache_dir=tmp_path / "cache")
    assert sign_index(registry, keys[1]) == 1
    entry, _ = fetch(Registry(registry), "acme.calc", "latest", trusted_keys=[keys[0]],
                     cache_dir=tmp_path / "cache")
    assert entry.version == "2.0.0"
    with pytest.raises(RegistryError, match="has no index.json"):
        sign_index(tmp_path / "empty", keys[1])


@pytest.mark.parametrize(("signature", "problem"), [
    ("not a signature\n", "malformed signature file"),
    (None, "is not 'sandboxer index seq=N'"),
], ids=["garbage", "another-trusted-comment"])
def test_publish_refuses_an_index_signature_whose_sequence_it_cannot_read(
        tmp_path: Path, registry: Path, keys: Any, signature: str | None, problem: str) -> None:
    if signature is None:
        signature = _minisign.sign((registry / "index.json").read_bytes(), keys[1],
                                   trusted_comment="sandboxer index 7")
    (registry / "index.json.minisig").write_text(signature)
    with pytest.raises(RegistryError, match="cannot read the index sequence") as refused:
        publish(make_plugin(tmp_path / "new", "3.0.0"), registry, keys[1])
    assert problem in str(refused.value) and "starts again at 1" in str(refused.value)


@pytest.mark.parametrize(("comment", "accepted"), [
    ("sandboxer index seq=0", True), ("sandboxer index seq=9223372036854775807", True),
    ("sandboxer index seq=9223372036854775808", False), ("sandboxer index seq=07", False),
    ("sandboxer index seq=-1", False), ("sandboxer index seq=1 ", False),
    ("sandboxer index seq=", False), ("sandboxer acme.calc@1.0.0 sha256:00", False),
])
def test_the_index_signature_must_carry_a_sequence(tmp_path: Path, registry: Path, keys: Any,
                                                   comment: str, accepted: bool) -> None:
    """A valid signature whose trusted comment is not exactly the index form (an archive's,
    say, over other bytes: not even that verifies) is refused."""
    (registry / "index.json.minisig").write_text(_minisign.sign(
        (registry / "index.json").read_bytes(), keys[1], trusted_comment=comment))
    if accepted:
        index = Registry(registry).index([keys[0]], cache_dir=tmp_path / "cache")
        assert index.sequence == int(comment.rpartition("=")[2])
    else:
        with pytest.raises(IntegrityError, match="is not a sandboxer index's"):
            Registry(registry).index([keys[0]], cache_dir=tmp_path / "cache")


def test_no_trusted_keys_means_no_index(tmp_path: Path, registry: Path) -> None:
    with pytest.raises(IntegrityError, match="cannot trust its index: no trusted keys"):
        Registry(registry).index([], cache_dir=tmp_path / "cache")


def test_the_index_signature_verifies_with_debian_minisign(tmp_path: Path, registry: Path,
                                                           keys: Any) -> None:
    """`minisign -V` checks a registry's index as it stands (index.json.minisig is the name
    it looks for by default) and shows the sequence as the trusted comment."""
    import shutil
    import subprocess
    binary = shutil.which("minisign")
    if binary is None:
        pytest.fail("the minisign tool is not installed: apt-get install minisign "
                    "(scripts/bootstrap.sh installs it)", pytrace=False)
    (tmp_path / "publisher.pub").write_text(keys[0].to_file_text())

    def minisign(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([binary, *args], cwd=registry, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=60,
                              env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    run = minisign("-V", "-p", str(tmp_path / "publisher.pub"), "-m", "index.json")
    assert run.returncode == 0, run.stderr
    assert "Trusted comment: sandboxer index seq=5\n" in run.stdout
    run = minisign("-V", "-H", "-Q", "-P", keys[0].to_base64(), "-m", "index.json")
    assert (run.returncode, run.stdout) == (0, "sandboxer index seq=5\n"), run.stderr
    index = json.loads((registry / "index.json").read_text())
    del index["plugins"]["acme.calc"]["versions"]["2.0.0"]
    (registry / "index.json").write_text(json.dumps(index))
    run = minisign("-V", "-p", str(tmp_path / "publisher.pub"), "-m", "index.json")
    assert run.returncode != 0 and "Signature verification failed" in run.stderr


# -- the rollback state ------------------------------------------------------------------------
def _state_files(cache: Path) -> list[Path]:
    return sorted((cache / "registry-state").glob("*.json"))


def test_the_rollback_state_is_private_and_only_grows(tmp_path: Path, registry: Path,
                                                      keys: Any) -> None:
    cache = tmp_path / "cache"
    Registry(registry).index([keys[0]], cache_dir=cache)
    [state] = _state_files(cache)
    assert (cache / "registry-state").stat().st_mode & 0o777 == 0o700
    assert state.stat().st_mode & 0o777 == 0o600
    record = json.loads(state.read_text())
    assert (record["location"], record["sequence"], record["key"]) == (
        str(registry), 5, keys[0].key_id_hex)
    Registry(registry).index([keys[0]], cache_dir=cache)   # the same index again: fine
    sign_index(registry, keys[1])
    assert Registry(registry).index([keys[0]], cache_dir=cache).sequence == 6
    assert json.loads(state.read_text())["sequence"] == 6
    assert [p.name for p in (cache / "registry-state").iterdir()
            if p.name.startswith(".") and p.name != ".lock"] == []  # no temporary files
    # Another registry (another location) has a record of its own.
    other = tmp_path / "other"
    publish(make_plugin(tmp_path / "other-src", "1.0.0"), other, keys[1])
    assert Registry(other).index([keys[0]], cache_dir=cache).sequence == 1
    assert len(_state_files(cache)) == 2


def test_the_same_registry_named_differently_shares_its_record(tmp_path: Path, registry: Path,
                                                               keys: Any, monkeypatch: Any
                                                               ) -> None:
    """A directory is recorded under its absolute path: a relative name is the same place."""
    cache = tmp_path / "cache"
    Registry(registry).index([keys[0]], cache_dir=cache)
    monkeypatch.chdir(registry.parent)
    Registry(registry.name + "/").index([keys[0]], cache_dir=cache)
    assert len(_state_files(cache)) == 1


def test_a_rollback_names_both_sequences_and_the_state_file(tmp_path: Path, registry: Path,
                                                            keys: Any) -> None:
    cache = tmp_path / "cache"
    old = {n: (registry / n).read_bytes() for n in ("index.json", "index.json.minisig")}
    sign_index(registry, keys[1])
    Registry(registry).index([keys[0]], cache_dir=cache)
    for name, data in old.items():
        (registry / name).write_bytes(data)
    with pytest.raises(IntegrityError) as refused:
        Registry(registry).index([keys[0]], cache_dir=cache)
    [state] = _state_files(cache)
    message = str(refused.value)
    assert "rollback: index sequence 5 is older than 6 seen before" in message
    assert f"signed by key {keys[0].key_id_hex}" in message and f"delete {state}" in message
    assert json.loads(state.read_text())["sequence"] == 6     # the refusal lowered nothing


@pytest.mark.parametrize("damage", ["garbage", "other-location", "negative", "symlink"])
def test_a_damaged_rollback_record_is_refused_not_forgotten(tmp_path: Path, registry: Path,
                                                            keys: Any, damage: str) -> None:
    cache = tmp_path / "cache"
    Registry(registry).index([keys[0]], cache_dir=cache)
    [state] = _state_files(cache)
    record = json.loads(state.read_text())
    if damage == "garbage":
        state.write_text("{not json")
    elif damage == "other-location":
        state.write_text(json.dumps({**record, "location": "/elsewhere"}))
    elif damage == "negative":
        state.write_text(json.dumps({**record, "sequence": -1}))
    else:
        target = tmp_path / "planted.json"
        target.write_text(json.dumps({**record, "sequence": 0}))
        state.unlink()
        state.symlink_to(target)
    with pytest.raises(RegistryError, match="rollback state") as refused:
        Registry(registry).index([keys[0]], cache_dir=cache)
    assert str(state.parent) in str(refused.value)


def test_a_rollback_state_directory_others_can_write_is_refused(tmp_path: Path,
                                                                registry: Path,
                                                                keys: Any) -> None:
    cache = tmp_path / "cache"
    (cache / "registry-state").mkdir(parents=True)
    (cache / "registry-state").chmod(0o777)
    with pytest.raises(RegistryError, match=r"others can write it \(mode 777\).*chmod 700"):
        Registry(registry).index([keys[0]], cache_dir=cache)
    (cache / "registry-state").rmdir()
    (cache / "registry-state").symlink_to(tmp_path)
    with pytest.raises(RegistryError, match="not a directory"):
        Registry(registry).index([keys[0]], cache_dir=cache)


def test_a_failed_state_write_keeps_the_old_record(tmp_path: Path, registry: Path, keys: Any,
                                                   monkeypatch: Any) -> None:
    """A crash (here: the rename failing) between writing the new record and putting it in
    place leaves the old record whole and no temporary file."""
    from sandboxer import _rollback
    cache = tmp_path / "cache"
    Registry(registry).index([keys[0]], cache_dir=cache)
    [state] = _state_files(cache)
    before = state.read_bytes()
    sign_index(registry, keys[1])

    def crash(*args: Any) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(_rollback.os, "replace", crash)
    with pytest.raises(RegistryError, match="No space left on device"):
        Registry(registry).index([keys[0]], cache_dir=cache)
    monkeypatch.undo()
    assert state.read_bytes() == before
    assert sorted(p.name for p in state.parent.iterdir()) == [".lock", state.name]


# -- trusted keys and their id scopes ----------------------------------------------------------
@pytest.mark.parametrize(("patterns", "plugin_id", "covered"), [
    (None, "anything.at.all", True),
    (("acme.*",), "acme.tool", True),
    (("acme.*",), "acme.tools.x", True),
    (("acme.*",), "acme", False),
    (("acme.*",), "acme.", False),
    (("acme.*",), "acmeevil.x", False),
    (("acme.*",), "acmeevil", False),
    (("acme.*",), "evil.acme.tool", False),
    (("acme.*", "acme"), "acme", True),
    (("acme.tool",), "acme.tool", True),
    (("acme.tool",), "acme.tool2", False),
    (("acme.tool",), "acme.tool.x", False),
    (("acme.sub.*",), "acme.sub.x", True),
    (("acme.sub.*",), "acme.subx", False),
])
def test_what_an_id_pattern_covers(patterns: tuple[str, ...] | None, plugin_id: str,
                                   covered: bool) -> None:
    from sandboxer._trusted_keys import covers
    assert covers(patterns, plugin_id) is covered


GOOD_KEYS = '''
[host]
trusted_keys = [
  "/etc/sandboxer/any.pub",
  {key = "/etc/sandboxer/acme.pub", ids = ["acme.*", "acme"]},
  {key = "/etc/sandboxer/all.pub"},
]
'''


def test_the_host_config_takes_key_paths_and_scoped_tables() -> None:
    import tomllib
    from sandboxer.registry import TrustedKey
    host = HostConfig.from_mapping(tomllib.loads(GOOD_KEYS), source="t.toml")
    assert host.trusted_keys == (
        TrustedKey("/etc/sandboxer/any.pub"),
        TrustedKey("/etc/sandboxer/acme.pub", ("acme.*", "acme")),
        TrustedKey("/etc/sandboxer/all.pub"))


@pytest.mark.parametrize(("value", "problem"), [
    ('"/k.pub"', "a list of key files"),
    ('["k.pub"]', r"\[0\]: an absolute path"),
    ("[1]", r"\[0\]: a key file path or a table"),
    ('[{key = "/k.pub", id = ["acme.*"]}]', r"\[0\]: unknown field 'id'"),
    ('[{key = "/k.pub", ids = ["acme.*"], comment = "x"}]', r"\[0\]: unknown field 'comment'"),
    ('[{ids = ["acme.*"]}]', r"\[0\]: the table has no key"),
    ('[{key = "relative.pub", ids = ["acme.*"]}]', r"\[0\]\.key: an absolute path"),
    ('[{key = "/k.pub", ids = []}]', r"\[0\]\.ids: a non-empty list"),
    ('[{key = "/k.pub", ids = "acme.*"}]', r"\[0\]\.ids: a non-empty list"),
    ('["/a.pub", {key = "/k.pub", ids = ["acme.*", "acme*"]}]', r"\[1\]\.ids\[1\]: an id "
                                                                 "pattern is an exact"),
    ('[{key = "/k.pub", ids = ["*"]}]', r"\[0\]\.ids\[0\]: an id pattern"),
    ('[{key = "/k.pub", ids = ["*.tool"]}]', r"\[0\]\.ids\[0\]: an id pattern"),
    ('[{key = "/k.pub", ids = ["acme.*.x"]}]', r"\[0\]\.ids\[0\]: an id pattern"),
    ('[{key = "/k.pub", ids = ["acme..*"]}]', r"\[0\]\.ids\[0\]: an id pattern"),
    ('[{key = "/k.pub", ids = ["Acme.*"]}]', r"\[0\]\.ids\[0\]: an id pattern"),
    ('[{key = "/k.pub", ids = [".*"]}]', r"\[0\]\.ids\[0\]: an id pattern"),
    ('[{key = "/k.pub", ids = [""]}]', r"\[0\]\.ids\[0\]: an id pattern"),
    ('[{key = "/k.pub", ids = [7]}]', r"\[0\]\.ids\[0\]: an id pattern is a string"),
], ids=["not-a-list", "relative-path", "number", "typo-id", "extra-field", "no-key",
        "relative-key", "empty-ids", "ids-string", "star-glued", "star-alone", "star-first",
        "star-middle", "double-dot", "upper-case", "dot-star", "empty-pattern", "not-a-string"])
def test_bad_trusted_keys_are_config_errors_naming_the_field(value: str, problem: str) -> None:
    import tomllib
    from sandboxer.errors import ConfigError
    with pytest.raises(ConfigError, match="t.toml: host.trusted_keys: " + problem):
        HostConfig.from_mapping(tomllib.loads(f"[host]\ntrusted_keys = {value}\n"),
                                source="t.toml")


@pytest.mark.parametrize(("text", "path", "ids"), [
    ("keys/acme.pub", "keys/acme.pub", None),
    ("keys/acme.pub=acme.*,acme", "keys/acme.pub", ("acme.*", "acme")),
    ("/k=v/acme.pub=acme.tool", "/k=v/acme.pub", ("acme.tool",)),
])
def test_the_trusted_key_option(text: str, path: str, ids: tuple[str, ...] | None) -> None:
    from sandboxer._trusted_keys import TrustedKey, parse_trusted_key_option
    assert parse_trusted_key_option(text) == TrustedKey(path, ids)


@pytest.mark.parametrize("text", ["=acme.*", "k.pub=", "k.pub=acme*", "k.pub=acme.*,",
                                  "k.pub=acme.*,*"])
def test_bad_trusted_key_options_are_refused(text: str) -> None:
    from sandboxer._trusted_keys import parse_trusted_key_option
    with pytest.raises(ValueError):
        parse_trusted_key_option(text)


def test_a_bad_trusted_key_option_is_a_usage_error(tmp_path: Path) -> None:
    run = _cli("registry", "fetch", "acme.calc@1", "--registry", str(tmp_path),
               "--trusted-key", "k.pub=acme*", cache=tmp_path / "cache")
    assert run.returncode == 2
    assert "PUB[=IDS]: an id pattern is an exact plugin id" in run.stderr, run.stderr


def test_load_trusted_keys_merges_the_scopes_of_one_key(tmp_path: Path, keys: Any) -> None:
    from sandboxer.registry import TrustedKey, load_trusted_keys
    a, b = tmp_path / "a.pub", tmp_path / "b.pub"
    a.write_text(keys[0].to_file_text())
    b.write_text(keys[0].to_file_text())
    [key] = load_trusted_keys([TrustedKey(str(a), ("acme.*",)), TrustedKey(str(b), ("beta",))])
    assert key.ids == ("acme.*", "beta") and key.covers("beta") and not key.covers("gamma")
    [key] = load_trusted_keys([TrustedKey(str(a), ("acme.*",)), str(b)])
    assert key.ids is None and key.covers("gamma")
    with pytest.raises(RegistryError, match=f"trusted key {tmp_path / 'missing.pub'}: cannot "
                                            "read"):
        load_trusted_keys([tmp_path / "missing.pub"])


@given(st.text(max_size=40) | st.from_regex(r"[a-z/]{1,5}=[a-z0-9.*,_=-]{0,30}", fullmatch=True))
def test_the_trusted_key_option_parser_never_crashes(text: str) -> None:
    """Anything is a TrustedKey or a ValueError; a pattern that parsed covers its own
    namespace and never a look-alike one (its stem with more letters glued on)."""
    from sandboxer._trusted_keys import covers, parse_trusted_key_option
    try:
        key = parse_trusted_key_option(text)
    except ValueError:
        return
    for pattern in key.ids or ():
        stem = pattern.removesuffix(".*")
        assert not covers((pattern,), stem + "evil.x")
        assert covers((pattern,), stem + ".x" if pattern.endswith(".*") else stem)


def test_cli_sign_index_and_a_scoped_key(tmp_path: Path, registry: Path, keys: Any) -> None:
    """`registry sign-index` continues the sequence; a --trusted-key scoped to other ids
    cannot fetch this registry's acme.calc, one scoped to acme.* can."""
    cache = tmp_path / "cache"
    secret, pub = tmp_path / "publisher.key", tmp_path / "publisher.pub"
    secret.write_text(keys[1].to_file_text())
    pub.write_text(keys[0].to_file_text())
    run = _cli("registry", "sign-index", "--registry", str(registry), "--key", str(secret),
               cache=cache)
    assert run.returncode == 0 and "sequence 6" in run.stdout, run.stderr
    assert _sequence(registry) == "sandboxer index seq=6"
    run = _cli("registry", "fetch", "acme.calc@1.2.0", "--registry", str(registry),
               "--trusted-key", f"{pub}=beta.*", cache=cache)
    assert run.returncode == 2 and "not for acme.calc" in run.stderr, run.stderr
    run = _cli("registry", "fetch", "acme.calc@1.2.0", "--registry", str(registry),
               "--trusted-key", f"{pub}=acme.*", cache=cache)
    assert run.returncode == 0, run.stderr
