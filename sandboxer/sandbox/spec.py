"""What a sandboxed launch is asked to build, checked before any process exists: the
``LaunchSpec``, the mounts it is made of (the system's paths, the grants, the masks over
denied paths) and ``build_spec``, the one JSON line the launcher (``launcher.py``, inside the
new namespaces) reads.

The supervisor's side only: nothing here opens a host path for the sandbox (``sources.py``
does, once) or starts a process (``start.py``). Never put a host path into the launcher's
spec that the launcher would open by name: it gets fds (``Sources``).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PluginLoadError
from .denials import filter_notifies
from .egress import PROXY_HOST, PROXY_PORT, network_mode
from .policy import PathGrant, SandboxConfig
from .profiles import load_profile

if TYPE_CHECKING:
    from .sources import Sources

__all__ = [
    "Mount",
    "Digest",
    "LaunchSpec",
    "SANDBOX_UID",
    "SANDBOX_GID",
    "PLUGIN_MOUNT",
    "base_mounts",
    "grant_mounts",
    "mask_plan",
    "build_spec",
]

SANDBOX_UID = SANDBOX_GID = 1000
# /dev/tty: opening it reaches the caller's controlling terminal, which a sandboxed process
# (a session of its own) does not have: ENXIO, as for any daemon.
DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty")
# Read-only /etc pieces ordinary programs need (dynamic loader, alternatives for cc/node,
# certificates, time zone, name service switch); missing ones are skipped.
_ETC = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/alternatives",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/protocols",
    "/etc/services",
    "/etc/mime.types",
    # what distribution detection, getusershell(3) and man(1) read; nothing host-unique
    # (no machine-id, no hostname: the sandbox has its own)
    "/etc/os-release",
    "/etc/debian_version",
    "/etc/lsb-release",
    "/etc/timezone",
    "/etc/shells",
    "/etc/manpath.config",
)
# Read-only pieces of /sys ordinary programs read: which CPUs there are (glibc's
# get_nprocs, lscpu, thread pools sizing themselves). The rest of sysfs describes the host's
# hardware and kernel, and is not mounted.
_SYS = ("/sys/devices/system/cpu", "/sys/devices/system/node")
# The merged-usr links (/bin -> usr/bin, ...): the sandbox gets the same ones the host has.
MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
# As Docker masks them (moby's oci defaults): kernel state that leaks or acts on the host.
PROC_MASKED = (
    "/acpi",
    "/asound",
    "/kcore",
    "/keys",
    "/latency_stats",
    "/timer_list",
    "/timer_stats",
    "/sched_debug",
    "/scsi",
    "/sysrq-trigger",
)
PROC_READONLY = ("/bus", "/fs", "/irq", "/sys")
PLUGIN_MOUNT = "/plugin"
# RLIMIT_FSIZE: no single file a plugin writes (in a writable grant, say) may pass this.
MAX_FILE_SIZE = 4 << 30


@dataclass(frozen=True, slots=True)
class Digest:
    """A digest a copied tree must have, checked by the launcher over the bytes it wrote into
    the sandbox (launcher_mounts.verify_copy; a mismatch fails the launch, IntegrityError).
    ``path``: "" for the whole tree (its ``sandboxer.checksum``, without "sha256:"; a bare
    file's own sha256), else a file (its sha256) or a directory (its tree checksum) inside;
    ``sha256`` the hex digest; ``what`` who vouches for it, for the error message."""

    path: str
    sha256: str
    what: str

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256, "what": self.what}


@dataclass(frozen=True, slots=True)
class Mount:
    """A host path bound into the sandbox, or a tree copied into it (``LaunchSpec.copies``).
    ``root``: the root a grant is opened beneath, through no link (its path root, or "/" for
    the operator's); None: one of the system's paths, opened as named. ``digests``: a copy's
    expected digests."""

    source: str
    target: str
    writable: bool = False
    exec: bool = True
    root: str | None = None
    digests: tuple[Digest, ...] = ()


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """Everything the launcher needs, validated before any process is started."""

    argv: list[str]
    env: dict[str, str]
    sandbox: SandboxConfig
    mounts: tuple[Mount, ...] = ()
    cwd: str = "/tmp"
    masks: tuple[str, ...] = ()
    pins: tuple[str, ...] = ()
    copies: tuple[Mount, ...] = ()  # trees copied into a private tmpfs (the plugin dir)
    seccomp_bpf: bytes | None = None
    # Learn mode (``sandboxer exec --learn``): the filter is seccomp.py's "learn" one, and the
    # supervisor lets through what some group allows instead of answering EPERM (denials.py).
    seccomp_learn: bool = False
    # The caller reports the denials itself when the program ends (``sandboxer exec``'s
    # summary): each syscall's first denial is then logged at INFO (shown with -v), not as a
    # WARNING interleaved with the program's own stderr.
    denials_summarized: bool = False
    address_space_limit: int | None = None  # RLIMIT_AS, only under the "rlimit" fallback
    # Who a writable grant's files belong to on the host (uid, gid); None: each grant's owner.
    grant_owner: tuple[int, int] | None = None
    rpc: bool = True  # fd 3 is the RPC socket; without it (exec) no fd 3 reaches the program
    program: str | None = None  # the file to exec, when argv[0] is only its name
    files: dict[str, str] = field(default_factory=dict)
    profile_dirs: tuple[str, ...] = ()  # where sandbox.profile is found (HostConfig's)
    # A warm sandbox (sandbox/pool.py): the targets of the copies handed over later, at
    # take time, instead of ``copies`` now; with ``warm_exec`` the program too (its argv,
    # environment and directory come then, and nothing is exec'd before).
    warm: tuple[str, ...] = ()
    warm_exec: bool = False
    # Empty directories made for this sandbox alone (confinement.py: private to the
    # supervisor, bound writable and without exec at these targets, gone with the sandbox);
    # ``Confinement.scratch`` names them on the host. A warm sandbox gets its own.
    scratch: tuple[str, ...] = ()


def base_mounts() -> list[Mount]:
    """/usr and the /etc pieces ordinary programs need. (What a plugin host runs on, the
    interpreter and the sandboxer package, comes from sandbox/runtime.py, at neutral paths.)"""
    return [Mount("/usr", "/usr")] + [Mount(p, p) for p in _ETC + _SYS if os.path.exists(p)]


def grant_mounts(grants: tuple[PathGrant, ...]) -> list[Mount]:
    """Allowed paths at their own path inside; writable ones are data: never executable.
    Each is opened once by ``Sources`` (beneath its root, through no link: sandbox/paths.py)
    and mounted from that fd; a link inside a granted directory resolves against the
    sandbox's root, not the host's."""
    return [
        Mount(g.path, g.path, writable=g.writable, exec=not g.writable, root=g.root or "/")
        for g in grants
    ]


def mask_plan(
    denied: tuple[str, ...], mounts: list[Mount], extra_views: dict[str, str] | None = None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Where to mask each denied path inside the sandbox, and which directories to pin.

    A denied path inside a *writable* grant is the dangerous case: the plugin could create it
    if it does not exist yet, or rename a parent directory to carry the mask away and find the
    file uncovered at the next load. So such a path must exist (else PluginLoadError), and
    every directory between the grant and it is pinned (bound onto itself: a mount point
    cannot be renamed or removed). ``extra_views`` maps other host directories to where the
    sandbox sees them (the plugin directory at /plugin)."""
    masks: list[str] = []
    pins: list[str] = []
    views = {m.source: m for m in mounts}
    for path in denied:
        masks.append(path)
        for host_dir, inside in (extra_views or {}).items():
            if Path(path).is_relative_to(host_dir) and path != host_dir:
                masks.append(f"{inside}/{Path(path).relative_to(host_dir).as_posix()}")
        for mount in views.values():
            if not mount.writable or not Path(path).is_relative_to(mount.target):
                continue
            if not os.path.lexists(path):
                raise PluginLoadError(
                    f"denied path {path} does not exist, and it lies inside the writable "
                    f"allowed path {mount.target}: the plugin could create it; create it "
                    "first, or deny the directory that would hold it"
                )
            rel = Path(path).relative_to(mount.target).parts[:-1]
            for depth in range(1, len(rel) + 1):
                pins.append(str(Path(mount.target, *rel[:depth])))
    return tuple(masks), tuple(dict.fromkeys(pins))


def _files(hostname: str) -> dict[str, str]:
    return {
        "/etc/passwd": f"root:x:0:0:root:/root:/usr/sbin/nologin\n"
        f"sandbox:x:{SANDBOX_UID}:{SANDBOX_GID}:sandbox:/tmp:/bin/sh\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        "/etc/group": f"root:x:0:\nsandbox:x:{SANDBOX_GID}:\nnogroup:x:65534:\n",
        "/etc/hostname": f"{hostname}\n",
        "/etc/hosts": f"127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost\n",
    }


def build_spec(spec: LaunchSpec, sources: Sources) -> dict[str, object]:
    """The spec as the launcher reads it (one JSON line on its control pipe): ``spec``, with
    the paths ``sources`` opened for it named by their place among the fds sent; two mounts
    on one target are refused here."""
    sandbox = spec.sandbox
    mounts = list(spec.mounts)
    targets = [m.target for m in mounts]
    if len(set(targets)) != len(targets):
        raise PluginLoadError(f"two mounts share a target: {sorted(targets)}")
    symlinks = {
        f"/{d}": f"usr/{d}"
        for d in MERGED_USR
        if os.path.islink(f"/{d}") and os.readlink(f"/{d}") == f"usr/{d}"
    }
    writable = [m.target for m in mounts if m.writable]
    return {
        "argv": spec.argv,
        "program": spec.program or spec.argv[0],
        "rpc": spec.rpc,
        "env": spec.env,
        "cwd": spec.cwd,
        "uid": SANDBOX_UID,
        "gid": SANDBOX_GID,
        "hostname": "sandbox",
        "fd_count": len(sources.fds),
        "trees": sources.cloned,
        "binds": sources.binds,
        "copies": sources.copies,
        "symlinks": symlinks,
        "files": {**_files("sandbox"), **spec.files},
        # A mask inside a writable grant must be made: missing, the plugin could create it.
        "masks": [
            {"path": m, "required": any(Path(m).is_relative_to(w) for w in writable)}
            for m in spec.masks
        ],
        "pins": list(spec.pins),
        "warm": list(spec.warm),
        "warm_exec": spec.warm_exec,
        "proc_masked": list(PROC_MASKED),
        "proc_readonly": list(PROC_READONLY),
        "tmp_size": sandbox.tmp_size,
        # From the profile itself, like the seccomp filter, not from the SandboxConfig: a
        # config built by hand with profile="strict" still gets strict's noexec /tmp.
        "tmp_exec": load_profile(sandbox.profile, spec.profile_dirs).tmp_exec,
        "rlimits": {
            "core": 0,
            "nofile": sandbox.nofile,
            "fsize": MAX_FILE_SIZE,
            **({"as": spec.address_space_limit} if spec.address_space_limit else {}),
            **({"nproc": sandbox.pids_limit} if os.geteuid() == 0 else {}),
        },
        "seccomp_bpf": (
            None if spec.seccomp_bpf is None else base64.b64encode(spec.seccomp_bpf).decode()
        ),
        # A filter that notifies is loaded with a listener the launcher sends back (denials.py).
        "seccomp_listener": spec.seccomp_bpf is not None and filter_notifies(spec.seccomp_bpf),
        "network": {"mode": network_mode(sandbox), "host": PROXY_HOST, "port": PROXY_PORT},
    }
