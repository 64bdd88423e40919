"""Escape probes on the filesystem: host secrets, other plugins' files, writes outside the
allowed paths, to read-only grants and to denied paths inside grants, links pointing out,
executing data, set-uid and file-capability programs, /proc, /sys and /dev.

The hostile plugin here is loaded with an explicit sandbox granting a read-only directory
and a writable one, with a denied file and a denied directory inside the writable one. A
third plugin (``other``) is loaded from a directory of its own, holding a secret. After every
probe, besides the fleet's containment check, the host side of every granted and denied
file is compared with what the test wrote there.

Outcomes are judged as a user would see them: the errno the plugin got (EROFS for a
read-only mount, ENOENT for a host path that is simply not there, EXDEV for a link across
mounts ...) and the host's files unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import pytest_asyncio

from conftest import EXAMPLES, REPO
from sandboxer import HostConfig, PluginLoadError, PathGrant, PluginManager, load_plugin
from sandboxer.sandbox.runtime import SITE, runtime

from .conftest import STARTS, Canaries, Fleet, start_fleet

pytestmark = [pytest.mark.usefixtures("no_leaks"), pytest.mark.asyncio(loop_scope="module")]

RO_TEXT = "read-only grant: the plugin may read this and nothing more\n"
DENIED_TEXT = "denied inside a writable grant: the plugin must never see this\n"
DENIED_DIR_TEXT = "in a denied directory inside a writable grant\n"
BESIDE_TEXT = "beside the grants, outside every one of them\n"
OTHER_TEXT = "the other plugin's own secret\n"


@dataclass
class Grants:
    base: Path
    ro: Path
    rw: Path
    other: Path

    @property
    def paths(self) -> dict[str, str]:
        return {"ro": str(self.ro), "rw": str(self.rw), "other": str(self.other),
                "base": str(self.base)}

    def check(self) -> None:
        """The host side of the grants: nothing the plugin must not change has changed."""
        assert (self.ro / "data.txt").read_text() == RO_TEXT
        assert sorted(os.listdir(self.ro)) == ["data.txt"]
        assert (self.rw / "secret").read_text() == DENIED_TEXT
        assert (self.rw / "private" / "key").read_text() == DENIED_DIR_TEXT
        assert sorted(os.listdir(self.rw / "private")) == ["key"]
        assert (self.base / "beside.txt").read_text() == BESIDE_TEXT
        assert (self.other / "secret.txt").read_text() == OTHER_TEXT


def make_grants(base: Path, canaries: Canaries) -> Grants:
    os.chmod(base, 0o755)
    ro, rw, other = base / "ro", base / "rw", base / "other"
    ro.mkdir()
    os.chmod(ro, 0o777)
    (ro / "data.txt").write_text(RO_TEXT)
    # World-writable on the host: only the read-only mount can stop a write (EROFS), not
    # the file's permissions (EACCES).
    os.chmod(ro / "data.txt", 0o666)
    rw.mkdir()
    os.chmod(rw, 0o777)  # the plugin's host uid must be able to write here
    (rw / "secret").write_text(DENIED_TEXT)
    (rw / "private").mkdir()
    (rw / "private" / "key").write_text(DENIED_DIR_TEXT)
    (base / "beside.txt").write_text(BESIDE_TEXT)
    # Links the host made inside the writable grant, pointing out of it: inside, a link
    # resolves against the sandbox's root, where these targets do not exist.
    os.symlink(canaries.secret, rw / "to-host-secret")
    os.symlink("../beside.txt", rw / "to-beside")
    other.mkdir()
    (other / "plugin.toml").write_text('[plugin]\nid = "escape.other"\nversion = "1.0.0"\n'
                                       'type = "python"\nentrypoint = "plugin.py"\n')
    (other / "plugin.py").write_text("def ping():\n    return 'other'\n")
    (other / "secret.txt").write_text(OTHER_TEXT)
    return Grants(base, ro, rw, other)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=STARTS)
async def fs(request: pytest.FixtureRequest, canaries: Canaries, hostile_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Fleet, Grants]]:
    grants = make_grants(tmp_path_factory.mktemp("grants"), canaries)
    manager = PluginManager(config=HostConfig(warm_sandboxes=2 if request.param == "warm" else 0))
    other = await manager.load(grants.other)
    sandbox = manager.resolve_sandbox(load_plugin(hostile_dir)).replace(
        allowed_paths=(PathGrant(str(grants.ro)), PathGrant(str(grants.rw), writable=True)),
        denied_paths=(str(grants.rw / "secret"), str(grants.rw / "private")))
    manager, fleet = await start_fleet(canaries, hostile_dir, sandbox=sandbox, manager=manager,
                                       start=request.param)
    fleet.checks.append(grants.check)
    plugin_files = {p.name: p.read_bytes() for p in hostile_dir.iterdir()}
    fleet.checks.append(lambda: _unchanged(hostile_dir, plugin_files))
    try:
        assert await other.call("ping") == "other"
        yield fleet, grants
    finally:
        await manager.aclose()
    grants.check()


def _unchanged(root: Path, files: dict[str, bytes]) -> None:
    assert {p.name: p.read_bytes() for p in root.iterdir()} == files, \
        "the hostile plugin's own directory changed"


def errno_is(*names: str) -> Callable[[dict[str, Any]], bool]:
    def check(outcome: dict[str, Any]) -> bool:
        return outcome.get("errno") in names
    check.__name__ = f"errno in {names}"
    return check


def ok_is(predicate: Callable[[Any], bool]) -> Callable[[dict[str, Any]], bool]:
    def check(outcome: dict[str, Any]) -> bool:
        return "ok" in outcome and predicate(outcome["ok"])
    return check


def probe(id: str, method: str, *args: Any, expect: Callable[[dict[str, Any]], bool],
          escape: str | None = None):  # type: ignore[no-untyped-def]
    marks = [pytest.mark.xfail(strict=True, reason=f"ESCAPE: {escape}")] if escape else []
    return pytest.param(method, args, expect, id=id, marks=marks)


async def run(fs: tuple[Fleet, Grants], method: str, args: tuple[Any, ...],
              expect: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    fleet, grants = fs
    values = {**grants.paths, "secret": str(fleet.canaries.secret),
              "canary": str(fleet.canaries.canary), "repo": str(REPO),
              "examples": str(EXAMPLES), "package": f"{SITE}/sandboxer",
              "python": runtime().python}
    real = [a.format(**values) if isinstance(a, str) else a for a in args]
    outcome: dict[str, Any] = await fleet.probe(method, *real)
    assert expect(outcome), f"{method}{tuple(real)} -> {str(outcome)[:500]}"
    return outcome


HOST_SECRETS = [
    probe("read-etc-shadow", "read", "/etc/shadow", expect=errno_is("ENOENT")),
    probe("list-root-home", "listdir", "/root", expect=errno_is("ENOENT", "EACCES")),
    probe("read-a-host-secret-by-its-host-path", "read", "{secret}", expect=errno_is("ENOENT")),
    probe("read-beside-the-grants", "read", "{base}/beside.txt", expect=errno_is("ENOENT")),
    probe("read-out-of-a-grant-through-dotdot", "read", "{rw}/../beside.txt",
          expect=errno_is("ENOENT")),
    probe("read-the-repository", "read", "{repo}/pyproject.toml", expect=errno_is("ENOENT")),
    probe("list-the-repository-git-dir", "listdir", "{repo}/.git", expect=errno_is("ENOENT")),
    probe("read-etc-shadow-through-proc-1-root", "read", "/proc/1/root/etc/shadow",
          expect=errno_is("EACCES")),
    probe("read-sandbox-init-environ", "read", "/proc/1/environ", expect=errno_is("EACCES")),
    probe("read-sandbox-init-memory", "read", "/proc/1/mem", expect=errno_is("EACCES")),
    probe("list-sandbox-init-fds", "listdir", "/proc/1/fd", expect=errno_is("EACCES")),
]


@pytest.mark.parametrize(("method", "args", "expect"), HOST_SECRETS)
async def test_host_secrets_are_out_of_reach(fs, method, args, expect) -> None:  # type: ignore[no-untyped-def]
    await run(fs, method, args, expect)


OTHER_PLUGINS = [
    probe("read-the-other-plugins-secret", "read", "{other}/secret.txt",
          expect=errno_is("ENOENT")),
    probe("list-the-other-plugins-dir", "listdir", "{other}", expect=errno_is("ENOENT")),
    probe("read-the-neighbours-code", "read", "{examples}/hello/hello.py",
          expect=errno_is("ENOENT")),
    probe("list-the-examples", "listdir", "{examples}", expect=errno_is("ENOENT")),
    probe("list-own-plugin-dir-shows-only-own-files", "listdir", "/plugin",
          expect=ok_is(lambda names: set(names) - {"__pycache__"} == {
              "plugin.py", "plugin.toml", "probe", "probe.c", "probe-setuid",
              "probe-filecaps"})),
]


@pytest.mark.parametrize(("method", "args", "expect"), OTHER_PLUGINS)
async def test_other_plugins_files_are_invisible(fs, method, args, expect) -> None:  # type: ignore[no-untyped-def]
    await run(fs, method, args, expect)


WRITES_OUTSIDE = [
    probe("create-a-file-in-the-root", "write", "/escape-probe", expect=errno_is("EROFS")),
    probe("create-a-file-in-usr", "write", "/usr/escape-probe", expect=errno_is("EROFS")),
    probe("open-etc-passwd-for-writing", "open_for_writing", "/etc/passwd",
          expect=errno_is("EROFS")),
    probe("open-own-plugin-code-for-writing", "open_for_writing", "/plugin/plugin.py",
          expect=errno_is("EROFS")),
    probe("create-a-file-in-own-plugin-dir", "write", "/plugin/escape-probe",
          expect=errno_is("EROFS")),
    # The plugin host's code (sandbox/runtime.py's copy) and interpreter: host root's files,
    # so the plugin's host uid meets EACCES before the read-only mount's EROFS; either stops it.
    probe("open-the-supervisors-package-for-writing", "open_for_writing",
          "{package}/__init__.py", expect=errno_is("EROFS", "EACCES")),
    probe("open-the-venv-python-for-writing", "open_for_writing", "{python}",
          expect=errno_is("EROFS", "EACCES")),
    probe("write-the-host-canary-by-its-host-path", "write", "{canary}",
          expect=errno_is("ENOENT")),
    probe("create-sys", "mkdir", "/sys", expect=errno_is("EROFS", "EEXIST")),
    probe("write-sys-cpu-online", "write", "/sys/devices/system/cpu/online", "0-1",
          expect=errno_is("EROFS", "EACCES")),
    probe("create-in-sys-cpu", "write", "/sys/devices/system/cpu/made-up", "x",
          expect=errno_is("EROFS", "EACCES")),
    probe("write-sys-uevent-helper", "write", "/sys/kernel/uevent_helper", "/tmp/x",
          expect=errno_is("ENOENT")),
    probe("write-sys-fs-cgroup-procs", "write", "/sys/fs/cgroup/cgroup.procs", "1",
          expect=errno_is("ENOENT")),
    probe("write-proc-sys-kernel-core-pattern", "write", "/proc/sys/kernel/core_pattern",
          "|/tmp/x", expect=errno_is("EROFS")),
    probe("write-proc-sys-kernel-hostname", "write", "/proc/sys/kernel/hostname", "pwned",
          expect=errno_is("EROFS")),
    probe("write-proc-sys-vm-drop-caches", "write", "/proc/sys/vm/drop_caches", "3",
          expect=errno_is("EROFS")),
    # Masked (a read-only /dev/null) where the kernel has it; absent on kernels without
    # CONFIG_MAGIC_SYSRQ. Either way it never reaches the kernel's sysrq handler.
    probe("write-proc-sysrq-trigger", "write", "/proc/sysrq-trigger", "c",
          expect=errno_is("ENOENT", "EROFS", "EACCES")),
    probe("lower-own-oom-score-adj", "write", "/proc/self/oom_score_adj", "-1000",
          expect=errno_is("EACCES")),
    probe("rewrite-own-uid-map", "write", "/proc/self/uid_map", "0 0 1",
          expect=errno_is("EPERM")),
    probe("allow-setgroups", "write", "/proc/self/setgroups", "allow",
          expect=errno_is("EACCES", "EPERM")),
    # the sandbox's PID 1 keeps its capabilities inside the user namespace and runs as the
    # plugin's uid: its /proc files must still be out of the plugin's reach
    probe("write-sandbox-init-oom-score-adj", "write", "/proc/1/oom_score_adj", "1000",
          expect=errno_is("EACCES")),
    probe("write-sandbox-init-comm", "write", "/proc/1/comm", "pwned",
          expect=errno_is("EACCES")),
    probe("write-sandbox-init-memory", "open_for_writing", "/proc/1/mem",
          expect=errno_is("EACCES")),
    probe("write-the-sandbox-etc-hostname", "open_for_writing", "/etc/hostname",
          expect=errno_is("EROFS")),
]


@pytest.mark.parametrize(("method", "args", "expect"), WRITES_OUTSIDE)
async def test_writes_outside_the_allowed_paths_fail(fs, method, args, expect) -> None:  # type: ignore[no-untyped-def]
    await run(fs, method, args, expect)


async def test_the_sandbox_tmp_is_not_the_hosts(fs) -> None:  # type: ignore[no-untyped-def]
    name = f"sandboxer-escape-tmp-{os.getpid()}"
    assert await run(fs, "write", (f"/tmp/{name}",), ok_is(lambda n: n > 0))
    assert await run(fs, "write", (f"/dev/shm/{name}",), ok_is(lambda n: n > 0))
    assert not os.path.lexists(f"/tmp/{name}") and not os.path.lexists(f"/dev/shm/{name}")


READ_ONLY_GRANT = [
    probe("read-the-read-only-grant", "read", "{ro}/data.txt", expect=ok_is(RO_TEXT.__eq__)),
    probe("create-in-the-read-only-grant", "write", "{ro}/new", expect=errno_is("EROFS")),
    probe("open-read-only-grant-file-for-writing", "open_for_writing", "{ro}/data.txt",
          expect=errno_is("EROFS")),
    probe("append-to-read-only-grant", "append", "{ro}/data.txt", expect=errno_is("EROFS")),
    probe("chmod-in-read-only-grant", "chmod", "{ro}/data.txt", 0o777,
          expect=errno_is("EROFS")),
    probe("unlink-in-read-only-grant", "unlink", "{ro}/data.txt", expect=errno_is("EROFS")),
    probe("rename-in-read-only-grant", "rename", "{ro}/data.txt", "{ro}/moved",
          expect=errno_is("EROFS")),
    probe("mkdir-in-read-only-grant", "mkdir", "{ro}/dir", expect=errno_is("EROFS")),
    probe("symlink-in-read-only-grant", "symlink", "/etc", "{ro}/link",
          expect=errno_is("EROFS")),
]


@pytest.mark.parametrize(("method", "args", "expect"), READ_ONLY_GRANT)
async def test_read_only_grants_stay_read_only(fs, method, args, expect) -> None:  # type: ignore[no-untyped-def]
    await run(fs, method, args, expect)


@pytest.mark.parametrize("name", ["remount-rw", "mount-setattr-rw"])
async def test_a_read_only_grant_cannot_be_remounted_writable(fs, name) -> None:  # type: ignore[no-untyped-def]
    fleet, grants = fs
    assert await fleet.run(name, str(grants.ro)) == {"rc": 0, "out": "errno=EPERM", "err": ""}


DENIED_INSIDE = [
    probe("read-a-denied-file", "read", "{rw}/secret", expect=errno_is("EACCES")),
    probe("open-a-denied-file-for-writing", "open_for_writing", "{rw}/secret",
          expect=errno_is("EACCES", "EROFS")),
    probe("unlink-a-denied-file", "unlink", "{rw}/secret", expect=errno_is("EBUSY")),
    probe("rename-over-a-denied-file", "rename", "{rw}/to-beside", "{rw}/secret",
          expect=errno_is("EBUSY")),
    probe("rename-a-denied-file-away", "rename", "{rw}/secret", "{rw}/uncovered",
          expect=errno_is("EBUSY")),
    probe("read-in-a-denied-dir", "read", "{rw}/private/key", expect=errno_is("EACCES")),
    probe("list-a-denied-dir", "listdir", "{rw}/private", expect=errno_is("EACCES")),
    probe("create-in-a-denied-dir", "write", "{rw}/private/new", expect=errno_is("EACCES",
                                                                                  "EROFS")),
    probe("hardlink-a-denied-file", "link", "{rw}/secret", "{rw}/secret-link",
          expect=errno_is("EXDEV")),
]


@pytest.mark.parametrize(("method", "args", "expect"), DENIED_INSIDE)
async def test_denied_paths_inside_a_writable_grant_stay_denied(fs, method, args,
                                                                expect) -> None:  # type: ignore[no-untyped-def]
    await run(fs, method, args, expect)


async def test_the_mask_over_a_denied_path_cannot_be_unmounted(fs) -> None:  # type: ignore[no-untyped-def]
    fleet, grants = fs
    result = await fleet.run("umount", str(grants.rw / "secret"))
    assert result == {"rc": 0, "out": "errno=EPERM", "err": ""}


async def test_a_writable_grant_is_written_as_its_owner(fs) -> None:  # type: ignore[no-untyped-def]
    """What the plugin writes belongs on the host to the grant's owner (an idmapped mount,
    rootful; rootless the caller's own uid), never to a sandbox uid of 1,800,000-odd."""
    fleet, grants = fs
    await run(fs, "write", ("{rw}/written-by-the-plugin",), ok_is(lambda n: n > 0))
    made = os.stat(grants.rw / "written-by-the-plugin")
    grant = os.stat(grants.rw)
    assert (made.st_uid, made.st_gid) == (grant.st_uid, grant.st_gid)
    assert not made.st_mode & 0o6000
    os.unlink(grants.rw / "written-by-the-plugin")


