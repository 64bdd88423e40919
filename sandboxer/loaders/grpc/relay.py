"""A way into a plugin's own loopback: for go-plugin plugins that serve gRPC on TCP.

A plugin written to go-plugin's "Writing Plugins Without Go" guide listens on 127.0.0.1 and
prints ``tcp``. Its 127.0.0.1 is the loopback of its own network namespace: nothing of it is
on the host's, and nothing may be. The supervisor reaches it from here: a Unix socket in a
private directory of the supervisor's (0700) stands for the plugin's port; each connection to
it is carried to host:port by a TCP connection made inside the plugin's namespace (a
short-lived thread enters it with setns on the plugin's pidfd, makes and connects the socket,
and ends: a socket keeps the namespace it was made in). The gRPC channel connects to the Unix
socket. Nothing listens anywhere but in that private directory.

Entering another network namespace takes CAP_SYS_ADMIN over it and in one's own user
namespace: a rootless supervisor cannot, and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import threading

from ...errors import HandshakeError
from ...sandbox import _syscalls as sc

__all__ = ["NetnsRelay"]

_CHUNK = 1 << 16


def _dial(pidfd: int, host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection to host:port made inside the network namespace of ``pidfd``'s
    process, by a thread of its own that ends after (it never goes back to serve anything)."""
    result: list[socket.socket | BaseException] = []

    def run() -> None:
        try:
            sc.setns(pidfd, sc.CLONE_NEWNET)
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(timeout)
                sock.connect((host, port))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            result.append(sock)
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=run, name="sandboxer-netns-dial", daemon=True)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class NetnsRelay:
    """A Unix socket whose connections are carried to ``host:port`` in a plugin's namespace."""

    def __init__(self, plugin_id: str, pid: int, host: str, port: int) -> None:
        self.plugin_id = plugin_id
        self.host, self.port = host, port
        self._pidfd = os.pidfd_open(pid)
        self._dir = tempfile.mkdtemp(prefix="sandboxer-grpc-relay-")  # 0700: the supervisor's
        self.path = os.path.join(self._dir, "relay.sock")
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, timeout: float) -> None:
        """Listen, after checking that the plugin's port answers at all (the first error
        names what went wrong: no permission to enter, or nothing listening)."""
        loop = asyncio.get_running_loop()
        try:
            probe = await loop.run_in_executor(
                None, _dial, self._pidfd, self.host, self.port, timeout
            )
        except PermissionError:
            raise HandshakeError(
                f"plugin {self.plugin_id}: serves gRPC on TCP {self.host}:{self.port} in its own "
                "network namespace, which only a supervisor with CAP_SYS_ADMIN can reach "
                "(run it as root, or have the plugin serve on a Unix socket)",
                plugin_id=self.plugin_id,
            ) from None
        except OSError as exc:
            raise HandshakeError(
                f"plugin {self.plugin_id}: nothing answers on {self.host}:{self.port} in its "
                f"network namespace ({exc.strerror or exc})",
                plugin_id=self.plugin_id,
            ) from None
        probe.close()
        self._server = await asyncio.start_unix_server(self._carry, path=self.path)

    async def _carry(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        loop = asyncio.get_running_loop()
        try:
            sock = await loop.run_in_executor(None, _dial, self._pidfd, self.host, self.port, 10.0)
        except OSError:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(sock=sock)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()
            if task is not None:
                self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        os.close(self._pidfd)
        shutil.rmtree(self._dir, ignore_errors=True)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()
