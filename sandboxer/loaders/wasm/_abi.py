"""The WASM ABI (DESIGN section 4): what a module may import, what sandboxer calls it as, and
``Layout``, the frozen description of one module's imports and exports, checked at load.

It reads the module's description only and never runs it. Every refusal is a PluginLoadError
that names the import or export and says what sandboxer expects instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import wasmtime

from ..._hooks import EXPORT_STATE, IMPORT_STATE, LIFECYCLE_HOOKS, STATE_HOOKS
from ...errors import PluginLoadError
from ...manifest import Plugin

__all__ = [
    "LIFECYCLE",
    "I32",
    "I64",
    "F32",
    "F64",
    "KINDS",
    "FIELDS",
    "RANGES",
    "HOST_FUNCTIONS",
    "WASI_MODULE",
    "PROGRAM_METHOD",
    "JSON_SIGNATURE",
    "Signature",
    "signature",
    "show",
    "Method",
    "Layout",
]

LIFECYCLE = LIFECYCLE_HOOKS
# Exports that are never methods.
_SPECIAL = {"sandboxer_alloc", "sandboxer_free", "_start", "_initialize", *LIFECYCLE}

I32, I64, F32, F64 = 0, 1, 2, 3  # wasmtime_valkind_t
KINDS = {"i32": I32, "i64": I64, "f32": F32, "f64": F64}
FIELDS = {I32: "i32", I64: "i64", F32: "f32", F64: "f64"}  # the wasmtime_val_t union's
RANGES = {I32: (-(1 << 31), 1 << 32), I64: (-(1 << 63), 1 << 64)}  # what a caller may pass

Signature = tuple[tuple[str, ...], tuple[str, ...]]  # (params, results), as wasmtime names them

# What the ``sandboxer`` import module provides, with each function's signature.
HOST_FUNCTIONS: dict[str, Signature] = {
    "log": (("i32", "i32", "i32"), ()),
    "config_get": (("i32", "i32", "i32", "i32"), ("i32",)),
    "http_request": (("i32", "i32"), ("i32",)),
    "http_response": (("i32", "i32"), ("i32",)),
}
WASI_MODULE = "wasi_snapshot_preview1"
PROGRAM_METHOD = "run"  # a command-mode plugin's one method: run(args...) runs the program
JSON_SIGNATURE: Signature = (("i32", "i32"), ("i64",))


def signature(ty: wasmtime.FuncType) -> Signature:
    return tuple(str(t) for t in ty.params), tuple(str(t) for t in ty.results)


def show(sig: Signature) -> str:
    params, results = sig
    return f"({', '.join(params)}) -> ({', '.join(results)})"


@dataclasses.dataclass(frozen=True, slots=True)
class Method:
    """One method: a JSON ABI export, or a numeric one with its value kinds."""

    name: str
    json: bool
    params: tuple[int, ...] = ()
    results: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Layout:
    """What a module offers, checked against what sandboxer provides (``Layout.of``)."""

    uses_wasi: bool
    # Imports WASI's poll_oneoff, which can sleep, or http_request, which waits on the
    # network: either would hold the event loop, so no call of it may start there.
    blocks: bool
    command: bool  # a WASI command (_start): one fresh instance per call
    initialize: bool  # exports _initialize (a WASI reactor's constructor)
    alloc: bool  # exports sandboxer_alloc
    free: bool  # exports sandboxer_free
    lifecycle: frozenset[str]
    methods: Mapping[str, Method]

    @property
    def has_state(self) -> bool:
        return self.lifecycle >= STATE_HOOKS

    @classmethod
    def of(cls, plugin: Plugin, module: wasmtime.Module) -> Layout:
        """Check ``module``'s imports and exports; raises PluginLoadError naming the first
        that sandboxer cannot provide or call."""
        pid = plugin.id

        def refuse(message: str) -> PluginLoadError:
            return PluginLoadError(f"plugin {pid}: {message}", plugin_id=pid)

        uses_wasi = blocks = False
        for imp in module.imports:
            where = f"{imp.module}.{imp.name}"
            if imp.module == WASI_MODULE and isinstance(imp.type, wasmtime.FuncType):
                uses_wasi = True
                blocks = blocks or imp.name == "poll_oneoff"
                continue
            if imp.module == "sandboxer" and imp.name in HOST_FUNCTIONS:
                blocks = blocks or imp.name == "http_request"
                if not isinstance(imp.type, wasmtime.FuncType):
                    raise refuse(f"imports {where} as something other than a function")
                want = HOST_FUNCTIONS[imp.name]
                if signature(imp.type) != want:
                    raise refuse(
                        f"imports {where} with signature {show(signature(imp.type))}"
                        f"; sandboxer provides it as {show(want)}"
                    )
                continue
            provided = ", ".join(f"sandboxer.{n}" for n in HOST_FUNCTIONS)
            raise refuse(
                f"imports {where}, which sandboxer does not provide (a wasm plugin "
                f"may import {WASI_MODULE} functions and {provided})"
            )

        funcs: dict[str, Signature] = {}
        has_memory = False
        for exp in module.exports:
            if isinstance(exp.type, wasmtime.FuncType):
                funcs[exp.name] = signature(exp.type)
            elif exp.name == "memory" and isinstance(exp.type, wasmtime.MemoryType):
                has_memory = True

        def expect(name: str, sig: Signature) -> bool:
            if name not in funcs:
                return False
            if funcs[name] != sig:
                raise refuse(
                    f"export {name} has signature {show(funcs[name])}; sandboxer "
                    f"calls it as {show(sig)}"
                )
            return True

        command = expect("_start", ((), ()))
        initialize = expect("_initialize", ((), ()))
        alloc = expect("sandboxer_alloc", (("i32",), ("i32",)))
        free = expect("sandboxer_free", (("i32", "i32"), ()))
        json_abi = alloc and has_memory
        if alloc and not has_memory:
            raise refuse(
                'exports sandboxer_alloc but no memory named "memory"; the JSON ABI needs both'
            )
        lifecycle: set[str] = set()
        for name in LIFECYCLE:
            if name in funcs:
                if not json_abi:
                    raise refuse(
                        f"exports {name} but not the JSON ABI (memory and "
                        "sandboxer_alloc) that lifecycle calls use"
                    )
                expect(name, JSON_SIGNATURE)
                lifecycle.add(name)
        if (EXPORT_STATE in lifecycle) != (IMPORT_STATE in lifecycle):
            missing = IMPORT_STATE if EXPORT_STATE in lifecycle else EXPORT_STATE
            raise refuse(f"exports only one of export_state/import_state (add {missing})")

        def layout(methods: dict[str, Method]) -> Layout:
            return cls(
                uses_wasi=uses_wasi,
                blocks=blocks,
                command=command,
                initialize=initialize,
                alloc=alloc,
                free=free,
                lifecycle=frozenset(lifecycle),
                methods=methods,
            )

        if plugin.wasm_mode == "command":  # an unmodified WASI program: run as it is
            if not command:
                raise refuse(
                    '[wasm] mode = "command" needs a WASI command: the module exports no _start'
                )
            return layout({PROGRAM_METHOD: Method(PROGRAM_METHOD, json=True)})
        if command:
            return layout({name: Method(name, json=True) for name in plugin.methods or ()})
        usable: dict[str, Method] = {}
        unusable: dict[str, str] = {}
        for name, sig in funcs.items():
            if name in _SPECIAL:
                continue
            params, results = sig
            if json_abi and sig == JSON_SIGNATURE:
                usable[name] = Method(name, json=True)
            elif all(t in KINDS for t in params + results):
                usable[name] = Method(
                    name,
                    json=False,
                    params=tuple(KINDS[t] for t in params),
                    results=tuple(KINDS[t] for t in results),
                )
            else:
                unusable[name] = show(sig)
        if plugin.methods is not None:
            for name in plugin.methods:
                if name in unusable:
                    raise refuse(
                        f"method {name} has signature {unusable[name]}, which is "
                        "neither numeric nor the JSON ABI (i32, i32) -> (i64)"
                    )
                if name not in usable:
                    raise refuse(
                        f"the manifest lists method {name}, which the module does not export"
                    )
            usable = {n: m for n, m in usable.items() if n in plugin.methods}
        return layout(usable)
