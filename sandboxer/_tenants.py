"""The daemon's tenants (host config ``[tenants.NAME]``, DESIGN section 10b): who each is
(``uids``, ``gids``), where its plugins may come from and what they may be granted
(``path_roots``), how much it may run (``max_plugins``; ``max_memory``, the sum of its
plugins' memory limits), and its ceilings on top of the host policy.

A ceiling only narrows: the ``max_*`` limits are the smaller of the host's and the
tenant's, ``allow_full_network`` holds only if both allow it, a tenant's ``allowed_hosts``
must be among the host's, and ``allow_network = false`` takes every network away. A tenant's
plugins never run unsandboxed, whatever the host allows its own callers, and are granted no
host path (``allowed_paths``): the daemon would open it with root's rights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._units import parse_size
from .sandbox.policy import HOST_KEYS, LIMIT_KEYS, SandboxPolicy, parse_bool, path_under

if TYPE_CHECKING:
    from .config import HostConfig

__all__ = ["Tenant", "parse_tenants", "identify", "as_mapping", "CEILINGS"]

# The host-policy keys a tenant may narrow, and how each narrows.
CEILINGS = ("max_memory_limit", "max_cpu_limit", "max_timeout", "max_pids", "max_fuel")
_OWN_KEYS = {"uids", "gids", "path_roots", "max_plugins", "max_memory", "allow_network"}
_NARROWING = {*CEILINGS, "allow_full_network", "allowed_hosts"}


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    uids: tuple[int, ...] = ()
    gids: tuple[int, ...] = ()
    path_roots: tuple[str, ...] = ()
    max_plugins: int = 10
    max_memory: int | None = None  # the sum of its plugins' memory limits; None: no cap
    allow_network: bool = True
    ceilings: tuple[tuple[str, Any], ...] = ()  # (host-policy key, value), narrowing only

    def policy(self, host: HostConfig) -> HostConfig:
        """The host config this tenant's plugins run under: the host's, narrowed."""
        # No grant at all (path_roots empty refuses every allowed_paths): the sandbox opens a
        # grant with the supervisor's rights, root's here, so a tenant's plugin could be
        # given what the tenant itself could not open. A tenant's path_roots say where its
        # plugins may be loaded from, which the daemon reads with the tenant's own rights.
        values: dict[str, Any] = {"allow_unsandboxed": False, "path_roots": ()}
        for key, value in self.ceilings:
            current = getattr(host, key)
            if key in CEILINGS:
                values[key] = value if current is None else min(current, value)
            elif key == "allow_full_network":
                values[key] = current and value
            else:  # allowed_hosts: checked to be among the host's when parsed
                values[key] = value
        if not self.allow_network:
            values.update(allow_full_network=False, allowed_hosts=())
        return dataclasses.replace(host, **values)


def _ids(value: object, what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**32 - 1 for v in value
    ):
        raise ValueError(f"a list of {what} (numbers, not 0: root is the administrator)")
    return tuple(value)


def _whole(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 100_000:
        raise ValueError(f"{what} between 1 and 100000, not {value!r}")
    return value


def parse_tenants(
    table: object, host: SandboxPolicy, error: type[Exception], source: str
) -> tuple[Tenant, ...]:
    """The ``[tenants]`` table; ``error(source, field, expected)`` for anything wrong (the
    config's ConfigError). A uid or gid belongs to one tenant at most, and a tenant's
    path roots lie under the host's, when the host has any."""
    if not isinstance(table, dict):
        raise error(source, "tenants", "a table of tenants ([tenants.NAME])")
    tenants: list[Tenant] = []
    owners: dict[tuple[str, int], str] = {}
    for name, body in sorted(table.items()):
        where = f"tenants.{name}"
        if not isinstance(body, dict):
            raise error(source, where, "a table")
        values: dict[str, Any] = {}
        ceilings: list[tuple[str, Any]] = []
        for key, value in body.items():
            field = f"{where}.{key}"
            try:
                if key in ("uids", "gids"):
                    values[key] = _ids(value, key)
                elif key == "path_roots":
                    values[key] = HOST_KEYS["path_roots"](value)
                elif key == "max_plugins":
                    values[key] = _whole(value, "a number of plugins")
                elif key == "max_memory":
                    values[key] = parse_size(value)
                elif key == "allow_network":
                    values[key] = parse_bool(value)
                elif key in _NARROWING:
                    parsed = {**HOST_KEYS, **LIMIT_KEYS}[key](value)
                    if key == "allowed_hosts" and not set(parsed) <= set(host.allowed_hosts):
                        raise ValueError("hosts among the host's own allowed_hosts")
                    ceilings.append((key, parsed))
                else:
                    raise ValueError(
                        f"one of {', '.join(sorted(_OWN_KEYS | _NARROWING))} (a tenant's "
                        "ceilings narrow the host policy)"
                    )
            except ValueError as exc:
                raise error(source, field, str(exc)) from None
        if not values.get("uids") and not values.get("gids"):
            raise error(source, where, "uids or gids: who the tenant is")
        if not values.get("path_roots"):
            raise error(source, f"{where}.path_roots", "where its plugins may come from")
        if host.path_roots:
            for root in values["path_roots"]:
                if not any(path_under(root, mine) for mine in host.path_roots):
                    raise error(source, f"{where}.path_roots", "paths under the host's path_roots")
        for kind in ("uids", "gids"):
            for number in values.get(kind, ()):
                taken = owners.setdefault((kind, number), name)
                if taken != name:
                    raise error(source, f"{where}.{kind}", f"{number} only once (tenant {taken})")
        tenants.append(Tenant(name=name, ceilings=tuple(ceilings), **values))
    return tuple(tenants)


def identify(
    tenants: tuple[Tenant, ...], uid: int, gid: int, groups: tuple[int, ...]
) -> Tenant | None:
    """The tenant of a caller: by its uid first, else by its gid or a supplementary group;
    None for a caller in no tenant."""
    for tenant in tenants:
        if uid in tenant.uids:
            return tenant
    mine = {gid, *groups}
    for tenant in tenants:
        if mine & set(tenant.gids):
            return tenant
    return None


def as_mapping(tenant: Tenant) -> Mapping[str, Any]:
    """The tenant as ``sandboxer status`` shows it."""
    return {
        "name": tenant.name,
        "uids": list(tenant.uids),
        "gids": list(tenant.gids),
        "path_roots": list(tenant.path_roots),
        "max_plugins": tenant.max_plugins,
        "max_memory": tenant.max_memory,
        "allow_network": tenant.allow_network,
        "ceilings": dict(tenant.ceilings),
    }
