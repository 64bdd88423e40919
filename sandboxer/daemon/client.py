"""``sandboxer.connect(path)``: a client of ``sandboxer serve`` with PluginManager's methods.

    async with await sandboxer.connect() as daemon:      # $SANDBOXER_SOCKET, or the default
        p = await daemon.load("/srv/alice/hello")
        print(await p.call("greet", "world"))
        await daemon.unload(p.id)

Requests are multiplexed over one connection; the daemon's errors come back as the same
exceptions a PluginManager raises (``errors.from_json``). Who the caller is, the daemon learns
from the kernel: nothing here says it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from typing import Any, cast

from .. import _json
from ..errors import ProtocolError, SandboxerError, from_json
from ..rpc.framing import LineBuffer, Notification, Response, encode_request, parse_message
from . import DEFAULT_SOCKET

__all__ = ["connect", "DaemonClient", "RemotePlugin", "socket_path"]

_MAX_FRAME = 16 << 20


def socket_path(path: str | os.PathLike[str] | None = None) -> str:
    """``path``, else ``$SANDBOXER_SOCKET``, else the daemon's default socket."""
    if path is not None:
        return os.fspath(path)
    return os.environ.get("SANDBOXER_SOCKET") or DEFAULT_SOCKET


async def connect(path: str | os.PathLike[str] | None = None) -> DaemonClient:
    """A connection to the daemon listening at ``socket_path(path)``."""
    where = socket_path(path)
    loop = asyncio.get_running_loop()
    try:
        _, protocol = await loop.create_unix_connection(lambda: _Wire(where), where)
    except OSError as exc:
        raise SandboxerError(f"no sandboxer daemon answers on {where}: {exc.strerror}") from None
    return DaemonClient(protocol)


class RemotePlugin:
    """A plugin the daemon runs for this caller; ``call`` goes through the daemon."""

    def __init__(self, client: DaemonClient, description: dict[str, Any]) -> None:
        self._client = client
        self.description = description

    @property
    def id(self) -> str:
        return str(self.description["id"])

    @property
    def version(self) -> str:
        return str(self.description["version"])

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.description.get("methods") or ())

    @property
    def started_warm(self) -> bool:
        return bool(self.description.get("started_warm"))

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        return await self._client.call(self.id, method, *args, timeout=timeout)

    def __repr__(self) -> str:
        return f"<RemotePlugin {self.id} {self.version}>"


class _Wire(asyncio.Protocol):
    """The connection itself: frames in, replies matched to requests by id, events queued."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int | str, asyncio.Future[Any]] = {}
        self.events: asyncio.Queue[dict[str, Any] | None] | None = None
        self.error: SandboxerError | None = None
        self.closed = asyncio.get_running_loop().create_future()
        self._frames = LineBuffer(_MAX_FRAME)
        self._writable: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: a cast, not a check
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            for line in self._frames.feed(data):
                self._dispatch(parse_message(line))
        except ProtocolError as exc:
            self.fail(SandboxerError(f"the daemon at {self.path} sent garbage: {exc}"))
            assert self.transport is not None
            self.transport.abort()

    def eof_received(self) -> bool:
        self.fail(SandboxerError(f"the daemon at {self.path} closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(SandboxerError(f"the connection to the daemon at {self.path} ended: {exc!r}"))
        if not self.closed.done():
            self.closed.set_result(None)
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    async def send(self, frame: bytes) -> None:
        assert self.transport is not None
        self.transport.write(frame)
        if self._writable is not None:  # the daemon is not reading fast enough: wait
            await self._writable

    def _dispatch(self, message: Any) -> None:
        if isinstance(message, Notification):
            if message.method == "event" and self.events is not None:
                self.events.put_nowait(message.params)
            return
        if not isinstance(message, Response):
            return
        future = self.pending.get(message.id) if message.id is not None else None
        if message.error is not None:
            error = _error(message.error)
            if future is None:  # about no request of ours: the connection is done for
                self.fail(error)
            elif not future.done():
                future.set_exception(error)
        elif future is not None and not future.done():
            future.set_result(message.result)

    def fail(self, error: SandboxerError) -> None:
        if self.error is None:
            self.error = error
        for future in self.pending.values():
            if not future.done():
                future.set_exception(self.error)
        if self.events is not None:
            self.events.put_nowait(None)


class DaemonClient:
    """One connection to the daemon."""

    def __init__(self, wire: _Wire) -> None:
        self.path = wire.path
        self._wire = wire
        self._ids = itertools.count(1)

    async def __aenter__(self) -> DaemonClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._wire.transport is not None:
            self._wire.transport.close()
        await self._wire.closed

    # -- PluginManager's verbs ---------------------------------------------------------------
    async def load(
        self, path: str | os.PathLike[str], *, config: dict[str, Any] | None = None
    ) -> RemotePlugin:
        params: dict[str, Any] = {"path": os.path.abspath(os.fspath(path))}
        if config is not None:
            params["config"] = config
        return RemotePlugin(self, await self._request("load", params))

    async def load_from_registry(
        self, plugin_id: str, version: str = "latest", *, config: dict[str, Any] | None = None
    ) -> RemotePlugin:
        """``plugin_id`` at ``version`` (exact, ``latest`` or a semver range) from the
        daemon's registry, verified against its trusted keys."""
        params: dict[str, Any] = {"registry_id": plugin_id, "version": version}
        if config is not None:
            params["config"] = config
        return RemotePlugin(self, await self._request("load", params))

    async def call(
        self, plugin_id: str, method: str, *args: Any, timeout: float | None = None
    ) -> Any:
        params: dict[str, Any] = {"plugin": plugin_id, "method": method, "args": list(args)}
        if timeout is not None:
            params["timeout"] = timeout
        return await self._request("call", params)

    async def reload(self, plugin_id: str) -> RemotePlugin:
        return RemotePlugin(self, await self._request("reload", {"plugin": plugin_id}))

    async def restart(self, plugin_id: str) -> RemotePlugin:
        return RemotePlugin(self, await self._request("restart", {"plugin": plugin_id}))

    async def unload(self, plugin_id: str) -> None:
        await self._request("unload", {"plugin": plugin_id})

    async def list(self) -> list[dict[str, Any]]:
        return list(await self._request("list", {}))

    async def status(self) -> dict[str, Any]:
        """The caller's tenant and plugins (the administrator: all), as ``sandboxer status``."""
        return dict(await self._request("status", {}))

    async def stats(self, plugin_id: str) -> dict[str, Any]:
        return dict(await self._request("stats", {"plugin": plugin_id}))

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The caller's plugins' events, as the daemon sends them (PluginEvent.to_json, with
        the tenant), until the connection ends."""
        if self._wire.events is None:
            self._wire.events = asyncio.Queue()
            await self._request("subscribe", {})
        while True:
            event = await self._wire.events.get()
            if event is None:
                return
            yield event

    # -- the wire ----------------------------------------------------------------------------
    async def _request(self, method: str, params: dict[str, Any]) -> Any:
        wire = self._wire
        if wire.error is not None:
            raise wire.error
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        wire.pending[request_id] = future
        try:
            await wire.send(encode_request(request_id, method, params))
            return await future
        finally:
            del wire.pending[request_id]


def _error(error: dict[str, Any]) -> SandboxerError:
    """The daemon's error: the exception it describes (``data``), else its message."""
    data = error.get("data")
    if isinstance(data, dict) and "type" in data:
        return from_json(data)
    return SandboxerError(
        f"the daemon refused: {error.get('message')} ({_json.dumps(error.get('code')).decode()})"
    )
