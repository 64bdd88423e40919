"""The one error hierarchy of sandboxer.

Every error a user can see is one of these; lower-layer errors (OSError, TOML and JSON
errors, exceptions raised inside a plugin) are mapped to the most specific class here with
``raise ... from`` so the cause stays attached. Messages say what happened, to which plugin,
and what the user can do about it.

    SandboxerError
    ├── ConfigError                 the host's own configuration is invalid
    ├── ManifestError               a plugin.toml (or bare plugin file) is invalid
    ├── PluginNotFound              no plugin with that id / path / registry entry
    ├── PluginStateError            the plugin exists but cannot do that in its current state
    ├── PluginLoadError             the plugin could not be started
    │   ├── HandshakeError          it did not complete the wire handshake
    │   ├── IntegrityError          its bytes are not the ones its manifest or registry names
    │   └── SandboxUnavailable      this host cannot enforce the sandbox it needs
    ├── PluginCallError             the plugin answered a call with an error (code, message, data)
    │   └── MethodNotFound          ... because it has no such method
    ├── PluginCrashed               the plugin died (exit status, signal, stderr tail)
    ├── ResourceLimitExceeded       a limit was hit
    │   ├── MemoryLimitExceeded     (limit, peak)
    │   ├── CallTimeout             (timeout)
    │   └── CpuLimitExceeded
    ├── ProtocolError               the plugin broke the wire protocol
    ├── RegistryError               a registry could not be read or trusted
    └── ReloadError                 a reload failed and was rolled back (cause attached)

The CLI maps them to exit codes (``exit_code()``): 1 for PluginCallError, 2 for usage and
invalid plugins, 3 for limits and crashes, 4 for SandboxUnavailable.
"""

from __future__ import annotations

# typing only for the type checker: the plugin host starts without it (docs/architecture.md)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Self

__all__ = [
    "SandboxerError",
    "ConfigError",
    "ManifestError",
    "PluginNotFound",
    "PluginStateError",
    "PluginLoadError",
    "HandshakeError",
    "IntegrityError",
    "SandboxUnavailable",
    "PluginCallError",
    "MethodNotFound",
    "PluginCrashed",
    "ResourceLimitExceeded",
    "MemoryLimitExceeded",
    "CallTimeout",
    "CpuLimitExceeded",
    "ProtocolError",
    "RegistryError",
    "ReloadError",
    "exit_code",
    "from_json",
]


