"""The host's configuration: sandboxer.toml, or a ``HostConfig`` built in code.

``HostConfig`` is composed of one part per concern, each a frozen dataclass its readers can
name on its own: the sandbox's policy (``sandbox.policy.SandboxPolicy``: ceilings, path roots,
profiles, network, fallbacks) and, here, registry trust, supervision timings, the wasm pool, the
warm sandboxes and the egress proxy's tuning. The parts are combined as bases of one dataclass
so that the file stays one flat ``[host]`` / ``[limits]`` table and code keeps writing
``HostConfig(max_memory_limit=..., wasm_instances=2)``.

Loaded from ``$SANDBOXER_CONFIG`` or ``/etc/sandboxer/sandboxer.toml`` (``HostConfig.load()``).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._restart import parse_restart
from ._tenants import Tenant, parse_tenants
from ._trusted_keys import TrustedKey, parse_trusted_keys
from ._units import parse_duration, parse_size
from .errors import ConfigError
from .rpc import DEFAULT_MAX_FRAME
from .sandbox.policy import (
    HOST_KEYS,
    LIMIT_KEYS,
    SandboxPolicy,
    parse_bool,
    parse_denied_path,
    parse_profile_list,
)

__all__ = [
    "HostConfig",
    "RegistryTrust",
    "Supervision",
    "WasmPool",
    "SandboxWarmPool",
    "EgressTuning",
    "DEFAULT_CONFIG_PATH",
]

DEFAULT_CONFIG_PATH = "/etc/sandboxer/sandboxer.toml"


@dataclass(frozen=True)
class RegistryTrust:
    """Where plugins are fetched from and whose signatures are trusted."""

    registry: str | None = None  # a registry directory or http(s) base URL
    # minisign public keys a registry's index and plugins must be signed with, each trusted for
    # every plugin id or for the ids its patterns cover; a plain str is a key file for any id
    trusted_keys: tuple[TrustedKey | str, ...] = ()
    cache_dir: str | None = None  # fetched plugins; default $XDG_CACHE_HOME/sandboxer


@dataclass(frozen=True)
class Supervision:
    """How the supervisor waits on plugins: handshake, drain, health checks, frame size; and
    what it does when one fails on its own (_restart.py): ``restart`` ("never" or
    "on-failure", for plugins whose manifest names none), the backoff before a restart
    (doubling from ``restart_backoff`` up to ``restart_backoff_max``), and the quarantine
    (``quarantine_after`` failures within ``quarantine_window`` seconds: no more restarts)."""

    drain_timeout: float = 10.0
    handshake_timeout: float = 10.0
    health_interval: float = 30.0
    health_failures: int = 3
    max_frame: int = DEFAULT_MAX_FRAME
    restart: str = "never"
    restart_backoff: float = 0.5
    restart_backoff_max: float = 30.0
    quarantine_after: int = 5
    quarantine_window: float = 600.0


@dataclass(frozen=True)
class WasmPool:
    """Instances per wasm plugin generation (calls beyond them queue)."""

    wasm_instances: int = 1


@dataclass(frozen=True)
class SandboxWarmPool:
    """Warm sandboxes (sandbox/pool.py): how many wait per shape (0: none; every plugin
    starts cold); which shapes: that of a python plugin asking for nothing but each profile
    of ``warm_profiles``, and (``warm_learn``) each shape a load started cold; the memory all
    waiting sandboxes may use, and the host's available memory below which none is made."""

    warm_sandboxes: int = 2
    warm_profiles: tuple[str, ...] = ("default",)
    warm_learn: bool = True
    warm_memory_budget: int = 128 << 20
    warm_min_available: int = 512 << 20


@dataclass(frozen=True)
class EgressTuning:
    """The egress proxy (network_allowed with allowed_hosts): names it resolves from this
    hosts file before DNS; connections one plugin may hold at once; how long a client has to
    send its request; when an idle tunnel is closed; how long a dial may take; extra CAs
    wasm's http_request trusts."""

    egress_hosts_file: str | None = None
    egress_max_connections: int = 32
    egress_header_timeout: float = 10.0
    egress_idle_timeout: float = 300.0
    egress_connect_timeout: float = 10.0
    egress_ca_file: str | None = None


@dataclass(frozen=True)
class Tenancy:
    """The daemon's tenants (``[tenants.NAME]``, _tenants.py); a library ignores them."""

    tenants: tuple[Tenant, ...] = ()


