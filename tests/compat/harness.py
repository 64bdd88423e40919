"""One program, run outside and under ``sandboxer exec`` (default profile), compared.

The rule (issue 17): ordinary programs run under the default profile as they do outside,
with the same exit status, stdout and stderr, except what the profile denies on purpose and
docs/profiles.md says so. Every other difference is a sandboxer bug. A test may tolerate a
difference only by naming it (a ``Tolerated``) with its reason.

The outside run is the baseline: what an ordinary user of this host sees. It differs from
the sandbox only where the comparison would otherwise be unfair to either side:

- it runs as an ordinary account, uid 1000 (``setpriv``), not as root (the suite runs as
  root): the sandbox runs programs as uid 1000, and a root baseline would differ wherever a
  program checks for root;
- it gets the environment ``sandboxer exec`` gives (PATH, HOME=/tmp, LANG=C.UTF-8,
  TERM=dumb), every signal at its default action (``env --default-signal``: what a login
  shell gives its commands), stdin from /dev/null unless a test pipes something in, pipes
  of its own for stdin, stdout and stderr (so it may reopen them, as /dev/stderr), no
  controlling terminal (a session of its own), and fds 0-2 only;
- it runs in a private mount namespace with an empty tmpfs of its own on /tmp, its cwd: the
  same paths the sandbox has, so output naming files in /tmp compares as it is. Nothing else
  of the host is hidden: /usr, /etc, /dev, /proc and the network are the host's.

The sandboxer side is ``python -m sandboxer.cli exec`` as a user types it (with
``--timeout`` as long as the run may take: the harness, not the profile's 30 s call timeout,
bounds a run), also with every signal at its default action and the same stdin. After
it exits, nothing of the sandbox may be left: no cgroup of that sandboxer process, and (see
``nothing_left``) no process.
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from sandboxer.sandbox.ids import FIRST_UID as SANDBOX_HOST_UIDS  # rootful sandboxes' uids
from sandboxer.sandbox.spec import SANDBOX_UID  # who programs run as inside: the baseline too

SANDBOX_NAME = "sandbox"  # the sandbox uid's name in its /etc/passwd, and its hostname
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
       "TERM": "dumb"}
# The baseline's private /tmp; then the ordinary user, the sandbox's environment, default
# signal dispositions. ``exec`` all the way, so the program is the process Popen waits for
# and its status (a signal included) is the program's own.
_OUTSIDE = ("mount -t tmpfs -o mode=1777,nosuid,nodev compat-tmp /tmp && cd /tmp && "
            "exec setpriv --reuid={uid} --regid={gid} --clear-groups -- "
            "env -i --default-signal {env} \"$@\"")
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class Ran:
    """One run: the exit status as a shell reports it (128+N for a signal N), its output."""

    where: str  # "outside" or "inside"
    argv: tuple[str, ...]
    status: int
    stdout: str
    stderr: str
    seconds: float
    # Inside only: sandboxer exec's last stderr line when the filter refused anything
    # ("sandboxer: denied: ..."), taken out of ``stderr``: sandboxer's report, not the
    # program's output, which is what outside and inside must share.
    denied: str = ""


@dataclass(frozen=True)
class Tolerated:
    """A difference a test accepts, named, with its reason: rewrites of the baseline's
    output that turn the host's value into the one the sandbox must show, so the sandbox's
    value is still checked exactly."""

    name: str
    reason: str
    outside: tuple[tuple[str, str], ...]  # (regex, replacement), multiline

    def apply(self, text: str, where: str) -> str:
        if where == "outside":
            for pattern, replacement in self.outside:
                text = re.sub(pattern, replacement, text, flags=re.M)
        return text


def baseline_user() -> pwd.struct_passwd:
    try:
        return pwd.getpwuid(SANDBOX_UID)
    except KeyError:
        raise RuntimeError(
            f"the compat suite runs its baseline as an ordinary account of uid {SANDBOX_UID} "
            f"(the sandbox's uid), and this host has none: add one, e.g. "
            f"`useradd -u {SANDBOX_UID} compat`") from None


HOSTNAME = Tolerated(
    "hostname", "the sandbox has a UTS namespace of its own, named 'sandbox' (DESIGN "
    "section 6, step 2; the launcher's set_hostname)",
    outside=((rf"\b{re.escape(socket.gethostname())}\b", SANDBOX_NAME),))


def username() -> Tolerated:
    user = baseline_user()
    return Tolerated(
        "username", f"uid {SANDBOX_UID} is '{user.pw_name}' on this host and 'sandbox' in "
        "the sandbox's generated /etc/passwd, with the same uid",
        outside=((rf"\b{re.escape(user.pw_name)}\b", SANDBOX_NAME),))


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _communicate(proc: subprocess.Popen[bytes], timeout: float,
                 stdin: bytes | None) -> tuple[bytes, bytes]:
    try:
        return proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the program and its children
        out, err = proc.communicate()
        raise AssertionError(f"{proc.args!r} ran past {timeout} s; its output so far:\n"
                             f"{out.decode(errors='replace')[-3000:]}\n"
                             f"{err.decode(errors='replace')[-3000:]}") from None


def run_outside(argv: Sequence[str], *, timeout: float = 60, uid: int | None = None,
                gid: int | None = None, stdin: bytes | None = None) -> Ran:
    """``argv`` as the ordinary user (or ``uid``/``gid``) runs it on this host; ``stdin``
    is piped in (else stdin is /dev/null)."""
    user = baseline_user()
    uid = user.pw_uid if uid is None else uid
    gid = user.pw_gid if gid is None else gid
    env = " ".join(f"{k}={v}" for k, v in ENV.items())
    script = _OUTSIDE.format(uid=uid, gid=gid, env=env)
    # The user's own pipes, as a shell of theirs makes them: a pipe belongs to whoever made
    # it (mode 0600), and a program reopening it by name (/dev/stdout, /dev/stderr,
    # /dev/stdin: `echo oops > /dev/stderr`) needs to be its owner.
    pipes = [os.pipe() for _ in range(3)]
    for read_end, _ in pipes:
        os.fchown(read_end, uid, gid)  # one inode for both ends
    (in_r, in_w), (out_r, out_w), (err_r, err_w) = pipes
    started = time.monotonic()
    try:
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--",
                                 "sh", "-c", script, "sh", *argv],
                                stdin=subprocess.DEVNULL if stdin is None else in_r,
                                stdout=out_w, stderr=err_w, start_new_session=True,
                                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    except BaseException:
        for fd in (in_w, out_r, err_r):
            os.close(fd)
        raise
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)
    # Our ends, where communicate() looks for them (as if Popen had made the pipes).
    proc.stdin = open(in_w, "wb") if stdin is not None else None
    if stdin is None:
        os.close(in_w)
    proc.stdout, proc.stderr = open(out_r, "rb"), open(err_r, "rb")
    out, err = _communicate(proc, timeout, stdin)
    return Ran("outside", tuple(argv), _status(proc.returncode), out.decode(errors="replace"),
               err.decode(errors="replace"), time.monotonic() - started)


def run_inside(argv: Sequence[str], *, timeout: float = 60, allow: Sequence[str] = (),
               stdin: bytes | None = None) -> Ran:
    """``sandboxer exec [--allow-path P]... -- argv`` with the default profile; ``stdin``
    is piped into sandboxer exec (else its stdin is /dev/null)."""
    options = [f"--allow-path={path}" for path in allow]
    command = ["env", "--default-signal", sys.executable, "-m", "sandboxer.cli", "exec",
               f"--timeout={int(timeout) + 30}s", *options, "--", *argv]
    started = time.monotonic()
    proc = subprocess.Popen(command,
                            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True, env={**os.environ, "TERM": ENV["TERM"]})
    out, err = _communicate(proc, timeout + 30, stdin)
    left = sandbox_cgroups(proc.pid)
    assert not left, f"sandboxer exec (pid {proc.pid}) left its cgroups behind: {left}"
    stderr, denied = err.decode(errors="replace"), ""
    head, _, last = stderr.rstrip("\n").rpartition("\n")
    if last.startswith("sandboxer: denied: "):
        stderr, denied = (head + "\n" if head else ""), last
    return Ran("inside", tuple(argv), _status(proc.returncode), out.decode(errors="replace"),
               stderr, time.monotonic() - started, denied)


def differences(outside: Ran, inside: Ran, tolerated: Sequence[Tolerated] = ()) -> str:
    """'' when the runs match once the tolerated differences are applied; else a diff."""
    def view(ran: Ran) -> list[str]:
        lines = [f"exit status {ran.status}", "--- stdout"] + ran.stdout.splitlines() + \
            ["--- stderr"] + ran.stderr.splitlines()
        text = "\n".join(lines)
        for tolerance in tolerated:
            text = tolerance.apply(text, ran.where)
        return text.splitlines()

    diff = list(difflib.unified_diff(view(outside), view(inside), "outside", "inside",
                                     lineterm="", n=2))
    return "\n".join(diff)


def same(argv: Sequence[str], *, tolerated: Sequence[Tolerated] = (), timeout: float = 60,
         allow: Sequence[str] = (), stdin: bytes | None = None) -> tuple[Ran, Ran]:
    """Run ``argv`` outside and inside; fail with a diff unless they match."""
    outside = run_outside(argv, timeout=timeout, stdin=stdin)
    inside = run_inside(argv, timeout=timeout, allow=allow, stdin=stdin)
    diff = differences(outside, inside, tolerated)
    named = ", ".join(t.name for t in tolerated) or "none"
    assert not diff, f"{list(argv)!r} differs under sandboxer exec (tolerated: {named}):\n{diff}"
    return outside, inside


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


# -- nothing left behind ------------------------------------------------------------------------

def _own_cgroups() -> list[Path]:
    """Where a child of this process starts, in every hierarchy, and the parent of each (a
    v2 supervisor may move itself into a ``supervisor`` leaf and make its plugins' cgroups
    siblings of it)."""
    places: list[Path] = []
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.strip().split(":", 2)
            mounts = [Path("/sys/fs/cgroup") / c for c in controllers.split(",")] \
                if controllers else [Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")]
            for mount in mounts:
                base = mount / path.lstrip("/")
                places += [p for p in (base, base.parent) if p.is_dir()
                           and p.is_relative_to(mount)]
    return places


def sandbox_cgroups(pid: int) -> list[str]:
    """The cgroups the sandboxer process ``pid`` made that still exist."""
    return sorted({str(d) for place in _own_cgroups() for d in place.glob(f"sandboxer-{pid}-*")})


def _children() -> set[int]:
    kids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError):
            with open(f"/proc/self/task/{task}/children") as f:
                kids.update(int(pid) for pid in f.read().split())
    return kids


def _describe(pid: int) -> tuple[int, str]:
    """(host uid, command line) of a process, or (-1, '') when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            uid = next(int(line.split()[1]) for line in f if line.startswith("Uid:"))
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return uid, f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return -1, ""


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@contextlib.contextmanager
def nothing_left() -> Iterator[None]:
    """Fails if a sandbox leaves a process behind. While the block runs this process is a
    child subreaper, so whatever any run leaves orphaned becomes our child instead of
    init's. At the end every such child is killed and reaped; one of a sandbox (running as a
    sandbox's host uid, or the launcher) fails the test. What an outside run leaves is that
    program's own doing (a pid namespace's init takes its processes with it, the host's
    does not), and is only cleaned up."""
    before = _children()
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    try:
        yield
    finally:
        _prctl(PR_SET_CHILD_SUBREAPER, 0)
        left = _children() - before
        found = {pid: _describe(pid) for pid in left}
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    of_sandboxes = {pid: what for pid, what in found.items()
                    if what[0] >= SANDBOX_HOST_UIDS or "sandboxer" in what[1]}
    assert not of_sandboxes, f"processes left behind by sandboxer exec: {of_sandboxes}"
