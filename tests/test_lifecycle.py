"""The lifecycle's transition table: every move between two states, allowed or refused."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from sandboxer import PluginState, PluginStateError, load_plugin
from sandboxer._lifecycle import Lifecycle

S = PluginState

# DESIGN section 8, written out here rather than read from the code under test:
#   loading → initializing → ready ⇄ degraded → draining → stopping → stopped
#   ready/degraded → reloading → ready/degraded;  any live state → failed;
#   failed → loading (restart) or stopping (unload)
# and issue 21's quarantine, which ends a crash loop:
#   failed → quarantined;  quarantined → loading (an explicit restart) or stopping (unload)
ALLOWED = {
    (S.LOADING, S.INITIALIZING), (S.LOADING, S.FAILED),
    (S.INITIALIZING, S.READY), (S.INITIALIZING, S.FAILED),
    (S.READY, S.DEGRADED), (S.READY, S.RELOADING), (S.READY, S.DRAINING), (S.READY, S.FAILED),
    (S.DEGRADED, S.READY), (S.DEGRADED, S.RELOADING), (S.DEGRADED, S.DRAINING),
    (S.DEGRADED, S.FAILED),
    (S.RELOADING, S.READY), (S.RELOADING, S.DEGRADED), (S.RELOADING, S.FAILED),
    (S.DRAINING, S.STOPPING),
    (S.STOPPING, S.STOPPED),
    (S.FAILED, S.LOADING), (S.FAILED, S.STOPPING), (S.FAILED, S.QUARANTINED),
    (S.QUARANTINED, S.LOADING), (S.QUARANTINED, S.STOPPING),
}

# How a plugin gets to each state from loading, one allowed step at a time.
ROUTE = {
    S.LOADING: [],
    S.INITIALIZING: [S.INITIALIZING],
    S.READY: [S.INITIALIZING, S.READY],
    S.DEGRADED: [S.INITIALIZING, S.READY, S.DEGRADED],
    S.RELOADING: [S.INITIALIZING, S.READY, S.RELOADING],
    S.DRAINING: [S.INITIALIZING, S.READY, S.DRAINING],
    S.STOPPING: [S.INITIALIZING, S.READY, S.DRAINING, S.STOPPING],
    S.STOPPED: [S.INITIALIZING, S.READY, S.DRAINING, S.STOPPING, S.STOPPED],
    S.FAILED: [S.FAILED],
    S.QUARANTINED: [S.FAILED, S.QUARANTINED],
}

CASES = [pytest.param(source, target, (source, target) in ALLOWED,
                      id=f"{source.value}->{target.value}:"
                         f"{'allowed' if (source, target) in ALLOWED else 'refused'}")
         for source, target in itertools.product(S, S)]


def _refuse_close(*_: Any) -> Any:
    raise AssertionError("a transition alone closes no generation")


@pytest.mark.parametrize(("source", "target", "allowed"), CASES)
def test_every_transition_is_allowed_or_refused_as_the_table_says(
        make_plugin: Any, source: PluginState, target: PluginState, allowed: bool) -> None:
    events: list[tuple[str, PluginState, PluginState | None]] = []
    life = Lifecycle(load_plugin(make_plugin("")), close_failed=_refuse_close,
                     on_event=lambda lc, type_, previous, error: events.append(
                         (type_, lc.state, previous)))
    for step in ROUTE[source]:
        life.transition(step)
    assert life.state is source
    events.clear()
    if allowed:
        life.transition(target)
        assert life.state is target
        assert events == [("state", target, source)]  # every transition is an event
    else:
        with pytest.raises(PluginStateError, match=f"cannot go from {source.value} to "
                                                   f"{target.value}"):
            life.transition(target)
        assert life.state is source and events == []  # nothing happened, silently or not


def test_a_refused_transition_names_the_plugin(make_plugin: Any) -> None:
    life = Lifecycle(load_plugin(make_plugin("", id="acme.lifecycle")),
                     on_event=lambda *_: None, close_failed=_refuse_close)
    with pytest.raises(PluginStateError) as info:
        life.transition(S.STOPPED)
    assert info.value.plugin_id == "acme.lifecycle"
    assert str(info.value).startswith("plugin acme.lifecycle: cannot go from loading")
