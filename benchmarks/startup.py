"""Start-up benchmark (issue 20): how long a sandbox, a plugin and a reload take to be ready,
and what an idle plugin costs in memory, against go-plugin and bubblewrap, in one run.

Every figure is the median of ``rounds`` samples (50 by default), taken in rounds: each round
takes one sample of every configuration, in an order rotated by one each round, so a burst of
other work on the machine hits the baselines and ours alike. Before the rounds every
configuration runs once untimed (its first start pays for the page cache and, in ours, lazy
imports; the Go hosts skip their first start likewise); that sample is kept as
``first_untimed_ms``. benchmarks/README.md, section "startup", says exactly what runs.

  baselines   go_plugin_first_call_ms        go-plugin's Go host (benchmarks/grpc_host, the
                                             grpc benchmark's start code path) starting the
                                             KV plugin to its first answered Get
              go_plugin_bwrap_first_call_ms  the same, the plugin under bwrap --unshare-all
              bwrap_true_ms                  bwrap --unshare-all ... /bin/true, a subprocess
  ours        exec_true_ms                   sandboxer.sandbox.program.run(["/bin/true"])
              cli_exec_true_ms               python -m sandboxer.cli exec -- /bin/true
              python_first_call_cold_ms      load(examples/hello) + greet, sandboxed
              node_first_call_cold_ms        load(examples/external-node) + greet
              grpc_first_call_cold_ms        load(examples/grpc-kv-go) + Put + Get
              grpc_first_call_warm_ms        the same in a sandbox made ahead
              reload_switch_ms               mgr.reload(id) -> its `reloaded` event
                                             (benchmarks/reload.py's direct_reload)
              pss_per_plugin_mib             50 idle examples/hello plugins: the PSS of all
                                             their processes (found through each plugin's
                                             cgroup), divided by 50

Ours run in this process on the default asyncio loop, one PluginManager for all of them;
the baselines run as subprocesses (bwrap) or in two long-lived Go hosts fed one start per
line. Targets are reported (``targets``, ``met``), never asserted; a configuration that fails
raises, and the runner exits 1.

A new configuration is one ``Measurement`` in ``_measurements`` (and a ``Target`` in
``TARGETS`` if it has one); ``run()`` returns the dict stored under "startup" in
benchmarks/results/latest.json.
"""

from __future__ import annotations

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
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ._results import describe_loop, scale
from .grpc import ANSWER, GET, PUT, grpc_build_module, make_plugin_dir
from .reload import KINDS as RELOAD_KINDS
from .reload import Events, Files, copy_example, direct_reload

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# bubblewrap's own sandbox for /bin/true: every namespace it can unshare, /usr read-only and
# the merged-/usr links, its own /proc, /dev and /tmp.
BWRAP_BASE = ["--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
              "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
              "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev",
              "--tmpfs", "/tmp"]

GREET = [("greet", ("bench",), "Hello, bench!")]
PUT_GET = [("Put", (PUT,), {}), ("Get", (GET,), ANSWER)]

PSS_PLUGINS = 50
IDLE_S = 1.0          # after the last plugin's call, before PSS is read
LOAD_CONCURRENCY = 4  # the 50 plugins are loaded (and unloaded) this many at a time


def _counts() -> dict[str, int]:
    s = scale()
    return {"rounds": max(3, round(50 * s)),
            "pss_plugins": max(5, round(PSS_PLUGINS * s))}


@dataclass(frozen=True)
class Target:
    """``key`` <= ``factor`` (x ``reference``'s median when there is one)."""

    key: str
    factor: float
    reference: str | None = None

    def describe(self) -> str:
        return (f"<= {self.factor:g} x {self.reference}" if self.reference
                else f"<= {self.factor:g}")


TARGETS = (
    Target("python_first_call_warm_ms", 1.0, "go_plugin_first_call_ms"),
    Target("python_first_call_cold_ms", 3.0, "go_plugin_bwrap_first_call_ms"),
    Target("reload_switch_ms", 30.0),
    Target("exec_true_ms", 1.5, "bwrap_true_ms"),
    Target("cli_exec_true_ms", 60.0),
    Target("pss_per_plugin_mib", 10.0),
)


@dataclass
class Measurement:
    """One configuration: ``sample()`` starts it once and returns the milliseconds."""

    key: str
    side: str  # "baseline" or "ours"
    what: str  # the baseline string: what runs, in which process, on which loop
    sample: Callable[[], Awaitable[float]]
    samples: list[float] = field(default_factory=list)
    first_untimed_ms: float | None = None

    def summary(self) -> dict[str, Any]:
        s = sorted(self.samples)
        return {"side": self.side, "n": len(s), "median_ms": round(statistics.median(s), 2),
                "p90_ms": round(s[min(len(s) - 1, int(0.9 * len(s)))], 3),
                "min_ms": round(s[0], 3), "max_ms": round(s[-1], 3),
                "first_untimed_ms": (None if self.first_untimed_ms is None
                                     else round(self.first_untimed_ms, 3)),
                "samples_ms": [round(x, 3) for x in self.samples]}


