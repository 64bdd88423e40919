"""Compiled seccomp programs kept on disk, so that a process which launches a sandbox (each
``sandboxer exec``, each supervisor's first plugin) does not compile the same profile again.

Compiling costs libseccomp's import through pyseccomp (ctypes.util runs ldconfig), the
parsing of the groups file and libseccomp's work: ~30 ms per process here. A program on disk
is found by a key over everything that shapes it: the profile's and the groups file's
contents, the network flag, the compiler (``seccomp.py``) and pyseccomp's sources, the
libseccomp this process maps (version, file, inode, size, mtime), the machine and the
running kernel. An entry is used only if its directory and the file are the euid's own and
writable by no one else, the file is a regular one reached through no link, and its header
names the key and the SHA-256 of the program that follows; anything else is a miss, and the
program is compiled as if there were no cache. Writes go to a temporary file renamed into
place, so a reader never sees half an entry.

Where: ``/run/sandboxer/seccomp`` as root; ``$XDG_RUNTIME_DIR/sandboxer/seccomp`` for
another user when that directory is theirs alone; else nowhere (every process compiles).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
import stat

from ..errors import PluginLoadError
from .profiles import groups_path, load_profile

__all__ = ["filter_for", "CACHE_FORMAT"]

log = logging.getLogger(__name__)

CACHE_FORMAT = b"sandboxer-seccomp-1"
# The ABI pyseccomp binds (it asks ctypes.util.find_library("seccomp"), which answers with
# this soname); loaded here by that name, without ldconfig.
_SONAME = "libseccomp.so.2"
_MAX_PROGRAM = 4096 * 8  # the kernel's BPF_MAXINSNS, in bytes
_MAX_ENTRIES = 64  # profiles times network flags times libseccomp versions a host sees
_SUFFIX = ".bpf"

# Compiled or read in this process, by key: the same bytes object for every launch.
_memo: dict[str, bytes] = {}


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


def _mapped_libseccomp() -> str | None:
    """The libseccomp file this process maps, as ``path dev inode size mtime``; None unless
    exactly one is mapped and the file at its path is still that one."""
    found = set()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.rstrip("\n").split(maxsplit=5)
            if len(fields) == 6 and os.path.basename(fields[5]).startswith("libseccomp.so"):
                found.add((fields[5], fields[3], int(fields[4])))
    if len(found) != 1:
        return None
    path, device, inode = found.pop()
    major, minor = (int(part, 16) for part in device.split(":"))
    st = os.stat(path)
    if (st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)) != (inode, major, minor):
        return None  # replaced on disk since it was loaded, or "(deleted)"
    return f"{path} {device} {inode} {st.st_size} {st.st_mtime_ns}"


@functools.cache
def _libseccomp() -> str | None:
    """libseccomp's version and file, loaded as pyseccomp loads it; None if it cannot be."""
    try:
        lib = ctypes.CDLL(_SONAME)
    except OSError:
        return None
    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    version = lib.seccomp_version().contents
    mapped = _mapped_libseccomp()
    if mapped is None:
        return None
    return f"{version.major}.{version.minor}.{version.micro} {mapped}"


@functools.cache
def _compiler() -> bytes:
    """The sources that turn a profile into a program: ours and pyseccomp's."""
    spec = importlib.util.find_spec("pyseccomp")
    if spec is None or spec.origin is None:
        raise OSError("pyseccomp is not installed")
    h = hashlib.sha256()
    for path in (os.path.join(os.path.dirname(__file__), "seccomp.py"), spec.origin):
        with open(path, "rb") as f:
            h.update(f.read())
    return h.digest()


def _key(profile_path: str, network: bool) -> str | None:
    """The hex key of the program for this profile file; None when libseccomp cannot be
    told apart (then nothing is cached)."""
    library = _libseccomp()
    if library is None:
        return None
    machine = os.uname()
    h = hashlib.sha256(CACHE_FORMAT + b"\0")
    for part in (
        _compiler(),
        library.encode(),
        f"{machine.machine} {machine.release} {machine.version}".encode(),
        b"network" if network else b"no network",
    ):
        h.update(len(part).to_bytes(8, "little") + part)
    for path in (profile_path, groups_path(profile_path)):
        with open(path, "rb") as f:
            content = f.read()
        h.update(len(content).to_bytes(8, "little") + content)
    return h.hexdigest()


