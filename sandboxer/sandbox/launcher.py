"""The sandbox launcher: a fresh, single-threaded process that builds the sandbox and execs.

Run by the supervisor as ``sandboxer-launcher -I -S -c "...import launcher; launcher.main()"``
(argv[0] and the code name no host path, since a plugin can read PID 1's command line; the
script's directory comes in ``SANDBOXER_LAUNCHER_DIR``, so that importing it pulls in nothing
but the standard library and ``_syscalls``; -S: no site-packages, so no .pth file runs code in
this privileged process) with:

    fd 0  /dev/null          fd 3  the plugin's end of the RPC socket
    fd 1  stdout pipe        fd 4  control pipe from the supervisor (spec, then "go")
    fd 2  stderr pipe        fd 5  status socket to and from the supervisor

It reads the spec (one JSON line) from fd 4 and the sources from fd 5 (SCM_RIGHTS): every
host path it mounts or copies, opened once by the supervisor (sandbox/sources.py, Sources):
detached mount trees when the supervisor is root, else O_PATH fds that are re-opened here by
the kernel's own name for them, through no link, and used only if they are still the same
inode. No host path is ever opened here by a name that someone else could have changed, and
every mount target inside the new root is reached one component at a time through no link.
Then it follows DESIGN section 6 in order, one function per step, each failure reported to
the supervisor over fd 5 as ``{"step", "error", "errno", "path"}`` before exiting 127. A
successful exec closes fd 5 with nothing written, which is how the supervisor knows the
plugin is running. The supervisor's side of all this is sandbox/start.py.

Network: with ``network.mode`` "none" the new net namespace has nothing but its loopback,
brought up (programs talk to themselves over 127.0.0.1; nothing leaves); "proxy" also makes a
TCP listener on 127.0.0.1:PORT there, which goes to the supervisor over the status socket
with the "U" message (SCM_RIGHTS) and is closed here: the supervisor's egress proxy accepts on
it, so nothing of the proxy runs in here; "host" keeps the supervisor's net namespace (full
network, only when the host policy allows).

Process layout inside: the launcher stays outside the new pid namespace as a proxy that
relays the exit status; its child is PID 1 of the namespace, and PID 1's child execs the
plugin. Once the plugin is forked, PID 1 drops every capability and waits for signals
synchronously: it reaps, forwards a SIGTERM that comes from outside the namespace, ignores
every signal the plugin sends it, and never prints anything. Killing the launcher kills
them all.

This file must never run plugin code before every step has succeeded, and never exec with a
capability, an fd or an environment variable the spec did not grant.
"""

from __future__ import annotations

# Every module the launcher uses is imported here, before pivot_root: afterwards the
# interpreter's standard library may not be inside (an interpreter outside /usr).
import base64
import ctypes
import enum
import errno
import json
import os
import resource
import signal
import socket
import stat
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _syscalls as sc  # noqa: E402  (by path: see the module docstring)

RPC_FD, CONTROL_FD, STATUS_FD = 3, 4, 5
PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_SECUREBITS = 28
# SECBIT_NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED, NOROOT_LOCKED, NO_SETUID_FIXUP_LOCKED,
# NO_CAP_AMBIENT_RAISE and its lock: root inside can never regain capabilities.
SECUREBITS_LOCKED = 0x01 | 0x02 | 0x04 | 0x08 | 0x20 | 0x40 | 0x80
CAP_LAST_CAP_PATH = "/proc/sys/kernel/cap_last_cap"

NAMESPACES = (sc.CLONE_NEWUSER | sc.CLONE_NEWNS | sc.CLONE_NEWPID | sc.CLONE_NEWNET
              | sc.CLONE_NEWIPC | sc.CLONE_NEWUTS | sc.CLONE_NEWCGROUP)
NEW_ROOT = "/tmp"  # the new root is a tmpfs mounted over /tmp in the private mount namespace


