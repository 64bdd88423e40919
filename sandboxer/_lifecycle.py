"""The lifecycle state machine: the one table of allowed transitions (DESIGN section 8).

    loading → initializing → ready ⇄ degraded → draining → stopping → stopped
    ready/degraded → reloading → ready/degraded (switched or rolled back)
    any live state → failed;  failed → loading (restart) or stopping (unload)

A transition not in the table is a bug in the caller and raises PluginStateError; it never
happens silently.
"""

from __future__ import annotations

import enum

from .errors import PluginStateError

__all__ = ["PluginState", "TRANSITIONS", "check_transition", "ACCEPTS_CALLS"]


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
    S.FAILED: frozenset({S.LOADING, S.STOPPING}),
}

# States in which a plugin takes new calls (the current generation serves during a reload).
ACCEPTS_CALLS = frozenset({S.READY, S.DEGRADED, S.RELOADING})


def check_transition(plugin_id: str, current: S, target: S) -> None:
    if target not in TRANSITIONS[current]:
        raise PluginStateError(
            f"plugin {plugin_id}: cannot go from {current.value} to {target.value}",
            plugin_id=plugin_id,
        )
