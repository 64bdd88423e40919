"""go-plugin's handshake: the environment a plugin starts with, and the line it answers with.

The host tells the plugin who it is talking to through its environment (go-plugin's
``client.go``): the magic cookie ``KEY=value`` (a plugin run without it refuses to start),
``PLUGIN_PROTOCOL_VERSIONS`` (the app protocol versions the host speaks, a comma list) and the
TCP port range ``PLUGIN_MIN_PORT``/``PLUGIN_MAX_PORT``. The plugin answers with one line on
stdout, ``CORE|APP|NETWORK|ADDRESS|PROTOCOL[|CERT]``, e.g. ``1|1|unix|/tmp/plugin123|grpc``, or
``1|1|tcp|127.0.0.1:1234|grpc`` from a Python plugin, and serves gRPC there.

The line is the plugin's word, so it is read as hostile input: one short printable line, the
core version go-plugin has always had (1), an app version the host offered, gRPC (not net/rpc),
no TLS (sandboxer offers none: the channel never leaves the sandbox), and an address the
supervisor will only ever reach inside the plugin's own sandbox: a socket directly in the
directory sandboxer gave it, or a loopback port in its own network namespace. Every refusal is
a ``HandshakeError`` that says what the line said and what was expected.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...errors import HandshakeError

if TYPE_CHECKING:
    from ...manifest import GoPluginHandshake

__all__ = [
    "CORE_PROTOCOL_VERSION",
    "MAX_LINE",
    "GoPluginEndpoint",
    "handshake_environment",
    "parse_handshake",
]

# go-plugin's CoreProtocolVersion: the same in every release so far.
CORE_PROTOCOL_VERSION = 1
# A longer first line is not a handshake (a certificate, the longest honest part, is ~1 KiB).
MAX_LINE = 4096
_SOCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
Refuse = Callable[[str], HandshakeError]
# go-plugin's defaults (client.go): the range a TCP plugin picks its port from.
MIN_PORT, MAX_PORT = 10000, 25000


@dataclass(frozen=True)
class GoPluginEndpoint:
    """Where a plugin serves gRPC, from its handshake line: ``network`` "unix" with ``path``
    (as the plugin sees it) or "tcp" with ``host`` and ``port`` (in its network namespace)."""

    app_version: int
    network: str
    path: str | None = None
    host: str | None = None
    port: int | None = None


def handshake_environment(handshake: GoPluginHandshake) -> dict[str, str]:
    """The variables go-plugin's host sets for a plugin it starts (client.go)."""
    return {
        handshake.magic_cookie_key: handshake.magic_cookie_value,
        "PLUGIN_PROTOCOL_VERSIONS": str(handshake.protocol_version),
        "PLUGIN_MIN_PORT": str(MIN_PORT),
        "PLUGIN_MAX_PORT": str(MAX_PORT),
    }


def parse_handshake(
    line: bytes, *, plugin_id: str, app_version: int, socket_dir: str
) -> GoPluginEndpoint:
    """The endpoint ``line`` names, or HandshakeError saying why it names none we accept.

    ``socket_dir`` is the directory, as the plugin sees it, where its Unix socket must be.
    """

    def refuse(why: str) -> HandshakeError:
        return HandshakeError(f"plugin {plugin_id}: {why}", plugin_id=plugin_id)

    shown = line[:120].decode("utf-8", "backslashreplace") + ("…" if len(line) > 120 else "")
    text = line.rstrip(b"\r\n")
    if len(text) > MAX_LINE or not text or not all(0x20 <= b < 0x7F for b in text):
        raise refuse(
            f"the first line on stdout is not a go-plugin handshake "
            f"(CORE|APP|NETWORK|ADDRESS|PROTOCOL): {shown!r}"
        )
    parts = text.decode("ascii").split("|")
    if len(parts) not in (5, 6):
        raise refuse(
            f"the first line on stdout is not a go-plugin handshake "
            f"(CORE|APP|NETWORK|ADDRESS|PROTOCOL): {shown!r}"
        )
    core, app, network, address, protocol = parts[:5]
    if core != str(CORE_PROTOCOL_VERSION):
        raise refuse(
            f"its handshake's core protocol version is {core!r}; sandboxer speaks "
            f"go-plugin's core protocol {CORE_PROTOCOL_VERSION}"
        )
    if app != str(app_version):
        raise refuse(
            f"its handshake's app protocol version is {app!r}, but the manifest's "
            f"[grpc.handshake] protocol_version is {app_version}"
        )
    if protocol != "grpc":
        raise refuse(
            f"it speaks {protocol!r}; sandboxer hosts go-plugin's gRPC plugins only "
            "(net/rpc plugins are not supported)"
        )
    if len(parts) == 6 and parts[5]:  # go-plugin 1.x always prints the sixth, empty
        raise refuse(
            "its handshake offers a TLS certificate (go-plugin's AutoMTLS), which sandboxer "
            "did not ask for: the connection never leaves the plugin's sandbox"
        )
    if network == "unix":
        return GoPluginEndpoint(app_version, "unix", path=_socket_path(address, socket_dir, refuse))
    if network == "tcp":
        host, port = _loopback(address, refuse)
        return GoPluginEndpoint(app_version, "tcp", host=host, port=port)
    raise refuse(f"its handshake's network is {network!r}; go-plugin speaks unix or tcp")


def _socket_path(address: str, socket_dir: str, refuse: Refuse) -> str:
    directory, _, name = address.rpartition("/")
    if directory != socket_dir.rstrip("/") or not _SOCKET_NAME.fullmatch(name):
        raise refuse(
            f"its Unix socket {address!r} is not directly in {socket_dir}, the directory "
            "sandboxer gave it (TMPDIR and PLUGIN_UNIX_SOCKET_DIR name it)"
        )
    return address


def _loopback(address: str, refuse: Refuse) -> tuple[str, int]:
    why = (
        f"its TCP address {address!r} is not a loopback address and port; a plugin serves "
        "inside its own network namespace, on 127.0.0.1 or ::1"
    )
    host, sep, port_text = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise refuse(why) from None
    port = int(port_text) if sep and port_text.isdigit() and len(port_text) <= 5 else 0
    if not ip.is_loopback or not 0 < port < 65536:
        raise refuse(why)
    return str(ip), port
