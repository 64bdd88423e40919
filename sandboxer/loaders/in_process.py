"""The python kind's trusted path: plugins in the supervisor's own process.

Only used when the effective sandbox is disabled and the host policy allows it; untrusted
Python runs in the sandboxed plugin host instead. Trusted is not careless, though:

- each generation is imported fresh under a unique module name (never ``importlib.reload``
  of a live module), so two versions can be resident at once during a hot reload;
- arguments and results are copied through JSON exactly as on the wire, so a plugin behaves
  the same in-process and out, and never shares mutable objects with the host;
- sync functions run in worker threads so a slow plugin cannot stall the event loop; async
  ones run on the loop and honour the per-call timeout by cancellation. A sync function
  cannot be interrupted: on timeout the caller gets CallTimeout, and the thread is still
  counted in flight until it returns (unload waits for it up to the drain timeout).

This module must never be used for code the host does not trust: in-process code can do
anything the supervisor can.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

from .. import _json
from .._pymodule import PythonModule
from ..errors import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    CallTimeout,
    MethodNotFound,
    PluginCallError,
    PluginStateError,
    SandboxerError,
)
from ..manifest import LoaderType, Plugin
from ..sandbox.policy import SandboxConfig
from . import NO_STATE, Health, NoState, ResourceUsage

__all__ = ["InProcessPythonLoader", "InProcessPythonHandle"]


class InProcessPythonHandle:
    """A trusted Python plugin generation living in this process."""

    def __init__(self, plugin: Plugin, module: PythonModule, sandbox: SandboxConfig) -> None:
        self.plugin = plugin
        self._module = module
        self._sandbox = sandbox
        self._methods = module.methods
        self._tasks: set[asyncio.Future[Any]] = set()
        self._closed = False

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(sorted(self._methods))

    @property
    def has_state(self) -> bool:
        return self._module.has_state

    async def _invoke(
        self, method: str, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float | None
    ) -> Any:
        if self._closed:
            raise PluginStateError(
                f"plugin {self.plugin.id}: this generation is closed", plugin_id=self.plugin.id
            )
        self._module.check_args(method, fn, args)
        if inspect.iscoroutinefunction(fn):
            work: asyncio.Future[Any] = asyncio.ensure_future(fn(*args))
        else:
            work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        self._tasks.add(work)
        work.add_done_callback(self._tasks.discard)
        try:
            # shield: a timeout must not cancel a thread-backed future's bookkeeping; for
            # coroutines we cancel the work ourselves below.
            async with asyncio.timeout(timeout):
                result = await asyncio.shield(work)
        except TimeoutError:
            if inspect.iscoroutinefunction(fn):
                work.cancel()
            raise CallTimeout(
                f"plugin {self.plugin.id}: {method} did not finish within {timeout:g}s",
                timeout=timeout or 0.0,
                plugin_id=self.plugin.id,
                method=method,
            ) from None
        except asyncio.CancelledError:
            if work.cancelled() and self._closed:
                raise PluginStateError(
                    f"plugin {self.plugin.id}: unloaded while {method} was in flight "
                    "(it outlived the drain timeout)",
                    plugin_id=self.plugin.id,
                ) from None
            if not work.done():
                work.cancel()
            raise
        except Exception as exc:
            raise self._module.error(exc, method) from exc
        return result

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        fn = self._methods.get(method)
        if fn is None:
            raise MethodNotFound.of(self.plugin.id, method, self.methods)
        try:
            args = tuple(_json.normalize(list(args)))
        except TypeError as exc:
            raise PluginCallError(
                f"plugin {self.plugin.id}: arguments of {method} are not JSON values: {exc}",
                code=INVALID_PARAMS,
                plugin_id=self.plugin.id,
                method=method,
            ) from None
        result = await self._invoke(
            method, fn, args, self._sandbox.timeout if timeout is None else timeout
        )
        try:
            return _json.normalize(result)
        except TypeError as exc:
            raise PluginCallError(
                f"plugin {self.plugin.id}: {method} returned a value that is not JSON: {exc}",
                code=INTERNAL_ERROR,
                plugin_id=self.plugin.id,
                method=method,
            ) from None

    async def _lifecycle_call(self, name: str, *args: Any) -> tuple[bool, Any]:
        fn = self._module.lifecycle(name)
        if fn is None:
            return False, None
        result = await self._invoke(name, fn, args, self._sandbox.timeout)
        return True, result

    async def init(self, config: dict[str, Any]) -> None:
        await self._lifecycle_call("init", _json.normalize(config))

    async def health(self) -> Health:
        try:
            _, result = await self._lifecycle_call("health_check")
        except (PluginCallError, CallTimeout) as exc:
            return Health.from_error(exc)
        return Health.from_answer(self.plugin.id, result)

    async def shutdown(self) -> None:
        await self._lifecycle_call("shutdown")

    async def export_state(self) -> Any | NoState:
        present, state = await self._lifecycle_call("export_state")
        if not present:
            return NO_STATE
        try:
            return _json.normalize(state)
        except TypeError as exc:
            raise PluginCallError(
                f"plugin {self.plugin.id}: export_state returned a value that is not JSON: {exc}",
                code=INTERNAL_ERROR,
                plugin_id=self.plugin.id,
                method="export_state",
            ) from None

    async def import_state(self, state: Any, from_version: str) -> None:
        await self._lifecycle_call("import_state", _json.normalize(state), from_version)

    def resource_usage(self) -> ResourceUsage:
        return ResourceUsage()

    def on_failure(self, callback: Callable[[SandboxerError], None]) -> None:
        """In-process code cannot die apart from the supervisor: nothing will ever fail."""

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=0)
        self._module.close()


class InProcessPythonLoader:
    """Loads trusted Python plugins into this process (see the module docstring)."""

    kind = LoaderType.PYTHON

    async def start(
        self, plugin: Plugin, sandbox: SandboxConfig, *, generation: int
    ) -> InProcessPythonHandle:
        module = await asyncio.to_thread(
            PythonModule,
            plugin.entrypoint,
            plugin_id=plugin.id,
            generation=generation,
            root=plugin.root,
            methods=plugin.methods,
        )
        return InProcessPythonHandle(plugin, module, sandbox)
