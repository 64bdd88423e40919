"""The sandbox launcher: a fresh, single-threaded process that builds the sandbox and execs.

Run by the supervisor as ``python -I -S launcher.py`` (by path, so that importing it pulls in
nothing but the standard library and ``_syscalls``; -S: no site-packages, so no .pth file runs
code in this privileged process) with:

    fd 0  /dev/null          fd 3  the plugin's end of the RPC socket
    fd 1  stdout pipe        fd 4  control pipe from the supervisor (spec, then "go")
    fd 2  stderr pipe        fd 5  status socket to the supervisor

It reads the spec (one JSON line) from fd 4, then follows DESIGN section 6 in order, one
function per step, each failure reported to the supervisor over fd 5 as
``{"step", "error", "errno", "path"}`` before exiting 127. A successful exec closes fd 5 with
nothing written, which is how the supervisor knows the plugin is running.

Network: with ``network.mode`` "none" the new net namespace stays empty (not even loopback
up); "proxy" brings loopback up in it and makes a TCP listener on 127.0.0.1:PORT there, which
goes to the supervisor over the status socket with the "U" message (SCM_RIGHTS) and is closed
here: the supervisor's egress proxy accepts on it, so nothing of the proxy runs in here;
"host" keeps the supervisor's net namespace (full network, only when the host policy allows).

Process layout inside: the launcher stays outside the new pid namespace as a proxy that
relays the exit status; its child is PID 1 of the namespace (reaps, forwards SIGTERM, dies
with the launcher), and PID 1's child execs the plugin. Killing the launcher kills them all.

This file must never run plugin code before every step has succeeded, and never exec with a
capability, an fd or an environment variable the spec did not grant.
"""

from __future__ import annotations

import enum
import json
import os
import signal
import socket
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
    SPEC = "read the spec"
    PRIVILEGES = "drop supplementary groups"
    NAMESPACES = "unshare namespaces"
    NETWORK = "set up the proxy port in the net namespace"
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
            if isinstance(exc, OSError):
                raise SetupFailed(which, exc, path) from exc
            return False
    return _Guard()


def _libc_prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> None:
    import ctypes
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


def open_proxy_port(spec: dict) -> int | None:  # type: ignore[type-arg]
    """In "proxy" mode: loopback up in the new net namespace, and a listening TCP socket on
    it for the supervisor's egress proxy. Done with the namespace's capabilities, before the
    id maps: nothing here creates a file."""
    network = spec["network"]
    if network["mode"] != "proxy":
        return None
    with step(Step.NETWORK, "lo"):
        sc.loopback_up()
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
    signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGTERM))
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


def _mount_point(target: str, is_dir: bool) -> None:
    if is_dir:
        _mkdirs(target)
    else:
        _mkdirs(os.path.dirname(target))
        if not os.path.exists(target):
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o644))


def open_sources(spec: dict) -> dict[str, int]:  # type: ignore[type-arg]
    """Open every bind source (O_PATH) while still the supervisor's host identity, which can
    reach paths the plugin's unprivileged host uid could not even look up."""
    sources: dict[str, int] = {}
    for bind in spec["binds"] + [{"source": d, "target": d} for d in spec["devices"]]:
        with step(Step.BIND, bind["source"]):
            if bind["source"] not in sources:
                sources[bind["source"]] = os.open(bind["source"], os.O_PATH | os.O_CLOEXEC)
    return sources


