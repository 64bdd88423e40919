"""Sandbox policy: what a plugin asks for, what the host allows, and what is enforced.

A plugin's ``[sandbox]`` table is a ``SandboxRequest``. The host's ``SandboxPolicy`` (part of
``sandboxer.config.HostConfig``) sets the ceilings and the path roots a plugin may be given.
``effective_config()`` clamps the request by the policy on top of the profile's defaults, and
the result, a ``SandboxConfig``, is the one thing the launcher enforces. An explicit
``SandboxConfig`` handed to ``load()`` by the host program replaces the computed one: that is
the operator speaking, not the plugin.

This module only computes; it never touches the kernel. It must not import from loaders/ or
the manager, so the sandbox stays usable on its own.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._units import format_duration, format_size, parse_duration, parse_size
from ..errors import PluginLoadError
from . import profiles as _profiles
from .egress.rules import AllowList, parse_host_pattern

__all__ = [
    "path_under",
    "PathGrant",
    "SandboxRequest",
    "SandboxConfig",
    "SandboxPolicy",
    "HOST_KEYS",
    "LIMIT_KEYS",
    "parse_denied_path",
    "effective_config",
    "parse_path_grant",
    "parse_host_pattern",
    "parse_profile_list",
    "parse_bool",
    "SETUP_TIMEOUT",
    "KILL_GRACE",
]


@dataclass(frozen=True, slots=True)
class PathGrant:
    """A host path made visible to the plugin: read-only unless ``writable``.

    ``root`` is the host policy's path root the grant was checked against: the path is
    opened beneath that root through no symbolic link (``sandbox/paths.py``). A grant without
    one is the operator's (an explicit ``SandboxConfig``, the CLI's ``--allow-path``), opened
    from "/" through no link."""

    path: str
    writable: bool = False
    root: str | None = None

    def __str__(self) -> str:
        return f"{self.path}:rw" if self.writable else self.path


def _check_abs_path(path: str) -> str:
    if not path or "\0" in path:
        raise ValueError("a non-empty absolute path without NUL bytes")
    if not path.startswith("/"):
        raise ValueError(f"an absolute path, not {path!r}")
    trimmed = path.rstrip("/") or "/"
    if os.path.normpath(trimmed) != trimmed or trimmed.startswith("//"):
        raise ValueError(f"a normalised path (no '.', '..' or '//'), not {path!r}")
    return trimmed


def parse_path_grant(text: object) -> PathGrant:
    """``"/data"`` (read-only), ``"/data:ro"`` or ``"/data:rw"``."""
    if not isinstance(text, str):
        raise ValueError(f'a path string "PATH" or "PATH:rw", not {type(text).__name__}')
    writable = False
    path = text
    if text.endswith(":rw"):
        path, writable = text[:-3], True
    elif text.endswith(":ro"):
        path = text[:-3]
    return PathGrant(_check_abs_path(path), writable)


def parse_denied_path(text: object) -> str:
    if not isinstance(text, str):
        raise ValueError(f"an absolute path string, not {type(text).__name__}")
    return _check_abs_path(text)


@dataclass(frozen=True, slots=True)
class SandboxRequest:
    """A plugin's ``[sandbox]`` table: what it asks for. ``None`` means "the profile's default"."""

    profile: str | None = None
    memory_limit: int | None = None
    cpu_limit: float | None = None
    timeout: float | None = None
    network_allowed: bool = False
    allowed_hosts: tuple[str, ...] = ()
    allowed_paths: tuple[PathGrant, ...] = ()
    denied_paths: tuple[str, ...] = ()
    fuel: int | None = None


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """The sandbox the launcher enforces (the spec's SandboxConfig, plus the profile's limits).

    ``enabled=False`` means the plugin runs in the supervisor's process: allowed only for
    python and native plugins, and only when the host policy allows unsandboxed plugins.
    """

    enabled: bool = True
    profile: str = "default"
    allowed_paths: tuple[PathGrant, ...] = ()
    denied_paths: tuple[str, ...] = ()
    network_allowed: bool = False
    allowed_hosts: tuple[str, ...] = ()
    memory_limit: int = 256 << 20
    cpu_limit: float = 1.0
    timeout: float = 30.0
    pids_limit: int = 128
    tmp_size: int = 64 << 20
    nofile: int = 1024
    fuel: int | None = None  # wasm only: instructions' fuel per call; None = unmetered

    def replace(self, **changes: Any) -> SandboxConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """The spec's camelCase keys, with sizes and durations in their human spelling."""
        return {
            "enabled": self.enabled,
            "profile": self.profile,
            "allowedPaths": [str(g) for g in self.allowed_paths],
            "deniedPaths": list(self.denied_paths),
            "networkAllowed": self.network_allowed,
            "allowedHosts": list(self.allowed_hosts),
            "memoryLimit": format_size(self.memory_limit),
            "cpuLimit": self.cpu_limit,
            "timeout": format_duration(self.timeout),
            "pidsLimit": self.pids_limit,
            "tmpSize": format_size(self.tmp_size),
            "nofile": self.nofile,
            "fuel": self.fuel,
        }


