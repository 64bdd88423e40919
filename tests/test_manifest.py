"""The plugin manifest: parsing, validation, bare files and integrity (sandboxer.manifest)."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import textwrap
import tomllib
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from sandboxer._digest import tree_checksum
from sandboxer.errors import IntegrityError, ManifestError, PluginLoadError
from sandboxer.manifest import (
    MAX_MANIFEST_BYTES,
    GoPluginHandshake,
    GrpcSpec,
    LoaderType,
    Plugin,
    Protocol,
    load_plugin,
    parse_manifest,
    verify_integrity,
)
from sandboxer.sandbox.policy import PathGrant, SandboxRequest

MiB = 1 << 20


# -- a tiny TOML writer (no toml-writing library is installed) -------------------------------

def toml_string(s: str) -> str:
    out = []
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, (datetime, date, time)):  # datetime before date: it is a subclass
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"no TOML for {type(v).__name__}")


def to_toml(doc: dict[str, Any]) -> str:
    """Top-level values first, then one [table] per top-level dict (nested dicts inline)."""
    lines = [f"{toml_string(k)} = {toml_value(v)}" for k, v in doc.items()
             if not isinstance(v, dict)]
    for name, table in doc.items():
        if isinstance(table, dict):
            lines.append(f"[{toml_string(name)}]")
            lines.extend(f"{toml_string(k)} = {toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


# -- a real plugin directory -----------------------------------------------------------------

def build_plugin_dir(base: Path) -> Path:
    """A plugin dir with one entrypoint of every kind, plus traps; returns the plugin dir."""
    outside = base / "outside"
    outside.mkdir()
    (outside / "evil.py").write_text("import os\n")
    root = base / "plugin"
    root.mkdir()
    (root / "main.py").write_text("def greet(name):\n    return f'hello {name}'\n")
    (root / "pkg").mkdir()
    (root / "pkg" / "__init__.py").write_text("from .core import greet\n")
    (root / "pkg" / "core.py").write_text("def greet(name):\n    return name\n")
    (root / "nopkg").mkdir()
    (root / "nopkg" / "core.py").write_text("x = 1\n")
    (root / "bin").mkdir()
    (root / "bin" / "run").write_text("#!/bin/sh\nexec cat\n")
    (root / "bin" / "run").chmod(0o755)
    (root / "bin" / "data").write_text("#!/bin/sh\nexec cat\n")
    (root / "bin" / "data").chmod(0o644)
    (root / "mod.wasm").write_bytes(b"\0asm\x01\0\0\0")
    (root / "lib.so").write_bytes(b"\x7fELF" + bytes(60))
    (root / "notes.txt").write_text("notes\n")
    (root / "escape.py").symlink_to(outside / "evil.py")
    (root / "outlink").symlink_to(outside, target_is_directory=True)
    (root / "inlink.py").symlink_to("main.py")
    return root


@pytest.fixture
def plugin_dir(tmp_path: Path) -> Path:
    return build_plugin_dir(tmp_path)


@pytest.fixture(scope="module")
def shared_plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """For Hypothesis tests (which may not use function-scoped fixtures); never modified."""
    return build_plugin_dir(tmp_path_factory.mktemp("hyp"))


# -- bad manifests ---------------------------------------------------------------------------

DROP = object()
BASE_PLUGIN = {"id": "acme.hello", "version": "1.2.0", "type": "python", "entrypoint": "main.py"}


def manifest(plugin: dict[str, Any] | None = None, *, sandbox: dict[str, Any] | None = None,
             config: dict[str, Any] | None = None, top: dict[str, Any] | None = None) -> str:
    """The base manifest with ``plugin`` keys changed (DROP removes one) and tables added."""
    table = copy.deepcopy(BASE_PLUGIN)
    for key, value in (plugin or {}).items():
        if value is DROP:
            del table[key]
        else:
            table[key] = value
    doc: dict[str, Any] = {"plugin": table}
    if sandbox is not None:
        doc["sandbox"] = sandbox
    if config is not None:
        doc["config"] = config
    doc.update(top or {})
    return to_toml(doc)


def net(**sandbox: Any) -> dict[str, Any]:
    return {"network_allowed": True, **sandbox}


HEX = "ab" * 32
BAD_MANIFESTS = [
    # [plugin]: required fields
    pytest.param(manifest({"id": DROP}), "plugin.id", id="missing-id"),
    pytest.param(manifest({"version": DROP}), "plugin.version", id="missing-version"),
    pytest.param(manifest({"type": DROP}), "plugin.type", id="missing-type"),
    pytest.param(manifest({"entrypoint": DROP}), "plugin.entrypoint", id="missing-entrypoint"),
    # id
    pytest.param(manifest({"id": "Acme.Hello"}), "plugin.id", id="id-uppercase"),
    pytest.param(manifest({"id": "a" * 129}), "plugin.id", id="id-129-chars"),
    pytest.param(manifest({"id": "-acme"}), "plugin.id", id="id-starts-with-dash"),
    pytest.param(manifest({"id": ".acme"}), "plugin.id", id="id-starts-with-dot"),
    pytest.param(manifest({"id": "acme hello"}), "plugin.id", id="id-with-space"),
    pytest.param(manifest({"id": "acme/hello"}), "plugin.id", id="id-with-slash"),
    pytest.param(manifest({"id": ""}), "plugin.id", id="id-empty"),
    pytest.param(manifest({"id": 42}), "plugin.id", id="id-not-a-string"),
    # version
    pytest.param(manifest({"version": "1.2"}), "plugin.version", id="version-two-parts"),
    pytest.param(manifest({"version": "v1.2.3"}), "plugin.version", id="version-v-prefix"),
    pytest.param(manifest({"version": "01.2.3"}), "plugin.version", id="version-leading-zero"),
    pytest.param(manifest({"version": "1.2.3-01"}), "plugin.version",
                 id="version-prerelease-leading-zero"),
    pytest.param(manifest({"version": "1.2.3 "}), "plugin.version", id="version-trailing-space"),
    pytest.param(manifest({"version": 1.2}), "plugin.version", id="version-float"),
    # type
    pytest.param(manifest({"type": "java"}), "plugin.type", id="type-unknown"),
    pytest.param(manifest({"type": "Python"}), "plugin.type", id="type-capitalised"),
    pytest.param(manifest({"type": ["python"]}), "plugin.type", id="type-list"),
    # entrypoint
    pytest.param(manifest({"entrypoint": "/etc/passwd"}), "plugin.entrypoint",
                 id="entrypoint-absolute"),
    pytest.param(manifest({"entrypoint": "../outside/evil.py"}), "plugin.entrypoint",
                 id="entrypoint-dotdot-leaves-dir"),
    pytest.param(manifest({"entrypoint": "pkg/../main.py"}), "plugin.entrypoint",
                 id="entrypoint-dotdot-stays-inside"),
    pytest.param(manifest({"entrypoint": "missing.py"}), "plugin.entrypoint",
                 id="entrypoint-missing-file"),
    pytest.param(manifest({"entrypoint": ""}), "plugin.entrypoint", id="entrypoint-empty"),
    pytest.param(manifest({"entrypoint": "main\0.py"}), "plugin.entrypoint",
                 id="entrypoint-nul"),
    pytest.param(manifest({"entrypoint": "a" * 5000}), "plugin.entrypoint",
                 id="entrypoint-too-long"),
    pytest.param(manifest({"entrypoint": 7}), "plugin.entrypoint", id="entrypoint-int"),
    pytest.param(manifest({"entrypoint": "escape.py"}), "plugin.entrypoint",
                 id="entrypoint-symlink-leads-outside"),
    pytest.param(manifest({"entrypoint": "outlink/evil.py"}), "plugin.entrypoint",
                 id="entrypoint-through-dir-symlink-outside"),
    pytest.param(manifest({"type": "external", "entrypoint": "bin/data"}), "plugin.entrypoint",
                 id="external-not-executable"),
    pytest.param(manifest({"type": "external", "entrypoint": "bin"}), "plugin.entrypoint",
                 id="external-is-a-directory"),
    pytest.param(manifest({"entrypoint": "notes.txt"}), "plugin.entrypoint",
                 id="python-not-py"),
    pytest.param(manifest({"entrypoint": "nopkg"}), "plugin.entrypoint",
                 id="python-package-without-init"),
    pytest.param(manifest({"type": "wasm", "entrypoint": "pkg"}), "plugin.entrypoint",
                 id="wasm-entrypoint-is-a-directory"),
    pytest.param(manifest({"type": "native", "entrypoint": "missing.so"}), "plugin.entrypoint",
                 id="native-missing-file"),
    # methods
    pytest.param(manifest({"methods": []}), "plugin.methods", id="methods-empty-list"),
    pytest.param(manifest({"methods": ["greet", "greet"]}), "plugin.methods",
                 id="methods-duplicate"),
    pytest.param(manifest({"methods": ["greet-me"]}), "plugin.methods", id="methods-bad-name"),
    pytest.param(manifest({"methods": ["1st"]}), "plugin.methods",
                 id="methods-name-starts-with-digit"),
    pytest.param(manifest({"methods": "greet"}), "plugin.methods", id="methods-not-a-list"),
    pytest.param(manifest({"methods": [1]}), "plugin.methods", id="methods-int-item"),
    # sha256
    pytest.param(manifest({"sha256": HEX[:-1]}), "plugin.sha256", id="sha256-63-digits"),
    pytest.param(manifest({"sha256": HEX + "0"}), "plugin.sha256", id="sha256-65-digits"),
    pytest.param(manifest({"sha256": HEX.upper()}), "plugin.sha256", id="sha256-uppercase"),
    pytest.param(manifest({"sha256": "md5:" + HEX}), "plugin.sha256", id="sha256-wrong-prefix"),
    pytest.param(manifest({"sha256": "zz" * 32}), "plugin.sha256", id="sha256-not-hex"),
    # other [plugin] fields
    pytest.param(manifest({"name": 1}), "plugin.name", id="name-not-a-string"),
    pytest.param(manifest({"name": "n" * 201}), "plugin.name", id="name-too-long"),
    pytest.param(manifest({"description": "a\0b"}), "plugin.description",
                 id="description-with-nul"),
    pytest.param(manifest({"author": "me"}), "plugin.author", id="plugin-unknown-field"),
    # structure
    pytest.param('[sandbox]\nprofile = "default"\n', "plugin", id="no-plugin-table"),
    pytest.param("", "plugin", id="empty-file"),
    pytest.param('plugin = "acme.hello"\n', "plugin", id="plugin-not-a-table"),
    pytest.param(manifest(top={"extra": {"x": 1}}), "extra", id="unknown-top-level-table"),
    pytest.param('config = 1\n' + manifest(), "config", id="config-not-a-table"),
    pytest.param(manifest(sandbox={"seccomp": "off"}), "sandbox.seccomp",
                 id="sandbox-unknown-field"),
    pytest.param('sandbox = "strict"\n' + manifest(), "sandbox", id="sandbox-not-a-table"),
    # [sandbox] sizes, durations, cpus
    pytest.param(manifest(sandbox={"memory_limit": "64XB"}), "sandbox.memory_limit",
                 id="memory-unknown-unit"),
    pytest.param(manifest(sandbox={"memory_limit": -1}), "sandbox.memory_limit",
                 id="memory-negative"),
    pytest.param(manifest(sandbox={"memory_limit": 0}), "sandbox.memory_limit", id="memory-zero"),
    pytest.param(manifest(sandbox={"memory_limit": True}), "sandbox.memory_limit",
                 id="memory-bool"),
    pytest.param(manifest(sandbox={"memory_limit": 1.5}), "sandbox.memory_limit",
                 id="memory-float"),
    pytest.param(manifest(sandbox={"memory_limit": "2048T"}), "sandbox.memory_limit",
                 id="memory-above-1PiB"),
    pytest.param(manifest(sandbox={"memory_limit": "1" * 400}), "sandbox.memory_limit",
                 id="memory-400-digits"),
    pytest.param(manifest(sandbox={"timeout": "5 parsecs"}), "sandbox.timeout",
                 id="timeout-unknown-unit"),
    pytest.param(manifest(sandbox={"timeout": 0}), "sandbox.timeout", id="timeout-zero"),
    pytest.param(manifest(sandbox={"timeout": "-1s"}), "sandbox.timeout", id="timeout-negative"),
    pytest.param(manifest(sandbox={"timeout": "8d"}), "sandbox.timeout", id="timeout-days"),
    pytest.param(manifest(sandbox={"timeout": 604801}), "sandbox.timeout",
                 id="timeout-over-a-week"),
    pytest.param(manifest(sandbox={"timeout": math.inf}), "sandbox.timeout", id="timeout-inf"),
    pytest.param(manifest(sandbox={"timeout": math.nan}), "sandbox.timeout", id="timeout-nan"),
    pytest.param(manifest(sandbox={"timeout": 10**400}), "sandbox.timeout",
                 id="timeout-huge-int"),
    pytest.param(manifest(sandbox={"cpu_limit": 0}), "sandbox.cpu_limit", id="cpu-zero"),
    pytest.param(manifest(sandbox={"fuel": 0}), "sandbox.fuel", id="fuel-zero"),
    pytest.param(manifest(sandbox={"fuel": -5}), "sandbox.fuel", id="fuel-negative"),
    pytest.param(manifest(sandbox={"fuel": True}), "sandbox.fuel", id="fuel-bool"),
    pytest.param(manifest(sandbox={"fuel": 1.5}), "sandbox.fuel", id="fuel-float"),
    pytest.param(manifest(sandbox={"fuel": "lots"}), "sandbox.fuel", id="fuel-word"),
    pytest.param(manifest(sandbox={"fuel": 1 << 63}), "sandbox.fuel", id="fuel-over-i64"),
    pytest.param(manifest(sandbox={"cpu_limit": "half"}), "sandbox.cpu_limit", id="cpu-word"),
    pytest.param(manifest(sandbox={"cpu_limit": True}), "sandbox.cpu_limit", id="cpu-bool"),
    pytest.param(manifest(sandbox={"cpu_limit": 2000}), "sandbox.cpu_limit", id="cpu-over-1024"),
    pytest.param(manifest(sandbox={"cpu_limit": math.nan}), "sandbox.cpu_limit", id="cpu-nan"),
    pytest.param(manifest(sandbox={"cpu_limit": 10**400}), "sandbox.cpu_limit",
                 id="cpu-huge-int"),
    # [sandbox] paths
    pytest.param(manifest(sandbox={"allowed_paths": ["data"]}), "sandbox.allowed_paths",
                 id="allowed-path-relative"),
    pytest.param(manifest(sandbox={"allowed_paths": ["/data/../etc"]}), "sandbox.allowed_paths",
                 id="allowed-path-dotdot"),
    pytest.param(manifest(sandbox={"allowed_paths": ["/data//x"]}), "sandbox.allowed_paths",
                 id="allowed-path-double-slash"),
    pytest.param(manifest(sandbox={"allowed_paths": "/data"}), "sandbox.allowed_paths",
                 id="allowed-paths-not-a-list"),
    pytest.param(manifest(sandbox={"allowed_paths": ["/data:ro", "/data:rw"]}),
                 "sandbox.allowed_paths", id="allowed-path-both-ro-and-rw"),
    pytest.param(manifest(sandbox={"allowed_paths": ["/data", "/data/"]}),
                 "sandbox.allowed_paths", id="allowed-path-twice"),
    pytest.param(manifest(sandbox={"denied_paths": ["tmp"]}), "sandbox.denied_paths",
                 id="denied-path-relative"),
    pytest.param(manifest(sandbox={"denied_paths": "/tmp"}), "sandbox.denied_paths",
                 id="denied-paths-not-a-list"),
    # [sandbox] network
    pytest.param(manifest(sandbox={"allowed_hosts": ["example.com"]}), "sandbox.allowed_hosts",
                 id="allowed-hosts-without-network"),
    pytest.param(manifest(sandbox=net(allowed_hosts=["exa mple.com"])), "sandbox.allowed_hosts",
                 id="host-with-space"),
    pytest.param(manifest(sandbox=net(allowed_hosts=["*.com"])), "sandbox.allowed_hosts",
                 id="wildcard-one-label"),
    pytest.param(manifest(sandbox=net(allowed_hosts=["example.com:70000"])),
                 "sandbox.allowed_hosts", id="port-70000"),
    pytest.param(manifest(sandbox=net(allowed_hosts=["example.com:0"])),
                 "sandbox.allowed_hosts", id="port-0"),
    pytest.param(manifest(sandbox=net(allowed_hosts=["example.com", "EXAMPLE.com"])),
                 "sandbox.allowed_hosts", id="host-twice-differing-in-case"),
    pytest.param(manifest(sandbox=net(allowed_hosts="example.com")), "sandbox.allowed_hosts",
                 id="allowed-hosts-not-a-list"),
    pytest.param(manifest(sandbox={"network_allowed": "yes"}), "sandbox.network_allowed",
                 id="network-allowed-string"),
    pytest.param(manifest(sandbox={"network_allowed": 1}), "sandbox.network_allowed",
                 id="network-allowed-int"),
    pytest.param(manifest(sandbox={"profile": "Strict"}), "sandbox.profile",
                 id="profile-capitalised"),
    pytest.param(manifest(sandbox={"profile": "../etc"}), "sandbox.profile",
                 id="profile-path"),
    pytest.param(manifest(sandbox={"profile": 1}), "sandbox.profile", id="profile-int"),
    # [config]: JSON values only
    pytest.param(manifest(config={"when": datetime(1979, 5, 27, 7, 32)}), "config.when",
                 id="config-datetime"),
    pytest.param(manifest(config={"when": datetime(1979, 5, 27, 7, 32, tzinfo=timezone.utc)}),
                 "config.when", id="config-offset-datetime"),
    pytest.param(manifest(config={"day": date(1979, 5, 27)}), "config.day", id="config-date"),
    pytest.param(manifest(config={"at": time(7, 32)}), "config.at", id="config-time"),
    pytest.param(manifest(config={"db": {"since": date(2020, 1, 1)}}), "config.db.since",
                 id="config-nested-date"),
    pytest.param(manifest(config={"times": [1, date(2020, 1, 1)]}), "config.times[1]",
                 id="config-date-in-list"),
    pytest.param(manifest(config={"ratio": math.inf}), "config.ratio", id="config-inf"),
    pytest.param(manifest(config={"ratio": math.nan}), "config.ratio", id="config-nan"),
    pytest.param(manifest(config={"x: y": date(2020, 1, 1)}), "config.x: y",
                 id="config-key-with-colon-space"),
    # the file itself
    pytest.param("[plugin\n", "(file)", id="invalid-toml"),
    pytest.param(manifest() + 'id = "again"\n', "(file)", id="duplicate-key"),
    pytest.param(b'[plugin]\nid = "\xff\xfe"\n', "(file)", id="bad-utf8-bytes"),
    pytest.param(b"#" + b"x" * MAX_MANIFEST_BYTES + b"\n" + manifest().encode(), "(file)",
                 id="larger-than-1MiB"),
    pytest.param("a = " + "[" * 2000 + "]" * 2000 + "\n", "(file)",
                 id="deeply-nested-array"),
]


def _check_error(err: ManifestError, manifest_path: Path, field: str) -> None:
    assert err.field == field, f"{err.field!r} != {field!r}: {err}"
    assert err.path == str(manifest_path)
    assert str(manifest_path) in str(err)
    assert f": {field}: " in str(err)
    assert err.expected


@pytest.mark.parametrize(("content", "field"), BAD_MANIFESTS)
def test_bad_manifest(plugin_dir: Path, content: str | bytes, field: str) -> None:
    manifest_path = plugin_dir / "plugin.toml"
    with pytest.raises(ManifestError) as info:
        parse_manifest(content, path=manifest_path, root=plugin_dir)
    _check_error(info.value, manifest_path, field)
    # The same file read from disk by load_plugin gives the same error.
    manifest_path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ManifestError) as info:
        load_plugin(plugin_dir)
    _check_error(info.value, manifest_path, field)


def test_there_are_at_least_30_bad_manifest_cases() -> None:
    assert len({p.id for p in BAD_MANIFESTS}) == len(BAD_MANIFESTS) >= 30


def test_manifest_error_is_json_with_path_and_field(plugin_dir: Path) -> None:
    with pytest.raises(ManifestError) as info:
        parse_manifest(manifest({"id": "Bad"}), path=plugin_dir / "plugin.toml", root=plugin_dir)
    out = info.value.to_json()
    assert out["type"] == "ManifestError"
    assert out["field"] == "plugin.id"
    assert out["path"] == str(plugin_dir / "plugin.toml")
    assert "'Bad'" in out["message"]


# -- protocol = "grpc": go-plugin's gRPC plugins -------------------------------------------

# The manifest README.md gives for an unmodified go-plugin gRPC plugin, exactly as written there.
README_GRPC = textwrap.dedent("""\
    [plugin]
    id = "acme.kv"
    version = "1.0.0"
    type = "external"
    protocol = "grpc"            # "jsonrpc" (default) | "grpc"
    entrypoint = "kv-go-grpc"

    [grpc]
    proto = ["kv.proto"]         # .proto files, or a descriptor set (.pb/.protoset), inside the plugin dir
    service = "proto.KV"         # the service whose methods are the plugin's methods

    [grpc.handshake]             # go-plugin's HandshakeConfig
    protocol_version = 1
    magic_cookie_key = "BASIC_PLUGIN"
    magic_cookie_value = "hello"
    """)

KV_PROTO = textwrap.dedent("""\
    syntax = "proto3";
    package proto;

    message GetRequest { string key = 1; }
    message GetResponse { bytes value = 1; }
    message PutRequest { string key = 1; bytes value = 2; }
    message Empty {}

    service KV {
        rpc Get(GetRequest) returns (GetResponse);
        rpc Put(PutRequest) returns (Empty);
    }
    """)


def _pb(number: int, value: bytes | str | int) -> bytes:
    """One protobuf field: a varint for an int, else length-delimited."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    data = value.encode() if isinstance(value, str) else value
    return varint(number << 3 | 2) + varint(len(data)) + data


