"""The host side of the wire protocol: one connection to one plugin process.

An asyncio Protocol over the supervisor's end of the socketpair. The plugin speaks first (the
handshake); after that the host sends requests, multiplexed by id, and the plugin answers.
Everything the plugin sends is untrusted: a garbage frame, an oversized frame, a response to
an id nobody asked, a second handshake, a response with both result and error: each ends the
session with a ProtocolError that every pending call receives. The owner (the process handle)
is told through ``on_failure`` and decides what the plugin's fate is; this module never
touches the process.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable
from typing import Any

from .. import _json
from ..errors import (
    INVALID_PARAMS,
    SERVER_ERROR,
    CallTimeout,
    HandshakeError,
    MethodNotFound,
    PluginCallError,
    ProtocolError,
    SandboxerError,
)
from .framing import (
    DEFAULT_MAX_FRAME,
    METHOD_NOT_FOUND,
    LineBuffer,
    Notification,
    Request,
    Response,
    encode_error,
    encode_notification,
    encode_request,
    encode_result,
    parse_message,
)

__all__ = ["RpcConnection", "Relay", "HandshakeInfo", "SUPPORTED_PROTOCOLS"]

SUPPORTED_PROTOCOLS = (1,)
_LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "warn": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


_READ_SIZE = 1 << 16


class _Expired(Exception):
    """A call's deadline passed (raised into its future by the timer)."""


_SWEEP = 0.02  # seconds between deadline checks while calls are in flight


class HandshakeInfo:
    """What the plugin said about itself in its handshake."""

    __slots__ = ("methods", "name", "protocol", "version")

    def __init__(self, protocol: int, name: str, version: str, methods: tuple[str, ...]):
        self.protocol = protocol
        self.name = name
        self.version = version
        self.methods = methods


def _check_handshake(params: Any, cookie: str) -> HandshakeInfo:
    """Validate handshake params; HandshakeError says exactly what was wrong."""
    if not isinstance(params, dict):
        raise HandshakeError("the handshake params must be an object")
    given = params.get("cookie")
    if not isinstance(given, str) or not hmac.compare_digest(given.encode(), cookie.encode()):
        raise HandshakeError(
            "the handshake carried the wrong magic cookie (is this process "
            "a sandboxer plugin started by this host?)"
        )
    protocols = params.get("protocols")
    if not isinstance(protocols, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) for p in protocols
    ):
        raise HandshakeError("the handshake must list its protocol versions as integers")
    common = sorted(set(protocols) & set(SUPPORTED_PROTOCOLS))
    if not common:
        raise HandshakeError(
            f"no common protocol version: the plugin speaks {protocols}, "
            f"this host speaks {list(SUPPORTED_PROTOCOLS)}"
        )
    plugin = params.get("plugin", {})
    if not isinstance(plugin, dict):
        raise HandshakeError("the handshake's plugin field must be an object")
    methods = params.get("methods", [])
    if (
        not isinstance(methods, list)
        or not all(isinstance(m, str) for m in methods)
        or len(methods) > 10_000
    ):
        raise HandshakeError("the handshake's methods must be a list of strings")
    return HandshakeInfo(
        common[-1],
        str(plugin.get("name", ""))[:200],
        str(plugin.get("version", ""))[:100],
        tuple(methods),
    )


class Relay:
    """A call answered by callback (``RpcConnection.relay``): it stands where a call's future
    would, with the three methods the connection uses on one (``done``, ``set_result``,
    ``set_exception``), and calls ``then(result, error)`` exactly once."""

    __slots__ = ("_conn", "_done", "_method", "_then", "_timeout", "rid")

    def __init__(
        self,
        conn: RpcConnection,
        method: str,
        timeout: float | None,
        then: Callable[[Any, BaseException | None], None],
    ) -> None:
        self._conn = conn
        self.rid = 0
        self._method = method
        self._timeout = timeout
        self._then = then
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, value: Any) -> None:
        self._finish(value, None)

    def set_exception(self, error: BaseException) -> None:
        if isinstance(error, _Expired):
            error = self._conn._expired(self.rid, self._method, self._timeout)
        self._finish(None, error)

    def cancel(self) -> None:
        """The caller is gone: the plugin is told to stop; ``then`` hears CancelledError."""
        if not self._done:
            self._conn.notify("sandboxer.cancel", {"id": self.rid})
            self._finish(None, asyncio.CancelledError())

    def _finish(self, value: Any, error: BaseException | None) -> None:
        if not self._done:
            self._done = True
            self._conn._deadlines.pop(self.rid, None)
            self._then(value, error)


