"""Start a sandboxed launch, from the supervisor: start the launcher, hand it the spec and
the sources, write the id maps, and learn whether every setup step succeeded.

The launcher (``launcher.py``) does the work inside the new namespaces; this side does what
only the parent can: validate everything before any process exists (``spec.build_spec``,
``Sources``), write ``/proc/PID/{setgroups,uid_map,gid_map}`` (nsjail's order: setgroups
deny, then gid_map, then uid_map) for the host uid/gid ``Sources`` chose, and turn the
launcher's step report into a ``SandboxSetupError`` naming the step, the path and the errno.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable

from ..errors import IntegrityError, PluginLoadError, SandboxUnavailable
from . import child, forkserver
from .denials import Denials, listener_fd_ok
from .egress import EgressEndpoint, network_mode
from .policy import SETUP_TIMEOUT
from .sources import Sources
from .spec import SANDBOX_GID, SANDBOX_UID, LaunchSpec, build_spec

__all__ = ["launch", "hand_over", "SandboxSetupError", "READY"]


class SandboxSetupError(SandboxUnavailable):
    """A step of the sandbox setup failed: names the step, the path and the errno."""

    def __init__(
        self,
        message: str,
        *,
        missing: str,
        step: str | None = None,
        path: str | None = None,
        errno: int | None = None,
    ) -> None:
        super().__init__(message, missing=missing)
        self.step, self.path, self.errno = step, path, errno


async def _read_status(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One chunk from the status socket (b"" at EOF) and any fds passed with it, without
    blocking the loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[tuple[bytes, list[int]]] = loop.create_future()

    def readable() -> None:
        try:
            data, fds, _, _ = socket.recv_fds(sock, 4096, 1)
        except BlockingIOError:
            return
        loop.remove_reader(sock)
        if not future.done():
            future.set_result((data, fds))
        else:
            for fd in fds:
                os.close(fd)

    loop.add_reader(sock, readable)
    try:
        return await future
    finally:
        loop.remove_reader(sock)


def _proxy_listener(fds: list[int], mode: str) -> socket.socket | None:
    """The listener the launcher made in the plugin's net namespace ("proxy" mode), checked
    to be what it must be: a listening TCP socket. Anything else passed is closed."""
    socks = [socket.socket(fileno=fd) for fd in fds]
    if mode != "proxy":
        for sock in socks:
            sock.close()
        return None
    if (
        len(socks) == 1
        and socks[0].type == socket.SOCK_STREAM
        and socks[0].family == socket.AF_INET
        and socks[0].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    ):
        return socks[0]
    for sock in socks:
        sock.close()
    raise SandboxSetupError(
        "the sandbox launcher did not hand over the egress proxy's listening socket",
        missing="egress proxy port",
    )


def _setup_error(report: bytes, plugin_id: str | None = None) -> PluginLoadError:
    """The launcher's report as the error it means: IntegrityError when the copied plugin
    files did not match a digest that vouches for them (step VERIFY), else a
    SandboxSetupError naming the step."""
    try:
        info = json.loads(report.splitlines()[0])
    except (ValueError, IndexError):
        return SandboxSetupError(
            f"the sandbox launcher failed: {report[:500]!r}", missing="sandbox launcher"
        )
    err = info.get("errno")
    where = f" ({info['path']})" if info.get("path") else ""
    code = f" [{_errno.errorcode.get(err, err)}]" if err is not None else ""
    message = f"sandbox setup failed at step {info.get('what')}{where}: {info.get('error')}{code}"
    if info.get("step") == "VERIFY":
        who = f"plugin {plugin_id}" if plugin_id else "the plugin"
        return IntegrityError(
            f"{who}: its files failed their check as they were copied into the sandbox: "
            f"{info.get('error')}",
            plugin_id=plugin_id,
        )
    missing = info.get("step", "sandbox").lower()
    if info.get("step") == "NAMESPACES" and err in (_errno.EPERM, _errno.ENOSPC, _errno.EINVAL):
        message += (
            "; this host does not allow new user namespaces (check "
            "/proc/sys/user/max_user_namespaces and "
            "/proc/sys/kernel/unprivileged_userns_clone, or an AppArmor/SELinux "
            "policy restricting them)"
        )
        missing = "user namespaces"
    return SandboxSetupError(
        message, missing=missing, step=info.get("step"), path=info.get("path"), errno=err
    )


LISTENER = b"L\n"  # the plugin process: its seccomp listener comes with this (SCM_RIGHTS)


def _denials(
    fds: list[int], spec: LaunchSpec, plugin_id: str | None, logger: logging.Logger
) -> Denials:
    """The listener the plugin process sent, checked to be one, answered from now on."""
    if len(fds) != 1 or not listener_fd_ok(fds[0]):
        for fd in fds:
            os.close(fd)
        raise SandboxSetupError(
            "the sandbox launcher sent something other than its seccomp listener",
            missing="seccomp listener",
        )
    try:
        return Denials(
            fds[0],
            plugin_id=plugin_id or "-",
            logger=logger,
            profile=spec.sandbox.profile,
            profile_dirs=spec.profile_dirs,
            learn=spec.seccomp_learn,
            level=logging.INFO if spec.denials_summarized else logging.WARNING,
        )
    except BaseException:
        os.close(fds[0])
        raise


READY = b"R\n"  # a warm sandbox's PID 1: its plugin host is running, waiting for the handover


def _write_id_maps(pid: int, host_uid: int, host_gid: int) -> None:
    with open(f"/proc/{pid}/setgroups", "w") as f:
        f.write("deny")
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(f"{SANDBOX_GID} {host_gid} 1\n")
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(f"{SANDBOX_UID} {host_uid} 1\n")


def _send_fds(sock: socket.socket, fds: list[int]) -> None:
    """The sources, in order, over the status socket (SCM_RIGHTS: at most 253 a message)."""
    for start in range(0, len(fds), 200):
        socket.send_fds(sock, [b"F"], fds[start : start + 200])


async def launch(
    spec: LaunchSpec,
    *,
    rpc_fd: int,
    logger: logging.Logger,
    setup_timeout: float = SETUP_TIMEOUT,
    on_spawn: Callable[[int], Awaitable[None]] | None = None,
    egress: EgressEndpoint | None = None,
    sinks: child.Sinks | None = None,
    plugin_id: str | None = None,
    sources: Sources | None = None,
    stdin: int | None = None,
    handover: Callable[[socket.socket], None] | None = None,
) -> tuple[child.PluginProcess, int]:
    """Start ``spec`` sandboxed; returns the process (the launcher, whose exit status is the
    plugin's) and the host uid it maps to (release it with ``sources.release_uid`` when it is gone).
    ``on_spawn(pid)`` runs before the launcher may go on: the place to put it in a cgroup.
    In "proxy" network mode ``egress`` gets the listener made in the plugin's namespace.
    ``sources``: the spec's paths already opened (``Sources(spec)``); closed here either way.
    ``stdin``: the program's fd 0 (``child.check_stdin``), else /dev/null.
    A warm spec (``spec.warm``, sandbox/pool.py) is started until PID 1 says it is ready;
    its status socket then goes to ``handover``, through which its copies come later.
    """
    if spec.warm and handover is None:
        raise ValueError("a warm sandbox needs somewhere to hand its status socket")
    if network_mode(spec.sandbox) == "proxy" and egress is None:
        if sources is not None:
            sources.discard()
        raise SandboxUnavailable(
            "allowed_hosts needs the egress proxy, and none was given", missing="egress proxy"
        )
    if sources is None:
        sources = Sources(spec, plugin_id=plugin_id)
    host_uid, host_gid = sources.host_uid, sources.host_gid
    try:
        built = build_spec(spec, sources)
    except BaseException:
        sources.discard()
        raise
    mode = built["network"]["mode"]  # type: ignore[index]
    payload = json.dumps(built).encode() + b"\n"
    control_r, control_w = os.pipe2(os.O_CLOEXEC)
    # A socket rather than a pipe: the sources go down it, the proxy port's listener comes
    # back over it.
    status, status_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    kept = False  # the status socket, handed over (a warm sandbox)
    try:
        proc = child.spawn(
            [],
            {},
            rpc_fd=rpc_fd,
            logger=logger,
            starter=forkserver.start_launcher,
            extra_fds={4: control_r, 5: status_w.fileno()},
            sinks=sinks,
            stdin=stdin,
            owner=(host_uid, host_gid),
        )
    except BaseException:
        for fd in (control_r, control_w):
            os.close(fd)
        status.close()
        status_w.close()
        sources.discard()
        raise
    os.close(control_r)
    status_w.close()
    try:
        async with asyncio.timeout(setup_timeout):
            if on_spawn is not None:
                await on_spawn(proc.pid)  # the launcher waits for the spec: it did nothing yet
            os.write(control_w, payload)
            _send_fds(status, sources.fds)
            sources.close()
            status.setblocking(False)
            first, fds = await _read_status(status)
            listener = _proxy_listener(fds, mode)
            if first != b"U\n":
                if listener is not None:
                    listener.close()
                raise (
                    _setup_error(first, plugin_id)
                    if first
                    else SandboxSetupError(
                        f"the sandbox launcher exited during setup ({proc.describe_exit()})",
                        missing="sandbox launcher",
                    )
                )
            if egress is not None and mode == "proxy":
                await egress.start(listener)
            try:
                _write_id_maps(proc.pid, host_uid, host_gid)
            except OSError as exc:
                raise SandboxSetupError(
                    f"writing the user namespace id maps failed: {exc.strerror} ({exc.filename})",
                    missing="user namespace id maps",
                ) from exc
            os.write(control_w, b"G")
            report = b""
            wants_listener = bool(built["seccomp_listener"])
            while True:
                chunk, fds = await _read_status(status)
                if wants_listener and proc.denials is None and chunk.startswith(LISTENER):
                    proc.denials = _denials(fds, spec, plugin_id, logger)
                    chunk = chunk[len(LISTENER) :]
                else:
                    _proxy_listener(fds, "none")  # nothing more may come: closed if it does
                    if not chunk:
                        break
                report += chunk
                if spec.warm and report == READY:
                    break
            if report and report != READY:
                raise _setup_error(report, plugin_id)
            if wants_listener and proc.denials is None:
                raise SandboxSetupError(
                    "the sandbox launcher did not hand over the seccomp listener",
                    missing="seccomp listener",
                )
            if spec.warm:
                if report != READY:
                    raise SandboxSetupError(
                        f"the sandbox launcher exited during setup ({proc.describe_exit()})",
                        missing="sandbox launcher",
                    )
                assert handover is not None
                handover(status)
                kept = True
    except BaseException as exc:
        await proc.close()
        sources.discard()
        if isinstance(exc, TimeoutError):
            raise SandboxSetupError(
                f"the sandbox setup did not finish within {setup_timeout:g}s",
                missing="sandbox launcher",
            ) from None
        raise
    finally:
        os.close(control_w)
        if not kept:
            status.close()
    return proc, host_uid


HANDED_OVER = b"K\n"  # a warm sandbox's PID 1: the copies are made, its capabilities gone
# A handover this small goes in one sendmsg on the loop, far below a Unix socket's buffer.
_SMALL_HANDOVER = 32 << 10


async def hand_over(
    status: socket.socket, message: bytes, fds: list[int], *, plugin_id: str | None = None
) -> None:
    """Give a warm sandbox's PID 1 its copies over its status socket (``launch`` kept it
    for ``handover``): ``message`` is the JSON line that lists them (launcher.py,
    ``wait_for_handover``), ``fds`` the files it names, sent after it. Returns once PID 1 has
    made them and dropped its capabilities; its failure is a SandboxSetupError naming the
    step. The socket is closed either way; the fds stay the caller's."""
    try:
        if len(message) <= _SMALL_HANDOVER and len(fds) <= 253:
            socket.send_fds(status, [message], fds)  # one message: the buffer takes it whole
        else:
            await asyncio.to_thread(_send_handover, status, message, fds)
        reply = b""
        while reply != HANDED_OVER:
            chunk, got = await _read_status(status)
            _proxy_listener(got, "none")  # nothing may come with it: closed if it does
            if not chunk:
                raise (
                    _setup_error(reply, plugin_id)
                    if reply
                    else SandboxSetupError(
                        "the warm sandbox's PID 1 exited during the handover",
                        missing="sandbox launcher",
                    )
                )
            reply += chunk
            if not HANDED_OVER.startswith(reply) and b"\n" in reply:
                raise _setup_error(reply, plugin_id)
    finally:
        status.close()


def _send_handover(status: socket.socket, message: bytes, fds: list[int]) -> None:
    # Blocking, on a worker thread: the listing may be larger than the socket's buffer.
    status.setblocking(True)
    try:
        status.sendall(message)
        _send_fds(status, fds)
    finally:
        status.setblocking(False)
