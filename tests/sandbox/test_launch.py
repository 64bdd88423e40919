"""The sandboxed launch (the supervisor's sandbox/spec.py, sources.py, start.py,
confinement.py, program.py; inside, sandbox/launcher.py and its launcher_*.py) as a user
meets it: through ``sandboxer exec``, ``sandboxer doctor``, the manager, and ``launch()``
itself, as root and as an unprivileged user.

Everything here runs the real thing: real namespaces, real v1 cgroups, the real seccomp
filter of the default profile. ``sandboxer exec`` runs in a child process (``python -m
sandboxer.cli``); after each run no ``sandboxer-<its pid>-*`` cgroup may be left in any
hierarchy (a cgroup that still held a process could not have been removed, so this also
proves no sandboxed process outlived the command).

Paths handed to ``exec`` live under /var/tmp (and one under /tmp, for the private /tmp)
with world-readable modes: the program runs as an unprivileged host uid, to which pytest's
0700 tmp_path would be closed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO
from sandboxer import (
    HostConfig,
    PluginLoadError,
    PluginManager,
    SandboxConfig,
    SandboxUnavailable,
)
from sandboxer.sandbox import cgroups, program, sources
from sandboxer.sandbox import child as child_process
from sandboxer.sandbox.confinement import launch_confined
from sandboxer.sandbox.spec import LaunchSpec, Mount, base_mounts, grant_mounts
from sandboxer.sandbox.start import SandboxSetupError, launch
from sandboxer.sandbox.seccomp import compile_filter
from sandboxer.sandbox.policy import PathGrant

NOBODY = 65534
CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")


# -- helpers ---------------------------------------------------------------------------------

def _cgroups_named(prefix: str) -> list[str]:
    """Cgroups whose name starts with ``prefix`` under our own cgroup, in every v1 hierarchy
    the sandbox uses (children of this process share our cgroups)."""
    own = cgroups.own_cgroups()
    found: list[str] = []
    for controller in CONTROLLERS:
        base = Path("/sys/fs/cgroup", controller, own[controller].lstrip("/"))
        found += [str(p) for p in base.glob(f"{prefix}*")]
    return found


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def sandboxer(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> Ran:
    """Run ``python -m sandboxer.cli ARGS``; checks it left no cgroup behind."""
    start = time.monotonic()
    # stdin: exec forwards it, and pytest's own may be a terminal.
    proc = subprocess.Popen([sys.executable, "-m", "sandboxer.cli", *args], cwd=REPO,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"sandboxer {' '.join(args)} ran over {timeout}s: {err[-2000:]!r}")
    left = _cgroups_named(f"sandboxer-{proc.pid}-")
    assert not left, f"sandboxer {' '.join(args)} left cgroups behind: {left}"
    return Ran(proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
               time.monotonic() - start)


def sbx_exec(*command: str, options: tuple[str, ...] = (), timeout: float = 60) -> Ran:
    return sandboxer("exec", *options, "--", *command, timeout=timeout)


def sh(script: str, options: tuple[str, ...] = (), timeout: float = 60) -> Ran:
    return sbx_exec("/bin/sh", "-c", script, options=options, timeout=timeout)


def python_plugin(root: Path, code: str, *, plugin_id: str = "probe", extra: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "plugin.py").write_text(code)
    (root / "plugin.toml").write_text(
        f'[plugin]\nid = "{plugin_id}"\nversion = "1.0.0"\ntype = "python"\n'
        f'entrypoint = "plugin.py"\n{extra}')
    return root


@pytest.fixture
def host_dir():
    """A fresh host directory outside /tmp (the sandbox has its own /tmp)."""
    path = Path(tempfile.mkdtemp(prefix="sandboxer-test-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def world_dir():
    """A directory under /tmp that the unprivileged user can read (pytest's tmp_path is
    0700 root), for scripts and plugins the rootless supervisor must open."""
    path = Path(tempfile.mkdtemp(prefix="sandboxer-rootless-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


# -- sandboxer exec: exit statuses and output ------------------------------------------------

@pytest.mark.parametrize("script, expected", [
    ("exit 0", 0),
    ("exit 7", 7),
    ("kill -TERM $$", 128 + signal.SIGTERM),
    ("kill -KILL $$", 128 + signal.SIGKILL),
    ("kill -SEGV $$", 128 + signal.SIGSEGV),
], ids=["exit-0", "exit-7", "sigterm", "sigkill", "sigsegv"])
def test_exec_exits_with_the_programs_status(script, expected):
    assert sh(script).returncode == expected


def test_exec_passes_stdout_and_stderr_through_unchanged():
    ran = sh("printf 'to out\\n'; printf 'to err' >&2; head -c 1000000 /dev/zero | tr '\\0' a")
    assert ran.returncode == 0
    assert ran.stdout == "to out\n" + "a" * 1_000_000
    assert ran.stderr == "to err"


def test_exec_memory_limit_kills_a_hog_and_says_why():
    """The kill is sandboxer's doing, not the program's own end: exit 3, a limit was hit."""
    ran = sbx_exec("python3", "-c", "block = b'x' * (200 << 20); print('survived')",
                   options=("--memory-limit", "32M"))
    assert ran.returncode == 3
    assert "survived" not in ran.stdout
    assert re.search(r"^sandboxer: MemoryLimitExceeded: the program was killed for exceeding "
                     r"the memory limit of 32MiB \(peak \d+ bytes\)", ran.stderr), ran.stderr


# -- filesystem: allowed, denied, /tmp --------------------------------------------------------

def test_exec_denied_paths_are_masked_inside_an_allowed_dir(host_dir):
    (host_dir / "public").write_text("public data\n")
    (host_dir / "secret").mkdir()
    (host_dir / "secret" / "key").write_text("SECRET-KEY\n")
    (host_dir / "token").write_text("SECRET-TOKEN\n")
    d = str(host_dir)
    ran = sh(f"cat {d}/public; ls {d}/secret || echo DIR-MASKED; "
             f"cat {d}/secret/key || echo KEY-MASKED; cat {d}/token || echo TOKEN-MASKED",
             options=("--allow-path", d, "--deny-path", f"{d}/secret",
                      "--deny-path", f"{d}/token"))
    assert "SECRET" not in ran.stdout + ran.stderr
    assert ran.stdout.split() == ["public", "data", "DIR-MASKED", "KEY-MASKED",
                                  "TOKEN-MASKED"]


def test_exec_allowed_dir_is_read_only_unless_rw(host_dir):
    host_dir.chmod(0o777)  # the sandbox's host uid is an unprivileged stranger
    d = str(host_dir)
    ro = sh(f"echo data > {d}/written", options=("--allow-path", d))
    assert ro.returncode != 0 and "Read-only file system" in ro.stderr
    assert not (host_dir / "written").exists()
    rw = sh(f"echo data > {d}/written && cat {d}/written", options=("--allow-path", f"{d}:rw"))
    assert rw.returncode == 0 and rw.stdout == "data\n"
    assert (host_dir / "written").read_text() == "data\n"


def test_exec_writable_dirs_are_not_executable(host_dir):
    host_dir.chmod(0o777)
    d = str(host_dir)
    ran = sh(f"cp /bin/true {d}/prog && {d}/prog", options=("--allow-path", f"{d}:rw"))
    assert ran.returncode == 126 and "Permission denied" in ran.stderr
    assert (host_dir / "prog").exists()  # the copy worked: only exec was refused


def test_exec_allowed_path_outside_tmp_is_visible_where_it_is_on_the_host(host_dir):
    (host_dir / "f").write_text("hello\n")
    ran = sh(f"cat {host_dir}/f", options=("--allow-path", str(host_dir)))
    assert (ran.returncode, ran.stdout) == (0, "hello\n")


def test_exec_allowed_path_under_tmp_is_visible_over_the_private_tmp(world_dir):
    """The sandbox's /tmp is its own tmpfs; a granted host path below /tmp is bound on top
    of it (regression: it used to be hidden by the /tmp mounted after the binds)."""
    (world_dir / "f").write_text("hello\n")
    (world_dir / "f").chmod(0o644)
    ran = sh(f"cat {world_dir}/f; ls /tmp", options=("--allow-path", str(world_dir)))
    lines = ran.stdout.splitlines()
    assert (ran.returncode, lines[0]) == (0, "hello")
    # Only granted paths: not the sandboxer install, even when this checkout lives under /tmp
    # (the plugin runtime is a copy at a neutral path, sandbox/runtime.py).
    assert set(lines[1:]) == {world_dir.name}


def test_exec_tmp_is_size_limited():
    ran = sh("dd if=/dev/zero of=/tmp/fill bs=1M count=100; ls -l /tmp/fill")
    assert "No space left on device" in ran.stderr
    size = int(ran.stdout.split()[4])
    assert 60 << 20 <= size <= 64 << 20  # the default profile's 64 MiB


def test_exec_missing_allowed_path_is_a_usage_error():
    ran = sbx_exec("/bin/true", options=("--allow-path", "/nonexistent-allowed"))
    assert ran.returncode == 2
    assert "PluginLoadError" in ran.stderr and "/nonexistent-allowed" in ran.stderr


# -- process limits and isolation ------------------------------------------------------------

def test_exec_open_files_limit():
    ran = sh("ulimit -n; ulimit -Hn")
    assert ran.stdout.split() == ["1024", "1024"]


def test_exec_fork_bomb_hits_the_pids_limit_and_dies_with_the_sandbox():
    ran = sh("for i in $(seq 200); do sleep 5 & echo started $i; done; wait")
    assert ran.returncode != 0
    assert "Cannot fork" in ran.stderr
    started = [int(line.split()[1]) for line in ran.stdout.splitlines()]
    assert started and max(started) < 128  # the default pids limit
    # The shell gave up at once; its sleeping children died with the pid namespace.
    assert ran.seconds < 5, f"took {ran.seconds:.1f}s: the sleeps were waited for"


def test_exec_host_processes_are_not_visible():
    host = sum(name.isdigit() for name in os.listdir("/proc"))
    ran = sh("ls /proc | grep -c '^[0-9]'; cat /proc/1/cmdline | tr '\\0' ' '")
    count = int(ran.stdout.split()[0])
    assert count <= 4 < host, (count, host)  # PID 1, sh, ls, grep at most
    assert "launcher" in ran.stdout  # PID 1 is ours, not the host's init


def test_exec_runs_as_the_sandbox_user_without_privileges():
    ran = sh("id; hostname; grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status")
    assert "uid=1000(sandbox) gid=1000(sandbox) groups=1000(sandbox)" in ran.stdout
    assert "\nsandbox\n" in ran.stdout
    status = dict(line.split(":\t") for line in ran.stdout.splitlines() if ":\t" in line)
    assert status == {"CapEff": "0000000000000000", "CapBnd": "0000000000000000",
                      "NoNewPrivs": "1", "Seccomp": "2"}


# -- ordinary programs run as they do outside ------------------------------------------------

HELLO_C = r'#include <stdio.h>\nint main(void) { puts("hello, sandbox"); return 0; }\n'


@pytest.mark.parametrize("argv, expected", [
    (["/bin/sh", "-c", "cd /tmp && git init -q repo && cd repo && echo hi > f && git add f && "
      "git -c user.name=Sandbox -c user.email=sandbox@example.invalid commit -q -m first && "
      "git log --format='%s by %an' && git status --short | wc -l"],
     "first by Sandbox\n0\n"),
    (["/bin/sh", "-c", f"cd /tmp && printf '{HELLO_C}' > hello.c && gcc -O1 -o hello hello.c"
      " && ./hello"],
     "hello, sandbox\n"),
    (["python3", "-c", "import multiprocessing as m; print(m.Pool(2).map(abs, [-1,-2]))"],
     "[1, 2]\n"),
    (["node", "-e", "console.log(1+1)"], "2\n"),
    (["sqlite3", ":memory:", "select 1"], "1\n"),
], ids=["git-init-commit", "gcc-compile-and-run", "python-multiprocessing-pool", "node",
        "sqlite3"])
def test_exec_ordinary_programs_run_under_the_default_profile(argv, expected):
    program = argv[0] if argv[0].startswith("/") else shutil.which(argv[0], path="/usr/bin")
    assert program, f"{argv[0]} is not installed (scripts/bootstrap.sh installs it)"
    ran = sbx_exec(*argv)
    assert (ran.returncode, ran.stdout) == (0, expected), ran.stderr


def test_exec_pythons_own_test_suite_passes():
    # Debian ships the test package in libpython3.11-testsuite (bootstrap must install it).
    ran = sbx_exec("python3", "-m", "test", "test_json", "test_fstring", "test_list", "-j0",
                   timeout=120)
    assert ran.returncode == 0, (
        f"{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}\n(missing test modules? apt-get install "
        "libpython3.11-testsuite)")
    assert "Tests result: SUCCESS" in ran.stdout
    assert "All 3 tests OK." in ran.stdout


# -- setup failures: named, before or without leaving anything -------------------------------

class RecordingBackend:
    """The host's real cgroup backend, remembering what it was asked to create."""

    version = 1

    def __init__(self) -> None:
        self.real = cgroups.detect()
        self.created: list[str] = []

    def create(self, name, limits):  # type: ignore[no-untyped-def]
        self.created.append(name)
        return self.real.create(name, limits)


