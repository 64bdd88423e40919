"""Seccomp denials, explained: the supervisor's end of a sandbox's seccomp user-notification
listener (SECCOMP_RET_USER_NOTIF, kernel >= 5.0).

A filter compiled in "explain" mode (seccomp.py) hands every call it would answer with the
default EPERM to this listener instead. ``Denials`` reads each notification on the event loop
(SECCOMP_IOCTL_NOTIF_RECV), answers it at once with EPERM (SECCOMP_IOCTL_NOTIF_SEND), counts
it, and logs one line per distinct syscall per generation: the plugin, the syscall's name and
number, its plain-number arguments decoded (socket families, clone flags, ioctl requests) and
the group of seccomp.toml that would allow it. In learn mode (``sandboxer exec --learn``) a
call some group allows is let through (SECCOMP_USER_NOTIF_FLAG_CONTINUE) and recorded instead.

This module must never let a notified call through outside learn mode, and never read the
target's memory: the answer is an error, decided from the syscall number alone, so no pointer
argument can change between a check and the call (no TOCTOU). Nothing here runs on the call
path of allowed syscalls: the kernel never notifies those.
"""

from __future__ import annotations

import asyncio
import errno as _errno
import fcntl
import functools
import logging
import os
import select
import socket
import struct
from collections.abc import Iterable

from . import _syscalls
from .syscall_groups import SyscallGroups

__all__ = [
    "Denials",
    "available",
    "describe",
    "summary",
    "merge",
    "listener_fd_ok",
    "filter_notifies",
]

log = logging.getLogger(__name__)

ACTIONS_AVAIL = "/proc/sys/kernel/seccomp/actions_avail"
# include/uapi/linux/seccomp.h: _IOWR('!', 0, struct seccomp_notif) and
# _IOWR('!', 1, struct seccomp_notif_resp), with the structs' sizes as the header has them.
_NOTIF_RECV = 0xC0502100
_NOTIF_SEND = 0xC0182101
_FLAG_CONTINUE = 1  # SECCOMP_USER_NOTIF_FLAG_CONTINUE: learn mode only
_NOTIF = struct.Struct("<QII iIQ 6Q")  # id, pid, flags, then seccomp_data: nr, arch, ip, args
_RESP = struct.Struct("<QqiI")  # id, val, error, flags
_AUDIT_ARCH_X86_64 = 0xC000003E
DENIED_ERRNO = _errno.EPERM  # seccomp.DEFAULT_ERRNO: what the "plain" filter answers


def available() -> str | None:
    """None if this kernel can hand denials to a listener; else why not."""
    try:
        with open(ACTIONS_AVAIL) as f:
            actions = f.read().split()
    except OSError:
        return "the kernel has no seccomp filter support"
    if "user_notif" not in actions:
        return "the kernel has no seccomp user notification (SECCOMP_RET_USER_NOTIF, Linux 5.0)"
    return None


