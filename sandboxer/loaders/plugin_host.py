"""The command that starts the plugin host (``sandboxer.host``) for one plugin.

The python and native kinds both run out of process in the plugin host, which imports the
module or dlopens the library inside the sandbox; only ``--kind`` tells them apart. This
module builds that argv and nothing else: it never starts a process and never loads the
plugin.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ..manifest import LoaderType, Plugin

if TYPE_CHECKING:  # a type only: out_of_process passes the runtime in
    from ..sandbox.runtime import Runtime

__all__ = ["host_command", "host_args"]


def host_command(
    kind: LoaderType, plugin: Plugin, *, entrypoint: str, root: str, runtime: Runtime | None
) -> list[str]:
    """``sandboxer.host`` serving ``plugin`` as ``kind``. ``entrypoint`` and ``root`` are
    the paths as the process sees them; ``runtime`` is what it runs on inside the sandbox
    (None: this process's own interpreter, unsandboxed)."""
    args = host_args(kind, plugin, entrypoint=entrypoint, root=root)
    if runtime is not None:
        return runtime.host_argv(*args)
    return [sys.executable, "-I", "-m", "sandboxer.host", *args]


def host_args(kind: LoaderType, plugin: Plugin, *, entrypoint: str, root: str) -> list[str]:
    """The plugin host's arguments for ``plugin`` (after the interpreter and its boot)."""
    args = [
        "--kind",
        kind.value,
        "--entrypoint",
        entrypoint,
        "--root",
        root,
        "--id",
        plugin.id,
        "--version",
        plugin.version,
    ]
    if plugin.methods is not None:
        args += ["--methods", ",".join(plugin.methods)]
    return args
