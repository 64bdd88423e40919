"""Out-of-process plugins: the machinery shared by the python, native and external kinds.

One handle type serves all three: a process speaking the wire protocol (DESIGN section 7) on
fd 3. The loader takes the plugin's command from its kind's module (``python``, ``native``,
``external``: the plugin host ``python -m sandboxer.host`` for python and native plugins, the
executable itself for external ones), spawns it, waits for the handshake, and hands back a
``ProcessHandle``. From then on the handle turns every way the process can fail into one
named error that every pending call receives: a crash or exit is PluginCrashed (status or
signal, stderr tail), a broken frame is ProtocolError; either way the process is killed and
reaped, and the manager is told through ``on_failure``.

Every reserved method is optional (DESIGN section 7): a -32601 answer is "not implemented".
Shutdown asks, then hangs up at once, so a plugin that exits at the end of its input is gone
in milliseconds; one still running after ``SHUTDOWN_GRACE`` is killed.

The sandbox around the process is the launcher's business (sandbox/); this module never
weakens it and never runs plugin code in the supervisor.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Protocol

from .._units import format_size
from ..errors import (
    HandshakeError,
    MemoryLimitExceeded,
    MethodNotFound,
    PluginCallError,
    PluginCrashed,
    PluginLoadError,
    PluginStateError,
    SandboxerError,
)
from ..host import WARM
from ..manifest import LoaderType, Plugin
from ..rpc.client import HandshakeInfo, Relay, RpcConnection
from ..rpc.framing import DEFAULT_MAX_FRAME
from ..sandbox import cgroups
from ..sandbox import child as _process
from ..sandbox.cgroups import CgroupBackend, CgroupLimits
from ..sandbox.confinement import Confinement, launch_confined
from ..sandbox.egress import EgressProxy, network_mode
from ..sandbox.policy import SETUP_TIMEOUT, SandboxConfig
from ..sandbox.pool import SandboxPool, TooLargeForWarm, WarmSandbox
from ..sandbox.runtime import Runtime, runtime
from ..sandbox.seccomp_cache import filter_for
from ..sandbox.spec import (
    PLUGIN_MOUNT,
    Digest,
    LaunchSpec,
    Mount,
    base_mounts,
    grant_mounts,
    mask_plan,
)
from . import NO_STATE, Health, NoState, ResourceUsage, external, native, not_implemented, python
from .plugin_host import host_args

__all__ = [
    "ProcessLoader",
    "ProcessHandle",
    "plugin_command",
    "plugin_environment",
    "CommandBuilder",
    "COMMANDS",
    "SHUTDOWN_GRACE",
    "crashed",
    "crash_error",
]

log = logging.getLogger("sandboxer")

Spawner = Callable[
    [dict[str, str], int, logging.Logger], Awaitable[tuple[_process.PluginProcess, Confinement]]
]

# How long a plugin has to exit once the host has hung up (after shutdown) or sent SIGTERM
# (at close) before it is killed.
SHUTDOWN_GRACE = 2.0
_RESERVED_PREFIX = "sandboxer."


class CommandBuilder(Protocol):
    """A kind's command: the argv that runs ``plugin``, given its paths as the process sees
    them and the runtime it runs on (None: this process's own interpreter, unsandboxed)."""

    def __call__(
        self, plugin: Plugin, *, entrypoint: str, root: str, runtime: Runtime | None
    ) -> list[str]: ...


COMMANDS: Mapping[LoaderType, CommandBuilder] = MappingProxyType(
    {
        LoaderType.PYTHON: python.command,
        LoaderType.NATIVE: native.command,
        LoaderType.EXTERNAL: external.command,
    }
)
"""The kinds that run as processes, each with its module's command."""


def plugin_command(
    plugin: Plugin,
    *,
    entrypoint: str | None = None,
    root: str | None = None,
    runtime: Runtime | None = None,
) -> list[str]:
    """The argv that runs ``plugin``, by its kind: its executable, or the plugin host for
    python/native. ``entrypoint`` and ``root`` are the paths as the process sees them (inside
    the sandbox), ``runtime`` what it runs on there (none: this process's own interpreter,
    unsandboxed)."""
    build = COMMANDS.get(plugin.type)
    if build is None:
        raise PluginLoadError(
            f"plugin {plugin.id}: {plugin.type.value} plugins do not run as processes",
            plugin_id=plugin.id,
        )
    return build(
        plugin,
        entrypoint=entrypoint or str(plugin.entrypoint),
        root=root or str(plugin.root),
        runtime=runtime,
    )


def plugin_environment(cookie: str, max_frame: int) -> dict[str, str]:
    """The clean environment a plugin process starts with: nothing of the supervisor's. (A
    sandboxed one's PATH and the runtime's entries come from its LaunchSpec.)"""
    return {
        # The plugin host's interpreter (with sandboxer, for SDK plugins) comes first.
        "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",
        "LANG": "C.UTF-8",
        "SANDBOXER_RPC_FD": str(_process.RPC_FD),
        "SANDBOXER_MAGIC_COOKIE": cookie,
        "SANDBOXER_MAX_FRAME": str(max_frame),
    }


def crashed(
    plugin_id: str, proc: _process.PluginProcess, stderr: Iterable[str] | None = None
) -> PluginCrashed:
    """The PluginCrashed for a process that is gone: how it ended and its stderr tail (the
    process's own capture's, unless the caller kept ``stderr`` itself)."""
    tail = list(proc.stderr.tail if stderr is None else stderr)
    message = f"plugin {plugin_id} {proc.describe_exit()}"
    if tail:
        message += f"; last stderr: {tail[-1]}"
    return PluginCrashed(
        message,
        plugin_id=plugin_id,
        exit_status=proc.exit_status,
        signal=proc.signal,
        stderr_tail=tail,
    )


async def _raise(error: BaseException) -> Any:
    raise error


def crash_error(
    plugin_id: str,
    proc: _process.PluginProcess,
    confinement: Confinement | None,
    stderr: Iterable[str] | None = None,
) -> SandboxerError:
    """Why a plugin process ended: killed by its cgroup for memory, or ``crashed``."""
    if confinement is not None and confinement.oom_killed():
        stats = confinement.stats()
        return MemoryLimitExceeded(
            f"plugin {plugin_id} was killed for exceeding its memory limit of "
            f"{format_size(confinement.memory_limit)}; raise memory_limit (within the "
            "host policy) if it needs more",
            limit=confinement.memory_limit,
            peak=stats.memory_peak if stats else None,
            plugin_id=plugin_id,
        )
    return crashed(plugin_id, proc, stderr)


class ProcessHandle:
    """One running plugin process and its RPC connection (a ``PluginHandle``)."""

    def __init__(
        self,
        plugin: Plugin,
        sandbox: SandboxConfig,
        proc: _process.PluginProcess,
        conn: RpcConnection,
        info: HandshakeInfo,
        confinement: Confinement | None = None,
        *,
        started_warm: bool = False,
    ) -> None:
        self.plugin = plugin
        self.started_warm = started_warm  # in a sandbox made ahead (sandbox/pool.py)
        self._sandbox = sandbox
        self._proc = proc
        self._confinement = confinement
        self._conn = conn
        self._info = info
        offered = [m for m in info.methods if not m.startswith(_RESERVED_PREFIX)]
        if plugin.methods is not None:
            missing = sorted(set(plugin.methods) - set(offered)) if offered else []
            if missing:
                raise HandshakeError(
                    f"plugin {plugin.id}: the manifest lists methods the "
                    f"process does not offer: {', '.join(missing)}",
                    plugin_id=plugin.id,
                )
            offered = list(plugin.methods)
        self._methods = tuple(sorted(offered))
        self._callbacks: list[Callable[[SandboxerError], None]] = []
        self._closing = False
        self._watcher = asyncio.ensure_future(self._watch())

    # -- the PluginHandle protocol -----------------------------------------------------------
    @property
    def methods(self) -> tuple[str, ...]:
        return self._methods

    @property
    def has_state(self) -> bool:
        return {"sandboxer.export_state", "sandboxer.import_state"} <= set(self._info.methods)

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def cgroup_path(self) -> str | None:
        """The process's cgroup (v1: its memory hierarchy's directory), if it has one."""
        group = self._confinement.cgroup if self._confinement is not None else None
        return group.path if group is not None else None

    @property
    def fallbacks(self) -> tuple[str, ...]:
        """The host policy's fallbacks this process runs under (e.g. "rlimit")."""
        return self._confinement.fallbacks if self._confinement is not None else ()

    def on_failure(self, callback: Callable[[SandboxerError], None]) -> None:
        """``callback(error)`` once, when the process crashes or breaks the protocol."""
        self._callbacks.append(callback)

    def _no_method(self, method: str) -> MethodNotFound | None:
        if method.startswith(_RESERVED_PREFIX) or (self._methods and method not in self._methods):
            return MethodNotFound.of(self.plugin.id, method, self._methods)
        return None

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Awaitable[Any]:
        """Awaitable like ``async def call``; a plain function so that the hot path has one
        coroutine, the connection's, not two."""
        if (missing := self._no_method(method)) is not None:
            return _raise(missing)
        return self._conn.call(
            method, list(args), timeout=self._sandbox.timeout if timeout is None else timeout
        )

    def relay(
        self,
        method: str,
        args: list[Any],
        timeout: float | None,
        then: Callable[[Any, BaseException | None], None],
    ) -> Relay | None:
        """``call`` answered by callback (``RpcConnection.relay``): the daemon's path."""
        if (missing := self._no_method(method)) is not None:
            raise missing
        return self._conn.relay(
            method, args, timeout=self._sandbox.timeout if timeout is None else timeout, then=then
        )

    async def _lifecycle(self, method: str, *params: Any) -> tuple[bool, Any]:
        """Call a reserved method: ``(True, answer)``, or ``(False, None)`` when the plugin
        answers -32601 (it does not implement it: DESIGN section 7)."""
        try:
            return True, await self._conn.call(method, list(params), timeout=self._sandbox.timeout)
        except PluginCallError as exc:
            if not_implemented(exc):
                return False, None
            raise

    async def init(self, config: dict[str, Any]) -> None:
        await self._lifecycle("sandboxer.init", config)

    async def health(self) -> Health:
        try:
            _, answer = await self._lifecycle("sandboxer.health")
        except SandboxerError as exc:
            return Health.from_error(exc)
        return Health.from_answer(self.plugin.id, answer)

    async def shutdown(self) -> None:
        """Ask the plugin to shut down, then hang up at once: a plugin that exits at the end
        of its input is gone within milliseconds; one still running ``SHUTDOWN_GRACE``
        seconds later is killed. A failed shutdown call still ends the process, then raises."""
        self._closing = True
        error: SandboxerError | None = None
        try:
            await self._lifecycle("sandboxer.shutdown")
        except PluginCrashed:
            pass  # it exited while answering: that is what we asked for
        except SandboxerError as exc:
            error = exc
        finally:
            self._hang_up("shut down")
        if await self._proc.wait(SHUTDOWN_GRACE) is None:
            log.warning(
                "plugin %s: still running %gs after shutdown; killed",
                self.plugin.id,
                SHUTDOWN_GRACE,
            )
            self._proc.send_signal(signal.SIGKILL)
            await self._proc.wait()
        if error is not None:
            raise error

    async def export_state(self) -> Any | NoState:
        implemented, state = await self._lifecycle("sandboxer.export_state")
        return state if implemented else NO_STATE

    async def import_state(self, state: Any, from_version: str) -> None:
        implemented, _ = await self._lifecycle("sandboxer.import_state", state, from_version)
        if not implemented:
            log.info(
                "plugin %s does not implement sandboxer.import_state; this generation starts fresh",
                self.plugin.id,
            )

    def resource_usage(self) -> ResourceUsage:
        stats = self._confinement.stats() if self._confinement is not None else None
        denied = self._proc.denials
        counts = None if denied is None else dict(denied.counts)
        if stats is None:
            return ResourceUsage(denied=counts)
        return ResourceUsage(
            peak_memory_bytes=stats.memory_peak, cpu_time_s=stats.cpu_time_s, denied=counts
        )

    def _hang_up(self, why: str) -> None:
        """Close the host's end of the socket: the plugin reads the end of its input. Calls
        still in flight fail with PluginStateError; this is no failure of the plugin's."""
        self._closing = True
        if self._conn.error is None:
            self._conn.fail(
                PluginStateError(
                    f"plugin {self.plugin.id}: {why} while calls were in flight",
                    plugin_id=self.plugin.id,
                ),
                notify=False,
            )

    async def close(self) -> None:
        self._hang_up("closed")
        await self._proc.terminate(SHUTDOWN_GRACE)
        await self._proc.close()
        await self._watcher
        if self._confinement is not None:
            await self._confinement.aclose()

    # -- failure -----------------------------------------------------------------------------
    def _crash_error(self) -> SandboxerError:
        return crash_error(self.plugin.id, self._proc, self._confinement)

    def _failed(self, error: SandboxerError) -> None:
        for callback in self._callbacks:
            callback(error)

    async def _watch(self) -> None:
        """Runs for the life of the process: turns its death into PluginCrashed."""
        await self._proc.wait()
        await self._proc.output_closed(0.5)
        if self._conn.error is None:
            self._conn.fail(self._crash_error(), notify=not self._closing)


class ProcessLoader:
    """Starts out-of-process plugins of one kind (external, or python/native via the host)."""

    def __init__(
        self,
        kind: LoaderType,
        *,
        handshake_timeout: float = 10.0,
        setup_timeout: float = SETUP_TIMEOUT,
        max_frame: int = DEFAULT_MAX_FRAME,
        profile_dirs: tuple[str, ...] = (),
        fallbacks: tuple[str, ...] = (),
        egress: EgressProxy | None = None,
        grant_owner: tuple[int, int] | None = None,
    ) -> None:
        self.kind = kind
        # Warm sandboxes for the plugin host (python and native kinds): set by the manager.
        self.pool: SandboxPool | None = None
        self.egress = egress if egress is not None else EgressProxy()
        self.handshake_timeout = handshake_timeout
        self.setup_timeout = setup_timeout
        self.max_frame = max_frame
        self.profile_dirs = profile_dirs
        self.fallbacks = fallbacks
        self.grant_owner = grant_owner
        self._cgroup_backend: CgroupBackend | None = None

    async def start(
        self, plugin: Plugin, sandbox: SandboxConfig, *, generation: int
    ) -> ProcessHandle:
        """Start ``plugin`` sandboxed as ``sandbox`` says. With ``enabled=False`` the process
        runs unconfined: only tests and benchmarks of the protocol ask for that; the manager
        never does for an out-of-process plugin."""
        if not sandbox.enabled:
            return await self.start_process(plugin, sandbox, plugin_command(plugin))
        spec = self.launch_spec(plugin, sandbox)
        warm = self.take_warm(spec)
        if warm is not None:
            handle = await self._start_warm(plugin, sandbox, spec, warm)
            if handle is not None:
                return handle
        backend = self.cgroups()

        async def spawn(
            env: dict[str, str], rpc_fd: int, logger: logging.Logger
        ) -> tuple[_process.PluginProcess, Confinement]:
            return await launch_confined(
                dataclasses.replace(spec, env={**env, **spec.env}),
                backend=backend,
                rpc_fd=rpc_fd,
                logger=logger,
                fallbacks=self.fallbacks,
                egress=self.egress,
                plugin_id=plugin.id,
                setup_timeout=self.setup_timeout,
            )

        return await self.start_process(plugin, sandbox, spec.argv, spawner=spawn)

    # -- warm sandboxes (sandbox/pool.py) ----------------------------------------------------

    def warm_template(self, spec: LaunchSpec) -> LaunchSpec | None:
        """The shape of warm sandbox ``spec`` could start in (the plugin host waiting, the
        copies to come at take time), or None when it cannot start warm: not the plugin host,
        or its egress goes through a proxy endpoint made for one plugin."""
        if network_mode(spec.sandbox) == "proxy":
            return None
        if self.kind is LoaderType.EXTERNAL:  # its program is exec'd at take time
            return dataclasses.replace(
                spec,
                argv=["-"],
                program=None,
                env={},
                copies=(),
                warm=(PLUGIN_MOUNT,),
                warm_exec=True,
            )
        return dataclasses.replace(
            spec, argv=runtime().host_argv(WARM), copies=(), warm=(PLUGIN_MOUNT,)
        )

    def warm_template_for(self, sandbox: SandboxConfig) -> LaunchSpec | None:
        """The shape of warm sandbox a plugin run with ``sandbox`` takes (whatever its files:
        they come at take time)."""
        return self.warm_template(self._host_spec(sandbox, argv=[], copies=(), plugin_root=None))

    async def make_warm(self, template: LaunchSpec) -> WarmSandbox:
        """A sandbox of ``template``'s shape, its plugin host started and waiting."""
        cookie = secrets.token_hex(16)
        env = plugin_environment(cookie, self.max_frame)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        kept: list[socket.socket] = []
        try:
            proc, confinement = await launch_confined(
                dataclasses.replace(template, env={**env, **template.env}),
                backend=self.cgroups(),
                rpc_fd=theirs.fileno(),
                logger=logging.getLogger("sandboxer.pool"),
                fallbacks=self.fallbacks,
                plugin_id="-",
                setup_timeout=self.setup_timeout,
                handover=kept.append,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return WarmSandbox(proc, confinement, ours, cookie, kept[0])

    def take_warm(self, spec: LaunchSpec) -> WarmSandbox | None:
        """A ready warm sandbox ``spec`` can start in, if the pool has one."""
        template = self.warm_template(spec)
        if template is None or self.pool is None:
            return None
        return self.pool.take(template)

    async def hand_over(
        self,
        plugin: Plugin,
        sandbox: SandboxConfig,
        spec: LaunchSpec,
        warm: WarmSandbox,
        env: dict[str, str] | None = None,
    ) -> bool:
        """Make the taken ``warm`` the sandbox of ``plugin``: its limits on the cgroup, its
        files in /plugin, and with ``env`` (a sandbox for any program) ``spec``'s program
        exec'd with that environment. False: the plugin directory is too large to hand over,
        start it cold. The sandbox is discarded on False and on failure."""
        limits = CgroupLimits(
            memory=sandbox.memory_limit, cpu=sandbox.cpu_limit, pids=sandbox.pids_limit
        )
        program = None
        if env is not None:
            program = {
                "program": spec.program or spec.argv[0],
                "argv": spec.argv,
                "env": env,
                "cwd": spec.cwd,
            }
        try:
            await warm.take(spec.copies, limits, plugin.id, program)
        except TooLargeForWarm:
            await warm.discard()
            return False
        except BaseException:
            await warm.discard()
            raise
        return True

    async def _start_warm(
        self, plugin: Plugin, sandbox: SandboxConfig, spec: LaunchSpec, warm: WarmSandbox
    ) -> ProcessHandle | None:
        """``plugin`` in the warm sandbox ``warm``: its files handed over, its limits set,
        the host told what to load. None: the plugin directory is too large to hand over,
        start it cold."""
        if self.kind is LoaderType.EXTERNAL:
            env = {**plugin_environment(warm.cookie, self.max_frame), **spec.env}
            if not await self.hand_over(plugin, sandbox, spec, warm, env):
                return None
        else:
            if not await self.hand_over(plugin, sandbox, spec, warm):
                return None
            entry, root = self._inside(plugin)
            args = host_args(self.kind, plugin, entrypoint=entry, root=root)
            try:
                warm.rpc.sendall(json.dumps(args).encode() + b"\n")
            except BaseException:
                await warm.discard()
                raise
        return await self.start_process(plugin, sandbox, spec.argv, warm=warm)

    @staticmethod
    def _inside(plugin: Plugin) -> tuple[str, str]:
        """The plugin's entrypoint and root as the sandbox shows them."""
        root = plugin.root
        if root.is_dir():
            return f"{PLUGIN_MOUNT}/{plugin.entrypoint.relative_to(root).as_posix()}", PLUGIN_MOUNT
        return f"{PLUGIN_MOUNT}/{root.name}", PLUGIN_MOUNT  # a bare file is its own root

    def cgroups(self) -> CgroupBackend:
        if self._cgroup_backend is None:
            self._cgroup_backend = cgroups.detect()
        return self._cgroup_backend

    def launch_spec(self, plugin: Plugin, sandbox: SandboxConfig) -> LaunchSpec:
        """Mounts, masks, argv and seccomp filter for ``plugin``, all checked before any
        process exists."""
        root = plugin.root
        entry, _ = self._inside(plugin)
        return self._host_spec(
            sandbox,
            argv=plugin_command(plugin, entrypoint=entry, root=PLUGIN_MOUNT, runtime=runtime()),
            # The directory (or a bare file, its own root) is copied into /plugin, and the
            # copy checked against every digest that vouches for it: only those bytes run.
            copies=(
                Mount(
                    str(root),
                    PLUGIN_MOUNT,
                    digests=tuple(Digest(*d) for d in plugin.digests()),
                ),
            ),
            plugin_root=str(root) if root.is_dir() else None,
        )

    def _host_spec(
        self,
        sandbox: SandboxConfig,
        *,
        argv: list[str],
        copies: tuple[Mount, ...],
        plugin_root: str | None,
    ) -> LaunchSpec:
        grants = grant_mounts(sandbox.allowed_paths)
        plugin_runtime = runtime()
        mounts = base_mounts() + list(plugin_runtime.mounts) + grants
        masks, pins = mask_plan(
            sandbox.denied_paths, grants, {plugin_root: PLUGIN_MOUNT} if plugin_root else None
        )
        env = {
            **plugin_runtime.env,
            "PATH": f"{plugin_runtime.bin_dir}:/usr/local/bin:/usr/bin:/bin",
        }
        return LaunchSpec(
            argv=argv,
            env=env,
            sandbox=sandbox,
            mounts=tuple(mounts),
            cwd=PLUGIN_MOUNT,
            masks=masks,
            pins=pins,
            copies=copies,
            seccomp_bpf=filter_for(
                sandbox.profile, network=sandbox.network_allowed, extra_dirs=self.profile_dirs
            ),
            profile_dirs=self.profile_dirs,
            grant_owner=self.grant_owner,
        )

    async def start_process(
        self,
        plugin: Plugin,
        sandbox: SandboxConfig,
        argv: list[str],
        *,
        spawner: Spawner | None = None,
        warm: WarmSandbox | None = None,
    ) -> ProcessHandle:
        """``argv`` started by ``spawner`` (else unsandboxed), or the plugin host already
        running in ``warm`` (taken); then the handshake, and the handle."""
        loop = asyncio.get_running_loop()
        logger = logging.getLogger(f"sandboxer.plugin.{plugin.id}")
        confinement: Confinement | None
        if warm is not None:
            proc, confinement, ours, cookie = warm.proc, warm.confinement, warm.rpc, warm.cookie
            proc.set_output(logger, plugin_id=plugin.id)
        else:
            proc, confinement, ours, cookie = await self._spawn(plugin, argv, spawner, logger)
        handle: ProcessHandle | None = None

        def failed(error: SandboxerError) -> None:
            # A protocol error or a crash: the process is done for, whatever it thinks.
            proc.send_signal(signal.SIGKILL)
            if handle is not None:
                handle._failed(error)

        def cancel_ignored(method: str) -> None:
            conn.fail(
                PluginCrashed(
                    f"plugin {plugin.id} was killed: a call to {method} timed out and the plugin "
                    "ignored the cancel for a second",
                    plugin_id=plugin.id,
                )
            )

        def eof() -> None:
            # It closed its end of the socket: it gets a moment to exit on its own (its exit
            # status then explains the crash), then it is killed.
            loop.call_later(1.0, proc.send_signal, signal.SIGKILL)

        try:
            _, conn = await loop.connect_accepted_socket(
                lambda: RpcConnection(
                    plugin_id=plugin.id,
                    cookie=cookie,
                    max_frame=self.max_frame,
                    logger=logger,
                    on_failure=failed,
                    on_eof=eof,
                    on_cancel_ignored=cancel_ignored,
                ),
                sock=ours,
            )
        except BaseException:
            ours.close()
            await proc.close()
            if confinement is not None:
                await confinement.aclose()
            raise
        watcher = asyncio.ensure_future(self._watch_startup(proc, conn))
        try:
            async with asyncio.timeout(self.handshake_timeout):
                info = await conn.handshake
            handle = ProcessHandle(
                plugin, sandbox, proc, conn, info, confinement, started_warm=warm is not None
            )
        except TimeoutError:
            conn.fail(
                HandshakeError(
                    f"plugin {plugin.id}: sent no handshake within {self.handshake_timeout:g}s",
                    plugin_id=plugin.id,
                ),
                notify=False,
            )
            await self._abandon(proc, conn, watcher, confinement)
            raise conn.error from None  # type: ignore[misc]
        except PluginCrashed as exc:
            await self._abandon(proc, conn, watcher, confinement)
            raise HandshakeError(
                f"plugin {plugin.id} exited before the handshake: "
                f"{exc.message}" + self._stderr_note(exc),
                plugin_id=plugin.id,
            ) from exc
        except BaseException:
            await self._abandon(proc, conn, watcher, confinement)
            raise
        watcher.cancel()
        return handle

    async def _spawn(
        self, plugin: Plugin, argv: list[str], spawner: Spawner | None, logger: logging.Logger
    ) -> tuple[_process.PluginProcess, Confinement | None, socket.socket, str]:
        """A new process for ``plugin``: it, its confinement, our end of its RPC socket and
        the cookie it will present."""
        cookie = secrets.token_hex(16)
        env = plugin_environment(cookie, self.max_frame)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        confinement: Confinement | None = None
        try:
            if spawner is None:
                proc = _process.spawn(argv, env, rpc_fd=theirs.fileno(), logger=logger)
            else:
                proc, confinement = await spawner(env, theirs.fileno(), logger)
        except OSError as exc:
            ours.close()
            raise PluginLoadError(
                f"plugin {plugin.id}: cannot start {argv[0]}: {exc.strerror}", plugin_id=plugin.id
            ) from exc
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return proc, confinement, ours, cookie

    @staticmethod
    def _stderr_note(exc: PluginCrashed) -> str:
        return "\n  stderr:\n    " + "\n    ".join(exc.stderr_tail[-10:]) if exc.stderr_tail else ""

    @staticmethod
    async def _watch_startup(proc: _process.PluginProcess, conn: RpcConnection) -> None:
        """Before the handshake: a process that exits fails the handshake at once."""
        await proc.wait()
        await proc.output_closed(0.5)
        conn.fail(crashed(conn.plugin_id, proc), notify=False)

    @staticmethod
    async def _abandon(
        proc: _process.PluginProcess,
        conn: RpcConnection,
        watcher: asyncio.Task[None],
        confinement: Confinement | None,
    ) -> None:
        watcher.cancel()
        conn.close()
        await proc.close()
        if confinement is not None:
            await confinement.aclose()
        try:
            await watcher
        except (asyncio.CancelledError, SandboxerError):
            pass
