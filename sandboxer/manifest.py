"""The plugin manifest (``plugin.toml``) and the plain types that describe a plugin.

Parsing happens once, here, at the edge: every field is checked and a bad one raises
``ManifestError`` naming the file, the dotted field and what was expected. Everything past
this module trusts a ``Plugin``. Nothing here imports or runs plugin code.

A bare ``.py``, ``.wasm`` or ``.so`` file is a plugin without a manifest (default profile,
id from the file name, version 0.0.0); an executable always needs a manifest.

An external plugin speaks sandboxer's JSON-RPC (``protocol = "jsonrpc"``, the default) or is an
unmodified HashiCorp go-plugin gRPC plugin (``protocol = "grpc"``), described by the
``[grpc]`` table: its proto files or descriptor sets, its service and go-plugin's handshake.
The proto files are read by the supervisor, outside any sandbox, so they are checked more
strictly than the entrypoint: regular files, never through a link.
"""

from __future__ import annotations

import enum
import hashlib
import math
import os
import re
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _digest
from ._hooks import METHOD_RE
from ._plugin_id import ID_RE
from ._restart import RestartMode, parse_restart
from ._units import parse_duration, parse_size
from ._wasm_magic import WASM_MAGIC
from .errors import IntegrityError, ManifestError
from .sandbox import profiles as _profiles
from .sandbox.policy import (
    SandboxRequest,
    parse_cpu,
    parse_denied_path,
    parse_fuel,
    parse_host_pattern,
    parse_path_grant,
)

__all__ = [
    "LoaderType",
    "Protocol",
    "GoPluginHandshake",
    "GrpcSpec",
    "Plugin",
    "load_plugin",
    "parse_manifest",
    "verify_integrity",
    "MANIFEST_NAME",
    "RESERVED_ENV_NAMES",
]

MANIFEST_NAME = "plugin.toml"
MAX_MANIFEST_BYTES = 1 << 20

# semver.org's recommended expression (2.0.0), anchored by fullmatch.
SEMVER_RE = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?"
)
SHA256_RE = re.compile(r"(?:sha256:)?([0-9a-f]{64})")

ELF_MAGIC = b"\x7fELF"
# A protobuf full name: identifiers joined by dots ("proto.KV", "plugin.v1.Thing").
PROTO_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
PROTO_SOURCE_SUFFIX = ".proto"
DESCRIPTOR_SET_SUFFIXES = (".pb", ".protoset")
# Environment names the supervisor or go-plugin set in a plugin's environment. A magic cookie
# under one of these names would overwrite that setting, or be overwritten by it; either way
# the plugin would not see what its author meant (a cookie named LD_PRELOAD would even load a
# library into the plugin before main). SANDBOXER_* names are refused as a prefix.
RESERVED_ENV_NAMES = frozenset(
    {
        # go-plugin's client and server
        "PLUGIN_MIN_PORT",
        "PLUGIN_MAX_PORT",
        "PLUGIN_PROTOCOL_VERSIONS",
        "PLUGIN_CLIENT_CERT",
        "PLUGIN_UNIX_SOCKET_DIR",
        "PLUGIN_UNIX_SOCKET_GROUP",
        "PLUGIN_MULTIPLEX_GRPC",
        # the sandbox's own environment (sandbox/program.py, sandbox/runtime.py, egress)
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "TERM",
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "PYTHONPATH",
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    }
)
RESERVED_ENV_PREFIX = "SANDBOXER_"
MAX_COOKIE_VALUE_BYTES = 4096
MAX_PROTOCOL_VERSION = 2**31 - 1


class LoaderType(enum.Enum):
    """The four kinds of plugin (DESIGN section 4)."""

    PYTHON = "python"
    NATIVE = "native"
    WASM = "wasm"
    EXTERNAL = "external"


class Protocol(enum.Enum):
    """What an external plugin speaks: sandboxer's JSON-RPC (DESIGN section 7) or go-plugin's
    gRPC (section 7b). Every other kind is ``JSONRPC``."""

    JSONRPC = "jsonrpc"
    GRPC = "grpc"


