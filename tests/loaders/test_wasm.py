"""WebAssembly plugins (sandboxer/loaders/wasm.py) run in the supervisor under wasmtime's limits.

Every module is written inline in the WebAssembly text format and compiled with
``wasmtime.wat2wasm`` into tmp_path, then loaded through a real PluginManager. The hostile
modules each break exactly one thing: bytes that are not wasm, imports sandboxer does not
provide, exports of the wrong shape, JSON ABI replies that lie, traps, runaway loops, memory
and fuel exhaustion. Each case checks the exact error a user sees and that the supervisor is
unharmed afterwards: the broken plugin's next call gets a fresh instance, and the same manager
still loads and calls a well-behaved plugin. WASI command modules are covered elsewhere.

Timing-sensitive cases (event loop responsiveness, the instance pool) spin for a number of
iterations calibrated on this machine, and compare orders or generous bounds, not speeds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import os
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import pytest
import wasmtime

from conftest import REPO, loop_gap
from sandboxer import (
    CallTimeout,
    CpuLimitExceeded,
    HostConfig,
    MemoryLimitExceeded,
    MethodNotFound,
    PluginCallError,
    PluginLoadError,
    PluginManager,
    PluginState,
    PluginStateError,
    SandboxConfig,
    SandboxerError,
    SandboxUnavailable,
)
from sandboxer.loaders.wasm import _instance as wasm_loader

pytestmark = pytest.mark.usefixtures("no_leaks")

KiB, MiB = 1 << 10, 1 << 20
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603


# -- WAT building blocks -------------------------------------------------------------------------

# Numeric exports: called with numbers, no memory involved.
NUMERIC = """
(module
  (global $g (mut i32) (i32.const 0))
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
  (func (export "add64") (param i64 i64) (result i64) (i64.add (local.get 0) (local.get 1)))
  (func (export "addf32") (param f32 f32) (result f32) (f32.add (local.get 0) (local.get 1)))
  (func (export "addf64") (param f64 f64) (result f64) (f64.add (local.get 0) (local.get 1)))
  (func (export "divmod") (param i32 i32) (result i32 i32)
    (i32.div_u (local.get 0) (local.get 1))
    (i32.rem_u (local.get 0) (local.get 1)))
  (func (export "mixed") (param i32 i64 f32 f64) (result f64 i64 i32)
    (f64.add (f64.promote_f32 (local.get 2)) (local.get 3))
    (i64.add (local.get 1) (i64.extend_i32_s (local.get 0)))
    (local.get 0))
  (func (export "set") (param i32) (global.set $g (local.get 0)))
  (func (export "get") (result i32) (global.get $g))
  (func (export "answer") (result i32) (i32.const 42))
  (func (export "ref") (param funcref)))
