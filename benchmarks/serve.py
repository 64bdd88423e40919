"""Daemon benchmark (issue 21): a small call through ``sandboxer serve`` from another process,
against the same call through an in-process PluginManager, same plugin, same run.

  inprocess_p50_us        PluginManager().load(plugin) in this process, sandboxed, then
                          ``await p.call("echo", "hello")`` one after another: the baseline
  p50_us                  a ``sandboxer serve`` daemon (a child process, default config, run as
                          root: the administrator) with the same plugin loaded through
                          ``sandboxer.connect``; the same call, one after another, from this
                          process: one more hop (client -> daemon -> plugin host and back)
  throughput_calls_per_s  through the daemon: 64 calls in flight over 8 connections (8 each),
                          each task awaiting its calls one after another

Both sides run on the default asyncio loop, in alternating rounds (drift hits both alike),
gc disabled during every measured loop. Targets (reported, never asserted): p50_ratio <= 2.0,
throughput >= 50,000 calls/s.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ._results import describe_loop, scale

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"p50_ratio": 2.0, "throughput_calls_per_s": 50_000}
CONNECTIONS, PER_CONNECTION = 8, 8
PLUGIN = "def echo(x):\n    return x\n"


def _counts() -> dict[str, int]:
    s = scale()
    return {"rounds": max(2, round(5 * s)), "calls": max(200, round(2000 * s)),
            "throughput_calls": max(2000, round(40_000 * s))}


async def _sequential(call: Any, n: int) -> list[int]:
    samples = []
    gc.disable()
    try:
        for _ in range(n):
            t0 = time.perf_counter_ns()
            await call("echo", "hello")
            samples.append(time.perf_counter_ns() - t0)
    finally:
        gc.enable()
    return samples


async def _throughput(clients: list[Any], plugin_id: str, total: int) -> float:
    per_task = total // (len(clients) * PER_CONNECTION)

    async def worker(client: Any) -> None:
        for _ in range(per_task):
            await client.call(plugin_id, "echo", "hello")

    gc.disable()
    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in clients for _ in range(PER_CONNECTION)))
        elapsed = time.perf_counter() - t0
    finally:
        gc.enable()
    return per_task * len(clients) * PER_CONNECTION / elapsed


def _us(samples: list[int]) -> float:
    return round(statistics.median(samples) / 1000, 1)


async def _main(tmp: Path) -> dict[str, Any]:
    from sandboxer import PluginManager, connect

    c = _counts()
    plugin = tmp / "echo.py"
    plugin.write_text(PLUGIN)
    sock = str(tmp / "serve.sock")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "sandboxer.cli", "serve", "--socket", sock],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sandboxer serve did not start: {daemon.stderr.read()!r}")
            await asyncio.sleep(0.05)
        clients = [await connect(sock) for _ in range(CONNECTIONS)]
        async with PluginManager() as mgr:
            local = await mgr.load(plugin)
            remote = await clients[0].load(plugin)
            if local.sandbox is None or not local.sandbox.enabled:
                raise RuntimeError("the in-process plugin was loaded without its sandbox")
            for call in (local.call, remote.call):  # warm both paths up, untimed
                await _sequential(call, 200)
            inprocess: list[int] = []
            through: list[int] = []
            for _ in range(c["rounds"]):
                inprocess += await _sequential(local.call, c["calls"])
                through += await _sequential(remote.call, c["calls"])
            throughput = [await _throughput(clients, remote.id, c["throughput_calls"])
                          for _ in range(2)]
            loop = describe_loop(asyncio.get_running_loop())
        for client in clients:
            await client.aclose()
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=60)
        if daemon.stderr:
            daemon.stderr.close()
    if code != 0:
        raise RuntimeError(f"sandboxer serve exited with {code}")
    p50, base = _us(through), _us(inprocess)
    figures = {
        "p50_us": p50,
        "inprocess_p50_us": base,
        "p50_ratio": round(p50 / base, 2),
        "throughput_calls_per_s": round(max(throughput)),
    }
    met = {"p50_ratio": figures["p50_ratio"] <= TARGETS["p50_ratio"],
           "throughput_calls_per_s":
               figures["throughput_calls_per_s"] >= TARGETS["throughput_calls_per_s"]}
    return {
        **figures,
        "p99_us": round(sorted(through)[int(len(through) * 0.99)] / 1000, 1),
        "inprocess_p99_us": round(sorted(inprocess)[int(len(inprocess) * 0.99)] / 1000, 1),
        "targets": TARGETS,
        "met": met,
        "samples": {"calls_each": len(through), "throughput_runs": [round(x) for x in throughput]},
        "baseline": (f"PluginManager() in this process, the plugin ({PLUGIN.strip()!r}, python "
                     f"kind, a bare file) sandboxed with the default profile, "
                     f"await p.call('echo', 'hello') one after another, on {loop}"),
        "ours": (f"sandboxer serve (a child process, default host config, as root) with the "
                 f"same plugin loaded through sandboxer.connect; the same call from this "
                 f"process, one after another; throughput: {CONNECTIONS} connections x "
                 f"{PER_CONNECTION} tasks each awaiting its calls in turn; both on {loop}"),
    }


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sandboxer-bench-serve-") as tmp:
        return asyncio.run(_main(Path(tmp)))


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{key:26} {result[key]}" for key in (
        "inprocess_p50_us", "p50_us", "p50_ratio", "p99_us", "throughput_calls_per_s")]
    for key, ok in result["met"].items():
        lines.append(f"{key}: {result[key]} (target {TARGETS[key]}: {'met' if ok else 'NOT met'})")
    return "\n".join(lines)
