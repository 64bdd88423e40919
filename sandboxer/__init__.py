"""sandboxer: a Linux-hardened plugin loader for Python hosts.

    async with PluginManager(config=HostConfig.load()) as mgr:
        p = await mgr.load("examples/hello")
        await p.call("greet", "world", timeout=2.0)

Public names are re-exported here; everything else is private.
"""

from .errors import (
    CallTimeout,
    ConfigError,
    CpuLimitExceeded,
    HandshakeError,
    IntegrityError,
    ManifestError,
    MemoryLimitExceeded,
    MethodNotFound,
    PluginCallError,
    PluginCrashed,
    PluginLoadError,
    PluginNotFound,
    PluginStateError,
    ProtocolError,
    RegistryError,
    ReloadError,
    ResourceLimitExceeded,
    SandboxerError,
    SandboxUnavailable,
)

# Neither typing nor importlib is imported at run time: the plugin host, which imports this
# package first, starts without them (docs/architecture.md, "Start-up imports").
_TYPE_CHECKING = False
if _TYPE_CHECKING:
    from typing import Any as _Any

    from ._digest import tree_checksum as checksum
    from ._lifecycle import PluginState
    from .config import HostConfig
    from .daemon.client import connect
    from .loaders import Health, PluginHandle, ResourceUsage
    from .manager import EventStream, LoadedPlugin, PluginEvent, PluginManager, PluginStatistics
    from .manifest import (
        GoPluginHandshake,
        GrpcSpec,
        LoaderType,
        Plugin,
        Protocol,
        load_plugin,
        parse_manifest,
    )
    from .sandbox.policy import PathGrant, SandboxConfig, SandboxRequest

# The supervisor's names are imported when first used, not with the package: the plugin host
# (sandboxer.host) runs inside every sandbox and imports only the errors, the wire protocol
# and the module loader. Importing the manager here would pull asyncio, wasmtime and
# libseccomp into each plugin's start-up (~0.3 s here, seconds under an emulated CPU).
_LAZY = {
    "checksum": ("._digest", "tree_checksum"),
    **{name: (".loaders", name) for name in ("Health", "PluginHandle", "ResourceUsage")},
    **{
        name: (".manager", name)
        for name in (
            "EventStream",
            "LoadedPlugin",
            "PluginEvent",
            "PluginManager",
            "PluginStatistics",
        )
    },
    "PluginState": ("._lifecycle", "PluginState"),
    **{
        name: (".manifest", name)
        for name in (
            "GoPluginHandshake",
            "GrpcSpec",
            "LoaderType",
            "Plugin",
            "Protocol",
            "load_plugin",
            "parse_manifest",
        )
    },
    "HostConfig": (".config", "HostConfig"),
    "connect": (".daemon.client", "connect"),
    **{
        name: (".sandbox.policy", name) for name in ("PathGrant", "SandboxConfig", "SandboxRequest")
    },
}


def __getattr__(name: str) -> "_Any":
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    from importlib import import_module

    value = getattr(import_module(module, __name__), attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "CallTimeout",
    "connect",
    "ConfigError",
    "CpuLimitExceeded",
    "EventStream",
    "GoPluginHandshake",
    "GrpcSpec",
    "HandshakeError",
    "Health",
    "HostConfig",
    "IntegrityError",
    "LoadedPlugin",
    "LoaderType",
    "ManifestError",
    "MemoryLimitExceeded",
    "MethodNotFound",
    "PathGrant",
    "Plugin",
    "PluginCallError",
    "PluginCrashed",
    "PluginEvent",
    "PluginHandle",
    "PluginLoadError",
    "PluginManager",
    "PluginNotFound",
    "PluginState",
    "PluginStateError",
    "PluginStatistics",
    "Protocol",
    "ProtocolError",
    "RegistryError",
    "ReloadError",
    "ResourceLimitExceeded",
    "ResourceUsage",
    "SandboxConfig",
    "SandboxRequest",
    "SandboxUnavailable",
    "SandboxerError",
    "checksum",
    "load_plugin",
    "parse_manifest",
    "__version__",
]