"""

# Work of a chosen length, and misbehaviour of every kind, as numeric exports.
WORKER_FUNCS = """
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
  ;; spin(n) = 0 + 1 + ... + (n - 1), taking time proportional to n
  (func (export "spin") (param $n i64) (result i64)
    (local $i i64) (local $s i64)
    (block $done
      (loop $next
        (br_if $done (i64.ge_u (local.get $i) (local.get $n)))
        (local.set $s (i64.add (local.get $s) (local.get $i)))
        (local.set $i (i64.add (local.get $i) (i64.const 1)))
        (br $next)))
    (local.get $s))
  ;; count(n) = n, after n loop iterations (a few fuel units each)
  (func (export "count") (param $n i32) (result i32)
    (local $i i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (local.get $i))
  (func (export "forever") (loop $l (br $l)))
  (func $down (export "recurse") (param i32) (result i32)
    (i32.add (call $down (i32.add (local.get 0) (i32.const 1))) (i32.const 1)))
  (func (export "crash") (result i32) unreachable)
  (func (export "divide") (param i32 i32) (result i32) (i32.div_s (local.get 0) (local.get 1)))
  (func (export "peek") (param i32) (result i32) (i32.load (local.get 0)))
  ;; grow the memory a page at a time until the limit refuses, then trap
  (func (export "hog") (result i32)
    (block $full
      (loop $more
        (br_if $full (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
        (br $more)))
    unreachable)
"""
WORKER = f'(module (memory (export "memory") 1) {WORKER_FUNCS})'

# The JSON ABI runtime every JSON module starts with. Memory layout: 0..1023 constant replies
# and scratch, 1024..2559 per-module constant replies (``replies``), 2560..4095 host function
# scratch, 4096.. the bump allocator's heap.
HEAP = 4096
BUMP_ALLOC = """
  (global $heap (mut i32) (i32.const 4096))
  ;; a bump allocator that grows the memory as needed; 0 when the memory cannot grow
  (func $alloc (export "sandboxer_alloc") (param $len i32) (result i32)
    (local $ptr i32) (local $end i32) (local $have i32)
    (local.set $ptr (global.get $heap))
    (local.set $end (i32.add (local.get $ptr) (local.get $len)))
    (local.set $have (i32.shl (memory.size) (i32.const 16)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq (memory.grow (i32.shr_u (i32.add (i32.sub (local.get $end) (local.get $have))
                                                     (i32.const 65535))
                                            (i32.const 16)))
                    (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap (local.get $end))
    (local.get $ptr))
"""
JSON_RUNTIME = r"""
  (data (i32.const 0) "{\"result\":")
  (data (i32.const 16) "{\"result\":null}")
  (data (i32.const 32) "{\"result\":true}")
  (data (i32.const 48) "{\"result\":false}")
  (func $pack (param $ptr i32) (param $len i32) (result i64)
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
            (i64.extend_i32_u (local.get $len))))
  (func $null (result i64) (call $pack (i32.const 16) (i32.const 15)))
  ;; the decimal digits of $v at $out; returns how many
  (func $itoa (param $v i32) (param $out i32) (result i32)
    (local $n i32) (local $t i32) (local $i i32)
    (local.set $t (local.get $v))
    (local.set $n (i32.const 1))
    (block $counted
      (loop $more
        (br_if $counted (i32.lt_u (local.get $t) (i32.const 10)))
        (local.set $t (i32.div_u (local.get $t) (i32.const 10)))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br $more)))
    (local.set $i (local.get $n))
    (local.set $t (local.get $v))
    (loop $digit
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (i32.store8 (i32.add (local.get $out) (local.get $i))
                  (i32.add (i32.const 48) (i32.rem_u (local.get $t) (i32.const 10))))
      (local.set $t (i32.div_u (local.get $t) (i32.const 10)))
      (br_if $digit (local.get $i)))
    (local.get $n))
  ;; {"result":<v>} built at 512
  (func $reply_int (param $v i32) (result i64)
    (local $n i32)
    (memory.copy (i32.const 512) (i32.const 0) (i32.const 10))
    (local.set $n (call $itoa (local.get $v) (i32.const 522)))
    (i32.store8 (i32.add (i32.const 522) (local.get $n)) (i32.const 125))
    (call $pack (i32.const 512) (i32.add (local.get $n) (i32.const 11))))
  ;; the unsigned integer whose digits start at $p
  (func $atoi (param $p i32) (result i32)
    (local $v i32) (local $c i32)
    (block $end
      (loop $digit
        (local.set $c (i32.sub (i32.load8_u (local.get $p)) (i32.const 48)))
        (br_if $end (i32.gt_u (local.get $c) (i32.const 9)))
        (local.set $v (i32.add (i32.mul (local.get $v) (i32.const 10)) (local.get $c)))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $digit)))
    (local.get $v))
"""
# echo(args...) -> the args array, copied into a fresh reply {"result":<args>}.
ECHO = """
  (func (export "echo") (param $p i32) (param $n i32) (result i64)
    (local $out i32)
    (local.set $out (call $alloc (i32.add (local.get $n) (i32.const 11))))
    (if (i32.eqz (local.get $out)) (then unreachable))
    (memory.copy (local.get $out) (i32.const 0) (i32.const 10))
    (memory.copy (i32.add (local.get $out) (i32.const 10)) (local.get $p) (local.get $n))
    (i32.store8 (i32.add (local.get $out) (i32.add (local.get $n) (i32.const 10)))
                (i32.const 125))
    (call $pack (local.get $out) (i32.add (local.get $n) (i32.const 11))))
"""
ADD = '(func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))'
LOG_IMPORT = '(import "sandboxer" "log" (func $log (param i32 i32 i32)))'
CONFIG_IMPORT = '(import "sandboxer" "config_get" (func $config_get (param i32 i32 i32 i32) ' \
                '(result i32)))'


def wat_bytes(data: bytes) -> str:
    """``data`` as a WAT string literal, every byte escaped (any bytes, valid UTF-8 or not)."""
    return '"' + "".join(f"\\{b:02x}" for b in data) + '"'


def replies(**methods: bytes) -> str:
    """JSON ABI methods that each return their constant reply bytes (laid out from 1024)."""
    at, out = 1024, []
    for name, data in methods.items():
        out.append(f"(data (i32.const {at}) {wat_bytes(data)})")
        out.append(f'(func (export "{name}") (param i32 i32) (result i64) '
                   f"(call $pack (i32.const {at}) (i32.const {len(data)})))")
        at += (len(data) + 16) & ~15
    assert at <= 2560, "constant replies overflow their region"
    return "\n".join(out)


def packed(name: str, ptr: int, length: int) -> str:
    """A JSON ABI method returning a raw (ptr << 32 | len), whatever lies there."""
    value = (ptr << 32 | length) - ((1 << 64) if ptr >= 1 << 31 else 0)
    return f'(func (export "{name}") (param i32 i32) (result i64) (i64.const {value}))'


def json_module(*body: str, imports: str = "", alloc: str = BUMP_ALLOC, pages: int = 1) -> str:
    """A JSON ABI module: ``imports``, a memory, the allocator and runtime, then ``body``."""
    return ("(module " + imports + f'(memory (export "memory") {pages}) {alloc} {JSON_RUNTIME} '
            + "\n".join(body) + ")")


# A counter on the JSON ABI: incr() -> the count so far.
INCR = r"""
  (global $count (mut i32) (i32.const 0))
  (func (export "incr") (param i32 i32) (result i64)
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (call $reply_int (global.get $count)))
"""


# A stateful JSON module: a counter, init counted and logged, state that a reload migrates.
STATEFUL = json_module(r"""
  (global $count (mut i32) (i32.const 0))
  (global $inits (mut i32) (i32.const 0))
  (global $init_len (mut i32) (i32.const 0))
  (data (i32.const 2560) "init ran")
  (func (export "init") (param $p i32) (param $n i32) (result i64)
    (global.set $inits (i32.add (global.get $inits) (i32.const 1)))
    (global.set $init_len (local.get $n))
    (call $log (i32.const 1) (i32.const 2560) (i32.const 8))
    (call $null))
  (func (export "incr") (param i32 i32) (result i64)
    (global.set $count (i32.add (global.get $count) (i32.const 1)))
    (call $reply_int (global.get $count)))
  (func (export "inits") (param i32 i32) (result i64) (call $reply_int (global.get $inits)))
  (func (export "init_len") (param i32 i32) (result i64)
    (call $reply_int (global.get $init_len)))
  (func (export "boom") (param i32 i32) (result i64) unreachable)
  ;; state is the bare counter; import_state gets [state, from_version]
  (func (export "export_state") (param i32 i32) (result i64)
    (call $reply_int (global.get $count)))
  (func (export "import_state") (param $p i32) (param $n i32) (result i64)
    (global.set $count (call $atoi (i32.add (local.get $p) (i32.const 1))))
    (call $null))
""", ADD, imports=LOG_IMPORT)

# Host functions: log at each level, log from outside memory, config_get into a buffer at 3072.
HOSTFN_LOGS = {0: b"debug line", 1: b"info line", 2: b"warning line", 3: b"error line",
               7: b"odd level \xff"}
HOSTFN_KEYS = {"greeting": 2816, "nested": 2848, "missing": 2880}
CONFIG_BUF = 3072


def _hostfn_module() -> str:
    data, calls, at = [], [], 2560
    for level, message in HOSTFN_LOGS.items():
        data.append(f"(data (i32.const {at}) {wat_bytes(message)})")
        calls.append(f"(call $log (i32.const {level}) (i32.const {at}) "
                     f"(i32.const {len(message)}))")
        at += 32
    for key, offset in HOSTFN_KEYS.items():
        data.append(f"(data (i32.const {offset}) {wat_bytes(key.encode())})")
    return json_module("\n".join(data), f"""
      (global $last (mut i32) (i32.const 0))
      (func (export "log_all") (result i32) {" ".join(calls)} (i32.const 0))
      (func (export "log_at") (param $ptr i32) (param $len i32)
        (call $log (i32.const 1) (local.get $ptr) (local.get $len)))
      ;; config_get(key) into the buffer, after marking its first byte with '!'
      (func (export "cfg") (param $key i32) (param $klen i32) (param $cap i32) (result i32)
        (i32.store8 (i32.const {CONFIG_BUF}) (i32.const 33))
        (global.set $last (call $config_get (local.get $key) (local.get $klen)
                                            (i32.const {CONFIG_BUF}) (local.get $cap)))
        (global.get $last))
      (func (export "first_byte") (result i32) (i32.load8_u (i32.const {CONFIG_BUF})))
      ;; {{"result":<what the last cfg wrote>}}
      (func (export "cfg_value") (param i32 i32) (result i64)
        (memory.copy (i32.const {CONFIG_BUF - 10}) (i32.const 0) (i32.const 10))
        (i32.store8 (i32.add (i32.const {CONFIG_BUF}) (global.get $last)) (i32.const 125))
        (call $pack (i32.const {CONFIG_BUF - 10}) (i32.add (global.get $last) (i32.const 11))))
    """, ADD, imports=LOG_IMPORT + CONFIG_IMPORT)


HOSTFN = _hostfn_module()
HOSTFN_LOG_ONLY = """
  (func (export "log_at") (param $ptr i32) (param $len i32)
    (call $log (i32.const 1) (local.get $ptr) (local.get $len)))
"""


# -- helpers -------------------------------------------------------------------------------------

def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)  # strings, numbers and booleans are spelled alike


def write_plugin(root: Path, module: str | bytes | bytearray, *, plugin_id: str = "t.wasm",
                 methods: list[str] | None = None, config: dict[str, Any] | None = None,
                 sandbox: dict[str, Any] | None = None) -> Path:
    """A wasm plugin directory: ``module`` (WAT text or raw bytes) as m.wasm, a plugin.toml."""
    root.mkdir(parents=True)
    data = wasmtime.wat2wasm(module) if isinstance(module, str) else bytes(module)
    (root / "m.wasm").write_bytes(data)
    lines = ["[plugin]", f'id = "{plugin_id}"', 'version = "1.0.0"', 'type = "wasm"',
             'entrypoint = "m.wasm"']
    if methods is not None:
        lines.append(f"methods = {_toml(methods)}")
    for table, values in (("config", config), ("sandbox", sandbox)):
        if values:
            lines.append(f"[{table}]")
            lines.extend(f"{k} = {_toml(v)}" for k, v in values.items())
    (root / "plugin.toml").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def make(tmp_path: Path) -> Callable[..., Path]:
    """``make(module, **manifest)``: a fresh plugin directory under tmp_path."""
    counter = iter(range(10_000))

    def build(module: str | bytes, **manifest: Any) -> Path:
        return write_plugin(tmp_path / f"plugin{next(counter)}", module, **manifest)

    return build


async def assert_supervisor_fine(mgr: PluginManager, make: Callable[..., Path]) -> None:
    """The manager still loads, calls and unloads a well-behaved wasm plugin."""
    good = await mgr.load(make(WORKER, plugin_id=f"t.good{time.monotonic_ns()}"))
    assert await good.call("add", 20, 22) == 42
    assert await good.call("spin", 1000) == 499500
    await mgr.unload(good.id)


def wasm_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("sandboxer-wasm")]


def spin_sum(n: int) -> int:
    """What spin(n) returns: 0 + 1 + ... + (n - 1), as a signed i64."""
    total = (n * (n - 1) // 2) & ((1 << 64) - 1)
    return total - (1 << 64) if total >= 1 << 63 else total


async def iterations_for(plugin: Any, seconds: float) -> int:
    """How many spin iterations take about ``seconds`` here (measured through the loader)."""
    probe = 5_000_000
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        assert await plugin.call("spin", probe) == spin_sum(probe)
        best = min(best, time.perf_counter() - started)
    return max(probe, int(probe * seconds / max(best, 1e-4)))


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


# -- numeric exports -----------------------------------------------------------------------------

NUMERIC_CALLS = {
    "i32": ("add", (1, 2), 3),
    "i32_negative": ("add", (-5, 3), -2),
    "i32_unsigned_range_wraps": ("add", (4294967295, 0), -1),
    "i32_overflow_wraps": ("add", (2147483647, 1), -2147483648),
    "i64": ("add64", (1 << 40, 1), (1 << 40) + 1),
    "i64_unsigned_range_wraps": ("add64", ((1 << 64) - 1, 0), -1),
    "i64_overflow_wraps": ("add64", ((1 << 63) - 1, 1), -(1 << 63)),
    "f32": ("addf32", (1.5, 2.25), 3.75),
    "f64": ("addf64", (0.1, 0.2), 0.1 + 0.2),
    "f64_from_ints": ("addf64", (1, 2), 3.0),
    "multi_value": ("divmod", (17, 5), [3, 2]),
    "mixed_kinds": ("mixed", (-1, 10, 0.5, 0.25), [0.75, 9, -1]),
    "no_params": ("answer", (), 42),
    "no_result": ("set", (7,), None),
}


@pytest.mark.parametrize("method,args,expected", NUMERIC_CALLS.values(), ids=NUMERIC_CALLS.keys())
async def test_numeric_exports_are_called_with_numbers(tmp_path, method, args, expected):
    """A bare .wasm file loads with the default sandbox; numeric exports map to numbers."""
    path = tmp_path / "calc.wasm"
    path.write_bytes(wasmtime.wat2wasm(NUMERIC))
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(path)
        assert p.id == "calc"
        assert p.sandbox.memory_limit == 256 * MiB and p.sandbox.timeout == 30.0
        result = await p.call(method, *args)
        assert result == expected and type(result) is type(expected)


async def test_numeric_state_lives_in_the_instance_and_f32_rounds(tmp_path):
    """A global set by one call is read by the next; f32 arguments round to single precision;
    exports of other value types are not methods."""
    path = tmp_path / "calc.wasm"
    path.write_bytes(wasmtime.wat2wasm(NUMERIC))
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(path)
        assert await p.call("set", 123) is None
        assert await p.call("get") == 123
        assert await p.call("addf32", 0.1, 0.0) == pytest.approx(0.1, rel=1e-7)
        assert await p.call("addf32", 0.1, 0.0) != 0.1  # single precision, not double
        assert "ref" not in p.methods
        assert {"add", "add64", "divmod", "set", "get"} <= set(p.methods)
        with pytest.raises(MethodNotFound) as info:
            await p.call("ref", 1)
        assert info.value.code == -32601 and "add" in info.value.data["available"]


BAD_NUMBERS = {
    "too_few": ("add", (1,), "takes 2 numeric argument(s), got 1"),
    "too_many": ("add", (1, 2, 3), "takes 2 numeric argument(s), got 3"),
    "none_for_no_params": ("answer", (1,), "takes 0 numeric argument(s), got 1"),
    "string": ("add", ("1", 2), "argument 1 of add must be an integer in range for i32"),
    "float_for_i32": ("add", (1, 2.0), "argument 2 of add must be an integer in range for i32"),
    "bool_for_i32": ("add", (True, 2), "argument 1 of add must be an integer"),
    "i32_too_big": ("add", (1 << 32, 0), "in range for i32"),
    "i32_too_small": ("add", (-(1 << 31) - 1, 0), "in range for i32"),
    "i64_too_big": ("add64", (1 << 64, 0), "in range for i64"),
    "i64_too_small": ("add64", (-(1 << 63) - 1, 0), "in range for i64"),
    "none_for_f64": ("addf64", (None, 1.0), "argument 1 of addf64 must be a number for f64"),
    "bool_for_f64": ("addf64", (1.0, False), "must be a number for f64"),
    "list_for_f32": ("addf32", ([1], 1.0), "must be a number for f32"),
    "int_beyond_f64": ("addf64", (10 ** 400, 1.0), "for f64"),
}


@pytest.mark.parametrize("method,args,fragment", BAD_NUMBERS.values(), ids=BAD_NUMBERS.keys())
async def test_bad_numeric_arguments_are_invalid_params(tmp_path, method, args, fragment):
    """A wrong count, type or range is PluginCallError -32602; the plugin keeps serving."""
    path = tmp_path / "calc.wasm"
    path.write_bytes(wasmtime.wat2wasm(NUMERIC))
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(path)
        with pytest.raises(PluginCallError) as info:
            await p.call(method, *args)
        assert info.value.code == INVALID_PARAMS
        assert fragment in str(info.value), str(info.value)
        assert info.value.plugin_id == "calc" and info.value.method == method
        assert await p.call("add", 1, 2) == 3


# -- the JSON ABI --------------------------------------------------------------------------------

ECHO_VALUES = {
    "nothing": (),
    "scalars": (1, -2.5, True, False, None, "s"),
    "nested": ({"a": [1, {"b": [None, {"c": "deep"}]}], "n": -(1 << 62)}, [[[[]]]]),
    "unicode": ("héllo ☃ 🎉 \u0000 \"quoted\" \\ \n", {"ключ": "値"}),
    "big_int_and_float": (2 ** 63 - 1, -(2 ** 63), 1e300, 5e-324),
}


@pytest.mark.parametrize("args", ECHO_VALUES.values(), ids=ECHO_VALUES.keys())
async def test_json_abi_echo_round_trips(make, args):
    """Arguments go in as a JSON array and come back out of {"result": …} unchanged."""
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(json_module(ECHO)))
        assert await p.call("echo", *args) == list(args)


async def test_a_large_payload_grows_the_argument_buffer(make):
    """Small calls reuse one sandboxer_alloc buffer; a 1 MiB argument gets a bigger one, and
    later small calls go on using it."""
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(json_module(ECHO)))
        assert await p.call("echo", "small") == ["small"]
        inst = p.handle._pool.instances[0]
        first = (inst.buffer, inst.capacity)
        assert first == (HEAP, 4096)
        assert await p.call("echo", "x" * 100) == ["x" * 100]
        assert (inst.buffer, inst.capacity) == first  # reused, not allocated again
        big = "é" * (MiB // 2) + "z" * 7  # a bit over 1 MiB encoded
        assert await p.call("echo", big) == [big]
        assert inst.capacity >= len(big.encode()) and inst.buffer > HEAP
        assert await p.call("echo", {"k": "small again"}) == [{"k": "small again"}]
        assert p.statistics().peak_memory_bytes >= 2 * MiB


async def test_an_error_reply_is_a_plugin_call_error_with_its_code_and_message(make):
    """{"error": {"code", "message", "data"}} becomes PluginCallError with those fields."""
    body = replies(fail=b'{"error":{"code":42,"message":"no such widget","data":{"id":7}}}',
                   negative=b'{"error":{"code":-32000,"message":"server error"}}')
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(json_module(body, ADD)))
        with pytest.raises(PluginCallError) as info:
            await p.call("fail", 1)
        assert info.value.code == 42 and info.value.data == {"id": 7}
        assert "no such widget" in str(info.value) and info.value.method == "fail"
        with pytest.raises(PluginCallError) as info:
            await p.call("negative")
        assert info.value.code == -32000 and "server error" in str(info.value)
        assert await p.call("add", 1, 1) == 2  # an error reply is no trap: same instance
        assert p.handle._pool.instances[0].broken is False


async def test_json_methods_and_lifecycle_exports_are_told_apart(make):
    """JSON ABI exports are methods; the allocator and lifecycle exports are not."""
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(STATEFUL))
        assert p.methods == ("add", "boom", "incr", "init_len", "inits")
        with pytest.raises(MethodNotFound):
            await p.call("export_state")
        with pytest.raises(MethodNotFound):
            await p.call("sandboxer_alloc", 10)


async def test_the_manifest_methods_limit_what_can_be_called(make):
    """With methods = [...] in the manifest, other exports are MethodNotFound."""
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(json_module(ECHO, ADD), methods=["echo"]))
        assert p.methods == ("echo",)
        with pytest.raises(MethodNotFound) as info:
            await p.call("add", 1, 2)
        assert info.value.data == {"available": ["echo"]}
        assert await p.call("echo", 1) == [1]


@pytest.mark.parametrize("args,fragment", [
    ((object(),), "are not JSON values"),
    ((1 << 64,), "are not JSON values"),
    (({1j: 1},), "are not JSON values"),
], ids=["object", "int_beyond_64_bits", "complex_key"])
async def test_arguments_that_are_not_json_are_invalid_params(make, args, fragment):
    """Arguments JSON cannot carry are -32602 before any wasm runs."""
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(json_module(ECHO)))
        with pytest.raises(PluginCallError) as info:
            await p.call("echo", *args)
        assert info.value.code == INVALID_PARAMS and fragment in str(info.value)
        assert await p.call("echo", "ok") == ["ok"]


async def test_a_reply_over_max_frame_is_refused(make):
    """The host's max_frame bounds a reply too; the plugin keeps serving smaller ones."""
    async with PluginManager(HostConfig(max_frame=1024)) as mgr:
        p = await mgr.load(make(json_module(ECHO)))
        with pytest.raises(PluginCallError) as info:
            await p.call("echo", "x" * 2000)
        assert "more than the 1024-byte limit" in str(info.value)
        assert info.value.code == INTERNAL_ERROR
        assert await p.call("echo", "x") == ["x"]


# -- bad modules: refused at load, the supervisor unharmed ----------------------------------------

def _half_of_worker() -> bytes:
    data = wasmtime.wat2wasm(WORKER)
    return data[: len(data) // 2]


BAD_LOADS: dict[str, tuple[str | bytes | Callable[[], bytes], dict[str, Any], str]] = {
    "not_wasm": (b"#!/bin/sh\necho I am not wasm\n", {}, "is not a WebAssembly module"),
    "empty_file": (b"", {}, "is not a WebAssembly module"),
    "truncated": (_half_of_worker, {}, "is not a valid WebAssembly module"),
    "garbage_after_header": (b"\0asm\x01\0\0\0\xff\xff\xff", {},
                             "is not a valid WebAssembly module"),
    "unknown_import": ('(module (import "env" "foo" (func)) ' + ADD + ")", {},
                       "imports env.foo, which sandboxer does not provide"),
    "imported_memory": ('(module (import "env" "memory" (memory 1)) ' + ADD + ")", {},
                        "imports env.memory, which sandboxer does not provide"),
    "unknown_host_function": ('(module (import "sandboxer" "exec" (func)) ' + ADD + ")", {},
                              "imports sandboxer.exec, which sandboxer does not provide"),
    "log_wrong_signature": ('(module (import "sandboxer" "log" (func (param i32 i32))) '
                            + ADD + ")", {},
                            "imports sandboxer.log with signature (i32, i32) -> (); sandboxer "
                            "provides it as (i32, i32, i32) -> ()"),
    "config_get_wrong_result": ('(module (import "sandboxer" "config_get" '
                                '(func (param i32 i32 i32 i32) (result i64))) ' + ADD + ")", {},
                                "imports sandboxer.config_get with signature"),
    "log_as_a_global": ('(module (import "sandboxer" "log" (global i32)) ' + ADD + ")", {},
                        "imports sandboxer.log as something other than a function"),
    "alloc_takes_i64": (json_module(alloc='(func $alloc (export "sandboxer_alloc") '
                                          "(param i64) (result i32) (i32.const 4096))"), {},
                        "export sandboxer_alloc has signature (i64) -> (i32); sandboxer calls "
                        "it as (i32) -> (i32)"),
    "alloc_without_memory": ('(module (func (export "sandboxer_alloc") (param i32) (result i32)'
                             " (i32.const 0)))", {},
                             'exports sandboxer_alloc but no memory named "memory"'),
    "init_numeric": (json_module('(func (export "init"))'), {},
                     "export init has signature () -> (); sandboxer calls it as "
                     "(i32, i32) -> (i64)"),
    "health_check_numeric": (json_module('(func (export "health_check") (result i32) '
                                         "(i32.const 1))"), {},
                             "export health_check has signature () -> (i32)"),
    "init_without_json_abi": ('(module (func (export "init") (param i32 i32) (result i64) '
                              "(i64.const 0)))", {},
                              "exports init but not the JSON ABI"),
    "export_state_alone": (json_module(replies(export_state=b'{"result":1}')), {},
                           "exports only one of export_state/import_state (add import_state)"),
    "method_with_funcref": (NUMERIC, {"methods": ["add", "ref"]},
                            "method ref has signature (funcref) -> ()"),
    "method_not_exported": (NUMERIC, {"methods": ["add", "nope"]},
                            "the manifest lists method nope, which the module does not export"),
    "memory_above_the_limit": ('(module (memory 64) ' + ADD + ")",
                               {"sandbox": {"memory_limit": "2MiB"}},
                               "could not be instantiated"),
    "start_traps": ('(module (func $boot unreachable) (start $boot) ' + ADD + ")", {},
                    "could not be instantiated"),
    "initialize_traps": ('(module (func (export "_initialize") unreachable) ' + ADD + ")", {},
                         "_initialize failed"),
    "init_replies_error": (json_module(replies(init=b'{"error":{"code":3,"message":"bad cfg"}}')),
                           {}, "init failed"),
    "init_traps": (json_module('(func (export "init") (param i32 i32) (result i64) unreachable)'),
                   {}, "init failed"),
    "health_check_false": (json_module(replies(health_check=b'{"result":false}')), {},
                           "health check failed after init"),
    "health_check_not_ok": (json_module(replies(
        health_check=b'{"result":{"ok":false,"message":"disk on fire"}}')), {}, "disk on fire"),
    "state_with_a_pool": (STATEFUL, {"host": HostConfig(wasm_instances=2)},
                          "exports state, so it must run as one instance; the host's "
                          "wasm_instances = 2 would split its state"),
}


@pytest.mark.parametrize("module,options,fragment", BAD_LOADS.values(), ids=BAD_LOADS.keys())
async def test_a_bad_module_is_refused_at_load(make, module, options, fragment):
    """Each is a PluginLoadError naming the problem; nothing is left loaded, and the same
    manager goes on loading and calling a good plugin."""
    options = dict(options)
    host = options.pop("host", HostConfig())
    data = module() if callable(module) else module
    async with PluginManager(host) as mgr:
        started = time.monotonic()
        with pytest.raises(PluginLoadError) as info:
            await mgr.load(make(data, plugin_id="t.bad", **options))
        assert time.monotonic() - started < 10
        assert fragment in str(info.value), str(info.value)
        assert "t.bad" in str(info.value) and info.value.plugin_id == "t.bad"
        assert await mgr.list() == []
        await assert_supervisor_fine(mgr, make)


# Run in a child interpreter: the failure it guards against aborts the whole process.
V128_MODULE = ('(module (func (export "vec") (param v128) (result i32) (i32.const 0)) '
               + ADD + ")")
V128_PROBE = """\
import asyncio, sys
from sandboxer import HostConfig, PluginLoadError, PluginManager

async def main():
    async with PluginManager(HostConfig()) as mgr:
        try:
            p = await mgr.load(sys.argv[1])
        except PluginLoadError as exc:
            print("REFUSED:", exc, flush=True)
        else:
            print("LOADED:", ",".join(p.methods), flush=True)
        good = await mgr.load(sys.argv[2])
        print("GOOD:", await good.call("add", 1, 2), flush=True)

asyncio.run(main())
"""


@pytest.mark.parametrize("methods", [["vec"], None], ids=["listed_in_the_manifest", "not_listed"])
def test_a_v128_export_does_not_abort_the_supervisor(make, methods):
    """A module using v128 (SIMD) is a user's input like any other: wasmtime's C API cannot
    carry v128 values, so sandboxer's engine does not enable SIMD and the module is refused
    at load, naming why; the supervisor process lives on to load a good plugin."""
    bad = make(V128_MODULE, plugin_id="t.simd", methods=methods)
    good = make(WORKER, plugin_id="t.good")
    proc = subprocess.run([sys.executable, "-c", V128_PROBE, str(bad), str(good)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (f"the supervisor died (status {proc.returncode}): "
                                  f"{proc.stderr.strip()[-500:]}")
    refused, good_line = proc.stdout.splitlines()
    assert refused.startswith("REFUSED: plugin t.simd: ") and "SIMD" in refused
    assert good_line == "GOOD: 3"


async def test_a_start_function_that_never_ends_fails_the_load(make):
    """The start section runs under the plugin's timeout: a loop in it fails the load."""
    module = '(module (func $boot (loop $l (br $l))) (start $boot) ' + ADD + ")"
    async with PluginManager(HostConfig()) as mgr:
        started = time.monotonic()
        with pytest.raises(PluginLoadError) as info:
            await mgr.load(make(module, plugin_id="t.boot", sandbox={"timeout": "300ms"}))
        assert time.monotonic() - started < 5
        assert "could not be instantiated" in str(info.value), str(info.value)
        assert await mgr.list() == []
        await assert_supervisor_fine(mgr, make)


async def test_a_start_function_that_never_ends_is_reported_as_a_timeout(make):
    """The load error says the start function ran past the timeout (what the loader's
    _load_error means to say for an interrupted start), not a bare wasm backtrace header."""
    module = '(module (func $boot (loop $l (br $l))) (start $boot) ' + ADD + ")"
    async with PluginManager(HostConfig()) as mgr:
        with pytest.raises(PluginLoadError) as info:
            await mgr.load(make(module, plugin_id="t.boot", sandbox={"timeout": "300ms"}))
        message = str(info.value)
        assert "did not finish within 0.3s" in message or "deadline" in message, message


# -- bad calls: the call fails, the instance is replaced, the supervisor unharmed ----------------

@dataclasses.dataclass(frozen=True)
class BadCall:
    module: str
    method: str
    error: type[SandboxerError]
    fragment: str
    args: tuple[Any, ...] = ()
    sandbox: dict[str, Any] = dataclasses.field(default_factory=dict)
    timeout: float | None = None
    check: Callable[[Any], None] | None = None


def _is_memory_limit(limit: int) -> Callable[[Any], None]:
    def check(exc: Any) -> None:
        assert exc.limit == limit
        assert exc.peak is not None and 0 < exc.peak <= limit
    return check


def _trap(name: str) -> Callable[[Any], None]:
    def check(exc: Any) -> None:
        assert exc.code == INTERNAL_ERROR and exc.data == {"trap": name}
    return check


def _internal(exc: Any) -> None:
    assert exc.code == INTERNAL_ERROR


def _timeout_of(seconds: float) -> Callable[[Any], None]:
    def check(exc: Any) -> None:
        assert exc.timeout == seconds and exc.method == "forever"
    return check


def _json_bad(**methods: bytes) -> str:
    return json_module(replies(**methods), ADD)


NOT_AN_ENVELOPE = 'not {"result": …} or {"error": {"code": int, "message": str}}'
BAD_CALLS = {
    "result_past_the_memory": BadCall(json_module(packed("out", 65536, 10), ADD), "out",
                                      PluginCallError, "outside its memory (65536 bytes)",
                                      check=_internal),
    "result_straddles_the_end": BadCall(json_module(packed("out", 65530, 100), ADD), "out",
                                        PluginCallError, "returned a result at 65530+100"),
    "result_at_the_top_of_the_address_space": BadCall(
        json_module(packed("out", 0xFFFF_FFF0, 0xFFFF_FFFF), ADD), "out", PluginCallError,
        "outside its memory"),
    "invalid_utf8": BadCall(_json_bad(m=b'{"result":"\xff\xfe"}'), "m", PluginCallError,
                            "returned invalid JSON or UTF-8", check=_internal),
    "invalid_json": BadCall(_json_bad(m=b'{"result":}'), "m", PluginCallError,
                            "returned invalid JSON or UTF-8"),
    "not_json_at_all": BadCall(_json_bad(m=b"hello"), "m", PluginCallError,
                               "returned invalid JSON or UTF-8"),
    "empty_reply": BadCall(json_module(packed("m", 1024, 0), ADD), "m", PluginCallError,
                           "returned invalid JSON or UTF-8"),
    "array": BadCall(_json_bad(m=b"[1]"), "m", PluginCallError, NOT_AN_ENVELOPE,
                     check=_internal),
    "extra_key": BadCall(_json_bad(m=b'{"result":1,"x":2}'), "m", PluginCallError,
                         NOT_AN_ENVELOPE),
    "empty_object": BadCall(_json_bad(m=b"{}"), "m", PluginCallError, NOT_AN_ENVELOPE),
    "bare_string": BadCall(_json_bad(m=b'"result"'), "m", PluginCallError, NOT_AN_ENVELOPE),
    "error_code_a_string": BadCall(_json_bad(m=b'{"error":{"code":"42","message":"m"}}'), "m",
                                   PluginCallError, NOT_AN_ENVELOPE),
    "error_without_message": BadCall(_json_bad(m=b'{"error":{"code":1}}'), "m",
                                     PluginCallError, NOT_AN_ENVELOPE),
    "memory_grown_past_the_limit": BadCall(WORKER, "hog", MemoryLimitExceeded,
                                           "failed at its memory limit (2097152 bytes",
                                           sandbox={"memory_limit": "2MiB"},
                                           check=_is_memory_limit(2 * MiB)),
    "infinite_loop": BadCall(WORKER, "forever", CallTimeout, "did not finish within 0.3s",
                             timeout=0.3, check=_timeout_of(0.3)),
    "infinite_loop_under_the_manifest_timeout": BadCall(
        WORKER, "forever", CallTimeout, "did not finish within 0.25s",
        sandbox={"timeout": "250ms"}, check=_timeout_of(0.25)),
    "deep_recursion": BadCall(WORKER, "recurse", PluginCallError, "stack overflow",
                              args=(0,), check=_trap("stack_overflow")),
    "unreachable": BadCall(WORKER, "crash", PluginCallError, "crash trapped",
                           check=_trap("unreachable")),
    "division_by_zero": BadCall(WORKER, "divide", PluginCallError, "divide trapped",
                                args=(1, 0), check=_trap("integer_division_by_zero")),
    "out_of_bounds_load": BadCall(WORKER, "peek", PluginCallError, "peek trapped",
                                  args=(65535,), check=_trap("memory_out_of_bounds")),
    "arguments_larger_than_the_memory_limit": BadCall(
        json_module(ECHO, ADD), "echo", MemoryLimitExceeded,
        "do not fit in its memory limit (1048576 bytes)", args=("x" * (2 * MiB),),
        sandbox={"memory_limit": "1MiB"},
        check=lambda exc: exc.limit == MiB),
    "arguments_the_allocator_cannot_place": BadCall(  # they fit the limit, not beside the heap
        json_module(ECHO, ADD), "echo", MemoryLimitExceeded,
        "failed at the memory limit", args=("x" * (MiB - 1000),),
        sandbox={"memory_limit": "1MiB"}, check=lambda exc: exc.limit == MiB),
    "alloc_returns_zero": BadCall(
        json_module(ECHO, ADD, alloc='(func $alloc (export "sandboxer_alloc") (param i32) '
                                     "(result i32) (i32.const 0))"),
        "echo", PluginCallError, "sandboxer_alloc(4096) returned 0, not a buffer inside its "
        "memory", args=("hi",), check=_internal),
    "alloc_returns_past_the_end": BadCall(
        json_module(ECHO, ADD, alloc='(func $alloc (export "sandboxer_alloc") (param i32) '
                                     "(result i32) (i32.const 65000))"),
        "echo", PluginCallError, "sandboxer_alloc(4096) returned 65000", args=("hi",)),
    "alloc_traps": BadCall(
        json_module(ECHO, ADD, alloc='(func $alloc (export "sandboxer_alloc") (param i32) '
                                     "(result i32) unreachable)"),
        "echo", PluginCallError, "sandboxer_alloc trapped", args=("hi",),
        check=_trap("unreachable")),
    "fuel_used_up": BadCall(WORKER, "count", CpuLimitExceeded,
                            "count used up its fuel (10000 per call)", args=(10_000_000,),
                            sandbox={"fuel": 10_000}),
    "log_from_outside_memory": BadCall(HOSTFN, "log_at", PluginCallError,
                                       "log_at trapped", args=(65530, 100),
                                       check=_internal),
    "config_key_from_outside_memory": BadCall(HOSTFN, "cfg", PluginCallError, "cfg trapped",
                                              args=(1 << 20, 4, 16), check=_internal),
}


@pytest.mark.parametrize("case", BAD_CALLS.values(), ids=BAD_CALLS.keys())
async def test_a_bad_call_fails_with_a_named_error_and_the_plugin_recovers(make, case: BadCall):
    """The call fails with the error a user can act on; the plugin's next call works on a
    fresh instance where needed, and the manager still serves a good plugin."""
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(case.module, plugin_id="t.bad", sandbox=case.sandbox))
        started = time.monotonic()
        with pytest.raises(case.error) as info:
            await p.call(case.method, *case.args, timeout=case.timeout)
        assert time.monotonic() - started < 10
        assert case.fragment in str(info.value), str(info.value)
        assert info.value.plugin_id == "t.bad"
        assert str(info.value).startswith("plugin t.bad: ")
        if case.check is not None:
            case.check(info.value)
        assert await p.call("add", 2, 3) == 5
        assert p.state is PluginState.READY
        assert p.statistics().failures == 1
        await assert_supervisor_fine(mgr, make)


async def test_a_zero_reply_from_a_method_is_not_read_as_the_whole_memory(make):
    """A method returning 0 (ptr 0, len 0: an empty reply) is invalid JSON, whatever the
    memory happens to hold; here memory starts with {"result": and ends with }."""
    module = json_module(r"""
      (func (export "zero") (param i32 i32) (result i64)
        ;; spaces everywhere after the prefix, a 1 at 10, the last byte a }
        (memory.fill (i32.const 11) (i32.const 32) (i32.sub (i32.const 65536) (i32.const 11)))
        (i32.store8 (i32.const 10) (i32.const 49))
        (i32.store8 (i32.const 65535) (i32.const 125))
        (i64.const 0))
    """, ADD)
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(module))
        with pytest.raises(PluginCallError) as info:
            await p.call("zero")
        assert "invalid JSON" in str(info.value)


async def test_fuel_is_refilled_for_every_call(make):
    """fuel = 10000 bounds each call, not the instance's life: many short calls succeed, a
    long one is CpuLimitExceeded, and short ones work again after it."""
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(WORKER, sandbox={"fuel": 10_000}))
        for _ in range(20):  # 20 x 500 iterations is far more fuel than one call's 10000
            assert await p.call("count", 500) == 500
        with pytest.raises(CpuLimitExceeded):
            await p.call("count", 100_000)
        assert await p.call("count", 500) == 500
        assert p.sandbox.fuel == 10_000


HOST_CEILINGS = {
    "max_fuel_meters_an_unmetered_plugin": (HostConfig(max_fuel=5_000), {}, "count",
                                            (1_000_000,), CpuLimitExceeded),
    "fuel_within_max_fuel": (HostConfig(max_fuel=5_000), {"fuel": 4_000},
                             "count", (1_000_000,), CpuLimitExceeded),
    "max_memory_limit_caps_the_default": (HostConfig(max_memory_limit=2 * MiB), {}, "hog", (),
                                          MemoryLimitExceeded),
    "max_timeout_caps_the_default": (HostConfig(max_timeout=0.3), {}, "forever", (),
                                     CallTimeout),
}


@pytest.mark.parametrize("host,sandbox,method,args,error", HOST_CEILINGS.values(),
                         ids=HOST_CEILINGS.keys())
async def test_the_hosts_ceilings_bound_wasm_plugins(make, host, sandbox, method, args, error):
    """max_fuel, max_memory_limit and max_timeout bound what a wasm plugin gets (a request
    above them is refused at load: tests/escapes/test_outside_policy.py)."""
    async with PluginManager(host) as mgr:
        p = await mgr.load(make(WORKER, sandbox=sandbox))
        started = time.monotonic()
        with pytest.raises(error):
            await p.call(method, *args)
        assert time.monotonic() - started < 5
        assert await p.call("count", 100) == 100


# -- traps discard the instance ------------------------------------------------------------------

async def test_a_trap_resets_the_state_and_init_runs_again(make, caplog):
    """After a trap the next call gets a fresh instance: the counter starts over, and init
    ran on it (its own count is 1 again, with the same config; logged a second time)."""
    caplog.set_level(logging.DEBUG, logger="sandboxer.plugin.t.state")
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(STATEFUL, plugin_id="t.state", config={"name": "x", "n": 3}))
        assert [await p.call("incr") for _ in range(3)] == [1, 2, 3]
        assert await p.call("inits") == 1
        config_len = await p.call("init_len")
        assert config_len == len(b'[{"name":"x","n":3}]')
        first = p.handle._pool.instances[0]
        with pytest.raises(PluginCallError) as info:
            await p.call("boom")
        assert info.value.data == {"trap": "unreachable"}
        assert await p.call("incr") == 1
        assert await p.call("inits") == 1
        assert await p.call("init_len") == config_len
        assert p.handle._pool.instances[0] is not first
        assert p.state is PluginState.READY
    inits = [r for r in caplog.records
             if r.name == "sandboxer.plugin.t.state" and r.getMessage() == "init ran"]
    assert len(inits) == 2


async def test_an_error_reply_keeps_the_state(make):
    """Only traps discard the instance: a method answering an error keeps it."""
    module = json_module(INCR, replies(fail=b'{"error":{"code":5,"message":"no"}}'))
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(module))
        assert await p.call("incr") == 1
        with pytest.raises(PluginCallError):
            await p.call("fail")
        with pytest.raises(PluginCallError):
            await p.call("incr", object())  # refused before the call: no trap either
        assert await p.call("incr") == 2


