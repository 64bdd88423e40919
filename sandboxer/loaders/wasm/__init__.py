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
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import wasmtime

from ... import _json
from ..._digest import tree_checksum
from ..._wasm_magic import WASM_MAGIC
from ...errors import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    CallTimeout,
    CpuLimitExceeded,
    IntegrityError,
    MemoryLimitExceeded,
    MethodNotFound,
    PluginCallError,
    PluginLoadError,
    PluginStateError,
    SandboxerError,
    SandboxUnavailable,
)
from ...manifest import LoaderType, Plugin
from ...rpc.framing import DEFAULT_MAX_FRAME
from ...sandbox.egress import EgressProxy
from ...sandbox.paths import OpenedPath
from ...sandbox.policy import SandboxConfig
from .. import NO_STATE, Health, NoState, ResourceUsage, not_implemented
from . import _wasmtime as _wt
from ._abi import LIFECYCLE, Layout
from ._call import (
    call_failure,
    encode,
    first_line,
    get_numbers,
    json_result,
    put_numbers,
)
from ._command import CommandRunner, run_command, run_program_call
from ._engine import WasmEngine
from ._grants import check_grants, open_grants
from ._host import HostFunctions, define_host_functions
from ._instance import Bound, Instance, Store, running
from ._pool import Pool
from ._wasi import WasiContexts, define_wasi

__all__ = ["WasmEngine", "WasmLoader", "WasmHandle", "WASM_MAGIC"]


