"""What marks a file as WebAssembly: a leaf, so that ``sandboxer exec`` can tell a wasm
program from a native one without importing wasmtime or the manifest parser."""

from __future__ import annotations

__all__ = ["WASM_MAGIC", "is_wasm"]

WASM_MAGIC = b"\0asm"


def is_wasm(path: str) -> bool:
    """Whether the file at ``path`` starts with WebAssembly's magic (unreadable: False)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == WASM_MAGIC
    except OSError:
        return False
