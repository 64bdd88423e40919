"""Wasm benchmark: a small call into an in-process wasm plugin against Extism and wasmtime-py.

What is measured, all in this one process (benchmarks/README.md, section "wasm"):

  echo_us                    ``await p.call("echo", "hello")`` through PluginManager on a JSON
                             ABI echo plugin written in WAT (the call returns ["hello"]),
                             default asyncio loop
  extism_echo_us             Extism Python SDK, ``orjson.loads(plugin.call("echo",
                             orjson.dumps(["hello"])))`` on an equivalent echo written against
                             Extism's host ABI (the JSON is encoded and decoded, as ours does)
  extism_echo_raw_us         the same Extism call, bytes in and bytes out, no JSON
  add_us                     ``await p.call("add", 1, 2)`` through PluginManager (numeric export)
  wasmtime_add_us            wasmtime-py ``add(store, 1, 2)`` (``Func.__call__``), same module,
                             plain Store of a default Engine
  wasmtime_unchecked_add_us  wasmtime_func_call_unchecked through ctypes with preallocated
                             arrays: the floor for any Python caller (context, not a target)
  add_direct_us              ``await handle.call("add", 1, 2)`` on the generation's handle,
                             bypassing LoadedPlugin (the manager's routing, made visible)
  *_uvloop                   echo and add through PluginManager with the host on uvloop
  long_call_loop_gap_ms      the largest gap a concurrent ``asyncio.sleep(0.001)`` loop sees
                             while a ~200 ms wasm call runs

Each figure is the median over repetitions of a timed loop (total time / calls); within a
repetition every measurement runs once, in a rotating order, so a burst of other work on the
machine hits ours and the baselines alike. gc is disabled in every measured loop, baselines
included. ``run()`` returns the dict stored under "wasm" in benchmarks/results/latest.json.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from ._results import describe_loop, scale, versions

PAYLOAD = "hello"
TARGETS = {"echo_ratio_vs_extism": 0.5, "add_ratio_vs_wasmtime_call": 0.25}
LONG_CALL_S = 0.2     # how long the spinning call for the loop-gap test should run
TICK_S = 0.001        # the concurrent sleeper's period

# -- the plugins -------------------------------------------------------------------------------

# sandboxer's JSON ABI: the host writes the call's args (a JSON array) into a buffer it got
# from sandboxer_alloc (and reuses it across calls) and calls echo(ptr, len); echo answers with
# ptr << 32 | len of {"result":<args>}, written at the top of the heap (scratch space, valid
# until the next call). No logging, no host calls.
ECHO_WAT = r"""
(module
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 1024))
  (data (i32.const 0) "{\"result\":")

  ;; Grow the memory so that [0, end) lies inside it; 0 if it cannot grow.
  (func $ensure (param $end i32) (result i32)
    (local $have i32)
    (local.set $have (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq (memory.grow (i32.shr_u (i32.add (i32.sub (local.get $end) (local.get $have))
                                                     (i32.const 65535))
                                            (i32.const 16)))
                    (i32.const -1))
          (then (return (i32.const 0))))))
    (i32.const 1))

  ;; A bump allocator.
  (func (export "sandboxer_alloc") (param $len i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (if (i32.eqz (call $ensure (i32.add (local.get $ptr) (local.get $len))))
      (then (return (i32.const 0))))
    (global.set $heap (i32.add (local.get $ptr) (local.get $len)))
    (local.get $ptr))

  ;; echo(args...) -> {"result":<args>}: the call returns its arguments as a list.
  (func (export "echo") (param $ptr i32) (param $len i32) (result i64)
    (local $out i32)
    (local.set $out (global.get $heap))
    (if (i32.eqz (call $ensure (i32.add (local.get $out)
                                        (i32.add (local.get $len) (i32.const 11)))))
      (then unreachable))
    (memory.copy (local.get $out) (i32.const 0) (i32.const 10))
    (memory.copy (i32.add (local.get $out) (i32.const 10)) (local.get $ptr) (local.get $len))
    (i32.store8 (i32.add (local.get $out) (i32.add (local.get $len) (i32.const 10)))
                (i32.const 0x7d))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $out)) (i64.const 32))
            (i64.extend_i32_u (i32.add (local.get $len) (i32.const 11))))))
