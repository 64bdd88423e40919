"""The egress proxy on its own: the allow-list, the resolver and the DNS rebinding rules, and
the three protocols spoken to a client on the host (no sandbox in between), with every bad
input a client can send. tests/sandbox/test_egress_sandboxed.py drives the same proxy from
inside real sandboxes."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import struct
from pathlib import Path
from typing import AsyncIterator

import pytest
import pytest_asyncio

from egress_servers import HTTP_ADDRESS, LoopbackServers
from sandboxer.sandbox.egress import (
    AllowList,
    EgressProxy,
    EgressRefused,
    Resolver,
    network_mode,
    proxy_environment,
    refused_range,
)
from sandboxer.sandbox.policy import SandboxConfig

pytestmark = pytest.mark.usefixtures("no_leaks")


# -- the allow-list ------------------------------------------------------------------------------

@pytest.mark.parametrize("patterns, host, port, expected", [
    pytest.param(["example.com"], "example.com", 443, True, id="exact_name_any_port"),
    pytest.param(["example.com"], "www.example.com", 443, False, id="exact_name_not_subdomain"),
    pytest.param(["example.com:443"], "example.com", 443, True, id="name_with_its_port"),
    pytest.param(["example.com:443"], "example.com", 80, False, id="name_other_port"),
    pytest.param(["*.example.com"], "a.example.com", 80, True, id="wildcard_one_label"),
    pytest.param(["*.example.com"], "a.b.example.com", 80, True, id="wildcard_deeper"),
    pytest.param(["*.example.com"], "example.com", 80, False, id="wildcard_not_apex"),
    pytest.param(["*.example.com"], "badexample.com", 80, False, id="wildcard_not_suffix_word"),
    pytest.param(["*.example.com"], "a.example.com.evil.net", 80, False,
                 id="wildcard_not_prefix"),
    pytest.param(["*.example.com:8443"], "a.example.com", 443, False, id="wildcard_port"),
    pytest.param(["EXAMPLE.com"], "example.com", 80, True, id="case_insensitive"),
    pytest.param([], "example.com", 80, False, id="empty_list"),
])
def test_allow_list_names(patterns, host, port, expected):
    assert AllowList(patterns).permits_name(host, port) is expected


@pytest.mark.parametrize("patterns, address, port, expected", [
    pytest.param(["10.1.2.3"], "10.1.2.3", 80, True, id="ipv4_literal"),
    pytest.param(["10.1.2.3:80"], "10.1.2.3", 81, False, id="ipv4_literal_port"),
    pytest.param(["10.0.0.0/8"], "10.200.0.1", 443, True, id="cidr"),
    pytest.param(["10.0.0.0/8"], "11.0.0.1", 443, False, id="outside_cidr"),
    pytest.param(["[::1]:8080"], "::1", 8080, True, id="ipv6_literal_port"),
    pytest.param(["::1"], "::2", 80, False, id="ipv6_other"),
    pytest.param(["example.com"], "93.184.216.34", 80, False, id="names_never_cover_ips"),
])
def test_allow_list_addresses(patterns, address, port, expected):
    assert AllowList(patterns).lists_address(ipaddress.ip_address(address), port) is expected


def test_everything_allows_everything():
    allow = AllowList.everything()
    assert allow.permits_name("anything.example", 1)
    assert allow.lists_address(ipaddress.ip_address("127.0.0.1"), 22)


def test_a_bad_pattern_is_refused_at_the_edge():
    with pytest.raises(ValueError):
        AllowList(["exa mple.com"])


@pytest.mark.parametrize("address, reason", [
    ("127.0.0.1", "loopback"), ("127.9.9.9", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"),
    ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("fc00::1", "private"), ("0.0.0.0", "unspecified"), ("224.0.0.1", "multicast"),
    ("100.64.0.1", "not globally routable"), ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"), ("93.184.216.34", None), ("2606:4700::1111", None),
    ("2002:7f00:1::", "loopback, inside 6to4"), ("64:ff9b::a00:1", "private, inside NAT64"),
    ("64:ff9b::5db8:d822", "reserved"),  # NAT64 of a global address: still not dialled
])
def test_refused_ranges(address, reason):
    assert refused_range(ipaddress.ip_address(address)) == reason


def test_network_mode_and_environment():
    assert network_mode(SandboxConfig()) == "none"
    assert network_mode(SandboxConfig(network_allowed=True)) == "host"
    assert network_mode(SandboxConfig(network_allowed=True,
                                      allowed_hosts=("example.com",))) == "proxy"
    env = proxy_environment()
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        assert env[name] == "http://127.0.0.1:3128"
    assert env["ALL_PROXY"] == env["all_proxy"] == "socks5h://127.0.0.1:3128"


# -- the resolver and the decision -------------------------------------------------------------

def test_resolver_reads_the_hosts_file_and_notices_changes(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# comment\n10.0.0.7 one.test ONE.alias.test\n::1 one.test\nbad line\n")
    resolver = Resolver(str(hosts))
    assert resolver.resolve("one.test", 80) == [ipaddress.ip_address("10.0.0.7"),
                                               ipaddress.ip_address("::1")]
    assert resolver.static("one.alias.test") == [ipaddress.ip_address("10.0.0.7")]
    hosts.write_text("10.0.0.8 one.test   # moved\n")
    assert resolver.static("one.test") == [ipaddress.ip_address("10.0.0.8")]
    hosts.unlink()
    assert resolver.static("one.test") is None


def test_resolver_failure_is_an_oserror_naming_the_host():
    with pytest.raises(OSError, match="cannot resolve nothing.invalid"):
        Resolver().resolve("nothing.invalid", 80)


@pytest.fixture
def hosts_proxy(tmp_path: Path) -> EgressProxy:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.2 rebind.test listed.test\n10.1.1.1 private.test\n"
                     "93.184.216.34 public.test\n127.0.0.2 mixed.test\n93.184.216.35 mixed.test\n")
    return EgressProxy(hosts_file=str(hosts))


@pytest.mark.parametrize("patterns, host, port, expected", [
    pytest.param(["public.test"], "public.test", 80, ["93.184.216.34"], id="public_name"),
    pytest.param(["rebind.test"], "rebind.test", 80, "resolves to 127.0.0.2 (loopback)",
                 id="name_to_loopback_refused"),
    pytest.param(["rebind.test", "127.0.0.2"], "rebind.test", 80, ["127.0.0.2"],
                 id="name_to_loopback_with_literal_listed"),
    pytest.param(["rebind.test", "127.0.0.0/8"], "rebind.test", 80, ["127.0.0.2"],
                 id="name_to_loopback_with_range_listed"),
    pytest.param(["rebind.test", "127.0.0.2:81"], "rebind.test", 80, "loopback",
                 id="literal_listed_for_another_port"),
    pytest.param(["private.test"], "private.test", 80, "10.1.1.1 (private)",
                 id="name_to_private_refused"),
    pytest.param(["mixed.test"], "mixed.test", 80, ["93.184.216.35"],
                 id="only_the_global_addresses_of_a_mixed_name"),
    pytest.param(["public.test"], "93.184.216.34", 80, "is not in allowed_hosts",
                 id="ip_literal_needs_listing"),
    pytest.param(["127.0.0.2"], "127.0.0.2", 80, ["127.0.0.2"], id="listed_literal"),
    pytest.param(["127.0.0.2"], "::ffff:127.0.0.2", 80, [str(ipaddress.ip_address(
                 "::ffff:127.0.0.2"))],
                 id="mapped_literal_of_a_listed_address"),
    pytest.param(["public.test"], "other.test", 80, "other.test:80 is not in allowed_hosts",
                 id="unlisted_name_not_resolved"),
    pytest.param(["public.test"], "PUBLIC.test.", 80, ["93.184.216.34"],
                 id="case_and_root_label"),
    pytest.param(["public.test"], "pub lic.test", 80, "is not a valid host name",
                 id="invalid_name"),
])
def test_decide(hosts_proxy, patterns, host, port, expected):
    allow = AllowList(patterns)
    if isinstance(expected, list):
        got = hosts_proxy.decide_blocking(allow, host, port)
        assert [str(a) for a in got] == expected
        assert [str(a) for a in asyncio.run(hosts_proxy._decide(allow, host, port))] == expected
    else:
        with pytest.raises(EgressRefused, match=expected.replace("(", r"\(").replace(")", r"\)")):
            hosts_proxy.decide_blocking(allow, host, port)


# -- the protocols, against a proxy endpoint on the host ----------------------------------------

@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> LoopbackServers:
    servers = LoopbackServers(tmp_path_factory.mktemp("egress-servers"))
    yield servers
    servers.stop()


class Endpoint:
    """A proxy endpoint for plugin "host.test", served on a loopback port and its Unix socket."""

    def __init__(self, proxy: EgressProxy, allowed: list[str]) -> None:
        self.proxy = proxy
        self.point = proxy.endpoint("host.test", allowed)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def exchange(self, data: bytes) -> bytes:
        """Send ``data``, read until the proxy closes."""
        reader, writer = await self.open()
        writer.write(data)
        try:
            async with asyncio.timeout(10):
                return await reader.read()
        finally:
            writer.close()

    def counters(self) -> dict[str, int]:
        stats = self.proxy.statistics("host.test")
        return stats.to_json() if stats else {}


@pytest_asyncio.fixture
async def endpoint(servers: LoopbackServers) -> AsyncIterator[Endpoint]:
    proxy = EgressProxy(hosts_file=str(servers.hosts_file), max_connections=4,
                        header_timeout=1.0, idle_timeout=1.0, connect_timeout=2.0)
    point = Endpoint(proxy, ["allowed.test", HTTP_ADDRESS, "*.wild.test"])
    await point.point.start(point.listener)
    runtime = os.path.dirname(point.point.socket_path)
    yield point
    proxy.close()
    assert not os.path.exists(runtime), "the proxy's runtime directory outlived it"
    for _ in range(250):  # the servers' handler threads close their sockets on their own
        if not servers.busy():
            break
        await asyncio.sleep(0.02)


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(10):
        return await reader.read()


async def test_connect_tunnel(endpoint, servers):
    reader, writer = await endpoint.open()
    writer.write(f"CONNECT allowed.test:{servers.http.port} HTTP/1.1\r\n"
                 f"Host: allowed.test\r\n\r\n".encode())
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 200 Connection established\r\n\r\n"
    writer.write(b"GET /hello HTTP/1.1\r\nHost: allowed.test\r\nConnection: close\r\n\r\n")
    answer = await _read_all(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"hello from http")
    await asyncio.sleep(0.05)
    counts = endpoint.counters()
    assert counts["allowed"] == 1 and counts["active"] == 0
    assert counts["bytesReceived"] == len(answer)
    assert counts["bytesSent"] > 0


async def test_plain_http_is_forwarded_to_the_checked_host_without_proxy_headers(endpoint, servers):
    answer = await endpoint.exchange(
        f"GET http://allowed.test:{servers.http.port}/headers HTTP/1.1\r\n"
        "Host: elsewhere.example\r\nProxy-Authorization: Basic c2VjcmV0\r\n"
        "Proxy-Connection: keep-alive\r\nX-Kept: yes\r\n\r\n".encode())
    status, _, body = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 200")
    headers = {k.lower(): v for k, v in json.loads(body).items()}
    assert headers["x-kept"] == "yes" and headers["connection"] == "close"
    assert headers["host"] == f"allowed.test:{servers.http.port}"  # the checked one
    assert "proxy-authorization" not in headers and "proxy-connection" not in headers


async def test_unix_socket_speaks_the_same_protocol(endpoint, servers):
    reader, writer = await asyncio.open_unix_connection(endpoint.point.socket_path)
    writer.write(f"GET http://allowed.test:{servers.http.port}/hello HTTP/1.1\r\n\r\n".encode())
    answer = await _read_all(reader)
    writer.close()
    assert answer.endswith(b"hello from http")
    assert oct(os.stat(endpoint.point.socket_path).st_mode & 0o777) == "0o666"
    assert oct(os.stat(os.path.dirname(endpoint.point.socket_path)).st_mode & 0o777) == "0o700"


async def test_refusals_are_403_with_the_reason_and_a_log_line(endpoint, servers, caplog):
    caplog.set_level(logging.INFO, logger="sandboxer.egress")
    answer = await endpoint.exchange(f"CONNECT badwild.test:{servers.http.port} HTTP/1.1\r\n\r\n"
                                     .encode())
    status = answer.split(b"\r\n")[0].decode()
    assert status == (f"HTTP/1.1 403 Forbidden (sandboxer: egress refused: "
                      f"badwild.test:{servers.http.port} is not in allowed_hosts)")
    assert b"X-Sandboxer-Egress: refused" in answer
    line = [r.getMessage() for r in caplog.records if r.name == "sandboxer.egress"][-1]
    assert line == (f"egress plugin=host.test via=http-connect target=badwild.test:"
                    f"{servers.http.port} verdict=refused (badwild.test:{servers.http.port} is "
                    "not in allowed_hosts)")
    assert endpoint.counters()["refused"] == 1


async def test_wildcard_and_rebinding_through_the_proxy(endpoint, servers):
    port = servers.http.port
    ok = await endpoint.exchange(f"GET http://deep.a.wild.test:{port}/hello HTTP/1.1\r\n\r\n"
                                 .encode())
    assert ok.endswith(b"hello from http")
    for name, reason in (("wild.test", "is not in allowed_hosts"),
                         ("metadata.test", "is not in allowed_hosts")):
        answer = await endpoint.exchange(f"GET http://{name}:{port}/ HTTP/1.1\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 403") and reason.encode() in answer, answer


async def test_a_listed_name_resolving_to_loopback_is_refused(servers):
    proxy = EgressProxy(hosts_file=str(servers.hosts_file))
    point = Endpoint(proxy, ["rebind.test", "metadata.test", "private.test", "mapped.test"])
    await point.point.start(point.listener)
    hits = servers.http.hits
    try:
        for name, shown in (("rebind.test", "127.0.0.2 (loopback)"),
                            ("metadata.test", "169.254.169.254 (link-local)"),
                            ("private.test", "10.11.12.13 (private)"),
                            ("mapped.test", "::ffff:127.0.0.2 (loopback)")):
            answer = await point.exchange(f"CONNECT {name}:{servers.http.port} HTTP/1.1\r\n\r\n"
                                          .encode())
            assert answer.startswith(b"HTTP/1.1 403"), answer
            assert f"{name} resolves to {shown}, which is refused unless allowed_hosts lists " \
                   f"that address or range".encode() in answer, answer
        assert servers.http.hits == hits  # nothing was dialled
        assert point.counters() == {"allowed": 0, "refused": 4, "failed": 0, "active": 0,
                                    "bytesSent": 0, "bytesReceived": 0}
    finally:
        proxy.close()


def _socks5_request(host: bytes | str, port: int, command: int = 1) -> bytes:
    if isinstance(host, str):
        address = ipaddress.ip_address(host)
        kind = 1 if address.version == 4 else 4
        return bytes([5, command, 0, kind]) + address.packed + struct.pack(">H", port)
    return bytes([5, command, 0, 3, len(host)]) + host + struct.pack(">H", port)


async def test_socks5_connect_by_name_and_by_address(endpoint, servers):
    for target in (b"allowed.test", HTTP_ADDRESS):
        reader, writer = await endpoint.open()
        writer.write(b"\x05\x01\x00")
        assert await reader.readexactly(2) == b"\x05\x00"
        writer.write(_socks5_request(target, servers.http.port))
        assert await reader.readexactly(10) == b"\x05\x00\x00\x01" + bytes(6)
        writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await _read_all(reader)
        writer.close()
        assert answer.endswith(b"hello from http")


@pytest.mark.parametrize("greeting, request_, reply", [
    pytest.param(b"\x05\x01\x00", _socks5_request(b"badwild.test", 80), b"\x05\x02",
                 id="unlisted_name_ruleset"),
    pytest.param(b"\x05\x01\x00", _socks5_request("10.9.9.9", 80), b"\x05\x02",
                 id="unlisted_address"),
    pytest.param(b"\x05\x01\x00", _socks5_request(b"allowed.test", 80, command=2), b"\x05\x07",
                 id="bind_not_supported"),
    pytest.param(b"\x05\x01\x00", _socks5_request(b"allowed.test", 80, command=3), b"\x05\x07",
                 id="udp_associate_not_supported"),
    pytest.param(b"\x05\x01\x00", b"\x05\x01\x00\x09", b"\x05\x08", id="bad_address_type"),
    pytest.param(b"\x05\x01\x02", b"", b"\x05\xff", id="only_password_auth_offered"),
])
async def test_socks5_refusals(endpoint, greeting, request_, reply):
    answer = await endpoint.exchange(greeting + request_)
    assert answer[-10:-8] == reply or answer[-2:] == reply, answer


async def test_upstream_refusing_is_a_502_and_counted_failed(endpoint, caplog):
    caplog.set_level(logging.WARNING, logger="sandboxer.egress")
    closed = socket.create_server((HTTP_ADDRESS, 0))
    port = closed.getsockname()[1]
    closed.close()
    answer = await endpoint.exchange(f"CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 502 Bad Gateway (sandboxer: connecting to 127.0.0.2")
    assert b"Connection refused" in answer
    assert endpoint.counters()["failed"] == 1
    assert "verdict=failed" in caplog.text


@pytest.mark.parametrize("data, status", [
    pytest.param(b"\x00\x01garbage\r\n\r\n", b"400", id="garbage"),
    pytest.param(b"GET /relative HTTP/1.1\r\n\r\n", b"400", id="origin_form"),
    pytest.param(b"GET https://allowed.test/ HTTP/1.1\r\n\r\n", b"400", id="https_absolute"),
    pytest.param(b"GET ftp://allowed.test/ HTTP/1.1\r\n\r\n", b"400", id="other_scheme"),
    pytest.param(b"CONNECT allowed.test HTTP/1.1\r\n\r\n", b"400", id="connect_without_port"),
    pytest.param(b"CONNECT allowed.test:99999 HTTP/1.1\r\n\r\n", b"400", id="port_out_of_range"),
    pytest.param(b"CONNECT [::1 HTTP/1.1\r\n\r\n", b"400", id="unclosed_bracket"),
    pytest.param(b"GET http://allowed.test:0/ HTTP/1.1\r\n\r\n", b"400", id="port_zero"),
    pytest.param(b"GET http://x/ HTTP/2.0\r\n\r\n", b"400", id="http2_line"),
    pytest.param(b"GET http://allowed.test/ HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
                 b"431", id="huge_head"),
])
async def test_bad_requests_get_a_clear_status(endpoint, data, status):
    answer = await endpoint.exchange(data)
    assert answer.split(b" ")[1] == status, answer[:200]
    assert b"sandboxer:" in answer


async def test_socks4_is_refused(endpoint):
    answer = await endpoint.exchange(b"\x04\x01\x00\x50\x7f\x00\x00\x02user\x00")
    assert answer[:2] == b"\x00\x5b"
    assert endpoint.counters()["refused"] == 1


async def test_slowloris_is_cut_off_and_others_are_served(endpoint, servers):
    reader, writer = await endpoint.open()
    loop = asyncio.get_running_loop()
    started = loop.time()
    head = f"GET http://allowed.test:{servers.http.port}/hello HTTP/1.1\r\n".encode()
    served = None
    with pytest.raises((ConnectionError, AssertionError)):
        for i in range(len(head)):
            writer.write(head[i:i + 1])
            await writer.drain()
            await asyncio.sleep(0.1)
            if i == 3:
                served = await endpoint.exchange(
                    f"GET http://allowed.test:{servers.http.port}/hello HTTP/1.1\r\n\r\n"
                    .encode())
            assert not reader.at_eof(), "closed"
    cut_after = loop.time() - started
    writer.close()
    assert served is not None and served.endswith(b"hello from http")
    assert cut_after < 3.0, f"the slow client kept its connection for {cut_after:.1f}s"


async def test_connections_per_plugin_are_bounded_and_the_rest_wait(endpoint, servers,
                                                                     caplog):
    """At the limit the proxy stops accepting: more connections wait in the kernel's queue
    (costing the supervisor nothing) and are served, in turn, once slots free up."""
    caplog.set_level(logging.WARNING, logger="sandboxer.egress")
    held = []
    for _ in range(4):  # max_connections = 4: each holds an open tunnel
        reader, writer = await endpoint.open()
        writer.write(f"CONNECT allowed.test:{servers.http.port} HTTP/1.1\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        held.append(writer)
    assert endpoint.counters()["active"] == 4
    # The loopback server's threads accept the held tunnels' upstream connections a moment
    # later (late on a busy machine): count the fds once they have settled.
    clock = asyncio.get_running_loop().time
    fds, settled_at, give_up = len(os.listdir("/proc/self/fd")), clock(), clock() + 5
    while clock() - settled_at < 0.2 and clock() < give_up:
        await asyncio.sleep(0.02)
        now = len(os.listdir("/proc/self/fd"))
        if now != fds:
            fds, settled_at = now, clock()
    waiting = []
    for _ in range(20):
        reader, writer = await endpoint.open()
        writer.write(f"GET http://allowed.test:{servers.http.port}/hello HTTP/1.1\r\n\r\n"
                     .encode())
        waiting.append((reader, writer))
    await asyncio.sleep(0.3)
    assert endpoint.counters()["active"] == 4 and endpoint.counters()["allowed"] == 4
    assert all(not reader.at_eof() and not reader._buffer for reader, _ in waiting)
    # the test's own 20 client sockets are the only new fds: the proxy took none of them
    assert len(os.listdir("/proc/self/fd")) - fds < 20 + 4
    limit_lines = [r for r in caplog.records if "the limit" in r.getMessage()]
    assert len(limit_lines) == 1, "the limit is logged once, not per connection"
    for writer in held:
        writer.close()
    for reader, writer in waiting:
        assert (await _read_all(reader)).endswith(b"hello from http")
        writer.close()
    await asyncio.sleep(0.05)
    assert endpoint.counters()["active"] == 0 and endpoint.counters()["allowed"] == 24


async def test_an_idle_tunnel_is_closed(endpoint, servers):
    reader, writer = await endpoint.open()
    writer.write(f"CONNECT allowed.test:{servers.http.port} HTTP/1.1\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    started = asyncio.get_running_loop().time()
    assert await _read_all(reader) == b""  # idle_timeout = 1 s
    assert asyncio.get_running_loop().time() - started < 5
    writer.close()


async def test_closing_the_endpoint_ends_its_tunnels(endpoint, servers):
    reader, writer = await endpoint.open()
    writer.write(f"CONNECT allowed.test:{servers.http.port} HTTP/1.1\r\n\r\n".encode())
    await reader.readuntil(b"\r\n\r\n")
    path = endpoint.point.socket_path
    endpoint.point.close()
    assert await _read_all(reader) == b""
    writer.close()
    assert not os.path.exists(path)
    with pytest.raises(ConnectionRefusedError):
        await endpoint.open()