@pytest.fixture
def spawned(monkeypatch):
    """Every launcher process started (the real spawn, recorded)."""
    calls: list[list[str]] = []
    real = child_process.spawn

    def spawn(argv, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(argv)
        return real(argv, *args, **kwargs)

    monkeypatch.setattr(child_process, "spawn", spawn)
    return calls


async def test_missing_allowed_path_fails_before_any_process(no_leaks, spawned):
    backend = RecordingBackend()
    sandbox = SandboxConfig(allowed_paths=(PathGrant("/nonexistent-allowed"),))
    with pytest.raises(PluginLoadError) as info:
        await program.run(["/bin/true"], sandbox, backend=backend, seccomp_bpf=None)
    assert not isinstance(info.value, SandboxUnavailable)  # the config is wrong, not the host
    assert "allowed path /nonexistent-allowed cannot be opened: it does not exist" in str(info.value)
    assert spawned == [] and backend.created == []


async def test_missing_allowed_path_of_a_plugin_fails_before_any_process(tmp_path, no_leaks,
                                                                           spawned):
    root = python_plugin(tmp_path / "p", "def f():\n    return 1\n")
    async with PluginManager() as mgr:
        with pytest.raises(PluginLoadError) as info:
            await mgr.load(root, sandbox=SandboxConfig(
                allowed_paths=(PathGrant("/nonexistent-allowed"),)))
        assert "/nonexistent-allowed" in str(info.value)
        assert await mgr.list() == []
    assert spawned == []


def _spec(argv: list[str], *, extra: tuple[Mount, ...] = (), cwd: str = "/tmp") -> LaunchSpec:
    return LaunchSpec(argv=argv, env={"PATH": "/usr/bin:/bin"}, sandbox=SandboxConfig(),
                      mounts=tuple(base_mounts()) + extra, cwd=cwd,
                      seccomp_bpf=compile_filter("default", network=False))


async def _launch(spec: LaunchSpec) -> None:
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    try:
        proc, _ = await launch(spec, rpc_fd=null, logger=logging.getLogger("test"))
    finally:
        os.close(null)
    await proc.close()
    raise AssertionError(f"{spec.argv} started although its setup should have failed")


async def test_a_missing_bind_source_fails_before_any_process(no_leaks, spawned):
    with pytest.raises(PluginLoadError, match="/nonexistent-src cannot be opened to mount it "
                                              "in the sandbox: No such file") as info:
        await _launch(_spec(["/bin/true"], extra=(Mount("/nonexistent-src", "/x"),)))
    assert not isinstance(info.value, SandboxUnavailable)
    assert spawned == [] and not sources._ids.held()


@pytest.mark.parametrize("spec, step, path, missing", [
    pytest.param(_spec(["/no/such/program"]), "exec the plugin", "/no/such/program", "exec",
                 id="program-missing"),
    pytest.param(_spec(["/bin/true"], cwd="/nonexistent-cwd"), "exec the plugin",
                 "/nonexistent-cwd", "exec", id="cwd-missing"),
])
async def test_setup_failure_names_the_step_and_path(no_leaks, spec, step, path, missing):
    used_before = sources._ids.held()
    with pytest.raises(SandboxSetupError) as info:
        await _launch(spec)
    message = str(info.value)
    assert f"sandbox setup failed at step {step} ({path})" in message, message
    assert "No such file or directory" in message
    assert info.value.missing == missing
    assert sources._ids.held() == used_before  # the host uid was given back


async def test_setup_failure_in_a_cgroup_leaves_no_cgroup_or_process(no_leaks):
    backend = RecordingBackend()
    spec = _spec(["/bin/true"], cwd="/nonexistent-cwd")
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    try:
        with pytest.raises(SandboxSetupError) as info:
            await launch_confined(spec, backend=backend, rpc_fd=null,
                                  logger=logging.getLogger("test"))
    finally:
        os.close(null)
    assert "exec the plugin (/nonexistent-cwd)" in str(info.value)
    assert len(backend.created) == 1
    assert _cgroups_named(backend.created[0]) == []
    assert not sources._ids.held()


# -- program.run: stdin, the deadline, programs not found inside (issue 17.5) ----------------

async def _run(argv: list[str], sandbox: SandboxConfig | None = None,
               **options: object) -> tuple[program.RunResult, str, str]:
    out: list[bytes] = []
    err: list[bytes] = []
    result = await program.run(argv, sandbox or SandboxConfig(), backend=cgroups.detect(),
                               seccomp_bpf=compile_filter("default", network=False),
                               sinks=(out.append, err.append), **options)  # type: ignore[arg-type]
    return result, b"".join(out).decode(), b"".join(err).decode()


async def test_run_reads_the_stdin_it_is_given_and_dev_null_otherwise(no_leaks):
    read, write = os.pipe()
    os.write(write, b"from the pipe\n")
    os.close(write)
    try:
        result, out, _ = await _run(["cat"], stdin=read)
    finally:
        os.close(read)
    assert (result.returncode, out) == (0, "from the pipe\n")
    # A library's own stdin is not the program's: without ``stdin`` it reads /dev/null.
    result, out, _ = await _run(["/bin/sh", "-c", "cat; echo end"])
    assert (result.returncode, out) == (0, "end\n")


@pytest.mark.parametrize("path, flags, kind", [
    ("/etc", os.O_RDONLY | os.O_DIRECTORY, "a directory"),
    ("/etc", os.O_PATH | os.O_DIRECTORY, "a directory"),
    ("/etc/hostname", os.O_PATH, "an O_PATH fd"),
], ids=["directory", "o-path-directory", "o-path-file"])
async def test_run_refuses_a_stdin_that_is_a_handle_on_the_host_tree(no_leaks, spawned, path,
                                                                      flags, kind):
    """openat(0, "..") from a directory fd walks the host's tree whatever the sandbox's root:
    such a stdin is refused before any process or cgroup exists."""
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        with pytest.raises(PluginLoadError, match=f"standard input is {kind}: passing it "):
            await _run(["cat"], stdin=fd)
    finally:
        os.close(fd)
    assert spawned == []


async def test_run_stops_a_program_at_its_deadline(no_leaks):
    start = time.monotonic()
    result, _, err = await _run(["/bin/sleep", "30"], timeout=0.5, kill_grace=1.0)
    assert result.timed_out and result.returncode == -signal.SIGTERM
    assert time.monotonic() - start < 0.5 + 1 + 3
    assert "Traceback" not in err
    result, _, _ = await _run(["/bin/true"], timeout=30)
    assert (result.timed_out, result.returncode) == (False, 0)


async def test_run_a_program_only_the_launch_finds_missing_is_not_found_inside(no_leaks):
    """/dev is the sandbox's own: only the launcher's exec step can tell; its ENOENT is the
    program's fault (PluginLoadError, exit 2), not the host's (SandboxUnavailable, exit 4)."""
    with pytest.raises(PluginLoadError) as info:
        await _run(["/dev/no-such-program"])
    assert not isinstance(info.value, SandboxUnavailable)
    assert str(info.value) == ("not found inside the sandbox: /dev/no-such-program (grant its "
                               "directory with --allow-path)")


def test_find_program_where_it_can_be_known_before_the_launch(host_dir, world_dir):
    (host_dir / "tool").write_text("#!/bin/sh\n")
    (host_dir / "tool").chmod(0o755)
    (host_dir / "out").symlink_to("/etc/shadow")
    (world_dir / "tool").write_text("#!/bin/sh\n")
    mounts = base_mounts()
    granted = mounts + grant_mounts((PathGrant(str(host_dir)),))
    find = program.find_program
    assert find("sh", mounts) == "/usr/bin/sh"
    assert find("/bin/sh", mounts) == "/bin/sh"  # the merged-usr link exists inside too
    assert find(str(host_dir / "tool"), granted) == str(host_dir / "tool")
    refused = [
        ("/etc/shadow", mounts, ()),  # on the host, but no mount shows it
        (str(host_dir / "tool"), mounts, ()),  # not granted
        (str(world_dir / "tool"), mounts, ()),  # the sandbox's /tmp is its own
        ("/usr/../etc/shadow", mounts, ()),
        ("/usr/bin/sh", mounts, ("/usr/bin/sh",)),  # denied
        ("sh", mounts, ("/usr/bin", "/usr/local/bin")),
    ]
    for name, where, denied in refused:
        with pytest.raises(PluginLoadError, match="^not found inside the sandbox: "):
            find(name, where, denied)
    with pytest.raises(PluginLoadError, match=f"^not found inside the sandbox: {host_dir}/out "
                                              r"\(a link to /etc/shadow; grant"):
        find(str(host_dir / "out"), granted)


async def test_an_unload_that_reaches_terminate_leaves_no_traceback_in_the_plugins_log(
        tmp_path, no_leaks, caplog):
    """17.7: a plugin still running after shutdown is terminated: the SIGTERM goes launcher ->
    PID 1 -> plugin, and no forwarder leaves a traceback (ProcessLookupError) in its log."""
    caplog.set_level(logging.INFO, logger="sandboxer.plugin.stubborn")
    code = ("import os, signal, sys, time\n"
            "def _terminated(*_):\n"
            "    print('got SIGTERM', file=sys.stderr, flush=True)\n"
            "    os._exit(0)\n"
            "signal.signal(signal.SIGTERM, _terminated)\n"
            "def ping():\n"
            "    return 'pong'\n"
            "def shutdown():\n"
            "    time.sleep(60)\n")
    root = python_plugin(tmp_path / "p", code, plugin_id="stubborn")
    async with PluginManager(config=HostConfig(drain_timeout=0.5)) as mgr:
        plugin = await mgr.load(root)
        assert await plugin.call("ping") == "pong"
        await mgr.unload(plugin.id)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("sandboxer.plugin.")]
    assert "[stderr] got SIGTERM" in lines, lines
    assert not [line for line in lines if "Traceback" in line or "Error" in line], lines


