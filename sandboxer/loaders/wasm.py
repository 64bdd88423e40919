"""WebAssembly plugins, in the supervisor's process under wasmtime's limits (DESIGN 4 and 6).

One ``WasmEngine`` per manager holds the wasmtime Engine, the compiled modules (by content
digest, compiled once), one epoch ticker thread and the worker threads long calls move to.
Each plugin generation gets a pool of instances (``HostConfig.wasm_instances``, default 1),
each in its own Store with the plugin's limits: a Store is only ever entered by one thread at
a time, and calls of one plugin run in parallel only across instances.

How a call runs. Handing every call to a thread costs 60-90 µs, while a small wasm call takes
1-2 µs, so a call *starts* on the event loop as a wasmtime async call (its wasm runs on a
fiber) and yields after SLICE_FUEL of fuel, about a millisecond of wasm. A call that yields is
finished on a worker thread, so the event loop is never held long by one call and a quick
call never pays for a thread hop. Timeouts are epoch deadlines: while wasm runs off the loop
(a moved call, instantiation, a WASI command) one ticker thread advances the engine's epoch
every millisecond, and at each deadline the store's callback traps the call once its time is
up. The ticker sleeps while nothing runs off the loop: calls on the loop, bounded by their
slice, need no timer, and they do not compete with it for the GIL. Fuel, when metered, is
refilled per call. A module that can block in a host call (WASI's ``poll_oneoff``, or
``sandboxer.http_request``) runs every call on a worker instead; those host calls wait in
short steps and trap as the call's timeout once its deadline passes.

Files. Each allowed path is opened once, at load, beneath its path root and through no link
(``sandbox/paths.open_grant``), and that descriptor is kept for the generation's life. Every
WASI context preopens the directory *from the descriptor* (its ``/proc/self/fd`` link), never
by name again: a plugin (or a co-tenant) that renames a granted directory away and puts a link
in its place changes nothing a later instance or command run sees. Inside a preopen, wasmtime
resolves every guest path beneath that directory (openat2 ``RESOLVE_BENEATH``): a link that
leads out of it is refused, for reads and writes alike.

Network. A plugin has no sockets. ``sandboxer.http_request`` hands one HTTP(S) request to the
egress proxy's rules (sandbox/_egress_fetch.py: the plugin's allow-list, the proxy's resolver,
its log and counters) and keeps the response JSON for ``sandboxer.http_response`` to copy.

Failure semantics. A trap (including a timeout, fuel exhaustion, a stack overflow or a WASI
``proc_exit`` outside a command) ends the call with an error, and the instance that trapped is
discarded: its memory may be half-updated. The next call gets a fresh instance, initialised
again with ``init(config)``; whatever state the old instance held is lost. A plugin that must
not lose state across traps keeps it where a reload can migrate it (export_state).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import gc
import itertools
import os
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import orjson
import wasmtime
from wasmtime import _ffi as ffi

from .. import _json
from ..errors import (
    CallTimeout,
    CpuLimitExceeded,
    MemoryLimitExceeded,
    MethodNotFound,
    PluginCallError,
    PluginLoadError,
    PluginStateError,
    SandboxerError,
    SandboxUnavailable,
)
from ..manifest import LoaderType, Plugin
from ..sandbox.egress import AllowList, EgressProxy, network_mode
from ..sandbox.idmap import FALLBACK as IDMAP_FALLBACK
from ..sandbox.idmap import owned_tree
from ..sandbox.paths import OpenedPath, open_grant
from ..sandbox.policy import SandboxConfig
from ..sandbox.child import LineLog
from . import NO_STATE, Health, NoState, ResourceUsage, not_implemented
from . import _wasmtime as _wt

__all__ = ["WasmEngine", "WasmLoader", "WasmHandle", "WASM_MAGIC"]

WASM_MAGIC = b"\0asm"
TICK = 0.001          # the epoch ticker's period
# How much a call may run on the event loop before it moves off it, in fuel (about one wasm
# instruction each): 5 million is roughly a millisecond here.
SLICE_FUEL = 5_000_000
MAX_WASM_STACK = 512 << 10
TABLE_ELEMENTS = 100_000
LOG_MESSAGE_MAX = 64 << 10
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
LIFECYCLE = ("init", "health_check", "shutdown", "export_state", "import_state")
_SPECIAL = {"sandboxer_alloc", "sandboxer_free", "_start", "_initialize", *LIFECYCLE}

_I32, _I64, _F32, _F64 = 0, 1, 2, 3  # wasmtime_valkind_t
_KINDS = {"i32": _I32, "i64": _I64, "f32": _F32, "f64": _F64}
_FIELDS = {_I32: "i32", _I64: "i64", _F32: "f32", _F64: "f64"}
_RANGES = {_I32: (-(1 << 31), 1 << 32), _I64: (-(1 << 63), 1 << 64)}
# What the ``sandboxer`` import module provides, with each function's signature.
HOST_FUNCTIONS = {
    "log": (("i32", "i32", "i32"), ()),
    "config_get": (("i32", "i32", "i32", "i32"), ("i32",)),
    "http_request": (("i32", "i32"), ("i32",)),
    "http_response": (("i32", "i32"), ("i32",)),
}
# The request JSON http_request reads: the body (max_frame bytes, base64 inflating it by a
# third) plus room for the URL and headers.
HTTP_REQUEST_OVERHEAD = 64 << 10
WASI_MODULE = "wasi_snapshot_preview1"


def _signature(ty: wasmtime.FuncType) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(str(t) for t in ty.params), tuple(str(t) for t in ty.results)


def _show(sig: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
    params, results = sig
    return f"({', '.join(params)}) -> ({', '.join(results)})"


JSON_SIGNATURE = (("i32", "i32"), ("i64",))


# -- the engine ------------------------------------------------------------------------------
class WasmEngine:
    """The manager's one wasmtime Engine, module cache, epoch ticker and worker threads."""

    def __init__(self, *, workers: int = 32) -> None:
        config = wasmtime.Config()
        config.epoch_interruption = True
        config.consume_fuel = True       # metered per store; unmetered stores get 2**63-1
        config.max_wasm_stack = MAX_WASM_STACK
        config.memory_may_move = False   # memory base addresses stay put: cached per instance
        config.wasm_memory64 = False     # limits and the JSON ABI are 32-bit
        config.wasm_threads = False
        config.wasm_simd = False         # v128 values cannot cross wasmtime's C API: refuse them
        config.wasm_relaxed_simd = False
        config.parallel_compilation = False
        self.engine = wasmtime.Engine(config)
        self._modules: dict[str, list[Any]] = {}  # digest -> [module, plugins using it]
        self._compile_lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=workers,
                                           thread_name_prefix="sandboxer-wasm")
        self._closing = False
        self._running = 0  # wasm runs off the event loop right now (calls, instantiation)
        self._wake = threading.Condition()
        self._ticker: threading.Thread | None = None
        # WASI output callbacks still held by wasmtime (see close)
        self.sinks: weakref.WeakSet[Callable[[bytes], int]] = weakref.WeakSet()

    def module(self, data: bytes, digest: str) -> wasmtime.Module:
        """The compiled module for ``data`` (sha256 ``digest``), compiled once and shared
        while any plugin holds it; each call must be paired with ``release``. Blocking."""
        with self._compile_lock:
            entry = self._modules.get(digest)
            if entry is None:
                entry = self._modules[digest] = [wasmtime.Module(self.engine, data), 0]
            entry[1] += 1
            return entry[0]

    def release(self, digest: str) -> None:
        with self._compile_lock:
            entry = self._modules.get(digest)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._modules[digest]
                    entry[0].close()

    @contextlib.contextmanager
    def ticking(self) -> Iterator[None]:
        """Advance the epoch while the block runs: wasm off the event loop is timed by it.

        One ticker thread for the engine, asleep while nothing runs off the loop, so quick
        calls on the loop never compete with it for the GIL."""
        with self._wake:
            if self._ticker is None and not self._closing:
                self._ticker = threading.Thread(target=self._tick, daemon=True,
                                                name="sandboxer-wasm-epoch")
                self._ticker.start()
            self._running += 1
            self._wake.notify()
        try:
            yield
        finally:
            with self._wake:
                self._running -= 1

    def _tick(self) -> None:
        engine, wake = self.engine, self._wake
        while True:
            with wake:
                while not self._running and not self._closing:
                    wake.wait()
                if self._closing:
                    return
            engine.increment_epoch()
            time.sleep(TICK)

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
            ticker = self._ticker
        if ticker is not None:
            ticker.join()
        self.executor.shutdown(wait=True, cancel_futures=True)
        for module, _ in self._modules.values():
            module.close()
        self._modules.clear()
        # wasmtime releases a closed store's WASI output callbacks a moment later, on its own
        # runtime thread, calling into Python to do so; if the interpreter is shutting down by
        # then, that thread cannot take the GIL and the process aborts. Wait for them here.
        gc.collect()
        give_up = time.monotonic() + 2.0
        while len(self.sinks) and time.monotonic() < give_up:
            time.sleep(0.005)


