"""The ``sandboxer`` import module: the host functions a wasm plugin may call (log,
config_get, http_request, http_response), and ``GuestMemory``, the one way a host function
reads or writes the calling plugin's memory.

Everything a guest passes is untrusted. Pointers and lengths arrive as unsigned 32-bit ints
(_wasmtime's trampoline) and every range is checked against the memory's size before a byte
moves; a range outside it traps the call (HostTrap) with a message naming the function. Never
``assert`` here, and never raise anything but HostTrap on purpose: the trampoline turns any
other exception into a trap that reports a bug in sandboxer. Host functions run on whichever
thread is inside the store.
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

import orjson
import wasmtime

from ... import _json
from ...sandbox.egress import AllowList, EgressProxy, network_mode
from ...sandbox.policy import SandboxConfig
from . import _wasmtime as _wt
from ._abi import HOST_FUNCTIONS
from ._instance import current_store

__all__ = ["GuestMemory", "HostFunctions", "define_host_functions"]

LOG_MESSAGE_MAX = 64 << 10
LOG_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}
# The request JSON http_request reads: the body (max_frame bytes, base64 inflating it by a
# third) plus room for the URL and headers.
HTTP_REQUEST_OVERHEAD = 64 << 10


class GuestMemory:
    """The calling module's exported ``memory``, for the length of one host call.

    A range ``[ptr, ptr + length)`` is used only when it lies wholly inside the memory; a
    module without a memory named "memory" holds no range at all. ``read``, ``write`` and
    ``check`` trap the call otherwise, naming ``what`` was out of bounds; ``holds`` only asks.
    The size is read once: the memory cannot grow while a host function runs."""

    __slots__ = ("_caller", "_memory", "size")

    def __init__(self, caller: wasmtime.Caller) -> None:
        memory = caller.get("memory")
        self._caller = caller
        self._memory = memory if isinstance(memory, wasmtime.Memory) else None
        self.size = self._memory.data_len(caller) if self._memory is not None else 0

    def holds(self, ptr: int, length: int) -> bool:
        return self._memory is not None and ptr >= 0 and length >= 0 and ptr + length <= self.size

    def check(self, ptr: int, length: int, what: str) -> None:
        """Trap the call unless ``[ptr, ptr + length)`` lies inside the memory."""
        self._checked(ptr, length, what)

    def _checked(self, ptr: int, length: int, what: str) -> wasmtime.Memory:
        if self._memory is None or not self.holds(ptr, length):
            raise _wt.HostTrap(f"{what} lies outside the plugin's memory")
        return self._memory

    def read(self, ptr: int, length: int, what: str) -> bytes:
        """The bytes at ``[ptr, ptr + length)``."""
        return bytes(self._checked(ptr, length, what).read(self._caller, ptr, ptr + length))

    def write(self, ptr: int, data: bytes, what: str) -> None:
        """Copy ``data`` to ``ptr``."""
        memory = self._checked(ptr, len(data), what)
        if data:
            memory.write(self._caller, data, ptr)


class HostFunctions:
    """The ``sandboxer`` import module's functions for one generation of one plugin."""

    def __init__(
        self,
        plugin_id: str,
        sandbox: SandboxConfig,
        *,
        config: dict[str, Any],
        log: logging.Logger,
        egress: EgressProxy,
    ) -> None:
        self.plugin_id = plugin_id
        self._log = log
        self._config = config
        self._config_json: dict[str, bytes] = {}
        # http_request: the egress proxy's rules for this plugin (None: no network at all).
        self._egress = egress
        mode = network_mode(sandbox)
        self._allow: AllowList | None = (
            None
            if mode == "none"
            else AllowList(sandbox.allowed_hosts)
            if mode == "proxy"
            else AllowList.everything()
        )
        if self._allow is not None:
            egress.counters(plugin_id)  # zeros from the start, like a proxied process

    def configure(self, config: dict[str, Any]) -> None:
        """The config that config_get answers from, from now on (``init(config)``)."""
        self._config = config
        self._config_json = {}

    def log(self, caller: wasmtime.Caller, level: int, ptr: int, length: int) -> None:
        data = GuestMemory(caller).read(
            ptr, min(length, LOG_MESSAGE_MAX), "sandboxer.log: the message"
        )
        self._log.log(LOG_LEVELS.get(level, logging.INFO), "%s", data.decode("utf-8", "replace"))

    def config_get(
        self, caller: wasmtime.Caller, key_ptr: int, key_len: int, buf_ptr: int, buf_cap: int
    ) -> int:
        """Copy config[key] as JSON into (buf_ptr, buf_cap); -1 if absent; the length needed
        (and nothing written) if the buffer is too small."""
        memory = GuestMemory(caller)
        key = memory.read(key_ptr, key_len, "sandboxer.config_get: the key").decode(
            "utf-8", "replace"
        )
        if key not in self._config:
            return -1
        value = self._config_json.get(key)
        if value is None:
            value = self._config_json[key] = _json.dumps(self._config[key])
        if len(value) > buf_cap:
            return len(value)
        memory.write(buf_ptr, value, "sandboxer.config_get: the buffer")
        return len(value)

    def http_request(self, caller: wasmtime.Caller, ptr: int, length: int) -> int:
        """Perform the request whose JSON lies at (ptr, length) through the egress proxy's
        rules; keep the response JSON for http_response and return its length. Blocking:
        modules importing it never run on the event loop (``Layout.blocks``)."""
        store = current_store()
        if store is None:  # every call of a blocking module runs under ``running``
            raise _wt.HostTrap("sandboxer.http_request: called outside a sandboxer call")
        memory = GuestMemory(caller)
        what = "sandboxer.http_request: the request"
        memory.check(ptr, length, what)  # before the size limit, as ever
        limit = self._egress.max_response * 4 // 3 + HTTP_REQUEST_OVERHEAD
        reply: dict[str, Any]
        if length > limit:
            reply = {
                "error": {
                    "kind": "invalid",
                    "message": f"the request is {length} bytes "
                    f"of JSON, more than the {limit}-byte limit",
                }
            }
        else:
            try:
                request = orjson.loads(memory.read(ptr, length, what))
            except orjson.JSONDecodeError as exc:
                reply = {
                    "error": {"kind": "invalid", "message": f"the request is not UTF-8 JSON: {exc}"}
                }
            else:
                reply = self._egress.fetch(
                    self.plugin_id, self._allow, request, deadline=lambda: store.deadline
                )
        if time.monotonic() >= store.deadline:
            # Timed out, cancelled or unloaded while waiting: end the call as poll_oneoff does.
            store.timed_out = True
            raise _wt.HostTrap("sandboxer: the call's deadline passed (in http_request)")
        store.http_reply = orjson.dumps(reply)
        return len(store.http_reply)

    def http_response(self, caller: wasmtime.Caller, ptr: int, cap: int) -> int:
        """Copy as much of the last http_request's response JSON as fits in (ptr, cap);
        return how many bytes were copied (0 before any request)."""
        store = current_store()
        data = store.http_reply if store is not None else b""
        n = min(len(data), cap)
        GuestMemory(caller).write(ptr, data[:n], "sandboxer.http_response: the buffer")
        return n