"""

# The same echo against Extism's host ABI (its kernel's input/output buffers): copy the input
# to a newly allocated block and make that the output.
EXTISM_ECHO_WAT = r"""
(module
 (import "extism:host/env" "input_length" (func $input_length (result i64)))
 (import "extism:host/env" "input_load_u8" (func $input_load_u8 (param i64) (result i32)))
 (import "extism:host/env" "alloc" (func $alloc (param i64) (result i64)))
 (import "extism:host/env" "store_u8" (func $store_u8 (param i64 i32)))
 (import "extism:host/env" "output_set" (func $output_set (param i64 i64)))
 (func (export "echo") (result i32) (local $n i64) (local $i i64) (local $out i64)
   (local.set $n (call $input_length))
   (local.set $out (call $alloc (local.get $n)))
   (block $done (loop $l
     (br_if $done (i64.ge_u (local.get $i) (local.get $n)))
     (call $store_u8 (i64.add (local.get $out) (local.get $i)) (call $input_load_u8 (local.get $i)))
     (local.set $i (i64.add (local.get $i) (i64.const 1)))
     (br $l)))
   (call $output_set (local.get $out) (local.get $n))
   (i32.const 0)))
"""

ADD_WAT = r"""
(module
  (func (export "add") (param i32 i32) (result i32)
    (i32.add (local.get 0) (local.get 1))))
"""

# spin(n): n iterations of an add, returning the sum (so nothing is optimised away).
SPIN_WAT = r"""
(module
  (func (export "spin") (param $n i64) (result i64)
    (local $acc i64)
    (block $done
      (loop $l
        (br_if $done (i64.eqz (local.get $n)))
        (local.set $acc (i64.add (local.get $acc) (local.get $n)))
        (local.set $n (i64.sub (local.get $n) (i64.const 1)))
        (br $l)))
    (local.get $acc)))
