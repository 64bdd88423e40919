"""Owner-only caches on disk: what both the compiled seccomp programs
(``sandbox/seccomp_cache.py``) and the compiled WebAssembly modules
(``loaders/wasm/_module_cache.py``) need to keep bytes between processes.

It must never hand back bytes it cannot vouch for. The directory is opened through no link
and must be the euid's own and writable by no one else. An entry is returned only if it is a
regular file reached through no link (one name, opened with O_NOFOLLOW), the euid's own,
writable by no one else, and its header names the cache's format, the key asked for and the
SHA-256 of the bytes after it. An entry of the euid's that fails any of this is deleted; one
that is not the euid's (or a directory) is left alone. Entries are written to a temporary
file and renamed into place, so a reader never sees half of one and two writers of one key
both succeed; a crash that leaves a short file is caught by the digest, not by fsync.

A cache made ``detached`` keeps the header in an extended attribute of the entry
(``user.sandboxer.entry``) and the payload alone in the file, so that a caller can map the
file itself (wasmtime's ``deserialize_file``) once ``open_verified`` has checked it; its
digest is the SHA-256 of the SHA-256s of the payload's 8 MiB chunks, which threads compute
side by side over a mapping of the file (a 200 MB artifact: one read of the page cache, no
copy). An open entry never changes: writers only ever rename a new file into place.

What to key on, where the directory lives and what a miss means are the callers' business;
this module raises ``OSError`` for what it cannot do and leaves "a cache that cannot be used
is never an error" to them.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["DiskCache", "Usage", "chunked_sha256", "entry", "private_to_euid", "mapped_file"]

HEADER_MAX = 256  # the header line's bound: a format name, a key and a hex SHA-256
_STALE_TEMPORARY = 600.0  # seconds: a temporary this old was left by a writer that died
_TEMPORARY_SUFFIX = ".tmp"
_XATTR = "user.sandboxer.entry"  # a detached entry's header
_CHUNK = 8 << 20  # a detached payload is hashed in chunks of this size, side by side


def private_to_euid(st: os.stat_result) -> bool:
    """The euid's own, and writable by no one else."""
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _header(format: bytes, key: str, payload: bytes | bytearray) -> bytes:
    digest = hashlib.sha256(payload).hexdigest()
    return b"%s %s %s\n" % (format, key.encode(), digest.encode())


def chunked_sha256(payload: bytes | bytearray | memoryview | mmap.mmap) -> str:
    """SHA-256 of the SHA-256s of ``payload``'s ``_CHUNK``-byte chunks (a detached entry's
    digest), the chunks hashed by threads side by side (hashlib lets go of the GIL)."""
    view = memoryview(payload)
    try:
        chunks = [view[i : i + _CHUNK] for i in range(0, len(view), _CHUNK)] or [view]
        workers = min(4, os.cpu_count() or 1, len(chunks))
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="sandboxer-digest") as pool:
                digests = list(pool.map(lambda chunk: hashlib.sha256(chunk).digest(), chunks))
        else:
            digests = [hashlib.sha256(chunk).digest() for chunk in chunks]
        for chunk in chunks:
            chunk.release()
    finally:
        view.release()
    return hashlib.sha256(b"".join(digests)).hexdigest()


def entry(format: bytes, key: str, payload: bytes) -> bytes:
    """An entry's bytes as stored: ``FORMAT KEY SHA256(payload)\\n`` then the payload."""
    return _header(format, key, payload) + payload


def mapped_file(prefix: str) -> str | None:
    """The shared library this process maps whose file name starts with ``prefix``, as
    ``path dev inode size mtime``; None unless exactly one is mapped and the file at its path
    is still that one (not replaced on disk since it was loaded, nor "(deleted)")."""
    found = set()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.rstrip("\n").split(maxsplit=5)
            if len(fields) == 6 and os.path.basename(fields[5]).startswith(prefix):
                found.add((fields[5], fields[3], int(fields[4])))
    if len(found) != 1:
        return None
    path, device, inode = found.pop()
    major, minor = (int(part, 16) for part in device.split(":"))
    st = os.stat(path)
    if (st.st_ino, os.major(st.st_dev), os.minor(st.st_dev)) != (inode, major, minor):
        return None
    return f"{path} {device} {inode} {st.st_size} {st.st_mtime_ns}"


@dataclass(frozen=True)
class Usage:
    """What a cache directory holds: its entries and their bytes on disk (headers included)."""

    directory: str
    entries: int
    bytes: int


