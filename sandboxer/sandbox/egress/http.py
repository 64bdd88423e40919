"""HTTP on the egress proxy: ``CONNECT host:port`` tunnels and plain ``http://`` forwarding.

``read_http`` reads one request head (the proxy read its first byte) and returns an
``HttpRequest``: the target, and how to answer in HTTP once the proxy has decided. A plain
request is forwarded in origin-form, with the checked URL's Host, without the Proxy-* and
hop-by-hop headers, and with ``Connection: close``: one request per client connection, so a
client reusing it cannot reach a second host under the first one's check. HTTPS is CONNECT
only (TLS stays end to end).

It must never answer a refusal without the reason (clients print the reason phrase), and
never pass on a header that could carry a second request or another host's name.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urlsplit

from .decisions import EgressFailed, Rejected
from .rules import EgressRefused

__all__ = ["HEAD_LIMIT", "HttpRequest", "read_http"]

HEAD_LIMIT = 16 << 10  # an HTTP request head (request line and headers) larger is refused
_HOP_BY_HOP = {
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "upgrade",
}


@dataclass(frozen=True, slots=True)
class HttpRequest:
    via: str  # "http-connect" or "http"
    host: str
    port: int
    forward: bytes | None = None  # plain HTTP: the rewritten head to send upstream

    def refused(self, writer: asyncio.StreamWriter, exc: EgressRefused) -> None:
        _reply(writer, 403, "Forbidden", f"egress refused: {exc}")

    def failed(self, writer: asyncio.StreamWriter, exc: EgressFailed) -> None:
        if exc.kind == "timeout":
            _reply(writer, 504, "Gateway Timeout", str(exc))
        else:
            _reply(writer, 502, "Bad Gateway", str(exc))

    def established(self, writer: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> int:
        """Tell the client, or send its request on: the bytes sent upstream."""
        if self.forward is None:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            return 0
        upstream.write(self.forward)
        return len(self.forward)


async def read_http(
    first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> HttpRequest:
    """CONNECT host:port, or an absolute-form request to forward; Rejected (answered) for
    anything else. The reader's limit must be HEAD_LIMIT."""
    try:
        head = first + await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise _bad(
            writer,
            431,
            "Request Header Fields Too Large",
            f"the request head is larger than {HEAD_LIMIT} bytes",
        ) from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _bad(
            writer,
            400,
            "Bad Request",
            "the egress proxy speaks HTTP/1.x (CONNECT or absolute-form requests) and SOCKS5",
        )
    method, target, version = parts
    if method == "CONNECT":
        try:
            host, port = _split_target(target)
        except ValueError:
            raise _bad(
                writer, 400, "Bad Request", f"CONNECT needs host:port, not {target!r}"
            ) from None
        return HttpRequest("http-connect", host, port)
    url = urlsplit(target)
    try:
        port = 80 if url.port is None else url.port
    except ValueError:
        port = 0
    if url.scheme != "http" or not url.hostname or not port:
        raise _bad(
            writer,
            400,
            "Bad Request",
            f"{target!r} is not an absolute http:// URL (https goes through CONNECT)",
        )
    # Forwarded as origin-form, one request per connection: a client reusing the
    # connection for another host must not reach it through this one's check. The Host
    # header is the checked URL's, so a shared server (a CDN) is asked for the checked
    # site, not whatever the client wrote there.
    kept = [
        h
        for h in lines[1:]
        if h and h.split(":", 1)[0].strip().lower() not in _HOP_BY_HOP | {"host"}
    ]
    kept.insert(0, f"Host: {url.netloc.rpartition('@')[2]}")
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    forward = "\r\n".join([f"{method} {path} {version}", *kept, "Connection: close", "", ""])
    return HttpRequest("http", url.hostname, port, forward.encode("latin-1"))


def _split_target(text: str) -> tuple[str, int]:
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
        raise ValueError(text)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536 or not host:
        raise ValueError(text)
    return host, int(port_text)


def _bad(writer: asyncio.StreamWriter, status: int, reason: str, detail: str) -> Rejected:
    _reply(writer, status, reason, detail)
    return Rejected("http", detail)


def _reply(writer: asyncio.StreamWriter, status: int, reason: str, detail: str) -> None:
    """An error response; the reason phrase carries the detail too, because clients show it
    (Python: "Tunnel connection failed: 403 Forbidden (sandboxer: ...)")."""
    body = f"sandboxer: {detail}\n".encode()
    phrase = f"{reason} (sandboxer: {detail})".replace("\r", " ").replace("\n", " ")
    writer.write(
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n"
        f"X-Sandboxer-Egress: {'refused' if status == 403 else 'failed'}\r\n\r\n".encode(
            "latin-1", "replace"
        )
        + body
    )
