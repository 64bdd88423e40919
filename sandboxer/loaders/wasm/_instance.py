"""One wasm instance in its own Store: the plugin's limits, the epoch deadline that times its
calls, its exports bound for the hot path, and the calls themselves, started on the calling
thread and finished on a worker when they yield.

A Store is entered by one thread at a time; which thread is the pool's and the call path's
business, not this module's. The epoch callback is a ctypes callback and must never raise.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import wasmtime

from ...sandbox.policy import SandboxConfig
from . import _wasmtime as _wt
from ._abi import KINDS, signature
from ._engine import WasmEngine

__all__ = ["SLICE_FUEL", "Bound", "Store", "Instance", "running", "current_store"]

# How much a call may run on the event loop before it moves off it, in fuel (about one wasm
# instruction each): 5 million is roughly a millisecond here.
SLICE_FUEL = 5_000_000
TABLE_ELEMENTS = 100_000

_LIVE: dict[int, Store] = {}  # the stores the epoch callback may be asked about, by key
_keys = itertools.count(1)


def _on_epoch_call(_ctx: Any, data: int | None, delta: Any, kind: Any) -> int:
    """A store reached its epoch deadline (every tick while its wasm runs)."""
    try:
        delta[0] = 1
        kind[0] = _wt.CONTINUE
        store = _LIVE.get(data or 0)
        if store is None:
            return 0
        now = time.monotonic()
        if now >= store.deadline:
            store.timed_out = True
            return _wt.new_error("sandboxer: the call's deadline passed")
        return 0
    except BaseException:  # a ctypes callback must not raise
        return 0


_on_epoch = _wt.epoch_callback_type(_on_epoch_call)


_current = threading.local()  # .store: the Store whose wasm this thread is running


@contextlib.contextmanager
def running(store: Store) -> Iterator[None]:
    """Mark ``store`` as the one this thread runs (host functions find their deadline)."""
    previous = getattr(_current, "store", None)
    _current.store = store
    try:
        yield
    finally:
        _current.store = previous


def current_store() -> Store | None:
    """The store whose wasm this thread is running (under ``running``), if any."""
    return getattr(_current, "store", None)


@dataclasses.dataclass(slots=True)
class Bound:
    """One export bound to one store, with its value arrays ready for the hot path."""

    func: wasmtime.Func
    fptr: ctypes.c_void_p
    args: Any
    argsp: ctypes.c_void_p
    nargs: ctypes.c_size_t
    results: Any
    resultsp: ctypes.c_void_p
    nresults: ctypes.c_size_t
    kinds: tuple[int, ...]
    result_kinds: tuple[int, ...]
    arg: tuple[Any, ...] = ()  # each argument's value union, written in place
    result: tuple[Any, ...] = ()  # each result's value union

    def __post_init__(self) -> None:
        self.arg = tuple(self.args[i].of for i in range(len(self.kinds)))
        self.result = tuple(self.results[i].of for i in range(len(self.result_kinds)))


class Store:
    """A Store with the plugin's limits, its epoch callback and the state of its call."""

    def __init__(self, engine: WasmEngine, sandbox: SandboxConfig) -> None:
        self.engine = engine
        self.store = wasmtime.Store(engine.engine)
        self.store.set_limits(
            memory_size=sandbox.memory_limit,
            table_elements=TABLE_ELEMENTS,
            instances=1,
            tables=4,
            memories=1,
        )
        self.store.set_fuel(sandbox.fuel or (1 << 63) - 1)
        self.key = next(_keys)
        self.deadline = 0.0
        self.timed_out = False
        self.http_reply = b""  # the last http_request's response JSON, for http_response
        _LIVE[self.key] = self
        _wt.set_epoch_callback(self.store, _on_epoch, self.key)
        self.store.set_epoch_deadline(1)
        self.ctx = _wt.context(self.store)

    def arm(self, timeout: float) -> None:
        self.timed_out = False
        self.deadline = time.monotonic() + timeout

    def stop(self) -> None:
        """Let the wasm running in this store (if any) trap at the next tick."""
        self.deadline = 0.0

    def release(self) -> None:
        """Free the store now (not when Python collects it: a traceback a caller keeps may
        hold this object for long, and the store pins the module and its memory image)."""
        _LIVE.pop(self.key, None)
        self.store.close()


