"""Starting a go-plugin gRPC plugin, sandboxed, and calling it: ``GrpcLoader``, ``GrpcHandle``.

The plugin starts as any external plugin does (the same launch spec, cgroup, seccomp filter and
mounts) with go-plugin's environment instead of sandboxer's wire protocol on fd 3, and with a
directory of its own at ``SOCKET_DIR`` (``TMPDIR`` and ``PLUGIN_UNIX_SOCKET_DIR`` name it):
a private directory of the supervisor's, writable inside, where go-plugin makes its Unix socket.
Its first line on stdout is the handshake (``handshake.parse_handshake``); the lines after it
and everything on stderr go to the host's logging.

The supervisor connects to that socket without ever following a name the plugin controls: the
entry is opened beneath the directory with O_PATH|O_NOFOLLOW, must be a socket, and the
channel connects through ``/proc/self/fd/N``, that very inode, kept open for the channel's
life. gRPC then runs on the supervisor's event loop, no extra process: calls through sandboxer's
own HTTP/2 client (``h2``: grpcio's asyncio layer cost ~300 µs a call, more than twice
go-plugin's Go host), and grpcio's channel for the health check, shutdown and
``LoadedPlugin.grpc_channel()`` (hosts with generated stubs).
A plugin must answer the health check of service "plugin" before it counts as loaded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ...errors import (
    INTERNAL_ERROR,
    CallTimeout,
    HandshakeError,
    MethodNotFound,
    PluginCallError,
    PluginLoadError,
    ProtocolError,
    SandboxerError,
)
from ...manifest import LoaderType, Plugin
from ...sandbox import child
from ...sandbox.child import LineLog
from ...sandbox.confinement import Confinement, launch_confined
from ...sandbox.policy import SandboxConfig
from ...sandbox.spec import LaunchSpec
from .. import NO_STATE, Health, NoState, ResourceUsage
from ..out_of_process import (
    SHUTDOWN_GRACE,
    ProcessLoader,
    crash_error,
    crashed,
    plugin_command,
)
from .h2 import ConnectionLost, GrpcStatusError, H2Channel, StatusCode
from .handshake import MAX_LINE, GoPluginEndpoint, handshake_environment, parse_handshake
from .hclog import HclogLines
from .protoc import descriptor_set
from .relay import NetnsRelay
from .schema import GrpcMethod, GrpcSchema, decode_response, encode_request, load_schema

if TYPE_CHECKING:
    import grpc.aio

__all__ = ["GrpcLoader", "GrpcHandle", "SOCKET_DIR"]

log = logging.getLogger("sandboxer")

SOCKET_DIR = "/run/sandboxer/grpc"  # the plugin's socket directory, inside its sandbox
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SHUTDOWN = "/plugin.GRPCController/Shutdown"
_SERVING = 1  # grpc.health.v1.HealthCheckResponse.ServingStatus


class _Handshake:
    """The plugin's stdout: its first line resolves ``line``, the lines after it are logged."""

    def __init__(self, logger: logging.Logger) -> None:
        self.line: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._head = bytearray()
        self._rest = child.LineLog(name="stdout", logger=logger, level=logging.INFO)

    def __call__(self, data: bytes) -> None:
        if self.line.done():
            self._rest.feed(data)
            return
        self._head += data
        end = self._head.find(b"\n")
        if end < 0 and len(self._head) <= MAX_LINE:
            return
        cut = end + 1 if end >= 0 else len(self._head)
        self.line.set_result(bytes(self._head[:cut]))
        rest = bytes(self._head[cut:])
        self._head.clear()
        if rest:
            self._rest.feed(rest)


def _health_request(service: str) -> bytes:
    """grpc.health.v1.HealthCheckRequest{service} in protobuf's wire format."""
    name = service.encode()
    return b"\x0a" + bytes([len(name)]) + name  # field 1, length-delimited (< 128 bytes)


def _serving_status(data: bytes) -> int:
    """HealthCheckResponse.status (field 1, a varint; absent: 0, UNKNOWN)."""
    if len(data) >= 2 and data[0] == 0x08 and data[1] < 0x80:
        return data[1]
    return 0


