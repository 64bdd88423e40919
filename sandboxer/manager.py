"""PluginManager: load, call, reload, unload and observe plugins of every kind.

The manager owns every plugin it loaded and every generation of each. It picks a loader by
the plugin's kind and effective sandbox, starts, health-checks and retires generations, and
emits an event for every state change. Each plugin's state lives in its ``Lifecycle``
(``_lifecycle``: the states, their one transition table, the generations) and changes only
through its methods; a reload's order is ``reload``'s. ``LoadedPlugin`` is the caller's view
of a plugin and routes its calls to the current generation. The manager never runs plugin
code itself; loaders and their handles do.

Concurrency: operations on one plugin id (load, reload, unload) are serialised by a per-id
lock; calls are not serialised and may be many at once. Loading an id that is loaded is
refused; a second unload of the same id waits for the first and returns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import re
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._digest import tree_checksum
from ._lifecycle import SERVING, Generation, Lifecycle, PluginState
from ._loaded import LoadedPlugin
from ._restart import RestartPolicy, Restarts, parse_restart
from ._trusted_keys import TrustedKey
from .config import HostConfig
from .errors import (
    ConfigError,
    PluginCallError,
    PluginLoadError,
    PluginNotFound,
    PluginStateError,
    RegistryError,
    SandboxerError,
)
from .events import EventStream, PluginEvent, PluginStatistics, Subscription, utc_now
from .loaders import Loader
from .loaders.out_of_process import COMMANDS, ProcessLoader
from .loaders.python import InProcessPythonLoader
from .manifest import LoaderType, Plugin, Protocol, load_plugin, verify_integrity
from .reload import ReloadHost, reload_generation, reload_on_change
from .sandbox.egress import EgressProxy
from .sandbox.policy import SandboxConfig, SandboxRequest, effective_config
from .sandbox.pool import SandboxPool

if TYPE_CHECKING:  # wasmtime, like grpcio, is imported with the first plugin of its kind
    from .loaders.wasm import WasmEngine, WasmLoader

__all__ = ["PluginManager", "LoadedPlugin", "PluginEvent", "PluginStatistics", "EventStream"]

log = logging.getLogger("sandboxer")


@dataclass(slots=True)
class _Entry:
    """The manager's record of one plugin it loaded."""

    loaded: LoadedPlugin
    life: Lifecycle
    sandbox: SandboxConfig | None  # the operator's explicit sandbox, for every generation
    config: dict[str, Any]  # overrides of the manifest's [config] handed to init()
    files_checksum: str | None = None  # hot reload: the running generation's files
    # A registry install: the tree checksum its signed archive unpacks to, which every
    # generation's files must have
    pinned: str | None = None
    unloading: bool = False
    unloaded: asyncio.Event = field(default_factory=asyncio.Event)