# -- rootless ---------------------------------------------------------------------------------
# The supervisor runs as nobody (setpriv, no capabilities, no supplementary groups). Proven
# here: launch() works through a user namespace mapping uid 1000 to the caller's own uid, with
# the pid, uts and mount namespaces up and no capabilities; a manager load fails closed with
# SandboxUnavailable(missing="cgroup") when the user cannot create cgroups; with v1 cgroups
# delegated by chown the load succeeds and the memory limit is enforced. Not proven: v2
# delegation through systemd (Delegate=yes) -- this host has no v2 controllers and no
# systemd user manager -- and hosts that forbid unprivileged user namespaces.

ROOTLESS_LAUNCH = """\
import asyncio, json, logging, os
from sandboxer.sandbox.spec import LaunchSpec, base_mounts
from sandboxer.sandbox.start import launch
from sandboxer.sandbox.policy import SandboxConfig
from sandboxer.sandbox.seccomp import compile_filter

BPF = compile_filter("default", network=False)

async def main():
    spec = LaunchSpec(
        argv=["/bin/sh", "-c", "id -u; id -g; cat /proc/self/uid_map /proc/self/gid_map; "
              "hostname; grep CapEff /proc/self/status; ls /proc | grep -c '^[0-9]'"],
        env={"PATH": "/usr/bin:/bin"}, sandbox=SandboxConfig(),
        mounts=tuple(base_mounts()), seccomp_bpf=BPF)
    out = []
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    proc, host_uid = await launch(spec, rpc_fd=null, logger=logging.getLogger("t"),
                                         sinks=(out.append, out.append))
    os.close(null)
    code = await proc.wait(20)
    await proc.output_closed(2)
    await proc.close()
    true_proc, _ = await launch(
        LaunchSpec(argv=["/bin/true"], env={}, sandbox=SandboxConfig(),
                   mounts=tuple(base_mounts()), seccomp_bpf=BPF),
        rpc_fd=os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC), logger=logging.getLogger("t"))
    true_code = await true_proc.wait(20)
    await true_proc.close()
    print(json.dumps({"euid": os.geteuid(), "host_uid": host_uid, "code": code,
                      "true_code": true_code, "out": b"".join(out).decode()}))

asyncio.run(main())
"""

