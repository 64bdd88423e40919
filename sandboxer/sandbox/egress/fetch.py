"""One HTTP(S) request on a wasm plugin's behalf: ``sandboxer.http_request`` behind the scenes.

WebAssembly plugins have no sockets. A request they hand to the host goes through the egress
proxy's rules exactly as a sandboxed process's connection does: the same ``Checkpoint``, so
the same allow-list check, resolver and rebinding protection, log line and counters
(``via=wasm``). This module then dials the one address the check returned, speaks HTTP/1.1
over it (TLS verified against the URL's host name, or its IP SANs for an IP literal) and
reads at most ``max_response`` bytes of body.

It runs on a wasm worker thread, inside a host function, and blocks; every wait is bounded
by the call's deadline, re-read at each step, so a call that times out, is cancelled or is
unloaded stops waiting within ``STEP`` seconds.

It must never dial an address the checkpoint has not checked (no second lookup, no redirects
followed), never send a request it has not validated, and never return more than the cap.
"""

from __future__ import annotations

import base64
import binascii
import errno
import functools
import http.client
import io
import ipaddress
import os
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from .decisions import Checkpoint, EgressCounters, EgressFailed, log, printable
from .rules import AllowList, EgressRefused, IPAddress, plain_address, show_target

__all__ = ["fetch", "STEP"]

STEP = 0.05  # the longest single wait: how soon a moved or passed deadline is noticed
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}")
_BAD_VALUE = re.compile(r"[\x00\r\n]")
_BAD_PATH = re.compile(r"[\x00-\x20\x7f]")  # what http.client would refuse too, named here
_FIELDS = {"method", "url", "headers", "body", "body_base64"}
# Framing and connection handling are ours: a plugin setting them could desynchronise the
# exchange (a Content-Length that lies, a Transfer-Encoding it does not follow).
# Host is the checked URL's: a shared server (a CDN) must be asked for the site that passed
# the allow-list, not for another one behind the same address.
_RESERVED = {
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "proxy-authorization",
    "host",
}
Deadline = float | Callable[[], float]


class _Invalid(Exception):
    """The request itself is wrong: nothing was attempted."""


class _TimedOut(Exception):
    """The call's deadline passed."""


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"kind": kind, "message": message}}


def fetch(
    checkpoint: Checkpoint,
    plugin_id: str,
    allow: AllowList | None,
    request: Any,
    *,
    deadline: Deadline,
    max_response: int,
    ca_file: str | None,
) -> dict[str, Any]:
    """Perform ``request`` for ``plugin_id`` under ``allow`` (None: the plugin has no network
    at all, so every request is refused; still logged and counted) through ``checkpoint``'s
    rules, resolver, log and counters. Blocking. TLS is verified against the system's CAs
    plus ``ca_file``.

    ``deadline`` is a time.monotonic() value, or a function returning the current one (the
    wasm loader passes the store's, which an unload or a cancelled call moves to 0).
    Returns ``{"status", "headers", "body" | "body_base64"}`` or ``{"error": {"kind",
    "message"}}``; kinds: ``invalid`` (the request is malformed; nothing attempted, nothing
    counted), ``refused`` (the policy), ``failed`` (unreachable, TLS, protocol, or a body
    larger than ``max_response``) and ``timeout`` (the deadline passed)."""
    due = deadline if callable(deadline) else (lambda: deadline)
    try:
        method, scheme, host, port, path, headers, body = _parse(request, max_response)
    except _Invalid as exc:
        return _error("invalid", str(exc))
    target = show_target(host, port)
    counters = checkpoint.counters(plugin_id)
    try:
        with checkpoint.attempt(plugin_id, "wasm", target):
            if allow is None:
                raise EgressRefused(
                    "network_allowed is false for this plugin, so "
                    "sandboxer.http_request refuses every request"
                )
            addresses = checkpoint.decide_blocking(allow, host, port, deadline=due)
            sock, peer = _dial(addresses, port, due, checkpoint.connect_timeout)
    except EgressRefused as exc:
        return _error("refused", f"egress refused: {exc}")
    except EgressFailed as exc:
        return _error("timeout" if exc.kind == "deadline" else "failed", str(exc))
    checkpoint.record(plugin_id, "wasm", target, "allowed", f"connected to {peer}")
    counters.add(active=1)
    try:
        return _exchange(
            sock,
            scheme,
            host,
            port,
            method,
            path,
            headers,
            body,
            due,
            counters,
            max_response=max_response,
            ca_file=ca_file,
        )
    except _TimedOut:
        detail, kind = "the call's deadline passed", "timeout"
    except ssl.SSLCertVerificationError as exc:
        detail, kind = f"TLS certificate verification failed: {exc.verify_message}", "failed"
    except (ssl.SSLError, http.client.HTTPException, OSError, EgressFailed) as exc:
        detail, kind = _describe(exc), "failed"
    finally:
        counters.add(active=-1)
    log.warning(
        "egress plugin=%s via=wasm target=%s: the exchange failed (%s)",
        plugin_id,
        printable(target),
        printable(detail),
    )
    return _error(kind, f"{method} {target}: {detail}")