def kv_descriptor_set() -> bytes:
    """kv.proto as ``protoc --descriptor_set_out`` writes it: a google.protobuf
    FileDescriptorSet, encoded by hand (the manifest only checks where the file is, and the
    test suite needs no protobuf runtime)."""
    string, bytes_, optional = 9, 12, 1  # FieldDescriptorProto.Type / .Label

    def message(name: str, *fields: tuple[str, int]) -> bytes:
        return _pb(1, name) + b"".join(
            _pb(2, _pb(1, f) + _pb(3, n) + _pb(4, optional) + _pb(5, t))
            for n, (f, t) in enumerate(fields, 1))

    def method(name: str, request: str, response: str) -> bytes:
        return _pb(1, name) + _pb(2, f".proto.{request}") + _pb(3, f".proto.{response}")

    kv = (_pb(1, "kv.proto") + _pb(2, "proto")
          + _pb(4, message("GetRequest", ("key", string)))
          + _pb(4, message("GetResponse", ("value", bytes_)))
          + _pb(4, message("PutRequest", ("key", string), ("value", bytes_)))
          + _pb(4, message("Empty"))
          + _pb(6, _pb(1, "KV") + _pb(2, method("Get", "GetRequest", "GetResponse"))
                + _pb(2, method("Put", "PutRequest", "Empty")))
          + _pb(12, "proto3"))
    return _pb(1, kv)