async def test_a_file_in_a_writable_grant_cannot_grow_without_bound(fs) -> None:  # type: ignore[no-untyped-def]
    fleet, grants = fs
    huge = grants.rw / "huge"
    try:
        outcome = await fleet.probe("sparse", str(huge), 1 << 40)
        size = huge.stat().st_size if huge.exists() else 0
    finally:
        huge.unlink(missing_ok=True)
    assert outcome == {"errno": "EFBIG"}, f"{outcome}, a {size >> 30} GiB file on the host"


LINKS = [
    probe("follow-a-host-symlink-to-a-host-secret", "read", "{rw}/to-host-secret",
          expect=errno_is("ENOENT")),
    probe("follow-a-host-symlink-out-through-dotdot", "read", "{rw}/to-beside",
          expect=errno_is("ENOENT")),
    probe("hardlink-etc-passwd-into-the-grant", "link", "/etc/passwd", "{rw}/passwd",
          expect=errno_is("EXDEV")),
    probe("hardlink-the-read-only-grant-into-the-writable", "link", "{ro}/data.txt",
          "{rw}/data", expect=errno_is("EXDEV")),
    probe("hardlink-own-code-into-tmp", "link", "/plugin/plugin.py", "/tmp/plugin.py",
          expect=errno_is("EXDEV")),
    probe("hardlink-python-into-the-grant", "link", "{python}", "{rw}/python",
          expect=errno_is("EXDEV")),
]


