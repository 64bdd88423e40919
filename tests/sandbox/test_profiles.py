"""Sandbox profiles (sandboxer/sandbox/profiles.py, profiles/*.toml): the ``[mounts]`` table
as it is parsed, and every promise docs/profiles.md makes for a shipped profile, checked in
a real sandbox.

The promises are read from the doc ("What each profile promises": a ``### `profile```
heading, then one ``- **name**:`` bullet per promise), and each has a check here under the
same name: a promise written without a check, a check whose promise was removed, or a
shipped profile without a list fails ``test_every_promise_has_a_check``. The checks run
programs as ``sandboxer exec --profile NAME`` does (``program.run``): the sandbox the host
policy gives the profile, its compiled filter, its mounts.
"""

from __future__ import annotations

import re
import socket
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import pytest

from conftest import REPO
from sandboxer import PluginManager
from sandboxer.errors import PluginLoadError
from sandboxer.sandbox import cgroups, program
from sandboxer.sandbox.egress import EgressProxy
from sandboxer.config import HostConfig
from sandboxer.sandbox.policy import PathGrant, SandboxRequest, effective_config
from sandboxer.sandbox.profiles import builtin_dir, load_profile, profile_names
from sandboxer.sandbox.seccomp import compile_filter

pytestmark = pytest.mark.usefixtures("no_leaks")

DOC = REPO / "docs" / "profiles.md"
PROMISES_HEADING = "## What each profile promises"


# -- [mounts] ------------------------------------------------------------------------------------

def test_the_shipped_profiles_say_whether_tmp_is_executable() -> None:
    assert load_profile("default").tmp_exec is True
    assert load_profile("strict").tmp_exec is False


def _profile_text(mounts: str) -> str:
    default = (builtin_dir() / "default.toml").read_text()
    return default[:default.index("[mounts]")] + mounts


BAD_MOUNTS = [
    pytest.param("", "mounts: a [mounts] table", id="no-mounts-table"),
    pytest.param("mounts = 1\n", "mounts: a [mounts] table", id="mounts-not-a-table"),
    pytest.param("[mounts]\n", "mounts.tmp_exec: true or false", id="no-tmp-exec"),
    pytest.param('[mounts]\ntmp_exec = "no"\n', "mounts.tmp_exec: true or false",
                 id="tmp-exec-a-string"),
    pytest.param("[mounts]\ntmp_exec = 0\n", "mounts.tmp_exec: true or false",
                 id="tmp-exec-a-number"),
    pytest.param("[mounts]\ntmp_exec = false\ntmp_exe = true\n",
                 "mounts.tmp_exe: not a known key", id="misspelt-key-beside-the-right-one"),
]


@pytest.mark.parametrize(("mounts", "message"), BAD_MOUNTS)
def test_a_profile_without_a_clear_tmp_exec_is_refused(tmp_path: Path, mounts: str,
                                                       message: str) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(_profile_text(mounts))
    with pytest.raises(PluginLoadError) as info:
        load_profile("mine", (str(tmp_path),))
    assert message in str(info.value)
    assert str(path) in str(info.value)


TMP_OPTIONS = """
    def tmp():
        for line in open("/proc/self/mountinfo"):
            if line.split()[4] == "/tmp":
                return line.split()[5]
    """