class GrpcHandle:
    """One running go-plugin gRPC plugin process and its channel (a ``PluginHandle``)."""

    def __init__(
        self,
        plugin: Plugin,
        sandbox: SandboxConfig,
        schema: GrpcSchema,
        proc: child.PluginProcess,
        channel: grpc.aio.Channel,
        *,
        connection: _Connection,
        h2: H2Channel,
        socket_dir: str | None,
        stderr: LineLog,
        confinement: Confinement | None,
        started_warm: bool = False,
    ) -> None:
        self.plugin = plugin
        self._sandbox = sandbox
        self._schema = schema
        self._proc = proc
        self._channel = channel
        self._connection = connection
        self._h2 = h2
        self._socket_dir = socket_dir  # an unsandboxed plugin's: its sandbox has its own
        self.started_warm = started_warm  # in a sandbox made ahead (sandbox/pool.py)
        self._stderr = stderr
        self._confinement = confinement
        names = tuple(sorted(schema.methods))
        if plugin.methods is not None:
            missing = sorted(set(plugin.methods) - set(names))
            if missing:
                raise HandshakeError(
                    f"plugin {plugin.id}: the manifest lists methods {schema.service} does not "
                    f"have: {', '.join(missing)}",
                    plugin_id=plugin.id,
                )
            names = tuple(sorted(plugin.methods))
        self._methods = names
        self._callbacks: list[Callable[[SandboxerError], None]] = []
        self._closing = False
        self._crash: SandboxerError | None = None
        self._watcher = asyncio.ensure_future(self._watch())

    # -- the PluginHandle protocol -----------------------------------------------------------
    @property
    def methods(self) -> tuple[str, ...]:
        return self._methods

    @property
    def has_state(self) -> bool:
        return False  # go-plugin has no state hooks: a reload starts fresh

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def fallbacks(self) -> tuple[str, ...]:
        return self._confinement.fallbacks if self._confinement is not None else ()

    def on_failure(self, callback: Callable[[SandboxerError], None]) -> None:
        self._callbacks.append(callback)

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel to this process (``LoadedPlugin.grpc_channel``)."""
        return self._channel

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Awaitable[Any]:
        return self._call(method, args, self._sandbox.timeout if timeout is None else timeout)

    async def _call(self, method: str, args: tuple[Any, ...], timeout: float) -> Any:
        spec = self._schema.methods.get(method) if method in self._methods else None
        if spec is None:
            raise MethodNotFound.of(self.plugin.id, method, self._methods)
        request = encode_request(spec, args, plugin_id=self.plugin.id)
        error: SandboxerError | None = None
        try:
            answer = await self._h2.unary(spec.path, request, timeout)
        except (GrpcStatusError, ConnectionLost) as exc:
            error = await self._call_error(spec, exc, timeout)
        if error is not None:
            raise error  # (outside the except: the error holds nothing of the call)
        try:
            return decode_response(spec, answer)
        except ValueError as exc:
            raise PluginCallError(
                f"plugin {self.plugin.id}: {method} answered {exc}",
                code=INTERNAL_ERROR,
                plugin_id=self.plugin.id,
                method=method,
            ) from None

    async def _call_error(
        self, method: GrpcMethod, exc: GrpcStatusError | ConnectionLost, timeout: float
    ) -> SandboxerError:
        if isinstance(exc, GrpcStatusError) and exc.code == StatusCode.DEADLINE_EXCEEDED:
            return CallTimeout(
                f"plugin {self.plugin.id}: {method.name} did not answer within {timeout:g}s",
                timeout=timeout,
                plugin_id=self.plugin.id,
                method=method.name,
            )
        if isinstance(exc, GrpcStatusError):
            return PluginCallError(
                f"plugin {self.plugin.id}: {method.name} failed: {exc.name}: {exc.message}",
                code=exc.code,
                plugin_id=self.plugin.id,
                method=method.name,
                data={"grpc_status": exc.name},
            )
        # The connection is gone: the process's end says more, if it is ending.
        if await self._proc.wait(0.5) is not None:
            await self._proc.output_closed(0.5)
            return self._crash or self._crash_error()
        return ProtocolError(
            f"plugin {self.plugin.id}: {method.name}: its gRPC connection failed: {exc}",
            plugin_id=self.plugin.id,
        )

    async def init(self, config: dict[str, Any]) -> None:
        """go-plugin plugins have no init: their configuration is their own business."""

    async def health(self) -> Health:
        try:
            answer = await _unary(self._channel, HEALTH_CHECK)(
                _health_request("plugin"), timeout=self._sandbox.timeout
            )
        except Exception as exc:
            return Health(False, f"plugin {self.plugin.id}: health check failed: {exc}")
        status = _serving_status(answer)
        if status != _SERVING:
            return Health(False, f"plugin {self.plugin.id}: health status {status}, not SERVING")
        return Health(True)

    async def shutdown(self) -> None:
        """go-plugin's GRPCController/Shutdown, then the usual grace and kill."""
        self._closing = True
        try:
            await _unary(self._channel, SHUTDOWN)(b"", timeout=SHUTDOWN_GRACE)
        except Exception:
            pass  # it may exit before it answers: that is what was asked
        if await self._proc.wait(SHUTDOWN_GRACE) is None:
            log.warning(
                "plugin %s: still running %gs after shutdown; killed",
                self.plugin.id,
                SHUTDOWN_GRACE,
            )
            self._proc.send_signal(signal.SIGKILL)
            await self._proc.wait()

    async def export_state(self) -> Any | NoState:
        return NO_STATE

    async def import_state(self, state: Any, from_version: str) -> None:
        log.info("plugin %s has no state hooks; this generation starts fresh", self.plugin.id)

    def resource_usage(self) -> ResourceUsage:
        stats = self._confinement.stats() if self._confinement is not None else None
        denied = self._proc.denials
        counts = None if denied is None else dict(denied.counts)
        if stats is None:
            return ResourceUsage(denied=counts)
        return ResourceUsage(
            peak_memory_bytes=stats.memory_peak, cpu_time_s=stats.cpu_time_s, denied=counts
        )

    async def close(self) -> None:
        self._closing = True
        await self._h2.close()
        await self._channel.close()
        await self._proc.terminate(SHUTDOWN_GRACE)
        await self._proc.close()
        await self._watcher
        if self._confinement is not None:
            await self._confinement.aclose()
        await self._connection.close()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    # -- failure -----------------------------------------------------------------------------
    def _crash_error(self) -> SandboxerError:
        return crash_error(self.plugin.id, self._proc, self._confinement, self._stderr.tail)

    async def _watch(self) -> None:
        await self._proc.wait()
        await self._proc.output_closed(0.5)
        self._crash = self._crash_error()
        if not self._closing:
            for callback in self._callbacks:
                callback(self._crash)


