"""The native kind: a C-ABI shared library (``sandboxer_call``, DESIGN section 4).

It always runs in the plugin host (``python -m sandboxer.host --kind native``), which dlopens
it through ctypes: sandboxed by default, in an unsandboxed plugin host when trusted. It is
never dlopened into the supervisor. ``command`` is that argv, run by the out-of-process loader
(``out_of_process.ProcessLoader``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..manifest import LoaderType, Plugin
from .plugin_host import host_command

if TYPE_CHECKING:  # a type only: out_of_process passes the runtime in
    from ..sandbox.runtime import Runtime

__all__ = ["command"]


def command(plugin: Plugin, *, entrypoint: str, root: str, runtime: Runtime | None) -> list[str]:
    """The plugin host serving the native plugin ``plugin`` (paths as the process sees
    them; ``runtime`` None: this interpreter, unsandboxed)."""
    return host_command(
        LoaderType.NATIVE, plugin, entrypoint=entrypoint, root=root, runtime=runtime
    )
