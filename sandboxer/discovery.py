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
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import stat
import struct
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Literal, Sequence, Union

from inotify_simple import INotify, flags

from ._digest import IGNORED_DIRS, tree_checksum
from .errors import ManifestError
from .manifest import ELF_MAGIC, MANIFEST_NAME, LoaderType, Plugin, load_plugin

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
]

log = logging.getLogger(__name__)

NATIVE_ENTRY_SYMBOL = "sandboxer_call"
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


ScanResult = Union[DiscoveredPlugin, ScanError]


# -- names and roots -------------------------------------------------------------------------

_VIM_SWAP = re.compile(r"\.sw[a-px]\Z")  # .swp, .swo… and the .swx probe


def is_ignored_name(name: str) -> bool:
    """Editor temporary files: vim swap files (``.swp``…), backups (``~``), emacs lock and
    autosave files (``.#x``, ``#x#``). Their churn must never look like a plugin change."""
    return (name.startswith(".#") or name.endswith("~") or bool(_VIM_SWAP.search(name))
            or (len(name) > 1 and name.startswith("#") and name.endswith("#")))


def _skipped_while_walking(name: str) -> bool:
    """Entries a walk does not look into: hidden ones, ``__pycache__``, editor temp files."""
    return name.startswith(".") or name in IGNORED_DIRS or is_ignored_name(name)


def _is_under(path: Path, root: Path) -> bool:
    """``path`` is ``root`` or lies below it (by name; nothing is resolved)."""
    return path == root or root in path.parents


def _normalize_roots(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]
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
    return tuple(r for r in roots if not any(o != r and _is_under(r, o) for o in roots))


# -- ELF: does a .so export sandboxer_call? --------------------------------------------------

class _ElfError(ValueError):
    """An ELF file whose tables cannot be read; reported, since it claims to be a library."""


_ET_DYN = 3
_SHT_STRTAB, _SHT_DYNSYM = 3, 11
_STB_GLOBAL, _STB_WEAK = 1, 2
_STT_FUNC, _STT_GNU_IFUNC = 2, 10
_STV_DEFAULT, _STV_PROTECTED = 0, 3
_MAX_TABLE = 256 << 20  # no real dynamic symbol table comes near this


@dataclass(frozen=True)
class _ElfLayout:
    """struct formats for one ELF class and byte order (fields named, since 32- and 64-bit
    symbols order them differently)."""

    ehdr: struct.Struct
    shdr: struct.Struct
    sym: struct.Struct
    sym_fields: tuple[str, ...]


def _elf_layout(elf_class: int, order: str) -> _ElfLayout:
    if elf_class == 2:
        return _ElfLayout(struct.Struct(order + "16xHHIQQQIHHHHHH"),
                          struct.Struct(order + "IIQQQQIIQQ"),
                          struct.Struct(order + "IBBHQQ"),
                          ("name", "info", "other", "shndx", "value", "size"))
    return _ElfLayout(struct.Struct(order + "16xHHIIIIIHHHHHH"),
                      struct.Struct(order + "IIIIIIIIII"),
                      struct.Struct(order + "IIIBBH"),
                      ("name", "value", "size", "info", "other", "shndx"))


def _read_at(f: Any, file_size: int, offset: int, size: int, what: str) -> bytes:
    """Exactly ``size`` bytes at ``offset``, or _ElfError: every offset in the file is
    untrusted, so each is checked against the file's size before it is used."""
    if offset < 0 or size < 0 or offset + size > file_size or size > _MAX_TABLE:
        raise _ElfError(f"a malformed ELF file ({what} lies outside the file)")
    f.seek(offset)
    data = f.read(size)
    if len(data) != size:
        raise _ElfError(f"a malformed ELF file ({what} is truncated)")
    return data


