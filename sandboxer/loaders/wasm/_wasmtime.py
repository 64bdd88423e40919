"""The few wasmtime C-API entry points the wasm loader calls on its hot path.

wasmtime-py's ``Func.__call__`` checks and converts every value and costs tens of
microseconds; a plugin call here has a budget of a few. So the hot path calls the C API
directly through ctypes function objects without ``argtypes`` (each argument is passed as a
pre-built ``c_void_p``/``c_size_t``, which ctypes forwards without conversion), on the same
library wasmtime-py loaded. Everything else (compiling, linking, WASI, host functions) goes
through wasmtime-py's public API.

Calls use wasmtime's async API: a call is a *future* whose wasm runs on its own fiber stack
and can be suspended (every so much fuel) and resumed later, even on another thread. That is
what lets the loader start every call on the event loop (a quick call finishes in the first
slice, with no thread hand-off) and move a long call to a worker thread (_instance.py).

This is the one module of the loader that touches wasmtime-py's private parts (``_ffi``, the
native handles inside its objects); the rest use the functions here.
"""

from __future__ import annotations

import ctypes
import itertools
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi

__all__ = [
    "lib",
    "FuturePtr",
    "call_async",
    "poll",
    "delete_future",
    "set_fuel",
    "fuel_async_yield_interval",
    "memory_data_size",
    "epoch_callback_type",
    "CONTINUE",
    "set_epoch_callback",
    "new_error",
    "val_array",
    "trap_from",
    "error_from",
    "address",
    "func_address",
    "memory_address",
    "context",
    "set_stdin_bytes",
    "HostTrap",
    "define_host_function",
]

lib = ctypes.CDLL(ffi.dll._name)


class FuturePtr(ctypes.c_void_p):
    """A ``wasmtime_call_future_t*``, returned as is by ctypes (a plain c_void_p restype
    would become an int)."""


# wasmtime_call_future_t *wasmtime_func_call_async(wasmtime_context_t *, const wasmtime_func_t *,
#     const wasmtime_val_t *args, size_t nargs, wasmtime_val_t *results, size_t nresults,
#     wasm_trap_t **trap_ret, wasmtime_error_t **error_ret)
call_async = lib.wasmtime_func_call_async
call_async.restype = FuturePtr
# bool wasmtime_call_future_poll(wasmtime_call_future_t *): true once the call has finished
poll = lib.wasmtime_call_future_poll
poll.restype = ctypes.c_bool
delete_future = lib.wasmtime_call_future_delete
delete_future.restype = None
# wasmtime_error_t *wasmtime_context_set_fuel(wasmtime_context_t *, uint64_t)
set_fuel = lib.wasmtime_context_set_fuel
set_fuel.restype = ctypes.c_void_p
# wasmtime_error_t *wasmtime_context_fuel_async_yield_interval(wasmtime_context_t *, uint64_t)
fuel_async_yield_interval = lib.wasmtime_context_fuel_async_yield_interval
fuel_async_yield_interval.restype = ctypes.c_void_p
# size_t wasmtime_memory_data_size(const wasmtime_context_t *, const wasmtime_memory_t *)
memory_data_size = lib.wasmtime_memory_data_size
memory_data_size.restype = ctypes.c_size_t

# wasmtime_error_t *(*)(wasmtime_context_t *, void *data, uint64_t *delta, update_kind *kind)
epoch_callback_type = ctypes.CFUNCTYPE(
    ctypes.c_size_t,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ctypes.c_uint8),
)
CONTINUE = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE

_set_epoch_callback = lib.wasmtime_store_epoch_deadline_callback
_set_epoch_callback.restype = None
_set_epoch_callback.argtypes = [
    ctypes.c_void_p,
    epoch_callback_type,
    ctypes.c_void_p,
    ctypes.c_void_p,
]
_new_error = lib.wasmtime_error_new
_new_error.restype = ctypes.c_void_p
_new_error.argtypes = [ctypes.c_char_p]


def set_epoch_callback(store: wasmtime.Store, callback: Any, data: int) -> None:
    """Call ``callback`` whenever ``store`` reaches its epoch deadline (no finalizer)."""
    ptr = ctypes.cast(store.ptr(), ctypes.c_void_p)
    _set_epoch_callback(ptr, callback, ctypes.c_void_p(data), None)


def new_error(message: str) -> int:
    """A fresh ``wasmtime_error_t*`` (as an int) for a callback to return: it becomes a trap."""
    return int(_new_error(message.encode("utf-8", "replace")) or 0)


def val_array(kinds: list[int]) -> Any:
    """A ``wasmtime_val_t[n]`` with each slot's kind preset."""
    array = (ffi.wasmtime_val_t * max(len(kinds), 1))()
    for i, kind in enumerate(kinds):
        array[i].kind = kind  # type: ignore[assignment]  # ctypes stores the int as a c_uint8
    return array