def _ms_since(t0: int) -> float:
    return (time.perf_counter_ns() - t0) / 1e6


# -- the baselines ---------------------------------------------------------------------------

def _subprocess_sample(argv: list[str]) -> Callable[[], Awaitable[float]]:
    """``subprocess.run(argv)`` from this process (blocking: nothing else runs meanwhile),
    timed from before the fork to the exit status read; a non-zero status raises."""

    async def sample() -> float:
        t0 = time.perf_counter_ns()
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=60, cwd=ROOT)
        elapsed = _ms_since(t0)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited with status {done.returncode}: "
                               f"{done.stderr.decode(errors='replace').strip()[-500:]}")
        return elapsed

    return sample


class _GoHost:
    """benchmarks/grpc_host with -serve-starts: one long-lived Go process that starts the KV
    plugin (under ``wrapper``, if any) once per line we write, timing NewClient through the
    first answered Get itself, and answers with that time. Its first start is ours to discard
    (the warm-up), as the grpc benchmark's Go host discards its own."""

    def __init__(self, host: Path, binary: Path, wrapper: list[str], stderr: Path) -> None:
        self.argv = [str(host), "-plugin", str(binary), "-serve-starts", *wrapper]
        self._stderr_path = stderr
        self._stderr: IO[bytes] = open(stderr, "wb")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, cwd=ROOT)

    def _failed(self, why: str) -> RuntimeError:
        status = self.proc.wait(timeout=30)
        tail = self._stderr_path.read_text(errors="replace").strip()[-800:]
        return RuntimeError(f"the Go host {' '.join(self.argv)} {why} (status {status}): "
                            f"{tail}")

    async def sample(self) -> float:
        # Blocking pipe I/O: the time is the Go host's own (time.Now around its start), so
        # nothing on this side is in it.
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._failed("is gone") from None
        line = self.proc.stdout.readline()
        if not line:
            raise self._failed("answered nothing")
        return float(json.loads(line)["first_call_ms"])

    def close(self) -> None:
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            status = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._stderr.close()
        if status != 0:
            raise self._failed("failed at its end")


def _go_version(host: Path) -> str:
    out = subprocess.run(["go", "version", str(host)], capture_output=True, text=True)
    return out.stdout.strip().split(": ", 1)[-1] if out.returncode == 0 else "unknown"


def _bwrap_version(bwrap: str) -> str:
    out = subprocess.run([bwrap, "--version"], capture_output=True, text=True)
    return out.stdout.strip() or "bwrap (version unknown)"


# -- ours ------------------------------------------------------------------------------------

def _exec_true_sample() -> Callable[[], Awaitable[float]]:
    """``program.run(["/bin/true"])`` in this process, as ``sandboxer exec`` runs it, with the
    cgroup backend detected and the default seccomp filter compiled once, beforehand."""
    from sandboxer.sandbox import cgroups, program
    from sandboxer.sandbox.policy import SandboxConfig
    from sandboxer.sandbox.seccomp import compile_filter

    backend = cgroups.detect()
    bpf = compile_filter("default", network=False)

    async def sample() -> float:
        t0 = time.perf_counter_ns()
        result = await program.run(["/bin/true"], SandboxConfig(), backend=backend,
                                   seccomp_bpf=bpf)
        elapsed = _ms_since(t0)
        if result.returncode != 0:
            raise RuntimeError(f"/bin/true in sandboxer's sandbox exited with "
                               f"{result.returncode}")
        return elapsed

    return sample


def _first_call_sample(mgr: Any, path: Path, calls: list[tuple[str, tuple[Any, ...], Any]],
                       *, warm: bool = False) -> Callable[[], Awaitable[float]]:
    """``await mgr.load(path)`` until each of ``calls`` (method, args, expected answer), in
    turn, has answered; unloaded after, untimed. ``warm``: the manager's warm sandboxes are
    made ready first (untimed), and the plugin must have started in one; else it must have
    started cold."""

    async def sample() -> float:
        if warm:
            await mgr.warm_up()
        t0 = time.perf_counter_ns()
        plugin = await mgr.load(path)
        answers = [await plugin.call(method, *args) for method, args, _ in calls]
        elapsed = _ms_since(t0)
        try:
            if plugin.sandbox is None or not plugin.sandbox.enabled:
                raise RuntimeError(f"{path} was loaded without its sandbox")
            if plugin.started_warm != warm:
                raise RuntimeError(f"{path} started {'warm' if plugin.started_warm else 'cold'}")
            for (method, _, expect), answer in zip(calls, answers):
                if answer != expect:
                    raise RuntimeError(f"{path}: {method} answered {answer!r}, not {expect!r}")
        finally:
            await mgr.unload(plugin.id)
            if warm:  # the refill done before the next sample, whatever it measures
                await mgr.warm_up()
        return elapsed

    return sample


