"""The sandbox launcher: a single-threaded process that builds the sandbox and execs.

Forked for each launch from the fork server (``serve()`` below; sandbox/forkserver.py is the
supervisor's side), which the supervisor runs as ``sandboxer-launcher -I -S -c "...import
launcher; launcher.serve()"`` (argv[0] and the code name no host path, since a plugin can
read PID 1's command line; the script's directory comes in ``SANDBOXER_LAUNCHER_DIR``, so
that importing it pulls in nothing but the standard library and, by bare name from that
directory, ``_syscalls`` and the launcher's own ``launcher_steps`` (the steps, and how a
failed one is reported) and ``launcher_mounts`` (the new root); -S: no site-packages, so no
.pth file runs code in this privileged process). Each launcher starts in ``main()`` with:

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

# Every module the launcher uses is imported here (and by launcher_steps and launcher_mounts,
# imported here too), before pivot_root: afterwards the interpreter's standard library may
# not be inside (an interpreter outside /usr).
import base64
import ctypes
import errno
import fcntl
import gc
import json
import os
import resource
import signal
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# By bare name, from this file's directory (see the module docstring): the launcher's own
# modules, nothing else of sandboxer.
# (mypy reads them as the package's own modules: TYPE_CHECKING is a plain False here, since
# importing typing would only slow this process's start.)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from . import _syscalls as sc
    from . import launcher_mounts as fs
    from .launcher_steps import (
        CONTROL_FD,
        RPC_FD,
        STATUS_FD,
        SetupFailed,
        Step,
        fail,
        failure,
        report,
        step,
    )
else:
    import _syscalls as sc
    import launcher_mounts as fs
    from launcher_steps import (
        CONTROL_FD,
        RPC_FD,
        STATUS_FD,
        SetupFailed,
        Step,
        fail,
        failure,
        report,
        step,
    )

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

NAMESPACES = (
    sc.CLONE_NEWUSER
    | sc.CLONE_NEWNS
    | sc.CLONE_NEWPID
    | sc.CLONE_NEWNET
    | sc.CLONE_NEWIPC
    | sc.CLONE_NEWUTS
    | sc.CLONE_NEWCGROUP
)


_libc = ctypes.CDLL(None, use_errno=True)  # once: every CDLL() is a dlopen


def _libc_prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> None:
    if (
        _libc.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(arg2),
            ctypes.c_ulong(arg3),
            ctypes.c_ulong(arg4),
            ctypes.c_ulong(arg5),
        )
        != 0
    ):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


# -- steps in the launcher (outside the pid namespace) ------------------------------------------


def read_spec() -> dict[str, Any]:
    with step(Step.SPEC):
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(CONTROL_FD, 1 << 16)
            if not chunk:
                raise SetupFailed(Step.SPEC, "the supervisor closed the control pipe")
            data += chunk
    spec: dict[str, Any] = json.loads(data)
    return spec


def receive_sources(spec: dict[str, Any]) -> list[int]:
    """The sources, in the spec's order, as the supervisor opened them (fd 5, SCM_RIGHTS)."""
    fds: list[int] = []
    status = socket.socket(fileno=STATUS_FD)
    try:
        with step(Step.SOURCES):
            while len(fds) < spec["fd_count"]:
                data, got, _, _ = socket.recv_fds(status, 1, 253, socket.MSG_CMSG_CLOEXEC)
                if not data:
                    raise SetupFailed(
                        Step.SOURCES,
                        f"the supervisor sent {len(fds)} of {spec['fd_count']} sources",
                    )
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


# The supervisor's pid, as the fork server found its parent: a launcher whose parent is
# anyone else was orphaned before it could arm its parent-death signal.
SUPERVISOR: int | None = None


def die_with_supervisor() -> None:
    """Arm the parent-death signal, then make sure the supervisor did not die first. The
    kernel disarms it whenever the euid or egid changes, so it is armed again after each."""
    _libc_prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if SUPERVISOR is not None and os.getppid() != SUPERVISOR:
        os._exit(127)  # nobody is left to report to


def unshare_namespaces(spec: dict[str, Any]) -> None:
    flags = NAMESPACES
    if spec["network"]["mode"] == "host":  # full network: the host policy allowed it
        flags &= ~sc.CLONE_NEWNET
    with step(Step.NAMESPACES):
        die_with_supervisor()
        sc.unshare(flags)


def set_up_network(spec: dict[str, Any]) -> int | None:
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