class WasmHandle:
    """One generation of a wasm plugin: its instance pool (or, for a WASI command, a runner)."""

    def __init__(
        self,
        plugin: Plugin,
        sandbox: SandboxConfig,
        engine: WasmEngine,
        module: wasmtime.Module,
        digest: str,
        layout: Layout,
        *,
        pool_size: int,
        egress: EgressProxy,
        grants: tuple[OpenedPath, ...] = (),
    ) -> None:
        self.plugin = plugin
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
        self._pool_size = pool_size
        self._methods = layout.methods
        self._config: dict[str, Any] = dict(plugin.config)
        self._log = logging.getLogger(f"sandboxer.plugin.{plugin.id}")
        self._host = HostFunctions(
            plugin.id, sandbox, config=self._config, log=self._log, egress=egress
        )
        self._wasi = WasiContexts(
            plugin.id,
            enabled=layout.uses_wasi,
            grants=grants,
            engine=engine,
            log=self._log,
            closed_error=self._closed_error,
        )
        self._linker = self._make_linker()
        self._loop = asyncio.get_running_loop()
        self._executor = engine.executor
        self._pool = Pool(
            plugin.id,
            executor=self._executor,
            new_instance=self._new_instance,
            reinit=self._reinit if "init" in layout.lifecycle else None,
            fail=self._fail,
        )
        # The hot path's: the pool's list (changed in place), its release, the plugin's id.
        self._idle = self._pool.idle
        self._release = self._pool.release
        self._id = plugin.id
        self._offloop: set[asyncio.Future[Any]] = set()
        self._commands: set[Store] = set()  # stores of WASI command runs in progress
        self._failure_callbacks: list[Callable[[SandboxerError], None]] = []
        self._closed = False
        self._failed: SandboxerError | None = None
        self._peak = 0
        self._slots = asyncio.Semaphore(pool_size)  # command modules: runs at once
        self._timeout = sandbox.timeout
        self._max_output = DEFAULT_MAX_FRAME

    # -- setup ---------------------------------------------------------------------------------
    def _make_linker(self) -> wasmtime.Linker:
        """The imports this plugin may use: WASI if it imports any, and sandboxer's."""
        linker = wasmtime.Linker(self._engine.engine)
        if self._layout.uses_wasi:
            define_wasi(linker)
        define_host_functions(linker, self._host)
        return linker

    def _new_instance(self) -> Instance:
        """Instantiate one pool member (blocking: run off the loop)."""
        wasi = self._wasi.for_instance()
        names = set(self._methods) | self._layout.lifecycle
        if self._layout.alloc:
            names.add("sandboxer_alloc")
        if self._layout.initialize:
            names.add("_initialize")
        inst = Instance(self._engine, self._sandbox)
        step = "could not be instantiated"
        detail = ""
        try:
            with self._engine.ticking(), running(inst):
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
            detail = first_line(exc)
        except BaseException:
            inst.release()
            raise
        inst.release()
        if inst.timed_out:
            detail = f"it did not finish within {self._timeout:g}s (start function or _initialize)"
        raise PluginLoadError(
            f"plugin {self.plugin.id}: {step}: {detail}", plugin_id=self.plugin.id
        )

    async def _reinit(self, inst: Instance) -> None:
        """Initialise a fresh instance (for one that trapped) with the current config."""
        await self._json_call(inst, "init", [self._config])

    async def start(self) -> None:
        if self._layout.command:
            return
        try:
            await self._pool.fill(self._pool_size)
        except BaseException:
            await self.close()
            raise

    async def _acquire(self) -> Instance:
        if self._closed:
            raise self._closed_error()
        return await self._pool.acquire()

    def _fail(self, error: SandboxerError) -> None:
        if self._failed is None and not self._closed:
            self._failed = error
            for callback in self._failure_callbacks:
                callback(error)

    def _closed_error(self) -> PluginStateError:
        return PluginStateError(
            f"plugin {self.plugin.id}: this generation is closed", plugin_id=self.plugin.id
        )

    # -- calls -----------------------------------------------------------------------------------
    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(sorted(self._methods))

    @property
    def has_state(self) -> bool:
        return self._layout.has_state

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        m = self._methods.get(method)
        if m is None:
            if (
                self._layout.command
                and self.plugin.methods is None
                and method not in LIFECYCLE
                and self.plugin.wasm_mode != "command"  # a program has run() alone
            ):
                return await self._command(
                    method, args, self._timeout if timeout is None else timeout
                )
            raise MethodNotFound.of(self.plugin.id, method, self.methods)
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
                payload = encode(self._id, method, args)
                n = len(payload)
                if n > inst.capacity:
                    await self._grow(inst, n, method, timeout)
                inst.put_json(bound, payload)
            else:
                put_numbers(self._id, bound, m, method, args)
            future = inst.start(bound, timeout) if self._inline else None
            if future is not None or not self._inline:
                await self._complete(inst, bound, future, timeout)
            if inst.trap_out.value or inst.error_out.value:
                raise self._call_failure(inst, method, timeout)
            if m.json:
                return json_result(self._id, inst, bound, method, self._max_output)
            return get_numbers(bound, m)
        finally:
            if inst.busy:
                self._release(inst)

    async def _off_loop(self, inst: Instance, work_fn: Callable[..., None], *args: Any) -> None:
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
            inst.stop()
            inst.broken = True
            work.add_done_callback(lambda _: self._after_abandon(inst))
            inst.busy = False
            raise

    def _after_abandon(self, inst: Instance) -> None:
        inst.take_failure()
        if not self._closed:
            self._pool.release(inst)

    def _call_failure(self, inst: Instance, method: str, timeout: float) -> SandboxerError:
        """The error for a call that trapped; the instance is marked for replacement."""
        error = call_failure(
            self.plugin.id, inst, method, timeout, self._sandbox, closed=self._closed
        )
        self._peak = max(self._peak, inst.memory_size())
        return error

    async def _complete(
        self, inst: Instance, bound: Bound, future: _wt.FuturePtr | None, timeout: float
    ) -> None:
        """Off the loop: finish a call that yielded, or (``future`` None) make the whole call
        there, for a module that may block in WASI."""
        if future is not None:
            await self._off_loop(inst, inst.finish, future)
        else:
            await self._off_loop(inst, inst.run, bound, timeout)

    async def _run(self, inst: Instance, name: str, timeout: float) -> Bound:
        """A call outside the hot path (allocation, lifecycle exports)."""
        bound = inst.bound[name]
        future = inst.start(bound, timeout) if self._inline else None
        if future is not None or not self._inline:
            await self._complete(inst, bound, future, timeout)
        if inst.trap_out.value or inst.error_out.value:
            raise self._call_failure(inst, name, timeout)
        return bound

    async def _json_call(self, inst: Instance, method: str, args: list[Any]) -> Any:
        """A JSON ABI call outside the hot path (lifecycle exports)."""
        payload = encode(self.plugin.id, method, args)
        n = len(payload)
        timeout = self._timeout
        if n > inst.capacity:
            await self._grow(inst, n, method, timeout)
        bound = inst.bound[method]
        inst.put_json(bound, payload)
        await self._run(inst, method, timeout)
        return json_result(self.plugin.id, inst, bound, method, self._max_output)

    async def _grow(self, inst: Instance, n: int, method: str, timeout: float) -> None:
        """A bigger argument buffer from the plugin's sandboxer_alloc."""
        pid = self.plugin.id
        limit = self._sandbox.memory_limit
        size = max(n, 4096)
        if size > limit:
            raise MemoryLimitExceeded(
                f"plugin {pid}: the arguments of {method} ({n} bytes) do not fit in its "
                f"memory limit ({limit} bytes)",
                limit=limit,
                peak=inst.memory_size(),
                plugin_id=pid,
            )
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
                    "bytes)",
                    limit=limit,
                    peak=memory,
                    plugin_id=pid,
                )
            inst.broken = True
            raise PluginCallError(
                f"plugin {pid}: sandboxer_alloc({size}) returned {ptr}, "
                f"not a buffer inside its memory ({memory} bytes)",
                code=INTERNAL_ERROR,
                plugin_id=pid,
                method=method,
            )
        inst.use_buffer(ptr, size)

    # -- WASI command modules: one fresh instance per call -------------------------------------
    async def _command(self, method: str, args: tuple[Any, ...], timeout: float) -> Any:
        if self._closed:
            raise self._closed_error()
        runner = CommandRunner(
            self.plugin.id,
            self._engine,
            self._sandbox,
            self._module,
            self._linker,
            self._wasi,
            self._commands,
            self._is_closed,
        )
        if self.plugin.wasm_mode == "command":  # an unmodified WASI program: run(args...)
            return await self._run_command(
                functools.partial(
                    run_program_call,
                    runner,
                    args,
                    timeout,
                    program=self.plugin.entrypoint.name,
                    max_output=self._max_output,
                )
            )
        try:
            payload = _json.dumps(list(args))
        except TypeError as exc:
            raise PluginCallError(
                f"plugin {self.plugin.id}: arguments of {method} are not JSON values: {exc}",
                code=INVALID_PARAMS,
                plugin_id=self.plugin.id,
                method=method,
            ) from None
        return await self._run_command(
            functools.partial(
                run_command,
                runner,
                method,
                payload,
                timeout,
                max_output=self._max_output,
                log=self._log,
            )
        )

    async def _run_command(self, run: Callable[[], Any]) -> Any:
        """A command run on a worker thread, within the generation's runs at once."""
        async with self._slots:
            work = self._loop.run_in_executor(self._executor, run)
            self._offloop.add(work)
            work.add_done_callback(self._offloop.discard)
            return await asyncio.shield(work)

    def _is_closed(self) -> bool:
        return self._closed

    # -- lifecycle -------------------------------------------------------------------------------
    async def _lifecycle(
        self, name: str, args: list[Any], *, every: bool = False
    ) -> tuple[bool, Any]:
        """Call a lifecycle export: ``(True, result)``, or ``(False, None)`` when the module
        lacks it or answers -32601 (not implemented, as on the wire)."""
        if name not in self._layout.lifecycle:
            return False, None
        result = None
        for _ in range(len(self._pool.instances) if every else 1):
            inst = await self._acquire()
            try:
                result = await self._json_call(inst, name, args)
            except PluginCallError as exc:
                if not_implemented(exc):
                    return False, None
                raise
            finally:
                if inst.busy:
                    self._pool.release(inst)
        return True, result

    async def init(self, config: dict[str, Any]) -> None:
        self._config = _json.normalize(config)
        self._host.configure(self._config)
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
        for inst in self._pool.instances:
            self._peak = max(self._peak, inst.memory_size())
        return ResourceUsage(peak_memory_bytes=self._peak or None)

    def on_failure(self, callback: Callable[[SandboxerError], None]) -> None:
        self._failure_callbacks.append(callback)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # First, so that nothing below can skip it: no WASI context is built from here on
        # (WasiContexts raises), and calls still running keep the directories wasmtime opened.
        self._wasi.close()
        self._pool.close(self._closed_error())
        for store in [*self._pool.instances, *self._commands]:
            store.stop()  # a call still running traps at the next tick
        if self._offloop:
            await asyncio.wait(list(self._offloop))
        self._pool.release_all()
        # Drop everything that holds wasmtime objects, so the module (and its memory image)
        # is freed once no other plugin uses it.
        self._linker.close()
        self._module = None  # type: ignore[assignment]
        self._engine.release(self._digest)


