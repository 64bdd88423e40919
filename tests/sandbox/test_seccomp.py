"""The seccomp filter (sandboxer/sandbox/seccomp.py, profiles/seccomp.toml), tested compiled.

Most cases run a small C probe inside the real sandbox (``launch()`` with the compiled filter)
that makes one raw syscall and prints ``<case> ok`` or ``<case> errno=<NAME>``; a call the
filter kills shows as the launcher dying of SIGSYS. A call counts as blocked only if it is
answered EPERM, ENOSYS or EACCES, or kills with SIGSYS: the probes pass arguments the kernel
would reject with EFAULT, EINVAL or EBADF (or accept), so an answer from the kernel itself is
told apart, and a control run without the filter proves it for the calls where the kernel's
answer differs. The positive cases run shells, git, gcc, sqlite3, node and python3 for real.

A small classic-BPF interpreter checks the rest of the compiled program exhaustively (every
syscall the groups leave out, every namespace flag of clone, the i386 and x32 ABIs); it reads
the bytes the launcher loads, nothing else.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

from sandboxer.errors import PluginLoadError
from sandboxer.sandbox import seccomp
from sandboxer.sandbox.sources import release_uid
from sandboxer.sandbox.spec import LaunchSpec, Mount, base_mounts
from sandboxer.sandbox.start import launch
from sandboxer.sandbox.policy import SandboxConfig
from sandboxer.sandbox.profiles import builtin_dir
from sandboxer.sandbox.seccomp import compile_filter

pytestmark = pytest.mark.usefixtures("no_leaks")

ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}
LOG = logging.getLogger("test.seccomp")
SIGSYS = "SIGSYS"
BLOCKED = {"errno=EPERM", "errno=ENOSYS", "errno=EACCES", SIGSYS}
PROFILES = builtin_dir()

# -- the probe ---------------------------------------------------------------------------------

PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define BAD 1L /* an address nothing maps: EFAULT once the kernel reads it */
#define IS(x) (!strcmp(name, x))

static long int80_getpid(void) { /* the i386 ABI from a 64-bit process: getpid is 20 there */
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(20L) : "memory", "cc", "r8", "r9", "r10", "r11");
    if (ret < 0 && ret > -4096) { errno = -ret; return -1; }
    return ret;
}

static long child_exits(long pid) { /* for fork-like calls: the child leaves at once */
    if (pid == 0) syscall(SYS_exit_group, 0L);
    if (pid > 0) waitpid(pid, NULL, __WALL);
    return pid;
}

static void *thread_main(void *arg) { return arg; }

static long run(const char *name) {
    if (IS("mount")) return syscall(SYS_mount, BAD, BAD, BAD, 0L, BAD);
    if (IS("umount2")) return syscall(SYS_umount2, "/", 0x80000000L);
    if (IS("pivot_root")) return syscall(SYS_pivot_root, BAD, BAD);
    if (IS("chroot")) return syscall(SYS_chroot, BAD);
    if (IS("unshare_newuser")) return syscall(SYS_unshare, (long)CLONE_NEWUSER);
    if (IS("clone_newuser")) return child_exits(syscall(SYS_clone, (long)(SIGCHLD | CLONE_NEWUSER), 0L, 0L, 0L, 0L));
    if (IS("clone_newns")) return child_exits(syscall(SYS_clone, (long)(SIGCHLD | CLONE_NEWUSER | CLONE_NEWNS), 0L, 0L, 0L, 0L));
    if (IS("clone_newnet")) return child_exits(syscall(SYS_clone, (long)(SIGCHLD | CLONE_NEWNET), 0L, 0L, 0L, 0L));
    if (IS("clone3")) return syscall(SYS_clone3, 0L, 0L);
    if (IS("setns")) return syscall(SYS_setns, -1L, 0L);
    if (IS("fsopen")) return syscall(SYS_fsopen, BAD, 0L);
    if (IS("fsmount")) return syscall(SYS_fsmount, -1L, 0L, 0L);
    if (IS("open_tree")) return syscall(SYS_open_tree, -1L, BAD, 0L);
    if (IS("move_mount")) return syscall(SYS_move_mount, -1L, BAD, -1L, BAD, 0L);
    if (IS("mount_setattr")) return syscall(SYS_mount_setattr, -1L, BAD, 0L, BAD, 0L);
    if (IS("ptrace")) return syscall(SYS_ptrace, 2L /* PTRACE_PEEKDATA */, 0x7fffffffL, 0L, 0L);
    if (IS("process_vm_readv")) return syscall(SYS_process_vm_readv, (long)getpid(), 0L, 0L, 0L, 0L, 1L);
    if (IS("process_vm_writev")) return syscall(SYS_process_vm_writev, (long)getpid(), 0L, 0L, 0L, 0L, 1L);
    if (IS("keyctl")) return syscall(SYS_keyctl, 0x7fffL, 0L, 0L, 0L, 0L);
    if (IS("add_key")) return syscall(SYS_add_key, BAD, BAD, 0L, 0L, 0L);
    if (IS("request_key")) return syscall(SYS_request_key, BAD, BAD, 0L, 0L);
    if (IS("bpf")) return syscall(SYS_bpf, 0x7fffL, 0L, 0L);
    if (IS("perf_event_open")) return syscall(SYS_perf_event_open, BAD, 0L, -1L, -1L, 0L);
    if (IS("init_module")) return syscall(SYS_init_module, BAD, 0L, BAD);
    if (IS("finit_module")) return syscall(SYS_finit_module, -1L, BAD, 0L);
    if (IS("kexec_load")) return syscall(SYS_kexec_load, 0L, 0L, 0L, 0L);
    if (IS("io_uring_setup")) return syscall(SYS_io_uring_setup, 1L, BAD);
    if (IS("userfaultfd")) return syscall(SYS_userfaultfd, 0x7fffffffL);
    if (IS("open_by_handle_at")) return syscall(SYS_open_by_handle_at, -1L, BAD, 0L);
    if (IS("name_to_handle_at")) return syscall(SYS_name_to_handle_at, -1L, BAD, BAD, BAD, 0L);
    if (IS("personality_read_implies_exec")) return syscall(SYS_personality, 0x0400000L);
    if (IS("personality_addr_no_randomize")) return syscall(SYS_personality, 0x0040000L);
    if (IS("personality_linux32")) return syscall(SYS_personality, 8L);
    if (IS("personality_query")) return syscall(SYS_personality, 0xffffffffL);
    if (IS("personality_linux")) return syscall(SYS_personality, 0L);
    if (IS("reboot")) return syscall(SYS_reboot, 0L, 0L, 0L, 0L);
    if (IS("clock_settime")) return syscall(SYS_clock_settime, 0L, BAD);
    if (IS("settimeofday")) return syscall(SYS_settimeofday, BAD, 0L);
    if (IS("adjtimex")) return syscall(SYS_adjtimex, BAD);
    if (IS("sethostname")) return syscall(SYS_sethostname, BAD, 4L);
    if (IS("mknod_chr")) return syscall(SYS_mknod, BAD, (long)(S_IFCHR | 0600), 0x103L);
    if (IS("mknodat_chr")) return syscall(SYS_mknodat, (long)AT_FDCWD, BAD, (long)(S_IFCHR | 0600), 0x103L);
    if (IS("mkfifo")) return mkfifo("/tmp/probe-fifo", 0600);
    if (IS("syslog")) return syscall(SYS_syslog, 10L /* SYSLOG_ACTION_SIZE_BUFFER */, 0L, 0L);
    if (IS("iopl")) return syscall(SYS_iopl, 4L);
    if (IS("modify_ldt")) return syscall(SYS_modify_ldt, 0x7fffL, 0L, 0L);
    if (IS("pidfd_getfd")) return syscall(SYS_pidfd_getfd, -1L, 0L, 0L);
    if (IS("socket_packet")) return socket(AF_PACKET, SOCK_RAW, 0);
    if (IS("socket_netlink")) return socket(AF_NETLINK, SOCK_RAW, 0);
    if (IS("socket_inet_raw")) return socket(AF_INET, SOCK_RAW, 1 /* ICMP */);
    if (IS("socket_vsock")) return socket(AF_VSOCK, SOCK_STREAM, 0);
    if (IS("socket_alg")) return socket(AF_ALG, SOCK_SEQPACKET, 0);
    if (IS("socket_inet")) return socket(AF_INET, SOCK_STREAM, 0);
    if (IS("socket_inet_udp")) return socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (IS("socket_inet6")) return socket(AF_INET6, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (IS("socket_unix")) return socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (IS("socket_unix_upper_bits")) return syscall(SYS_socket, (1L << 32) | AF_UNIX, (long)SOCK_DGRAM, 0L);
    if (IS("socketpair")) { int sv[2]; return socketpair(AF_UNIX, SOCK_SEQPACKET, 0, sv); }
    if (IS("ioctl_tiocsti")) return syscall(SYS_ioctl, 0L, 0x5412L, "x");
    if (IS("ioctl_tiocsti_upper_bits")) return syscall(SYS_ioctl, 0L, (long)((1UL << 32) | 0x5412), "x");
    if (IS("ioctl_tioclinux")) return syscall(SYS_ioctl, 0L, 0x541CL, "x");
    if (IS("ioctl_tcgets")) return syscall(SYS_ioctl, 0L, 0x5401L, BAD); /* ENOTTY: /dev/null */
    if (IS("ioctl_fionread")) {
        int p[2], n = 0;
        if (pipe(p)) return -1;
        return syscall(SYS_ioctl, (long)p[0], 0x541BL /* FIONREAD */, &n);
    }
    if (IS("x32_getpid")) return syscall(SYS_getpid | 0x40000000L /* __X32_SYSCALL_BIT */);
    if (IS("i386_getpid")) return int80_getpid();
    if (IS("fork")) return child_exits(fork());
    if (IS("vfork")) return child_exits(syscall(SYS_vfork));
    if (IS("posix_spawn")) {
        pid_t pid;
        char *argv[] = {"/bin/true", NULL};
        int err = posix_spawn(&pid, "/bin/true", NULL, NULL, argv, NULL);
        if (err) { errno = err; return -1; }
        return child_exits(pid);
    }
    if (IS("thread")) {
        pthread_t t;
        int err = pthread_create(&t, NULL, thread_main, NULL);
        if (err) { errno = err; return -1; }
        return pthread_join(t, NULL);
    }
    fprintf(stderr, "probe: no case named %s\n", name);
    exit(2);
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        errno = 0;
        long ret = run(argv[i]);
        if (ret < 0) printf("%s errno=%s\n", argv[i], strerrorname_np(errno));
        else printf("%s ok\n", argv[i]);
        fflush(stdout);
    }
    return 0;
}
"""


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The probe, built with gcc into a directory the sandbox's uid can read (mounted at
    /probe)."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build the seccomp probe")
    directory = tmp_path_factory.mktemp("seccomp-probe")
    directory.chmod(0o755)
    (directory / "probe.c").write_text(PROBE_C)
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-o", str(directory / "probe"),
                    str(directory / "probe.c")], check=True, capture_output=True)
    return directory


