"""Entry point of the plugin host; see ``sandboxer.host``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._hooks import (
    EXPORT_STATE,
    HEALTH_CHECK,
    IMPORT_STATE,
    INIT,
    LIFECYCLE_HOOKS,
    SHUTDOWN,
    STATE_HOOKS,
)
from .._pymodule import PythonModule
from ..errors import PluginCallError, SandboxerError
from ..rpc.framing import DEFAULT_MAX_FRAME
from ..rpc.server import Handlers, Server, socket_from_env


def _python_handlers(args: argparse.Namespace) -> Handlers:
    methods = tuple(args.methods.split(",")) if args.methods else None
    module = PythonModule(
        Path(args.entrypoint),
        plugin_id=args.id,
        generation=1,
        root=Path(args.root),
        methods=methods,
    )
    lifecycle = {name: fn for name in LIFECYCLE_HOOKS if (fn := module.lifecycle(name)) is not None}
    return Handlers(
        methods=module.methods,
        lifecycle=lifecycle,
        check_args=module.check_args,
        error=module.error,
    )


def _native_handlers(args: argparse.Namespace) -> Handlers:
    from .native import NativeLibrary

    lib = NativeLibrary(args.entrypoint)
    names = tuple(args.methods.split(",")) if args.methods else (lib.methods or ())

    def method(name: str) -> Callable[..., Any]:
        return lambda *call_args: lib.call(name, list(call_args))

    def health_check() -> dict[str, Any]:
        ok, message = lib.health()
        return {"ok": ok, "message": message}

    lifecycle: dict[str, Callable[..., Any]] = {
        INIT: lib.init,
        HEALTH_CHECK: health_check,
        SHUTDOWN: lib.shutdown,
    }
    if lib.has_state:
        lifecycle[EXPORT_STATE] = lambda: lib.call(EXPORT_STATE, [])
        lifecycle[IMPORT_STATE] = lambda state, version: lib.call(IMPORT_STATE, [state, version])
    # Without a list (no sandboxer_methods export, no manifest): every name goes to
    # sandboxer_call, and the library answers the names it does not know with its error.
    return Handlers(
        methods={n: method(n) for n in names if n not in STATE_HOOKS},
        lifecycle=lifecycle,
        error=_native_error(args.id),
        any_method=None if names else lambda name, *call_args: lib.call(name, list(call_args)),
    )


def _native_error(plugin_id: str) -> Callable[[BaseException, str], PluginCallError]:
    def convert(exc: BaseException, method: str) -> PluginCallError:
        if isinstance(exc, PluginCallError):
            return exc
        return PluginCallError(
            f"{method} failed: {type(exc).__name__}: {exc}",
            code=1,
            data={"type": type(exc).__name__, "message": str(exc)},
            plugin_id=plugin_id,
        )

    return convert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandboxer.host")
    parser.add_argument("--kind", choices=("python", "native"), required=True)
    parser.add_argument("--entrypoint", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--methods", default="")
    args = parser.parse_args(argv)
    try:
        sock, cookie = socket_from_env()
    except RuntimeError as exc:
        print(f"sandboxer.host: {exc}", file=sys.stderr)
        return 2
    try:
        handlers = _python_handlers(args) if args.kind == "python" else _native_handlers(args)
    except SandboxerError as exc:
        print(f"sandboxer.host: {exc}", file=sys.stderr)
        return 1
    max_frame = int(os.environ.get("SANDBOXER_MAX_FRAME", DEFAULT_MAX_FRAME))
    server = Server(
        handlers, sock, cookie=cookie, name=args.id, version=args.version, max_frame=max_frame
    )
    return server.run()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
