"""Sandbox start-up cost: ``sandboxer exec -- /bin/true`` against bubblewrap, and the cold
start of a sandboxed external plugin to its first answered call.

Baselines, measured in the same run:
- ``bwrap_true_ms``: Debian's bubblewrap, ``bwrap --unshare-all --die-with-parent --ro-bind
  /usr /usr --symlink usr/bin /bin --symlink usr/lib /lib --symlink usr/lib64 /lib64
  --proc /proc --dev /dev --tmpfs /tmp /bin/true``, run as a subprocess (what a caller pays).
- ``exec_true_ms``: ``sandboxer exec -- /bin/true`` through ``sandboxer.sandbox.program.run``
  in this process (full isolation: namespaces, cgroup, seccomp), so Python start-up of the
  CLI is not counted against us; ``cli_exec_true_ms`` is the same through the command line.
- ``cold_start_ms``: ``PluginManager.load`` of ``examples/external-node`` (sandboxed) until
  its first ``greet`` answers, then unload; and the same for the python plugin host
  (``examples/hello``).
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ROUNDS = 15

BWRAP = ["--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
         "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
         "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev",
         "--tmpfs", "/tmp", "/bin/true"]


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def _time_subprocess(argv: list[str]) -> list[float]:
    samples = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, timeout=60)
        samples.append(time.perf_counter() - start)
    return samples


async def _exec_true() -> list[float]:
    from sandboxer.sandbox import cgroups, program
    from sandboxer.sandbox.policy import SandboxConfig
    from sandboxer.sandbox.seccomp import compile_filter

    backend = cgroups.detect()
    bpf = compile_filter("default", network=False)
    samples = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        result = await program.run(["/bin/true"], SandboxConfig(), backend=backend,
                                   seccomp_bpf=bpf)
        samples.append(time.perf_counter() - start)
        assert result.returncode == 0
    return samples


async def _cold_start(example: str) -> list[float]:
    from sandboxer import PluginManager

    samples = []
    async with PluginManager() as mgr:
        for _ in range(ROUNDS):
            start = time.perf_counter()
            plugin = await mgr.load(REPO / "examples" / example)
            await plugin.call("greet", "bench")
            samples.append(time.perf_counter() - start)
            await mgr.unload(plugin.id)
    return samples


def run() -> dict[str, Any]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise RuntimeError("bubblewrap is not installed (apt-get install bubblewrap)")
    bwrap_true = _median_ms(_time_subprocess([bwrap, *BWRAP]))
    exec_true = _median_ms(asyncio.run(_exec_true()))
    cli_exec_true = _median_ms(_time_subprocess(
        [sys.executable, "-m", "sandboxer.cli", "exec", "--", "/bin/true"]))
    cold_node = _median_ms(asyncio.run(_cold_start("external-node")))
    cold_python = _median_ms(asyncio.run(_cold_start("hello")))
    return {
        "exec_true_ms": exec_true,
        "bwrap_true_ms": bwrap_true,
        "ratio_vs_bwrap": round(exec_true / bwrap_true, 2),
        "cli_exec_true_ms": cli_exec_true,
        "cold_start_ms": cold_node,
        "cold_start_python_host_ms": cold_python,
        "rounds": ROUNDS,
        "baselines": {
            "bwrap_true_ms": "bwrap " + " ".join(BWRAP) + " (subprocess, median)",
            "exec_true_ms": "sandboxer.sandbox.program.run(['/bin/true']) in-process: "
                            "namespaces, cgroup v1, seccomp default (median)",
            "cli_exec_true_ms": "python -m sandboxer.cli exec -- /bin/true (subprocess)",
            "cold_start_ms": "PluginManager.load(examples/external-node) + first greet",
            "cold_start_python_host_ms": "PluginManager.load(examples/hello) + first greet",
        },
    }


if __name__ == "__main__":
    import json
    print(json.dumps(run(), indent=2))
