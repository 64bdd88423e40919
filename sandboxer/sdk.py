"""The plugin author's side: write functions, call ``serve()``.

    from sandboxer import sdk

    def greet(name):
        return f"Hello, {name}!"

    if __name__ == "__main__":
        sdk.serve(name="hello", version="1.0.0")

``serve()`` finds the public functions of the calling module (or takes a mapping or a module),
handshakes with the host over the socket the host passed (SANDBOXER_RPC_FD), and serves
requests until the host says shutdown or goes away; then it exits the process. Sync and async
functions both work and requests are handled concurrently. The optional lifecycle functions
``init(config)``, ``health_check()``, ``shutdown()``, ``export_state()`` and
``import_state(state, from_version)`` are picked up by name.

This module runs inside the plugin's process and imports nothing of the supervisor's.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Mapping
from types import ModuleType

from ._hooks import LIFECYCLE_HOOKS
from .rpc.framing import DEFAULT_MAX_FRAME
from .rpc.server import Handlers, Server, socket_from_env

# typing only for the type checker: a plugin starts without it (docs/architecture.md)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, NoReturn

__all__ = ["serve", "log"]

_server: Server | None = None


def _collect(source: Mapping[str, Any] | ModuleType) -> Handlers:
    if isinstance(source, ModuleType):
        module_name = source.__name__
        items = {
            k: v
            for k, v in vars(source).items()
            if inspect.isfunction(v) and v.__module__ == module_name
        }
    else:
        items = {k: v for k, v in source.items() if callable(v)}
    lifecycle = {k: items[k] for k in LIFECYCLE_HOOKS if k in items}
    methods: dict[str, Callable[..., Any]] = {
        k: v
        for k, v in items.items()
        if not k.startswith("_") and k not in LIFECYCLE_HOOKS and k not in ("serve", "log")
    }
    return Handlers(methods=methods, lifecycle=lifecycle)


def serve(
    handlers: Mapping[str, Any] | ModuleType | None = None,
    *,
    name: str | None = None,
    version: str = "0.0.0",
) -> NoReturn:
    """Serve ``handlers`` (default: the caller's module) to the host, then exit."""
    global _server
    if handlers is None:
        # the caller's frame only: inspect.stack() would read the source of every frame
        caller = sys._getframe(1).f_globals
        handlers = sys.modules.get(caller.get("__name__", "__main__")) or caller
    found = _collect(handlers)
    sock, cookie = socket_from_env()
    max_frame = int(os.environ.get("SANDBOXER_MAX_FRAME", DEFAULT_MAX_FRAME))
    label = name or os.path.basename(sys.argv[0] or "plugin")
    _server = Server(found, sock, cookie=cookie, name=label, version=version, max_frame=max_frame)
    code = _server.run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def log(level: str, message: str) -> None:
    """Send a log line to the host's logging (``sandboxer.log``); a no-op before serve()."""
    if _server is not None:
        _server.notify("sandboxer.log", {"level": level, "message": str(message)})
