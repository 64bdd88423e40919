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
import contextlib
import itertools
import os
from collections.abc import AsyncIterator
from typing import Any

from .. import _json
from ..errors import ProtocolError, SandboxerError, from_json
from ..rpc.framing import LineBuffer, Notification, Response, encode_request, parse_message

__all__ = ["connect", "DaemonClient", "RemotePlugin", "socket_path"]

DEFAULT_SOCKET = "/run/sandboxer/sandboxer.sock"
_MAX_FRAME = 16 << 20


def socket_path(path: str | os.PathLike[str] | None = None) -> str:
    """``path``, else ``$SANDBOXER_SOCKET``, else the daemon's default socket."""
    if path is not None:
        return os.fspath(path)
    return os.environ.get("SANDBOXER_SOCKET") or DEFAULT_SOCKET


async def connect(path: str | os.PathLike[str] | None = None) -> DaemonClient:
    """A connection to the daemon listening at ``socket_path(path)``."""
    where = socket_path(path)
    try:
        reader, writer = await asyncio.open_unix_connection(where, limit=_MAX_FRAME)
    except OSError as exc:
        raise SandboxerError(f"no sandboxer daemon answers on {where}: {exc.strerror}") from None
    return DaemonClient(reader, writer, where)


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


class DaemonClient:
    """One connection to the daemon."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
    ) -> None:
        self.path = path
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int | str, asyncio.Future[Any]] = {}
        self._events: asyncio.Queue[dict[str, Any] | None] | None = None
        self._error: SandboxerError | None = None
        self._task = asyncio.ensure_future(self._read())

    async def __aenter__(self) -> DaemonClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

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
        if self._events is None:
            self._events = asyncio.Queue()
            await self._request("subscribe", {})
        while True:
            event = await self._events.get()
            if event is None:
                return
            yield event

    # -- the wire ----------------------------------------------------------------------------
    async def _request(self, method: str, params: dict[str, Any]) -> Any:
        if self._error is not None:
            raise self._error
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            try:
                self._writer.write(encode_request(request_id, method, params))
                await self._writer.drain()
            except ConnectionError:
                # The daemon hung up (a refusal says why, and may be still on its way).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._task), 1.0)
                raise self._error or SandboxerError(
                    f"the daemon at {self.path} closed the connection"
                ) from None
            return await future
        finally:
            self._pending.pop(request_id, None)

    async def _read(self) -> None:
        frames = LineBuffer(_MAX_FRAME)
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                for line in frames.feed(data):
                    self._dispatch(parse_message(line))
            self._fail(SandboxerError(f"the daemon at {self.path} closed the connection"))
        except ProtocolError as exc:
            self._fail(SandboxerError(f"the daemon at {self.path} sent garbage: {exc}"))
        except (OSError, asyncio.CancelledError) as exc:
            self._fail(
                SandboxerError(f"the connection to the daemon at {self.path} ended: {exc!r}")
            )
            if isinstance(exc, asyncio.CancelledError):
                raise

    def _dispatch(self, message: Any) -> None:
        if isinstance(message, Notification):
            if message.method == "event" and self._events is not None:
                self._events.put_nowait(message.params)
            return
        if not isinstance(message, Response):
            return
        future = self._pending.get(message.id) if message.id is not None else None
        if message.error is not None:
            error = _error(message.error)
            if future is None:  # about no request of ours: the connection is done for
                self._fail(error)
            elif not future.done():
                future.set_exception(error)
        elif future is not None and not future.done():
            future.set_result(message.result)

    def _fail(self, error: SandboxerError) -> None:
        if self._error is None:
            self._error = error
        for future in self._pending.values():
            if not future.done():
                future.set_exception(error)
        if self._events is not None:
            self._events.put_nowait(None)


def _error(error: dict[str, Any]) -> SandboxerError:
    """The daemon's error: the exception it describes (``data``), else its message."""
    data = error.get("data")
    if isinstance(data, dict) and "type" in data:
        return from_json(data)
    return SandboxerError(
        f"the daemon refused: {error.get('message')} ({_json.dumps(error.get('code')).decode()})"
    )