def listener_fd_ok(fd: int) -> bool:
    """Whether ``fd`` is a seccomp notification listener (what the launcher must send)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:seccomp notify"
    except OSError:
        return False


def filter_notifies(program: bytes) -> bool:
    """Whether the classic-BPF ``program`` can return SECCOMP_RET_USER_NOTIF: then the
    launcher must load it with a listener and hand that over (a notified call with no
    listener would fail ENOSYS instead of EPERM)."""
    for offset in range(0, len(program) - 7, 8):
        code, _, _, k = struct.unpack_from("<HBBI", program, offset)
        if code == 0x06 and k & 0xFFFF0000 == _syscalls.SECCOMP_RET_USER_NOTIF:  # BPF_RET|BPF_K
            return True
    return False


# -- decoding arguments ------------------------------------------------------------------------

_FAMILIES = {int(v): n for n, v in vars(socket).items() if n.startswith("AF_") and n != "AF_UNSPEC"}
_FAMILIES[0] = "AF_UNSPEC"
_FAMILIES[int(socket.AF_UNIX)] = "AF_UNIX"  # not AF_LOCAL
_FAMILIES[int(socket.AF_NETLINK)] = "AF_NETLINK"  # not AF_ROUTE (BSD's alias)
_SOCK_TYPES = {1: "SOCK_STREAM", 2: "SOCK_DGRAM", 3: "SOCK_RAW", 4: "SOCK_RDM", 5: "SOCK_SEQPACKET"}
_SOCK_FLAGS = {0o4000: "SOCK_NONBLOCK", 0o2000000: "SOCK_CLOEXEC"}
_CLONE_FLAGS = {
    0x00000100: "CLONE_VM",
    0x00000200: "CLONE_FS",
    0x00000400: "CLONE_FILES",
    0x00000800: "CLONE_SIGHAND",
    0x00001000: "CLONE_PIDFD",
    0x00002000: "CLONE_PTRACE",
    0x00004000: "CLONE_VFORK",
    0x00008000: "CLONE_PARENT",
    0x00010000: "CLONE_THREAD",
    0x00020000: "CLONE_NEWNS",
    0x00040000: "CLONE_SYSVSEM",
    0x00080000: "CLONE_SETTLS",
    0x00100000: "CLONE_PARENT_SETTID",
    0x00200000: "CLONE_CHILD_CLEARTID",
    0x00800000: "CLONE_UNTRACED",
    0x01000000: "CLONE_CHILD_SETTID",
    0x02000000: "CLONE_NEWCGROUP",
    0x04000000: "CLONE_NEWUTS",
    0x08000000: "CLONE_NEWIPC",
    0x10000000: "CLONE_NEWUSER",
    0x20000000: "CLONE_NEWPID",
    0x40000000: "CLONE_NEWNET",
    0x80000000: "CLONE_IO",
    0x00000080: "CLONE_NEWTIME",
}
_IOCTLS = {
    0x5401: "TCGETS",
    0x5402: "TCSETS",
    0x540F: "TIOCGPGRP",
    0x5410: "TIOCSPGRP",
    0x5412: "TIOCSTI",
    0x5413: "TIOCGWINSZ",
    0x5414: "TIOCSWINSZ",
    0x541B: "FIONREAD",
    0x541C: "TIOCLINUX",
    0x5421: "FIONBIO",
    0x5451: "FIOCLEX",
    0x5450: "FIONCLEX",
}
_SIGNALS = {int(s): s.name for s in __import__("signal").Signals}


def _flags(value: int, names: dict[int, str], rest: str = "{:#x}") -> str:
    parts = [name for bit, name in names.items() if value & bit]
    left = value & ~sum(bit for bit in names if value & bit)
    if left or not parts:
        parts.append(rest.format(left))
    return "|".join(parts)


def _socket_args(args: tuple[int, ...]) -> list[str]:
    family, kind, proto = args[0] & 0xFFFFFFFF, args[1] & 0xFFFFFFFF, args[2] & 0xFFFFFFFF
    base = _SOCK_TYPES.get(kind & 0xF, str(kind & 0xF))
    flags = [name for bit, name in _SOCK_FLAGS.items() if kind & bit]
    return [_FAMILIES.get(family, str(family)), "|".join([base, *flags]), str(proto)]


def _clone_args(args: tuple[int, ...]) -> list[str]:
    flags = args[0] & 0xFFFFFFFFFFFFFFFF
    signal_number = flags & 0x7F  # CSIGNAL, with CLONE_NEWTIME (0x80) above it
    names = _flags(flags & ~0x7F, _CLONE_FLAGS) if flags & ~0x7F else ""
    sig = _SIGNALS.get(signal_number, str(signal_number)) if signal_number else ""
    return ["|".join(p for p in (names, sig) if p) or "0"]


def describe(name: str, args: tuple[int, ...]) -> str:
    """``name(args)`` with the arguments that are plain numbers or flags decoded: socket
    families and types, clone and unshare flags, ioctl requests; pointers are left out."""
    if name in ("socket", "socketpair"):
        shown = _socket_args(args)
    elif name == "clone":
        shown = _clone_args(args)
    elif name == "unshare":
        shown = [_flags(args[0] & 0xFFFFFFFF, _CLONE_FLAGS)]
    elif name == "setns":
        shown = [str(args[0] & 0xFFFFFFFF), _flags(args[1] & 0xFFFFFFFF, _CLONE_FLAGS)]
    elif name == "ioctl":
        request = args[1] & 0xFFFFFFFF
        shown = [str(args[0] & 0xFFFFFFFF), _IOCTLS.get(request, f"{request:#x}")]
    elif name in ("personality", "prctl", "keyctl", "kill", "setuid", "setgid", "bpf"):
        shown = [f"{args[0] & 0xFFFFFFFF:#x}" if name == "personality" else str(args[0])]
    elif name in ("fork", "vfork"):
        shown = []
    else:
        return f"{name}(…)"
    return f"{name}({', '.join(shown)})"


# -- the groups table, loaded once per profile when first needed --------------------------------


@functools.lru_cache(maxsize=16)
def _table(profile: str, dirs: tuple[str, ...]) -> tuple[SyscallGroups, tuple[str, ...]]:
    # Imported here: seccomp.py loads libseccomp (pyseccomp), which a supervisor that never
    # sees a denial should not pay for at start.
    from .seccomp import profile_groups, syscall_groups

    return syscall_groups(profile, dirs), profile_groups(profile, dirs)


@functools.lru_cache(maxsize=1024)
def _name(number: int) -> str:
    from .seccomp import syscall_name

    return syscall_name(number)


class Denials:
    """One generation's listener: answers, counts and explains what its filter refused.

    ``counts`` (syscall name -> calls) and ``explained`` (name -> the phrase logged) cover the
    generation's whole life; ``learned`` (learn mode) maps each call let through to the
    groups that allow it. ``close()`` is idempotent; the kernel then answers any call still
    waiting, and every later one the filter would notify, with ENOSYS."""

    def __init__(
        self,
        listener: int,
        *,
        plugin_id: str,
        logger: logging.Logger,
        profile: str,
        profile_dirs: tuple[str, ...] = (),
        learn: bool = False,
        level: int = logging.WARNING,
    ) -> None:
        self.plugin_id = plugin_id
        self.level = level  # of each syscall's first denial's line
        self.learn = learn
        self.counts: dict[str, int] = {}
        self.explained: dict[str, str] = {}
        self.learned: dict[str, set[tuple[str, ...]]] = {}
        self._log = logger
        self._profile = (profile, profile_dirs)
        self._fd = listener
        notif_size, resp_size, _ = _syscalls.seccomp_notif_sizes()
        self._recv = bytearray(max(notif_size, _NOTIF.size))
        self._resp_size = max(resp_size, _RESP.size)
        self._loop = asyncio.get_running_loop()
        self._poll = select.poll()
        self._loop.add_reader(self._fd, self._readable)

    def rename(self, plugin_id: str, logger: logging.Logger) -> None:
        """Report as ``plugin_id`` from now on (a warm sandbox, once a plugin took it)."""
        self.plugin_id, self._log = plugin_id, logger

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def _readable(self) -> None:
        # Readable is not enough: once every task of the filter is gone the listener polls
        # POLLHUP, and there a RECV blocks for ever on kernels before 6.6 (its semaphore
        # waits for a notification that cannot come), with the event loop inside it. So
        # RECV only with a notification pending (POLLIN); a hang-up with none ends the
        # listener. (A notification withdrawn between the poll and the RECV, its task
        # killed, makes the RECV fail ENOENT: it does not block.)
        self._poll.register(self._fd, select.POLLIN)
        try:
            ((_, events),) = self._poll.poll(0) or ((self._fd, 0),)
        finally:
            self._poll.unregister(self._fd)
        if not events & select.POLLIN:
            if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                self.close()  # no task left to notify anything
            return
        buf = self._recv
        buf[:] = bytes(len(buf))  # the kernel refuses a buffer that is not zeroed
        try:
            fcntl.ioctl(self._fd, _NOTIF_RECV, buf, True)
        except OSError as exc:
            if exc.errno in (_errno.ENOENT, _errno.EINTR, _errno.EAGAIN):
                return  # the caller was killed or interrupted before we read it
            log.error("plugin %s: seccomp listener failed (%s); closing it", self.plugin_id, exc)
            self.close()  # the kernel answers ENOSYS from now on: still refused
            return
        notif_id, _pid, _flags, nr, arch, _ip, *args = _NOTIF.unpack_from(buf)
        name = _name(nr) if arch == _AUDIT_ARCH_X86_64 else f"arch_{arch:#x}_syscall_{nr}"
        call = tuple(args)
        let_through = False
        if self.learn and arch == _AUDIT_ARCH_X86_64:
            table, _ = _table(*self._profile)
            allowing = table.allowing(name, call)
            if allowing:
                let_through = True
                self.learned.setdefault(name, set()).add(tuple(allowing))
        self._answer(notif_id, let_through)
        if not let_through:
            self._record(nr, name, call)

    def _answer(self, notif_id: int, let_through: bool) -> None:
        resp = bytearray(self._resp_size)
        if let_through:
            _RESP.pack_into(resp, 0, notif_id, 0, 0, _FLAG_CONTINUE)
        else:
            _RESP.pack_into(resp, 0, notif_id, 0, -DENIED_ERRNO, 0)
        try:
            fcntl.ioctl(self._fd, _NOTIF_SEND, resp, True)
        except OSError as exc:
            if exc.errno != _errno.ENOENT:  # ENOENT: the caller is gone (killed, interrupted)
                log.error("plugin %s: seccomp answer failed (%s)", self.plugin_id, exc)

    def _record(self, nr: int, name: str, args: tuple[int, ...]) -> None:
        first = name not in self.counts
        self.counts[name] = self.counts.get(name, 0) + 1
        if not first:
            return
        table, chosen = _table(*self._profile)
        why = table.why(name, args, chosen)
        self.explained[name] = why
        self._log.log(
            self.level,
            "plugin %s: seccomp denied %s [syscall %d] with %s: %s",
            self.plugin_id,
            describe(name, args),
            nr,
            _errno.errorcode[DENIED_ERRNO],
            why,
        )


def summary(counts: dict[str, int], explained: dict[str, str]) -> str:
    """The line ``sandboxer exec`` ends with: "denied: keyctl \u00d73 (group keyring, denied
    in every profile), ..."; "" if nothing was denied."""
    if not counts:
        return ""
    times = "\u00d7"  # the multiplication sign, as the issue words it
    parts = [
        f"{name} {times}{n} ({explained[name]})" if name in explained else f"{name} {times}{n}"
        for name, n in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    ]
    return "denied: " + ", ".join(parts)


def merge(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in counts:
        for name, n in part.items():
            out[name] = out.get(name, 0) + n
    return out