def _reload_switch_sample(mgr: Any, events: Events, plugin: Any, files: Files,
                          call_ms: list[float], *, warm: bool) -> Callable[[], Awaitable[float]]:
    """benchmarks/reload.py's ``direct_reload``: new code renamed into place (untimed), then
    ``await mgr.reload(id)``; the sample is the call to its ``reloaded`` event (the switch),
    and the call to its return (the old generation retired too) goes to ``call_ms``.
    ``warm``: the new generation must start in a warm sandbox (made ready first, untimed)."""
    counter = iter(range(1, 1_000_000))

    async def sample() -> float:
        if warm:
            await mgr.warm_up()
        r = await direct_reload(mgr, events, plugin, files, next(counter))
        if plugin.started_warm != warm:
            raise RuntimeError(f"the reloaded generation started "
                               f"{'warm' if plugin.started_warm else 'cold'}")
        if warm:  # the refill done before the next sample, whatever it measures
            await mgr.warm_up()
        call_ms.append(r["call_ms"])
        return float(r["switch_ms"])

    return sample


# -- the rounds ------------------------------------------------------------------------------

def _measurements(stack: AsyncExitStack, mgr: Any, warm_mgr: Any, tmp: Path, *, bwrap: str,
                  go_host: Path, kv_dir: Path,
                  reload_samples: dict[str, Callable[[], Awaitable[float]]], loop: str
                  ) -> list[Measurement]:
    """Every configuration, in the order of the first round; the Go hosts are started here
    and closed by ``stack``."""
    binary = kv_dir / "kv-go-grpc"
    sockets = tmp / "go-plugin-sockets"
    sockets.mkdir()
    # go-plugin 1.0.1's plugin listens on a Unix socket it makes in $TMPDIR and prints its
    # path: that dir is bound at the same path inside, so the host outside finds the socket.
    bwrap_plugin = [bwrap, *BWRAP_BASE, "--ro-bind", str(binary), str(binary),
                    "--bind", str(sockets), str(sockets), "--setenv", "TMPDIR", str(sockets)]
    go = _GoHost(go_host, binary, [], tmp / "go-host.stderr")
    stack.callback(go.close)
    go_bwrap = _GoHost(go_host, binary, bwrap_plugin, tmp / "go-host-bwrap.stderr")
    stack.callback(go_bwrap.close)
    go_version = _go_version(go_host)
    bwrap_argv = [bwrap, *BWRAP_BASE, "/bin/true"]
    cli_argv = [sys.executable, "-m", "sandboxer.cli", "exec", "--", "/bin/true"]

    go_what = (
        "go-plugin 1.0.1's own Go host (benchmarks/grpc_host, {go}; the grpc benchmark's "
        "start() code path, run with -serve-starts: one long-lived Go process, one start per "
        "line it reads) starting examples/grpc-kv-go's binary {how}: plugin.NewClient with the "
        "example's handshake and plugin map, gRPC only; Client() (the process started, its "
        "handshake line read, the gRPC connection made), Dispense(\"kv_grpc\"), Put(\"a\"), "
        "Get(\"a\") answered \"hi\". Timed inside the Go host (time.Now from before NewClient "
        "to the Get's answer), so the Go host's own process start is not in it, as the "
        "supervisor's is not in ours; the plugin stopped after (client.Kill(), untimed)"
    )
    hello, node = EXAMPLES / "hello", EXAMPLES / "external-node"
    grpc_what = (
        "await mgr.load(<examples/grpc-kv-go: the same binary the Go hosts start, with its "
        "descriptor set>) then Put {'key': 'a', 'value': 'aGk='} and Get {'key': 'a'} "
        "answered {} and {'value': 'aGk='} (grpc kind, go-plugin handshake, HTTP/2 over the "
        "plugin's Unix socket)"
    )
    loaded_by = (f"on one PluginManager(config=HostConfig(warm_sandboxes=0)) in this process "
                 f"(no warm sandboxes: every start cold, checked), default profile (sandboxed: "
                 f"namespaces, seccomp filter, cgroup), on {loop}; timed with "
                 f"perf_counter_ns; unloaded after, untimed")
    loaded_warm = (f"on one PluginManager() in this process (warm sandboxes on, the default: "
                   f"before each sample, untimed, `await mgr.warm_up()` until one waits; the "
                   f"plugin checked to have started in it), default profile (sandboxed: "
                   f"namespaces, seccomp filter, cgroup), on {loop}; timed with "
                   f"perf_counter_ns; unloaded after, untimed")
    return [
        Measurement(
            "go_plugin_first_call_ms", "baseline",
            go_what.format(go=go_version, how="unsandboxed (Cmd: the binary)"), go.sample),
        Measurement(
            "go_plugin_bwrap_first_call_ms", "baseline",
            go_what.format(go=go_version, how=(
                "under bubblewrap (Cmd: " + " ".join([bwrap, *BWRAP_BASE]) + " --ro-bind BINARY "
                "BINARY --bind SOCKDIR SOCKDIR --setenv TMPDIR SOCKDIR BINARY, SOCKDIR a temp "
                "dir for the plugin's Unix socket; " + _bwrap_version(bwrap) + ")")),
            go_bwrap.sample),
        Measurement(
            "bwrap_true_ms", "baseline",
            " ".join(bwrap_argv) + f" ({_bwrap_version(bwrap)}), run by subprocess.run from "
            "this Python process (blocking), perf_counter_ns from before the fork to the exit "
            "status read",
            _subprocess_sample(bwrap_argv)),
        Measurement(
            "exec_true_ms", "ours",
            "await sandboxer.sandbox.program.run(['/bin/true'], SandboxConfig(), backend=, "
            "seccomp_bpf=) in this process (the cgroup backend detected and the default "
            "seccomp filter compiled once, before the rounds): the launcher, namespaces, "
            f"cgroup, seccomp, exec, the exit status read; on {loop}; perf_counter_ns",
            _exec_true_sample()),
        Measurement(
            "cli_exec_true_ms", "ours",
            " ".join(cli_argv) + " (the venv's python, sys.executable), run by subprocess.run "
            "from this process like bwrap_true_ms: Python's start, sandboxer's import and the "
            "same sandbox",
            _subprocess_sample(cli_argv)),
        Measurement(
            "python_first_call_cold_ms", "ours",
            f"await mgr.load('examples/hello') then await p.call('greet', 'bench') answered "
            f"'Hello, bench!' (python kind: the plugin host in the sandbox) {loaded_by}",
            _first_call_sample(mgr, hello, GREET)),
        Measurement(
            "python_first_call_warm_ms", "ours",
            f"await mgr.load('examples/hello') then await p.call('greet', 'bench') answered "
            f"'Hello, bench!' (python kind: the plugin host already waiting in a sandbox made "
            f"ahead; its files handed over, its limits set) {loaded_warm}",
            _first_call_sample(warm_mgr, hello, GREET, warm=True)),
        Measurement(
            "node_first_call_cold_ms", "ours",
            f"await mgr.load('examples/external-node') then await p.call('greet', 'bench') "
            f"answered 'Hello, bench!' (external kind, node on PATH in the sandbox) {loaded_by}",
            _first_call_sample(mgr, node, GREET)),
        Measurement(
            "node_first_call_warm_ms", "ours",
            f"await mgr.load('examples/external-node') then await p.call('greet', 'bench') "
            f"answered 'Hello, bench!' (external kind: the sandbox made ahead, node exec'd in "
            f"it at take time; the pool taught the example's shape by one load before the "
            f"rounds) {loaded_warm}",
            _first_call_sample(warm_mgr, node, GREET, warm=True)),
        Measurement(
            "grpc_first_call_cold_ms", "ours",
            f"{grpc_what} {loaded_by}",
            _first_call_sample(mgr, kv_dir, PUT_GET)),
        Measurement(
            "grpc_first_call_warm_ms", "ours",
            f"{grpc_what[:-1]}; the sandbox made ahead (with its own socket directory), the plugin "
            f"exec'd in it at take time; the pool taught the shape by one load before the "
            f"rounds) {loaded_warm}",
            _first_call_sample(warm_mgr, kv_dir, PUT_GET, warm=True)),
        *(
            Measurement(
                key, "ours",
                "benchmarks/reload.py's direct_reload on examples/counter (python kind, "
                "sandboxed, stateful), loaded once on " + manager + " (no hot reload): its "
                "counter/__init__.py replaced by a new version (renamed into place, untimed), "
                "then `await mgr.reload(id)` until its `reloaded` event (a new generation "
                "prepared, the state moved, routing switched: reload's "
                "reload_call_switch_p50_ms); the old generation's drain and retirement come "
                "after the switch (reload_call_ms has the call to its return); time.time() to "
                f"the event's `at`; on {loop}",
                reload_samples[key])
            for key, manager in (
                ("reload_switch_ms", "the PluginManager() with warm sandboxes (before each "
                 "sample, untimed, warm_up(); the new generation checked to have started "
                 "warm)"),
                ("reload_switch_cold_ms", "the PluginManager(config=HostConfig("
                 "warm_sandboxes=0)) (every generation cold)"),
            )
        ),
    ]