# -- host functions ------------------------------------------------------------------------------

async def test_log_lines_reach_the_plugins_logger_at_their_levels(make, caplog):
    """sandboxer.log(level, ptr, len) logs on sandboxer.plugin.<id>; an unknown level is
    INFO and invalid UTF-8 is replaced."""
    caplog.set_level(logging.DEBUG, logger="sandboxer.plugin.t.logs")
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(HOSTFN, plugin_id="t.logs"))
        assert await p.call("log_all") == 0
    seen = [(r.levelno, r.getMessage()) for r in caplog.records
            if r.name == "sandboxer.plugin.t.logs"]
    assert seen == [
        (logging.DEBUG, "debug line"),
        (logging.INFO, "info line"),
        (logging.WARNING, "warning line"),
        (logging.ERROR, "error line"),
        (logging.INFO, "odd level \ufffd"),
    ]


async def test_a_long_log_message_is_cut_at_64_kib(make, caplog):
    """A log call naming more than 64 KiB logs the first 64 KiB."""
    caplog.set_level(logging.DEBUG, logger="sandboxer.plugin.t.logs")
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(json_module(HOSTFN_LOG_ONLY, imports=LOG_IMPORT),
                                plugin_id="t.logs"))
        await p.call("log_at", 0, 65536)  # the whole (one page) memory
    [record] = [r for r in caplog.records if r.name == "sandboxer.plugin.t.logs"]
    assert len(record.getMessage()) == 64 * KiB



