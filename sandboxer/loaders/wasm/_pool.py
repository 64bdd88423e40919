"""The instance pool of one wasm plugin generation: which instances are idle, who waits for
one, and the swap of an instance that trapped for a fresh one, initialised again.

Event-loop thread only. The pool never runs wasm on the loop: instances are made on the
engine's workers (``new_instance`` blocks), and ``init`` is rerun through the call path the
handle gives it (``reinit``).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

from ...errors import PluginLoadError, SandboxerError
from .. import not_implemented
from ._instance import Instance

__all__ = ["Pool"]


class Pool:
    """Instances of one generation; a call takes one (``acquire``) and gives it back
    (``release``). ``instances`` and ``idle`` are read by the handle's hot path and never
    replaced, only changed in place."""

    def __init__(
        self,
        plugin_id: str,
        *,
        executor: Executor,
        new_instance: Callable[[], Instance],
        reinit: Callable[[Instance], Awaitable[object]] | None,
        fail: Callable[[SandboxerError], None],
    ) -> None:
        self.plugin_id = plugin_id
        self.instances: list[Instance] = []
        self.idle: list[Instance] = []
        self._waiters: collections.deque[asyncio.Future[Instance]] = collections.deque()
        self._loop = asyncio.get_running_loop()
        self._executor = executor
        self._new_instance = new_instance
        self._reinit = reinit
        self._fail = fail

    async def fill(self, size: int) -> None:
        """Make ``size`` instances, one after the other, off the loop."""
        for _ in range(size):
            inst = await self._loop.run_in_executor(self._executor, self._new_instance)
            self.instances.append(inst)
            self.idle.append(inst)

    async def acquire(self) -> Instance:
        """An instance for one call, marked busy; a trapped one is replaced first."""
        if self.idle:
            inst = self.idle.pop()
        else:
            waiter: asyncio.Future[Instance] = self._loop.create_future()
            self._waiters.append(waiter)
            inst = await waiter
        inst.busy = True
        if inst.broken:
            inst = await self._replace(inst)
        return inst

    @property
    def waiting(self) -> int:
        """How many calls wait for an instance."""
        return len(self._waiters)

    def release(self, inst: Instance) -> None:
        inst.busy = False
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(inst)
                return
        self.idle.append(inst)

    async def _replace(self, old: Instance) -> Instance:
        """A fresh instance for one that trapped, initialised again with the same config.

        On failure the broken instance goes back to the pool (a later call tries again) and,
        when the plugin itself is at fault, the plugin fails."""
        index = self.instances.index(old)
        old.release()
        work = self._loop.run_in_executor(self._executor, self._new_instance)
        try:
            new = await asyncio.shield(work)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                work.add_done_callback(_release_when_made)
            self.release(old)
            if isinstance(exc, SandboxerError):
                self._fail(exc)
            raise
        self.instances[index] = new
        new.busy = True
        if self._reinit is not None:
            try:
                await self._reinit(new)
            except BaseException as exc:
                if not_implemented(exc):
                    return new  # it has no init to run, as at load
                new.broken = True
                if new.busy:
                    self.release(new)
                if not isinstance(exc, SandboxerError):
                    raise
                error = PluginLoadError(
                    f"plugin {self.plugin_id}: could not replace an "
                    f"instance that trapped: init failed: {exc}",
                    plugin_id=self.plugin_id,
                )
                self._fail(error)
                raise error from exc
        return new

    def close(self, error: SandboxerError) -> None:
        """Fail every call waiting for an instance with ``error``."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def release_all(self) -> None:
        """Free every instance (once no wasm runs in any)."""
        for inst in self.instances:
            inst.release()
        self.instances.clear()
        self.idle.clear()


def _release_when_made(work: asyncio.Future[Instance]) -> None:
    """A replacement instance whose caller stopped waiting: release it once it exists."""
    if not work.cancelled() and work.exception() is None:
        work.result().release()
