"""Plugin discovery: find plugins under some paths (``scan``) and follow them (``watch``).

Discovery never imports, dlopens or instantiates anything: it reads manifests through
``sandboxer.manifest.load_plugin``, recognises bare files by their name and a few bytes (a
``.so`` by parsing its ELF dynamic symbol table with ``struct``), and hashes with
``sandboxer._digest``. It never follows a symbolic link it finds while walking (a link to a
directory or a file is skipped; a ``plugin.toml`` that is a link out of its directory is an
error), so it never reads outside the paths it was given. Paths named explicitly by the caller
are followed even when they are links: the operator chose them.

What is a plugin (DESIGN section 8):

- a directory holding a ``plugin.toml`` (it is one plugin; discovery does not look for more
  plugins inside it);
- a bare ``.py`` file; a bare ``.wasm`` file (a ``.wasm`` without the ``\\0asm`` magic is
  reported as an error: the name says it should be a module, so it is a mistake worth seeing);
- a bare ``.so`` that is an ELF shared object exporting ``sandboxer_call`` (a ``.so`` that is
  not ELF, such as a linker script, or an ELF library without that export is an ordinary
  library and is skipped; an ELF file whose tables cannot be read is reported as an error).

Hidden entries (names starting with ``.``), ``__pycache__`` and editor temporary files are
skipped while walking. Every other file is silently not a plugin.

``watch`` follows the same paths with inotify on the event loop and reports the differences
as ``WatchEvent`` objects; see ``PluginWatcher`` for its rules.

The package, one job per module: ``recognition`` (what is a plugin: the results, the names a
walk skips, examining one path), ``elf`` (the ELF reader behind a bare ``.so``), ``scanning``
(``scan``) and ``watching`` (``watch``). Every public name is importable from here.
"""

from __future__ import annotations

from .elf import NATIVE_ENTRY_SYMBOL, elf_exports
from .recognition import BARE_SUFFIXES, DiscoveredPlugin, ScanError, ScanResult, is_ignored_name
from .scanning import scan
from .watching import EventKind, PluginWatcher, WatchEvent, watch

__all__ = [
    "DiscoveredPlugin",
    "ScanError",
    "ScanResult",
    "WatchEvent",
    "PluginWatcher",
    "scan",
    "watch",
    "is_ignored_name",
    "elf_exports",
    "NATIVE_ENTRY_SYMBOL",
    "BARE_SUFFIXES",
    "EventKind",
]