async def test_config_get_copies_present_values_and_reports_absent_and_short(make):
    """config_get: a present key copies its JSON and returns the length; an absent key is
    -1; a buffer too small gets nothing written and the length it would need."""
    config = {"greeting": "héllo", "nested": {"a": [1, 2], "b": True}}
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(HOSTFN, config=config))
        key = HOSTFN_KEYS["greeting"]
        expected = json.dumps("héllo", ensure_ascii=False).encode()
        assert await p.call("cfg", key, len("greeting"), 256) == len(expected)
        assert await p.call("cfg_value") == "héllo"

        key = HOSTFN_KEYS["nested"]
        n = await p.call("cfg", key, len("nested"), 256)
        assert await p.call("cfg_value") == {"a": [1, 2], "b": True}

        assert await p.call("cfg", key, len("nested"), n - 1) == n  # the length it needs
        assert await p.call("first_byte") == ord("!")  # and nothing written
        assert await p.call("cfg", key, len("nested"), n) == n  # an exact fit is enough
        assert await p.call("first_byte") == ord("{")

        key = HOSTFN_KEYS["missing"]
        assert await p.call("cfg", key, len("missing"), 256) == -1
        assert await p.call("first_byte") == ord("!")
        assert await p.call("cfg", key, 0, 256) == -1  # the empty key is absent too