async def _rounds(tmp: Path, rounds: int, *, bwrap: str, go_host: Path, kv_dir: Path
                  ) -> dict[str, Any]:
    from sandboxer import HostConfig, PluginManager

    loop = describe_loop(asyncio.get_running_loop())
    async with AsyncExitStack() as stack:
        mgr = await stack.enter_async_context(
            PluginManager(config=HostConfig(warm_sandboxes=0)))
        warm_mgr = await stack.enter_async_context(PluginManager())
        reload_call_ms: list[float] = []
        reload_samples = {}
        for key, manager, warm in (("reload_switch_ms", warm_mgr, True),
                                   ("reload_switch_cold_ms", mgr, False)):
            events = Events(manager)
            stack.push_async_callback(events.aclose)
            counter_dir = copy_example(EXAMPLES / "counter", tmp / f"counter-{key}")
            counter = await manager.load(counter_dir)
            stack.push_async_callback(manager.unload, counter.id)
            if counter.sandbox is None or not counter.sandbox.enabled:
                raise RuntimeError("examples/counter was loaded without its sandbox")
            files = Files(RELOAD_KINDS["python"], counter_dir, tmp / f"counter-staging-{key}")
            reload_samples[key] = _reload_switch_sample(
                manager, events, counter, files, reload_call_ms if warm else [], warm=warm)
        # The warm manager learns the external and gRPC examples' shapes (their first loads
        # are cold).
        for taught in (EXAMPLES / "external-node", kv_dir):
            await warm_mgr.unload((await warm_mgr.load(taught)).id)
        measurements = _measurements(stack, mgr, warm_mgr, tmp, bwrap=bwrap, go_host=go_host,
                                     kv_dir=kv_dir, reload_samples=reload_samples, loop=loop)
        for m in measurements:
            m.first_untimed_ms = await m.sample()
        reload_call_ms.clear()
        gc.collect()
        for r in range(rounds):
            k = r % len(measurements)
            for m in measurements[k:] + measurements[:k]:
                m.samples.append(await m.sample())
    return {"loop": loop, "measurements": measurements,
            "reload_call_ms": [round(x, 3) for x in reload_call_ms]}


