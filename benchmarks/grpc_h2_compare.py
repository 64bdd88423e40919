"""The second gRPC client design (sandboxer/loaders/grpc/h2, a prototype) against grpcio aio.

One process of the Go KV plugin (examples/grpc-kv-go, built by tests/grpc_build.py), started
unsandboxed with go-plugin's environment, or with ``--sandboxed`` loaded by PluginManager under
the default profile (grpcio is then the loader's own channel); two clients on its socket in one
process, on one event loop: ``h2`` (H2Channel.unary) and ``grpcio`` (a grpc.aio channel's
unary_unary with identity serializers, as GrpcHandle calls it). Both send the same encoded
GetRequest and take the answer's bytes, undecoded, with a 30 s deadline: the transport layers
alone, no JSON/protobuf.

Per round, for each client in turn (the order swapped every round, so drift hits both alike):
``sequential`` Gets timed one by one, then ``IN_FLIGHT`` callers each awaiting Gets one after
another (calls/s). gc is off while measuring. The machine's load average is recorded before and
after: figures from a busy machine are only comparable with each other.

With ``--go-host``, go-plugin's own Go host (benchmarks/grpc_host, as benchmarks/grpc.py runs
it) is run once before and once after the Python rounds with the same counts, as the reference
the targets are set against, taken in the same state of the machine.

``python -m benchmarks.grpc_h2_compare [--rounds N] [--sequential N] [--pipelined N]
[--go-host] [--sandboxed]`` prints a table and the JSON; ``run()`` returns the dict (the
benchmark runner's entry point).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
IN_FLIGHT = 64
GET_PATH = "/proto.KV/Get"
PUT_PATH = "/proto.KV/Put"
GET = b"\n\x01a"  # GetRequest{key: "a"}
PUT = b"\n\x01a\x12\x02hi"  # PutRequest{key: "a", value: b"hi"}
ANSWER = b"\n\x02hi"  # GetResponse{value: b"hi"}
TIMEOUT = 30.0
PLUGIN_ENV = {
    "BASIC_PLUGIN": "hello",
    "PLUGIN_PROTOCOL_VERSIONS": "1",
    "PLUGIN_MIN_PORT": "10000",
    "PLUGIN_MAX_PORT": "25000",
}

Call = Callable[[], Awaitable[bytes]]


def _grpc_build() -> Any:
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import grpc_build

    return grpc_build


def _build_plugin(dest: Path) -> Path:
    build = _grpc_build()
    built: Path = build.build_kv_go(dest)
    return built / build.GO_BINARY


def _go_host(host: Path, plugin: Path, sequential: int, pipelined: int) -> dict[str, Any]:
    argv = [str(host), "-plugin", str(plugin), "-starts", "0", "-warmup", "200",
            "-sequential", str(sequential), "-pipelined", str(pipelined),
            "-in-flight", str(IN_FLIGHT)]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, stdin=subprocess.DEVNULL, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"the Go host failed: {proc.stderr.decode(errors='replace')}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def start_plugin(binary: Path, socket_dir: str) -> tuple[subprocess.Popen[bytes], str]:
    """The plugin, unsandboxed, and its socket path from the handshake line."""
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": socket_dir, **PLUGIN_ENV}
    proc = subprocess.Popen(
        [str(binary)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=socket_dir
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    fields = line.strip().split("|")
    if len(fields) < 5 or fields[2] != "unix":
        proc.kill()
        proc.wait()
        raise RuntimeError(f"unexpected handshake line {line!r}")
    return proc, fields[3]


def _summary(samples_ns: list[int]) -> dict[str, float]:
    s = sorted(samples_ns)
    n = len(s)
    return {
        "n": n,
        "p50_us": round(s[n // 2] / 1000, 1),
        "p99_us": round(s[min(n - 1, int(0.99 * n))] / 1000, 1),
    }


async def _sequential(call: Call, n: int, samples: list[int]) -> None:
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        answer = await call()
        samples.append(clock() - t0)
        if answer != ANSWER:
            raise RuntimeError(f"Get answered {answer!r}")


async def _pipelined(call: Call, total: int) -> float:
    per = total // IN_FLIGHT

    async def caller() -> None:
        for _ in range(per):
            await call()

    t0 = time.perf_counter_ns()
    await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))
    return per * IN_FLIGHT / ((time.perf_counter_ns() - t0) / 1e9)


async def _measure(
    path: str, rounds: int, sequential: int, pipelined: int, channel: Any = None
) -> dict[str, Any]:
    """Both clients on the socket at ``path``; grpcio's on ``channel`` if given (the loader's:
    not ours to close), else on a channel of its own."""
    import grpc.aio

    from sandboxer.loaders.grpc.h2 import H2Channel

    h2 = await H2Channel.connect(path)
    own = channel is None
    if own:
        channel = grpc.aio.insecure_channel(f"unix:{path}")

    def raw(data: bytes) -> bytes:
        return data

    stub = channel.unary_unary(GET_PATH, request_serializer=raw, response_deserializer=raw)
    calls: dict[str, Call] = {
        "h2": lambda: h2.unary(GET_PATH, GET, TIMEOUT),
        "grpcio": lambda: stub(GET, timeout=TIMEOUT),
    }
    try:
        await h2.unary(PUT_PATH, PUT, TIMEOUT)
        for call in calls.values():  # warm-up: connections, caches, grpcio's engine
            await _sequential(call, 200, [])
            await _pipelined(call, IN_FLIGHT * 10)
        samples: dict[str, list[int]] = {name: [] for name in calls}
        rates: dict[str, list[float]] = {name: [] for name in calls}
        order = list(calls)
        gc.collect()
        gc.disable()
        try:
            for _ in range(rounds):
                for name in order:
                    await _sequential(calls[name], sequential, samples[name])
                    rates[name].append(await _pipelined(calls[name], pipelined))
                order.reverse()
        finally:
            gc.enable()
    finally:
        await h2.close()
        if own:
            await channel.close()
    out: dict[str, Any] = {}
    for name in calls:
        out[name] = {
            "sequential": _summary(samples[name]),
            "calls_per_s": round(statistics.median(rates[name])),
            "calls_per_s_rounds": [round(r) for r in rates[name]],
        }
    out["p50_ratio_h2_vs_grpcio"] = round(
        out["h2"]["sequential"]["p50_us"] / out["grpcio"]["sequential"]["p50_us"], 3
    )
    out["throughput_ratio_h2_vs_grpcio"] = round(
        out["h2"]["calls_per_s"] / out["grpcio"]["calls_per_s"], 3
    )
    return out


async def _measure_sandboxed(
    work: Path, rounds: int, sequential: int, pipelined: int
) -> dict[str, Any]:
    """The plugin loaded by PluginManager under the default profile; h2 connects to the socket
    the loader connected to (``/proc/self/fd/N``, the inode opened beneath the plugin's
    directory: GrpcHandle's private ``_connection``), grpcio is the loader's own channel."""
    from sandboxer import PluginManager

    from .grpc import make_plugin_dir

    async with PluginManager() as manager:
        loaded = await manager.load(make_plugin_dir(work))
        if loaded.sandbox is None or not loaded.sandbox.enabled:
            raise RuntimeError("the plugin was loaded without its sandbox")
        target: str = loaded.handle._connection.target  # type: ignore[attr-defined]
        path = target.removeprefix("unix:")
        result = await _measure(path, rounds, sequential, pipelined, loaded.grpc_channel())
        await manager.unload(loaded.id)
    return result


def run(
    rounds: int = 5,
    sequential: int = 1000,
    pipelined: int = IN_FLIGHT * 100,
    *,
    go_host: bool = False,
    sandboxed: bool = False,
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="h2-bench-"))
    go_runs: list[dict[str, Any]] = []
    try:
        binary = _build_plugin(work / "built")
        host = _grpc_build().build_go_host(work / "host") if go_host else None
        load_before = os.getloadavg()
        if host is not None:
            go_runs.append(_go_host(host, binary, sequential * rounds // 2, pipelined))
        if sandboxed:
            result = asyncio.run(_measure_sandboxed(work, rounds, sequential, pipelined))
        else:
            sockets = tempfile.mkdtemp(dir=work)
            proc, path = start_plugin(binary, sockets)
            try:
                result = asyncio.run(_measure(path, rounds, sequential, pipelined))
            finally:
                proc.kill()
                proc.wait()
        if host is not None:
            go_runs.append(_go_host(host, binary, sequential * rounds // 2, pipelined))
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if go_runs:
        samples = [n for r in go_runs for n in r["samples_ns"]]
        rates = [r["pipelined"]["throughput_calls_per_s"] for r in go_runs]
        go = result["go_host"] = {
            "sequential": _summary(samples),
            "calls_per_s": round(statistics.median(rates)),
            "calls_per_s_rounds": [round(r) for r in rates],
        }
        for name in ("h2", "grpcio"):
            mine = result[name]
            mine["p50_ratio_vs_go_host"] = round(
                mine["sequential"]["p50_us"] / go["sequential"]["p50_us"], 3
            )
            mine["throughput_ratio_vs_go_host"] = round(mine["calls_per_s"] / go["calls_per_s"], 3)
    result["machine"] = {
        "cpus": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in load_after],
    }
    result["config"] = {
        "rounds": rounds,
        "sequential_per_round": sequential,
        "pipelined_per_round": pipelined,
        "in_flight": IN_FLIGHT,
        "loop": "asyncio default",
        "plugin": "examples/grpc-kv-go, "
        + ("sandboxed (PluginManager, default profile)" if sandboxed else "unsandboxed"),
    }
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'client':8} {'p50 µs':>8} {'p99 µs':>8} {'calls/s':>9}  rounds (calls/s)"]
    for name in ("h2", "grpcio", "go_host"):
        if name not in result:
            continue
        r = result[name]
        seq = r["sequential"]
        lines.append(
            f"{name:8} {seq['p50_us']:8.1f} {seq['p99_us']:8.1f} {r['calls_per_s']:9d}  "
            f"{r['calls_per_s_rounds']}"
        )
    lines.append(
        f"h2/grpcio: p50 x{result['p50_ratio_h2_vs_grpcio']}, "
        f"throughput x{result['throughput_ratio_h2_vs_grpcio']}; "
        f"load average {result['machine']['loadavg_before']} -> "
        f"{result['machine']['loadavg_after']} on {result['machine']['cpus']} CPUs"
    )
    if "go_host" in result:
        for name in ("h2", "grpcio"):
            lines.append(
                f"{name}/go_host: p50 x{result[name]['p50_ratio_vs_go_host']} (target <= 2.5), "
                f"throughput x{result[name]['throughput_ratio_vs_go_host']} (target >= 0.5)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sequential", type=int, default=1000)
    parser.add_argument("--pipelined", type=int, default=IN_FLIGHT * 100)
    parser.add_argument("--go-host", action="store_true", help="go-plugin's Go host too")
    parser.add_argument(
        "--sandboxed", action="store_true", help="the plugin under PluginManager's sandbox"
    )
    args = parser.parse_args(argv)
    result = run(
        args.rounds, args.sequential, args.pipelined, go_host=args.go_host, sandboxed=args.sandboxed
    )
    print(format_table(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
