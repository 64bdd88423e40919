"""What is a plugin on disk: the results of discovery, and recognising one path.

``read_plugin`` reads a plugin directory's manifest, or makes one up for a bare file, and
checksums it; ``examine_file`` first decides whether a regular file is a bare plugin at all
(by its name, and for a ``.so`` by its ELF exports: ``elf``). Names that a walk skips are
defined here too. Nothing here imports, dlopens or runs a plugin.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._digest import IGNORED_DIRS, tree_checksum
from ..errors import ManifestError
from ..manifest import MANIFEST_NAME, LoaderType, Plugin, load_plugin
from .elf import NATIVE_ENTRY_SYMBOL, ElfError, elf_exports

__all__ = [
    "DiscoveredPlugin",
    "ScanError",
    "ScanResult",
    "BARE_SUFFIXES",
    "is_ignored_name",
    "skipped_while_walking",
    "is_plugin_dir",
    "read_plugin",
    "examine_file",
]

BARE_SUFFIXES = (".py", ".wasm", ".so")


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiscoveredPlugin:
    """A plugin found on disk.

    ``path`` is where it was found (absolute, not resolved: the plugin directory or the bare
    file); ``manifest`` the validated manifest (made up from the file name for a bare file);
    ``checksum`` is ``sha256:<hex>`` from ``sandboxer._digest.tree_checksum``, the value that
    reload compares and ``inspect`` prints.
    """

    path: Path
    type: LoaderType
    manifest: Plugin
    checksum: str

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "type": self.type.value,
            "id": self.manifest.id,
            "version": self.manifest.version,
            "checksum": self.checksum,
            "manifest": self.manifest.to_json(),
        }


@dataclass(frozen=True, slots=True)
class ScanError:
    """Something at ``path`` looks like a plugin but is not a valid one.

    ``message`` names the path and the problem (for a manifest error it is the
    ``ManifestError`` text); ``field`` is the manifest field concerned, when there is one.
    Scanning reports these instead of dropping the plugin, so a typo is never silent.
    """

    path: Path
    message: str
    field: str | None = None

    @classmethod
    def from_exception(cls, path: Path, exc: Exception) -> ScanError:
        if isinstance(exc, ManifestError):
            return cls(path, str(exc), exc.field)
        if isinstance(exc, OSError):
            return cls(path, f"{exc.filename or path}: cannot be read ({exc.strerror})")
        return cls(path, f"{path}: {exc}")

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "error": self.message, "field": self.field}


ScanResult = DiscoveredPlugin | ScanError


# -- names ------------------------------------------------------------------------------------

_VIM_SWAP = re.compile(r"\.sw[a-px]\Z")  # .swp, .swo… and the .swx probe


def is_ignored_name(name: str) -> bool:
    """Editor temporary files: vim swap files (``.swp``…), backups (``~``), emacs lock and
    autosave files (``.#x``, ``#x#``). Their churn must never look like a plugin change."""
    return (
        name.startswith(".#")
        or name.endswith("~")
        or bool(_VIM_SWAP.search(name))
        or (len(name) > 1 and name.startswith("#") and name.endswith("#"))
    )


def skipped_while_walking(name: str) -> bool:
    """Entries a walk does not look into: hidden ones, ``__pycache__``, editor temp files."""
    return name.startswith(".") or name in IGNORED_DIRS or is_ignored_name(name)


# -- one path ---------------------------------------------------------------------------------


def _bare_rejection(path: Path) -> str | None:
    """Why the regular file at ``path`` is not a bare plugin, or None when it is a candidate
    (a ``.wasm`` is always a candidate: load_plugin reports a missing magic as an error)."""
    if path.suffix in (".py", ".wasm"):
        return None
    if path.suffix == ".so":
        exported = elf_exports(path)
        if exported is None:
            return "a .so that is not an ELF file"
        if not exported:
            return f"an ELF file that does not export {NATIVE_ENTRY_SYMBOL}"
        return None
    return "not a plugin (a plugin is a directory with plugin.toml, or a .py, .wasm or .so file)"


def _manifest_escapes(directory: Path) -> bool:
    """``plugin.toml`` is a link that resolves outside its plugin directory."""
    manifest = directory / MANIFEST_NAME
    if not manifest.is_symlink():
        return False
    try:
        return not manifest.resolve(strict=True).is_relative_to(directory.resolve())
    except (OSError, RuntimeError):
        return False  # a dangling link: load_plugin reports the missing manifest


def read_plugin(path: Path) -> ScanResult | None:
    """The plugin at ``path`` (directory or bare file) with its checksum, or its error.
    None when it vanished while being read: it is gone, there is nothing to report."""
    if path.is_dir() and _manifest_escapes(path):
        return ScanError(
            path,
            f"{path / MANIFEST_NAME}: a link leading outside the plugin "
            "directory; discovery does not follow it",
            MANIFEST_NAME,
        )
    try:
        plugin = load_plugin(path)
        checksum = tree_checksum(path)
    except ManifestError as exc:
        return ScanError.from_exception(path, exc)
    except FileNotFoundError as exc:
        if not os.path.lexists(path):
            return None
        return ScanError.from_exception(path, exc)
    except OSError as exc:
        return ScanError.from_exception(path, exc)
    return DiscoveredPlugin(path, plugin.type, plugin, checksum)


def examine_file(path: Path, *, explicit: bool) -> ScanResult | None:
    """A regular file: its plugin, its error, or None when it is simply not a plugin (an
    explicitly named file that is not a plugin is an error: the caller expected one)."""
    try:
        rejection = _bare_rejection(path)
    except ElfError as exc:
        return ScanError(path, f"{path}: {exc}")
    except FileNotFoundError:
        return None
    except OSError as exc:
        return ScanError.from_exception(path, exc)
    if rejection is None:
        return read_plugin(path)
    return ScanError(path, f"{path}: {rejection}") if explicit else None


def is_plugin_dir(path: Path) -> bool:
    return os.path.lexists(path / MANIFEST_NAME)
