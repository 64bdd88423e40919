"""The network policy end to end (issue 8): real sandboxed plugins, the real egress proxy of
the supervisor (sandbox/egress.py), and loopback servers the tests start.

Only loopback is used: an HTTP server on 127.0.0.2 and a TLS server on 127.0.0.3 (a test CA
made on the spot), and a hosts file the proxy reads (``egress_hosts_file``) naming the test
hosts (tests/egress_servers.py). The policy names those addresses explicitly; a name that
resolves to a range the policy does not list is refused.

What a user sees is what is asserted: the plugin-side error text (urllib's and curl's), the
proxy's log line on ``sandboxer.egress``, ``statistics().network``, the servers' hit counts
(a refused or bypassing request must not reach them), the supervisor's open fds.

Plugins are python plugins (urllib with the proxy from the environment, a small SOCKS5
client, raw sockets), and ordinary programs through ``sandboxer exec`` (curl, node). Most
tests share one manager loaded once for the module (small limits: 8 connections per plugin,
a 1s header timeout, a 1.5s idle timeout); the flood and cleanup tests have their own,
under ``no_leaks``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import pytest
import pytest_asyncio

from conftest import EXAMPLES, REPO
from egress_servers import HOST_ALLOWED_HOSTS, HTTP_ADDRESS, TLS_ADDRESS, LoopbackServers
from sandboxer import (
    HostConfig,
    LoadedPlugin,
    PluginCrashed,
    PluginLoadError,
    PluginManager,
    PluginState,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

MAX_CONNECTIONS = 8
HEADER_TIMEOUT = 1.0
IDLE_TIMEOUT = 1.5
PROXY_URL = "http://127.0.0.1:3128"
Log = pytest.LogCaptureFixture

# One plugin.py for every python plugin here; each manifest gives it other hosts.
PLUGIN_CODE = r'''
import errno, http.client, os, socket, ssl, stat, time, urllib.error, urllib.request

PROXY = ("127.0.0.1", 3128)
UNIX = "/run/sandboxer/egress.sock"
CA = "/plugin/ca.pem"
_held = []


def _errno(exc):
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


def ping():
    return "pong"


def environment():
    sock = os.stat(UNIX).st_mode if os.path.exists(UNIX) else None
    return {"env": {k: v for k, v in os.environ.items()
                    if "proxy" in k.lower() or k.startswith("SANDBOXER_EGRESS")},
            "socket": sock is not None and stat.S_ISSOCK(sock),
            "netns": os.readlink("/proc/self/ns/net")}


def get(url, data=None):
    """urllib, proxies from the environment as any Python program would."""
    context = ssl.create_default_context(cafile=CA) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, data=None if data is None else data.encode(),
                                    timeout=15, context=context) as r:
            body = r.read()
            return {"status": r.status, "body": body[:100].decode("latin-1"),
                    "length": len(body)}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "error": str(e), "body": e.read().decode("latin-1")}
    except urllib.error.URLError as e:
        return {"error": str(e)}


def _recv_exactly(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def socks_get(host, port, path="/hello", via="tcp", address_type="name"):
    """A minimal SOCKS5 client (RFC 1928, no auth, CONNECT), then HTTP/1.0 over it."""
    s = socket.socket(socket.AF_UNIX if via == "unix" else socket.AF_INET)
    s.settimeout(15)
    try:
        s.connect(UNIX if via == "unix" else PROXY)
        s.sendall(b"\x05\x01\x00")
        method = _recv_exactly(s, 2)
        if method != b"\x05\x00":
            return {"method": method.hex()}
        if address_type == "ipv4":
            target = b"\x01" + socket.inet_aton(host)
        else:
            target = b"\x03" + bytes([len(host)]) + host.encode()
        s.sendall(b"\x05\x01\x00" + target + port.to_bytes(2, "big"))
        reply = _recv_exactly(s, 10)
        if len(reply) < 2 or reply[1] != 0:
            return {"reply": reply[1] if len(reply) > 1 else None}
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return {"reply": 0, "response": data.decode("latin-1")}
    except OSError as e:
        return {"error": _errno(e)}
    finally:
        s.close()


def connect(host, port, family=socket.AF_INET):
    """Straight to host:port, no proxy: which syscall fails, and how."""
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        return {"stage": "socket", "errno": _errno(e)}
    try:
        s.settimeout(5)
        s.connect((host, port))
        return {"stage": "connect", "ok": "connected"}
    except OSError as e:
        return {"stage": "connect", "errno": _errno(e)}
    finally:
        s.close()


def raw(data_hex):
    """Send bytes to the proxy, read until it hangs up: the reply, hex."""
    s = socket.socket()
    s.settimeout(10)
    try:
        s.connect(PROXY)
        s.sendall(bytes.fromhex(data_hex))
        reply = b""
        while True:
            try:
                chunk = s.recv(65536)
            except OSError as e:
                return {"reply": reply.hex(), "how": _errno(e)}
            if not chunk:
                return {"reply": reply.hex(), "how": "eof"}
            reply += chunk
    finally:
        s.close()


def _alive(s):
    try:
        return s.recv(1, socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def flood(n_tcp, n_unix):
    """Open and hold many connections to the proxy, sending nothing: how many it opened."""
    for i in range(n_tcp + n_unix):
        unix = i >= n_tcp
        s = socket.socket(socket.AF_UNIX if unix else socket.AF_INET)
        try:
            s.connect(UNIX if unix else PROXY)
        except OSError:
            s.close()
            continue
        _held.append(s)
    return len(_held)


def alive():
    """How many of the held connections the proxy has not closed."""
    return sum(_alive(s) for s in _held)


def churn(seconds):
    """Connect and hang up as fast as it can for ``seconds`` (once the proxy's queue is full
    a connect waits: at most 0.2 s each): how many connects went through."""
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        s = socket.socket()
        s.settimeout(0.2)
        try:
            s.connect(PROXY)
            n += 1
        except OSError:
            pass
        finally:
            s.close()
    return n


def hold_tunnel(target):
    """CONNECT and keep the tunnel open (in _held) after the call returns."""
    s = socket.socket()
    s.connect(PROXY)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    _held.append(s)
    return head.decode("latin-1")


def release():
    for s in _held:
        s.close()
    n = len(_held)
    _held.clear()
    return n


def flood_and_exit(n):
    """Flood, give the proxy a moment to take its share, and die holding everything."""
    flood(n, n // 4)
    time.sleep(0.5)
    os._exit(3)


def slowloris(head, delay):
    """Send a request head one byte at a time; when did the proxy hang up, what did it say."""
    s = socket.socket()
    s.connect(PROXY)
    start, sent, got = time.monotonic(), 0, b""
    try:
        for byte in head.encode():
            try:
                s.send(bytes([byte]))
                sent += 1
                time.sleep(delay)
                chunk = s.recv(4096, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as e:
                return {"closed_after": time.monotonic() - start, "sent": sent,
                        "how": _errno(e), "got": got.decode("latin-1")}
            if not chunk:
                return {"closed_after": time.monotonic() - start, "sent": sent, "how": "eof",
                        "got": got.decode("latin-1")}
            got += chunk
        return {"closed_after": None, "sent": sent, "got": got.decode("latin-1")}
    finally:
        s.close()


def idle_tunnel(target):
    """CONNECT, then say nothing: how long until the proxy closes the tunnel."""
    s = socket.socket()
    s.connect(PROXY)
    try:
        s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            byte = s.recv(1)
            if not byte:
                break
            head += byte
        start = time.monotonic()
        s.settimeout(20)
        try:
            how = "eof" if not s.recv(4096) else "data"
        except OSError as e:
            how = _errno(e)
        return {"head": head.decode("latin-1"), "closed_after": time.monotonic() - start,
                "how": how}
    finally:
        s.close()


def busy_tunnel(host, port, rounds, pause):
    """One CONNECT tunnel, a keep-alive request every ``pause`` seconds through it."""
    conn = http.client.HTTPConnection(*PROXY, timeout=15)
    conn.set_tunnel(host, port)
    bodies = []
    try:
        for _ in range(rounds):
            conn.request("GET", "/hello")
            bodies.append(conn.getresponse().read().decode())
            time.sleep(pause)
    except (OSError, http.client.HTTPException) as e:
        bodies.append(f"error: {type(e).__name__}: {e}")
    finally:
        conn.close()
    return bodies
'''


def write_plugin(root: Path, plugin_id: str, ca_file: Path, sandbox: str = "") -> Path:
    root.mkdir(parents=True)
    (root / "plugin.py").write_text(PLUGIN_CODE)
    (root / "plugin.toml").write_text(
        f'[plugin]\nid = "{plugin_id}"\nversion = "1.0.0"\ntype = "python"\n'
        f'entrypoint = "plugin.py"\n{sandbox}')
    shutil.copy(ca_file, root / "ca.pem")
    return root


def hosts(*patterns: str) -> str:
    listed = ", ".join(f'"{p}"' for p in patterns)
    return f"[sandbox]\nnetwork_allowed = true\nallowed_hosts = [{listed}]\n"


# The main plugin's list: the names the tests reach and the servers' addresses, explicitly.
NET_HOSTS = ("allowed.test", "tls.test", "*.wild.test", "rebind.test", "mapped.test",
             HTTP_ADDRESS, TLS_ADDRESS)
# Names listed, their addresses not: each resolves to a range refused unless listed.
NAMES_HOSTS = ("rebind.test", "private.test", "metadata.test", "mapped.test", "allowed.test")


def egress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sandboxer.egress"]


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def our_egress_dirs() -> set[str]:
    """The proxy's runtime dirs (/tmp/sandboxer-egress-*) holding a Unix socket this process
    has open: this supervisor's, not those of any other sandboxer running on the machine."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    with open("/proc/net/unix") as f:
        rows = [line.split() for line in f.read().splitlines()[1:]]
    return {os.path.dirname(row[7]) for row in rows
            if len(row) > 7 and row[6] in inodes
            and os.path.basename(os.path.dirname(row[7])).startswith("sandboxer-egress-")}


