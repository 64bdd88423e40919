"""Escape probes on who the plugin is and what it can see of the host: capabilities,
no_new_privs and seccomp, the uid map, the environment and fds it inherited, the processes,
namespaces and mounts it sees, and what a new session gives it.
"""

from __future__ import annotations

import ast
import ctypes
import os
import re
import sys
from pathlib import Path

import pytest

from conftest import REPO
from sandboxer import PluginManager
from sandboxer.sandbox.runtime import SITE, runtime

from .conftest import STARTS, Canaries, Fleet, start_fleet

pytestmark = [pytest.mark.usefixtures("no_leaks"), pytest.mark.asyncio(loop_scope="module")]

NO_CAPABILITIES = "0000000000000000"
ENVIRONMENT = {"PATH", "HOME", "LANG", "SANDBOXER_RPC_FD", "SANDBOXER_MAGIC_COOKIE",
               "SANDBOXER_MAX_FRAME", *runtime().env}
NAMESPACES = ("user", "mnt", "pid", "net", "ipc", "uts", "cgroup")


@pytest.mark.parametrize(("field", "expected"), [
    ("CapEff", NO_CAPABILITIES), ("CapPrm", NO_CAPABILITIES), ("CapBnd", NO_CAPABILITIES),
    ("CapInh", NO_CAPABILITIES), ("CapAmb", NO_CAPABILITIES),
    ("NoNewPrivs", "1"), ("Seccomp", "2"),
])
async def test_status_shows_no_privilege(fleet: Fleet, field: str, expected: str) -> None:
    status = await fleet.probe("status")
    assert status[field] == expected, f"{field}: {status[field]}"


def _map(text: str) -> tuple[int, int, int]:
    inside, outside, count = (int(v) for v in text.split())
    return inside, outside, count


async def test_the_uid_does_not_map_to_host_root(fleet: Fleet) -> None:
    uid_map = (await fleet.probe("read", "/proc/self/uid_map"))["ok"]
    gid_map = (await fleet.probe("read", "/proc/self/gid_map"))["ok"]
    assert len(uid_map.splitlines()) == len(gid_map.splitlines()) == 1
    inside, host_uid, count = _map(uid_map)
    assert (inside, count) == (1000, 1) and host_uid != 0
    inside, host_gid, count = _map(gid_map)
    assert (inside, count) == (1000, 1) and host_gid != 0
    if os.geteuid() == 0:  # rootful: an unprivileged id from the sandbox range
        assert host_uid >= 1_800_000 and host_gid >= 1_800_000
    assert await fleet.probe("read", "/proc/self/setgroups") == {"ok": "deny\n"}
    assert await fleet.probe("ids") == {"uid": 1000, "euid": 1000, "gid": 1000, "groups": []}
    # The host agrees (the launcher lives in the plugin's user namespace), and the neighbour
    # is a stranger: another host uid.
    hostile_pid, neighbour_pid = fleet.hostile.handle.pid, fleet.neighbour.handle.pid  # type: ignore[union-attr]
    assert _map(Path(f"/proc/{hostile_pid}/uid_map").read_text())[1] == host_uid
    neighbour_uid = _map(Path(f"/proc/{neighbour_pid}/uid_map").read_text())[1]
    assert neighbour_uid not in (0, host_uid)


async def test_no_namespace_is_shared_with_the_host(fleet: Fleet) -> None:
    for kind in NAMESPACES:
        inside = await fleet.probe("readlink", f"/proc/self/ns/{kind}")
        assert inside["ok"] != os.readlink(f"/proc/self/ns/{kind}"), kind


@pytest.mark.parametrize("start", STARTS)
async def test_the_environment_is_clean(canaries: Canaries, hostile_dir: Path,
                                        monkeypatch: pytest.MonkeyPatch, start: str) -> None:
    """Nothing of the supervisor's environment, however it is spelled, reaches the plugin."""
    sentinel = os.urandom(8).hex()
    for name in ("SANDBOXER_ESCAPE_SENTINEL", "AWS_SECRET_ACCESS_KEY", "LD_PRELOAD",
                 "PYTHONPATH", "SANDBOXER_CONFIG"):
        monkeypatch.setenv(name, f"/nonexistent/{sentinel}")
    manager, fleet = await start_fleet(canaries, hostile_dir, start=start)
    try:
        env = await fleet.probe("environment")
    finally:
        await manager.aclose()
    assert set(env) == ENVIRONMENT, sorted(env)
    # the system directories, and the plugin host's interpreter (mounted read-only inside)
    assert set(env["PATH"].split(":")) <= {runtime().bin_dir, "/usr/local/bin",
                                           "/usr/bin", "/bin"}, env["PATH"]
    assert env["PYTHONPATH"] == SITE  # the SDK, for a plugin's own python3
    assert env["HOME"] == "/tmp" and env["LANG"] == "C.UTF-8"
    assert env["SANDBOXER_RPC_FD"] == "3" and env["SANDBOXER_MAX_FRAME"].isdigit()
    assert re.fullmatch(r"[0-9a-f]{32}", env["SANDBOXER_MAGIC_COOKIE"])
    assert not any(sentinel in value for value in env.values())


async def test_no_fd_of_the_supervisor_is_inherited(fleet: Fleet) -> None:
    fds = await fleet.probe("fds")
    assert fds["0"] == "/dev/null"
    assert fds["1"].startswith("pipe:") and fds["2"].startswith("pipe:")
    assert fds["3"].startswith("socket:")
    for fd, target in fds.items():
        if fd in ("0", "1", "2", "3"):
            continue
        # what the plugin host may open itself: event loops, sockets; never a host path or
        # a pipe (the supervisor's pipes are the only ones a leak could bring)
        assert target.startswith(("anon_inode:", "socket:")), (fd, target)