class RpcConnection(asyncio.BufferedProtocol):
    """JSON-RPC over one stream; create with ``loop.connect_accepted_socket``."""

    def __init__(
        self,
        *,
        plugin_id: str,
        cookie: str,
        max_frame: int = DEFAULT_MAX_FRAME,
        logger: logging.Logger | None = None,
        on_failure: Callable[[SandboxerError], None] | None = None,
        on_eof: Callable[[], None] | None = None,
        on_cancel_ignored: Callable[[str], None] | None = None,
        cancel_grace: float = 1.0,
    ) -> None:
        self.plugin_id = plugin_id
        self._cookie = cookie
        self._buffer = LineBuffer(max_frame)
        self._log = logger or logging.getLogger(f"sandboxer.plugin.{plugin_id}")
        self._on_failure = on_failure
        self._on_eof = on_eof
        self._eof = False
        self._on_cancel_ignored = on_cancel_ignored
        self._cancel_grace = cancel_grace
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, asyncio.Future[Any] | Relay] = {}
        self._next_id = 1
        self._loop = asyncio.get_running_loop()
        self.handshake: asyncio.Future[HandshakeInfo] = self._loop.create_future()
        self.failed: asyncio.Future[SandboxerError] = self._loop.create_future()
        self.error: SandboxerError | None = None
        # Reads land in one preallocated buffer (the default transport allocates 256 KiB per
        # read); writes made in the same loop pass leave together (``_write``).
        self._read_buffer = memoryview(bytearray(_READ_SIZE))
        self._out: list[bytes] | None = None
        self._deadlines: dict[int, tuple[float, asyncio.Future[Any] | Relay]] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self._read_buffer[:nbytes]))

    @property
    def broken(self) -> bool:
        return self.error is not None

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            try:
                lines = self._buffer.feed(data)
            except ProtocolError as exc:
                raise self._framing_error(exc.message) from None
            for line in lines:
                self._receive(line)
                if self.broken:  # that line broke the connection: drop the rest
                    return
        except SandboxerError as exc:
            self.fail(exc)

    def _framing_error(self, what: str) -> ProtocolError | HandshakeError:
        """Before the handshake any broken frame is a failed handshake (a load error)."""
        kind = ProtocolError if self.handshake.done() else HandshakeError
        prefix = "" if self.handshake.done() else "broken handshake: "
        return kind(f"plugin {self.plugin_id}: {prefix}{what}", plugin_id=self.plugin_id)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if self.error is not None:
            return
        self._eof = True
        if self._on_eof is not None:
            # The owner finds out why (exit status, signal, stderr) and calls fail() with it;
            # pending calls wait for that rather than seeing a bare "connection closed".
            self._on_eof()
        else:
            reason = f": {exc}" if exc else ""
            self.fail(
                ProtocolError(
                    f"plugin {self.plugin_id}: the connection closed{reason}",
                    plugin_id=self.plugin_id,
                )
            )

    # -- receiving ---------------------------------------------------------------------------
    def _receive(self, line: bytes) -> None:
        if self.handshake.done():
            # Fast path for the common frame, a plain result; anything else is parsed and
            # checked in full below.
            try:
                obj = _json.loads(line)
            except _json.JSONError:
                obj = None
            if (
                type(obj) is dict
                and len(obj) == 3
                and "result" in obj
                and obj.get("jsonrpc") == "2.0"
                and type(obj.get("id")) is int
            ):
                future = self._pending.pop(obj["id"], None)
                if future is not None:
                    if not future.done():
                        future.set_result(obj["result"])
                    return
        if not line.strip():
            raise self._framing_error("sent an empty frame")
        try:
            message = parse_message(line)
        except ProtocolError as exc:
            raise self._framing_error(exc.message) from None
        if not self.handshake.done():
            self._receive_handshake(message)
        elif isinstance(message, Response):
            self._receive_response(message)
        elif isinstance(message, Notification):
            self._receive_notification(message)
        elif message.method == "sandboxer.handshake":
            raise ProtocolError(
                f"plugin {self.plugin_id}: sent the handshake twice", plugin_id=self.plugin_id
            )
        else:
            # A well-formed request the host does not serve: answer it as JSON-RPC says.
            self._write(
                encode_error(
                    message.id, METHOD_NOT_FOUND, f"the host offers no method {message.method!r}"
                )
            )

    def _receive_handshake(self, message: Any) -> None:
        if not isinstance(message, Request) or message.method != "sandboxer.handshake":
            raise HandshakeError(
                f"plugin {self.plugin_id}: the first frame must be the sandboxer.handshake request",
                plugin_id=self.plugin_id,
            )
        try:
            info = _check_handshake(message.params, self._cookie)
        except HandshakeError as exc:
            self._write(encode_error(message.id, SERVER_ERROR, exc.message))
            raise HandshakeError(
                f"plugin {self.plugin_id}: {exc.message}", plugin_id=self.plugin_id
            ) from None
        self._write(encode_result(message.id, {"protocol": info.protocol}))
        self.handshake.set_result(info)

    def _receive_response(self, message: Response) -> None:
        future = self._pending.pop(message.id, None)  # type: ignore[arg-type]
        if future is None:
            raise ProtocolError(
                f"plugin {self.plugin_id}: answered id {message.id!r}, which "
                "no call is waiting for",
                plugin_id=self.plugin_id,
            )
        if future.done():  # the caller gave up (timeout, cancellation) already
            return
        if message.error is None:
            future.set_result(message.result)
            return
        error = message.error
        code, text = error["code"], error["message"]
        prefix = f"plugin {self.plugin_id}"
        if not text.startswith(prefix):
            text = f"{prefix}: {text}"
        if code == METHOD_NOT_FOUND:
            data = error.get("data")
            available = data.get("available") if isinstance(data, dict) else None
            future.set_exception(
                MethodNotFound(
                    text,
                    plugin_id=self.plugin_id,
                    available=available if isinstance(available, list) else None,
                )
            )
        else:
            future.set_exception(
                PluginCallError(text, code=code, data=error.get("data"), plugin_id=self.plugin_id)
            )

    def _receive_notification(self, message: Notification) -> None:
        if message.method == "sandboxer.log" and isinstance(message.params, dict):
            level = _LOG_LEVELS.get(str(message.params.get("level", "info")).lower(), logging.INFO)
            self._log.log(level, "%s", str(message.params.get("message", ""))[:8192])
        # Other notifications are not part of protocol 1; ignoring them is safe.

    # -- sending -----------------------------------------------------------------------------
    def _write(self, frame: bytes) -> None:
        """The first frame of a loop pass goes out at once (the latency path); frames written
        later in the same pass, as when many calls start together, leave in one write."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._out is not None:
            self._out.append(frame)
        elif len(self._pending) > 1:  # others in flight: this may be the start of a burst
            transport.write(frame)
            self._out = []
            self._loop.call_soon(self._flush)
        else:
            transport.write(frame)

    def _flush(self) -> None:
        out, self._out = self._out, None
        if out and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(out))

    def notify(self, method: str, params: Any) -> None:
        if self.error is None:
            self._write(encode_notification(method, params))

    def _request(self, method: str, params: list[Any], timeout: float | None, waiter: Any) -> int:
        """Write a request whose answer goes to ``waiter`` (a future, or a Relay)."""
        rid = self._next_id
        self._next_id = rid + 1
        try:
            frame = encode_request(rid, method, params)
        except TypeError as exc:
            raise PluginCallError(
                f"plugin {self.plugin_id}: arguments of {method} are not JSON values: {exc}",
                code=INVALID_PARAMS,
                plugin_id=self.plugin_id,
                method=method,
            ) from None
        self._pending[rid] = waiter
        self._write(frame)
        if timeout is not None:
            self._deadlines[rid] = (self._loop.time() + timeout, waiter)
            if self._sweeper is None:
                self._sweeper = self._loop.call_later(_SWEEP, self._sweep)
        return rid

    def _expired(self, rid: int, method: str, timeout: float | None) -> CallTimeout:
        """A call's deadline passed. Its id stays pending: a late answer is dropped quietly,
        not a protocol error. One that never comes within the grace period means the plugin
        ignored the cancel: the owner is told (and kills it)."""
        self.notify("sandboxer.cancel", {"id": rid})
        if self._on_cancel_ignored is not None:
            self._loop.call_later(self._cancel_grace, self._check_cancelled, rid, method)
        return CallTimeout(
            f"plugin {self.plugin_id}: {method} did not answer within {timeout:g}s",
            timeout=timeout or 0.0,
            plugin_id=self.plugin_id,
            method=method,
        )

    async def call(self, method: str, params: list[Any], *, timeout: float | None) -> Any:
        """Send a request and wait for its answer (CallTimeout after ``timeout`` seconds)."""
        if self.error is not None:
            raise self.error
        if self._eof:
            raise await asyncio.shield(self.failed)
        future = self._loop.create_future()
        rid = self._request(method, params, timeout, future)
        try:
            return await future
        except _Expired:
            raise self._expired(rid, method, timeout) from None
        except asyncio.CancelledError:
            self.notify("sandboxer.cancel", {"id": rid})
            raise
        finally:
            self._deadlines.pop(rid, None)

    def relay(
        self,
        method: str,
        params: list[Any],
        *,
        timeout: float | None,
        then: Callable[[Any, BaseException | None], None],
    ) -> Relay | None:
        """Send a request whose answer goes to ``then(result, error)`` in the loop pass it
        arrives: no task, no future, no coroutine (how the daemon forwards a client's call).
        None when the connection has ended and its cause is not known yet: use ``call``."""
        if self.error is not None:
            raise self.error
        if self._eof:
            return None
        relay = Relay(self, method, timeout, then)
        relay.rid = self._request(method, params, timeout, relay)
        return relay

    def _sweep(self) -> None:
        """Expire calls past their deadline. One timer per connection, not one per call:
        a deadline is honoured within ``_SWEEP`` seconds, well inside the promised second."""
        self._sweeper = None
        now = self._loop.time()
        for deadline, future in list(self._deadlines.values()):
            if deadline <= now and not future.done():
                future.set_exception(_Expired())
        if self._deadlines and self.error is None:
            self._sweeper = self._loop.call_later(_SWEEP, self._sweep)

    def _check_cancelled(self, rid: int, method: str) -> None:
        if self.error is None and rid in self._pending and self._on_cancel_ignored:
            self._on_cancel_ignored(method)

    @property
    def in_flight(self) -> int:
        return sum(1 for f in self._pending.values() if not f.done())

    # -- failure -----------------------------------------------------------------------------
    def fail(self, error: SandboxerError, *, notify: bool = True) -> None:
        """End the session: every pending call and the handshake get ``error``."""
        if self.error is not None:
            return
        self.error = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        self._pending.clear()
        if not self.handshake.done():
            self.handshake.set_exception(error)
        self.failed.set_result(error)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._transport is not None:
            self._transport.abort()
        if notify and self._on_failure is not None:
            self._on_failure(error)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
