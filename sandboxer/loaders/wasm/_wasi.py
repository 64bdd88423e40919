"""WASI for wasm plugins: the context each instance and each command run gets, and
sandboxer's own ``poll_oneoff``.

A context has argv ``[plugin_id]`` (a command run: ``[plugin_id, method]``), an empty
environment, no sockets, stdin empty or fixed bytes, stdout and stderr as log lines (or a
command's result), and every allowed path preopened from the descriptor opened at load
(``sandbox/paths.open_grant``), never by name again: a plugin or a co-tenant that renames a
granted directory away and puts a link in its place changes nothing a later context sees.
Inside a preopen, wasmtime resolves every guest path beneath that directory (openat2
``RESOLVE_BENEATH``). ``poll_oneoff``, the one WASI call that blocks, shadows wasmtime's so
that a sleep honours the call's deadline.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import wasmtime

from ...errors import PluginLoadError, SandboxerError
from ...sandbox.child import LineLog
from ...sandbox.paths import OpenedPath
from . import _wasmtime as _wt
from ._abi import WASI_MODULE
from ._engine import WasmEngine
from ._host import GuestMemory
from ._instance import current_store

__all__ = ["define_wasi", "poll_oneoff", "WasiContexts"]

_CLOCK, _FD_READ, _FD_WRITE = 0, 1, 2  # __wasi_eventtype_t
_ABSTIME = 1  # __WASI_SUBCLOCKFLAGS_SUBSCRIPTION_CLOCK_ABSTIME
_ENOTSUP, _EINVAL = 58, 28  # __wasi_errno_t
_SUBSCRIPTION, _EVENT = 48, 32  # sizeof(__wasi_subscription_t), sizeof(__wasi_event_t)
_SLEEP_STEP = 0.05


def poll_oneoff(
    caller: wasmtime.Caller, in_ptr: int, out_ptr: int, count: int, nevents_ptr: int
) -> int:
    """WASI ``poll_oneoff`` that honours the call's deadline: the one WASI call that blocks.

    Clock subscriptions sleep, in steps, until the earliest expires or the call's deadline
    passes (then the call traps and is reported as its timeout). A plugin has no sockets and
    stdin is a fixed buffer, so an fd subscription is answered at once: ready (stdin, at EOF
    or not) or ENOTSUP. Every range is checked before anything is read, slept or written."""
    memory = GuestMemory(caller)
    store = current_store()
    if (
        store is None
        or count == 0
        or not (
            memory.holds(in_ptr, _SUBSCRIPTION * count)
            and memory.holds(out_ptr, _EVENT * count)
            and memory.holds(nevents_ptr, 4)
        )
    ):
        return _EINVAL
    subs = memory.read(in_ptr, _SUBSCRIPTION * count, "wasi.poll_oneoff: the subscriptions")
    events: list[bytes] = []
    wake: list[tuple[float, bytes]] = []
    now_mono, now_real = time.monotonic(), time.time()
    for i in range(count):
        sub = subs[_SUBSCRIPTION * i : _SUBSCRIPTION * (i + 1)]
        userdata, tag = sub[0:8], sub[8]
        if tag == _CLOCK:
            clock = int.from_bytes(sub[16:20], "little")
            timeout_ns = int.from_bytes(sub[24:32], "little")
            flags = int.from_bytes(sub[40:42], "little")
            delay = timeout_ns / 1e9
            if flags & _ABSTIME:
                delay -= now_real if clock == 0 else now_mono
            wake.append((now_mono + max(delay, 0.0), userdata))
        elif tag in (_FD_READ, _FD_WRITE):
            fd = int.from_bytes(sub[16:20], "little")
            error = (
                0
                if (tag == _FD_READ and fd == 0) or (tag == _FD_WRITE and fd in (1, 2))
                else _ENOTSUP
            )
            events.append(userdata + error.to_bytes(2, "little") + bytes([tag]) + bytes(21))
        else:
            return _EINVAL
    if not events and wake:
        until = min(at for at, _ in wake)
        while True:
            now = time.monotonic()
            if now >= store.deadline:
                store.timed_out = True
                raise _wt.HostTrap("sandboxer: the call's deadline passed (in poll_oneoff)")
            if now >= until:
                break
            time.sleep(min(until - now, store.deadline - now, _SLEEP_STEP))
        now = time.monotonic()
        events = [
            userdata + bytes(2) + bytes([_CLOCK]) + bytes(21) for at, userdata in wake if at <= now
        ]
    memory.write(out_ptr, b"".join(events), "wasi.poll_oneoff: the events")
    memory.write(nevents_ptr, len(events).to_bytes(4, "little"), "wasi.poll_oneoff: nevents")
    return 0


def define_wasi(linker: wasmtime.Linker) -> None:
    """Define WASI in ``linker``, with sandboxer's ``poll_oneoff`` in place of wasmtime's."""
    linker.define_wasi()
    linker.allow_shadowing = True
    _wt.define_host_function(linker, WASI_MODULE, "poll_oneoff", 4, 1, poll_oneoff)
    linker.allow_shadowing = False


class WasiContexts:
    """The WASI contexts of one generation, and the granted directories they preopen.

    The grants, each opened once at load (WasmLoader.start), are owned from here on: preopened
    from their descriptors, closed once by ``close``. The lock keeps ``close`` from freeing a
    descriptor number while a context is being built from its /proc/self/fd link on a worker
    thread. ``enabled`` is False for a module that imports no WASI: it gets no context."""

    def __init__(
        self,
        plugin_id: str,
        *,
        enabled: bool,
        grants: tuple[OpenedPath, ...],
        engine: WasmEngine,
        log: logging.Logger,
        closed_error: Callable[[], SandboxerError],
    ) -> None:
        self.plugin_id = plugin_id
        self.enabled = enabled
        self._grants = grants
        self._lock = threading.Lock()
        self._engine = engine
        self._log = log
        self._closed_error = closed_error

    def for_instance(self) -> wasmtime.WasiConfig | None:
        """A pool instance's: no stdin, stdout and stderr line-logged."""
        return self._config(
            argv=[self.plugin_id],
            stdin=None,
            stdout=self.line_sink("stdout"),
            stderr=self.line_sink("stderr"),
        )

    def for_command(
        self,
        method: str,
        *,
        stdin: bytes,
        stdout: Callable[[bytes], Any],
        stderr: Callable[[bytes], Any],
    ) -> wasmtime.WasiConfig | None:
        """A command run's: the arguments on stdin, its own stdout and stderr sinks."""
        return self._config(
            argv=[self.plugin_id, method], stdin=stdin, stdout=stdout, stderr=stderr
        )

    def for_program(
        self,
        argv: list[str],
        env: dict[str, str],
        *,
        stdin: bool,
        stdout: Callable[[bytes], Any] | None,
        stderr: Callable[[bytes], Any] | None,
    ) -> wasmtime.WasiConfig | None:
        """A program's (``sandboxer exec``): its argv and environment as given; with
        ``stdin``, this process's standard input, else none; stdout and stderr into the
        callbacks given, or (None) straight to this process's own, as they come."""
        return self._config(
            argv=argv, stdin=None, stdout=stdout, stderr=stderr, env=env, inherit_stdin=stdin
        )

    def _config(
        self,
        *,
        argv: list[str],
        stdin: bytes | None,
        stdout: Callable[[bytes], Any] | None,
        stderr: Callable[[bytes], Any] | None,
        env: dict[str, str] | None = None,
        inherit_stdin: bool = False,
    ) -> wasmtime.WasiConfig | None:
        if not self.enabled:
            return None
        wasi = wasmtime.WasiConfig()
        wasi.argv = argv
        wasi.env = list((env or {}).items())
        if inherit_stdin:
            wasi.inherit_stdin()
        elif stdin is not None:
            _wt.set_stdin_bytes(wasi, stdin)
        for sink, inherit, attribute in (
            (stdout, wasi.inherit_stdout, "stdout_custom"),
            (stderr, wasi.inherit_stderr, "stderr_custom"),
        ):
            if sink is None:
                inherit()
            else:
                setattr(wasi, attribute, sink)
                self._engine.sinks.add(sink)
        self._preopen(wasi)
        return wasi

    def _preopen(self, wasi: wasmtime.WasiConfig) -> None:
        """Give ``wasi`` each allowed path, from the descriptor opened at load.

        wasmtime opens the host path it is given at once, here (one ``openat`` of
        ``/proc/self/fd/N``, which the kernel resolves to the directory the descriptor holds,
        whatever has become of its name), and resolves every guest path beneath what it
        opened. The guest sees the grant at the path as written."""
        pid = self.plugin_id
        with self._lock:
            for grant in self._grants:
                if grant.fd < 0:
                    raise self._closed_error()
                try:
                    wasi.preopen_dir(grant.proc_path, grant.path, fs_mutable=grant.writable)
                except wasmtime.WasmtimeError:
                    raise PluginLoadError(
                        f"plugin {pid}: allowed path {grant.path} could not be preopened from "
                        f"its descriptor ({grant.proc_path}, {grant.host_path}); is /proc "
                        "mounted in the supervisor?",
                        plugin_id=pid,
                    ) from None

    def close(self) -> None:
        """Close every grant (idempotent); no context can be built from here on."""
        with self._lock:
            for grant in self._grants:
                grant.close()

    def line_sink(self, name: str) -> Callable[[bytes], int]:
        """A WASI output callback that logs ``name`` ("stdout" or "stderr") line by line."""
        lines = LineLog(
            name=name, logger=self._log, level=logging.INFO if name == "stdout" else logging.WARNING
        )

        def sink(data: bytes) -> int:
            lines.feed(data)
            return len(data)

        return sink
