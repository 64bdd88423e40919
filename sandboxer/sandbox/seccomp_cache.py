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
place, so a reader never sees half an entry. Those rules, and the eviction (at most
``_MAX_ENTRIES``, the least recently used first), are ``_disk_cache.py``'s, shared with the
compiled wasm modules' cache.

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

from .. import _disk_cache
from ..errors import PluginLoadError, SandboxUnavailable
from .denials import available
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


@functools.cache
def _libseccomp() -> str | None:
    """libseccomp's version and file, loaded as pyseccomp loads it; None if it cannot be."""
    try:
        lib = ctypes.CDLL(_SONAME)
    except OSError:
        return None
    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    version = lib.seccomp_version().contents
    mapped = _disk_cache.mapped_file("libseccomp.so")
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


def _key(profile_path: str, network: bool, mode: str) -> str | None:
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
        mode.encode(),
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


def _cache(where: str) -> _disk_cache.DiskCache:
    return _disk_cache.DiskCache(
        where,
        format=CACHE_FORMAT,
        suffix=_SUFFIX,
        max_payload=_MAX_PROGRAM,
        max_entries=_MAX_ENTRIES,
    )


def _entry(key: str, program: bytes) -> bytes:
    return _disk_cache.entry(CACHE_FORMAT, key, program)


def _load(where: str, key: str) -> bytes | None:
    program = _cache(where).load(key)
    if not program or len(program) % 8:
        return None  # not a BPF program: the owner wrote it so; compile
    return program


def _store(where: str, key: str, program: bytes) -> None:
    _cache(where).store(key, program)


def filter_for(
    profile: str, *, network: bool, extra_dirs: tuple[str, ...] = (), learn: bool = False
) -> bytes:
    """The program ``seccomp.compile_filter(profile, ...)`` returns, from the cache when it
    holds one made from exactly the same inputs; else compiled and stored. Errors are
    compile_filter's: whatever is off about the cache (or the profile) means "compile".

    Its mode: "explain" (denials go to the supervisor, sandbox/denials.py) where the kernel
    has seccomp user notification, else "plain"; "learn" with ``learn``, which needs it."""
    why_not = available()
    if learn and why_not is not None:
        raise SandboxUnavailable(
            f"learn mode needs seccomp user notification: {why_not}",
            missing="seccomp user notification",
        )
    mode = "learn" if learn else "explain" if why_not is None else "plain"
    try:
        profile_path = load_profile(profile, extra_dirs).path
        key = _key(profile_path, bool(network), mode)
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

    program = compile_filter(profile, network=network, extra_dirs=extra_dirs, mode=mode)
    if key is None or where is None:
        return program
    # Stored only if the key still describes what compiled it: pyseccomp mapped the same
    # libseccomp as this module (two mapped: no key), and no input changed meanwhile.
    _libseccomp.cache_clear()
    try:
        if _key(profile_path, bool(network), mode) != key:
            return program
        _memo[key] = program
        _store(where, key, program)
    except OSError as exc:
        log.debug("seccomp cache: cannot store in %s (%s)", where, exc)
    return program
