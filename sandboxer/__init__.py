"""sandboxer: a Linux-hardened plugin loader for Python hosts.

    async with PluginManager(config=HostConfig.load()) as mgr:
        p = await mgr.load("examples/hello")
        await p.call("greet", "world", timeout=2.0)

Public names are re-exported here; everything else is private.
"""

from ._digest import tree_checksum as checksum
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
from .loaders import Health, PluginHandle, ResourceUsage
from .manager import EventStream, LoadedPlugin, PluginEvent, PluginManager, PluginStatistics
from .manifest import LoaderType, Plugin, PluginState, load_plugin, parse_manifest
from .sandbox.policy import HostConfig, PathGrant, SandboxConfig, SandboxRequest

__version__ = "0.1.0"

__all__ = [
    "CallTimeout",
    "ConfigError",
    "CpuLimitExceeded",
    "EventStream",
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
