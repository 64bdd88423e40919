"""Compiled WebAssembly modules kept on disk, so that a process does not compile again what
another compiled with the same engine (issue 22: a 20 MB module costs Cranelift seconds).

It must never deserialize bytes it cannot vouch for: wasmtime's ``Module.deserialize`` trusts
its input completely, and a tampered artifact is memory-unsafe in the supervisor (as root).
So an artifact is deserialized only after ``_disk_cache`` has checked the directory, the
file and the header (format, key, digest of the artifact); one that fails is deleted and
the module compiled again. Artifacts are stored detached (the header in an extended
attribute, the file the artifact alone), so the checked file itself is what wasmtime maps
(``deserialize_file`` of the fd that was checked, through /proc/self/fd): a 200 MB artifact
is not copied twice into memory first. The key covers everything that shapes the artifact:
the module's own SHA-256, the wasmtime library file this process maps, every
engine setting (``_engine.ENGINE_SETTINGS``, the one list the engine is configured from),
the machine and the running kernel.

A module file's SHA-256 is remembered too (``remembered``/``remember``), keyed by the file's
device, inode, size, mtime and ctime, so a program run again is not read and hashed again
(69 MB: ~90 ms). The ctime is the kernel's to set: any write to the file, or a new file in
its place, changes the key. Only files whose ctime was at least ``_SETTLED`` seconds old when
they were hashed are remembered (as git does with racily clean files): a write in the same
clock tick as the hash would otherwise leave the key unchanged.

Where: ``/var/cache/sandboxer/wasm`` as root; ``$XDG_CACHE_HOME/sandboxer/wasm`` (else
``~/.cache/sandboxer/wasm``) for another user when that cache directory is theirs and
writable by no one else; else nowhere, and every process compiles. At most ``MAX_BYTES`` in
all, the least recently used out first. A cache that cannot be used is never an error.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pwd
import stat
import time
from collections.abc import Sequence

import wasmtime

from ... import _disk_cache

__all__ = ["FORMAT", "MAX_BYTES", "ModuleCache", "file_identity", "for_this_user", "usage"]

log = logging.getLogger(__name__)

FORMAT = b"sandboxer-wasm-2"
MAX_BYTES = 512 << 20  # every artifact together
_SUFFIX = ".cwasm"
_DIGESTS = b"sandboxer-wasm-digest-1"  # remembered SHA-256s of module files
_DIGEST_SUFFIX = ".sha256"
_MAX_DIGESTS = 4096
_SETTLED = 2.0  # seconds: a file changed more recently than this is hashed every time
_ROOT_DIRECTORY = "/var/cache/sandboxer/wasm"


@functools.cache
def _wasmtime_library() -> str | None:
    """The native wasmtime library this process maps (path, device, inode, size, mtime: a
    new wasmtime installed is a new file); None if it cannot be told apart (then nothing is
    cached). Not the package's version from its metadata: reading that costs ~35 ms a
    process, and the library is what writes and reads artifacts."""
    try:
        return _disk_cache.mapped_file("_libwasmtime.so")
    except OSError:
        return None


def _locate() -> tuple[str | None, str]:
    """Where entries live for this euid (see the module docstring), or None and why not."""
    if os.geteuid() == 0:
        return _ROOT_DIRECTORY, ""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # unset, empty or relative: the XDG default
        home = os.environ.get("HOME") or pwd.getpwuid(os.geteuid()).pw_dir
        base = os.path.join(home, ".cache")
    try:
        st = os.stat(base)
    except OSError as exc:
        return None, f"{base}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode) or not _disk_cache.private_to_euid(st):
        return None, f"{base} is not a directory this user alone may write"
    return os.path.join(base, "sandboxer", "wasm"), ""


def _directory() -> str | None:
    return _locate()[0]


class ModuleCache:
    """The compiled modules of engines configured with ``settings``, in ``directory``."""

    def __init__(self, directory: str, settings: Sequence[tuple[str, object]]) -> None:
        self._disk = _disk_cache.DiskCache(
            directory,
            format=FORMAT,
            suffix=_SUFFIX,
            max_payload=MAX_BYTES,
            max_bytes=MAX_BYTES,
            detached=True,
        )
        self._digests = _disk_cache.DiskCache(
            directory,
            format=_DIGESTS,
            suffix=_DIGEST_SUFFIX,
            max_payload=64,
            max_entries=_MAX_DIGESTS,
        )
        self._settings = repr(tuple(settings)).encode()

    def key(self, digest: str) -> str | None:
        """The hex key of the module whose bytes have the hex sha256 ``digest``, compiled by
        this engine on this host; None when wasmtime's library cannot be told apart."""
        library = _wasmtime_library()
        if library is None:
            return None
        machine = os.uname()
        h = hashlib.sha256(FORMAT + b"\0")
        for part in (
            bytes.fromhex(digest),
            library.encode(),
            self._settings,
            f"{machine.machine} {machine.release} {machine.version}".encode(),
        ):
            h.update(len(part).to_bytes(8, "little") + part)
        return h.hexdigest()

    def load(self, engine: wasmtime.Engine, key: str) -> wasmtime.Module | None:
        """The module stored under ``key``, or None (then compile and ``store``)."""
        try:
            fd = self._disk.open_verified(key)
        except OSError as exc:
            log.debug("wasm cache: cannot read %s (%s); compiling", self._disk.directory, exc)
            return None
        if fd is None:
            return None
        try:
            # The very file checked (an entry is never written in place: writers rename).
            return wasmtime.Module.deserialize_file(engine, f"/proc/self/fd/{fd}")
        except wasmtime.WasmtimeError as exc:
            # Ours and intact, yet refused (wasmtime checks its version, the engine's flags
            # and this CPU's features): compile again, and let the new artifact replace it.
            log.debug("wasm cache: wasmtime refused %s%s (%s)", key, _SUFFIX, exc)
        finally:
            os.close(fd)
        try:
            self._disk.discard(key)
        except OSError as exc:
            log.debug("wasm cache: cannot delete %s%s (%s)", key, _SUFFIX, exc)
        return None

    @staticmethod
    def _file_key(st: os.stat_result) -> str:
        return hashlib.sha256(" ".join(map(str, file_identity(st))).encode()).hexdigest()

    def remembered(self, st: os.stat_result) -> str | None:
        """The SHA-256 of the module file ``st`` describes, if remembered (``remember``)."""
        try:
            digest = self._digests.load(self._file_key(st))
        except OSError:
            return None
        if digest is None or len(digest) != 64:
            return None
        return digest.decode("ascii", "replace")

    def remember(self, st: os.stat_result, digest: str) -> None:
        """Remember ``digest`` for the file ``st`` describes (the fstat of the fd its bytes
        were read from, the same before and after reading); not when it changed lately."""
        if time.time() - st.st_ctime < _SETTLED:
            return
        try:
            self._digests.store(self._file_key(st), digest.encode())
        except OSError as exc:
            log.debug("wasm cache: cannot store in %s (%s)", self._disk.directory, exc)

    def store(self, key: str, module: wasmtime.Module) -> None:
        try:
            self._disk.store(key, module.serialize())
        except (OSError, wasmtime.WasmtimeError) as exc:
            log.debug("wasm cache: cannot store in %s (%s)", self._disk.directory, exc)

    def usage(self) -> _disk_cache.Usage | str:
        return self._disk.usage()


def file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What a remembered digest is keyed on: the file's device, inode, size, mtime and ctime
    (any write, or another file in its place, changes one of them)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def for_this_user(settings: Sequence[tuple[str, object]]) -> ModuleCache | None:
    """The cache of this euid's directory, or None when it has none."""
    where = _directory()
    return None if where is None else ModuleCache(where, settings)


def usage() -> _disk_cache.Usage | str:
    """What this euid's cache holds, or why there is none (for ``sandboxer doctor``)."""
    where = _directory()
    if where is None:
        return _locate()[1] or "no cache directory for this user"
    return ModuleCache(where, ()).usage()