async def sandboxed(argv: list[str], *, bpf: bytes | None, probe_dir: Path | None = None,
                    timeout: float = 60) -> tuple[int, list[str], list[str]]:
    """Run ``argv`` in the real sandbox with ``bpf`` loaded; (returncode, stdout, stderr)."""
    mounts = tuple(base_mounts())
    if probe_dir is not None:
        mounts += (Mount(str(probe_dir), "/probe"),)
    ours, theirs = socket.socketpair()
    try:
        proc, uid = await launch(LaunchSpec(argv=argv, env=ENV, sandbox=SandboxConfig(),
                                            mounts=mounts, seccomp_bpf=bpf),
                                 rpc_fd=theirs.fileno(), logger=LOG)
        try:
            rc = await proc.wait(timeout)
            await proc.output_closed(1)
            assert rc is not None, f"{argv} did not finish within {timeout}s"
            return rc, list(proc.stdout.tail), list(proc.stderr.tail)
        finally:
            await proc.close()
            release_uid(uid)
    finally:
        ours.close()
        theirs.close()


async def probe(probe_dir: Path, case: str, *, bpf: bytes | None) -> str:
    """``ok``, ``errno=NAME`` or ``SIGSYS`` for one probe case."""
    rc, out, err = await sandboxed(["/probe/probe", case], bpf=bpf, probe_dir=probe_dir)
    if rc == -signal.SIGSYS:
        assert out == [], f"{case}: printed {out} and then died of SIGSYS"
        return SIGSYS
    assert rc == 0 and len(out) == 1 and out[0].startswith(case + " "), (rc, out, err)
    return out[0].split(" ", 1)[1]


