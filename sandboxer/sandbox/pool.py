"""Warm sandboxes: made ahead of time, kept ready, each taken by one plugin generation.

A warm sandbox is a whole sandbox (namespaces, cgroup, root filesystem, seccomp filter) with
the plugin host already running in it, waiting: everything of a launch but the plugin's own
files and the plugin itself. Taking one hands it the plugin directory (PID 1 copies it into
a private tmpfs at /plugin, exactly as the launcher copies it in a cold start, and only
then drops its capabilities), sets the plugin's limits on the cgroup, and tells the host
which plugin to load. So a warm start pays none of the process start-up, only the copy and
the plugin's own import.

Sandboxes are kept by **shape**: everything that makes a sandbox what it is (the
``LaunchSpec`` of the plugin host: mounts, masks, environment, seccomp filter, rlimits,
network mode, profile) but the copies and the limits set on the cgroup at take time. A load
takes one only when its own spec has exactly that shape; any other load starts cold, as
before. A sandbox serves one plugin generation and is never returned: after it ran plugin
code it is gone with that generation, so nothing of one plugin ever reaches the next.

The pool refills in the background after each take, up to ``size`` per shape, within a
memory budget (what its waiting sandboxes use, measured in their cgroups), and not at all
while the host's available memory is below ``min_available``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from ..errors import PluginLoadError, SandboxerError
from . import child
from . import launcher_mounts as fs
from .cgroups import CgroupLimits
from .confinement import Confinement
from .launcher_steps import SetupFailed
from .sources import MAX_COPY_BYTES, MAX_COPY_ENTRIES, copy_entry, open_copy_source
from .spec import LaunchSpec, Mount
from .start import hand_over

__all__ = ["WarmSandbox", "SandboxPool", "shape_key", "TooLargeForWarm"]

log = logging.getLogger("sandboxer.pool")

# A warm sandbox's copies are opened here, by the supervisor, all at once: a plugin
# directory with more entries than this starts cold (the launcher has its own fd limit).
WARM_MAX_ENTRIES = 256


# After a take, the refill waits this long: making a sandbox costs CPU that the plugin just
# taken, starting up, would otherwise compete for.
REFILL_DELAY = 0.1


class TooLargeForWarm(Exception):
    """The plugin directory has too many entries to be handed over: start it cold."""


def shape_key(spec: LaunchSpec) -> str:
    """What makes a sandbox of ``spec`` what it is, as a digest: the spec without its
    copies, its argv (a warm sandbox's host waits for its plugin's) and the limits that are
    set on the cgroup when a sandbox is taken."""
    sandbox = spec.sandbox.replace(memory_limit=0, cpu_limit=0.0, timeout=0.0, fuel=None)
    shape = dataclasses.replace(spec, argv=[], copies=(), sandbox=sandbox)
    if spec.warm_exec:  # the program, its environment and directory come at take time
        shape = dataclasses.replace(shape, program=None, env={}, cwd="")
    return hashlib.sha256(repr(shape).encode()).hexdigest()


@dataclass(eq=False)
class WarmSandbox:
    """A sandbox made ahead: the launcher's process, its confinement, the supervisor's end of
    the RPC socket and the cookie its host will present, and the status socket to its PID 1,
    through which the plugin's files go at take time."""

    proc: child.PluginProcess
    confinement: Confinement
    rpc: socket.socket
    cookie: str
    status: socket.socket

    def alive(self) -> bool:
        return self.proc.returncode is None

    async def take(
        self,
        copies: tuple[Mount, ...],
        limits: CgroupLimits,
        plugin_id: str,
        program: Mapping[str, object] | None = None,
    ) -> None:
        """Make it the sandbox of one plugin: its limits on the cgroup, its ``copies`` made
        by PID 1, and in a sandbox made for any program (``warm_exec``) the ``program`` to
        run (program, argv, env, cwd), exec'd before this returns. ``TooLargeForWarm``: the
        caller starts the plugin cold instead (this sandbox is then of no more use: discard
        it). A plugin's files that cannot be opened are the PluginLoadError a cold start
        gives; a program that cannot be exec'd, the SandboxSetupError."""
        # On the loop, not a worker thread: a directory that can be handed over is small (a
        # few hundred entries at most), and a thread's round trip costs more than the walk.
        message, fds = _open_copies(copies, plugin_id, program)
        try:
            if self.confinement.cgroup is not None:
                self.confinement.cgroup.limit(limits)
            await hand_over(self.status, message, fds, plugin_id=plugin_id)
        finally:
            for fd in fds:
                os.close(fd)

    async def discard(self) -> None:
        """Kill it and release everything it holds."""
        self.rpc.close()
        self.status.close()
        await self.proc.close()
        await self.confinement.aclose()


