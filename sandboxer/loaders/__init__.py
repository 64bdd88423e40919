"""Loaders: one module per plugin kind, each turning a ``Plugin`` into a running handle.

The kinds (DESIGN sections 2 and 4), one module each:

- ``python``: the plugin host's command for a sandboxed python plugin, and the trusted path,
  ``in_process`` (the supervisor imports the plugin; only when the sandbox is disabled and the
  host policy allows it);
- ``native``: the plugin host's command for a C-ABI shared library (always out of process);
- ``external``: an executable speaking the wire protocol, its own command;
- ``wasm``: in-process under wasmtime's limits (``_wasmtime``: its fast call path).

``out_of_process`` is the machinery the python, native and external kinds share: it spawns
the kind's command (``plugin_host`` builds the plugin host's), sandboxed by ``sandbox/``,
waits for the handshake and turns the process into a ``ProcessHandle``. It takes the command
from the kind modules; they import nothing of it. This module imports none of its
submodules, so each of them may import the seams below from it.

The seams are two Protocols. A ``Loader`` starts a plugin and returns a ``PluginHandle``; the
handle is the only thing the manager talks to afterwards, whatever the kind. Loaders never
import the manager (the layer above them).

The lifecycle is optional for every kind (DESIGN sections 3 and 7), and one rule says what a
plugin's answers mean, here, for all of them: a lifecycle function the plugin lacks, or a
-32601 answer to its reserved method, is "not implemented" (no init or shutdown work,
healthy, no state); a health check is unhealthy only when it answers ``false``,
``{"ok": false, …}`` or fails some other way.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, runtime_checkable

from ..errors import MethodNotFound, PluginCallError, SandboxerError
from ..manifest import LoaderType, Plugin
from ..sandbox.policy import SandboxConfig

__all__ = [
    "Loader",
    "PluginHandle",
    "ResourceUsage",
    "Health",
    "NO_STATE",
    "NoState",
    "not_implemented",
    "run_mode",
]


class _NoState(enum.Enum):
    NO_STATE = "no state"


NO_STATE: Final = _NoState.NO_STATE
"""What ``export_state`` returns when the plugin turns out to carry no state (it answered
-32601): a reload then starts the new generation fresh. Distinct from ``None``, which is a
state (JSON ``null``)."""
NoState = Literal[_NoState.NO_STATE]


def not_implemented(error: BaseException) -> bool:
    """True when ``error`` is a plugin's -32601 answer: it does not implement that method."""
    return isinstance(error, PluginCallError) and error.code == MethodNotFound.CODE


@dataclass(frozen=True, slots=True)
class ResourceUsage:
    """What the sandbox measured for a plugin; ``None`` where nothing can measure it
    (an in-process plugin shares the supervisor's memory and CPU accounting)."""

    peak_memory_bytes: int | None = None
    cpu_time_s: float | None = None
    # Calls the seccomp filter refused, by syscall name (sandbox/denials.py); None where
    # denials cannot be explained (in-process plugins, no seccomp user notification).
    denied: dict[str, int] | None = None


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    message: str = ""

    @classmethod
    def from_answer(cls, plugin_id: str, answer: Any) -> Health:
        """What a health check's answer means: ``false`` and ``{"ok": false, …}`` are
        unhealthy; anything else (``true``, ``null``, ``{}``, ``{"ok": true}``) is healthy."""
        if answer is False:
            return cls(False, f"plugin {plugin_id}: health check answered false")
        if isinstance(answer, dict) and answer.get("ok") is False:
            message = answer.get("message")
            return cls(
                False,
                f"plugin {plugin_id}: health check says not ok"
                + (f": {message}" if message else ""),
            )
        return cls(True)

    @classmethod
    def from_error(cls, error: SandboxerError) -> Health:
        """A health check that failed is unhealthy, unless it is not implemented (-32601)."""
        return cls(True) if not_implemented(error) else cls(False, str(error))


@runtime_checkable
class PluginHandle(Protocol):
    """One running generation of one plugin.

    ``call`` takes and returns JSON values. The lifecycle methods map to the plugin's optional
    ``init``/``health_check``/``shutdown``/``export_state``/``import_state`` and do nothing
    (or report healthy, or return ``NO_STATE``) when the plugin lacks them or answers -32601.
    ``close`` releases everything the handle holds, fails calls still in flight, and is
    idempotent.
    """

    plugin: Plugin

    @property
    def methods(self) -> tuple[str, ...]: ...

    @property
    def has_state(self) -> bool:
        """True when the plugin both exports and imports state (hot reload migrates it)."""
        ...

    # An awaitable, not necessarily a coroutine: the out-of-process handle answers with a
    # future it creates as the request is written.
    def call(self, method: str, *args: Any, timeout: float | None = None) -> Awaitable[Any]: ...

    async def init(self, config: dict[str, Any]) -> None: ...

    async def health(self) -> Health: ...

    async def shutdown(self) -> None: ...

    async def export_state(self) -> Any | NoState:
        """The plugin's state, or ``NO_STATE`` when it turns out to carry none."""
        ...

    async def import_state(self, state: Any, from_version: str) -> None:
        """Hand the previous generation's state over; a plugin that does not implement it
        starts fresh (not an error)."""
        ...

    def resource_usage(self) -> ResourceUsage: ...

    def on_failure(self, callback: Callable[[SandboxerError], None]) -> None:
        """Register ``callback(error)``, called once if the plugin dies or breaks the
        protocol on its own (not when closed on purpose)."""
        ...

    async def close(self) -> None: ...


class Loader(Protocol):
    """Starts plugins of one kind under one sandbox mode."""

    kind: LoaderType

    async def start(
        self, plugin: Plugin, sandbox: SandboxConfig, *, generation: int
    ) -> PluginHandle: ...


def run_mode(kind: LoaderType, sandbox: SandboxConfig) -> str:
    """Where and how a plugin of ``kind`` runs under ``sandbox``, in words for people."""
    if kind is LoaderType.WASM:
        return "wasmtime in-process"
    return "sandboxed" if sandbox.enabled else "trusted in-process"
