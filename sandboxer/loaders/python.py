"""Python plugins in the supervisor's own process: the trusted mode.

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
import importlib.util
import inspect
import re
import secrets
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from .. import _json
from ..errors import (
    CallTimeout,
    MethodNotFound,
    PluginCallError,
    PluginLoadError,
    PluginStateError,
)
from ..manifest import LoaderType, Plugin
from ..sandbox.policy import SandboxConfig
from . import Health, ResourceUsage

__all__ = ["InProcessPythonLoader", "InProcessPythonHandle", "LIFECYCLE_NAMES"]

LIFECYCLE_NAMES = frozenset({"init", "health_check", "shutdown", "export_state", "import_state"})
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603


def _module_name(plugin: Plugin, generation: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_]", "_", plugin.id)
    return f"_sandboxer_plugin_{safe}_g{generation}_{secrets.token_hex(4)}"


def _import_fresh(plugin: Plugin, name: str) -> ModuleType:
    """Import the plugin's entrypoint as a new module ``name`` (a package if a directory)."""
    entry = plugin.entrypoint
    if entry.is_dir():
        spec = importlib.util.spec_from_file_location(
            name, entry / "__init__.py", submodule_search_locations=[str(entry)])
    else:
        spec = importlib.util.spec_from_file_location(name, entry)
    if spec is None or spec.loader is None:
        raise PluginLoadError(f"plugin {plugin.id}: cannot import {entry}", plugin_id=plugin.id)
    module = importlib.util.module_from_spec(spec)
    # Registered while executing so the package's relative imports resolve; removed at close.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except KeyboardInterrupt:
        _forget_module(name)
        raise
    except BaseException as exc:  # SystemExit too: a plugin may not end the supervisor
        _forget_module(name)
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        raise PluginLoadError(
            f"plugin {plugin.id}: importing {entry} failed: {detail}", plugin_id=plugin.id
        ) from exc
    return module


def _forget_module(name: str) -> None:
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def _public_methods(module: ModuleType, plugin: Plugin) -> dict[str, Callable[..., Any]]:
    """The manifest's ``methods``, else the module's public functions (its ``__all__`` if set).

    Functions merely imported into the module are not methods unless ``__all__`` names them;
    lifecycle functions are never methods.
    """
    found: dict[str, Callable[..., Any]] = {}
    if plugin.methods is not None:
        for name in plugin.methods:
            fn = getattr(module, name, None)
            if not callable(fn) or inspect.isclass(fn):
                raise PluginLoadError(
                    f"plugin {plugin.id}: the manifest lists method {name!r}, but the module "
                    f"has no function of that name", plugin_id=plugin.id)
            found[name] = fn
        return found
    names = getattr(module, "__all__", None)
    for name, value in vars(module).items():
        if name.startswith("_") or name in LIFECYCLE_NAMES or inspect.isclass(value):
            continue
        if names is not None:
            if name in names and callable(value):
                found[name] = value
        elif inspect.isfunction(value) and value.__module__ == module.__name__:
            found[name] = value
    return found