def seen(plugin: LoadedPlugin) -> int:
    """How many of the plugin's connections the proxy has taken up (kept or refused)."""
    network = plugin.statistics().network or {}
    return network.get("active", 0) + network.get("refused", 0)


def closed_port(address: str) -> int:
    """A port on ``address`` nothing listens on."""
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


# -- fixtures --------------------------------------------------------------------------------

@pytest_asyncio.fixture(scope="module", loop_scope="module", autouse=True)
async def _module_event_loop() -> AsyncIterator[None]:
    """The module's event loop exists before any function-scoped fixture, so that
    ``no_leaks`` never counts the loop's own fds."""
    yield


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackServers]:
    found = LoopbackServers(tmp_path_factory.mktemp("egress-servers"))
    try:
        yield found
    finally:
        found.stop()


@pytest.fixture(scope="module")
def plugin_dirs(tmp_path_factory: pytest.TempPathFactory,
                servers: LoopbackServers) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("egress-plugins")
    made = {
        "net": hosts(*NET_HOSTS),
        "names": hosts(*NAMES_HOSTS),
        "counted": hosts("allowed.test", HTTP_ADDRESS),
        "loris": hosts("allowed.test", HTTP_ADDRESS),
        "flooder": hosts("allowed.test", HTTP_ADDRESS),
        "other": hosts("allowed.test", HTTP_ADDRESS),
        "offline": "",
        "wide": "[sandbox]\nnetwork_allowed = true\n",
    }
    return {name: write_plugin(base / name, name, servers.ca_file, sandbox)
            for name, sandbox in made.items()}


def host_config(servers: LoopbackServers, **changes: Any) -> HostConfig:
    # No warm sandboxes: plugins behind the proxy never start warm, and the tests count the
    # supervisor's fds while the manager runs.
    return HostConfig(**{"warm_sandboxes": 0,
                         "egress_hosts_file": str(servers.hosts_file),
                         "allowed_hosts": HOST_ALLOWED_HOSTS,
                         "egress_max_connections": MAX_CONNECTIONS,
                         "egress_header_timeout": HEADER_TIMEOUT,
                         "egress_idle_timeout": IDLE_TIMEOUT, **changes})