class SandboxerError(Exception):
    """Base of every error sandboxer raises on purpose.

    ``plugin_id`` names the plugin concerned when there is one.
    """

    def __init__(self, message: str, *, plugin_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.plugin_id = plugin_id

    def __str__(self) -> str:
        return self.message

    def to_json(self) -> dict[str, Any]:
        """The error as the CLI's ``--json`` output and events carry it."""
        out: dict[str, Any] = {"type": type(self).__name__, "message": self.message}
        if self.plugin_id is not None:
            out["plugin"] = self.plugin_id
        return out


class _FieldError(SandboxerError):
    """An input file is invalid: names the file, the field and what was expected."""

    def __init__(self, path: str, field: str, expected: str) -> None:
        self.path = path
        self.field = field
        self.expected = expected
        where = f"{path}: " if path else ""
        super().__init__(f"{where}{field}: {expected}")

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out.update(path=self.path, field=self.field)
        return out


class ConfigError(_FieldError):
    """The host configuration (sandboxer.toml or a HostConfig built in code) is invalid."""


class ManifestError(_FieldError):
    """A plugin manifest is invalid.

    ``field`` is the dotted TOML path (``sandbox.memory_limit``); ``expected`` says what a
    valid value looks like and what was found instead.
    """


class PluginNotFound(SandboxerError):
    """No plugin matches the id, path or registry reference given."""


class PluginStateError(SandboxerError):
    """The plugin exists but its lifecycle state does not allow the operation.

    For example a call to a plugin that is draining for unload, or a transition the state
    machine does not have.
    """


class PluginLoadError(SandboxerError):
    """The plugin could not be loaded, started or initialised."""


class HandshakeError(PluginLoadError):
    """The plugin did not complete the wire handshake (cookie, protocol, silence)."""


class IntegrityError(PluginLoadError):
    """The plugin's bytes do not match the digest or signature that vouches for them."""


class SandboxUnavailable(PluginLoadError):
    """This host cannot enforce an isolation the effective sandbox asks for.

    ``missing`` names the mechanism; the message says how to get it.
    """

    def __init__(self, message: str, *, missing: str, plugin_id: str | None = None) -> None:
        super().__init__(message, plugin_id=plugin_id)
        self.missing = missing

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["missing"] = self.missing
        return out


class PluginCallError(SandboxerError):
    """The plugin answered a call with an error.

    ``code`` follows JSON-RPC: negative codes are protocol-level (-32601 method not found,
    -32602 invalid params, -32603 internal error), codes >= 1 are the plugin's own. ``data``
    carries details such as the exception type and traceback of a Python plugin.
    """

    def __init__(
        self,
        message: str,
        *,
        code: int = 1,
        data: Any = None,
        plugin_id: str | None = None,
        method: str | None = None,
    ) -> None:
        super().__init__(message, plugin_id=plugin_id)
        self.code = code
        self.data = data
        self.method = method

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["code"] = self.code
        if self.method is not None:
            out["method"] = self.method
        if self.data is not None:
            out["data"] = self.data
        return out


# JSON-RPC 2.0 error codes (section 5.1), and the one server error sandboxer sends (-32000:
# the host refused the plugin's handshake).
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
SERVER_ERROR = -32000


class MethodNotFound(PluginCallError):
    """The plugin has no method of that name (JSON-RPC -32601)."""

    CODE = METHOD_NOT_FOUND

    def __init__(
        self,
        message: str,
        *,
        plugin_id: str | None = None,
        method: str | None = None,
        available: list[str] | None = None,
    ) -> None:
        super().__init__(
            message,
            code=self.CODE,
            plugin_id=plugin_id,
            method=method,
            data={"available": available} if available is not None else None,
        )

    @classmethod
    def of(cls, plugin_id: str, method: str, methods: tuple[str, ...] | list[str]) -> Self:
        """The error every kind gives for a call to a method its plugin does not offer."""
        return cls(
            f"plugin {plugin_id} has no method {method!r} "
            f"(methods: {', '.join(methods) or 'none'})",
            plugin_id=plugin_id,
            method=method,
            available=list(methods),
        )


class PluginCrashed(SandboxerError):
    """The plugin process died: exit status or signal, and the last lines of its stderr."""

    def __init__(
        self,
        message: str,
        *,
        plugin_id: str | None = None,
        exit_status: int | None = None,
        signal: int | None = None,
        stderr_tail: list[str] | None = None,
    ) -> None:
        super().__init__(message, plugin_id=plugin_id)
        self.exit_status = exit_status
        self.signal = signal
        self.stderr_tail = list(stderr_tail or [])

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out.update(exitStatus=self.exit_status, signal=self.signal, stderrTail=self.stderr_tail)
        return out


class ResourceLimitExceeded(SandboxerError):
    """A resource limit of the plugin's sandbox was hit."""


class MemoryLimitExceeded(ResourceLimitExceeded):
    """The plugin ran out of its memory limit; ``limit`` and ``peak`` are in bytes."""

    def __init__(
        self, message: str, *, limit: int, peak: int | None, plugin_id: str | None = None
    ) -> None:
        super().__init__(message, plugin_id=plugin_id)
        self.limit = limit
        self.peak = peak

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out.update(limit=self.limit, peak=self.peak)
        return out


class CallTimeout(ResourceLimitExceeded):
    """A call did not finish within its timeout (seconds)."""

    def __init__(
        self,
        message: str,
        *,
        timeout: float,
        plugin_id: str | None = None,
        method: str | None = None,
    ) -> None:
        super().__init__(message, plugin_id=plugin_id)
        self.timeout = timeout
        self.method = method

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out["timeout"] = self.timeout
        if self.method is not None:
            out["method"] = self.method
        return out


class CpuLimitExceeded(ResourceLimitExceeded):
    """The plugin used up the CPU (or wasm fuel) it was allowed."""


class ProtocolError(SandboxerError):
    """The plugin broke the wire protocol (garbage, oversized frame, unknown id ...)."""


class RegistryError(SandboxerError):
    """A registry could not be read, or what it holds could not be trusted."""


class ReloadError(SandboxerError):
    """A reload failed before the switch and was rolled back; the old generation serves on.

    ``cause`` is the error that stopped the new generation.
    """

    def __init__(self, message: str, *, cause: BaseException, plugin_id: str | None = None) -> None:
        super().__init__(message, plugin_id=plugin_id)
        self.cause = cause

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        cause = self.cause
        out["cause"] = (
            cause.to_json()
            if isinstance(cause, SandboxerError)
            else {"type": type(cause).__name__, "message": str(cause)}
        )
        return out


def exit_code(error: BaseException) -> int:
    """The CLI exit code for an error (DESIGN section 10)."""
    if isinstance(error, SandboxUnavailable):
        return 4
    if isinstance(error, (ResourceLimitExceeded, PluginCrashed)):
        return 3
    if isinstance(error, PluginCallError):
        return 1
    return 2


# What ``to_json`` writes for each error's own attributes, and the attribute it comes back to.
_FIELDS = {
    "code": "code",
    "data": "data",
    "method": "method",
    "path": "path",
    "field": "field",
    "missing": "missing",
    "exitStatus": "exit_status",
    "signal": "signal",
    "stderrTail": "stderr_tail",
    "limit": "limit",
    "peak": "peak",
    "timeout": "timeout",
}


def from_json(data: Any) -> SandboxerError:
    """The error ``to_json`` described, rebuilt on the other side of a connection (the
    daemon's clients): its class if it is one of ours, else SandboxerError; its message,
    plugin and own attributes. The cause of a limit is not rebuilt."""
    if not isinstance(data, dict):
        return SandboxerError(f"an error the daemon did not describe: {data!r}")
    names = {cls.__name__: cls for cls in _error_classes(SandboxerError)}
    cls = names.get(str(data.get("type")), SandboxerError)
    error = cls.__new__(cls)
    plugin = data.get("plugin")
    SandboxerError.__init__(
        error, str(data.get("message", "")), plugin_id=plugin if isinstance(plugin, str) else None
    )
    for key, attribute in _FIELDS.items():
        if key in data:
            setattr(error, attribute, data[key])
    if isinstance(error, PluginCallError):
        error.code = data.get("code", 1) if isinstance(data.get("code"), int) else 1
        error.data = data.get("data")
        error.method = data.get("method")
    if isinstance(error, PluginCrashed):
        error.stderr_tail = list(data.get("stderrTail") or [])
    if isinstance(error, ReloadError):
        cause = data.get("cause")
        error.cause = from_json(cause) if isinstance(cause, dict) else SandboxerError("")
    return error


def _error_classes(base: type[SandboxerError]) -> list[type[SandboxerError]]:
    found = [base]
    for sub in base.__subclasses__():
        found += _error_classes(sub)
    return found
