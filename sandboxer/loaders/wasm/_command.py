"""WASI command modules: a call is one run of ``_start`` in a fresh store.

Two kinds: a command written for sandboxer (``run_command``: the arguments' JSON on its
stdin, its result the JSON value it writes to stdout, its stderr logged), and an unmodified
WASI program (``[wasm] mode = "command"``, ``run_program_call``: ``run(args...)`` runs it
with that argv and answers ``{"exitCode", "stdout", "stderr"}``).

A run blocks (its wasm runs from start to exit on the calling thread): only ever call these
on a worker, never on the event loop.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import wasmtime

from ...errors import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    CallTimeout,
    CpuLimitExceeded,
    PluginCallError,
    PluginStateError,
    SandboxerError,
)
from ...sandbox.child import LineLog
from ...sandbox.policy import SandboxConfig
from ._call import first_line
from ._engine import WasmEngine
from ._instance import Store, running
from ._wasi import WasiContexts

__all__ = ["CommandRunner", "run_command", "run_program_call"]


@dataclass(frozen=True, slots=True)
class _Ended:
    """How a run of ``_start`` ended: its exit status, or the trap that stopped it."""

    status: int
    trapped: str | None = None
    out_of_fuel: bool = False
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class CommandRunner:
    """What every run of one generation's module needs, from its handle."""

    plugin_id: str
    engine: WasmEngine
    sandbox: SandboxConfig
    module: wasmtime.Module
    linker: wasmtime.Linker
    wasi: WasiContexts
    commands: set[Store]  # the runs in progress (an unload stops them)
    closed: Callable[[], bool]  # tells an unload's stop from the call's own timeout

    def start(self, method: str, config: wasmtime.WasiConfig | None, timeout: float) -> _Ended:
        pid = self.plugin_id
        store = Store(self.engine, self.sandbox)
        self.commands.add(store)
        try:
            if config is not None:
                store.store.set_wasi(config)
            store.arm(timeout)
            try:
                with self.engine.ticking(), running(store):
                    instance = self.linker.instantiate(store.store, self.module)
                    start = instance.exports(store.store)["_start"]
                    if not isinstance(start, wasmtime.Func):
                        # Layout.of checked the module's _start at load; this is the instance's.
                        raise PluginCallError(
                            f"plugin {pid}: {method}: the module's _start is not a function",
                            code=INTERNAL_ERROR,
                            plugin_id=pid,
                            method=method,
                        )
                    start(store.store)
            except wasmtime.ExitTrap as exc:
                return _Ended(exc.code)
            except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
                # Only facts leave this block: the trap's backtrace pins the module.
                out_of_fuel = isinstance(exc, wasmtime.Trap) and (
                    exc.trap_code is wasmtime.TrapCode.OUT_OF_FUEL
                )
                return _Ended(0, first_line(exc), out_of_fuel, store.timed_out)
            return _Ended(0)
        finally:
            self.commands.discard(store)
            store.release()

    def stopped(self, ended: _Ended, method: str, timeout: float) -> SandboxerError | None:
        """The error for a run a limit or the unload stopped; None for a plain trap."""
        pid = self.plugin_id
        if ended.timed_out and self.closed():
            return PluginStateError(
                f"plugin {pid}: unloaded while {method} was in flight (it outlived the drain "
                "timeout)",
                plugin_id=pid,
            )
        if ended.timed_out:
            return CallTimeout(
                f"plugin {pid}: {method} did not finish within {timeout:g}s",
                timeout=timeout,
                plugin_id=pid,
                method=method,
            )
        if ended.out_of_fuel:
            return CpuLimitExceeded(
                f"plugin {pid}: {method} used up its fuel ({self.sandbox.fuel} per call)",
                plugin_id=pid,
            )
        return None