@dataclass(frozen=True, slots=True)
class GoPluginHandshake:
    """go-plugin's ``HandshakeConfig``: the plugin refuses to start unless the cookie is set
    in its environment, and serves only the protocol versions it was built for."""

    protocol_version: int
    magic_cookie_key: str
    magic_cookie_value: str

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol_version": self.protocol_version,
            "magic_cookie_key": self.magic_cookie_key,
            "magic_cookie_value": self.magic_cookie_value,
        }


@dataclass(frozen=True, slots=True)
class GrpcSpec:
    """The manifest's ``[grpc]`` table.

    ``proto`` are absolute paths inside the plugin directory: ``.proto`` files, or descriptor
    sets (``.pb``/``.protoset``), never both; ``service`` the protobuf full name of the service
    whose methods are the plugin's methods.
    """

    proto: tuple[Path, ...]
    service: str
    handshake: GoPluginHandshake

    def to_json(self) -> dict[str, Any]:
        return {
            "proto": [str(p) for p in self.proto],
            "service": self.service,
            "handshake": self.handshake.to_json(),
        }


@dataclass(frozen=True, slots=True)
class Plugin:
    """A validated plugin manifest, with paths resolved.

    ``root`` is the plugin directory (for a bare file, the file itself); ``entrypoint`` an
    absolute path inside it. ``config`` is the manifest's ``[config]`` table, the defaults handed
    to ``init()``; treat it as read-only. ``grpc`` is set exactly when ``protocol`` is
    ``Protocol.GRPC`` (an external plugin).
    """

    id: str
    version: str
    type: LoaderType
    entrypoint: Path
    root: Path
    name: str | None = None
    description: str | None = None
    methods: tuple[str, ...] | None = None
    sha256: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    sandbox: SandboxRequest = field(default_factory=SandboxRequest)
    manifest_path: Path | None = None
    protocol: Protocol = Protocol.JSONRPC
    grpc: GrpcSpec | None = None
    restart: RestartMode | None = None  # None: the host config's
    # A wasm plugin: "json" (sandboxer's ABI, or a command speaking JSON on stdin/stdout) or
    # "command" (an unmodified WASI program; call("run", [args]) runs it once)
    wasm_mode: str = "json"
    # Not from plugin.toml: the sha256 of the manifest bytes this was parsed from (set by
    # parsing bytes), and the tree checksum (``sha256:<hex>``) this load's files must have:
    # recorded by discovery or hot reload, or vouched for by a registry's signed archive (set
    # by the manager). The sandbox checks both, with ``sha256``, over the bytes it copies.
    # Neither is part of what the manifest says, so neither counts in comparing two.
    manifest_sha256: str | None = field(default=None, compare=False)
    checksum: str | None = field(default=None, compare=False)

    @property
    def is_bare_file(self) -> bool:
        return self.manifest_path is None

    def digests(self) -> list[tuple[str, str, str]]:
        """What vouches for this plugin's files, as ``(path inside root, hex sha256, who)``:
        path "" is the whole tree (a bare file: the file), else a file or directory in it."""
        out: list[tuple[str, str, str]] = []
        if self.checksum is not None:
            out.append(("", self.checksum.removeprefix("sha256:"), "the checksum recorded for it"))
        if not self.is_bare_file:
            if self.sha256 is not None:
                rel = self.entrypoint.relative_to(self.root).as_posix()
                out.append((rel, self.sha256, "the manifest's sha256"))
            manifest = self.manifest_path
            # (a plugin.toml linked from outside the directory is not in the copy to check)
            if self.manifest_sha256 is not None and manifest and manifest.is_relative_to(self.root):
                rel = manifest.relative_to(self.root).as_posix()
                out.append((rel, self.manifest_sha256, "the manifest the supervisor read"))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "version": self.version,
            "type": self.type.value,
            "entrypoint": str(self.entrypoint),
            "root": str(self.root),
            "name": self.name,
            "description": self.description,
            "methods": list(self.methods) if self.methods is not None else None,
            "sha256": self.sha256,
            "config": self.config,
            "manifest": str(self.manifest_path) if self.manifest_path else None,
            "protocol": self.protocol.value,
            "grpc": self.grpc.to_json() if self.grpc is not None else None,
            "restart": self.restart.value if self.restart is not None else None,
            "wasm": {"mode": self.wasm_mode} if self.type is LoaderType.WASM else None,
        }


