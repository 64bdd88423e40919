"""The egress proxy: the only way out of a plugin's network namespace, and only to its hosts.

A plugin with ``network_allowed`` and ``allowed_hosts`` gets a net namespace holding nothing
but a loopback interface. On it, at ``127.0.0.1:3128``, listens a socket the launcher made
inside the namespace and handed to the supervisor; the supervisor also binds a Unix socket
into the sandbox at ``/run/sandboxer/egress.sock``. Both lead here: this module, running on
the supervisor's event loop in the supervisor's own namespace, accepts on them, tells the
protocols apart by the first byte (``http``: CONNECT and plain HTTP; ``socks``: SOCKS5),
decides through the ``Checkpoint`` (the rules, the resolver, the log and the counters), dials
exactly the address it checked (so a second lookup cannot rebind it) and copies both ways.
WebAssembly plugins have no sockets at all; their ``sandboxer.http_request`` host function
goes through ``EgressProxy.fetch`` (``fetch``), the same rules and the same log.

A plugin holds at most ``max_connections`` connections to the proxy at once (more wait in its
own accept queue), must send its request within ``header_timeout`` (slowloris), and a tunnel
idle in both directions for ``idle_timeout`` is closed.

This module must never dial anything the checkpoint has not checked, and never let one
plugin's connections affect another plugin's budget.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ...rpc import DEFAULT_MAX_FRAME
from .decisions import Checkpoint, EgressFailed, Rejected, log
from .http import HEAD_LIMIT, read_http
from .rules import AllowList, EgressRefused, IPAddress, show_address, show_target, usable_addresses
from .socks import read_socks5, reject_socks4

__all__ = [
    "EgressProxy",
    "EgressEndpoint",
    "proxy_environment",
    "PROXY_HOST",
    "PROXY_PORT",
    "EGRESS_SOCKET",
]

PROXY_HOST = "127.0.0.1"
PROXY_PORT = 3128
EGRESS_SOCKET = "/run/sandboxer/egress.sock"  # where the Unix socket shows inside the sandbox


def proxy_environment() -> dict[str, str]:
    """What a proxied plugin finds in its environment: every common spelling, so curl, wget,
    Python, Go and node's proxy agents all go through the proxy without being told."""
    http = f"http://{PROXY_HOST}:{PROXY_PORT}"
    socks = f"socks5h://{PROXY_HOST}:{PROXY_PORT}"  # socks5h: the proxy resolves names
    env = {"SANDBOXER_EGRESS_SOCKET": EGRESS_SOCKET}
    for name, value in (("http_proxy", http), ("https_proxy", http), ("all_proxy", socks)):
        env[name] = env[name.upper()] = value
    return env


