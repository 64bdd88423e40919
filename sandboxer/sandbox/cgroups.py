"""cgroup limits for plugins: one interface, a v2 and a v1 implementation.

The supervisor creates one cgroup per plugin process under its *own* cgroup (in each v1
hierarchy, or in its v2 subtree), writes the limits, moves the launcher in before it unshares
anything, reads OOM kills, peak memory and CPU time back, and at the end kills whatever is
left and removes the cgroup. It never moves a process out of its own cgroup, and never
touches a cgroup it did not create.

v2 follows Documentation/admin-guide/cgroup-v2.rst: controllers enabled through
``cgroup.subtree_control`` of the delegated parent, the no-internal-processes rule (if the
supervisor's cgroup still holds the supervisor, it moves itself into a ``supervisor`` leaf
below, as nsjail does), ``memory.max``, ``memory.swap.max = 0``, ``memory.oom.group = 1``,
``cpu.max``, ``pids.max``, ``cgroup.kill``; ``memory.events`` and ``memory.peak`` read back.
v1 (hybrid hosts): the memory, cpu, cpuacct and pids hierarchies, ``memory.limit_in_bytes`` and
``memory.memsw.limit_in_bytes`` (no swap beyond the limit), ``cpu.cfs_quota_us``,
``pids.max``; no cgroup.kill, so the cgroup is emptied by killing its processes until none is
left (they are all in one pid namespace whose init dies first, so this converges).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import SandboxUnavailable

__all__ = [
    "CgroupLimits",
    "CgroupStats",
    "Cgroup",
    "CgroupBackend",
    "CgroupV1",
    "CgroupV2",
    "detect",
    "CGROUP2_SUPER_MAGIC",
]

log = logging.getLogger("sandboxer")

CGROUP2_SUPER_MAGIC = 0x63677270
CPU_PERIOD_US = 100_000
# How long rmdir may keep finding a killed cgroup busy: its processes' exits take their time
# (a warm sandbox's three die at once; seconds under an emulated CPU, the VM stage's).
_RMDIR_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class CgroupLimits:
    memory: int  # bytes, swap included
    cpu: float  # CPUs
    pids: int


@dataclass(frozen=True, slots=True)
class CgroupStats:
    memory_peak: int | None
    oom_kills: int
    cpu_time_s: float | None
    pids: int


class Cgroup(Protocol):
    path: str

    def add(self, pid: int) -> None: ...

    def stats(self) -> CgroupStats: ...

    def kill(self) -> None: ...

    def remove(self) -> None: ...

    def limit(self, limits: CgroupLimits) -> None: ...


class CgroupBackend(Protocol):
    version: int

    def create(self, name: str, limits: CgroupLimits) -> Cgroup: ...

    def homes(self) -> list[str]: ...

    def sweep(self) -> list[str]: ...


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _keyed(path: str) -> dict[str, int]:
    out = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        if value.strip().lstrip("-").isdigit():
            out[key] = int(value)
    return out


def _unavailable(what: str, exc: OSError) -> SandboxUnavailable:
    return SandboxUnavailable(
        f"cannot set up the plugin's cgroup ({what}: {exc.strerror}); sandboxer needs write "
        "access to its own cgroup (run as root, or delegate the cgroup to this user, e.g. "
        "with systemd-run --user --scope -p Delegate=yes)",
        missing="cgroup",
    )


def _remove_dir(path: str) -> None:
    # rmdir fails with EBUSY while the last tasks are still exiting; retry a bounded time.
    deadline = time.monotonic() + _RMDIR_SECONDS
    while time.monotonic() < deadline:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            time.sleep(0.01)
    os.rmdir(path)


def _quota_us(cpus: float) -> int:
    """CFS quota per CPU_PERIOD_US for ``cpus`` CPUs; the kernel's minimum is 1 ms."""
    return max(1000, int(cpus * CPU_PERIOD_US))


def _kill_until_empty(procs_file: str) -> None:
    """SIGKILL whatever ``procs_file`` lists until it lists nothing (bounded)."""
    for _ in range(100):
        if _kill_listed(procs_file) == 0:
            return
        time.sleep(0.005)


