"""cgroups (sandbox/cgroups.py): the v2 backend against a fake cgroupfs, the v1 backend against
this host's real hierarchies, backend detection and /proc/self/cgroup parsing.

The v2 backend cannot be exercised for real here (the host is a v1/v2 hybrid whose unified
mount carries no controllers), so its logic is checked against a directory tree laid out like
a delegated v2 subtree. The only kernel behaviour the fake has to imitate is rmdir: on cgroupfs
removing a cgroup's directory removes its interface files with it, and fails with EBUSY while
the cgroup has children or members. ``FakeCgroupFs.rmdir`` does exactly that for paths under
the fake root and defers to the real ``os.rmdir`` for everything else.

The v1 tests create real cgroups (named ``sandboxer-<our pid>-*`` under our own cgroup in
each hierarchy, so ``no_leaks`` sees any left behind), run real processes in them and read
what the kernel measured.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandboxer import SandboxUnavailable
from sandboxer.sandbox import cgroups
from sandboxer.sandbox.cgroups import CgroupLimits, CgroupStats, CgroupV1, CgroupV2

MiB = 1 << 20
LIMITS = CgroupLimits(memory=64 * MiB, cpu=0.25, pids=16)


# -- a fake v2 hierarchy ---------------------------------------------------------------------

class FakeCgroupFs:
    """A temp dir shaped like a delegated cgroup v2 subtree at /user.slice/test.scope."""

    # What the kernel creates in a new cgroup when these controllers are enabled.
    INTERFACE = ("cgroup.procs", "memory.max", "memory.swap.max", "memory.oom.group",
                 "cpu.max", "pids.max")

    def __init__(self, tmp: Path, controllers: str = "cpu memory pids",
                 procs: str = "", swap_accounting: bool = True) -> None:
        self.swap_accounting = swap_accounting
        self.root = tmp / "cgroupfs"
        self.parent = self.root / "user.slice" / "test.scope"
        self.parent.mkdir(parents=True)
        (self.parent / "cgroup.controllers").write_text(controllers + "\n")
        (self.parent / "cgroup.subtree_control").write_text("")
        (self.parent / "cgroup.procs").write_text(procs)
        self.proc_cgroup = tmp / "proc-self-cgroup"
        self.proc_cgroup.write_text("0::/user.slice/test.scope\n")
        self.rmdirs: list[str] = []
        self.busy: dict[str, int] = {}  # path -> how many more rmdir calls answer EBUSY
        self.removed_files: dict[str, dict[str, str]] = {}

    def backend(self) -> CgroupV2:
        return CgroupV2(root=str(self.root), proc_cgroup=str(self.proc_cgroup))

    def mkdir(self, path: str, mode: int = 0o777, real=os.mkdir) -> None:  # type: ignore[no-untyped-def]
        real(path, mode)
        if Path(path).is_relative_to(self.root):
            for name in self.INTERFACE:
                if name != "memory.swap.max" or self.swap_accounting:
                    (Path(path) / name).write_text("")

    def rmdir(self, path: str, real=os.rmdir) -> None:  # type: ignore[no-untyped-def]
        target = Path(path)
        if not target.is_relative_to(self.root):
            return real(path)
        self.rmdirs.append(str(target))
        if not target.is_dir():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if self.busy.get(str(target), 0) > 0:
            self.busy[str(target)] -= 1
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        if any(p.is_dir() for p in target.iterdir()):  # a child cgroup: the kernel says EBUSY
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        procs = target / "cgroup.procs"
        if procs.exists() and procs.read_text().split():  # members left: EBUSY as well
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        # A cgroup's interface files go with its directory.
        self.removed_files[str(target)] = {p.name: p.read_text() for p in target.iterdir()}
        for p in target.iterdir():
            p.unlink()
        real(path)


@pytest.fixture
def fake_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeCgroupFs:
    fs = FakeCgroupFs(tmp_path)
    monkeypatch.setattr(cgroups.os, "rmdir", fs.rmdir)
    monkeypatch.setattr(cgroups.os, "mkdir", fs.mkdir)
    return fs


def _read(path: Path) -> str:
    return path.read_text()


@pytest.mark.parametrize("cpu, expected", [
    (0.25, "25000 100000"),
    (1.0, "100000 100000"),
    (2.5, "250000 100000"),
    (0.001, "1000 100000"),  # the kernel's minimum quota is 1 ms
], ids=["quarter", "one", "two-and-a-half", "below-minimum-rounds-up"])
def test_v2_create_writes_every_limit(fake_v2, cpu, expected):
    group = fake_v2.backend().create("plugin-a", CgroupLimits(memory=64 * MiB, cpu=cpu,
                                                               pids=16))
    path = fake_v2.parent / "plugin-a"
    assert group.path == str(path)
    assert _read(path / "memory.max") == str(64 * MiB)
    assert _read(path / "memory.swap.max") == "0"
    assert _read(path / "memory.oom.group") == "1"
    assert _read(path / "cpu.max") == expected
    assert _read(path / "pids.max") == "16"
    assert _read(fake_v2.parent / "cgroup.subtree_control") == "+memory +cpu +pids"


def test_v2_without_swap_accounting_still_limits_memory(fake_v2):
    fake_v2.swap_accounting = False
    fake_v2.backend().create("plugin-a", LIMITS)
    path = fake_v2.parent / "plugin-a"
    assert _read(path / "memory.max") == str(64 * MiB)
    assert not (path / "memory.swap.max").exists()


def test_v2_enables_controllers_once_for_many_groups(fake_v2, monkeypatch):
    writes: list[tuple[str, str]] = []
    real = cgroups._write
    monkeypatch.setattr(cgroups, "_write",
                        lambda path, value: (writes.append((path, value)), real(path, value)))
    backend = fake_v2.backend()
    backend.create("a", LIMITS)
    backend.create("b", LIMITS)
    enabling = [w for w in writes if w[0].endswith("test.scope/cgroup.subtree_control")]
    assert enabling == [(str(fake_v2.parent / "cgroup.subtree_control"), "+memory +cpu +pids")]
    assert (fake_v2.parent / "a").is_dir() and (fake_v2.parent / "b").is_dir()


@pytest.mark.parametrize("controllers, missing", [
    ("cpu pids", "memory"),
    ("memory pids", "cpu"),
    ("cpu memory", "pids"),
    ("io", "memory"),
    ("", "memory"),
], ids=["no-memory", "no-cpu", "no-pids", "only-io", "none-delegated"])
def test_v2_parent_without_a_controller_is_unavailable(tmp_path, controllers, missing):
    fs = FakeCgroupFs(tmp_path, controllers=controllers)
    with pytest.raises(SandboxUnavailable) as info:
        fs.backend().create("plugin-a", LIMITS)
    assert info.value.missing == f"cgroup {missing} controller"
    assert missing in str(info.value) and str(fs.parent) in str(info.value)
    assert "Delegate=yes" in str(info.value)
    assert not (fs.parent / "plugin-a").exists()  # nothing created
    assert _read(fs.parent / "cgroup.subtree_control") == ""


def test_v2_without_v2_membership_is_unavailable(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/a\n3:pids:/a\n")
    with pytest.raises(SandboxUnavailable) as info:
        CgroupV2(root=str(tmp_path), proc_cgroup=str(proc))
    assert info.value.missing == "cgroup v2"


def test_v2_stats_read_oom_kills_peak_cpu_and_pids(fake_v2):
    group = fake_v2.backend().create("plugin-a", LIMITS)
    path = fake_v2.parent / "plugin-a"
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 3\noom_kill 2\n"
                                        "oom_group_kill 1\n")
    (path / "memory.peak").write_text("67100672\n")
    (path / "cpu.stat").write_text("usage_usec 1500000\nuser_usec 1000000\n"
                                   "system_usec 500000\nnr_periods 40\nnr_throttled 30\n"
                                   "throttled_usec 2000000\n")
    (path / "pids.current").write_text("3\n")
    assert group.stats() == CgroupStats(memory_peak=67100672, oom_kills=2, cpu_time_s=1.5,
                                        pids=3)


def test_v2_stats_before_linux_5_19_have_no_peak(fake_v2):
    group = fake_v2.backend().create("plugin-a", LIMITS)
    path = fake_v2.parent / "plugin-a"
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n")
    (path / "cpu.stat").write_text("usage_usec 250\n")
    (path / "pids.current").write_text("0\n")
    assert group.stats() == CgroupStats(memory_peak=None, oom_kills=0, cpu_time_s=0.00025,
                                        pids=0)


def test_v2_add_writes_the_pid_and_failure_is_unavailable(fake_v2):
    group = fake_v2.backend().create("plugin-a", LIMITS)
    group.add(4242)
    assert _read(fake_v2.parent / "plugin-a" / "cgroup.procs") == "4242"
    (fake_v2.parent / "plugin-a" / "cgroup.procs").unlink()
    (fake_v2.parent / "plugin-a" / "cgroup.procs").mkdir()  # any OSError on the write
    with pytest.raises(SandboxUnavailable) as info:
        group.add(4242)
    assert info.value.missing == "cgroup"


def test_v2_kill_writes_cgroup_kill(fake_v2):
    group = fake_v2.backend().create("plugin-a", LIMITS)
    group.kill()
    assert _read(fake_v2.parent / "plugin-a" / "cgroup.kill") == "1"


def test_v2_kill_before_linux_5_14_kills_the_listed_processes(fake_v2, monkeypatch):
    """No cgroup.kill file: SIGKILL to each pid in cgroup.procs (a real child here)."""
    group = fake_v2.backend().create("plugin-a", LIMITS)
    child = subprocess.Popen(["sleep", "60"])
    try:
        (fake_v2.parent / "plugin-a" / "cgroup.procs").write_text(f"{child.pid}\n")
        real = cgroups._write

        def write(path: str, value: str) -> None:
            if path.endswith("/cgroup.kill"):
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
            real(path, value)

        monkeypatch.setattr(cgroups, "_write", write)
        group.kill()
        assert child.wait(timeout=5) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()


def test_v2_remove_kills_then_removes_the_directory(fake_v2):
    group = fake_v2.backend().create("plugin-a", LIMITS)
    path = str(fake_v2.parent / "plugin-a")
    group.remove()
    assert not os.path.exists(path)
    assert fake_v2.rmdirs == [path]
    assert fake_v2.removed_files[path]["cgroup.kill"] == "1"  # killed before the rmdir


def test_v2_remove_retries_while_the_last_tasks_exit(fake_v2):
    group = fake_v2.backend().create("plugin-a", LIMITS)
    path = str(fake_v2.parent / "plugin-a")
    fake_v2.busy[path] = 3
    group.remove()
    assert fake_v2.rmdirs == [path] * 4 and not os.path.exists(path)


def test_v2_remove_gives_up_after_bounded_retries(fake_v2, monkeypatch):
    monkeypatch.setattr(cgroups, "_RMDIR_SECONDS", 0.3)
    group = fake_v2.backend().create("plugin-a", LIMITS)
    path = str(fake_v2.parent / "plugin-a")
    fake_v2.busy[path] = 1_000_000
    with pytest.raises(OSError) as info:
        group.remove()
    assert info.value.errno == errno.EBUSY
    assert 1 < len(fake_v2.rmdirs) < 1_000_000  # retried, then gave up


def test_v2_remove_of_a_vanished_group_is_quiet(fake_v2):
    group = fake_v2.backend().create("plugin-a", LIMITS)
    group.remove()
    group.remove()  # already gone: ENOENT is success


def test_v2_failed_limit_write_undoes_the_group(fake_v2, monkeypatch):
    real = cgroups._write

    def write(path: str, value: str) -> None:
        if path.endswith("/memory.swap.max"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        real(path, value)

    monkeypatch.setattr(cgroups, "_write", write)
    with pytest.raises(SandboxUnavailable) as info:
        fake_v2.backend().create("plugin-a", LIMITS)
    assert info.value.missing == "cgroup" and "limiting plugin-a" in str(info.value)
    assert fake_v2.rmdirs == [str(fake_v2.parent / "plugin-a")]


def test_v2_busy_parent_moves_its_processes_into_a_supervisor_leaf(tmp_path, monkeypatch):
    """The no-internal-processes rule: enabling controllers in a cgroup that holds processes
    fails with EBUSY; the backend moves them into ``supervisor`` and tries again."""
    fs = FakeCgroupFs(tmp_path, procs="101\n102\n")
    writes: list[tuple[str, str]] = []
    real = cgroups._write
    subtree = str(fs.parent / "cgroup.subtree_control")

    def write(path: str, value: str) -> None:
        writes.append((path, value))
        if path == subtree and writes.count((path, value)) == 1:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
        real(path, value)

    monkeypatch.setattr(cgroups, "_write", write)
    group = fs.backend().create("plugin-a", LIMITS)
    leaf = fs.parent / "supervisor"
    assert leaf.is_dir()
    assert writes[:4] == [
        (subtree, "+memory +cpu +pids"),                 # EBUSY
        (str(leaf / "cgroup.procs"), "101"),
        (str(leaf / "cgroup.procs"), "102"),
        (subtree, "+memory +cpu +pids"),                 # now allowed
    ]
    # The plugin's group is a sibling of the leaf, not inside it.
    assert group.path == str(fs.parent / "plugin-a")
    assert _read(fs.parent / "plugin-a" / "memory.max") == str(64 * MiB)


def test_v2_other_errors_enabling_controllers_are_unavailable(tmp_path, monkeypatch):
    fs = FakeCgroupFs(tmp_path)
    real = cgroups._write

    def write(path: str, value: str) -> None:
        if path.endswith("cgroup.subtree_control"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        real(path, value)

    monkeypatch.setattr(cgroups, "_write", write)
    with pytest.raises(SandboxUnavailable) as info:
        fs.backend().create("plugin-a", LIMITS)
    assert info.value.missing == "cgroup"
    assert f"enabling controllers in {fs.parent}" in str(info.value)
    assert not (fs.parent / "supervisor").exists() and not (fs.parent / "plugin-a").exists()


# -- own_cgroups -----------------------------------------------------------------------------

HYBRID = """\
12:hugetlb:/
11:pids:/user.slice/user-1000.slice/session-2.scope
10:cpu,cpuacct:/user.slice
9:name=systemd:/user.slice/user-1000.slice/session-2.scope
4:memory:/process_api/9a896e5afc86c3679aea4f6544ecde1f
1:net_cls,net_prio:/
0::/user.slice/user-1000.slice/session-2.scope
"""
PURE_V2 = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/test.scope\n"


@pytest.mark.parametrize("text, expected", [
    (HYBRID, {"hugetlb": "/", "pids": "/user.slice/user-1000.slice/session-2.scope",
              "cpu": "/user.slice", "cpuacct": "/user.slice",
              "name=systemd": "/user.slice/user-1000.slice/session-2.scope",
              "memory": "/process_api/9a896e5afc86c3679aea4f6544ecde1f",
              "net_cls": "/", "net_prio": "/",
              "": "/user.slice/user-1000.slice/session-2.scope"}),
    (PURE_V2, {"": "/user.slice/user-1000.slice/user@1000.service/app.slice/test.scope"}),
    ("0::/\n", {"": "/"}),
    ("0::/odd:name:with:colons\n", {"": "/odd:name:with:colons"}),
], ids=["hybrid", "pure-v2", "v2-root", "colons-in-path"])
def test_own_cgroups_parses_proc_self_cgroup(tmp_path, text, expected):
    sample = tmp_path / "cgroup"
    sample.write_text(text)
    assert cgroups.own_cgroups(str(sample)) == expected


@given(path=st.text(st.characters(blacklist_characters="\n\r\x0b\x0c\x1c\x1d\x1e\x85"
                                  "\u2028\u2029", blacklist_categories=("Cs",)),
                    max_size=60).map(lambda s: "/" + s),
       controllers=st.lists(st.sampled_from(["memory", "cpu", "cpuacct", "pids", "blkio"]),
                            min_size=1, max_size=3, unique=True))
def test_own_cgroups_keeps_any_path_verbatim(tmp_path_factory, path, controllers):
    sample = tmp_path_factory.mktemp("proc") / "cgroup"
    sample.write_text(f"3:{','.join(controllers)}:{path}\n0::{path}\n", encoding="utf-8")
    parsed = cgroups.own_cgroups(str(sample))
    assert parsed == {**{c: path for c in controllers}, "": path}


def test_own_cgroups_of_this_process_match_the_kernel():
    parsed = cgroups.own_cgroups()
    assert parsed["memory"].startswith("/process_api/"), parsed  # as the host is set up
    assert {"memory", "cpu", "cpuacct", "pids", ""} <= set(parsed)


# -- v1 backend on fake hierarchies (co-mounted controllers) ---------------------------------

def test_v1_finds_co_mounted_cpu_and_cpuacct(tmp_path):
    root = tmp_path / "cgroup"
    for hierarchy in ("memory", "cpu,cpuacct", "pids", "unified"):
        (root / hierarchy).mkdir(parents=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("5:pids:/a\n4:memory:/b\n3:cpu,cpuacct:/c\n0::/d\n")
    backend = CgroupV1(root=str(root), proc_cgroup=str(proc))
    assert backend.bases == {"memory": f"{root}/memory/b", "cpu": f"{root}/cpu,cpuacct/c",
                             "cpuacct": f"{root}/cpu,cpuacct/c", "pids": f"{root}/pids/a"}
    group = backend.create("g", LIMITS)
    assert group.dirs["cpu"] == group.dirs["cpuacct"] == f"{root}/cpu,cpuacct/c/g"
    assert _read(Path(group.dirs["cpu"]) / "cpu.cfs_quota_us") == "25000"
    assert _read(Path(group.dirs["memory"]) / "memory.limit_in_bytes") == str(64 * MiB)
    # No memsw file (swap accounting off): the swap limit is skipped, not created.
    assert not (Path(group.dirs["memory"]) / "memory.memsw.limit_in_bytes").exists()


def test_v1_sees_systemds_cpu_and_cpuacct_links_as_one_hierarchy(tmp_path):
    """A stock systemd v1 layout: cpu and cpuacct are symlinks to cpu,cpuacct. Both must
    resolve to one directory, or the second mkdir of the plugin's cgroup fails."""
    root = tmp_path / "cgroup"
    for hierarchy in ("memory", "cpu,cpuacct", "pids"):
        (root / hierarchy).mkdir(parents=True)
    (root / "cpu").symlink_to("cpu,cpuacct")
    (root / "cpuacct").symlink_to("cpu,cpuacct")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("5:pids:/a\n4:memory:/b\n3:cpu,cpuacct:/c\n")
    backend = CgroupV1(root=str(root), proc_cgroup=str(proc))
    assert backend.bases["cpu"] == backend.bases["cpuacct"] == f"{root}/cpu,cpuacct/c"
    group = backend.create("g", LIMITS)  # failed with EEXIST when the links were two paths
    assert group.dirs["cpu"] == group.dirs["cpuacct"]
    assert _read(Path(group.dirs["cpuacct"]) / "cpu.cfs_quota_us") == "25000"