# The sandbox launcher's steps, from spawn to exec: SandboxPolicy's default and launch's.
SETUP_TIMEOUT = 10.0
# How long a program past its deadline (``sandboxer exec --timeout``) has between SIGTERM and
# SIGKILL: a short grace, enough to flush and exit, not to go on working.
KILL_GRACE = 2.0


@dataclass(frozen=True)
class SandboxPolicy:
    """The host's sandbox policy: ceilings, path roots, profiles, network, fallbacks.

    Every limit a plugin requests is clamped to the ``max_*`` ceilings; a path it requests must
    lie under one of ``path_roots``. Read from sandboxer.toml's ``[host]`` and ``[limits]``
    tables as part of ``sandboxer.config.HostConfig`` (the keys in ``HOST_KEYS`` and
    ``LIMIT_KEYS``).
    """

    allow_unsandboxed: bool = True
    allow_full_network: bool = False
    # The hosts a plugin's manifest may ask for (its allowed_hosts must fall inside): none by
    # default, so that only the operator decides what a plugin can reach.
    allowed_hosts: tuple[str, ...] = ()
    default_profile: str = "default"
    # The profiles a manifest may pick; None: the default profile and those no wider than it.
    allowed_profiles: tuple[str, ...] | None = None
    path_roots: tuple[str, ...] = ()
    max_memory_limit: int | None = None
    max_cpu_limit: float | None = None
    max_timeout: float | None = None
    max_pids: int | None = None
    max_fuel: int | None = None
    setup_timeout: float = SETUP_TIMEOUT
    fallbacks: tuple[str, ...] = ()
    # Who files a plugin writes into a writable grant belong to on the host (uid, gid): None,
    # each grant's own owner (an idmapped mount; sandbox/idmap.py).
    grant_owner: tuple[int, int] | None = None
    profile_dirs: tuple[str, ...] = field(default_factory=tuple)


def parse_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"true or false, not {value!r}")
    return value


def _parse_profile_name(value: object) -> str:
    if not isinstance(value, str) or not _profiles.NAME_RE.fullmatch(value):
        raise ValueError(f'a profile name such as "default", not {value!r}')
    return value


def parse_profile_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError('a list of profile names such as ["default", "strict"]')
    return tuple(_parse_profile_name(v) for v in value)


def _parse_host_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError('a list of hosts such as ["example.com:443", "*.example.org"]')
    return tuple(parse_host_pattern(v) for v in value)


def _parse_path_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError("a list of absolute paths")
    return tuple(parse_denied_path(v) for v in value)


# Named fallbacks a host may opt in to when it cannot enforce something (DESIGN section 6).
# "rlimit": no cgroup can be made (rootless without delegation): memory is limited by
# RLIMIT_AS instead; CPU quota, pids limit and OOM accounting are then not enforced.
# "rw-without-idmap": a writable grant on a filesystem that cannot be idmapped is mounted as
# it is: the plugin writes as its own host uid (the grant must be writable by it).
FALLBACKS = frozenset({"rlimit", "rw-without-idmap"})


def _parse_owner(value: object) -> tuple[int, int]:
    parts = value.split(":") if isinstance(value, str) else []
    if len(parts) != 2 or not all(p.isdigit() and int(p) < 1 << 32 - 1 for p in parts):
        raise ValueError(f'"UID:GID" (numbers), such as "1000:1000", not {value!r}')
    return int(parts[0]), int(parts[1])