def become_sandbox_ids(spec: dict[str, Any]) -> None:
    """Take the mapped uid/gid now: files created while building the root need an owner the
    user namespace can represent. Capabilities in the namespace stay until they are dropped."""
    with step(Step.IDS):
        os.setresgid(spec["gid"], spec["gid"], spec["gid"])
        os.setresuid(spec["uid"], spec["uid"], spec["uid"])
        die_with_supervisor()  # the id change disarmed it


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


# -- steps in the plugin process (after pivot_root), in order, seccomp last -----------------


def set_hostname(spec: dict[str, Any]) -> None:
    with step(Step.HOSTNAME):
        sc.sethostname(spec["hostname"])


def set_rlimits(spec: dict[str, Any]) -> None:
    names = {
        "core": resource.RLIMIT_CORE,
        "nofile": resource.RLIMIT_NOFILE,
        "fsize": resource.RLIMIT_FSIZE,
        "nproc": resource.RLIMIT_NPROC,
        "as": resource.RLIMIT_AS,
    }
    for name, value in spec["rlimits"].items():
        with step(Step.RLIMITS, name):
            _, hard = resource.getrlimit(names[name])
            # Never raise a hard limit (the host may not allow it); only lower.
            new = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(names[name], (new, new))


# In a warm sandbox's plugin process, the exec pipe (see wait_for_handover) until the exec
# closes it, and where a warm sandbox for any program reads what to run (await_exec).
EXEC_FD = STATUS_FD + 1
GO_FD = EXEC_FD + 1


def close_fds(spec: dict[str, Any]) -> None:
    with step(Step.FDS):
        # 0-2 and the RPC socket (3) stay; a program without RPC (exec) keeps only 0-2. The
        # status fd (and a warm sandbox's exec pipe) stays open until exec closes it
        # (close-on-exec), so a failure in a later step can still be reported.
        os.close(CONTROL_FD)
        sc.close_range((GO_FD if spec["warm"] else STATUS_FD) + 1)
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


def switch_ids(spec: dict[str, Any]) -> None:
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


def load_seccomp(spec: dict[str, Any]) -> None:
    bpf = spec.get("seccomp_bpf")
    if not bpf:  # fail closed: a sandbox without its filter is not the sandbox asked for
        raise SetupFailed(Step.SECCOMP, "the spec carries no seccomp filter")
    program = base64.b64decode(bpf)
    if spec.get("seccomp_listener"):
        load_seccomp_with_listener(program)
        return

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]

    with step(Step.SECCOMP):
        prog = SockFprog(len(program) // 8, program)
        if (
            _libc.prctl(
                ctypes.c_int(22),
                ctypes.c_ulong(2),
                ctypes.byref(prog),
                ctypes.c_ulong(0),
                ctypes.c_ulong(0),
            )
            != 0
        ):  # PR_SET_SECCOMP, FILTER
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))


def load_seccomp_with_listener(program: bytes) -> None:
    """Load a filter that hands denials to a listener, send the listener to the supervisor
    ("L" with the fd, over the status socket) and close it here: a plugin holding it could
    answer its own notifications. Under the filter only sendmsg and close run before the
    supervisor has it (seccomp.py compiles a notifying filter only for profiles that allow
    both): a call notified while this process held the only listener would never return."""
    # Made before the filter: wrapping the fd asks the kernel nothing once family and type
    # are given, and send_fds is one sendmsg.
    status = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=STATUS_FD)
    try:
        with step(Step.SECCOMP):
            listener = sc.seccomp_filter_listener(program)
        try:
            with step(Step.SECCOMP, "hand the listener to the supervisor"):
                socket.send_fds(status, [b"L\n"], [listener])
        finally:
            os.close(listener)
    finally:
        status.detach()


def exec_plugin(spec: dict[str, Any]) -> None:
    with step(Step.EXEC, spec["cwd"]):
        os.chdir(spec["cwd"])
    reset_signals()
    with step(Step.EXEC, spec["program"]):
        os.execve(spec["program"], spec["argv"], spec["env"])


# -- the three processes ----------------------------------------------------------------------


def plugin_process(spec: dict[str, Any]) -> None:
    set_hostname(spec)
    set_rlimits(spec)
    close_fds(spec)
    switch_ids(spec)
    drop_capabilities()
    set_no_new_privs()
    load_seccomp(spec)
    if spec["warm_exec"]:  # a warm sandbox whose program is named at the handover
        spec = {**spec, **await_exec()}
    exec_plugin(spec)


