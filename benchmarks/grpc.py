"""gRPC benchmark (issue 19): an unmodified go-plugin KV plugin through sandboxer, against
go-plugin's own Go host calling the same binary, in one run.

What is measured, each on the same binary (examples/grpc-kv-go, built by tests/grpc_build.py
from Debian's go-plugin 1.0.1 sources), Get of a key put before (benchmarks/README.md says
exactly how each is run):

  sandboxed     PluginManager.load() with the default profile, ``await p.call("Get", ...)``:
                the primary figures
  handle        the same sandboxed plugin's GrpcHandle called directly (``p.handle.call``):
                the manager's routing is the difference
  unsandboxed   GrpcLoader(ProcessLoader(EXTERNAL)).start(..., SandboxConfig(enabled=False)),
                ``await handle.call("Get", ...)`` (the manager refuses an unsandboxed external
                plugin, so the loader is used directly)
  go_host       benchmarks/grpc_host: go-plugin's plugin.NewClient, gRPC over its Unix socket,
                no sandbox: the baseline

Latency is Get after Get (timed one by one); throughput is 64 callers (asyncio tasks, or
goroutines on the Go side) each calling one after another; start to first answered call is
load() (NewClient on the Go side) until a Put and then a Get are answered.

The Python side runs in fresh interpreters (``python -m benchmarks.grpc --child``, one per
event loop, so grpcio's per-process engine never serves two loops), the Go host in its own
process; the parent runs them in alternating rounds so drift hits both sides alike. Inside a
Python child the three configurations alternate in rounds too. gc is off in every measured
loop (the Go host turns its collector off likewise).

``run()`` returns the dict stored under "grpc" in benchmarks/results/latest.json.
``python -m benchmarks.grpc --profile`` prints where the sandboxed call's time goes instead.
A build that fails or a plugin that errors raises: the runner then exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ._results import describe_loop, scale, versions

ROOT = Path(__file__).resolve().parent.parent

IN_FLIGHT = 64
PUT = {"key": "a", "value": "aGk="}  # b"hi", base64 as protobuf's JSON mapping has bytes
GET = {"key": "a"}
ANSWER = {"value": "aGk="}
TARGETS = {"p50_ratio_vs_go_host": 2.5, "throughput_ratio_vs_go_host": 0.5}

# The KV example's manifest with a descriptor set (protoc --include_imports) as in
# tests/loaders/test_grpc.py; the handshake is the example's (shared.Handshake).
MANIFEST = """\
[plugin]
id = "acme.kv"
version = "1.0.0"
type = "external"
protocol = "grpc"
entrypoint = "kv-go-grpc"

[grpc]
proto = ["kv.pb"]
service = "proto.KV"