def default_filter(*, network: bool = False) -> bytes:
    return compile_filter("default", network=network)


def strict_filter() -> bytes:
    return compile_filter("strict", network=False)


# -- denied calls, in the sandbox ----------------------------------------------------------------

# (probe case, what the default filter answers, whether the kernel would answer something a
# filter could not be mistaken for: then a control run without the filter must show it).
DENIED = [
    ("mount", "errno=EPERM", True),
    ("umount2", "errno=EPERM", True),
    ("pivot_root", "errno=EPERM", False),
    ("chroot", "errno=EPERM", True),
    ("unshare_newuser", "errno=EPERM", True),
    ("clone_newuser", "errno=EPERM", True),
    ("clone_newns", "errno=EPERM", True),
    ("clone_newnet", "errno=EPERM", False),
    ("clone3", "errno=ENOSYS", True),
    ("setns", "errno=EPERM", True),
    ("fsopen", "errno=EPERM", False),
    ("fsmount", "errno=EPERM", False),
    ("open_tree", "errno=EPERM", True),
    ("move_mount", "errno=EPERM", False),
    ("mount_setattr", "errno=EPERM", True),
    ("ptrace", "errno=EPERM", True),
    ("process_vm_readv", "errno=EPERM", True),
    ("process_vm_writev", "errno=EPERM", True),
    ("keyctl", "errno=EPERM", False),
    ("add_key", "errno=EPERM", False),
    ("request_key", "errno=EPERM", False),
    ("bpf", "errno=EPERM", False),
    ("perf_event_open", "errno=EPERM", True),
    ("init_module", "errno=EPERM", False),
    ("finit_module", "errno=EPERM", False),
    ("kexec_load", "errno=EPERM", False),
    ("io_uring_setup", "errno=EPERM", False),
    ("userfaultfd", "errno=EPERM", False),
    ("open_by_handle_at", "errno=EPERM", True),
    ("name_to_handle_at", "errno=EPERM", True),
    ("personality_read_implies_exec", "errno=EPERM", True),
    ("personality_addr_no_randomize", "errno=EPERM", True),
    ("personality_linux32", "errno=EPERM", True),
    ("reboot", "errno=EPERM", False),
    ("clock_settime", "errno=EPERM", True),
    ("settimeofday", "errno=EPERM", True),
    ("adjtimex", "errno=EPERM", True),
    ("sethostname", "errno=EPERM", False),
    ("mknod_chr", "errno=EPERM", True),
    ("mknodat_chr", "errno=EPERM", True),
    ("syslog", "errno=EPERM", False),
    ("iopl", "errno=EPERM", False),
    ("modify_ldt", "errno=EPERM", True),
    ("pidfd_getfd", "errno=EPERM", True),
    ("socket_packet", "errno=EPERM", False),
    ("socket_netlink", "errno=EPERM", True),
    ("socket_inet_raw", "errno=EPERM", False),
    ("socket_vsock", "errno=EPERM", False),
    ("socket_alg", "errno=EPERM", False),
    ("ioctl_tiocsti", "errno=EPERM", True),
    ("ioctl_tiocsti_upper_bits", "errno=EPERM", True),
    ("ioctl_tioclinux", "errno=EPERM", True),
    ("x32_getpid", SIGSYS, False),
    ("i386_getpid", SIGSYS, True),
]


@pytest.mark.parametrize(("case", "answer"), [pytest.param(c, a, id=c) for c, a, _ in DENIED])
async def test_the_default_filter_blocks(probe_dir: Path, case: str, answer: str) -> None:
    result = await probe(probe_dir, case, bpf=default_filter())
    assert result in BLOCKED
    assert result == answer


def allow_all_filter() -> bytes:
    """A filter that allows every call of every x86 ABI: the control's stand-in for ours."""
    flt = seccomp.pyseccomp.SyscallFilter(seccomp.pyseccomp.ALLOW)
    flt.set_attr(seccomp.pyseccomp.Attr.ACT_BADARCH, seccomp.pyseccomp.ALLOW)
    with tempfile.TemporaryFile() as out:
        flt.export_bpf(out)
        out.seek(0)
        return out.read()


@pytest.mark.parametrize("case", [pytest.param(c, id=c) for c, _, control in DENIED if control])
async def test_without_the_filter_the_call_reaches_the_kernel(probe_dir: Path, case: str) -> None:
    """The control: the same probe in the same sandbox, under a filter that allows everything,
    is not blocked. So a blocked answer above is our filter's, not the kernel's or the
    dropped capabilities'."""
    assert await probe(probe_dir, case, bpf=allow_all_filter()) not in BLOCKED


# -- allowed calls, in the sandbox -----------------------------------------------------------

ALLOWED = ["socket_unix", "socket_unix_upper_bits", "socketpair", "mkfifo", "ioctl_fionread",
           "personality_query", "personality_linux", "fork", "vfork", "posix_spawn", "thread"]


@pytest.mark.parametrize("case", ALLOWED)
async def test_the_default_filter_allows(probe_dir: Path, case: str) -> None:
    assert await probe(probe_dir, case, bpf=default_filter()) == "ok"


async def test_an_allowed_ioctl_still_reaches_the_kernel(probe_dir: Path) -> None:
    """TCGETS on /dev/null: ENOTTY comes from the tty layer, past the filter's TIOCSTI check."""
    assert await probe(probe_dir, "ioctl_tcgets", bpf=default_filter()) == "errno=ENOTTY"


@pytest.mark.parametrize("network", [False, True], ids=["without-network", "with-network"])
@pytest.mark.parametrize("case", ["socket_inet", "socket_inet6", "socket_inet_udp"])
async def test_the_default_filter_allows_tcp_and_udp(probe_dir: Path, case: str,
                                                      network: bool) -> None:
    """Without network too: the plugin's net namespace then holds only its own loopback."""
    assert await probe(probe_dir, case, bpf=default_filter(network=network)) == "ok"


@pytest.mark.parametrize("case", ["socket_inet_raw", "socket_packet", "socket_netlink",
                                  "socket_vsock", "socket_alg", "ioctl_tiocsti", "clone3"])
async def test_the_network_variant_still_blocks(probe_dir: Path, case: str) -> None:
    assert await probe(probe_dir, case, bpf=default_filter(network=True)) in BLOCKED