def _directory() -> str | None:
    """Where entries live for this euid (see the module docstring), or None."""
    if os.geteuid() == 0:
        return "/run/sandboxer/seccomp"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if not xdg or not os.path.isabs(xdg):
        return None
    try:
        st = os.stat(xdg)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return None
    return os.path.join(xdg, "sandboxer", "seccomp")


def _own(st: os.stat_result) -> bool:
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _open_directory(path: str, *, create: bool) -> int | None:
    """An fd of the cache directory if it is the euid's own and no one else's to write."""
    if create:
        for part in (os.path.dirname(path), path):
            try:
                os.mkdir(part, 0o700 if part == path else 0o755)
            except FileExistsError:
                pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    if not _own(os.fstat(fd)):
        os.close(fd)
        return None
    return fd


def _entry(key: str, program: bytes) -> bytes:
    digest = hashlib.sha256(program).hexdigest()
    return b"%s %s %s\n" % (CACHE_FORMAT, key.encode(), digest.encode()) + program


def _load(where: str, key: str) -> bytes | None:
    directory = _open_directory(where, create=False)
    if directory is None:
        return None
    try:
        return _read(directory, key)
    finally:
        os.close(directory)


def _store(where: str, key: str, program: bytes) -> None:
    directory = _open_directory(where, create=True)
    if directory is None:
        return
    try:
        _write(directory, key, program)
    finally:
        os.close(directory)


def _read(directory: int, key: str) -> bytes | None:
    try:
        fd = os.open(key + _SUFFIX, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=directory)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _own(st) or st.st_size > _MAX_PROGRAM + 256:
            return None
        data = os.read(fd, _MAX_PROGRAM + 257)
    finally:
        os.close(fd)
    program = data.partition(b"\n")[2]
    if not program or len(program) % 8 or len(program) > _MAX_PROGRAM:
        return None
    return program if data == _entry(key, program) else None


def _write(directory: int, key: str, program: bytes) -> None:
    temporary = f".{key}.{os.getpid()}.tmp"
    fd = os.open(
        temporary,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=directory,
    )
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_entry(key, program))
        os.rename(temporary, key + _SUFFIX, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        os.unlink(temporary, dir_fd=directory)
        raise
    _prune(directory)


def _prune(directory: int) -> None:
    """At most ``_MAX_ENTRIES`` entries: the least recently written go first."""
    names = [n for n in os.listdir(directory) if n.endswith(_SUFFIX)]
    if len(names) <= _MAX_ENTRIES:
        return
    written = sorted(names, key=lambda n: os.stat(n, dir_fd=directory).st_mtime_ns)
    for name in written[: len(names) - _MAX_ENTRIES]:
        os.unlink(name, dir_fd=directory)


def filter_for(profile: str, *, network: bool, extra_dirs: tuple[str, ...] = ()) -> bytes:
    """The program ``seccomp.compile_filter(profile, ...)`` returns, from the cache when it
    holds one made from exactly the same inputs; else compiled and stored. Errors are
    compile_filter's: whatever is off about the cache (or the profile) means "compile"."""
    try:
        profile_path = load_profile(profile, extra_dirs).path
        key = _key(profile_path, bool(network))
    except (PluginLoadError, OSError):
        key = None
    if key is not None and key in _memo:
        return _memo[key]
    where = _directory() if key is not None else None
    if key is not None and where is not None:
        try:
            program = _load(where, key)
        except OSError as exc:
            log.debug("seccomp cache: cannot read %s (%s); compiling", where, exc)
            program = None
        if program is not None:
            _memo[key] = program
            return program
    from .seccomp import compile_filter

    program = compile_filter(profile, network=network, extra_dirs=extra_dirs)
    if key is None or where is None:
        return program
    # Stored only if the key still describes what compiled it: pyseccomp mapped the same
    # libseccomp as this module (two mapped: no key), and no input changed meanwhile.
    _libseccomp.cache_clear()
    try:
        if _key(profile_path, bool(network)) != key:
            return program
        _memo[key] = program
        _store(where, key, program)
    except OSError as exc:
        log.debug("seccomp cache: cannot store in %s (%s)", where, exc)
    return program
