"""The call path's conversions: a call's arguments into an instance (JSON into its argument
buffer, numbers into the bound export's value array), its result out of it, and a trap into
the error a caller sees.

Everything a module returns is untrusted: a JSON result's (ptr, len) is checked against the
memory before a byte is read, and its size against the host's frame limit. These functions
run on the event loop's hot path; they never block and never run wasm.
"""

from __future__ import annotations

from typing import Any

import orjson
import wasmtime

from ... import _json
from ...errors import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    CallTimeout,
    CpuLimitExceeded,
    MemoryLimitExceeded,
    PluginCallError,
    PluginStateError,
    SandboxerError,
)
from ...sandbox.policy import SandboxConfig
from ._abi import FIELDS, I32, I64, RANGES, Method
from ._engine import MAX_WASM_STACK
from ._instance import Bound, Instance

__all__ = [
    "encode",
    "put_numbers",
    "get_numbers",
    "json_result",
    "envelope",
    "call_failure",
    "first_line",
]

# The start of a result the fast path parses in place: {"result": ...} (compared as a buffer).
_RESULT_HEAD = memoryview(b'{"result":')


def encode(plugin_id: str, method: str, args: Any) -> bytes:
    """The arguments as the JSON array a JSON ABI method reads."""
    try:
        return _json.dumps(args)
    except TypeError as exc:
        raise PluginCallError(
            f"plugin {plugin_id}: arguments of {method} are not JSON values: {exc}",
            code=INVALID_PARAMS,
            plugin_id=plugin_id,
            method=method,
        ) from None


def put_numbers(
    plugin_id: str, bound: Bound, m: Method, method: str, args: tuple[Any, ...]
) -> None:
    """Write a numeric export's arguments into its value array, each checked for its kind."""
    if len(args) != len(m.params):
        raise PluginCallError(
            f"plugin {plugin_id}: {method} takes {len(m.params)} numeric "
            f"argument(s), got {len(args)}",
            code=INVALID_PARAMS,
            plugin_id=plugin_id,
            method=method,
        )
    for i, kind in enumerate(m.params):
        value = args[i]
        if kind in (I32, I64):
            lo, hi = RANGES[kind]
            if type(value) is not int or not lo <= value < hi:
                raise _bad_number(plugin_id, method, i, value, kind)
            if kind == I32:
                bound.arg[i].i32 = value - (1 << 32) if value >= 1 << 31 else value
            else:
                bound.arg[i].i64 = value - (1 << 64) if value >= 1 << 63 else value
        else:
            if type(value) not in (int, float):
                raise _bad_number(plugin_id, method, i, value, kind)
            try:
                setattr(bound.arg[i], FIELDS[kind], float(value))
            except OverflowError:
                raise _bad_number(plugin_id, method, i, value, kind) from None


def get_numbers(bound: Bound, m: Method) -> Any:
    """A numeric export's results: one value, None for none, or a list."""
    kinds = m.results
    if len(kinds) == 1:
        return getattr(bound.result[0], FIELDS[kinds[0]])
    if not kinds:
        return None
    return [getattr(bound.result[i], FIELDS[k]) for i, k in enumerate(kinds)]


def _bad_number(plugin_id: str, method: str, index: int, value: Any, kind: int) -> PluginCallError:
    name = FIELDS[kind]
    expected = "an integer in range" if kind in RANGES else "a number"
    return PluginCallError(
        f"plugin {plugin_id}: argument {index + 1} of {method} must be {expected} "
        f"for {name}, not {value!r}",
        code=INVALID_PARAMS,
        plugin_id=plugin_id,
        method=method,
    )


def json_result(plugin_id: str, inst: Instance, bound: Bound, method: str, max_output: int) -> Any:
    """Read ``{"result": …}`` or ``{"error": …}`` from the (ptr << 32 | len) a call gave."""
    packed = bound.result[0].i64 & 0xFFFF_FFFF_FFFF_FFFF
    ptr, length = packed >> 32, packed & 0xFFFF_FFFF
    end = ptr + length
    if end > len(inst.view) and end > inst.refresh():
        inst.broken = True
        raise PluginCallError(
            f"plugin {plugin_id}: {method} returned a result at {ptr}+{length}, "
            f"outside its memory ({len(inst.view)} bytes)",
            code=INTERNAL_ERROR,
            plugin_id=plugin_id,
            method=method,
        )
    if length > max_output:
        raise PluginCallError(
            f"plugin {plugin_id}: {method} returned {length} bytes, more than the "
            f"{max_output}-byte limit",
            code=INTERNAL_ERROR,
            plugin_id=plugin_id,
            method=method,
        )
    view = inst.view
    if length > 10 and view[ptr : ptr + 10] == _RESULT_HEAD and view[end - 1] == 0x7D:
        try:
            return orjson.loads(view[ptr + 10 : end - 1])
        except orjson.JSONDecodeError:
            pass  # e.g. {"result":1,"x":2}: the full check below names the problem
    return envelope(plugin_id, bytes(view[ptr:end]), method)