"""


def _counts() -> dict[str, int]:
    s = scale()
    return {
        "repetitions": 7,
        "calls_per_repetition": max(200, int(20_000 * s)),
        "warmup_calls": max(100, int(3_000 * s)),
        "sampled_calls": max(200, int(10_000 * s)),   # one extra round timed call by call
        "uvloop_repetitions": 5,
        "long_calls": 3,
    }


# -- timing helpers ------------------------------------------------------------------------------

clock = time.perf_counter_ns


async def _loop_async(call: Callable[..., Awaitable[Any]], args: tuple[Any, ...], n: int) -> int:
    t0 = clock()
    for _ in range(n):
        await call(*args)
    return clock() - t0


async def _sampled_async(call: Callable[..., Awaitable[Any]], args: tuple[Any, ...], n: int
                         ) -> list[int]:
    samples = [0] * n
    for i in range(n):
        t0 = clock()
        await call(*args)
        samples[i] = clock() - t0
    return samples


class _Sync:
    """A synchronous baseline: ``loop(n)`` -> ns for n calls; ``sampled(n)`` -> per-call ns.

    Each loop is written out with its callables bound to locals, as a caller in a hurry
    would, so no lambda or extra frame is charged to the baseline."""

    def __init__(self, loop: Callable[[int], int], sampled: Callable[[int], list[int]]) -> None:
        self.loop, self.sampled = loop, sampled


def _extism_json(plugin: Any) -> _Sync:
    import orjson
    call, dumps, loads = plugin.call, orjson.dumps, orjson.loads
    value = [PAYLOAD]

    def loop(n: int) -> int:
        t0 = clock()
        for _ in range(n):
            loads(call("echo", dumps(value)))
        return clock() - t0

    def sampled(n: int) -> list[int]:
        out = [0] * n
        for i in range(n):
            t0 = clock()
            loads(call("echo", dumps(value)))
            out[i] = clock() - t0
        return out

    return _Sync(loop, sampled)


def _extism_raw(plugin: Any, data: bytes) -> _Sync:
    call = plugin.call

    def loop(n: int) -> int:
        t0 = clock()
        for _ in range(n):
            call("echo", data)
        return clock() - t0

    def sampled(n: int) -> list[int]:
        out = [0] * n
        for i in range(n):
            t0 = clock()
            call("echo", data)
            out[i] = clock() - t0
        return out

    return _Sync(loop, sampled)


def _wasmtime_call(add: Any, store: Any) -> _Sync:
    def loop(n: int) -> int:
        t0 = clock()
        for _ in range(n):
            add(store, 1, 2)
        return clock() - t0

    def sampled(n: int) -> list[int]:
        out = [0] * n
        for i in range(n):
            t0 = clock()
            add(store, 1, 2)
            out[i] = clock() - t0
        return out

    return _Sync(loop, sampled)


class _Unchecked:
    """wasmtime_func_call_unchecked(context, &func, raw[2], 2, &trap) through ctypes.

    The function object comes from its own CDLL handle on wasmtime-py's library, without
    ``argtypes``, and every argument is a ``c_void_p`` built once, so ctypes converts nothing
    per call; the arguments are written into the preallocated ``wasmtime_val_raw_t[2]``
    (which also receives the result), the error and trap are checked and the result read."""

    def __init__(self, add: Any, store: Any) -> None:
        from wasmtime import _ffi as ffi

        lib = ctypes.CDLL(ffi.dll._name)
        self.fn = lib.wasmtime_func_call_unchecked
        self.fn.restype = ctypes.c_void_p
        self.raw = (ffi.wasmtime_val_raw_t * 2)()
        self.trap = ctypes.c_void_p()
        self.ctx = ctypes.c_void_p(ctypes.cast(store._context(), ctypes.c_void_p).value)
        self.func = add._func  # keep the wasmtime_func_t alive
        self.fptr = ctypes.c_void_p(ctypes.addressof(add._func))
        self.rawp = ctypes.c_void_p(ctypes.addressof(self.raw))
        self.trapp = ctypes.c_void_p(ctypes.addressof(self.trap))
        self.n = ctypes.c_size_t(2)

    def one(self) -> int:
        r0, r1 = self.raw[0], self.raw[1]
        r0.i32 = 1
        r1.i32 = 2
        if self.fn(self.ctx, self.fptr, self.rawp, self.n, self.trapp) or self.trap.value:
            raise RuntimeError("wasmtime_func_call_unchecked failed")
        return r0.i32

    def sync(self) -> _Sync:
        fn, ctx, fptr, rawp, nargs, trapp, trap = (self.fn, self.ctx, self.fptr, self.rawp,
                                                   self.n, self.trapp, self.trap)
        r0, r1 = self.raw[0], self.raw[1]

        def loop(n: int) -> int:
            t0 = clock()
            for _ in range(n):
                r0.i32 = 1
                r1.i32 = 2
                if fn(ctx, fptr, rawp, nargs, trapp) or trap.value:
                    raise RuntimeError("wasmtime_func_call_unchecked failed")
                r0.i32
            return clock() - t0

        def sampled(n: int) -> list[int]:
            out = [0] * n
            for i in range(n):
                t0 = clock()
                r0.i32 = 1
                r1.i32 = 2
                if fn(ctx, fptr, rawp, nargs, trapp) or trap.value:
                    raise RuntimeError("wasmtime_func_call_unchecked failed")
                r0.i32
                out[i] = clock() - t0
            return out

        return _Sync(loop, sampled)


class _Async:
    """One of ours: ``await call(*args)``."""

    def __init__(self, call: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        self.call, self.args = call, args


Measurement = _Sync | _Async


async def _run_loop(m: Measurement, n: int) -> int:
    if isinstance(m, _Async):
        return await _loop_async(m.call, m.args, n)
    return m.loop(n)


async def _run_sampled(m: Measurement, n: int) -> list[int]:
    if isinstance(m, _Async):
        return await _sampled_async(m.call, m.args, n)
    return m.sampled(n)


async def _measure(measurements: dict[str, Measurement], c: dict[str, int], repetitions: int,
                   sampled: bool) -> dict[str, dict[str, Any]]:
    """Warm up, then ``repetitions`` rounds in which each measurement runs one timed loop
    (the order rotating from round to round); optionally one more round timed call by call."""
    n = c["calls_per_repetition"]
    for m in measurements.values():
        await _run_loop(m, c["warmup_calls"])
    per_rep: dict[str, list[float]] = {k: [] for k in measurements}
    names = list(measurements)
    gc.collect()
    gc.disable()
    try:
        for rep in range(repetitions):
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                per_rep[name].append(await _run_loop(measurements[name], n) / n / 1000)
        samples = {}
        if sampled:
            for name in names:
                samples[name] = await _run_sampled(measurements[name], c["sampled_calls"])
    finally:
        gc.enable()
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        reps = per_rep[name]
        out[name] = {"us": round(statistics.median(reps), 3),
                     "repetitions_us": [round(r, 3) for r in reps],
                     "min_us": round(min(reps), 3), "max_us": round(max(reps), 3)}
        if name in samples:
            s = sorted(samples[name])
            pct = lambda p: round(s[min(len(s) - 1, int(p * len(s)))] / 1000, 2)  # noqa: E731
            out[name]["sampled"] = {"n": len(s), "p50_us": pct(0.5), "p90_us": pct(0.9),
                                    "p99_us": pct(0.99), "max_us": round(s[-1] / 1000, 1)}
    return out


# -- setup ---------------------------------------------------------------------------------------

def _write_modules(workdir: Path) -> dict[str, Path]:
    import wasmtime

    paths = {}
    for name, wat in (("echo", ECHO_WAT), ("add", ADD_WAT), ("spin", SPIN_WAT)):
        path = workdir / f"bench-{name}.wasm"
        path.write_bytes(wasmtime.wat2wasm(wat))
        paths[name] = path
    return paths


def _baselines(paths: dict[str, Path]) -> dict[str, Any]:
    """The Extism plugin and the plain wasmtime Store, checked to answer as ours do."""
    import extism
    import orjson
    import wasmtime

    plugin = extism.Plugin(bytes(wasmtime.wat2wasm(EXTISM_ECHO_WAT)), wasi=False)
    raw = orjson.dumps([PAYLOAD])
    assert plugin.call("echo", raw) == raw
    assert orjson.loads(plugin.call("echo", orjson.dumps([PAYLOAD]))) == [PAYLOAD]
    store = wasmtime.Store(wasmtime.Engine())  # default Engine config
    module = wasmtime.Module(store.engine, paths["add"].read_bytes())
    add = wasmtime.Instance(store, module, []).exports(store)["add"]
    assert add(store, 1, 2) == 3
    unchecked = _Unchecked(add, store)
    assert unchecked.one() == 3
    return {"plugin": plugin, "raw": raw, "store": store, "add": add, "unchecked": unchecked}


# -- the long call: is the loop held? -------------------------------------------------------------

async def _loop_gap(spin: Any, c: dict[str, int]) -> dict[str, Any]:
    """Run ``spin`` for ~LONG_CALL_S while a task sleeps TICK_S in a loop; the largest gap
    between the sleeper's wake-ups during the call says how long the loop was held."""
    # Calibrate the iteration count through the same path (fuel and epoch checks included).
    n = 2_000_000
    for _ in range(6):
        t0 = time.perf_counter()
        await spin.call("spin", n)
        elapsed = time.perf_counter() - t0
        if elapsed > LONG_CALL_S / 4 and abs(elapsed / LONG_CALL_S - 1) < 0.15:
            break
        n = max(1000, int(n * LONG_CALL_S / max(elapsed, 1e-6)))

    wakeups: list[float] = []
    stop = asyncio.Event()

    async def sleeper() -> None:
        perf = time.perf_counter
        wakeups.append(perf())
        while not stop.is_set():
            await asyncio.sleep(TICK_S)
            wakeups.append(perf())

    def gaps_within(start: float, end: float) -> list[float]:
        return [b - a for a, b in zip(wakeups, wakeups[1:]) if b > start and a < end]

    task = asyncio.create_task(sleeper())
    await asyncio.sleep(0.05)  # the sleeper is running
    # Idle: the same sleeper with nothing else on the loop, for as long as a call takes.
    t0 = time.perf_counter()
    await asyncio.sleep(LONG_CALL_S)
    idle = gaps_within(t0, time.perf_counter())
    calls = []
    for _ in range(c["long_calls"]):
        t0 = time.perf_counter()
        await spin.call("spin", n)
        t1 = time.perf_counter()
        await asyncio.sleep(0.01)
        gaps = gaps_within(t0, t1)
        calls.append({"call_ms": round((t1 - t0) * 1000, 1),
                      "max_gap_ms": round(max(gaps) * 1000, 2) if gaps else None,
                      "wakeups": len(gaps)})
    stop.set()
    await task
    gaps = [x["max_gap_ms"] for x in calls if x["max_gap_ms"] is not None]
    return {
        "long_call_loop_gap_ms": max(gaps) if gaps else None,
        "long_call_ms": round(statistics.median(x["call_ms"] for x in calls), 1),
        "idle_loop_gap_ms": round(max(idle) * 1000, 2) if idle else None,
        "long_calls": calls,
        "spin_iterations": n,
    }