@pytest.mark.parametrize(("method", "args", "expect"), LINKS)
async def test_links_do_not_lead_out(fs, method, args, expect) -> None:  # type: ignore[no-untyped-def]
    await run(fs, method, args, expect)


EXEC = [
    probe("exec-from-the-writable-grant", "execute", "{rw}/probe-copy",
          expect=errno_is("EACCES")),
    probe("exec-from-dev-shm", "execute", "/dev/shm/probe-copy", expect=errno_is("EACCES")),
]


@pytest.mark.parametrize(("method", "args", "expect"), EXEC)
async def test_data_paths_are_not_executable(fs, method, args, expect) -> None:  # type: ignore[no-untyped-def]
    target = args[0]
    await run(fs, "copy_executable", ("/plugin/probe", target), ok_is(lambda v: v is True))
    await run(fs, method, args, expect)
    await run(fs, "unlink", (target,), ok_is(lambda v: v is None))


@pytest.mark.parametrize("program", ["/plugin/probe-setuid", "/plugin/probe-filecaps"],
                         ids=["setuid-root-program", "program-with-every-file-capability"])
async def test_set_uid_and_file_capabilities_grant_nothing(fs, program) -> None:  # type: ignore[no-untyped-def]
    outcome = await run(fs, "execute", (program,), ok_is(lambda v: True))
    assert outcome["ok"] == {"rc": 0, "out": "euid=1000 capeff=0000000000000000", "err": ""}