async def test_no_host_process_is_visible(fleet: Fleet) -> None:
    seen = await fleet.probe("processes")
    pids = {p["pid"] for p in seen["processes"]}
    assert seen["self"] == 2 and 1 in pids
    assert len(pids) < 10 and max(pids) < 1000, seen
    own = " ".join(sys.argv)
    for process in seen["processes"]:
        assert "pytest" not in process["cmdline"] and own not in process["cmdline"], process
        # PID 1 is the launcher (no host path in its command line), then the plugin host
        assert process["cmdline"].startswith(("sandboxer-launcher -I -S -c ",
                                              runtime().python + " -I ")), process
        assert str(REPO) not in process["cmdline"], process
    # nothing of the host: neither this process nor the neighbour's launcher
    assert os.getpid() not in pids and fleet.neighbour.handle.pid not in pids  # type: ignore[union-attr]


def _mounts(text: str) -> list[tuple[str, str, str]]:
    """(root, mount point, filesystem type) of each line of a mountinfo."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        fstype = fields[fields.index("-") + 1]
        out.append((fields[3], fields[4], fstype))
    return out


async def test_mountinfo_shows_only_the_sandboxs_mounts(fleet: Fleet) -> None:
    mounts = _mounts((await fleet.probe("read", "/proc/self/mountinfo"))["ok"])
    assert 10 < len(mounts) < 60
    points = [point for _, point, _ in mounts]
    exact = {"/", "/usr", "/plugin", "/tmp", "/proc", "/dev",
             *(m.target for m in runtime().mounts)}
    for point in points:
        assert point in exact or point.startswith(("/etc/", "/proc/", "/dev/",
                                                   "/sys/devices/system/")), point
    assert not any(p.startswith(("/home", "/root", "/var", "/mnt", "/work", "/opt"))
                   or p.startswith("/sys") and not p.startswith("/sys/devices/system/")
                   for p in points)
    assert ("/", "/", "tmpfs") in mounts and ("/", "/tmp", "tmpfs") in mounts
    assert ("/", "/proc", "proc") in mounts
    # no cgroup filesystem; sysfs only as the read-only CPU pieces; devpts only its own
    assert not any(fstype in ("cgroup", "cgroup2") for *_, fstype in mounts)
    assert all(point.startswith("/sys/devices/system/") for _, point, fstype in mounts
               if fstype == "sysfs")
    assert [(root, point) for root, point, fstype in mounts if fstype == "devpts"] == [
        ("/", "/dev/pts")]


async def test_mountinfo_names_no_host_path(fleet: Fleet, hostile_dir: Path) -> None:
    text = (await fleet.probe("read", "/proc/self/mountinfo"))["ok"]
    copies = {str(m.source) for m in runtime().mounts if m.target == SITE}
    for root, point, _ in _mounts(text):
        # a bind's root is where its source lives on the host: it must be what the plugin
        # sees at that mount point, something it can see anyway (a file under /usr), or the
        # private runtime copy (sandbox/runtime.py), never the checkout or the venv
        assert root in ("/", point) or root.startswith(("/usr/", "/null", "/zero", "/full",
                                                        "/random", "/urandom", "/tty")) \
            or point.startswith("/proc/") or root in copies \
            or (point.startswith("/sys/devices/system/") and root == point[len("/sys"):]), \
            f"{point} shows the host path {root}"
    for host_path in {str(hostile_dir.parent.parent), str(REPO), os.path.realpath(sys.prefix)}:
        if not host_path.startswith("/usr"):
            assert host_path not in text, host_path


async def test_host_ipc_objects_are_invisible(fleet: Fleet) -> None:
    """System V shared memory lives in the IPC namespace, POSIX shared memory in /dev/shm:
    the host's are not the plugin's."""
    libc = ctypes.CDLL(None, use_errno=True)
    key = int.from_bytes(os.urandom(3), "big") | 0x5A000000
    shmid = libc.shmget(key, 4096, 0o1666)  # IPC_CREAT | 0666: anyone may attach
    assert shmid >= 0, os.strerror(ctypes.get_errno())
    name = f"sandboxer-escape-{os.urandom(6).hex()}"
    shm = Path("/dev/shm") / name
    shm.write_text("host shared memory\n")
    os.chmod(shm, 0o666)
    try:
        sysv = await fleet.run("shmget", hex(key))
        posix = await fleet.probe("read", str(shm))
    finally:
        libc.shmctl(shmid, 0, None)  # IPC_RMID
        shm.unlink()
    # shmget is allowed (the plugin's own IPC namespace is its to use): ENOENT is the
    # namespace saying the key does not exist there
    assert sysv == {"rc": 0, "out": "errno=ENOENT", "err": ""}
    assert posix == {"errno": "ENOENT"}


async def test_a_new_session_gets_no_terminal(fleet: Fleet) -> None:
    outcome = await fleet.probe("new_session")
    assert outcome["rc"] == 0, outcome
    seen = ast.literal_eval(outcome["out"])
    assert seen["sid_is_pid"] is True  # setsid itself works: it grants nothing
    for device in ("/dev/tty", "/dev/console"):
        assert seen[device] in ("ENOENT", "ENXIO", "EACCES"), (device, seen[device])
    # a pseudo-terminal of its own may be made (its own devpts instance), never the host's
    for device in ("/dev/ptmx", "/dev/pts/ptmx"):
        assert seen[device] in ("opened", "ENOENT"), (device, seen[device])


async def test_the_hostname_is_the_sandboxs(fleet: Fleet) -> None:
    assert await fleet.probe("read", "/proc/sys/kernel/hostname") == {"ok": "sandbox\n"}
    assert await fleet.probe("read", "/etc/hostname") == {"ok": "sandbox\n"}