@dataclass
class Loaded:
    manager: PluginManager
    servers: LoopbackServers
    net: LoadedPlugin
    names: LoadedPlugin
    counted: LoadedPlugin
    loris: LoadedPlugin
    offline: LoadedPlugin

    @property
    def http(self) -> str:
        return f"allowed.test:{self.servers.http.port}"

    @property
    def tls(self) -> str:
        return f"tls.test:{self.servers.tls.port}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def loaded(servers: LoopbackServers, plugin_dirs: dict[str, Path]
                 ) -> AsyncIterator[Loaded]:
    manager = PluginManager(host_config(servers))
    try:
        plugins = [await manager.load(plugin_dirs[name])
                   for name in ("net", "names", "counted", "loris", "offline")]
        yield Loaded(manager, servers, *plugins)
    finally:
        await manager.aclose()


@pytest.fixture
def egress_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="sandboxer.egress")
    return caplog


# -- allowed hosts work through the proxy ----------------------------------------------------

async def test_env_names_the_proxy_and_the_socket_is_there(loaded: Loaded) -> None:
    seen = await loaded.net.call("environment")
    socks = "socks5h://127.0.0.1:3128"
    assert seen["env"] == {
        "http_proxy": PROXY_URL, "HTTP_PROXY": PROXY_URL,
        "https_proxy": PROXY_URL, "HTTPS_PROXY": PROXY_URL,
        "all_proxy": socks, "ALL_PROXY": socks,
        "SANDBOXER_EGRESS_SOCKET": "/run/sandboxer/egress.sock"}
    assert seen["socket"] is True
    assert seen["netns"] != os.readlink("/proc/self/ns/net")  # its own net namespace
    offline = await loaded.offline.call("environment")
    assert offline["env"] == {} and offline["socket"] is False


async def test_plain_http_to_an_allowed_host(loaded: Loaded, egress_log: Log) -> None:
    hits = loaded.servers.http.hits
    got = await loaded.net.call("get", f"http://{loaded.http}/hello")
    assert got == {"status": 200, "body": "hello from http", "length": 15}
    assert loaded.servers.http.hits == hits + 1
    assert f"egress plugin=net via=http target={loaded.http} verdict=allowed " \
           f"(connected to {HTTP_ADDRESS})" in egress_lines(egress_log)


async def test_plain_http_goes_upstream_with_the_checked_host(loaded: Loaded) -> None:
    """The server is asked for the URL the policy checked, whatever Host the client wrote;
    hop-by-hop headers stay with the proxy."""
    request = (f"GET http://{loaded.http}/headers HTTP/1.1\r\nHost: elsewhere.test\r\n"
               "Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eDp5\r\n"
               "X-Kept: yes\r\n\r\n")
    got = await loaded.net.call("raw", request.encode().hex())
    head, _, body = bytes.fromhex(got["reply"]).decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200 OK\r\n"), head
    seen = json.loads(body)
    assert seen["Host"] == loaded.http and seen["X-Kept"] == "yes", seen
    assert not {"Proxy-Connection", "Proxy-Authorization"} & set(seen), seen


async def test_https_through_connect_to_an_allowed_host(loaded: Loaded, egress_log: Log) -> None:
    """urllib tunnels https through CONNECT; TLS is end to end (the plugin checks the test
    CA's certificate for tls.test)."""
    hits = loaded.servers.tls.hits
    got = await loaded.net.call("get", f"https://{loaded.tls}/hello")
    assert got == {"status": 200, "body": "hello from tls", "length": 14}
    assert loaded.servers.tls.hits == hits + 1
    assert f"egress plugin=net via=http-connect target={loaded.tls} verdict=allowed " \
           f"(connected to {TLS_ADDRESS})" in egress_lines(egress_log)


@pytest.mark.parametrize("via", ["tcp", "unix"])
async def test_socks5_to_an_allowed_host(loaded: Loaded, egress_log: Log, via: str) -> None:
    """SOCKS5 with the name resolved by the proxy, on 127.0.0.1:3128 and on the Unix socket
    at /run/sandboxer/egress.sock."""
    port = loaded.servers.http.port
    got = await loaded.net.call("socks_get", "allowed.test", port, "/hello", via)
    assert got["reply"] == 0, got
    assert got["response"].startswith("HTTP/1.1 200 OK\r\n"), got
    assert got["response"].endswith("\r\n\r\nhello from http"), got
    assert f"egress plugin=net via=socks5 target={loaded.http} verdict=allowed " \
           f"(connected to {HTTP_ADDRESS})" in egress_lines(egress_log)


async def test_socks5_to_a_listed_address(loaded: Loaded) -> None:
    got = await loaded.net.call("socks_get", HTTP_ADDRESS, loaded.servers.http.port, "/hello",
                                "tcp", "ipv4")
    assert got["reply"] == 0 and got["response"].endswith("hello from http"), got


# -- refused: unlisted hosts, wildcards, names resolving to refused ranges -------------------

async def test_unlisted_host_over_http_is_refused_with_a_clear_error(loaded: Loaded,
                                                                      egress_log: Log) -> None:
    port = loaded.servers.http.port
    hits = loaded.servers.http.hits
    got = await loaded.net.call("get", f"http://badwild.test:{port}/hello")
    reason = f"badwild.test:{port} is not in allowed_hosts"
    assert got["status"] == 403
    assert got["error"] == f"HTTP Error 403: Forbidden (sandboxer: egress refused: {reason})"
    assert got["body"] == f"sandboxer: egress refused: {reason}\n"
    assert f"egress plugin=net via=http target=badwild.test:{port} verdict=refused " \
           f"({reason})" in egress_lines(egress_log)
    assert loaded.servers.http.hits == hits


async def test_unlisted_host_over_connect_is_refused_with_a_clear_error(loaded: Loaded,
                                                                         egress_log: Log) -> None:
    port = loaded.servers.tls.port
    got = await loaded.net.call("get", f"https://unlisted.test:{port}/hello")
    reason = f"unlisted.test:{port} is not in allowed_hosts"
    assert got == {"error": "<urlopen error Tunnel connection failed: 403 Forbidden "
                            f"(sandboxer: egress refused: {reason})>"}
    assert f"egress plugin=net via=http-connect target=unlisted.test:{port} verdict=refused " \
           f"({reason})" in egress_lines(egress_log)