def _parse_fallbacks(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(v in FALLBACKS for v in value):
        raise ValueError(f"a list of fallback names from {sorted(FALLBACKS)}, not {value!r}")
    return tuple(value)


def parse_cpu(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"a number of CPUs such as 0.5 or 2, not {value!r}")
    if not 0.01 <= value <= 1024:  # compared before float(): a huge TOML int cannot overflow
        raise ValueError(f"a number of CPUs between 0.01 and 1024, not {value!r}")
    return float(value)


def parse_fuel(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 1 << 63:
        raise ValueError(
            f"a whole amount of fuel (wasm instructions) per call, from 1 to 2**63-1, not {value!r}"
        )
    return value


def parse_pids(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 22:
        raise ValueError(f"a whole number of processes between 1 and 4194304, not {value!r}")
    return value


# sandboxer.toml's keys for the sandbox policy: [host] and [limits].
HOST_KEYS: dict[str, Callable[[Any], Any]] = {
    "allow_unsandboxed": parse_bool,
    "allow_full_network": parse_bool,
    "allowed_hosts": _parse_host_list,
    "default_profile": _parse_profile_name,
    "allowed_profiles": parse_profile_list,
    "path_roots": _parse_path_list,
    "profile_dirs": _parse_path_list,
    "setup_timeout": parse_duration,
    "fallbacks": _parse_fallbacks,
    "grant_owner": _parse_owner,
}
LIMIT_KEYS: dict[str, Callable[[Any], Any]] = {
    "max_memory_limit": parse_size,
    "max_cpu_limit": parse_cpu,
    "max_timeout": parse_duration,
    "max_pids": parse_pids,
    "max_fuel": parse_fuel,
}


def path_under(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies below it (lexically: both normalised)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def _refuse(plugin_id: str | None, message: str) -> PluginLoadError:
    return PluginLoadError(f"plugin {plugin_id}: {message}", plugin_id=plugin_id)


def _check_profile(name: str, host: SandboxPolicy, plugin_id: str | None) -> None:
    """A manifest may pick the host's default profile, or one the host allows: those listed
    in ``allowed_profiles``, else those whose filter and limits are no wider than the
    default's (the shipped ``strict`` under ``default``, never ``default`` under ``strict``)."""
    if name == host.default_profile:
        return
    if host.allowed_profiles is not None:
        if name in host.allowed_profiles:
            return
        allowed = ", ".join(dict.fromkeys((host.default_profile, *host.allowed_profiles)))
        raise _refuse(
            plugin_id,
            f"asks for sandbox profile {name!r}, which the host policy "
            f"does not allow (allowed: {allowed}); add it to "
            "allowed_profiles under [host] in the host config",
        )
    from .seccomp import filter_within

    mine = _profiles.load_profile(name, host.profile_dirs)
    ceiling = _profiles.load_profile(host.default_profile, host.profile_dirs)
    if not (
        mine.limits.within(ceiling.limits)
        and (ceiling.tmp_exec or not mine.tmp_exec)
        and filter_within(name, host.default_profile, host.profile_dirs)
    ):
        raise _refuse(
            plugin_id,
            f"asks for sandbox profile {name!r}, which allows more than "
            f"the host's default profile {host.default_profile!r}; a "
            "plugin may only pick a profile no wider than the default "
            "unless the host lists it in allowed_profiles under [host]",
        )


def _check_network(request: SandboxRequest, host: SandboxPolicy, plugin_id: str | None) -> None:
    """The host decides what a plugin may reach: full network only with allow_full_network,
    and each of the manifest's allowed_hosts only inside the host's own list. So a manifest
    cannot name loopback, a private range or 0.0.0.0/0 unless the operator listed it."""
    if not request.network_allowed:
        return
    if not request.allowed_hosts:
        if not host.allow_full_network:
            raise _refuse(
                plugin_id,
                "asks for the full network (network_allowed without "
                "allowed_hosts) and the host policy does not allow it; "
                "list allowed_hosts, or set allow_full_network = true "
                "under [host] in the host config",
            )
        return
    if host.allow_full_network:
        return  # a list is narrower than the full network this host already grants
    ceiling = AllowList(host.allowed_hosts)
    outside = [h for h in request.allowed_hosts if not ceiling.covers(h)]
    if outside:
        listed = ", ".join(host.allowed_hosts) or "none"
        raise _refuse(
            plugin_id,
            f"asks to reach {', '.join(outside)}, which the host policy "
            f"does not allow (the host's allowed_hosts: {listed}); list "
            "them under [host] allowed_hosts in the host config, or pass "
            "--allow-host",
        )


def _root_of(path: str, roots: tuple[str, ...]) -> str | None:
    """The deepest path root ``path`` lies under, by its spelling (links are not followed
    here: the grant is opened beneath this root later, and may not pass through one)."""
    under = [r.rstrip("/") or "/" for r in roots if path_under(path, r)]
    return max(under, key=len) if under else None


def effective_config(
    request: SandboxRequest, host: SandboxPolicy, *, plugin_id: str | None = None
) -> SandboxConfig:
    """The sandbox to enforce: the profile's defaults and the request, inside the host policy.

    A plugin's request can narrow what the host allows, never widen it. Raises
    PluginLoadError for anything beyond the policy: a path outside every root, a profile the
    host does not allow, network the host does not grant, a limit above its ceiling. The
    ceilings are the host's ``max_*`` settings, else the limits of the plugin's profile (one
    the host allows); a profile's own defaults are lowered to a ceiling below them.
    """
    profile_name = request.profile or host.default_profile
    limits = _profiles.load_profile(profile_name, host.profile_dirs).limits
    _check_profile(profile_name, host, plugin_id)

    def limit(
        what: str,
        requested: Any,
        default: Any,
        top: Any,
        host_max: Any,
        shown: Callable[[Any], str],
    ) -> Any:
        top = host_max if host_max is not None else top
        if requested is None:
            return min(default, top)
        if requested > top:
            source = (
                f"[limits] max_{what}"
                if host_max is not None
                else f"the limit of the profile {profile_name!r}; the host may raise it with "
                f"[limits] max_{what}"
            )
            raise _refuse(
                plugin_id,
                f"asks for {what} = {shown(requested)}, above the host's "
                f"ceiling of {shown(top)} ({source})",
            )
        return requested

    grants = []
    for grant in request.allowed_paths:
        root = _root_of(grant.path, host.path_roots)
        if root is None:
            roots = ", ".join(host.path_roots) or "none"
            raise _refuse(
                plugin_id,
                f"the host policy does not allow path {grant.path} "
                f"(path roots: {roots}); add a root to path_roots in the "
                "host config or pass the path explicitly",
            )
        grants.append(dataclasses.replace(grant, root=root))
    _check_network(request, host, plugin_id)
    return SandboxConfig(
        enabled=True,
        profile=profile_name,
        allowed_paths=tuple(grants),
        denied_paths=request.denied_paths,
        network_allowed=request.network_allowed,
        allowed_hosts=request.allowed_hosts,
        memory_limit=limit(
            "memory_limit",
            request.memory_limit,
            limits.memory,
            limits.memory,
            host.max_memory_limit,
            format_size,
        ),
        cpu_limit=limit(
            "cpu_limit",
            request.cpu_limit,
            limits.cpu,
            limits.cpu,
            host.max_cpu_limit,
            lambda v: f"{v:g} CPUs",
        ),
        timeout=limit(
            "timeout",
            request.timeout,
            limits.timeout,
            limits.timeout,
            host.max_timeout,
            format_duration,
        ),
        pids_limit=limits.pids if host.max_pids is None else min(limits.pids, host.max_pids),
        tmp_size=limits.tmp_size,
        nofile=limits.nofile,
        fuel=_fuel(request.fuel, host.max_fuel, plugin_id),
    )


def _fuel(requested: int | None, ceiling: int | None, plugin_id: str | None) -> int | None:
    """Fuel is metered when the plugin or the host asks for it; the host's figure is the
    most a plugin may ask for."""
    if requested is None or ceiling is None:
        return requested if ceiling is None else ceiling
    if requested > ceiling:
        raise _refuse(
            plugin_id,
            f"asks for fuel = {requested} per call, above the host's "
            f"ceiling of {ceiling} ([limits] max_fuel)",
        )
    return requested