# -- strict ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("case", "answer"), [
    pytest.param("fork", "errno=EPERM", id="fork"),
    pytest.param("vfork", "errno=EPERM", id="vfork"),
    pytest.param("posix_spawn", "errno=EPERM", id="posix_spawn"),
    pytest.param("clone3", "errno=ENOSYS", id="clone3"),
    pytest.param("socket_inet", "errno=EPERM", id="socket_inet"),
    pytest.param("socket_inet_udp", "errno=EPERM", id="socket_inet_udp"),
    pytest.param("unshare_newuser", "errno=EPERM", id="unshare_newuser"),
    pytest.param("ioctl_tiocsti", "errno=EPERM", id="ioctl_tiocsti"),
    pytest.param("i386_getpid", SIGSYS, id="i386_getpid"),
])
async def test_strict_blocks(probe_dir: Path, case: str, answer: str) -> None:
    assert await probe(probe_dir, case, bpf=strict_filter()) == answer


@pytest.mark.parametrize("case", ["thread", "socket_unix", "socketpair", "personality_query"])
async def test_strict_allows(probe_dir: Path, case: str) -> None:
    assert await probe(probe_dir, case, bpf=strict_filter()) == "ok"


async def test_strict_runs_a_threaded_python_that_cannot_fork() -> None:
    script = textwrap.dedent("""\
        import os, socket, subprocess, threading
        results = []
        threads = [threading.Thread(target=results.append, args=(i,)) for i in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        print("threads", sorted(results))
        for what, call in (("fork", os.fork), ("subprocess", lambda: subprocess.run(["/bin/true"])),
                           ("inet", lambda: socket.socket(socket.AF_INET))):
            try:
                call()
                print(what, "allowed")
            except PermissionError:
                print(what, "denied")
        """)
    rc, out, err = await sandboxed(["/usr/bin/python3", "-c", script], bpf=strict_filter())
    assert (rc, out) == (0, ["threads [0, 1, 2, 3]", "fork denied", "subprocess denied",
                             "inet denied"]), err


def test_strict_never_compiles_with_network() -> None:
    with pytest.raises(PluginLoadError, match=r"strict\.toml: seccomp\.network_groups: .*never"):
        compile_filter("strict", network=True)


# -- ordinary programs under the default filter --------------------------------------------------

PYTHON = textwrap.dedent("""\
    import asyncio, multiprocessing as mp, os, resource, select, signal, socket, sqlite3
    import subprocess, tempfile, threading, time

    def square(x):
        return x * x

    if __name__ == "__main__":
        with mp.Pool(2) as pool:
            print("fork pool", sum(pool.map(square, range(10))))
        with mp.get_context("spawn").Pool(2) as pool:
            print("spawn pool", pool.apply(pow, (7, 2)))  # a builtin: -c has no module to import
        box = []
        t = threading.Thread(target=box.append, args=("thread",)); t.start(); t.join()
        print(*box)
        a, b = socket.socketpair(); a.sendall(b"x"); print("socketpair", b.recv(1)); a.close(); b.close()
        os.mkfifo("/tmp/fifo"); print("fifo", os.path.exists("/tmp/fifo"))
        ep = select.epoll(); ep.close(); os.close(os.eventfd(0)); os.close(os.memfd_create("m"))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft // 2, hard))
        print("subprocess", subprocess.run(["/bin/echo", "child"], capture_output=True, text=True).stdout.strip())
        async def child():
            proc = await asyncio.create_subprocess_exec("/bin/true")
            return await proc.wait()
        print("asyncio", asyncio.run(child()))
        db = sqlite3.connect("/tmp/py.db"); db.execute("create table t(x)"); db.execute("insert into t values (1)")
        print("sqlite", db.execute("select count(*) from t").fetchone()[0]); db.close()
        try:
            time.clock_settime(time.CLOCK_REALTIME, 0)
        except PermissionError:
            print("clock_settime denied")
    """)


@pytest.mark.parametrize(("argv", "expected"), [
    pytest.param(["/bin/sh", "-c", "x=$(echo sub); echo $x | tr s S; sleep 0 & wait; echo done"],
                 ["Sub", "done"], id="sh"),
    pytest.param(["/usr/bin/git", "--version"], None, id="git-version"),
    pytest.param(["/bin/sh", "-c", "cd /tmp && git init -q repo && cd repo && echo hi > f && "
                  "git add f && git -c user.name=n -c user.email=n@example.com commit -qm m && "
                  "git log --format=%s"], ["m"], id="git-init-commit"),
    pytest.param(["/bin/sh", "-c", "printf '#include <stdio.h>\\nint main(void){puts(\"hello\");}'"
                  " > /tmp/hello.c && gcc -o /tmp/hello /tmp/hello.c && /tmp/hello"],
                 ["hello"], id="gcc-hello"),
    pytest.param(["/usr/bin/sqlite3", "/tmp/db", "pragma journal_mode=wal; create table t(x); "
                  "insert into t values (42); select x from t;"], ["wal", "42"], id="sqlite3"),
    pytest.param(["/usr/bin/node", "-e", """
        const fs = require("fs"), cp = require("child_process"), { Worker } = require("worker_threads");
        fs.promises.writeFile("/tmp/n.txt", "node").then(async () => {
          const text = await fs.promises.readFile("/tmp/n.txt", "utf8");
          new Worker("process.exit(3)", { eval: true }).on("exit", (code) => {
            console.log(text, code, cp.execFileSync("/bin/echo", ["child"]).toString().trim());
          });
        });"""], ["node 3 child"], id="node"),
    pytest.param(["/usr/bin/python3", "-c", PYTHON],
                 ["fork pool 285", "spawn pool 49", "thread", "socketpair b'x'", "fifo True",
                  "subprocess child", "asyncio 0", "sqlite 1", "clock_settime denied"],
                 id="python3"),
])
async def test_ordinary_programs_run(argv: list[str], expected: list[str] | None) -> None:
    if not os.path.exists(argv[0]):
        pytest.skip(f"{argv[0]} is not installed")
    rc, out, err = await sandboxed(argv, bpf=default_filter())
    assert rc == 0, (out, err)
    if expected is None:
        assert out and out[0].startswith("git version"), (out, err)
    else:
        assert out == expected, err


