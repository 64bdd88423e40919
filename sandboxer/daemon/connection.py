"""One client of ``sandboxer serve`` (server.py), as an asyncio Protocol: who it is (from the
kernel), its frames parsed as they arrive, each request run as a task of its own, each reply
written as it is ready, and the bounds that cut a client off (``Limits``)."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from .._tenants import Tenant
from ..errors import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    SERVER_ERROR,
    PluginLoadError,
    PluginNotFound,
    PluginStateError,
    ProtocolError,
    SandboxerError,
)
from ..rpc.client import Relay
from ..rpc.framing import (
    LineBuffer,
    Request,
    encode_error,
    encode_notification,
    encode_result,
    parse_message,
)
from .snapshot import Caller

if TYPE_CHECKING:
    from .server import Daemon, Space

__all__ = ["Connection", "Refused", "peer_credentials"]

log = logging.getLogger("sandboxer.daemon")
audit = logging.getLogger("sandboxer.audit")

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


def peer_credentials(sock: socket.socket) -> Caller:
    """Who is at the other end, as the kernel says (SO_PEERCRED, SO_PEERGROUPS)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    try:
        listed = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 1024)
        groups = struct.unpack(f"{len(listed) // 4}I", listed)
    except OSError:
        groups = ()
    return Caller(uid=uid, gid=gid, groups=tuple(groups), pid=pid)


class Refused(Exception):
    """A request this caller may not make: a JSON-RPC error, and an audit line."""

    def __init__(self, message: str, code: int = SERVER_ERROR) -> None:
        super().__init__(message)
        self.code = code