# -- one instance in its own store ------------------------------------------------------------
_LIVE: dict[int, "_Store"] = {}
_keys = itertools.count(1)


@_wt.epoch_callback_type
def _on_epoch(_ctx: Any, data: int | None, delta: Any, kind: Any) -> int:
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


_current = threading.local()  # .store: the _Store whose wasm this thread is running


@contextlib.contextmanager
def _running(store: "_Store") -> Iterator[None]:
    """Mark ``store`` as the one this thread runs (host functions find their deadline)."""
    previous = getattr(_current, "store", None)
    _current.store = store
    try:
        yield
    finally:
        _current.store = previous


_CLOCK, _FD_READ, _FD_WRITE = 0, 1, 2
_ABSTIME = 1
_ENOTSUP, _EINVAL = 58, 28
_SLEEP_STEP = 0.05


def _poll_oneoff(caller: wasmtime.Caller, in_ptr: int, out_ptr: int, count: int,
                 nevents_ptr: int) -> int:
    """WASI ``poll_oneoff`` that honours the call's deadline: the one WASI call that blocks.

    Clock subscriptions sleep, in steps, until the earliest expires or the call's deadline
    passes (then the call traps and is reported as its timeout). A plugin has no sockets and
    stdin is a fixed buffer, so an fd subscription is answered at once: ready (stdin, at EOF
    or not) or ENOTSUP."""
    memory = caller.get("memory")
    store = getattr(_current, "store", None)
    if not isinstance(memory, wasmtime.Memory) or store is None:
        return _EINVAL
    count &= 0xFFFF_FFFF
    in_ptr &= 0xFFFF_FFFF
    out_ptr &= 0xFFFF_FFFF
    nevents_ptr &= 0xFFFF_FFFF
    size = memory.data_len(caller)
    if (count == 0 or in_ptr + 48 * count > size or out_ptr + 32 * count > size
            or nevents_ptr + 4 > size):
        return _EINVAL
    subs = bytes(memory.read(caller, in_ptr, in_ptr + 48 * count))
    events: list[bytes] = []
    wake: list[tuple[float, bytes]] = []
    now_mono, now_real = time.monotonic(), time.time()
    for i in range(count):
        sub = subs[48 * i:48 * (i + 1)]
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
            error = 0 if (tag == _FD_READ and fd == 0) or (tag == _FD_WRITE and fd in (1, 2)) \
                else _ENOTSUP
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
        events = [userdata + bytes(2) + bytes([_CLOCK]) + bytes(21)
                  for at, userdata in wake if at <= now]
    memory.write(caller, b"".join(events), out_ptr)
    memory.write(caller, len(events).to_bytes(4, "little"), nevents_ptr)
    return 0


class _Ptr(ctypes.c_void_p):
    """Returned as is by ctypes (a plain c_void_p restype would become an int)."""


_wt.call_async.restype = _Ptr


@dataclasses.dataclass(slots=True)
class _Bound:
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
    arg: tuple[Any, ...] = ()      # each argument's value union, written in place
    result: tuple[Any, ...] = ()   # each result's value union

    def __post_init__(self) -> None:
        self.arg = tuple(self.args[i].of for i in range(len(self.kinds)))
        self.result = tuple(self.results[i].of for i in range(len(self.result_kinds)))


class _Store:
    """A Store with the plugin's limits, its epoch callback and the state of its call."""

    def __init__(self, engine: WasmEngine, sandbox: SandboxConfig) -> None:
        self.engine = engine
        self.store = wasmtime.Store(engine.engine)
        self.store.set_limits(memory_size=sandbox.memory_limit, table_elements=TABLE_ELEMENTS,
                              instances=1, tables=4, memories=1)
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

    def release(self) -> None:
        """Free the store now (not when Python collects it: a traceback a caller keeps may
        hold this object for long, and the store pins the module and its memory image)."""
        _LIVE.pop(self.key, None)
        self.view = memoryview(b"")
        self.store.close()


class _Instance(_Store):
    """A reactor-style instance: exports called as methods, many calls over its life."""

    def __init__(self, engine: WasmEngine, sandbox: SandboxConfig) -> None:
        super().__init__(engine, sandbox)
        self.broken = False
        self.busy = False
        self._trap = ctypes.c_void_p()
        self._error = ctypes.c_void_p()
        self.trapp = _wt.address(self._trap)
        self.errorp = _wt.address(self._error)
        self.fuel = ctypes.c_uint64(sandbox.fuel) if sandbox.fuel else None
        self.view = memoryview(b"")
        self.buffer = 0     # the argument buffer (from sandboxer_alloc), reused across calls
        self.capacity = 0

    def instantiate(self, module: wasmtime.Module, linker: wasmtime.Linker,
                    wasi: wasmtime.WasiConfig | None, exports: Iterable[str],
                    timeout: float) -> None:
        """Instantiate (running the module's start function) and bind ``exports``; blocking,
        bounded by ``timeout`` when the epoch ticker runs."""
        if wasi is not None:
            self.store.set_wasi(wasi)
        self.arm(timeout)
        self.instance = linker.instantiate(self.store, module)
        found = self.instance.exports(self.store)
        self.bound: dict[str, _Bound] = {}
        for name in exports:
            func = found[name]
            assert isinstance(func, wasmtime.Func)
            params, results = _signature(func.type(self.store))
            kinds = tuple(_KINDS[p] for p in params)
            result_kinds = tuple(_KINDS[r] for r in results)
            args, res = _wt.val_array(list(kinds)), _wt.val_array(list(result_kinds))
            self.bound[name] = _Bound(func, _wt.address(func._func), args, _wt.address(args),
                                      ctypes.c_size_t(len(kinds)), res, _wt.address(res),
                                      ctypes.c_size_t(len(result_kinds)), kinds, result_kinds)
        memory = found.get("memory") if "memory" in {e.name for e in module.exports} else None
        self.memory = memory if isinstance(memory, wasmtime.Memory) else None
        self.base = 0
        self.memp: ctypes.c_void_p | None = None
        if self.memory is not None:
            self.base = ctypes.addressof(self.memory.data_ptr(self.store).contents)
            self.memp = _wt.address(self.memory._memory)
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
            self.view = memoryview((ctypes.c_ubyte * size).from_address(self.base)).cast("B") \
                if size else memoryview(b"")
        return size

    # The hot path: start on the calling thread, finish on a worker if it yields.
    def start(self, bound: _Bound, timeout: float) -> _Ptr | None:
        """Start a call; None once it has finished, else the suspended future."""
        self.timed_out = False
        self.deadline = time.monotonic() + timeout
        if self.fuel is not None:
            _wt.set_fuel(self.ctx, self.fuel)
        future = _wt.call_async(self.ctx, bound.fptr, bound.argsp, bound.nargs,
                                bound.resultsp, bound.nresults, self.trapp, self.errorp)
        if _wt.poll(future):
            _wt.delete_future(future)
            return None
        return future

    def slice_calls(self) -> None:
        """From now on an async call yields every SLICE_FUEL of fuel, so one that runs long
        can leave the event loop. The store then takes only async calls."""
        _wt.fuel_async_yield_interval(self.ctx, ctypes.c_uint64(SLICE_FUEL))

    def finish(self, future: _Ptr) -> None:
        """Run a suspended call to its end (on a worker thread, under the epoch ticker)."""
        try:
            with self.engine.ticking(), _running(self):
                while not _wt.poll(future):
                    pass
        finally:
            _wt.delete_future(future)

    def run(self, bound: _Bound, timeout: float) -> None:
        """A whole call on this (worker) thread: for modules that may block in WASI."""
        with self.engine.ticking(), _running(self):
            future = self.start(bound, timeout)
            if future is not None:
                self.finish(future)

    def take_failure(self) -> tuple[wasmtime.Trap | None, wasmtime.WasmtimeError | None]:
        trap = error = None
        if self._trap.value:
            trap = _wt.trap_from(self._trap.value)
            self._trap.value = None
        if self._error.value:
            error = _wt.error_from(self._error.value)
            self._error.value = None
        return trap, error


