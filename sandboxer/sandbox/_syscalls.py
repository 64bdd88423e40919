"""The Linux system calls the sandbox needs that Python's os module lacks, via ctypes.

One function per call, named as in its man page; each raises OSError with the errno on
failure, never returns an error code. x86-64 numbers are used where glibc has no wrapper
(mount_setattr, pivot_root, close_range); other architectures fail closed at import.
"""

from __future__ import annotations

import ctypes
import os

__all__ = [
    "CLONE_NEWNS",
    "CLONE_NEWCGROUP",
    "CLONE_NEWUTS",
    "CLONE_NEWIPC",
    "CLONE_NEWUSER",
    "CLONE_NEWPID",
    "CLONE_NEWNET",
    "MS_RDONLY",
    "MS_NOSUID",
    "MS_NODEV",
    "MS_NOEXEC",
    "MS_REMOUNT",
    "MS_BIND",
    "MS_MOVE",
    "MS_REC",
    "MS_PRIVATE",
    "MS_SLAVE",
    "MNT_DETACH",
    "MOUNT_ATTR_RDONLY",
    "MOUNT_ATTR_NOSUID",
    "MOUNT_ATTR_NODEV",
    "MOUNT_ATTR_NOEXEC",
    "RESOLVE_NO_XDEV",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "RESOLVE_BENEATH",
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "mount_setattr",
    "close_range",
    "openat2",
    "open_tree",
    "move_mount",
    "mount_setattr_fd",
    "mount_setattr_idmap",
    "sethostname",
    "capset_empty",
    "capget",
    "loopback_up",
    "fork_sibling",
    "seccomp_filter_listener",
    "seccomp_notif_sizes",
    "SECCOMP_RET_USER_NOTIF",
]

if os.uname().machine != "x86_64":  # syscall numbers below are x86-64's
    raise ImportError(f"sandboxer's sandbox supports x86_64 only, not {os.uname().machine}")

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2

MOUNT_ATTR_RDONLY = 0x00000001
MOUNT_ATTR_NOSUID = 0x00000002
MOUNT_ATTR_NODEV = 0x00000004
MOUNT_ATTR_NOEXEC = 0x00000008
AT_RECURSIVE = 0x8000
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000

# openat2(2)'s resolve flags.
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x04
MOVE_MOUNT_T_EMPTY_PATH = 0x40

SYS_pivot_root = 155
SYS_clone3 = 435
SYS_open_tree = 428
SYS_move_mount = 429
SYS_close_range = 436
SYS_openat2 = 437
SYS_mount_setattr = 442
SYS_seccomp = 317

# seccomp(2): operations, the listener flag, and the filter return value that hands a call to
# the listener (include/uapi/linux/seccomp.h).
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_NOTIF_SIZES = 3
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_RET_USER_NOTIF = 0x7FC00000

# The C library the interpreter itself is linked with (dlopen(NULL)): no ctypes.util.find_library,
# which runs ldconfig in a subprocess at every launcher start.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _check(result: int, what: str, path: str | None = None) -> int:
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}", path)
    return result


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def statfs_type(path: str) -> int:
    """statfs(2)'s f_type: which filesystem ``path`` is on."""
    buf = _Statfs()
    _check(_libc.statfs(os.fsencode(path), ctypes.byref(buf)), "statfs", path)
    return int(buf.f_type)


def setns(fd: int, nstype: int) -> None:
    """Move the calling thread into the namespace ``fd`` refers to (a pidfd: that process's)."""
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def unshare(flags: int) -> None:
    """unshare(2)."""
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None
) -> None:
    """mount(2)."""
    _check(
        _libc.mount(_b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data)),
        "mount",
        target,
    )


def umount2(target: str, flags: int) -> None:
    """umount2(2)."""
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), "umount2", target)


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2)."""
    _check(
        _libc.syscall(ctypes.c_long(SYS_pivot_root), _b(new_root), _b(put_old)),
        "pivot_root",
        new_root,
    )


def mount_setattr(path: str, attr_set: int, *, recursive: bool = True) -> None:
    """mount_setattr(2): set ``attr_set`` on the mount at ``path`` (and every mount below)."""
    attr = _MountAttr(attr_set, 0, 0, 0)
    flags = AT_RECURSIVE if recursive else 0
    _check(
        _libc.syscall(
            ctypes.c_long(SYS_mount_setattr),
            ctypes.c_int(AT_FDCWD),
            _b(path),
            ctypes.c_uint(flags),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        "mount_setattr",
        path,
    )


def mount_setattr_fd(fd: int, attr_set: int) -> None:
    """mount_setattr(2) on the mount ``fd`` refers to (a detached tree from ``open_tree``, say)
    and every mount below it: ``attr_set``, and private propagation (a clone of a shared mount
    would otherwise stay in its peer group and see the host's mount events)."""
    attr = _MountAttr(attr_set, 0, MS_PRIVATE, 0)
    _check(
        _libc.syscall(
            ctypes.c_long(SYS_mount_setattr),
            ctypes.c_int(fd),
            b"",
            ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        "mount_setattr",
    )


MOUNT_ATTR_IDMAP = 0x00100000


def mount_setattr_idmap(fd: int, userns_fd: int) -> None:
    """mount_setattr(2) with MOUNT_ATTR_IDMAP on the detached tree ``fd`` (and every mount
    below it): its ids are read through the user namespace ``userns_fd``'s maps."""
    attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns_fd)
    _check(
        _libc.syscall(
            ctypes.c_long(SYS_mount_setattr),
            ctypes.c_int(fd),
            b"",
            ctypes.c_uint(AT_EMPTY_PATH | AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        "mount_setattr",
    )


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2): open ``path`` relative to ``dirfd`` under the ``resolve`` restrictions.
    ``flags`` always gets O_CLOEXEC."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    return _check(
        _libc.syscall(
            ctypes.c_long(SYS_openat2),
            ctypes.c_int(dirfd),
            os.fsencode(path),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        ),
        "openat2",
        path,
    )


def open_tree(fd: int) -> int:
    """open_tree(2) with OPEN_TREE_CLONE | AT_RECURSIVE on what ``fd`` refers to: a detached
    copy of that mount tree, to be attached elsewhere with ``move_mount``. The source must be
    in the caller's mount namespace."""
    return _check(
        _libc.syscall(
            ctypes.c_long(SYS_open_tree),
            ctypes.c_int(fd),
            b"",
            ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH | AT_RECURSIVE),
        ),
        "open_tree",
    )