@pytest.mark.parametrize("hierarchies, missing", [
    (("cpu", "cpuacct", "pids"), "memory"),
    (("memory", "cpuacct", "pids"), "cpu"),
    (("memory", "cpu", "pids"), "cpuacct"),
    (("memory", "cpu,cpuacct"), "pids"),
], ids=["no-memory", "no-cpu", "no-cpuacct", "no-pids"])
def test_v1_without_a_hierarchy_is_unavailable(tmp_path, hierarchies, missing):
    root = tmp_path / "cgroup"
    for hierarchy in hierarchies:
        (root / hierarchy).mkdir(parents=True)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("".join(f"{i}:{h}:/\n" for i, h in enumerate(hierarchies, 1)))
    with pytest.raises(SandboxUnavailable) as info:
        CgroupV1(root=str(root), proc_cgroup=str(proc))
    assert info.value.missing == f"cgroup {missing} controller"


# -- detect() ----------------------------------------------------------------------------------

def test_detect_picks_v1_on_this_hybrid_host():
    """Why v1: /sys/fs/cgroup is a tmpfs of v1 hierarchies and the v2 (unified) mount has
    none of the memory, cpu and pids controllers (they are bound to v1 hierarchies)."""
    assert not cgroups._is_cgroup2("/sys/fs/cgroup")
    assert cgroups._is_cgroup2("/sys/fs/cgroup/unified")
    unified = Path("/sys/fs/cgroup/unified/cgroup.controllers").read_text().split()
    assert not {"memory", "cpu", "pids"} & set(unified), unified
    backend = cgroups.detect()
    assert isinstance(backend, CgroupV1) and backend.version == 1
    own = cgroups.own_cgroups()
    for controller in CgroupV1.CONTROLLERS:
        expected = os.path.join("/sys/fs/cgroup", controller, own[controller].lstrip("/"))
        assert os.path.normpath(backend.bases[controller]) == os.path.normpath(expected)