class Step(enum.Enum):
    LAUNCHER = "run the sandbox launcher"
    SPEC = "read the spec"
    PRIVILEGES = "drop supplementary groups"
    NAMESPACES = "unshare namespaces"
    NETWORK = "set up the net namespace (loopback, the proxy port)"
    SOURCES = "receive the sources"
    ID_MAPS = "wait for the id maps"
    PID1 = "fork PID 1"
    ROOT = "build the new root"
    BIND = "bind-mount a path"
    COPY = "copy the plugin directory"
    PROC = "mount /proc"
    DEV = "build /dev"
    MASK = "mask a path"
    PIVOT = "pivot_root"
    HOSTNAME = "set the hostname"
    RLIMITS = "set rlimits"
    FDS = "close inherited fds"
    IDS = "switch to the sandbox uid/gid"
    CAPS = "drop capabilities"
    NO_NEW_PRIVS = "set no_new_privs"
    SECCOMP = "load the seccomp filter"
    EXEC = "exec the plugin"


class SetupFailed(Exception):
    def __init__(self, step: Step, error: OSError | str, path: str | None = None) -> None:
        super().__init__(step.value)
        self.step = step
        self.errno = error.errno if isinstance(error, OSError) else None
        self.error = error.strerror if isinstance(error, OSError) else str(error)
        self.path = path or (error.filename if isinstance(error, OSError) else None)


def report(failure: SetupFailed) -> None:
    message = json.dumps({"step": failure.step.name, "what": failure.step.value,
                          "error": failure.error, "errno": failure.errno,
                          "path": failure.path}).encode() + b"\n"
    try:
        os.write(STATUS_FD, message)
    except OSError:
        pass


def step(which: Step, path: str | None = None):  # type: ignore[no-untyped-def]
    """Decorator-free helper: ``with step(Step.X):`` turns OSError into SetupFailed."""
    class _Guard:
        def __enter__(self) -> None:
            return None

        def __exit__(self, kind, exc, tb) -> bool:  # type: ignore[no-untyped-def]
            if isinstance(exc, Exception) and not isinstance(exc, SetupFailed):
                raise SetupFailed(which, exc if isinstance(exc, OSError)
                                  else f"{type(exc).__name__}: {exc}", path) from exc
            return False
    return _Guard()


def fail(error: BaseException) -> None:
    """Report ``error`` and exit 127, never printing a traceback (it would name host paths
    in the plugin's log)."""
    if not isinstance(error, SetupFailed):
        error = SetupFailed(Step.LAUNCHER, f"{type(error).__name__}: {error}")
    report(error)
    os._exit(127)


def _libc_prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                  ctypes.c_ulong(arg4), ctypes.c_ulong(arg5)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# -- steps in the launcher (outside the pid namespace) ------------------------------------------

def read_spec() -> dict:  # type: ignore[type-arg]
    with step(Step.SPEC):
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(CONTROL_FD, 1 << 16)
            if not chunk:
                raise SetupFailed(Step.SPEC, "the supervisor closed the control pipe")
            data += chunk
    return json.loads(data)


def receive_sources(spec: dict) -> list[int]:  # type: ignore[type-arg]
    """The sources, in the spec's order, as the supervisor opened them (fd 5, SCM_RIGHTS)."""
    fds: list[int] = []
    status = socket.socket(fileno=STATUS_FD)
    try:
        with step(Step.SOURCES):
            while len(fds) < spec["fd_count"]:
                data, got, _, _ = socket.recv_fds(status, 1, 253, socket.MSG_CMSG_CLOEXEC)
                if not data:
                    raise SetupFailed(Step.SOURCES, f"the supervisor sent {len(fds)} of "
                                                    f"{spec['fd_count']} sources")
                fds += got
    finally:
        status.detach()
    return fds


def drop_supplementary_groups() -> None:
    # Host root's supplementary groups would still grant access through their host gids
    # inside the user namespace; setgroups is refused there later, so drop them now.
    if os.geteuid() == 0:
        with step(Step.PRIVILEGES):
            os.setgroups([])


def unshare_namespaces(spec: dict) -> None:  # type: ignore[type-arg]
    flags = NAMESPACES
    if spec["network"]["mode"] == "host":  # full network: the host policy allowed it
        flags &= ~sc.CLONE_NEWNET
    with step(Step.NAMESPACES):
        _libc_prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the supervisor
        sc.unshare(flags)


