"""``sandboxer serve``: the supervisor as one privileged daemon for many tenants (DESIGN
section 10b).

Clients connect to its Unix socket and speak newline-delimited JSON-RPC 2.0 (the framing of
DESIGN section 7). Who a client is comes from the kernel (SO_PEERCRED: uid, gid, pid;
SO_PEERGROUPS), never from anything it says: root is the administrator and sees every
plugin; any other caller must belong to a tenant of the host config, or its connection is
refused. Each tenant has a PluginManager of its own, run under the host config narrowed by
the tenant's ceilings (``_tenants.Tenant.policy``), so its plugin ids are its own and its
plugins can never be told apart from, or reach, another tenant's.

A tenant's plugin is loaded from a snapshot (``snapshot.snapshot_as``): its files read by a
walker running with the caller's own uid and groups, copied into a directory of the
daemon's; the daemon never reads a tenant's path with root's rights. The path must lie under
one of the tenant's ``path_roots``.

Methods (params by name): load {path, config?} (or {registry_id, version?, config?}: from the
host's registry, verified with the host's keys), call {plugin, method, args?, timeout?},
reload {plugin}, unload {plugin}, restart {plugin}, list {}, stats {plugin}, subscribe {}
(then "event" notifications). The administrator may add ``tenant`` to act on a tenant's
plugins. Every load, reload, unload, restart and refusal is an audit line
(logger ``sandboxer.audit``) with the caller's uid and pid.

Bounds on clients (``Limits``): connections in all and per uid, requests in flight per
connection, the frame size, the time a frame may take to arrive once begun (a slow client
cannot hold a connection half-sent), and the time a reply may wait for a client that does
not read (then it is cut off; an event subscriber that falls behind the event buffer too).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import resource
import shutil
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .._tenants import Tenant, as_mapping, identify
from ..config import HostConfig
from ..errors import (
    INVALID_PARAMS,
    SandboxerError,
)
from ..manager import LoadedPlugin, PluginManager
from ..rpc.client import Relay
from ..sandbox.policy import path_under
from . import DEFAULT_SOCKET
from .connection import Connection, Refused, peer_credentials
from .snapshot import Caller, snapshot_as

__all__ = ["Daemon", "Limits", "DEFAULT_SOCKET", "peer_credentials"]

log = logging.getLogger("sandboxer.daemon")
audit = logging.getLogger("sandboxer.audit")

# Tenants' snapshots, root's alone: on disk, not in /run's tmpfs (a copy may be 512 MiB).
STAGING = "/var/lib/sandboxer/staging"
ADMIN = "root"
LATENCY_WINDOW = 1024  # calls per plugin whose durations status reports quantiles of
_HIGH_WATER = 64 << 10
_ROOT_CALLER = Caller(
    uid=0, gid=0, groups=()
)  # replies buffered for a client before one waits for it to read


@dataclass(frozen=True, slots=True)
class Limits:
    connections: int = 512
    connections_per_uid: int = 64
    in_flight: int = 64  # requests of one connection at once
    frame_seconds: float = 10.0  # a frame begun must end within this
    write_seconds: float = 10.0  # a reply may wait this long for a client that does not read
    garbage_frames: int = 8  # frames that are not requests before the connection is cut


@dataclass(eq=False)
class Space:
    """One tenant's plugins (the administrator's too): its manager and what it holds."""

    tenant: Tenant | None  # None: the administrator's own
    manager: PluginManager
    sources: dict[str, str] = field(default_factory=dict)  # plugin id -> the path asked for
    staged: dict[str, str] = field(default_factory=dict)  # plugin id -> its snapshot dir
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # plugin id -> the durations (s) of its last calls through the daemon, for status
    latency: dict[str, collections.deque[float]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.tenant.name if self.tenant is not None else ADMIN


class Daemon:
    """The daemon: ``await start()``, then ``await serve_until_stopped()``; SIGTERM (or
    ``stop()``) drains and unloads everything."""

    def __init__(
        self,
        config: HostConfig,
        socket_path: str = DEFAULT_SOCKET,
        *,
        limits: Limits = Limits(),
        config_path: str | None = None,
        staging: str = STAGING,
        metrics: str | None = None,
    ) -> None:
        self.config = config
        self.socket_path = socket_path
        self.limits = limits
        self.config_path = config_path
        self.staging = staging
        self.spaces: dict[str, Space] = {}
        self._server: asyncio.Server | None = None
        self._connections: set[Connection] = set()
        self.followers: set[Callable[[Space], None]] = set()  # administrator subscriptions
        self._stopped = asyncio.Event()
        self._own_socket = True
        self.metrics = metrics  # HOST:PORT of the Prometheus listener, if any
        self._metrics: asyncio.Server | None = None

    # -- start and stop ----------------------------------------------------------------------
    async def start(self, sock: socket.socket | None = None) -> None:
        """Listen (on ``sock`` when systemd passed one), remove what a dead daemon left, and
        tell systemd we are ready. SIGTERM and SIGINT stop it from now on, SIGHUP reads
        the config again."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload_config)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # connections, and the plugins' sockets and pipes
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        os.makedirs(self.staging, mode=0o700, exist_ok=True)
        os.chmod(self.staging, 0o700)
        for leftover in os.listdir(self.staging):  # a dead daemon's snapshots
            shutil.rmtree(os.path.join(self.staging, leftover), ignore_errors=True)
        self._own_socket = sock is None  # systemd's stays, for the next start
        if sock is None:
            sock = _bind(self.socket_path)
        self._server = await asyncio.get_running_loop().create_unix_server(
            lambda: Connection(self), sock=sock
        )
        if self.metrics is not None:
            from .metrics import serve_metrics

            self._metrics = await serve_metrics(
                self.metrics, lambda: self.status(_ROOT_CALLER, None, {})
            )
        admin = self.space(None)
        await admin.manager.swept()
        _notify("READY=1")
        log.info("sandboxer serve: listening on %s", self.socket_path)

    def stop(self) -> None:
        self._stopped.set()

    def reload_config(self) -> None:
        """SIGHUP: read the host config again. Tenants added, changed or removed take effect
        for new requests; plugins already running keep the sandbox they started with."""
        if self.config_path is None:
            log.warning("SIGHUP: no config file to read again (started without --config)")
            return
        _notify("RELOADING=1")
        try:
            self.config = HostConfig.load(self.config_path)
            for space in self.spaces.values():
                if space.tenant is not None:
                    space.tenant = next(
                        (t for t in self.config.tenants if t.name == space.tenant.name),
                        space.tenant,
                    )
            log.info(
                "SIGHUP: %s read again (%d tenants)", self.config_path, len(self.config.tenants)
            )
        except SandboxerError as exc:
            log.error("SIGHUP: %s kept as it was: %s", self.config_path, exc)
        _notify("READY=1")

    async def serve_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            await self._stopped.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self.aclose()

    async def aclose(self) -> None:
        """Stop listening, cut every client, unload every plugin (each drained), exit."""
        _notify("STOPPING=1")
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._server is not None:
            self._server.close()
            self._server = None
            if self._own_socket:
                with contextlib.suppress(OSError):
                    os.unlink(self.socket_path)
        for connection in list(self._connections):
            await connection.abort()
        for space in list(self.spaces.values()):
            await space.manager.aclose()
            for staged in space.staged.values():
                shutil.rmtree(staged, ignore_errors=True)
        self.spaces.clear()

    # -- tenants -----------------------------------------------------------------------------
    def space(self, tenant: Tenant | None) -> Space:
        name = tenant.name if tenant is not None else ADMIN
        space = self.spaces.get(name)
        if space is None:
            config = tenant.policy(self.config) if tenant is not None else self.config
            space = self.spaces[name] = Space(tenant, PluginManager(config=config))
            for follow in list(self.followers):  # the administrator's event subscriptions
                follow(space)
        return space

    def _who(self, caller: Caller) -> Tenant | None:
        """The caller's tenant; None for the administrator; Refused for anyone else."""
        if caller.uid == 0:
            return None
        tenant = identify(self.config.tenants, caller.uid, caller.gid, caller.groups)
        if tenant is None:
            raise Refused(f"uid {caller.uid} belongs to no tenant of this daemon")
        return tenant

    # -- connections -------------------------------------------------------------------------
    def admit(self, caller: Caller) -> Tenant | None:
        """Whether ``caller`` may hold one more connection, and its tenant; Refused if not."""
        if len(self._connections) >= self.limits.connections:
            raise Refused(f"the daemon holds {self.limits.connections} connections")
        held = sum(1 for c in self._connections if c.caller.uid == caller.uid)
        if held >= self.limits.connections_per_uid:
            raise Refused(f"uid {caller.uid} holds {held} connections already")
        return self._who(caller)

    # -- the methods -------------------------------------------------------------------------
    def _target(self, caller: Tenant | None, params: dict[str, Any]) -> Space:
        """The space a request acts in: the caller's, or (the administrator) the one named."""
        named = params.get("tenant")
        if named is None:
            return self.space(caller)
        if caller is not None:
            raise Refused("only the administrator names a tenant", INVALID_PARAMS)
        tenant = next((t for t in self.config.tenants if t.name == named), None)
        if tenant is None and named != ADMIN:
            raise Refused(f"no tenant {named!r}", INVALID_PARAMS)
        return self.space(tenant)

    async def load(self, who: Caller, tenant: Tenant | None, params: dict[str, Any]) -> Any:
        config = params.get("config")
        if config is not None and not isinstance(config, dict):
            raise Refused("config must be an object", INVALID_PARAMS)
        if "registry_id" in params:
            return await self._load_from_registry(who, tenant, params, config)
        path = _text(params, "path")
        if not os.path.isabs(path):
            raise Refused(f"path must be absolute, not {path!r}", INVALID_PARAMS)
        space = self._target(tenant, params)
        async with space.lock:
            if space.tenant is None:
                plugin = await space.manager.load(path, config=config)
            else:
                plugin = await self._load_for(space, who, path, config)
        audit.info(
            "load uid=%d pid=%d tenant=%s plugin=%s path=%s",
            who.uid,
            who.pid,
            space.name,
            plugin.id,
            path,
        )
        return _describe(plugin, space)

    async def _load_from_registry(
        self,
        who: Caller,
        tenant: Tenant | None,
        params: dict[str, Any],
        config: dict[str, Any] | None,
    ) -> Any:
        """``registry_id`` at ``version`` from the host's registry, verified against the host's
        trusted keys: the operator's registry, fetched into the operator's cache, so no path
        of the caller's is read (and a caller names neither registry nor keys)."""
        space = self._target(tenant, params)
        plugin_id = _text(params, "registry_id")
        version = params.get("version", "latest")
        if not isinstance(version, str) or not version:
            raise Refused("version must be a non-empty string", INVALID_PARAMS)
        async with space.lock:
            if space.tenant is not None:
                loaded = await space.manager.list()
                if len(loaded) >= space.tenant.max_plugins:
                    raise Refused(
                        f"tenant {space.name} runs {len(loaded)} plugins: its max_plugins"
                    )
            plugin = await space.manager.load_from_registry(plugin_id, version, config=config)
        audit.info(
            "load uid=%d pid=%d tenant=%s plugin=%s registry=%s@%s",
            who.uid,
            who.pid,
            space.name,
            plugin.id,
            plugin_id,
            version,
        )
        return _describe(plugin, space)

    async def _load_for(
        self, space: Space, who: Caller, path: str, config: dict[str, Any] | None
    ) -> LoadedPlugin:
        tenant = space.tenant
        assert tenant is not None
        normal = os.path.normpath(path)
        if not any(path_under(normal, root) for root in tenant.path_roots):
            raise Refused(
                f"{path} is not under the path_roots of tenant {tenant.name} "
                f"({', '.join(tenant.path_roots)})"
            )
        loaded = await space.manager.list()
        if len(loaded) >= tenant.max_plugins:
            raise Refused(f"tenant {tenant.name} runs {len(loaded)} plugins: its max_plugins")
        staged = os.path.join(self.staging, f"{space.name}-{os.urandom(8).hex()}")
        os.mkdir(staged, 0o700)
        try:
            copy = await snapshot_as(who, normal, staged)
            await self._within_quota(space, copy)
            loaded_plugin = await space.manager.load(copy, config=config)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        space.sources[loaded_plugin.id] = normal
        space.staged[loaded_plugin.id] = staged
        return loaded_plugin

    def _call_of(
        self, tenant: Tenant | None, params: dict[str, Any]
    ) -> tuple[LoadedPlugin, str, list[Any], float | None, collections.deque[float]]:
        """What a call request names: the plugin, method, arguments and timeout, checked, and
        the window its latency goes into."""
        space = self._target(tenant, params)
        plugin = space.manager.get(_text(params, "plugin"))
        args = params.get("args", [])
        timeout = params.get("timeout")
        if not isinstance(args, list):
            raise Refused("args must be an array", INVALID_PARAMS)
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
        ):
            raise Refused("timeout must be a positive number of seconds", INVALID_PARAMS)
        latency = space.latency.get(plugin.id)
        if latency is None:
            latency = space.latency[plugin.id] = collections.deque(maxlen=LATENCY_WINDOW)
        return plugin, _text(params, "method"), args, timeout, latency

    async def call(self, who: Caller, tenant: Tenant | None, params: dict[str, Any]) -> Any:
        plugin, method, args, timeout, latency = self._call_of(tenant, params)
        t0 = time.perf_counter()
        try:
            return await plugin.call(method, *args, timeout=timeout)
        finally:
            latency.append(time.perf_counter() - t0)

    def relay(
        self,
        who: Caller,
        tenant: Tenant | None,
        params: dict[str, Any],
        then: Callable[[Any, BaseException | None], None],
    ) -> Relay | None:
        """``call`` without a task: the request goes to the plugin in the loop pass it
        arrived and ``then(result, error)`` runs in the pass its answer arrives (two loop
        passes in the daemon per call instead of four). None: use ``call``."""
        plugin, method, args, timeout, latency = self._call_of(tenant, params)
        t0 = time.perf_counter()

        def done(result: Any, error: BaseException | None) -> None:
            latency.append(time.perf_counter() - t0)
            then(result, error)

        return plugin.relay(method, args, timeout, done)

    async def unload(self, who: Caller, tenant: Tenant | None, params: dict[str, Any]) -> Any:
        space = self._target(tenant, params)
        plugin_id = _text(params, "plugin")
        await space.manager.unload(plugin_id)
        space.sources.pop(plugin_id, None)
        space.latency.pop(plugin_id, None)
        staged = space.staged.pop(plugin_id, None)
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
        audit.info(
            "unload uid=%d pid=%d tenant=%s plugin=%s", who.uid, who.pid, space.name, plugin_id
        )
        return {"unloaded": plugin_id}

    async def reload(self, who: Caller, tenant: Tenant | None, params: dict[str, Any]) -> Any:
        space = self._target(tenant, params)
        plugin_id = _text(params, "plugin")
        plugin = space.manager.get(plugin_id)
        if space.tenant is not None:  # a fresh snapshot, read as this caller, swapped in
            async with space.lock:
                await self._restage(space, who, plugin_id)
        await space.manager.reload(plugin_id)
        audit.info(
            "reload uid=%d pid=%d tenant=%s plugin=%s", who.uid, who.pid, space.name, plugin_id
        )
        return _describe(plugin, space)

    async def _within_quota(self, space: Space, copy: str, replacing: str | None = None) -> None:
        """Refused when the plugin at ``copy`` would take its tenant past ``max_memory`` (the
        generation it replaces, on a reload, not counted twice)."""
        tenant = space.tenant
        if tenant is None or tenant.max_memory is None:
            return
        from ..manifest import load_plugin

        plugin = await asyncio.to_thread(load_plugin, copy)
        wanted = space.manager.resolve_sandbox(plugin).memory_limit
        used = sum(
            p.sandbox.memory_limit
            for p in await space.manager.list()
            if p.sandbox is not None and p.id != replacing
        )
        if used + wanted > tenant.max_memory:
            raise Refused(
                f"tenant {tenant.name}: its plugins' memory limits would come to "
                f"{used + wanted} bytes, over its max_memory of {tenant.max_memory}"
            )

    async def _restage(self, space: Space, who: Caller, plugin_id: str) -> None:
        """A fresh snapshot, read as ``who``, checked against the tenant's quota, swapped in
        for the next generation (a refused one leaves the last copy in place)."""
        staged = space.staged[plugin_id]
        fresh = f"{staged}.next"
        shutil.rmtree(fresh, ignore_errors=True)
        os.mkdir(fresh, 0o700)
        try:
            copy = await snapshot_as(who, space.sources[plugin_id], fresh)
            await self._within_quota(space, copy, replacing=plugin_id)
            current = os.path.join(staged, os.path.basename(copy))
            old = f"{staged}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(current, old)
            os.rename(copy, current)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(fresh, ignore_errors=True)

    async def restart(self, who: Caller, tenant: Tenant | None, params: dict[str, Any]) -> Any:
        space = self._target(tenant, params)
        plugin_id = _text(params, "plugin")
        plugin = await space.manager.restart(plugin_id)
        audit.info(
            "restart uid=%d pid=%d tenant=%s plugin=%s", who.uid, who.pid, space.name, plugin_id
        )
        return _describe(plugin, space)

    async def list(self, who: Caller, tenant: Tenant | None, params: dict[str, Any]) -> Any:
        spaces = (
            list(self.spaces.values())
            if tenant is None and "tenant" not in params
            else [self._target(tenant, params)]
        )
        return [_describe(p, space) for space in spaces for p in await space.manager.list()]

    async def status(self, who: Caller, tenant: Tenant | None, params: dict[str, Any]) -> Any:
        """Tenants and plugins as ``sandboxer status`` shows them (the administrator: all)."""
        spaces = list(self.spaces.values()) if tenant is None else [self.space(tenant)]
        plugins = []
        for space in spaces:
            for plugin in await space.manager.list():
                stats = plugin.statistics()
                latency = sorted(space.latency.get(plugin.id, ()))
                plugins.append(
                    {
                        "tenant": space.name,
                        "id": plugin.id,
                        "version": plugin.version,
                        "state": plugin.state.value,
                        "generation": plugin.generation,
                        "restarts": stats.restarts,
                        "calls": stats.calls,
                        "failures": stats.failures,
                        "in_flight": stats.in_flight,
                        "memory_peak_bytes": stats.peak_memory_bytes,
                        "memory_limit_bytes": plugin.sandbox.memory_limit
                        if plugin.sandbox
                        else None,
                        "cpu_time_s": stats.cpu_time_s,
                        "p50_s": _quantile(latency, 0.5),
                        "p99_s": _quantile(latency, 0.99),
                    }
                )
        tenants = self.config.tenants if tenant is None else (tenant,)
        return {"tenants": [as_mapping(t) for t in tenants], "plugins": plugins}

    async def stats(self, who: Caller, tenant: Tenant | None, params: dict[str, Any]) -> Any:
        space = self._target(tenant, params)
        plugin = space.manager.get(_text(params, "plugin"))
        return {**_describe(plugin, space), "statistics": plugin.statistics().to_json()}