# -- the runs ------------------------------------------------------------------------------------

async def _default_loop_run(paths: dict[str, Path], c: dict[str, int]) -> dict[str, Any]:
    from sandboxer import PluginManager

    base = _baselines(paths)
    async with PluginManager() as mgr:
        echo = await mgr.load(paths["echo"])
        add = await mgr.load(paths["add"])
        spin = await mgr.load(paths["spin"])
        assert await echo.call("echo", PAYLOAD) == [PAYLOAD]
        assert await add.call("add", 1, 2) == 3
        echo_handle, add_handle = echo.handle, add.handle
        assert echo_handle is not None and add_handle is not None
        measurements: dict[str, Measurement] = {
            "echo": _Async(echo.call, ("echo", PAYLOAD)),
            "extism_echo": _extism_json(base["plugin"]),
            "extism_echo_raw": _extism_raw(base["plugin"], base["raw"]),
            "echo_direct": _Async(echo_handle.call, ("echo", PAYLOAD)),
            "add": _Async(add.call, ("add", 1, 2)),
            "wasmtime_add": _wasmtime_call(base["add"], base["store"]),
            "wasmtime_unchecked_add": base["unchecked"].sync(),
            "add_direct": _Async(add_handle.call, ("add", 1, 2)),
        }
        figures = await _measure(measurements, c, c["repetitions"], sampled=True)
        gap = await _loop_gap(spin, c)
    return {"loop": describe_loop(asyncio.get_running_loop()), "figures": figures,
            "gap": gap}


