"""The newest signed-index sequence number this host has seen from each registry location.

registry.py refuses an index whose sequence is lower than the one recorded here ("rollback"),
so whoever serves a registry (a mirror, a proxy, a stale copy) cannot hand out an older signed
index, and with it an older "latest", once a newer one was seen. A record only ever grows; an
equal sequence is the same index read again.

The records live under the cache directory, ``registry-state/<sha256 of the location>.json``,
one file per location so that registries never contend. They are security state: the
directory is 0700 and refused when someone else could write it; a record is written whole to a
0600 temporary file, fsynced and renamed over the old one (a crash leaves the old record or the
new one, never a torn one), with an flock held from read to rename so that two processes
cannot lower each other's record. This module never decides to trust an index by itself: it
answers "is this sequence older than the newest seen" and remembers a newer one.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import IntegrityError, RegistryError

__all__ = ["STATE_DIR", "MAX_SEQUENCE", "SeenIndex", "check_and_record", "state_file"]

STATE_DIR = "registry-state"
MAX_SEQUENCE = 2**63 - 1
_MAX_RECORD = 64 << 10


@dataclass(frozen=True)
class SeenIndex:
    """The newest index seen from ``location``: its sequence, who signed it and when."""

    location: str
    sequence: int
    key_id: str
    seen: str


def state_file(cache_dir: str | os.PathLike[str], location: str) -> Path:
    """Where the record for ``location`` lives (named by a digest: locations are URLs)."""
    digest = hashlib.sha256(location.encode("utf-8")).hexdigest()[:32]
    return Path(cache_dir) / STATE_DIR / f"{digest}.json"


def check_and_record(
    cache_dir: str | os.PathLike[str], location: str, sequence: int, key_id: str
) -> SeenIndex | None:
    """Refuse ``sequence`` if it is older than the newest seen from ``location``; record it
    when it is newer. Returns the record as it was before (None: never seen).

    IntegrityError names both sequences and what to do; RegistryError means the state itself
    cannot be read or trusted."""
    if isinstance(sequence, bool) or not 0 <= sequence <= MAX_SEQUENCE:
        raise ValueError(f"an index sequence is 0 to {MAX_SEQUENCE}, not {sequence!r}")
    path = state_file(cache_dir, location)
    try:
        return _check_and_record(path, location, sequence, key_id)
    except OSError as exc:
        raise RegistryError(
            f"cannot keep the registry rollback state in {path.parent}: "
            f"{exc.strerror or exc}; check the cache directory (cache_dir in "
            "the host config, else $XDG_CACHE_HOME/sandboxer)"
        ) from None


def _check_and_record(path: Path, location: str, sequence: int, key_id: str) -> SeenIndex | None:
    _private_directory(path.parent)
    with _locked(path.parent / ".lock"):
        seen = _read(path, location)
        if seen is not None and sequence < seen.sequence:
            raise IntegrityError(
                f"registry {location}: rollback: index sequence {sequence} is older than "
                f"{seen.sequence} seen before (signed by key {seen.key_id}, {seen.seen}); "
                "whoever serves this registry (a mirror, a proxy, a stale copy) is replaying "
                "an outdated index. Use an up-to-date copy of the registry; only if its "
                f"publisher really started its sequence over, delete {path} to accept the "
                "index it serves now"
            )
        if seen is None or sequence > seen.sequence:
            now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            _write(path, {"location": location, "sequence": sequence, "key": key_id, "seen": now})
        return seen


def _private_directory(path: Path) -> None:
    """``path`` exists as a directory that nobody but this user can write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        problem = "it is not a directory (a symbolic link or a file)"
    elif st.st_uid != os.geteuid():
        problem = f"it belongs to uid {st.st_uid}, not to you (uid {os.geteuid()})"
    elif st.st_mode & 0o022:
        problem = f"others can write it (mode {stat.S_IMODE(st.st_mode):o})"
    else:
        return
    raise RegistryError(
        f"cannot keep the registry rollback state in {path}: {problem}; make it "
        f"a directory of yours with mode 700 (chmod 700 {path}), or set "
        "cache_dir in the host config to a private directory"
    )


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _read(path: Path, location: str) -> SeenIndex | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as f:
        raw = f.read(_MAX_RECORD + 1)
    try:
        data = json.loads(raw)
        sequence, key_id, seen = data["sequence"], data["key"], data["seen"]
        if (
            data["location"] != location
            or isinstance(sequence, bool)
            or not isinstance(sequence, int)
            or not 0 <= sequence <= MAX_SEQUENCE
            or not isinstance(key_id, str)
            or not isinstance(seen, str)
        ):
            raise ValueError("unexpected fields")
    except (ValueError, TypeError, KeyError) as exc:
        raise RegistryError(
            f"the registry rollback state {path} (for {location}) is damaged ({exc}); delete "
            "it only if you trust the index the registry serves now, since the newest "
            "sequence seen from it is then forgotten"
        ) from None
    return SeenIndex(location=location, sequence=sequence, key_id=key_id, seen=seen)


def _write(path: Path, record: dict[str, object]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(record, sort_keys=True).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)
