"""The scan: every plugin at or below some paths, each a result or an error.

A path the caller names is followed even when it is a link; below it, the walk never follows
a link, never enters a hidden directory and never looks inside a plugin directory (it is one
plugin). Blocking: it reads and hashes files.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ..manifest import MANIFEST_NAME
from .recognition import (
    ScanError,
    ScanResult,
    examine_file,
    is_plugin_dir,
    read_plugin,
    skipped_while_walking,
)

__all__ = ["scan", "scan_root", "scan_subtree", "normalize_roots", "is_under"]


# -- roots ------------------------------------------------------------------------------------


def is_under(path: Path, root: Path) -> bool:
    """``path`` is ``root`` or lies below it (by name; nothing is resolved)."""
    return path == root or root in path.parents


def normalize_roots(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
) -> tuple[Path, ...]:
    """Absolute paths, in the caller's order, without duplicates and without a path that lies
    inside another one (it is already covered; keeping both would report plugins twice).
    A ``plugin.toml`` named directly stands for its directory."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    roots: list[Path] = []
    for raw in paths:
        path = Path(os.path.abspath(os.fspath(raw)))
        if path.name == MANIFEST_NAME:
            path = path.parent
        if path not in roots:
            roots.append(path)
    return tuple(r for r in roots if not any(o != r and is_under(r, o) for o in roots))


# -- walking ----------------------------------------------------------------------------------


def _walk(top: Path) -> list[ScanResult]:
    """Every plugin below the directory ``top`` (which is not itself a plugin directory).

    Iterative (no recursion limit), sorted, never entering a link, a hidden directory or a
    plugin directory (a plugin directory is one plugin, whatever it holds).
    """
    found: list[ScanResult] = []
    stack = [top]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted(it, key=lambda e: e.name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            found.append(ScanError.from_exception(directory, exc))
            continue
        for entry in entries:
            if skipped_while_walking(entry.name) or entry.is_symlink():
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                if is_plugin_dir(path):
                    found.append(read_plugin(path))  # type: ignore[arg-type]
                else:
                    stack.append(path)
            elif entry.is_file(follow_symlinks=False):
                found.append(examine_file(path, explicit=False))  # type: ignore[arg-type]
    return sorted((r for r in found if r is not None), key=lambda r: r.path)


def scan_root(root: Path, *, missing_ok: bool = False) -> list[ScanResult]:
    """What ``scan`` reports for one path the caller named (links at the path followed)."""
    try:
        mode = os.stat(root).st_mode
    except FileNotFoundError:
        return [] if missing_ok else [ScanError(root, f"{root}: does not exist")]
    except OSError as exc:
        return [ScanError.from_exception(root, exc)]
    if stat.S_ISDIR(mode):
        if is_plugin_dir(root):
            return [r for r in [read_plugin(root)] if r is not None]
        return _walk(root)
    if stat.S_ISREG(mode):
        return [r for r in [examine_file(root, explicit=True)] if r is not None]
    return [ScanError(root, f"{root}: neither a directory nor a regular file")]


def scan_subtree(path: Path) -> list[ScanResult]:
    """What a walk from the scan root would report at or below ``path`` (a path that is not
    a root: links are not followed, skipped names give nothing)."""
    if skipped_while_walking(path.name) or path.is_symlink():
        return []
    if path.is_dir():
        if is_plugin_dir(path):
            return [r for r in [read_plugin(path)] if r is not None]
        return _walk(path)
    if path.is_file():
        return [r for r in [examine_file(path, explicit=False)] if r is not None]
    return []


def scan(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[ScanResult]:
    """Every plugin at or below ``paths``, each a ``DiscoveredPlugin`` or a ``ScanError``.

    A path that is itself a plugin (directory, ``plugin.toml`` or bare file) reports that
    plugin; a directory is searched recursively. Results come per path in the caller's order,
    sorted by path within each. A path that does not exist, or an explicitly named file that
    is not a plugin, is a ``ScanError``. Blocking (it reads and hashes files): from async code
    call it through ``asyncio.to_thread``.
    """
    found: dict[Path, ScanResult] = {}
    for root in normalize_roots(paths):
        for result in scan_root(root):
            found.setdefault(result.path, result)
    return list(found.values())