async def _uvloop_run(paths: dict[str, Path], c: dict[str, int]) -> dict[str, Any]:
    from sandboxer import PluginManager

    base = _baselines(paths)
    async with PluginManager() as mgr:
        echo = await mgr.load(paths["echo"])
        add = await mgr.load(paths["add"])
        assert await echo.call("echo", PAYLOAD) == [PAYLOAD]
        measurements: dict[str, Measurement] = {
            "echo": _Async(echo.call, ("echo", PAYLOAD)),
            "extism_echo": _extism_json(base["plugin"]),
            "add": _Async(add.call, ("add", 1, 2)),
            "wasmtime_add": _wasmtime_call(base["add"], base["store"]),
        }
        figures = await _measure(measurements, c, c["uvloop_repetitions"], sampled=False)
    return {"loop": describe_loop(asyncio.get_running_loop()), "figures": figures}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def run() -> dict[str, Any]:
    c = _counts()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sandboxer-bench-wasm-") as tmp:
        paths = _write_modules(Path(tmp))
        with asyncio.Runner() as runner:
            default = runner.run(_default_loop_run(paths, c))
        default_seconds = time.monotonic() - started
        try:
            import uvloop
        except ImportError as exc:
            uv: dict[str, Any] | None = None
            uv_missing = f"uvloop does not import: {exc}"
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                uv = runner.run(_uvloop_run(paths, c))
            uv["loop"] += f" uvloop {uvloop.__version__}"
            uv_missing = None
    f = {k: v["us"] for k, v in default["figures"].items()}
    gap = default["gap"]
    echo_ratio = _ratio(f["echo"], f["extism_echo"])
    add_ratio = _ratio(f["add"], f["wasmtime_add"])
    loop = default["loop"]
    result: dict[str, Any] = {
        "echo_us": f["echo"],
        "extism_echo_us": f["extism_echo"],
        "extism_echo_raw_us": f["extism_echo_raw"],
        "echo_ratio_vs_extism": echo_ratio,
        "echo_ratio_vs_extism_raw": _ratio(f["echo"], f["extism_echo_raw"]),
        "add_us": f["add"],
        "wasmtime_add_us": f["wasmtime_add"],
        "add_ratio_vs_wasmtime_call": add_ratio,
        "wasmtime_unchecked_add_us": f["wasmtime_unchecked_add"],
        "add_ratio_vs_wasmtime_unchecked": _ratio(f["add"], f["wasmtime_unchecked_add"]),
        "add_direct_us": f["add_direct"],
        "echo_direct_us": f["echo_direct"],
        "manager_routing_us": {"echo": round(f["echo"] - f["echo_direct"], 3),
                               "add": round(f["add"] - f["add_direct"], 3)},
        "long_call_loop_gap_ms": gap["long_call_loop_gap_ms"],
        "long_call_ms": gap["long_call_ms"],
        "idle_loop_gap_ms": gap["idle_loop_gap_ms"],
        "p99_us": {name: v["sampled"]["p99_us"] for name, v in default["figures"].items()},
        "targets": dict(TARGETS),
        "met": {
            "echo_ratio_vs_extism":
                echo_ratio is not None and echo_ratio <= TARGETS["echo_ratio_vs_extism"],
            "add_ratio_vs_wasmtime_call":
                add_ratio is not None and add_ratio <= TARGETS["add_ratio_vs_wasmtime_call"],
        },
        "baselines": {
            "echo_us": f"ours: `await p.call('echo', 'hello')` through PluginManager "
                       f"(LoadedPlugin.call -> WasmHandle.call) on a JSON-ABI echo plugin "
                       f"written in WAT, loaded as a bare .wasm with the default profile (30 s "
                       f"timeout, no fuel); returns ['hello']; on {loop}",
            "extism_echo_us": "Extism Python SDK: `orjson.loads(plugin.call('echo', "
                              "orjson.dumps(['hello'])))` on extism.Plugin(wasm, wasi=False) "
                              "of an echo written in WAT against extism:host/env (input bytes "
                              "copied to a new block with alloc/store_u8, output_set), "
                              "called synchronously in the same process (no event loop "
                              "involved); JSON encode and decode included, as ours does both",
            "extism_echo_raw_us": "the same Extism plugin and call with the pre-encoded "
                                  "bytes b'[\"hello\"]', bytes out (its default parse), no JSON",
            "echo_direct_us": "ours without the manager: `await handle.call('echo', 'hello')` "
                              "on the generation's WasmHandle (p.handle)",
            "add_us": f"ours: `await p.call('add', 1, 2)` through PluginManager on a WAT module "
                      f"exporting add(i32, i32) -> i32, bare .wasm, default profile; on {loop}",
            "wasmtime_add_us": "wasmtime-py `add(store, 1, 2)` (Func.__call__, which checks "
                               "and converts every value) on the same module in a plain Store "
                               "of a default-config Engine (no fuel, no epochs), in a plain "
                               "synchronous loop",
            "wasmtime_unchecked_add_us": "context, not a target: wasmtime_func_call_unchecked("
                                         "context, &func, raw, 2, &trap) through ctypes on "
                                         "the same Store, with a preallocated "
                                         "wasmtime_val_raw_t[2] and c_void_p arguments built "
                                         "once (no argtypes conversion); per call the two "
                                         "arguments are written, error and trap checked and "
                                         "the result read: the floor for any Python caller",
            "add_direct_us": "ours without the manager: `await handle.call('add', 1, 2)` on "
                             "the generation's WasmHandle (p.handle)",
            "echo_us_uvloop": "echo_us with the host application on uvloop (a fresh "
                              "PluginManager in a uvloop Runner, after the default-loop run)",
            "add_us_uvloop": "add_us on uvloop, likewise",
            "long_call_loop_gap_ms": f"default loop: the largest interval between wake-ups of "
                                     f"a task looping on asyncio.sleep({TICK_S}) while "
                                     f"`await p.call('spin', n)` runs (~{LONG_CALL_S * 1000:.0f}"
                                     f" ms of wasm, n calibrated through the same call), over "
                                     f"{c['long_calls']} calls; idle_loop_gap_ms is the same "
                                     f"sleeper with no call running",
        },
        "figures": default["figures"],
        "long_call": gap,
        "config": {
            **c,
            "payload": PAYLOAD,
            "scale": scale(),
            "loop": loop,
            "method": "one process; each figure is the median over repetitions of a timed "
                      "loop (perf_counter_ns around the loop, divided by its calls); in each "
                      "repetition every measurement runs once, order rotating; ours are "
                      "awaited sequentially in one coroutine, baselines are plain "
                      "synchronous loops run from the same coroutine; warm-up before; gc "
                      "disabled in every measured loop; the p99s come from one extra round "
                      "timed call by call",
            "default_loop_seconds": round(default_seconds, 1),
            "versions": versions("wasmtime", "extism", "extism-sys", "orjson", "uvloop"),
        },
    }
    if uv is not None:
        u = {k: v["us"] for k, v in uv["figures"].items()}
        result["echo_us_uvloop"] = u["echo"]
        result["add_us_uvloop"] = u["add"]
        result["uvloop"] = {
            "loop": uv["loop"],
            "echo_us": u["echo"],
            "add_us": u["add"],
            "extism_echo_us": u["extism_echo"],
            "wasmtime_add_us": u["wasmtime_add"],
            "echo_ratio_vs_extism": _ratio(u["echo"], u["extism_echo"]),
            "add_ratio_vs_wasmtime_call": _ratio(u["add"], u["wasmtime_add"]),
            "note": "extism_echo and wasmtime_add re-measured in this run, interleaved "
                    "with the uvloop figures (the same synchronous calls; the loop does not "
                    "take part in them)",
            "figures": uv["figures"],
        }
    else:
        result["uvloop"] = {"unavailable": uv_missing}
    return result


