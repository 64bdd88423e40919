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

A reload needs from the manager only what ``ReloadHost`` names, and changes the plugin's state
only through its ``Lifecycle``. This module must never leave a plugin with its gate closed or
two current generations.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ._lifecycle import SERVING, Generation, Lifecycle, PluginState
from .errors import PluginLoadError, PluginNotFound, PluginStateError, ReloadError, SandboxerError
from .loaders import NO_STATE

__all__ = ["ReloadHost", "reload_generation", "reload_on_change"]

log = logging.getLogger("sandboxer")


@dataclass(frozen=True, slots=True)
class ReloadHost:
    """What a reload needs from whoever runs it (the manager), and nothing more."""

    drain_timeout: float  # how long old calls may take to finish, and a shutdown to answer
    prepare: Callable[[], Awaitable[Generation]]  # verify, start, init, check the next one
    retire: Callable[[Generation], Awaitable[None]]  # shut a generation down and close it


async def _migrate_state(
    host: ReloadHost, life: Lifecycle, old: Generation, new: Generation
) -> None:
    """Step 2: with the old gate closed, move the state across (raises on any failure)."""
    if not await old.wait_idle(host.drain_timeout):
        raise PluginStateError(
            f"plugin {life.id}: {old.in_flight} call(s) of generation {old.number} did not "
            f"finish within the {host.drain_timeout:g}s drain timeout, so its state could "
            "not be exported consistently",
            plugin_id=life.id,
        )
    state = await old.handle.export_state()
    if state is NO_STATE:  # it answered -32601 after all: the new generation starts fresh
        log.info(
            "plugin %s: generation %d has no state to hand over (export_state is not "
            "implemented); generation %d starts fresh",
            life.id,
            old.number,
            new.number,
        )
        return
    await new.handle.import_state(state, old.plugin.version)


async def reload_generation(life: Lifecycle, host: ReloadHost) -> None:
    """Reload the plugin in place; the caller holds the plugin's lock."""
    old = life.current
    if old is None or life.state not in SERVING:
        raise PluginStateError(
            f"plugin {life.id} is {life.state.value}; only a ready or degraded plugin can "
            "be hot-reloaded (restart a failed one: PluginManager.restart)",
            plugin_id=life.id,
        )
    resume = life.state
    life.transition(PluginState.RELOADING)
    new: Generation | None = None
    try:
        new = await host.prepare()
        if old.handle.has_state and new.handle.has_state:
            old.close_gate()
            await _migrate_state(host, life, old, new)
    except BaseException as exc:
        old.open_gate()
        if new is not None:
            await new.handle.close()
        cause = (
            exc
            if isinstance(exc, SandboxerError)
            else PluginLoadError(f"{type(exc).__name__}: {exc}", plugin_id=life.id)
        )
        error = ReloadError(
            f"plugin {life.id}: reload failed and was rolled back; generation {old.number} "
            f"(version {old.plugin.version}) keeps serving: {cause}",
            cause=cause,
            plugin_id=life.id,
        )
        # If the old generation died while the new one was being prepared, there is nothing
        # left to roll back to: the plugin fails and the old generation is closed.
        life.reload_failed(error, resume=resume)
        if isinstance(exc, Exception):
            raise error from exc
        raise

    # Step 3: the switch. Nothing below may fail the reload any more.
    life.switch_to(new)
    old.open_gate()  # callers waiting at the old gate now go to the new generation

    # Step 4: the old generation finishes what it had, then goes.
    if not await old.wait_idle(host.drain_timeout):
        log.warning(
            "plugin %s: generation %d still had %d call(s) after the %gs drain "
            "timeout; they are cancelled",
            life.id,
            old.number,
            old.in_flight,
            host.drain_timeout,
        )
    await host.retire(old)


async def reload_on_change(
    life: Lifecycle,
    source: str,
    *,
    debounce: float,
    running: Callable[[], str | None],
    reload: Callable[[], Awaitable[object]],
    stopped: Callable[[str], None],
) -> None:
    """Hot reload: ``reload()`` the plugin whenever its files at ``source`` change to
    something new, until the plugin is gone (or ``stopped(why)``, when the watch itself
    fails).

    Files whose checksum differs from the running generation's (``running()``) are reloaded
    (the watch's first event included: it catches a change made while the watch was
    starting). A change whose reload fails is remembered by its checksum and not retried
    until the files change again; a manifest that does not parse is reported
    (``reload_failed``) without touching the running generation, and removed files leave the
    last good generation serving."""
    from .discovery import watch

    failed: str | None = None
    try:
        async with watch([source], debounce=debounce) as events:
            async for event in events:
                if event.kind == "error" and event.error is not None:
                    life.reload_refused(
                        PluginLoadError(
                            f"plugin {life.id}: its files cannot be loaded: {event.error.message}",
                            plugin_id=life.id,
                        )
                    )
                    continue
                if event.plugin is None:
                    if event.kind == "removed":
                        log.warning(
                            "plugin %s: its files were removed; the running generation keeps "
                            "serving",
                            life.id,
                        )
                    continue
                checksum = event.plugin.checksum
                if checksum in (running(), failed):
                    continue
                try:
                    await reload()
                    failed = None
                except ReloadError:
                    failed = checksum  # reload_failed was emitted; wait for a change
                except (PluginStateError, PluginNotFound):
                    return
    except Exception as exc:  # the watch itself failed (e.g. no inotify instance left)
        log.warning("plugin %s: hot reload stopped: %s", life.id, exc)
        stopped(f"hot reload stopped: {exc}")