def test_detect_without_any_usable_hierarchy_is_unavailable(tmp_path):
    with pytest.raises(SandboxUnavailable) as info:
        cgroups.detect(str(tmp_path))  # neither cgroup2 nor v1 hierarchies
    assert info.value.missing.startswith("cgroup ")


def test_new_names_are_ours_and_unique():
    names = {cgroups.new_name() for _ in range(100)}
    assert len(names) == 100
    assert all(n.startswith(f"sandboxer-{os.getpid()}-") for n in names)


# -- v1 backend on this host, with real processes --------------------------------------------

def _group_dirs(name: str) -> list[str]:
    own = cgroups.own_cgroups()
    return [os.path.join("/sys/fs/cgroup", c, own[c].lstrip("/"), name)
            for c in CgroupV1.CONTROLLERS]


@pytest.fixture
def v1_group(no_leaks):
    """A real v1 group limited by LIMITS; removed at the end even if the test fails."""
    name = cgroups.new_name()
    group = CgroupV1().create(name, LIMITS)
    yield group
    group.remove()
    assert not any(os.path.exists(d) for d in _group_dirs(name))


def _run_in(group, code: str, *, timeout: float = 30) -> tuple[int, float]:
    """Start python running ``code`` in ``group`` (joined before it does anything), wait for
    it; returns its wait status and the wall time from go to exit."""
    child = subprocess.Popen([sys.executable, "-I", "-c",
                              "import sys; sys.stdin.buffer.read(1)\n" + code],
                             stdin=subprocess.PIPE)
    try:
        group.add(child.pid)
        start = time.monotonic()
        assert child.stdin is not None
        child.stdin.write(b"g")
        child.stdin.close()
        deadline = start + timeout
        while True:
            pid, status = os.waitpid(child.pid, os.WNOHANG)
            if pid:
                child.returncode = os.waitstatus_to_exitcode(status)
                return status, time.monotonic() - start
            if time.monotonic() > deadline:
                raise AssertionError(f"the process in the cgroup ran for more than {timeout}s")
            time.sleep(0.01)
    finally:
        if child.returncode is None:
            child.kill()
            child.wait()