[grpc.handshake]
protocol_version = 1
magic_cookie_key = "BASIC_PLUGIN"
magic_cookie_value = "hello"
"""

BASELINE_GO_HOST = ("go-plugin 1.0.1 Go host (plugin.NewClient, gRPC over its unix socket), "
                    "same binary, unsandboxed")


def _counts() -> dict[str, int]:
    s = scale()
    return {
        # The parent alternates Go host and Python child this many times; inside each Python
        # child the configurations alternate in ``inner_rounds``.
        "rounds": 2,
        "inner_rounds": 2,
        "sequential_per_round": max(50, int(1_000 * s)),  # per inner round and configuration
        "pipelined_per_round": max(IN_FLIGHT * 4, int(10_240 * s)) // IN_FLIGHT * IN_FLIGHT,
        "warmup": max(50, int(500 * s)),
        "starts": 3,  # timed, per round, after one untimed
    }


def _summary(samples_ns: list[int]) -> dict[str, Any]:
    s = sorted(samples_ns)
    n = len(s)

    def pct(p: float) -> float:
        return round(s[min(n - 1, int(p * n))] / 1000, 2)

    return {"n": n, "p50_us": pct(0.50), "p90_us": pct(0.90), "p99_us": pct(0.99),
            "min_us": round(s[0] / 1000, 2), "mean_us": round(sum(s) / n / 1000, 2)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# -- the binaries ----------------------------------------------------------------------------

def grpc_build_module() -> Any:
    """tests/grpc_build.py, the module the tests build the example with."""
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import grpc_build
    return grpc_build


def make_plugin_dir(dest: Path) -> Path:
    """The KV plugin as a plugin directory: the binary, its descriptor set and the manifest."""
    build = grpc_build_module()
    built = build.build_kv_go(dest / "built")
    subprocess.run(["protoc", "--include_imports", "--descriptor_set_out=kv.pb", "kv.proto"],
                   cwd=built, check=True, capture_output=True)
    root = dest / "kv"
    root.mkdir()
    shutil.copyfile(built / "kv.pb", root / "kv.pb")
    shutil.copy2(built / "kv-go-grpc", root / "kv-go-grpc")
    (root / "plugin.toml").write_text(MANIFEST)
    return root


# -- a Python child: sandboxer on one event loop ---------------------------------------------

async def _sequential(call: Callable[..., Awaitable[Any]], n: int, samples: list[int]) -> None:
    clock = time.perf_counter_ns
    append = samples.append
    for _ in range(n):
        t0 = clock()
        await call("Get", GET)
        append(clock() - t0)


async def _pipelined(call: Callable[..., Awaitable[Any]], total: int) -> tuple[int, int, int]:
    """``IN_FLIGHT`` callers, each awaiting its calls one after another.

    Returns (calls, wall ns, CPU ns of this process: the client side alone)."""
    per = total // IN_FLIGHT

    async def caller() -> None:
        for _ in range(per):
            await call("Get", GET)

    cpu0, t0 = time.process_time_ns(), time.perf_counter_ns()
    await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))
    return per * IN_FLIGHT, time.perf_counter_ns() - t0, time.process_time_ns() - cpu0


class _Config:
    """One configuration measured in a child: its call, and its samples and rounds."""

    def __init__(self, call: Callable[..., Awaitable[Any]], expect: Any = ANSWER) -> None:
        self.call, self.expect = call, expect
        self.samples: list[int] = []
        self.seq_cpu_ns = 0
        self.rounds: list[tuple[int, int, int]] = []  # calls, wall ns, client CPU ns

    async def sequential(self, n: int) -> None:
        cpu0 = time.process_time_ns()
        await _sequential(self.call, n, self.samples)
        self.seq_cpu_ns += time.process_time_ns() - cpu0

    async def pipelined(self, n: int) -> None:
        self.rounds.append(await _pipelined(self.call, n))

    def result(self) -> dict[str, Any]:
        calls = sum(r[0] for r in self.rounds)
        return {"samples_ns": self.samples,
                "sequential_client_cpu_ns": self.seq_cpu_ns,
                "pipelined_rounds": [list(r) for r in self.rounds],
                "pipelined_calls": calls}


async def first_answered_get_ms(mgr: Any, plugin_dir: Path) -> float:
    """load() until a Put and then a Get are answered, sandboxed; the plugin unloaded after.
    (benchmarks/startup.py's grpc_first_call_cold_ms is this too.)"""
    t0 = time.perf_counter_ns()
    p = await mgr.load(plugin_dir)
    await p.call("Put", PUT)
    answer = await p.call("Get", GET)
    elapsed = time.perf_counter_ns() - t0
    if answer != ANSWER:
        raise RuntimeError(f"Get answered {answer!r}, not {ANSWER!r}")
    await mgr.unload(p.id)
    return elapsed / 1e6


async def _child_main(plugin_dir: Path, rounds: int) -> dict[str, Any]:
    from sandboxer import HostConfig, PluginManager
    from sandboxer.loaders.grpc.loader import GrpcLoader
    from sandboxer.loaders.out_of_process import ProcessLoader
    from sandboxer.manifest import LoaderType, load_plugin
    from sandboxer.sandbox.policy import SandboxConfig

    c = _counts()
    out: dict[str, Any] = {"loop": describe_loop(asyncio.get_running_loop())}
    # No warm sandboxes: every start timed here is cold (startup.py has the warm ones).
    async with PluginManager(config=HostConfig(warm_sandboxes=0)) as mgr:
        # The first start is not timed: it pays for grpcio's engine on this loop and the
        # page cache, once per process (the Go host skips its first likewise).
        starts = [await first_answered_get_ms(mgr, plugin_dir) for _ in range(1 + c["starts"])][1:]
        out["first_call_ms"] = [round(ms, 3) for ms in starts]

        p = await mgr.load(plugin_dir)
        if p.sandbox is None or not p.sandbox.enabled:
            raise RuntimeError("the plugin was loaded without its sandbox")
        out["fallbacks"] = list(p.handle.fallbacks)
        bare = await GrpcLoader(ProcessLoader(LoaderType.EXTERNAL)).start(
            load_plugin(plugin_dir), SandboxConfig(enabled=False), generation=1)
        try:
            configs = {"sandboxed": _Config(p.call), "handle": _Config(p.handle.call),
                       "unsandboxed": _Config(bare.call)}
            out["codec_us"] = _codec_us(bare)
            for cfg in configs.values():
                # Each plugin process keeps its own values: a Put into each.
                await cfg.call("Put", PUT)
                answer = await cfg.call("Get", GET)
                if answer != cfg.expect:
                    raise RuntimeError(f"Get answered {answer!r}, not {cfg.expect!r}")
            for cfg in configs.values():
                await _sequential(cfg.call, c["warmup"], [])
                await _pipelined(cfg.call, max(IN_FLIGHT, c["warmup"] // IN_FLIGHT * IN_FLIGHT))
            gc.collect()
            gc.disable()
            try:
                for _ in range(rounds):
                    for cfg in configs.values():
                        await cfg.sequential(c["sequential_per_round"])
                for _ in range(rounds):
                    for cfg in configs.values():
                        await cfg.pipelined(c["pipelined_per_round"])
            finally:
                gc.enable()
        finally:
            try:
                await bare.shutdown()
            finally:
                await bare.close()
        await mgr.unload(p.id)
    for name, cfg in configs.items():
        out[name] = cfg.result()
    return out


# A diagnostic: it reaches into GrpcHandle's private ``_schema`` (the plugin's methods, from
# its descriptor set); if that changes, the benchmark fails rather than skip it.

def _codec_us(handle: Any) -> dict[str, float]:
    """Our JSON <-> protobuf per call, alone: encode_request of {"key": "a"} and
    decode_response of a GetResponse, median µs over 5 timed loops of 10,000."""
    from sandboxer.loaders.grpc.schema import decode_response, encode_request

    spec = handle._schema.methods["Get"]
    answer = spec.response(value=b"hi").SerializeToString()
    args = (GET,)
    times: dict[str, list[float]] = {"encode": [], "decode": []}
    n = 10_000
    for _ in range(5):
        t0 = time.perf_counter_ns()
        for _ in range(n):
            encode_request(spec, args, plugin_id="bench")
        t1 = time.perf_counter_ns()
        for _ in range(n):
            decode_response(spec, answer)
        t2 = time.perf_counter_ns()
        times["encode"].append((t1 - t0) / n / 1000)
        times["decode"].append((t2 - t1) / n / 1000)
    return {k: round(statistics.median(v), 2) for k, v in times.items()}


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop
        return uvloop.new_event_loop
    return asyncio.new_event_loop


def child(loop_name: str, plugin_dir: Path, rounds: int) -> dict[str, Any]:
    if loop_name == "uvloop":
        import uvloop  # a dependency (the daemon's loop): its absence fails the run
    with asyncio.Runner(loop_factory=_loop_factory(loop_name)) as runner:
        out = runner.run(_child_main(plugin_dir, rounds))
    if loop_name == "uvloop":
        out["loop"] += f" uvloop {uvloop.__version__}"
    return out


# -- the parent ------------------------------------------------------------------------------

def _run_child(loop_name: str, plugin_dir: Path, rounds: int) -> dict[str, Any]:
    started = time.monotonic()
    argv = [sys.executable, "-m", "benchmarks.grpc", "--child", "--loop", loop_name,
            "--plugin-dir", str(plugin_dir), "--rounds", str(rounds)]
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=600,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child ({loop_name}) failed with status {proc.returncode}")
    result: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def _run_go_host(host: Path, plugin_binary: Path) -> dict[str, Any]:
    c = _counts()
    started = time.monotonic()
    argv = [str(host), "-plugin", str(plugin_binary), "-starts", str(c["starts"]),
            "-warmup", str(c["warmup"]),
            "-sequential", str(c["sequential_per_round"] * c["inner_rounds"]),
            "-pipelined", str(c["pipelined_per_round"] * c["inner_rounds"]),
            "-in-flight", str(IN_FLIGHT)]
    proc = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the Go host failed with status {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace').strip()}")
    result: dict[str, Any] = json.loads(proc.stdout)
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def _pool(children: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """One configuration's figures over every round of every child."""
    samples = [s for ch in children for s in ch[name]["samples_ns"]]
    rounds = [r for ch in children for r in ch[name]["pipelined_rounds"]]
    seq = _summary(samples)
    seq["client_cpu_us_per_call"] = round(
        sum(ch[name]["sequential_client_cpu_ns"] for ch in children) / len(samples) / 1000, 2)
    calls, wall = sum(r[0] for r in rounds), sum(r[1] for r in rounds)
    return {"sequential": seq,
            "pipelined": {"in_flight": IN_FLIGHT, "calls": calls,
                          "seconds": round(wall / 1e9, 3),
                          "throughput_calls_per_s": round(calls / (wall / 1e9)),
                          "rounds_calls_per_s": [round(r[0] / (r[1] / 1e9)) for r in rounds],
                          "client_cpu_us_per_call":
                              round(sum(r[2] for r in rounds) / calls / 1000, 2)}}


def _pool_go(runs: list[dict[str, Any]]) -> dict[str, Any]:
    samples = [s for r in runs for s in r["samples_ns"]]
    seq = _summary(samples)
    seq["client_cpu_us_per_call"] = round(statistics.fmean(
        r["sequential"]["client_cpu_us_per_call"] for r in runs), 2)
    calls = sum(r["pipelined"]["calls"] for r in runs)
    seconds = sum(r["pipelined"]["seconds"] for r in runs)
    return {"sequential": seq,
            "pipelined": {"in_flight": IN_FLIGHT, "calls": calls, "seconds": round(seconds, 3),
                          "throughput_calls_per_s": round(calls / seconds),
                          "rounds_calls_per_s": [
                              round(r["pipelined"]["throughput_calls_per_s"]) for r in runs],
                          "client_cpu_us_per_call": round(sum(
                              r["pipelined"]["client_cpu_us_per_call"] * r["pipelined"]["calls"]
                              for r in runs) / calls, 2)}}


def _loop_figures(children: list[dict[str, Any]], go: dict[str, Any]) -> dict[str, Any]:
    """The headline fields for one event loop, against the Go host."""
    m = {name: _pool(children, name) for name in ("sandboxed", "handle", "unsandboxed")}
    diagnostics: dict[str, Any] = {}
    diagnostics["codec_us"] = children[0]["codec_us"]
    seq, pipe = m["sandboxed"]["sequential"], m["sandboxed"]["pipelined"]
    go_p50 = go["sequential"]["p50_us"]
    go_tput = go["pipelined"]["throughput_calls_per_s"]
    return {
        "loop": children[0]["loop"],
        "p50_us": seq["p50_us"],
        "p99_us": seq["p99_us"],
        "p50_ratio_vs_go_host": _ratio(seq["p50_us"], go_p50),
        "p99_ratio_vs_go_host": _ratio(seq["p99_us"], go["sequential"]["p99_us"]),
        "throughput_calls_per_s": pipe["throughput_calls_per_s"],
        "throughput_ratio_vs_go_host": _ratio(pipe["throughput_calls_per_s"], go_tput),
        "unsandboxed_p50_us": m["unsandboxed"]["sequential"]["p50_us"],
        "unsandboxed_p99_us": m["unsandboxed"]["sequential"]["p99_us"],
        "unsandboxed_throughput_calls_per_s": m["unsandboxed"]["pipelined"][
            "throughput_calls_per_s"],
        "handle_p50_us": m["handle"]["sequential"]["p50_us"],
        "manager_routing_p50_us": round(seq["p50_us"] - m["handle"]["sequential"]["p50_us"], 2),
        "measurements": m,
        "diagnostics": diagnostics,
    }


def run() -> dict[str, Any]:
    c = _counts()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sandboxer-bench-grpc-") as tmp:
        plugin_dir = make_plugin_dir(Path(tmp))
        host = grpc_build_module().build_go_host(Path(tmp) / "host")
        build_seconds = time.monotonic() - started
        go_runs, asyncio_children = [], []
        for _ in range(c["rounds"]):
            go_runs.append(_run_go_host(host, plugin_dir / "kv-go-grpc"))
            asyncio_children.append(_run_child("asyncio", plugin_dir, c["inner_rounds"]))
        # uvloop: one child, after the rounds, against a Go host run right before it.
        uv_go = _run_go_host(host, plugin_dir / "kv-go-grpc")
        uv_child = _run_child("uvloop", plugin_dir, c["inner_rounds"])
    go = _pool_go(go_runs)
    main = _loop_figures(asyncio_children, go)
    go_first = [ms for r in go_runs for ms in r["first_call_ms"]]
    ours_first = [ms for ch in asyncio_children for ms in ch["first_call_ms"]]
    first_call_ms = round(statistics.median(ours_first), 2)
    go_first_call_ms = round(statistics.median(go_first), 2)
    loop = main["loop"]
    result: dict[str, Any] = {
        "p50_us": main["p50_us"],
        "p99_us": main["p99_us"],
        "go_host_p50_us": go["sequential"]["p50_us"],
        "go_host_p99_us": go["sequential"]["p99_us"],
        "p50_ratio_vs_go_host": main["p50_ratio_vs_go_host"],
        "p99_ratio_vs_go_host": main["p99_ratio_vs_go_host"],
        "throughput_calls_per_s": main["throughput_calls_per_s"],
        "go_host_throughput_calls_per_s": go["pipelined"]["throughput_calls_per_s"],
        "throughput_ratio_vs_go_host": main["throughput_ratio_vs_go_host"],
        "first_call_ms": first_call_ms,
        "go_host_first_call_ms": go_first_call_ms,
        "first_call_ratio_vs_go_host": _ratio(first_call_ms, go_first_call_ms),
        "unsandboxed_p50_us": main["unsandboxed_p50_us"],
        "unsandboxed_p99_us": main["unsandboxed_p99_us"],
        "unsandboxed_throughput_calls_per_s": main["unsandboxed_throughput_calls_per_s"],
        "handle_p50_us": main["handle_p50_us"],
        "manager_routing_p50_us": main["manager_routing_p50_us"],
        "sandboxed": True,
        "fallbacks": asyncio_children[0]["fallbacks"],
        "targets": {
            "p50_ratio_vs_go_host": {
                "target": f"<= {TARGETS['p50_ratio_vs_go_host']}",
                "value": main["p50_ratio_vs_go_host"],
                "met": main["p50_ratio_vs_go_host"] is not None
                       and main["p50_ratio_vs_go_host"] <= TARGETS["p50_ratio_vs_go_host"]},
            "throughput_ratio_vs_go_host": {
                "target": f">= {TARGETS['throughput_ratio_vs_go_host']}",
                "value": main["throughput_ratio_vs_go_host"],
                "met": main["throughput_ratio_vs_go_host"] is not None
                       and main["throughput_ratio_vs_go_host"]
                       >= TARGETS["throughput_ratio_vs_go_host"]},
        },
        "baseline": {
            "go_host": BASELINE_GO_HOST,
            "go_host_detail": (
                f"benchmarks/grpc_host ({go_runs[0]['go']}, GOMAXPROCS "
                f"{go_runs[0]['gomaxprocs']}, built offline in GOPATH mode from Debian's "
                f"sources with the example's shared package): plugin.NewClient with "
                f"shared.Handshake, shared.PluginMap, AllowedProtocols [grpc], Cmd the plugin "
                f"binary, logger at warn; Dispense(\"kv_grpc\") as shared.KV; Get(\"a\") "
                f"through the example's GRPCClient (protoc-gen-go 1.3.5 stubs, "
                f"context.Background()), the answer compared with b\"hi\"; its own process, "
                f"alternating with the Python child"),
            "p50_us": (
                f"ours: PluginManager(config=HostConfig(warm_sandboxes=0)).load(dir) with the "
                f"default profile (sandboxed: "
                f"namespaces, seccomp filter, cgroup), `await p.call(\"Get\", {{\"key\": "
                f"\"a\"}})` answering {{\"value\": \"aGk=\"}} (JSON in, protobuf on the wire, "
                f"JSON out; every call carries the default 30 s deadline), grpcio aio over the "
                f"plugin's Unix socket, on {loop}"),
            "handle_p50_us": "ours without the manager: the same sandboxed plugin's "
                             "GrpcHandle called directly (p.handle.call)",
            "unsandboxed_p50_us": (
                "ours, unsandboxed: GrpcLoader(ProcessLoader(LoaderType.EXTERNAL)).start("
                "plugin, SandboxConfig(enabled=False), generation=1), `await handle.call("
                "\"Get\", ...)` (the manager refuses an unsandboxed external plugin); same "
                "child and loop, alternating with the sandboxed figures"),
            "throughput_calls_per_s": f"{IN_FLIGHT} asyncio tasks (asyncio.gather), each "
                                      f"awaiting its Gets one after another; the Go host: "
                                      f"{IN_FLIGHT} goroutines likewise",
            "first_call_ms": "ours: `await mgr.load(dir)` until a Put and then a Get are "
                             "answered, sandboxed and cold (HostConfig(warm_sandboxes=0); "
                             "startup.py has warm starts), in a process that already loaded the "
                             "plugin once (the first start is not timed); the Go host: "
                             "NewClient, Client(), Dispense, Put, Get, its first start not "
                             "timed likewise; medians of every timed start",
        },
        "first_call": {"ours_ms": ours_first, "go_host_ms": go_first},
        "go_host": go,
        "measurements": main["measurements"],
        "diagnostics": {
            **main["diagnostics"],
            "what": {
                "codec_us": "encode_request({'key': 'a'}) and decode_response of a "
                            "GetResponse (json_format.ParseDict / MessageToDict), synchronous, "
                            "median µs over 5 loops of 10,000",
            },
        },
        "uvloop": _uvloop_result(uv_child, uv_go),
        "config": {
            **c,
            "in_flight": IN_FLIGHT,
            "put": PUT,
            "get": GET,
            "loop": loop,
            "build_seconds": round(build_seconds, 1),
            "wall_seconds": {"go_host": [r["wall_seconds"] for r in go_runs],
                             "asyncio": [ch["wall_seconds"] for ch in asyncio_children],
                             "uvloop": uv_child.get("wall_seconds")},
            "method": "the parent alternates the Go host and a Python child (default loop) "
                      f"{c['rounds']} times, then one Go host run and one uvloop child; in "
                      f"a child the three configurations alternate in {c['inner_rounds']} "
                      "rounds of sequential Gets, then of pipelined ones; warm-up before; "
                      "gc off in every measured loop (the Go host: SetGCPercent(-1)); "
                      "percentiles over every sample pooled, throughput total calls over "
                      "total time",
            "versions": {**versions("grpcio", "protobuf", "uvloop"),
                         "go": go_runs[0]["go"], "go-plugin": "1.0.1 (Debian)"},
        },
    }
    return result


def _uvloop_result(child_result: dict[str, Any], go_run: dict[str, Any]) -> dict[str, Any]:
    go = _pool_go([go_run])
    f = _loop_figures([child_result], go)
    return {"loop": f["loop"],
            "p50_us": f["p50_us"], "p99_us": f["p99_us"],
            "go_host_p50_us": go["sequential"]["p50_us"],
            "p50_ratio_vs_go_host": f["p50_ratio_vs_go_host"],
            "throughput_calls_per_s": f["throughput_calls_per_s"],
            "go_host_throughput_calls_per_s": go["pipelined"]["throughput_calls_per_s"],
            "throughput_ratio_vs_go_host": f["throughput_ratio_vs_go_host"],
            "unsandboxed_p50_us": f["unsandboxed_p50_us"],
            "unsandboxed_throughput_calls_per_s": f["unsandboxed_throughput_calls_per_s"],
            "first_call_ms": round(statistics.median(child_result["first_call_ms"]), 2),
            "note": "one child on uvloop after the default-loop rounds, against one Go host "
                    "run right before it",
            "measurements": f["measurements"]}


def format_table(result: dict[str, Any]) -> str:
    """The readable table the runner prints."""
    m, go = result["measurements"], result["go_host"]
    rows = [("measurement", "p50 µs", "p99 µs", "calls/s (64 in flight)", "client CPU µs/call")]
    for name, d in (*m.items(), ("go_host", go)):
        s, p = d["sequential"], d["pipelined"]
        rows.append((name, f"{s['p50_us']}", f"{s['p99_us']}", f"{p['throughput_calls_per_s']}",
                     f"{s['client_cpu_us_per_call']} / {p['client_cpu_us_per_call']}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    t = result["targets"]
    lines.append("")
    for key, d in t.items():
        lines.append(f"{key}: {d['value']} (target {d['target']}: "
                     f"{'met' if d['met'] else 'NOT met'})")
    codec = result["diagnostics"].get("codec_us")
    if codec:
        lines.append(f"diag: our JSON <-> protobuf alone: encode {codec['encode']} µs, decode "
                     f"{codec['decode']} µs; manager routing (p50 difference) "
                     f"{result['manager_routing_p50_us']} µs")
    lines.append(f"start to first answered Get: ours {result['first_call_ms']} ms (sandboxed), "
                 f"Go host {result['go_host_first_call_ms']} ms")
    u = result["uvloop"]
    lines.append(f"uvloop: p50 {u['p50_us']} µs (x{u['p50_ratio_vs_go_host']} Go host), "
                 f"{u['throughput_calls_per_s']} calls/s "
                 f"(x{u['throughput_ratio_vs_go_host']})")
    return "\n".join(lines)


# -- profiling -------------------------------------------------------------------------------

async def _profile_main(plugin_dir: Path, calls: int, top: int) -> None:
    import cProfile
    import pstats

    from sandboxer import PluginManager

    async with PluginManager() as mgr:
        p = await mgr.load(plugin_dir)
        await p.call("Put", PUT)
        await _sequential(p.call, 500, [])
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        await _sequential(p.call, calls, [])
        profiler.disable()
        elapsed = time.perf_counter() - t0
        await mgr.unload(p.id)
    print(f"{calls} sequential sandboxed Gets in {elapsed:.2f} s under cProfile "
          f"({elapsed / calls * 1e6:.0f} µs a call, profiler included)")
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.grpc")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--plugin-dir", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--profile", action="store_true",
                        help="profile sequential sandboxed Gets (cProfile) instead")
    parser.add_argument("--calls", type=int, default=5_000)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.loop, args.plugin_dir, args.rounds)))
        return 0
    if args.profile:
        with tempfile.TemporaryDirectory(prefix="sandboxer-bench-grpc-") as tmp:
            plugin_dir = args.plugin_dir or make_plugin_dir(Path(tmp))
            with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
                runner.run(_profile_main(plugin_dir, args.calls, args.top))
        return 0
    result = run()
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
