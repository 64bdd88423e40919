"""The owner-only disk cache both compiled caches stand on (sandboxer/_disk_cache.py).

An entry comes back only when its directory and file are the euid's alone, the file is a
regular one with one name, and its header names the format, the key and the SHA-256 of what
follows; each case below breaks exactly one of these on an otherwise valid entry. What is
the euid's and wrong is deleted; what is not the euid's, or a directory, is left alone.
Eviction keeps the bounds, the least recently used first. (The seccomp and wasm caches are
tested end to end in tests/sandbox/test_seccomp_cache.py and tests/loaders/test_wasm_cache.py.)
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sandboxer import _disk_cache
from sandboxer._disk_cache import DiskCache, Usage

NOBODY = 65534
FORMAT = b"test-cache-1"
KEY = "ab" * 32
PAYLOAD = b"the compiled thing\n\0\xff" * 10


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")  # a failure under CI=true (conftest)


def make(where: Path, **bounds: int) -> DiskCache:
    return DiskCache(str(where), format=FORMAT, suffix=".bin",
                     max_payload=bounds.pop("max_payload", 1 << 20), **bounds)


@pytest.fixture
def where(tmp_path: Path) -> Path:
    return tmp_path / "sandboxer" / "things"


def test_an_entry_is_stored_and_found(where: Path) -> None:
    cache = make(where)
    assert cache.load(KEY) is None  # nothing yet, and nothing made by looking
    assert not where.parent.exists()
    cache.store(KEY, PAYLOAD)
    entry = where / f"{KEY}.bin"
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert entry.read_bytes() == b"test-cache-1 " + KEY.encode() + b" " + digest.encode() + \
        b"\n" + PAYLOAD
    assert entry.read_bytes() == _disk_cache.entry(FORMAT, KEY, PAYLOAD)
    assert (entry.stat().st_mode & 0o777, where.stat().st_mode & 0o777,
            where.parent.stat().st_mode & 0o777) == (0o600, 0o700, 0o755)
    assert cache.load(KEY) == PAYLOAD
    assert cache.usage() == Usage(str(where), 1, entry.stat().st_size)
    assert os.listdir(where) == [entry.name]  # no temporary left


def _flipped(entry: Path) -> None:
    data = bytearray(entry.read_bytes())
    data[-1] ^= 0x01
    entry.write_bytes(bytes(data))


def _another_key(entry: Path) -> None:
    entry.write_bytes(_disk_cache.entry(FORMAT, "cd" * 32, PAYLOAD))


def _another_format(entry: Path) -> None:
    entry.write_bytes(_disk_cache.entry(b"test-cache-0", KEY, PAYLOAD))


def _truncated(entry: Path) -> None:
    entry.write_bytes(entry.read_bytes()[:-3])


def _no_header(entry: Path) -> None:
    entry.write_bytes(PAYLOAD.replace(b"\n", b""))


def _a_link(entry: Path) -> None:
    elsewhere = entry.parent.parent / "elsewhere.bin"
    entry.rename(elsewhere)
    entry.symlink_to(elsewhere)


def _a_second_name(entry: Path) -> None:
    os.link(entry, entry.parent.parent / "second-name.bin")


def _group_writable(entry: Path) -> None:
    entry.chmod(0o620)


def _others_file(entry: Path) -> None:
    need_root()
    os.chown(entry, NOBODY, NOBODY)


def _a_directory(entry: Path) -> None:
    entry.unlink()
    entry.mkdir()


def _a_fifo(entry: Path) -> None:
    entry.unlink()
    os.mkfifo(entry, 0o600)


# (defect, whether the entry is then gone)
DEFECTS = [
    pytest.param(_flipped, True, id="one-byte-of-the-payload-flipped"),
    pytest.param(_another_key, True, id="the-header-names-another-key"),
    pytest.param(_another_format, True, id="the-header-names-another-format"),
    pytest.param(_truncated, True, id="truncated"),
    pytest.param(_no_header, True, id="no-header"),
    pytest.param(_a_link, True, id="a-symbolic-link-to-a-valid-entry"),
    pytest.param(_a_second_name, True, id="a-valid-entry-with-a-second-name"),
    pytest.param(_group_writable, True, id="a-valid-entry-the-group-may-write"),
    pytest.param(_a_fifo, True, id="a-fifo"),
    pytest.param(_others_file, False, id="a-valid-entry-of-another-uid"),
    pytest.param(_a_directory, False, id="a-directory"),
]


@pytest.mark.parametrize("defect,deleted", DEFECTS)
def test_an_entry_not_beyond_doubt_is_a_miss(where: Path, defect: Callable[[Path], None],
                                             deleted: bool) -> None:
    cache = make(where)
    cache.store(KEY, PAYLOAD)
    entry = where / f"{KEY}.bin"
    defect(entry)
    assert cache.load(KEY) is None
    assert os.path.lexists(entry) is not deleted  # the euid's: deleted; else left alone
    for beside in ("elsewhere.bin", "second-name.bin"):  # what a link led to: untouched
        if (where.parent / beside).exists():
            assert (where.parent / beside).read_bytes() == _disk_cache.entry(FORMAT, KEY, PAYLOAD)


def test_a_store_replaces_what_is_in_the_way(where: Path) -> None:
    """A file of another uid is left alone by a reader, but the directory is the euid's: the
    next store renames a good entry over it. A directory in the way stays, and nothing is
    stored (no temporary left either)."""
    need_root()
    cache = make(where)
    cache.store(KEY, PAYLOAD)
    entry = where / f"{KEY}.bin"
    os.chown(entry, NOBODY, NOBODY)
    cache.store(KEY, PAYLOAD)
    assert entry.stat().st_uid == os.geteuid() and cache.load(KEY) == PAYLOAD
    entry.unlink()
    entry.mkdir()
    with pytest.raises(IsADirectoryError):
        cache.store(KEY, PAYLOAD)  # the callers log it; a cache is never an error to them
    assert entry.is_dir() and os.listdir(where) == [entry.name]


def _dir_a_link(where: Path) -> None:
    real = where.parent / "real"
    where.rename(real)
    where.symlink_to(real)


def _dir_mode(mode: int) -> Callable[[Path], None]:
    return lambda where: where.chmod(mode)


def _dir_others(where: Path) -> None:
    need_root()
    os.chown(where, NOBODY, NOBODY)


def _dir_a_file(where: Path) -> None:
    for name in os.listdir(where):
        os.unlink(where / name)
    where.rmdir()
    where.write_bytes(b"")


@pytest.mark.parametrize("defect,why", [
    pytest.param(_dir_a_link, "is a link or not a directory", id="a-symbolic-link"),
    pytest.param(_dir_a_file, "is a link or not a directory", id="a-file"),
    pytest.param(_dir_mode(0o770), "is not this user's alone", id="group-writable"),
    pytest.param(_dir_mode(0o702), "is not this user's alone", id="other-writable"),
    pytest.param(_dir_others, "is not this user's alone", id="another-uids"),
])
def test_a_directory_not_the_users_alone_is_not_used(where: Path, defect: Callable[[Path], None],
                                                     why: str) -> None:
    cache = make(where)
    cache.store(KEY, PAYLOAD)
    defect(where)
    before = sorted(os.listdir(where)) if where.is_dir() else None
    assert cache.load(KEY) is None
    cache.store("cd" * 32, PAYLOAD)
    after = sorted(os.listdir(where)) if where.is_dir() else None
    assert after == before  # nothing read was deleted, nothing written
    usage = cache.usage()
    assert isinstance(usage, str) and why in usage


def test_usage_of_a_directory_not_made_yet(where: Path) -> None:
    assert make(where).usage() == Usage(str(where), 0, 0)
    assert not where.exists()


def test_eviction_keeps_the_bytes_bound_oldest_first(where: Path) -> None:
    size = len(_disk_cache.entry(FORMAT, KEY, PAYLOAD))
    cache = make(where, max_bytes=3 * size)
    keys = [f"{i:064x}" for i in range(5)]
    for i, key in enumerate(keys[:4]):
        cache.store(key, PAYLOAD)
        os.utime(where / f"{key}.bin", ns=(0, (i + 1) * 10**9))
    # each store evicted down to three entries: keys 0 was evicted when 3 came
    assert sorted(os.listdir(where)) == [f"{k}.bin" for k in keys[1:4]]
    assert cache.load(keys[1]) == PAYLOAD  # used now: the newest by mtime
    cache.store(keys[4], PAYLOAD)
    assert sorted(os.listdir(where)) == sorted(f"{k}.bin" for k in (keys[1], keys[3], keys[4]))
    assert sum(p.stat().st_size for p in where.iterdir()) <= 3 * size


def test_eviction_keeps_the_entries_bound(where: Path) -> None:
    cache = make(where, max_entries=2)
    for i in range(4):
        cache.store(f"{i:064x}", PAYLOAD)
        os.utime(where / f"{i:064x}.bin", ns=(0, (i + 1) * 10**9))
    assert sorted(os.listdir(where)) == [f"{2:064x}.bin", f"{3:064x}.bin"]


def test_an_entry_over_a_bound_is_not_stored(where: Path) -> None:
    make(where, max_payload=len(PAYLOAD) - 1).store(KEY, PAYLOAD)
    make(where, max_bytes=len(PAYLOAD)).store(KEY, PAYLOAD)  # the header does not fit
    assert not where.exists() or os.listdir(where) == []
    make(where).store(KEY, PAYLOAD)
    assert make(where, max_payload=len(PAYLOAD) - 1).load(KEY) is None


def test_temporaries_a_dead_writer_left_are_removed(where: Path) -> None:
    cache = make(where)
    cache.store(KEY, PAYLOAD)
    old, fresh = where / f".{KEY}.1.0000.tmp", where / f".{KEY}.2.0000.tmp"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")  # a writer at work right now
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    cache.store("cd" * 32, PAYLOAD)
    assert not old.exists() and fresh.exists()
    assert cache.usage() == Usage(str(where), 2, 2 * (where / f"{KEY}.bin").stat().st_size)


def test_mapped_file_names_the_library_this_process_maps() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6")
    mapped = _disk_cache.mapped_file("libc.so")
    assert mapped is not None
    path, device, inode, size, mtime = mapped.split()
    st = os.stat(path)
    assert (int(inode), int(size), int(mtime)) == (st.st_ino, st.st_size, st.st_mtime_ns)
    assert _disk_cache.mapped_file("no-such-library.so") is None


def test_a_detached_entry_is_opened_only_while_its_chunks_match(where: Path) -> None:
    """Detached (the wasm cache): the file is the payload alone, the header an extended
    attribute, the digest over 8 MiB chunks hashed side by side. A byte flipped in any chunk,
    or a missing header, and the entry is deleted, never opened."""
    cache = DiskCache(str(where), format=FORMAT, suffix=".bin", max_payload=64 << 20,
                      detached=True)
    payload = os.urandom(1 << 16) * 300  # ~19 MiB: three chunks
    cache.store(KEY, payload)
    entry = where / f"{KEY}.bin"
    assert entry.read_bytes() == payload
    chunks = [payload[i:i + (8 << 20)] for i in range(0, len(payload), 8 << 20)]
    assert len(chunks) == 3
    digest = hashlib.sha256(b"".join(hashlib.sha256(c).digest() for c in chunks)).hexdigest()
    assert os.getxattr(entry, "user.sandboxer.entry") == b"%s %s %s" % (
        FORMAT, KEY.encode(), digest.encode())
    fd = cache.open_verified(KEY)
    assert fd is not None
    try:
        assert os.pread(fd, len(payload) + 1, 0) == payload
    finally:
        os.close(fd)
    with pytest.raises(TypeError):
        cache.load(KEY)  # bytes are never read out of a detached cache
    with entry.open("r+b") as f:  # one byte of the second chunk, in place
        f.seek((8 << 20) + 12345)
        f.write(bytes([payload[(8 << 20) + 12345] ^ 1]))
    assert cache.open_verified(KEY) is None and not entry.exists()
    cache.store(KEY, payload)
    os.removexattr(entry, "user.sandboxer.entry")
    assert cache.open_verified(KEY) is None and not entry.exists()