def format_table(result: dict[str, Any]) -> str:
    """The readable table the runner prints."""
    figures = result["figures"]
    rows = [("measurement", "median µs", "reps min-max µs", "p50 µs", "p99 µs")]
    for name, d in figures.items():
        s = d.get("sampled", {})
        rows.append((name, f"{d['us']:.2f}", f"{d['min_us']:.2f}-{d['max_us']:.2f}",
                     f"{s.get('p50_us', '-')}", f"{s.get('p99_us', '-')}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    met = result["met"]
    lines.append("")
    lines.append(f"echo: {result['echo_us']} µs; vs Extism (JSON) {result['extism_echo_us']} µs "
                 f"= {result['echo_ratio_vs_extism']} (target <= "
                 f"{TARGETS['echo_ratio_vs_extism']}: "
                 f"{'met' if met['echo_ratio_vs_extism'] else 'NOT met'}); vs Extism raw "
                 f"{result['extism_echo_raw_us']} µs = {result['echo_ratio_vs_extism_raw']}")
    lines.append(f"add: {result['add_us']} µs; vs wasmtime Func.__call__ "
                 f"{result['wasmtime_add_us']} µs = {result['add_ratio_vs_wasmtime_call']} "
                 f"(target <= {TARGETS['add_ratio_vs_wasmtime_call']}: "
                 f"{'met' if met['add_ratio_vs_wasmtime_call'] else 'NOT met'}); unchecked "
                 f"ctypes floor {result['wasmtime_unchecked_add_us']} µs; handle direct "
                 f"{result['add_direct_us']} µs")
    u = result.get("uvloop", {})
    if "echo_us" in u:
        lines.append(f"uvloop: echo {u['echo_us']} µs (×{u['echo_ratio_vs_extism']} Extism), "
                     f"add {u['add_us']} µs (×{u['add_ratio_vs_wasmtime_call']} wasmtime)")
    else:
        lines.append(f"uvloop: not measured: {u.get('unavailable')}")
    lines.append(f"long call ({result['long_call_ms']} ms of wasm): largest loop gap "
                 f"{result['long_call_loop_gap_ms']} ms (idle: {result['idle_loop_gap_ms']} ms)")
    return "\n".join(lines)
