"""Escape probes on the network: the host's loopback services, its abstract and path unix
sockets, the cloud metadata address, every socket family a plugin should never get, and,
with network on, every inet protocol but TCP and UDP.

The criterion for reaching something over the network is "no connection": the plugin's net
namespace is empty, so ENETUNREACH or ECONNREFUSED are as good as the filter's EPERM, and the
host-side listener must have accepted nothing. Creating a socket of a forbidden family is a
syscall probe: only EPERM, EACCES or ENOSYS count as blocked.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio

from sandboxer import HostConfig, PluginManager, load_plugin
from sandboxer.sandbox.policy import effective_config

from .conftest import Canaries, Fleet, start_fleet

pytestmark = [pytest.mark.usefixtures("no_leaks"), pytest.mark.asyncio(loop_scope="module")]

AF_NETLINK, AF_PACKET, AF_KEY, AF_RDS, AF_TIPC, AF_ALG, AF_VSOCK, AF_XDP = (
    16, 17, 15, 21, 30, 38, 40, 44)
NETLINK_ROUTE, NETLINK_AUDIT = 0, 9
ETH_P_ALL = 0x0300  # htons(0x0003)
NO_CONNECTION = ("EPERM", "EACCES", "ENETUNREACH", "ECONNREFUSED", "EHOSTUNREACH", "ENOENT")


class Listener:
    """A host-side server that counts the connections it accepted."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.close()

    async def tcp(self, host: str) -> int:
        self.server = await asyncio.start_server(self._accept, host, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def unix(self, path: str | bytes) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        os.chmod(path, 0o777) if isinstance(path, str) else None
        self.server = await asyncio.start_unix_server(self._accept, sock=sock)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def _no_connection(fleet: Fleet, listener: Listener, method: str, *args: Any) -> None:
    try:
        outcome = await fleet.probe(method, *args)
        await asyncio.sleep(0.1)  # give an accepted connection time to show
    finally:
        await listener.close()
    assert listener.accepted == 0, f"the plugin reached the host's listener: {outcome}"
    assert outcome.get("errno") in NO_CONNECTION, outcome


async def test_host_loopback_tcp_is_unreachable(fleet: Fleet) -> None:
    listener = Listener()
    port = await listener.tcp("127.0.0.1")
    await _no_connection(fleet, listener, "connect_tcp", "127.0.0.1", port)


async def test_host_listening_sockets_are_invisible(fleet: Fleet) -> None:
    """The plugin's /proc/net is its own namespace's: the host's listeners are not in it."""
    tcp, unix = Listener(), Listener()
    port = await tcp.tcp("127.0.0.1")
    name = f"sandboxer-test-{os.urandom(6).hex()}"
    await unix.unix(b"\0" + name.encode())
    try:
        tcp_table = (await fleet.probe("read", "/proc/net/tcp"))["ok"]
        unix_table = (await fleet.probe("read", "/proc/net/unix"))["ok"]
        with open("/proc/net/unix") as f:
            host_unix_table = f.read()
    finally:
        await tcp.close()
        await unix.close()
    local_ports = [row.split()[1] for row in tcp_table.splitlines()[1:]]
    assert not any(address.endswith(f":{port:04X}") for address in local_ports), local_ports
    assert f"@{name}" in host_unix_table  # the host sees its own socket ...
    assert name not in unix_table  # ... the plugin does not


async def test_host_loopback_tcp_over_ipv6_is_unreachable(fleet: Fleet) -> None:
    listener = Listener()
    port = await listener.tcp("::1")
    await _no_connection(fleet, listener, "connect_tcp", "::1", port)


async def test_host_abstract_unix_socket_is_unreachable(fleet: Fleet) -> None:
    """Abstract unix names live in the network namespace: the plugin's is not the host's."""
    name = f"sandboxer-test-{os.urandom(6).hex()}"
    listener = Listener()
    await listener.unix(b"\0" + name.encode())
    # this process can reach it, so a failure inside is the sandbox's doing
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(probe, b"\0" + name.encode())
    finally:
        probe.close()
    await asyncio.sleep(0.05)
    assert listener.accepted == 1
    listener.accepted = 0
    await _no_connection(fleet, listener, "connect_unix", name, True)


async def test_host_unix_socket_by_path_is_unreachable(fleet: Fleet, tmp_path: Path) -> None:
    """A socket on the host's filesystem (think /var/run/docker.sock), world-connectable."""
    os.chmod(tmp_path, 0o755)
    path = str(tmp_path / "host.sock")
    listener = Listener()
    await listener.unix(path)
    await _no_connection(fleet, listener, "connect_unix", path, False)


@pytest.mark.parametrize(("host", "port"), [
    ("169.254.169.254", 80), ("169.254.169.254", 443), ("fd00:ec2::254", 80),
], ids=["metadata-http", "metadata-https", "metadata-ipv6"])
async def test_the_cloud_metadata_service_is_unreachable(fleet: Fleet, host: str,
                                                          port: int) -> None:
    outcome = await fleet.probe("connect_tcp", host, port)
    assert outcome.get("errno") in NO_CONNECTION, outcome


# TCP and UDP sockets are made without network too (the namespace holds only the plugin's own
# loopback): tested below with the protocols, for both kinds of fleet.
SOCKETS = [
    pytest.param(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW, id="raw-ipv4"),
    pytest.param(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP, id="raw-icmp"),
    pytest.param(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW, id="raw-ipv6"),
    pytest.param(AF_PACKET, socket.SOCK_RAW, ETH_P_ALL, id="packet-raw"),
    pytest.param(AF_PACKET, socket.SOCK_DGRAM, ETH_P_ALL, id="packet-dgram"),
    pytest.param(AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE, id="netlink-route"),
    pytest.param(AF_NETLINK, socket.SOCK_RAW, NETLINK_AUDIT, id="netlink-audit"),
    pytest.param(AF_VSOCK, socket.SOCK_STREAM, 0, id="vsock"),
    pytest.param(AF_ALG, socket.SOCK_SEQPACKET, 0, id="alg"),
    pytest.param(AF_KEY, socket.SOCK_RAW, 2, id="pf-key"),
    pytest.param(AF_XDP, socket.SOCK_RAW, 0, id="xdp"),
    pytest.param(AF_TIPC, socket.SOCK_RDM, 0, id="tipc"),
    pytest.param(AF_RDS, socket.SOCK_SEQPACKET, 0, id="rds"),
]


@pytest.mark.parametrize(("family", "kind", "proto"), SOCKETS)
async def test_forbidden_socket_families_are_denied(fleet: Fleet, family: int, kind: int,
                                                    proto: int) -> None:
    assert await fleet.probe("open_socket", family, kind, proto) == {"errno": "EPERM"}




def _pair(family: int, kind: int, what: str, errno: str | None, id: str):  # type: ignore[no-untyped-def]
    return pytest.param(family, kind, id=id)


SOCKETPAIRS = [
    _pair(socket.AF_INET, socket.SOCK_STREAM, "AF_INET", "EOPNOTSUPP", "socketpair-inet"),
    _pair(socket.AF_INET6, socket.SOCK_DGRAM, "AF_INET6", "EOPNOTSUPP", "socketpair-inet6"),
    _pair(AF_NETLINK, socket.SOCK_RAW, "AF_NETLINK", "EOPNOTSUPP", "socketpair-netlink"),
    _pair(AF_VSOCK, socket.SOCK_STREAM, "AF_VSOCK", "EOPNOTSUPP", "socketpair-vsock"),
    # AF_ALG is not built into this kernel: EAFNOSUPPORT after the kernel looked it up
    _pair(AF_ALG, socket.SOCK_SEQPACKET, "AF_ALG", "EAFNOSUPPORT", "socketpair-alg"),
    # AF_PACKET's create checks CAP_NET_RAW first: EPERM, from the kernel
    _pair(AF_PACKET, socket.SOCK_RAW, "AF_PACKET", None, "socketpair-packet"),
]


@pytest.mark.parametrize(("family", "kind"), SOCKETPAIRS)
async def test_forbidden_socket_families_are_denied_to_socketpair(fleet: Fleet, family: int,
                                                                  kind: int) -> None:
    assert await fleet.probe("open_socketpair", family, kind, 0) == {"errno": "EPERM"}


async def test_unix_sockets_still_work(fleet: Fleet) -> None:
    """The control: the family the filter allows is created, so the EPERMs above are the
    filter's."""
    assert await fleet.probe("open_socket", socket.AF_UNIX, socket.SOCK_STREAM, 0) == \
        {"ok": "created"}
    assert await fleet.probe("open_socketpair", socket.AF_UNIX, socket.SOCK_DGRAM, 0) == \
        {"ok": "created"}


# -- with network on: TCP and UDP, nothing else of the inet families -------------------------------

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def network_fleet(canaries: Canaries, hostile_dir: Path) -> AsyncIterator[Fleet]:
    """The hostile plugin with network on (one allowed host, so through the egress proxy:
    its own net namespace still), as the manager loads it: the filter's network variant.
    Cold only: a sandbox whose egress goes through a proxy endpoint made for one plugin is
    never made ahead."""
    manager = PluginManager(config=HostConfig(warm_sandboxes=0))
    request = load_plugin(hostile_dir).sandbox
    sandbox = effective_config(request, manager.config).replace(
        network_allowed=True, allowed_hosts=("allowed.test",))
    manager, fleet = await start_fleet(canaries, hostile_dir, sandbox=sandbox, manager=manager)
    try:
        yield fleet
    finally:
        await manager.aclose()
    canaries.check()


AF_INET, AF_INET6 = int(socket.AF_INET), int(socket.AF_INET6)
STREAM, DGRAM, RAW = int(socket.SOCK_STREAM), int(socket.SOCK_DGRAM), int(socket.SOCK_RAW)
NONBLOCK_CLOEXEC = int(socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPPROTO_ICMPV6 = 1, 6, 17, 58
IPPROTO_SCTP, IPPROTO_UDPLITE, IPPROTO_MPTCP = 132, 136, 262


def _inet(family: int, kind: int, protocol: int, id: str):  # type: ignore[no-untyped-def]
    return pytest.param(f"{family},{kind:#x},{protocol:#x}", id=id)


# Each is kernel code a TCP/UDP program never needs. Without the protocol check, MPTCP and
# UDP-Lite sockets are made, ping sockets answer EACCES (the namespace's ping_group_range,
# not the filter) and SCTP EPROTONOSUPPORT (not built here): all reached the kernel.
OTHER_PROTOCOLS = [
    _inet(AF_INET, STREAM, IPPROTO_SCTP, "sctp-one-to-one"),
    _inet(AF_INET, STREAM, IPPROTO_SCTP | 1 << 32, "sctp-with-the-upper-32-bits-set"),
    _inet(AF_INET6, STREAM, IPPROTO_SCTP, "sctp-ipv6"),
    _inet(AF_INET, STREAM, IPPROTO_MPTCP, "mptcp"),
    _inet(AF_INET6, STREAM | NONBLOCK_CLOEXEC, IPPROTO_MPTCP, "mptcp-ipv6-nonblocking"),
    _inet(AF_INET, DGRAM, IPPROTO_ICMP, "icmp-ping-socket"),
    _inet(AF_INET6, DGRAM, IPPROTO_ICMPV6, "icmpv6-ping-socket"),
    _inet(AF_INET, DGRAM, IPPROTO_UDPLITE, "udp-lite"),
    _inet(AF_INET, STREAM, IPPROTO_UDP, "stream-socket-asking-for-udp"),
    _inet(AF_INET, DGRAM, IPPROTO_TCP, "datagram-socket-asking-for-tcp"),
    _inet(AF_INET, RAW, IPPROTO_TCP, "raw-ipv4-tcp"),
    _inet(AF_INET6, RAW, IPPROTO_UDP, "raw-ipv6-udp"),
]


@pytest.mark.parametrize("spec", OTHER_PROTOCOLS)
async def test_with_network_only_tcp_and_udp_sockets_are_made(network_fleet: Fleet,
                                                                spec: str) -> None:
    """The filter's own answer (EPERM, with the process still running): not the kernel's."""
    assert await network_fleet.run("socket", spec) == {"rc": 0, "out": "errno=EPERM",
                                                       "err": ""}


@pytest.mark.parametrize("spec", OTHER_PROTOCOLS)
async def test_without_network_only_tcp_and_udp_sockets_are_made(fleet: Fleet,
                                                                   spec: str) -> None:
    assert await fleet.run("socket", spec) == {"rc": 0, "out": "errno=EPERM", "err": ""}


TCP_AND_UDP = [
    _inet(AF_INET, STREAM, 0, "tcp"),
    _inet(AF_INET, STREAM, IPPROTO_TCP, "tcp-by-number"),
    _inet(AF_INET, STREAM | NONBLOCK_CLOEXEC, IPPROTO_TCP, "tcp-nonblocking-cloexec"),
    _inet(AF_INET, STREAM, IPPROTO_TCP | 1 << 32, "tcp-with-the-upper-32-bits-set"),
    _inet(AF_INET, DGRAM, 0, "udp"),
    _inet(AF_INET, DGRAM | NONBLOCK_CLOEXEC, IPPROTO_UDP, "udp-by-number-nonblocking"),
    _inet(AF_INET6, STREAM, 0, "tcp-ipv6"),
    _inet(AF_INET6, STREAM | NONBLOCK_CLOEXEC, IPPROTO_TCP, "tcp-ipv6-by-number"),
    _inet(AF_INET6, DGRAM, IPPROTO_UDP, "udp-ipv6-by-number"),
]


@pytest.mark.parametrize("spec", TCP_AND_UDP)
async def test_with_network_tcp_and_udp_sockets_are_made(network_fleet: Fleet,
                                                         spec: str) -> None:
    """The control: what programs use, with or without SOCK_NONBLOCK|SOCK_CLOEXEC in the
    type, and with the protocol by number or as 0."""
    assert await network_fleet.run("socket", spec) == {"rc": 0, "out": "ok 0", "err": ""}


@pytest.mark.parametrize("spec", TCP_AND_UDP)
async def test_without_network_tcp_and_udp_sockets_are_made(fleet: Fleet, spec: str) -> None:
    """Without network the namespace holds only the plugin's own loopback: the sockets are
    made (the host's loopback, other addresses and the metadata service stay unreachable,
    above)."""
    assert await fleet.run("socket", spec) == {"rc": 0, "out": "ok 0", "err": ""}


async def test_without_network_a_program_talks_to_itself_over_loopback(fleet: Fleet) -> None:
    assert await fleet.probe("loopback_echo") == {"ok": "echoed over 127.0.0.1 and ::1"}