def build_grpc_dir(base: Path) -> Path:
    """A go-plugin plugin dir: the executable, kv.proto, the same as descriptor sets, and traps."""
    outside = base / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "kv.proto").write_text(KV_PROTO)
    root = base / "kv"
    root.mkdir()
    (root / "kv-go-grpc").write_text("#!/bin/sh\nexit 1\n")
    (root / "kv-go-grpc").chmod(0o755)
    (root / "main.py").write_text("def get(key):\n    return key\n")
    (root / "kv.proto").write_text(KV_PROTO)
    (root / "kv.pb").write_bytes(kv_descriptor_set())
    (root / "kv.protoset").write_bytes(kv_descriptor_set())
    (root / "api" / "v1").mkdir(parents=True)
    (root / "api" / "v1" / "kv.proto").write_text(KV_PROTO.replace("package proto;",
                                                                   "package plugin.v1;"))
    (root / "notes.txt").write_text("notes\n")
    (root / "dir.proto").mkdir()
    os.mkfifo(root / "fifo.proto")
    (root / "passwd.proto").symlink_to("/etc/passwd")
    (root / "passwd.pb").symlink_to("/etc/passwd")
    (root / "inlink.proto").symlink_to("kv.proto")
    (root / "linkdir").symlink_to("api/v1", target_is_directory=True)
    (root / "outlink").symlink_to(outside, target_is_directory=True)
    (root / "dangling.proto").symlink_to("nowhere.proto")
    return root


@pytest.fixture
def grpc_dir(tmp_path: Path) -> Path:
    return build_grpc_dir(tmp_path)


@pytest.fixture(scope="module")
def shared_grpc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """For Hypothesis tests; never modified."""
    return build_grpc_dir(tmp_path_factory.mktemp("hyp-grpc"))


GRPC_PLUGIN = {"id": "acme.kv", "version": "1.0.0", "type": "external", "protocol": "grpc",
               "entrypoint": "kv-go-grpc"}
GRPC_TABLE = {"proto": ["kv.proto"], "service": "proto.KV"}
HANDSHAKE = {"protocol_version": 1, "magic_cookie_key": "BASIC_PLUGIN",
             "magic_cookie_value": "hello"}


def _changed(base: dict[str, Any], changes: dict[str, Any] | None) -> dict[str, Any]:
    table = copy.deepcopy(base)
    for key, value in (changes or {}).items():
        if value is DROP:
            del table[key]
        else:
            table[key] = value
    return table


def grpc_manifest(plugin: dict[str, Any] | None = None, grpc: Any = None,
                  handshake: Any = None) -> str:
    """The README's gRPC manifest with keys changed (DROP removes a key; ``grpc=DROP`` or
    ``handshake=DROP`` a whole table; a value that is not a dict replaces the table)."""
    doc: dict[str, Any] = {"plugin": _changed(GRPC_PLUGIN, plugin)}
    if grpc is DROP:
        return to_toml(doc)
    if grpc is not None and not isinstance(grpc, dict):
        doc["grpc"] = grpc
        return to_toml(doc)
    doc["grpc"] = _changed(GRPC_TABLE, grpc)
    if handshake is not DROP:
        doc["grpc"]["handshake"] = (handshake if handshake is not None
                                    and not isinstance(handshake, dict)
                                    else _changed(HANDSHAKE, handshake))
    return to_toml(doc)


def cookie_key(name: str) -> str:
    return grpc_manifest(handshake={"magic_cookie_key": name})


# Names README.md says a cookie key may not take: sandboxer's and go-plugin's own.
RESERVED_KEYS = ["PLUGIN_MIN_PORT", "PLUGIN_MAX_PORT", "PLUGIN_PROTOCOL_VERSIONS",
                 "PLUGIN_CLIENT_CERT", "PLUGIN_UNIX_SOCKET_DIR", "PLUGIN_UNIX_SOCKET_GROUP",
                 "PLUGIN_MULTIPLEX_GRPC", "PATH", "HOME", "TMPDIR", "LANG", "TERM",
                 "LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH", "HTTP_PROXY", "http_proxy",
                 "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
                 "SANDBOXER_MAGIC_COOKIE", "SANDBOXER_RPC_FD", "SANDBOXER_ANYTHING"]