def _kill_listed(procs_file: str) -> int:
    try:
        pids = [int(p) for p in _read(procs_file).split()]
    except FileNotFoundError:
        return 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def own_cgroups(proc_cgroup: str = "/proc/self/cgroup") -> dict[str, str]:
    """controller (or "" for v2) -> this process's cgroup path in that hierarchy."""
    out: dict[str, str] = {}
    for line in _read(proc_cgroup).splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            out[name] = path
    return out


# A plugin's cgroup: ``new_name()``'s "sandboxer-<supervisor pid>-<12 hex digits>".
_NAME_RE = re.compile(r"sandboxer-([0-9]+)-[0-9a-f]{12}")
# A cgroup younger than this is never swept: its supervisor may be about to add the launcher.
_SWEEP_MIN_AGE = 5.0


def _sweep(bases: list[str]) -> list[str]:
    """Remove the plugin cgroups under ``bases`` that a supervisor now gone left behind (a
    supervisor killed with SIGKILL removes nothing; its plugins die with it, their cgroups
    stay): named for a pid that no longer exists, holding no process, and older than
    ``_SWEEP_MIN_AGE``. A cgroup that still holds processes is left alone and logged: its
    supervisor may live in another pid namespace, where its pid means nothing here. Returns
    the paths removed."""
    removed = []
    for base in bases:
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            found = _NAME_RE.fullmatch(name)
            if found is None or _alive(int(found.group(1))):
                continue
            path = os.path.join(base, name)
            try:
                if time.time() - os.stat(path).st_mtime < _SWEEP_MIN_AGE:
                    continue
                if _read(f"{path}/cgroup.procs").split():
                    log.warning(
                        "cgroup %s outlived its supervisor with processes in it; left", path
                    )
                    continue
                os.rmdir(path)
            except FileNotFoundError:
                continue  # swept by another supervisor meanwhile
            except OSError as exc:
                log.warning(
                    "cgroup %s outlived its supervisor and cannot be removed: %s", path, exc
                )
                continue
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- v1 ------------------------------------------------------------------------------------------


class _V1Group:
    def __init__(self, dirs: dict[str, str]) -> None:
        self.dirs = dirs
        self.path = dirs["memory"]

    def add(self, pid: int) -> None:
        for controller, directory in self.dirs.items():
            try:
                _write(f"{directory}/cgroup.procs", str(pid))
            except OSError as exc:
                raise _unavailable(f"joining {controller} cgroup {directory}", exc) from exc

    def stats(self) -> CgroupStats:
        mem, cpu, pids = self.dirs["memory"], self.dirs["cpuacct"], self.dirs["pids"]
        try:
            peak = int(_read(f"{mem}/memory.memsw.max_usage_in_bytes"))
        except OSError:
            peak = int(_read(f"{mem}/memory.max_usage_in_bytes"))
        oom = _keyed(f"{mem}/memory.oom_control").get("oom_kill", 0)
        usage_ns = int(_read(f"{cpu}/cpuacct.usage"))
        current = int(_read(f"{pids}/pids.current"))
        return CgroupStats(memory_peak=peak, oom_kills=oom, cpu_time_s=usage_ns / 1e9, pids=current)

    def kill(self) -> None:
        _kill_until_empty(f"{self.dirs['pids']}/cgroup.procs")

    def limit(self, limits: CgroupLimits) -> None:
        """Set the limits (at creation, or again when a warm sandbox is taken). memsw may
        never be below memory's limit: raised first when raising, lowered last."""
        mem = self.dirs["memory"]
        memsw = f"{mem}/memory.memsw.limit_in_bytes"
        order = [f"{mem}/memory.limit_in_bytes"]
        if os.path.exists(memsw):
            raising = limits.memory > int(_read(f"{mem}/memory.limit_in_bytes"))
            order = [memsw, *order] if raising else [*order, memsw]
        for path in order:
            _write(path, str(limits.memory))
        _write(f"{self.dirs['cpu']}/cpu.cfs_period_us", str(CPU_PERIOD_US))
        _write(f"{self.dirs['cpu']}/cpu.cfs_quota_us", str(_quota_us(limits.cpu)))
        _write(f"{self.dirs['pids']}/pids.max", str(limits.pids))

    def remove(self) -> None:
        self.kill()
        for directory in self.dirs.values():
            _remove_dir(directory)