def open_copies(spec: dict) -> list[tuple[str, list[tuple[str, str, int, object]]]]:  # type: ignore[type-arg]
    """For each copied tree (the plugin directory): every entry, its files opened for reading
    while still the supervisor's host identity. Copied rather than bound, the plugin's
    directory shows no host path anywhere, not even as a mount's root in mountinfo."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    trees = []
    for copy in spec["copies"]:
        source = copy["source"]
        entries: list[tuple[str, str, int, object]] = []
        with step(Step.COPY, source):
            if not os.path.isdir(source):
                st = os.lstat(source)
                entries.append((os.path.basename(source), "f", st.st_mode & 0o7777,
                                os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)))
            for dirpath, dirnames, filenames in os.walk(source) if os.path.isdir(source) else ():
                rel_dir = os.path.relpath(dirpath, source)
                for name in sorted(dirnames + filenames):
                    full = os.path.join(dirpath, name)
                    rel = os.path.normpath(os.path.join(rel_dir, name))
                    st = os.lstat(full)
                    mode = st.st_mode & 0o7777
                    if os.path.islink(full):
                        entries.append((rel, "l", 0, os.readlink(full)))
                    elif os.path.isdir(full):
                        entries.append((rel, "d", mode, None))
                    elif os.path.isfile(full):
                        entries.append((rel, "f", mode, os.open(
                            full, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)))
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


def bind_paths(spec: dict, sources: dict[str, int]) -> None:  # type: ignore[type-arg]
    for bind in spec["binds"]:
        target = NEW_ROOT + bind["target"]
        fd = sources[bind["source"]]
        with step(Step.BIND, bind["target"]):
            is_dir = os.path.isdir(f"/proc/self/fd/{fd}")
            _mount_point(target, is_dir)
            sc.mount(f"/proc/self/fd/{fd}", target, None, sc.MS_BIND | sc.MS_REC)
            attrs = sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV
            if not bind.get("writable"):
                attrs |= sc.MOUNT_ATTR_RDONLY
            if not bind.get("exec", True):
                attrs |= sc.MOUNT_ATTR_NOEXEC
            sc.mount_setattr(target, attrs)


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


def build_dev(spec: dict, sources: dict[str, int]) -> None:  # type: ignore[type-arg]
    dev = NEW_ROOT + "/dev"
    with step(Step.DEV, "/dev"):
        _mkdirs(dev)
        sc.mount("tmpfs", dev, "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, "mode=0755,size=64k")
        for device in spec["devices"]:
            target = NEW_ROOT + device
            _mount_point(target, False)
            sc.mount(f"/proc/self/fd/{sources[device]}", target, None, sc.MS_BIND)
            sc.mount_setattr(target, sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NOEXEC,
                             recursive=False)
        for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                           ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
            os.symlink(link, f"{dev}/{name}")
        _mkdirs(dev + "/shm")
        sc.mount("tmpfs", dev + "/shm", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
                 "mode=1777,size=16m")


def mask_denied(spec: dict) -> None:  # type: ignore[type-arg]
    # Directories between a writable grant and a denied path in it become mount points, which
    # cannot be renamed or removed: the mask cannot be carried away by moving its parent.
    for path in spec["pins"]:
        full = NEW_ROOT + path
        with step(Step.MASK, path):
            sc.mount(full, full, None, sc.MS_BIND | sc.MS_REC)
            sc.mount_setattr(full, sc.MOUNT_ATTR_NOSUID | sc.MOUNT_ATTR_NODEV
                             | sc.MOUNT_ATTR_NOEXEC)
    for path in spec["masks"]:
        full = NEW_ROOT + path
        if not os.path.lexists(full):
            continue
        with step(Step.MASK, path):
            if os.path.isdir(full) and not os.path.islink(full):
                sc.mount("tmpfs", full, "tmpfs", sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV
                         | sc.MS_NOEXEC, "size=0,mode=0000")
            else:
                sc.mount("/dev/null", full, None, sc.MS_BIND)
                sc.mount_setattr(full, sc.MOUNT_ATTR_RDONLY | sc.MOUNT_ATTR_NOSUID
                                 | sc.MOUNT_ATTR_NODEV | sc.MOUNT_ATTR_NOEXEC,
                                 recursive=False)


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
    import resource
    names = {"core": resource.RLIMIT_CORE, "nofile": resource.RLIMIT_NOFILE,
             "fsize": resource.RLIMIT_FSIZE, "nproc": resource.RLIMIT_NPROC,
             "as": resource.RLIMIT_AS}
    for name, value in spec["rlimits"].items():
        with step(Step.RLIMITS, name):
            soft, hard = resource.getrlimit(names[name])
            # Never raise a hard limit (the host may not allow it); only lower.
            new = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(names[name], (new, new))


def close_fds() -> None:
    with step(Step.FDS):
        # 0-2 and the RPC socket (3) stay. The status fd stays open until exec closes it
        # (close-on-exec), so a failure in a later step can still be reported.
        os.close(CONTROL_FD)
        sc.close_range(STATUS_FD + 1)
        os.set_inheritable(STATUS_FD, False)


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
    import base64
    import ctypes
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
    with step(Step.EXEC, spec["argv"][0]):
        os.execve(spec["argv"][0], spec["argv"], spec["env"])


# -- the three processes ----------------------------------------------------------------------

def plugin_process(spec: dict) -> None:  # type: ignore[type-arg]
    set_hostname(spec)
    set_rlimits(spec)
    close_fds()
    switch_ids(spec)
    drop_capabilities()
    set_no_new_privs()
    load_seccomp(spec)
    exec_plugin(spec)


def pid1(spec: dict, exit_pipe: int, sources: dict[str, int], trees: list) -> None:  # type: ignore[type-arg]
    _libc_prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the launcher
    build_root()
    # /tmp first: binds of host paths that live under /tmp (a checkout, a venv, a plugin
    # directory) must land on top of the private /tmp, not be hidden by it.
    mount_tmp(spec)
    copy_trees(spec, trees)
    bind_paths(spec, sources)
    mount_proc(spec)
    build_dev(spec, sources)
    mask_denied(spec)
    write_files(spec)
    for fd in sources.values():
        os.close(fd)
    pivot()
    plugin = os.fork()
    if plugin == 0:
        os.close(exit_pipe)
        try:
            plugin_process(spec)
        except SetupFailed as failure:
            report(failure)
        os._exit(127)
    os.close(STATUS_FD)
    os.close(CONTROL_FD)
    os.close(RPC_FD)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(plugin, signal.SIGTERM))
    while True:  # reap everything; leave when the plugin itself is gone
        try:
            pid, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            os._exit(0)
        if pid == plugin:
            os.write(exit_pipe, str(status).encode())
            os._exit(0)


def main() -> None:
    try:
        # Nothing but fds 0-5 may live on in the launcher or PID 1: both outlast the setup.
        with step(Step.FDS):
            sc.close_range(STATUS_FD + 1)
        spec = read_spec()
        drop_supplementary_groups()
        unshare_namespaces(spec)
        wait_for_id_maps(open_proxy_port(spec))
        sources = open_sources(spec)
        trees = open_copies(spec)
        become_sandbox_ids(spec)
        with step(Step.PID1):
            exit_read, exit_write = os.pipe()
            child = os.fork()
    except SetupFailed as failure:
        report(failure)
        os._exit(127)
    if child == 0:
        os.close(exit_read)
        try:
            pid1(spec, exit_write, sources, trees)
        except SetupFailed as failure:
            report(failure)
        os._exit(127)
    os.close(exit_write)
    for fd in sources.values():
        os.close(fd)
    for _, entries in trees:
        for _, kind, _, payload in entries:
            if kind == "f":
                os.close(int(payload))  # type: ignore[arg-type]
    proxy(child, exit_read)


if __name__ == "__main__":
    main()
