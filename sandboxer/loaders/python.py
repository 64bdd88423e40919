"""The python kind: a module file or package whose public callables are its methods.

Two paths, chosen by the manager from the effective sandbox (DESIGN section 4):

- sandboxed, the default: the plugin host (``python -m sandboxer.host --kind python``) imports
  the plugin inside the sandbox; ``command`` is that argv, run by the out-of-process loader
  (``out_of_process.ProcessLoader``);
- trusted: ``InProcessPythonLoader`` (``in_process``) imports it into the supervisor, only
  when the sandbox is disabled and the host policy allows it.

This module never imports the plugin itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..manifest import LoaderType, Plugin
from .in_process import InProcessPythonHandle, InProcessPythonLoader
from .plugin_host import host_command

if TYPE_CHECKING:  # a type only: out_of_process passes the runtime in
    from ..sandbox.runtime import Runtime

__all__ = ["command", "InProcessPythonLoader", "InProcessPythonHandle"]


def command(plugin: Plugin, *, entrypoint: str, root: str, runtime: Runtime | None) -> list[str]:
    """The plugin host serving the python plugin ``plugin`` (paths as the process sees
    them; ``runtime`` None: this interpreter, unsandboxed)."""
    return host_command(
        LoaderType.PYTHON, plugin, entrypoint=entrypoint, root=root, runtime=runtime
    )