def trap_from(address: int) -> wasmtime.Trap:
    """Take ownership of a ``wasm_trap_t*`` a call reported (freed with the object)."""
    return wasmtime.Trap._from_ptr(ctypes.cast(address, ctypes.POINTER(ffi.wasm_trap_t)))


def error_from(address: int) -> wasmtime.WasmtimeError:
    """Take ownership of a ``wasmtime_error_t*`` (an ``ExitTrap`` for WASI proc_exit)."""
    return wasmtime.WasmtimeError._from_ptr(
        ctypes.cast(address, ctypes.POINTER(ffi.wasmtime_error_t))
    )


def address(obj: Any) -> ctypes.c_void_p:
    """A ``c_void_p`` to a ctypes object, to pass on the hot path without conversion."""
    return ctypes.c_void_p(ctypes.addressof(obj))


def func_address(func: wasmtime.Func) -> ctypes.c_void_p:
    """The address of ``func``'s ``wasmtime_func_t``, for ``call_async``."""
    return address(func._func)


def memory_address(memory: wasmtime.Memory) -> ctypes.c_void_p:
    """The address of ``memory``'s ``wasmtime_memory_t``, for ``memory_data_size``."""
    return address(memory._memory)


def context(store: wasmtime.Store) -> ctypes.c_void_p:
    return ctypes.c_void_p(ctypes.cast(store._context(), ctypes.c_void_p).value)


def set_stdin_bytes(wasi: wasmtime.WasiConfig, data: bytes) -> None:
    """Give ``wasi`` a fixed stdin of ``data`` (wasmtime-py offers only a file)."""
    vec = ffi.wasm_byte_vec_t()
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    ffi.wasm_byte_vec_new(ctypes.byref(vec), len(data), buf)
    ffi.wasi_config_set_stdin_bytes(wasi.ptr(), ctypes.byref(vec))  # takes the vec


# -- host functions ----------------------------------------------------------------------------
# wasmtime-py's own trampoline parks a host function's exception in one process-wide slot and
# re-raises it from the next wasmtime-py call that traps, on any thread; calls made through
# this module never collect it, so a stale exception would surface in an unrelated call.
# Host functions defined here report failure by returning a trap instead, and never raise.


class HostTrap(Exception):
    """Raised by a host function to trap the calling wasm with this message."""


_HOST: dict[int, tuple[Any, int]] = {}  # id -> (function(caller, *i32 args), number of results)
_host_ids = itertools.count(1)
_new_trap = lib.wasmtime_trap_new
_new_trap.restype = ctypes.c_void_p
_new_trap.argtypes = [ctypes.c_char_p, ctypes.c_size_t]


def _trap(message: str) -> int:
    text = message.encode("utf-8", "replace")
    return int(_new_trap(text, len(text)) or 0)


def _host_trampoline_call(
    data: int | None, caller_ptr: Any, params: Any, nparams: int, results: Any, nresults: int
) -> int:
    caller = wasmtime.Caller(caller_ptr)
    try:
        fn, _ = _HOST[data or 0]
        # Unsigned, as the guest means them: a pointer or length past 2 GiB is not negative.
        value = fn(caller, *(params[i].of.i32 & 0xFFFF_FFFF for i in range(nparams)))
        if nresults:
            results[0].kind = 0  # WASMTIME_I32
            results[0].of.i32 = int(value)
        return 0
    except HostTrap as exc:
        return _trap(str(exc))
    except BaseException as exc:  # a bug in sandboxer's host function: fail the call, say so
        return _trap(f"sandboxer host function failed: {type(exc).__name__}: {exc}")
    finally:
        caller._invalidate()


def _host_finalize_call(data: int | None) -> None:
    _HOST.pop(data or 0, None)


# The C callbacks wasmtime calls: one of each for every host function.
_host_trampoline = ffi.wasmtime_func_callback_t(_host_trampoline_call)
_host_finalize = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_host_finalize_call)


def define_host_function(
    linker: wasmtime.Linker, module: str, name: str, params: int, results: int, fn: Any
) -> None:
    """Define ``module.name`` taking ``params`` i32s and returning ``results`` (0 or 1) i32s:
    ``fn(caller, *args)``, each argument as an unsigned 32-bit int; it may raise HostTrap."""
    i32 = wasmtime.ValType.i32()
    ty = wasmtime.FuncType([i32] * params, [i32] * results)
    key = next(_host_ids)
    _HOST[key] = (fn, results)
    m, n = module.encode(), name.encode()
    error = ffi.wasmtime_linker_define_func(
        linker.ptr(),
        ctypes.create_string_buffer(m),
        len(m),
        ctypes.create_string_buffer(n),
        len(n),
        ty.ptr(),
        _host_trampoline,
        key,
        _host_finalize,
    )
    if error:
        _HOST.pop(key, None)
        raise wasmtime.WasmtimeError._from_ptr(error)