def set_up_network(spec: dict) -> int | None:  # type: ignore[type-arg]
    """Loopback up in the new net namespace (modes "none" and "proxy"): programs talk to
    themselves over 127.0.0.1 as they do outside, and nothing else is there to reach. In
    "proxy" mode also a listening TCP socket on it for the supervisor's egress proxy, which
    is returned. Done with the namespace's capabilities, before the id maps: nothing here
    creates a file."""
    network = spec["network"]
    if network["mode"] == "host":
        return None
    with step(Step.NETWORK, "lo"):
        sc.loopback_up()
    if network["mode"] != "proxy":
        return None
    with step(Step.NETWORK, f"{network['host']}:{network['port']}"):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((network["host"], network["port"]))
        listener.listen(128)
        return listener.detach()


def wait_for_id_maps(proxy_port: int | None) -> None:
    """Tell the supervisor the user namespace exists (handing over the proxy port's socket,
    if any); it writes the maps and says go."""
    with step(Step.ID_MAPS):
        if proxy_port is None:
            os.write(STATUS_FD, b"U\n")
        else:
            status = socket.socket(fileno=STATUS_FD)
            try:
                socket.send_fds(status, [b"U\n"], [proxy_port])
            finally:
                status.detach()
                os.close(proxy_port)  # the supervisor holds it now; nothing in here does
        if os.read(CONTROL_FD, 1) != b"G":
            raise SetupFailed(Step.ID_MAPS, "the supervisor did not confirm the id maps")


def proxy(child: int, exit_pipe: int) -> None:
    """The launcher's last job: relay signals to PID 1 and the plugin's exit status upward."""
    os.close(STATUS_FD)
    os.close(CONTROL_FD)
    os.close(RPC_FD)
    # Through a pidfd: once PID 1 is reaped its number may belong to another process, and a
    # SIGTERM arriving then must reach nobody, not raise (a traceback in the plugin's log).
    pidfd = os.pidfd_open(child)

    def forward(*_: object) -> None:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        except ProcessLookupError:
            pass  # PID 1 is gone: its status is on the way

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    reported = os.read(exit_pipe, 16)
    if reported:  # the plugin's own wait status, as PID 1 saw it
        status = int(reported)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # die the way the plugin died, so the supervisor sees the signal
        if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those two cannot be handled
            signal.signal(-code, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [-code])
        os.kill(os.getpid(), -code)
    os._exit(code & 0xFF)


# -- steps in PID 1 (inside the namespaces, before pivot_root) -----------------------------------

def _mkdirs(path: str) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)


_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def open_inside(path: str, *, create: bool | None = None) -> int | None:
    """An O_PATH fd for ``path`` in the new root, reached one component at a time from the
    root's fd, through no symbolic link: a link on the way (a host directory bound in may
    hold one, put there by whoever can write it) fails the step instead of leading out.
    ``create`` True/False makes a missing last component as a directory/file (and missing
    parents as directories); None returns None for a missing path."""
    parts = [p for p in path.split("/") if p]
    current = os.open(NEW_ROOT, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            try:
                following = os.open(part, _PATH_NOFOLLOW, dir_fd=current)
            except FileNotFoundError:
                if create is None:
                    os.close(current)
                    return None
                if last and create is False:
                    os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, 0o644, dir_fd=current))
                else:
                    os.mkdir(part, 0o755, dir_fd=current)
                following = os.open(part, _PATH_NOFOLLOW, dir_fd=current)
            os.close(current)
            current = following
            mode = os.fstat(current).st_mode
            if stat.S_ISLNK(mode):
                raise OSError(errno.ELOOP, "a symbolic link is in the way",
                              "/" + "/".join(parts[:i + 1]))
            if not last and not stat.S_ISDIR(mode):
                raise OSError(errno.ENOTDIR, "not a directory", "/" + "/".join(parts[:i + 1]))
        return current
    except BaseException:
        os.close(current)
        raise