@dataclass(frozen=True)
class HostConfig(
    SandboxPolicy, RegistryTrust, Supervision, WasmPool, SandboxWarmPool, EgressTuning, Tenancy
):
    """The host's policy and settings: every part above, and the file it came from."""

    source: str = ""

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None) -> HostConfig:
        """Read the host config: ``path``, else ``$SANDBOXER_CONFIG``, else the system file.

        A missing system file gives the defaults; a missing file named explicitly (argument or
        environment) is an error, since the operator clearly meant one.
        """
        explicit = path if path is not None else os.environ.get("SANDBOXER_CONFIG")
        target = Path(explicit) if explicit else Path(DEFAULT_CONFIG_PATH)
        try:
            raw = target.read_bytes()
        except FileNotFoundError:
            if explicit:
                raise ConfigError(str(target), "(file)", "an existing host config file") from None
            return cls()
        except OSError as exc:
            raise ConfigError(str(target), "(file)", f"a readable file ({exc.strerror})") from exc
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
            raise ConfigError(str(target), "(file)", f"valid UTF-8 TOML ({exc})") from exc
        return cls.from_mapping(data, source=str(target))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "") -> HostConfig:
        """Build from the ``[host]``, ``[limits]`` and ``[tenants]`` tables of a parsed
        sandboxer.toml."""
        unknown = set(data) - {"host", "limits", "tenants"}
        if unknown:
            raise ConfigError(
                source, sorted(unknown)[0], "one of the tables [host], [limits], [tenants]"
            )
        tables = {table: data.get(table, {}) for table in ("host", "limits")}
        for table, given in tables.items():
            if not isinstance(given, dict):
                raise ConfigError(source, table, "a table")
        values: dict[str, Any] = {"source": source}
        for table, parsers in (("host", _HOST_KEYS), ("limits", LIMIT_KEYS)):
            for key, value in tables[table].items():
                name = f"{table}.{key}"
                if key not in parsers:
                    raise ConfigError(source, name, f"one of {', '.join(sorted(parsers))}")
                try:
                    values[key] = parsers[key](value)
                except ValueError as exc:
                    raise ConfigError(source, name, str(exc)) from None
        if "tenants" in data:
            host = SandboxPolicy(**{k: v for k, v in values.items() if k in _POLICY_FIELDS})
            values["tenants"] = parse_tenants(data["tenants"], host, ConfigError, source)
        return cls(**values)


def _parse_trusted_keys(value: object) -> tuple[TrustedKey, ...]:
    """``["/k.pub", {key = "/acme.pub", ids = ["acme.*", "acme"]}]`` (see _trusted_keys)."""
    return parse_trusted_keys(value, parse_path=parse_denied_path)


def _parse_registry(value: object) -> str:
    if not isinstance(value, str) or not (value.startswith(("/", "http://", "https://"))):
        raise ValueError(f"an absolute directory or an http(s) URL, not {value!r}")
    return value


def _whole(low: int, high: int, what: str) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"{what} between {low} and {high}, not {value!r}")
        return value

    return parse


_POLICY_FIELDS = {f.name for f in dataclasses.fields(SandboxPolicy)}

_HOST_KEYS: dict[str, Callable[[Any], Any]] = {
    **HOST_KEYS,
    "registry": _parse_registry,
    "trusted_keys": _parse_trusted_keys,
    "cache_dir": parse_denied_path,
    "drain_timeout": parse_duration,
    "handshake_timeout": parse_duration,
    "health_interval": parse_duration,
    "health_failures": _whole(1, 1000, "a whole number of failed checks"),
    "max_frame": parse_size,
    "restart": lambda value: parse_restart(value).value,
    "restart_backoff": parse_duration,
    "restart_backoff_max": parse_duration,
    "quarantine_after": _whole(1, 1000, "a whole number of failures"),
    "quarantine_window": parse_duration,
    "wasm_instances": _whole(1, 64, "a number of instances per wasm plugin"),
    "warm_sandboxes": _whole(0, 64, "a number of warm sandboxes per shape"),
    "warm_profiles": parse_profile_list,
    "warm_learn": parse_bool,
    "warm_memory_budget": parse_size,
    "warm_min_available": parse_size,
    "egress_hosts_file": parse_denied_path,
    "egress_max_connections": _whole(1, 4096, "a number of connections"),
    "egress_header_timeout": parse_duration,
    "egress_idle_timeout": parse_duration,
    "egress_connect_timeout": parse_duration,
    "egress_ca_file": parse_denied_path,
}