async def test_unlisted_host_over_socks5_is_refused(loaded: Loaded, egress_log: Log) -> None:
    port = loaded.servers.http.port
    got = await loaded.net.call("socks_get", "unlisted.test", port)
    assert got == {"reply": 2}  # "connection not allowed by ruleset"
    assert f"egress plugin=net via=socks5 target=unlisted.test:{port} verdict=refused " \
           f"(unlisted.test:{port} is not in allowed_hosts)" in egress_lines(egress_log)


async def test_unlisted_address_literal_is_refused(loaded: Loaded, egress_log: Log) -> None:
    """127.0.0.4 is loopback like the listed 127.0.0.2, but not listed."""
    port = loaded.servers.http.port
    got = await loaded.net.call("get", f"http://127.0.0.4:{port}/hello")
    reason = (f"127.0.0.4:{port} is not in allowed_hosts (an IP address is reachable only "
              "when allowed_hosts lists it)")
    assert got["error"] == f"HTTP Error 403: Forbidden (sandboxer: egress refused: {reason})"
    assert f"egress plugin=net via=http target=127.0.0.4:{port} verdict=refused ({reason})" \
        in egress_lines(egress_log)


@pytest.mark.parametrize("host", [
    "[::1]",
    "[::ffff:127.0.0.4]",  # an unlisted IPv4 address, spelled as IPv4-mapped IPv6
    "2130706434",          # the listed 127.0.0.2 as one decimal number: a name, unlisted
    "0x7f.0.0.2",          # ... in hex: likewise
    "127.2",               # ... shortened: likewise
], ids=["ipv6-loopback", "ipv4-mapped-unlisted", "decimal-spelling", "hex-spelling",
        "short-spelling"])
async def test_unlisted_and_respelled_addresses_are_refused(loaded: Loaded, host: str) -> None:
    """Other spellings of an address never reach it: the system resolver would turn
    2130706434 into 127.0.0.2, but the proxy checks the name first and resolves nothing."""
    hits = loaded.servers.http.hits
    got = await loaded.net.call("get", f"http://{host}:{loaded.servers.http.port}/hello")
    assert got["status"] == 403, got
    assert got["error"].startswith("HTTP Error 403: Forbidden (sandboxer: egress refused: ")
    assert "is not in allowed_hosts" in got["error"], got
    assert loaded.servers.http.hits == hits


def _socks4(port: int) -> bytes:
    return b"\x04\x01" + port.to_bytes(2, "big") + socket.inet_aton(HTTP_ADDRESS) + b"\x00"


def _socks5_command(command: int, port: int) -> bytes:
    return b"\x05\x01\x00\x05" + bytes([command, 0, 1]) + socket.inet_aton(HTTP_ADDRESS) \
        + port.to_bytes(2, "big")


