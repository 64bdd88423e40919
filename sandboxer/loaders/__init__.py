"""Loaders: one module per plugin kind, each turning a ``Plugin`` into a running handle.

The seams are two Protocols. A ``Loader`` starts a plugin and returns a ``PluginHandle``; the
handle is the only thing the manager talks to afterwards, whatever the kind. Loaders never
import the manager (the layer above them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

from ..errors import SandboxerError
from ..manifest import LoaderType, Plugin
from ..sandbox.policy import SandboxConfig

__all__ = ["Loader", "PluginHandle", "ResourceUsage", "Health", "run_mode"]


@dataclass(frozen=True, slots=True)
class ResourceUsage:
    """What the sandbox measured for a plugin; ``None`` where nothing can measure it
    (an in-process plugin shares the supervisor's memory and CPU accounting)."""

    peak_memory_bytes: int | None = None
    cpu_time_s: float | None = None


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    message: str = ""


@runtime_checkable
class PluginHandle(Protocol):
    """One running generation of one plugin.

    ``call`` takes and returns JSON values. The lifecycle methods map to the plugin's optional
    ``init``/``health_check``/``shutdown``/``export_state``/``import_state`` and do nothing
    (or report healthy / no state) when the plugin lacks them. ``close`` releases everything
    the handle holds, fails calls still in flight, and is idempotent.
    """

    plugin: Plugin

    @property
    def methods(self) -> tuple[str, ...]: ...

    @property
    def has_state(self) -> bool:
        """True when the plugin both exports and imports state (hot reload migrates it)."""
        ...

    async def call(self, method: str, *args: Any, timeout: float | None = None) -> Any: ...

    async def init(self, config: dict[str, Any]) -> None: ...

    async def health(self) -> Health: ...

    async def shutdown(self) -> None: ...

    async def export_state(self) -> Any: ...

    async def import_state(self, state: Any, from_version: str) -> None: ...

    def resource_usage(self) -> ResourceUsage: ...

    def on_failure(self, callback: Callable[[SandboxerError], None]) -> None:
        """Register ``callback(error)``, called once if the plugin dies or breaks the
        protocol on its own (not when closed on purpose)."""
        ...

    async def close(self) -> None: ...


class Loader(Protocol):
    """Starts plugins of one kind under one sandbox mode."""

    kind: LoaderType

    async def start(self, plugin: Plugin, sandbox: SandboxConfig, *,
                    generation: int) -> PluginHandle: ...


def run_mode(kind: LoaderType, sandbox: SandboxConfig) -> str:
    """Where and how a plugin of ``kind`` runs under ``sandbox``, in words for people."""
    if kind is LoaderType.WASM:
        return "wasmtime in-process"
    return "sandboxed" if sandbox.enabled else "trusted in-process"