# -- the compiled program, read instruction by instruction ------------------------------------------

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x40000000
RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
RET_EPERM = 0x00050000 | 1
RET_ENOSYS = 0x00050000 | 38


def run_bpf(program: bytes, nr: int | str, *args: int, arch: int = AUDIT_ARCH_X86_64) -> int:
    """What ``program`` answers for one syscall: a classic-BPF interpreter for the opcodes
    libseccomp emits (it fails on any other, rather than guess)."""
    if isinstance(nr, str):
        nr = seccomp.pyseccomp.resolve_syscall(seccomp.pyseccomp.Arch.NATIVE, nr)
    full = list(args) + [0] * (6 - len(args))
    data = struct.pack("<iIQ6Q", nr, arch, 0, *full)  # struct seccomp_data
    code = [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program), 8)]
    a = pc = 0
    while True:
        op, jt, jf, k = code[pc]
        pc += 1
        if op == 0x20:  # BPF_LD | BPF_W | BPF_ABS
            a = struct.unpack_from("<I", data, k)[0]
        elif op == 0x54:  # BPF_ALU | BPF_AND | BPF_K
            a &= k
        elif op == 0x05:  # BPF_JMP | BPF_JA
            pc += k
        elif op in (0x15, 0x25, 0x35, 0x45):  # JEQ, JGT, JGE, JSET with K
            taken = {0x15: a == k, 0x25: a > k, 0x35: a >= k, 0x45: bool(a & k)}[op]
            pc += jt if taken else jf
        elif op == 0x06:  # BPF_RET | BPF_K
            return k
        else:
            raise AssertionError(f"opcode {op:#x} at {pc - 1}: not one libseccomp emits here")


# Everything the brief for the groups leaves out (moby's CAP_SYS_ADMIN-only calls and more).
EXCLUDED = """mount umount2 pivot_root chroot unshare setns fsopen fsconfig fsmount fspick open_tree
move_mount mount_setattr ptrace process_vm_readv process_vm_writev process_madvise bpf keyctl
add_key request_key perf_event_open kexec_load kexec_file_load init_module finit_module
delete_module io_uring_setup io_uring_enter io_uring_register userfaultfd open_by_handle_at
name_to_handle_at reboot clock_settime clock_adjtime settimeofday adjtimex sethostname
setdomainname swapon swapoff acct quotactl quotactl_fd syslog vhangup iopl ioperm modify_ldt
lookup_dcookie nfsservctl uselib ustat sysfs _sysctl kcmp pidfd_getfd fanotify_init
fanotify_mark memfd_secret mbind set_mempolicy migrate_pages move_pages""".split()

NAMESPACE_FLAGS = {"CLONE_NEWNS": 0x00020000, "CLONE_NEWCGROUP": 0x02000000,
                   "CLONE_NEWUTS": 0x04000000, "CLONE_NEWIPC": 0x08000000,
                   "CLONE_NEWUSER": 0x10000000, "CLONE_NEWPID": 0x20000000,
                   "CLONE_NEWNET": 0x40000000, "CLONE_NEWTIME": 0x00000080}
CLONE_THREAD_FLAGS = 0x3D0F00  # glibc's pthread_create: VM|FS|FILES|SIGHAND|THREAD|SYSVSEM|...
FORK_FLAGS = 0x01200011  # glibc's fork: CHILD_SETTID|CHILD_CLEARTID|SIGCHLD


@pytest.mark.parametrize(("profile", "network"), [("default", False), ("default", True),
                                                  ("strict", False)])
def test_every_excluded_syscall_is_denied(profile: str, network: bool) -> None:
    program = compile_filter(profile, network=network)
    allowed = [name for name in EXCLUDED
               if run_bpf(program, name, 1, 1, 1, 1, 1, 1) != RET_EPERM]
    assert allowed == []


@pytest.mark.parametrize(("profile", "network"), [("default", False), ("default", True),
                                                  ("strict", False)])
def test_other_abis_are_killed(profile: str, network: bool) -> None:
    program = compile_filter(profile, network=network)
    getpid = 39
    assert run_bpf(program, getpid) == RET_ALLOW
    assert run_bpf(program, getpid | X32_SYSCALL_BIT) == RET_KILL_PROCESS
    assert run_bpf(program, 20, arch=AUDIT_ARCH_I386) == RET_KILL_PROCESS  # i386 getpid
    assert run_bpf(program, getpid, arch=0xC00000B7) == RET_KILL_PROCESS  # aarch64


@pytest.mark.parametrize("flag", NAMESPACE_FLAGS)
def test_clone_with_a_namespace_flag_is_denied(flag: str) -> None:
    for program in (default_filter(), default_filter(network=True), strict_filter()):
        for base in (FORK_FLAGS, CLONE_THREAD_FLAGS):
            assert run_bpf(program, "clone", base | NAMESPACE_FLAGS[flag]) == RET_EPERM


def test_clone_threads_everywhere_processes_only_outside_strict() -> None:
    assert run_bpf(default_filter(), "clone", FORK_FLAGS) == RET_ALLOW
    assert run_bpf(default_filter(), "clone", CLONE_THREAD_FLAGS) == RET_ALLOW
    assert run_bpf(strict_filter(), "clone", CLONE_THREAD_FLAGS) == RET_ALLOW
    assert run_bpf(strict_filter(), "clone", FORK_FLAGS) == RET_EPERM
    assert run_bpf(strict_filter(), "clone", 0x4111) == RET_EPERM  # posix_spawn: VM|VFORK|SIGCHLD
    for program in (default_filter(), strict_filter()):
        assert run_bpf(program, "clone3") == RET_ENOSYS


def test_memfd_create_and_execveat_are_denied_only_under_strict() -> None:
    """Strict runs no file a program wrote: a memfd is one no mount's noexec covers, and
    execveat would exec it (or any open file) by fd. The default allows both."""
    for name in ("memfd_create", "execveat"):
        assert run_bpf(default_filter(), name) == RET_ALLOW
        assert run_bpf(default_filter(network=True), name) == RET_ALLOW
        assert run_bpf(strict_filter(), name) == RET_EPERM
    assert run_bpf(strict_filter(), "execve") == RET_ALLOW  # the launcher's exec of the plugin


@pytest.mark.parametrize("request_", [0x5412, 0x541C, (1 << 32) | 0x5412, (0xFFFFFFFF << 32) | 0x541C,
                                      (1 << 63) | 0x5412])