class GrpcLoader:
    """Starts external plugins that speak go-plugin's gRPC protocol: launched as the
    out-of-process ``processes`` loader launches an external plugin, then spoken to in gRPC."""

    kind = LoaderType.EXTERNAL

    def __init__(self, processes: ProcessLoader) -> None:
        self.processes = processes

    async def start(self, plugin: Plugin, sandbox: SandboxConfig, *, generation: int) -> GrpcHandle:
        import grpc.aio

        spec = plugin.grpc
        if spec is None:
            raise PluginLoadError(
                f"plugin {plugin.id}: protocol grpc needs the [grpc] table", plugin_id=plugin.id
            )
        schema = await self._schema(plugin)
        logger = logging.getLogger(f"sandboxer.plugin.{plugin.id}")
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            **handshake_environment(spec.handshake),
        }
        first = _Handshake(logger)
        stderr = HclogLines(name="stderr", logger=logger, level=logging.WARNING)
        sinks: child.Sinks = (first, stderr.feed)
        confinement: Confinement | None = None
        own_dir: str | None = None  # the socket directory of an unsandboxed plugin
        warm = False
        if sandbox.enabled:
            inside = SOCKET_DIR
            launch = self.processes.launch_spec(plugin, sandbox)
            launch = dataclasses.replace(
                launch,
                env={**launch.env, **env, "TMPDIR": inside, "PLUGIN_UNIX_SOCKET_DIR": inside},
                rpc=False,
                scratch=(*launch.scratch, inside),
            )
            started = await self._start_warm(plugin, sandbox, launch, logger, sinks)
            warm = started is not None
            proc, confinement = started or await self._start_cold(plugin, launch, logger, sinks)
            sockets = confinement.scratch[inside]
        else:
            own_dir = sockets = inside = tempfile.mkdtemp(prefix="sandboxer-grpc-")  # 0700
            env.update(TMPDIR=sockets, PLUGIN_UNIX_SOCKET_DIR=sockets)
            null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
            try:
                proc = child.spawn(
                    plugin_command(plugin), env, rpc_fd=null, logger=logger, sinks=sinks
                )
            except BaseException:
                shutil.rmtree(own_dir, ignore_errors=True)
                raise
            finally:
                os.close(null)
        connection: _Connection | None = None
        try:
            line = await self._first_line(plugin, proc, first, stderr)
            endpoint = parse_handshake(
                line,
                plugin_id=plugin.id,
                app_version=spec.handshake.protocol_version,
                socket_dir=inside,
            )
            connection = await _connect(plugin, endpoint, sockets, proc)
            channel = grpc.aio.insecure_channel(
                connection.target,
                options=[
                    ("grpc.max_receive_message_length", self.processes.max_frame),
                    ("grpc.max_send_message_length", self.processes.max_frame),
                ],
            )
            h2: H2Channel | None = None
            try:
                await self._wait_serving(plugin, channel, proc)
                h2 = await H2Channel.connect(connection.path, max_message=self.processes.max_frame)
                return GrpcHandle(
                    plugin,
                    sandbox,
                    schema,
                    proc,
                    channel,
                    connection=connection,
                    h2=h2,
                    socket_dir=own_dir,
                    stderr=stderr,
                    confinement=confinement,
                    started_warm=warm,
                )
            except BaseException:
                if h2 is not None:
                    await h2.close()
                await channel.close()
                raise
        except BaseException:
            if connection is not None:
                await connection.close()
            proc.send_signal(signal.SIGKILL)
            await proc.close()
            if confinement is not None:
                await confinement.aclose()
            if own_dir is not None:
                shutil.rmtree(own_dir, ignore_errors=True)
            raise

    async def _start_warm(
        self,
        plugin: Plugin,
        sandbox: SandboxConfig,
        launch: LaunchSpec,
        logger: logging.Logger,
        sinks: child.Sinks,
    ) -> tuple[child.PluginProcess, Confinement] | None:
        """``launch``'s program exec'd in a warm sandbox of its shape (its own socket
        directory made with it), or None: there was none ready, or the plugin directory is
        too large to hand over."""
        warm = self.processes.take_warm(launch)
        if warm is None:
            return None
        # Before the exec: the handshake may come at once.
        warm.proc.set_output(logger, sinks, plugin_id=plugin.id)
        if not await self.processes.hand_over(plugin, sandbox, launch, warm, launch.env):
            return None
        warm.rpc.close()  # fd 3 is not the wire here (``rpc=False``): the plugin never had it
        return warm.proc, warm.confinement

    async def _start_cold(
        self, plugin: Plugin, launch: LaunchSpec, logger: logging.Logger, sinks: child.Sinks
    ) -> tuple[child.PluginProcess, Confinement]:
        null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        try:
            return await launch_confined(
                launch,
                backend=self.processes.cgroups(),
                rpc_fd=null,
                logger=logger,
                sinks=sinks,
                fallbacks=self.processes.fallbacks,
                egress=self.processes.egress,
                plugin_id=plugin.id,
                setup_timeout=self.processes.setup_timeout,
            )
        finally:
            os.close(null)

    async def _schema(self, plugin: Plugin) -> GrpcSchema:
        """The service's methods, from the plugin's descriptor sets or its .proto files
        compiled inside a sandbox (``protoc``)."""
        grpc_spec = plugin.grpc
        if grpc_spec is None:
            raise PluginLoadError(
                f"plugin {plugin.id}: protocol grpc needs the [grpc] table", plugin_id=plugin.id
            )
        data = await descriptor_set(plugin, loader=self.processes)
        source = ", ".join(p.name for p in grpc_spec.proto)
        return load_schema(data, grpc_spec.service, plugin_id=plugin.id, source=source)

    async def _first_line(
        self, plugin: Plugin, proc: child.PluginProcess, first: _Handshake, stderr: LineLog
    ) -> bytes:
        exited = asyncio.ensure_future(proc.wait())
        try:
            async with asyncio.timeout(self.processes.handshake_timeout):
                waiting: set[asyncio.Future[Any]] = {first.line, exited}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except TimeoutError:
            raise HandshakeError(
                f"plugin {plugin.id}: printed no go-plugin handshake line within "
                f"{self.processes.handshake_timeout:g}s",
                plugin_id=plugin.id,
            ) from None
        finally:
            exited.cancel()
        if first.line.done():
            return first.line.result()
        await proc.output_closed(0.5)
        crash = crashed(plugin.id, proc, stderr.tail)
        raise HandshakeError(
            f"plugin {plugin.id} exited before its handshake: {crash.message}"
            + (
                "\n  stderr:\n    " + "\n    ".join(crash.stderr_tail[-10:])
                if crash.stderr_tail
                else ""
            ),
            plugin_id=plugin.id,
        )

    async def _wait_serving(
        self, plugin: Plugin, channel: grpc.aio.Channel, proc: child.PluginProcess
    ) -> None:
        """Until the plugin's health check says SERVING, within the handshake timeout."""
        import grpc.aio

        check = _unary(channel, HEALTH_CHECK)
        last = "no answer"
        try:
            async with asyncio.timeout(self.processes.handshake_timeout):
                while True:
                    try:
                        answer = await check(_health_request("plugin"), wait_for_ready=True)
                        status = _serving_status(answer)
                        if status == _SERVING:
                            return
                        last = f"health status {status}, not SERVING"
                    except grpc.aio.AioRpcError as exc:
                        last = f"{exc.code().name}: {exc.details()}"
                    if proc.returncode is not None:
                        break
                    await asyncio.sleep(0.05)
        except TimeoutError:
            pass
        raise HandshakeError(
            f'plugin {plugin.id}: its gRPC health check of service "plugin" never answered '
            f"SERVING within {self.processes.handshake_timeout:g}s ({last})",
            plugin_id=plugin.id,
        )


