"""The egress rules: which targets a plugin may reach, decided from its ``allowed_hosts`` alone.

What an ``allowed_hosts`` entry may say (``parse_host_pattern``: the manifest and the host
config are parsed with it), the compiled allow-list (exact names, ``*.suffix`` wildcards, IP
literals and CIDR ranges, each with an optional port; ``covers`` for the host policy), the
address ranges refused unless listed (loopback, private, link-local, ... : the DNS rebinding
defence), what a valid target name is, and the network mode a sandbox config asks for.
Everything here is a pure function of its arguments: no I/O, no resolver, no log. The proxy,
its wire protocols and the wasm fetch all decide through here.

It must never import the rest of the egress package (which depends on it) nor the sandbox
policy (which imports it for ``AllowList.covers``).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "AllowList",
    "EgressRefused",
    "IPAddress",
    "IPNetwork",
    "NetworkRequest",
    "parse_host_pattern",
    "network_mode",
    "refused_range",
    "check_target",
    "usable_addresses",
    "plain_address",
    "show_address",
    "show_target",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# A label of an allowed_hosts entry; a target's labels may hold underscores too.
_PATTERN_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class EgressRefused(Exception):
    """The policy refused a target; ``str()`` says why, in words for the plugin's author."""


class NetworkRequest(Protocol):
    """What ``network_mode`` reads: a ``SandboxConfig``."""

    @property
    def network_allowed(self) -> bool: ...

    @property
    def allowed_hosts(self) -> tuple[str, ...]: ...


def network_mode(sandbox: NetworkRequest) -> str:
    """``"none"`` (a net namespace with only its loopback), ``"proxy"`` (allow-listed hosts
    through the egress proxy) or ``"host"`` (the host's network: only when the host policy
    allowed it)."""
    if not sandbox.network_allowed:
        return "none"
    return "proxy" if sandbox.allowed_hosts else "host"


# -- the allow-list ------------------------------------------------------------------------------


def parse_host_pattern(text: object) -> str:
    """Validate one ``allowed_hosts`` entry and return it normalised (lower case).

    Accepted: ``example.com``, ``*.example.com``, ``example.com:443``, IPv4 and IPv6 literals
    (``[::1]:443`` with a port), and CIDR ranges such as ``10.0.0.0/8`` for naming a private
    range on purpose.
    """
    expected = 'a host such as "example.com", "*.example.com:443", "10.0.0.1" or "[::1]:8080"'
    if not isinstance(text, str) or not text or len(text) > 300:
        raise ValueError(f"{expected}, not {text!r}")
    host, port = text.lower(), None
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise ValueError(f"{expected}, not {text!r}")
        rest = host[end + 1 :]
        host = host[1:end]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{expected}, not {text!r}")
            port = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{expected}, not {text!r}") from None
    elif host.count(":") == 1:
        host, port = host.split(":")
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"a port between 1 and 65535 in {text!r}")
    if "/" in host:
        try:
            ipaddress.ip_network(host, strict=True)
        except ValueError:
            raise ValueError(f"a CIDR range such as 10.0.0.0/8, not {text!r}") from None
        if port is not None:
            raise ValueError(f"a CIDR range without a port, not {text!r}")
        return host
    try:
        ipaddress.ip_address(host)
        return text.lower()
    except ValueError:
        pass
    labels = host.split(".")
    if labels[0] == "*":
        labels = labels[1:]
        if len(labels) < 2:
            raise ValueError(f"a wildcard with at least two labels after '*.', not {text!r}")
    if not labels or len(host) > 253 or not all(_PATTERN_LABEL.fullmatch(lb) for lb in labels):
        raise ValueError(f"{expected}, not {text!r}")
    if all(lb.isdigit() for lb in labels):
        raise ValueError(f"{expected}, not {text!r}")
    return text.lower()