class InProcessPythonHandle:
    """A trusted Python plugin generation living in this process."""

    def __init__(self, plugin: Plugin, module: ModuleType, sandbox: SandboxConfig) -> None:
        self.plugin = plugin
        self._module = module
        self._sandbox = sandbox
        self._methods = _public_methods(module, plugin)
        self._tasks: set[asyncio.Future[Any]] = set()
        self._closed = False

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(sorted(self._methods))

    @property
    def has_state(self) -> bool:
        return self._lifecycle("export_state") is not None and \
            self._lifecycle("import_state") is not None

    def _lifecycle(self, name: str) -> Callable[..., Any] | None:
        fn = getattr(self._module, name, None)
        return fn if callable(fn) else None

    def _plugin_traceback(self, exc: BaseException) -> str:
        """The traceback from the plugin's own frames only (not sandboxer's or asyncio's)."""
        root = self.plugin.root
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if Path(f.filename).is_relative_to(root)]
        return "".join(["Traceback (most recent call last):\n",
                        *traceback.format_list(frames),
                        *traceback.format_exception_only(type(exc), exc)])

    def _plugin_error(self, exc: BaseException, method: str) -> PluginCallError:
        return PluginCallError(
            f"plugin {self.plugin.id}: {method} raised {type(exc).__name__}: {exc}",
            code=1,
            data={"type": type(exc).__name__, "message": str(exc),
                  "traceback": self._plugin_traceback(exc)},
            plugin_id=self.plugin.id,
            method=method,
        )

    async def _invoke(self, method: str, fn: Callable[..., Any], args: tuple[Any, ...],
                      timeout: float | None) -> Any:
        if self._closed:
            raise PluginStateError(f"plugin {self.plugin.id}: this generation is closed",
                                   plugin_id=self.plugin.id)
        try:
            inspect.signature(fn).bind(*args)
        except TypeError as exc:
            raise PluginCallError(
                f"plugin {self.plugin.id}: invalid arguments for {method}: {exc}",
                code=INVALID_PARAMS, plugin_id=self.plugin.id, method=method) from None
        except ValueError:
            pass  # no signature (some builtins): let the call itself decide
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
                timeout=timeout or 0.0, plugin_id=self.plugin.id, method=method) from None
        except asyncio.CancelledError:
            if work.cancelled() and self._closed:
                raise PluginStateError(
                    f"plugin {self.plugin.id}: unloaded while {method} was in flight "
                    "(it outlived the drain timeout)", plugin_id=self.plugin.id) from None
            if not work.done():
                work.cancel()
            raise
        except Exception as exc:
            raise self._plugin_error(exc, method) from exc
        return result

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        fn = self._methods.get(method)
        if fn is None:
            raise MethodNotFound(
                f"plugin {self.plugin.id} has no method {method!r} "
                f"(methods: {', '.join(self.methods) or 'none'})",
                plugin_id=self.plugin.id, method=method, available=list(self.methods))
        try:
            args = tuple(_json.normalize(list(args)))
        except TypeError as exc:
            raise PluginCallError(f"plugin {self.plugin.id}: arguments of {method} are not "
                                  f"JSON values: {exc}", code=INVALID_PARAMS,
                                  plugin_id=self.plugin.id, method=method) from None
        result = await self._invoke(method, fn, args,
                                    self._sandbox.timeout if timeout is None else timeout)
        try:
            return _json.normalize(result)
        except TypeError as exc:
            raise PluginCallError(f"plugin {self.plugin.id}: {method} returned a value that "
                                  f"is not JSON: {exc}", code=INTERNAL_ERROR,
                                  plugin_id=self.plugin.id, method=method) from None

    async def _lifecycle_call(self, name: str, *args: Any) -> tuple[bool, Any]:
        fn = self._lifecycle(name)
        if fn is None:
            return False, None
        result = await self._invoke(name, fn, args, self._sandbox.timeout)
        return True, result

    async def init(self, config: dict[str, Any]) -> None:
        await self._lifecycle_call("init", _json.normalize(config))

    async def health(self) -> Health:
        try:
            present, result = await self._lifecycle_call("health_check")
        except (PluginCallError, CallTimeout) as exc:
            return Health(False, str(exc))
        if present and result is False:
            return Health(False, f"plugin {self.plugin.id}: health_check returned False")
        if present and isinstance(result, dict) and result.get("ok") is False:
            return Health(False, str(result.get("message", "health_check reported not ok")))
        return Health(True)

    async def shutdown(self) -> None:
        await self._lifecycle_call("shutdown")

    async def export_state(self) -> Any:
        _, state = await self._lifecycle_call("export_state")
        try:
            return _json.normalize(state)
        except TypeError as exc:
            raise PluginCallError(f"plugin {self.plugin.id}: export_state returned a value "
                                  f"that is not JSON: {exc}", code=INTERNAL_ERROR,
                                  plugin_id=self.plugin.id, method="export_state") from None

    async def import_state(self, state: Any, from_version: str) -> None:
        await self._lifecycle_call("import_state", _json.normalize(state), from_version)

    def resource_usage(self) -> ResourceUsage:
        return ResourceUsage()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=0)
        _forget_module(self._module.__name__)


class InProcessPythonLoader:
    """Loads trusted Python plugins into this process (see the module docstring)."""

    kind = LoaderType.PYTHON

    async def start(self, plugin: Plugin, sandbox: SandboxConfig, *,
                    generation: int) -> InProcessPythonHandle:
        name = _module_name(plugin, generation)
        module = await asyncio.to_thread(_import_fresh, plugin, name)
        try:
            return InProcessPythonHandle(plugin, module, sandbox)
        except BaseException:
            _forget_module(name)
            raise
