"""Content digests of plugins: one file, or a plugin directory in a canonical order.

The tree checksum is what discovery reports and what reload compares, so it must not change
when nothing a user wrote changed: Python's ``__pycache__`` directories (written when a trusted
plugin is imported in-process) are left out. Links are hashed as links (their target text),
never followed, so a checksum never reads outside the tree.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path

__all__ = ["file_sha256", "tree_checksum", "IGNORED_DIRS"]

IGNORED_DIRS = frozenset({"__pycache__"})
_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of one file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _entries(root: Path) -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in IGNORED_DIRS)
        base = Path(dirpath)
        for name in filenames + [d for d in dirnames if (base / d).is_symlink()]:
            full = base / name
            out.append((full.relative_to(root).as_posix(), full))
    return sorted(out)


def tree_checksum(path: str | os.PathLike[str], *, known: Mapping[str, str] | None = None) -> str:
    """``sha256:<hex>`` over a directory's files in sorted path order, or over one file.

    Each entry contributes ``path NUL kind NUL digest LF`` where kind is ``f`` (regular file,
    digest of its bytes), ``l`` (symlink, digest of its target text) or ``x`` (anything else,
    no content), so renaming, moving or retyping a file changes the checksum.

    ``known``: hex digests of regular files (by relative path; "" for a bare file) that the
    caller read once and holds in memory (a wasm module, compiled from those bytes): they
    count as they are, without the file being read again.
    """
    known = known or {}
    root = Path(path)
    if not root.is_dir():
        return f"sha256:{known.get('') or file_sha256(root)}"
    outer = hashlib.sha256()
    for rel, full in _entries(root):
        mode = full.lstat().st_mode
        if stat.S_ISLNK(mode):
            kind, digest = "l", hashlib.sha256(os.fsencode(os.readlink(full))).hexdigest()
        elif stat.S_ISREG(mode):
            kind, digest = "f", known.get(rel) or file_sha256(full)
        else:
            kind, digest = "x", ""
        outer.update(f"{rel}\0{kind}\0{digest}\n".encode("utf-8", "surrogateescape"))
    return f"sha256:{outer.hexdigest()}"