def attach(tree: int, target: int, attrs: int) -> None:
    """Set ``attrs`` (and private propagation) on a detached mount tree, then mount it on
    the object ``target`` refers to."""
    sc.mount_setattr_fd(tree, attrs)
    sc.move_mount(tree, target)


def clone_onto(source: int, target: int, attrs: int) -> None:
    """Mount a copy of the mount tree at ``source`` on ``target``, with ``attrs``."""
    tree = sc.open_tree(source)
    try:
        attach(tree, target, attrs)
    finally:
        os.close(tree)


def mount_trees(spec: dict, fds: list[int]) -> list[int]:  # type: ignore[type-arg]
    """A detached mount tree per bind, in this mount namespace: the supervisor's clones as
    they are; else each O_PATH source re-opened by the path the kernel reported for it, through
    no link, refused unless it is the very inode the supervisor opened, then cloned here."""
    if spec["trees"]:
        return [fds[bind["fd"]] for bind in spec["binds"]]
    trees = []
    for bind in spec["binds"]:
        source = fds[bind["fd"]]
        with step(Step.BIND, bind["host_path"]):
            here = sc.openat2(sc.AT_FDCWD, bind["host_path"], os.O_PATH,
                              sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS)
            try:
                mine, theirs = os.fstat(here), os.fstat(source)
                if (mine.st_dev, mine.st_ino) != (theirs.st_dev, theirs.st_ino):
                    raise SetupFailed(Step.BIND, "the path was replaced after the supervisor "
                                                 "opened it", bind["host_path"])
                trees.append(sc.open_tree(here))
            finally:
                os.close(here)
    return trees


def _same_inode(fd: int, expected: os.stat_result, rel: str) -> None:
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (expected.st_dev, expected.st_ino):
        os.close(fd)
        raise SetupFailed(Step.COPY, "it changed while the plugin directory was being copied",
                          rel)


def _walk_copy(dir_fd: int, prefix: str, entries: list, limit: int) -> None:  # type: ignore[type-arg]
    """Every entry below ``dir_fd``: directories opened from their parent's fd with
    O_NOFOLLOW | O_DIRECTORY, files with O_NOFOLLOW, each checked to be the inode its lstat
    named; links copied as links, never followed; anything else left out."""
    for name in sorted(os.listdir(dir_fd)):
        if len(entries) >= limit:
            raise SetupFailed(Step.COPY, f"the plugin directory has more than {limit} entries")
        rel = prefix + name
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        mode = st.st_mode & 0o7777
        if stat.S_ISLNK(st.st_mode):
            entries.append((rel, "l", 0, os.readlink(name, dir_fd=dir_fd)))
        elif stat.S_ISDIR(st.st_mode):
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=dir_fd)
            _same_inode(sub, st, rel)
            try:
                entries.append((rel, "d", mode, None))
                _walk_copy(sub, rel + "/", entries, limit)
            finally:
                os.close(sub)
        elif stat.S_ISREG(st.st_mode):
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
            _same_inode(fd, st, rel)
            entries.append((rel, "f", mode, fd))


