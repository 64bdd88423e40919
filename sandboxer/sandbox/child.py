"""A plugin process as the supervisor sees it: spawned, watched, captured, reaped.

``spawn()`` starts a program with the plugin's end of the RPC socketpair as fd 3, stdin on
/dev/null (or a stream the caller hands over: ``sandboxer exec`` forwards its own) and
stdout/stderr on pipes the supervisor reads line by line into its logging. The process is
watched through a pidfd on the event loop (no SIGCHLD handler, no watcher thread), so its
exit is noticed at once and it is always reaped.

posix_spawn, not fork: the supervisor is a threaded asyncio program, and a forked copy of it
must never run Python. Only the fds named in the file actions reach the child; everything
sandboxer opens is close-on-exec.

This module must never leave a process unreaped or a pipe open after ``close()``.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import os
import signal
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..errors import PluginLoadError

if TYPE_CHECKING:
    from .denials import Denials

__all__ = ["PluginProcess", "OutputCapture", "LineLog", "spawn", "check_stdin", "RPC_FD"]

RPC_FD = 3
_MIN_FD = 10  # spawn-side fds are moved up here so no dup2 target (0-3) is ever a source
_LINE_MAX = 4096
_READ_SIZE = 1 << 16
# Logging a flood costs the supervisor far more than reading it: lines beyond this budget
# are counted, kept in the tail, and summarised instead of logged one by one.
_LOG_BURST = 200
_LOG_RATE = 50.0


# Where a process's stdout and stderr go instead of the log, each as it is read (None: that
# stream is logged as usual).
Sinks = tuple[Callable[[bytes], None] | None, Callable[[bytes], None] | None]


class LineLog:
    """Turns a stream of output bytes into log lines, with bounded memory.

    Lines longer than 4 KiB are cut; the last ``tail`` lines are kept for crash reports;
    logging is rate-limited so a flood cannot stall the supervisor. Not thread-safe: one
    writer at a time (a pipe's reader, or the one thread inside a wasm store).
    """

    def __init__(self, *, name: str, logger: logging.Logger, level: int, tail: int = 50) -> None:
        self.name = name
        self.lines = 0
        self.dropped = 0
        self.tail: collections.deque[str] = collections.deque(maxlen=tail)
        self._log = logger
        self._level = level
        self._partial = bytearray()
        self._skipping = False
        self._tokens = float(_LOG_BURST)
        self._last = time.monotonic()

    def feed(self, data: bytes) -> None:
        parts = data.split(b"\n")
        last = parts.pop()
        for part in parts:
            if self._skipping:
                self._skipping = False
                continue
            if self._partial:
                self._partial += part
                part = bytes(self._partial)
                self._partial.clear()
            self._line(part)
        if last and not self._skipping:
            self._partial += last
            if len(self._partial) > _LINE_MAX:
                self._line(bytes(self._partial[:_LINE_MAX]), cut=True)
                self._partial.clear()
                self._skipping = True  # drop the rest of this overlong line

    def flush(self) -> None:
        """The stream ended: log an unterminated last line."""
        if self._partial:
            self._line(bytes(self._partial))
            self._partial.clear()
        self._skipping = False

    def _line(self, raw: bytes, *, cut: bool = False) -> None:
        cut = cut or len(raw) > _LINE_MAX
        text = raw[:_LINE_MAX].decode("utf-8", "replace").rstrip("\r") + ("…" if cut else "")
        self.lines += 1
        self.tail.append(text)
        now = time.monotonic()
        self._tokens = min(_LOG_BURST, self._tokens + (now - self._last) * _LOG_RATE)
        self._last = now
        if self._tokens >= 1:
            self._tokens -= 1
            if self.dropped:
                self._log.log(
                    self._level, "[%s] (%d lines not logged: output flood)", self.name, self.dropped
                )
                self.dropped = 0
            level, shown = self.render(text)
            self._log.log(level, "[%s] %s", self.name, shown)
        else:
            self.dropped += 1

    def render(self, text: str) -> tuple[int, str]:
        """The level and text a line is logged at (a subclass may read a log format)."""
        return self._level, text


class OutputCapture(LineLog):
    """Reads one of the plugin's output pipes into a ``LineLog``."""

    def __init__(
        self,
        fd: int,
        *,
        name: str,
        logger: logging.Logger,
        level: int,
        tail: int = 50,
        sink: Callable[[bytes], None] | None = None,
    ) -> None:
        super().__init__(name=name, logger=logger, level=level, tail=tail)
        self.fd = fd
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        self.eof: asyncio.Future[None] = self._loop.create_future()
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.flush()
            self._finish()
            return
        if self._sink is not None:  # passed through as is (``sandboxer exec``)
            self._sink(data)
            return
        self.feed(data)

    def _finish(self) -> None:
        self._loop.remove_reader(self.fd)
        if not self.eof.done():
            self.eof.set_result(None)

    def close(self) -> None:
        if self.fd >= 0:
            self._finish()
            os.close(self.fd)
            self.fd = -1


class PluginProcess:
    """A spawned plugin process: its pid, exit status, and captured stdout/stderr."""

    def __init__(
        self,
        pid: int,
        stdout: int,
        stderr: int,
        *,
        logger: logging.Logger,
        sinks: Sinks | None = None,
    ) -> None:
        self.pid = pid
        self._loop = asyncio.get_running_loop()
        self._pidfd = os.pidfd_open(pid)
        self.returncode: int | None = None
        # The seccomp listener of a sandboxed launch (start.py), closed with the process.
        self.denials: Denials | None = None
        self.exited: asyncio.Future[int] = self._loop.create_future()
        out_sink, err_sink = sinks or (None, None)
        self.stdout = OutputCapture(
            stdout, name="stdout", logger=logger, level=logging.INFO, sink=out_sink
        )
        self.stderr = OutputCapture(
            stderr, name="stderr", logger=logger, level=logging.WARNING, sink=err_sink
        )
        self._loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return
        self._loop.remove_reader(self._pidfd)
        self.returncode = os.waitstatus_to_exitcode(status)
        if not self.exited.done():
            self.exited.set_result(self.returncode)

    def set_output(
        self, logger: logging.Logger, sinks: Sinks | None = None, *, plugin_id: str = "-"
    ) -> None:
        """Log its output (and its seccomp denials, as ``plugin_id``'s) to ``logger``, or
        pass the output to ``sinks``, from now on (a warm sandbox's, once a plugin took it)."""
        self.stdout._log = self.stderr._log = logger
        self.stdout._sink, self.stderr._sink = sinks or (None, None)
        if self.denials is not None:
            self.denials.rename(plugin_id, logger)

    @property
    def exit_status(self) -> int | None:
        rc = self.returncode
        return rc if rc is not None and rc >= 0 else None

    @property
    def signal(self) -> int | None:
        rc = self.returncode
        return -rc if rc is not None and rc < 0 else None

    def describe_exit(self) -> str:
        if self.signal is not None:
            try:
                name = signal.Signals(self.signal).name
            except ValueError:
                name = str(self.signal)
            return f"killed by {name}"
        if self.exit_status is not None:
            return f"exited with status {self.exit_status}"
        return "still running"

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass

    async def wait(self, timeout: float | None = None) -> int | None:
        """The return code (negative: killed by that signal), or None on timeout."""
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(self.exited)
        except TimeoutError:
            return None

    async def output_closed(self, timeout: float) -> None:
        """Wait (bounded) until both pipes hit EOF, so the stderr tail is complete."""
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(self.stdout.eof, self.stderr.eof)
        except TimeoutError:
            pass

    async def terminate(self, grace: float) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds; returns once reaped."""
        if self.returncode is None:
            self.send_signal(signal.SIGTERM)
            if await self.wait(grace) is None:
                self.send_signal(signal.SIGKILL)
                await self.wait()

    async def close(self) -> None:
        """Kill if still running, reap, close every fd. Idempotent."""
        if self.returncode is None:
            self.send_signal(signal.SIGKILL)
            await self.wait()
        if self.denials is not None:
            self.denials.close()
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1
        self.stdout.close()
        self.stderr.close()


def _inheritable_fds() -> list[int]:
    out = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if os.get_inheritable(fd):
                out.append(fd)
        except OSError:
            pass  # the listing's own fd, already closed
    return out


def _high_cloexec(fd: int) -> int:
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _MIN_FD)
    os.close(fd)
    return moved


def spawn(
    argv: list[str],
    env: dict[str, str],
    *,
    rpc_fd: int,
    logger: logging.Logger,
    extra_fds: dict[int, int] | None = None,
    sinks: Sinks | None = None,
    executable: str | None = None,
    stdin: int | None = None,
    owner: tuple[int, int] | None = None,
    starter: Callable[[list[int]], int] | None = None,
) -> PluginProcess:
    """Start ``argv`` (argv[0] an absolute path, unless ``executable`` names the program)
    with ``rpc_fd`` as its fd 3 and each ``extra_fds`` source at its target number (4 and
    up); ``stdin`` (checked by ``check_stdin``) as its fd 0, else /dev/null.

    ``starter``, when given, starts the process instead of posix_spawn (``argv`` and ``env``
    are then its business): it gets the fds the process must have as 0, 1, 2, ... in that
    order (the extra fds' targets must follow 3 without a gap) and returns the pid of a new
    child of this process (the sandbox launcher's fork server, sandbox/forkserver.py).

    ``owner`` (host uid, gid): who the program runs as, made owner of its stdout and stderr
    pipes (and of a pipe given as stdin), so that it can reopen them by name as any program
    can its own (``/dev/stdout``, ``/proc/self/fd/1``): a pipe the supervisor made is root's,
    mode 0600.

    ``rpc_fd`` and ``stdin`` stay owned by the caller (close them after this returns). The
    child gets a new session, so terminal signals meant for the supervisor do not reach it.
    """
    if stdin is not None:
        check_stdin(stdin)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    out_w, err_w = _high_cloexec(out_w), _high_cloexec(err_w)
    if owner is not None:
        for fd in (out_w, err_w, *((stdin,) if stdin is not None and _is_pipe(stdin) else ())):
            os.fchown(fd, *owner)
    rpc_copy = fcntl.fcntl(rpc_fd, fcntl.F_DUPFD_CLOEXEC, _MIN_FD)
    extra = {
        target: fcntl.fcntl(source, fcntl.F_DUPFD_CLOEXEC, _MIN_FD)
        for target, source in (extra_fds or {}).items()
    }
    if stdin is not None:
        extra[0] = fcntl.fcntl(stdin, fcntl.F_DUPFD_CLOEXEC, _MIN_FD)
    elif starter is not None:
        extra[0] = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if starter is not None:
            targets = {0: extra[0], 1: out_w, 2: err_w, RPC_FD: rpc_copy, **extra}
            if sorted(targets) != list(range(len(targets))):
                raise ValueError(f"the fds' targets leave a gap: {sorted(targets)}")
            pid = starter([targets[n] for n in range(len(targets))])
        else:
            actions = [
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),  # replaced by a stdin
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
                (os.POSIX_SPAWN_DUP2, rpc_copy, RPC_FD),
            ] + [(os.POSIX_SPAWN_DUP2, source, target) for target, source in extra.items()]
            # Whatever the supervisor's host application left inheritable must not reach the
            # plugin: close every such fd in the child (targets 0-5 are set above).
            actions += [
                (os.POSIX_SPAWN_CLOSE, fd)
                for fd in _inheritable_fds()
                if fd > max([RPC_FD, *extra])
            ]
            pid = os.posix_spawn(
                executable or argv[0], argv, env, file_actions=actions, setsid=True
            )
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (out_w, err_w, rpc_copy, *extra.values()):
            os.close(fd)
    return PluginProcess(pid, out_r, err_r, logger=logger, sinks=sinks)


_PIPEFS_MAGIC = 0x50495045


def _is_pipe(fd: int) -> bool:
    """An anonymous pipe (pipefs): a named FIFO or a file is never given away."""
    import ctypes

    buf = (ctypes.c_long * 16)()
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.fstatfs(ctypes.c_int(fd), buf) == 0 and buf[0] == _PIPEFS_MAGIC


def check_stdin(fd: int) -> None:
    """Refuse an fd that would give a sandboxed program more than a stream to read: a
    directory (or any ``O_PATH`` fd) is a handle on the host's file tree, from which
    ``openat(fd, "..")`` walks anywhere, whatever the sandbox's root. A pipe, a socket, a
    regular file or a character device (a terminal, /dev/null) is data the caller chose to
    give; a terminal's TIOCSTI and TIOCLINUX are denied by the seccomp filter."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise PluginLoadError(
            f"standard input (fd {fd}) cannot be passed to the sandbox: {exc.strerror}"
        ) from None
    if flags & os.O_PATH or not (
        stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISREG(mode) or stat.S_ISCHR(mode)
    ):
        kind = (
            "a directory"
            if stat.S_ISDIR(mode)
            else (
                "an O_PATH fd"
                if flags & os.O_PATH
                else "neither a pipe, a socket, a file nor a terminal"
            )
        )
        raise PluginLoadError(
            f"standard input is {kind}: passing it into the sandbox would hand the program "
            "a way out of it; give a file's contents (< FILE) or a pipe instead"
        )
