"""Bare files, the first thing a stranger tries: a ``.py``, a ``.so`` and a ``.wasm`` with no
manifest load sandboxed with the default profile (DESIGN section 5), through the CLI and the
API. Written from the README alone: the .so implements only the C ABI's ``sandboxer_call`` and
``sandboxer_free`` (no ``sandboxer_methods``, no manifest listing them), so every name reaches
``sandboxer_call`` and the library answers the names it does not know.

(Hot reload of a bare .py file: tests/reload/test_load.py, kind python-bare.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import wasmtime

from sandboxer import MethodNotFound, PluginManager

pytestmark = pytest.mark.usefixtures("no_leaks")

PY = "def add(a, b):\n    return a + b\n"

C = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int sandboxer_call(const char *method, const uint8_t *args, size_t args_len,
                   uint8_t **out, size_t *out_len) {
    char *reply = malloc(256);
    int rc = 0;
    if (strcmp(method, "greet") == 0) {
        /* args is a JSON array of one string: ["NAME"] */
        int n = (int)args_len > 4 ? (int)args_len - 4 : 0;
        snprintf(reply, 256, "\"Hello, %.*s!\"", n, (const char *)args + 2);
    } else {
        snprintf(reply, 256, "{\"code\":-32601,\"message\":\"no method %s\"}", method);
        rc = 1;
    }
    *out = (uint8_t *)reply;
    *out_len = strlen(reply);
    return rc;
}

void sandboxer_free(uint8_t *ptr, size_t len) { (void)len; free(ptr); }
"""

WAT = """(module (func (export "add") (param i32 i32) (result i32)
           local.get 0 local.get 1 i32.add))"""


@pytest.fixture
def bare(tmp_path: Path) -> dict[str, Path]:
    files = {"py": tmp_path / "adder.py", "so": tmp_path / "libgreeter.so",
             "wasm": tmp_path / "summer.wasm"}
    files["py"].write_text(PY)
    (tmp_path / "greeter.c").write_text(C)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o",
                    str(files["so"]), str(tmp_path / "greeter.c")], check=True, timeout=120)
    files["wasm"].write_bytes(wasmtime.wat2wasm(WAT))
    return files


CASES = [("py", "add", ["2", "3"], "5"), ("so", "greet", ["world"], "Hello, world!"),
         ("wasm", "add", ["2", "3"], "5")]


@pytest.mark.parametrize(("kind", "method", "args", "printed"), CASES,
                         ids=[c[0] for c in CASES])
def test_a_bare_file_runs_through_the_cli(bare: dict[str, Path], kind: str, method: str,
                                          args: list[str], printed: str) -> None:
    ran = subprocess.run([sys.executable, "-m", "sandboxer.cli", "call", str(bare[kind]),
                          method, *args], capture_output=True, text=True, timeout=120)
    assert (ran.returncode, ran.stdout.strip()) == (0, printed), ran.stderr


@pytest.mark.asyncio
async def test_bare_files_load_sandboxed_through_the_api(bare: dict[str, Path]) -> None:
    async with PluginManager() as mgr:
        py = await mgr.load(bare["py"])
        so = await mgr.load(bare["so"])
        wasm = await mgr.load(bare["wasm"])
        for loaded in (py, so, wasm):
            assert loaded.sandbox is not None and loaded.sandbox.enabled
            assert loaded.sandbox.profile == "default" and loaded.version == "0.0.0"
        assert (py.id, so.id, wasm.id) == ("adder", "libgreeter", "summer")
        assert await py.call("add", 2, 3) == 5
        assert await so.call("greet", "you") == "Hello, you!"
        assert await wasm.call("add", 2, 3) == 5
        with pytest.raises(MethodNotFound, match="no method sing"):
            await so.call("sing")
