"""C for wasm32-wasi, compiled by the tests with Debian's clang and wasi-libc (the WASI
loader tests and the WASI escape probes)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

INSTALL_HINT = ("install clang lld wasi-libc libclang-rt-14-dev-wasm32 "
                "(scripts/bootstrap.sh installs them)")
CFLAGS = ["--target=wasm32-wasi", "-O2", "-Wall", "-Wextra", "-Werror", "-Wl,--strip-all"]


def need_toolchain(*extra: str) -> None:
    """Fail (never skip) when a tool is missing: CI must prove the WASI path."""
    for tool in ("clang", "wasm-ld", *extra):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; these tests compile C for wasm32-wasi: "
                        f"{INSTALL_HINT}", pytrace=False)


def compile_wasi(out_dir: Path, name: str, source: str, *, reactor: bool = False) -> Path:
    """``source`` built as ``out_dir/name.wasm``: a command, or a reactor (no ``_start``)."""
    need_toolchain()
    src, out = out_dir / f"{name}.c", out_dir / f"{name}.wasm"
    src.write_text(source)
    flags = CFLAGS + (["-mexec-model=reactor"] if reactor else [])
    run = subprocess.run(["clang", *flags, "-o", str(out), str(src)], capture_output=True,
                         text=True, timeout=300)
    if run.returncode != 0:
        pytest.fail(f"clang could not build {name} for wasm32-wasi ({INSTALL_HINT}):\n"
                    f"{run.stdout}{run.stderr}", pytrace=False)
    return out