HS = "grpc.handshake"
BAD_GRPC_MANIFESTS = [
    # plugin.protocol
    pytest.param(grpc_manifest({"protocol": "http"}), "plugin.protocol", "jsonrpc",
                 id="protocol-unknown"),
    pytest.param(grpc_manifest({"protocol": "gRPC"}), "plugin.protocol", "grpc",
                 id="protocol-capitalised"),
    pytest.param(grpc_manifest({"protocol": 1}), "plugin.protocol", "grpc", id="protocol-int"),
    pytest.param(grpc_manifest({"protocol": ["grpc"]}), "plugin.protocol", "grpc",
                 id="protocol-list"),
    pytest.param(grpc_manifest({"type": "python", "entrypoint": "main.py"}), "plugin.protocol",
                 'type = "external"', id="grpc-for-a-python-plugin"),
    pytest.param(grpc_manifest({"type": "wasm", "entrypoint": "kv.pb"}), "plugin.protocol",
                 'type = "external"', id="grpc-for-a-wasm-plugin"),
    # the [grpc] table and protocol agree
    pytest.param(grpc_manifest(grpc=DROP), "grpc", "[grpc]", id="grpc-without-the-table"),
    pytest.param(grpc_manifest({"protocol": DROP}), "grpc", '[grpc] is for protocol = "grpc"',
                 id="table-with-default-protocol"),
    pytest.param(grpc_manifest({"protocol": "jsonrpc"}), "grpc",
                 '[grpc] is for protocol = "grpc"', id="table-with-jsonrpc"),
    pytest.param(grpc_manifest(grpc="kv.proto"), "grpc", "a table", id="grpc-not-a-table"),
    pytest.param(grpc_manifest(grpc={"include": ["."]}), "grpc.include", "no such field",
                 id="grpc-unknown-key"),
    # grpc.proto
    pytest.param(grpc_manifest(grpc={"proto": DROP}), "grpc.proto", "required",
                 id="proto-missing"),
    pytest.param(grpc_manifest(grpc={"proto": []}), "grpc.proto", "non-empty",
                 id="proto-empty-list"),
    pytest.param(grpc_manifest(grpc={"proto": "kv.proto"}), "grpc.proto", "a list",
                 id="proto-a-string-not-a-list"),
    pytest.param(grpc_manifest(grpc={"proto": [1]}), "grpc.proto", "relative path",
                 id="proto-int-item"),
    pytest.param(grpc_manifest(grpc={"proto": [""]}), "grpc.proto", "relative path",
                 id="proto-empty-path"),
    pytest.param(grpc_manifest(grpc={"proto": ["kv\0.proto"]}), "grpc.proto", "relative path",
                 id="proto-nul"),
    pytest.param(grpc_manifest(grpc={"proto": ["/etc/passwd"]}), "grpc.proto", "absolute",
                 id="proto-absolute-etc-passwd"),
    pytest.param(grpc_manifest(grpc={"proto": ["/tmp/kv.proto"]}), "grpc.proto", "absolute",
                 id="proto-absolute-proto"),
    pytest.param(grpc_manifest(grpc={"proto": ["../outside/kv.proto"]}), "grpc.proto", "'..'",
                 id="proto-dotdot-leaves-dir"),
    pytest.param(grpc_manifest(grpc={"proto": ["api/../kv.proto"]}), "grpc.proto", "'..'",
                 id="proto-dotdot-stays-inside"),
    pytest.param(grpc_manifest(grpc={"proto": ["passwd.proto"]}), "grpc.proto", "without symlinks",
                 id="proto-symlink-to-etc-passwd"),
    pytest.param(grpc_manifest(grpc={"proto": ["passwd.pb"]}), "grpc.proto", "without symlinks",
                 id="descriptor-set-symlink-to-etc-passwd"),
    pytest.param(grpc_manifest(grpc={"proto": ["inlink.proto"]}), "grpc.proto", "without symlinks",
                 id="proto-symlink-staying-inside"),
    pytest.param(grpc_manifest(grpc={"proto": ["linkdir/kv.proto"]}), "grpc.proto",
                 "without symlinks",
                 id="proto-through-dir-symlink-inside"),
    pytest.param(grpc_manifest(grpc={"proto": ["outlink/kv.proto"]}), "grpc.proto",
                 "without symlinks",
                 id="proto-through-dir-symlink-outside"),
    pytest.param(grpc_manifest(grpc={"proto": ["dangling.proto"]}), "grpc.proto",
                 "without symlinks",
                 id="proto-dangling-symlink"),
    pytest.param(grpc_manifest(grpc={"proto": ["missing.proto"]}), "grpc.proto",
                 "does not exist", id="proto-missing-file"),
    pytest.param(grpc_manifest(grpc={"proto": ["nowhere/kv.proto"]}), "grpc.proto",
                 "does not exist", id="proto-missing-directory"),
    pytest.param(grpc_manifest(grpc={"proto": ["dir.proto"]}), "grpc.proto", "regular file",
                 id="proto-is-a-directory"),
    pytest.param(grpc_manifest(grpc={"proto": ["fifo.proto"]}), "grpc.proto", "regular file",
                 id="proto-is-a-fifo"),
    pytest.param(grpc_manifest(grpc={"proto": ["notes.txt"]}), "grpc.proto", ".protoset",
                 id="proto-wrong-suffix"),
    pytest.param(grpc_manifest(grpc={"proto": ["kv-go-grpc"]}), "grpc.proto", ".protoset",
                 id="proto-no-suffix"),
    pytest.param(grpc_manifest(grpc={"proto": ["kv.proto", "./kv.proto"]}), "grpc.proto",
                 "duplicates", id="proto-same-file-twice"),
    pytest.param(grpc_manifest(grpc={"proto": ["kv.proto", "kv.pb"]}), "grpc.proto", "mix",
                 id="proto-and-descriptor-set-mixed"),
    # grpc.service
    pytest.param(grpc_manifest(grpc={"service": DROP}), "grpc.service", "required",
                 id="service-missing"),
    *[pytest.param(grpc_manifest(grpc={"service": name}), "grpc.service", "full name",
                   id=f"service-{case}")
      for case, name in [("empty", ""), ("double-dot", "proto..KV"), ("leading-dot", ".proto.KV"),
                         ("trailing-dot", "proto.KV."), ("slash", "proto/KV"),
                         ("digit-first", "1proto.KV"), ("dash", "proto.K-V"),
                         ("space", "proto. KV"), ("grpc-path", "/proto.KV/Get"),
                         ("too-long", "a" * 513), ("int", 7), ("list", ["proto.KV"])]],
    # [grpc.handshake]
    pytest.param(grpc_manifest(handshake=DROP), HS, "HandshakeConfig", id="handshake-missing"),
    pytest.param(grpc_manifest(handshake="hello"), HS, "a table", id="handshake-not-a-table"),
    pytest.param(grpc_manifest(handshake={"magic_cookie": "x"}), f"{HS}.magic_cookie",
                 "no such field", id="handshake-unknown-key"),
    *[pytest.param(grpc_manifest(handshake={key: DROP}), f"{HS}.{key}", "required",
                   id=f"handshake-without-{key}") for key in HANDSHAKE],
    *[pytest.param(grpc_manifest(handshake={"protocol_version": v}), f"{HS}.protocol_version",
                   "integer", id=f"protocol-version-{case}")
      for case, v in [("zero", 0), ("negative", -1), ("2**31", 2**31), ("bool", True),
                      ("string", "1"), ("float", 1.0)]],
    *[pytest.param(cookie_key(name), f"{HS}.magic_cookie_key", "environment variable name",
                   id=f"cookie-key-{case}")
      for case, name in [("empty", ""), ("digit-first", "1PLUGIN"), ("dash", "BASIC-PLUGIN"),
                         ("equals", "BASIC=PLUGIN"), ("space", "BASIC PLUGIN"),
                         ("129-chars", "K" * 129), ("non-ascii", "CLÉ"), ("int", 1)]],
    *[pytest.param(cookie_key(name), f"{HS}.magic_cookie_key", "sandboxer or go-plugin",
                   id=f"cookie-key-reserved-{name}") for name in RESERVED_KEYS],
    *[pytest.param(grpc_manifest(handshake={"magic_cookie_value": v}),
                   f"{HS}.magic_cookie_value", expected, id=f"cookie-value-{case}")
      for case, v, expected in [("empty", "", "non-empty"), ("int", 42, "non-empty string"),
                                ("nul", "hel\0lo", "NUL"), ("newline", "hel\nlo", "newline"),
                                ("4097-bytes", "x" * 4097, "4096 bytes"),
                                ("4098-bytes-in-2049-chars", "é" * 2049, "4096 bytes")]],
]


@pytest.mark.parametrize(("content", "field", "says"), BAD_GRPC_MANIFESTS)
def test_bad_grpc_manifest(grpc_dir: Path, content: str, field: str, says: str) -> None:
    manifest_path = grpc_dir / "plugin.toml"
    with pytest.raises(ManifestError) as info:
        parse_manifest(content, path=manifest_path, root=grpc_dir)
    _check_error(info.value, manifest_path, field)
    assert says in info.value.expected, str(info.value)
    manifest_path.write_text(content)
    with pytest.raises(ManifestError) as again:
        load_plugin(grpc_dir)
    assert str(again.value) == str(info.value)


