"""Entry point of the plugin host; see ``sandboxer.host``."""

from __future__ import annotations

import argparse
import json
import os
import socket
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
from . import WARM


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


def _handed_over(sock: socket.socket) -> list[str] | None:
    """In a warm sandbox: the arguments, one JSON line on the RPC socket, which the
    supervisor sends once the plugin's files are in place (and before anything else: the
    handshake is ours to begin). None: the sandbox was discarded unused."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1 << 16)
        if not chunk:
            return None
        data += chunk
    args = json.loads(data)
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ValueError("the handed-over arguments are not a list of strings")
    return args


def main(argv: list[str] | None = None) -> int:
    # The parser first: in a warm sandbox it is made while waiting (making one costs ms).
    parser = argparse.ArgumentParser(prog="python -m sandboxer.host")
    parser.add_argument("--kind", choices=("python", "native"), required=True)
    parser.add_argument("--entrypoint", required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--methods", default="")
    argv = sys.argv[1:] if argv is None else argv
    warm = argv == [WARM]
    if warm:
        try:
            sock, _ = socket_from_env()
            handed = _handed_over(sock)
        except (RuntimeError, OSError, ValueError) as exc:
            print(f"sandboxer.host: {exc}", file=sys.stderr)
            return 2
        sock.detach()  # the same fd is the server's socket below
        if handed is None:
            return 0
        argv = handed
    args = parser.parse_args(argv)
    if warm:  # the plugin's copy was mounted over the directory this process started in
        os.chdir(args.root)
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