def test_tiocsti_and_tioclinux_are_denied_whatever_the_upper_bits(request_: int) -> None:
    assert run_bpf(default_filter(), "ioctl", 1, request_) == RET_EPERM


@pytest.mark.parametrize("request_", [0x5401, 0x5413, 0x541B, 0x5421, 0x5411, 0x5410, 0x5416,
                                      0x541D, 0x80045430, 0xFFFFFFFF80045430, 0x5412 << 1, 0])
def test_other_ioctls_are_allowed(request_: int) -> None:
    assert run_bpf(default_filter(), "ioctl", 1, request_) == RET_ALLOW


@pytest.mark.parametrize(("value", "answer"), [
    (0, RET_ALLOW), (0x20000, RET_ALLOW), (0xFFFFFFFF, RET_ALLOW), (8, RET_EPERM),
    (0x20008, RET_EPERM), (0x0400000, RET_EPERM), (0x0040000, RET_EPERM),
    ((1 << 32) | 0x0400000, RET_EPERM), (1 << 32, RET_EPERM),
])
def test_personality(value: int, answer: int) -> None:
    assert run_bpf(default_filter(), "personality", value) == answer


AF_UNIX, AF_INET, AF_INET6, AF_NETLINK = 1, 2, 10, 16
SOCK_STREAM, SOCK_DGRAM, SOCK_RAW, SOCK_SEQPACKET = 1, 2, 3, 5
NONBLOCK_CLOEXEC = 0x800 | 0x80000  # SOCK_NONBLOCK | SOCK_CLOEXEC, carried in the type
TCP, UDP, ICMP, ICMPV6, SCTP, UDPLITE, MPTCP = 6, 17, 1, 58, 132, 136, 262


@pytest.mark.parametrize(("family", "kind", "protocol", "answer"), [
    pytest.param(AF_INET, SOCK_STREAM, 0, RET_ALLOW, id="tcp"),
    pytest.param(AF_INET, SOCK_STREAM, TCP, RET_ALLOW, id="tcp-by-number"),
    pytest.param(AF_INET, SOCK_STREAM | NONBLOCK_CLOEXEC, TCP, RET_ALLOW, id="tcp-with-flags"),
    pytest.param(AF_INET, SOCK_STREAM, (1 << 32) | TCP, RET_ALLOW, id="tcp-upper-bits"),
    pytest.param(AF_INET, SOCK_DGRAM, 0, RET_ALLOW, id="udp"),
    pytest.param(AF_INET, SOCK_DGRAM | NONBLOCK_CLOEXEC, UDP, RET_ALLOW, id="udp-with-flags"),
    pytest.param(AF_INET6, SOCK_STREAM | NONBLOCK_CLOEXEC, 0, RET_ALLOW, id="tcp6"),
    pytest.param(AF_INET6, SOCK_DGRAM, UDP, RET_ALLOW, id="udp6-by-number"),
    pytest.param((1 << 32) | AF_INET6, SOCK_DGRAM, 0, RET_ALLOW, id="udp6-family-upper-bits"),
    pytest.param(AF_INET, SOCK_STREAM, SCTP, RET_EPERM, id="sctp"),
    pytest.param(AF_INET, SOCK_SEQPACKET, SCTP, RET_EPERM, id="sctp-seqpacket"),
    pytest.param(AF_INET, SOCK_STREAM, (1 << 32) | SCTP, RET_EPERM, id="sctp-upper-bits"),
    pytest.param(AF_INET6, SOCK_STREAM, MPTCP, RET_EPERM, id="mptcp6"),
    pytest.param(AF_INET, SOCK_STREAM, MPTCP, RET_EPERM, id="mptcp"),  # 0x106: TCP in its low byte
    pytest.param(AF_INET, SOCK_DGRAM, ICMP, RET_EPERM, id="icmp-ping"),
    pytest.param(AF_INET6, SOCK_DGRAM, ICMPV6, RET_EPERM, id="icmpv6-ping"),
    pytest.param(AF_INET, SOCK_DGRAM, UDPLITE, RET_EPERM, id="udp-lite"),
    pytest.param(AF_INET, SOCK_STREAM, UDP, RET_EPERM, id="stream-asking-for-udp"),
    pytest.param(AF_INET, SOCK_DGRAM, TCP, RET_EPERM, id="datagram-asking-for-tcp"),
    pytest.param(AF_INET, SOCK_RAW, TCP, RET_EPERM, id="raw-tcp"),
    pytest.param(AF_INET, SOCK_RAW, 0, RET_EPERM, id="raw-0"),
    pytest.param(AF_NETLINK, SOCK_DGRAM, 0, RET_EPERM, id="netlink"),
    pytest.param(AF_UNIX, SOCK_SEQPACKET, 0, RET_ALLOW, id="unix"),
])
def test_with_network_inet_sockets_are_tcp_and_udp_only(family: int, kind: int, protocol: int,
                                                        answer: int) -> None:
    assert run_bpf(default_filter(network=True), "socket", family, kind, protocol) == answer


def test_strict_makes_no_inet_socket_at_all() -> None:
    program = strict_filter()
    for family in (AF_INET, AF_INET6):
        for kind, protocol in ((SOCK_STREAM, 0), (SOCK_DGRAM, UDP), (SOCK_STREAM, TCP)):
            assert run_bpf(program, "socket", family, kind, protocol) == RET_EPERM
    assert run_bpf(program, "socket", AF_UNIX, SOCK_STREAM, 0) == RET_ALLOW


# -- compiling once ------------------------------------------------------------------------------

def test_a_profile_compiles_once_and_is_reused() -> None:
    first = compile_filter("default", network=False)
    assert compile_filter("default", network=False) is first
    assert compile_filter("strict", network=False) is not first
    network = compile_filter("default", network=True)
    assert compile_filter("default", network=True) is network


def _copy_profile(directory: Path, name: str, seccomp_table: str) -> Path:
    default = (PROFILES / "default.toml").read_text()
    head = default[:default.index("[seccomp]")]
    path = directory / f"{name}.toml"
    path.write_text(head + textwrap.dedent(seccomp_table))
    return path