# -- the request, validated ----------------------------------------------------------------------


def _parse(
    request: Any, limit: int
) -> tuple[str, str, str, int, str, dict[str, str], bytes | None]:
    if not isinstance(request, dict):
        raise _Invalid(
            'the request must be a JSON object {"method", "url", "headers", '
            '"body" or "body_base64"}'
        )
    unknown = set(request) - _FIELDS
    if unknown:
        raise _Invalid(
            f"unknown request field(s) {', '.join(sorted(unknown))} (known: "
            f"{', '.join(sorted(_FIELDS))})"
        )
    method = request.get("method", "GET")
    if not isinstance(method, str) or len(method) > 32 or not _TOKEN.fullmatch(method):
        raise _Invalid(f'method must be an HTTP token such as "GET", not {method!r}')
    url = request.get("url")
    if not isinstance(url, str):
        raise _Invalid('url must be a string such as "https://example.com/path"')
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        raise _Invalid(f"url {url!r} is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise _Invalid(f"url {url!r}: only http:// and https:// URLs can be fetched")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise _Invalid(f"url {url!r} has an invalid port") from None
    if not host:
        raise _Invalid(f"url {url!r} has no host")
    if not host.isascii():
        try:  # the A-label: what the allow-list compares, the Host header and SNI carry
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise _Invalid(f"url {url!r}: {host!r} is not a valid host name") from None
    if "@" in parts.netloc:
        raise _Invalid(
            f"url {url!r}: credentials in the URL are not sent; use an Authorization header"
        )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if _BAD_PATH.search(path) or not path.isascii():
        raise _Invalid(
            f"url {url!r}: the path contains spaces, control characters or "
            "non-ASCII characters (percent-encode them)"
        )
    raw_headers = request.get("headers", {})
    if not isinstance(raw_headers, dict):
        raise _Invalid("headers must be an object of name: value strings")
    headers: dict[str, str] = {}
    for name, value in raw_headers.items():
        if not _TOKEN.fullmatch(name):
            raise _Invalid(f"header name {name!r} is not an HTTP token")
        if not isinstance(value, str) or _BAD_VALUE.search(value):
            raise _Invalid(f"header {name}: the value must be a string without CR, LF or NUL")
        try:
            value.encode("latin-1")  # what HTTP/1.1 header values are sent as
        except UnicodeEncodeError:
            raise _Invalid(
                f"header {name}: the value has characters outside ISO-8859-1 "
                "(encode them, e.g. percent- or RFC 8187-encoding)"
            ) from None
        if name.lower() in _RESERVED:
            raise _Invalid(
                f"header {name} is set by sandboxer (framing and connection "
                "handling), not by the plugin"
            )
        headers[name] = value
    if "body" in request and "body_base64" in request:
        raise _Invalid("give body or body_base64, not both")
    body: bytes | None = None
    if "body" in request:
        if not isinstance(request["body"], str):
            raise _Invalid("body must be a string (use body_base64 for bytes)")
        try:
            body = request["body"].encode("utf-8")
        except UnicodeEncodeError:
            raise _Invalid("body is not valid Unicode (use body_base64 for bytes)") from None
    elif "body_base64" in request:
        try:
            body = base64.b64decode(request["body_base64"], validate=True)
        except (binascii.Error, TypeError, ValueError):
            raise _Invalid("body_base64 is not valid base64") from None
    if body is not None and len(body) > limit:
        raise _Invalid(f"the body is {len(body)} bytes, more than the {limit}-byte limit")
    return method, scheme, host, port, path, headers, body


# -- the connection ------------------------------------------------------------------------------


def _left(due: Callable[[], float], cap: float | None = None) -> float:
    """Seconds to the deadline (and ``cap``), at most STEP; _TimedOut once it passed."""
    now = time.monotonic()
    left = due() - now
    if left <= 0:
        raise _TimedOut()
    return min(left, STEP) if cap is None else min(left, STEP, cap - now)


def _dial(
    addresses: list[IPAddress], port: int, due: Callable[[], float], connect_timeout: float
) -> tuple[socket.socket, str]:
    """A connected socket to the first of ``addresses`` that answers (exactly these: no
    lookup here). EgressFailed otherwise; kind "deadline" when the call's deadline passed."""
    last: BaseException | None = None
    for address in addresses:
        address = plain_address(address)
        family = socket.AF_INET6 if isinstance(address, ipaddress.IPv6Address) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            _connect(sock, (str(address), port), due, time.monotonic() + connect_timeout)
            sock.setblocking(True)
            return sock, str(address)
        except _TimedOut:
            sock.close()
            raise EgressFailed(
                "deadline",
                f"connecting to {show_target(str(address), port)}: the call's deadline passed",
            ) from None
        except OSError as exc:
            sock.close()
            last = exc
    where = show_target(str(addresses[0]), port)
    if isinstance(last, TimeoutError):
        raise EgressFailed(
            "timeout", f"connecting to {where}: no answer within {connect_timeout:g}s"
        )
    raise EgressFailed("failed", f"connecting to {where} failed: {_describe(last)}")


def _connect(
    sock: socket.socket, address: tuple[str, int], due: Callable[[], float], give_up: float
) -> None:
    sock.setblocking(False)
    err = sock.connect_ex(address)
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    while err in (errno.EINPROGRESS, errno.EAGAIN):
        wait = _left(due, give_up)
        if wait <= 0:
            raise TimeoutError("connect timed out")
        if poller.poll(wait * 1000):
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            break
    if err:
        raise OSError(err, os.strerror(err))


@functools.lru_cache(maxsize=8)
def _tls_context(ca_file: str | None, stamp: tuple[int, int] | None) -> ssl.SSLContext:
    """The system's trust store plus the host's ``egress_ca_file`` (``stamp``: its mtime and
    size, so a replaced file is read again); verification always on."""
    context = ssl.create_default_context()
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    return context


_context_lock = threading.Lock()


def _handshake(
    sock: socket.socket, host: str, due: Callable[[], float], ca_file: str | None
) -> ssl.SSLSocket:
    with _context_lock:
        try:
            stamp = None
            if ca_file is not None:
                st = os.stat(ca_file)
                stamp = (st.st_mtime_ns, st.st_size)
            context = _tls_context(ca_file, stamp)
        except (OSError, ssl.SSLError) as exc:
            raise EgressFailed(
                "failed", f"cannot load the egress CA file {ca_file}: {_describe(exc)}"
            ) from None
    tls = context.wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
    try:
        # A timed-out wait leaves OpenSSL's state intact (Python raises before retrying), so
        # the handshake resumes on the next step.
        while True:
            tls.settimeout(_left(due))
            try:
                tls.do_handshake()
                return tls
            except TimeoutError:
                continue
    except BaseException:
        tls.close()
        raise


class _Timed:
    """The connection as http.client sees it: every wait at most STEP, the deadline re-read
    at each, bytes counted each way."""

    def __init__(
        self, sock: socket.socket, due: Callable[[], float], counters: EgressCounters
    ) -> None:
        self.sock = sock
        self.due = due
        self.counters = counters

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            self.sock.settimeout(_left(self.due))
            try:
                sent = self.sock.send(view)
            except TimeoutError:
                continue
            self.counters.add(bytes_sent=sent)
            view = view[sent:]

    def recv_into(self, buffer: Any) -> int:
        while True:
            self.sock.settimeout(_left(self.due))
            try:
                got = self.sock.recv_into(buffer)
            except TimeoutError:
                continue
            self.counters.add(bytes_received=got)
            return got

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_Reader(self))

    def close(self) -> None:
        pass  # fetch closes the real socket