def elf_exports(path: str | os.PathLike[str], symbol: str = NATIVE_ENTRY_SYMBOL
                ) -> bool | None:
    """Whether the ELF shared object at ``path`` exports the function ``symbol`` in its
    dynamic symbol table (what dlsym would find), read with ``struct``, never loaded.

    None: not an ELF file. False: ELF, but not a shared object or no such export.
    Raises _ElfError when the file says it is ELF but its tables cannot be read (including
    a library stripped of its section headers: without them the exports cannot be found
    without doing the dynamic loader's work).
    """
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        ident = f.read(16)
        if ident[:4] != ELF_MAGIC:
            return None
        if len(ident) < 16 or ident[4] not in (1, 2) or ident[5] not in (1, 2):
            raise _ElfError("a malformed ELF file (unknown class or byte order)")
        layout = _elf_layout(ident[4], "<" if ident[5] == 1 else ">")
        (e_type, _, _, _, _, shoff, _, _, _, _, shentsize, shnum, _) = layout.ehdr.unpack(
            _read_at(f, file_size, 0, layout.ehdr.size, "the ELF header"))
        if e_type != _ET_DYN:
            return False
        if shoff == 0:
            raise _ElfError("an ELF shared object without section headers; its exports "
                            "cannot be read without loading it")
        if shentsize < layout.shdr.size:
            raise _ElfError("a malformed ELF file (section header size)")

        def section(index: int) -> tuple[int, ...]:
            return layout.shdr.unpack(_read_at(f, file_size, shoff + index * shentsize,
                                               layout.shdr.size, f"section header {index}"))

        if shnum == 0:  # extended numbering: the count is in section 0's size field
            shnum = section(0)[5]
        if shoff + shnum * shentsize > file_size:
            raise _ElfError("a malformed ELF file (section headers lie outside the file)")
        headers = [section(i) for i in range(shnum)]
        dynsym = next((h for h in headers if h[1] == _SHT_DYNSYM), None)
        if dynsym is None:
            return False
        _, _, _, _, sym_off, sym_size, link, _, _, entsize = dynsym
        if entsize != layout.sym.size or link >= shnum or headers[link][1] != _SHT_STRTAB:
            raise _ElfError("a malformed ELF file (.dynsym entry size or string table)")
        strtab = _read_at(f, file_size, headers[link][4], headers[link][5], ".dynstr")
        symbols = _read_at(f, file_size, sym_off, sym_size - sym_size % entsize, ".dynsym")
    return _exports(strtab, symbols, layout, symbol.encode())


def _exports(strtab: bytes, symbols: bytes, layout: _ElfLayout, name: bytes) -> bool:
    """Some symbol named ``name`` is a defined, visible, global or weak function.

    Names are compared by string-table offset: every offset where ``name`` NUL starts (a
    linker may share a string's tail, so ``x_sandboxer_call`` can hold ours).
    """
    wanted = name + b"\0"
    offsets, start = set(), strtab.find(wanted)
    while start != -1:
        offsets.add(start)
        start = strtab.find(wanted, start + 1)
    if not offsets:
        return False
    for values in layout.sym.iter_unpack(symbols):
        sym = dict(zip(layout.sym_fields, values))
        if sym["name"] not in offsets or sym["shndx"] == 0:  # SHN_UNDEF: imported
            continue
        bind, kind, visibility = sym["info"] >> 4, sym["info"] & 0xF, sym["other"] & 0x3
        if (bind in (_STB_GLOBAL, _STB_WEAK) and kind in (_STT_FUNC, _STT_GNU_IFUNC)
                and visibility in (_STV_DEFAULT, _STV_PROTECTED)):
            return True
    return False


# -- scanning --------------------------------------------------------------------------------

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
    return ("not a plugin (a plugin is a directory with plugin.toml, or a .py, .wasm or "
            ".so file)")


def _manifest_escapes(directory: Path) -> bool:
    """``plugin.toml`` is a link that resolves outside its plugin directory."""
    manifest = directory / MANIFEST_NAME
    if not manifest.is_symlink():
        return False
    try:
        return not manifest.resolve(strict=True).is_relative_to(directory.resolve())
    except (OSError, RuntimeError):
        return False  # a dangling link: load_plugin reports the missing manifest


def _load(path: Path) -> ScanResult | None:
    """The plugin at ``path`` (directory or bare file) with its checksum, or its error.
    None when it vanished while being read: it is gone, there is nothing to report."""
    if path.is_dir() and _manifest_escapes(path):
        return ScanError(path, f"{path / MANIFEST_NAME}: a link leading outside the plugin "
                               "directory; discovery does not follow it", MANIFEST_NAME)
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