class PluginManager:
    """Loads and runs plugins under the host's policy (DESIGN section 3).

    Use as ``async with PluginManager(config=HostConfig.load()) as mgr``; leaving the block
    unloads every plugin (each drained, shut down and closed).
    """

    def __init__(
        self,
        config: HostConfig | None = None,
        *,
        drain_timeout: float | None = None,
        hot_reload: bool = False,
        reload_debounce: float = 0.2,
    ) -> None:
        self.config = config if config is not None else HostConfig()
        self.hot_reload = hot_reload
        self.reload_debounce = reload_debounce
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self.drain_timeout = self.config.drain_timeout if drain_timeout is None else drain_timeout
        self._plugins: dict[str, _Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._subscribers: set[Subscription] = set()
        self._closed = False
        self._in_process_python = InProcessPythonLoader()
        self._egress = EgressProxy.from_config(self.config)
        self._process_loaders = {
            kind: ProcessLoader(
                kind,
                handshake_timeout=self.config.handshake_timeout,
                setup_timeout=self.config.setup_timeout,
                max_frame=self.config.max_frame,
                profile_dirs=self.config.profile_dirs,
                fallbacks=self.config.fallbacks,
                egress=self._egress,
                grant_owner=self.config.grant_owner,
            )
            for kind in COMMANDS
        }
        self._wasm_engine: WasmEngine | None = None  # made on the first wasm plugin
        self._wasm_loader: WasmLoader | None = None
        self._grpc_loader: Loader | None = None
        # Tasks the manager owns (health checks, cleanup after a crash); awaited at close.
        self._background: set[asyncio.Task[None]] = set()
        self._health_task: asyncio.Task[None] | None = None
        self._pool: SandboxPool | None = None  # warm sandboxes: made at the first need
        try:
            policy = RestartPolicy(
                parse_restart(self.config.restart),
                self.config.restart_backoff,
                self.config.restart_backoff_max,
                self.config.quarantine_after,
                self.config.quarantine_window,
            )
        except ValueError as exc:
            raise ConfigError(self.config.source or "HostConfig", "restart", str(exc)) from None
        self._restarts = Restarts(policy, self._restart_due)
        self._defaults_kept = False  # the warm_profiles shapes, kept from the first load of one
        self._sweep: asyncio.Task[None] | None = None  # dead supervisors' cgroups, removed once

    async def __aenter__(self) -> PluginManager:
        self._sweep_once()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Unload every plugin and end every event stream; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        for plugin_id in list(self._plugins):
            try:
                await self.unload(plugin_id)
            except PluginNotFound:
                pass
            except Exception as exc:  # keep closing the others; report after
                errors.append(exc)
        if self._health_task is not None:
            self._health_task.cancel()
        if self._pool is not None:
            await self._pool.aclose()
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for subscription in list(self._subscribers):
            subscription.offer(None)
        self._subscribers.clear()
        if self._wasm_engine is not None:
            await asyncio.to_thread(self._wasm_engine.close)
            self._wasm_engine = self._wasm_loader = None
        self._egress.close()
        if errors:
            raise errors[0]

    def _sweep_once(self) -> None:
        """Once per manager, in the background: remove the plugin cgroups that supervisors
        killed before they could (SIGKILL) left behind (``CgroupBackend.sweep``)."""
        if self._sweep is None and not self._closed:
            self._sweep = self._spawn(asyncio.to_thread(self._swept))

    def _swept(self) -> None:
        try:
            removed = self._process_loaders[LoaderType.PYTHON].cgroups().sweep()
        except SandboxerError:
            return  # no cgroups here: the first sandboxed load says so
        if removed:
            log.info("removed %d cgroup(s) left by supervisors now gone", len(removed))

    async def swept(self) -> None:
        """Wait until that removal is done (tests and the daemon's start)."""
        self._sweep_once()
        if self._sweep is not None:
            await asyncio.shield(self._sweep)

    # -- events ------------------------------------------------------------------------------
    def events(self) -> EventStream:
        """Subscribe to events (every state change, reloads, failures) from now on."""
        return EventStream(Subscription(self._subscribers))

    def _emit(
        self, life: Lifecycle, type_: str, previous: PluginState | None, error: str | None = None
    ) -> None:
        """Every plugin's events come through here (its Lifecycle's ``on_event``)."""
        event = PluginEvent(
            type=type_,
            plugin_id=life.id,
            state=life.state,
            previous=previous,
            generation=life.generation,
            version=life.plugin.version,
            at=utc_now(),
            error=error,
        )
        log.debug("plugin %s: %s %s", life.id, type_, life.state.value)
        for subscription in list(self._subscribers):
            subscription.offer(event)

    # -- queries -----------------------------------------------------------------------------
    async def list(self) -> list[LoadedPlugin]:
        return [entry.loaded for entry in self._plugins.values()]

    def get(self, plugin_id: str) -> LoadedPlugin:
        return self._entry(plugin_id).loaded

    def _entry(self, plugin_id: str) -> _Entry:
        try:
            return self._plugins[plugin_id]
        except KeyError:
            raise PluginNotFound(
                f"no plugin {plugin_id!r} is loaded (loaded: "
                f"{', '.join(sorted(self._plugins)) or 'none'})",
                plugin_id=plugin_id,
            ) from None

    def _lock(self, plugin_id: str) -> asyncio.Lock:
        return self._locks.setdefault(plugin_id, asyncio.Lock())

    # -- sandbox and loader choice -----------------------------------------------------------
    def resolve_sandbox(
        self, plugin: Plugin, explicit: SandboxConfig | None = None
    ) -> SandboxConfig:
        """The sandbox a plugin would get: ``explicit`` if given, else its request clamped."""
        if explicit is not None:
            return explicit
        return effective_config(plugin.sandbox, self.config, plugin_id=plugin.id)

    def _warm_pool(self, *, defaults: bool = True) -> SandboxPool | None:
        """The warm sandboxes (python, native, external and gRPC plugins), made on first need
        and then kept filled: with ``defaults`` (the first python, native or external load),
        the shape of a python plugin that asks for nothing but a profile of
        ``warm_profiles``; and (``warm_learn``) every shape a load started cold. None when
        the host config keeps none."""
        if self._pool is None and self.config.warm_sandboxes > 0 and not self._closed:
            self._pool = SandboxPool(
                self._process_loaders[LoaderType.PYTHON].make_warm,
                size=self.config.warm_sandboxes,
                memory_budget=self.config.warm_memory_budget,
                min_available=self.config.warm_min_available,
                learn=self.config.warm_learn,
            )
            for kind in (LoaderType.PYTHON, LoaderType.NATIVE, LoaderType.EXTERNAL):
                self._process_loaders[kind].pool = self._pool
        if self._pool is not None and defaults and not self._defaults_kept:
            self._defaults_kept = True
            host = self._process_loaders[LoaderType.PYTHON]
            for profile in self.config.warm_profiles:
                try:
                    sandbox = effective_config(SandboxRequest(profile=profile), self.config)
                except PluginLoadError as exc:  # a profile the host policy does not allow
                    log.warning("warm_profiles: %s: no sandboxes of it are made ahead", exc)
                    continue
                template = host.warm_template_for(sandbox)
                if template is not None:
                    self._pool.keep(template)
        return self._pool

    @property
    def warm_pool(self) -> SandboxPool | None:
        """The warm sandboxes, once made (None before the first need, or when the host config
        keeps none)."""
        return self._pool

    async def warm_up(self) -> None:
        """Make the warm sandboxes now and wait until they are ready (otherwise the first
        python or native load makes them, in the background, and starts cold itself)."""
        pool = self._warm_pool()
        if pool is not None:
            await pool.filled()

    def _loader_for(self, plugin: Plugin, sandbox: SandboxConfig) -> Loader:
        if not sandbox.enabled:
            if plugin.type not in (LoaderType.PYTHON, LoaderType.NATIVE):
                raise PluginLoadError(
                    f"plugin {plugin.id}: {plugin.type.value} plugins always run sandboxed; "
                    "only python and native plugins may run unsandboxed in-process",
                    plugin_id=plugin.id,
                )
            if not self.config.allow_unsandboxed:
                raise PluginLoadError(
                    f"plugin {plugin.id}: the host policy ({self.config.source or 'HostConfig'})"
                    " does not allow unsandboxed plugins (allow_unsandboxed = false)",
                    plugin_id=plugin.id,
                )
            if plugin.type is LoaderType.PYTHON:
                return self._in_process_python
        if plugin.type is LoaderType.WASM:
            if self._wasm_loader is None:
                from .loaders.wasm import WasmEngine, WasmLoader

                self._wasm_engine = WasmEngine()
                self._wasm_loader = WasmLoader(
                    self._wasm_engine,
                    pool_size=self.config.wasm_instances,
                    max_frame=self.config.max_frame,
                    egress=self._egress,
                    fallbacks=self.config.fallbacks,
                    grant_owner=self.config.grant_owner,
                )
            return self._wasm_loader
        loader = self._process_loaders.get(plugin.type)
        if loader is not None and plugin.protocol is Protocol.GRPC:
            self._warm_pool(defaults=False)  # its shapes are learnt: no python ones for it
            if self._grpc_loader is None:
                from .loaders.grpc.loader import GrpcLoader  # grpcio: imported when first used

                self._grpc_loader = GrpcLoader(loader)
            return self._grpc_loader
        if loader is None:
            raise PluginLoadError(
                f"plugin {plugin.id}: this build of sandboxer cannot load {plugin.type.value} "
                f"plugins yet",
                plugin_id=plugin.id,
            )
        if not self._defaults_kept:
            self._warm_pool()
        return loader

    async def _start_generation(
        self, entry: _Entry, plugin: Plugin, sandbox: SandboxConfig, number: int
    ) -> Generation:
        """Start, init and health-check one generation; on any failure nothing is left."""
        loader = self._loader_for(plugin, sandbox)
        handle = await loader.start(plugin, sandbox, generation=number)
        try:
            try:
                await handle.init({**plugin.config, **entry.config})
            except PluginCallError as exc:
                raise PluginLoadError(
                    f"plugin {plugin.id}: init failed: {exc}", plugin_id=plugin.id
                ) from exc
            health = await handle.health()
            if not health.ok:
                raise PluginLoadError(
                    f"plugin {plugin.id}: health check failed after init: {health.message}",
                    plugin_id=plugin.id,
                )
        except BaseException:
            await handle.close()
            raise
        gen = Generation(number, plugin, handle, sandbox)
        handle.on_failure(functools.partial(entry.life.generation_died, gen))
        return gen

    def _close_failed(self, life: Lifecycle, gen: Generation) -> asyncio.Task[None]:
        """A failed generation is closed in the background (its Lifecycle's ``close_failed``)."""
        return self._spawn(self._retire(life, gen, graceful=False))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # -- load --------------------------------------------------------------------------------
    async def load(
        self,
        path: str | os.PathLike[str],
        *,
        sandbox: SandboxConfig | None = None,
        config: Mapping[str, Any] | None = None,
        checksum: str | None = None,
    ) -> LoadedPlugin:
        """Load the plugin at ``path`` (a directory with plugin.toml, or a bare file).

        ``sandbox`` replaces the effective sandbox computed from the manifest and host policy
        (the operator's explicit choice); ``config`` overrides keys of the manifest's
        ``[config]`` handed to ``init()``; ``checksum`` (``sha256:<hex>``, as
        ``sandboxer.checksum`` and discovery give it) is what the plugin's files must hash to
        when they are copied into its sandbox, for this and every later generation (reload,
        restart): IntegrityError if they do not.
        """
        if checksum is not None and not re.fullmatch(r"sha256:[0-9a-f]{64}", checksum):
            raise ValueError(f"checksum must be 'sha256:' and 64 hex digits, not {checksum!r}")
        pinned = checksum
        if self._closed:
            raise PluginStateError("the plugin manager is closed")
        self._sweep_once()
        checksum = await asyncio.to_thread(tree_checksum, path) if self.hot_reload else None
        plugin = await asyncio.to_thread(load_plugin, path)
        # The sandbox's copy must be what was checksummed (issue 23): run nothing else.
        plugin = dataclasses.replace(plugin, checksum=pinned or checksum)
        async with self._lock(plugin.id):
            if plugin.id in self._plugins:
                raise PluginLoadError(
                    f"plugin {plugin.id} is already loaded (generation "
                    f"{self._plugins[plugin.id].life.generation}); reload or unload it first",
                    plugin_id=plugin.id,
                )
            life = Lifecycle(
                plugin,
                on_event=self._emit,
                close_failed=self._close_failed,
                on_failed=self._failed_on_its_own,
            )
            entry = _Entry(
                LoadedPlugin(life, os.fspath(path), self._egress), life, sandbox, dict(config or {})
            )
            entry.pinned = pinned
            self._plugins[plugin.id] = entry
            self._emit(life, "state", None)
            try:
                await self._bring_up(entry, plugin)
            except BaseException as exc:
                error = (
                    exc
                    if isinstance(exc, SandboxerError)
                    else PluginLoadError(
                        f"plugin {plugin.id}: load failed: {type(exc).__name__}: {exc}",
                        plugin_id=plugin.id,
                    )
                )
                life.fail(error)
                del self._plugins[plugin.id]
                entry.unloaded.set()
                if error is exc:
                    raise
                raise error from exc
            if self.hot_reload:
                entry.files_checksum = checksum
                self._watchers[plugin.id] = asyncio.ensure_future(self._watch_files(entry))
            return entry.loaded

    async def load_from_registry(
        self,
        plugin_id: str,
        version: str = "latest",
        *,
        registry: str | os.PathLike[str] | None = None,
        trusted_keys: Sequence[TrustedKey | str | os.PathLike[str]] | None = None,
        sandbox: SandboxConfig | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> LoadedPlugin:
        """Resolve ``plugin_id`` at ``version`` (exact, ``latest`` or a semver range such as
        ``^1.2``) in a registry whose signed index is not older than one seen before, fetch
        it into the cache, verify its sha256 and its signature against the trusted keys (and
        their id scopes), extract it safely and load it.

        ``registry`` and ``trusted_keys`` (paths of minisign public keys, trusted for any id,
        or ``registry.TrustedKey(path, ids=("acme.*",))``) default to the host config's
        ``registry`` and ``trusted_keys``."""
        from . import registry as _registry

        location = registry if registry is not None else self.config.registry
        if location is None:
            raise RegistryError(
                "no registry given (pass registry=, or set registry under "
                "[host] in the host config)"
            )
        key_paths = list(trusted_keys if trusted_keys is not None else self.config.trusted_keys)

        def fetch() -> _registry.Fetched:
            keys = _registry.load_trusted_keys(key_paths)
            return _registry.fetch_verified(
                _registry.Registry(location),
                plugin_id,
                version,
                trusted_keys=keys,
                cache_dir=self.config.cache_dir,
            )

        fetched = await asyncio.to_thread(fetch)
        return await self.load(
            fetched.directory, sandbox=sandbox, config=config, checksum=fetched.checksum
        )

    async def _bring_up(self, entry: _Entry, plugin: Plugin) -> None:
        life = entry.life
        await asyncio.to_thread(verify_integrity, plugin)
        sandbox = self.resolve_sandbox(plugin, entry.sandbox)
        life.transition(PluginState.INITIALIZING)
        number = life.next_number()
        life.serve(await self._start_generation(entry, plugin, sandbox, number))
        self._ensure_health_checks()

    # -- health ------------------------------------------------------------------------------
    def _ensure_health_checks(self) -> None:
        if self._health_task is None and not self._closed:
            self._health_task = asyncio.ensure_future(self._health_loop())
            self._background.add(self._health_task)
            self._health_task.add_done_callback(self._background.discard)

    async def _health_loop(self) -> None:
        """Every ``health_interval``: check each serving plugin. A failing check degrades it;
        ``health_failures`` failures in a row fail it (its generation is closed)."""
        while True:
            await asyncio.sleep(self.config.health_interval)
            for entry in list(self._plugins.values()):
                if entry.life.state in SERVING:
                    try:
                        await self.check_health(entry.life.id)
                    except SandboxerError as exc:
                        log.warning("plugin %s: health check errored: %s", entry.life.id, exc)

    async def check_health(self, plugin_id: str) -> bool:
        """Run the plugin's health check now; ready ⇄ degraded follows the answer."""
        life = self._entry(plugin_id).life
        gen = life.current
        if gen is None or life.state not in SERVING:
            return False
        health = await gen.handle.health()
        if life.current is not gen or life.state not in SERVING:
            return health.ok
        if health.ok:
            life.health_passed()
            return True
        failures = life.health_failed()
        error = PluginStateError(
            f"plugin {plugin_id}: health check failed ({failures} in a row): {health.message}",
            plugin_id=plugin_id,
        )
        if failures >= self.config.health_failures:
            life.fail_current(error)
        elif life.state is PluginState.READY:
            life.transition(PluginState.DEGRADED, error=error)
        return False

    # -- unload ------------------------------------------------------------------------------
    async def unload(self, plugin_id: str) -> None:
        """Drain (in-flight calls finish, bounded by the drain timeout), shut down, close.

        Unloading a plugin that another task is already unloading waits for that to finish.
        """
        entry = self._entry(plugin_id)
        if entry.unloading:
            await entry.unloaded.wait()
            return
        entry.unloading = True
        await self._restarts.cancel(plugin_id)
        self._restarts.forget(plugin_id)
        watcher = self._watchers.pop(plugin_id, None)
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        try:
            async with self._lock(plugin_id):
                await self._stop(entry.life)
        finally:
            self._plugins.pop(plugin_id, None)
            entry.unloaded.set()

    async def _stop(self, life: Lifecycle) -> None:
        gen = life.current
        # A failed generation may still be being closed: unload returns once it is (its
        # process reaped, its cgroup removed), not before.
        await life.wait_retired()
        if life.state in (PluginState.FAILED, PluginState.QUARANTINED):
            life.transition(PluginState.STOPPING)
        else:
            life.transition(PluginState.DRAINING)
            if gen is not None and not await gen.wait_idle(self.drain_timeout):
                log.warning(
                    "plugin %s: %d call(s) still in flight after the %gs drain "
                    "timeout; they are cancelled",
                    life.id,
                    gen.in_flight,
                    self.drain_timeout,
                )
            life.transition(PluginState.STOPPING)
        if gen is not None:
            await self._retire(life, gen, graceful=True)
        life.finish()

    async def _retire(self, life: Lifecycle, gen: Generation, *, graceful: bool) -> None:
        """Shut a generation down (its shutdown() bounded by the drain timeout) and close it."""
        try:
            if graceful:
                async with asyncio.timeout(self.drain_timeout):
                    await gen.handle.shutdown()
        except (SandboxerError, TimeoutError) as exc:
            log.warning("plugin %s: shutdown of generation %d failed: %s", life.id, gen.number, exc)
        finally:
            life.retired(gen)
            await gen.handle.close()

    # -- restart (_restart.py) ---------------------------------------------------------------
    async def restart(self, plugin_id: str) -> LoadedPlugin:
        """Start a failed or quarantined plugin again now, from its files, forgetting its
        past failures (a running one is reloaded instead). A restart that fails raises, and
        counts as a failure for the restart policy."""
        entry = self._entry(plugin_id)
        await self._restarts.cancel(plugin_id)
        async with self._lock(plugin_id):
            life = entry.life
            if entry.unloading or plugin_id not in self._plugins:
                raise PluginStateError(f"plugin {plugin_id} is being unloaded", plugin_id=plugin_id)
            if life.state not in (PluginState.FAILED, PluginState.QUARANTINED):
                raise PluginStateError(
                    f"plugin {plugin_id} is {life.state.value}; only a failed or quarantined "
                    "plugin can be restarted (reload a running one)",
                    plugin_id=plugin_id,
                )
            self._restarts.forget(plugin_id)
            try:
                await self._restart_now(entry)
            except SandboxerError:
                self._failed_on_its_own(life)
                raise
        return entry.loaded

    def _failed_on_its_own(self, life: Lifecycle) -> None:
        """Its generation crashed, broke the protocol or failed its health checks, or a
        restart failed: the restart policy decides what follows."""
        entry = self._plugins.get(life.id)
        if entry is not None and entry.life is life and not entry.unloading and not self._closed:
            self._restarts.failed(life)

    async def _restart_due(self, plugin_id: str) -> None:
        """A scheduled restart, once its backoff is over: if the plugin is still failed."""
        entry = self._plugins.get(plugin_id)
        if entry is None:
            return
        async with self._lock(plugin_id):
            if entry.unloading or entry.life.state is not PluginState.FAILED:
                return
            try:
                await self._restart_now(entry)
            except SandboxerError as exc:
                log.warning("plugin %s: restart failed: %s", plugin_id, exc)
                self._failed_on_its_own(entry.life)

    async def _restart_now(self, entry: _Entry) -> None:
        """A new generation of the plugin as it last ran (its manifest; its files as they
        are now, checked again); the caller holds the plugin's lock."""
        life = entry.life
        await life.wait_retired()
        life.transition(PluginState.LOADING)
        plugin = life.plugin
        if self.hot_reload and entry.pinned is None:  # its files as they are now
            entry.files_checksum = await asyncio.to_thread(tree_checksum, entry.loaded.source)
            plugin = dataclasses.replace(plugin, checksum=entry.files_checksum)
        try:
            await asyncio.to_thread(verify_integrity, plugin)
            sandbox = self.resolve_sandbox(plugin, entry.sandbox)
            life.transition(PluginState.INITIALIZING)
            gen = await self._start_generation(entry, plugin, sandbox, life.next_number())
        except BaseException as exc:
            life.fail(
                exc
                if isinstance(exc, SandboxerError)
                else PluginLoadError(f"plugin {life.id}: restart: {exc!r}", plugin_id=life.id)
            )
            raise
        life.serve(gen)

    # -- reload ------------------------------------------------------------------------------
    async def reload(self, plugin_id: str) -> LoadedPlugin:
        """Replace the plugin with a fresh generation from its source, migrating state.

        The old generation serves until the switch; any failure before the switch rolls back
        (ReloadError, the old generation keeps serving with its state). See ``reload.py``.
        """
        entry = self._entry(plugin_id)
        async with self._lock(plugin_id):
            if entry.unloading or plugin_id not in self._plugins:
                raise PluginStateError(f"plugin {plugin_id} is being unloaded", plugin_id=plugin_id)
            await reload_generation(
                entry.life,
                ReloadHost(
                    drain_timeout=self.drain_timeout,
                    prepare=functools.partial(self._prepare_generation, entry),
                    retire=functools.partial(self._retire, entry.life, graceful=True),
                ),
            )
        return entry.loaded

    async def _watch_files(self, entry: _Entry) -> None:
        """Hot reload: reload the plugin whenever its files change (reload.py)."""
        life = entry.life
        await reload_on_change(
            life,
            entry.loaded.source,
            debounce=self.reload_debounce,
            running=lambda: entry.files_checksum,
            reload=functools.partial(self.reload, life.id),
            stopped=lambda why: self._emit(life, "reload_failed", life.state, why),
        )

    async def _prepare_generation(self, entry: _Entry) -> Generation:
        life = entry.life
        source = entry.loaded.source
        if self.hot_reload:  # taken before reading: a change after it is seen as a change
            entry.files_checksum = await asyncio.to_thread(tree_checksum, source)
        plugin = await asyncio.to_thread(load_plugin, source)
        plugin = dataclasses.replace(
            plugin, checksum=entry.pinned or (entry.files_checksum if self.hot_reload else None)
        )
        if plugin.id != life.id:
            raise PluginLoadError(
                f"plugin {life.id}: the new files declare id {plugin.id}; "
                "a reload cannot change a plugin's id",
                plugin_id=life.id,
            )
        await asyncio.to_thread(verify_integrity, plugin)
        sandbox = self.resolve_sandbox(plugin, entry.sandbox)
        return await self._start_generation(entry, plugin, sandbox, life.next_number())