def test_v1_create_writes_the_limits(v1_group):
    memory, cpu, pids = (Path(v1_group.dirs[c]) for c in ("memory", "cpu", "pids"))
    assert int(_read(memory / "memory.limit_in_bytes")) == 64 * MiB
    if (memory / "memory.memsw.limit_in_bytes").exists():
        assert int(_read(memory / "memory.memsw.limit_in_bytes")) == 64 * MiB
    assert int(_read(cpu / "cpu.cfs_quota_us")) == 25_000
    assert int(_read(cpu / "cpu.cfs_period_us")) == 100_000
    assert _read(pids / "pids.max").strip() == "16"
    own = cgroups.own_cgroups()
    for controller in CgroupV1.CONTROLLERS:  # each under our own cgroup in its hierarchy
        parent = os.path.join("/sys/fs/cgroup", controller, own[controller].lstrip("/"))
        assert os.path.normpath(os.path.dirname(v1_group.dirs[controller])) == \
            os.path.normpath(parent)


def test_v1_process_runs_in_the_group_and_is_counted(v1_group):
    status, _ = _run_in(v1_group, "import os\n"
                        "print(open('/proc/self/cgroup').read(), flush=True)\n"
                        "x = sum(range(3_000_000))\n"
                        "block = b'x' * (8 << 20)  # written, so charged to this cgroup\n")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    stats = v1_group.stats()
    assert stats.cpu_time_s is not None and stats.cpu_time_s > 0.01
    # Memory is charged where it is first touched: the interpreter's start-up pages stay
    # with the cgroup it started in, the block written after joining counts here.
    assert stats.memory_peak is not None and stats.memory_peak > 4 * MiB
    assert stats.oom_kills == 0 and stats.pids == 0