ROOTLESS_LOAD = """\
import asyncio, json, os, sys
from sandboxer import MemoryLimitExceeded, PluginManager, SandboxUnavailable, load_plugin

async def main(root):
    result = {"euid": os.geteuid(), "cgroup": open("/proc/self/cgroup").read()}
    async with PluginManager() as mgr:
        try:
            p = await mgr.load(root, sandbox=mgr.resolve_sandbox(load_plugin(root)).replace(
                memory_limit=64 << 20))
        except SandboxUnavailable as exc:
            result.update(error=type(exc).__name__, missing=exc.missing, message=str(exc))
        else:
            result["answer"] = await p.call("f")
            try:
                await p.call("hog", 200)
            except MemoryLimitExceeded as exc:
                result["oom"] = {"limit": exc.limit, "peak": exc.peak}
    print(json.dumps(result))

asyncio.run(main(sys.argv[1]))
"""

ROOTLESS_PLUGIN = ("def f():\n    return 1\n\n"
                   "def hog(mib):\n    return len(b'x' * (mib << 20))\n")


def _as_nobody(script: Path, *args: str, hold: bool = False) -> subprocess.Popen[bytes]:
    """Run the venv's python on ``script`` as nobody (setpriv execs: the pid is python's).
    With ``hold`` it waits for a byte on stdin first, so the caller can place it."""
    code = ("import sys; sys.stdin.buffer.read(1); " if hold else "") + \
        f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')"
    return subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--",
         sys.executable, "-I", "-c", code, *args],
        cwd="/tmp", env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        stdin=subprocess.PIPE if hold else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> dict:  # type: ignore[type-arg]
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, f"rootless supervisor failed ({proc.returncode}): {err.decode()}"
    return json.loads(out.decode().splitlines()[-1])


