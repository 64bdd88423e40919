"""``LoadedPlugin``: a plugin under a manager's care, as its caller holds it (the manager
keeps its Lifecycle; this is the view, and the call path)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._lifecycle import Lifecycle, PluginState
from .errors import PluginStateError, SandboxerError
from .events import PluginStatistics, utc_now

if TYPE_CHECKING:
    from .loaders import PluginHandle
    from .manifest import Plugin
    from .rpc.client import Relay
    from .sandbox.egress import EgressProxy
    from .sandbox.policy import SandboxConfig

__all__ = ["LoadedPlugin"]


class LoadedPlugin:
    """A plugin under the manager's care; its identity is stable across reloads.

    ``call`` routes to the current generation. ``plugin`` is the current generation's
    manifest, ``handle`` its handle, ``instance`` the same handle (the spec's name),
    ``error`` the last error (a failed reload included).
    """

    def __init__(self, life: Lifecycle, source: str, egress: EgressProxy) -> None:
        self._life = life
        self._egress = egress
        self.source = source
        self.loaded_at = utc_now()
        self._calls = 0
        self._failures = 0

    # -- identity and views ------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self._life.id

    @property
    def plugin(self) -> Plugin:
        return self._life.plugin

    @property
    def version(self) -> str:
        return self._life.plugin.version

    @property
    def state(self) -> PluginState:
        return self._life.state

    @property
    def error(self) -> SandboxerError | None:
        return self._life.error

    @property
    def generation(self) -> int:
        return self._life.generation

    @property
    def handle(self) -> PluginHandle | None:
        gen = self._life.current
        return gen.handle if gen else None

    instance = handle

    @property
    def sandbox(self) -> SandboxConfig | None:
        gen = self._life.current
        return gen.sandbox if gen else None

    @property
    def methods(self) -> tuple[str, ...]:
        gen = self._life.current
        return gen.handle.methods if gen else ()

    @property
    def fallbacks(self) -> tuple[str, ...]:
        """Host-policy fallbacks in force for the current generation (e.g. "rlimit": memory
        limited by RLIMIT_AS because no cgroup could be made); empty when fully enforced."""
        gen = self._life.current
        return tuple(getattr(gen.handle, "fallbacks", ())) if gen else ()

    @property
    def started_warm(self) -> bool:
        """Whether the current generation started in a warm sandbox, made ahead of time
        (sandbox/pool.py), rather than cold."""
        gen = self._life.current
        return bool(getattr(gen.handle, "started_warm", False)) if gen else False

    def grpc_channel(self) -> Any:
        """The ``grpc.aio.Channel`` to the current generation of a go-plugin gRPC plugin, for
        callers with generated stubs. It belongs to that generation: after a reload, ask again
        (it is closed with its generation). PluginStateError for any other plugin, or when no
        generation runs."""
        channel = getattr(self.handle, "channel", None)
        if channel is None:
            raise PluginStateError(
                f"plugin {self.id} has no gRPC channel"
                + ("" if self.plugin.protocol.value == "grpc" else " (it is not a grpc plugin)"),
                plugin_id=self.id,
            )
        return channel

    def to_json(self) -> dict[str, Any]:
        return {
            "plugin": self.plugin.to_json(),
            "state": self.state.value,
            "loadedAt": self.loaded_at.isoformat(),
            "error": self.error.to_json() if self.error else None,
            "generation": self.generation,
            "sandbox": self.sandbox.to_json() if self.sandbox else None,
            "methods": list(self.methods),
            "fallbacks": list(self.fallbacks),
        }

    def statistics(self) -> PluginStatistics:
        usage = self._life.resource_usage()
        gen = self._life.current
        return PluginStatistics(
            calls=self._calls,
            in_flight=gen.in_flight if gen else 0,
            failures=self._failures,
            generation=self.generation,
            peak_memory_bytes=usage.peak_memory_bytes,
            cpu_time_s=usage.cpu_time_s,
            network=egress.to_json() if (egress := self._egress.statistics(self.id)) else None,
            restarts=self._life.restarts,
            denied=usage.denied,
        )

    def __repr__(self) -> str:
        return f"<LoadedPlugin {self.id} {self.version} gen={self.generation} {self.state.value}>"

    # -- calls -------------------------------------------------------------------------------
    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Call ``method`` with JSON ``args`` on the current generation; returns JSON.

        ``timeout`` (seconds) defaults to the effective sandbox's per-call timeout.
        """
        gen = self._life.admit_now()
        if gen is None:
            gen = await self._life.admit()
        gen.enter()
        self._calls += 1
        try:
            return await gen.handle.call(method, *args, timeout=timeout)
        except BaseException:
            self._failures += 1
            raise
        finally:
            gen.leave()

    def relay(
        self,
        method: str,
        args: list[Any],
        timeout: float | None,
        then: Callable[[Any, BaseException | None], None],
    ) -> Relay | None:
        """``call`` answered by callback, ``then(result, error)`` in the loop pass the answer
        arrives, with no task or coroutine in between (the daemon forwards calls this way).
        None when this call cannot go that way now (calls must wait for admission, or the
        kind answers only through ``call``): use ``call``."""
        gen = self._life.admit_now()
        relay = getattr(gen.handle, "relay", None) if gen is not None else None
        if gen is None or relay is None:
            return None

        def finish(result: Any, error: BaseException | None) -> None:
            gen.leave()
            if error is not None:
                self._failures += 1
            then(result, error)

        gen.enter()
        try:
            sent: Relay | None = relay(method, args, timeout, finish)
        except BaseException:
            gen.leave()
            self._calls += 1
            self._failures += 1
            raise
        if sent is None:
            gen.leave()
        else:
            self._calls += 1
        return sent
