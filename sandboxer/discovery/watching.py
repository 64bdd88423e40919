"""The watcher: follow the plugins at or below some paths with inotify (``watch``).

The inotify fd is read on the event loop; scans run in worker threads. See ``PluginWatcher``
for the rules (debounce, partial writes, recursion, overflow, closing).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import weakref
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from inotify_simple import INotify, flags

from ..manifest import MANIFEST_NAME
from .recognition import (
    DiscoveredPlugin,
    ScanError,
    ScanResult,
    is_ignored_name,
    is_plugin_dir,
    skipped_while_walking,
)
from .scanning import is_under, normalize_roots, scan_root, scan_subtree

__all__ = ["WatchEvent", "EventKind", "PluginWatcher", "watch"]

log = logging.getLogger("sandboxer.discovery")


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


_WATCH_MASK = (
    flags.CREATE
    | flags.DELETE
    | flags.MODIFY
    | flags.CLOSE_WRITE
    | flags.ATTRIB
    | flags.MOVED_FROM
    | flags.MOVED_TO
    | flags.DELETE_SELF
    | flags.MOVE_SELF
    | flags.ONLYDIR
)
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
                    subdirs = [
                        Path(e.path)
                        for e in it
                        if not skipped_while_walking(e.name) and e.is_dir(follow_symlinks=False)
                    ]
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
            stale = {p for p in names if is_under(p, top)}
            if not stale:
                continue
            names -= stale
            if not names:
                del self._watches[wd]
                try:
                    self._inotify.rm_watch(wd)
                except OSError:
                    pass  # the kernel already dropped it
        for path in [p for p in self._writing if is_under(p, top)]:
            del self._writing[path]

    # -- inotify events --------------------------------------------------------------------
    def _on_readable(self) -> None:
        try:
            assert self._inotify is not None
            self.handle(self._inotify.read(timeout=0))
        except BaseException as exc:
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
            if mask & _LOST_SELF and any(is_under(r, base) for r in self.roots):
                if mask & flags.MOVE_SELF:
                    self._forget(base)
                self._reestablish(base)
            return
        if is_ignored_name(name):
            return
        path = base / name
        if mask & flags.ISDIR and mask & _GONE:
            self._forget(path)
        if mask & (_GONE | _CAME) and any(is_under(r, path) for r in self.roots):
            self._reestablish(path)  # a root, or a directory above it, came or went
        if not any(is_under(path, r) for r in self.roots):
            return
        if mask & flags.MODIFY and not mask & flags.ISDIR:
            self._writing.setdefault(path, self._loop.time() if self._loop else 0.0)
        if mask & (flags.CLOSE_WRITE | _GONE):
            self._writing.pop(path, None)
        if (
            mask & flags.ISDIR
            and mask & _CAME
            and path not in self.roots
            and not skipped_while_walking(name)
        ):
            self._watch_tree(path)
        self._pending.add(path)
        self._touched = True

    def _reestablish(self, path: Path) -> None:
        """Every root at or below ``path`` is watched again from scratch and rescanned."""
        for root in self.roots:
            if is_under(root, path):
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
        except BaseException as exc:
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
        root = next((r for r in self.roots if is_under(path, r)), None)
        if root is None:
            return None
        if path == root:
            return root
        ancestors = [root]
        for part in path.relative_to(root).parts[:-1]:
            ancestors.append(ancestors[-1] / part)
        for candidate in ancestors:
            if candidate in self._known or candidate in self._errors or is_plugin_dir(candidate):
                return candidate
        return path.parent if path.name == MANIFEST_NAME else path

    def _busy(self, scope: Path, now: float) -> bool:
        """A file in ``scope`` is still open for writing (modified, not yet closed) and has
        not been for longer than ``max_wait``: its content is not final yet."""
        for path, since in list(self._writing.items()):
            if not os.path.lexists(path):
                del self._writing[path]
            elif is_under(path, scope) and now - since < self.max_wait:
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
            if not any(is_under(scope, kept) for kept in scopes):
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
                results.extend(scan_root(scope, missing_ok=not baseline))
            else:
                results.extend(scan_subtree(scope))
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

    def _apply(
        self, scopes: list[Path], results: list[ScanResult], unsettled: Collection[Path] = ()
    ) -> list[WatchEvent]:
        """Compare what is now in ``scopes`` with what was known there and remember it,
        leaving out the ``unsettled`` parts (neither reported nor forgotten).

        ``changed`` only when the checksum differs. An error does not forget a plugin that
        was good (whoever runs it keeps the last good version); the same error is reported
        once, not on every rescan.
        """

        def settled(path: Path) -> bool:
            return not any(is_under(path, u) for u in unsettled)

        def in_scope(path: Path) -> bool:
            return any(is_under(path, s) for s in scopes) and settled(path)

        found = {r.path: r for r in results if settled(r.path)}

        events = [
            WatchEvent("removed", p, plugin=self._known.pop(p))
            for p in sorted(p for p in self._known if in_scope(p) and p not in found)
        ]
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

    def __init__(
        self,
        paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
        *,
        debounce: float = 0.2,
        max_wait: float = 5.0,
    ) -> None:
        if debounce < 0 or max_wait < 0:
            raise ValueError("debounce and max_wait must not be negative")
        self.roots = normalize_roots(paths)
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
        event: WatchEvent = item
        return event

    def close(self) -> None:
        self._engine.close()

    async def aclose(self) -> None:
        self._engine.close()

    async def __aenter__(self) -> PluginWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._engine.close()


def watch(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    debounce: float = 0.2,
    max_wait: float = 5.0,
) -> PluginWatcher:
    """Follow the plugins at or below ``paths``: ``async for event in watch(paths)``.

    See ``PluginWatcher`` for the rules. ``debounce`` is the quiet period (seconds) before a
    change is examined; ``max_wait`` the longest a change is held back because a file in it
    is still open for writing.
    """
    return PluginWatcher(paths, debounce=debounce, max_wait=max_wait)