# -- the handle --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class _Method:
    name: str
    json: bool
    params: tuple[int, ...] = ()
    results: tuple[int, ...] = ()


class _Layout:
    """What a module offers, checked against what sandboxer provides; raises PluginLoadError."""

    def __init__(self, plugin: Plugin, module: wasmtime.Module) -> None:
        pid = plugin.id

        def refuse(message: str) -> PluginLoadError:
            return PluginLoadError(f"plugin {pid}: {message}", plugin_id=pid)

        self.uses_wasi = False
        # imports WASI's poll_oneoff, which can sleep, or http_request, which waits on the
        # network: either would hold the event loop
        self.blocks = False
        for imp in module.imports:
            where = f"{imp.module}.{imp.name}"
            if imp.module == WASI_MODULE and isinstance(imp.type, wasmtime.FuncType):
                self.uses_wasi = True
                self.blocks = self.blocks or imp.name == "poll_oneoff"
                continue
            if imp.module == "sandboxer" and imp.name in HOST_FUNCTIONS:
                self.blocks = self.blocks or imp.name == "http_request"
                if not isinstance(imp.type, wasmtime.FuncType):
                    raise refuse(f"imports {where} as something other than a function")
                want = HOST_FUNCTIONS[imp.name]
                if _signature(imp.type) != want:
                    raise refuse(f"imports {where} with signature {_show(_signature(imp.type))}"
                                 f"; sandboxer provides it as {_show(want)}")
                continue
            provided = ", ".join(f"sandboxer.{n}" for n in HOST_FUNCTIONS)
            raise refuse(f"imports {where}, which sandboxer does not provide (a wasm plugin "
                         f"may import {WASI_MODULE} functions and {provided})")

        funcs: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        has_memory = False
        for exp in module.exports:
            if isinstance(exp.type, wasmtime.FuncType):
                funcs[exp.name] = _signature(exp.type)
            elif exp.name == "memory" and isinstance(exp.type, wasmtime.MemoryType):
                has_memory = True

        def expect(name: str, sig: tuple[tuple[str, ...], tuple[str, ...]]) -> bool:
            if name not in funcs:
                return False
            if funcs[name] != sig:
                raise refuse(f"export {name} has signature {_show(funcs[name])}; sandboxer "
                             f"calls it as {_show(sig)}")
            return True

        self.command = expect("_start", ((), ()))
        self.initialize = expect("_initialize", ((), ()))
        self.alloc = expect("sandboxer_alloc", (("i32",), ("i32",)))
        self.free = expect("sandboxer_free", (("i32", "i32"), ()))
        json_abi = self.alloc and has_memory
        if self.alloc and not has_memory:
            raise refuse("exports sandboxer_alloc but no memory named \"memory\"; the JSON ABI "
                         "needs both")
        self.lifecycle: set[str] = set()
        for name in LIFECYCLE:
            if name in funcs:
                if not json_abi:
                    raise refuse(f"exports {name} but not the JSON ABI (memory and "
                                 "sandboxer_alloc) that lifecycle calls use")
                expect(name, JSON_SIGNATURE)
                self.lifecycle.add(name)
        if ("export_state" in self.lifecycle) != ("import_state" in self.lifecycle):
            missing = "import_state" if "export_state" in self.lifecycle else "export_state"
            raise refuse(f"exports only one of export_state/import_state (add {missing})")

        self.methods: dict[str, _Method] = {}
        if self.command:
            for name in plugin.methods or ():
                self.methods[name] = _Method(name, json=True)
            return
        usable: dict[str, _Method] = {}
        unusable: dict[str, str] = {}
        for name, sig in funcs.items():
            if name in _SPECIAL:
                continue
            params, results = sig
            if json_abi and sig == JSON_SIGNATURE:
                usable[name] = _Method(name, json=True)
            elif all(t in _KINDS for t in params + results):
                usable[name] = _Method(name, json=False,
                                       params=tuple(_KINDS[t] for t in params),
                                       results=tuple(_KINDS[t] for t in results))
            else:
                unusable[name] = _show(sig)
        if plugin.methods is not None:
            for name in plugin.methods:
                if name in unusable:
                    raise refuse(f"method {name} has signature {unusable[name]}, which is "
                                 "neither numeric nor the JSON ABI (i32, i32) -> (i64)")
                if name not in usable:
                    raise refuse(f"the manifest lists method {name}, which the module does "
                                 "not export")
            usable = {n: m for n, m in usable.items() if n in plugin.methods}
        self.methods = usable


