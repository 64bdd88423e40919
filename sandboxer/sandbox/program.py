"""Any program in the sandbox, as ``sandboxer exec`` runs it: found where it will show
inside (``find_program``), run in its own cgroup (``run``), waited for within its deadline;
a program missing inside, or not runnable there, is the program's fault (PluginLoadError),
not the host's.

The supervisor's side, over ``confinement.launch_confined``; it never hands the program the
caller's stdin unless asked (``stdin``).
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PluginLoadError
from . import child
from .cgroups import CgroupBackend, CgroupStats
from .confinement import launch_confined
from .egress import EgressProxy
from .policy import KILL_GRACE, SETUP_TIMEOUT, SandboxConfig
from .spec import MERGED_USR, LaunchSpec, Mount, base_mounts, grant_mounts, mask_plan
from .start import SandboxSetupError

__all__ = ["run", "RunResult", "find_program", "EXEC_PATH", "KILL_GRACE"]


@dataclass(frozen=True, slots=True)
class RunResult:
    """How a ``run()`` ended: the return code (negative: killed by that signal), what the
    cgroup measured, and whether its deadline stopped it."""

    returncode: int
    stats: CgroupStats | None
    oom_killed: bool
    timed_out: bool = False
    # What the seccomp filter refused (syscall name -> calls) and why (denials.py); None
    # where denials cannot be explained (no seccomp user notification, or a profile that
    # does not allow the listener's handover).
    denied: dict[str, int] | None = None
    explained: dict[str, str] = field(default_factory=dict)
    # Learn mode: each syscall let through -> the alternatives of groups that allow it.
    learned: dict[str, set[tuple[str, ...]]] = field(default_factory=dict)


# The PATH a program finds inside the sandbox (KILL_GRACE, the grace after its deadline, is
# the policy's: the CLI's help names it without importing the launch).
EXEC_PATH = ("/usr/local/bin", "/usr/bin", "/bin")


def _not_found(path: str, why: str = "") -> PluginLoadError:
    return PluginLoadError(
        f"not found inside the sandbox: {path} ({why}grant its directory with --allow-path)"
    )


def _shows_inside(path: str, mounts: list[Mount], denied: tuple[str, ...]) -> bool | None:
    """Whether the host's absolute ``path`` shows at the same path inside a sandbox with
    ``mounts``: lexically, as the launcher builds the root. None for /proc and /dev, which
    are the sandbox's own: only the launch can tell."""
    where = Path(os.path.normpath(path))
    if (
        where.parts[1:2]
        and where.parts[1] in MERGED_USR
        and (
            os.path.islink(f"/{where.parts[1]}")
            and os.readlink(f"/{where.parts[1]}") == f"usr/{where.parts[1]}"
        )
    ):
        where = Path("/usr", *where.parts[1:])  # the sandbox has the same merged-usr links
    if where.is_relative_to("/proc") or where.is_relative_to("/dev"):
        return None
    if any(where.is_relative_to(d) for d in denied):
        return False
    return any(where.is_relative_to(m.target) for m in mounts)


def find_program(name: str, mounts: list[Mount], denied: tuple[str, ...] = ()) -> str:
    """The absolute path ``name`` runs as inside a sandbox with ``mounts`` and ``denied``
    masks. A bare name is looked up on the sandbox's PATH and in the sbin directories, then
    on the caller's PATH (a directory granted to the sandbox can hold it); a relative path is
    relative to the caller's working directory, as a shell reads it (inside, the working
    directory is the empty /tmp). A path
    that cannot show inside, or whose link leads where nothing shows, is refused here with
    "not found inside the sandbox"; what only the launch can tell, its exec step reports the
    same way (``run``)."""
    if "/" not in name:
        first_on_host = None
        for directory in (*EXEC_PATH, "/usr/sbin", "/sbin", *os.environ.get("PATH", "").split(":")):
            candidate = os.path.join(directory, name)
            if (
                not directory.startswith("/")
                or os.path.isdir(candidate)
                or not os.access(candidate, os.X_OK)
            ):
                continue
            first_on_host = first_on_host or candidate
            if _shows_inside(os.path.realpath(candidate), mounts, denied) is not False:
                return candidate
        raise _not_found(first_on_host or name)
    path = os.path.abspath(name)
    shows = _shows_inside(path, mounts, denied)
    if shows is None:
        return path
    if not shows or not os.path.exists(path):
        raise _not_found(path)
    real = os.path.realpath(path)
    if _shows_inside(real, mounts, denied) is False:
        raise _not_found(path, f"a link to {real}; ")
    return path


