"""Hot-reload benchmark: how long a file change takes to be serving, and what callers see.

For each kind (python in the sandboxed plugin host, native C, wasm in-process, external
executable) one of the examples is copied into a temp dir and loaded with
``PluginManager(hot_reload=True, reload_debounce=0.05)``; a replacement of its code file is
written beside the copy (in a staging dir on the same filesystem, outside the watched tree)
and ``os.replace``d into place, which is the moment every latency starts from
(benchmarks/README.md, section "reload"):

  reload_p50_ms / p90 / max    file renamed into place -> the ``reloaded`` event's ``at``
                               (the switch: the new generation takes calls). The debounce
                               (``debounce_s``) is part of it. No calls are running.
  detect_p50_ms                file renamed -> the plugin's ``state`` event to ``reloading``
                               (the watcher noticed, debounced, checksummed, took the lock)
  done_p50_ms                  file renamed -> the watcher's reload finished (old generation
                               drained, shut down and closed; the plugin's lock released)
  reload_call_p50_ms / p90 / max
                               ``await mgr.reload(id)`` called directly on a second manager
                               without hot reload (no watcher, no checksums), same example in
                               its own copy, with the same replacement renamed into place just
                               before (untimed), start to return (this includes step 4, the
                               old generation's drain and shutdown);
                               ``reload_call_switch_p50_ms`` is call start -> its ``reloaded``
                               event
  reload_call_unchanged_p50_ms the same with the files unchanged (for wasm the compiled module
                               is then reused from the engine's cache: no compile)
  worst_call_during_reload_ms  a caller task calls a cheap method in a loop (``await
  / p99_call_during_reload_ms  p.call(...)`` then ``await asyncio.sleep(0)``) while file
                               changes are reloaded one after another; a call counts as
                               "during a reload" if it overlaps [rename, reload finished]
  worst_call_steady_ms         **the baseline**: the same caller task, same loop, same plugin
  / p99_call_steady_ms         and generation lineage, over a steady period as long as the
                               reload period (half right before it, half right after), with
                               no reload running
  reload_under_calls_p50_ms    reload_p50_ms measured during that caller loop

The idle reloads take turns (watched, direct, direct unchanged, watched, ...), so noise on the
machine hits each alike. ``run()`` returns the dict stored under "reload" in
benchmarks/results/latest.json. No targets: figures only.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ._results import describe_loop, scale, versions

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DEBOUNCE_S = 0.05
GAP_S = 0.1            # pause after a reload finished, before the next file change
RELOAD_TIMEOUT_S = 60  # a reload that takes longer fails the benchmark
WARMUP_S = 0.3         # caller loop before the first steady window (not counted)

clock = time.perf_counter_ns


# -- the kinds: which example, which file is replaced, which cheap call ----------------------------

def _python_module(original: bytes, i: int) -> bytes:
    """counter/__init__.py with VERSION = "1.0.0+r<i>": version() answers the new one."""
    old = b'VERSION = "1.0.0"'
    assert old in original, "examples/counter/counter/__init__.py no longer sets VERSION"
    return original.replace(old, f'VERSION = "1.0.0+r{i}"'.encode())


def _elf_with_trailer(original: bytes, i: int) -> bytes:
    """libhello.so with bytes appended after its end: the loader ignores them, the checksum
    does not (the same code, a new file)."""
    return original + f"\0sandboxer-bench-reload {i}\0".encode()


def _leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _wasm_with_custom_section(original: bytes, i: int) -> bytes:
    """hello.wasm with a custom section appended (valid anywhere; ignored by wasmtime)."""
    name = b"sandboxer-bench-reload"
    body = _leb128(len(name)) + name + str(i).encode()
    return original + b"\x00" + _leb128(len(body)) + body


def _external_script(original: bytes, i: int) -> bytes:
    """plugin.py serving as version 1.0.<i> (same functions)."""
    old = b'version="1.0.0"'
    assert old in original, "examples/external-python/plugin.py no longer serves version 1.0.0"
    return original.replace(old, f'version="1.0.{i}"'.encode())


@dataclass(frozen=True)
class Kind:
    example: str
    replaced: str                       # the file renamed into place, relative to the example
    method: str
    args: tuple[Any, ...]
    expect: Any                         # the cheap call's answer (None: not checked)
    mutate: Callable[[bytes, int], bytes]
    make: bool = False                  # built with `make -C examples/<example>`
    answer_is_version: bool = False     # the cheap call's answer names the new code


KINDS: dict[str, Kind] = {
    "python": Kind("counter", "counter/__init__.py", "version", (), None, _python_module,
                   answer_is_version=True),
    "native": Kind("native-c", "libhello.so", "add", (1, 2), 3, _elf_with_trailer, make=True),
    "wasm": Kind("wasm-c", "hello.wasm", "echo", ("x",), ["x"], _wasm_with_custom_section,
                 make=True),
    "external": Kind("external-python", "plugin.py", "add", (1, 2), 3, _external_script),
}


def _counts() -> dict[str, int]:
    s = scale()
    return {"reloads": max(2, round(8 * s)),              # watched and direct, idle
            "unchanged_reloads": max(1, round(4 * s)),    # direct, files unchanged
            "reloads_under_calls": max(2, round(6 * s))}


# -- helpers -----------------------------------------------------------------------------------

def _ms(ns: float) -> float:
    return round(ns / 1e6, 3)


def _pct(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


def _summary(values_ms: list[float]) -> dict[str, Any]:
    s = sorted(values_ms)
    if not s:
        return {"n": 0}
    return {"n": len(s), "p50_ms": round(statistics.median(s), 2), "p90_ms": round(_pct(s, 0.9), 2),
            "min_ms": round(s[0], 2), "max_ms": round(s[-1], 2)}


def _call_stats(latencies_ns: list[int]) -> dict[str, Any]:
    s = sorted(latencies_ns)
    if not s:
        return {"n": 0}
    return {"n": len(s), "p50_ms": _ms(_pct(s, 0.5)), "p90_ms": _ms(_pct(s, 0.9)),
            "p99_ms": _ms(_pct(s, 0.99)), "p999_ms": _ms(_pct(s, 0.999)),
            "max_ms": _ms(s[-1])}


class Events:
    """Every event of one manager, pumped into a list as it comes."""

    def __init__(self, mgr: Any) -> None:
        self.seen: list[Any] = []
        self._new = asyncio.Event()
        self._stream = mgr.events()
        self._task = asyncio.ensure_future(self._pump())

    async def _pump(self) -> None:
        async for event in self._stream:
            self.seen.append(event)
            self._new.set()

    async def wait(self, predicate: Callable[[Any], bool], start: int,
                   timeout: float = RELOAD_TIMEOUT_S) -> Any:
        """The first event from index ``start`` on that matches."""
        async with asyncio.timeout(timeout):
            i = start
            while True:
                while i < len(self.seen):
                    if predicate(self.seen[i]):
                        return self.seen[i]
                    i += 1
                self._new.clear()
                await self._new.wait()

    async def aclose(self) -> None:
        await self._stream.aclose()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def _until_idle(mgr: Any, plugin_id: str) -> None:
    """Until no reload holds the plugin's lock (the watcher's reload finished: old generation
    drained, shut down, closed). The lock is private; there is no event for it."""
    async with asyncio.timeout(RELOAD_TIMEOUT_S):
        while mgr._lock(plugin_id).locked():
            await asyncio.sleep(0.002)


class Files:
    """The example's replaced file in one copy: ``stage(i)`` writes replacement i to a staging
    dir on the same filesystem (outside the plugin's tree, so the watcher sees nothing), and
    ``swap()`` renames it into place."""

    def __init__(self, kind: Kind, root: Path, staging: Path) -> None:
        self.kind = kind
        self.target = root / kind.replaced
        staging.mkdir()
        self.staging = staging / self.target.name
        self.original = self.target.read_bytes()
        self.mode = self.target.stat().st_mode & 0o7777

    def stage(self, i: int) -> None:
        self.staging.write_bytes(self.kind.mutate(self.original, i))
        os.chmod(self.staging, self.mode)

    def swap(self) -> None:
        os.replace(self.staging, self.target)


async def _watched(mgr: Any, events: Events, plugin: Any, files: Files, i: int
                   ) -> dict[str, Any]:
    """Rename replacement i into place; wait for its reload to finish (switch and retire)."""
    from sandboxer import PluginState

    files.stage(i)
    pid, generation = plugin.id, plugin.generation
    mark = len(events.seen)
    wall, t0 = time.time(), clock()
    files.swap()
    event = await events.wait(
        lambda e: e.plugin_id == pid and e.type in ("reloaded", "reload_failed"), mark)
    if event.type == "reload_failed":
        raise RuntimeError(f"reload {i} of {pid} failed: {event.error}")
    started = await events.wait(
        lambda e: e.plugin_id == pid and e.type == "state"
        and e.state is PluginState.RELOADING, mark, timeout=1)
    await _until_idle(mgr, pid)
    t1 = clock()
    if plugin.generation != generation + 1:
        raise RuntimeError(f"{pid}: generation {plugin.generation} after one change from "
                           f"generation {generation}")
    return {"switch_ms": (event.at.timestamp() - wall) * 1000,
            "detect_ms": (started.at.timestamp() - wall) * 1000,
            "done_ms": (t1 - t0) / 1e6, "interval_ns": (t0, t1), "version": f"1.0.0+r{i}"}


async def direct_reload(mgr: Any, events: Events, plugin: Any, files: Files | None, i: int
                        ) -> dict[str, Any]:
    """``await mgr.reload(id)`` timed; with ``files``, replacement i is renamed into place
    first (untimed; nothing watches this copy), so the reload loads new code as a watched one
    does; without, the files are unchanged. Returns ``call_ms`` (the call to its return) and
    ``switch_ms`` (the call to its ``reloaded`` event). benchmarks/startup.py measures its
    ``reload_switch_ms`` with this too."""
    if files is not None:
        files.stage(i)
        files.swap()
    pid, generation = plugin.id, plugin.generation
    mark = len(events.seen)
    wall, t0 = time.time(), clock()
    await mgr.reload(pid)
    t1 = clock()
    event = await events.wait(lambda e: e.plugin_id == pid and e.type == "reloaded", mark,
                              timeout=5)
    assert plugin.generation == generation + 1
    return {"call_ms": (t1 - t0) / 1e6, "switch_ms": (event.at.timestamp() - wall) * 1000}


def copy_example(example: Path, dest: Path) -> Path:
    shutil.copytree(example, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


# -- the caller loop ---------------------------------------------------------------------------

class _Caller:
    """``await p.call(method, *args)`` then ``await asyncio.sleep(0)``, in a loop, each call
    timed with perf_counter_ns. The sleep(0) lets the rest of the loop run even when a call
    completes without suspending (wasm, in-process); it is the same in every period."""

    def __init__(self, plugin: Any, kind: Kind) -> None:
        self.plugin, self.kind = plugin, kind
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.errors: list[tuple[int, str]] = []
        self.wrong: int = 0
        self.answers: list[tuple[int, Any]] = []  # (end, answer) whenever the answer changes
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        self._stop = True
        assert self._task is not None
        await self._task

    async def _loop(self) -> None:
        call, method, args = self.plugin.call, self.kind.method, self.kind.args
        expect, track = self.kind.expect, self.kind.answer_is_version
        starts, ends = self.starts, self.ends
        last: Any = object()
        while not self._stop:
            t0 = clock()
            try:
                answer = await call(method, *args)
            except Exception as exc:  # counted; a reload should never fail a call
                t1 = clock()
                self.errors.append((t1, f"{type(exc).__name__}: {exc}"))
            else:
                t1 = clock()
                if track:
                    if answer != last:
                        self.answers.append((t1, answer))
                        last = answer
                elif answer != expect:
                    self.wrong += 1
            starts.append(t0)
            ends.append(t1)
            await asyncio.sleep(0)

    def within(self, a: int, b: int) -> list[int]:
        """Latencies of the calls that started and ended inside [a, b]."""
        lo = bisect.bisect_left(self.starts, a)
        out = []
        for k in range(lo, len(self.starts)):
            if self.starts[k] > b:
                break
            if self.ends[k] <= b:
                out.append(self.ends[k] - self.starts[k])
        return out

    def overlapping(self, a: int, b: int) -> list[int]:
        """Indices of the calls that overlap [a, b] (started before b, ended after a)."""
        hi = bisect.bisect_right(self.starts, b)
        # A call that started before a is at most one call before a's index (calls are
        # sequential, one at a time).
        lo = max(0, bisect.bisect_left(self.starts, a) - 1)
        return [k for k in range(lo, hi) if self.ends[k] > a]


# -- one kind ----------------------------------------------------------------------------------

async def _run_kind(name: str, kind: Kind, tmp: Path, c: dict[str, int]) -> dict[str, Any]:
    from sandboxer import PluginManager

    example = EXAMPLES / kind.example
    watched_dir = copy_example(example, tmp / "watched" / kind.example)
    direct_dir = copy_example(example, tmp / "direct" / kind.example)

    async with PluginManager(hot_reload=True, reload_debounce=DEBOUNCE_S) as mgr, \
            PluginManager() as direct_mgr:
        events, direct_events = Events(mgr), Events(direct_mgr)
        try:
            plugin = await mgr.load(watched_dir)
            direct_plugin = await direct_mgr.load(direct_dir)
            for p in (plugin, direct_plugin):
                answer = await p.call(kind.method, *kind.args)
                assert kind.expect is None or answer == kind.expect, answer
            sandbox = plugin.sandbox
            facts = {"plugin_id": plugin.id, "sandboxed": bool(sandbox and sandbox.enabled),
                     "fallbacks": list(plugin.fallbacks)}
            await asyncio.sleep(0.3)  # the watcher is up and has reported the plugin as added
            w = Files(kind, watched_dir, tmp / "staging-watched")
            d = Files(kind, direct_dir, tmp / "staging-direct")

            # 1. idle: watched, direct (new code), direct (unchanged files; fewer), in turn
            gc.collect()
            watched, direct, unchanged = [], [], []
            n = 0
            for i in range(c["reloads"]):
                n += 1
                watched.append(await _watched(mgr, events, plugin, w, n))
                await asyncio.sleep(GAP_S)
                direct.append(await direct_reload(direct_mgr, direct_events, direct_plugin, d, n))
                await asyncio.sleep(GAP_S)
                if i < c["unchanged_reloads"]:
                    unchanged.append(await direct_reload(direct_mgr, direct_events, direct_plugin,
                                                   None, n))
                    await asyncio.sleep(GAP_S)
            if kind.answer_is_version:
                got = await plugin.call(kind.method, *kind.args)
                assert got == f"1.0.0+r{n}", (got, n)

            # 2. under calls: steady, reloads, steady (the steady halves add up to the reload
            # period's length)
            per_reload_s = statistics.median(x["done_ms"] for x in watched) / 1000 + GAP_S
            first_half_s = per_reload_s * c["reloads_under_calls"] / 2
            gc.collect()
            caller = _Caller(plugin, kind)
            caller.start()
            await asyncio.sleep(WARMUP_S)
            s1 = clock()
            await asyncio.sleep(first_half_s)
            r0 = clock()
            under = []
            for _ in range(c["reloads_under_calls"]):
                n += 1
                under.append(await _watched(mgr, events, plugin, w, n))
                await asyncio.sleep(GAP_S)
            r1 = clock()
            second_half_s = max(0.0, (r1 - r0) / 1e9 - first_half_s)
            await asyncio.sleep(second_half_s)
            s2 = clock()
            await caller.stop()
            answer_after = await plugin.call(kind.method, *kind.args)
        finally:
            await events.aclose()
            await direct_events.aclose()

    # -- the figures for this kind
    steady = caller.within(s1, r0) + caller.within(r1, s2)
    counted: set[int] = set()
    per_reload_worst = []
    for x in under:
        lats = [caller.ends[k] - caller.starts[k] for k in caller.overlapping(*x["interval_ns"])]
        per_reload_worst.append(_ms(max(lats)) if lats else None)
        counted.update(caller.overlapping(*x["interval_ns"]))
    during = [caller.ends[k] - caller.starts[k] for k in sorted(counted)]
    steady_stats, during_stats = _call_stats(steady), _call_stats(during)
    sw = _summary([x["switch_ms"] for x in watched])
    dc = _summary([x["call_ms"] for x in direct])
    du = _summary([x["call_ms"] for x in unchanged])
    calls: dict[str, Any] = {
        "during_reload": during_stats,
        "steady": steady_stats,
        "during_reload_seconds": round(sum(b - a for a, b in (x["interval_ns"] for x in under))
                                       / 1e9, 2),
        "steady_seconds": round(((r0 - s1) + (s2 - r1)) / 1e9, 2),
        "reload_period_seconds": round((r1 - r0) / 1e9, 2),
        "calls_per_s_steady": round(len(steady) / (((r0 - s1) + (s2 - r1)) / 1e9)),
        "per_reload_worst_ms": per_reload_worst,
        "errors": len(caller.errors),
        "first_errors": [e for _, e in caller.errors[:3]],
        "wrong_answers": caller.wrong,
    }
    if kind.answer_is_version:
        # file renamed -> the first call that returned the new VERSION (call end)
        firsts = []
        for x in under:
            t_rename = x["interval_ns"][0]
            hit = next((t for t, a in caller.answers if a == x["version"] and t >= t_rename),
                       None)
            if hit is not None:
                firsts.append((hit - t_rename) / 1e6)
        calls["first_new_answer_ms"] = _summary(firsts)
        assert answer_after == f"1.0.0+r{n}", (answer_after, n)
    su = _summary([x["switch_ms"] for x in under])
    return {
        **facts,
        "example": f"examples/{kind.example}",
        "replaced_file": kind.replaced,
        "cheap_call": f"{kind.method}({', '.join(repr(a) for a in kind.args)})",
        "reload_p50_ms": sw["p50_ms"], "reload_p90_ms": sw["p90_ms"],
        "reload_max_ms": sw["max_ms"],
        "detect_p50_ms": round(statistics.median(x["detect_ms"] for x in watched), 2),
        "done_p50_ms": round(statistics.median(x["done_ms"] for x in watched), 2),
        "reload_call_p50_ms": dc["p50_ms"], "reload_call_p90_ms": dc["p90_ms"],
        "reload_call_max_ms": dc["max_ms"],
        "reload_call_switch_p50_ms": round(statistics.median(x["switch_ms"] for x in direct), 2),
        "reload_call_unchanged_p50_ms": du["p50_ms"],
        "worst_call_during_reload_ms": during_stats.get("max_ms"),
        "worst_call_steady_ms": steady_stats.get("max_ms"),
        "p99_call_during_reload_ms": during_stats.get("p99_ms"),
        "p99_call_steady_ms": steady_stats.get("p99_ms"),
        "p50_call_steady_ms": steady_stats.get("p50_ms"),
        "worst_call_ratio_vs_steady": (
            round(during_stats["max_ms"] / steady_stats["max_ms"], 2)
            if during_stats.get("max_ms") and steady_stats.get("max_ms") else None),
        "reload_under_calls_p50_ms": su["p50_ms"],
        "reload_under_calls_max_ms": su["max_ms"],
        "watched": {"switch_ms": sw, "reloads_ms": [round(x["switch_ms"], 2) for x in watched],
                    "detect_ms": [round(x["detect_ms"], 2) for x in watched],
                    "done_ms": [round(x["done_ms"], 2) for x in watched]},
        "direct": {"call_ms": dc, "calls_ms": [round(x["call_ms"], 2) for x in direct],
                   "switch_ms": [round(x["switch_ms"], 2) for x in direct]},
        "direct_unchanged": {"call_ms": du,
                             "calls_ms": [round(x["call_ms"], 2) for x in unchanged],
                             "switch_ms": [round(x["switch_ms"], 2) for x in unchanged]},
        "under_calls": {"switch_ms": su,
                        "reloads_ms": [round(x["switch_ms"], 2) for x in under],
                        "done_ms": [round(x["done_ms"], 2) for x in under]},
        "calls": calls,
    }


def _make(example: str) -> str | None:
    """Build an example with its Makefile; None, or why it could not be built."""
    try:
        out = subprocess.run(["make", "-C", str(EXAMPLES / example)], capture_output=True,
                             text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"make -C examples/{example}: {exc}"
    if out.returncode != 0:
        return f"make -C examples/{example} failed: {(out.stderr or out.stdout).strip()[-500:]}"
    return None


def run() -> dict[str, Any]:
    c = _counts()
    result: dict[str, Any] = {"debounce_s": DEBOUNCE_S}
    seconds: dict[str, float] = {}
    loop_name = None
    for name, kind in KINDS.items():
        started = time.monotonic()
        why = _make(kind.example) if kind.make else None
        if why is None and not (EXAMPLES / kind.example / kind.replaced).exists():
            why = f"examples/{kind.example}/{kind.replaced} does not exist"
        if why is not None:  # a kind that cannot be measured fails the run
            raise RuntimeError(f"reload benchmark, {name}: {why}")
        with tempfile.TemporaryDirectory(prefix=f"sandboxer-bench-reload-{name}-") as tmp:
            with asyncio.Runner() as runner:
                result[name] = runner.run(_run_kind(name, kind, Path(tmp), c))
                loop_name = describe_loop(runner.get_loop())
        seconds[name] = round(time.monotonic() - started, 1)
        print(f"  {name}: reload p50 {result[name]['reload_p50_ms']} ms, direct "
              f"{result[name]['reload_call_p50_ms']} ms ({seconds[name]} s)", flush=True)
    result["baselines"] = {
        "worst_call_steady_ms": "the baseline for worst_call_during_reload_ms (and "
                                "p99_call_steady_ms for p99_call_during_reload_ms): the same "
                                "caller task (`await p.call(<cheap_call>)` then `await "
                                "asyncio.sleep(0)`, in a loop, each call timed with "
                                "perf_counter_ns) on the same plugin and manager, same loop, "
                                "over a steady period with no reload running, as long as the "
                                "reload period (half right before it, half right after); "
                                f"on {loop_name}",
        "worst_call_during_reload_ms": "that caller loop while the example's code file is "
                                       "replaced and hot-reloaded, one reload after another "
                                       f"(each followed by a {GAP_S * 1000:.0f} ms pause); "
                                       "counted: every call that overlaps [rename, the "
                                       "watcher's reload finished]",
        "reload_p50_ms": f"PluginManager(hot_reload=True, reload_debounce={DEBOUNCE_S}): "
                         "time.time() right before os.replace(staged, <example file>) -> the "
                         "`reloaded` event's `at`; no calls running",
        "reload_call_p50_ms": "`await mgr.reload(id)` on a PluginManager() without hot reload "
                              "(no watcher), on its own copy of the example, timed around "
                              "the await (switch and old generation's retirement), the same "
                              "replacement file renamed into place just before (untimed); "
                              "taking turns with the watched reloads; no calls running",
        "reload_call_unchanged_p50_ms": "the same call with the files unchanged",
    }
    result["config"] = {
        **c,
        "scale": scale(),
        "debounce_s": DEBOUNCE_S,
        "gap_s": GAP_S,
        "loop": loop_name,
        "kind_seconds": seconds,
        "method": "per kind: one asyncio.Runner; the example copied to a temp dir twice (one "
                  "watched by a hot-reloading manager, one reloaded directly by a second "
                  "manager); the replacement file written to a staging dir on the same "
                  "filesystem and renamed into place; each reload waited for to the end "
                  "(the plugin's lock released) before the next change; gc enabled "
                  "(collected before each phase)",
        "versions": versions("wasmtime"),
    }
    return result


def format_table(result: dict[str, Any]) -> str:
    """The readable table the runner prints."""
    rows = [("kind", "reload p50/p90/max ms", "detect p50", "direct p50/max ms", "unchanged",
             "under calls p50", "worst call reload/steady ms", "p99 reload/steady ms", "errors")]
    notes = []
    for name in KINDS:
        r = result.get(name, {})
        if not r:
            continue
        rows.append((
            name + ("" if r["sandboxed"] else " (unsandboxed)"),
            f"{r['reload_p50_ms']}/{r['reload_p90_ms']}/{r['reload_max_ms']}",
            f"{r['detect_p50_ms']}",
            f"{r['reload_call_p50_ms']}/{r['reload_call_max_ms']}",
            f"{r['reload_call_unchanged_p50_ms']}",
            f"{r['reload_under_calls_p50_ms']}",
            f"{r['worst_call_during_reload_ms']}/{r['worst_call_steady_ms']}",
            f"{r['p99_call_during_reload_ms']}/{r['p99_call_steady_ms']}",
            f"{r['calls']['errors']}",
        ))
        first = r["calls"].get("first_new_answer_ms")
        if first:
            notes.append(f"{name}: file change -> first call answering the new version: p50 "
                         f"{first.get('p50_ms')} ms (max {first.get('max_ms')})")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"debounce {result['debounce_s'] * 1000:.0f} ms (part of every reload figure "
                 "but direct); worst call baseline: the same caller loop, same plugin, steady "
                 "period as long as the reload period")
    lines += notes
    return "\n".join(lines)