class WasmHandle:
    """One generation of a wasm plugin: its instance pool (or, for a WASI command, a runner)."""

    def __init__(self, plugin: Plugin, sandbox: SandboxConfig, engine: WasmEngine,
                 module: wasmtime.Module, digest: str, layout: _Layout, *, pool_size: int,
                 egress: EgressProxy, grants: tuple[OpenedPath, ...] = ()) -> None:
        self.plugin = plugin
        # The allowed paths, each opened once at load (WasmLoader.start): owned by this handle
        # from here on, preopened from their descriptors, closed once when it closes. The
        # lock keeps close() from freeing a descriptor number while a WASI context is being
        # built from its /proc/self/fd link on a worker thread.
        self._grants = grants
        self._grants_lock = threading.Lock()
        # The host policy's fallbacks this generation runs under ("rw-without-idmap": a
        # writable grant WASI writes as the supervisor's own uid).
        self.fallbacks: tuple[str, ...] = ()
        self._digest = digest
        self._sandbox = sandbox
        self._engine = engine
        self._module = module
        self._layout = layout
        # Calls start on the event loop unless the module can block (WASI's poll_oneoff: a
        # sleep; sandboxer.http_request: the network), which would hold the loop: then every
        # call runs on a worker.
        self._inline = not layout.blocks
        # http_request: the egress proxy's rules for this plugin (None: no network at all).
        self._egress = egress
        mode = network_mode(sandbox)
        self._allow: AllowList | None = (
            None if mode == "none" else AllowList(sandbox.allowed_hosts) if mode == "proxy"
            else AllowList.everything())
        if self._allow is not None:
            self._egress.counters(plugin.id)  # zeros from the start, like a proxied process
        self._pool_size = pool_size
        self._methods = layout.methods
        self._config: dict[str, Any] = dict(plugin.config)
        self._config_json: dict[str, bytes] = {}
        self._log = logging.getLogger(f"sandboxer.plugin.{plugin.id}")
        self._linker = self._make_linker()
        self._instances: list[_Instance] = []
        self._idle: list[_Instance] = []
        self._waiters: collections.deque[asyncio.Future[_Instance]] = collections.deque()
        self._offloop: set[asyncio.Future[Any]] = set()
        self._commands: set[_Store] = set()  # stores of WASI command runs in progress
        self._failure_callbacks: list[Callable[[SandboxerError], None]] = []
        self._closed = False
        self._failed: SandboxerError | None = None
        self._peak = 0
        self._slots = asyncio.Semaphore(pool_size)  # command modules: runs at once
        self._loop = asyncio.get_running_loop()
        self._executor = engine.executor
        self._timeout = sandbox.timeout
        self._max_output = 16 << 20

    # -- setup ---------------------------------------------------------------------------------
    def _make_linker(self) -> wasmtime.Linker:
        """The imports this plugin may use. The host functions reach the handle through a
        weak reference: wasmtime-py keeps them in a global table while the linker lives, and
        a strong one would keep every unloaded generation alive."""
        linker = wasmtime.Linker(self._engine.engine)
        if self._layout.uses_wasi:
            linker.define_wasi()
            linker.allow_shadowing = True
            _wt.define_host_function(linker, WASI_MODULE, "poll_oneoff", 4, 1, _poll_oneoff)
            linker.allow_shadowing = False
        handle = weakref.ref(self)

        def log(caller: wasmtime.Caller, level: int, ptr: int, length: int) -> None:
            me = handle()
            if me is not None:
                me._host_log(caller, level, ptr, length)

        def config_get(caller: wasmtime.Caller, key_ptr: int, key_len: int, buf_ptr: int,
                       buf_cap: int) -> int:
            me = handle()
            return -1 if me is None else me._host_config_get(caller, key_ptr, key_len,
                                                             buf_ptr, buf_cap)

        def http_request(caller: wasmtime.Caller, ptr: int, length: int) -> int:
            me = handle()
            if me is None:
                raise _wt.HostTrap("sandboxer.http_request: the plugin is unloaded")
            return me._host_http_request(caller, ptr, length)

        def http_response(caller: wasmtime.Caller, ptr: int, cap: int) -> int:
            me = handle()
            return 0 if me is None else me._host_http_response(caller, ptr, cap)

        _wt.define_host_function(linker, "sandboxer", "log", 3, 0, log)
        _wt.define_host_function(linker, "sandboxer", "config_get", 4, 1, config_get)
        _wt.define_host_function(linker, "sandboxer", "http_request", 2, 1, http_request)
        _wt.define_host_function(linker, "sandboxer", "http_response", 2, 1, http_response)
        return linker

    def _wasi(self, *, argv: list[str], stdin: bytes | None,
              stdout: Callable[[bytes], Any], stderr: Callable[[bytes], Any]
              ) -> wasmtime.WasiConfig | None:
        if not self._layout.uses_wasi:
            return None
        wasi = wasmtime.WasiConfig()
        wasi.argv = argv
        wasi.env = []
        if stdin is not None:
            vec = ffi.wasm_byte_vec_t()
            buf = (ctypes.c_uint8 * len(stdin)).from_buffer_copy(stdin)
            ffi.wasm_byte_vec_new(ctypes.byref(vec), len(stdin), buf)
            ffi.wasi_config_set_stdin_bytes(wasi.ptr(), ctypes.byref(vec))  # takes the vec
        wasi.stdout_custom = stdout
        wasi.stderr_custom = stderr
        self._engine.sinks.update((stdout, stderr))
        self._preopen(wasi)
        return wasi

    def _preopen(self, wasi: wasmtime.WasiConfig) -> None:
        """Give ``wasi`` each allowed path, from the descriptor opened at load.

        wasmtime opens the host path it is given at once, here (one ``openat`` of
        ``/proc/self/fd/N``, which the kernel resolves to the directory the descriptor holds,
        whatever has become of its name), and resolves every guest path beneath what it
        opened. The guest sees the grant at the path as written."""
        pid = self.plugin.id
        with self._grants_lock:
            for grant in self._grants:
                if grant.fd < 0:
                    raise self._closed_error()
                try:
                    wasi.preopen_dir(grant.proc_path, grant.path, fs_mutable=grant.writable)
                except wasmtime.WasmtimeError:
                    raise PluginLoadError(
                        f"plugin {pid}: allowed path {grant.path} could not be preopened from "
                        f"its descriptor ({grant.proc_path}, {grant.host_path}); is /proc "
                        "mounted in the supervisor?", plugin_id=pid) from None

    def _close_grants(self) -> None:
        with self._grants_lock:
            for grant in self._grants:
                grant.close()

    def _line_sink(self, name: str) -> Callable[[bytes], int]:
        lines = LineLog(name=name, logger=self._log,
                        level=logging.INFO if name == "stdout" else logging.WARNING)

        def sink(data: bytes) -> int:
            lines.feed(data)
            return len(data)
        return sink

    def _new_instance(self) -> _Instance:
        """Instantiate one pool member (blocking: run off the loop)."""
        wasi = self._wasi(argv=[self.plugin.id], stdin=None, stdout=self._line_sink("stdout"),
                          stderr=self._line_sink("stderr"))
        names = set(self._methods) | self._layout.lifecycle
        if self._layout.alloc:
            names.add("sandboxer_alloc")
        if self._layout.initialize:
            names.add("_initialize")
        inst = _Instance(self._engine, self._sandbox)
        step = "could not be instantiated"
        detail = ""
        try:
            with self._engine.ticking(), _running(inst):
                inst.instantiate(self._module, self._linker, wasi, sorted(names), self._timeout)
                if self._layout.initialize:
                    step = "_initialize failed"
                    inst.arm(self._timeout)
                    inst.bound["_initialize"].func(inst.store)
            if self._inline:
                inst.slice_calls()
            return inst
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            # Only the text leaves this block: the trap's backtrace pins the module.
            detail = _first_line(exc)
        except BaseException:
            inst.release()
            raise
        inst.release()
        if inst.timed_out:
            detail = f"it did not finish within {self._timeout:g}s (start function or " \
                     "_initialize)"
        raise PluginLoadError(f"plugin {self.plugin.id}: {step}: {detail}",
                              plugin_id=self.plugin.id)

    async def start(self) -> None:
        if self._layout.command:
            return
        try:
            for _ in range(self._pool_size):
                inst = await self._loop.run_in_executor(self._executor, self._new_instance)
                self._instances.append(inst)
                self._idle.append(inst)
        except BaseException:
            await self.close()
            raise

    # -- the pool (event loop thread only) ------------------------------------------------------
    async def _acquire(self) -> _Instance:
        if self._closed:
            raise self._closed_error()
        if self._idle:
            inst = self._idle.pop()
        else:
            waiter: asyncio.Future[_Instance] = self._loop.create_future()
            self._waiters.append(waiter)
            inst = await waiter
        inst.busy = True
        if inst.broken:
            inst = await self._replace(inst)
        return inst

    def _release(self, inst: _Instance) -> None:
        inst.busy = False
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(inst)
                return
        self._idle.append(inst)

    async def _replace(self, old: _Instance) -> _Instance:
        """A fresh instance for one that trapped, initialised again with the same config.

        On failure the broken instance goes back to the pool (a later call tries again) and,
        when the plugin itself is at fault, the plugin fails."""
        index = self._instances.index(old)
        old.release()
        work = self._loop.run_in_executor(self._executor, self._new_instance)
        try:
            new = await asyncio.shield(work)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                work.add_done_callback(
                    lambda f: f.cancelled() or f.exception() or f.result().release())
            self._release(old)
            if isinstance(exc, SandboxerError):
                self._fail(exc)
            raise
        self._instances[index] = new
        new.busy = True
        if "init" in self._layout.lifecycle:
            try:
                await self._json_call(new, "init", [self._config])
            except BaseException as exc:
                if not_implemented(exc):
                    return new  # it has no init to run, as at load
                new.broken = True
                if new.busy:
                    self._release(new)
                if not isinstance(exc, SandboxerError):
                    raise
                error = PluginLoadError(f"plugin {self.plugin.id}: could not replace an "
                                        f"instance that trapped: init failed: {exc}",
                                        plugin_id=self.plugin.id)
                self._fail(error)
                raise error from exc
        return new

    def _fail(self, error: SandboxerError) -> None:
        if self._failed is None and not self._closed:
            self._failed = error
            for callback in self._failure_callbacks:
                callback(error)

    def _closed_error(self) -> PluginStateError:
        return PluginStateError(f"plugin {self.plugin.id}: this generation is closed",
                                plugin_id=self.plugin.id)

    # -- calls -----------------------------------------------------------------------------------
    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(sorted(self._methods))

    @property
    def has_state(self) -> bool:
        return {"export_state", "import_state"} <= self._layout.lifecycle

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        m = self._methods.get(method)
        if m is None:
            if self._layout.command and self.plugin.methods is None and method not in LIFECYCLE:
                return await self._command(method, args, self._timeout if timeout is None
                                           else timeout)
            raise MethodNotFound(
                f"plugin {self.plugin.id} has no method {method!r} "
                f"(methods: {', '.join(self.methods) or 'none'})",
                plugin_id=self.plugin.id, method=method, available=list(self.methods))
        if timeout is None:
            timeout = self._timeout
        if self._layout.command:
            return await self._command(method, args, timeout)
        # The hot path: take an idle instance without awaiting when there is one.
        idle = self._idle
        if idle and not idle[-1].broken and not self._closed:
            inst = idle.pop()
            inst.busy = True
        else:
            inst = await self._acquire()
        try:
            bound = inst.bound[method]
            if m.json:
                payload = self._encode(method, args)
                n = len(payload)
                if n > inst.capacity:
                    await self._grow(inst, n, method, timeout)
                start = inst.buffer
                inst.view[start:start + n] = payload
                bound.arg[0].i32 = start
                bound.arg[1].i32 = n
            else:
                self._put_numbers(bound, m, method, args)
            future = inst.start(bound, timeout) if self._inline else None
            if future is not None or not self._inline:
                await self._complete(inst, bound, future, timeout)
            if inst._trap.value or inst._error.value:
                raise self._call_failure(inst, method, timeout)
            if m.json:
                return self._json_result(inst, bound, method)
            return self._get_numbers(bound, m)
        finally:
            if inst.busy:
                self._release(inst)

    def _encode(self, method: str, args: Any) -> bytes:
        try:
            return orjson.dumps(args, default=_json._default, option=orjson.OPT_NON_STR_KEYS)
        except TypeError as exc:
            raise PluginCallError(f"plugin {self.plugin.id}: arguments of {method} are not "
                                  f"JSON values: {exc}", code=INVALID_PARAMS,
                                  plugin_id=self.plugin.id, method=method) from None

    def _put_numbers(self, bound: _Bound, m: _Method, method: str, args: tuple[Any, ...]
                     ) -> None:
        if len(args) != len(m.params):
            raise PluginCallError(
                f"plugin {self.plugin.id}: {method} takes {len(m.params)} numeric "
                f"argument(s), got {len(args)}", code=INVALID_PARAMS,
                plugin_id=self.plugin.id, method=method)
        for i, kind in enumerate(m.params):
            value = args[i]
            if kind == _I32 or kind == _I64:
                lo, hi = _RANGES[kind]
                if type(value) is not int or not lo <= value < hi:
                    raise self._bad_number(method, i, value, kind)
                if kind == _I32:
                    bound.arg[i].i32 = value - (1 << 32) if value >= 1 << 31 else value
                else:
                    bound.arg[i].i64 = value - (1 << 64) if value >= 1 << 63 else value
            else:
                if type(value) not in (int, float):
                    raise self._bad_number(method, i, value, kind)
                try:
                    setattr(bound.arg[i], _FIELDS[kind], float(value))
                except OverflowError:
                    raise self._bad_number(method, i, value, kind) from None

    @staticmethod
    def _get_numbers(bound: _Bound, m: _Method) -> Any:
        kinds = m.results
        if len(kinds) == 1:
            return getattr(bound.result[0], _FIELDS[kinds[0]])
        if not kinds:
            return None
        return [getattr(bound.result[i], _FIELDS[k]) for i, k in enumerate(kinds)]

    def _bad_number(self, method: str, index: int, value: Any, kind: int) -> PluginCallError:
        name = _FIELDS[kind]
        expected = "an integer in range" if kind in _RANGES else "a number"
        return PluginCallError(
            f"plugin {self.plugin.id}: argument {index + 1} of {method} must be {expected} "
            f"for {name}, not {value!r}", code=INVALID_PARAMS, plugin_id=self.plugin.id,
            method=method)

    async def _off_loop(self, inst: _Instance, work_fn: Callable[..., None], *args: Any
                        ) -> None:
        """Run ``work_fn(*args)`` (finish a suspended call, or make a whole one) on a worker
        thread; the loop waits without blocking."""
        work = self._loop.run_in_executor(self._executor, work_fn, *args)
        self._offloop.add(work)
        work.add_done_callback(self._offloop.discard)
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            # The caller gave up: stop the wasm at the next tick and keep the instance out of
            # the pool until its thread is done with it; it is discarded, not reused.
            inst.deadline = 0.0
            inst.broken = True
            work.add_done_callback(lambda _: self._after_abandon(inst))
            inst.busy = False
            raise

    def _after_abandon(self, inst: _Instance) -> None:
        inst.take_failure()
        if not self._closed:
            self._release(inst)

    def _call_failure(self, inst: _Instance, method: str, timeout: float) -> SandboxerError:
        """The error for a call that trapped; the instance is marked for replacement."""
        trap, error = inst.take_failure()
        inst.broken = True
        pid = self.plugin.id
        code = trap.trap_code if trap is not None else None
        size = inst.memory_size()
        self._peak = max(self._peak, size)
        if inst.timed_out and self._closed:
            return PluginStateError(f"plugin {pid}: unloaded while {method} was in flight (it "
                                    "outlived the drain timeout)", plugin_id=pid)
        if inst.timed_out:
            return CallTimeout(f"plugin {pid}: {method} did not finish within {timeout:g}s",
                               timeout=timeout, plugin_id=pid, method=method)
        if code is wasmtime.TrapCode.OUT_OF_FUEL:
            return CpuLimitExceeded(f"plugin {pid}: {method} used up its fuel "
                                    f"({self._sandbox.fuel} per call)", plugin_id=pid)
        if code is wasmtime.TrapCode.STACK_OVERFLOW:
            return PluginCallError(f"plugin {pid}: {method} trapped: stack overflow (deep "
                                   f"recursion; the wasm stack is {MAX_WASM_STACK >> 10} KiB)",
                                   code=INTERNAL_ERROR, plugin_id=pid, method=method,
                                   data={"trap": "stack_overflow"})
        limit = self._sandbox.memory_limit
        if size + (64 << 10) > limit:
            return MemoryLimitExceeded(
                f"plugin {pid}: {method} failed at its memory limit ({limit} bytes; linear "
                f"memory {size} bytes): {_first_line(trap or error)}",
                limit=limit, peak=size, plugin_id=pid)
        if isinstance(error, wasmtime.ExitTrap):
            return PluginCallError(f"plugin {pid}: {method} called proc_exit({error.code})",
                                   code=INTERNAL_ERROR, plugin_id=pid, method=method,
                                   data={"exit_status": error.code})
        detail = _first_line(trap or error)
        return PluginCallError(f"plugin {pid}: {method} trapped: {detail}", code=INTERNAL_ERROR,
                               plugin_id=pid, method=method,
                               data={"trap": code.name.lower() if code else None})

    async def _complete(self, inst: _Instance, bound: _Bound, future: _Ptr | None,
                        timeout: float) -> None:
        """Off the loop: finish a call that yielded, or (``future`` None) make the whole call
        there, for a module that may block in WASI."""
        if future is not None:
            await self._off_loop(inst, inst.finish, future)
        else:
            await self._off_loop(inst, inst.run, bound, timeout)

    async def _run(self, inst: _Instance, name: str, timeout: float) -> _Bound:
        """A call outside the hot path (allocation, lifecycle exports)."""
        bound = inst.bound[name]
        future = inst.start(bound, timeout) if self._inline else None
        if future is not None or not self._inline:
            await self._complete(inst, bound, future, timeout)
        if inst._trap.value or inst._error.value:
            raise self._call_failure(inst, name, timeout)
        return bound

    async def _json_call(self, inst: _Instance, method: str, args: list[Any]) -> Any:
        """A JSON ABI call outside the hot path (lifecycle exports)."""
        payload = self._encode(method, args)
        n = len(payload)
        timeout = self._timeout
        if n > inst.capacity:
            await self._grow(inst, n, method, timeout)
        inst.view[inst.buffer:inst.buffer + n] = payload
        bound = inst.bound[method]
        bound.arg[0].i32 = inst.buffer
        bound.arg[1].i32 = n
        await self._run(inst, method, timeout)
        return self._json_result(inst, bound, method)

    def _json_result(self, inst: _Instance, bound: _Bound, method: str) -> Any:
        """Read ``{"result": …}`` or ``{"error": …}`` from the (ptr << 32 | len) a call gave."""
        packed = bound.result[0].i64 & 0xFFFF_FFFF_FFFF_FFFF
        ptr, length = packed >> 32, packed & 0xFFFF_FFFF
        end = ptr + length
        if end > len(inst.view) and end > inst.refresh():
            inst.broken = True
            raise PluginCallError(
                f"plugin {self.plugin.id}: {method} returned a result at {ptr}+{length}, "
                f"outside its memory ({len(inst.view)} bytes)", code=INTERNAL_ERROR,
                plugin_id=self.plugin.id, method=method)
        if length > self._max_output:
            raise PluginCallError(
                f"plugin {self.plugin.id}: {method} returned {length} bytes, more than the "
                f"{self._max_output}-byte limit", code=INTERNAL_ERROR,
                plugin_id=self.plugin.id, method=method)
        view = inst.view
        if length > 10 and view[ptr:ptr + 10] == b'{"result":' and view[end - 1] == 0x7D:
            try:
                return orjson.loads(view[ptr + 10:end - 1])
            except orjson.JSONDecodeError:
                pass  # e.g. {"result":1,"x":2}: the full check below names the problem
        return self._envelope(bytes(view[ptr:end]), method)

    def _envelope(self, raw: bytes, method: str) -> Any:
        pid = self.plugin.id
        try:
            reply = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise PluginCallError(f"plugin {pid}: {method} returned invalid JSON or UTF-8: "
                                  f"{exc}", code=INTERNAL_ERROR, plugin_id=pid,
                                  method=method) from None
        if type(reply) is dict and len(reply) == 1:
            if "result" in reply:
                return reply["result"]
            error = reply.get("error")
            if (type(error) is dict and type(error.get("code")) is int
                    and type(error.get("message")) is str):
                raise PluginCallError(f"plugin {pid}: {method}: {error['message']}",
                                      code=error["code"], data=error.get("data"),
                                      plugin_id=pid, method=method)
        raise PluginCallError(
            f"plugin {pid}: {method} returned {raw[:80]!r}, not {{\"result\": …}} or "
            f"{{\"error\": {{\"code\": int, \"message\": str}}}}", code=INTERNAL_ERROR,
            plugin_id=pid, method=method)

    async def _grow(self, inst: _Instance, n: int, method: str, timeout: float) -> None:
        """A bigger argument buffer from the plugin's sandboxer_alloc."""
        pid = self.plugin.id
        limit = self._sandbox.memory_limit
        size = max(n, 4096)
        if size > limit:
            raise MemoryLimitExceeded(
                f"plugin {pid}: the arguments of {method} ({n} bytes) do not fit in its "
                f"memory limit ({limit} bytes)", limit=limit, peak=inst.memory_size(),
                plugin_id=pid)
        bound = inst.bound["sandboxer_alloc"]
        bound.arg[0].i32 = size
        await self._run(inst, "sandboxer_alloc", timeout)
        ptr = bound.result[0].i32 & 0xFFFF_FFFF
        memory = inst.refresh()
        self._peak = max(self._peak, memory)
        if ptr == 0 or ptr + size > memory:
            if ptr == 0 and memory + size > limit - (64 << 10):
                raise MemoryLimitExceeded(
                    f"plugin {pid}: sandboxer_alloc({size}) for the arguments of {method} "
                    f"failed at the memory limit ({limit} bytes; linear memory {memory} "
                    "bytes)", limit=limit, peak=memory, plugin_id=pid)
            inst.broken = True
            raise PluginCallError(f"plugin {pid}: sandboxer_alloc({size}) returned {ptr}, "
                                  f"not a buffer inside its memory ({memory} bytes)",
                                  code=INTERNAL_ERROR, plugin_id=pid, method=method)
        inst.buffer, inst.capacity = ptr, size

    # -- WASI command modules: one fresh instance per call -------------------------------------
    async def _command(self, method: str, args: tuple[Any, ...], timeout: float) -> Any:
        if self._closed:
            raise self._closed_error()
        try:
            payload = _json.dumps(list(args))
        except TypeError as exc:
            raise PluginCallError(f"plugin {self.plugin.id}: arguments of {method} are not "
                                  f"JSON values: {exc}", code=INVALID_PARAMS,
                                  plugin_id=self.plugin.id, method=method) from None
        async with self._slots:
            work = self._loop.run_in_executor(self._executor, self._run_command, method,
                                              payload, timeout)
            self._offloop.add(work)
            work.add_done_callback(self._offloop.discard)
            return await asyncio.shield(work)

    def _run_command(self, method: str, payload: bytes, timeout: float) -> Any:
        """Run ``_start`` once with the args on stdin; the result is its stdout (blocking)."""
        pid = self.plugin.id
        out = bytearray()
        err = LineLog(name="stderr", logger=self._log, level=logging.WARNING, tail=20)
        too_much = False

        def stdout(data: bytes) -> int:
            nonlocal too_much
            if len(out) + len(data) > self._max_output:
                too_much = True
                return -5  # EIO: the write fails inside the plugin
            out.extend(data)
            return len(data)

        def stderr(data: bytes) -> int:
            err.feed(data)
            return len(data)

        wasi = self._wasi(argv=[pid, method], stdin=payload, stdout=stdout, stderr=stderr)
        store = _Store(self._engine, self._sandbox)
        self._commands.add(store)
        status = 0
        try:
            if wasi is not None:
                store.store.set_wasi(wasi)
            store.arm(timeout)
            trapped: str | None = None
            out_of_fuel = False
            try:
                with self._engine.ticking(), _running(store):
                    instance = self._linker.instantiate(store.store, self._module)
                    start = instance.exports(store.store)["_start"]
                    assert isinstance(start, wasmtime.Func)
                    start(store.store)
            except wasmtime.ExitTrap as exc:
                status = exc.code
            except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
                # Only facts leave this block: the trap's backtrace pins the module.
                trapped = _first_line(exc)
                out_of_fuel = isinstance(exc, wasmtime.Trap) and (
                    exc.trap_code is wasmtime.TrapCode.OUT_OF_FUEL)
            if trapped is not None:
                err.flush()
                if store.timed_out and self._closed:
                    raise PluginStateError(f"plugin {pid}: unloaded while {method} was in "
                                           "flight (it outlived the drain timeout)",
                                           plugin_id=pid)
                if store.timed_out:
                    raise CallTimeout(f"plugin {pid}: {method} did not finish within "
                                      f"{timeout:g}s", timeout=timeout, plugin_id=pid,
                                      method=method)
                if out_of_fuel:
                    raise CpuLimitExceeded(f"plugin {pid}: {method} used up its fuel "
                                           f"({self._sandbox.fuel} per call)", plugin_id=pid)
                raise PluginCallError(f"plugin {pid}: {method} trapped: {trapped}",
                                      code=INTERNAL_ERROR, plugin_id=pid, method=method,
                                      data={"stderr": list(err.tail)})
        finally:
            self._commands.discard(store)
            store.release()
        err.flush()
        if too_much:
            raise PluginCallError(f"plugin {pid}: {method} wrote more than "
                                  f"{self._max_output} bytes to stdout", code=INTERNAL_ERROR,
                                  plugin_id=pid, method=method)
        if status != 0:
            tail = " | ".join(err.tail) or "no stderr"
            raise PluginCallError(f"plugin {pid}: {method} exited with status {status}: {tail}",
                                  code=INTERNAL_ERROR, plugin_id=pid, method=method,
                                  data={"exit_status": status, "stderr": list(err.tail)})
        if not out.strip():
            return None
        try:
            return orjson.loads(out)
        except orjson.JSONDecodeError as exc:
            raise PluginCallError(f"plugin {pid}: {method} wrote something other than one "
                                  f"JSON value to stdout: {exc}", code=INTERNAL_ERROR,
                                  plugin_id=pid, method=method) from None

    # -- host functions (run on whichever thread is inside the store) ---------------------------
    def _read(self, caller: wasmtime.Caller, ptr: int, length: int) -> bytes | None:
        memory = caller.get("memory")
        if not isinstance(memory, wasmtime.Memory):
            return None
        ptr &= 0xFFFF_FFFF
        length &= 0xFFFF_FFFF
        if ptr + length > memory.data_len(caller):
            return None
        return bytes(memory.read(caller, ptr, ptr + length))

    def _host_log(self, caller: wasmtime.Caller, level: int, ptr: int, length: int) -> None:
        data = self._read(caller, ptr, min(length & 0xFFFF_FFFF, LOG_MESSAGE_MAX))
        if data is None:
            raise _wt.HostTrap("sandboxer.log: the message lies outside the plugin's memory")
        levels = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}
        self._log.log(levels.get(level, logging.INFO), "%s",
                      data.decode("utf-8", "replace"))

    def _host_config_get(self, caller: wasmtime.Caller, key_ptr: int, key_len: int,
                         buf_ptr: int, buf_cap: int) -> int:
        """Copy config[key] as JSON into (buf_ptr, buf_cap); -1 if absent; the length needed
        (and nothing written) if the buffer is too small."""
        raw = self._read(caller, key_ptr, key_len)
        if raw is None:
            raise _wt.HostTrap("sandboxer.config_get: the key lies outside the plugin's memory")
        key = raw.decode("utf-8", "replace")
        if key not in self._config:
            return -1
        value = self._config_json.get(key)
        if value is None:
            value = self._config_json[key] = _json.dumps(self._config[key])
        buf_ptr &= 0xFFFF_FFFF
        buf_cap &= 0xFFFF_FFFF
        if len(value) > buf_cap:
            return len(value)
        memory = caller.get("memory")
        assert isinstance(memory, wasmtime.Memory)
        if buf_ptr + len(value) > memory.data_len(caller):
            raise _wt.HostTrap("sandboxer.config_get: the buffer lies outside the plugin's "
                               "memory")
        memory.write(caller, value, buf_ptr)
        return len(value)

    def _host_http_request(self, caller: wasmtime.Caller, ptr: int, length: int) -> int:
        """Perform the request whose JSON lies at (ptr, length) through the egress proxy's
        rules; keep the response JSON for http_response and return its length. Blocking:
        modules importing it never run on the event loop (``_Layout.blocks``)."""
        store = getattr(_current, "store", None)
        if store is None:  # every call of a blocking module runs under _running
            raise _wt.HostTrap("sandboxer.http_request: called outside a sandboxer call")
        memory = caller.get("memory")
        ptr &= 0xFFFF_FFFF
        length &= 0xFFFF_FFFF
        if not isinstance(memory, wasmtime.Memory) or ptr + length > memory.data_len(caller):
            raise _wt.HostTrap("sandboxer.http_request: the request lies outside the plugin's "
                               "memory")
        limit = self._egress.max_response * 4 // 3 + HTTP_REQUEST_OVERHEAD
        reply: dict[str, Any]
        if length > limit:
            reply = {"error": {"kind": "invalid", "message": f"the request is {length} bytes "
                               f"of JSON, more than the {limit}-byte limit"}}
        else:
            try:
                request = orjson.loads(bytes(memory.read(caller, ptr, ptr + length)))
            except orjson.JSONDecodeError as exc:
                reply = {"error": {"kind": "invalid",
                                   "message": f"the request is not UTF-8 JSON: {exc}"}}
            else:
                reply = self._egress.fetch(self.plugin.id, self._allow, request,
                                           deadline=lambda: store.deadline)
        if time.monotonic() >= store.deadline:
            # Timed out, cancelled or unloaded while waiting: end the call as poll_oneoff does.
            store.timed_out = True
            raise _wt.HostTrap("sandboxer: the call's deadline passed (in http_request)")
        store.http_reply = orjson.dumps(reply)
        return len(store.http_reply)

    def _host_http_response(self, caller: wasmtime.Caller, ptr: int, cap: int) -> int:
        """Copy as much of the last http_request's response JSON as fits in (ptr, cap);
        return how many bytes were copied (0 before any request)."""
        store = getattr(_current, "store", None)
        data = store.http_reply if store is not None else b""
        ptr &= 0xFFFF_FFFF
        n = min(len(data), cap & 0xFFFF_FFFF)
        memory = caller.get("memory")
        if not isinstance(memory, wasmtime.Memory) or ptr + n > memory.data_len(caller):
            raise _wt.HostTrap("sandboxer.http_response: the buffer lies outside the plugin's "
                               "memory")
        if n:
            memory.write(caller, data[:n], ptr)
        return n

    # -- lifecycle -------------------------------------------------------------------------------
    async def _lifecycle(self, name: str, args: list[Any], *,
                         every: bool = False) -> tuple[bool, Any]:
        """Call a lifecycle export: ``(True, result)``, or ``(False, None)`` when the module
        lacks it or answers -32601 (not implemented, as on the wire)."""
        if name not in self._layout.lifecycle:
            return False, None
        result = None
        for _ in range(len(self._instances) if every else 1):
            inst = await self._acquire()
            try:
                result = await self._json_call(inst, name, args)
            except PluginCallError as exc:
                if not_implemented(exc):
                    return False, None
                raise
            finally:
                if inst.busy:
                    self._release(inst)
        return True, result

    async def init(self, config: dict[str, Any]) -> None:
        self._config = _json.normalize(config)
        self._config_json = {}
        await self._lifecycle("init", [self._config], every=True)

    async def health(self) -> Health:
        if self._failed is not None:
            return Health(False, str(self._failed))
        try:
            _, result = await self._lifecycle("health_check", [])
        except (PluginCallError, CallTimeout, CpuLimitExceeded, MemoryLimitExceeded) as exc:
            return Health.from_error(exc)
        return Health.from_answer(self.plugin.id, result)

    async def shutdown(self) -> None:
        await self._lifecycle("shutdown", [], every=True)

    async def export_state(self) -> Any | NoState:
        implemented, state = await self._lifecycle("export_state", [])
        return state if implemented else NO_STATE

    async def import_state(self, state: Any, from_version: str) -> None:
        await self._lifecycle("import_state", [_json.normalize(state), from_version])

    def resource_usage(self) -> ResourceUsage:
        for inst in self._instances:
            self._peak = max(self._peak, inst.memory_size())
        return ResourceUsage(peak_memory_bytes=self._peak or None)

    def on_failure(self, callback: Callable[[SandboxerError], None]) -> None:
        self._failure_callbacks.append(callback)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # First, so that nothing below can skip it: no WASI context is built from here on
        # (_preopen raises), and calls still running keep the directories wasmtime opened.
        self._close_grants()
        error = self._closed_error()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
        for running in [*self._instances, *self._commands]:
            running.deadline = 0.0  # a call still running traps at the next tick
        if self._offloop:
            await asyncio.wait(list(self._offloop))
        for inst in self._instances:
            inst.release()
        self._instances.clear()
        self._idle.clear()
        # Drop everything that holds wasmtime objects, so the module (and its memory image)
        # is freed once no other plugin uses it.
        self._linker.close()
        self._module = None  # type: ignore[assignment]
        self._engine.release(self._digest)