def test_the_readme_grpc_manifest_loads(grpc_dir: Path) -> None:
    (grpc_dir / "plugin.toml").write_text(README_GRPC)
    plugin = load_plugin(grpc_dir)
    assert plugin.type is LoaderType.EXTERNAL
    assert plugin.protocol is Protocol.GRPC
    assert plugin.entrypoint == (grpc_dir / "kv-go-grpc").resolve()
    assert plugin.grpc == GrpcSpec(
        proto=((grpc_dir / "kv.proto").resolve(),),
        service="proto.KV",
        handshake=GoPluginHandshake(protocol_version=1, magic_cookie_key="BASIC_PLUGIN",
                                    magic_cookie_value="hello"),
    )
    assert all(p.is_absolute() for p in plugin.grpc.proto)
    out = json.loads(json.dumps(plugin.to_json()))
    assert out["protocol"] == "grpc"
    assert out["grpc"] == {
        "proto": [str((grpc_dir / "kv.proto").resolve())],
        "service": "proto.KV",
        "handshake": {"protocol_version": 1, "magic_cookie_key": "BASIC_PLUGIN",
                      "magic_cookie_value": "hello"},
    }
    # The writer used for the bad cases produces the same manifest.
    assert parse_manifest(grpc_manifest(), path=grpc_dir / "plugin.toml", root=grpc_dir) == plugin


@pytest.mark.parametrize(
    ("proto", "service"),
    [
        pytest.param(["kv.pb"], "proto.KV", id="descriptor-set-pb"),
        pytest.param(["kv.protoset"], "proto.KV", id="descriptor-set-protoset"),
        pytest.param(["kv.pb", "kv.protoset"], "proto.KV", id="two-descriptor-sets"),
        pytest.param(["api/v1/kv.proto"], "plugin.v1.KV", id="proto-in-a-subdirectory"),
        pytest.param(["kv.proto", "api/v1/kv.proto"], "plugin.v1.KV", id="two-proto-files"),
        pytest.param(["./kv.proto"], "proto.KV", id="dot-slash"),
        pytest.param(["kv.proto"], "KV", id="service-without-a-package"),
        pytest.param(["kv.proto"], "_a.b_2.C", id="service-underscores-and-digits"),
    ],
)
def test_good_grpc_tables(grpc_dir: Path, proto: list[str], service: str) -> None:
    plugin = parse_manifest(grpc_manifest(grpc={"proto": proto, "service": service}),
                            path=grpc_dir / "plugin.toml", root=grpc_dir)
    assert plugin.grpc is not None
    assert plugin.grpc.proto == tuple((grpc_dir / p).resolve() for p in proto)
    assert plugin.grpc.service == service


@pytest.mark.parametrize(
    ("handshake"),
    [
        pytest.param({"protocol_version": 2**31 - 1}, id="protocol-version-max"),
        pytest.param({"magic_cookie_key": "K" * 128}, id="cookie-key-128-chars"),
        pytest.param({"magic_cookie_key": "_"}, id="cookie-key-underscore"),
        pytest.param({"magic_cookie_key": "path"}, id="cookie-key-lower-case-path"),
        pytest.param({"magic_cookie_key": "PLUGIN_COOKIE"}, id="cookie-key-plugin-prefix"),
        pytest.param({"magic_cookie_key": "TF_PLUGIN_MAGIC_COOKIE"}, id="terraform-cookie"),
        pytest.param({"magic_cookie_key": "SANDBOXER"}, id="cookie-key-sandboxer-no-underscore"),
        pytest.param({"magic_cookie_value": "x" * 4096}, id="cookie-value-4096-bytes"),
        pytest.param({"magic_cookie_value": "é" * 2048}, id="cookie-value-4096-bytes-utf8"),
        pytest.param({"magic_cookie_value": "d602bf8f470bc67ca7faa0386276bbdd"
                                            "4330efaf76d1a219cb4d6991ca9872b2"},
                     id="cookie-value-terraform"),
        pytest.param({"magic_cookie_value": "tab\tand = and \"quotes\""},
                     id="cookie-value-punctuation"),
    ],
)
def test_good_handshakes(grpc_dir: Path, handshake: dict[str, Any]) -> None:
    plugin = parse_manifest(grpc_manifest(handshake=handshake), path=grpc_dir / "plugin.toml",
                            root=grpc_dir)
    assert plugin.grpc is not None
    expected = {**HANDSHAKE, **handshake}
    assert plugin.grpc.handshake == GoPluginHandshake(**expected)


def test_jsonrpc_is_the_default_and_may_be_written(plugin_dir: Path) -> None:
    implicit = parse_manifest(manifest({"type": "external", "entrypoint": "bin/run"}),
                              path=plugin_dir / "plugin.toml", root=plugin_dir)
    explicit = parse_manifest(manifest({"type": "external", "entrypoint": "bin/run",
                                        "protocol": "jsonrpc"}),
                              path=plugin_dir / "plugin.toml", root=plugin_dir)
    assert implicit == explicit
    assert (implicit.protocol, implicit.grpc) == (Protocol.JSONRPC, None)
    assert implicit.to_json()["protocol"] == "jsonrpc" and implicit.to_json()["grpc"] is None


def test_a_plugin_built_in_code_keeps_the_old_defaults(tmp_path: Path) -> None:
    plugin = Plugin(id="x", version="1.0.0", type=LoaderType.PYTHON,
                    entrypoint=tmp_path / "x.py", root=tmp_path)
    assert (plugin.protocol, plugin.grpc) == (Protocol.JSONRPC, None)


def test_a_proto_file_replaced_by_a_link_after_publishing_is_refused(grpc_dir: Path) -> None:
    (grpc_dir / "plugin.toml").write_text(README_GRPC)
    load_plugin(grpc_dir)
    (grpc_dir / "kv.proto").unlink()
    (grpc_dir / "kv.proto").symlink_to("/etc/passwd")
    with pytest.raises(ManifestError) as info:
        load_plugin(grpc_dir)
    assert info.value.field == "grpc.proto" and "without symlinks" in info.value.expected


# -- good manifests --------------------------------------------------------------------------

FULL = textwrap.dedent("""\
    [plugin]
    id = "acme.hello"
    version = "1.2.0-beta.1+build.5"
    type = "python"
    entrypoint = "main.py"
    name = "Hello"
    description = "Says hello"
    methods = ["greet", "farewell"]
    sha256 = "sha256:{sha}"

    [config]
    greeting = "hello"
    count = 3
    ratio = 0.5
    flags = [true, false]
    nested = {{ a = {{ b = [1, "two"] }} }}

    [sandbox]
    profile = "strict"
    memory_limit = "64MiB"
    cpu_limit = 0.5
    timeout = "5s"
    network_allowed = true
    allowed_hosts = ["Example.com:443", "*.example.org", "10.0.0.0/8", "[::1]:8080"]
    allowed_paths = ["/data", "/srv/cache:rw", "/opt/x:ro", "/var/lib/y/"]
    denied_paths = ["/data/secret/"]
    """)


def test_full_manifest_round_trips_every_field(plugin_dir: Path) -> None:
    sha = hashlib.sha256((plugin_dir / "main.py").read_bytes()).hexdigest()
    (plugin_dir / "plugin.toml").write_text(FULL.format(sha=sha))
    expected = Plugin(
        id="acme.hello",
        version="1.2.0-beta.1+build.5",
        type=LoaderType.PYTHON,
        entrypoint=(plugin_dir / "main.py").resolve(),
        root=plugin_dir.resolve(),
        name="Hello",
        description="Says hello",
        methods=("greet", "farewell"),
        sha256=sha,
        config={"greeting": "hello", "count": 3, "ratio": 0.5, "flags": [True, False],
                "nested": {"a": {"b": [1, "two"]}}},
        sandbox=SandboxRequest(
            profile="strict",
            memory_limit=64 * MiB,
            cpu_limit=0.5,
            timeout=5.0,
            network_allowed=True,
            allowed_hosts=("example.com:443", "*.example.org", "10.0.0.0/8", "[::1]:8080"),
            allowed_paths=(PathGrant("/data"), PathGrant("/srv/cache", True),
                           PathGrant("/opt/x"), PathGrant("/var/lib/y")),
            denied_paths=("/data/secret",),
        ),
        manifest_path=(plugin_dir / "plugin.toml").resolve(),
    )
    assert load_plugin(plugin_dir) == expected
    assert load_plugin(plugin_dir / "plugin.toml") == expected
    assert parse_manifest(FULL.format(sha=sha), path=plugin_dir / "plugin.toml",
                          root=plugin_dir) == expected
    plugin = load_plugin(plugin_dir)
    assert plugin.is_bare_file is False
    verify_integrity(plugin)
    out = plugin.to_json()
    assert out["id"] == "acme.hello" and out["type"] == "python"
    assert out["methods"] == ["greet", "farewell"]
    assert out["manifest"] == str((plugin_dir / "plugin.toml").resolve())
    assert out["protocol"] == "jsonrpc" and out["grpc"] is None