def test_v1_memory_hog_is_oom_killed_and_reported(v1_group):
    status, _ = _run_in(v1_group, "block = b'x' * (200 << 20)\nprint('survived')\n")
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    stats = v1_group.stats()
    assert stats.oom_kills >= 1
    assert stats.memory_peak is not None and stats.memory_peak >= 60 * MiB
    assert stats.memory_peak <= 64 * MiB + 4 * MiB


def test_v1_cpu_quota_throttles_a_spin(v1_group):
    before = v1_group.stats().cpu_time_s or 0.0
    status, wall = _run_in(v1_group, "import time\nend = time.monotonic() + 2\n"
                                     "while time.monotonic() < end:\n    pass\n")
    assert os.WIFEXITED(status) and wall >= 2
    used = (v1_group.stats().cpu_time_s or 0.0) - before
    assert 0.05 < used / wall <= 0.3, f"{used:.2f} CPU-s in {wall:.2f} s"


def test_v1_pids_limit_stops_forks(v1_group):
    status, _ = _run_in(v1_group, """\
import os, sys, time
made = 0
for _ in range(64):
    try:
        pid = os.fork()
    except BlockingIOError:
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    made += 1
sys.exit(made)
""")
    made = os.WEXITSTATUS(status)
    assert os.WIFEXITED(status) and 1 <= made < 16
    v1_group.kill()  # the sleeping children, now orphans in the group
    # pids.current drops as the killed orphans are reaped (by PID 1, not by us).
    deadline = time.monotonic() + 5
    while v1_group.stats().pids and time.monotonic() < deadline:
        time.sleep(0.02)
    assert v1_group.stats().pids == 0