# -- memory: PSS of idle plugins -------------------------------------------------------------

def _children(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(x) for x in f.read().split())
        except FileNotFoundError:
            pass
    return out


def _descendants(pid: int) -> set[int]:
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in _children(todo.pop()):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of /proc/PID/stat): with the pid, it
    names one process, even once the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (FileNotFoundError, ProcessLookupError):
        return None


_V1_CONTROLLERS = {"memory", "cpu", "cpuacct", "pids", "cpuset", "blkio", "devices", "freezer",
                   "net_cls", "net_prio", "perf_event", "hugetlb", "rdma", "misc"}


def _cgroup_mounts() -> dict[str, str]:
    """Hierarchy key ("memory", "cpu,cpuacct", "name=systemd" for v1; "" for v2) -> its mount
    point, from /proc/self/mountinfo."""
    mounts: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            point = left.split()[4]
            fstype, _source, options = right.split()[:3]
            if fstype == "cgroup2":
                mounts.setdefault("", point)
            elif fstype == "cgroup":
                keys = [o for o in options.split(",")
                        if o in _V1_CONTROLLERS or o.startswith("name=")]
                mounts.setdefault(",".join(sorted(keys)), point)
    return mounts


def _cgroup_lines(pid: int) -> dict[str, str]:
    """Hierarchy key -> the process's cgroup path in it (/proc/PID/cgroup)."""
    out = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            out[",".join(sorted(controllers.split(","))) if controllers else ""] = path
    return out


def _plugin_cgroup_dirs(launcher: int, mounts: dict[str, str], own: dict[str, str]
                        ) -> list[str]:
    """The cgroup directories the launcher is in that the supervisor is not: the plugin's."""
    dirs = []
    for key, path in _cgroup_lines(launcher).items():
        if path != own.get(key) and key in mounts:
            dirs.append(os.path.join(mounts[key], path.lstrip("/")))
    return dirs


def _read_procs(directory: str) -> set[int]:
    with open(os.path.join(directory, "cgroup.procs")) as f:
        return {int(x) for x in f.read().split()}