def test_minimal_manifest_defaults(plugin_dir: Path) -> None:
    plugin = parse_manifest(manifest(), path=plugin_dir / "plugin.toml", root=plugin_dir)
    assert (plugin.name, plugin.description, plugin.methods, plugin.sha256) == (
        None, None, None, None)
    assert plugin.config == {}
    assert plugin.sandbox == SandboxRequest()
    assert plugin.type is LoaderType.PYTHON
    assert plugin.entrypoint == (plugin_dir / "main.py").resolve()
    assert (plugin.protocol, plugin.grpc) == (Protocol.JSONRPC, None)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("64MiB", 67108864, id="64MiB"),
        pytest.param("512M", 536870912, id="512M"),
        pytest.param("100MB", 100000000, id="100MB"),
        pytest.param("1G", 1 << 30, id="1G"),
        pytest.param(1048576, 1048576, id="int-bytes"),
    ],
)
def test_memory_limit_units(plugin_dir: Path, value: Any, expected: int) -> None:
    plugin = parse_manifest(manifest(sandbox={"memory_limit": value}),
                            path=plugin_dir / "plugin.toml", root=plugin_dir)
    assert plugin.sandbox.memory_limit == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("5s", 5.0, id="5s"),
        pytest.param("250ms", 0.25, id="250ms"),
        pytest.param("2m", 120.0, id="2m"),
        pytest.param(7, 7.0, id="int-seconds"),
        pytest.param(1.5, 1.5, id="float-seconds"),
    ],
)
def test_timeout_units(plugin_dir: Path, value: Any, expected: float) -> None:
    plugin = parse_manifest(manifest(sandbox={"timeout": value}),
                            path=plugin_dir / "plugin.toml", root=plugin_dir)
    assert plugin.sandbox.timeout == pytest.approx(expected)


@pytest.mark.parametrize(("value", "expected"), [(1, 1.0), (0.25, 0.25), (0.01, 0.01)])
def test_cpu_limit_is_float(plugin_dir: Path, value: Any, expected: float) -> None:
    plugin = parse_manifest(manifest(sandbox={"cpu_limit": value}),
                            path=plugin_dir / "plugin.toml", root=plugin_dir)
    assert plugin.sandbox.cpu_limit == expected
    assert isinstance(plugin.sandbox.cpu_limit, float)


@pytest.mark.parametrize(
    ("kind", "entrypoint", "resolved"),
    [
        pytest.param("python", "main.py", "main.py", id="python-file"),
        pytest.param("python", "pkg", "pkg", id="python-package"),
        pytest.param("python", "pkg/", "pkg", id="python-package-trailing-slash"),
        pytest.param("python", "./main.py", "main.py", id="dot-slash"),
        pytest.param("python", "inlink.py", "main.py", id="symlink-staying-inside"),
        pytest.param("external", "bin/run", "bin/run", id="external-executable"),
        pytest.param("wasm", "mod.wasm", "mod.wasm", id="wasm"),
        pytest.param("native", "lib.so", "lib.so", id="native"),
    ],
)
def test_entrypoint_kinds(plugin_dir: Path, kind: str, entrypoint: str, resolved: str) -> None:
    (plugin_dir / "plugin.toml").write_text(manifest({"type": kind, "entrypoint": entrypoint}))
    plugin = load_plugin(plugin_dir)
    assert plugin.type is LoaderType(kind)
    assert plugin.entrypoint == (plugin_dir / resolved).resolve()
    assert plugin.root == plugin_dir.resolve()


def test_sha256_prefix_is_stripped(plugin_dir: Path) -> None:
    for value in (HEX, "sha256:" + HEX):
        plugin = parse_manifest(manifest({"sha256": value}), path=plugin_dir / "plugin.toml",
                                root=plugin_dir)
        assert plugin.sha256 == HEX


# -- load_plugin: paths and bare files -------------------------------------------------------

def test_load_plugin_dir_without_manifest(plugin_dir: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_plugin(plugin_dir)
    assert info.value.field == "plugin.toml"
    assert str(plugin_dir) in str(info.value)


def test_load_plugin_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_plugin(tmp_path / "nowhere")
    assert info.value.field == "(path)"
    assert str(tmp_path / "nowhere") in str(info.value)


def test_load_plugin_missing_manifest_file_named_explicitly(plugin_dir: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_plugin(plugin_dir / "plugin.toml")
    assert info.value.field == "(file)"
    assert str(plugin_dir / "plugin.toml") in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "kind", "plugin_id"),
    [
        pytest.param("hello.py", b"def greet(n):\n    return n\n", LoaderType.PYTHON, "hello",
                     id="py"),
        pytest.param("My Plugin.py", b"", LoaderType.PYTHON, "my-plugin", id="py-name-spaces"),
        pytest.param("add.wasm", b"\0asm\x01\0\0\0", LoaderType.WASM, "add", id="wasm"),
        pytest.param("libfoo.so", b"\x7fELF\x02\x01\x01", LoaderType.NATIVE, "libfoo", id="so"),
        pytest.param("libbar.so.1", b"\x7fELF\x02\x01\x01", LoaderType.NATIVE, "libbar",
                     id="versioned-so"),
    ],
)
def test_bare_file_loads_without_manifest(tmp_path: Path, name: str, content: bytes,
                                          kind: LoaderType, plugin_id: str) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    plugin = load_plugin(f)
    assert plugin.type is kind
    assert plugin.id == plugin_id
    assert plugin.version == "0.0.0"
    assert plugin.entrypoint == f.resolve()
    assert plugin.root == f.resolve()
    assert plugin.is_bare_file and plugin.manifest_path is None
    assert plugin.sandbox == SandboxRequest()  # the default profile
    assert plugin.sha256 is None
    assert (plugin.protocol, plugin.grpc) == (Protocol.JSONRPC, None)  # bare files: jsonrpc
    verify_integrity(plugin)  # nothing to verify; must not raise


@pytest.mark.parametrize(
    ("name", "content", "mode", "field"),
    [
        pytest.param("bad.wasm", b"not wasm", 0o644, "(file)", id="wasm-without-magic"),
        pytest.param("empty.wasm", b"", 0o644, "(file)", id="wasm-empty"),
        pytest.param("bad.so", b"#!/bin/sh\n", 0o644, "(file)", id="so-without-elf-magic"),
        pytest.param("tool", b"#!/bin/sh\necho hi\n", 0o755, "plugin.toml",
                     id="executable-needs-manifest"),
        pytest.param("tool.sh", b"#!/bin/sh\n", 0o755, "plugin.toml", id="unknown-extension"),
        pytest.param("module.wasm.txt", b"\0asm", 0o644, "plugin.toml",
                     id="wasm-magic-wrong-extension"),
        pytest.param("___.py", b"", 0o644, "plugin.id", id="py-name-without-id-characters"),
    ],
)
def test_bad_bare_file(tmp_path: Path, name: str, content: bytes, mode: int, field: str) -> None:
    f = tmp_path / name
    f.write_bytes(content)
    f.chmod(mode)
    with pytest.raises(ManifestError) as info:
        load_plugin(f)
    assert info.value.field == field
    assert str(f) in str(info.value)


# -- verify_integrity ------------------------------------------------------------------------

def _with_sha(plugin_dir: Path, sha: str, entrypoint: str = "main.py") -> Plugin:
    (plugin_dir / "plugin.toml").write_text(manifest({"entrypoint": entrypoint, "sha256": sha}))
    return load_plugin(plugin_dir)


def test_integrity_file_entrypoint_right_digest(plugin_dir: Path) -> None:
    sha = hashlib.sha256((plugin_dir / "main.py").read_bytes()).hexdigest()
    assert verify_integrity(_with_sha(plugin_dir, sha)) is None
    assert verify_integrity(_with_sha(plugin_dir, "sha256:" + sha)) is None


def test_integrity_file_entrypoint_wrong_digest(plugin_dir: Path) -> None:
    actual = hashlib.sha256((plugin_dir / "main.py").read_bytes()).hexdigest()
    plugin = _with_sha(plugin_dir, HEX)
    with pytest.raises(IntegrityError) as info:
        verify_integrity(plugin)
    err = info.value
    assert isinstance(err, PluginLoadError)
    assert err.plugin_id == "acme.hello"
    assert "acme.hello" in str(err) and HEX in str(err) and actual in str(err)


def test_integrity_file_changed_after_manifest(plugin_dir: Path) -> None:
    sha = hashlib.sha256((plugin_dir / "main.py").read_bytes()).hexdigest()
    plugin = _with_sha(plugin_dir, sha)
    (plugin_dir / "main.py").write_text("import os\nos.system('evil')\n")
    with pytest.raises(IntegrityError):
        verify_integrity(plugin)


def test_integrity_package_uses_tree_checksum(plugin_dir: Path) -> None:
    checksum = tree_checksum(plugin_dir / "pkg")
    sha = checksum.removeprefix("sha256:")
    assert sha != hashlib.sha256((plugin_dir / "pkg" / "__init__.py").read_bytes()).hexdigest()
    plugin = _with_sha(plugin_dir, sha, "pkg")
    assert verify_integrity(plugin) is None
    assert verify_integrity(_with_sha(plugin_dir, checksum, "pkg")) is None
    # Byte-code caches written by an import do not count...
    (plugin_dir / "pkg" / "__pycache__").mkdir()
    (plugin_dir / "pkg" / "__pycache__" / "core.cpython-311.pyc").write_bytes(b"\0" * 16)
    verify_integrity(plugin)
    # ...a changed source file does.
    (plugin_dir / "pkg" / "core.py").write_text("def greet(name):\n    return 'pwned'\n")
    with pytest.raises(IntegrityError):
        verify_integrity(plugin)


