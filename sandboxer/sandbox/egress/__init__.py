"""The egress proxy: the only way out of a plugin's network namespace, and only to its hosts.

One job per module, each depending only on those above it:

- ``rules``: the allow-list (``AllowList``, incl. ``covers`` for the host policy), the address
  ranges refused unless listed, what a target name is, the network mode of a sandbox config;
- ``resolver``: names to addresses (the host's hosts file, then the system resolver);
- ``decisions``: the ``Checkpoint`` every attempt goes through (check, resolve, keep the
  allowed addresses) and its record: the log line and the per-plugin ``EgressCounters``;
- ``http`` (CONNECT and plain HTTP) and ``socks`` (SOCKS5): the wire protocols, reading a
  request and answering it; they know the rules and the decisions, never each other;
- ``fetch``: one HTTP(S) request for a wasm plugin (``sandboxer.http_request``);
- ``proxy``: ``EgressProxy`` and its per-process ``EgressEndpoint``: the accept loop, the
  limits, the dial and the tunnel.

The names below are imported from here. The rules come with the package, the rest when
first used: the sandbox policy (imported inside every plugin host's sandbox, through the
manifest) needs ``AllowList``, and must not pull asyncio and the proxy in with it.
"""

from __future__ import annotations

import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING
from typing import Any as _Any

from .rules import AllowList, EgressRefused, network_mode, refused_range

if _TYPE_CHECKING:
    from .decisions import EgressCounters
    from .proxy import (
        EGRESS_SOCKET,
        PROXY_HOST,
        PROXY_PORT,
        EgressEndpoint,
        EgressProxy,
        proxy_environment,
    )
    from .resolver import Resolver

__all__ = [
    "EgressProxy",
    "EgressEndpoint",
    "EgressCounters",
    "AllowList",
    "EgressRefused",
    "Resolver",
    "network_mode",
    "proxy_environment",
    "refused_range",
    "PROXY_HOST",
    "PROXY_PORT",
    "EGRESS_SOCKET",
]

_LAZY = {
    "EgressCounters": ".decisions",
    "Resolver": ".resolver",
    **{
        name: ".proxy"
        for name in (
            "EgressProxy",
            "EgressEndpoint",
            "proxy_environment",
            "PROXY_HOST",
            "PROXY_PORT",
            "EGRESS_SOCKET",
        )
    },
}


def __getattr__(name: str) -> _Any:
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(_importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