def _interpreter(path: str) -> str | None:
    """The interpreter a script's ``#!`` line names, if ``path`` is a script."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.read(fd, 256)
    finally:
        os.close(fd)
    if not head.startswith(b"#!"):
        return None
    words = head[2:].split(b"\n", 1)[0].split()
    return words[0].decode(errors="replace") if words else None


def _exec_error(
    error: SandboxSetupError, program: str, shows: bool | None
) -> PluginLoadError | None:
    """The launch's exec step failing on the program itself is the program's fault, not the
    host's (exit 2, not 4): missing inside, or not runnable there. ``shows``: whether the
    program's own path shows inside (``_shows_inside``)."""
    if error.step != "EXEC" or error.path != program:
        return None
    if error.errno in (_errno.ENOENT, _errno.ENOTDIR, _errno.ELOOP):
        interpreter = _interpreter(program) if shows else None
        if interpreter is not None:  # the script is there: its #! line names what is not
            return _not_found(interpreter, f"the interpreter {program} names; ")
        return _not_found(program)
    if error.errno in (_errno.EACCES, _errno.ENOEXEC, _errno.EISDIR):
        return PluginLoadError(
            f"cannot run {program} inside the sandbox: {os.strerror(error.errno)} (it runs "
            "as an unprivileged user; writable grants, and /tmp under the strict profile, "
            "are noexec)"
        )
    return None


async def run(
    argv: list[str],
    sandbox: SandboxConfig,
    *,
    backend: CgroupBackend,
    seccomp_bpf: bytes | None,
    cwd: str = "/tmp",
    sinks: tuple[Callable[[bytes], None], Callable[[bytes], None]] | None = None,
    logger: logging.Logger | None = None,
    egress: EgressProxy | None = None,
    setup_timeout: float = SETUP_TIMEOUT,
    profile_dirs: tuple[str, ...] = (),
    fallbacks: tuple[str, ...] = (),
    grant_owner: tuple[int, int] | None = None,
    stdin: int | None = None,
    timeout: float | None = None,
    kill_grace: float = KILL_GRACE,
    env: dict[str, str] | None = None,
    learn: bool = False,
) -> RunResult:
    """Run any program in the sandbox (``sandboxer exec``) and wait for it; with allowed
    hosts, its egress goes through ``egress`` (logged as plugin "exec").

    ``stdin`` becomes the program's fd 0 (``child.check_stdin``); by default it reads
    /dev/null: a host application's own stdin is not the program's to take. ``timeout``
    bounds the program's run from its exec (the setup has ``setup_timeout``): past it, SIGTERM,
    then SIGKILL ``kill_grace`` seconds later, and ``RunResult.timed_out``. Whatever is left
    in its cgroup dies with it either way. A program missing inside, or not runnable there,
    is a ``PluginLoadError`` ("not found inside the sandbox: PATH ..."). ``env`` adds to
    (or replaces) the environment the program gets (PATH, HOME, LANG, TERM). ``learn``:
    ``seccomp_bpf`` is a "learn" filter (seccomp.py) and what some group allows is let
    through and recorded in ``RunResult.learned``."""
    if stdin is not None:
        child.check_stdin(stdin)  # before any cgroup or process exists
    grants = grant_mounts(sandbox.allowed_paths)
    mounts = base_mounts() + grants
    program = find_program(argv[0], mounts, sandbox.denied_paths)
    masks, pins = mask_plan(sandbox.denied_paths, grants)
    spec = LaunchSpec(
        argv=list(argv),
        program=program,
        rpc=False,
        env={
            "PATH": ":".join(EXEC_PATH),
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "TERM": os.environ.get("TERM", "dumb"),
            **(env or {}),
        },
        sandbox=sandbox,
        mounts=tuple(mounts),
        cwd=cwd,
        masks=masks,
        pins=pins,
        seccomp_bpf=seccomp_bpf,
        seccomp_learn=learn,
        denials_summarized=True,  # in the result (denied, explained): exec's summary line
        profile_dirs=profile_dirs,
        grant_owner=grant_owner,
    )
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    try:
        proc, confinement = await launch_confined(
            spec,
            backend=backend,
            rpc_fd=null,
            sinks=sinks,
            logger=logger or logging.getLogger("sandboxer.exec"),
            egress=egress,
            plugin_id="exec",
            setup_timeout=setup_timeout,
            fallbacks=fallbacks,
            stdin=stdin,
        )
    except SandboxSetupError as exc:
        mapped = _exec_error(exc, program, _shows_inside(program, mounts, sandbox.denied_paths))
        if mapped is None:
            raise
        raise mapped from exc
    finally:
        os.close(null)
    try:
        code = await proc.wait(timeout)
        if code is None:
            await proc.terminate(kill_grace)
        await proc.output_closed(1.0)
        if proc.returncode is None:
            raise RuntimeError(f"{program}: reaped without a return code")
        denials = proc.denials
        return RunResult(
            proc.returncode,
            confinement.stats(),
            confinement.oom_killed(),
            timed_out=code is None,
            denied=None if denials is None else dict(denials.counts),
            explained={} if denials is None else dict(denials.explained),
            learned={} if denials is None else dict(denials.learned),
        )
    finally:
        await proc.close()
        await confinement.aclose()