def test_integrity_package_wrong_digest(plugin_dir: Path) -> None:
    with pytest.raises(IntegrityError):
        verify_integrity(_with_sha(plugin_dir, HEX, "pkg"))


def test_integrity_without_sha256_checks_nothing(plugin_dir: Path) -> None:
    (plugin_dir / "plugin.toml").write_text(manifest())
    plugin = load_plugin(plugin_dir)
    (plugin_dir / "main.py").write_text("changed = True\n")
    assert verify_integrity(plugin) is None


# -- properties ------------------------------------------------------------------------------

TIMEZONES = st.sampled_from([None, timezone.utc, timezone(timedelta(hours=5, minutes=30)),
                             timezone(timedelta(hours=-8))])
SCALARS = st.one_of(
    st.text(max_size=12),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),  # TOML's integer range
    st.floats(),  # including inf, -inf and nan
    st.booleans(),
    st.datetimes(timezones=TIMEZONES),
    st.dates(),
    st.times(),
)
ANY_VALUE = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)
SAFE_TEXT = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                    max_size=40)
JSON_VALUE = st.recursive(
    st.one_of(SAFE_TEXT, st.integers(-(2**63), 2**63 - 1), st.booleans(),
              st.floats(allow_nan=False, allow_infinity=False)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(SAFE_TEXT, inner, max_size=4)),
    max_leaves=12,
)

KINDS = [("python", "main.py"), ("python", "pkg"), ("python", "inlink.py"),
         ("external", "bin/run"), ("wasm", "mod.wasm"), ("native", "lib.so")]
GOOD_HOSTS = ["example.com", "*.example.com", "example.com:443", "10.0.0.1", "[::1]:8080",
              "10.0.0.0/8", "::1", "api.example.org:8443"]
GOOD_PATHS = ["/data", "/srv/cache:rw", "/opt/x:ro", "/var/lib/app/", "/home/u/.cache:rw"]
SEMVERS = st.builds(
    lambda a, b, c, pre: f"{a}.{b}.{c}{pre}",
    st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6),
    st.sampled_from(["", "-alpha", "-beta.1", "-rc.1+build.7", "+sha.5114f85"]),
)
SIZES = st.one_of(st.integers(1, 1 << 50),
                  st.sampled_from(["64MiB", "512M", "100MB", "1G", "4096", "1.5G", "8KiB"]))
DURATIONS = st.one_of(st.integers(1, 604800), st.floats(0.001, 604800),
                      st.sampled_from(["5s", "250ms", "2m", "1h", "100us", "1.5s"]))
CPUS = st.one_of(st.floats(0.01, 1024), st.integers(1, 1024))


@st.composite
def valid_documents(draw: st.DrawFn) -> dict[str, Any]:
    """Manifests every field of which is valid; optional fields come and go."""
    kind, entrypoint = draw(st.sampled_from(KINDS))
    plugin: dict[str, Any] = {
        "id": draw(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,127}", fullmatch=True)),
        "version": draw(SEMVERS),
        "type": kind,
        "entrypoint": entrypoint,
    }
    optional = {
        "name": st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                        max_size=200),
        "description": SAFE_TEXT,
        "methods": st.lists(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True),
                            min_size=1, max_size=5, unique=True),
        "sha256": st.builds(lambda b, p: p + b.hex(), st.binary(min_size=32, max_size=32),
                            st.sampled_from(["", "sha256:"])),
        "protocol": st.just("jsonrpc"),
    }
    plugin.update(draw(st.fixed_dictionaries({}, optional=optional)))
    doc: dict[str, Any] = {"plugin": plugin}
    if draw(st.booleans()):
        doc["config"] = draw(st.dictionaries(SAFE_TEXT, JSON_VALUE, max_size=5))
    if draw(st.booleans()):
        network = draw(st.booleans())
        sandbox_fields = {
            "profile": st.from_regex(r"[a-z0-9][a-z0-9_-]{0,63}", fullmatch=True),
            "memory_limit": SIZES,
            "cpu_limit": CPUS,
            "timeout": DURATIONS,
            "allowed_paths": st.lists(st.sampled_from(GOOD_PATHS), unique=True, max_size=5),
            "denied_paths": st.lists(st.sampled_from(["/data/secret", "/etc", "/root"]),
                                     unique=True, max_size=3),
        }
        if network:
            sandbox_fields["allowed_hosts"] = st.lists(st.sampled_from(GOOD_HOSTS), unique=True,
                                                       max_size=5)
        required = {"network_allowed": st.just(True)} if network else {}
        if not network:
            sandbox_fields["network_allowed"] = st.just(False)
        doc["sandbox"] = draw(st.fixed_dictionaries(required, optional=sandbox_fields))
    return doc


def _maybe_bad(good: st.SearchStrategy[Any], *bad: Any) -> st.SearchStrategy[Any]:
    """A field's value: a good one, a known-bad one, or anything at all."""
    strategies = [good, ANY_VALUE, st.lists(SCALARS, min_size=1, max_size=3)]
    if bad:
        strategies.insert(1, st.sampled_from(bad))
    return st.one_of(*strategies)


PLAUSIBLE_PLUGIN = {
    "id": _maybe_bad(st.sampled_from(["acme.hello", "a", "x" * 128]),
                     "Acme", "-x", "", "x" * 129),
    "version": _maybe_bad(SEMVERS, "1.2", "v1.2.3", "01.2.3", ""),
    "type": _maybe_bad(st.sampled_from([k for k, _ in KINDS]), "java", "Python"),
    "entrypoint": _maybe_bad(
        st.sampled_from([e for _, e in KINDS]),
        "escape.py", "outlink/evil.py", "../outside/evil.py", "/etc/passwd", "nopkg",
        "notes.txt", "bin/data", "bin", "missing.py", "", ".", "main.py/", "a\0b"),
    "name": _maybe_bad(SAFE_TEXT, "x" * 201, "a\0b"),
    "description": _maybe_bad(SAFE_TEXT),
    "methods": _maybe_bad(st.lists(st.sampled_from(["greet", "add", "_x"]), max_size=3),
                          ["a-b"], ["1x"], "greet"),
    "sha256": _maybe_bad(st.just(HEX), HEX.upper(), HEX[:10], "sha256:" + HEX),
    "protocol": _maybe_bad(st.just("jsonrpc"), "grpc", "gRPC", "http"),
}
PLAUSIBLE_SANDBOX = {
    "profile": _maybe_bad(st.sampled_from(["default", "strict", "network-client"]),
                          "Strict", "", "x" * 65, "../x"),
    "memory_limit": _maybe_bad(SIZES, "64XB", -1, 0, "0.5", "2048T", " 1 G "),
    "cpu_limit": _maybe_bad(CPUS, 0, "half", 1025, -1.0),
    "timeout": _maybe_bad(DURATIONS, "5 parsecs", 0, "-1s", "8d", "5"),
    "network_allowed": _maybe_bad(st.booleans(), "yes", 1),
    "allowed_hosts": _maybe_bad(st.lists(st.sampled_from(GOOD_HOSTS), max_size=4),
                                ["*.com"], ["exa mple.com"], ["example.com:70000"], ["[::1"]),
    "allowed_paths": _maybe_bad(st.lists(st.sampled_from(GOOD_PATHS), max_size=4),
                                ["data"], ["/a/../b"], ["/x:ro", "/x:rw"], ["//x"]),
    "denied_paths": _maybe_bad(st.lists(st.sampled_from(["/etc", "/root"]), max_size=2),
                               ["tmp"], ["/a//b"]),
}
MUTATIONS = ["set", "set", "set", "set", "config", "config", "drop", "junk", "not-a-table"]
NOT_JSON = st.sampled_from([math.inf, -math.inf, math.nan, date(2020, 1, 1), time(7, 32),
                            datetime(1979, 5, 27, 7, 32),
                            datetime(2000, 1, 1, tzinfo=timezone.utc)])
CONFIG_VALUES = st.one_of(JSON_VALUE, NOT_JSON, ANY_VALUE,
                          st.lists(st.one_of(JSON_VALUE, NOT_JSON), max_size=3),
                          st.dictionaries(st.text(max_size=6), st.one_of(JSON_VALUE, NOT_JSON),
                                          max_size=3))