def _kallsyms_hidden(text: str) -> bool:
    lines = text.splitlines()[:-1]  # the read stops at 1 MiB, maybe inside a line
    return len(lines) > 100 and all(line.split(" ", 1)[0] == "0" * 16 for line in lines)


PROC_AND_DEV = [
    probe("read-proc-kallsyms-addresses", "read", "/proc/kallsyms",
          expect=ok_is(_kallsyms_hidden)),
    probe("read-proc-keys", "read", "/proc/keys",
          expect=lambda o: o.get("errno") == "EACCES" or o.get("ok") == ""),
    probe("read-proc-timer-list", "read", "/proc/timer_list",
          expect=lambda o: o.get("errno") == "EACCES" or o.get("ok") == ""),
    probe("read-proc-sched-debug", "read", "/proc/sched_debug",
          expect=lambda o: o.get("errno") in ("EACCES", "ENOENT") or o.get("ok") == ""),
    probe("read-proc-kcore", "read", "/proc/kcore", expect=errno_is("EACCES", "ENOENT")),
    probe("read-proc-kmsg", "read", "/proc/kmsg", expect=errno_is("EACCES")),
    probe("read-dev-mem", "read", "/dev/mem", expect=errno_is("ENOENT")),
    probe("read-dev-kmem", "read", "/dev/kmem", expect=errno_is("ENOENT")),
    probe("read-dev-port", "read", "/dev/port", expect=errno_is("ENOENT")),
    probe("read-dev-kmsg", "read", "/dev/kmsg", expect=errno_is("ENOENT")),
    probe("read-the-host-disk", "read", "/dev/vda", expect=errno_is("ENOENT")),
    probe("list-the-sandbox-dev", "listdir", "/dev", expect=ok_is(lambda names: set(names) <= {
        "fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "urandom",
        "zero", "tty", "ptmx", "pts"})),
    # the sandbox's own devpts instance: none of the host's pseudo-terminals
    probe("list-the-sandbox-pts", "listdir", "/dev/pts",
          expect=ok_is(lambda names: set(names) <= {"ptmx"})),
    probe("list-sysfs-beyond-the-cpus", "listdir", "/sys",
          expect=ok_is(lambda names: set(names) <= {"devices"})),
]