class Instance(Store):
    """A reactor-style instance: exports called as methods, many calls over its life.

    ``busy`` (lent to a call) changes through the pool; ``broken`` is set by whoever finds the
    instance unusable (a trap, a reply outside its memory), and the pool replaces it."""

    def __init__(self, engine: WasmEngine, sandbox: SandboxConfig) -> None:
        super().__init__(engine, sandbox)
        self.broken = False
        self.busy = False
        # Where a call reports its trap or error (read on the hot path; take_failure() takes
        # ownership of what they point to).
        self.trap_out = ctypes.c_void_p()
        self.error_out = ctypes.c_void_p()
        self.trapp = _wt.address(self.trap_out)
        self.errorp = _wt.address(self.error_out)
        self.fuel = ctypes.c_uint64(sandbox.fuel) if sandbox.fuel else None
        self.view = memoryview(b"")
        self.buffer = 0  # the argument buffer (from sandboxer_alloc), reused across calls
        self.capacity = 0

    def instantiate(
        self,
        module: wasmtime.Module,
        linker: wasmtime.Linker,
        wasi: wasmtime.WasiConfig | None,
        exports: Iterable[str],
        timeout: float,
    ) -> None:
        """Instantiate (running the module's start function) and bind ``exports``; blocking,
        bounded by ``timeout`` when the epoch ticker runs."""
        if wasi is not None:
            self.store.set_wasi(wasi)
        self.arm(timeout)
        self.instance = linker.instantiate(self.store, module)
        found = self.instance.exports(self.store)
        self.bound: dict[str, Bound] = {}
        for name in exports:
            func = found[name]
            if not isinstance(func, wasmtime.Func):  # Layout saw a function: not this module
                raise wasmtime.WasmtimeError(f"export {name} is not a function")
            params, results = signature(func.type(self.store))
            kinds = tuple(KINDS[p] for p in params)
            result_kinds = tuple(KINDS[r] for r in results)
            args, res = _wt.val_array(list(kinds)), _wt.val_array(list(result_kinds))
            self.bound[name] = Bound(
                func,
                _wt.func_address(func),
                args,
                _wt.address(args),
                ctypes.c_size_t(len(kinds)),
                res,
                _wt.address(res),
                ctypes.c_size_t(len(result_kinds)),
                kinds,
                result_kinds,
            )
        memory = found.get("memory") if "memory" in {e.name for e in module.exports} else None
        self.memory = memory if isinstance(memory, wasmtime.Memory) else None
        self.base = 0
        self.memp: ctypes.c_void_p | None = None
        if self.memory is not None:
            self.base = ctypes.addressof(self.memory.data_ptr(self.store).contents)
            self.memp = _wt.memory_address(self.memory)
        self.refresh()

    def memory_size(self) -> int:
        if self.memp is None:
            return 0
        return int(_wt.memory_data_size(self.ctx, self.memp))

    def refresh(self) -> int:
        """Re-read the memory's size after it may have grown; ``view`` covers all of it.

        The memory never moves (``memory_may_move`` is off) and never shrinks, so a view
        stays valid for the instance's life; it is dropped with the instance."""
        size = self.memory_size()
        if size != len(self.view):
            self.view = (
                memoryview((ctypes.c_ubyte * size).from_address(self.base)).cast("B")
                if size
                else memoryview(b"")
            )
        return size

    def use_buffer(self, ptr: int, capacity: int) -> None:
        """From now on, a call's JSON arguments go to ``ptr`` (from sandboxer_alloc, checked
        to lie inside the memory), up to ``capacity`` bytes."""
        self.buffer, self.capacity = ptr, capacity

    def put_json(self, bound: Bound, payload: bytes) -> None:
        """Write a call's JSON arguments into the argument buffer (``capacity`` holds them)
        and give ``bound`` their (ptr, len)."""
        start, n = self.buffer, len(payload)
        self.view[start : start + n] = payload
        bound.arg[0].i32 = start
        bound.arg[1].i32 = n

    # The hot path: start on the calling thread, finish on a worker if it yields.
    def start(self, bound: Bound, timeout: float) -> _wt.FuturePtr | None:
        """Start a call; None once it has finished, else the suspended future."""
        self.timed_out = False
        self.deadline = time.monotonic() + timeout
        if self.fuel is not None:
            _wt.set_fuel(self.ctx, self.fuel)
        future: _wt.FuturePtr = _wt.call_async(
            self.ctx,
            bound.fptr,
            bound.argsp,
            bound.nargs,
            bound.resultsp,
            bound.nresults,
            self.trapp,
            self.errorp,
        )
        if _wt.poll(future):
            _wt.delete_future(future)
            return None
        return future

    def slice_calls(self) -> None:
        """From now on an async call yields every SLICE_FUEL of fuel, so one that runs long
        can leave the event loop. The store then takes only async calls."""
        _wt.fuel_async_yield_interval(self.ctx, ctypes.c_uint64(SLICE_FUEL))

    def finish(self, future: _wt.FuturePtr) -> None:
        """Run a suspended call to its end (on a worker thread, under the epoch ticker)."""
        try:
            with self.engine.ticking(), running(self):
                while not _wt.poll(future):
                    pass
        finally:
            _wt.delete_future(future)

    def run(self, bound: Bound, timeout: float) -> None:
        """A whole call on this (worker) thread: for modules that may block in WASI."""
        with self.engine.ticking(), running(self):
            future = self.start(bound, timeout)
            if future is not None:
                self.finish(future)

    def take_failure(self) -> tuple[wasmtime.Trap | None, wasmtime.WasmtimeError | None]:
        trap = error = None
        if self.trap_out.value:
            trap = _wt.trap_from(self.trap_out.value)
            self.trap_out.value = None
        if self.error_out.value:
            error = _wt.error_from(self.error_out.value)
            self.error_out.value = None
        return trap, error

    def release(self) -> None:
        self.view = memoryview(b"")
        super().release()