def run_command(
    runner: CommandRunner,
    method: str,
    payload: bytes,
    timeout: float,
    *,
    max_output: int,
    log: logging.Logger,
) -> Any:
    """Run ``_start`` once with the args on stdin; the result is its stdout (blocking)."""
    pid, wasi = runner.plugin_id, runner.wasi
    out = bytearray()
    err = LineLog(name="stderr", logger=log, level=logging.WARNING, tail=20)
    too_much = False

    def stdout(data: bytes) -> int:
        nonlocal too_much
        if len(out) + len(data) > max_output:
            too_much = True
            return -5  # EIO: the write fails inside the plugin
        out.extend(data)
        return len(data)

    def stderr(data: bytes) -> int:
        err.feed(data)
        return len(data)

    ended = runner.start(
        method, wasi.for_command(method, stdin=payload, stdout=stdout, stderr=stderr), timeout
    )
    err.flush()
    if ended.trapped is not None:
        raise runner.stopped(ended, method, timeout) or PluginCallError(
            f"plugin {pid}: {method} trapped: {ended.trapped}",
            code=INTERNAL_ERROR,
            plugin_id=pid,
            method=method,
            data={"stderr": list(err.tail)},
        )
    if too_much:
        raise PluginCallError(
            f"plugin {pid}: {method} wrote more than {max_output} bytes to stdout",
            code=INTERNAL_ERROR,
            plugin_id=pid,
            method=method,
        )
    if ended.status != 0:
        tail = " | ".join(err.tail) or "no stderr"
        raise PluginCallError(
            f"plugin {pid}: {method} exited with status {ended.status}: {tail}",
            code=INTERNAL_ERROR,
            plugin_id=pid,
            method=method,
            data={"exit_status": ended.status, "stderr": list(err.tail)},
        )
    if not out.strip():
        return None
    try:
        return orjson.loads(out)
    except orjson.JSONDecodeError as exc:
        raise PluginCallError(
            f"plugin {pid}: {method} wrote something other than one JSON value to stdout: {exc}",
            code=INTERNAL_ERROR,
            plugin_id=pid,
            method=method,
        ) from None


class _Capture:
    """One output stream of a program run: the first ``limit`` bytes kept, the rest counted
    (the program's writes succeed either way)."""

    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self.total = 0
        self.limit = limit

    def __call__(self, chunk: bytes) -> int:
        self.total += len(chunk)
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]
        return len(chunk)

    def describe(self, name: str, answer: dict[str, Any]) -> None:
        """``name`` as text (UTF-8), else ``name + "Base64"``; in ``truncated`` if cut."""
        try:
            answer[name] = self.data.decode("utf-8")
        except UnicodeDecodeError:
            answer[name] = None
            answer[name + "Base64"] = base64.b64encode(self.data).decode()
        if self.total > len(self.data):
            answer["truncated"].append(name)


def run_program_call(
    runner: CommandRunner,
    args: tuple[Any, ...],
    timeout: float,
    *,
    program: str,
    max_output: int,
) -> dict[str, Any]:
    """Run an unmodified WASI program once with argv ``[program, *args]`` (strings), no
    environment and no stdin: ``{"exitCode", "stdout", "stderr", "truncated"}``, each
    stream up to ``max_output`` bytes. A limit that stopped it is an error; a trap too."""
    pid, method = runner.plugin_id, "run"
    if not all(isinstance(a, str) for a in args):
        raise PluginCallError(
            f"plugin {pid}: run takes the program's arguments, strings only, not {list(args)!r}",
            code=INVALID_PARAMS,
            plugin_id=pid,
            method=method,
        )
    out, err = _Capture(max_output), _Capture(max_output)
    config = runner.wasi.for_program([program, *args], {}, stdin=False, stdout=out, stderr=err)
    ended = runner.start(method, config, timeout)
    if ended.trapped is not None:
        raise runner.stopped(ended, method, timeout) or PluginCallError(
            f"plugin {pid}: run trapped: {ended.trapped}",
            code=INTERNAL_ERROR,
            plugin_id=pid,
            method=method,
            data={"stderr": err.data[-4096:].decode("utf-8", "replace")},
        )
    answer: dict[str, Any] = {"exitCode": ended.status, "truncated": []}
    out.describe("stdout", answer)
    err.describe("stderr", answer)
    return answer