class Connection(asyncio.Protocol):
    """One client, as an asyncio Protocol (no stream reader: one loop turn less each way):
    its frames parsed as they arrive, each request run as a task of its own (calls are
    multiplexed by id), each reply written as it is ready."""

    METHODS = ("load", "call", "unload", "reload", "restart", "list", "stats", "status")

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.limits = daemon.limits
        self.caller = Caller(uid=-1, gid=-1, groups=())
        self.tenant: Tenant | None = None
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._frames = LineBuffer(daemon.config.max_frame)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscriptions: set[asyncio.Task[None]] = set()  # of _tasks: they never end
        self._relays: set[Relay] = set()  # calls forwarded without a task (Daemon.relay)
        self._garbage = 0
        self._closed = False  # cut off or gone: nothing more is read or answered
        self._eof = False
        self._frame_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None

    def _who(self) -> str:
        return f"uid {self.caller.uid} (pid {self.caller.pid})"

    # -- the transport's callbacks ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: a cast, not a check
        self._transport = transport = cast(asyncio.Transport, transport)
        self.caller = peer_credentials(transport.get_extra_info("socket"))
        try:
            self.tenant = self.daemon.admit(self.caller)
        except Refused as exc:
            audit.warning("refused uid=%d pid=%d: %s", self.caller.uid, self.caller.pid, exc)
            self._closed = True
            # Say why, stop writing, and let the client's first request arrive (for a second
            # at most) before closing: a client whose request met a closed socket would lose
            # the reason.
            transport.write(encode_error(None, exc.code, str(exc)))
            transport.write_eof()
            self._loop.call_later(1.0, transport.close)
            return
        self.daemon._connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            lines = self._frames.feed(data)
        except ProtocolError as exc:
            self._send(encode_error(None, INVALID_REQUEST, str(exc)))
            self._cut(str(exc))
            return
        for line in lines:
            if line.strip() and not self._closed:
                self._frame(line)
        if self._frames.pending and self._frame_timer is None and not self._closed:
            self._frame_timer = self._loop.call_later(self.limits.frame_seconds, self._slow)
        elif not self._frames.pending and self._frame_timer is not None:
            self._frame_timer.cancel()
            self._frame_timer = None

    def eof_received(self) -> bool:
        """The client is done sending: what it asked is answered first, then we close."""
        self._eof = True
        # True keeps the transport open for writing; _done closes it after the last answer.
        return not self._closed and self._in_flight() > 0

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self.daemon._connections.discard(self)
        for timer in (self._frame_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        for task in self._tasks:
            task.cancel()
        for relay in list(self._relays):
            relay.cancel()

    def pause_writing(self) -> None:
        """The client is not reading: it has ``write_seconds`` to start again."""
        if self._write_timer is None:
            self._write_timer = self._loop.call_later(self.limits.write_seconds, self._deaf)

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    # -- cutting off -----------------------------------------------------------------------------
    def _slow(self) -> None:
        self._cut(f"a frame begun was not finished within {self.limits.frame_seconds:g}s")

    def _deaf(self) -> None:
        self._cut(f"it read nothing for {self.limits.write_seconds:g}s", abort=True)

    def _cut(self, why: str, *, abort: bool = False) -> None:
        if self._closed:
            return
        log.warning("client %s cut off: %s", self._who(), why)
        self._closed = True
        assert self._transport is not None
        if abort:
            self._transport.abort()
        else:
            self._transport.close()  # what is buffered goes first

    async def abort(self) -> None:
        """The daemon is stopping: close at once, its requests cancelled."""
        tasks = list(self._tasks)
        for relay in list(self._relays):
            relay.cancel()
        if self._transport is not None:
            self._transport.abort()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- requests --------------------------------------------------------------------------------
    def _frame(self, line: bytes) -> None:
        try:
            message = parse_message(line)
            if not isinstance(message, Request):
                raise ProtocolError("the daemon takes requests only (a method and an id)")
        except ProtocolError as exc:
            self._garbage += 1
            code = PARSE_ERROR if "invalid JSON" in str(exc) else INVALID_REQUEST
            self._send(encode_error(None, code, str(exc)))
            if self._garbage >= self.limits.garbage_frames:
                self._cut(f"{self._garbage} frames that were no requests")
            return
        if self._in_flight() >= self.limits.in_flight:
            self._send(
                encode_error(
                    message.id,
                    SERVER_ERROR,
                    f"{self.limits.in_flight} requests of this connection are in flight",
                )
            )
            return
        if message.method == "call" and type(message.params) is dict and self._relay(message):
            return
        task = self._loop.create_task(self._answer(message))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _in_flight(self) -> int:
        return len(self._tasks) - len(self._subscriptions) + len(self._relays)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._settled()

    def _settled(self) -> None:
        """A request was answered: after the client's EOF, the last answer closes."""
        if self._eof and not self._closed and self._in_flight() == 0:
            self._closed = True
            assert self._transport is not None
            self._transport.close()

    def _relay(self, request: Request) -> bool:
        """A call forwarded in this loop pass and answered in the pass its answer arrives
        (Daemon.relay); False when it must take the task path."""
        assert isinstance(request.params, dict)
        sent: list[Relay] = []

        def then(result: Any, error: BaseException | None) -> None:
            if sent:
                self._relays.discard(sent[0])
            if error is None:
                self._send(encode_result(request.id, result))
            elif not isinstance(error, asyncio.CancelledError):
                self._reply_error(request, error)
            self._settled()

        try:
            relay = self.daemon.relay(self.caller, self.tenant, request.params, then)
        except Exception as exc:
            self._reply_error(request, exc)
            return True
        if relay is None:
            return False
        sent.append(relay)
        self._relays.add(relay)
        return True

    async def _answer(self, request: Request) -> None:
        params = request.params if request.params is not None else {}
        try:
            if not isinstance(params, dict):
                raise Refused("params must be an object (by name)", INVALID_PARAMS)
            if request.method == "subscribe":
                task = asyncio.current_task()
                assert task is not None
                self._subscriptions.add(task)
                await self._subscribe(request)
                return
            if request.method not in self.METHODS:
                raise Refused(f"no method {request.method!r}", METHOD_NOT_FOUND)
            method: Callable[..., Awaitable[Any]] = getattr(self.daemon, request.method)
            result = await method(self.caller, self.tenant, params)
        except Exception as exc:
            self._reply_error(request, exc)
            return
        self._send(encode_result(request.id, result))

    def _reply_error(self, request: Request, exc: BaseException) -> None:
        """A request that failed: its JSON-RPC error, and an audit line where it is one."""
        if isinstance(exc, Refused):
            audit.warning(
                "refused %s uid=%d pid=%d: %s",
                request.method,
                self.caller.uid,
                self.caller.pid,
                exc,
            )
            self._send(encode_error(request.id, exc.code, str(exc)))
        elif isinstance(exc, SandboxerError):
            if isinstance(exc, (PluginLoadError, PluginStateError, PluginNotFound)):
                audit.info(
                    "failed %s uid=%d pid=%d: %s",
                    request.method,
                    self.caller.uid,
                    self.caller.pid,
                    exc,
                )
            self._send(encode_error(request.id, SERVER_ERROR, exc.message, exc.to_json()))
        else:  # a bug of ours: the client hears of it, the daemon goes on
            log.error("request %s of %s failed", request.method, self._who(), exc_info=exc)
            self._send(encode_error(request.id, INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"))

    async def _subscribe(self, request: Request) -> None:
        """Events of the caller's plugins (the administrator: everyone's, tenants that come
        later included) as notifications, until the client goes; one that falls behind the
        event buffer is cut off."""
        self._send(encode_result(request.id, {"subscribed": True}))
        forwarders: set[asyncio.Task[None]] = set()

        async def forward(space: Space) -> None:
            stream = space.manager.events()
            try:
                async for event in stream:
                    notice = {**event.to_json(), "tenant": space.name}
                    self._send(encode_notification("event", notice))
                if stream.overflowed:
                    self._cut("it fell behind its events", abort=True)
            finally:
                await stream.aclose()

        def follow(space: Space) -> None:
            forwarders.add(asyncio.ensure_future(forward(space)))

        if self.tenant is None:
            for space in list(self.daemon.spaces.values()):
                follow(space)
            self.daemon.followers.add(follow)
        else:
            follow(self.daemon.space(self.tenant))
        try:
            await self._loop.create_future()  # until the connection ends
        finally:
            self.daemon.followers.discard(follow)
            for task in forwarders:
                task.cancel()
            await asyncio.gather(*forwarders, return_exceptions=True)

    def _send(self, data: bytes) -> None:
        """Write one reply (a client not reading is cut after ``write_seconds``)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)
