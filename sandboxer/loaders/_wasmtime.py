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
slice, with no thread hand-off) and move a long call to a worker thread (see wasm.py).
"""

from __future__ import annotations

import ctypes
from typing import Any

import wasmtime
from wasmtime import _ffi as ffi

__all__ = [
    "lib", "call_async", "poll", "delete_future", "set_fuel", "fuel_async_yield_interval",
    "memory_data_size", "epoch_callback_type", "CONTINUE", "val_array", "trap_from",
    "error_from",
]

lib = ctypes.CDLL(ffi.dll._name)

# wasmtime_call_future_t *wasmtime_func_call_async(wasmtime_context_t *, const wasmtime_func_t *,
#     const wasmtime_val_t *args, size_t nargs, wasmtime_val_t *results, size_t nresults,
#     wasm_trap_t **trap_ret, wasmtime_error_t **error_ret)
call_async = lib.wasmtime_func_call_async
call_async.restype = ctypes.c_void_p
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
    ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ctypes.c_uint8))
CONTINUE = 0  # WASMTIME_UPDATE_DEADLINE_CONTINUE

_set_epoch_callback = lib.wasmtime_store_epoch_deadline_callback
_set_epoch_callback.restype = None
_set_epoch_callback.argtypes = [ctypes.c_void_p, epoch_callback_type, ctypes.c_void_p,
                                ctypes.c_void_p]
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
        array[i].kind = kind
    return array


def trap_from(address: int) -> wasmtime.Trap:
    """Take ownership of a ``wasm_trap_t*`` a call reported (freed with the object)."""
    return wasmtime.Trap._from_ptr(ctypes.cast(address, ctypes.POINTER(ffi.wasm_trap_t)))


def error_from(address: int) -> wasmtime.WasmtimeError:
    """Take ownership of a ``wasmtime_error_t*`` (an ``ExitTrap`` for WASI proc_exit)."""
    return wasmtime.WasmtimeError._from_ptr(
        ctypes.cast(address, ctypes.POINTER(ffi.wasmtime_error_t)))


def address(obj: Any) -> ctypes.c_void_p:
    """A ``c_void_p`` to a ctypes object, to pass on the hot path without conversion."""
    return ctypes.c_void_p(ctypes.addressof(obj))


def context(store: wasmtime.Store) -> ctypes.c_void_p:
    return ctypes.c_void_p(ctypes.cast(store._context(), ctypes.c_void_p).value)