class DiskCache:
    """Entries ``KEY + suffix`` in ``directory``, each at most ``max_payload`` bytes after
    its header; at most ``max_entries`` of them and ``max_bytes`` in all (either may be None),
    the least recently used going first (a hit touches its entry's mtime)."""

    def __init__(
        self,
        directory: str,
        *,
        format: bytes,
        suffix: str,
        max_payload: int,
        max_entries: int | None = None,
        max_bytes: int | None = None,
        detached: bool = False,
    ) -> None:
        self.directory = directory
        self.detached = detached
        self.format = format
        self.suffix = suffix
        self.max_payload = max_payload
        self.max_entries = max_entries
        self.max_bytes = max_bytes

    def load(self, key: str) -> bytes | None:
        """The payload stored under ``key``, or None: no entry, or one that is not beyond
        doubt (deleted if it is the euid's)."""
        if self.detached:
            raise TypeError("a detached cache's entries are opened (open_verified), not read")
        try:
            directory = self._open(create=False)
        except _Unusable:
            return None
        try:
            return self._read(directory, key)
        finally:
            os.close(directory)

    def open_verified(self, key: str) -> int | None:
        """A detached cache: an fd of the entry for ``key`` once the file and its header are
        beyond doubt (the caller closes it; what it reads through it is what was checked),
        or None: no entry, or one that is not (deleted if it is the euid's)."""
        if not self.detached:
            raise TypeError("only a detached cache's entries are opened")
        try:
            directory = self._open(create=False)
        except _Unusable:
            return None
        try:
            fd = self._entry_fd(directory, key + self.suffix)
            if fd is None:
                return None
            if self._detached_ok(fd, key):
                os.utime(fd)  # used now: the last to be evicted
                return fd
            os.close(fd)
            self._discard(directory, key + self.suffix)
            return None
        finally:
            os.close(directory)

    def store(self, key: str, payload: bytes | bytearray) -> None:
        """Store ``payload`` under ``key`` (replacing what is there), then evict down to the
        bounds. Nothing is stored if the directory cannot be used or the entry alone would
        exceed a bound."""
        size = (0 if self.detached else len(_header(self.format, key, b""))) + len(payload)
        too_big = self.max_bytes is not None and size > self.max_bytes
        if too_big or len(payload) > self.max_payload:
            return
        try:
            directory = self._open(create=True)
        except _Unusable:
            return
        try:
            self._write(directory, key, payload)
            self._evict(directory)
        finally:
            os.close(directory)

    def discard(self, key: str) -> None:
        """Delete the entry for ``key`` if it is the euid's: its caller found it unusable."""
        try:
            directory = self._open(create=False)
        except _Unusable:
            return
        try:
            self._discard(directory, key + self.suffix)
        finally:
            os.close(directory)

    def usage(self) -> Usage | str:
        """The directory's entries and bytes, or why it is not used. Creates nothing: a
        directory not made yet holds nothing."""
        try:
            directory = self._open(create=False)
        except _Unusable as exc:
            return Usage(self.directory, 0, 0) if exc.missing else exc.reason
        except OSError as exc:
            return f"{self.directory}: {exc.strerror}"
        try:
            held = self._entries(directory)
        finally:
            os.close(directory)
        return Usage(self.directory, len(held), sum(size for _, _, size in held))

    # -- the directory ----------------------------------------------------------------------

    def _open(self, *, create: bool) -> int:
        """An fd of the directory, which must be the euid's own and no one else's to write;
        ``create`` makes it (0700) and its parent (0755) first. Raises ``_Unusable``."""
        path = self.directory
        if create:
            for part in (os.path.dirname(path), path):
                try:
                    os.mkdir(part, 0o700 if part == path else 0o755)
                except FileExistsError:
                    pass
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise _Unusable(f"{path} does not exist", missing=True) from None
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            raise _Unusable(f"{path} is a link or not a directory") from None
        st = os.fstat(fd)
        if not private_to_euid(st):
            os.close(fd)
            raise _Unusable(
                f"{path} is not this user's alone (owner uid {st.st_uid}, "
                f"mode {stat.S_IMODE(st.st_mode):04o})"
            )
        return fd

    def _entries(self, directory: int) -> list[tuple[int, str, int]]:
        """(mtime, name, size) of each entry, as lstat sees it; gone meanwhile: left out."""
        found = []
        for name in os.listdir(directory):
            if not name.endswith(self.suffix) or name.startswith("."):
                continue
            try:
                st = os.stat(name, dir_fd=directory, follow_symlinks=False)
            except FileNotFoundError:
                continue  # evicted by another process meanwhile
            found.append((st.st_mtime_ns, name, st.st_size))
        return found

    # -- an entry ---------------------------------------------------------------------------

    def _entry_fd(self, directory: int, name: str) -> int | None:
        """The entry ``name`` opened for reading through no link, or None (a link in its
        place is deleted)."""
        try:
            # O_NONBLOCK: a FIFO in the entry's place must not hang the reader
            return os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=directory
            )
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            self._discard(directory, name)  # a link in the entry's place
            return None

    def _read(self, directory: int, key: str) -> bytes | None:
        name = key + self.suffix
        fd = self._entry_fd(directory, name)
        if fd is None:
            return None
        try:
            payload = self._verified(fd, key)
            if payload is not None:
                os.utime(fd)  # used now: the last to be evicted
        finally:
            os.close(fd)
        if payload is None:
            self._discard(directory, name)
        return payload

    def _plain_file(self, st: os.stat_result, header: int) -> bool:
        """A regular file of the euid's alone, with one name, within the size bound."""
        return (
            stat.S_ISREG(st.st_mode)
            and private_to_euid(st)
            and st.st_nlink == 1
            and st.st_size <= self.max_payload + header
        )

    def _detached_ok(self, fd: int, key: str) -> bool:
        """The file is plain, its header attribute names this format and key, and the
        chunked SHA-256 of its bytes is the header's."""
        st = os.fstat(fd)
        if not self._plain_file(st, 0) or st.st_size == 0:
            return False
        try:
            line = os.getxattr(fd, _XATTR)
        except OSError:
            return False  # none (ENODATA), or attributes not supported here
        named = b"%s %s " % (self.format, key.encode())
        if not line.startswith(named) or len(line) != len(named) + 64:
            return False
        with mmap.mmap(fd, st.st_size, mmap.MAP_SHARED | mmap.MAP_POPULATE, mmap.PROT_READ) as m:
            return chunked_sha256(m).encode() == line[len(named) :]

    def _verified(self, fd: int, key: str) -> bytes | None:
        """The payload after the header, if the file and its header are beyond doubt."""
        st = os.fstat(fd)
        if not self._plain_file(st, HEADER_MAX):
            return None
        line, newline, _ = os.pread(fd, HEADER_MAX, 0).partition(b"\n")
        named = b"%s %s " % (self.format, key.encode())
        if not newline or not line.startswith(named) or len(line) != len(named) + 64:
            return None
        start = len(line) + 1
        payload = _read_at(fd, st.st_size - start, start)
        if payload is None or len(payload) > self.max_payload:
            return None
        if hashlib.sha256(payload).hexdigest().encode() != line[len(named) :]:
            return None
        return payload

    def _discard(self, directory: int, name: str) -> None:
        """Unlink ``name`` if it is the euid's (a file, a link); a directory, or anything
        not the euid's, is left alone."""
        try:
            st = os.stat(name, dir_fd=directory, follow_symlinks=False)
            if st.st_uid == os.geteuid() and not stat.S_ISDIR(st.st_mode):
                os.unlink(name, dir_fd=directory)
        except FileNotFoundError:
            pass  # replaced or evicted by another process meanwhile

    def _write(self, directory: int, key: str, payload: bytes | bytearray) -> None:
        # pid and random: two threads or processes storing one key each write their own
        temporary = f".{key}.{os.getpid()}.{os.urandom(4).hex()}{_TEMPORARY_SUFFIX}"
        fd = os.open(
            temporary,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=directory,
        )
        try:
            with os.fdopen(fd, "wb") as f:
                if self.detached:
                    digest = chunked_sha256(payload)
                    line = b"%s %s %s" % (self.format, key.encode(), digest.encode())
                    os.setxattr(f.fileno(), _XATTR, line)
                else:
                    f.write(_header(self.format, key, payload))
                f.write(payload)
            os.rename(temporary, key + self.suffix, src_dir_fd=directory, dst_dir_fd=directory)
        except BaseException:
            os.unlink(temporary, dir_fd=directory)
            raise

    def _evict(self, directory: int) -> None:
        """Down to the bounds, the least recently used first; and temporaries left by a
        writer that died."""
        stale = time.time() - _STALE_TEMPORARY
        for name in os.listdir(directory):
            if name.startswith(".") and name.endswith(_TEMPORARY_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    if os.stat(name, dir_fd=directory, follow_symlinks=False).st_mtime < stale:
                        os.unlink(name, dir_fd=directory)
        held = sorted(self._entries(directory))
        total = sum(size for _, _, size in held)
        for count, (_, name, size) in enumerate(held):
            over_count = self.max_entries is not None and len(held) - count > self.max_entries
            over_bytes = self.max_bytes is not None and total > self.max_bytes
            if not over_count and not over_bytes:
                break
            with contextlib.suppress(FileNotFoundError):  # another process evicted it
                os.unlink(name, dir_fd=directory)
            total -= size


class _Unusable(Exception):
    """The directory cannot be used: missing, a link, not a directory, or not the euid's
    alone (``reason`` says which)."""

    def __init__(self, reason: str, *, missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing


def _read_at(fd: int, size: int, offset: int) -> bytes | None:
    """``size`` bytes from ``offset``; None if the file ends first."""
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data  # one read: no copy of a large payload
    parts = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            return None
        parts.append(more)
        got += len(more)
    return b"".join(parts)