@pytest.mark.parametrize(("method", "args", "expect"), PROC_AND_DEV)
async def test_kernel_information_and_devices_are_hidden(fs, method, args, expect) -> None:  # type: ignore[no-untyped-def]
    await run(fs, method, args, expect)


CGROUPS = [
    probe("own-cgroup-paths-are-the-namespace-root", "read", "/proc/self/cgroup",
          expect=ok_is(lambda text: all(line.endswith(":/") for line in text.splitlines()))),
    probe("list-sys-fs-cgroup", "listdir", "/sys/fs/cgroup", expect=errno_is("ENOENT")),
]


@pytest.mark.parametrize(("method", "args", "expect"), CGROUPS)
async def test_cgroups_cannot_be_escaped(fs, method, args, expect) -> None:  # type: ignore[no-untyped-def]
    await run(fs, method, args, expect)


# -- denied paths across loads: each with a grant and a manager of its own --------------------

async def _fleet_with_grant(canaries: Canaries, hostile_dir: Path, rw: Path,
                            denied: Path) -> Fleet:
    manager = PluginManager(config=HostConfig(warm_sandboxes=0))
    sandbox = manager.resolve_sandbox(load_plugin(hostile_dir)).replace(
        allowed_paths=(PathGrant(str(rw), writable=True),), denied_paths=(str(denied),))
    _, fleet = await start_fleet(canaries, hostile_dir, sandbox=sandbox, manager=manager)
    return fleet


