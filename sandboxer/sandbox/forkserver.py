"""The sandbox launcher's fork server, from the supervisor: one launcher process started per
supervisor, with its imports done, that forks a launcher for each sandbox.

Starting a fresh interpreter for each launcher costs ~25 ms before it does anything (the
interpreter, then ctypes, socket, json...); a fork of one that is already running costs
well under a millisecond. The server (``launcher.serve``) is that process: single-threaded,
never the asyncio supervisor itself, and it never runs a launch's steps, so every launcher
it forks is a copy of the same pristine process.

Its forks are clones with CLONE_PARENT: each launcher is this process's own child, as if
posix_spawn had started it, so ``child.PluginProcess`` watches and reaps it unchanged, and
its parent-death signal fires when this process dies. For that parent to be a thread that
lives as long as the process (the parent-death signal follows the parent *thread*), the
server is spawned from a thread of its own that never exits.

One server per process, started on first use and kept until exit (``shutdown()`` stops it
sooner); a process forked from this one starts its own. If the server dies, the next launch
starts another.
"""

from __future__ import annotations

import atexit
import os
import queue
import socket
import sys
import threading
from collections.abc import Callable

from ..errors import SandboxUnavailable

__all__ = ["start_launcher", "prestart", "shutdown", "server_pid"]

_LAUNCHER_DIR = os.path.dirname(os.path.abspath(__file__))  # launcher.py and its modules

_SERVE_ARGV = [
    "sandboxer-launcher",
    "-I",
    "-S",
    "-c",
    "import os, sys; sys.path.insert(0, os.environ['SANDBOXER_LAUNCHER_DIR']); "
    "import launcher; launcher.serve()",
]


class _Server:
    """The running server: its pid and the supervisor's end of the request socket."""

    def __init__(self, launcher_dir: str, executable: str) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
            try:
                self.pid = _spawn_from_parent_thread(
                    executable,
                    _SERVE_ARGV,
                    {"PATH": "/usr/bin:/bin", "SANDBOXER_LAUNCHER_DIR": launcher_dir},
                    [
                        (os.POSIX_SPAWN_DUP2, null, 0),
                        (os.POSIX_SPAWN_DUP2, null, 1),
                        (os.POSIX_SPAWN_DUP2, null, 2),
                        (os.POSIX_SPAWN_DUP2, theirs.fileno(), 3),
                    ],
                )
            finally:
                os.close(null)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.owner = os.getpid()

    def fork(self, fds: list[int]) -> int:
        """A launcher with ``fds`` as its 0-5: its pid (a child of this process)."""
        socket.send_fds(self.sock, [b"L"], fds)
        answer = self.sock.recv(32)
        if answer.startswith(b"P"):
            return int(answer[1:])
        if answer.startswith(b"E"):
            raise SandboxUnavailable(
                f"the sandbox launcher could not fork: {os.strerror(int(answer[1:]))}",
                missing="sandbox launcher",
            )
        raise ConnectionError("the launcher fork server is gone")

    def close(self) -> None:
        """Close the socket (the server exits at its EOF) and reap the server."""
        self.sock.close()
        if self.owner == os.getpid():
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass


_lock = threading.Lock()
_server: _Server | None = None
_parent: _ParentThread | None = None


class _ParentThread:
    """The thread that spawns servers, then waits for the next request until the process
    exits: the servers, and through CLONE_PARENT every launcher, are its children."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self._requests: queue.SimpleQueue[
            tuple[Callable[[], int], threading.Event, list[int | BaseException]]
        ] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="sandboxer-launcher-parent", daemon=True).start()

    def _run(self) -> None:
        while True:
            function, done, result = self._requests.get()
            try:
                result.append(function())
            except BaseException as exc:  # handed to the caller
                result.append(exc)
            done.set()

    def call(self, function: Callable[[], int]) -> int:
        done, result = threading.Event(), list[int | BaseException]()
        self._requests.put((function, done, result))
        done.wait()
        outcome = result[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return int(outcome)


def _spawn_from_parent_thread(
    executable: str, argv: list[str], env: dict[str, str], actions: list[tuple[int, ...]]
) -> int:
    global _parent
    if _parent is None or _parent.owner != os.getpid():
        _parent = _ParentThread()
    return _parent.call(
        lambda: os.posix_spawn(executable, argv, env, file_actions=actions, setsid=True)
    )


def prestart() -> None:
    """Start this process's server now if none runs (else the first launch does): a
    supervisor that is about to launch takes the interpreter's start off that path."""
    with _lock:
        _running()


def _running() -> _Server:
    global _server
    if _server is not None and _server.owner != os.getpid():
        _server.sock.close()  # a forked copy of the supervisor: that server is the parent's
        _server = None
    if _server is None:
        try:
            _server = _Server(_LAUNCHER_DIR, sys.executable)
        except OSError as exc:
            raise SandboxUnavailable(
                f"the sandbox launcher could not be started: {exc}", missing="sandbox launcher"
            ) from None
    return _server


def start_launcher(fds: list[int]) -> int:
    """A launcher forked from this process's server (started now if none runs, or again if
    it died) with ``fds`` as its 0-5: its pid, a child of this process. ``child.spawn``'s
    ``starter``."""
    global _server
    with _lock:
        try:
            return _running().fork(fds)
        except ConnectionError:
            server, _server = _server, None
            if server is not None:
                server.close()  # it died: reap it, and start another, once
        try:
            return _running().fork(fds)
        except ConnectionError as exc:
            raise SandboxUnavailable(
                f"the sandbox launcher fork server failed: {exc}", missing="sandbox launcher"
            ) from None


def shutdown() -> None:
    """Stop this process's server, if it runs (the next launch starts another)."""
    global _server
    with _lock:
        if _server is not None:
            server, _server = _server, None
            server.close()


def server_pid() -> int | None:
    """The running server's pid, if any."""
    with _lock:
        return _server.pid if _server is not None and _server.owner == os.getpid() else None


atexit.register(shutdown)