def test_v1_remove_kills_a_setsid_process_that_ignores_sigterm(no_leaks):
    name = cgroups.new_name()
    group = CgroupV1().create(name, LIMITS)
    try:
        # The child forks a daemon (new session, SIGTERM ignored) and exits: the daemon is not
        # our child any more, only the cgroup still knows it.
        child = subprocess.Popen([sys.executable, "-I", "-c", """\
import os, signal, sys, time
sys.stdin.buffer.read(1)
if os.fork() == 0:
    os.setsid()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(os.getpid(), flush=True)
    time.sleep(120)
    os._exit(0)
"""], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert child.stdin is not None and child.stdout is not None
        group.add(child.pid)
        child.stdin.write(b"g")
        child.stdin.close()
        daemon = int(child.stdout.readline())
        child.stdout.close()
        assert child.wait(timeout=10) == 0
        pidfd = os.pidfd_open(daemon)
        try:
            os.kill(daemon, signal.SIGTERM)  # it really ignores SIGTERM
            assert select.select([pidfd], [], [], 0.3)[0] == []
            procs = Path(group.dirs["pids"], "cgroup.procs").read_text().split()
            assert str(daemon) in procs
            group.remove()
            assert select.select([pidfd], [], [], 5)[0] == [pidfd], "the daemon survived"
        finally:
            os.close(pidfd)
    finally:
        group.remove()
    for directory in _group_dirs(name):
        assert not os.path.exists(directory), directory


def test_v1_failed_limit_undoes_every_directory(no_leaks):
    name = cgroups.new_name()
    with pytest.raises(SandboxUnavailable) as info:
        CgroupV1().create(name, CgroupLimits(memory=64 * MiB, cpu=0.25, pids=-5))
    assert info.value.missing == "cgroup" and name in str(info.value)
    for directory in _group_dirs(name):
        assert not os.path.exists(directory), directory


def test_v1_add_of_a_dead_pid_is_unavailable(v1_group):
    child = subprocess.Popen(["true"])
    child.wait()
    with pytest.raises(SandboxUnavailable) as info:
        v1_group.add(child.pid)
    assert info.value.missing == "cgroup"