def _describe(plugin: LoadedPlugin, space: Space) -> dict[str, Any]:
    return {
        "id": plugin.id,
        "version": plugin.version,
        "state": plugin.state.value,
        "generation": plugin.generation,
        "methods": list(plugin.methods),
        "tenant": space.name,
        "started_warm": plugin.started_warm,
        "error": plugin.error.to_json() if plugin.error else None,
    }


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _text(params: dict[str, Any], key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        raise Refused(f"{key} must be a non-empty string", INVALID_PARAMS)
    return value


def _bind(path: str) -> socket.socket:
    """The listening socket at ``path``: any local user may connect (who they are comes from
    the kernel). A socket left by a dead daemon is replaced; one that answers is not."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno != 98:  # EADDRINUSE
                raise
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise OSError(exc.errno, f"another daemon answers on {path}") from None
            except ConnectionRefusedError:
                os.unlink(path)  # stale
            finally:
                probe.close()
            sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _notify(state: str) -> None:
    """sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, if there is one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(address)
        s.sendall(state.encode())


def systemd_socket() -> socket.socket | None:
    """The listening socket systemd passed (socket activation: LISTEN_PID, LISTEN_FDS)."""
    if (
        os.environ.get("LISTEN_PID") != str(os.getpid())
        or int(os.environ.get("LISTEN_FDS", "0")) < 1
    ):
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return socket.socket(fileno=3)
