"""The native plugin kind: a ctypes adapter over a shared library speaking sandboxer's C ABI.

A native plugin is a shared object (C, Rust cdylib, Go ``-buildmode=c-shared`` ...) exporting

.. code-block:: c

    int  sandboxer_call(const char *method, const uint8_t *args, size_t args_len,
                        uint8_t **out, size_t *out_len);
    void sandboxer_free(uint8_t *ptr, size_t len);
    int  sandboxer_init(const uint8_t *config, size_t len);   /* optional */
    int  sandboxer_health(void);                               /* optional */
    int  sandboxer_shutdown(void);                             /* optional */
    const char *sandboxer_methods(void);                       /* optional */

Every string is UTF-8 JSON: ``args`` is the array of positional arguments, ``out`` the result
(status 0) or an error object ``{"code": int, "message": str, "data"?: any}`` (any other
status), allocated by the library and handed back to ``sandboxer_free`` exactly once.
``sandboxer_methods`` returns a static, NUL-terminated JSON array of method names; the names
``export_state`` (args ``[]``) and ``import_state`` (args ``[state, from_version]``) in it are
the hot-reload state hooks, called through ``sandboxer_call`` but never offered as methods.

This module runs inside the sandboxed plugin host process. It must never be used in the
supervisor's own process unless the plugin is trusted (sandbox disabled by the operator and
allowed by the host policy): a native library is arbitrary machine code, and a crash in it,
or a library that scribbles over memory, takes the whole process with it.

Everything the library hands back is untrusted: lengths are capped, a NULL buffer with a
length, invalid JSON or a malformed error object become ``PluginCallError`` (-32603) naming
the fault, and ``out`` is always returned to ``sandboxer_free``.

Threads: the ABI does not require the library to be thread-safe, so every foreign call goes
through one lock per library. Concurrency for native plugins comes from running several plugin
host processes, not several threads in one library. ctypes releases the GIL for the duration
of each foreign call (``CDLL``, never ``PyDLL``), so a slow call does not stall the host's
other threads, e.g. the one reading the wire.

The library is never ``dlclose``d: a Go c-shared library cannot be unloaded at all, and the
host process is discarded with its plugin anyway.
"""

from __future__ import annotations

import ctypes
import os
import threading

from .. import _json
from .._hooks import EXPORT_STATE, IMPORT_STATE, METHOD_RE, STATE_HOOKS
from ..errors import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    MethodNotFound,
    PluginCallError,
    PluginLoadError,
    PluginStateError,
)

# typing only for the type checker: the plugin host starts without it (docs/architecture.md)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["NativeLibrary", "MAX_OUT_BYTES", "STATE_HOOKS"]

# The largest result or error a library may hand back. A length above it is a bug (or a
# negative ssize_t written into a size_t) and is refused before anything is read.
MAX_OUT_BYTES = 64 << 20


_SIZE_MAX = 2 ** (8 * ctypes.sizeof(ctypes.c_size_t)) - 1