async def test_a_host_profile_decides_tmp_exec_for_exec_and_for_plugins(
        tmp_path: Path, make_plugin: Callable[..., Path]) -> None:
    """``tmp_exec`` is read from the profile where the host's ``profile_dirs`` find it, on
    both paths into the sandbox. The host's ``default`` (noexec /tmp) shadows the shipped
    one: a path that forgot the directories would get an executable /tmp."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    shipped = (builtin_dir() / "default.toml").read_text()
    assert "tmp_exec = true\n" in shipped
    (profiles / "default.toml").write_text(shipped.replace("tmp_exec = true\n",
                                                           "tmp_exec = false\n"))
    host = HostConfig(profile_dirs=(str(profiles),))
    out: list[bytes] = []
    await program.run(["/usr/bin/python3", "-c", textwrap.dedent(TMP_OPTIONS) + "print(tmp())"],
                      effective_config(SandboxRequest(), host), backend=cgroups.detect(),
                      seccomp_bpf=compile_filter("default", network=False,
                                                 extra_dirs=host.profile_dirs),
                      sinks=(out.append, out.append), profile_dirs=host.profile_dirs)
    assert "noexec" in b"".join(out).decode().split(","), out
    manager = PluginManager(config=host)
    try:
        plugin = await manager.load(make_plugin(TMP_OPTIONS))
        assert "noexec" in (await plugin.call("tmp")).split(",")
    finally:
        await manager.aclose()


# -- the promises, from the doc ------------------------------------------------------------------

def documented_promises() -> list[str]:
    """``profile/promise`` for every promise docs/profiles.md lists."""
    text = DOC.read_text()
    if PROMISES_HEADING not in text:
        raise AssertionError(f"{DOC} has no section {PROMISES_HEADING!r}")
    section = text.split(PROMISES_HEADING, 1)[1].split("\n## ", 1)[0]
    found: list[str] = []
    profile = None
    for line in section.splitlines():
        if heading := re.fullmatch(r"### `([a-z0-9_-]+)`", line.strip()):
            profile = heading.group(1)
        elif bullet := re.match(r"- \*\*([a-z0-9-]+)\*\*: ", line):
            if profile is None:
                raise AssertionError(f"{DOC}: promise {bullet.group(1)} before any profile")
            found.append(f"{profile}/{bullet.group(1)}")
        elif line.startswith(("#", "-")):  # a promise or profile this reader would miss
            raise AssertionError(f"{DOC}: not a profile (### `name`) or a promise "
                                 f"(- **name**: text): {line!r}")
    return found


PROMISES = documented_promises()
Check = Callable[["Workdir"], Awaitable[None]]
CHECKS: dict[str, Check] = {}


def promise(name: str) -> Callable[[Check], Check]:
    """Register the check of the promise ``profile/name`` of docs/profiles.md."""
    def register(check: Check) -> Check:
        if name in CHECKS:
            raise AssertionError(f"two checks for {name}")
        CHECKS[name] = check
        return check
    return register


def test_every_promise_has_a_check() -> None:
    assert len(PROMISES) == len(set(PROMISES)), f"a promise listed twice: {PROMISES}"
    assert sorted(set(PROMISES) - set(CHECKS)) == [], "promised in the doc, checked nowhere"
    assert sorted(set(CHECKS) - set(PROMISES)) == [], "checked here, no longer promised"
    assert {p.split("/")[0] for p in PROMISES} == set(profile_names()), \
        "every shipped profile states its promises, and only shipped profiles"


@pytest.mark.parametrize("name", PROMISES)
async def test_the_promise_holds(name: str, workdir: Workdir) -> None:
    check = CHECKS.get(name)
    assert check is not None, f"docs/profiles.md promises {name} and nothing here checks it"
    await check(workdir)


# -- running programs under a profile ------------------------------------------------------

@dataclass
class Workdir:
    """A host directory granted writable to the sandbox (at the same path)."""

    path: Path


@pytest.fixture
def workdir(tmp_path: Path) -> Workdir:
    grant = tmp_path / "grant"
    grant.mkdir()
    grant.chmod(0o777)  # the sandbox's host uid must be able to write here
    return Workdir(grant)


@dataclass
class Ran:
    returncode: int
    out: list[str]
    err: str


async def sandboxed(profile: str, argv: list[str], *, workdir: Workdir | None = None,
                    network: bool = False) -> Ran:
    """``argv`` under ``profile`` as the host policy gives it, optionally with ``workdir``
    granted writable and with network on (one allowed host: the egress proxy's mode)."""
    host = HostConfig()
    sandbox = effective_config(SandboxRequest(profile=profile), host)
    if workdir is not None:
        sandbox = sandbox.replace(allowed_paths=(PathGrant(str(workdir.path), writable=True),))
    if network:
        sandbox = sandbox.replace(network_allowed=True, allowed_hosts=("allowed.test",))
    out: list[bytes] = []
    err: list[bytes] = []
    egress = EgressProxy.from_config(host) if network else None
    try:
        result = await program.run(argv, sandbox, backend=cgroups.detect(),
                                   seccomp_bpf=compile_filter(profile, network=network),
                                   sinks=(out.append, err.append), egress=egress)
    finally:
        if egress is not None:
            egress.close()
    return Ran(result.returncode, b"".join(out).decode().splitlines(),
               b"".join(err).decode())


async def python(profile: str, script: str, *args: str, workdir: Workdir | None = None,
                 network: bool = False) -> list[str]:
    """A python3 script's output under ``profile`` (``args`` in its sys.argv[1:]); it must
    exit 0."""
    ran = await sandboxed(profile, ["/usr/bin/python3", "-c", textwrap.dedent(script), *args],
                          workdir=workdir, network=network)
    assert ran.returncode == 0, (ran.out, ran.err)
    return ran.out


# Prints each writable mount that is not noexec; then tries to run copies of /bin/echo put in
# each writable place given on the command line, printing "<place> exec-worked" or the errno.
EXEC_COPIES = """
    import errno, os, shutil, sys
    for line in open("/proc/self/mountinfo"):
        point, options = line.split()[4], line.split()[5].split(",")
        if "rw" in options and "noexec" not in options:
            print("executable", point)
    for place in sys.argv[1:]:
        copy = os.path.join(place, "echo-copy")
        shutil.copy("/bin/echo", copy)
        os.chmod(copy, 0o755)
        for how, path in (("path", copy), ("fd", "/proc/self/fd/%d" % os.open(copy, os.O_RDONLY))):
            sys.stdout.flush()  # else the child prints what the parent buffered too
            if os.fork() == 0:
                try:
                    os.execv(path, ["echo", place, how, "exec-worked"])
                except OSError as exc:
                    print(place, how, errno.errorcode[exc.errno], flush=True)
                os._exit(0)
            os.wait()
"""

# Without fork (strict): each attempt replaces the process, so one place and one way per run.
EXEC_ONE_COPY = """
    import errno, os, shutil, sys
    place, how = sys.argv[1:]
    copy = os.path.join(place, "echo-copy")
    shutil.copy("/bin/echo", copy)
    os.chmod(copy, 0o755)
    path = copy if how == "path" else "/proc/self/fd/%d" % os.open(copy, os.O_RDONLY)
    try:
        os.execv(path, ["echo", place, how, "exec-worked"])
    except OSError as exc:
        print(place, how, errno.errorcode[exc.errno])
"""

WRITABLE_MOUNTS = """
    for line in open("/proc/self/mountinfo"):
        point, options = line.split()[4], line.split()[5].split(",")
        if "rw" in options:
            print(point, "noexec" if "noexec" in options else "exec")
"""

# socket(family, type, protocol) for each triple; "ok" or the errno.
SOCKETS = """
    import errno, socket
    NB = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    cases = {
        "tcp": (socket.AF_INET, socket.SOCK_STREAM, 0),
        "tcp-by-number": (socket.AF_INET, socket.SOCK_STREAM | NB, socket.IPPROTO_TCP),
        "udp": (socket.AF_INET, socket.SOCK_DGRAM, 0),
        "udp6-by-number": (socket.AF_INET6, socket.SOCK_DGRAM | NB, socket.IPPROTO_UDP),
        "tcp6": (socket.AF_INET6, socket.SOCK_STREAM, 0),
        "sctp": (socket.AF_INET, socket.SOCK_STREAM, 132),
        "mptcp": (socket.AF_INET, socket.SOCK_STREAM, 262),
        "udplite": (socket.AF_INET, socket.SOCK_DGRAM, 136),
        "ping": (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP),
        "ping6": (socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_ICMPV6),
        "raw": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP),
    }
    for name, args in cases.items():
        try:
            socket.socket(*args).close()
            print(name, "ok")
        except OSError as exc:
            print(name, errno.errorcode[exc.errno])
"""
TCP_UDP = ["tcp", "tcp-by-number", "udp", "udp6-by-number", "tcp6"]
NOT_TCP_UDP = ["sctp", "mptcp", "udplite", "ping", "ping6", "raw"]


# -- default -------------------------------------------------------------------------------------

@promise("default/runs-what-it-builds")
async def check_default_runs_what_it_builds(workdir: Workdir) -> None:
    ran = await sandboxed("default", ["/bin/sh", "-c", """
        printf '#include <stdio.h>\\nint main(void) { puts("built and ran"); }\\n' > /tmp/a.c
        gcc -o /tmp/a.out /tmp/a.c && /tmp/a.out
        cp /bin/echo /tmp/echo && /lib64/ld-linux-x86-64.so.2 /tmp/echo mapped by ld.so
        """])
    assert (ran.returncode, ran.out) == (0, ["built and ran", "mapped by ld.so"]), ran.err


@promise("default/data-mounts-noexec")
async def check_default_data_mounts_noexec(workdir: Workdir) -> None:
    places = ["/dev/shm", str(workdir.path)]
    out = await python("default", EXEC_COPIES, *places, workdir=workdir)
    assert out == ["executable /tmp"] + [f"{place} {how} EACCES" for place in places
                                         for how in ("path", "fd")]


@promise("default/processes")
async def check_default_processes(workdir: Workdir) -> None:
    ran = await sandboxed("default", ["/bin/sh", "-c",
                                      "x=$(echo sub | tr s S); (echo $x) & wait; echo done"])
    assert (ran.returncode, ran.out) == (0, ["Sub", "done"]), ran.err
    out = await python("default", """
        import os, subprocess, threading
        done = subprocess.run(["/bin/echo", "spawned"], capture_output=True, text=True)
        print(done.stdout.strip())
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        print("forked", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
        box = []
        t = threading.Thread(target=box.append, args=("thread",)); t.start(); t.join()
        print(*box)
        """)
    assert out == ["spawned", "forked 7", "thread"]


LOOPBACK_ONLY = """
    import socket, sys
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.create_connection(server.getsockname(), timeout=5)
    peer, _ = server.accept()
    client.sendall(b"ping")
    print("loopback", peer.recv(4).decode())
    for host, port in (("127.0.0.1", int(sys.argv[1])), ("1.1.1.1", 80),
                       ("169.254.169.254", 80)):
        try:
            socket.create_connection((host, port), timeout=5)
            print(host, "connected")
        except OSError as exc:
            print(host, type(exc).__name__)
    """


@promise("default/loopback-only-without-network")
async def check_default_loopback_only_without_network(workdir: Workdir) -> None:
    out = await python("default", SOCKETS)
    assert out == [f"{name} ok" for name in TCP_UDP] + [f"{name} EPERM" for name in NOT_TCP_UDP]
    with socket.socket() as host_server:  # on the host's own loopback: never reached
        host_server.bind(("127.0.0.1", 0))
        host_server.listen()
        host_server.setblocking(False)
        out = await python("default", LOOPBACK_ONLY, str(host_server.getsockname()[1]))
        with pytest.raises(BlockingIOError):
            host_server.accept()
    assert out == ["loopback ping", "127.0.0.1 ConnectionRefusedError",
                   "1.1.1.1 OSError", "169.254.169.254 OSError"]


@promise("default/tcp-udp-only-with-network")
async def check_default_tcp_udp_only_with_network(workdir: Workdir) -> None:
    out = await python("default", SOCKETS, network=True)
    assert out == [f"{name} ok" for name in TCP_UDP] + \
        [f"{name} EPERM" for name in NOT_TCP_UDP]


@promise("default/unix-and-inet-sockets-only")
async def check_default_unix_and_inet_sockets_only(workdir: Workdir) -> None:
    out = await python("default", """
        import errno, socket
        AF_ALG, AF_VSOCK = 38, 40
        cases = {
            "unix": lambda: socket.socket(socket.AF_UNIX).close(),
            "unix-pair": lambda: [s.close() for s in socket.socketpair()],
            "netlink-route": lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW,
                                                   socket.NETLINK_ROUTE).close(),
            "if_nameindex": socket.if_nameindex,
            "packet": lambda: socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0).close(),
            "vsock": lambda: socket.socket(AF_VSOCK, socket.SOCK_STREAM).close(),
            "alg": lambda: socket.socket(AF_ALG, socket.SOCK_SEQPACKET).close(),
            "netlink-pair": lambda: socket.socketpair(socket.AF_NETLINK, socket.SOCK_RAW),
        }
        for name, make in cases.items():
            try:
                make()
                print(name, "ok")
            except OSError as exc:
                print(name, errno.errorcode[exc.errno])
        """)
    assert out == ["unix ok", "unix-pair ok", "netlink-route EPERM", "if_nameindex EPERM",
                   "packet EPERM", "vsock EPERM", "alg EPERM", "netlink-pair EPERM"]


@promise("default/file-limits")
async def check_default_file_limits(workdir: Workdir) -> None:
    out = await python("default", """
        import errno, os, resource
        print("nofile", resource.getrlimit(resource.RLIMIT_NOFILE))
        print("fsize", resource.getrlimit(resource.RLIMIT_FSIZE))
        opened = []
        try:
            while True:
                opened.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            print("open", errno.errorcode[exc.errno], "at fd", max(opened) + 1)
        for fd in opened:
            os.close(fd)
        fd = os.open("/tmp/sparse", os.O_RDWR | os.O_CREAT)
        os.ftruncate(fd, 4 << 30)  # up to the limit: fine (sparse: /tmp's size is no matter)
        for name, past in (("truncate", lambda: os.ftruncate(fd, (4 << 30) + 1)),
                           ("write", lambda: os.pwrite(fd, b"x", 4 << 30))):
            try:
                past()
                print(name, "past 4 GiB: done")
            except OSError as exc:
                print(name, "past 4 GiB:", errno.errorcode[exc.errno])
        os.close(fd)
        os.unlink("/tmp/sparse")
        written = 0
        with open("/tmp/fill", "wb", buffering=0) as f:
            try:
                while written < 128 << 20:
                    written += f.write(b"x" * (1 << 20))
            except OSError as exc:
                print("fill /tmp", errno.errorcode[exc.errno], "after", written >> 20, "MiB")
        """)
    assert out == ["nofile (1024, 1024)", f"fsize ({4 << 30}, {4 << 30})",
                   "open EMFILE at fd 1024", "truncate past 4 GiB: EFBIG",
                   "write past 4 GiB: EFBIG", "fill /tmp ENOSPC after 64 MiB"]


@promise("default/read-only-system")
async def check_default_read_only_system(workdir: Workdir) -> None:
    out = await python("default", """
        import errno, os
        for name, action in (
                ("create /usr/x", lambda: open("/usr/x", "w")),
                ("unlink /usr/missing", lambda: os.unlink("/usr/lib/missing")),
                ("mkdir /usr/lib/d", lambda: os.mkdir("/usr/lib/d")),
                ("chmod /usr/bin/env", lambda: os.chmod("/usr/bin/env", 0o700)),
                ("write /etc/passwd", lambda: open("/etc/passwd", "a")),
                ("create /etc/x", lambda: open("/etc/x", "w"))):
            try:
                action()
                print(name, "done")
            except OSError as exc:
                print(name, errno.errorcode[exc.errno])
        """)
    assert out == ["create /usr/x EROFS", "unlink /usr/missing EROFS",
                   "mkdir /usr/lib/d EROFS", "chmod /usr/bin/env EROFS",
                   "write /etc/passwd EROFS", "create /etc/x EROFS"]


@promise("default/no-ptrace")
async def check_default_no_ptrace(workdir: Workdir) -> None:
    out = await python("default", """
        import ctypes, errno, os, signal
        libc = ctypes.CDLL(None, use_errno=True)
        SYS_ptrace, SYS_process_vm_readv, SYS_process_vm_writev = 101, 310, 311
        PTRACE_TRACEME, PTRACE_ATTACH, PTRACE_SEIZE = 0, 16, 0x4206

        def call(name, *args):
            ok = libc.syscall(*(ctypes.c_long(a) for a in args)) >= 0
            print(name, "done" if ok else errno.errorcode[ctypes.get_errno()])

        child = os.fork()
        if child == 0:
            signal.pause()
            os._exit(0)
        call("traceme", SYS_ptrace, PTRACE_TRACEME, 0, 0, 0)
        call("attach-to-child", SYS_ptrace, PTRACE_ATTACH, child, 0, 0)
        call("seize-child", SYS_ptrace, PTRACE_SEIZE, child, 0, 0)
        call("process_vm_readv", SYS_process_vm_readv, child, 0, 0, 0, 0, 0)
        call("process_vm_writev", SYS_process_vm_writev, child, 0, 0, 0, 0, 0)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        """)
    assert out == ["traceme EPERM", "attach-to-child EPERM", "seize-child EPERM",
                   "process_vm_readv EPERM", "process_vm_writev EPERM"]


SET_ID_MODES = """
    import os
    os.chdir("/tmp")
    open("plain", "w").close()
    for name, action in (
            ("chmod-u+s", lambda: os.chmod("plain", 0o4755)),
            ("chmod-g+s", lambda: os.chmod("plain", 0o2755)),
            ("create-04755", lambda: os.open("c1", os.O_CREAT | os.O_WRONLY, 0o4755)),
            ("openat-02755", lambda: os.open("c2", os.O_CREAT | os.O_WRONLY, 0o2755,
                                             dir_fd=os.open(".", os.O_RDONLY))),
            ("chmod-plain", lambda: os.chmod("plain", 0o755)),
            ("mknod-char", lambda: os.mknod("null", 0o666 | 0o020000, os.makedev(1, 3))),
            ("mkfifo", lambda: os.mkfifo("fifo"))):
        try:
            action()
            print(name, "done")
        except OSError as exc:
            print(name, exc.strerror)
    """
SET_ID_OUTCOME = ["chmod-u+s Operation not permitted", "chmod-g+s Operation not permitted",
                  "create-04755 Operation not permitted", "openat-02755 Operation not permitted",
                  "chmod-plain done", "mknod-char Operation not permitted", "mkfifo done"]


@promise("default/no-set-id-modes")
async def check_default_no_set_id_modes(workdir: Workdir) -> None:
    assert await python("default", SET_ID_MODES) == SET_ID_OUTCOME


@promise("strict/no-set-id-modes")
async def check_strict_no_set_id_modes(workdir: Workdir) -> None:
    assert await python("strict", SET_ID_MODES) == SET_ID_OUTCOME


# -- strict --------------------------------------------------------------------------------------

@promise("strict/writable-mounts-noexec")
async def check_strict_writable_mounts_noexec(workdir: Workdir) -> None:
    mounts = await python("strict", WRITABLE_MOUNTS, workdir=workdir)
    writable = dict(line.split() for line in mounts)
    assert {"/tmp", "/dev/shm", str(workdir.path)} <= set(writable), mounts
    assert [m for m, flag in writable.items() if flag != "noexec"] == [], mounts
    for place in ("/tmp", "/dev/shm", str(workdir.path)):
        for how in ("path", "fd"):
            out = await python("strict", EXEC_ONE_COPY, place, how, workdir=workdir)
            assert out == [f"{place} {how} EACCES"]
    ran = await sandboxed("strict", ["/usr/bin/python3", "-c", textwrap.dedent("""
        import os, shutil
        shutil.copy("/bin/echo", "/tmp/echo")
        os.execv("/lib64/ld-linux-x86-64.so.2", ["ld.so", "/tmp/echo", "exec-worked"])
        """)])
    assert ran.returncode == 127 and ran.out == [], (ran.out, ran.err)
    assert "failed to map segment from shared object" in ran.err


@promise("strict/no-memfd")
async def check_strict_no_memfd(workdir: Workdir) -> None:
    out = await python("strict", """
        import errno, os
        try:
            os.memfd_create("probe")
            print("created")
        except OSError as exc:
            print(errno.errorcode[exc.errno])
        """)
    assert out == ["EPERM"]


@promise("strict/no-execveat")
async def check_strict_no_execveat(workdir: Workdir) -> None:
    # python's os.execve(fd, ...) is fexecve(3): execveat(fd, "", ..., AT_EMPTY_PATH)
    out = await python("strict", """
        import errno, os
        try:
            os.execve(os.open("/bin/echo", os.O_RDONLY), ["echo", "exec-worked"], {})
        except OSError as exc:
            print(errno.errorcode[exc.errno])
        """)
    assert out == ["EPERM"]


@promise("strict/one-process")
async def check_strict_one_process(workdir: Workdir) -> None:
    out = await python("strict", """
        import errno, os, subprocess, threading
        for name, call in (("fork", os.fork),
                           ("subprocess", lambda: subprocess.run(["/bin/true"])),
                           ("posix_spawn", lambda: os.posix_spawn("/bin/true", ["true"], {}))):
            try:
                call()
                print(name, "allowed")
            except OSError as exc:
                print(name, errno.errorcode[exc.errno])
        box = []
        threads = [threading.Thread(target=box.append, args=(i,)) for i in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        print("threads", sorted(box))
        """)
    assert out == ["fork EPERM", "subprocess EPERM", "posix_spawn EPERM", "threads [0, 1, 2, 3]"]


@promise("strict/no-network")
async def check_strict_no_network(workdir: Workdir) -> None:
    out = await python("strict", SOCKETS)
    assert out == [f"{name} EPERM" for name in TCP_UDP + NOT_TCP_UDP]
    with pytest.raises(PluginLoadError, match=r"strict\.toml: seccomp\.network_groups"):
        compile_filter("strict", network=True)