# -- parsing ---------------------------------------------------------------------------------


class _Fields:
    """Reads one TOML table, remembering the file and table for error messages."""

    def __init__(self, path: str, table: str, data: Any, known: set[str]) -> None:
        self.path, self.table = path, table
        if not isinstance(data, dict):
            raise self.error("", "a table")
        unknown = sorted(set(data) - known)
        if unknown:
            raise self.error(unknown[0], f"no such field (known: {', '.join(sorted(known))})")
        self.data = data

    def error(self, key: str, expected: str) -> ManifestError:
        if not self.table:
            name = key or "(top level)"
        else:
            name = f"{self.table}.{key}" if key else self.table
        return ManifestError(self.path, name, expected)

    def get(
        self, key: str, parse: Callable[[Any], Any], *, required: bool = False, default: Any = None
    ) -> Any:
        if key not in self.data:
            if required:
                raise self.error(key, "a value (this field is required)")
            return default
        try:
            return parse(self.data[key])
        except ValueError as exc:
            raise self.error(key, str(exc)) from None


def _text(limit: int, what: str = "a string") -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str):
            raise ValueError(f"{what}, not {type(value).__name__}")
        if len(value) > limit:
            raise ValueError(f"{what} of at most {limit} characters")
        if "\0" in value:
            raise ValueError(f"{what} without NUL characters")
        return value

    return parse


def _matching(regex: re.Pattern[str], what: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or not regex.fullmatch(value):
            raise ValueError(f"{what}, not {value!r}")
        return value

    return parse


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"true or false, not {value!r}")
    return value


