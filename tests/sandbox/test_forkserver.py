"""The launcher's fork server (sandbox/forkserver.py, launcher.serve): every sandbox's
launcher is a fork of one launcher process per supervisor, and must behave exactly as a
freshly spawned one did: the supervisor's own child, reaped by it, alive as long as the
supervisor is, and the server itself must survive bad requests and be replaced when it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO
from sandboxer import SandboxConfig
from sandboxer.sandbox import cgroups, child, forkserver, program
from sandboxer.sandbox.seccomp import compile_filter

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root here")


@pytest.fixture(scope="module")
def backend() -> cgroups.CgroupBackend:
    return cgroups.detect()


@pytest.fixture(scope="module")
def bpf() -> bytes:
    return compile_filter("default", network=False)


def _run(argv: list[str], backend: cgroups.CgroupBackend, bpf: bytes) -> program.RunResult:
    out: list[bytes] = []
    return asyncio.run(
        program.run(
            argv,
            SandboxConfig(),
            backend=backend,
            seccomp_bpf=bpf,
            sinks=(out.append, out.append),
        )
    )


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _zombie_children() -> list[int]:
    zombies = []
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/children") as f:
            for pid in f.read().split():
                with open(f"/proc/{pid}/stat") as stat:
                    if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                        zombies.append(int(pid))
    return zombies


def test_a_launcher_is_the_supervisors_own_child(no_leaks) -> None:
    async def main() -> tuple[int, int | None]:
        null = os.open("/dev/null", os.O_RDWR)
        try:
            proc = child.spawn(
                [],
                {},
                rpc_fd=null,
                logger=logging.getLogger("test"),
                starter=forkserver.start_launcher,
                extra_fds={4: null, 5: null},
            )
        finally:
            os.close(null)
        ppid = _ppid(proc.pid)
        await proc.wait(10)  # the launcher reads EOF where its spec should be: exits 127
        await proc.close()
        return ppid, proc.returncode

    ppid, code = asyncio.run(main())
    assert ppid == os.getpid()
    assert code == 127
    server = forkserver.server_pid()
    assert server is not None and _ppid(server) == os.getpid()


def test_programs_run_through_the_server(backend, bpf, no_leaks) -> None:
    server = forkserver.server_pid()
    for _ in range(3):
        assert _run(["/bin/sh", "-c", "exit 3"], backend, bpf).returncode == 3
    assert forkserver.server_pid() == server  # one server, many launchers


def test_a_dead_server_is_reaped_and_replaced(backend, bpf) -> None:
    forkserver.prestart()
    dead = forkserver.server_pid()
    assert dead is not None
    os.kill(dead, signal.SIGKILL)
    time.sleep(0.1)
    assert _run(["/bin/true"], backend, bpf).returncode == 0
    assert forkserver.server_pid() not in (None, dead)
    assert dead not in _zombie_children()
    assert not os.path.exists(f"/proc/{dead}")


def test_garbage_requests_get_an_error_and_the_server_goes_on(backend, bpf) -> None:
    forkserver.prestart()
    pid = forkserver.server_pid()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        # The server's own socket, reached as the supervisor reaches it.
        server_sock = forkserver._server.sock  # noqa: SLF001 - the test plays the supervisor
        with forkserver._lock:  # noqa: SLF001
            server_sock.send(b"hello")
            assert server_sock.recv(32).startswith(b"E")
            socket.send_fds(server_sock, [b"L"], [ours.fileno()])  # one fd, not six
            assert server_sock.recv(32).startswith(b"E")
    finally:
        ours.close()
        theirs.close()
    assert forkserver.server_pid() == pid
    assert _run(["/bin/true"], backend, bpf).returncode == 0


def test_launchers_outlive_the_thread_that_started_the_server(backend, bpf) -> None:
    """A launcher's parent-death signal follows its parent thread. Were the server spawned
    by whichever thread first launched, a launcher would be killed when that thread ends;
    it is spawned by a thread that never ends."""
    forkserver.shutdown()
    started, leave = threading.Event(), threading.Event()

    def short_lived() -> None:
        forkserver.prestart()
        started.set()
        leave.wait()

    thread = threading.Thread(target=short_lived)
    thread.start()
    started.wait()

    def end_thread_soon() -> None:
        time.sleep(0.3)
        leave.set()

    threading.Thread(target=end_thread_soon).start()
    result = _run(["/bin/sh", "-c", "sleep 1; exit 5"], backend, bpf)
    thread.join()
    assert result.returncode == 5


def test_a_forked_supervisor_starts_its_own_server(backend, bpf) -> None:
    forkserver.prestart()
    parents = forkserver.server_pid()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the forked copy: it must not fork launchers through the parent's server
        try:
            os.close(read)
            code = _run(["/bin/sh", "-c", "exit 7"], backend, bpf).returncode
            mine = forkserver.server_pid()
            os.write(write, f"{code} {mine}".encode())
            forkserver.shutdown()
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        code, theirs = f.read().split()
    os.waitpid(pid, 0)
    assert int(code) == 7
    assert int(theirs) != parents
    assert forkserver.server_pid() == parents


def test_a_sandboxed_program_dies_with_its_supervisor(tmp_path) -> None:
    """SIGKILL to the supervisor kills every sandbox it started, and the fork server. (The
    kernel disarms a parent-death signal when the uid changes; the launcher, which changes
    it, used to survive its supervisor, and the program inside with it.)"""
    ready = tmp_path / "ready"
    script = (
        "import asyncio, pathlib, sys\n"
        "from sandboxer import SandboxConfig\n"
        "from sandboxer.sandbox import cgroups, program\n"
        "from sandboxer.sandbox.seccomp import compile_filter\n"
        "def started(data):\n"
        f"    pathlib.Path({str(ready)!r}).write_bytes(data)\n"
        "asyncio.run(program.run(['/bin/sh', '-c', 'echo up; exec sleep 60'], SandboxConfig(),\n"
        "    backend=cgroups.detect(), seccomp_bpf=compile_filter('default', network=False),\n"
        "    sinks=(started, started)))\n"
    )
    supervisor = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert supervisor.poll() is None, "the supervisor died before the program ran"
            assert time.monotonic() < deadline, "the sandboxed program never started"
            time.sleep(0.05)
        groups = _cgroups_of(supervisor.pid)
        inside = {int(p) for group in groups for p in Path(group, "cgroup.procs").read_text().split()}
        assert inside, "the program's cgroup holds no process"
        server = [int(p) for p in Path(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children")
                  .read_text().split()]
    finally:
        supervisor.kill()
        supervisor.wait()
    deadline = time.monotonic() + 5
    try:
        while any(os.path.exists(f"/proc/{pid}") for pid in inside | set(server)):
            assert time.monotonic() < deadline, "a sandboxed process outlived its supervisor"
            time.sleep(0.05)
    finally:
        for pid in inside:  # (only when the assertion failed)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for group in groups:  # the supervisor had no chance to remove them: the test does
            for _ in range(100):
                with contextlib.suppress(OSError):
                    os.rmdir(group)
                    break
                time.sleep(0.05)


def _cgroups_of(pid: int) -> list[str]:
    own = cgroups.own_cgroups()
    found: list[str] = []
    for controller in ("memory", "cpu", "cpuacct", "pids"):
        base = Path("/sys/fs/cgroup", controller, own[controller].lstrip("/"))
        found += [str(p) for p in base.glob(f"sandboxer-{pid}-*")]
    return found
