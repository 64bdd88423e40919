"""The external kind: any executable speaking the wire protocol (DESIGN section 7) on fd 3.

It runs as its own process in the sandbox; ``command`` is its argv (the entrypoint itself,
no arguments), run by the out-of-process loader (``out_of_process.ProcessLoader``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..manifest import Plugin

if TYPE_CHECKING:  # a type only: out_of_process passes the runtime in
    from ..sandbox.runtime import Runtime

__all__ = ["command"]


def command(plugin: Plugin, *, entrypoint: str, root: str, runtime: Runtime | None) -> list[str]:
    """The executable at ``entrypoint`` (as the process sees it). ``root`` and ``runtime``
    are not needed: the plugin brings its own program."""
    return [entrypoint]