def test_a_changed_profile_is_compiled_again(tmp_path: Path) -> None:
    path = _copy_profile(tmp_path, "mine", '[seccomp]\ngroups = ["io", "runtime", "exec", "files"]\n')
    first = compile_filter("mine", network=False, extra_dirs=(str(tmp_path),))
    assert compile_filter("mine", network=False, extra_dirs=(str(tmp_path),)) is first
    assert run_bpf(first, "getpid") == RET_EPERM
    path.write_text(path.read_text().replace('"files"]', '"files", "process"]'))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = compile_filter("mine", network=False, extra_dirs=(str(tmp_path),))
    assert run_bpf(second, "getpid") == RET_ALLOW


def test_a_host_profile_dir_may_bring_its_own_groups(tmp_path: Path) -> None:
    (tmp_path / "seccomp.toml").write_text(textwrap.dedent("""\
        [groups.tiny]
        comment = "exactly what the launcher needs to exec the plugin"
        syscalls = ["chdir", "execve", "write", "exit_group"]
        """))
    _copy_profile(tmp_path, "tiny", '[seccomp]\ngroups = ["tiny"]\n')
    program = compile_filter("tiny", network=False, extra_dirs=(str(tmp_path),))
    assert run_bpf(program, "execve") == RET_ALLOW
    assert run_bpf(program, "read") == RET_EPERM


# -- invalid profiles and groups -----------------------------------------------------------------

GROUPS_OK = """\
[constants]
AF_UNIX = 1

[groups.base]
comment = "test"
syscalls = ["read", "chdir", "execve", "write", "exit_group"]

[groups.reading]
comment = "test"
syscalls = ["read"]
"""

INET_REFUSED = "allows inet sockets (AF_INET or AF_INET6) other than TCP and UDP"

BAD_PROFILES = [
    pytest.param("", "seccomp: a [seccomp] table", id="no-seccomp-table"),
    pytest.param("[seccomp]\n", "seccomp.groups: a list of syscall group names (required)",
                 id="no-groups"),
    pytest.param('[seccomp]\ngroups = ["nope"]\n', "seccomp.groups[0]: a group of",
                 id="unknown-group"),
    pytest.param('[seccomp]\ngroups = ["base", "base"]\n', "seccomp.groups: each group once",
                 id="group-twice"),
    pytest.param('[seccomp]\ngroups = ["base"]\nnetwork_groups = ["nope"]\n',
                 "seccomp.network_groups[0]", id="unknown-network-group"),
    pytest.param('[seccomp]\ngroups = ["base"]\ndefault = "allow"\n',
                 "seccomp.default: not a known key", id="default-action-is-not-configurable"),
    pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = ["getpid"]\n'
                 'action = "allow"\n', "seccomp.rules[0].comment", id="rule-without-comment"),
    pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = ["getpid"]\n'
                 'action = "allow"\ncomment = "  "\n', "seccomp.rules[0].comment",
                 id="rule-with-blank-comment"),
    pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = ["getpidd"]\n'
                 'action = "allow"\ncomment = "c"\n', "seccomp.rules[0].syscalls: a syscall of "
                 "x86_64 ('getpidd'", id="misspelt-syscall"),
    pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = ["socketcall"]\n'
                 'action = "allow"\ncomment = "c"\n', "('socketcall' is not one)",
                 id="syscall-of-another-arch"),
    pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = []\n'
                 'action = "allow"\ncomment = "c"\n', "seccomp.rules[0].syscalls: a non-empty",
                 id="no-syscalls"),
    pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = ["getpid"]\n'
                 'action = "deny"\ncomment = "c"\n', "seccomp.rules[0].action", id="bad-action"),
    pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = ["getpid"]\n'
                 'action = "errno:ENOPE"\ncomment = "c"\n', "seccomp.rules[0].action",
                 id="unknown-errno"),
    pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = ["getpid"]\n'
                 'action = "allow"\ncomment = "c"\nsyscall = "x"\n',
                 "seccomp.rules[0].syscall: not a known key", id="unknown-rule-key"),
    pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = ["socket"]\n'
                 'action = "allow"\ncomment = "c"\nargs = [{index = 6, op = "eq", value = 1}]\n',
                 "seccomp.rules[0].args[0].index", id="arg-index-out-of-range"),
    pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = ["socket"]\n'
                 'action = "allow"\ncomment = "c"\nargs = [{index = 0, op = "in", value = 1}]\n',
                 "seccomp.rules[0].args[0].op", id="unknown-op"),
    pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = ["socket"]\n'
                 'action = "allow"\ncomment = "c"\n'
                 'args = [{index = 0, op = "masked_eq", value = 1}]\n',
                 "seccomp.rules[0].args[0].mask: a mask", id="masked-eq-without-mask"),
    pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = ["socket"]\n'
                 'action = "allow"\ncomment = "c"\n'
                 'args = [{index = 0, op = "masked_eq", mask = 1, value = 2}]\n',
                 "seccomp.rules[0].args[0].value: bits inside the mask",
                 id="masked-eq-that-never-matches"),
    pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = ["socket"]\n'
                 'action = "allow"\ncomment = "c"\n'
                 'args = [{index = 0, op = "eq", value = "AF_UNIX | AF_NOPE"}]\n',
                 "seccomp.rules[0].args[0].value: a number or named constants joined by | "
                 "('AF_NOPE'", id="unknown-constant"),
    pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = ["socket"]\n'
                 'action = "allow"\ncomment = "c"\n'
                 'args = [{index = 0, op = "eq", value = -1}]\n',
                 "seccomp.rules[0].args[0].value: a value between", id="negative-value"),
    pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = ["socket"]\n'
                 'action = "allow"\ncomment = "c"\n'
                 'args = [{index = 0, op = "gt", value = 1}, {index = 0, op = "lt", value = 9}]\n',
                 "seccomp.rules[0].args: at most one check per argument index",
                 id="two-checks-on-one-argument"),
    pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = ["read"]\n'
                 'action = "errno:EPERM"\ncomment = "c"\n',
                 "answers it errno:EPERM always, but", id="deny-what-a-group-allows"),
    pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = ["read"]\n'
                 'action = "errno:EPERM"\ncomment = "c"\nargs = [{index = 0, op = "gt", value = 2}]\n',
                 "an exception to an allowed syscall must compare one argument",
                 id="exception-libseccomp-cannot-express"),
    *[pytest.param('[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\nsyscalls = '
                   f'["{call}"]\naction = "allow"\ncomment = "c"\nargs = [{args}]\n',
                   INET_REFUSED, id=id) for call, args, id in [
        ("socket", "", "socket-for-every-family"),
        ("socketpair", "", "socketpair-for-every-family"),
        ("socket", '{index = 0, op = "eq", value = 2}', "inet-socket-of-any-type"),
        ("socket", '{index = 0, op = "eq", value = 2}, '
                   '{index = 1, op = "masked_eq", mask = 15, value = 1}',
         "inet-stream-of-any-protocol"),
        ("socket", '{index = 0, op = "eq", value = 10}, {index = 1, op = "eq", value = 1}, '
                   '{index = 2, op = "eq", value = 132}', "inet6-sctp"),
        ("socket", '{index = 0, op = "eq", value = 2}, {index = 1, op = "eq", value = 3}, '
                   '{index = 2, op = "eq", value = 6}', "raw-socket-asking-for-tcp"),
        ("socket", '{index = 0, op = "eq", value = 2}, {index = 1, op = "eq", value = 2}, '
                   '{index = 2, op = "eq", value = 6}', "datagram-socket-asking-for-tcp"),
        ("socket", '{index = 0, op = "eq", value = 2}, {index = 1, op = "eq", value = 1}, '
                   '{index = 2, op = "masked_eq", mask = 255, value = 6}',
         "tcp-by-a-one-byte-mask-lets-mptcp-through"),
        ("socket", '{index = 0, op = "eq", value = 2}, '
                   '{index = 1, op = "masked_eq", mask = 7, value = 1}, '
                   '{index = 2, op = "eq", value = 0}', "stream-by-a-three-bit-mask"),
        ("socket", '{index = 0, op = "lt", value = 11}', "families-below-11"),
        ("socket", '{index = 0, op = "ne", value = 1}', "every-family-but-unix"),
        ("socket", '{index = 0, op = "masked_eq", mask = 1, value = 0}', "even-families"),
        ("socket", '{index = 0, op = "eq", value = 0x100000002}', "af-inet-in-the-low-half"),
    ]],
    pytest.param('[seccomp]\ngroups = ["reading"]\n', "seccomp.groups: groups that allow chdir, "
                 "execve, write, exit_group", id="a-profile-that-could-never-exec-its-plugin"),
]