# (what the client sends, given the HTTP server's port; what the proxy answers, as it starts)
BAD_REQUESTS = {
    "socks4": (_socks4, b"\x00\x5b"),
    "socks5-bind": (lambda port: _socks5_command(2, port), b"\x05\x00\x05\x07"),
    "socks5-udp-associate": (lambda port: _socks5_command(3, port), b"\x05\x00\x05\x07"),
    "socks5-auth-only": (lambda port: b"\x05\x01\x02", b"\x05\xff"),
    "socks5-bad-address-type": (lambda port: b"\x05\x01\x00\x05\x01\x00\x09",
                                b"\x05\x00\x05\x08"),
    "not-http": (lambda port: b"HELLO THERE\r\n\r\n", b"HTTP/1.1 400 Bad Request (sandboxer: "
                 b"the egress proxy speaks HTTP/1.x"),
    "https-absolute-form": (lambda port: f"GET https://allowed.test:{port}/ HTTP/1.1\r\n"
                            f"\r\n".encode(), b"HTTP/1.1 400 Bad Request (sandboxer: "),
    "origin-form": (lambda port: b"GET /hello HTTP/1.1\r\nHost: allowed.test\r\n\r\n",
                    b"HTTP/1.1 400 Bad Request (sandboxer: '/hello' is not an absolute"),
    "connect-without-port": (lambda port: b"CONNECT allowed.test HTTP/1.1\r\n\r\n",
                             b"HTTP/1.1 400 Bad Request (sandboxer: CONNECT needs host:port"),
    "connect-port-zero": (lambda port: b"CONNECT allowed.test:0 HTTP/1.1\r\n\r\n",
                          b"HTTP/1.1 400 Bad Request (sandboxer: CONNECT needs host:port"),
    "http2-preface": (lambda port: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                      b"HTTP/1.1 400 Bad Request (sandboxer: "),
    "oversized-head": (lambda port: f"GET http://allowed.test:{port}/ HTTP/1.1\r\n"
                       f"X-Fill: {'a' * 20000}\r\n\r\n".encode(),
                       b"HTTP/1.1 431 Request Header Fields Too Large (sandboxer: "),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
async def test_bad_requests_get_an_answer_and_reach_nothing(loaded: Loaded, case: str) -> None:
    build, answer = BAD_REQUESTS[case]
    hits = loaded.servers.http.hits
    got = await loaded.net.call("raw", build(loaded.servers.http.port).hex())
    reply = bytes.fromhex(got["reply"])
    assert reply.startswith(answer), (reply, got["how"])
    assert got["how"] == "eof", got  # the proxy hangs up after answering
    assert loaded.servers.http.hits == hits


FORGED = "egress plugin=victim via=socks5 target=bank.test:443 verdict=allowed (connected " \
         "to 203.0.113.7)"


@pytest.mark.parametrize("via", ["socks5", "http-connect"])
async def test_a_target_cannot_forge_a_log_line(loaded: Loaded, egress_log: Log,
                                                via: str) -> None:
    """A target name carrying a line break is refused, and its log line stays one line: the
    host's log must not show a second, forged verdict for another plugin."""
    if via == "socks5":  # a SOCKS5 domain name is any 1-255 bytes
        name = f"x\n{FORGED}\nx".encode()
        request = b"\x05\x01\x00\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x01\xbb"
        answer = b"\x05\x00\x05\x02"
    else:  # the request line splits on spaces and ends at CRLF, not LF; one colon only
        forged = FORGED.split(":")[0].replace(" ", "\t")
        request = f"CONNECT x\n{forged}\nx:443 HTTP/1.1\r\n\r\n".encode()
        answer = b"HTTP/1.1 403 Forbidden (sandboxer: egress refused: "
    got = await loaded.net.call("raw", request.hex())
    assert bytes.fromhex(got["reply"]).startswith(answer), got
    lines = [line for line in egress_lines(egress_log) if "bank.test" in line]
    assert len(lines) == 1 and f"egress plugin=net via={via} target=" in lines[0], lines
    assert "verdict=refused" in lines[0] and "is not a valid host name" in lines[0], lines
    assert "\n" not in lines[0], f"a plugin wrote lines into the host's log: {lines[0]!r}"


@pytest.mark.parametrize(("name", "allowed"), [
    ("a.wild.test", True),
    ("deep.a.wild.test", True),
    ("wild.test", False),       # *.wild.test never covers the suffix itself
    ("badwild.test", False),    # nor a name that merely ends in the same letters
], ids=["one-label-below", "two-labels-below", "the-suffix-itself", "same-ending-letters"])
async def test_wildcard_rules(loaded: Loaded, egress_log: Log, name: str, allowed: bool) -> None:
    port = loaded.servers.http.port
    got = await loaded.net.call("get", f"http://{name}:{port}/hello")
    verdicts = [line for line in egress_lines(egress_log) if f"target={name}:{port}" in line]
    if allowed:
        assert got["status"] == 200 and got["body"] == "hello from http", got
        assert verdicts == [f"egress plugin=net via=http target={name}:{port} verdict=allowed "
                            f"(connected to {HTTP_ADDRESS})"]
    else:
        assert got["status"] == 403, got
        assert got["error"].endswith(f"{name}:{port} is not in allowed_hosts)"), got
        assert len(verdicts) == 1 and "verdict=refused" in verdicts[0], verdicts


@pytest.mark.parametrize(("name", "resolved"), [
    ("rebind.test", f"{HTTP_ADDRESS} (loopback)"),
    ("private.test", "10.11.12.13 (private)"),
    ("metadata.test", "169.254.169.254 (link-local)"),
    ("mapped.test", f"::ffff:{HTTP_ADDRESS} (loopback)"),
], ids=["loopback", "private", "link-local", "ipv4-mapped-loopback"])
@pytest.mark.parametrize("via", ["http", "socks5"])
async def test_listed_name_resolving_to_a_refused_range(loaded: Loaded, egress_log: Log, name: str,
                                                        resolved: str, via: str) -> None:
    """The names plugin lists each name but no address: the hosts file sends them to
    loopback, private, link-local ranges, so the proxy refuses (and dials nothing)."""
    port = loaded.servers.http.port
    hits = loaded.servers.http.hits
    reason = (f"{name} resolves to {resolved}, which is refused unless allowed_hosts lists "
              "that address or range (DNS rebinding protection)")
    if via == "http":
        got = await loaded.names.call("get", f"http://{name}:{port}/hello")
        assert got["status"] == 403, got
        assert got["error"] == f"HTTP Error 403: Forbidden (sandboxer: egress refused: {reason})"
    else:
        assert await loaded.names.call("socks_get", name, port) == {"reply": 2}
    assert f"egress plugin=names via={via} target={name}:{port} verdict=refused ({reason})" \
        in egress_lines(egress_log)
    assert loaded.servers.http.hits == hits


@pytest.mark.parametrize("name", ["rebind.test", "mapped.test"])
async def test_a_name_resolving_to_a_listed_address_is_reached(loaded: Loaded, egress_log: Log,
                                                               name: str) -> None:
    """The control for the test above: net lists the same names and also 127.0.0.2, so the
    same hosts file entries lead to the server."""
    port = loaded.servers.http.port
    got = await loaded.net.call("get", f"http://{name}:{port}/hello")
    assert got["status"] == 200 and got["body"] == "hello from http", got
    assert any(line.startswith(f"egress plugin=net via=http target={name}:{port} "
                               "verdict=allowed") for line in egress_lines(egress_log))


# -- bypassing the proxy ---------------------------------------------------------------------

async def test_direct_connections_bypassing_the_proxy_fail(loaded: Loaded) -> None:
    """Proxy mode: inet sockets may be made (the filter allows them), but the namespace holds
    only loopback with the proxy's port on it: the servers' addresses refuse, the world is
    unreachable, and the servers saw nothing."""
    hits = loaded.servers.http.hits, loaded.servers.tls.hits
    http = await loaded.net.call("connect", HTTP_ADDRESS, loaded.servers.http.port)
    tls = await loaded.net.call("connect", TLS_ADDRESS, loaded.servers.tls.port)
    world = await loaded.net.call("connect", "1.1.1.1", 80)
    metadata = await loaded.net.call("connect", "169.254.169.254", 80)
    assert http == {"stage": "connect", "errno": "ECONNREFUSED"}
    assert tls == {"stage": "connect", "errno": "ECONNREFUSED"}
    assert world == {"stage": "connect", "errno": "ENETUNREACH"}
    assert metadata == {"stage": "connect", "errno": "ENETUNREACH"}
    assert (loaded.servers.http.hits, loaded.servers.tls.hits) == hits
    # the control: the proxy's own port is the one thing there
    assert await loaded.net.call("connect", "127.0.0.1", 3128) == \
        {"stage": "connect", "ok": "connected"}


async def test_without_network_there_is_no_proxy_and_only_loopback(loaded: Loaded) -> None:
    """The socket is made (the namespace holds only the plugin's own loopback), and nothing
    listens on the proxy's port there; other addresses are unreachable."""
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        got = await loaded.offline.call("connect", address, 3128, family)
        assert got["stage"] == "connect" and got["errno"] == "ECONNREFUSED", got
    got = await loaded.offline.call("connect", "1.1.1.1", 443, socket.AF_INET)
    assert got["stage"] == "connect" and got["errno"] == "ENETUNREACH", got


async def test_network_without_hosts_is_refused_unless_the_host_allows_it(
        servers: LoopbackServers, plugin_dirs: dict[str, Path]) -> None:
    async with PluginManager(host_config(servers)) as mgr:
        with pytest.raises(PluginLoadError) as info:
            await mgr.load(plugin_dirs["wide"])
        assert "asks for the full network (network_allowed without allowed_hosts) and the " \
               "host policy does not allow it" in str(info.value)
        assert await mgr.list() == []


async def test_full_network_when_the_host_allows_it(servers: LoopbackServers,
                                                    plugin_dirs: dict[str, Path]) -> None:
    """allow_full_network: the host's net namespace, no proxy in the environment, and the
    loopback server reached directly."""
    async with PluginManager(host_config(servers, allow_full_network=True)) as mgr:
        wide = await mgr.load(plugin_dirs["wide"])
        seen = await wide.call("environment")
        assert seen["env"] == {} and seen["socket"] is False
        assert seen["netns"] == os.readlink("/proc/self/ns/net")
        hits = servers.http.hits
        got = await wide.call("get", f"http://{HTTP_ADDRESS}:{servers.http.port}/hello")
        assert got == {"status": 200, "body": "hello from http", "length": 15}
        assert servers.http.hits == hits + 1
        # allowed.test is in the proxy's hosts file, not the system's: without a proxy in
        # the way the plugin resolves names itself, and this one it cannot
        got = await wide.call("get", f"http://allowed.test:{servers.http.port}/hello")
        assert "error" in got and "status" not in got, got
        assert wide.statistics().network is None  # no proxy, nothing counted


# -- counters ---------------------------------------------------------------------------------

async def test_statistics_count_what_happened(loaded: Loaded) -> None:
    counted = loaded.counted
    assert counted.statistics().network == {  # proxied, nothing tried yet
        "allowed": 0, "refused": 0, "failed": 0, "active": 0, "bytesSent": 0,
        "bytesReceived": 0}
    port = loaded.servers.http.port
    big = await counted.call("get", f"http://allowed.test:{port}/big?n=100000")
    assert big["status"] == 200 and big["length"] == 100_000
    posted = await counted.call("get", f"http://allowed.test:{port}/echo", "p" * 5000)
    assert posted["status"] == 200 and posted["length"] == 5000
    refused = await counted.call("get", f"http://badwild.test:{port}/")
    assert refused["status"] == 403
    dead = closed_port(HTTP_ADDRESS)
    failed = await counted.call("get", f"http://allowed.test:{dead}/")
    assert failed["status"] == 502, failed
    assert failed["error"].startswith("HTTP Error 502: Bad Gateway (sandboxer: connecting to "
                                      f"{HTTP_ADDRESS}:{dead} failed: "), failed
    await until(lambda: counted.statistics().network["active"] == 0, 5, "connections closed")
    network = counted.statistics().network
    assert {k: network[k] for k in ("allowed", "refused", "failed", "active")} == \
        {"allowed": 2, "refused": 1, "failed": 1, "active": 0}
    # request bodies out; response heads and bodies back (the proxy's own replies are not
    # traffic)
    assert 5000 <= network["bytesSent"] < 6000, network
    assert 105_000 <= network["bytesReceived"] < 106_000, network
    assert counted.statistics().to_json()["network"] == network
    assert loaded.offline.statistics().network is None


# -- slow and idle clients --------------------------------------------------------------------

async def test_slowloris_is_cut_off_while_others_are_served(loaded: Loaded,
                                                            egress_log: Log) -> None:
    head = f"CONNECT {loaded.http} HTTP/1.1\r\nHost: {loaded.http}\r\n\r\n"
    loris = asyncio.ensure_future(loaded.loris.call("slowloris", head, 0.1))
    served = []
    start = time.monotonic()
    while not loris.done() and time.monotonic() - start < 10:
        served.append(await loaded.net.call("get", f"http://{loaded.http}/hello"))
        await asyncio.sleep(0.1)
    result = await loris
    assert result["closed_after"] is not None, f"never cut off: {result}"
    assert HEADER_TIMEOUT - 0.1 <= result["closed_after"] <= HEADER_TIMEOUT + 1.5, result
    assert result["sent"] < len(head) and result["got"] == "", result
    assert len(served) >= 3 and all(s.get("body") == "hello from http" for s in served), served
    assert f"egress plugin=loris via=proxy target=- verdict=refused (no complete request " \
           f"within {HEADER_TIMEOUT:g}s)" in egress_lines(egress_log)
    assert loaded.loris.statistics().network["refused"] >= 1


async def test_an_idle_tunnel_is_closed_and_logged(loaded: Loaded, egress_log: Log) -> None:
    got = await loaded.loris.call("idle_tunnel", loaded.http)
    assert got["head"] == "HTTP/1.1 200 Connection established\r\n\r\n", got
    assert IDLE_TIMEOUT - 0.1 <= got["closed_after"] <= IDLE_TIMEOUT + 2, got
    assert got["how"] in ("eof", "ECONNRESET"), got
    await until(lambda: loaded.loris.statistics().network["active"] == 0, 2)
    assert f"egress plugin=loris: closed a tunnel idle for {IDLE_TIMEOUT:g}s" \
        in egress_lines(egress_log)


async def test_a_busy_tunnel_outlives_the_idle_timeout(loaded: Loaded, egress_log: Log) -> None:
    """Requests every 0.5s through one keep-alive tunnel, for longer than the idle timeout:
    one CONNECT, every request answered."""
    rounds = 5
    bodies = await loaded.loris.call("busy_tunnel", "allowed.test", loaded.servers.http.port,
                                     rounds, 0.5)
    assert bodies == ["hello from http"] * rounds
    connects = [line for line in egress_lines(egress_log)
                if line.startswith("egress plugin=loris via=http-connect")]
    assert len(connects) == 1, connects


# -- flood --------------------------------------------------------------------------------------

async def test_a_flood_is_bounded_and_spares_everyone_else(
        servers: LoopbackServers, plugin_dirs: dict[str, Path], no_leaks: None,
        egress_log: Log) -> None:
    """One plugin opens 60 connections to the proxy (TCP and Unix) and holds them: the proxy
    takes egress_max_connections of them and accepts no more until one closes (the rest wait
    in the kernel's queue, the flooder's problem alone); the supervisor's fds stay bounded;
    a second plugin's requests, a neighbour's calls and the flooder's own RPC go on, also
    while it keeps knocking. Once it lets go, its queued connections drain and its own next
    request is served. Afterwards nothing is left, the proxy's runtime dir included."""
    others = our_egress_dirs()  # the module's manager's
    # header timeout long: the held connections stay until the flooder lets go
    async with PluginManager(host_config(servers, egress_header_timeout=30.0)) as mgr:
        neighbour = await mgr.load(EXAMPLES / "hello")
        flooder = await mgr.load(plugin_dirs["flooder"])
        other = await mgr.load(plugin_dirs["other"])
        assert await other.call("get", f"http://allowed.test:{servers.http.port}/hello") == \
            {"status": 200, "body": "hello from http", "length": 15}
        await until(lambda: other.statistics().network["active"] == 0)
        fds = open_fds()

        assert await flooder.call("flood", 45, 15) == 60
        await until(lambda: flooder.statistics().network["active"] == MAX_CONNECTIONS, 10,
                    "the proxy took its share of the flood")
        await asyncio.sleep(0.3)
        assert flooder.statistics().network["active"] == MAX_CONNECTIONS, "took more"
        assert open_fds() - fds <= MAX_CONNECTIONS + 4, "the supervisor holds the flood"
        limit = [line for line in egress_lines(egress_log)
                 if line == f"egress plugin=flooder: {MAX_CONNECTIONS} connections to the "
                            "proxy at once, the limit; more wait until one closes"]
        assert len(limit) == 1, "the limit is logged once, not once per connection"

        # while the flooder holds its connections and keeps knocking for 1.5s more
        knocking = asyncio.ensure_future(flooder.call("churn", 1.5, timeout=30))
        slowest, served = 0.0, 0
        while not knocking.done():
            start = time.monotonic()
            got = await other.call("get", f"http://allowed.test:{servers.http.port}/hello")
            assert got["body"] == "hello from http", got
            assert await neighbour.call("greet", "world") == "Hello, world!"
            slowest, served = max(slowest, time.monotonic() - start), served + 1
        await knocking
        assert served >= 3, served
        assert slowest < 1.0, f"a request took {slowest:.2f}s during the flood"
        assert flooder.statistics().network["active"] == MAX_CONNECTIONS
        assert open_fds() - fds <= MAX_CONNECTIONS + 4, "the supervisor holds the flood"
        got = await other.call("socks_get", "allowed.test", servers.http.port, "/hello", "unix")
        assert got["reply"] == 0 and got["response"].endswith("hello from http"), got
        assert await neighbour.call("greet", "world") == "Hello, world!"
        assert await flooder.call("ping") == "pong"
        assert other.statistics().network["refused"] == 0

        assert await flooder.call("release") == 60
        await until(lambda: flooder.statistics().network["active"] == 0, 10, "flood drained")
        got = await flooder.call("get", f"http://allowed.test:{servers.http.port}/hello")
        assert got["body"] == "hello from http", got
        await until(lambda: open_fds() <= fds, 5, "the supervisor's fds back to before")
        egress_dirs = our_egress_dirs() - others
        assert len(egress_dirs) == 1 and os.path.isdir(*egress_dirs), egress_dirs
        assert len(os.listdir(*egress_dirs)) == 2  # a socket for each proxied plugin
        for plugin in (flooder, other, neighbour):
            await mgr.unload(plugin.id)
        assert not os.path.exists(*egress_dirs), "the egress dir outlived its plugins"
    await until(lambda: not LoopbackServers.busy(), 5, "server-side connections closed")


async def test_a_plugin_that_floods_and_exits_leaves_nothing_behind(
        servers: LoopbackServers, plugin_dirs: dict[str, Path], no_leaks: None) -> None:
    """The plugin dies holding its connections, accepted and queued: the proxy notices
    (nothing active), the supervisor's fds, the egress dir, the cgroup, the processes and
    mounts all go."""
    others = our_egress_dirs()  # the module's manager's
    async with PluginManager(host_config(servers, egress_header_timeout=30.0)) as mgr:
        fds = open_fds()
        flooder = await mgr.load(plugin_dirs["flooder"])
        egress_dirs = our_egress_dirs() - others
        assert len(egress_dirs) == 1, egress_dirs
        with pytest.raises(PluginCrashed):
            await flooder.call("flood_and_exit", 40)
        await until(lambda: flooder.statistics().network["active"] == 0, 5,
                    "the dead plugin's connections closed")
        await until(lambda: flooder.state is not PluginState.READY, 5)
        await mgr.unload(flooder.id)
        await until(lambda: open_fds() <= fds, 5, "the supervisor's fds back to before")
    assert not os.path.exists(*egress_dirs), "the egress dir outlived its plugin"


async def test_proxied_plugin_unload_leaves_nothing_behind(
        servers: LoopbackServers, plugin_dirs: dict[str, Path], no_leaks: None) -> None:
    """Load, use (refused, SOCKS over the Unix socket, a tunnel left open), unload, twice:
    the egress dir goes with the plugin, the open tunnel is closed."""
    others = our_egress_dirs()  # the module's manager's
    async with PluginManager(host_config(servers)) as mgr:
        for _ in range(2):
            other = await mgr.load(plugin_dirs["other"])
            refused = await other.call("get", f"https://tls.test:{servers.tls.port}/hello")
            assert "403 Forbidden" in refused["error"], refused  # tls.test is not in its list
            got = await other.call("socks_get", "allowed.test", servers.http.port)
            assert got["reply"] == 0
            # unloaded with a tunnel open
            head = await other.call("hold_tunnel", f"allowed.test:{servers.http.port}")
            assert head == "HTTP/1.1 200 Connection established\r\n\r\n"
            assert other.statistics().network["active"] == 1
            egress_dirs = our_egress_dirs() - others
            assert len(egress_dirs) == 1, egress_dirs
            await mgr.unload(other.id)
            assert not os.path.exists(*egress_dirs), "the egress dir outlived its plugin"
            await until(lambda: other.statistics().network["active"] == 0, 5)
    await until(lambda: not LoopbackServers.busy(), 5, "server-side connections closed")


# -- ordinary programs: sandboxer exec ---------------------------------------------------------

@pytest.fixture(scope="module")
def exec_dir(servers: LoopbackServers) -> Iterator[Path]:
    """World-readable (the program runs as an unprivileged uid): the CA for curl, the host
    config naming the hosts file."""
    path = Path(tempfile.mkdtemp(prefix="sandboxer-egress-test-", dir="/var/tmp"))
    path.chmod(0o755)
    shutil.copy(servers.ca_file, path / "ca.pem")
    (path / "ca.pem").chmod(0o644)
    (path / "sandboxer.toml").write_text(f'[host]\negress_hosts_file = "{servers.hosts_file}"\n')
    yield path
    shutil.rmtree(path)


async def sandboxer_exec(exec_dir: Path, script: str, *options: str
                         ) -> subprocess.CompletedProcess[str]:
    """``sandboxer exec`` in a child process, off the event loop."""
    env = {**os.environ, "SANDBOXER_CONFIG": str(exec_dir / "sandboxer.toml")}
    return await asyncio.to_thread(
        subprocess.run,[sys.executable, "-m", "sandboxer.cli", "exec", *options,
                           "--allow-path", str(exec_dir), "--", "/bin/sh", "-c", script],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


async def test_exec_curl_and_node_go_through_the_proxy(servers: LoopbackServers,
                                                 exec_dir: Path) -> None:
    http, tls = f"allowed.test:{servers.http.port}", f"tls.test:{servers.tls.port}"
    ca = exec_dir / "ca.pem"
    node = ("require('http').get({host: '127.0.0.1', port: 3128, path: 'http://%s/hello'}, "
            "r => { let b = ''; r.on('data', d => b += d); "
            "r.on('end', () => console.log(r.statusCode, b)); })" % http)
    port, tls_port = servers.http.port, servers.tls.port
    runs = [
        ["curl", "-sS", f"http://{http}/hello"],
        ["curl", "-sS", "--cacert", str(ca), f"https://{tls}/hello"],
        ["curl", "-sS", "-x", "socks5h://127.0.0.1:3128", f"http://{http}/hello"],
        ["curl", "-sS", "-x", "socks5h://localhost/run/sandboxer/egress.sock",
         f"http://{http}/hello"],
        ["curl", "-sS", "-f", f"http://badwild.test:{port}/hello"],
        ["curl", "-sS", "--cacert", str(ca), f"https://badwild.test:{tls_port}/"],
        ["curl", "-sS", "--noproxy", "*", "--connect-timeout", "5",
         f"http://{HTTP_ADDRESS}:{port}/hello"],
        ["/usr/bin/node", "-e", node],
    ]
    script = 'run() { n=$1; shift; out=$("$@" 2>&1); echo "$n $out rc=$?"; }\n' + "\n".join(
        f"run {n} {' '.join(shlex.quote(a) for a in argv)}" for n, argv in enumerate(runs, 1))
    hits = servers.http.hits
    ran = await sandboxer_exec(exec_dir, script, "--allow-host", "allowed.test", "--allow-host",
                         "tls.test", "--allow-host", HTTP_ADDRESS, "--allow-host", TLS_ADDRESS)
    assert ran.returncode == 0, ran.stderr
    lines = dict(line.split(" ", 1) for line in ran.stdout.splitlines())
    assert lines["1"] == "hello from http rc=0", ran.stdout
    assert lines["2"] == "hello from tls rc=0", ran.stdout
    assert lines["3"] == "hello from http rc=0", ran.stdout
    assert lines["4"] == "hello from http rc=0", ran.stdout
    assert lines["5"] == "curl: (22) The requested URL returned error: 403 rc=22", ran.stdout
    assert re.fullmatch(r"curl: \(56\) CONNECT tunnel failed, response 403 rc=56", lines["6"]), \
        ran.stdout
    assert re.fullmatch(r"curl: \(7\) Failed to connect to 127\.0\.0\.2 port \d+.*"
                        r"(Connection refused|Couldn't connect to server) rc=7", lines["7"]), \
        ran.stdout
    assert lines["8"] == "200 hello from http rc=0", ran.stdout
    assert servers.http.hits == hits + 4  # 1, 3, 4 and node; not 5 nor 7
    # the host side: the refusals are logged on the CLI's stderr
    assert f"egress plugin=exec via=http target=badwild.test:{servers.http.port} " \
           f"verdict=refused (badwild.test:{servers.http.port} is not in allowed_hosts)" \
           in ran.stderr, ran.stderr
    assert f"egress plugin=exec via=http-connect target=badwild.test:{servers.tls.port} " \
           "verdict=refused" in ran.stderr, ran.stderr


async def test_exec_without_network_reaches_only_its_own_loopback(exec_dir: Path,
                                                                  servers: LoopbackServers) -> None:
    """Without --allow-host: curl cannot connect (127.0.0.2 is the sandbox's own loopback,
    where nothing listens), no proxy is named in the environment; the server saw nothing."""
    hits = servers.http.hits
    probe = "import os, socket\nsocket.socket().close()\nprint(os.environ.get('HTTP_PROXY'))"
    ran = await sandboxer_exec(exec_dir, f"curl -sS --connect-timeout 5 "
                                   f"http://{HTTP_ADDRESS}:{servers.http.port}/hello; "
                                   f"echo rc=$?; python3 -c {shlex.quote(probe)}")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == "rc=7\nNone\n", ran.stdout
    assert "Failed to connect to 127.0.0.2" in ran.stderr, ran.stderr
    assert servers.http.hits == hits
