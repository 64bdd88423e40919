"""Entry point of the plugin host; see ``sandboxer.host``."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable

from .. import _json
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

# typing only for the type checker: the plugin host starts without it (docs/architecture.md)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

_USAGE = (
    "usage: python -m sandboxer.host --kind {python,native} --entrypoint PATH --root DIR "
    "--id ID --version VERSION [--methods NAME,...]"
)
_REQUIRED = ("kind", "entrypoint", "root", "id", "version")
_OPTIONS = (*_REQUIRED, "methods")
_KINDS = ("python", "native")


class _UsageError(Exception):
    pass


def _parse_args(argv: list[str]) -> dict[str, str]:
    """The options ``loaders.plugin_host`` passes, each ``--name VALUE``, by name. Not
    argparse: the supervisor writes this argv, not a person, and argparse (with gettext) would
    add its import to every plugin's start."""
    values: dict[str, str] = {}
    words = iter(argv)
    for word in words:
        name = word[2:] if word.startswith("--") else ""
        if name not in _OPTIONS:
            raise _UsageError(f"unrecognized argument: {word}")
        value = next(words, None)
        if value is None:
            raise _UsageError(f"argument {word}: expected one argument")
        values[name] = value
    missing = [f"--{name}" for name in _REQUIRED if name not in values]
    if missing:
        raise _UsageError(f"the following arguments are required: {', '.join(missing)}")
    if values["kind"] not in _KINDS:
        raise _UsageError(
            f"argument --kind: invalid choice: {values['kind']!r} (choose from 'python', 'native')"
        )
    return values


def _python_handlers(
    entrypoint: str, root: str, plugin_id: str, methods: tuple[str, ...] | None
) -> Handlers:
    module = PythonModule(
        entrypoint,
        plugin_id=plugin_id,
        generation=1,
        root=root,
        methods=methods,
    )
    lifecycle = {name: fn for name in LIFECYCLE_HOOKS if (fn := module.lifecycle(name)) is not None}
    return Handlers(
        methods=module.methods,
        lifecycle=lifecycle,
        check_args=module.check_args,
        error=module.error,
    )


def _native_handlers(entrypoint: str, plugin_id: str, methods: tuple[str, ...] | None) -> Handlers:
    from .native import NativeLibrary

    lib = NativeLibrary(entrypoint)
    names = methods if methods is not None else (lib.methods or ())

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
        error=_native_error(plugin_id),
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
    args = _json.loads(data)
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ValueError("the handed-over arguments are not a list of strings")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        print(_USAGE)
        return 0
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
    try:
        args = _parse_args(argv)
    except _UsageError as exc:
        print(f"{_USAGE}\npython -m sandboxer.host: error: {exc}", file=sys.stderr)
        return 2
    if warm:  # the plugin's copy was mounted over the directory this process started in
        os.chdir(args["root"])
    try:
        sock, cookie = socket_from_env()
    except RuntimeError as exc:
        print(f"sandboxer.host: {exc}", file=sys.stderr)
        return 2
    plugin_id = args["id"]
    methods = tuple(args["methods"].split(",")) if args.get("methods") else None
    try:
        handlers = (
            _python_handlers(args["entrypoint"], args["root"], plugin_id, methods)
            if args["kind"] == "python"
            else _native_handlers(args["entrypoint"], plugin_id, methods)
        )
    except SandboxerError as exc:
        print(f"sandboxer.host: {exc}", file=sys.stderr)
        return 1
    max_frame = int(os.environ.get("SANDBOXER_MAX_FRAME", DEFAULT_MAX_FRAME))
    server = Server(
        handlers, sock, cookie=cookie, name=plugin_id, version=args["version"], max_frame=max_frame
    )
    return server.run()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
