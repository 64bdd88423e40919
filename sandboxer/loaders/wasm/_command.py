"""WASI command modules: a call is one run of ``_start`` in a fresh store, the arguments'
JSON on its stdin, its result the JSON value it writes to stdout, its stderr logged.

A run blocks (its wasm runs from start to exit on the calling thread): only ever call
``run_command`` on a worker, never on the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
import wasmtime

from ...errors import (
    INTERNAL_ERROR,
    CallTimeout,
    CpuLimitExceeded,
    PluginCallError,
    PluginStateError,
)
from ...sandbox.child import LineLog
from ...sandbox.policy import SandboxConfig
from ._call import first_line
from ._engine import WasmEngine
from ._instance import Store, running
from ._wasi import WasiContexts

__all__ = ["run_command"]


def run_command(
    plugin_id: str,
    method: str,
    payload: bytes,
    timeout: float,
    *,
    engine: WasmEngine,
    sandbox: SandboxConfig,
    module: wasmtime.Module,
    linker: wasmtime.Linker,
    wasi: WasiContexts,
    commands: set[Store],
    closed: Callable[[], bool],
    max_output: int,
    log: logging.Logger,
) -> Any:
    """Run ``_start`` once with the args on stdin; the result is its stdout (blocking).

    The run's store is in ``commands`` while it runs (so that an unload can stop it);
    ``closed()`` tells an unload's stop from the call's own timeout."""
    pid = plugin_id
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

    config = wasi.for_command(method, stdin=payload, stdout=stdout, stderr=stderr)
    store = Store(engine, sandbox)
    commands.add(store)
    status = 0
    try:
        if config is not None:
            store.store.set_wasi(config)
        store.arm(timeout)
        trapped: str | None = None
        out_of_fuel = False
        try:
            with engine.ticking(), running(store):
                instance = linker.instantiate(store.store, module)
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
            status = exc.code
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            # Only facts leave this block: the trap's backtrace pins the module.
            trapped = first_line(exc)
            out_of_fuel = isinstance(exc, wasmtime.Trap) and (
                exc.trap_code is wasmtime.TrapCode.OUT_OF_FUEL
            )
        if trapped is not None:
            err.flush()
            if store.timed_out and closed():
                raise PluginStateError(
                    f"plugin {pid}: unloaded while {method} was in "
                    "flight (it outlived the drain timeout)",
                    plugin_id=pid,
                )
            if store.timed_out:
                raise CallTimeout(
                    f"plugin {pid}: {method} did not finish within {timeout:g}s",
                    timeout=timeout,
                    plugin_id=pid,
                    method=method,
                )
            if out_of_fuel:
                raise CpuLimitExceeded(
                    f"plugin {pid}: {method} used up its fuel ({sandbox.fuel} per call)",
                    plugin_id=pid,
                )
            raise PluginCallError(
                f"plugin {pid}: {method} trapped: {trapped}",
                code=INTERNAL_ERROR,
                plugin_id=pid,
                method=method,
                data={"stderr": list(err.tail)},
            )
    finally:
        commands.discard(store)
        store.release()
    err.flush()
    if too_much:
        raise PluginCallError(
            f"plugin {pid}: {method} wrote more than {max_output} bytes to stdout",
            code=INTERNAL_ERROR,
            plugin_id=pid,
            method=method,
        )
    if status != 0:
        tail = " | ".join(err.tail) or "no stderr"
        raise PluginCallError(
            f"plugin {pid}: {method} exited with status {status}: {tail}",
            code=INTERNAL_ERROR,
            plugin_id=pid,
            method=method,
            data={"exit_status": status, "stderr": list(err.tail)},
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
