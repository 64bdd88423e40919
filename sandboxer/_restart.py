"""Restarting plugins that fail on their own: the policy, and the quarantine that ends a
crash loop (DESIGN section 8: "restart policy with backoff may bring it back").

A plugin fails on its own when its generation crashes, breaks the protocol or fails its
health checks (``Lifecycle.fail_current``); a first load that fails is the caller's error,
not a failure of a running plugin, and is never restarted. Under ``on-failure`` each such
failure is counted, and the ones within ``quarantine_window`` decide: the n-th is restarted
after ``min(backoff * 2 ** (n - 1), backoff_max)`` seconds (0.5, 1, 2, 4 ... 30 by default),
and the ``quarantine_after``-th is not restarted at all: the plugin is ``quarantined`` until
``PluginManager.restart(id)`` (which forgets its failures) or its unload. A restart that
fails is a failure like any other.

The policy comes from the manifest's ``[plugin] restart`` when it names one, else from the
host config's ``restart``; the backoff and the quarantine are the host's.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import PluginStateError

if TYPE_CHECKING:
    from ._lifecycle import Lifecycle
    from .manifest import Plugin

__all__ = ["RestartMode", "RestartPolicy", "Failures", "Restarts", "parse_restart"]

log = logging.getLogger("sandboxer")


class RestartMode(enum.Enum):
    NEVER = "never"
    ON_FAILURE = "on-failure"


def parse_restart(value: object) -> RestartMode:
    """A restart policy's name, as the manifest and the host config write it."""
    try:
        return RestartMode(value)
    except ValueError:
        raise ValueError(f'"never" or "on-failure", not {value!r}') from None


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    mode: RestartMode = RestartMode.NEVER
    backoff: float = 0.5
    backoff_max: float = 30.0
    quarantine_after: int = 5
    quarantine_window: float = 600.0

    def delay(self, failures: int) -> float:
        """How long to wait before the restart that follows the ``failures``-th failure."""
        return float(min(self.backoff * 2 ** min(failures - 1, 62), self.backoff_max))


class Failures:
    """When one plugin failed on its own, as far back as the policy's window reaches."""

    def __init__(self) -> None:
        self._times: collections.deque[float] = collections.deque()

    def record(self, policy: RestartPolicy, now: float) -> float | None:
        """Count a failure at ``now`` (monotonic seconds): the delay before the restart, or
        None when this failure quarantines the plugin."""
        self._times.append(now)
        while self._times and now - self._times[0] > policy.quarantine_window:
            self._times.popleft()
        if len(self._times) >= policy.quarantine_after:
            return None
        return policy.delay(len(self._times))

    def __len__(self) -> int:
        return len(self._times)

    def clear(self) -> None:
        self._times.clear()


class Restarts:
    """One manager's restarts: each plugin's failures, and the restart waiting out its
    backoff. ``restart(plugin_id)`` is the manager's: start that plugin again now, if it is
    still failed (and call ``failed`` again if that fails)."""

    def __init__(self, policy: RestartPolicy, restart: Callable[[str], Awaitable[None]]) -> None:
        self.policy = policy
        self._restart = restart
        self._failures: dict[str, Failures] = {}
        self._waiting: dict[str, asyncio.Task[None]] = {}

    def policy_for(self, plugin: Plugin) -> RestartPolicy:
        """The host's policy, with the manifest's mode when it names one."""
        if plugin.restart is None:
            return self.policy
        return dataclasses.replace(self.policy, mode=plugin.restart)

    def failed(self, life: Lifecycle) -> None:
        """``life`` failed on its own: schedule its restart, or quarantine it."""
        policy = self.policy_for(life.plugin)
        if policy.mode is RestartMode.NEVER:
            return
        failures = self._failures.setdefault(life.id, Failures())
        delay = failures.record(policy, time.monotonic())
        if delay is None:
            life.quarantine(
                PluginStateError(
                    f"plugin {life.id} is quarantined: it failed {len(failures)} times within "
                    f"{policy.quarantine_window:g}s (last: {life.error}); "
                    f"PluginManager.restart({life.id!r}) starts it again",
                    plugin_id=life.id,
                )
            )
            return
        log.warning(
            "plugin %s: restarting in %gs (failure %d; quarantined at %d)",
            life.id,
            delay,
            len(failures),
            policy.quarantine_after,
        )
        task = asyncio.ensure_future(self._later(life.id, delay))
        self._waiting[life.id] = task
        task.add_done_callback(lambda done: self._done(life.id, done))

    async def _later(self, plugin_id: str, delay: float) -> None:
        await asyncio.sleep(delay)
        await self._restart(plugin_id)

    def _done(self, plugin_id: str, task: asyncio.Task[None]) -> None:
        if self._waiting.get(plugin_id) is task:
            del self._waiting[plugin_id]

    def forget(self, plugin_id: str) -> None:
        """Its failures so far no longer count (an explicit restart, or its unload)."""
        self._failures.pop(plugin_id, None)

    async def cancel(self, plugin_id: str) -> None:
        """Call off its scheduled restart (one under way is cancelled and cleans up)."""
        task = self._waiting.pop(plugin_id, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