def _list_of(
    parse_item: Callable[[Any], Any], what: str, *, limit: int = 256
) -> Callable[[Any], tuple[Any, ...]]:
    def parse(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ValueError(f"a list of {what}, not {type(value).__name__}")
        if len(value) > limit:
            raise ValueError(f"a list of at most {limit} {what}")
        items = []
        for i, item in enumerate(value):
            try:
                items.append(parse_item(item))
            except ValueError as exc:
                raise ValueError(f"item {i}: {exc}") from None
        if len(set(items)) != len(items):
            raise ValueError(f"a list of {what} without duplicates")
        return tuple(items)

    return parse


def _loader_type(value: Any) -> LoaderType:
    kinds = ", ".join(t.value for t in LoaderType)
    try:
        return LoaderType(value)
    except ValueError:
        raise ValueError(f"one of {kinds}, not {value!r}") from None


def _sha256(value: Any) -> str:
    if not isinstance(value, str) or not SHA256_RE.fullmatch(value):
        raise ValueError(f"64 lower-case hex digits (optionally prefixed sha256:), not {value!r}")
    return SHA256_RE.fullmatch(value).group(1)  # type: ignore[union-attr]


def _method_name(value: Any) -> str:
    if not isinstance(value, str) or not METHOD_RE.fullmatch(value):
        raise ValueError(f"a method name (letters, digits, _), not {value!r}")
    return value


class _ValueAt(ValueError):
    def __init__(self, field: str, expected: str) -> None:
        super().__init__(f"{field}: {expected}")
        self.field, self.expected = field, expected


def _json_value(value: Any, where: str) -> Any:
    """TOML values that JSON can carry; dates and times cannot reach a plugin's init()."""
    if isinstance(value, dict):
        return {k: _json_value(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise _ValueAt(where, "a finite number (JSON has no inf or nan)")
    if isinstance(value, (str, int, float, bool)):
        return value
    raise _ValueAt(
        where,
        f"a JSON value (string, number, boolean, array, table), not a TOML {type(value).__name__}",
    )


def _entrypoint(value: Any, root: Path, kind: LoaderType) -> Path:
    """The entrypoint resolved inside ``root``; links may not lead out of it."""
    if not isinstance(value, str) or not value or "\0" in value or len(value) > 4096:
        raise ValueError("a relative path inside the plugin directory")
    if value.startswith("/") or Path(value).is_absolute():
        raise ValueError(f"a relative path inside the plugin directory, not absolute {value!r}")
    if ".." in Path(value).parts:
        raise ValueError(f"a path inside the plugin directory, without '..', not {value!r}")
    try:
        real_root = root.resolve(strict=True)
        target = (root / value).resolve(strict=True)
    except (OSError, RuntimeError):
        raise ValueError(
            f"an existing file inside the plugin directory; {value!r} does not exist"
        ) from None
    if not target.is_relative_to(real_root):
        raise ValueError(
            f"a path that stays inside the plugin directory; {value!r} leads to {target}"
        )
    if kind is LoaderType.PYTHON:
        if target.is_dir():
            init = target / "__init__.py"
            if not init.is_file():
                raise ValueError(f"a .py file or a package directory; {value!r} has no __init__.py")
            if not init.resolve().is_relative_to(real_root):
                raise ValueError(
                    f"a package whose __init__.py stays inside the plugin "
                    f"directory; {value!r}/__init__.py leads to {init.resolve()}"
                )
        elif not (target.is_file() and target.suffix == ".py"):
            raise ValueError(f"a .py file or a package directory, not {value!r}")
    elif not target.is_file():
        raise ValueError(f"a regular file, not {value!r}")
    elif kind is LoaderType.EXTERNAL and not os.access(target, os.X_OK):
        raise ValueError(f"an executable file; {value!r} is not executable (chmod +x)")
    return target


def _wasm_mode(value: Any) -> str:
    if value not in ("json", "command"):
        raise ValueError(
            f'"json" (sandboxer\'s ABI) or "command" (an unmodified WASI program), not {value!r}'
        )
    return str(value)


def _protocol(value: Any) -> Protocol:
    try:
        return Protocol(value)
    except ValueError:
        raise ValueError(f'"jsonrpc" or "grpc", not {value!r}') from None


def _proto_file(value: Any, root: Path) -> Path:
    """A proto file or descriptor set inside ``root``, reached without following any link.

    Unlike the entrypoint (which runs inside the sandbox), these files are parsed by the
    supervisor itself, so a link is refused even when it stays inside the plugin directory:
    what the supervisor reads is exactly what the directory holds, and what its checksum
    covers."""
    if not isinstance(value, str) or not value or "\0" in value or len(value) > 4096:
        raise ValueError("a relative path inside the plugin directory")
    relative = Path(value)
    if value.startswith("/") or relative.is_absolute():
        raise ValueError(f"a relative path inside the plugin directory, not absolute {value!r}")
    if ".." in relative.parts:
        raise ValueError(f"a path inside the plugin directory, without '..', not {value!r}")
    if relative.suffix not in (PROTO_SOURCE_SUFFIX, *DESCRIPTOR_SET_SUFFIXES):
        raise ValueError(f"a .proto file or a descriptor set (.pb, .protoset), not {value!r}")
    real_root = root.resolve()
    target, mode = real_root, 0
    for part in relative.parts:
        target = target / part
        try:
            mode = target.lstat().st_mode
        except OSError:
            raise ValueError(
                f"an existing file inside the plugin directory; {value!r} does not exist"
            ) from None
        if stat.S_ISLNK(mode):
            link = target.relative_to(real_root)
            raise ValueError(
                f"a regular file reached without symlinks (the supervisor reads it outside the "
                f"sandbox); {value!r} goes through the link {str(link)!r}"
            )
    if not stat.S_ISREG(mode):
        raise ValueError(f"a regular file, not {value!r}")
    return target


def _proto_name(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 512 or not PROTO_NAME_RE.fullmatch(value):
        raise ValueError(
            f'a protobuf service\'s full name, identifiers joined by dots (such as "proto.KV" '
            f'or "plugin.v1.Thing"), not {value!r}'
        )
    return value


def _protocol_version(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"an integer (go-plugin's ProtocolVersion), not {value!r}")
    if not 1 <= value <= MAX_PROTOCOL_VERSION:
        raise ValueError(f"an integer from 1 to {MAX_PROTOCOL_VERSION}, not {value}")
    return value


def _cookie_key(value: Any) -> str:
    if not isinstance(value, str) or not ENV_NAME_RE.fullmatch(value):
        raise ValueError(
            "an environment variable name (letters, digits and _, not starting with a digit, "
            f"at most 128 characters), not {value!r}"
        )
    if value in RESERVED_ENV_NAMES or value.startswith(RESERVED_ENV_PREFIX):
        raise ValueError(
            f"a name the plugin's environment does not already use; sandboxer or go-plugin set "
            f"{value!r} themselves (reserved: {RESERVED_ENV_PREFIX}*, "
            f"{', '.join(sorted(RESERVED_ENV_NAMES))})"
        )
    return value


def _cookie_value(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"a non-empty string, not {value!r}")
    if "\0" in value or "\n" in value:
        raise ValueError("a string without NUL or newline characters (it is an environment value)")
    if len(value.encode("utf-8")) > MAX_COOKIE_VALUE_BYTES:
        raise ValueError(f"a string of at most {MAX_COOKIE_VALUE_BYTES} bytes in UTF-8")
    return value


def _grpc_spec(where: str, data: Any, root: Path) -> GrpcSpec:
    """The ``[grpc]`` table of a ``protocol = "grpc"`` plugin."""
    g = _Fields(where, "grpc", data, _GRPC_FIELDS)
    proto = g.get("proto", _list_of(lambda v: _proto_file(v, root), "proto files"), required=True)
    if not proto:
        raise g.error("proto", "a non-empty list of .proto files or descriptor sets")
    if len({path.suffix == PROTO_SOURCE_SUFFIX for path in proto}) > 1:
        raise g.error(
            "proto", ".proto files or descriptor sets (.pb, .protoset), not a mix of the two"
        )
    service = g.get("service", _proto_name, required=True)
    if "handshake" not in g.data:
        raise g.error(
            "handshake",
            "a [grpc.handshake] table (go-plugin's HandshakeConfig: protocol_version, "
            "magic_cookie_key, magic_cookie_value)",
        )
    h = _Fields(where, "grpc.handshake", g.data["handshake"], _HANDSHAKE_FIELDS)
    handshake = GoPluginHandshake(
        protocol_version=h.get("protocol_version", _protocol_version, required=True),
        magic_cookie_key=h.get("magic_cookie_key", _cookie_key, required=True),
        magic_cookie_value=h.get("magic_cookie_value", _cookie_value, required=True),
    )
    return GrpcSpec(proto=proto, service=service, handshake=handshake)


_PLUGIN_FIELDS = {
    "id",
    "version",
    "type",
    "protocol",
    "entrypoint",
    "name",
    "description",
    "methods",
    "sha256",
    "restart",
}
_GRPC_FIELDS = {"proto", "service", "handshake"}
_HANDSHAKE_FIELDS = {"protocol_version", "magic_cookie_key", "magic_cookie_value"}
_SANDBOX_FIELDS = {
    "profile",
    "memory_limit",
    "cpu_limit",
    "timeout",
    "network_allowed",
    "allowed_hosts",
    "allowed_paths",
    "denied_paths",
    "fuel",
}


def parse_manifest(text: str | bytes, *, path: str | os.PathLike[str], root: Path) -> Plugin:
    """Parse and validate a manifest's text; ``root`` is the plugin directory."""
    where = str(path)
    manifest_sha256 = None
    if isinstance(text, bytes):
        manifest_sha256 = hashlib.sha256(text).hexdigest()
        if len(text) > MAX_MANIFEST_BYTES:
            raise ManifestError(where, "(file)", f"at most {MAX_MANIFEST_BYTES} bytes")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(
                where, "(file)", f"UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(where, "(file)", f"valid TOML ({exc})") from None
    except RecursionError:
        raise ManifestError(where, "(file)", "TOML nested less deeply") from None
    top = _Fields(where, "", data, {"plugin", "config", "sandbox", "grpc", "wasm"})
    if "plugin" not in data:
        raise ManifestError(where, "plugin", "a [plugin] table")
    p = _Fields(where, "plugin", data["plugin"], _PLUGIN_FIELDS)
    plugin_id = p.get(
        "id",
        _matching(
            ID_RE,
            "an id of lower-case letters, digits, '.', '_' "
            "or '-', starting with a letter or digit, at most 128 "
            "characters",
        ),
        required=True,
    )
    version = p.get(
        "version", _matching(SEMVER_RE, 'a semantic version such as "1.2.0"'), required=True
    )
    kind = p.get("type", _loader_type, required=True)
    protocol = p.get("protocol", _protocol, default=Protocol.JSONRPC)
    if protocol is Protocol.GRPC and kind is not LoaderType.EXTERNAL:
        raise p.error(
            "protocol",
            f'"jsonrpc" for a {kind.value} plugin: protocol = "grpc" is only for '
            'type = "external" (a go-plugin executable)',
        )
    entrypoint = p.get("entrypoint", lambda v: _entrypoint(v, root, kind), required=True)
    methods = p.get("methods", _list_of(_method_name, "method names"))
    if methods is not None and not methods:
        raise p.error("methods", "a non-empty list of method names (omit it to expose all)")
    grpc = None
    if protocol is Protocol.GRPC:
        if "grpc" not in data:
            raise top.error(
                "grpc",
                'a [grpc] table with proto, service and [grpc.handshake] (protocol = "grpc" '
                "needs it)",
            )
        grpc = _grpc_spec(where, data["grpc"], root)
    elif "grpc" in data:
        raise top.error(
            "grpc",
            '[grpc] is for protocol = "grpc"; set plugin.protocol = "grpc" or remove the table',
        )

    wasm_mode = "json"
    if "wasm" in data:
        if kind is not LoaderType.WASM:
            raise top.error("wasm", f'[wasm] is for type = "wasm" plugins, not {kind.value}')
        w = _Fields(where, "wasm", data["wasm"], {"mode"})
        wasm_mode = w.get("mode", _wasm_mode, default="json")

    config: dict[str, Any] = {}
    if "config" in data:
        if not isinstance(data["config"], dict):
            raise top.error("config", "a table")
        try:
            config = _json_value(data["config"], "config")
        except _ValueAt as exc:
            raise ManifestError(where, exc.field, exc.expected) from None

    s = _Fields(where, "sandbox", data.get("sandbox", {}), _SANDBOX_FIELDS)
    sandbox = SandboxRequest(
        profile=s.get(
            "profile", _matching(_profiles.NAME_RE, 'a profile name such as "default" or "strict"')
        ),
        memory_limit=s.get("memory_limit", parse_size),
        cpu_limit=s.get("cpu_limit", parse_cpu),
        timeout=s.get("timeout", parse_duration),
        network_allowed=s.get("network_allowed", _boolean, default=False),
        allowed_hosts=s.get("allowed_hosts", _list_of(parse_host_pattern, "hosts"), default=()),
        allowed_paths=s.get("allowed_paths", _list_of(parse_path_grant, "paths"), default=()),
        denied_paths=s.get("denied_paths", _list_of(parse_denied_path, "paths"), default=()),
        fuel=s.get("fuel", parse_fuel),
    )
    if sandbox.allowed_hosts and not sandbox.network_allowed:
        raise s.error("allowed_hosts", "empty unless network_allowed = true")
    granted = [g.path for g in sandbox.allowed_paths]
    if len(set(granted)) != len(granted):
        raise s.error("allowed_paths", "each path once (it appears with both :ro and :rw)")

    return Plugin(
        id=plugin_id,
        version=version,
        type=kind,
        entrypoint=entrypoint,
        root=root.resolve(),
        name=p.get("name", _text(200, "a name")),
        description=p.get("description", _text(4000, "a description")),
        methods=methods,
        sha256=p.get("sha256", _sha256),
        config=config,
        sandbox=sandbox,
        manifest_path=Path(path).resolve() if Path(path).exists() else Path(path),
        protocol=protocol,
        grpc=grpc,
        restart=p.get("restart", parse_restart),
        wasm_mode=wasm_mode,
        manifest_sha256=manifest_sha256,
    )


def _bare_kind(path: Path) -> LoaderType:
    where = str(path)
    if path.suffix == ".py":
        return LoaderType.PYTHON
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ManifestError(where, "(file)", f"a readable file ({exc.strerror})") from None
    if path.suffix == ".wasm":
        if head != WASM_MAGIC:
            raise ManifestError(
                where, "(file)", "a WebAssembly module (it lacks the \\0asm magic bytes)"
            )
        return LoaderType.WASM
    if path.suffix == ".so" or ".so." in path.name:
        if head != ELF_MAGIC:
            raise ManifestError(where, "(file)", "an ELF shared object")
        return LoaderType.NATIVE
    raise ManifestError(
        where,
        MANIFEST_NAME,
        "a plugin.toml beside it: only .py, .wasm and "
        ".so files load without a manifest (executables need one)",
    )


def _bare_id(path: Path) -> str:
    stem = path.name.split(".")[0].lower().replace(" ", "-")
    candidate = re.sub(r"[^a-z0-9._-]", "-", stem).strip("-._")[:128]
    if not candidate or not ID_RE.fullmatch(candidate):
        raise ManifestError(
            str(path),
            "plugin.id",
            "a file name from which an id can be made "
            "(letters or digits); add a plugin.toml with an explicit id",
        )
    return candidate


def load_plugin(path: str | os.PathLike[str]) -> Plugin:
    """The plugin at ``path``: a directory with plugin.toml, a plugin.toml, or a bare file."""
    target = Path(path)
    if target.is_dir():
        manifest = target / MANIFEST_NAME
        if not manifest.is_file():
            raise ManifestError(str(target), MANIFEST_NAME, "a plugin.toml in the plugin directory")
    elif target.name == MANIFEST_NAME:
        manifest, target = target, target.parent
    elif target.is_file():
        kind = _bare_kind(target)
        resolved = target.resolve()
        return Plugin(
            id=_bare_id(target), version="0.0.0", type=kind, entrypoint=resolved, root=resolved
        )
    else:
        raise ManifestError(str(target), "(path)", "an existing plugin directory or file")
    try:
        raw = manifest.read_bytes()
    except OSError as exc:
        raise ManifestError(str(manifest), "(file)", f"a readable file ({exc.strerror})") from None
    return parse_manifest(raw, path=manifest, root=target)


def verify_integrity(plugin: Plugin) -> None:
    """Check the manifest's ``sha256`` against the entrypoint (IntegrityError on mismatch).

    For a file entrypoint it is the file's digest; for a python package directory it is the
    tree checksum of that directory (``sandboxer.checksum``), without the ``sha256:`` prefix.
    """
    if plugin.sha256 is None:
        return
    if plugin.entrypoint.is_dir():
        actual = _digest.tree_checksum(plugin.entrypoint).removeprefix("sha256:")
    else:
        actual = _digest.file_sha256(plugin.entrypoint)
    if actual != plugin.sha256:
        raise IntegrityError(
            f"plugin {plugin.id}: entrypoint {plugin.entrypoint} has sha256 {actual}, but the "
            f"manifest says {plugin.sha256}; the file changed after the manifest was written, "
            "or was tampered with",
            plugin_id=plugin.id,
        )