def _contains(outer: str | IPNetwork, inner: IPNetwork) -> bool:
    """Whether ``outer`` is a network of the same family as ``inner`` that holds it."""
    if isinstance(outer, ipaddress.IPv4Network) and isinstance(inner, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(outer, ipaddress.IPv6Network) and isinstance(inner, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False


def _rule_covers(rule: _Rule, wanted: _Rule) -> bool:
    """Whether ``rule`` allows every target ``wanted`` (a rule's port aside) allows."""
    if not isinstance(wanted.value, str):  # a network: only a wider network covers it
        return _contains(rule.value, wanted.value)
    if rule.kind == "wildcard":  # a longer name under it, or a narrower wildcard
        name, suffix = wanted.value, str(rule.value)
        return name.endswith(suffix) and (wanted.kind == "wildcard" or len(name) > len(suffix))
    return rule.kind == wanted.kind == "name" and rule.value == wanted.value


@dataclass(frozen=True, slots=True)
class _Rule:
    kind: str  # "name", "wildcard", "network"
    value: str | IPNetwork
    port: int | None

    def covers_port(self, port: int) -> bool:
        return self.port is None or self.port == port


class AllowList:
    """A plugin's ``allowed_hosts``, compiled: exact names, ``*.suffix`` wildcards (any depth
    below the suffix, never the suffix itself), IP literals and CIDR ranges; each with an
    optional port (none: any port). ``AllowList.everything()`` is the host's full network."""

    def __init__(self, patterns: Iterable[str] = (), *, everything: bool = False) -> None:
        self.everything_allowed = everything
        self.patterns = tuple(patterns)
        rules = []
        for pattern in self.patterns:
            text = parse_host_pattern(pattern)
            host, port = _split_pattern(text)
            if host.startswith("*."):
                rules.append(_Rule("wildcard", host[1:], port))  # ".example.com"
                continue
            try:
                network = ipaddress.ip_network(host, strict=True)
            except ValueError:
                rules.append(_Rule("name", host, port))
                continue
            rules.append(_Rule("network", network, port))
        self._rules = tuple(rules)

    @classmethod
    def everything(cls) -> AllowList:
        return cls(everything=True)

    def permits_name(self, name: str, port: int) -> bool:
        if self.everything_allowed:
            return True
        for rule in self._rules:
            if not rule.covers_port(port):
                continue
            if rule.kind == "name" and rule.value == name:
                return True
            if (
                rule.kind == "wildcard"
                and name.endswith(str(rule.value))
                and len(name) > len(str(rule.value))
            ):
                return True
        return False

    def lists_address(self, address: IPAddress, port: int) -> bool:
        """Whether an IP literal or range in the list covers ``address`` on ``port``."""
        if self.everything_allowed:
            return True
        return any(
            rule.kind == "network" and rule.covers_port(port) and address in rule.value
            for rule in self._rules
        )

    def covers(self, pattern: str) -> bool:
        """Whether every target the ``allowed_hosts`` entry ``pattern`` permits is permitted
        by this list too: the host's list deciding what a manifest may ask for. An entry
        without a port is covered only by entries without one; a name only by that name or a
        wildcard above it; a wildcard by an equal or shorter one; an address or range only by
        a range (or address) that contains it."""
        if self.everything_allowed:
            return True
        wanted = AllowList([pattern])._rules[0]
        for rule in self._rules:
            if rule.port is not None and rule.port != wanted.port:
                continue
            if _rule_covers(rule, wanted):
                return True
        return False

    def __repr__(self) -> str:
        return (
            "AllowList(everything)"
            if self.everything_allowed
            else f"AllowList({list(self.patterns)})"
        )


def _split_pattern(text: str) -> tuple[str, int | None]:
    """A normalised allowed_hosts entry as (host, port or None)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest else None
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, None


# -- a target, checked ---------------------------------------------------------------------------


def check_target(allow: AllowList, host: str, port: int) -> tuple[str, IPAddress | None]:
    """``host`` checked against ``allow`` before anything is resolved: (the name as the list
    compares it, None) for a name, (``host``, its address) for an IP literal. EgressRefused for
    a target the list does not name, or a name that is not a valid host name."""
    literal = _literal(host)
    if literal is not None:
        if not allow.lists_address(plain_address(literal), port) and not allow.lists_address(
            literal, port
        ):
            raise EgressRefused(
                f"{show_target(host, port)} is not in allowed_hosts (an IP "
                "address is reachable only when allowed_hosts lists it)"
            )
        return host, literal
    name = _host_name(host)
    if not allow.permits_name(name, port):
        raise EgressRefused(f"{show_target(name, port)} is not in allowed_hosts")
    return name, None


def usable_addresses(
    allow: AllowList, name: str, port: int, addresses: list[IPAddress]
) -> list[IPAddress]:
    """The addresses of ``name`` the policy lets us dial; EgressRefused if none."""
    usable, refused = [], []
    for address in addresses:
        reason = refused_range(address)
        if reason is None or allow.lists_address(plain_address(address), port):
            usable.append(address)
        else:
            refused.append(f"{show_address(address)} ({reason})")
    if not usable:
        raise EgressRefused(
            f"{name} resolves to {', '.join(refused)}, which is refused unless "
            f"allowed_hosts lists that address or range (DNS rebinding protection)"
        )
    return usable


def refused_range(address: IPAddress) -> str | None:
    """Why ``address`` is off limits unless listed (None: a global unicast address). IPv6
    forms that carry an IPv4 address (mapped, 6to4, NAT64) are judged by that address too."""
    address = plain_address(address)
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.sixtofour or (
            ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF) if address in _NAT64 else None
        )
        if inner is not None and (why := refused_range(inner)) is not None:
            return f"{why}, inside {'6to4' if address.sixtofour else 'NAT64'}"
    for test, name in (
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (address.is_unspecified, "unspecified"),
        (address.is_private, "private"),
        (address.is_reserved, "reserved"),
        (not address.is_global, "not globally routable"),
    ):
        if test:
            return name
    return None


def _host_name(text: str) -> str:
    """A target name as the allow-list compares it, or EgressRefused."""
    name = text.lower()
    name = name[:-1] if name.endswith(".") else name  # the root label
    try:
        name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        raise EgressRefused(f"{text!r} is not a valid host name") from None
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(lb) for lb in labels):
        raise EgressRefused(f"{text!r} is not a valid host name")
    return name


def _literal(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text.strip("[]").split("%")[0])
    except ValueError:
        return None


# -- addresses and targets as the log and the plugin see them ------------------------------------


def plain_address(address: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (``::ffff:127.0.0.1``) as the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def show_address(address: IPAddress) -> str:
    """An address as people write it (IPv4-mapped IPv6 with its dotted quad)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


def show_target(host: str, port: int) -> str:
    """``host:port``, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
