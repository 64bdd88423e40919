"""Plugin events and statistics: what the manager reports, and the streams that carry it.

``PluginManager.events()`` hands out an ``EventStream``; the manager offers every event to each
subscription it holds. A subscriber that falls too far behind is dropped, not buffered for.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
from dataclasses import dataclass
from typing import Any

from ._lifecycle import PluginState
from .errors import SandboxerError


def utc_now() -> _dt.datetime:
    """The time an event or a load is stamped with."""
    return _dt.datetime.now(_dt.UTC)


__all__ = [
    "PluginEvent",
    "PluginStatistics",
    "EventStream",
    "Subscription",
    "EVENT_BUFFER",
    "utc_now",
]

# How many events a subscriber may fall behind before it is dropped.
EVENT_BUFFER = 10_000


@dataclass(frozen=True, slots=True)
class PluginEvent:
    """Something happened to a plugin.

    ``type`` is ``"state"`` for a lifecycle transition (``previous`` → ``state``),
    ``"reloaded"`` when a new generation took over, ``"reload_failed"`` when one was rolled
    back (``error`` says why).
    """

    type: str
    plugin_id: str
    state: PluginState
    previous: PluginState | None
    generation: int
    version: str
    at: _dt.datetime
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "event": self.type,
            "plugin": self.plugin_id,
            "state": self.state.value,
            "previous": self.previous.value if self.previous else None,
            "generation": self.generation,
            "version": self.version,
            "at": self.at.isoformat(),
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class PluginStatistics:
    """A snapshot of one plugin's counters across all its generations."""

    calls: int
    in_flight: int
    failures: int
    generation: int
    peak_memory_bytes: int | None
    cpu_time_s: float | None
    network: dict[str, int] | None = None  # egress counters, if it ever had network access
    restarts: int = 0  # times it was started again after failing
    # Calls its seccomp filter refused, by syscall name, over every generation; None where
    # denials cannot be explained (sandbox/denials.py).
    denied: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "restarts": self.restarts,
            "inFlight": self.in_flight,
            "failures": self.failures,
            "generation": self.generation,
            "peakMemoryBytes": self.peak_memory_bytes,
            "cpuTimeSeconds": self.cpu_time_s,
            "network": self.network,
            "denied": self.denied,
        }


class Subscription:
    """One event stream's queue, in the manager's set of subscribers until it is closed or
    falls too far behind."""

    def __init__(self, subscribers: set[Subscription]) -> None:
        self.queue: asyncio.Queue[PluginEvent | None] = asyncio.Queue(EVENT_BUFFER)
        self.overflowed = False
        self._subscribers = subscribers
        subscribers.add(self)

    def offer(self, event: PluginEvent | None) -> None:
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            self.unsubscribe()

    def unsubscribe(self) -> None:
        self._subscribers.discard(self)


class EventStream:
    """An async iterator over plugin events, subscribed from the moment it was created.

    It ends when the manager closes. A subscriber that falls more than 10,000 events behind
    is dropped and gets a SandboxerError saying so, rather than the manager buffering forever.
    """

    def __init__(self, subscription: Subscription) -> None:
        self._subscription = subscription

    @property
    def overflowed(self) -> bool:
        return self._subscription.overflowed

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> PluginEvent:
        queue = self._subscription.queue
        if queue.empty() and self.overflowed:
            raise SandboxerError(
                f"event stream fell more than {EVENT_BUFFER} events behind "
                "and was dropped; subscribe again with events()"
            )
        event = await queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    async def aclose(self) -> None:
        self._subscription.unsubscribe()
