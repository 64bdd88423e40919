"""The supervisor's half of a sandboxed launch: build the spec, start the launcher, write the
id maps, and learn whether every setup step succeeded.

The launcher (``launcher.py``) does the work inside the new namespaces; this side does what
only the parent can: validate everything before any process exists, choose the host uid/gid
the plugin maps to, write ``/proc/PID/{setgroups,uid_map,gid_map}`` (nsjail's order: setgroups
deny, then gid_map, then uid_map) and turn the launcher's step report into an error naming the
step, the path and the errno.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import errno as _errno
import json
import logging
import os
import socket
import stat
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

from ..errors import PluginLoadError, SandboxUnavailable
from . import _syscalls
from . import child as _process
from .cgroups import Cgroup, CgroupBackend, CgroupLimits, CgroupStats
from .cgroups import new_name as new_cgroup_name
from .egress import (EGRESS_SOCKET, PROXY_HOST, PROXY_PORT, EgressEndpoint, EgressProxy,
                     network_mode, proxy_environment)
from .idmap import FALLBACK as IDMAP_FALLBACK
from .idmap import owned_tree
from .ids import HostIds
from .paths import OpenedPath, open_grant, open_path
from .policy import SETUP_TIMEOUT, PathGrant, SandboxConfig
from .profiles import load_profile

__all__ = ["Mount", "LaunchSpec", "launch", "launch_confined", "Confinement",
           "SandboxSetupError", "SANDBOX_UID", "Sources"]

T = TypeVar("T")
LAUNCHER = str(Path(__file__).with_name("launcher.py"))
# The launcher's command line, as the plugin can read it in /proc/1/cmdline: no host path in
# it. The script's location goes in the environment, which a plugin cannot read (the
# launcher's processes are not dumpable once they change ids).
_LAUNCHER_ARGV = ["sandboxer-launcher", "-I", "-S", "-c",
                  "import os, sys; sys.path.insert(0, os.environ['SANDBOXER_LAUNCHER_DIR']); "
                  "import launcher; launcher.main()"]
SANDBOX_UID = SANDBOX_GID = 1000
# /dev/tty: opening it reaches the caller's controlling terminal, which a sandboxed process
# (a session of its own) does not have: ENXIO, as for any daemon.
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty")
# Read-only /etc pieces ordinary programs need (dynamic loader, alternatives for cc/node,
# certificates, time zone, name service switch); missing ones are skipped.
_ETC = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives",
        "/etc/ssl", "/etc/ca-certificates", "/etc/localtime", "/etc/nsswitch.conf",
        "/etc/protocols", "/etc/services", "/etc/mime.types",
        # what distribution detection, getusershell(3) and man(1) read; nothing host-unique
        # (no machine-id, no hostname: the sandbox has its own)
        "/etc/os-release", "/etc/debian_version", "/etc/lsb-release", "/etc/timezone",
        "/etc/shells", "/etc/manpath.config")
# Read-only pieces of /sys ordinary programs read: which CPUs there are (glibc's
# get_nprocs, lscpu, thread pools sizing themselves). The rest of sysfs describes the host's
# hardware and kernel, and is not mounted.
_SYS = ("/sys/devices/system/cpu", "/sys/devices/system/node")
_MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# As Docker masks them (moby's oci defaults): kernel state that leaks or acts on the host.
PROC_MASKED = ("/acpi", "/asound", "/kcore", "/keys", "/latency_stats", "/timer_list",
               "/timer_stats", "/sched_debug", "/scsi", "/sysrq-trigger")
PROC_READONLY = ("/bus", "/fs", "/irq", "/sys")
PLUGIN_MOUNT = "/plugin"
# RLIMIT_FSIZE: no single file a plugin writes (in a writable grant, say) may pass this.
MAX_FILE_SIZE = 4 << 30


class SandboxSetupError(SandboxUnavailable):
    """A step of the sandbox setup failed: names the step, the path and the errno."""

    def __init__(self, message: str, *, missing: str, step: str | None = None,
                 path: str | None = None, errno: int | None = None) -> None:
        super().__init__(message, missing=missing)
        self.step, self.path, self.errno = step, path, errno


@dataclass(frozen=True, slots=True)
class Mount:
    """A host path bound into the sandbox. ``root``: the root a grant is opened beneath,
    through no link (its path root, or "/" for the operator's); None: one of the system's
    paths, opened as named."""

    source: str
    target: str
    writable: bool = False
    exec: bool = True
    root: str | None = None


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything the launcher needs, validated before any process is started."""

    argv: list[str]
    env: dict[str, str]
    sandbox: SandboxConfig
    mounts: tuple[Mount, ...] = ()
    cwd: str = "/tmp"
    masks: tuple[str, ...] = ()
    pins: tuple[str, ...] = ()
    copies: tuple[Mount, ...] = ()  # trees copied into a private tmpfs (the plugin dir)
    seccomp_bpf: bytes | None = None
    address_space_limit: int | None = None  # RLIMIT_AS, only under the "rlimit" fallback
    # Who a writable grant's files belong to on the host (uid, gid); None: each grant's owner.
    grant_owner: tuple[int, int] | None = None
    rpc: bool = True  # fd 3 is the RPC socket; without it (exec) no fd 3 reaches the program
    program: str | None = None  # the file to exec, when argv[0] is only its name
    files: dict[str, str] = field(default_factory=dict)
    profile_dirs: tuple[str, ...] = ()  # where sandbox.profile is found (HostConfig's)


# Host uids for rootful plugins: one per running sandbox, unique host-wide (sandbox/ids.py).
_ids = HostIds()


def base_mounts() -> list[Mount]:
    """/usr and the /etc pieces ordinary programs need. (What a plugin host runs on, the
    interpreter and the sandboxer package, comes from sandbox/runtime.py, at neutral paths.)"""
    return [Mount("/usr", "/usr")] + [Mount(p, p) for p in _ETC + _SYS if os.path.exists(p)]


def grant_mounts(grants: tuple[PathGrant, ...]) -> list[Mount]:
    """Allowed paths at their own path inside; writable ones are data: never executable.
    Each is opened once by ``launch`` (beneath its root, through no link: sandbox/paths.py)
    and mounted from that fd; a link inside a granted directory resolves against the
    sandbox's root, not the host's."""
    return [Mount(g.path, g.path, writable=g.writable, exec=not g.writable, root=g.root or "/")
            for g in grants]


def mask_plan(denied: tuple[str, ...], mounts: list[Mount],
              extra_views: dict[str, str] | None = None) -> tuple[tuple[str, ...],
                                                                   tuple[str, ...]]:
    """Where to mask each denied path inside the sandbox, and which directories to pin.

    A denied path inside a *writable* grant is the dangerous case: the plugin could create it
    if it does not exist yet, or rename a parent directory to carry the mask away and find the
    file uncovered at the next load. So such a path must exist (else PluginLoadError), and
    every directory between the grant and it is pinned (bound onto itself: a mount point
    cannot be renamed or removed). ``extra_views`` maps other host directories to where the
    sandbox sees them (the plugin directory at /plugin)."""
    masks: list[str] = []
    pins: list[str] = []
    views = {m.source: m for m in mounts}
    for path in denied:
        masks.append(path)
        for host_dir, inside in (extra_views or {}).items():
            if Path(path).is_relative_to(host_dir) and path != host_dir:
                masks.append(f"{inside}/{Path(path).relative_to(host_dir).as_posix()}")
        for mount in views.values():
            if not mount.writable or not Path(path).is_relative_to(mount.target):
                continue
            if not os.path.lexists(path):
                raise PluginLoadError(
                    f"denied path {path} does not exist, and it lies inside the writable "
                    f"allowed path {mount.target}: the plugin could create it; create it "
                    "first, or deny the directory that would hold it")
            rel = Path(path).relative_to(mount.target).parts[:-1]
            for depth in range(1, len(rel) + 1):
                pins.append(str(Path(mount.target, *rel[:depth])))
    return tuple(masks), tuple(dict.fromkeys(pins))


MAX_COPY_BYTES = 512 << 20
MAX_COPY_ENTRIES = 20_000


def _tree_size(path: str) -> int:
    """Bytes a copy of ``path`` needs in a tmpfs (with room for inodes), or PluginLoadError
    when the tree is too large to copy."""
    total, entries = 0, 0
    if os.path.isdir(path):
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                entries += 1
                full = os.path.join(dirpath, name)
                if os.path.isfile(full) and not os.path.islink(full):
                    total += os.path.getsize(full)
    else:
        entries, total = 1, os.path.getsize(path)
    if total > MAX_COPY_BYTES or entries > MAX_COPY_ENTRIES:
        raise PluginLoadError(
            f"the plugin directory {path} is too large to run sandboxed ({total} bytes in "
            f"{entries} entries; at most {MAX_COPY_BYTES} bytes and {MAX_COPY_ENTRIES} "
            "entries): it is copied into the sandbox, so that no host path shows inside")
    return total + entries * 4096 + (1 << 20)


def _files(hostname: str) -> dict[str, str]:
    return {
        "/etc/passwd": f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
                       f"sandbox:x:{SANDBOX_UID}:{SANDBOX_GID}:sandbox:/tmp:/bin/sh\n"
                       "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "/etc/group": f"root:x:0:\nsandbox:x:{SANDBOX_GID}:\nnogroup:x:65534:\n",
        "/etc/hostname": f"{hostname}\n",
        "/etc/hosts": f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost\n",
    }


class Sources:
    """Every host path a launch needs, opened once, here, by the supervisor: the binds
    (grants beneath their root through no link; the system's paths as named), the devices,
    the copied plugin directory. The launcher receives these fds and never opens a host
    path by name: a name swapped for a link after this point changes nothing.

    Rootful, each bind goes as a detached copy of its mount tree (``open_tree``), which the
    launcher attaches in its own mount namespace; a writable grant's copy is idmapped so that
    the plugin writes as the grant's owner (sandbox/idmap.py). A rootless supervisor cannot
    clone mounts, so it sends the ``O_PATH`` fds; the launcher re-opens each by the path the
    kernel reports for it, through no link, and uses it only if it is the same inode (else the
    load fails); there the plugin is the caller's own uid, which needs no idmapping.

    The host uid the plugin will run as is taken here too (the idmapping names it): give it
    back with ``release_uid(sources.host_uid)`` if the launch does not happen.
    """

    def __init__(self, spec: LaunchSpec, *, plugin_id: str | None = None,
                 fallbacks: tuple[str, ...] = ()) -> None:
        self.fds: list[int] = []
        self.binds: list[dict[str, object]] = []
        self.copies: list[dict[str, object]] = []
        self.cloned = clone = os.geteuid() == 0
        self.fallbacks: set[str] = set()
        self.host_uid = _ids.acquire() if clone else os.geteuid()
        self.host_gid = self.host_uid if clone else os.getegid()
        try:
            for mount, device in [(m, False) for m in spec.mounts] + [
                    (Mount(d, d, writable=True, exec=False), True) for d in _DEVICES]:
                opened = (_open_system_path(mount.source, plugin_id) if mount.root is None
                          else open_grant(PathGrant(mount.source, mount.writable,
                                                    root=mount.root), plugin_id=plugin_id))
                with opened:
                    self.binds.append({"target": mount.target, "writable": mount.writable,
                                       "exec": mount.exec, "device": device,
                                       "host_path": opened.host_path, "dir": opened.is_dir,
                                       "fd": len(self.fds)})
                    if not clone:
                        self._keep(os.dup(opened.fd))
                    elif mount.writable and mount.root is not None:  # a writable grant
                        tree, fell_back = owned_tree(
                            opened.fd, path=opened.path, outside=(self.host_uid, self.host_gid),
                            owner=spec.grant_owner, fallbacks=fallbacks, plugin_id=plugin_id)
                        self._keep(tree)
                        if fell_back:
                            self.fallbacks.add(IDMAP_FALLBACK)
                    else:
                        self._keep(_syscalls.open_tree(opened.fd))
            for copy in spec.copies:
                self.copies.append({"target": copy.target, "fd": len(self.fds),
                                    "name": os.path.basename(copy.source),
                                    "size": _tree_size(copy.source),
                                    "max_entries": MAX_COPY_ENTRIES})
                self._keep(_open_copy_source(copy.source, plugin_id))
        except BaseException:
            self.close()
            release_uid(self.host_uid)
            raise

    def _keep(self, fd: int) -> None:
        self.fds.append(fd)

    def close(self) -> None:
        """Close the fds (sent, or no longer needed); the uid lives on with the sandbox."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

    def discard(self) -> None:
        """The launch will not happen: close the fds and give the uid back."""
        self.close()
        release_uid(self.host_uid)


def _open_system_path(path: str, plugin_id: str | None) -> OpenedPath:
    try:
        return open_path(path)
    except OSError as exc:
        raise PluginLoadError(f"plugin {plugin_id}: {path} cannot be opened to mount it in the "
                              f"sandbox: {exc.strerror}", plugin_id=plugin_id) from None


def _open_copy_source(path: str, plugin_id: str | None) -> int:
    """The plugin directory (or bare file) to copy, opened for reading as the host program
    named it; the launcher walks it from this fd, through no link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise PluginLoadError(f"plugin {plugin_id}: {path} cannot be opened: "
                              f"{exc.strerror}", plugin_id=plugin_id) from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        os.close(fd)
        raise PluginLoadError(f"plugin {plugin_id}: {path} is neither a directory nor a "
                              "regular file", plugin_id=plugin_id)
    return fd


def build_spec(spec: LaunchSpec, sources: Sources) -> dict[str, object]:
    sandbox = spec.sandbox
    mounts = list(spec.mounts)
    targets = [m.target for m in mounts]
    if len(set(targets)) != len(targets):
        raise PluginLoadError(f"two mounts share a target: {sorted(targets)}")
    symlinks = {f"/{d}": f"usr/{d}" for d in _MERGED_USR
                if os.path.islink(f"/{d}") and os.readlink(f"/{d}") == f"usr/{d}"}
    writable = [m.target for m in mounts if m.writable]
    return {
        "argv": spec.argv,
        "program": spec.program or spec.argv[0],
        "rpc": spec.rpc,
        "env": spec.env,
        "cwd": spec.cwd,
        "uid": SANDBOX_UID,
        "gid": SANDBOX_GID,
        "hostname": "sandbox",
        "fd_count": len(sources.fds),
        "trees": sources.cloned,
        "binds": sources.binds,
        "copies": sources.copies,
        "symlinks": symlinks,
        "files": {**_files("sandbox"), **spec.files},
        # A mask inside a writable grant must be made: missing, the plugin could create it.
        "masks": [{"path": m, "required": any(Path(m).is_relative_to(w) for w in writable)}
                  for m in spec.masks],
        "pins": list(spec.pins),
        "proc_masked": list(PROC_MASKED),
        "proc_readonly": list(PROC_READONLY),
        "tmp_size": sandbox.tmp_size,
        # From the profile itself, like the seccomp filter, not from the SandboxConfig: a
        # config built by hand with profile="strict" still gets strict's noexec /tmp.
        "tmp_exec": load_profile(sandbox.profile, spec.profile_dirs).tmp_exec,
        "rlimits": {"core": 0, "nofile": sandbox.nofile, "fsize": MAX_FILE_SIZE,
                    **({"as": spec.address_space_limit} if spec.address_space_limit else {}),
                    **({"nproc": sandbox.pids_limit} if os.geteuid() == 0 else {})},
        "seccomp_bpf": (None if spec.seccomp_bpf is None else
                        base64.b64encode(spec.seccomp_bpf).decode()),
        "network": {"mode": network_mode(sandbox), "host": PROXY_HOST, "port": PROXY_PORT},
    }


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
    if len(socks) == 1 and socks[0].type == socket.SOCK_STREAM \
            and socks[0].family == socket.AF_INET \
            and socks[0].getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return socks[0]
    for sock in socks:
        sock.close()
    raise SandboxSetupError("the sandbox launcher did not hand over the egress proxy's "
                            "listening socket", missing="egress proxy port")


def _setup_error(report: bytes) -> SandboxSetupError:
    try:
        info = json.loads(report.splitlines()[0])
    except (ValueError, IndexError):
        return SandboxSetupError(f"the sandbox launcher failed: {report[:500]!r}",
                                 missing="sandbox launcher")
    err = info.get("errno")
    where = f" ({info['path']})" if info.get("path") else ""
    code = f" [{_errno.errorcode.get(err, err)}]" if err is not None else ""
    message = (f"sandbox setup failed at step {info.get('what')}{where}: "
               f"{info.get('error')}{code}")
    missing = info.get("step", "sandbox").lower()
    if info.get("step") == "NAMESPACES" and err in (_errno.EPERM, _errno.ENOSPC,
                                                     _errno.EINVAL):
        message += ("; this host does not allow new user namespaces (check "
                    "/proc/sys/user/max_user_namespaces and "
                    "/proc/sys/kernel/unprivileged_userns_clone, or an AppArmor/SELinux "
                    "policy restricting them)")
        missing = "user namespaces"
    return SandboxSetupError(message, missing=missing, step=info.get("step"),
                             path=info.get("path"), errno=err)


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
        socket.send_fds(sock, [b"F"], fds[start:start + 200])


async def launch(spec: LaunchSpec, *, rpc_fd: int, logger: logging.Logger,
                 setup_timeout: float = SETUP_TIMEOUT,
                 on_spawn: Callable[[int], Awaitable[None]] | None = None,
                 egress: EgressEndpoint | None = None,
                 sinks: tuple[Callable[[bytes], None], Callable[[bytes], None]] | None = None,
                 plugin_id: str | None = None, sources: Sources | None = None,
                 stdin: int | None = None) -> tuple[_process.PluginProcess, int]:
    """Start ``spec`` sandboxed; returns the process (the launcher, whose exit status is the
    plugin's) and the host uid it maps to (release it with ``release_uid`` when it is gone).
    ``on_spawn(pid)`` runs before the launcher may go on: the place to put it in a cgroup.
    In "proxy" network mode ``egress`` gets the listener made in the plugin's namespace.
    ``sources``: the spec's paths already opened (``Sources(spec)``); closed here either way.
    ``stdin``: the program's fd 0 (``child.check_stdin``), else /dev/null.
    """
    if network_mode(spec.sandbox) == "proxy" and egress is None:
        if sources is not None:
            sources.discard()
        raise SandboxUnavailable("allowed_hosts needs the egress proxy, and none was given",
                                 missing="egress proxy")
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
    try:
        proc = _process.spawn(_LAUNCHER_ARGV, {"PATH": "/usr/bin:/bin",
                                               "SANDBOXER_LAUNCHER_DIR": os.path.dirname(LAUNCHER)},
                              rpc_fd=rpc_fd, logger=logger, executable=sys.executable,
                              extra_fds={4: control_r, 5: status_w.fileno()}, sinks=sinks,
                              stdin=stdin, owner=(host_uid, host_gid))
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
                raise _setup_error(first) if first else SandboxSetupError(
                    f"the sandbox launcher exited during setup ({proc.describe_exit()})",
                    missing="sandbox launcher")
            if egress is not None and mode == "proxy":
                await egress.start(listener)
            try:
                _write_id_maps(proc.pid, host_uid, host_gid)
            except OSError as exc:
                raise SandboxSetupError(
                    f"writing the user namespace id maps failed: {exc.strerror} "
                    f"({exc.filename})", missing="user namespace id maps") from exc
            os.write(control_w, b"G")
            report = b""
            while True:
                chunk, fds = await _read_status(status)
                _proxy_listener(fds, "none")  # nothing more may come: closed if it does
                if not chunk:
                    break
                report += chunk
            if report:
                raise _setup_error(report)
    except BaseException as exc:
        await proc.close()
        sources.discard()
        if isinstance(exc, TimeoutError):
            raise SandboxSetupError(f"the sandbox setup did not finish within "
                                    f"{setup_timeout:g}s", missing="sandbox launcher") from None
        raise
    finally:
        os.close(control_w)
        status.close()
    return proc, host_uid


def release_uid(uid: int) -> None:
    if os.geteuid() == 0:
        _ids.release(uid)


class Confinement:
    """What a sandboxed process holds besides itself: its cgroup, its host uid and its egress
    proxy endpoint. ``release()`` (idempotent) kills anything left in the cgroup, removes it,
    closes the endpoint, frees the uid."""

    def __init__(self, cgroup: Cgroup | None, host_uid: int, memory_limit: int,
                 fallbacks: tuple[str, ...] = (), egress: EgressEndpoint | None = None) -> None:
        self.cgroup = cgroup
        self.egress = egress
        self.fallbacks = fallbacks
        self.host_uid = host_uid
        self.memory_limit = memory_limit
        self._last: CgroupStats | None = None
        self._released = False

    def stats(self) -> CgroupStats | None:
        if not self._released and self.cgroup is not None:
            try:
                self._last = self.cgroup.stats()
            except OSError:
                pass
        return self._last

    def oom_killed(self) -> bool:
        stats = self.stats()
        return stats is not None and stats.oom_kills > 0

    async def aclose(self) -> None:
        """``release()`` with the cgroup's removal (kill, wait, rmdir) on a worker thread."""
        if self._released:
            return
        self.stats()
        if self.egress is not None:
            self.egress.close()
        group, self.cgroup = self.cgroup, None  # stats() keeps its last reading meanwhile
        if group is not None:
            await _off_loop(group.remove)
        self.release()

    def release(self) -> None:
        if self._released:
            return
        self.stats()
        self._released = True
        try:
            if self.egress is not None:
                self.egress.close()
            if self.cgroup is not None:
                self.cgroup.remove()
        finally:
            release_uid(self.host_uid)


async def launch_confined(
        spec: LaunchSpec, *, backend: CgroupBackend, rpc_fd: int, logger: logging.Logger,
        sinks: tuple[Callable[[bytes], None], Callable[[bytes], None]] | None = None,
        fallbacks: tuple[str, ...] = (), egress: EgressProxy | None = None,
        plugin_id: str = "-", setup_timeout: float = SETUP_TIMEOUT, stdin: int | None = None,
) -> tuple[_process.PluginProcess, Confinement]:
    """``launch`` inside a fresh cgroup limited as ``spec.sandbox`` says, and, when it lists
    allowed hosts, with an endpoint of ``egress`` (the proxy's socket bound in, the proxy
    variables in its environment) made for ``plugin_id``.

    With ``fallbacks`` naming "rlimit" and no cgroup to be had, the process is limited by
    RLIMIT_AS instead, and the returned Confinement says so."""
    sandbox = spec.sandbox
    endpoint = None
    if network_mode(sandbox) == "proxy" and egress is not None:  # without one, launch refuses
        endpoint = egress.endpoint(plugin_id, sandbox.allowed_hosts)
        spec = dataclasses.replace(
            spec, env={**spec.env, **proxy_environment()},
            mounts=spec.mounts + (Mount(endpoint.socket_path, EGRESS_SOCKET, exec=False),))
    try:
        return await _launch_in_cgroup(spec, backend=backend, rpc_fd=rpc_fd, logger=logger,
                                       sinks=sinks, fallbacks=fallbacks, egress=endpoint,
                                       setup_timeout=setup_timeout, plugin_id=plugin_id,
                                       stdin=stdin)
    except BaseException:
        if endpoint is not None:
            endpoint.close()
        raise


async def _launch_in_cgroup(
        spec: LaunchSpec, *, backend: CgroupBackend, rpc_fd: int, logger: logging.Logger,
        sinks: tuple[Callable[[bytes], None], Callable[[bytes], None]] | None,
        fallbacks: tuple[str, ...], egress: EgressEndpoint | None, setup_timeout: float,
        plugin_id: str, stdin: int | None,
) -> tuple[_process.PluginProcess, Confinement]:
    sandbox = spec.sandbox
    limits = CgroupLimits(memory=sandbox.memory_limit, cpu=sandbox.cpu_limit,
                          pids=sandbox.pids_limit)
    # A path that cannot be opened: no cgroup
    sources = Sources(spec, plugin_id=plugin_id, fallbacks=fallbacks)
    try:
        group = await _off_loop(_create_cgroup, backend, limits)
    except SandboxUnavailable as exc:
        if "rlimit" not in fallbacks or not exc.missing.startswith("cgroup"):
            sources.discard()
            raise
        logger.warning("no cgroup (%s): falling back to RLIMIT_AS as the host policy allows; "
                       "CPU and process limits are not enforced", exc)
        spec = dataclasses.replace(spec, address_space_limit=sandbox.memory_limit)
        proc, uid = await launch(spec, rpc_fd=rpc_fd, logger=logger, sinks=sinks, egress=egress,
                                 setup_timeout=setup_timeout, sources=sources, stdin=stdin)
        return proc, Confinement(None, uid, sandbox.memory_limit,
                                 fallbacks=("rlimit", *sorted(sources.fallbacks)), egress=egress)
    except BaseException:
        sources.discard()
        raise
    try:
        proc, uid = await launch(spec, rpc_fd=rpc_fd, logger=logger,
                                 on_spawn=lambda pid: _off_loop(group.add, pid),
                                 sinks=sinks, egress=egress, setup_timeout=setup_timeout,
                                 sources=sources, stdin=stdin)
    except BaseException:
        await _off_loop(group.remove)
        raise
    return proc, Confinement(group, uid, sandbox.memory_limit, egress=egress,
                             fallbacks=tuple(sorted(sources.fallbacks)))


# cgroup writes can take milliseconds (a v1 migration waits for RCU in every hierarchy):
# they run on a worker thread, so that other plugins' calls are not held up meanwhile.
# Creation is serialised: a backend may set itself up (v2: the supervisor's leaf) on first use.
_create_lock = threading.Lock()


def _create_cgroup(backend: CgroupBackend, limits: CgroupLimits) -> Cgroup:
    with _create_lock:
        return backend.create(new_cgroup_name(), limits)


async def _off_loop(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on a worker thread; it finishes even if the caller is cancelled
    (a cgroup half made or half removed is worse than a late one)."""
    return await asyncio.shield(asyncio.to_thread(function, *args))


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a ``run()`` ended: the return code (negative: killed by that signal), what the
    cgroup measured, and whether its deadline stopped it."""

    returncode: int
    stats: CgroupStats | None
    oom_killed: bool
    timed_out: bool = False


# The PATH a program finds inside the sandbox; and how long one past its deadline has between
# SIGTERM and SIGKILL (a short grace: enough to flush and exit, not to go on working).
EXEC_PATH = ("/usr/local/bin", "/usr/bin", "/bin")
KILL_GRACE = 2.0


def _not_found(path: str, why: str = "") -> PluginLoadError:
    return PluginLoadError(f"not found inside the sandbox: {path} ({why}grant its directory "
                           "with --allow-path)")


def _shows_inside(path: str, mounts: list[Mount], denied: tuple[str, ...]) -> bool | None:
    """Whether the host's absolute ``path`` shows at the same path inside a sandbox with
    ``mounts``: lexically, as the launcher builds the root. None for /proc and /dev, which
    are the sandbox's own: only the launch can tell."""
    where = Path(os.path.normpath(path))
    if where.parts[1:2] and where.parts[1] in _MERGED_USR and (
            os.path.islink(f"/{where.parts[1]}")
            and os.readlink(f"/{where.parts[1]}") == f"usr/{where.parts[1]}"):
        where = Path("/usr", *where.parts[1:])  # the sandbox has the same merged-usr links
    if where.is_relative_to("/proc") or where.is_relative_to("/dev"):
        return None
    if any(where.is_relative_to(d) for d in denied):
        return False
    return any(where.is_relative_to(m.target) for m in mounts)


def find_program(name: str, mounts: list[Mount], denied: tuple[str, ...] = ()) -> str:
    """The absolute path ``name`` runs as inside a sandbox with ``mounts`` and ``denied``
    masks. A bare name is looked up on the sandbox's PATH and in the sbin directories, then
    on the caller's PATH (a directory granted to the sandbox can hold it); a relative path is
    relative to the caller's working directory, as a shell reads it (inside, the working
    directory is the empty /tmp). A path
    that cannot show inside, or whose link leads where nothing shows, is refused here with
    "not found inside the sandbox"; what only the launch can tell, its exec step reports the
    same way (``run``)."""
    if "/" not in name:
        first_on_host = None
        for directory in (*EXEC_PATH, "/usr/sbin", "/sbin",
                          *os.environ.get("PATH", "").split(":")):
            candidate = os.path.join(directory, name)
            if (not directory.startswith("/") or os.path.isdir(candidate)
                    or not os.access(candidate, os.X_OK)):
                continue
            first_on_host = first_on_host or candidate
            if _shows_inside(os.path.realpath(candidate), mounts, denied) is not False:
                return candidate
        raise _not_found(first_on_host or name)
    path = os.path.abspath(name)
    shows = _shows_inside(path, mounts, denied)
    if shows is None:
        return path
    if not shows or not os.path.exists(path):
        raise _not_found(path)
    real = os.path.realpath(path)
    if _shows_inside(real, mounts, denied) is False:
        raise _not_found(path, f"a link to {real}; ")
    return path


def _interpreter(path: str) -> str | None:
    """The interpreter a script's ``#!`` line names, if ``path`` is a script."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.read(fd, 256)
    finally:
        os.close(fd)
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].split()
    return words[0].decode(errors="replace") if words else None


def _exec_error(error: SandboxSetupError, program: str,
                shows: bool | None) -> PluginLoadError | None:
    """The launch's exec step failing on the program itself is the program's fault, not the
    host's (exit 2, not 4): missing inside, or not runnable there. ``shows``: whether the
    program's own path shows inside (``_shows_inside``)."""
    if error.step != "EXEC" or error.path != program:
        return None
    if error.errno in (_errno.ENOENT, _errno.ENOTDIR, _errno.ELOOP):
        interpreter = _interpreter(program) if shows else None
        if interpreter is not None:  # the script is there: its #! line names what is not
            return _not_found(interpreter, f"the interpreter {program} names; ")
        return _not_found(program)
    if error.errno in (_errno.EACCES, _errno.ENOEXEC, _errno.EISDIR):
        return PluginLoadError(
            f"cannot run {program} inside the sandbox: {os.strerror(error.errno)} (it runs "
            "as an unprivileged user; writable grants, and /tmp under the strict profile, "
            "are noexec)")
    return None


async def run(argv: list[str], sandbox: SandboxConfig, *, backend: CgroupBackend,
              seccomp_bpf: bytes | None, cwd: str = "/tmp",
              sinks: tuple[Callable[[bytes], None], Callable[[bytes], None]] | None = None,
              logger: logging.Logger | None = None, egress: EgressProxy | None = None,
              setup_timeout: float = SETUP_TIMEOUT,
              profile_dirs: tuple[str, ...] = (), fallbacks: tuple[str, ...] = (),
              grant_owner: tuple[int, int] | None = None, stdin: int | None = None,
              timeout: float | None = None, kill_grace: float = KILL_GRACE) -> RunResult:
    """Run any program in the sandbox (``sandboxer exec``) and wait for it; with allowed
    hosts, its egress goes through ``egress`` (logged as plugin "exec").

    ``stdin`` becomes the program's fd 0 (``child.check_stdin``); by default it reads
    /dev/null: a host application's own stdin is not the program's to take. ``timeout``
    bounds the program's run from its exec (the setup has ``setup_timeout``): past it, SIGTERM,
    then SIGKILL ``kill_grace`` seconds later, and ``RunResult.timed_out``. Whatever is left
    in its cgroup dies with it either way. A program missing inside, or not runnable there,
    is a ``PluginLoadError`` ("not found inside the sandbox: PATH ...")."""
    if stdin is not None:
        _process.check_stdin(stdin)  # before any cgroup or process exists
    grants = grant_mounts(sandbox.allowed_paths)
    mounts = base_mounts() + grants
    program = find_program(argv[0], mounts, sandbox.denied_paths)
    masks, pins = mask_plan(sandbox.denied_paths, grants)
    spec = LaunchSpec(argv=list(argv), program=program, rpc=False,
                      env={"PATH": ":".join(EXEC_PATH), "HOME": "/tmp",
                           "LANG": "C.UTF-8", "TERM": os.environ.get("TERM", "dumb")},
                      sandbox=sandbox, mounts=tuple(mounts), cwd=cwd, masks=masks, pins=pins,
                      seccomp_bpf=seccomp_bpf, profile_dirs=profile_dirs,
                      grant_owner=grant_owner)
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    try:
        proc, confinement = await launch_confined(
            spec, backend=backend, rpc_fd=null, sinks=sinks,
            logger=logger or logging.getLogger("sandboxer.exec"), egress=egress,
            plugin_id="exec", setup_timeout=setup_timeout, fallbacks=fallbacks, stdin=stdin)
    except SandboxSetupError as exc:
        mapped = _exec_error(exc, program, _shows_inside(program, mounts, sandbox.denied_paths))
        if mapped is None:
            raise
        raise mapped from exc
    finally:
        os.close(null)
    try:
        code = await proc.wait(timeout)
        if code is None:
            await proc.terminate(kill_grace)
        await proc.output_closed(1.0)
        if proc.returncode is None:
            raise RuntimeError(f"{program}: reaped without a return code")
        return RunResult(proc.returncode, confinement.stats(), confinement.oom_killed(),
                         timed_out=code is None)
    finally:
        await proc.close()
        await confinement.aclose()