def _smaps_rollup(pid: int) -> dict[str, int]:
    """/proc/PID/smaps_rollup's kB fields (Rss, Pss, Pss_Anon, Pss_File, ...)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def _plugin_processes(plugin: Any, mounts: dict[str, str], own: dict[str, str]
                      ) -> dict[str, Any]:
    """Every process of one sandboxed plugin, each named for its place: the launcher (the
    supervisor's child, outside the plugin's PID namespace), PID 1 of that namespace (the
    launcher's child) and the plugin host (PID 1's child). The plugin's cgroup must list
    exactly the launcher and its descendants, or this raises."""
    launcher = plugin.handle.pid
    if int(_status(launcher)["PPid"]) != os.getpid():
        raise RuntimeError(f"plugin {plugin.id}: process {launcher} is not this process's child")
    tree = {launcher} | _descendants(launcher)
    dirs = _plugin_cgroup_dirs(launcher, mounts, own)
    if not dirs:
        raise RuntimeError(f"plugin {plugin.id}: its launcher {launcher} is in no cgroup of "
                           "its own")
    for directory in dirs:
        listed = _read_procs(directory)
        if listed != tree:
            raise RuntimeError(f"plugin {plugin.id}: its cgroup {directory} lists {listed}, "
                               f"its process tree is {tree}")
    kinds: dict[int, str] = {launcher: "launcher"}
    pid1 = _children(launcher)
    if len(pid1) != 1:
        raise RuntimeError(f"plugin {plugin.id}: the launcher has children {pid1}, not one")
    (p1,) = pid1
    if _status(p1)["NSpid"].split()[-1] != "1":
        raise RuntimeError(f"plugin {plugin.id}: the launcher's child {p1} is not PID 1 of "
                           "its namespace")
    kinds[p1] = "pid1"
    for pid in _children(p1):
        kinds[pid] = "host"
    for pid in tree - set(kinds):
        kinds[pid] = "other"
    return {"kinds": kinds, "cgroup_dirs": dirs,
            "start_times": {pid: _start_time(pid) for pid in tree}}


async def _pss(tmp: Path, n: int, *, warm: bool) -> dict[str, Any]:
    """Load ``n`` copies of examples/hello (ids bench.hello-NN), call each once, wait
    ``IDLE_S``, then read the PSS of every process of every plugin; unload all and check that
    none of their processes and cgroups is left. ``warm``: each plugin starts in a warm
    sandbox (loaded one at a time, the pool made ready before each); else every start is
    cold (no warm sandboxes)."""
    from sandboxer import HostConfig, PluginManager
    from sandboxer.sandbox import forkserver

    source = (EXAMPLES / "hello" / "plugin.toml").read_text()
    if 'id = "example.hello"' not in source:
        raise RuntimeError("examples/hello/plugin.toml no longer has id example.hello")
    dirs = []
    for i in range(n):
        d = copy_example(EXAMPLES / "hello", tmp / f"hello-{i:02d}")
        (d / "plugin.toml").write_text(
            source.replace('id = "example.hello"', f'id = "bench.hello-{i:02d}"'))
        dirs.append(d)
    mounts, own = _cgroup_mounts(), _cgroup_lines(os.getpid())

    async def load(d: Path) -> Any:
        async with gate:
            if warm:
                await mgr.warm_up()
            plugin = await mgr.load(d)
            if plugin.started_warm != warm:
                raise RuntimeError(f"{plugin.id} did not start {'warm' if warm else 'cold'}")
            return plugin

    async def unload(plugin_id: str) -> None:
        async with gate:
            await mgr.unload(plugin_id)

    def others() -> set[int]:
        """This process's descendants that are no plugin's: the launcher fork server, which
        lives as long as the process, and the warm sandboxes waiting (not plugins yet)."""
        pool = mgr.warm_pool if mgr is not None else None
        roots = [*([pid] if (pid := forkserver.server_pid()) else []),
                 *(pool.pids() if pool is not None else [])]
        return {*roots, *(d for r in roots for d in _descendants(r))}

    mgr = None
    if _descendants(os.getpid()) - others():
        raise RuntimeError(f"this process has child processes before the PSS phase: "
                           f"{sorted(_descendants(os.getpid()) - others())}")
    gate = asyncio.Semaphore(1 if warm else LOAD_CONCURRENCY)
    config = HostConfig() if warm else HostConfig(warm_sandboxes=0)
    async with PluginManager(config=config) as mgr:
        t0 = time.monotonic()
        plugins = await asyncio.gather(*(load(d) for d in dirs))
        load_s = time.monotonic() - t0
        for p in plugins:
            if p.sandbox is None or not p.sandbox.enabled:
                raise RuntimeError(f"{p.id} was loaded without its sandbox")
            answer = await p.call("greet", "bench")
            if answer != "Hello, bench!":
                raise RuntimeError(f"{p.id}: greet answered {answer!r}")
        await asyncio.sleep(IDLE_S)

        found = {p.id: _plugin_processes(p, mounts, own) for p in plugins}
        counted: dict[int, str] = {}
        for pid_map in (f["kinds"] for f in found.values()):
            for pid in pid_map:
                if pid in counted:
                    raise RuntimeError(f"process {pid} belongs to two plugins")
            counted.update(pid_map)
        everything = _descendants(os.getpid()) - others()
        if set(counted) != everything:
            raise RuntimeError(f"this process's descendants {sorted(everything)} are not the "
                               f"plugins' processes {sorted(counted)}")
        readings = {pid: _smaps_rollup(pid) for pid in counted}
        supervisor = _smaps_rollup(os.getpid())

        t0 = time.monotonic()
        await asyncio.gather(*(unload(p.id) for p in plugins))
        unload_s = time.monotonic() - t0

    left = [pid for f in found.values() for pid, started in f["start_times"].items()
            if started is not None and _start_time(pid) == started]
    dirs_left = [d for f in found.values() for d in f["cgroup_dirs"] if os.path.exists(d)]
    mgr = None  # closed: its warm sandboxes are gone too
    if left or dirs_left or _descendants(os.getpid()) - others():
        raise RuntimeError(f"after unloading every plugin: processes left {left}, cgroups left "
                           f"{dirs_left}, children {sorted(_descendants(os.getpid()))}")

    by_kind: dict[str, dict[str, Any]] = {}
    for pid, kind in counted.items():
        k = by_kind.setdefault(kind, {"processes": 0, "Pss": 0, "Rss": 0, "Pss_Anon": 0,
                                      "Pss_File": 0, "Pss_Shmem": 0})
        k["processes"] += 1
        for field_name in ("Pss", "Rss", "Pss_Anon", "Pss_File", "Pss_Shmem"):
            k[field_name] += readings[pid].get(field_name, 0)
    total_kb = sum(r["Pss"] for r in readings.values())
    mib = 1024.0
    kinds_out = {
        kind: {"processes": k["processes"],
               "processes_per_plugin": round(k["processes"] / n, 2),
               "pss_mib_per_plugin": round(k["Pss"] / mib / n, 2),
               "pss_mib_per_process": round(k["Pss"] / mib / k["processes"], 2),
               "rss_mib_per_process": round(k["Rss"] / mib / k["processes"], 2),
               "pss_anon_mib_per_process": round(k["Pss_Anon"] / mib / k["processes"], 2),
               "pss_file_mib_per_process": round(k["Pss_File"] / mib / k["processes"], 2),
               "pss_shmem_mib_per_process": round(k["Pss_Shmem"] / mib / k["processes"], 2)}
        for kind, k in sorted(by_kind.items())
    }
    return {
        "pss_per_plugin_mib": round(total_kb / mib / n, 2),
        "plugins": n,
        "processes": len(counted),
        "processes_per_plugin": round(len(counted) / n, 2),
        "total_pss_mib": round(total_kb / mib, 1),
        "by_kind": kinds_out,
        "supervisor_pss_mib_not_counted": round(supervisor["Pss"] / mib, 1),
        "load_seconds": round(load_s, 1),
        "unload_seconds": round(unload_s, 1),
        "idle_s": IDLE_S,
        "cgroup_dirs_per_plugin": len(next(iter(found.values()))["cgroup_dirs"]),
        "checked": "each plugin's cgroup (every hierarchy it has its own directory in) listed "
                   "exactly its launcher and the launcher's descendants; no process counted "
                   "for two plugins; this process's descendants were exactly the plugins' "
                   "processes; after unloading, none of them (pid and start time) and none "
                   "of their cgroup directories was left, and this process had no children",
    }


# -- the run ---------------------------------------------------------------------------------

def _targets(figures: dict[str, float]) -> tuple[dict[str, Any], dict[str, bool]]:
    targets, met = {}, {}
    for t in TARGETS:
        value = figures[t.key]
        limit = t.factor * figures[t.reference] if t.reference else t.factor
        entry: dict[str, Any] = {"target": t.describe(), "value": value,
                                 "limit": round(limit, 3), "met": value <= limit}
        if t.reference:
            entry["ratio_vs_" + t.reference] = round(value / figures[t.reference], 3)
        targets[t.key] = entry
        met[t.key] = entry["met"]
    return targets, met


def run() -> dict[str, Any]:
    c = _counts()
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise RuntimeError("bubblewrap is not installed (apt-get install -y bubblewrap; "
                           "make bench does it)")
    started = time.monotonic()
    # The package's bytecode, as an installed package has it (pip compiles at install): the
    # CLI's runs would otherwise compile every module they import, each time, wherever
    # PYTHONDONTWRITEBYTECODE is set.
    import compileall
    compileall.compile_dir(str(ROOT / "sandboxer"), quiet=1)
    with tempfile.TemporaryDirectory(prefix="sandboxer-bench-startup-") as tmp_name:
        tmp = Path(tmp_name)
        kv_dir = make_plugin_dir(tmp / "grpc")
        go_host = grpc_build_module().build_go_host(tmp / "host")
        build_s = time.monotonic() - started
        (tmp / "rounds").mkdir()
        (tmp / "pss").mkdir()
        with asyncio.Runner() as runner:
            timed = runner.run(_rounds(tmp / "rounds", c["rounds"], bwrap=bwrap,
                                       go_host=go_host, kv_dir=kv_dir))
            rounds_s = time.monotonic() - started - build_s
            pss = runner.run(_pss(tmp / "pss", c["pss_plugins"], warm=False))
            (tmp / "pss-warm").mkdir()
            pss_warm = runner.run(_pss(tmp / "pss-warm", c["pss_plugins"], warm=True))
    measurements: list[Measurement] = timed["measurements"]
    figures: dict[str, float] = {m.key: round(statistics.median(m.samples), 2)
                                 for m in measurements}
    figures["pss_per_plugin_mib"] = pss["pss_per_plugin_mib"]
    figures["pss_per_plugin_warm_mib"] = pss_warm["pss_per_plugin_mib"]
    targets, met = _targets(figures)
    result: dict[str, Any] = {
        **figures,
        "exec_true_ratio_vs_bwrap_true": round(figures["exec_true_ms"]
                                               / figures["bwrap_true_ms"], 2),
        "python_first_call_cold_ratio_vs_go_plugin_bwrap": round(
            figures["python_first_call_cold_ms"] / figures["go_plugin_bwrap_first_call_ms"], 2),
        "targets": targets,
        "met": met,
        "baselines": {**{m.key: m.what for m in measurements},
                      "pss_per_plugin_mib": (
                          f"{pss['plugins']} copies of examples/hello (ids bench.hello-NN), "
                          f"loaded sandboxed (default profile), every one cold, on a fresh "
                          f"PluginManager(config=HostConfig(warm_sandboxes=0)) "
                          f"{LOAD_CONCURRENCY} at a time, one greet call each, then "
                          f"{IDLE_S:g} s idle; the Pss line of /proc/PID/smaps_rollup summed "
                          "over every process of every plugin (found through each plugin's "
                          "cgroup, checked against the process tree under its launcher), "
                          f"divided by {pss['plugins']}. PSS splits each shared page among "
                          "every process mapping it, this benchmark's and others' on the "
                          "machine included, so what the plugins share with the rest counts "
                          "only in part. The launcher fork server, one per supervisor, is "
                          "not a plugin's and is not counted"),
                      "pss_per_plugin_warm_mib": (
                          "the same, every plugin started warm: loaded one at a time on a "
                          "fresh PluginManager() (warm sandboxes on), `await mgr.warm_up()` "
                          "before each load; the sandboxes still waiting in the pool are not "
                          "plugins and are not counted (they count against the pool's memory "
                          "budget)")},
        "measurements": {m.key: m.summary() for m in measurements},
        "reload_call_ms": {"median_ms": round(statistics.median(timed["reload_call_ms"]), 2),
                           "samples_ms": timed["reload_call_ms"],
                           "what": "the same reloads as reload_switch_ms, from the call to "
                                   "its return (the old generation drained and retired too)"},
        "pss": pss,
        "pss_warm": pss_warm,
        "meta": {"load_average_1m_after": round(os.getloadavg()[0], 2)},
        "config": {
            **c,
            "scale": scale(),
            "loop": timed["loop"],
            "method": "one untimed sample of every configuration, gc.collect(), then "
                      f"{c['rounds']} rounds; each round one sample of each configuration, "
                      "the order rotated by one each round; gc enabled; then the PSS phase",
            "build_seconds": round(build_s, 1),
            "rounds_seconds": round(rounds_s, 1),
        },
    }
    return result


def format_table(result: dict[str, Any]) -> str:
    """The readable table the runner prints."""
    rows = [("figure", "side", "median ms", "p90 ms", "min ms", "first ms", "n")]
    for key, m in result["measurements"].items():
        rows.append((key, m["side"], f"{m['median_ms']:.2f}", f"{m['p90_ms']:.2f}",
                     f"{m['min_ms']:.2f}", f"{m['first_untimed_ms']:.2f}", str(m["n"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i > 1 else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    p = result["pss"]
    lines.append("")
    lines.append(f"pss_per_plugin_mib {p['pss_per_plugin_mib']} ({p['plugins']} idle "
                 f"examples/hello, {p['processes_per_plugin']} processes each):")
    for kind, k in p["by_kind"].items():
        lines.append(f"  {kind:<9} {k['pss_mib_per_process']:6.2f} MiB PSS a process "
                     f"(anon {k['pss_anon_mib_per_process']}, file "
                     f"{k['pss_file_mib_per_process']}; RSS {k['rss_mib_per_process']})")
    lines.append("")
    for key, t in result["targets"].items():
        limit = f" = {t['limit']:g}" if "x" in t["target"] else ""
        lines.append(f"{key}: {t['value']} (target {t['target']}{limit}: "
                     f"{'met' if t['met'] else 'NOT met'})")
    return "\n".join(lines)


if __name__ == "__main__":
    out = run()
    print(format_table(out))
    print(json.dumps(out, indent=2)[:2000])
