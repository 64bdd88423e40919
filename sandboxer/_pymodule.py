"""A Python plugin module: imported fresh, its methods and lifecycle found, errors shaped.

Shared by the two places Python plugin code runs: the trusted in-process loader and the
sandboxed plugin host. Both must see the same methods and report the same errors, so the
rules live here once. Nothing here decides where the code runs; callers do.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable
from types import ModuleType

from ._hooks import EXPORT_STATE, IMPORT_STATE, LIFECYCLE_HOOKS
from .errors import INVALID_PARAMS, PluginCallError, PluginLoadError

# typing only for the type checker: the plugin host starts without it, and without traceback
# and pathlib, imported where a plugin's error is reported (docs/architecture.md)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["LIFECYCLE_NAMES", "PythonModule"]

LIFECYCLE_NAMES = frozenset(LIFECYCLE_HOOKS)


def _module_name(plugin_id: str, generation: int) -> str:
    safe = re.sub(r"[^A-Za-z0-9_]", "_", plugin_id)
    # os.urandom, not the secrets module: that one loads hmac and libcrypto at every start-up
    return f"_sandboxer_plugin_{safe}_g{generation}_{os.urandom(4).hex()}"


def _forget_module(name: str) -> None:
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]


def _import_fresh(entry: str, name: str, plugin_id: str) -> ModuleType:
    """Import ``entry`` as a new module ``name`` (a package if it is a directory)."""
    if os.path.isdir(entry):
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(entry, "__init__.py"), submodule_search_locations=[entry]
        )
    else:
        spec = importlib.util.spec_from_file_location(name, entry)
    if spec is None or spec.loader is None:
        raise PluginLoadError(f"plugin {plugin_id}: cannot import {entry}", plugin_id=plugin_id)
    module = importlib.util.module_from_spec(spec)
    # Registered while executing so the package's relative imports resolve; removed at close.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except KeyboardInterrupt:
        _forget_module(name)
        raise
    except BaseException as exc:  # SystemExit too: a plugin may not end its host that way
        import traceback

        _forget_module(name)
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        raise PluginLoadError(
            f"plugin {plugin_id}: importing {entry} failed: {detail}", plugin_id=plugin_id
        ) from exc
    return module


def _public_methods(
    module: ModuleType, listed: tuple[str, ...] | None, plugin_id: str
) -> dict[str, Callable[..., Any]]:
    """The manifest's ``methods``, else the module's public functions (its ``__all__`` if set).

    Functions merely imported into the module are not methods unless ``__all__`` names them;
    lifecycle functions and classes are never methods.
    """
    found: dict[str, Callable[..., Any]] = {}
    if listed is not None:
        for name in listed:
            fn = getattr(module, name, None)
            if not callable(fn) or inspect.isclass(fn):
                raise PluginLoadError(
                    f"plugin {plugin_id}: the manifest lists method {name!r}, but the module "
                    f"has no function of that name",
                    plugin_id=plugin_id,
                )
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


def _positional_arity(fn: Callable[..., Any]) -> tuple[float, float]:
    """(fewest, most) positional arguments ``fn`` accepts; (0, inf) when it cannot be told,
    and an empty range when a keyword-only parameter is required (positional calls fail)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except ValueError:
        return 0, float("inf")
    P = inspect.Parameter
    positional = [p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    if any(p.kind is P.KEYWORD_ONLY and p.default is P.empty for p in params):
        return 1, 0
    low = sum(1 for p in positional if p.default is P.empty)
    high = float("inf") if any(p.kind is P.VAR_POSITIONAL for p in params) else len(positional)
    return low, high


class PythonModule:
    """One fresh import of a plugin's code, with its methods and lifecycle functions."""

    def __init__(
        self,
        entry: str | os.PathLike[str],
        *,
        plugin_id: str,
        generation: int,
        root: str | os.PathLike[str],
        methods: tuple[str, ...] | None,
    ) -> None:
        self.plugin_id = plugin_id
        self.root = os.fspath(root)
        self.name = _module_name(plugin_id, generation)
        self.module = _import_fresh(os.fspath(entry), self.name, plugin_id)
        self._arity: dict[Callable[..., Any], tuple[float, float]] = {}
        try:
            self.methods = _public_methods(self.module, methods, plugin_id)
        except BaseException:
            _forget_module(self.name)
            raise

    def lifecycle(self, name: str) -> Callable[..., Any] | None:
        fn = getattr(self.module, name, None)
        return fn if callable(fn) else None

    @property
    def has_state(self) -> bool:
        return self.lifecycle(EXPORT_STATE) is not None and self.lifecycle(IMPORT_STATE) is not None

    def check_args(self, method: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """PluginCallError(-32602) when ``args`` cannot bind to ``fn``'s signature.

        The signature is read once per function and reduced to the range of positional
        argument counts it accepts, so the check on every call is two comparisons."""
        bounds = self._arity.get(fn)
        if bounds is None:
            bounds = self._arity[fn] = _positional_arity(fn)
        low, high = bounds
        if low <= len(args) <= high:
            return
        try:
            inspect.signature(fn).bind(*args)
        except TypeError as exc:
            raise PluginCallError(
                f"plugin {self.plugin_id}: invalid arguments for {method}: {exc}",
                code=INVALID_PARAMS,
                plugin_id=self.plugin_id,
                method=method,
            ) from None
        except ValueError:
            pass  # no signature (some builtins): let the call itself decide

    def _traceback(self, exc: BaseException) -> str:
        """The traceback from the plugin's own frames only (not sandboxer's or asyncio's)."""
        import traceback
        from pathlib import Path

        frames = [
            f
            for f in traceback.extract_tb(exc.__traceback__)
            if Path(f.filename).is_relative_to(self.root)
        ]
        return "".join(
            [
                "Traceback (most recent call last):\n",
                *traceback.format_list(frames),
                *traceback.format_exception_only(type(exc), exc),
            ]
        )

    def error(self, exc: BaseException, method: str) -> PluginCallError:
        """The PluginCallError a plugin's exception becomes (code 1, type and traceback)."""
        return PluginCallError(
            f"plugin {self.plugin_id}: {method} raised {type(exc).__name__}: {exc}",
            code=1,
            data={
                "type": type(exc).__name__,
                "message": str(exc),
                "traceback": self._traceback(exc),
            },
            plugin_id=self.plugin_id,
            method=method,
        )

    def close(self) -> None:
        _forget_module(self.name)