async def test_config_get_sees_the_config_override(make):
    """config passed to load() overrides the manifest's [config] for config_get too."""
    async with PluginManager(HostConfig()) as mgr:
        root = make(HOSTFN, config={"greeting": "from manifest"})
        p = await mgr.load(root, config={"greeting": "overridden"})
        assert await p.call("cfg", HOSTFN_KEYS["greeting"], len("greeting"), 256) > 0
        assert await p.call("cfg_value") == "overridden"


# -- the event loop, the pool, cancellation and unload --------------------------------------------

async def test_a_long_call_does_not_hold_the_event_loop(make):
    """While a ~0.5 s spin runs, a task sleeping 5 ms at a time never waits much longer
    (the call moved to a worker thread after its first slice); the spin's result is right."""
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(WORKER))
        n = await iterations_for(p, 0.5)
        async with loop_gap() as gap:
            started = time.perf_counter()
            result = await p.call("spin", n)
            took = time.perf_counter() - started
        worst = gap.worst
        assert result == spin_sum(n)
        assert took > 0.2, f"the spin took only {took:.3f}s: calibration went wrong"
        assert worst < 0.15, f"the event loop was held for {worst:.3f}s"


@pytest.mark.parametrize("instances,quick_first", [(2, True), (1, False)],
                         ids=["pool_of_2", "pool_of_1"])