class _Connection:
    """What a plugin's channel connects to (``target``), and what to close after it."""

    def __init__(
        self, target: str, path: str, *, fd: int = -1, relay: NetnsRelay | None = None
    ) -> None:
        self.target = target
        self.path = path  # the Unix socket behind ``target``, for the HTTP/2 client
        self._fd = fd
        self._relay = relay

    async def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._relay is not None:
            await self._relay.close()
            self._relay = None


async def _connect(
    plugin: Plugin,
    endpoint: GoPluginEndpoint,
    sockets: str,
    proc: child.PluginProcess,
) -> _Connection:
    """The channel's way to the endpoint: its socket's very inode, or (TCP) a relay into the
    plugin's network namespace (the host's, unsandboxed)."""
    if endpoint.network == "unix" and endpoint.path is not None:
        fd = _open_socket(plugin, sockets, os.path.basename(endpoint.path))
        return _Connection(f"unix:/proc/self/fd/{fd}", f"/proc/self/fd/{fd}", fd=fd)
    host, port = endpoint.host or "127.0.0.1", endpoint.port or 0
    if proc.returncode is not None:  # (its pid could be another process's by now)
        raise HandshakeError(f"plugin {plugin.id} exited after its handshake", plugin_id=plugin.id)
    relay = NetnsRelay(plugin.id, proc.pid, host, port)
    try:
        await relay.start(timeout=5.0)
    except BaseException:
        await relay.close()
        raise
    return _Connection(f"unix:{relay.path}", relay.path, relay=relay)


def _raw(data: bytes) -> bytes:
    return data


def _unary(channel: grpc.aio.Channel, path: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    """A unary method taking and giving bytes (the schema does the protobuf)."""
    return channel.unary_unary(path, request_serializer=_raw, response_deserializer=_raw)


def _open_socket(plugin: Plugin, directory: str, name: str) -> int:
    """An O_PATH fd on the socket ``name`` directly in ``directory``, through no link."""
    dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as exc:
        raise HandshakeError(
            f"plugin {plugin.id}: its socket {name} cannot be opened: {exc.strerror}",
            plugin_id=plugin.id,
        ) from None
    finally:
        os.close(dir_fd)
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        os.close(fd)
        raise HandshakeError(
            f"plugin {plugin.id}: {name} in its socket directory is not a socket",
            plugin_id=plugin.id,
        )
    return fd