class CgroupV1:
    """cgroup v1: memory, cpu, cpuacct and pids hierarchies (separate or co-mounted)."""

    version = 1
    CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")

    def __init__(self, root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup"):
        own = own_cgroups(proc_cgroup)
        self.bases: dict[str, str] = {}
        for controller in self.CONTROLLERS:
            mount = self._mount_of(root, controller)
            if mount is None or controller not in own:
                raise SandboxUnavailable(
                    f"the {controller} cgroup controller is not mounted at {root}",
                    missing=f"cgroup {controller} controller",
                )
            self.bases[controller] = os.path.join(mount, own[controller].lstrip("/"))

    @staticmethod
    def _mount_of(root: str, controller: str) -> str | None:
        for candidate in Path(root).iterdir():
            if candidate.is_dir() and controller in candidate.name.split(","):
                # systemd links cpu and cpuacct to cpu,cpuacct: one hierarchy, one path
                return os.path.realpath(candidate)
        return None

    def homes(self) -> list[str]:
        """The directories plugin cgroups are made in: one per hierarchy."""
        return list(dict.fromkeys(self.bases.values()))

    def sweep(self) -> list[str]:
        """Remove what dead supervisors left in our hierarchies (``_sweep``)."""
        return _sweep(self.homes())

    def create(self, name: str, limits: CgroupLimits) -> _V1Group:
        dirs = {c: f"{self.bases[c]}/{name}" for c in self.CONTROLLERS}
        made: list[str] = []
        try:
            for directory in dict.fromkeys(dirs.values()):
                os.makedirs(directory, exist_ok=False)
                made.append(directory)
            group = _V1Group(dirs)
            group.limit(limits)
        except OSError as exc:
            for directory in reversed(made):  # undo what we created, as runc does
                try:
                    os.rmdir(directory)
                except OSError:
                    pass
            raise _unavailable(f"creating {name}", exc) from exc
        return group


# -- v2 ------------------------------------------------------------------------------------------


class _V2Group:
    def __init__(self, path: str) -> None:
        self.path = path

    def limit(self, limits: CgroupLimits) -> None:
        """Set the limits (at creation, or again when a warm sandbox is taken)."""
        _write(f"{self.path}/memory.max", str(limits.memory))
        _write(f"{self.path}/cpu.max", f"{_quota_us(limits.cpu)} {CPU_PERIOD_US}")
        _write(f"{self.path}/pids.max", str(limits.pids))

    def add(self, pid: int) -> None:
        try:
            _write(f"{self.path}/cgroup.procs", str(pid))
        except OSError as exc:
            raise _unavailable(f"joining {self.path}", exc) from exc

    def stats(self) -> CgroupStats:
        events = _keyed(f"{self.path}/memory.events")
        try:
            peak: int | None = int(_read(f"{self.path}/memory.peak"))
        except FileNotFoundError:  # memory.peak arrived in Linux 5.19
            peak = None
        usage = _keyed(f"{self.path}/cpu.stat").get("usage_usec")
        return CgroupStats(
            memory_peak=peak,
            oom_kills=events.get("oom_kill", 0),
            cpu_time_s=None if usage is None else usage / 1e6,
            pids=int(_read(f"{self.path}/pids.current")),
        )

    def kill(self) -> None:
        try:
            _write(f"{self.path}/cgroup.kill", "1")
        except FileNotFoundError:  # before Linux 5.14: kill what is listed until empty
            _kill_until_empty(f"{self.path}/cgroup.procs")

    def remove(self) -> None:
        self.kill()
        _remove_dir(self.path)


class CgroupV2:
    """cgroup v2, under the supervisor's own (delegated) cgroup."""

    version = 2
    CONTROLLERS = ("memory", "cpu", "pids")

    def __init__(
        self,
        root: str = "/sys/fs/cgroup",
        proc_cgroup: str = "/proc/self/cgroup",
        *,
        pid: int | None = None,
    ) -> None:
        own = own_cgroups(proc_cgroup).get("")
        if own is None:
            raise SandboxUnavailable(
                "this process has no cgroup v2 membership", missing="cgroup v2"
            )
        self.parent = os.path.join(root, own.lstrip("/"))
        self.base = self.parent
        self._pid = os.getpid() if pid is None else pid
        self._prepared = False

    def _prepare(self) -> None:
        """Enable the controllers for our subtree, obeying the no-internal-processes rule."""
        available = _read(f"{self.parent}/cgroup.controllers").split()
        missing = [c for c in self.CONTROLLERS if c not in available]
        if missing:
            raise SandboxUnavailable(
                f"the cgroup {self.parent} has no {', '.join(missing)} controller delegated "
                "to it; delegate them (systemd: Delegate=yes) or run as root",
                missing=f"cgroup {missing[0]} controller",
            )
        enable = " ".join(f"+{c}" for c in self.CONTROLLERS)
        try:
            _write(f"{self.parent}/cgroup.subtree_control", enable)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise _unavailable(f"enabling controllers in {self.parent}", exc) from exc
            # Our own cgroup still holds processes (us): move them into a leaf of our own
            # subtree, then the parent may distribute controllers to its children.
            leaf = f"{self.parent}/supervisor"
            os.makedirs(leaf, exist_ok=True)
            for pid in _read(f"{self.parent}/cgroup.procs").split():
                _write(f"{leaf}/cgroup.procs", pid)
            _write(f"{self.parent}/cgroup.subtree_control", enable)
        self._prepared = True

    def homes(self) -> list[str]:
        """The directory plugin cgroups are made in."""
        return [self.base]

    def sweep(self) -> list[str]:
        """Remove what dead supervisors left in our subtree (``_sweep``)."""
        return _sweep(self.homes())

    def create(self, name: str, limits: CgroupLimits) -> _V2Group:
        try:
            if not self._prepared:
                self._prepare()
            path = f"{self.base}/{name}"
            os.mkdir(path)
        except OSError as exc:
            raise _unavailable(f"creating {name}", exc) from exc
        group = _V2Group(path)
        try:
            if os.path.exists(f"{path}/memory.swap.max"):  # absent without swap accounting
                _write(f"{path}/memory.swap.max", "0")
            _write(f"{path}/memory.oom.group", "1")
            group.limit(limits)
        except OSError as exc:
            try:
                os.rmdir(path)
            except OSError:
                pass
            raise _unavailable(f"limiting {name}", exc) from exc
        return group


_detected: dict[str, CgroupBackend] = {}


def detect(root: str = "/sys/fs/cgroup") -> CgroupBackend:
    """The backend that enforces limits on this host: v2 when the v2 hierarchy has the
    controllers, else v1 (hybrid hosts), else SandboxUnavailable. One per process: after a
    v2 backend moved the supervisor into its ``supervisor`` leaf, a second one must not take
    that leaf for the supervisor's own cgroup."""
    backend = _detected.get(root)
    if backend is None:
        backend = _detected[root] = _detect(root)
    return backend


def _detect(root: str) -> CgroupBackend:
    for v2_root in (root, os.path.join(root, "unified")):
        if _is_cgroup2(v2_root):
            try:
                controllers = _read(f"{v2_root}/cgroup.controllers").split()
            except OSError:
                controllers = []
            if all(c in controllers for c in CgroupV2.CONTROLLERS):
                return CgroupV2(v2_root)
    return CgroupV1(root)


def _is_cgroup2(path: str) -> bool:
    from . import _syscalls

    try:
        return _syscalls.statfs_type(path) == CGROUP2_SUPER_MAGIC
    except OSError:
        return False


def new_name() -> str:
    """A cgroup name no other supervisor or plugin will pick."""
    # os.urandom, as secrets.token_hex is, without the secrets module's imports (hmac, hashlib
    # and libcrypto) at every start of the CLI
    return f"sandboxer-{os.getpid()}-{os.urandom(6).hex()}"