class _Reader(io.RawIOBase):
    def __init__(self, conn: _Timed) -> None:
        self.conn = conn

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self.conn.recv_into(buffer)


def _exchange(
    sock: socket.socket,
    scheme: str,
    host: str,
    port: int,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes | None,
    due: Callable[[], float],
    counters: EgressCounters,
    *,
    max_response: int,
    ca_file: str | None,
) -> dict[str, Any]:
    """Send the request and read the response over ``sock``, which this closes."""
    try:
        if scheme == "https":
            sock = _handshake(sock, host, due, ca_file)  # owns the fd from here on
        return _http(
            sock, scheme, host, port, method, path, headers, body, due, counters, max_response
        )
    finally:
        sock.close()


def _http(
    sock: socket.socket,
    scheme: str,
    host: str,
    port: int,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes | None,
    due: Callable[[], float],
    counters: EgressCounters,
    limit: int,
) -> dict[str, Any]:
    conn = http.client.HTTPConnection(host, port)
    conn.sock = _Timed(sock, due, counters)
    try:
        shown = f"[{host}]" if ":" in host else host
        default = 443 if scheme == "https" else 80
        headers = {"Host": shown if port == default else f"{shown}:{port}", **headers}
        headers.setdefault("Connection", "close")
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        declared = response.getheader("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise EgressFailed(
                "failed",
                f"the response body is {int(declared)} bytes, more than the {limit}-byte limit",
            )
        data = response.read(limit + 1)
        if len(data) > limit:
            raise EgressFailed("failed", f"the response body is larger than the {limit}-byte limit")
        merged: dict[str, str] = {}
        for name, value in response.getheaders():
            key = name.lower()
            merged[key] = f"{merged[key]}, {value}" if key in merged else value
        result: dict[str, Any] = {"status": response.status, "headers": merged}
        try:
            result["body"] = data.decode("utf-8")
        except UnicodeDecodeError:
            result["body_base64"] = base64.b64encode(data).decode("ascii")
        return result
    finally:
        conn.sock = None  # _exchange closes the real socket
        conn.close()


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