async def test_the_instance_pool_lets_a_quick_call_pass_a_long_one(make, instances, quick_first):
    """With wasm_instances = 2 a quick call runs beside a long one and finishes first; with
    the default single instance it waits for the long one."""
    async with PluginManager(HostConfig(wasm_instances=instances)) as mgr:
        p = await mgr.load(make(WORKER))
        assert len(p.handle._pool.instances) == instances
        n = await iterations_for(p, 0.4)
        done: list[str] = []

        async def run(name: str, *call: Any) -> Any:
            result = await p.call(*call)
            done.append(name)
            return result

        long = asyncio.create_task(run("spin", "spin", n))
        await asyncio.sleep(0.05)  # the spin is in flight, on a worker thread
        quick = asyncio.create_task(run("add", "add", 1, 2))
        assert await quick == 3
        assert await long == spin_sum(n)
        assert done == (["add", "spin"] if quick_first else ["spin", "add"])


async def test_a_stateful_plugin_refuses_a_pool(make):
    """export_state + import_state need one instance: with wasm_instances = 2 the load fails;
    a stateless plugin loads with the pool."""
    async with PluginManager(HostConfig(wasm_instances=2)) as mgr:
        with pytest.raises(PluginLoadError, match="exports state, so it must run as one"):
            await mgr.load(make(STATEFUL, plugin_id="t.state"))
        p = await mgr.load(make(WORKER))
        assert len(p.handle._pool.instances) == 2


