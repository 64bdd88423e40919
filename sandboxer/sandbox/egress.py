"""The egress proxy: the only way out of a plugin's network namespace, and only to its hosts.

A plugin with ``network_allowed`` and ``allowed_hosts`` gets a net namespace holding nothing
but a loopback interface. On it, at ``127.0.0.1:3128``, listens a socket the launcher made
inside the namespace and handed to the supervisor; the supervisor also binds a Unix socket
into the sandbox at ``/run/sandboxer/egress.sock``. Both lead here: this module, running on
the supervisor's event loop in the supervisor's own namespace, speaks HTTP CONNECT, plain
HTTP forwarding and SOCKS5 on them (told apart by the first byte), checks every target
against the plugin's allow-list, resolves names itself, refuses names that resolve to
loopback, link-local, private or otherwise non-global addresses unless that address or range
is listed, and dials exactly the address it checked (so a second lookup cannot rebind it).
WebAssembly plugins have no sockets at all; their ``sandboxer.http_request`` host function
goes through ``EgressProxy.fetch``, the same rules and the same log.

Every attempt is logged on ``sandboxer.egress`` with the plugin id, the target and the
verdict, and counted per plugin. A plugin holds at most ``max_connections`` connections to
the proxy at once (more are closed at once and counted as refused), must send its request
within ``header_timeout`` (slowloris), and a tunnel idle in both directions for
``idle_timeout`` is closed.

This module must never dial anything it has not checked, never resolve a name for a plugin
before the name passed the allow-list, and never let one plugin's connections affect another
plugin's budget.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Union
from urllib.parse import urlsplit

from .policy import SandboxConfig, parse_host_pattern

__all__ = ["EgressProxy", "EgressEndpoint", "EgressCounters", "AllowList", "EgressRefused",
           "Resolver", "network_mode", "proxy_environment", "PROXY_PORT", "EGRESS_SOCKET"]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

PROXY_HOST = "127.0.0.1"
PROXY_PORT = 3128
EGRESS_SOCKET = "/run/sandboxer/egress.sock"  # where the Unix socket shows inside the sandbox
HEAD_LIMIT = 16 << 10  # an HTTP request head (request line and headers) larger is refused
_HOP_BY_HOP = {"connection", "proxy-connection", "keep-alive", "proxy-authorization",
               "proxy-authenticate", "upgrade"}
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_SOCKS_REPLY = {"ok": 0, "failed": 1, "refused": 2, "unreachable": 4, "connection refused": 5,
                "timeout": 6, "command": 7, "address type": 8}

log = logging.getLogger("sandboxer.egress")


def network_mode(sandbox: SandboxConfig) -> str:
    """``"none"`` (a net namespace with only its loopback), ``"proxy"`` (allow-listed hosts
    through the egress
    proxy) or ``"host"`` (the host's network: only when the host policy allowed it)."""
    if not sandbox.network_allowed:
        return "none"
    return "proxy" if sandbox.allowed_hosts else "host"


def proxy_environment() -> dict[str, str]:
    """What a proxied plugin finds in its environment: every common spelling, so curl, wget,
    Python, Go and node's proxy agents all go through the proxy without being told."""
    http = f"http://{PROXY_HOST}:{PROXY_PORT}"
    socks = f"socks5h://{PROXY_HOST}:{PROXY_PORT}"  # socks5h: the proxy resolves names
    env = {"SANDBOXER_EGRESS_SOCKET": EGRESS_SOCKET}
    for name, value in (("http_proxy", http), ("https_proxy", http), ("all_proxy", socks)):
        env[name] = env[name.upper()] = value
    return env


class EgressRefused(Exception):
    """The policy refused a target; ``str()`` says why, in words for the plugin's author."""


# -- the allow-list ------------------------------------------------------------------------------

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
            if rule.kind == "wildcard" and name.endswith(str(rule.value)) \
                    and len(name) > len(str(rule.value)):
                return True
        return False

    def lists_address(self, address: IPAddress, port: int) -> bool:
        """Whether an IP literal or range in the list covers ``address`` on ``port``."""
        if self.everything_allowed:
            return True
        return any(rule.kind == "network" and rule.covers_port(port)
                   and address in rule.value
                   for rule in self._rules)

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
            if wanted.kind == "network":
                if rule.kind == "network" and rule.value.version == wanted.value.version \
                        and wanted.value.subnet_of(rule.value):  # type: ignore[union-attr,arg-type]
                    return True
            elif rule.kind == "wildcard" and str(wanted.value).endswith(str(rule.value)) \
                    and (wanted.kind == "wildcard" or len(str(wanted.value)) > len(str(rule.value))):
                return True
            elif rule.kind == wanted.kind == "name" and rule.value == wanted.value:
                return True
        return False

    def __repr__(self) -> str:
        return "AllowList(everything)" if self.everything_allowed else \
            f"AllowList({list(self.patterns)})"


def _split_pattern(text: str) -> tuple[str, int | None]:
    """A normalised allowed_hosts entry as (host, port or None)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest else None
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, None


def _plain(address: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (``::ffff:127.0.0.1``) as the IPv4 address it reaches."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _display(address: IPAddress) -> str:
    """An address as people write it (IPv4-mapped IPv6 with its dotted quad)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return f"::ffff:{address.ipv4_mapped}"
    return str(address)


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def refused_range(address: IPAddress) -> str | None:
    """Why ``address`` is off limits unless listed (None: a global unicast address). IPv6
    forms that carry an IPv4 address (mapped, 6to4, NAT64) are judged by that address too."""
    address = _plain(address)
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.sixtofour or (ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
                                      if address in _NAT64 else None)
        if inner is not None and (why := refused_range(inner)) is not None:
            return f"{why}, inside {'6to4' if address.sixtofour else 'NAT64'}"
    for test, name in ((address.is_loopback, "loopback"), (address.is_link_local, "link-local"),
                       (address.is_multicast, "multicast"),
                       (address.is_unspecified, "unspecified"),
                       (address.is_private, "private"), (address.is_reserved, "reserved"),
                       (not address.is_global, "not globally routable")):
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


# -- name resolution -----------------------------------------------------------------------------

class Resolver:
    """Names to addresses for the proxy: a hosts file first (``egress_hosts_file`` in the host
    config; re-read when it changes), then the system resolver. Plugins never resolve."""

    def __init__(self, hosts_file: str | None = None) -> None:
        self.hosts_file = hosts_file
        self._table: dict[str, list[IPAddress]] = {}
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def static(self, name: str) -> list[IPAddress] | None:
        """The hosts file's addresses for ``name`` (None: not in it)."""
        if self.hosts_file is None:
            return None
        with self._lock:
            try:
                st = os.stat(self.hosts_file)
            except OSError:
                self._table, self._stamp = {}, None
                return None
            if (st.st_mtime_ns, st.st_size) != self._stamp:
                self._table = _read_hosts(self.hosts_file)
                self._stamp = (st.st_mtime_ns, st.st_size)
            return self._table.get(name)

    def resolve(self, name: str, port: int) -> list[IPAddress]:
        """Blocking (it may ask DNS): call it off the event loop."""
        found = self.static(name)
        if found is not None:
            return found
        try:
            infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise OSError(f"cannot resolve {name}: {getattr(exc, 'strerror', None) or exc}") \
                from None
        addresses: list[IPAddress] = []
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if address not in addresses:
                addresses.append(address)
        return addresses


def _read_hosts(path: str) -> dict[str, list[IPAddress]]:
    table: dict[str, list[IPAddress]] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return table
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            address = ipaddress.ip_address(fields[0])
        except ValueError:
            continue
        for name in fields[1:]:
            entry = table.setdefault(name.lower().rstrip("."), [])
            if address not in entry:
                entry.append(address)
    return table


# -- counters ------------------------------------------------------------------------------------

class EgressCounters:
    """One plugin's egress, across its generations: attempts by verdict, connections open
    now, bytes each way. Updated from the event loop and from wasm worker threads."""

    __slots__ = ("allowed", "refused", "failed", "active", "bytes_sent", "bytes_received",
                 "_lock")

    def __init__(self) -> None:
        self.allowed = self.refused = self.failed = self.active = 0
        self.bytes_sent = self.bytes_received = 0
        self._lock = threading.Lock()

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def to_json(self) -> dict[str, int]:
        with self._lock:
            return {"allowed": self.allowed, "refused": self.refused, "failed": self.failed,
                    "active": self.active, "bytesSent": self.bytes_sent,
                    "bytesReceived": self.bytes_received}

    def __repr__(self) -> str:
        return f"EgressCounters({self.to_json()})"


# -- the proxy -----------------------------------------------------------------------------------

class _Failed(Exception):
    """An allowed target that could not be reached: (kind, words) for the reply."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class EgressProxy:
    """One per supervisor (PluginManager): the rules engine, resolver, log and counters, and
    the endpoints of every proxied plugin process."""

    def __init__(self, *, hosts_file: str | None = None, max_connections: int = 32,
                 header_timeout: float = 10.0, connect_timeout: float = 10.0,
                 idle_timeout: float = 300.0, ca_file: str | None = None,
                 max_response: int = 16 << 20) -> None:
        self.resolver = Resolver(hosts_file)
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.ca_file = ca_file
        self.max_response = max_response
        self._counters: dict[str, EgressCounters] = {}
        self._budget: dict[str, asyncio.Semaphore] = {}
        self._endpoints: set[EgressEndpoint] = set()
        self._dir: str | None = None
        self._serial = 0
        self._lookups: concurrent.futures.ThreadPoolExecutor | None = None  # wasm's DNS

    @classmethod
    def from_config(cls, config: Any) -> EgressProxy:
        """From a HostConfig's ``egress_*`` settings."""
        return cls(hosts_file=config.egress_hosts_file,
                   max_connections=config.egress_max_connections,
                   header_timeout=config.egress_header_timeout,
                   idle_timeout=config.egress_idle_timeout,
                   connect_timeout=config.egress_connect_timeout, ca_file=config.egress_ca_file,
                   max_response=config.max_frame)

    def counters(self, plugin_id: str) -> EgressCounters:
        counters = self._counters.get(plugin_id)
        if counters is None:  # setdefault: wasm worker threads may race here
            counters = self._counters.setdefault(plugin_id, EgressCounters())
        return counters

    def _slots(self, plugin_id: str) -> asyncio.Semaphore:
        """The plugin's connection budget, shared by its generations' endpoints."""
        slots = self._budget.get(plugin_id)
        if slots is None:
            slots = self._budget[plugin_id] = asyncio.Semaphore(self.max_connections)
        return slots

    def statistics(self, plugin_id: str) -> EgressCounters | None:
        """The plugin's counters, or None if it never had network access."""
        return self._counters.get(plugin_id)

    # -- endpoints -------------------------------------------------------------------------------
    def endpoint(self, plugin_id: str, allowed_hosts: Iterable[str]) -> EgressEndpoint:
        """A new endpoint for one plugin process: its Unix socket exists (bind-mount it at
        EGRESS_SOCKET); ``start()`` it with the listener from the plugin's namespace."""
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="sandboxer-egress-")  # 0700, the supervisor's
        self._serial += 1
        path = os.path.join(self._dir, f"{self._serial}.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            # The plugin's host uid must be able to connect; the 0700 directory keeps every
            # other host user out, and inside the sandbox only this plugin sees the socket.
            os.chmod(path, 0o666)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        point = EgressEndpoint(self, plugin_id, AllowList(allowed_hosts), sock, path)
        self._endpoints.add(point)
        self.counters(plugin_id)  # zeros from the start: it has network, it tried nothing
        return point

    def _forget(self, point: EgressEndpoint) -> None:
        self._endpoints.discard(point)
        if not self._endpoints and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def close(self) -> None:
        """Close every endpoint (idempotent)."""
        for point in list(self._endpoints):
            point.close()
        if self._lookups is not None:
            self._lookups.shutdown(wait=False, cancel_futures=True)
            self._lookups = None

    # -- the decision ----------------------------------------------------------------------------
    def _verdict(self, plugin_id: str, via: str, target: str, verdict: str, detail: str = ""
                 ) -> None:
        self.counters(plugin_id).add(**{verdict: 1})
        level = logging.INFO if verdict == "allowed" else logging.WARNING
        # target and detail carry what the plugin sent: escaped, so that no plugin can write
        # a line of its own (a forged verdict) into the host's log.
        log.log(level, "egress plugin=%s via=%s target=%s verdict=%s%s", plugin_id, via,
                _printable(target), verdict, f" ({_printable(detail)})" if detail else "")

    def _prepare(self, allow: AllowList, host: str, port: int
                 ) -> tuple[str, list[IPAddress] | None]:
        """The target checked against the list, nothing resolved: (name, addresses), where
        addresses are an IP literal's own, the hosts file's for a name, or None when DNS must
        answer. EgressRefused for a target the list does not name."""
        literal = _literal(host)
        if literal is not None:
            if not allow.lists_address(_plain(literal), port) \
                    and not allow.lists_address(literal, port):
                raise EgressRefused(f"{_show(host, port)} is not in allowed_hosts (an IP "
                                    "address is reachable only when allowed_hosts lists it)")
            return host, [literal]
        name = _host_name(host)
        if not allow.permits_name(name, port):
            raise EgressRefused(f"{_show(name, port)} is not in allowed_hosts")
        return name, self.resolver.static(name)

    @staticmethod
    def _check_addresses(allow: AllowList, name: str, port: int,
                         addresses: list[IPAddress]) -> list[IPAddress]:
        """The addresses of ``name`` the policy lets us dial; EgressRefused if none."""
        usable, refused = [], []
        for address in addresses:
            reason = refused_range(address)
            if reason is None or allow.lists_address(_plain(address), port):
                usable.append(address)
            else:
                refused.append(f"{_display(address)} ({reason})")
        if not usable:
            raise EgressRefused(
                f"{name} resolves to {', '.join(refused)}, which is refused unless "
                f"allowed_hosts lists that address or range (DNS rebinding protection)")
        return usable

    async def _decide(self, allow: AllowList, host: str, port: int) -> list[IPAddress]:
        name, addresses = self._prepare(allow, host, port)
        if addresses is None:
            lookup = asyncio.wrap_future(self._lookup(name, port))
            try:
                async with asyncio.timeout(self.connect_timeout):
                    addresses = await lookup
            except TimeoutError:
                raise _Failed("timeout", f"resolving {name} took longer than "
                                         f"{self.connect_timeout:g}s") from None
            except OSError as exc:
                raise _Failed("unreachable", str(exc)) from None
        return self._check_addresses(allow, name, port, addresses)

    def _lookup(self, name: str, port: int) -> concurrent.futures.Future[list[IPAddress]]:
        """A DNS lookup on the proxy's own threads: getaddrinfo cannot be interrupted, and a
        stalled resolver must not hold the event loop's default executor."""
        if self._lookups is None:
            self._lookups = concurrent.futures.ThreadPoolExecutor(
                4, thread_name_prefix="sandboxer-resolve")
        return self._lookups.submit(self.resolver.resolve, name, port)

    def decide_blocking(self, allow: AllowList, host: str, port: int, *,
                        deadline: Callable[[], float] | None = None) -> list[IPAddress]:
        """``_decide`` for a worker thread (wasm's http_request). A DNS lookup waits at most
        until ``deadline()`` (time.monotonic(), re-read as it waits): getaddrinfo cannot be
        interrupted, so it runs on the resolver's own thread and is left to finish there."""
        name, addresses = self._prepare(allow, host, port)
        if addresses is None:
            lookup = self._lookup(name, port)
            while True:
                left = None if deadline is None else deadline() - time.monotonic()
                if left is not None and left <= 0:
                    raise _Failed("deadline", f"resolving {name}: the call's deadline passed")
                try:
                    addresses = lookup.result(None if left is None else min(left, 0.05))
                    break
                except concurrent.futures.TimeoutError:
                    continue
                except OSError as exc:
                    raise _Failed("unreachable", str(exc)) from None
        return self._check_addresses(allow, name, port, addresses)

    async def _dial(self, addresses: list[IPAddress], port: int
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        last: OSError | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):  # for all addresses together
                for address in addresses:
                    try:
                        return await asyncio.open_connection(str(address), port,
                                                             limit=1 << 16)
                    except OSError as exc:
                        last = exc
        except TimeoutError:
            last = TimeoutError(f"no answer within {self.connect_timeout:g}s")
        kind = "timeout" if isinstance(last, TimeoutError) else \
            "connection refused" if isinstance(last, ConnectionRefusedError) else "unreachable"
        why = os.strerror(last.errno) if last is not None and last.errno else str(last)
        raise _Failed(kind, f"connecting to {_show(_display(addresses[-1]), port)} failed: "
                            f"{why}")

    @contextlib.contextmanager
    def attempt(self, plugin_id: str, via: str, target: str) -> Iterator[None]:
        """Log and count a refusal or failure raised inside (then re-raise it); the caller
        reports "allowed" itself, once it is connected."""
        try:
            yield
        except EgressRefused as exc:
            self._verdict(plugin_id, via, target, "refused", str(exc))
            raise
        except _Failed as exc:
            self._verdict(plugin_id, via, target, "failed", str(exc))
            raise

    async def open(self, plugin_id: str, allow: AllowList, via: str, host: str, port: int
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Check, resolve, dial; log and count the verdict. EgressRefused or _Failed."""
        target = _show(host, port)
        with self.attempt(plugin_id, via, target):
            addresses = await self._decide(allow, host, port)
            upstream = await self._dial(addresses, port)
        peer = upstream[1].get_extra_info("peername")
        self._verdict(plugin_id, via, target, "allowed", f"connected to {peer[0]}")
        return upstream

    # -- wasm: one HTTP request on the plugin's behalf -------------------------------------------
    def fetch(self, plugin_id: str, allow: AllowList | None, request: Any, *,
              deadline: float | Callable[[], float]) -> dict[str, Any]:
        """Perform one HTTP(S) request for a wasm plugin (blocking; a worker thread calls it).

        ``request``: ``{"method", "url", "headers": {name: value}, "body"}`` (``body`` text, or
        ``body_base64``). Returns ``{"status", "headers", "body"}`` (``body_base64`` when the
        body is not UTF-8) or ``{"error": {"kind", "message"}}`` with kind ``refused``,
        ``failed``, ``invalid`` or ``timeout``. ``allow`` None: the plugin has no network, so
        every request is refused (and logged and counted). The call's ``deadline``
        (time.monotonic(), or a function returning it, re-read at every wait so that an
        unload moving it ends the request) bounds the whole exchange."""
        from ._egress_fetch import fetch
        return fetch(self, plugin_id, allow, request, deadline=deadline)


async def _readable(sock: socket.socket) -> None:
    """Until ``sock`` (a listener) has a connection waiting."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(sock, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        if sock.fileno() != -1:  # a closed listener's reader went before it closed
            loop.remove_reader(sock)


def _printable(text: str) -> str:
    """``text`` with every unprintable character escaped (a newline shows as \\n)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_target(text: str, default_port: int | None) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` (as in CONNECT) into its parts; ValueError if malformed."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(text)
        port_text = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, None
    if port_text is None:
        if default_port is None:
            raise ValueError(text)
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536 or not host:
        raise ValueError(text)
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class _Request:
    via: str  # "http-connect", "http", "socks5"
    host: str
    port: int
    forward: bytes | None = None  # plain HTTP: the rewritten head to send upstream


def _http_reply(writer: asyncio.StreamWriter, status: int, reason: str, detail: str) -> None:
    """An error response; the reason phrase carries the detail too, because clients show it
    (Python: "Tunnel connection failed: 403 Forbidden (sandboxer: ...)")."""
    body = f"sandboxer: {detail}\n".encode()
    phrase = f"{reason} (sandboxer: {detail})".replace("\r", " ").replace("\n", " ")
    writer.write(f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                 f"X-Sandboxer-Egress: {'refused' if status == 403 else 'failed'}\r\n\r\n"
                 .encode("latin-1", "replace") + body)


def _socks_reply(writer: asyncio.StreamWriter, outcome: str) -> None:
    # The bound address is not the plugin's business: always 0.0.0.0:0.
    writer.write(bytes([5, _SOCKS_REPLY[outcome], 0, 1]) + bytes(6))


class EgressEndpoint:
    """One plugin process's way to the proxy: the Unix socket bound into its sandbox and the
    TCP listener in its net namespace. ``close()`` (idempotent) stops both, ends every
    connection and removes the socket file."""

    def __init__(self, proxy: EgressProxy, plugin_id: str, allow: AllowList,
                 unix_sock: socket.socket, path: str) -> None:
        self.proxy = proxy
        self.plugin_id = plugin_id
        self.allow = allow
        self.socket_path = path
        self._sockets: list[socket.socket] = [unix_sock]
        self._acceptors: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._saturated = False  # the limit was reached (logged once until it is not)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def start(self, listener: socket.socket | None) -> None:
        """Serve the Unix socket and ``listener`` (the TCP socket made in the plugin's
        namespace; this endpoint owns it from now on)."""
        if listener is not None:
            self._sockets.append(listener)
        if self._closed:
            self.close()
            return
        self._loop = asyncio.get_running_loop()
        for sock in self._sockets:
            sock.setblocking(False)
            self._acceptors.append(asyncio.ensure_future(self._accept(sock)))

    def close(self) -> None:
        if self._closed and not self._sockets:
            return
        self._closed = True
        for task in self._acceptors + list(self._tasks):
            task.cancel()
        self._acceptors.clear()
        for sock in self._sockets:
            if self._loop is not None:  # before close: the fd number may be reused at once
                self._loop.remove_reader(sock)
            sock.close()
        self._sockets.clear()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self.proxy._forget(self)

    async def _accept(self, listener: socket.socket) -> None:
        """Accept only while the plugin holds fewer than ``max_connections``: at the limit,
        further connections wait in the kernel's queue (the plugin's own), costing the
        supervisor nothing however hard the plugin knocks. A slot is taken only once a
        connection is waiting, so an idle listener holds none."""
        slots = self.proxy._slots(self.plugin_id)
        while True:
            await _readable(listener)
            if slots.locked() and not self._saturated:
                self._saturated = True
                log.warning("egress plugin=%s: %d connections to the proxy at once, the "
                            "limit; more wait until one closes", self.plugin_id,
                            self.proxy.max_connections)
            await slots.acquire()
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                slots.release()
                continue
            except BaseException:
                slots.release()
                raise
            if not slots.locked():
                self._saturated = False
            task = asyncio.ensure_future(self._serve(conn, slots))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- one client connection -------------------------------------------------------------------
    async def _serve(self, conn: socket.socket, slots: asyncio.Semaphore) -> None:
        counters = self.proxy.counters(self.plugin_id)
        counters.add(active=1)
        writer: asyncio.StreamWriter | None = None
        upstream: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=HEAD_LIMIT)
            try:
                async with asyncio.timeout(self.proxy.header_timeout):
                    request = await self._read_request(reader, writer)
            except TimeoutError:
                self._refuse("proxy", f"no complete request within "
                                      f"{self.proxy.header_timeout:g}s")
                return
            if request is None:
                return
            opened = await self._connect(request, writer)
            if opened is None:
                return
            up_reader, upstream = opened
            await self._splice(reader, writer, up_reader, upstream)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            counters.add(active=-1)
            slots.release()
            if writer is not None:
                writer.close()
            else:
                conn.close()
            if upstream is not None:
                upstream.close()

    def _refuse(self, via: str, reason: str) -> None:
        """A request refused before it named a target (malformed, unsupported, too slow)."""
        self.proxy._verdict(self.plugin_id, via, "-", "refused", reason)

    async def _read_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                            ) -> _Request | None:
        """The client's request, whichever protocol it speaks (None: answered already)."""
        first = await reader.readexactly(1)
        if first == b"\x05":
            return await self._socks5(reader, writer)
        if first == b"\x04":
            writer.write(b"\x00\x5b" + bytes(6))  # SOCKS4: request rejected
            self._refuse("socks4", "SOCKS4 is not supported; use SOCKS5 (socks5h://) or HTTP")
            return None
        return await self._http(first, reader, writer)

    async def _connect(self, request: _Request, writer: asyncio.StreamWriter
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Check and dial the target; answer the client in its protocol."""
        socks = request.via == "socks5"
        try:
            opened = await self.proxy.open(self.plugin_id, self.allow, request.via,
                                           request.host, request.port)
        except EgressRefused as exc:
            if socks:
                _socks_reply(writer, "refused")
            else:
                _http_reply(writer, 403, "Forbidden", f"egress refused: {exc}")
            return None
        except _Failed as exc:
            if socks:
                _socks_reply(writer, exc.kind if exc.kind in _SOCKS_REPLY else "failed")
            elif exc.kind == "timeout":
                _http_reply(writer, 504, "Gateway Timeout", str(exc))
            else:
                _http_reply(writer, 502, "Bad Gateway", str(exc))
            return None
        if socks:
            _socks_reply(writer, "ok")
        elif request.forward is None:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            opened[1].write(request.forward)
            self.proxy.counters(self.plugin_id).add(bytes_sent=len(request.forward))
        return opened

    # HTTP: CONNECT host:port, or an absolute-form request to forward.
    async def _http(self, first: bytes, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> _Request | None:
        try:
            head = first + await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return self._bad_http(writer, 431, "Request Header Fields Too Large",
                                  f"the request head is larger than {HEAD_LIMIT} bytes")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return self._bad_http(writer, 400, "Bad Request", "the egress proxy speaks HTTP/1.x "
                                  "(CONNECT or absolute-form requests) and SOCKS5")
        method, target, version = parts
        if method == "CONNECT":
            try:
                host, port = _split_target(target, None)
            except ValueError:
                return self._bad_http(writer, 400, "Bad Request",
                                      f"CONNECT needs host:port, not {target!r}")
            return _Request("http-connect", host, port)
        url = urlsplit(target)
        try:
            port = 80 if url.port is None else url.port
        except ValueError:
            port = 0
        if url.scheme != "http" or not url.hostname or not port:
            return self._bad_http(writer, 400, "Bad Request", f"{target!r} is not an absolute "
                                  "http:// URL (https goes through CONNECT)")
        # Forwarded as origin-form, one request per connection: a client reusing the
        # connection for another host must not reach it through this one's check. The Host
        # header is the checked URL's, so a shared server (a CDN) is asked for the checked
        # site, not whatever the client wrote there.
        kept = [h for h in lines[1:] if h
                and h.split(":", 1)[0].strip().lower() not in _HOP_BY_HOP | {"host"}]
        kept.insert(0, f"Host: {url.netloc.rpartition('@')[2]}")
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        forward = "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close", "", ""])
        return _Request("http", url.hostname, port, forward.encode("latin-1"))

    def _bad_http(self, writer: asyncio.StreamWriter, status: int, reason: str, detail: str
                  ) -> None:
        _http_reply(writer, status, reason, detail)
        self._refuse("http", detail)

    # SOCKS5 (RFC 1928): no authentication, CONNECT only.
    async def _socks5(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> _Request | None:
        methods = await reader.readexactly((await reader.readexactly(1))[0])
        if 0 not in methods:
            writer.write(b"\x05\xff")
            self._refuse("socks5", "the client offered no SOCKS5 method without "
                                   "authentication")
            return None
        writer.write(b"\x05\x00")
        version, command, _, kind = await reader.readexactly(4)
        if kind == 1:
            host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
        elif kind == 4:
            host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
        elif kind == 3:
            host = (await reader.readexactly((await reader.readexactly(1))[0])).decode(
                "utf-8", "replace")
        else:
            _socks_reply(writer, "address type")
            self._refuse("socks5", f"SOCKS5 address type {kind} is not one of 1, 3, 4")
            return None
        port = int.from_bytes(await reader.readexactly(2), "big")
        if version != 5 or command != 1:
            _socks_reply(writer, "command")
            self.proxy._verdict(self.plugin_id, "socks5", _show(host, port), "refused",
                                f"SOCKS5 command {command} is not supported (only CONNECT)")
            return None
        return _Request("socks5", host, port)

    # -- the tunnel ------------------------------------------------------------------------------
    async def _splice(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        """Copy both ways until both sides are done, or both have been idle too long."""
        loop = asyncio.get_running_loop()
        last = [loop.time()]
        counters = self.proxy.counters(self.plugin_id)
        idle = self.proxy.idle_timeout

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       count: Callable[[int], None]) -> None:
            try:
                while True:
                    try:
                        async with asyncio.timeout(idle):
                            data = await src.read(1 << 16)
                    except TimeoutError:
                        if loop.time() - last[0] < idle:
                            continue  # the other direction is busy
                        raise
                    if not data:
                        break
                    last[0] = loop.time()
                    count(len(data))
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof() and not dst.is_closing():
                    dst.write_eof()
            except TimeoutError:  # an OSError too: not the except below; _splice logs it
                raise
            except (ConnectionError, OSError):
                dst.transport.abort()

        await writer.drain()
        tasks = [asyncio.ensure_future(pipe(reader, up_writer,
                                            lambda n: counters.add(bytes_sent=n))),
                 asyncio.ensure_future(pipe(up_reader, writer,
                                            lambda n: counters.add(bytes_received=n)))]
        try:
            await asyncio.gather(*tasks)
        except TimeoutError:
            log.info("egress plugin=%s: closed a tunnel idle for %gs", self.plugin_id, idle)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
