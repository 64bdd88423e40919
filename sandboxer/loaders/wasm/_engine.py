"""The manager's one wasmtime Engine: its configuration, the compiled modules (by content
digest, compiled once and shared; on disk for the next process, _module_cache.py), the epoch
ticker and the worker threads long calls move to.

It never instantiates or calls a module: stores, instances and calls belong to a plugin's
generation (_instance.py). It must never tick while nothing runs off the event loop: quick
calls on the loop would compete with the ticker for the GIL.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import wasmtime

from . import _module_cache

__all__ = ["WasmEngine", "TICK", "MAX_WASM_STACK", "ENGINE_SETTINGS"]

TICK = 0.001  # the epoch ticker's period
MAX_WASM_STACK = 512 << 10

# Every wasmtime.Config setting of the engine, applied from here and nowhere else: the
# on-disk module cache keys on this list, so a setting added here is in the key, and one set
# any other way would let a module compiled without it be loaded (a test holds to this).
ENGINE_SETTINGS: tuple[tuple[str, object], ...] = (
    ("epoch_interruption", True),
    ("consume_fuel", True),  # metered per store; unmetered stores get 2**63-1
    ("max_wasm_stack", MAX_WASM_STACK),
    ("memory_may_move", False),  # memory base addresses stay put: cached per instance
    ("wasm_memory64", False),  # limits and the JSON ABI are 32-bit
    ("wasm_threads", False),
    ("wasm_simd", False),  # v128 values cannot cross wasmtime's C API: refuse them
    ("wasm_relaxed_simd", False),
    ("parallel_compilation", False),
)


class WasmEngine:
    """The manager's one wasmtime Engine, module cache, epoch ticker and worker threads."""

    def __init__(self, *, workers: int = 32) -> None:
        config = wasmtime.Config()
        for name, value in ENGINE_SETTINGS:
            setattr(config, name, value)
        self.engine = wasmtime.Engine(config)
        self._disk = _module_cache.for_this_user(ENGINE_SETTINGS)  # None: compile every time
        self._modules: dict[str, list[Any]] = {}  # digest -> [module, plugins using it]
        self._compile_lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandboxer-wasm")
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
                entry = self._modules[digest] = [self._compiled(data, digest), 0]
            entry[1] += 1
            module: wasmtime.Module = entry[0]
            return module

    def stored(self, digest: str) -> wasmtime.Module | None:
        """The module of SHA-256 ``digest`` if this engine or the disk cache holds it
        compiled (paired with ``release`` like ``module``), else None. Blocking."""
        with self._compile_lock:
            entry = self._modules.get(digest)
            if entry is None:
                module = self._from_disk(digest)
                if module is None:
                    return None
                entry = self._modules[digest] = [module, 0]
            entry[1] += 1
            found: wasmtime.Module = entry[0]
            return found

    def remembered(self, st: os.stat_result) -> str | None:
        """The SHA-256 the disk cache remembers for the module file ``st`` describes."""
        return self._disk.remembered(st) if self._disk is not None else None

    def remember(self, st: os.stat_result, digest: str) -> None:
        if self._disk is not None:
            self._disk.remember(st, digest)

    def _from_disk(self, digest: str) -> wasmtime.Module | None:
        disk = self._disk
        key = disk.key(digest) if disk is not None else None
        return None if disk is None or key is None else disk.load(self.engine, key)

    def _compiled(self, data: bytes, digest: str) -> wasmtime.Module:
        """``data`` compiled by this engine: from the disk cache when it holds it, else
        compiled here and stored for the next process. The cache is keyed by ``digest``, the
        sha256 the caller computed over these very bytes (and checked against what vouches
        for them): never a digest of the file read again."""
        module = self._from_disk(digest)
        if module is not None:
            return module
        module = wasmtime.Module(self.engine, data)
        disk = self._disk
        key = disk.key(digest) if disk is not None else None
        if disk is not None and key is not None:
            disk.store(key, module)
        return module

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
                self._ticker = threading.Thread(
                    target=self._tick, daemon=True, name="sandboxer-wasm-epoch"
                )
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
