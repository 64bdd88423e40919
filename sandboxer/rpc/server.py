"""The plugin side of the wire protocol: handshake, then serve requests until told to stop.

Runs inside the plugin process (the plugin host, or an external plugin using the SDK), so it
trusts the host and nothing else; it must never import the manager or anything of the
supervisor's.

Threads, not an event loop, carry sync handlers. One thread reads: a batch of frames is
run right there, call after call, and their answers leave in one write, so a lone call has no
hand-off between threads on its path and pipelined calls cost one syscall per batch. A method
that once took longer than a millisecond is handed to a small pool of workers (started on
demand) from then on, so a slow call never stops the reading of new frames or cancels; it
comes back to the reading thread when it is quick again. The first slow call of a method
does hold up reading for its duration: that is the price of not guessing in advance.
Async handlers run on one asyncio loop in a thread of its own and can be cancelled.
"""

from __future__ import annotations

import functools
import inspect
import os
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .. import _json
from .._hooks import RESERVED, STATE_HOOKS
from ..errors import PluginCallError
from .framing import (
    DEFAULT_MAX_FRAME,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
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

# typing and asyncio only for the type checker: the plugin host starts without them; the loop
# for async handlers imports asyncio when first needed (docs/architecture.md)
TYPE_CHECKING = False
if TYPE_CHECKING:
    import asyncio
    from typing import Any

__all__ = ["Handlers", "Server", "PROTOCOL_VERSION", "RESERVED"]

PROTOCOL_VERSION = 1
_STOP = object()
_RECV_SIZE = 1 << 16  # larger reads cost more in allocation than they save
# A sync method that once took longer than this is run off the reading thread from then on,
# so frames (and cancels) keep being read while it works.
_SLOW_CALL = 0.001


@dataclass
class Handlers:
    """What a plugin offers: its methods and its (optional) lifecycle functions.

    ``check_args(method, fn, args)`` may raise PluginCallError for arguments that do not fit;
    ``error(exc, method)`` turns a handler's exception into the PluginCallError sent back.
    ``any_method(name, *args)``, when given, answers every other (not reserved) method: a
    plugin that cannot list its methods, such as a C library without ``sandboxer_methods``,
    decides itself which names it knows.
    """

    methods: Mapping[str, Callable[..., Any]]
    lifecycle: Mapping[str, Callable[..., Any]] = field(default_factory=dict)
    check_args: Callable[[str, Callable[..., Any], tuple[Any, ...]], None] | None = None
    error: Callable[[BaseException, str], PluginCallError] | None = None
    any_method: Callable[..., Any] | None = None

    def declared(self) -> list[str]:
        """Method names for the handshake: the methods, plus the state methods if present."""
        names = sorted(self.methods)
        if self.lifecycle.keys() >= STATE_HOOKS:
            names += ["sandboxer.export_state", "sandboxer.import_state"]
        return names


def _default_error(exc: BaseException, method: str) -> PluginCallError:
    return PluginCallError(
        f"{method} raised {type(exc).__name__}: {exc}",
        code=1,
        data={"type": type(exc).__name__, "message": str(exc)},
    )


class Server:
    """Serves one connection: ``run()`` returns the process exit code to use."""

    def __init__(
        self,
        handlers: Handlers,
        sock: socket.socket,
        *,
        cookie: str,
        name: str,
        version: str,
        max_frame: int = DEFAULT_MAX_FRAME,
        workers: int = 8,
    ) -> None:
        self._handlers = handlers
        self._sock = sock
        self._cookie = cookie
        self._name = name
        self._version = version
        self._buffer = LineBuffer(max_frame)
        self._max_frame = max_frame
        self._workers = max(1, workers)
        self._write_lock = threading.Lock()
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._tasks: dict[Any, asyncio.Task[Any]] = {}
        self.exit_code = 0
        self._slow_methods: set[str] = set()
        self._local = threading.local()
        self._recv_buffer = bytearray(_RECV_SIZE)
        self._threads: list[threading.Thread] = []
        self._pool_lock = threading.Lock()
        self._idle = 0
        # method name -> (handler or None, is_async, is_lifecycle), computed once
        self._table: dict[str, tuple[Callable[..., Any] | None, bool, bool]] = {
            name: (fn, inspect.iscoroutinefunction(fn), False)
            for name, fn in handlers.methods.items()
        }
        for wire_name, name in RESERVED.items():
            fn = handlers.lifecycle.get(name)
            self._table[wire_name] = (fn, fn is not None and inspect.iscoroutinefunction(fn), True)

    # -- output ------------------------------------------------------------------------------
    def _send(self, frame: bytes) -> None:
        frames = getattr(self._local, "frames", None)
        if frames is not None:  # on the reading thread: leaves with the batch's answers
            frames.append(frame)
        else:
            self._write(frame)

    def _write(self, data: bytes) -> None:
        with self._write_lock:
            try:
                self._sock.sendall(data)
            except OSError:
                self._stopping.set()  # the host is gone; nothing left to answer

    def notify(self, method: str, params: Any) -> None:
        self._send(encode_notification(method, params))

    def _reply(self, rid: Any, result: Any) -> None:
        try:
            frame = encode_result(rid, result)
        except TypeError as exc:
            frame = encode_error(rid, INTERNAL_ERROR, f"the result is not JSON: {exc}")
        if len(frame) > self._max_frame:
            frame = encode_error(
                rid,
                INTERNAL_ERROR,
                f"the result is {len(frame)} bytes, over the {self._max_frame}-byte frame limit",
            )
        self._send(frame)

    def _reply_error(self, rid: Any, err: PluginCallError) -> None:
        try:
            frame = encode_error(rid, err.code, err.message, err.data)
        except TypeError:
            frame = encode_error(rid, err.code, err.message)
        self._send(frame)

    # -- handshake ---------------------------------------------------------------------------
    def _handshake(self) -> bool:
        self._send(
            encode_request(
                0,
                "sandboxer.handshake",
                {
                    "cookie": self._cookie,
                    "protocols": [PROTOCOL_VERSION],
                    "plugin": {"name": self._name, "version": self._version},
                    "methods": self._handlers.declared(),
                },
            )
        )
        while True:
            data = self._sock.recv(_RECV_SIZE)
            if not data:
                print(
                    "sandboxer: the host closed the connection during the handshake",
                    file=sys.stderr,
                )
                return False
            lines = self._buffer.feed(data)
            if lines:
                break
        message = parse_message(lines[0])
        if not isinstance(message, Response) or message.id != 0:
            print(f"sandboxer: unexpected handshake reply {lines[0][:200]!r}", file=sys.stderr)
            return False
        if message.error is not None:
            print(
                f"sandboxer: the host refused the handshake: {message.error.get('message')}",
                file=sys.stderr,
            )
            return False
        # Requests that arrived in the same read as the reply wait for the first worker.
        for line in lines[1:]:
            request = self._dispatch_line(line)
            if request is not None:
                self._work.put(request)
        return True

    # -- dispatch ----------------------------------------------------------------------------
    def _dispatch_line(self, line: bytes) -> Request | None:
        """Handle a frame that needs no worker; return a Request that does."""
        if not line.strip():
            return None
        # Fast path for the common frame, a well-formed request; anything else goes through
        # the full parser and its checks.
        try:
            obj = _json.loads(line)
        except _json.JSONError:
            obj = None
        if (
            type(obj) is dict
            and obj.get("jsonrpc") == "2.0"
            and type(obj.get("method")) is str
            and type(obj.get("id")) is int
            and type(obj.get("params")) is list
        ):
            return Request(obj["id"], obj["method"], obj["params"])
        try:
            message = parse_message(line)
        except Exception as exc:  # the host sent garbage: tell it, keep serving
            self._send(encode_error(None, PARSE_ERROR, str(exc)))
            return None
        if isinstance(message, Notification):
            if message.method == "sandboxer.cancel" and isinstance(message.params, dict):
                self._cancel(message.params.get("id"))
            return None
        if isinstance(message, Response):
            return None  # the host answers only the handshake; nothing else is awaited
        return message

    def _cancel(self, rid: Any) -> None:
        loop = self._loop
        task = self._tasks.get(rid)
        if loop is not None and task is not None:
            loop.call_soon_threadsafe(task.cancel)

    def _execute(self, request: Request) -> None:
        method = request.method
        fn, is_async, is_lifecycle = self._table.get(method, (None, False, False))
        if (
            fn is None
            and self._handlers.any_method is not None
            and not method.startswith("sandboxer.")
        ):
            fn = functools.partial(self._handlers.any_method, method)
        params = request.params
        args = tuple(params) if isinstance(params, list) else (() if params is None else None)
        if args is None:
            self._send(
                encode_error(
                    request.id, INVALID_PARAMS, "params must be an array of positional arguments"
                )
            )
            return
        if fn is None:
            # A lifecycle function the plugin lacks is "not implemented" on the wire too
            # (-32601): the host then does no init, counts it healthy, takes no state.
            self._send(
                encode_error(
                    request.id,
                    METHOD_NOT_FOUND,
                    f"no method {method!r}" + (" (not implemented)" if is_lifecycle else ""),
                    {"available": sorted(self._handlers.methods)},
                )
            )
            if method == "sandboxer.shutdown":
                self._begin_stop()
            return
        if self._handlers.check_args is not None:
            try:
                self._handlers.check_args(method, fn, args)
            except PluginCallError as err:
                self._reply_error(request.id, err)
                return
        if is_async:
            self._submit_async(request, fn, args)
            return
        try:
            result = fn(*args)
        except Exception as exc:
            self._reply_error(request.id, self._error(exc, method))
        else:
            self._finish(request, result)

    def _finish(self, request: Request, result: Any) -> None:
        method = request.method
        if method in RESERVED:
            if method == "sandboxer.health":
                result = self._health_result(result)
            elif method != "sandboxer.export_state":
                result = None
        self._reply(request.id, result)
        if method == "sandboxer.shutdown":
            self._begin_stop()

    @staticmethod
    def _health_result(result: Any) -> dict[str, Any]:
        if result is False:
            return {"ok": False, "message": "health_check returned False"}
        if isinstance(result, dict) and result.get("ok") is False:
            return {"ok": False, "message": str(result.get("message", "not ok"))}
        return {"ok": True}

    def _error(self, exc: BaseException, method: str) -> PluginCallError:
        return (self._handlers.error or _default_error)(exc, method)

    # -- async handlers ----------------------------------------------------------------------
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._loop is None:
                import asyncio  # only plugins with async handlers pay for it at start-up

                loop = asyncio.new_event_loop()
                threading.Thread(
                    target=loop.run_forever, name="sandboxer-async", daemon=True
                ).start()
                self._loop = loop
            return self._loop

    def _submit_async(
        self, request: Request, fn: Callable[..., Any], args: tuple[Any, ...]
    ) -> None:
        loop = self._ensure_loop()

        def start() -> None:
            task = loop.create_task(fn(*args))
            self._tasks[request.id] = task
            task.add_done_callback(lambda t: self._async_done(request, t))

        loop.call_soon_threadsafe(start)

    def _async_done(self, request: Request, task: asyncio.Task[Any]) -> None:
        self._tasks.pop(request.id, None)
        if task.cancelled():
            self._send(
                encode_error(
                    request.id,
                    INTERNAL_ERROR,
                    f"{request.method} was cancelled",
                    {"cancelled": True},
                )
            )
            return
        exc = task.exception()
        if exc is not None:
            self._reply_error(request.id, self._error(exc, request.method))
        else:
            self._finish(request, task.result())

    # -- the worker pool ---------------------------------------------------------------------
    def _begin_stop(self) -> None:
        self._stopping.set()
        try:
            self._sock.shutdown(socket.SHUT_RD)  # wakes the reader
        except OSError:
            pass

    def _read_batch(self) -> list[Request] | None:
        """Read until at least one request arrived; None at EOF or on a framing error."""
        view = memoryview(self._recv_buffer)
        while not self._stopping.is_set():
            try:
                size = self._sock.recv_into(view)
            except OSError:
                return None
            if not size:
                return None
            try:
                lines = self._buffer.feed(bytes(view[:size]))
            except Exception as exc:
                print(f"sandboxer: {exc}; closing", file=sys.stderr)
                self.exit_code = 1
                return None
            if len(lines) == 1:
                request = self._dispatch_line(lines[0])
                if request is not None:
                    return [request]
                continue
            requests = [r for r in map(self._dispatch_line, lines) if r is not None]
            if requests:
                return requests
        return None

    def _reader(self) -> None:
        """The reading thread: quick calls run right here, their answers leave in one write
        per batch; methods known to be slow go to the worker pool so reading never waits."""
        slow = self._slow_methods
        while True:
            batch = self._read_batch()
            if batch is None:
                self._stopping.set()
                for _ in self._threads:
                    self._work.put(_STOP)
                return
            frames: list[bytes] = []
            self._local.frames = frames
            try:
                for request in batch:
                    if request.method in slow:
                        self._hand_off(request)
                        continue
                    started = time.monotonic()
                    try:
                        self._execute(request)
                    except Exception as exc:  # a bug in dispatch must not end the reading
                        print(
                            f"sandboxer: internal error handling {request.method}: {exc!r}",
                            file=sys.stderr,
                        )
                    if time.monotonic() - started > _SLOW_CALL:
                        slow.add(request.method)
            finally:
                self._local.frames = None
            if frames:
                self._write(b"".join(frames))

    def _hand_off(self, request: Request) -> None:
        with self._pool_lock:
            if self._idle == 0 and len(self._threads) < self._workers:
                thread = threading.Thread(
                    target=self._worker, daemon=True, name=f"sandboxer-worker-{len(self._threads)}"
                )
                self._threads.append(thread)
                thread.start()
        self._work.put(request)

    def _worker(self) -> None:
        work, slow = self._work, self._slow_methods
        while True:
            with self._pool_lock:
                self._idle += 1
            item = work.get()
            with self._pool_lock:
                self._idle -= 1
            if item is _STOP:
                return
            started = time.monotonic()
            self._run(item)
            if time.monotonic() - started <= _SLOW_CALL:
                slow.discard(item.method)  # quick again: back to the reading thread

    def _run(self, request: Request) -> None:
        try:
            self._execute(request)
        except Exception as exc:  # a bug in dispatch must not kill the worker silently
            print(f"sandboxer: internal error handling {request.method}: {exc!r}", file=sys.stderr)

    def run(self) -> int:
        if not self._handshake():
            return 1
        while not self._work.empty():  # requests that came with the handshake reply
            item = self._work.get()
            self._run(item)
        self._reader()
        for thread in list(self._threads):
            thread.join()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        return self.exit_code


def socket_from_env() -> tuple[socket.socket, str]:
    """The RPC socket and cookie the host passed (SANDBOXER_RPC_FD, SANDBOXER_MAGIC_COOKIE)."""
    fd_text = os.environ.get("SANDBOXER_RPC_FD")
    cookie = os.environ.get("SANDBOXER_MAGIC_COOKIE")
    if not fd_text or not fd_text.isdigit() or cookie is None:
        raise RuntimeError(
            "not started by sandboxer: SANDBOXER_RPC_FD and SANDBOXER_MAGIC_COOKIE must be set"
        )
    sock = socket.socket(fileno=int(fd_text))
    sock.setblocking(True)
    return sock, cookie