def await_exec() -> dict[str, Any]:
    """In a warm sandbox for any program: the process is what it will exec as (ids,
    capabilities, no_new_privs, seccomp); it says so to PID 1 ("W" on the exec pipe) and
    reads what to run from PID 1 (one JSON object: program, argv, env, cwd)."""
    with step(Step.EXEC, "the program to run"):
        os.write(EXEC_FD, b"W")
        data = b""
        while True:
            chunk = os.read(GO_FD, 1 << 16)
            if not chunk:
                break
            data += chunk
        os.close(GO_FD)
        if not data:
            raise SetupFailed(Step.EXEC, "the warm sandbox was given no program")
        request: dict[str, Any] = json.loads(data)
    return {key: request[key] for key in ("program", "argv", "env", "cwd")}


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


def pid1(
    spec: dict[str, Any],
    exit_pipe: int,
    sources: list[int],
    mounts: list[int],
    copies: list[tuple[str, list[fs.Entry]]],
) -> None:
    _libc_prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the launcher
    # Python's SIGINT handler would turn the plugin's `kill -INT 1` into a KeyboardInterrupt:
    # at its default action the kernel never delivers it to a namespace's init from inside.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    fs.build_root()
    # /tmp first: binds of host paths that live under /tmp (a checkout, a venv, a plugin
    # directory) must land on top of the private /tmp, not be hidden by it.
    fs.mount_tmp(spec)
    fs.copy_trees(spec, copies)
    fs.bind_paths(spec, mounts)
    fs.mount_proc(spec)
    fs.build_dev(spec, mounts)
    fs.mask_denied(spec)
    fs.write_files(spec)
    for fd in set(sources + mounts):
        os.close(fd)
    warm = bool(spec["warm"])
    if warm:  # mount points for what comes at the handover: made now, while / is writable
        for target in spec["warm"]:
            fs.make_dirs(fs.NEW_ROOT + target)
    fs.pivot()
    signal.pthread_sigmask(signal.SIG_BLOCK, PID1_SIGNALS)
    exec_r, exec_w = os.pipe2(os.O_CLOEXEC) if warm else (-1, -1)
    go_r, go_w = os.pipe2(os.O_CLOEXEC) if warm else (-1, -1)
    plugin = os.fork()
    if plugin == 0:
        os.close(exit_pipe)
        try:
            if warm:
                os.close(exec_r)
                os.close(go_w)
                os.dup2(exec_w, EXEC_FD, inheritable=False)  # closed by the exec itself
                os.dup2(go_r, GO_FD, inheritable=False)
            plugin_process(spec)
        except BaseException as error:
            if warm:
                # The report first: PID 1 exits when it reads "F", and with it every process
                # of the namespace, this one included.
                report(failure(error))
                for fd in (EXEC_FD, exec_w):
                    try:
                        os.write(fd, b"F")
                        break
                    except OSError:
                        pass
                os._exit(127)
            fail(error)
        os._exit(127)
    os.close(CONTROL_FD)
    os.close(RPC_FD)
    if warm:
        os.close(exec_w)
        os.close(go_r)
        wait_for_handover(spec, exec_r, go_w)
    os.close(STATUS_FD)
    if not warm:
        drop_pid1_privileges()
    serve_as_pid1(plugin, exit_pipe)
    os._exit(0)  # the plugin's own status went up the exit pipe


# -- a warm sandbox: made ahead, its plugin's files handed over later ----------------------