def _open_copies(
    copies: tuple[Mount, ...], plugin_id: str, program: Mapping[str, object] | None
) -> tuple[bytes, list[int]]:
    """The handover's JSON line and its fds: every entry of each copied tree, walked as the
    launcher walks it (launcher_mounts.open_copies: from the directory's fd, through no
    link, each file checked to be the inode its name showed), here, as the supervisor."""
    listed: list[dict[str, object]] = []
    fds: list[int] = []
    try:
        for copy in copies:
            source = open_copy_source(copy.source, plugin_id)
            try:
                listing = copy_entry(copy, fd=0, source=source, size=0)
                listing["max_entries"] = min(WARM_MAX_ENTRIES, MAX_COPY_ENTRIES)
                spec = {"copies": [listing]}
                try:
                    ((target, entries),) = fs.open_copies(spec, [source])
                except fs.TooManyEntries as exc:
                    raise TooLargeForWarm(exc.error) from None
                except SetupFailed as exc:
                    raise PluginLoadError(
                        f"plugin {plugin_id}: its directory cannot be copied into the sandbox: "
                        f"{exc.error}" + (f" ({exc.path})" if exc.path else ""),
                        plugin_id=plugin_id,
                    ) from None
            finally:
                os.close(source)
            rows: list[list[object]] = []
            size = len(entries) * 4096 + (1 << 20)  # as sources.tree_size reckons a tmpfs
            for rel, kind, mode, payload in entries:
                if kind == "f":
                    rows.append([rel, kind, mode, len(fds)])
                    fds.append(int(payload))
                    size += os.fstat(int(payload)).st_size
                else:
                    rows.append([rel, kind, mode, payload])
            if size > MAX_COPY_BYTES:
                raise TooLargeForWarm(f"{size} bytes")  # a cold start says what is wrong
            listed.append(
                {
                    "target": target,
                    "size": size,
                    "entries": rows,
                    # PID 1 checks the copy it makes against these, as a cold launch does
                    "bare": listing["bare"],
                    "expect": listing["expect"],
                }
            )
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    handover = {"copies": listed, "fd_count": len(fds), "exec": program}
    message = json.dumps(handover).encode() + b"\n"
    return message, fds


def _available_memory() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class SandboxPool:
    """Warm sandboxes by shape, refilled in the background. ``make(template)`` makes one
    of ``template``'s shape (the loader's business: it knows the plugin host)."""

    def __init__(
        self,
        make: Callable[[LaunchSpec], Awaitable[WarmSandbox]],
        *,
        size: int,
        memory_budget: int,
        min_available: int,
        learn: bool = True,
    ) -> None:
        self._make = make
        self.size = size
        self.learn = learn
        self.memory_budget = memory_budget
        self.min_available = min_available
        self._templates: dict[str, LaunchSpec] = {}
        self._ready: dict[str, list[WarmSandbox]] = {}
        self._fillers: dict[str, asyncio.Task[None]] = {}
        self._failed: dict[str, str] = {}
        self._discarding: set[asyncio.Task[None]] = set()
        self._closed = False
        self._closing = asyncio.Event()

    def keep(self, template: LaunchSpec) -> str:
        """Keep sandboxes of ``template``'s shape ready from now on; returns the shape."""
        return self._keep(template, delay=0.0)

    def take(self, template: LaunchSpec) -> WarmSandbox | None:
        """A ready sandbox of ``template``'s shape, if there is one (with ``learn``, the
        shape is kept from now on either way; the refill waits ``REFILL_DELAY``)."""
        key = shape_key(template)
        ready = self._ready.get(key, [])
        taken = None
        while ready and taken is None:
            warm = ready.pop(0)
            if warm.alive():
                taken = warm
            else:
                self._discard_later(warm)
        if self.learn or key in self._templates:
            self._keep(template, delay=REFILL_DELAY)
        return taken

    def _keep(self, template: LaunchSpec, *, delay: float) -> str:
        key = shape_key(template)
        if self._closed or self.size <= 0:
            return key
        self._templates.setdefault(key, template)
        self._refill(key, delay)
        return key

    def pids(self) -> list[int]:
        """The launcher pid of every waiting sandbox (its PID 1 and host are below it)."""
        return [warm.proc.pid for ready in self._ready.values() for warm in ready]

    async def filled(self) -> None:
        """Wait until no refill is running (tests and benchmarks)."""
        while self._fillers:
            await asyncio.gather(*self._fillers.values(), return_exceptions=True)

    def _refill(self, key: str, delay: float = 0.0) -> None:
        if key in self._fillers or key in self._failed or self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._fill(key, delay))
        self._fillers[key] = task
        task.add_done_callback(lambda _: self._fillers.pop(key, None))

    async def _fill(self, key: str, delay: float = 0.0) -> None:
        if delay:
            try:
                await asyncio.wait_for(self._closing.wait(), delay)
                return  # the pool is closing
            except TimeoutError:
                pass
        ready = self._ready.setdefault(key, [])
        while not self._closed and len(ready) < self.size and self._room():
            try:
                warm = await self._make(self._templates[key])
            except (SandboxerError, OSError) as exc:
                # A shape that cannot be made warm is not tried again: its loads start cold.
                self._failed[key] = str(exc)
                log.warning(
                    "warm sandboxes of one shape cannot be made (%s); those plugins start cold", exc
                )
                return
            if self.closed:  # while it was being made
                await warm.discard()
                return
            ready.append(warm)

    @property
    def closed(self) -> bool:
        return self._closed

    def _room(self) -> bool:
        if _available_memory() < self.min_available:
            return False
        used = 0
        for warms in self._ready.values():
            for warm in warms:
                stats = warm.confinement.stats()
                used += (stats.memory_peak or 0) if stats is not None else 0
        return used < self.memory_budget

    def _discard_later(self, warm: WarmSandbox) -> None:
        task = asyncio.get_running_loop().create_task(warm.discard())
        self._discarding.add(task)
        task.add_done_callback(self._discarding.discard)

    async def aclose(self) -> None:
        """Stop refilling and discard every waiting sandbox. A sandbox being made is let
        finish and then discarded: a launch cut short by a cancel could leave half of it
        (a cgroup made on a worker thread) behind."""
        self._closed = True
        self._closing.set()
        await asyncio.gather(*self._fillers.values(), return_exceptions=True)
        warms = [warm for ready in self._ready.values() for warm in ready]
        self._ready.clear()
        for warm in warms:
            await warm.discard()
        await asyncio.gather(*self._discarding, return_exceptions=True)