def open_copies(spec: dict, fds: list[int]) -> list[tuple[str, list[tuple[str, str, int, object]]]]:  # type: ignore[type-arg]
    """For each copied tree (the plugin directory, or a bare file): every entry, its files
    opened for reading while still the supervisor's host identity, walked from the fd the
    supervisor opened and through no link. Copied rather than bound, the plugin's directory
    shows no host path anywhere, not even as a mount's root in mountinfo."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    trees = []
    for copy in spec["copies"]:
        source = fds[copy["fd"]]
        entries: list[tuple[str, str, int, object]] = []
        with step(Step.COPY, copy["target"]):
            st = os.fstat(source)
            if stat.S_ISDIR(st.st_mode):
                _walk_copy(source, "", entries, copy["max_entries"])
            else:  # a bare file: the supervisor checked it is a regular file
                entries.append((copy["name"], "f", st.st_mode & 0o7777, os.dup(source)))
        trees.append((copy["target"], entries))
    return trees


def copy_trees(spec: dict, trees: list) -> None:  # type: ignore[type-arg]
    for (target, entries), copy in zip(trees, spec["copies"]):
        full_target = NEW_ROOT + target
        with step(Step.COPY, target):
            _mkdirs(full_target)
            sc.mount("tmpfs", full_target, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV,
                     f"mode=0755,size={int(copy['size'])}")
            for rel, kind, mode, payload in entries:
                dest = os.path.join(full_target, rel)
                if kind == "d":
                    os.mkdir(dest, mode | 0o700)
                elif kind == "l":
                    os.symlink(str(payload), dest)
                else:
                    out = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                  (mode & 0o7777 & ~0o6000) | 0o600)
                    try:
                        while os.sendfile(out, int(payload), None, 1 << 20):  # type: ignore[arg-type]
                            pass
                    finally:
                        os.close(out)
                        os.close(int(payload))  # type: ignore[arg-type]
            sc.mount_setattr(full_target, sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID
                             | sc.MOUNT_ATTR_NODEV)


def become_sandbox_ids(spec: dict) -> None:  # type: ignore[type-arg]
    """Take the mapped uid/gid now: files created while building the root need an owner the
    user namespace can represent. Capabilities in the namespace stay until they are dropped."""
    with step(Step.IDS):
        os.setresgid(spec["gid"], spec["gid"], spec["gid"])
        os.setresuid(spec["uid"], spec["uid"], spec["uid"])


def build_root() -> None:
    """Private propagation, and a tmpfs for the new root."""
    with step(Step.ROOT):
        sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    with step(Step.ROOT, NEW_ROOT):
        sc.mount("tmpfs", NEW_ROOT, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755,size=16m")


def bind_paths(spec: dict, trees: list[int]) -> None:  # type: ignore[type-arg]
    for bind, tree in zip(spec["binds"], trees):
        if bind["device"]:
            continue  # build_dev
        with step(Step.BIND, bind["target"]):
            target = open_inside(bind["target"], create=bind["dir"])
            assert target is not None
            attrs = sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV
            if not bind["writable"]:
                attrs |= sc.MOUNT_ATTR_RDONLY
            if not bind["exec"]:
                attrs |= sc.MOUNT_ATTR_NOEXEC
            try:
                attach(tree, target, attrs)
            finally:
                os.close(target)


def mount_tmp(spec: dict) -> None:  # type: ignore[type-arg]
    target = NEW_ROOT + "/tmp"
    # Executable only if the profile says so (default: compilers and test suites run what
    # they build there); strict's /tmp is noexec like every other writable mount.
    noexec = 0 if spec["tmp_exec"] else sc.MS_NOEXEC
    with step(Step.ROOT, "/tmp"):
        _mkdirs(target)
        sc.mount("tmpfs", target, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV | noexec,
                 f"mode=1777,size={int(spec['tmp_size'])}")


def mount_proc(spec: dict) -> None:  # type: ignore[type-arg]
    target = NEW_ROOT + "/proc"
    with step(Step.PROC, "/proc"):
        _mkdirs(target)
        sc.mount("proc", target, "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)
    # As Docker does: files that leak kernel state or act on the host are masked, trees
    # that are writable in a fresh procfs are made read-only.
    for path in spec["proc_masked"]:
        full = target + path
        if not os.path.lexists(full):
            continue
        with step(Step.MASK, "/proc" + path):
            if os.path.isdir(full):
                sc.mount("tmpfs", full, "tmpfs", sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV
                         | sc.MS_NOEXEC, "size=0,mode=0555")
            else:
                sc.mount("/dev/null", full, None, sc.MS_BIND)
                sc.mount_setattr(full, sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID
                                 | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC, recursive=False)
    for path in spec["proc_readonly"]:
        full = target + path
        if not os.path.isdir(full):
            continue
        with step(Step.MASK, "/proc" + path):
            sc.mount(full, full, None, sc.MS_BIND | sc.MS_REC)
            sc.mount_setattr(full, sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID
                             | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC)


def build_dev(spec: dict, trees: list[int]) -> None:  # type: ignore[type-arg]
    dev = NEW_ROOT + "/dev"
    with step(Step.DEV, "/dev"):
        _mkdirs(dev)
        sc.mount("tmpfs", dev, "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, "mode=0755,size=64k")
        for bind, tree in zip(spec["binds"], trees):
            if not bind["device"]:
                continue
            target = open_inside(bind["target"], create=False)
            assert target is not None
            try:
                attach(tree, target, sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NOEXEC)
            finally:
                os.close(target)
        for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                           ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(link, f"{dev}/{name}")
        _mkdirs(dev + "/shm")
        sc.mount("tmpfs", dev + "/shm", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
                 "mode=1777,size=16m")
    with step(Step.DEV, "/dev/pts"):
        # A devpts of the sandbox's own (newinstance): programs may make pseudo-terminals
        # (openpty, script, expect, terminal test suites) and see none of the host's.
        _mkdirs(dev + "/pts")
        sc.mount("devpts", dev + "/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC,
                 "newinstance,ptmxmode=0666,mode=0620")
        os.symlink("pts/ptmx", dev + "/ptmx")
    with step(Step.DEV, "/dev"):
        # Not the program's to write in, as on the host (EACCES); its owner is the sandbox
        # user, but the tmpfs is its own: nothing it could do there reaches the host.
        os.chmod(dev, 0o555)


_MASK_ATTRS = (sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV
               | sc.MOUNT_ATTR_NOEXEC)


def mask_denied(spec: dict) -> None:  # type: ignore[type-arg]
    # Directories between a writable grant and a denied path in it become mount points, which
    # cannot be renamed or removed: the mask cannot be carried away by moving its parent.
    for path in spec["pins"]:
        with step(Step.MASK, path):
            target = open_inside(path)
            if target is None:
                raise SetupFailed(Step.MASK, "the directory holding a denied path is gone",
                                  path)
            try:
                clone_onto(target, target, sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV
                           | sc.MOUNT_ATTR_NOEXEC)
            finally:
                os.close(target)
    for mask in spec["masks"]:
        path = mask["path"]
        with step(Step.MASK, path):
            target = open_inside(path)
            if target is None:
                if mask["required"]:
                    raise SetupFailed(Step.MASK, "a denied path inside a writable grant is "
                                                 "gone: the plugin could create it", path)
                continue
            try:
                if stat.S_ISDIR(os.fstat(target).st_mode):
                    sc.mount("tmpfs", f"/proc/self/fd/{target}", "tmpfs", sc.MS_RDONLY
                             | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, "size=0,mode=0000")
                else:
                    null = os.open("/dev/null", os.O_PATH | os.O_CLOEXEC)
                    try:
                        clone_onto(null, target, _MASK_ATTRS)
                    finally:
                        os.close(null)
            finally:
                os.close(target)


def write_files(spec: dict) -> None:  # type: ignore[type-arg]
    with step(Step.ROOT, "/etc"):
        for path, content in spec["files"].items():
            full = NEW_ROOT + path
            _mkdirs(os.path.dirname(full))
            with open(full, "w") as f:
                f.write(content)
        for link, target in spec["symlinks"].items():
            full = NEW_ROOT + link
            _mkdirs(os.path.dirname(full))
            os.symlink(target, full)


def pivot() -> None:
    with step(Step.PIVOT, NEW_ROOT):
        os.chdir(NEW_ROOT)
        sc.pivot_root(".", ".")
        # The old root is now stacked under the new one at "/": detach it, as nsjail does.
        sc.umount2(".", sc.MNT_DETACH)
        os.chdir("/")
        sc.mount_setattr("/", sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID
                         | sc.MOUNT_ATTR_NODEV, recursive=False)


# -- steps in the plugin process (after pivot_root), in order, seccomp last -----------------

def set_hostname(spec: dict) -> None:  # type: ignore[type-arg]
    with step(Step.HOSTNAME):
        sc.sethostname(spec["hostname"])


def set_rlimits(spec: dict) -> None:  # type: ignore[type-arg]
    names = {"core": resource.RLIMIT_CORE, "nofile": resource.RLIMIT_NOFILE,
             "fsize": resource.RLIMIT_FSIZE, "nproc": resource.RLIMIT_NPROC,
             "as": resource.RLIMIT_AS}
    for name, value in spec["rlimits"].items():
        with step(Step.RLIMITS, name):
            soft, hard = resource.getrlimit(names[name])
            # Never raise a hard limit (the host may not allow it); only lower.
            new = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(names[name], (new, new))


def close_fds(spec: dict) -> None:  # type: ignore[type-arg]
    with step(Step.FDS):
        # 0-2 and the RPC socket (3) stay; a program without RPC (exec) keeps only 0-2. The
        # status fd stays open until exec closes it (close-on-exec), so a failure in a later
        # step can still be reported.
        os.close(CONTROL_FD)
        sc.close_range(STATUS_FD + 1)
        os.set_inheritable(STATUS_FD, False)
        if not spec["rpc"]:
            os.close(RPC_FD)


def reset_signals() -> None:
    """What the plugin starts with is the kernel's default, not what this Python process
    chose: the interpreter ignores SIGPIPE and SIGXFSZ, and an exec keeps ignored signals
    ignored (a shell pipeline's writer would see EPIPE instead of dying of SIGPIPE). PID 1's
    blocked signals are unblocked likewise."""
    with step(Step.EXEC, "signal dispositions"):
        for number in range(1, signal.NSIG):
            if number in (signal.SIGKILL, signal.SIGSTOP):
                continue
            try:
                signal.signal(number, signal.SIG_DFL)
            except (OSError, ValueError):
                pass  # numbers the C library keeps for itself (32, 33)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])


def switch_ids(spec: dict) -> None:  # type: ignore[type-arg]
    with step(Step.IDS):
        os.setresgid(spec["gid"], spec["gid"], spec["gid"])
        os.setresuid(spec["uid"], spec["uid"], spec["uid"])


def drop_capabilities() -> None:
    with open(CAP_LAST_CAP_PATH) as f:
        last = int(f.read())
    with step(Step.CAPS, "securebits"):
        _libc_prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED)
    with step(Step.CAPS, "bounding set"):
        for cap in range(last + 1):
            _libc_prctl(PR_CAPBSET_DROP, cap)
    with step(Step.CAPS, "ambient set"):
        _libc_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    with step(Step.CAPS, "inheritable, permitted, effective sets"):
        sc.capset_empty()
        if any(sc.capget()):
            raise SetupFailed(Step.CAPS, "capabilities remain after capset")


def set_no_new_privs() -> None:
    with step(Step.NO_NEW_PRIVS):
        _libc_prctl(PR_SET_NO_NEW_PRIVS, 1)
        _libc_prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with PID 1


def load_seccomp(spec: dict) -> None:  # type: ignore[type-arg]
    bpf = spec.get("seccomp_bpf")
    if not bpf:  # fail closed: a sandbox without its filter is not the sandbox asked for
        raise SetupFailed(Step.SECCOMP, "the spec carries no seccomp filter")
    program = base64.b64decode(bpf)

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    with step(Step.SECCOMP):
        prog = SockFprog(len(program) // 8, program)
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(ctypes.c_int(22), ctypes.c_ulong(2), ctypes.byref(prog),
                      ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:  # PR_SET_SECCOMP, FILTER
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


def exec_plugin(spec: dict) -> None:  # type: ignore[type-arg]
    with step(Step.EXEC, spec["cwd"]):
        os.chdir(spec["cwd"])
    reset_signals()
    with step(Step.EXEC, spec["program"]):
        os.execve(spec["program"], spec["argv"], spec["env"])


# -- the three processes ----------------------------------------------------------------------

def plugin_process(spec: dict) -> None:  # type: ignore[type-arg]
    set_hostname(spec)
    set_rlimits(spec)
    close_fds(spec)
    switch_ids(spec)
    drop_capabilities()
    set_no_new_privs()
    load_seccomp(spec)
    exec_plugin(spec)


# PID 1 takes these synchronously (sigwaitinfo), so it knows who sent each; they stay
# blocked from before the plugin is forked, and the plugin unblocks them before its exec.
PID1_SIGNALS = {signal.SIGTERM, signal.SIGCHLD}


def drop_pid1_privileges() -> None:
    """PID 1 only reaps and forwards: it keeps no capability and can gain none."""
    drop_capabilities()
    with step(Step.NO_NEW_PRIVS):
        _libc_prctl(PR_SET_NO_NEW_PRIVS, 1)


def serve_as_pid1(plugin: int, exit_pipe: int) -> None:
    """Reap every process of the namespace; forward a SIGTERM sent from outside the
    namespace (by the launcher: si_pid is 0 for a sender the namespace cannot see) to the
    plugin; ignore what the plugin sends (the kernel already drops signals a namespace's
    init leaves at their default action; blocked ones arrive here and are dropped too).
    Leave, reporting the plugin's wait status, when the plugin itself is gone."""
    while True:
        info = signal.sigwaitinfo(PID1_SIGNALS)
        if info.si_signo == signal.SIGTERM:
            if info.si_pid == 0:
                try:
                    os.kill(plugin, signal.SIGTERM)
                except ProcessLookupError:
                    pass  # already gone: its SIGCHLD is on the way
            continue
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
            if pid == plugin:
                os.write(exit_pipe, str(status).encode())
                return


def pid1(spec: dict, exit_pipe: int, sources: list[int], mounts: list[int],  # type: ignore[type-arg]
         copies: list) -> None:  # type: ignore[type-arg]
    _libc_prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the launcher
    # Python's SIGINT handler would turn the plugin's `kill -INT 1` into a KeyboardInterrupt:
    # at its default action the kernel never delivers it to a namespace's init from inside.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    build_root()
    # /tmp first: binds of host paths that live under /tmp (a checkout, a venv, a plugin
    # directory) must land on top of the private /tmp, not be hidden by it.
    mount_tmp(spec)
    copy_trees(spec, copies)
    bind_paths(spec, mounts)
    mount_proc(spec)
    build_dev(spec, mounts)
    mask_denied(spec)
    write_files(spec)
    for fd in set(sources + mounts):
        os.close(fd)
    pivot()
    signal.pthread_sigmask(signal.SIG_BLOCK, PID1_SIGNALS)
    plugin = os.fork()
    if plugin == 0:
        os.close(exit_pipe)
        try:
            plugin_process(spec)
        except BaseException as error:  # noqa: B036 (nothing may escape as a traceback)
            fail(error)
        os._exit(127)
    os.close(STATUS_FD)
    os.close(CONTROL_FD)
    os.close(RPC_FD)
    drop_pid1_privileges()
    serve_as_pid1(plugin, exit_pipe)
    os._exit(0)  # the plugin's own status went up the exit pipe


def main() -> None:
    try:
        # Nothing but fds 0-5 may live on in the launcher or PID 1: both outlast the setup.
        with step(Step.FDS):
            sc.close_range(STATUS_FD + 1)
        spec = read_spec()
        sources = receive_sources(spec)
        drop_supplementary_groups()
        unshare_namespaces(spec)
        wait_for_id_maps(set_up_network(spec))
        mounts = mount_trees(spec, sources)
        copies = open_copies(spec, sources)
        become_sandbox_ids(spec)
        with step(Step.PID1):
            exit_read, exit_write = os.pipe()
            child = os.fork()
    except BaseException as error:  # noqa: B036
        fail(error)
    if child == 0:
        os.close(exit_read)
        try:
            pid1(spec, exit_write, sources, mounts, copies)
        except BaseException as error:  # noqa: B036
            fail(error)
        os._exit(127)
    os.close(exit_write)
    for fd in set(sources + mounts):
        os.close(fd)
    for _, entries in copies:
        for _, kind, _, payload in entries:
            if kind == "f":
                os.close(int(payload))  # type: ignore[arg-type]
    proxy(child, exit_read)


if __name__ == "__main__":
    main()