class _Request(Protocol):
    """A client's request as its wire protocol read it (``http.HttpRequest``,
    ``socks.SocksRequest``): the target, and how to answer in that protocol."""

    @property
    def via(self) -> str: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    def refused(self, writer: asyncio.StreamWriter, exc: EgressRefused) -> None: ...

    def failed(self, writer: asyncio.StreamWriter, exc: EgressFailed) -> None: ...

    def established(self, writer: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> int: ...


class EgressProxy(Checkpoint):
    """One per supervisor (PluginManager): the checkpoint (rules, resolver, log and counters)
    and the endpoints of every proxied plugin process."""

    def __init__(
        self,
        *,
        hosts_file: str | None = None,
        max_connections: int = 32,
        header_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        ca_file: str | None = None,
        max_response: int = DEFAULT_MAX_FRAME,
    ) -> None:
        super().__init__(hosts_file=hosts_file, connect_timeout=connect_timeout)
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.ca_file = ca_file
        self.max_response = max_response
        self._budget: dict[str, asyncio.Semaphore] = {}
        self._endpoints: set[EgressEndpoint] = set()
        self._dir: str | None = None
        self._serial = 0

    @classmethod
    def from_config(cls, config: Any) -> EgressProxy:
        """From a HostConfig's ``egress_*`` settings."""
        return cls(
            hosts_file=config.egress_hosts_file,
            max_connections=config.egress_max_connections,
            header_timeout=config.egress_header_timeout,
            idle_timeout=config.egress_idle_timeout,
            connect_timeout=config.egress_connect_timeout,
            ca_file=config.egress_ca_file,
            max_response=config.max_frame,
        )

    def _slots(self, plugin_id: str) -> asyncio.Semaphore:
        """The plugin's connection budget, shared by its generations' endpoints."""
        slots = self._budget.get(plugin_id)
        if slots is None:
            slots = self._budget[plugin_id] = asyncio.Semaphore(self.max_connections)
        return slots

    # -- endpoints -------------------------------------------------------------------------------
    def endpoint(self, plugin_id: str, allowed_hosts: Iterable[str]) -> EgressEndpoint:
        """A new endpoint for one plugin process: its Unix socket exists (bind-mount it at
        EGRESS_SOCKET); ``start()`` it with the listener from the plugin's namespace."""
        if self._dir is None:
            # tempfile and shutil (bz2, lzma, random) only once a sandbox has egress: every
            # launch imports this module, few need a proxy
            import tempfile

            self._dir = tempfile.mkdtemp(prefix="sandboxer-egress-")  # 0700, the supervisor's
        self._serial += 1
        path = os.path.join(self._dir, f"{self._serial}.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            # The plugin's host uid must be able to connect; the 0700 directory keeps every
            # other host user out, and inside the sandbox only this plugin sees the socket.
            os.chmod(path, 0o666)
            sock.listen(64)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        point = EgressEndpoint(self, plugin_id, AllowList(allowed_hosts), sock, path)
        self._endpoints.add(point)
        self.counters(plugin_id)  # zeros from the start: it has network, it tried nothing
        return point

    def _forget(self, point: EgressEndpoint) -> None:
        self._endpoints.discard(point)
        if not self._endpoints and self._dir is not None:
            import shutil

            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def close(self) -> None:
        """Close every endpoint and stop the resolver threads (idempotent)."""
        for point in list(self._endpoints):
            point.close()
        super().close()

    # -- a connection out ------------------------------------------------------------------------
    async def _decide(self, allow: AllowList, host: str, port: int) -> list[IPAddress]:
        """The addresses to dial for ``host``, on the event loop; EgressRefused or
        EgressFailed."""
        name, addresses = self.prepare(allow, host, port)
        if addresses is None:
            lookup = asyncio.wrap_future(self.lookup(name, port))
            try:
                async with asyncio.timeout(self.connect_timeout):
                    addresses = await lookup
            except TimeoutError:
                raise EgressFailed(
                    "timeout", f"resolving {name} took longer than {self.connect_timeout:g}s"
                ) from None
            except OSError as exc:
                raise EgressFailed("unreachable", str(exc)) from None
        return usable_addresses(allow, name, port, addresses)

    async def _dial(
        self, addresses: list[IPAddress], port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        last: OSError | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):  # for all addresses together
                for address in addresses:
                    try:
                        return await asyncio.open_connection(str(address), port, limit=1 << 16)
                    except OSError as exc:
                        last = exc
        except TimeoutError:
            last = TimeoutError(f"no answer within {self.connect_timeout:g}s")
        kind = (
            "timeout"
            if isinstance(last, TimeoutError)
            else "connection refused"
            if isinstance(last, ConnectionRefusedError)
            else "unreachable"
        )
        why = os.strerror(last.errno) if last is not None and last.errno else str(last)
        raise EgressFailed(
            kind, f"connecting to {show_target(show_address(addresses[-1]), port)} failed: {why}"
        )

    async def open(
        self, plugin_id: str, allow: AllowList, via: str, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Check, resolve, dial; log and count the verdict. EgressRefused or EgressFailed."""
        target = show_target(host, port)
        with self.attempt(plugin_id, via, target):
            addresses = await self._decide(allow, host, port)
            upstream = await self._dial(addresses, port)
        peer = upstream[1].get_extra_info("peername")
        self.record(plugin_id, via, target, "allowed", f"connected to {peer[0]}")
        return upstream

    # -- wasm: one HTTP request on the plugin's behalf -------------------------------------------
    def fetch(
        self,
        plugin_id: str,
        allow: AllowList | None,
        request: Any,
        *,
        deadline: float | Callable[[], float],
    ) -> dict[str, Any]:
        """Perform one HTTP(S) request for a wasm plugin (blocking; a worker thread calls it).

        ``request``: ``{"method", "url", "headers": {name: value}, "body"}`` (``body`` text, or
        ``body_base64``). Returns ``{"status", "headers", "body"}`` (``body_base64`` when the
        body is not UTF-8) or ``{"error": {"kind", "message"}}`` with kind ``refused``,
        ``failed``, ``invalid`` or ``timeout``. ``allow`` None: the plugin has no network, so
        every request is refused (and logged and counted). The call's ``deadline``
        (time.monotonic(), or a function returning it, re-read at every wait so that an
        unload moving it ends the request) bounds the whole exchange."""
        # On first use: http.client (and the email parser under it) would add some 5 ms to
        # every supervisor's start, wasm plugin or not. No cycle: fetch knows only the
        # Checkpoint.
        from .fetch import fetch

        return fetch(
            self,
            plugin_id,
            allow,
            request,
            deadline=deadline,
            max_response=self.max_response,
            ca_file=self.ca_file,
        )


async def _readable(sock: socket.socket) -> None:
    """Until ``sock`` (a listener) has a connection waiting."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock, wake)
    try:
        await ready
    finally:
        if sock.fileno() != -1:  # a closed listener's reader went before it closed
            loop.remove_reader(sock)


class EgressEndpoint:
    """One plugin process's way to the proxy: the Unix socket bound into its sandbox and the
    TCP listener in its net namespace. ``close()`` (idempotent) stops both, ends every
    connection and removes the socket file."""

    def __init__(
        self,
        proxy: EgressProxy,
        plugin_id: str,
        allow: AllowList,
        unix_sock: socket.socket,
        path: str,
    ) -> None:
        self.proxy = proxy
        self.plugin_id = plugin_id
        self.allow = allow
        self.socket_path = path
        self._sockets: list[socket.socket] = [unix_sock]
        self._acceptors: list[asyncio.Task[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._saturated = False  # the limit was reached (logged once until it is not)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    async def start(self, listener: socket.socket | None) -> None:
        """Serve the Unix socket and ``listener`` (the TCP socket made in the plugin's
        namespace; this endpoint owns it from now on)."""
        if listener is not None:
            self._sockets.append(listener)
        if self._closed:
            self.close()
            return
        self._loop = asyncio.get_running_loop()
        for sock in self._sockets:
            sock.setblocking(False)
            self._acceptors.append(asyncio.ensure_future(self._accept(sock)))

    def close(self) -> None:
        if self._closed and not self._sockets:
            return
        self._closed = True
        for task in self._acceptors + list(self._tasks):
            task.cancel()
        self._acceptors.clear()
        for sock in self._sockets:
            if self._loop is not None:  # before close: the fd number may be reused at once
                self._loop.remove_reader(sock)
            sock.close()
        self._sockets.clear()
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        self.proxy._forget(self)

    async def _accept(self, listener: socket.socket) -> None:
        """Accept only while the plugin holds fewer than ``max_connections``: at the limit,
        further connections wait in the kernel's queue (the plugin's own), costing the
        supervisor nothing however hard the plugin knocks. A slot is taken only once a
        connection is waiting, so an idle listener holds none."""
        slots = self.proxy._slots(self.plugin_id)
        while True:
            await _readable(listener)
            if slots.locked() and not self._saturated:
                self._saturated = True
                log.warning(
                    "egress plugin=%s: %d connections to the proxy at once, the "
                    "limit; more wait until one closes",
                    self.plugin_id,
                    self.proxy.max_connections,
                )
            await slots.acquire()
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                slots.release()
                continue
            except BaseException:
                slots.release()
                raise
            if not slots.locked():
                self._saturated = False
            task = asyncio.ensure_future(self._serve(conn, slots))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- one client connection -------------------------------------------------------------------
    async def _serve(self, conn: socket.socket, slots: asyncio.Semaphore) -> None:
        counters = self.proxy.counters(self.plugin_id)
        counters.add(active=1)
        writer: asyncio.StreamWriter | None = None
        upstream: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=HEAD_LIMIT)
            try:
                async with asyncio.timeout(self.proxy.header_timeout):
                    request = await self._read_request(reader, writer)
            except TimeoutError:
                self.proxy.record(
                    self.plugin_id,
                    "proxy",
                    "-",
                    "refused",
                    f"no complete request within {self.proxy.header_timeout:g}s",
                )
                return
            except Rejected as exc:  # answered already
                self.proxy.record(self.plugin_id, exc.via, exc.target, "refused", str(exc))
                return
            opened = await self._connect(request, writer)
            if opened is None:
                return
            up_reader, upstream = opened
            await self._splice(reader, writer, up_reader, upstream)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            counters.add(active=-1)
            slots.release()
            if writer is not None:
                writer.close()
            else:
                conn.close()
            if upstream is not None:
                upstream.close()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Request:
        """The client's request, whichever protocol it speaks; Rejected once answered."""
        first = await reader.readexactly(1)
        if first == b"\x05":
            return await read_socks5(reader, writer)
        if first == b"\x04":
            raise reject_socks4(writer)
        return await read_http(first, reader, writer)

    async def _connect(
        self, request: _Request, writer: asyncio.StreamWriter
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Check and dial the target; answer the client in its protocol."""
        try:
            opened = await self.proxy.open(
                self.plugin_id, self.allow, request.via, request.host, request.port
            )
        except EgressRefused as exc:
            request.refused(writer, exc)
            return None
        except EgressFailed as exc:
            request.failed(writer, exc)
            return None
        sent = request.established(writer, opened[1])
        if sent:
            self.proxy.counters(self.plugin_id).add(bytes_sent=sent)
        return opened

    # -- the tunnel ------------------------------------------------------------------------------
    async def _splice(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        """Copy both ways until both sides are done, or both have been idle too long."""
        loop = asyncio.get_running_loop()
        last = [loop.time()]
        counters = self.proxy.counters(self.plugin_id)
        idle = self.proxy.idle_timeout

        async def pipe(
            src: asyncio.StreamReader, dst: asyncio.StreamWriter, count: Callable[[int], None]
        ) -> None:
            try:
                while True:
                    try:
                        async with asyncio.timeout(idle):
                            data = await src.read(1 << 16)
                    except TimeoutError:
                        if loop.time() - last[0] < idle:
                            continue  # the other direction is busy
                        raise
                    if not data:
                        break
                    last[0] = loop.time()
                    count(len(data))
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof() and not dst.is_closing():
                    dst.write_eof()
            except TimeoutError:  # an OSError too: not the except below; _splice logs it
                raise
            except (ConnectionError, OSError):
                dst.transport.abort()

        await writer.drain()
        tasks = [
            asyncio.ensure_future(pipe(reader, up_writer, lambda n: counters.add(bytes_sent=n))),
            asyncio.ensure_future(
                pipe(up_reader, writer, lambda n: counters.add(bytes_received=n))
            ),
        ]
        try:
            await asyncio.gather(*tasks)
        except TimeoutError:
            log.info("egress plugin=%s: closed a tunnel idle for %gs", self.plugin_id, idle)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