@st.composite
def plausible_documents(draw: st.DrawFn) -> dict[str, Any]:
    """Structurally plausible manifests: a valid one with a few mutations, each a known field
    set to a good, bad or arbitrary value, a field dropped, a junk key or table added, a table
    that is not a table, or a [config] holding anything (dates, inf, nan, nested tables)."""
    doc = draw(valid_documents())
    doc.setdefault("sandbox", {})
    for _ in range(draw(st.sampled_from([0, 1, 1, 2, 2, 3, 4]))):
        mutation = draw(st.sampled_from(MUTATIONS))
        if mutation == "set":
            name, fields = draw(st.sampled_from([("plugin", PLAUSIBLE_PLUGIN),
                                                 ("sandbox", PLAUSIBLE_SANDBOX)]))
            if isinstance(doc.get(name), dict):
                key = draw(st.sampled_from(sorted(fields)))
                doc[name][key] = draw(fields[key])
        elif mutation == "drop":
            name = draw(st.sampled_from(["plugin", "sandbox"]))
            if isinstance(doc.get(name), dict) and doc[name]:
                del doc[name][draw(st.sampled_from(sorted(doc[name])))]
            else:
                doc.pop(name, None)
        elif mutation == "junk":
            name = draw(st.sampled_from(["plugin", "sandbox", "config", None]))
            target = doc if name is None else doc.get(name)
            if isinstance(target, dict):
                target[draw(st.text(max_size=8))] = draw(ANY_VALUE)
        elif mutation == "not-a-table":
            doc[draw(st.sampled_from(["plugin", "sandbox", "config", "grpc"]))] = draw(ANY_VALUE)
        else:
            doc["config"] = draw(st.dictionaries(st.text(max_size=6), CONFIG_VALUES,
                                                 max_size=4))
    return doc


FIELDS = sorted([("plugin", k) for k in PLAUSIBLE_PLUGIN]
                + [("sandbox", k) for k in PLAUSIBLE_SANDBOX])


@st.composite
def one_field_changed(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A minimal valid manifest with one known field set to a good, bad or arbitrary value,
    and sometimes a [config] holding anything; returns the dotted field and the document."""
    table, key = draw(st.sampled_from(FIELDS))
    doc: dict[str, Any] = {"plugin": dict(BASE_PLUGIN), "sandbox": {"network_allowed": True}}
    doc[table][key] = draw({"plugin": PLAUSIBLE_PLUGIN, "sandbox": PLAUSIBLE_SANDBOX}[table][key])
    if draw(st.booleans()):
        doc["config"] = draw(st.dictionaries(st.text(max_size=6), CONFIG_VALUES, max_size=4))
    return f"{table}.{key}", doc


def _parse(text: str | bytes, root: Path) -> Plugin | None:
    try:
        return parse_manifest(text, path=root / "plugin.toml", root=root)
    except ManifestError as err:
        assert str(root / "plugin.toml") in str(err)
        return None


@given(st.one_of(st.text(), st.text("[]{}=\"'.,:#\n -_abcdeilnpgtuxy0123456789"), st.binary()))
@settings(max_examples=300, deadline=None)
def test_arbitrary_input_raises_only_manifest_error(shared_plugin_dir: Path,
                                                    text: str | bytes) -> None:
    _parse(text, shared_plugin_dir)


@given(ANY_VALUE.filter(lambda v: not isinstance(v, float) or not math.isnan(v)))
@settings(max_examples=300, deadline=None)
def test_toml_writer_round_trips(value: Any) -> None:
    def no_nan(v: Any) -> bool:
        if isinstance(v, float):
            return not math.isnan(v)
        if isinstance(v, list):
            return all(no_nan(x) for x in v)
        if isinstance(v, dict):
            return all(no_nan(x) for x in v.values())
        return True

    doc = {"t": {"k": value}, "top": value}
    if no_nan(value):
        assert tomllib.loads(to_toml(doc)) == doc
    else:
        tomllib.loads(to_toml(doc))  # still valid TOML


@given(plausible_documents())
@settings(max_examples=300, deadline=None)
def test_plausible_documents_raise_only_manifest_error(shared_plugin_dir: Path,
                                                       doc: dict[str, Any]) -> None:
    text = to_toml(doc)
    plugin = _parse(text, shared_plugin_dir)
    if plugin is not None:
        assert plugin.id == doc["plugin"]["id"]
        assert plugin.version == doc["plugin"]["version"]
    # The bytes path (as load_plugin reads a file) agrees with the text path.
    again = _parse(text.encode(), shared_plugin_dir)
    assert again == plugin


@given(one_field_changed())
@settings(max_examples=300, deadline=None)
def test_the_error_names_the_field_that_is_wrong(shared_plugin_dir: Path,
                                                 case: tuple[str, dict[str, Any]]) -> None:
    changed, doc = case
    try:
        parse_manifest(to_toml(doc), path=shared_plugin_dir / "plugin.toml",
                       root=shared_plugin_dir)
    except ManifestError as err:
        # Changing the type can make the (unchanged) entrypoint wrong for the new kind.
        allowed = {changed} | ({"plugin.entrypoint"} if changed == "plugin.type" else set())
        assert err.field in allowed or (
            "config" in doc and err.field.startswith("config")), (err.field, changed, str(err))


@given(valid_documents())
@settings(max_examples=300, deadline=None)
def test_valid_documents_parse_and_keep_their_values(shared_plugin_dir: Path,
                                                     doc: dict[str, Any]) -> None:
    plugin = parse_manifest(to_toml(doc), path=shared_plugin_dir / "plugin.toml",
                            root=shared_plugin_dir)
    p = doc["plugin"]
    assert plugin.id == p["id"]
    assert plugin.version == p["version"]
    assert plugin.type is LoaderType(p["type"])
    assert plugin.entrypoint.is_relative_to(shared_plugin_dir.resolve())
    assert plugin.name == p.get("name")
    assert plugin.description == p.get("description")
    assert plugin.methods == (tuple(p["methods"]) if "methods" in p else None)
    assert plugin.sha256 == (p["sha256"].removeprefix("sha256:") if "sha256" in p else None)
    assert (plugin.protocol, plugin.grpc) == (Protocol.JSONRPC, None)
    assert plugin.config == doc.get("config", {})
    s = doc.get("sandbox", {})
    assert plugin.sandbox.profile == s.get("profile")
    assert plugin.sandbox.network_allowed == s.get("network_allowed", False)
    assert plugin.sandbox.allowed_hosts == tuple(s.get("allowed_hosts", ()))
    assert [str(g) for g in plugin.sandbox.allowed_paths] == [
        g.removesuffix(":ro").rstrip("/") for g in s.get("allowed_paths", ())]
    assert plugin.sandbox.denied_paths == tuple(s.get("denied_paths", ()))
    if isinstance(s.get("memory_limit"), int):
        assert plugin.sandbox.memory_limit == s["memory_limit"]
    if isinstance(s.get("cpu_limit"), (int, float)):
        assert plugin.sandbox.cpu_limit == float(s["cpu_limit"])
    if isinstance(s.get("timeout"), (int, float)):
        assert plugin.sandbox.timeout == float(s["timeout"])


# -- properties of the [grpc] table -----------------------------------------------------

SERVICES = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}(\.[A-Za-z_][A-Za-z0-9_]{0,10}){0,4}",
                         fullmatch=True)
COOKIE_KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,127}", fullmatch=True).filter(
    lambda k: k not in RESERVED_KEYS and not k.startswith("SANDBOXER_"))
COOKIE_VALUES = st.text(st.characters(blacklist_characters="\0\n", blacklist_categories=("Cs",)),
                        min_size=1, max_size=300)


@given(service=SERVICES, key=COOKIE_KEYS, value=COOKIE_VALUES,
       version=st.integers(1, 2**31 - 1),
       proto=st.sampled_from([["kv.proto"], ["kv.pb"], ["api/v1/kv.proto", "kv.proto"]]))
@settings(max_examples=200, deadline=None)
def test_valid_grpc_tables_keep_their_values(shared_grpc_dir: Path, service: str, key: str,
                                             value: str, version: int, proto: list[str]) -> None:
    text = grpc_manifest(grpc={"proto": proto, "service": service},
                         handshake={"protocol_version": version, "magic_cookie_key": key,
                                    "magic_cookie_value": value})
    plugin = parse_manifest(text, path=shared_grpc_dir / "plugin.toml", root=shared_grpc_dir)
    assert plugin.grpc == GrpcSpec(tuple((shared_grpc_dir / p).resolve() for p in proto),
                                   service, GoPluginHandshake(version, key, value))


PLAUSIBLE_GRPC = {
    "proto": _maybe_bad(st.sampled_from([["kv.proto"], ["kv.pb"], ["api/v1/kv.proto"]]),
                        [], ["passwd.proto"], ["../outside/kv.proto"], ["kv.proto", "kv.pb"],
                        ["inlink.proto"], ["fifo.proto"], ["/etc/passwd"]),
    "service": _maybe_bad(SERVICES, "", "proto..KV", "/proto.KV/Get"),
    "handshake": _maybe_bad(st.fixed_dictionaries(
        {"protocol_version": st.integers(1, 2**31 - 1), "magic_cookie_key": COOKIE_KEYS,
         "magic_cookie_value": COOKIE_VALUES}),
        {"protocol_version": 0}, {**HANDSHAKE, "magic_cookie_key": "PATH"},
        {**HANDSHAKE, "extra": 1}),
}


@given(key=st.sampled_from(sorted(PLAUSIBLE_GRPC)), data=st.data())
@settings(max_examples=200, deadline=None)
def test_a_grpc_error_names_the_field_that_is_wrong(shared_grpc_dir: Path, key: str,
                                                    data: st.DataObject) -> None:
    value = data.draw(PLAUSIBLE_GRPC[key])
    text = grpc_manifest(grpc={key: value})
    try:
        parse_manifest(text, path=shared_grpc_dir / "plugin.toml", root=shared_grpc_dir)
    except ManifestError as err:
        assert err.field == f"grpc.{key}" or err.field.startswith(f"grpc.{key}."), (
            err.field, key, str(err))