def _write_world_readable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o644)
    return path


@pytest.fixture(scope="module")
def nobody_can_run_sandboxer():
    """The venv and the repo must be readable by nobody for the rootless tests to mean
    anything; say so plainly rather than fail obscurely."""
    ran = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                          "--clear-groups", "--", sys.executable, "-I", "-c",
                          "import sandboxer.sandbox.program, prctl; print('ok')"],
                         cwd="/tmp", capture_output=True, text=True, timeout=60)
    assert ran.stdout == "ok\n", ("nobody cannot import sandboxer from the venv "
                                  f"({sys.prefix}, {REPO}): make them world-readable: "
                                  f"{ran.stderr}")


def test_rootless_launch_works_through_a_user_namespace(world_dir, nobody_can_run_sandboxer):
    """launch() alone (no cgroup) as an unprivileged user: the user namespace maps the
    sandbox uid 1000 to the caller's own uid, and every other namespace still comes up."""
    script = _write_world_readable(world_dir / "launch.py", ROOTLESS_LAUNCH)
    result = _finish(_as_nobody(script))
    assert result["euid"] == NOBODY and result["host_uid"] == NOBODY
    assert result["code"] == 0 and result["true_code"] == 0
    lines = [" ".join(line.split()) for line in result["out"].splitlines()]
    assert lines[:4] == ["1000", "1000", f"1000 {NOBODY} 1", f"1000 {NOBODY} 1"]
    assert lines[4] == "sandbox"  # its own uts namespace
    assert lines[5] == "CapEff: 0000000000000000"
    assert int(lines[6]) <= 4  # its own pid namespace