def _examine_file(path: Path, *, explicit: bool) -> ScanResult | None:
    """A regular file: its plugin, its error, or None when it is simply not a plugin (an
    explicitly named file that is not a plugin is an error: the caller expected one)."""
    try:
        rejection = _bare_rejection(path)
    except _ElfError as exc:
        return ScanError(path, f"{path}: {exc}")
    except FileNotFoundError:
        return None
    except OSError as exc:
        return ScanError.from_exception(path, exc)
    if rejection is None:
        return _load(path)
    return ScanError(path, f"{path}: {rejection}") if explicit else None


def _is_plugin_dir(path: Path) -> bool:
    return os.path.lexists(path / MANIFEST_NAME)


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
            if _skipped_while_walking(entry.name) or entry.is_symlink():
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                if _is_plugin_dir(path):
                    found.append(_load(path))  # type: ignore[arg-type]
                else:
                    stack.append(path)
            elif entry.is_file(follow_symlinks=False):
                found.append(_examine_file(path, explicit=False))  # type: ignore[arg-type]
    return sorted((r for r in found if r is not None), key=lambda r: r.path)


def _scan_root(root: Path, *, missing_ok: bool = False) -> list[ScanResult]:
    """What ``scan`` reports for one path the caller named (links at the path followed)."""
    try:
        mode = os.stat(root).st_mode
    except FileNotFoundError:
        return [] if missing_ok else [ScanError(root, f"{root}: does not exist")]
    except OSError as exc:
        return [ScanError.from_exception(root, exc)]
    if stat.S_ISDIR(mode):
        if _is_plugin_dir(root):
            return [r for r in [_load(root)] if r is not None]
        return _walk(root)
    if stat.S_ISREG(mode):
        return [r for r in [_examine_file(root, explicit=True)] if r is not None]
    return [ScanError(root, f"{root}: neither a directory nor a regular file")]


def _scan_subtree(path: Path) -> list[ScanResult]:
    """What a walk from the scan root would report at or below ``path`` (a path that is not
    a root: links are not followed, skipped names give nothing)."""
    if _skipped_while_walking(path.name) or path.is_symlink():
        return []
    if path.is_dir():
        if _is_plugin_dir(path):
            return [r for r in [_load(path)] if r is not None]
        return _walk(path)
    if path.is_file():
        return [r for r in [_examine_file(path, explicit=False)] if r is not None]
    return []


def scan(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]
         ) -> list[ScanResult]:
    """Every plugin at or below ``paths``, each a ``DiscoveredPlugin`` or a ``ScanError``.

    A path that is itself a plugin (directory, ``plugin.toml`` or bare file) reports that
    plugin; a directory is searched recursively. Results come per path in the caller's order,
    sorted by path within each. A path that does not exist, or an explicitly named file that
    is not a plugin, is a ``ScanError``. Blocking (it reads and hashes files): from async code
    call it through ``asyncio.to_thread``.
    """
    found: dict[Path, ScanResult] = {}
    for root in _normalize_roots(paths):
        for result in _scan_root(root):
            found.setdefault(result.path, result)
    return list(found.values())


# -- watching --------------------------------------------------------------------------------