def envelope(plugin_id: str, raw: bytes, method: str) -> Any:
    """The result in ``{"result": …}``; a PluginCallError for ``{"error": …}`` or anything
    else."""
    pid = plugin_id
    try:
        reply = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PluginCallError(
            f"plugin {pid}: {method} returned invalid JSON or UTF-8: {exc}",
            code=INTERNAL_ERROR,
            plugin_id=pid,
            method=method,
        ) from None
    if type(reply) is dict and len(reply) == 1:
        if "result" in reply:
            return reply["result"]
        error = reply.get("error")
        if (
            type(error) is dict
            and type(error.get("code")) is int
            and type(error.get("message")) is str
        ):
            raise PluginCallError(
                f"plugin {pid}: {method}: {error['message']}",
                code=error["code"],
                data=error.get("data"),
                plugin_id=pid,
                method=method,
            )
    raise PluginCallError(
        f'plugin {pid}: {method} returned {raw[:80]!r}, not {{"result": …}} or '
        f'{{"error": {{"code": int, "message": str}}}}',
        code=INTERNAL_ERROR,
        plugin_id=pid,
        method=method,
    )


def call_failure(
    plugin_id: str,
    inst: Instance,
    method: str,
    timeout: float,
    sandbox: SandboxConfig,
    *,
    closed: bool,
) -> SandboxerError:
    """The error for a call that trapped; the instance is marked for replacement. ``closed``:
    the generation was closed meanwhile (a timeout is then the unload's)."""
    trap, error = inst.take_failure()
    inst.broken = True
    pid = plugin_id
    code = trap.trap_code if trap is not None else None
    size = inst.memory_size()
    if inst.timed_out and closed:
        return PluginStateError(
            f"plugin {pid}: unloaded while {method} was in flight (it outlived the drain timeout)",
            plugin_id=pid,
        )
    if inst.timed_out:
        return CallTimeout(
            f"plugin {pid}: {method} did not finish within {timeout:g}s",
            timeout=timeout,
            plugin_id=pid,
            method=method,
        )
    if code is wasmtime.TrapCode.OUT_OF_FUEL:
        return CpuLimitExceeded(
            f"plugin {pid}: {method} used up its fuel ({sandbox.fuel} per call)", plugin_id=pid
        )
    if code is wasmtime.TrapCode.STACK_OVERFLOW:
        return PluginCallError(
            f"plugin {pid}: {method} trapped: stack overflow (deep "
            f"recursion; the wasm stack is {MAX_WASM_STACK >> 10} KiB)",
            code=INTERNAL_ERROR,
            plugin_id=pid,
            method=method,
            data={"trap": "stack_overflow"},
        )
    limit = sandbox.memory_limit
    if size + (64 << 10) > limit:
        return MemoryLimitExceeded(
            f"plugin {pid}: {method} failed at its memory limit ({limit} bytes; linear "
            f"memory {size} bytes): {first_line(trap or error)}",
            limit=limit,
            peak=size,
            plugin_id=pid,
        )
    if isinstance(error, wasmtime.ExitTrap):
        return PluginCallError(
            f"plugin {pid}: {method} called proc_exit({error.code})",
            code=INTERNAL_ERROR,
            plugin_id=pid,
            method=method,
            data={"exit_status": error.code},
        )
    detail = first_line(trap or error)
    return PluginCallError(
        f"plugin {pid}: {method} trapped: {detail}",
        code=INTERNAL_ERROR,
        plugin_id=pid,
        method=method,
        data={"trap": code.name.lower() if code else None},
    )


def first_line(exc: BaseException | None) -> str:
    """The telling line of a wasmtime error: its cause (after a backtrace) or its first line."""
    text = str(exc or "").strip()
    if not text:
        return type(exc).__name__
    if "Caused by:" in text:
        causes = [line.strip() for line in text.split("Caused by:", 1)[1].splitlines()]
        return "; ".join(line for line in causes if line)
    return text.splitlines()[0]