def _writable_grant(tmp_path: Path) -> Path:
    os.chmod(tmp_path, 0o755)
    rw = tmp_path / "rw"
    rw.mkdir()
    os.chmod(rw, 0o777)
    return rw


async def test_a_denied_path_that_does_not_exist_yet_cannot_be_created(
        canaries: Canaries, hostile_dir: Path, tmp_path: Path) -> None:
    """The plugin could create it, so the load is refused before anything runs."""
    rw = _writable_grant(tmp_path)
    denied = rw / "authorized_keys"
    with pytest.raises(PluginLoadError, match="does not exist"):
        await _fleet_with_grant(canaries, hostile_dir, rw, denied)
    assert not denied.exists()


async def test_moving_a_denied_path_does_not_uncover_it_at_the_next_load(
        canaries: Canaries, hostile_dir: Path, tmp_path: Path) -> None:
    rw = _writable_grant(tmp_path)
    (rw / "sub").mkdir()
    os.chmod(rw / "sub", 0o777)
    denied = rw / "sub" / "key"
    denied.write_text(DENIED_TEXT)
    fleet = await _fleet_with_grant(canaries, hostile_dir, rw, denied)
    try:
        assert await fleet.probe("read", str(denied)) == {"errno": "EACCES"}
        moved = await fleet.probe("rename", str(rw / "sub"), str(rw / "moved"))
        await fleet.manager.reload(fleet.hostile.id)
        uncovered = await fleet.probe("read", str(rw / "moved" / "key"))
        planted = await fleet.probe("write", str(denied), "planted by the plugin\n")
    finally:
        await fleet.manager.aclose()
    assert uncovered.get("ok") != DENIED_TEXT, f"the denied file is readable after {moved}"
    assert not (denied.exists() and denied.read_text() != DENIED_TEXT), \
        f"the plugin planted a file at the denied path: {planted}"
