"""The lifecycle: plugin states, the one table of allowed transitions, and the generations a
plugin runs through (DESIGN section 8).

    loading → initializing → ready ⇄ degraded → draining → stopping → stopped
    ready/degraded → reloading → ready/degraded (switched or rolled back)
    any live state → failed;  failed → loading (restart) or stopping (unload)
    failed → quarantined (too many failures: no more restarts, _restart.py)
    quarantined → loading (PluginManager.restart) or stopping (unload)

``Lifecycle`` is one plugin's place in that machine: its state, its current generation, and a
failed generation still being closed. Its state changes only through its own methods, each
checked against the table: a transition not in the table is a bug in the caller and raises
PluginStateError; it never happens silently.

This module never starts, calls or closes a plugin: the owner (the manager) does, and hears
of every transition and every failed generation through the callbacks it hands in.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable

from .errors import PluginStateError, ReloadError, SandboxerError
from .loaders import PluginHandle, ResourceUsage
from .manifest import Plugin
from .sandbox.policy import SandboxConfig

__all__ = [
    "PluginState",
    "TRANSITIONS",
    "ACCEPTS_CALLS",
    "SERVING",
    "check_transition",
    "Generation",
    "Lifecycle",
]

log = logging.getLogger("sandboxer")


class PluginState(enum.Enum):
    """Lifecycle states (DESIGN section 8); the allowed transitions are ``TRANSITIONS``."""

    LOADING = "loading"
    INITIALIZING = "initializing"
    READY = "ready"
    DEGRADED = "degraded"
    RELOADING = "reloading"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    QUARANTINED = "quarantined"


S = PluginState

TRANSITIONS: dict[S, frozenset[S]] = {
    S.LOADING: frozenset({S.INITIALIZING, S.FAILED}),
    S.INITIALIZING: frozenset({S.READY, S.FAILED}),
    S.READY: frozenset({S.DEGRADED, S.RELOADING, S.DRAINING, S.FAILED}),
    S.DEGRADED: frozenset({S.READY, S.RELOADING, S.DRAINING, S.FAILED}),
    S.RELOADING: frozenset({S.READY, S.DEGRADED, S.FAILED}),
    S.DRAINING: frozenset({S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.STOPPED: frozenset(),
    S.FAILED: frozenset({S.LOADING, S.STOPPING, S.QUARANTINED}),
    S.QUARANTINED: frozenset({S.LOADING, S.STOPPING}),
}

# States in which a plugin takes new calls (the current generation serves during a reload).
ACCEPTS_CALLS = frozenset({S.READY, S.DEGRADED, S.RELOADING})
# States in which the current generation serves on its own: a health check or a reload may
# start, and a generation that dies fails the plugin (during a reload, the reload decides).
SERVING = frozenset({S.READY, S.DEGRADED})


def check_transition(plugin_id: str, current: S, target: S) -> None:
    if target not in TRANSITIONS[current]:
        raise PluginStateError(
            f"plugin {plugin_id}: cannot go from {current.value} to {target.value}",
            plugin_id=plugin_id,
        )


def _add_usage(a: ResourceUsage, b: ResourceUsage) -> ResourceUsage:
    """Peak memory is the larger peak, CPU time the sum; ``None`` only where both are."""
    peaks = [u for u in (a.peak_memory_bytes, b.peak_memory_bytes) if u is not None]
    cpus = [u for u in (a.cpu_time_s, b.cpu_time_s) if u is not None]
    denied: dict[str, int] | None = None
    for part in (a.denied, b.denied):
        if part is not None:
            denied = denied or {}
            for name, count in part.items():
                denied[name] = denied.get(name, 0) + count
    return ResourceUsage(
        peak_memory_bytes=max(peaks) if peaks else None,
        cpu_time_s=sum(cpus) if cpus else None,
        denied=denied,
    )


class Generation:
    """One running instance of a plugin: its handle, and a gate counting calls through it.

    The gate can be closed (calls wait instead of entering) while the state is moved to a
    successor generation; ``wait_idle`` returns once no call is inside.
    """

    def __init__(
        self, number: int, plugin: Plugin, handle: PluginHandle, sandbox: SandboxConfig
    ) -> None:
        self.number = number
        self.plugin = plugin
        self.handle = handle
        self.sandbox = sandbox
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._open = asyncio.Event()
        self._open.set()
        # Whether calls may enter now: the gate's state as a plain attribute, read by every
        # call (an Event's is_set is a method call more on the hot path).
        self.admitting = True
        self._failure: SandboxerError | None = None

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def failure(self) -> SandboxerError | None:
        """Why it died on its own (crash, protocol error), or None while it lives."""
        return self._failure

    def died(self, error: SandboxerError) -> None:
        self._failure = error

    # -- the gate ----------------------------------------------------------------------------
    def close_gate(self) -> None:
        self.admitting = False
        self._open.clear()

    def open_gate(self) -> None:
        self.admitting = True
        self._open.set()

    async def wait_gate(self) -> None:
        await self._open.wait()

    def enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False


# on_event(lifecycle, type, previous state, error message): "state" for every transition,
# "reloaded" and "reload_failed" for the end of a reload.
EventCallback = Callable[["Lifecycle", str, PluginState | None, str | None], None]
# close_failed(lifecycle, generation): close a generation that failed, in the background; the
# task is kept so that unload can wait for it.
CloseCallback = Callable[["Lifecycle", Generation], asyncio.Task[None]]
# on_failed(lifecycle): the plugin failed on its own (its generation crashed, broke the
# protocol, failed its health checks): the owner's restart policy decides what follows.
FailedCallback = Callable[["Lifecycle"], None]


class Lifecycle:
    """One plugin's place in the state machine, across all its generations.

    ``current`` is the generation that takes calls: none before the first is up, after a
    failure, and once stopped. ``plugin`` is the manifest of the current generation (of the
    last one to serve, when none does).
    """

    def __init__(
        self,
        plugin: Plugin,
        *,
        on_event: EventCallback,
        close_failed: CloseCallback,
        on_failed: FailedCallback | None = None,
    ) -> None:
        self._plugin = plugin
        self._on_event = on_event
        self._close_failed = close_failed
        self._on_failed = on_failed
        self._state = S.LOADING
        self._accepting = False  # state in ACCEPTS_CALLS, kept in step by transition()
        self._error: SandboxerError | None = None
        self._current: Generation | None = None
        self._numbers = 0  # generation numbers handed out
        self._retiring: asyncio.Task[None] | None = None  # a failed generation being closed
        self._usage_of_retired = ResourceUsage()
        self._health_failures = 0
        self.restarts = 0  # times it was started again after failing (failed → loading)

    # -- views -------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self._plugin.id

    @property
    def plugin(self) -> Plugin:
        return self._plugin

    @property
    def state(self) -> PluginState:
        return self._state

    @property
    def error(self) -> SandboxerError | None:
        """The last error, a failed reload included."""
        return self._error

    @property
    def current(self) -> Generation | None:
        return self._current

    @property
    def generation(self) -> int:
        return self._current.number if self._current else self._numbers

    def resource_usage(self) -> ResourceUsage:
        """What every generation used so far, the current one included."""
        current = self._current.handle.resource_usage() if self._current else ResourceUsage()
        return _add_usage(current, self._usage_of_retired)

    # -- calls -------------------------------------------------------------------------------
    def admit_now(self) -> Generation | None:
        """The generation a call may enter right now; None when it must wait or be refused
        (then ``admit``). Kept apart from ``admit`` so the usual call awaits no extra
        coroutine."""
        gen = self._current
        return gen if gen is not None and self._accepting and gen.admitting else None

    async def admit(self) -> Generation:
        """The generation to call once calls are admitted; raises if none will be."""
        while True:
            gen = self._current
            if gen is None or self._state not in ACCEPTS_CALLS:
                raise PluginStateError(
                    f"plugin {self.id} is {self._state.value} and takes no calls"
                    + (f" ({self._error})" if self._error else ""),
                    plugin_id=self.id,
                )
            if gen.admitting:
                return gen
            # A reload is moving state to the next generation: wait, then route to whichever
            # generation is current once the gate reopens (the new one, or the old on rollback).
            await gen.wait_gate()

    # -- transitions -------------------------------------------------------------------------
    def transition(self, target: PluginState, *, error: SandboxerError | None = None) -> None:
        """Move to ``target`` (raises PluginStateError if the table forbids it) and report it;
        ``error``, if given, becomes the plugin's last error."""
        check_transition(self.id, self._state, target)
        if target is S.LOADING and self._state in (S.FAILED, S.QUARANTINED):
            self.restarts += 1
        previous, self._state = self._state, target
        self._accepting = target in ACCEPTS_CALLS
        if error is not None:
            self._error = error
        self._on_event(self, "state", previous, str(error) if error is not None else None)

    def next_number(self) -> int:
        """The number of the generation about to be started."""
        self._numbers += 1
        return self._numbers

    def serve(self, gen: Generation) -> None:
        """The first generation is up (initializing → ready): it takes the calls."""
        self._current = gen
        self.transition(S.READY)

    def fail(self, error: SandboxerError) -> None:
        """Loading failed before any generation served."""
        if self._state is not S.FAILED:
            self.transition(S.FAILED, error=error)

    def fail_current(self, error: SandboxerError) -> None:
        """The current generation is done for: the plugin fails and the generation is closed
        in the background, a close that ``wait_retired`` (so unload) waits for; then the
        owner hears of it (``on_failed``)."""
        gen = self._current
        self._current = None
        self.transition(S.FAILED, error=error)
        if gen is not None:
            self._retiring = self._close_failed(self, gen)
        if self._on_failed is not None:
            self._on_failed(self)

    def quarantine(self, error: SandboxerError) -> None:
        """Failed too often: no restart until the owner is told to (failed → quarantined)."""
        self.transition(S.QUARANTINED, error=error)

    def generation_died(self, gen: Generation, error: SandboxerError) -> None:
        """``gen`` died on its own (crash, protocol error); its handle reports it here."""
        gen.died(error)
        if self._current is not gen or self._state not in SERVING:
            # Not serving, or a reload is in charge: the reload sees ``gen.failure``.
            return
        log.warning("plugin %s failed: %s", self.id, error)
        self.fail_current(error)

    # -- health ------------------------------------------------------------------------------
    def health_passed(self) -> None:
        self._health_failures = 0
        if self._state is S.DEGRADED:
            self.transition(S.READY)

    def health_failed(self) -> int:
        """Count a failed health check; returns how many failed in a row."""
        self._health_failures += 1
        return self._health_failures

    # -- reload ------------------------------------------------------------------------------
    def switch_to(self, new: Generation) -> None:
        """A reload's switch: ``new`` takes the calls from now on (reloading → ready)."""
        self._current = new
        self._plugin = new.plugin
        self._error = None
        self.transition(S.READY)
        self._on_event(self, "reloaded", S.RELOADING, None)

    def reload_failed(self, error: ReloadError, *, resume: PluginState) -> None:
        """A reload was rolled back: the current generation serves on in ``resume``, unless
        it died meanwhile; then there is nothing to roll back to and the plugin fails."""
        self._error = error
        gen = self._current
        if gen is not None and gen.failure is not None:
            self.fail_current(error)
        else:
            self.transition(resume)
        self._on_event(self, "reload_failed", S.RELOADING, str(error))

    def reload_refused(self, error: SandboxerError) -> None:
        """New files could not even be read: the current generation serves on untouched."""
        self._error = error
        self._on_event(self, "reload_failed", self._state, str(error))

    # -- retiring and stopping ---------------------------------------------------------------
    def retired(self, gen: Generation) -> None:
        """``gen`` is being closed: what it used counts towards the plugin's totals."""
        self._usage_of_retired = _add_usage(gen.handle.resource_usage(), self._usage_of_retired)

    async def wait_retired(self) -> None:
        """Until a failed generation being closed is closed (its process reaped, its cgroup
        removed); at once if there is none."""
        if self._retiring is not None:
            await asyncio.gather(asyncio.shield(self._retiring), return_exceptions=True)

    def finish(self) -> None:
        """The last generation is closed (stopping → stopped)."""
        self._current = None
        self.transition(S.STOPPED)