def define_host_functions(linker: wasmtime.Linker, host: HostFunctions) -> None:
    """Define the ``sandboxer`` import module in ``linker``, answered by ``host``.

    The functions reach ``host`` through a weak reference: wasmtime-py keeps them in a global
    table while the linker lives, and a strong one would keep every unloaded generation's
    config and log alive. Once ``host`` is gone they do nothing (log), answer absent
    (config_get: -1) or empty (http_response: 0), or trap (http_request)."""
    ref = weakref.ref(host)

    def log(caller: wasmtime.Caller, level: int, ptr: int, length: int) -> None:
        me = ref()
        if me is not None:
            me.log(caller, level, ptr, length)

    def config_get(
        caller: wasmtime.Caller, key_ptr: int, key_len: int, buf_ptr: int, buf_cap: int
    ) -> int:
        me = ref()
        return -1 if me is None else me.config_get(caller, key_ptr, key_len, buf_ptr, buf_cap)

    def http_request(caller: wasmtime.Caller, ptr: int, length: int) -> int:
        me = ref()
        if me is None:
            raise _wt.HostTrap("sandboxer.http_request: the plugin is unloaded")
        return me.http_request(caller, ptr, length)

    def http_response(caller: wasmtime.Caller, ptr: int, cap: int) -> int:
        me = ref()
        return 0 if me is None else me.http_response(caller, ptr, cap)

    for name, fn in (
        ("log", log),
        ("config_get", config_get),
        ("http_request", http_request),
        ("http_response", http_response),
    ):
        params, results = HOST_FUNCTIONS[name]
        _wt.define_host_function(linker, "sandboxer", name, len(params), len(results), fn)
