"""Hot reload of one plugin: prepare, migrate state, switch, drain, or roll back.

The order (DESIGN section 8):
1. prepare the new generation (verify, start, init, health check) while the old one serves;
2. if the plugin carries state: close the old generation's gate (new calls wait), let its
   in-flight calls finish, export its state and import it into the new generation (a plugin
   that answers export_state with "not implemented" has none: the new one starts fresh);
3. switch routing to the new generation and reopen the gate (waiting calls go to the new one);
4. drain the old generation (bounded by the drain timeout), shut it down, close it.

Any failure before step 3 rolls back: the new generation is closed, the old one reopens with
its state untouched, and the failure is recorded on the plugin, emitted as ``reload_failed``
and raised as ReloadError. No caller sees a failed call because of a reload.

This module must never leave a plugin with its gate closed or two current generations.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ._lifecycle import PluginState
from .errors import PluginLoadError, PluginStateError, ReloadError, SandboxerError
from .loaders import NO_STATE

if TYPE_CHECKING:
    from .manager import LoadedPlugin, PluginManager, _Generation

__all__ = ["reload_generation"]

log = logging.getLogger("sandboxer")


async def _migrate_state(manager: PluginManager, loaded: LoadedPlugin, old: _Generation,
                         new: _Generation) -> None:
    """Step 2: with the old gate closed, move the state across (raises on any failure)."""
    if not await old.wait_idle(manager.drain_timeout):
        raise PluginStateError(
            f"plugin {loaded.id}: {old.in_flight} call(s) of generation {old.number} did not "
            f"finish within the {manager.drain_timeout:g}s drain timeout, so its state could "
            "not be exported consistently", plugin_id=loaded.id)
    state = await old.handle.export_state()
    if state is NO_STATE:  # it answered -32601 after all: the new generation starts fresh
        log.info("plugin %s: generation %d has no state to hand over (export_state is not "
                 "implemented); generation %d starts fresh", loaded.id, old.number, new.number)
        return
    await new.handle.import_state(state, old.plugin.version)


async def reload_generation(manager: PluginManager, loaded: LoadedPlugin) -> None:
    """Reload ``loaded`` in place; the caller holds the plugin's lock."""
    old = loaded._current
    if old is None or loaded.state not in (PluginState.READY, PluginState.DEGRADED):
        raise PluginStateError(
            f"plugin {loaded.id} is {loaded.state.value}; only a ready or degraded plugin can "
            "be hot-reloaded (unload and load a failed one)", plugin_id=loaded.id)
    resume_state = loaded.state
    loaded._set_state(PluginState.RELOADING)
    new: _Generation | None = None
    try:
        new = await manager._prepare_generation(loaded)
        if old.handle.has_state and new.handle.has_state:
            old.open.clear()
            await _migrate_state(manager, loaded, old, new)
    except BaseException as exc:
        old.open.set()
        if new is not None:
            await new.handle.close()
        cause = exc if isinstance(exc, SandboxerError) else PluginLoadError(
            f"{type(exc).__name__}: {exc}", plugin_id=loaded.id)
        error = ReloadError(
            f"plugin {loaded.id}: reload failed and was rolled back; generation {old.number} "
            f"(version {old.plugin.version}) keeps serving: {cause}",
            cause=cause, plugin_id=loaded.id)
        loaded.error = error
        if old.failure is not None:
            # The old generation died while the new one was being prepared: nothing is left
            # to roll back to.
            loaded._current = None
            loaded._set_state(PluginState.FAILED, error=error)
            loaded._retiring = manager._spawn(manager._retire(loaded, old, graceful=False))
        else:
            loaded._set_state(resume_state)
        manager._emit("reload_failed", loaded, PluginState.RELOADING, error=str(error))
        if isinstance(exc, Exception):
            raise error from exc
        raise

    # Step 3: the switch. Nothing below may fail the reload any more.
    loaded._current = new
    loaded.plugin = new.plugin
    loaded.error = None
    old.open.set()
    loaded._set_state(PluginState.READY)
    manager._emit("reloaded", loaded, PluginState.RELOADING)

    # Step 4: the old generation finishes what it had, then goes.
    if not await old.wait_idle(manager.drain_timeout):
        log.warning("plugin %s: generation %d still had %d call(s) after the %gs drain "
                    "timeout; they are cancelled", loaded.id, old.number, old.in_flight,
                    manager.drain_timeout)
    await manager._retire(loaded, old, graceful=True)