@pytest.mark.parametrize(("table", "message"), BAD_PROFILES)
def test_an_invalid_profile_is_refused(tmp_path: Path, table: str, message: str) -> None:
    (tmp_path / "seccomp.toml").write_text(GROUPS_OK)
    path = _copy_profile(tmp_path, "bad", table)
    with pytest.raises(PluginLoadError) as info:
        compile_filter("bad", network=False, extra_dirs=(str(tmp_path),))
    assert message in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("args", [
    pytest.param('{index = 0, op = "eq", value = 16}', id="netlink-is-not-inet"),
    pytest.param('{index = 0, op = "eq", value = 2}, {index = 1, op = "eq", value = 0x80001}, '
                 '{index = 2, op = "eq", value = 6}', id="tcp-cloexec-by-eq"),
    pytest.param('{index = 0, op = "masked_eq", mask = 0xffffffff, value = 10}, '
                 '{index = 1, op = "masked_eq", mask = 0xffff, value = 2}, '
                 '{index = 2, op = "masked_eq", mask = 0xffffffffffffffff, value = 0}',
                 id="udp6-by-wider-masks"),
])
def test_an_inet_rule_pinned_to_tcp_or_udp_is_accepted(tmp_path: Path, args: str) -> None:
    """The other side of the refusals above: the check asks for TCP or UDP, not a spelling."""
    (tmp_path / "seccomp.toml").write_text(GROUPS_OK)
    _copy_profile(tmp_path, "fine", '[seccomp]\ngroups = ["base"]\n[[seccomp.rules]]\n'
                  f'syscalls = ["socket"]\naction = "allow"\ncomment = "c"\nargs = [{args}]\n')
    assert compile_filter("fine", network=False, extra_dirs=(str(tmp_path),))


BAD_GROUPS = [
    pytest.param("[groups.base]\nsyscalls = [\"read\"]\n", "groups.base.comment",
                 id="group-without-comment"),
    pytest.param("[groups.base]\ncomment = \"c\"\n", "groups.base: syscalls or rules",
                 id="group-that-allows-nothing"),
    pytest.param("[groups.base]\ncomment = \"c\"\nsyscalls = [\"reed\"]\n",
                 "groups.base.syscalls: a syscall of x86_64 ('reed'", id="misspelt-syscall"),
    pytest.param("[groups.base]\ncomment = \"c\"\nsyscalls = \"read\"\n",
                 "groups.base.syscalls: a non-empty list", id="syscalls-not-a-list"),
    pytest.param("[groups.base]\ncomment = \"c\"\nsyscall = [\"read\"]\n",
                 "groups.base.syscall: not a known key", id="unknown-group-key"),
    pytest.param("[constants]\nX = true\n[groups.base]\ncomment = \"c\"\nsyscalls = [\"read\"]\n",
                 "constants.X", id="constant-not-a-number"),
    pytest.param("[groups.base]\ncomment = \"c\"\nsyscalls = [\"read\"]\n"
                 "[[groups.base.rules]]\nsyscalls = [\"write\"]\naction = \"allow\"\n",
                 "groups.base.rules[0].comment", id="group-rule-without-comment"),
    pytest.param("[group.base]\ncomment = \"c\"\n", "(top level).group: not a known key",
                 id="misspelt-groups-table"),
    pytest.param("[groups.base\n", "readable TOML", id="not-toml"),
]


@pytest.mark.parametrize(("groups", "message"), BAD_GROUPS)
def test_an_invalid_groups_file_is_refused(tmp_path: Path, groups: str, message: str) -> None:
    (tmp_path / "seccomp.toml").write_text(groups)
    _copy_profile(tmp_path, "bad", '[seccomp]\ngroups = ["base"]\n')
    with pytest.raises(PluginLoadError) as info:
        compile_filter("bad", network=False, extra_dirs=(str(tmp_path),))
    assert message in str(info.value)
    assert str(tmp_path / "seccomp.toml") in str(info.value)


def test_every_shipped_profile_compiles() -> None:
    for path in sorted(PROFILES.glob("*.toml")):
        if path.name == seccomp.GROUPS_FILE:
            continue
        program = compile_filter(path.stem, network=False)
        assert 0 < len(program) // 8 <= seccomp.BPF_MAXINSNS
