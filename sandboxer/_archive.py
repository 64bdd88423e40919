"""A registry archive (a .tar.gz of a plugin directory): extracted safely, and the tree
checksum it unpacks to, computed from the archive's own bytes.

Both work on the bytes whose sha256 and signature were verified (registry.py, ``fetch``),
never on a file re-read by name afterwards: the checksum is what the sandbox then requires of
the copy it runs (docs/architecture.md, "Only verified bytes run").
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from ._digest import IGNORED_DIRS
from .errors import IntegrityError

__all__ = ["safe_extract", "archive_checksum", "MAX_UNPACKED", "MAX_MEMBERS"]

MAX_UNPACKED = 256 << 20  # bytes of all its files, unpacked
MAX_MEMBERS = 10_000


def archive_checksum(
    data: bytes, *, max_unpacked: int = MAX_UNPACKED, max_members: int = MAX_MEMBERS
) -> str:
    """``sha256:<hex>``: the tree checksum (``sandboxer.checksum``) of the directory
    ``safe_extract`` makes of ``data``, computed from ``data`` itself. The archive is checked
    as ``safe_extract`` checks it (IntegrityError); a member under a ``__pycache__``
    directory counts for nothing, as in any tree checksum."""
    files: dict[str, str] = {}
    for rel, member, source in _members(data, max_unpacked, max_members):
        if source is None or IGNORED_DIRS.intersection(rel.parts[:-1]):
            continue
        h = hashlib.sha256()
        for chunk in _chunks(member, source):
            h.update(chunk)
        key = rel.as_posix()
        if key in files:  # extraction would refuse it too (O_EXCL)
            raise IntegrityError(f"the archive holds {member.name!r} twice")
        files[key] = h.hexdigest()
    outer = hashlib.sha256()
    for key in sorted(files):
        outer.update(f"{key}\0f\0{files[key]}\n".encode("utf-8", "surrogateescape"))
    return f"sha256:{outer.hexdigest()}"


def _members(
    data: bytes, max_unpacked: int, max_members: int
) -> Iterator[tuple[PurePosixPath, tarfile.TarInfo, IO[bytes] | None]]:
    """Each member of the .tar.gz ``data`` with its checked path, and its content (None for a
    directory), refusing anything but plain files and directories inside it, and the caps."""
    total = 0
    try:
        # Opened before the with, so that a broken archive is an IntegrityError.
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")  # noqa: SIM115
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise IntegrityError(f"the archive cannot be read: {exc}") from None
    with tar:
        count = 0
        try:
            for member in tar:
                count += 1
                if count > max_members:
                    raise IntegrityError(f"the archive has more than {max_members} members")
                rel = _member_path(member.name)
                if member.isdir():
                    yield rel, member, None
                    continue
                if member.issym() or member.islnk():
                    raise IntegrityError(
                        f"the archive member {member.name!r} is a link "
                        f"(to {member.linkname!r}); links are refused"
                    )
                if not member.isreg():
                    raise IntegrityError(
                        f"the archive member {member.name!r} is not a regular "
                        "file or directory (a device, fifo or the like)"
                    )
                total += member.size
                if total > max_unpacked:
                    raise IntegrityError(f"the archive unpacks to more than {max_unpacked} bytes")
                source = tar.extractfile(member)
                if source is None:
                    raise IntegrityError(f"the archive member {member.name!r} cannot be read")
                yield rel, member, source
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise IntegrityError(f"the archive is damaged: {exc}") from None


def safe_extract(
    data: bytes, dest: Path, *, max_unpacked: int = MAX_UNPACKED, max_members: int = MAX_MEMBERS
) -> None:
    """Extract a .tar.gz into the new directory ``dest``, refusing anything but plain files and
    directories inside it; IntegrityError names the member and what is wrong with it."""
    dest.mkdir(mode=0o755)
    try:
        for rel, member, source in _members(data, max_unpacked, max_members):
            target = dest.joinpath(*rel.parts)
            if source is None:
                target.mkdir(mode=0o755, parents=True, exist_ok=True)
                continue
            target.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            mode = 0o755 if member.mode & 0o111 else 0o644
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            with os.fdopen(fd, "wb") as out:
                for chunk in _chunks(member, source):
                    out.write(chunk)
    except OSError as exc:
        raise IntegrityError(f"the archive cannot be extracted: {exc}") from None


def _chunks(member: tarfile.TarInfo, source: IO[bytes]) -> Iterator[bytes]:
    """A member's bytes, 1 MiB at a time; IntegrityError once they pass its declared size."""
    size = 0
    while chunk := source.read(1 << 20):
        size += len(chunk)
        if size > member.size:
            raise IntegrityError(
                f"the archive member {member.name!r} holds more than its declared size"
            )
        yield chunk


def _member_path(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if not name or path.is_absolute() or ".." in path.parts or "\0" in name:
        raise IntegrityError(
            f"the archive member {name!r} has an absolute path or leads "
            "outside the plugin directory"
        )
    parts = [p for p in path.parts if p not in (".", "")]
    if not parts:
        raise IntegrityError(f"the archive member {name!r} has no name")
    return PurePosixPath(*parts)