def test_rootless_load_fails_closed_without_cgroup_delegation(world_dir,
                                                              nobody_can_run_sandboxer):
    python_plugin(world_dir / "plugin", ROOTLESS_PLUGIN)
    for path in (world_dir / "plugin").iterdir():
        path.chmod(0o644)
    script = _write_world_readable(world_dir / "load.py", ROOTLESS_LOAD)
    proc = _as_nobody(script, str(world_dir / "plugin"))
    result = _finish(proc)
    assert result["euid"] == NOBODY
    assert result.get("error") == "SandboxUnavailable", result
    assert result["missing"].startswith("cgroup")
    assert "Permission denied" in result["message"] and "Delegate=yes" in result["message"]
    assert _cgroups_named(f"sandboxer-{proc.pid}-") == []


def test_rootless_load_with_delegated_v1_cgroups_is_fully_confined(world_dir,
                                                                   nobody_can_run_sandboxer):
    """With each v1 hierarchy's cgroup delegated (chowned) to the user, as an administrator
    would, the rootless supervisor creates and limits the plugin's cgroups itself: a full
    manager load works and the memory limit is enforced."""
    python_plugin(world_dir / "plugin", ROOTLESS_PLUGIN)
    for path in (world_dir / "plugin").iterdir():
        path.chmod(0o644)
    script = _write_world_readable(world_dir / "load.py", ROOTLESS_LOAD)
    # One directory per hierarchy (co-mounted controllers share one), under our own cgroup.
    delegated = list(dict.fromkeys(
        os.path.join(os.path.realpath(base), f"sandboxer-{os.getpid()}-delegated")
        for base in cgroups.CgroupV1().bases.values()))
    leftovers: list[str] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        for directory in delegated:
            os.mkdir(directory)
            for name in ("", "cgroup.procs", "tasks"):
                os.chown(os.path.join(directory, name) if name else directory, NOBODY, NOBODY)
        proc = _as_nobody(script, str(world_dir / "plugin"), hold=True)
        for directory in delegated:
            Path(directory, "cgroup.procs").write_text(str(proc.pid))
        assert proc.stdin is not None
        proc.stdin.write(b"g")
        proc.stdin.close()
        proc.stdin = None  # communicate() must not flush it again
        result = _finish(proc)
        leftovers = [str(p) for d in delegated for p in Path(d).iterdir() if p.is_dir()]
    finally:
        if proc is not None and proc.poll() is None:  # failed before it could finish
            proc.kill()
            proc.communicate()
        for directory in delegated:
            for child in Path(directory).glob("*/"):
                for pid in Path(child, "cgroup.procs").read_text().split():
                    os.kill(int(pid), signal.SIGKILL)
                _rmdir_retrying(str(child))
            _rmdir_retrying(directory)
    assert result["euid"] == NOBODY and "error" not in result, result
    assert "sandboxer-" in result["cgroup"]  # it ran inside the delegated cgroups
    assert result["answer"] == 1
    assert result["oom"]["limit"] == 64 << 20 and result["oom"]["peak"] >= 60 << 20
    assert leftovers == [], "the rootless supervisor left its plugin cgroups behind"