class WasmLoader:
    """Loads wasm plugins into this process under wasmtime's limits."""

    kind = LoaderType.WASM

    def __init__(
        self,
        engine: WasmEngine,
        *,
        pool_size: int = 1,
        max_frame: int = DEFAULT_MAX_FRAME,
        egress: EgressProxy | None = None,
        fallbacks: tuple[str, ...] = (),
        grant_owner: tuple[int, int] | None = None,
    ) -> None:
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
                missing="cpu quota for in-process wasm",
                plugin_id=pid,
            )
        check_grants(sandbox, f"plugin {pid}", plugin_id=pid)

    def _compile(self, plugin: Plugin) -> tuple[wasmtime.Module, str]:
        pid = plugin.id
        path = Path(plugin.entrypoint)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise PluginLoadError(
                f"plugin {pid}: cannot read {path}: {exc.strerror}", plugin_id=pid
            ) from None
        if data[:4] != WASM_MAGIC:
            raise PluginLoadError(
                f"plugin {pid}: {path} is not a WebAssembly module (it does not start with \\0asm)",
                plugin_id=pid,
            )
        import hashlib

        digest = hashlib.sha256(data).hexdigest()
        _check_digests(plugin, digest)  # these bytes, and only these, are compiled
        try:
            return self._engine.module(data, digest), digest
        except wasmtime.WasmtimeError as exc:
            detail = str(exc).strip().replace("\n", "; ")
            raise PluginLoadError(
                f"plugin {pid}: {path} is not a valid WebAssembly module: {detail}", plugin_id=pid
            ) from None

    async def start(self, plugin: Plugin, sandbox: SandboxConfig, *, generation: int) -> WasmHandle:
        self._check_sandbox(plugin, sandbox)
        grants, fallbacks = open_grants(
            sandbox,
            f"plugin {plugin.id}",
            plugin_id=plugin.id,
            grant_owner=self._grant_owner,
            fallbacks=self._fallbacks,
        )
        try:
            handle = await self._make_handle(plugin, sandbox, grants)
            handle.fallbacks = fallbacks
        except BaseException:
            for grant in grants:
                grant.close()
            raise
        await handle.start()  # closes the handle, and with it the grants, if it fails
        return handle

    async def _make_handle(
        self, plugin: Plugin, sandbox: SandboxConfig, grants: tuple[OpenedPath, ...]
    ) -> WasmHandle:
        loop = asyncio.get_running_loop()
        module, digest = await loop.run_in_executor(self._engine.executor, self._compile, plugin)
        pool = self._pool_size
        try:
            layout = Layout.of(plugin, module)
            if pool > 1 and layout.has_state:
                raise PluginLoadError(
                    f"plugin {plugin.id}: exports state, so it must run as one instance; the "
                    f"host's wasm_instances = {pool} would split its state",
                    plugin_id=plugin.id,
                )
            handle = WasmHandle(
                plugin,
                sandbox,
                self._engine,
                module,
                digest,
                layout,
                pool_size=pool,
                egress=self._egress,
                grants=grants,
            )
        except BaseException:
            self._engine.release(digest)
            raise
        handle._max_output = self._max_frame
        return handle


def _check_digests(plugin: Plugin, digest: str) -> None:
    """The module's bytes, read once and hashed (``digest``), against everything that vouches
    for them: the manifest's sha256, and a checksum recorded for this load (a bare module's
    own digest, or the tree checksum of its directory with the module counted as the bytes
    in hand). IntegrityError on a mismatch: the file changed after it was checked."""
    root, entry = plugin.root, plugin.entrypoint
    rel = "" if plugin.is_bare_file else entry.relative_to(root).as_posix()
    for path, expected, what in plugin.digests():
        if path == rel:
            actual = digest
        elif path == "":  # the directory: the module as compiled, the rest as it is now
            actual = tree_checksum(root, known={rel: digest}).removeprefix("sha256:")
        else:
            continue  # plugin.toml: the supervisor's own parse, not code that runs
        if actual != expected:
            raise IntegrityError(
                f"plugin {plugin.id}: the module read to be compiled ({entry}) has sha256 "
                f"{actual if path == rel else digest}, which does not match {what} "
                f"({expected}); the file changed after it was checked, and nothing of it ran",
                plugin_id=plugin.id,
            )
