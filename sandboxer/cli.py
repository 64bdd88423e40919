"""The ``sandboxer`` command (DESIGN section 10): its entry point; the commands are in
``_cli_commands``.

Exit codes: 0 ok · 1 the plugin returned an error · 2 usage or invalid plugin (manifest,
integrity, load) · 3 a limit was hit or the plugin crashed · 4 this host cannot enforce the
requested sandbox. Human-readable output by default; ``--json`` prints one JSON object.

A command that starts sandboxes starts the sandbox launcher's fork server first, before it
imports anything else: the server's own interpreter start (~20 ms here) then runs beside
this process's imports (~40 ms: asyncio, the policy, the launch) instead of after them.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]

_GLOBAL_OPTIONS = ("-v", "--verbose")
_LAUNCHING = ("exec", "call", "demo")  # the commands that start sandboxes


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command = next((word for word in words if word not in _GLOBAL_OPTIONS), None)
    if command in _LAUNCHING:
        from .errors import SandboxUnavailable
        from .sandbox import forkserver

        try:
            forkserver.prestart()
        except SandboxUnavailable:
            pass  # the launch tries again, and says what is missing
    from ._cli_commands import run

    return run(words)


if __name__ == "__main__":
    sys.exit(main())