def move_mount(tree: int, target: int) -> None:
    """move_mount(2): attach the detached tree ``tree`` on the object ``target`` refers to."""
    _check(
        _libc.syscall(
            ctypes.c_long(SYS_move_mount),
            ctypes.c_int(tree),
            b"",
            ctypes.c_int(target),
            b"",
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH),
        ),
        "move_mount",
    )


def close_range(first: int, last: int = 0xFFFFFFFF) -> None:
    """close_range(2) with no flags: close every fd from ``first`` to ``last``."""
    _check(
        _libc.syscall(
            ctypes.c_long(SYS_close_range),
            ctypes.c_uint(first),
            ctypes.c_uint(last),
            ctypes.c_uint(0),
        ),
        "close_range",
    )


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def capset_empty() -> None:
    """capset(2) with empty effective, permitted and inheritable sets for this thread."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def capget() -> tuple[int, int, int]:
    """capget(2): (effective, permitted, inheritable) of this thread as 64-bit masks."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(header), data), "capget")
    return tuple(
        data[0].__getattribute__(f) | (data[1].__getattribute__(f) << 32)
        for f in ("effective", "permitted", "inheritable")
    )


def sethostname(name: str) -> None:
    """sethostname(2)."""
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname")


SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def loopback_up() -> None:
    """ioctl(SIOCSIFFLAGS, IFF_UP) on ``lo`` in this net namespace (netdevice(7)): a new net
    namespace's loopback starts down and has no 127.0.0.1 until it is up."""
    import fcntl
    import socket
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(s, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | IFF_UP))


CLONE_PARENT = 0x00008000


class _CloneArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags",
            "pidfd",
            "child_tid",
            "parent_tid",
            "exit_signal",
            "stack",
            "stack_size",
            "tls",
            "set_tid",
            "set_tid_size",
            "cgroup",
        )
    ]


# The same C library through ctypes.PyDLL: a call that keeps the interpreter's lock, as a
# fork must (the child resumes in the middle of this call, holding it).
_libc_gil = ctypes.PyDLL(None, use_errno=True)
_libc_gil.syscall.restype = ctypes.c_long


def fork_sibling() -> int:
    """clone3(2) with CLONE_PARENT, wrapped in the interpreter's fork hooks as os.fork() is:
    a copy of this single-threaded process whose parent is this process's parent (so the
    caller's parent reaps it, watches it through a pidfd and gets its SIGCHLD). Returns 0 in
    the child, the child's pid in the caller."""
    # exit_signal stays 0: with CLONE_PARENT the kernel takes the caller's own (SIGCHLD) and
    # refuses any other.
    args = _CloneArgs(flags=CLONE_PARENT)
    ctypes.pythonapi.PyOS_BeforeFork()
    pid = _libc_gil.syscall(
        ctypes.c_long(SYS_clone3), ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args))
    )
    if pid == 0:
        ctypes.pythonapi.PyOS_AfterFork_Child()
        return 0
    errno = ctypes.get_errno()
    ctypes.pythonapi.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(errno, f"clone3: {os.strerror(errno)}")
    return int(pid)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]


def seccomp_filter_listener(program: bytes) -> int:
    """seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, prog): load the
    classic-BPF ``program`` (needs no_new_privs or CAP_SYS_ADMIN) and return the fd of its
    user-notification listener (close-on-exec, as the kernel makes it)."""
    prog = _SockFprog(len(program) // 8, program)
    return _check(
        _libc.syscall(
            ctypes.c_long(SYS_seccomp),
            ctypes.c_uint(SECCOMP_SET_MODE_FILTER),
            ctypes.c_uint(SECCOMP_FILTER_FLAG_NEW_LISTENER),
            ctypes.byref(prog),
        ),
        "seccomp",
    )


class _NotifSizes(ctypes.Structure):
    _fields_ = [
        ("seccomp_notif", ctypes.c_uint16),
        ("seccomp_notif_resp", ctypes.c_uint16),
        ("seccomp_data", ctypes.c_uint16),
    ]


def seccomp_notif_sizes() -> tuple[int, int, int]:
    """seccomp(SECCOMP_GET_NOTIF_SIZES): the kernel's sizes of struct seccomp_notif,
    seccomp_notif_resp and seccomp_data (OSError EINVAL on a kernel without user
    notification, before 5.0)."""
    sizes = _NotifSizes()
    _check(
        _libc.syscall(
            ctypes.c_long(SYS_seccomp),
            ctypes.c_uint(SECCOMP_GET_NOTIF_SIZES),
            ctypes.c_uint(0),
            ctypes.byref(sizes),
        ),
        "seccomp",
    )
    return sizes.seccomp_notif, sizes.seccomp_notif_resp, sizes.seccomp_data