@pytest.mark.parametrize("how", ["wait_for", "cancel"])
async def test_a_cancelled_call_stops_its_wasm_and_the_plugin_goes_on(make, how):
    """Cancelling the awaiting task stops the wasm at the next tick (the instance is
    discarded); the next call works at once, unload completes, and when the manager closes
    no sandboxer-wasm thread is left."""
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(WORKER, sandbox={"timeout": "20s"}))
        handle = p.handle
        started = time.monotonic()
        if how == "wait_for":
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(p.call("forever"), 0.1)
        else:
            task = asyncio.create_task(p.call("forever"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert await p.call("add", 2, 3) == 5
        await wait_until(lambda: not handle._offloop, 2.0, "the abandoned call to stop")
        assert time.monotonic() - started < 3
        assert p.statistics().in_flight == 0
        assert await p.call("spin", 10) == 45
        await mgr.unload(p.id)
        assert p.state is PluginState.STOPPED
        assert time.monotonic() - started < 5
    assert wasm_threads() == []


async def test_a_call_queued_behind_a_long_one_can_be_cancelled(make):
    """A call waiting for the single instance is cancelled without disturbing the pool."""
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(WORKER))
        n = await iterations_for(p, 0.3)
        long = asyncio.create_task(p.call("spin", n))
        await asyncio.sleep(0.02)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(p.call("add", 1, 1), 0.05)
        assert await long == spin_sum(n)
        assert await p.call("add", 2, 2) == 4
        assert len(p.handle._idle) == 1 and not p.handle._pool.waiting


async def test_unload_during_a_long_call_ends_the_call(make):
    """Unload waits drain_timeout for the call, then stops its wasm: it returns promptly and
    the call ends with an error rather than running on."""
    async with PluginManager(HostConfig(drain_timeout=0.2)) as mgr:
        p = await mgr.load(make(WORKER, plugin_id="t.busy", sandbox={"timeout": "20s"}))
        call = asyncio.create_task(p.call("forever"))
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await mgr.unload(p.id)
        assert time.monotonic() - started < 5
        assert p.state is PluginState.STOPPED
        with pytest.raises(SandboxerError) as info:
            await asyncio.wait_for(call, 5)
        assert info.value.plugin_id == "t.busy"
        with pytest.raises(PluginStateError):
            await p.call("add", 1, 2)
        await assert_supervisor_fine(mgr, make)
    assert wasm_threads() == []


async def test_an_unload_ended_call_is_not_reported_as_its_timeout(make):
    """The call an unload stopped did not run out of its 20 s timeout, so CallTimeout would
    mislead; like the process loader's, it fails as closed while in flight."""
    async with PluginManager(HostConfig(drain_timeout=0.2)) as mgr:
        p = await mgr.load(make(WORKER, plugin_id="t.busy", sandbox={"timeout": "20s"}))
        call = asyncio.create_task(p.call("forever"))
        await asyncio.sleep(0.05)
        await mgr.unload(p.id)
        with pytest.raises(SandboxerError) as info:
            await asyncio.wait_for(call, 5)
        assert not isinstance(info.value, CallTimeout), str(info.value)
        assert isinstance(info.value, PluginStateError) and "unloaded" in str(info.value)


# -- policy --------------------------------------------------------------------------------------

# (network_allowed with allowed_hosts is enforced through http_request: test_wasm_http.py)
POLICY = {
    "cpu_limit_below_one": ({"cpu_limit": 0.5}, SandboxUnavailable,
                            "asks for cpu_limit = 0.5, which cannot be enforced"),
    "full_network": ({"network_allowed": True}, PluginLoadError, "asks for the full network"),
    "path_outside_every_root": ({"allowed_paths": ["/etc"]}, PluginLoadError,
                                "does not allow path /etc"),
}


@pytest.mark.parametrize("sandbox,error,fragment", POLICY.values(), ids=POLICY.keys())
async def test_a_sandbox_the_wasm_loader_cannot_enforce_is_refused(make, sandbox, error,
                                                                    fragment):
    """Network and a CPU quota cannot be enforced in-process: SandboxUnavailable (not a
    silent load); what the host policy refuses outright stays a plain PluginLoadError."""
    async with PluginManager(HostConfig()) as mgr:
        with pytest.raises(error) as info:
            await mgr.load(make(WORKER, plugin_id="t.policy", sandbox=sandbox))
        assert fragment in str(info.value), str(info.value)
        if error is SandboxUnavailable:
            assert info.value.missing
        else:
            assert not isinstance(info.value, SandboxUnavailable)
        assert await mgr.list() == []
        await assert_supervisor_fine(mgr, make)


async def test_cpu_limit_of_one_or_more_is_accepted(make):
    """A whole CPU or more is what a call on one thread uses anyway: no refusal."""
    async with PluginManager(HostConfig(max_cpu_limit=4)) as mgr:
        for cpus in (1, 2):
            p = await mgr.load(make(WORKER, plugin_id=f"t.cpu{cpus}", sandbox={"cpu_limit": cpus}))
            assert await p.call("add", 1, 1) == 2


async def test_a_wasm_plugin_cannot_run_unsandboxed(make):
    """SandboxConfig(enabled=False) is for python and native plugins only."""
    async with PluginManager(HostConfig(allow_unsandboxed=True)) as mgr:
        with pytest.raises(PluginLoadError) as info:
            await mgr.load(make(WORKER, plugin_id="t.open"), sandbox=SandboxConfig(enabled=False))
        assert "wasm plugins always run sandboxed" in str(info.value)
        assert not isinstance(info.value, SandboxUnavailable)
        await assert_supervisor_fine(mgr, make)


async def test_an_explicit_sandbox_replaces_the_manifests(make):
    """The operator's SandboxConfig is the one enforced (here: a 2 MiB memory limit)."""
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(WORKER), sandbox=SandboxConfig(memory_limit=2 * MiB))
        with pytest.raises(MemoryLimitExceeded) as info:
            await p.call("hog")
        assert info.value.limit == 2 * MiB