def _first_line(exc: BaseException | None) -> str:
    """The telling line of a wasmtime error: its cause (after a backtrace) or its first line."""
    text = str(exc or "").strip()
    if not text:
        return type(exc).__name__
    if "Caused by:" in text:
        causes = [line.strip() for line in text.split("Caused by:", 1)[1].splitlines()]
        return "; ".join(line for line in causes if line)
    return text.splitlines()[0]


class WasmLoader:
    """Loads wasm plugins into this process under wasmtime's limits."""

    kind = LoaderType.WASM

    def __init__(self, engine: WasmEngine, *, pool_size: int = 1, max_frame: int = 16 << 20,
                 egress: EgressProxy | None = None, fallbacks: tuple[str, ...] = (),
                 grant_owner: tuple[int, int] | None = None) -> None:
        self._engine = engine
        self._egress = egress if egress is not None else EgressProxy()
        self._pool_size = pool_size
        self._max_frame = max_frame
        self._fallbacks = fallbacks
        self._grant_owner = grant_owner

    def _check_sandbox(self, plugin: Plugin, sandbox: SandboxConfig) -> None:
        pid = plugin.id
        # network_allowed needs nothing here: wasm has no sockets, and its http_request goes
        # through the egress proxy's rules (network_mode), enforced by the host itself.
        requested = plugin.sandbox.cpu_limit
        if requested is not None and requested < 1.0:
            raise SandboxUnavailable(
                f"plugin {pid}: asks for cpu_limit = {requested:g}, which cannot be enforced "
                "for wasm in the supervisor's process (a call runs on one thread, bounded by "
                "its timeout and, if set, fuel); remove cpu_limit or set fuel",
                missing="cpu quota for in-process wasm", plugin_id=pid)
        for grant in sandbox.allowed_paths:
            for outer in sandbox.allowed_paths:
                if outer.writable and not grant.writable and grant.path != outer.path \
                        and grant.path.startswith(outer.path.rstrip("/") + "/"):
                    raise PluginLoadError(
                        f"plugin {pid}: allowed path {grant.path} is read-only but lies inside "
                        f"the writable allowed path {outer.path}; WASI would let the plugin "
                        f"write it through {outer.path}, so wasm plugins may not have it "
                        "(grant it writable, or grant narrower directories)", plugin_id=pid)
            for denied in sandbox.denied_paths:
                if denied == grant.path or denied.startswith(grant.path.rstrip("/") + "/"):
                    raise PluginLoadError(
                        f"plugin {pid}: denied path {denied} lies inside allowed path "
                        f"{grant.path}; WASI cannot mask part of a preopened directory, so "
                        "wasm plugins may not have it (allow narrower directories instead)",
                        plugin_id=pid)

    def _open_grants(self, plugin: Plugin, sandbox: SandboxConfig
                     ) -> tuple[tuple[OpenedPath, ...], tuple[str, ...]]:
        """Open every allowed path once, for this generation's life: beneath its path root
        through no link (or, an operator's grant, from /), and check that what was opened
        is a directory. The check and every later use are of the same descriptor, so what
        happens to the names afterwards does not matter. A writable grant is then an
        idmapped copy of its mount (as root): what WASI creates in it belongs to the grant's
        owner, not to the supervisor's root. Nothing stays open on failure."""
        pid = plugin.id
        opened: list[OpenedPath] = []
        fell_back = False
        try:
            for grant in sandbox.allowed_paths:
                path = open_grant(grant, plugin_id=pid)
                opened.append(path)
                if not path.is_dir:
                    raise PluginLoadError(
                        f"plugin {pid}: allowed path {grant.path} is not a directory (it is "
                        f"{path.host_path}); WASI can only be given directories",
                        plugin_id=pid)
                if grant.writable and os.geteuid() == 0:
                    tree, plain = owned_tree(path.fd, path=grant.path, outside=(0, 0),
                                             owner=self._grant_owner, fallbacks=self._fallbacks,
                                             plugin_id=pid)
                    fell_back |= plain
                    path.close()
                    path.fd = tree
        except BaseException:
            for path in opened:
                path.close()
            raise
        return tuple(opened), (IDMAP_FALLBACK,) if fell_back else ()

    def _compile(self, plugin: Plugin) -> tuple[wasmtime.Module, str]:
        pid = plugin.id
        path = Path(plugin.entrypoint)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PluginLoadError(f"plugin {pid}: cannot read {path}: {exc.strerror}",
                                  plugin_id=pid) from None
        if data[:4] != WASM_MAGIC:
            raise PluginLoadError(f"plugin {pid}: {path} is not a WebAssembly module (it does "
                                  "not start with \\0asm)", plugin_id=pid)
        import hashlib
        digest = hashlib.sha256(data).hexdigest()
        try:
            return self._engine.module(data, digest), digest
        except wasmtime.WasmtimeError as exc:
            detail = str(exc).strip().replace("\n", "; ")
            raise PluginLoadError(f"plugin {pid}: {path} is not a valid WebAssembly module: "
                                  f"{detail}", plugin_id=pid) from None

    async def start(self, plugin: Plugin, sandbox: SandboxConfig, *,
                    generation: int) -> WasmHandle:
        self._check_sandbox(plugin, sandbox)
        grants, fallbacks = self._open_grants(plugin, sandbox)
        try:
            handle = await self._make_handle(plugin, sandbox, grants)
            handle.fallbacks = fallbacks
        except BaseException:
            for grant in grants:
                grant.close()
            raise
        await handle.start()  # closes the handle, and with it the grants, if it fails
        return handle

    async def _make_handle(self, plugin: Plugin, sandbox: SandboxConfig,
                           grants: tuple[OpenedPath, ...]) -> WasmHandle:
        loop = asyncio.get_running_loop()
        module, digest = await loop.run_in_executor(self._engine.executor, self._compile,
                                                    plugin)
        pool = self._pool_size
        try:
            layout = _Layout(plugin, module)
            if pool > 1 and {"export_state", "import_state"} <= layout.lifecycle:
                raise PluginLoadError(
                    f"plugin {plugin.id}: exports state, so it must run as one instance; the "
                    f"host's wasm_instances = {pool} would split its state",
                    plugin_id=plugin.id)
            handle = WasmHandle(plugin, sandbox, self._engine, module, digest, layout,
                                pool_size=pool, egress=self._egress, grants=grants)
        except BaseException:
            self._engine.release(digest)
            raise
        handle._max_output = self._max_frame
        return handle