class NativeLibrary:
    """One dlopened native plugin library.

    Construction checks the required symbols and reads ``sandboxer_methods`` once (it is
    static by contract), so a malformed library fails at load with ``PluginLoadError``, not
    at its first call.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._shut_down = False
        try:
            # RTLD_NOW: an unresolved symbol fails here, not at some later call.
            # RTLD_LOCAL: the library's symbols do not leak into later loads.
            self._lib = ctypes.CDLL(self.path, mode=os.RTLD_NOW | os.RTLD_LOCAL)
        except OSError as exc:
            raise PluginLoadError(
                f"native library {self.path}: dlopen failed: {exc}; check that it is a shared "
                f"object for this architecture and that its dependencies are installed"
            ) from exc

        self._call = self._symbol("sandboxer_call", required=True)
        self._call.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ctypes.c_size_t),
        ]
        self._call.restype = ctypes.c_int

        self._free = self._symbol("sandboxer_free", required=True)
        self._free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._free.restype = None

        self._init = self._symbol("sandboxer_init")
        if self._init is not None:
            self._init.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
            self._init.restype = ctypes.c_int

        self._health = self._symbol("sandboxer_health")
        if self._health is not None:
            self._health.argtypes = []
            self._health.restype = ctypes.c_int

        self._shutdown = self._symbol("sandboxer_shutdown")
        if self._shutdown is not None:
            self._shutdown.argtypes = []
            self._shutdown.restype = ctypes.c_int

        self._listed = self._read_methods()

    def __repr__(self) -> str:
        return f"<NativeLibrary {self.path!r}>"

    def _symbol(self, name: str, *, required: bool = False) -> Any:
        try:
            return getattr(self._lib, name)
        except AttributeError:
            if required:
                raise PluginLoadError(
                    f"native library {self.path}: required symbol {name} is not exported; "
                    f"a native plugin must export sandboxer_call and sandboxer_free with C "
                    f'linkage (extern "C", //export, #[no_mangle])'
                ) from None
            return None

    def _read_methods(self) -> tuple[str, ...] | None:
        fn = self._symbol("sandboxer_methods")
        if fn is None:
            return None
        fn.argtypes = []
        fn.restype = ctypes.c_void_p  # not c_char_p: NULL must stay distinguishable
        with self._lock:
            ptr = fn()
        if not ptr:
            raise PluginLoadError(
                f"native library {self.path}: sandboxer_methods returned NULL; it must return "
                f"a JSON array of method names (or not be exported at all)"
            )
        raw = ctypes.string_at(ptr)
        try:
            names = _json.loads(raw)
        except _json.JSONError as exc:
            raise PluginLoadError(
                f"native library {self.path}: sandboxer_methods did not return valid JSON "
                f"({exc}); expected a JSON array of method names"
            ) from exc
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise PluginLoadError(
                f"native library {self.path}: sandboxer_methods must return a JSON array of "
                f"strings, got {raw[:200]!r}"
            )
        for name in names:
            if not METHOD_RE.fullmatch(name):
                raise PluginLoadError(
                    f"native library {self.path}: sandboxer_methods lists {name!r}, which is "
                    f"not a method name (letters, digits and _, not starting with a digit)"
                )
        if len(set(names)) != len(names):
            raise PluginLoadError(
                f"native library {self.path}: sandboxer_methods lists a name twice: {names}"
            )
        return tuple(names)

    @property
    def methods(self) -> tuple[str, ...] | None:
        """The callable methods the library lists, or None when it exports no list.

        The reserved state hooks (``export_state``, ``import_state``) are not included.
        """
        if self._listed is None:
            return None
        return tuple(n for n in self._listed if n not in STATE_HOOKS)

    @property
    def has_state(self) -> bool:
        """True when the library lists both state hooks, so hot reload migrates its state."""
        return self._listed is not None and set(self._listed) >= STATE_HOOKS

    def _check_open(self, what: str) -> None:
        if self._shut_down:
            raise PluginStateError(
                f"native library {self.path}: {what} after sandboxer_shutdown; the library "
                f"may have released what it needs, load a new generation instead"
            )

    def call(self, method: str, args: list[Any]) -> Any:
        """Call ``method`` with positional ``args``; returns the decoded JSON result.

        Raises ``PluginCallError`` with the library's code, message and data when it reports
        an error (``MethodNotFound`` for code -32601), and ``PluginCallError`` (-32603) when
        what it returns is not well-formed. No allow-list is applied here: the state hooks
        go through this same entry point, and keeping callers away from them (and from names
        the manifest does not list) is the dispatcher's job.
        """
        return self._invoke(method, args)

    def export_state(self) -> Any:
        """The library's state as a JSON value (its ``export_state`` hook)."""
        self._require_state(EXPORT_STATE)
        return self._invoke(EXPORT_STATE, [])

    def import_state(self, state: Any, from_version: str) -> None:
        """Hand a previous generation's state to the library (its ``import_state`` hook)."""
        self._require_state(IMPORT_STATE)
        self._invoke(IMPORT_STATE, [state, from_version])

    def _require_state(self, hook: str) -> None:
        if not self.has_state:
            raise MethodNotFound(
                f"native library {self.path}: no state hooks; {hook} needs both export_state "
                f"and import_state listed in sandboxer_methods",
                method=hook,
                available=self._available(),
            )

    def _available(self) -> list[str] | None:
        methods = self.methods
        return list(methods) if methods is not None else None

    def _invoke(self, method: str, args: list[Any]) -> Any:
        if not isinstance(args, list):
            raise TypeError(
                f"args must be a list of positional arguments, not {type(args).__name__}"
            )
        name = method.encode("utf-8")
        if b"\0" in name:
            raise MethodNotFound(
                f"native library {self.path}: method name {method!r} contains NUL",
                method=method,
                available=self._available(),
            )
        try:
            payload = _json.dumps(args)
        except TypeError as exc:
            raise PluginCallError(
                f"{method}: arguments are not JSON values: {exc}",
                code=INVALID_PARAMS,
                method=method,
            ) from exc

        out = ctypes.c_void_p()
        out_len = ctypes.c_size_t(0)
        with self._lock:
            self._check_open(f"call to {method}")
            status = self._call(
                name, payload, len(payload), ctypes.byref(out), ctypes.byref(out_len)
            )
            try:
                data = self._read_out(method, out.value, out_len.value)
            finally:
                if out.value:
                    self._free(out.value, out_len.value)

        if status == 0:
            if data is None:
                return None
            try:
                return _json.loads(data)
            except _json.JSONError as exc:
                raise PluginCallError(
                    f"native library {self.path}: {method} returned invalid JSON as its "
                    f"result ({exc})",
                    code=INTERNAL_ERROR,
                    method=method,
                ) from exc
        raise self._error(method, status, data)

    def _read_out(self, method: str, ptr: int | None, length: int) -> bytes | None:
        """Copy ``out`` before it is freed; None when the library returned no buffer."""
        if length > MAX_OUT_BYTES:
            signed = length - (_SIZE_MAX + 1) if length > _SIZE_MAX // 2 else length
            what = (
                f"a negative length ({signed})"
                if signed < 0
                else f"{length} bytes, over the {MAX_OUT_BYTES >> 20} MiB limit"
            )
            raise PluginCallError(
                f"native library {self.path}: {method} returned {what} in out_len",
                code=INTERNAL_ERROR,
                method=method,
            )
        if not ptr:
            if length:
                raise PluginCallError(
                    f"native library {self.path}: {method} returned a NULL out buffer with "
                    f"out_len {length}",
                    code=INTERNAL_ERROR,
                    method=method,
                )
            return None
        return ctypes.string_at(ptr, length)

    def _error(self, method: str, status: int, data: bytes | None) -> PluginCallError:
        """The exception for a non-zero status, from the library's error JSON."""
        if data is None:
            return PluginCallError(
                f"native library {self.path}: {method} failed with status {status} and no "
                f"error object",
                code=INTERNAL_ERROR,
                method=method,
                data={"status": status},
            )
        try:
            error = _json.loads(data)
        except _json.JSONError as exc:
            return PluginCallError(
                f"native library {self.path}: {method} failed with status {status} and its "
                f"error is not valid JSON ({exc})",
                code=INTERNAL_ERROR,
                method=method,
                data={"status": status},
            )
        if (
            not isinstance(error, dict)
            or type(error.get("code")) is not int
            or not isinstance(error.get("message"), str)
        ):
            return PluginCallError(
                f"native library {self.path}: {method} failed with status {status} and an "
                f'error that is not {{"code": int, "message": str}}: {data[:200]!r}',
                code=INTERNAL_ERROR,
                method=method,
                data={"status": status},
            )
        code: int = error["code"]
        message: str = error["message"]
        if code == MethodNotFound.CODE:
            missing = MethodNotFound(message, method=method, available=self._available())
            if error.get("data") is not None:
                missing.data = error["data"]  # the library's own details win over ours
            return missing
        return PluginCallError(message, code=code, data=error.get("data"), method=method)

    def init(self, config: dict[str, Any]) -> None:
        """Pass the plugin's config (a JSON object) to ``sandboxer_init``, if exported."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict (a JSON object), not {type(config).__name__}")
        if self._init is None:
            return
        payload = _json.dumps(config)
        with self._lock:
            self._check_open("init")
            status = self._init(payload, len(payload))
        if status != 0:
            raise PluginCallError(
                f"native library {self.path}: sandboxer_init returned status {status}",
                code=1,
                method="init",
                data={"status": status},
            )

    def health(self) -> tuple[bool, str]:
        """``(healthy, message)`` from ``sandboxer_health``; healthy when not exported."""
        if self._health is None:
            return True, ""
        with self._lock:
            self._check_open("health check")
            status = self._health()
        if status != 0:
            return False, f"sandboxer_health returned status {status}"
        return True, ""

    def shutdown(self) -> None:
        """Call ``sandboxer_shutdown`` once; later calls into the library are refused.

        Idempotent: a second shutdown does nothing.
        """
        with self._lock:
            if self._shut_down:
                return
            self._shut_down = True
            if self._shutdown is None:
                return
            status = self._shutdown()
        if status != 0:
            raise PluginCallError(
                f"native library {self.path}: sandboxer_shutdown returned status {status}",
                code=1,
                method="shutdown",
                data={"status": status},
            )