def _rmdir_retrying(path: str) -> None:
    for _ in range(200):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
    os.rmdir(path)


# -- sandboxer doctor --------------------------------------------------------------------------

def test_doctor_reports_what_this_host_enforces():
    ran = sandboxer("doctor", "--json")
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert report["ok"] is True
    assert report["mode"] == "rootful"
    assert report["namespaces"] == {name: "yes" for name in
                                    ("user", "mount", "pid", "net", "ipc", "uts", "cgroup")}
    assert report["seccomp"] == "yes"
    assert report["cgroups"]["ok"] is True and report["cgroups"]["version"] == 1
    assert report["cgroups"]["controllers"] == list(CONTROLLERS)
    assert {c: os.path.normpath(p) for c, p in report["cgroups"]["parents"].items()} == {
        c: os.path.normpath(p) for c, p in cgroups.CgroupV1().bases.items()}
    assert "plugin" not in report
    assert report["grpc"]["ok"] is True and report["grpc"]["protoc"] == "/usr/bin/protoc"
    assert report["grpc"]["tcp_plugins"] == "reached inside their own network namespace"
    network = report["network"]
    assert network["ok"] is True
    assert "127.0.0.1:3128" in network["allowed_hosts"]
    assert network["full_network"] == "refused by the host policy (allow_full_network = false)"


def test_doctor_says_when_the_host_policy_allows_the_full_network(tmp_path):
    config = tmp_path / "host.toml"
    config.write_text('[host]\nallow_full_network = true\negress_max_connections = 5\n')
    ran = sandboxer("doctor", "--json", env={**os.environ, "SANDBOXER_CONFIG": str(config)})
    assert ran.returncode == 0, ran.stderr
    network = json.loads(ran.stdout)["network"]
    assert network["full_network"] == "allowed by the host policy (allow_full_network = true)"
    assert network["max_connections_per_plugin"] == 5


