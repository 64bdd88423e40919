"""SOCKS5 on the egress proxy (RFC 1928): no authentication, CONNECT only.

``read_socks5`` reads the greeting and the request (the proxy read the version byte) and
returns a ``SocksRequest``: the target, and how to answer in SOCKS5 once the proxy has
decided. A name in the request goes to the proxy's rules and resolver like any other
(``socks5h://`` in the plugin's environment asks clients to send names). SOCKS4 is refused:
it cannot carry names safely.

It must never tell the client a bound address (always 0.0.0.0:0: not the plugin's business),
and never accept BIND or UDP ASSOCIATE.
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass

from .decisions import EgressFailed, Rejected
from .rules import EgressRefused, show_target

__all__ = ["SocksRequest", "read_socks5", "reject_socks4"]

_REPLY = {
    "ok": 0,
    "failed": 1,
    "refused": 2,
    "unreachable": 4,
    "connection refused": 5,
    "timeout": 6,
    "command": 7,
    "address type": 8,
}


@dataclass(frozen=True, slots=True)
class SocksRequest:
    host: str
    port: int
    via: str = "socks5"

    def refused(self, writer: asyncio.StreamWriter, exc: EgressRefused) -> None:
        _reply(writer, "refused")

    def failed(self, writer: asyncio.StreamWriter, exc: EgressFailed) -> None:
        _reply(writer, exc.kind if exc.kind in _REPLY else "failed")

    def established(self, writer: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> int:
        """Tell the client: nothing is sent upstream on its behalf."""
        _reply(writer, "ok")
        return 0


async def read_socks5(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> SocksRequest:
    """The greeting and the CONNECT request; Rejected (answered) for anything else."""
    methods = await reader.readexactly((await reader.readexactly(1))[0])
    if 0 not in methods:
        writer.write(b"\x05\xff")
        raise Rejected("socks5", "the client offered no SOCKS5 method without authentication")
    writer.write(b"\x05\x00")
    version, command, _, kind = await reader.readexactly(4)
    if kind == 1:
        host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
    elif kind == 4:
        host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
    elif kind == 3:
        host = (await reader.readexactly((await reader.readexactly(1))[0])).decode(
            "utf-8", "replace"
        )
    else:
        _reply(writer, "address type")
        raise Rejected("socks5", f"SOCKS5 address type {kind} is not one of 1, 3, 4")
    port = int.from_bytes(await reader.readexactly(2), "big")
    if version != 5 or command != 1:
        _reply(writer, "command")
        raise Rejected(
            "socks5",
            f"SOCKS5 command {command} is not supported (only CONNECT)",
            target=show_target(host, port),
        )
    return SocksRequest(host, port)


def reject_socks4(writer: asyncio.StreamWriter) -> Rejected:
    """Answer a SOCKS4 client (the proxy read its version byte): request rejected."""
    writer.write(b"\x00\x5b" + bytes(6))
    return Rejected("socks4", "SOCKS4 is not supported; use SOCKS5 (socks5h://) or HTTP")


def _reply(writer: asyncio.StreamWriter, outcome: str) -> None:
    # The bound address is not the plugin's business: always 0.0.0.0:0.
    writer.write(bytes([5, _REPLY[outcome], 0, 1]) + bytes(6))