# -- the compiled-module cache -------------------------------------------------------------------

async def test_the_same_bytes_compile_once(make):
    """Two plugins with the same module bytes share one compiled module; other bytes get
    their own; closing the manager empties the cache."""
    async with PluginManager(HostConfig()) as mgr:
        first = await mgr.load(make(WORKER, plugin_id="t.one"))
        second = await mgr.load(make(WORKER, plugin_id="t.two"))
        engine = mgr._wasm_engine
        assert len(engine._modules) == 1
        assert first.handle._module is second.handle._module
        assert await first.call("add", 1, 2) == await second.call("add", 1, 2) == 3
        await mgr.load(make(NUMERIC, plugin_id="t.three"))
        assert len(engine._modules) == 2
    assert engine._modules == {}
    assert mgr._wasm_engine is None


# -- lifecycle -----------------------------------------------------------------------------------

async def test_health_check_true_lets_the_plugin_load_and_stay_ready(make):
    """(health_check false and not-ok fail the load: see BAD_LOADS.)"""
    module = json_module(replies(health_check=b'{"result":true}'), ADD)
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(module, plugin_id="t.healthy"))
        assert p.state is PluginState.READY
        assert await mgr.check_health(p.id) is True


async def test_state_migrates_across_a_reload(make):
    """export_state / import_state carry the counter into the new generation."""
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(STATEFUL, plugin_id="t.state"))
        assert [await p.call("incr") for _ in range(41)][-1] == 41
        old = p.handle
        await mgr.reload(p.id)
        assert p.generation == 2 and p.handle is not old
        assert p.state is PluginState.READY
        assert await p.call("incr") == 42
        assert await p.call("inits") == 1


async def test_without_state_exports_a_reload_starts_afresh(make):
    """A plugin without export_state/import_state starts the new generation from scratch."""
    module = json_module(INCR)
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(module))
        assert [await p.call("incr") for _ in range(3)] == [1, 2, 3]
        await mgr.reload(p.id)
        assert await p.call("incr") == 1


async def test_lifecycle_exports_answering_not_implemented_are_not_failures(make):
    """As on the wire: -32601 means not implemented: no init, healthy, no state (a reload
    starts afresh), no shutdown work."""
    missing = b'{"error":{"code":-32601,"message":"not implemented"}}'
    module = json_module(replies(init=missing, health_check=missing, shutdown=missing,
                                 export_state=missing, import_state=missing), INCR)
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(module, plugin_id="t.not-implemented"))
        assert p.handle is not None and p.handle.has_state
        assert await mgr.check_health(p.id) is True
        assert [await p.call("incr") for _ in range(2)] == [1, 2]
        await mgr.reload(p.id)
        assert p.generation == 2 and p.error is None and await p.call("incr") == 1


# -- leaks ---------------------------------------------------------------------------------------

async def test_an_unloaded_plugin_is_freed(make):
    """Once a plugin is unloaded and its manager closed, nothing keeps its handle (and with
    it the compiled module, the linker and the instances' stores) alive."""
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(WORKER))
        assert await p.call("add", 1, 2) == 3
        handle = weakref.ref(p.handle)
        await mgr.unload(p.id)
    del p
    gc.collect()
    assert handle() is None, "the WasmHandle outlived its unload and its manager: " + ", ".join(
        type(r).__name__ for r in gc.get_referrers(handle()))


def _memory_image_fds() -> set[int]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if "wasm-memory-image" in os.readlink(f"/proc/self/fd/{name}"):
                found.add(int(name))
        except OSError:
            pass
    return found


async def test_a_closed_manager_leaves_no_memory_image_open(make):
    """A module with an active data segment gets a memfd memory image when instantiated;
    once the manager is closed, that fd is closed too."""
    module = ('(module (memory (export "memory") 1) (data (i32.const 0) "hello") '
              '(func (export "first") (result i32) (i32.load8_u (i32.const 0))))')
    before = _memory_image_fds()
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(make(module))
        assert await p.call("first") == ord("h")
    del p
    gc.collect()
    assert _memory_image_fds() - before == set()


START_FAILURES = {
    "start_traps": '(module (func $boot unreachable) (start $boot) ' + ADD + ")",
    "start_never_ends": '(module (func $boot (loop $l (br $l))) (start $boot) ' + ADD + ")",
    "memory_above_the_limit": '(module (memory 64) ' + ADD + ")",
}


@pytest.mark.parametrize("module", START_FAILURES.values(), ids=START_FAILURES.keys())
async def test_a_failed_instantiation_leaves_no_store_behind(make, module):
    """A store whose instantiation failed is unregistered from the epoch callback's table
    (wasm._instance._LIVE), as every store of a closed plugin is."""
    live = set(wasm_loader._LIVE)
    async with PluginManager(HostConfig()) as mgr:
        with pytest.raises(PluginLoadError):
            await mgr.load(make(module, sandbox={"memory_limit": "2MiB", "timeout": "300ms"}))
        await assert_supervisor_fine(mgr, make)
    assert set(wasm_loader._LIVE) - live == set()