def test_doctor_with_a_plugin_shows_its_effective_sandbox(tmp_path):
    root = python_plugin(tmp_path / "p", "def f():\n    return 1\n", plugin_id="doc.probe",
                         extra='\n[sandbox]\nmemory_limit = "100MiB"\ncpu_limit = 0.5\n'
                               'timeout = "5s"\n')
    ran = sandboxer("doctor", "--json", str(root))
    assert ran.returncode == 0, ran.stderr
    plugin = json.loads(ran.stdout)["plugin"]
    assert plugin["id"] == "doc.probe" and plugin["kind"] == "python"
    sandbox = plugin["sandbox"]
    assert sandbox["enabled"] is True and sandbox["profile"] == "default"
    assert (sandbox["memoryLimit"], sandbox["cpuLimit"], sandbox["timeout"]) == (
        "100MiB", 0.5, "5s")
    assert sandbox["networkAllowed"] is False and sandbox["allowedPaths"] == []


def test_doctor_human_output_names_each_check():
    ran = sandboxer("doctor")
    assert ran.returncode == 0, ran.stderr
    for word in ("namespaces:", "seccomp", "cgroups:", "version", "network:", "full_network"):
        assert word in ran.stdout


# -- no leaks over many cycles ---------------------------------------------------------------

@pytest.mark.timeout(300)
@pytest.mark.parametrize("warm,cycles", [(False, 200), (True, 100)], ids=["cold", "warm"])
async def test_load_unload_cycles_leave_nothing_behind(tmp_path, no_leaks, warm, cycles):
    """Cold: nothing of the plugin outlives each unload. Warm: each load takes a sandbox made
    ahead; once the pool has refilled, only the sandboxes waiting in it hold anything (a
    host uid each), and the pool's fds stay the same from cycle to cycle."""
    root = python_plugin(tmp_path / "p", "def f():\n    return 1\n")
    fds_after_first: int | None = None
    start = time.monotonic()
    async with PluginManager(HostConfig(warm_sandboxes=2 if warm else 0)) as mgr:
        for cycle in range(cycles):
            if warm:
                await mgr.warm_up()
            waiting = len(mgr.warm_pool.pids()) if mgr.warm_pool is not None else 0
            p = await mgr.load(root)
            assert p.started_warm == warm
            # one host uid while it runs, and one for each sandbox still waiting
            assert len(sources._ids.held()) == (waiting if warm else 1)
            assert await p.call("f") == 1
            await mgr.unload(p.id)
            if warm:
                await mgr.warm_up()
                waiting = len(mgr.warm_pool.pids())  # type: ignore[union-attr]
            assert len(sources._ids.held()) == waiting, f"cycle {cycle}: uid not released"
            if cycle == 0:
                fds_after_first = len(os.listdir("/proc/self/fd"))
        assert len(os.listdir("/proc/self/fd")) == fds_after_first
    elapsed = time.monotonic() - start
    assert not sources._ids.held()
    assert _cgroups_named(f"sandboxer-{os.getpid()}-") == []
    print(f"\n{cycles} load/unload cycles: {elapsed:.1f}s ({elapsed / cycles * 1000:.0f} ms/cycle)")


ROOTLESS_FALLBACK_LOAD = """\
import asyncio, json, os, sys
from sandboxer import HostConfig, PluginCallError, PluginManager, load_plugin

async def main(root):
    result = {"euid": os.geteuid()}
    async with PluginManager(HostConfig(fallbacks=("rlimit",))) as mgr:
        p = await mgr.load(root, sandbox=mgr.resolve_sandbox(load_plugin(root)).replace(
            memory_limit=256 << 20))
        result["answer"] = await p.call("f")
        result["fallbacks"] = p.to_json()["fallbacks"]
        result["small"] = await p.call("hog", 16)
        try:
            await p.call("hog", 400)
        except PluginCallError as exc:
            result["hog"] = exc.data["type"]
    print(json.dumps(result))

asyncio.run(main(sys.argv[1]))
"""


def test_rootless_load_with_the_rlimit_fallback_reports_it(world_dir, nobody_can_run_sandboxer):
    """A host policy that names the "rlimit" fallback lets a rootless supervisor without
    cgroup delegation load plugins: memory is then bounded by RLIMIT_AS, and the plugin says
    which fallback it runs under."""
    python_plugin(world_dir / "plugin", ROOTLESS_PLUGIN)
    for path in (world_dir / "plugin").iterdir():
        path.chmod(0o644)
    script = _write_world_readable(world_dir / "load.py", ROOTLESS_FALLBACK_LOAD)
    proc = _as_nobody(script, str(world_dir / "plugin"))
    result = _finish(proc)
    assert result["euid"] == NOBODY and result["answer"] == 1
    assert result["fallbacks"] == ["rlimit"]
    assert result["small"] == 16 << 20
    assert result["hog"] == "MemoryError"  # RLIMIT_AS, not a cgroup OOM kill
    assert _cgroups_named(f"sandboxer-{proc.pid}-") == []