EventKind = Literal["added", "changed", "removed", "error"]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One difference: a plugin appeared (``added``), its checksum changed (``changed``), it
    went away (``removed``), or what is at ``path`` is broken (``error``, with ``error``).
    ``plugin`` is the new state for added and changed, the last known one for removed."""

    kind: EventKind
    path: Path
    plugin: DiscoveredPlugin | None = None
    error: ScanError | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "plugin": self.plugin.to_json() if self.plugin else None,
            "error": self.error.to_json() if self.error else None,
        }


_WATCH_MASK = (flags.CREATE | flags.DELETE | flags.MODIFY | flags.CLOSE_WRITE | flags.ATTRIB
               | flags.MOVED_FROM | flags.MOVED_TO | flags.DELETE_SELF | flags.MOVE_SELF
               | flags.ONLYDIR)
_GONE = flags.DELETE | flags.MOVED_FROM
_CAME = flags.CREATE | flags.MOVED_TO
_LOST_SELF = flags.DELETE_SELF | flags.MOVE_SELF | flags.UNMOUNT
_END = object()


class _Engine:
    """The state behind a ``PluginWatcher``: inotify watches, pending paths, the last known
    plugins, and the task that turns quiet periods into events.

    Kept apart from the public object so that dropping that object (without ``aclose``) can
    close the inotify fd through a finalizer: the task holds the engine, not the watcher.
    """

    def __init__(self, roots: tuple[Path, ...], debounce: float, max_wait: float) -> None:
        self.roots = roots
        self.debounce = debounce
        self.max_wait = max_wait
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.closed = False
        self.overflows = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inotify: INotify | None = None
        self._task: asyncio.Task[None] | None = None
        self._watches: dict[int, set[Path]] = {}
        self._pending: set[Path] = set()
        self._rescan_all = False
        self._touched = False
        self._due = 0.0
        self._wake = asyncio.Event()
        self._writing: dict[Path, float] = {}
        self._known: dict[Path, DiscoveredPlugin] = {}
        self._errors: dict[Path, ScanError] = {}

    # -- lifetime --------------------------------------------------------------------------
    def open(self) -> None:
        """Watch every root (and the directory above it), then start reading and working.
        Watches exist before the baseline scan, so nothing between the two is missed."""
        self._loop = asyncio.get_running_loop()
        self._inotify = INotify(nonblocking=True)
        for root in self.roots:
            self._watch_root(root)
        self._pending.clear()
        self._loop.add_reader(self._inotify.fileno(), self._on_readable)
        self._task = self._loop.create_task(self._work(), name="sandboxer-watch")

    def close(self) -> None:
        """Stop reading, close the inotify fd, end the task and the iterator. Synchronous, so
        that it can run from a finalizer, a cancelled task or loop shutdown."""
        if self.closed:
            return
        self.closed = True
        if self._inotify is not None:
            try:
                if self._loop is not None:
                    self._loop.remove_reader(self._inotify.fileno())
            except (RuntimeError, ValueError, OSError):
                pass  # the loop is already closed: nothing is registered any more
            self._inotify.close()
        task = self._task
        if task is not None and not task.done():
            try:
                current = asyncio.current_task()
            except RuntimeError:
                current = None
            if task is not current:
                try:
                    task.cancel()
                except RuntimeError:
                    pass  # its loop is closed
        self.queue.put_nowait(_END)

    def _fail(self, exc: BaseException) -> None:
        self.queue.put_nowait(exc)
        self.close()

    # -- watches ---------------------------------------------------------------------------
    def _add_watch(self, path: Path, *, follow: bool = False) -> None:
        """Watch one directory; a link is never followed except at a root the caller named.
        A directory that vanished meanwhile is simply not watched."""
        assert self._inotify is not None
        mask = _WATCH_MASK if follow else _WATCH_MASK | flags.DONT_FOLLOW
        try:
            wd = self._inotify.add_watch(path, mask)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a link where DONT_FOLLOW refuses it
                return
            raise  # ENOSPC (watch limit) and the like: the watch cannot be complete
        self._watches.setdefault(wd, set()).add(path)

    def _watch_tree(self, top: Path, *, follow: bool = False) -> None:
        """Watch ``top`` and every directory below it that a walk would enter (plugin
        directories included: a change deep inside one changes its checksum)."""
        self._add_watch(top, follow=follow)
        stack = [top]
        while stack:
            try:
                with os.scandir(stack.pop()) as it:
                    subdirs = [Path(e.path) for e in it
                               if not _skipped_while_walking(e.name)
                               and e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
            for sub in subdirs:
                self._add_watch(sub)
                stack.append(sub)

    def _watch_root(self, root: Path) -> None:
        """Watch the nearest existing directory above ``root`` (to see it vanish and come
        back, with its parents) and, when it is a directory, the tree below it.

        The anchor is looked up again after its watch is in place: a directory on the way to
        ``root`` created in between would otherwise never be reported.
        """
        watched = None
        while True:
            anchor = root.parent
            while anchor != anchor.parent and not anchor.is_dir():
                anchor = anchor.parent
            if anchor == watched:
                break
            self._add_watch(anchor, follow=True)
            watched = anchor
        if root.is_dir():
            self._watch_tree(root, follow=True)

    def _forget(self, top: Path) -> None:
        """``top`` moved or vanished: drop the names under it; a watch left with no name is
        removed (a moved directory keeps its watch in the kernel and would report under a
        stale name)."""
        assert self._inotify is not None
        for wd, names in list(self._watches.items()):
            stale = {p for p in names if _is_under(p, top)}
            if not stale:
                continue
            names -= stale
            if not names:
                del self._watches[wd]
                try:
                    self._inotify.rm_watch(wd)
                except OSError:
                    pass  # the kernel already dropped it
        for path in [p for p in self._writing if _is_under(p, top)]:
            del self._writing[path]

    # -- inotify events --------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            assert self._inotify is not None
            self.handle(self._inotify.read(timeout=0))
        except BaseException as exc:  # noqa: BLE001 — a reader callback must not raise
            self._fail(exc)

    def handle(self, events: Sequence[Any]) -> None:
        """Fold inotify events into pending paths (the slow work waits for quiet). Watches
        for new directories are added right away so that nothing inside them is missed."""
        now = self._loop.time() if self._loop else 0.0
        self._touched = False
        for event in events:
            if event.mask & flags.Q_OVERFLOW:
                self._overflowed()
                continue
            names = self._watches.get(event.wd)
            if not names:
                continue
            if event.mask & flags.IGNORED:
                del self._watches[event.wd]
                continue
            for base in list(names):
                self._handle_one(base, event.mask, event.name)
        if self._touched:  # noise in a parent directory does not postpone anything
            self._due = now + self.debounce
            self._wake.set()

    def _handle_one(self, base: Path, mask: int, name: str) -> None:
        if not name:
            if mask & _LOST_SELF and any(_is_under(r, base) for r in self.roots):
                if mask & flags.MOVE_SELF:
                    self._forget(base)
                self._reestablish(base)
            return
        if is_ignored_name(name):
            return
        path = base / name
        if mask & flags.ISDIR and mask & _GONE:
            self._forget(path)
        if mask & (_GONE | _CAME) and any(_is_under(r, path) for r in self.roots):
            self._reestablish(path)  # a root, or a directory above it, came or went
        if not any(_is_under(path, r) for r in self.roots):
            return
        if mask & flags.MODIFY and not mask & flags.ISDIR:
            self._writing.setdefault(path, self._loop.time() if self._loop else 0.0)
        if mask & (flags.CLOSE_WRITE | _GONE):
            self._writing.pop(path, None)
        if (mask & flags.ISDIR and mask & _CAME and path not in self.roots
                and not _skipped_while_walking(name)):
            self._watch_tree(path)
        self._pending.add(path)
        self._touched = True

    def _reestablish(self, path: Path) -> None:
        """Every root at or below ``path`` is watched again from scratch and rescanned."""
        for root in self.roots:
            if _is_under(root, path):
                self._watch_root(root)
                self._pending.add(root)
                self._touched = True

    def _overflowed(self) -> None:
        """The kernel dropped events: nothing pending can be trusted to be complete, so every
        root is watched again (directories made meanwhile) and rescanned as a whole."""
        self.overflows += 1
        log.warning("inotify queue overflowed; rescanning %s", ", ".join(map(str, self.roots)))
        for root in self.roots:
            self._watch_root(root)
        self._rescan_all = True
        self._touched = True

    # -- turning quiet periods into events -------------------------------------------------
    async def _work(self) -> None:
        try:
            baseline = await asyncio.to_thread(self._collect, list(self.roots), True)
            self._publish(self._apply(list(self.roots), baseline, self._unsettled()))
            while True:
                await self._quiet()
                scopes = self._ready_scopes()
                if scopes:
                    results = await asyncio.to_thread(self._collect, scopes, False)
                    self._publish(self._apply(scopes, results, self._unsettled()))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 — handed to the consumer
            self.queue.put_nowait(exc)
        finally:
            self.close()

    async def _quiet(self) -> None:
        """Wait until something is pending and nothing has happened for ``debounce``."""
        assert self._loop is not None
        while True:
            if not (self._pending or self._rescan_all):
                self._wake.clear()
                await self._wake.wait()
                continue
            delay = self._due - self._loop.time()
            if delay <= 0:
                return
            await asyncio.sleep(delay)

    def _scope(self, path: Path) -> Path | None:
        """The unit to re-examine for a change at ``path``: the plugin directory holding it
        (nearest the root: a plugin directory is one plugin), the directory of a
        ``plugin.toml`` (it makes or unmakes a plugin directory), else the path itself."""
        root = next((r for r in self.roots if _is_under(path, r)), None)
        if root is None:
            return None
        if path == root:
            return root
        ancestors = [root]
        for part in path.relative_to(root).parts[:-1]:
            ancestors.append(ancestors[-1] / part)
        for candidate in ancestors:
            if (candidate in self._known or candidate in self._errors
                    or _is_plugin_dir(candidate)):
                return candidate
        return path.parent if path.name == MANIFEST_NAME else path

    def _busy(self, scope: Path, now: float) -> bool:
        """A file in ``scope`` is still open for writing (modified, not yet closed) and has
        not been for longer than ``max_wait``: its content is not final yet."""
        for path, since in list(self._writing.items()):
            if not os.path.lexists(path):
                del self._writing[path]
            elif _is_under(path, scope) and now - since < self.max_wait:
                return True
        return False

    def _ready_scopes(self) -> list[Path]:
        """The outermost scopes whose content is settled; busy ones wait another period."""
        assert self._loop is not None
        now = self._loop.time()
        if self._rescan_all:
            self._rescan_all = False
            self._pending.clear()
            wanted = set(self.roots)
        else:
            wanted = {s for s in map(self._scope, self._pending) if s is not None}
            self._pending.clear()
        outermost = sorted(wanted, key=lambda p: len(p.parts))
        scopes: list[Path] = []
        for scope in outermost:
            if not any(_is_under(scope, kept) for kept in scopes):
                scopes.append(scope)
        busy = [s for s in scopes if self._busy(s, now)]
        if busy:
            self._pending.update(busy)
            self._due = now + self.debounce
        return [s for s in scopes if s not in busy]

    def _collect(self, scopes: list[Path], baseline: bool) -> list[ScanResult]:
        """Scan each scope (in a worker thread: reading and hashing block). A missing root
        is an error only at the start: later, it is a root that went away."""
        results: list[ScanResult] = []
        for scope in scopes:
            if scope in self.roots:
                results.extend(_scan_root(scope, missing_ok=not baseline))
            else:
                results.extend(_scan_subtree(scope))
        return results

    def _unsettled(self) -> set[Path]:
        """The scopes touched while a scan ran (or since the watches were set up, for the
        baseline): what the scan read there may be half-written, so it is not reported now;
        those paths stay pending and are scanned again once quiet.

        The inotify queue is read first: the kernel queues an event during the write itself,
        so every write that happened before this point is known here.
        """
        if self._inotify is not None and not self.closed:
            self.handle(self._inotify.read(timeout=0))
        if self._rescan_all:
            return set(self.roots)
        return {s for s in map(self._scope, self._pending) if s is not None}

    def _apply(self, scopes: list[Path], results: list[ScanResult],
               unsettled: Collection[Path] = ()) -> list[WatchEvent]:
        """Compare what is now in ``scopes`` with what was known there and remember it,
        leaving out the ``unsettled`` parts (neither reported nor forgotten).

        ``changed`` only when the checksum differs. An error does not forget a plugin that
        was good (whoever runs it keeps the last good version); the same error is reported
        once, not on every rescan.
        """
        def settled(path: Path) -> bool:
            return not any(_is_under(path, u) for u in unsettled)

        def in_scope(path: Path) -> bool:
            return any(_is_under(path, s) for s in scopes) and settled(path)

        found = {r.path: r for r in results if settled(r.path)}

        events = [WatchEvent("removed", p, plugin=self._known.pop(p))
                  for p in sorted(p for p in self._known if in_scope(p) and p not in found)]
        for path in [p for p in self._errors if in_scope(p) and p not in found]:
            del self._errors[path]
        for path in sorted(found):
            result = found[path]
            if isinstance(result, ScanError):
                if self._errors.get(path) != result:
                    self._errors[path] = result
                    events.append(WatchEvent("error", path, error=result))
                continue
            self._errors.pop(path, None)
            old = self._known.get(path)
            self._known[path] = result
            if old is None:
                events.append(WatchEvent("added", path, plugin=result))
            elif old.checksum != result.checksum:
                events.append(WatchEvent("changed", path, plugin=result))
        return events

    def _publish(self, events: list[WatchEvent]) -> None:
        for event in events:
            self.queue.put_nowait(event)


class PluginWatcher:
    """An async iterator of ``WatchEvent`` over the plugins at or below some paths.

    Built on inotify with the fd registered on the event loop (no thread polls). Rules:

    - **Start:** the watches are set up on ``start()`` (or the first ``__anext__``, or
      ``async with``); then every plugin already there is reported as ``added`` (and every
      broken one as ``error``), so one stream gives the whole picture without a race between
      a scan and a watch. A path that does not exist at the start is an ``error`` event and
      is still watched: it is reported as soon as it appears.
    - **Debounce:** a change is examined once nothing happened for ``debounce`` seconds, and
      not while a file in it is still open for writing (up to ``max_wait`` seconds), so
      partial writes, atomic-rename saves and bursts give one event for the final content.
      Editor temporary files never cause events.
    - **Errors:** a plugin whose manifest does not parse yet is not ``added``/``changed``; once
      the content has settled and is still broken, one ``error`` event is sent (repeated only
      when the problem changes). A good plugin that becomes broken stays known (no
      ``removed``): fix it and it is ``changed`` (if its checksum differs).
    - **Recursive:** new directories are watched as they appear; a watched path that is
      deleted and recreated (or whose parents are) is followed again; on an inotify queue
      overflow everything is rescanned and only the differences are reported.
    - **Closing:** ``aclose()``/``close()``, leaving ``async with``, cancellation at loop
      shutdown, or dropping the watcher all remove the reader and close the inotify fd.
    """

    def __init__(self, paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *,
                 debounce: float = 0.2, max_wait: float = 5.0) -> None:
        if debounce < 0 or max_wait < 0:
            raise ValueError("debounce and max_wait must not be negative")
        self.roots = _normalize_roots(paths)
        self._engine = _Engine(self.roots, debounce, max_wait)
        self._started = False
        self._finalizer = weakref.finalize(self, _Engine.close, self._engine)
        self._finalizer.atexit = False

    @property
    def closed(self) -> bool:
        return self._engine.closed

    async def start(self) -> None:
        """Set the watches up: changes after this returns are seen. Idempotent."""
        if self._started or self._engine.closed:
            return
        self._started = True
        try:
            self._engine.open()
        except BaseException:
            self._engine.close()
            raise

    def __aiter__(self) -> PluginWatcher:
        return self

    async def __anext__(self) -> WatchEvent:
        """The next event; cancelling this wait (a timeout) loses nothing."""
        await self.start()
        item = await self._engine.queue.get()
        if item is _END:
            self._engine.queue.put_nowait(_END)  # every later call ends too
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._engine.close()

    async def aclose(self) -> None:
        self._engine.close()

    async def __aenter__(self) -> PluginWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._engine.close()


def watch(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *,
          debounce: float = 0.2, max_wait: float = 5.0) -> PluginWatcher:
    """Follow the plugins at or below ``paths``: ``async for event in watch(paths)``.

    See ``PluginWatcher`` for the rules. ``debounce`` is the quiet period (seconds) before a
    change is examined; ``max_wait`` the longest a change is held back because a file in it
    is still open for writing.
    """
    return PluginWatcher(paths, debounce=debounce, max_wait=max_wait)