def wait_for_handover(spec: dict[str, Any], exec_r: int, go_w: int) -> None:
    """PID 1 of a warm sandbox (spec["warm"] names the copies still to come). Once the
    process it forked is ready (its plugin host exec'd: its end of the exec pipe closed with
    nothing written; or, with spec["warm_exec"], waiting to be told what to exec: "W"), say
    "R" to the supervisor and wait, keeping the capabilities that building the copies needs,
    for the handover: one JSON line ``{"copies": [...], "fd_count": N, "exec": {...}}`` and
    the N fds it names, a file's entry naming its fd by index. The copies are made as the
    launcher makes them, every capability goes, the program to run (with warm_exec) goes to
    the waiting process, and once it has exec'd, "K" is the answer; PID 1 goes on as in any
    sandbox. Nothing of the plugin runs before that: a plugin host started ahead waits for
    the supervisor to say what to load, which it does only after "K"."""
    warm_exec = spec["warm_exec"]
    said = os.read(exec_r, 1)
    if said != (b"W" if warm_exec else b""):  # it failed: its report is on the status socket
        os._exit(127)
    with step(Step.COPY, "the handover"):
        os.write(STATUS_FD, b"R\n")
        status = socket.socket(fileno=STATUS_FD)
        try:
            data, fds = b"", []
            while True:
                chunk, got, _, _ = socket.recv_fds(status, 1 << 16, 253, socket.MSG_CMSG_CLOEXEC)
                data += chunk
                fds += got
                if not chunk:
                    raise SetupFailed(Step.COPY, "the supervisor closed the handover")
                if b"\n" in data:
                    handover = json.loads(data[: data.index(b"\n")])
                    if len(fds) >= handover["fd_count"]:
                        break
        finally:
            status.detach()
    trees = [
        (
            copy["target"],
            [
                (rel, kind, mode, fds[payload] if kind == "f" else payload)
                for rel, kind, mode, payload in copy["entries"]
            ],
        )
        for copy in handover["copies"]
    ]
    fs.copy_trees(handover, trees, root="")
    drop_pid1_privileges()
    if warm_exec:
        with step(Step.EXEC, "the program to run"):
            os.write(go_w, json.dumps(handover["exec"]).encode())
    os.close(go_w)
    if warm_exec and os.read(exec_r, 1):  # its exec failed: its report went ahead of this
        os._exit(127)
    os.close(exec_r)
    os.write(STATUS_FD, b"K\n")


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
        mounts = fs.mount_trees(spec, sources)
        fs.raise_nofile()
        copies = fs.open_copies(spec, sources)
        become_sandbox_ids(spec)
        with step(Step.PID1):
            exit_read, exit_write = os.pipe()
            child = os.fork()
    except BaseException as error:
        fail(error)
    if child == 0:
        os.close(exit_read)
        try:
            pid1(spec, exit_write, sources, mounts, copies)
        except BaseException as error:
            fail(error)
        os._exit(127)
    os.close(exit_write)
    for fd in set(sources + mounts):
        os.close(fd)
    for _, entries in copies:
        for _, kind, _, payload in entries:
            if kind == "f":
                os.close(int(payload))
    proxy(child, exit_read)


# -- the fork server: a launcher started once, forking one launcher per sandbox --------------

REQUEST_FD = 3  # the server's end of its request socket (SOCK_SEQPACKET)
LAUNCHER_FDS = 6  # what each launcher starts with: fds 0-5 (the table in the docstring)


def _become_launcher(fds: list[int]) -> None:
    """In a forked launcher: the received fds become 0-5, everything else is closed, a new
    session as posix_spawn's setsid gave; then the launcher runs as if started afresh."""
    try:
        os.setsid()
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 16) for fd in fds]
        for fd in fds:
            os.close(fd)
        for target, fd in enumerate(high):
            os.dup2(fd, target)  # inheritable, as posix_spawn's dup2 leaves them
        sc.close_range(LAUNCHER_FDS)
    except BaseException:
        os._exit(127)
    main()
    os._exit(127)  # main() never returns: it execs, reports and exits, or proxies and exits


def serve() -> None:
    """The fork server (sandbox/forkserver.py is the supervisor's side): this process, started
    like a launcher with its request socket as fd 3, forks a launcher for each request.

    A request is one message, "L" with the new launcher's fds 0-5 (SCM_RIGHTS); the answer
    is "P<pid>" or "E<errno>". The fork is a clone with CLONE_PARENT: the launcher is the
    supervisor's own child, watched and reaped by it as one it spawned. The server never
    reads a spec or touches a sandbox: every launcher is a copy of this pristine process, so
    nothing of one launch reaches the next. It exits when the supervisor closes the socket."""
    global SUPERVISOR
    SUPERVISOR = os.getppid()
    os.chdir("/")
    with step(Step.FDS):
        sc.close_range(REQUEST_FD + 1)
    requests = socket.socket(fileno=REQUEST_FD)
    gc.collect()
    gc.freeze()  # the launchers' copies of these objects stay shared with this process
    while True:
        try:
            message, fds, flags, _ = socket.recv_fds(
                requests, 16, LAUNCHER_FDS, socket.MSG_CMSG_CLOEXEC
            )
        except OSError:
            os._exit(1)
        if not message:
            os._exit(0)
        if message != b"L" or len(fds) != LAUNCHER_FDS or flags & socket.MSG_CTRUNC:
            for fd in fds:
                os.close(fd)
            requests.send(b"E%d" % errno.EINVAL)
            continue
        try:
            pid = sc.fork_sibling()
        except OSError as exc:
            for fd in fds:
                os.close(fd)
            requests.send(b"E%d" % (exc.errno or errno.EIO))
            continue
        if pid == 0:
            requests.detach()
            _become_launcher(fds)
        for fd in fds:
            os.close(fd)
        requests.send(b"P%d" % pid)


if __name__ == "__main__":
    main()
