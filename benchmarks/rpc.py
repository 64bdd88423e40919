"""RPC benchmark: our wire protocol against bare echoes and grpcio, measured in one run.

What is measured (benchmarks/README.md says exactly how each baseline is built):

  echo_blocking          blocking-socket client -> bare Python echo server process
  echo_asyncio           minimal asyncio.Protocol RPC client, default loop -> the same server
  echo_asyncio_buffered  the same client as an asyncio.BufferedProtocol
  echo_uvloop[_buffered] the same two clients on uvloop
  rpc_asyncio            ProcessLoader(python) + plugin host, unsandboxed,
                         ``await handle.call("echo", "hello")`` on the default loop: primary
  rpc_uvloop             the same on uvloop
  rpc_asyncio_sandboxed  the same as rpc_asyncio with the sandbox on (where possible)
  grpc                   grpcio unary call over a Unix socket, generic handler, sync client

Each configuration runs in a fresh interpreter (this file run by path with ``--child``), so
uvloop and grpcio never share a process with the default-loop figures. Inside one child the
baseline and our stack are measured in alternating rounds, so drift on a busy machine hits
both alike. gc is disabled during every measured loop, baselines included.

``run()`` returns the dict stored under "rpc" in benchmarks/results/latest.json.
``python benchmarks/rpc.py --profile`` prints where the time goes on both sides instead.

This file is also run by path as the children and as the profiling plugin-host wrapper, so it
imports only the standard library, orjson and sandboxer at module level (no relative imports).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Awaitable, Callable

if __name__ == "__main__" and sys.path and os.path.realpath(sys.path[0]) == os.path.dirname(
        os.path.realpath(__file__)):
    # Run by path, this directory is first on sys.path, and its grpc.py (the grpc benchmark)
    # would shadow grpcio for the gRPC child.
    del sys.path[0]

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent

IN_FLIGHT = 64
PAYLOAD = "hello"
TARGETS = {"p50_ratio_vs_echo": 1.5, "throughput_calls_per_s": 50_000}


def _scale() -> float:
    """SANDBOXER_BENCH_SCALE=0.1 runs a tenth of the iterations (a smoke test, not a result)."""
    try:
        return max(0.001, float(os.environ.get("SANDBOXER_BENCH_SCALE", "1")))
    except ValueError:
        return 1.0


def _counts() -> dict[str, int]:
    s = _scale()
    rounds = 4
    return {
        "rounds": rounds,
        # per round and per measurement; totals are rounds times these
        "sequential_per_round": max(50, int(5_000 * s)),
        "pipelined_per_round": max(IN_FLIGHT * 4, int(20_000 * s)) // IN_FLIGHT * IN_FLIGHT,
        "warmup": max(50, int(2_000 * s)),
        # grpc is a reference point at ~0.5 ms a call here: fewer calls keep the run short.
        "grpc_sequential": max(200, int(10_000 * s)),
        "grpc_pipelined": max(IN_FLIGHT * 4, int(10_000 * s)),
    }


# -- statistics ------------------------------------------------------------------------------

def _summary(samples_ns: list[int]) -> dict[str, Any]:
    s = sorted(samples_ns)
    n = len(s)

    def pct(p: float) -> float:
        return round(s[min(n - 1, int(p * n))] / 1000, 2)

    return {"n": n, "p50_us": pct(0.50), "p90_us": pct(0.90), "p99_us": pct(0.99),
            "min_us": round(s[0] / 1000, 2), "mean_us": round(sum(s) / n / 1000, 2)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


# -- the bare echo server --------------------------------------------------------------------

# Blocking recv/sendall on the fd it is given, nothing else: it returns every byte it receives,
# so each request line comes back as it was sent. Run with `python -I -c`, imports only socket.
# 64 KiB reads: a recv(n) allocates an n-byte bytes object first, and from 128 KiB up that is
# an mmap, a page fault, an mremap and a munmap per read, which on this kind of VM costs more
# than the round trip itself; a bare server would not pay that, so the baseline does not.
ECHO_SERVER = """\
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
s.setblocking(True)
recv, send = s.recv, s.sendall
while True:
    d = recv(65536)
    if not d:
        break
    send(d)
"""


def _start_echo_server() -> tuple[socket.socket, subprocess.Popen[bytes]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen([sys.executable, "-I", "-c", ECHO_SERVER, str(theirs.fileno())],
                            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
    theirs.close()
    return ours, proc


def _stop_echo_server(sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
    sock.close()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _request_line(rid: int) -> bytes:
    """The exact frame our client sends for ``handle.call("echo", "hello")``."""
    from sandboxer.rpc.framing import encode_request
    return encode_request(rid, "echo", [PAYLOAD])


# -- echo_blocking ---------------------------------------------------------------------------

def _blocking_caller(sock: socket.socket) -> Callable[[], None]:
    """One call, blocking: encode the request with the counter id, sendall it, recv to the
    newline, decode it and check its id: the least a JSON-RPC client must do for a call."""
    import orjson

    dumps, loads = orjson.dumps, orjson.loads
    recv, send = sock.recv, sock.sendall
    rid = 0

    def one() -> None:
        nonlocal rid
        rid += 1
        send(dumps({"jsonrpc": "2.0", "id": rid, "method": "echo", "params": [PAYLOAD]})
             + b"\n")
        data = recv(65536)
        while not data.endswith(b"\n"):
            data += recv(65536)
        if loads(data)["id"] != rid:
            raise RuntimeError("answer out of order")

    return one


def _start_host_directly(workdir: Path) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """The plugin host exactly as ProcessLoader runs it (same argv and environment), but
    spawned here with a blocking socket for us: the handshake is answered by hand."""
    import orjson

    from sandboxer.loaders.out_of_process import plugin_command, plugin_environment
    from sandboxer.manifest import load_plugin

    path = workdir / "benchplugin.py"
    path.write_text(PLUGIN_SOURCE)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = plugin_environment("c0ffee" * 4, 16 << 20)
    env["SANDBOXER_RPC_FD"] = str(theirs.fileno())
    proc = subprocess.Popen(plugin_command(load_plugin(path)), env=env, close_fds=True,
                            pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                            start_new_session=True)
    theirs.close()
    data = b""
    while not data.endswith(b"\n"):
        chunk = ours.recv(65536)
        if not chunk:
            raise RuntimeError("the plugin host closed the socket during the handshake")
        data += chunk
    hello = orjson.loads(data)
    assert hello["method"] == "sandboxer.handshake", hello
    ours.sendall(b'{"jsonrpc":"2.0","id":0,"result":{"protocol":1}}\n')
    return ours, proc


def child_echo_blocking() -> dict[str, Any]:
    """echo_blocking, and (diagnostic) the same blocking client against the plugin host."""
    c = _counts()
    assert _request_line(7) == (b'{"jsonrpc":"2.0","id":7,"method":"echo",'
                                b'"params":["' + PAYLOAD.encode() + b'"]}\n')
    workdir = Path(tempfile.mkdtemp(prefix="sandboxer-bench-"))
    echo_sock, echo_proc = _start_echo_server()
    host_sock, host_proc = _start_host_directly(workdir)
    calls = {"echo": _blocking_caller(echo_sock), "host": _blocking_caller(host_sock)}
    pids = {"echo": echo_proc.pid, "host": host_proc.pid}
    samples: dict[str, list[int]] = {k: [] for k in calls}
    cpu = {k: [0, 0] for k in calls}
    try:
        for one in calls.values():
            for _ in range(c["warmup"]):
                one()
        clock = time.perf_counter_ns
        gc.collect()
        gc.disable()
        try:
            for _ in range(c["rounds"]):
                for name, one in calls.items():
                    append = samples[name].append
                    cpu0, srv0 = time.process_time_ns(), _proc_cpu_ns(pids[name])
                    for _ in range(c["sequential_per_round"]):
                        t0 = clock()
                        one()
                        append(clock() - t0)
                    cpu[name][0] += time.process_time_ns() - cpu0
                    cpu[name][1] += _proc_cpu_ns(pids[name]) - srv0
        finally:
            gc.enable()
    finally:
        _stop_echo_server(echo_sock, echo_proc)
        _stop_echo_server(host_sock, host_proc)  # EOF ends the host too
        shutil.rmtree(workdir, ignore_errors=True)
    out = {}
    for name, key in (("echo", "sequential"), ("host", "host_blocking")):
        summary = _summary(samples[name])
        summary["client_cpu_us_per_call"] = round(cpu[name][0] / len(samples[name]) / 1000, 2)
        summary["server_cpu_us_per_call"] = round(cpu[name][1] / len(samples[name]) / 1000, 2)
        out[key] = summary if name == "echo" else {"sequential": summary}
    return out


# -- the minimal asyncio RPC client (echo baselines) -----------------------------------------

class EchoClient(asyncio.Protocol):
    """What a minimal JSON-RPC client on asyncio does, and nothing more.

    ``call`` encodes the request with a counter id, writes it and awaits a future kept in a
    dict under that id; ``data_received`` splits lines, decodes each and resolves the future
    its id names. No timeouts, no validation, no error mapping.
    """

    def __init__(self) -> None:
        import orjson
        self._dumps, self._loads = orjson.dumps, orjson.loads
        self._loop = asyncio.get_running_loop()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 1
        self._buf = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
        lines = data.split(b"\n")
        self._buf = lines.pop()
        pending, loads = self._pending, self._loads
        for line in lines:
            msg = loads(line)
            # The echo returns the request, so its "params" stand in for a response's "result".
            pending.pop(msg["id"]).set_result(msg["params"][0])

    async def call(self, method: str, params: list[Any]) -> Any:
        rid = self._next_id
        self._next_id = rid + 1
        future = self._loop.create_future()
        self._pending[rid] = future
        self._transport.write(self._dumps(  # type: ignore[union-attr]
            {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}) + b"\n")
        return await future


class EchoBufferedClient(EchoClient, asyncio.BufferedProtocol):
    """The same minimal client as an ``asyncio.BufferedProtocol``: the loop reads into one
    preallocated 64 KiB buffer (``recv_into``) instead of allocating a new bytes object of the
    transport's max read size (256 KiB on the default loop) for every read."""

    def __init__(self) -> None:
        super().__init__()
        self._rbuf = bytearray(1 << 16)
        self._view = memoryview(self._rbuf)
        self._filled = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._view[self._filled:]

    def buffer_updated(self, nbytes: int) -> None:
        end = self._filled + nbytes
        buf, view, pending, loads = self._rbuf, self._view, self._pending, self._loads
        start = 0
        while (newline := buf.find(b"\n", start, end)) >= 0:
            msg = loads(view[start:newline])
            pending.pop(msg["id"]).set_result(msg["params"][0])
            start = newline + 1
        rest = end - start
        if rest and start:
            buf[:rest] = buf[start:end]
        self._filled = rest


# -- our stack -------------------------------------------------------------------------------

PLUGIN_SOURCE = '''"""Benchmark plugin: one method that returns its argument."""


def echo(x):
    return x
'''


async def _start_plugin(workdir: Path, *, host_argv_prefix: list[str] | None = None,
                        sandbox: Any = None) -> Any:
    from sandboxer.loaders.out_of_process import ProcessLoader, plugin_command
    from sandboxer.manifest import LoaderType, load_plugin
    from sandboxer.sandbox.policy import SandboxConfig

    path = workdir / "benchplugin.py"
    if not path.exists():
        path.write_text(PLUGIN_SOURCE)
    plugin = load_plugin(path)
    loader = ProcessLoader(LoaderType.PYTHON)
    if sandbox is None:
        sandbox = SandboxConfig(enabled=False)
    if host_argv_prefix is None:
        return await loader.start(plugin, sandbox, generation=1)
    argv = plugin_command(plugin)
    assert argv[1:4] == ["-I", "-m", "sandboxer.host"], argv
    return await loader.start_process(plugin, sandbox, host_argv_prefix + argv[4:])


async def _stop_plugin(handle: Any) -> None:
    try:
        await handle.shutdown()
    finally:
        await handle.close()


async def _sequential(call: Callable[..., Awaitable[Any]], args: tuple[Any, ...], n: int,
                      samples: list[int]) -> None:
    clock = time.perf_counter_ns
    append = samples.append
    for _ in range(n):
        t0 = clock()
        await call(*args)
        append(clock() - t0)


async def _pipelined(call: Callable[..., Awaitable[Any]], args: tuple[Any, ...],
                     total: int) -> tuple[int, int, int]:
    """``IN_FLIGHT`` concurrent callers, each awaiting its calls one after another.

    Returns (calls, wall ns, CPU ns of this process, i.e. of the client side alone)."""
    per = total // IN_FLIGHT

    async def caller() -> None:
        for _ in range(per):
            await call(*args)

    cpu0, t0 = time.process_time_ns(), time.perf_counter_ns()
    await asyncio.gather(*(caller() for _ in range(IN_FLIGHT)))
    return (per * IN_FLIGHT, time.perf_counter_ns() - t0, time.process_time_ns() - cpu0)


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop
        return uvloop.new_event_loop
    return asyncio.new_event_loop


def _describe_loop(loop: asyncio.AbstractEventLoop) -> str:
    cls = type(loop)
    text = f"{cls.__module__}.{cls.__qualname__}"
    selector = getattr(loop, "_selector", None)
    if selector is not None:
        text += f" ({type(selector).__name__})"
    if cls.__module__.startswith("uvloop"):
        import uvloop
        text += f" uvloop {uvloop.__version__}"
    return text


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_cpu_ns(pid: int) -> int:
    """CPU (user + system, all threads) process ``pid`` has used, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1_000_000_000 // _CLK_TCK


def _handle_cpu_ns(handle: Any) -> int:
    """CPU of the plugin's side: its cgroup's when confined, else the host process's."""
    usage = handle.resource_usage()
    if usage.cpu_time_s is not None:
        return int(usage.cpu_time_s * 1e9)
    return _proc_cpu_ns(handle.pid)


class _Config:
    """One thing measured in a loop child: how to call it, how much CPU its server used."""

    def __init__(self, call: Callable[..., Awaitable[Any]], args: tuple[Any, ...],
                 server_cpu: Callable[[], int], pipelined: bool) -> None:
        self.call, self.args, self.server_cpu = call, args, server_cpu
        self.in_pipelined = pipelined
        self.samples: list[int] = []
        self.seq_cpu = [0, 0]  # client, server ns
        self.rounds: list[tuple[int, int, int, int]] = []  # calls, wall, client, server ns

    async def sequential(self, n: int) -> None:
        cpu0, srv0 = time.process_time_ns(), self.server_cpu()
        await _sequential(self.call, self.args, n, self.samples)
        self.seq_cpu[0] += time.process_time_ns() - cpu0
        self.seq_cpu[1] += self.server_cpu() - srv0

    async def pipelined(self, n: int) -> None:
        srv0 = self.server_cpu()
        calls, wall, cpu = await _pipelined(self.call, self.args, n)
        self.rounds.append((calls, wall, cpu, self.server_cpu() - srv0))

    def result(self) -> dict[str, Any]:
        n = len(self.samples)
        seq = _summary(self.samples)
        # CPU per call on each side: the client process (this one, the event loop) and the
        # server process (echo server, or the plugin host / its cgroup).
        seq["client_cpu_us_per_call"] = round(self.seq_cpu[0] / n / 1000, 2)
        seq["server_cpu_us_per_call"] = round(self.seq_cpu[1] / n / 1000, 2)
        out: dict[str, Any] = {"sequential": seq}
        if self.rounds:
            calls = sum(r[0] for r in self.rounds)
            wall = sum(r[1] for r in self.rounds)
            out["pipelined"] = {
                "in_flight": IN_FLIGHT, "calls": calls, "seconds": round(wall / 1e9, 3),
                "throughput_calls_per_s": round(calls / (wall / 1e9)),
                "rounds_calls_per_s": [round(r[0] / (r[1] / 1e9)) for r in self.rounds],
                "client_cpu_us_per_call": round(sum(r[2] for r in self.rounds) / calls / 1000,
                                                2),
                "server_cpu_us_per_call": round(sum(r[3] for r in self.rounds) / calls / 1000,
                                                2)}
        return out


async def _loop_main(loop_name: str, sandboxed: bool) -> dict[str, Any]:
    from sandboxer.sandbox.policy import SandboxConfig

    c = _counts()
    loop = asyncio.get_running_loop()
    sock, echo_proc = _start_echo_server()
    _, echo = await loop.connect_accepted_socket(EchoClient, sock=sock)
    bsock, becho_proc = _start_echo_server()
    _, becho = await loop.connect_accepted_socket(EchoBufferedClient, sock=bsock)
    workdir = Path(tempfile.mkdtemp(prefix="sandboxer-bench-"))
    handles: list[Any] = []
    out: dict[str, Any] = {"loop": _describe_loop(loop)}
    try:
        handle = await _start_plugin(workdir)
        handles.append(handle)
        conn = handle._conn  # diagnostics only: the connection without the handle's timeout
        assert await echo.call("echo", [PAYLOAD]) == PAYLOAD
        assert await becho.call("echo", [PAYLOAD]) == PAYLOAD
        assert await handle.call("echo", PAYLOAD) == PAYLOAD
        configs = {
            "echo": _Config(echo.call, ("echo", [PAYLOAD]),
                            functools.partial(_proc_cpu_ns, echo_proc.pid), True),
            "echo_buffered": _Config(becho.call, ("echo", [PAYLOAD]),
                                     functools.partial(_proc_cpu_ns, becho_proc.pid), True),
            "rpc": _Config(handle.call, ("echo", PAYLOAD),
                           functools.partial(_handle_cpu_ns, handle), True),
            "rpc_conn_no_timeout": _Config(functools.partial(conn.call, timeout=None),
                                           ("echo", [PAYLOAD]),
                                           functools.partial(_handle_cpu_ns, handle), False),
        }
        if sandboxed:
            # A sandbox that cannot start fails the benchmark (no "unavailable" footnote).
            confined = await _start_plugin(workdir, sandbox=SandboxConfig())
            handles.append(confined)
            assert await confined.call("echo", PAYLOAD) == PAYLOAD
            configs["rpc_sandboxed"] = _Config(
                confined.call, ("echo", PAYLOAD),
                functools.partial(_handle_cpu_ns, confined), True)
        for cfg in configs.values():
            await _sequential(cfg.call, cfg.args, c["warmup"], [])
            if cfg.in_pipelined:
                await _pipelined(cfg.call, cfg.args,
                                 max(IN_FLIGHT, c["warmup"] // IN_FLIGHT * IN_FLIGHT))
        gc.collect()
        gc.disable()
        try:
            for _ in range(c["rounds"]):
                for cfg in configs.values():
                    await cfg.sequential(c["sequential_per_round"])
            for _ in range(c["rounds"]):
                for cfg in configs.values():
                    if cfg.in_pipelined:
                        await cfg.pipelined(c["pipelined_per_round"])
        finally:
            gc.enable()
    finally:
        for h in handles:
            await _stop_plugin(h)
        echo._transport.close()  # type: ignore[union-attr]
        becho._transport.close()  # type: ignore[union-attr]
        await asyncio.sleep(0)
        _stop_echo_server(sock, echo_proc)
        _stop_echo_server(bsock, becho_proc)
        shutil.rmtree(workdir, ignore_errors=True)
    for name, cfg in configs.items():
        out[name] = cfg.result()
    return out


def child_loop(loop_name: str, sandboxed: bool) -> dict[str, Any]:
    with asyncio.Runner(loop_factory=_loop_factory(loop_name)) as runner:
        return runner.run(_loop_main(loop_name, sandboxed))


# -- grpc ------------------------------------------------------------------------------------

# The same call as ours: params as a JSON array in, the echo method called, its result JSON out.
GRPC_SERVER = """\
import sys
from concurrent import futures
import grpc, orjson

def echo(x):
    return x

def handle(request, context):
    return orjson.dumps(echo(*orjson.loads(request)))

server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
    "bench.Plugin", {"echo": grpc.unary_unary_rpc_method_handler(handle)}),))
server.add_insecure_port(sys.argv[1])
server.start()
print("ready", flush=True)
sys.stdin.read()
server.stop(0)
"""


def child_grpc() -> dict[str, Any]:
    import grpc
    import orjson

    c = _counts()
    tmp = Path(tempfile.mkdtemp(prefix="sandboxer-bench-grpc-"))
    address = f"unix:{tmp / 'grpc.sock'}"
    server = subprocess.Popen([sys.executable, "-I", "-c", GRPC_SERVER, address],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
        channel = grpc.insecure_channel(address)
        # No serializers: bytes in, bytes out.
        stub = channel.unary_unary("/bench.Plugin/echo")
        dumps, loads = orjson.dumps, orjson.loads

        def one() -> Any:
            return loads(stub(dumps([PAYLOAD])))

        assert one() == PAYLOAD
        for _ in range(c["warmup"]):
            one()
        samples = [0] * c["grpc_sequential"]
        clock = time.perf_counter_ns
        gc.collect()
        gc.disable()
        try:
            for i in range(len(samples)):
                t0 = clock()
                one()
                samples[i] = clock() - t0
            # 64 in flight through the sync API's futures: keep a window, wait on the oldest.
            total = c["grpc_pipelined"]
            window: deque[Any] = deque()
            t0 = clock()
            for _ in range(total):
                if len(window) >= IN_FLIGHT:
                    loads(window.popleft().result())
                window.append(stub.future(dumps([PAYLOAD])))
            while window:
                loads(window.popleft().result())
            elapsed = clock() - t0
        finally:
            gc.enable()
        channel.close()
    finally:
        if server.stdin is not None:
            server.stdin.close()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"grpcio": grpc.__version__, "sequential": _summary(samples),
            "pipelined": {"in_flight": IN_FLIGHT, "calls": total,
                          "seconds": round(elapsed / 1e9, 3),
                          "throughput_calls_per_s": round(total / (elapsed / 1e9))}}


# -- the parent: run every child, assemble the result ----------------------------------------

def _run_child(kind: str, *extra: str) -> dict[str, Any]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(HERE), "--child", kind, *extra],
                          stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=300,
                          cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {kind} {' '.join(extra)} failed with status "
                           f"{proc.returncode}")
    result = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


BASELINES = {
    "echo_blocking": (
        "bare Python echo server process (python -I -c, imports only socket; blocking "
        "recv(64 KiB) then sendall of what it got) on one end of an AF_UNIX socketpair; client: "
        "blocking socket in one thread, no event loop; per call it orjson-encodes the exact "
        "request line our client sends with a counter id, sendall, recv to the newline, "
        "orjson-decodes it and checks the id"),
    "echo_{loop}": (
        "the same bare echo server (its own process); client: a minimal JSON-RPC "
        "asyncio.Protocol on {desc}, connected with loop.connect_accepted_socket like ours: "
        "counter id, future in a dict, transport.write of the orjson-encoded line; "
        "data_received splits lines, orjson-decodes each, resolves the future by id; no "
        "timeout, no validation. The transport reads with sock.recv(max_size)"),
    "echo_{loop}_buffered": (
        "the same bare echo server and the same minimal client as an asyncio.BufferedProtocol "
        "on {desc}: the transport recv_into()s one preallocated 64 KiB buffer, lines are "
        "decoded from it in place"),
    "rpc_{loop}": (
        "sandboxer: ProcessLoader(LoaderType.PYTHON) starting `python -I -m sandboxer.host` "
        "with a one-function plugin (echo(x) -> x) over an AF_UNIX socketpair after the real "
        "handshake; SandboxConfig(enabled=False), so no sandbox, and every call carries the "
        "config's default 30 s timeout; `await handle.call(\"echo\", \"hello\")` on {desc}"),
    "rpc_asyncio_sandboxed": (
        "the rpc_asyncio stack started with SandboxConfig() (enabled, default profile): the "
        "plugin host runs under the sandbox launcher (namespaces, seccomp filter, cgroup "
        "limits); same child as rpc_asyncio, alternating with it, on {desc}"),
    "grpc": (
        "grpcio {version} unary-unary over a Unix socket (unix: address in a temp dir) between "
        "two processes; server: grpc.server(ThreadPoolExecutor(4)) with a generic handler "
        "(method_handlers_generic_handler + unary_unary_rpc_method_handler, no serializers: "
        "bytes in and out) that orjson-decodes the params, calls echo(x), orjson-encodes the "
        "result; client: the sync stub in one thread, pipelined as a window of 64 "
        "stub.future() calls"),
}
LOOP_DESC = {"asyncio": "the default asyncio loop ({loop})", "uvloop": "uvloop ({loop})"}


def _describe(template: str, **fmt: str) -> str:
    return BASELINES[template].format(**fmt)


def _client_is_buffered() -> bool:
    from sandboxer.rpc.client import RpcConnection
    return issubclass(RpcConnection, asyncio.BufferedProtocol)


def run() -> dict[str, Any]:
    c = _counts()
    blocking = _run_child("echo_blocking")
    loops = {"asyncio": _run_child("loop", "--loop", "asyncio", "--sandboxed"),
             "uvloop": _run_child("loop", "--loop", "uvloop")}
    grpc_result = _run_child("grpc")

    m: dict[str, Any] = {"echo_blocking": {"baseline": _describe("echo_blocking"),
                                           "sequential": blocking["sequential"]}}
    for lp, res in loops.items():
        desc = LOOP_DESC[lp].format(loop=res["loop"])
        m[f"echo_{lp}"] = {"baseline": _describe("echo_{loop}", desc=desc), **res["echo"]}
        m[f"echo_{lp}_buffered"] = {"baseline": _describe("echo_{loop}_buffered", desc=desc),
                                    **res["echo_buffered"]}
        m[f"rpc_{lp}"] = {"what": _describe("rpc_{loop}", desc=desc), **res["rpc"]}
    sandboxed = loops["asyncio"].get("rpc_sandboxed")
    if sandboxed is not None:
        m["rpc_asyncio_sandboxed"] = {
            "what": _describe("rpc_asyncio_sandboxed",
                              desc=LOOP_DESC["asyncio"].format(loop=loops["asyncio"]["loop"])),
            **sandboxed}
    m["grpc"] = {"what": _describe("grpc", version=grpc_result["grpcio"]),
                 **{k: v for k, v in grpc_result.items() if k in ("sequential", "pipelined")}}

    def seq(name: str, key: str = "p50_us") -> float:
        return m[name]["sequential"][key]

    def tput(name: str) -> float:
        return m[name]["pipelined"]["throughput_calls_per_s"]

    # The same-loop baseline that does what our client does: a plain Protocol today; the
    # BufferedProtocol one as soon as RpcConnection becomes one.
    suffix = "_buffered" if _client_is_buffered() else ""

    ratios: dict[str, Any] = {}
    for lp in ("asyncio", "uvloop"):
        ours = f"rpc_{lp}"
        for base in (f"echo_{lp}", f"echo_{lp}_buffered", "echo_blocking"):
            entry = {"p50": _ratio(seq(ours), seq(base)),
                     "p99": _ratio(seq(ours, "p99_us"), seq(base, "p99_us"))}
            if "pipelined" in m[base]:
                entry["throughput"] = _ratio(tput(ours), tput(base))
            ratios[f"{ours}_vs_{base}"] = entry
    if sandboxed is not None:
        base = f"echo_asyncio{suffix}"
        ratios[f"rpc_asyncio_sandboxed_vs_{base}"] = {
            "p50": _ratio(seq("rpc_asyncio_sandboxed"), seq(base)),
            "p99": _ratio(seq("rpc_asyncio_sandboxed", "p99_us"), seq(base, "p99_us")),
            "throughput": _ratio(tput("rpc_asyncio_sandboxed"), tput(base))}
        ratios["rpc_asyncio_sandboxed_vs_rpc_asyncio"] = {
            "p50": _ratio(seq("rpc_asyncio_sandboxed"), seq("rpc_asyncio")),
            "throughput": _ratio(tput("rpc_asyncio_sandboxed"), tput("rpc_asyncio"))}
    ratios["grpc_vs_echo_blocking"] = {"p50": _ratio(seq("grpc"), seq("echo_blocking"))}
    ratios["rpc_asyncio_vs_grpc"] = {"p50": _ratio(seq("rpc_asyncio"), seq("grpc")),
                                     "throughput": _ratio(tput("rpc_asyncio"), tput("grpc"))}

    hb = blocking["host_blocking"]["sequential"]
    diag: dict[str, Any] = {"plugin_host_blocking_client": {
        "what": "the echo_blocking client (blocking socket, no event loop) calling echo on "
                "the plugin host started with ProcessLoader's argv and environment, handshake "
                "answered by hand, alternating with echo_blocking: the plugin host's share "
                "without our asyncio client",
        "sequential": hb,
        "p50_ratio_vs_echo_blocking": _ratio(hb["p50_us"], seq("echo_blocking")),
        "host_overhead_p50_us": round(hb["p50_us"] - seq("echo_blocking"), 2)}}
    for lp, res in loops.items():
        d = res["rpc_conn_no_timeout"]["sequential"]
        diag[f"rpc_{lp}_connection_without_timeout"] = {
            "what": "RpcConnection.call(..., timeout=None) directly on the same connection "
                    "(private API): the handle minus its method check and per-call "
                    "asyncio.timeout",
            "sequential": d,
            "p50_ratio_vs_echo": _ratio(d["p50_us"], seq(f"echo_{lp}{suffix}"))}

    primary, echo = "rpc_asyncio", f"echo_asyncio{suffix}"
    uv_echo = f"echo_uvloop{suffix}"
    ratio = _ratio(seq(primary), seq(echo))
    uv_ratio = _ratio(seq("rpc_uvloop"), seq(uv_echo))
    result: dict[str, Any] = {
        "primary": f"{primary}: sandboxer on the default asyncio loop, what a host application "
                   f"gets unless it opts into uvloop; its baseline (echo_p50_us) is {echo}, "
                   "the minimal client of the same protocol class on the same loop",
        "echo_baseline": echo,
        "sandboxed": False,
        "sandbox_note": "the primary figures are of the protocol alone: the plugin host runs "
                        "unsandboxed (SandboxConfig(enabled=False)). The same call through a "
                        "sandboxed plugin host (SandboxConfig(), default profile, its seccomp "
                        "filter handing denials to the supervisor: allowed calls never reach "
                        "it) is under sandboxed_figures; a sandbox that cannot start fails "
                        "the run",
        "p50_us": seq(primary),
        "p99_us": seq(primary, "p99_us"),
        "throughput_calls_per_s": tput(primary),
        "echo_p50_us": seq(echo),
        "p50_ratio_vs_echo": ratio,
        "echo_throughput_calls_per_s": tput(echo),
        "echo_blocking_p50_us": seq("echo_blocking"),
        "p50_ratio_vs_echo_blocking": _ratio(seq(primary), seq("echo_blocking")),
        "echo_buffered_p50_us": seq("echo_asyncio_buffered"),
        "p50_ratio_vs_echo_buffered": _ratio(seq(primary), seq("echo_asyncio_buffered")),
        "grpc_p50_us": seq("grpc"),
        "grpc_throughput_calls_per_s": tput("grpc"),
        "sandboxed_figures": ({
            "p50_us": seq("rpc_asyncio_sandboxed"),
            "p99_us": seq("rpc_asyncio_sandboxed", "p99_us"),
            "throughput_calls_per_s": tput("rpc_asyncio_sandboxed"),
            "p50_ratio_vs_echo": _ratio(seq("rpc_asyncio_sandboxed"), seq(echo)),
            "p50_ratio_vs_unsandboxed": _ratio(seq("rpc_asyncio_sandboxed"),
                                               seq("rpc_asyncio")),
        } if sandboxed is not None else {}),
        "uvloop": {
            "echo_baseline": uv_echo,
            "p50_us": seq("rpc_uvloop"),
            "p99_us": seq("rpc_uvloop", "p99_us"),
            "throughput_calls_per_s": tput("rpc_uvloop"),
            "echo_p50_us": seq(uv_echo),
            "p50_ratio_vs_echo": uv_ratio,
            "echo_throughput_calls_per_s": tput(uv_echo),
            "p50_ratio_vs_echo_blocking": _ratio(seq("rpc_uvloop"), seq("echo_blocking")),
        },
        "targets": dict(TARGETS),
        "met": {
            "p50_ratio_vs_echo": ratio is not None and ratio <= TARGETS["p50_ratio_vs_echo"],
            "throughput_calls_per_s": tput(primary) >= TARGETS["throughput_calls_per_s"],
            "uvloop_p50_ratio_vs_echo":
                uv_ratio is not None and uv_ratio <= TARGETS["p50_ratio_vs_echo"],
            "uvloop_throughput_calls_per_s":
                tput("rpc_uvloop") >= TARGETS["throughput_calls_per_s"],
        },
        "ratios": ratios,
        "measurements": m,
        "diagnostics": diag,
        "config": {
            "request_line": _request_line(1).decode().rstrip("\n"),
            "sequential_calls": c["rounds"] * c["sequential_per_round"],
            "pipelined_calls": c["rounds"] * c["pipelined_per_round"],
            "in_flight": IN_FLIGHT,
            "rounds": c["rounds"],
            "warmup_calls": c["warmup"],
            "grpc_sequential_calls": c["grpc_sequential"],
            "grpc_pipelined_calls": c["grpc_pipelined"],
            "scale": _scale(),
            "method": "one fresh interpreter per configuration (echo_blocking; default loop; "
                      "uvloop; grpc); inside a loop child every echo and sandboxer "
                      "measurement alternates in rounds; gc disabled in every measured loop; "
                      "time.perf_counter_ns around each call; CPU per call from "
                      "time.process_time_ns (client) and /proc/PID/stat or the plugin's "
                      "cgroup (server), 10 ms tick resolution",
            "child_wall_seconds": {"echo_blocking": blocking["wall_seconds"],
                                   **{k: v["wall_seconds"] for k, v in loops.items()},
                                   "grpc": grpc_result["wall_seconds"]},
        },
        "meta": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
        },
    }
    return result


def format_table(result: dict[str, Any]) -> str:
    """The readable table the runner prints."""
    m = result["measurements"]
    rows = [("measurement", "p50 µs", "p99 µs", f"×{result['echo_baseline']}", "×echo_blocking",
             "calls/s @64", "CPU µs/call seq: client+server", "@64: client+server")]
    blocking = m["echo_blocking"]["sequential"]["p50_us"]

    def cpu(d: dict[str, Any] | None) -> str:
        if not d or d.get("client_cpu_us_per_call") is None:
            return "-"
        return f"{d['client_cpu_us_per_call']:.1f} + {d.get('server_cpu_us_per_call', 0):.1f}"

    suffix = "_buffered" if result.get("echo_baseline", "").endswith("_buffered") else ""

    def loop_of(name: str) -> str | None:
        return next((f"echo_{lp}{suffix}" for lp in ("asyncio", "uvloop") if f"_{lp}" in name),
                    None)

    names = [n for n in ("echo_blocking", "echo_asyncio", "echo_asyncio_buffered",
                         "echo_uvloop", "echo_uvloop_buffered", "rpc_asyncio", "rpc_uvloop",
                         "rpc_asyncio_sandboxed", "grpc") if n in m]
    entries = [(n, m[n]) for n in names] + [
        ("diag: " + n.replace("_connection_without_timeout", " conn, no timeout"), d)
        for n, d in result.get("diagnostics", {}).items()]
    for name, d in entries:
        s, p = d["sequential"], d.get("pipelined")
        base = loop_of(name) if "rpc" in name else None
        same = _ratio(s["p50_us"], m[base]["sequential"]["p50_us"]) if base else None
        rows.append((name, f"{s['p50_us']:.1f}", f"{s['p99_us']:.1f}",
                     f"{same:.2f}" if same else "-",
                     f"{_ratio(s['p50_us'], blocking):.2f}",
                     f"{p['throughput_calls_per_s']:,}" if p else "-", cpu(s), cpu(p)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    met = result["met"]
    lines.append("")
    lines.append(f"primary (default asyncio loop, unsandboxed): p50 {result['p50_us']} µs, "
                 f"ratio vs same-loop echo {result['p50_ratio_vs_echo']} (target <= "
                 f"{TARGETS['p50_ratio_vs_echo']}: {'met' if met['p50_ratio_vs_echo'] else 'NOT met'})"
                 f", {result['throughput_calls_per_s']:,} calls/s (target >= "
                 f"{TARGETS['throughput_calls_per_s']:,}: "
                 f"{'met' if met['throughput_calls_per_s'] else 'NOT met'})")
    u = result["uvloop"]
    lines.append(f"uvloop: p50 ratio {u['p50_ratio_vs_echo']} "
                 f"({'met' if met['uvloop_p50_ratio_vs_echo'] else 'NOT met'}), "
                 f"{u['throughput_calls_per_s']:,} calls/s "
                 f"({'met' if met['uvloop_throughput_calls_per_s'] else 'NOT met'})")
    sb = result.get("sandboxed_figures", {})
    if "p50_us" in sb:
        lines.append(f"sandboxed (default profile, default loop): p50 {sb['p50_us']} µs, ratio "
                     f"vs same-loop echo {sb['p50_ratio_vs_echo']}, vs unsandboxed "
                     f"{sb['p50_ratio_vs_unsandboxed']}; {sb['throughput_calls_per_s']:,} calls/s")
    return "\n".join(lines)


# -- profiling -------------------------------------------------------------------------------

def _profile_host(out: str, host_args: list[str]) -> None:
    """Run the plugin host with each server worker thread under its own cProfile."""
    import cProfile
    import pstats

    from sandboxer.host.__main__ import main
    from sandboxer.rpc.server import Server

    profiles: list[cProfile.Profile] = []
    original = Server._worker

    def worker(self: Server) -> None:
        prof = cProfile.Profile()
        profiles.append(prof)
        prof.enable()
        try:
            original(self)
        finally:
            prof.disable()

    Server._worker = worker  # type: ignore[method-assign]
    code = main(host_args)
    if profiles:
        stats = pstats.Stats(profiles[0])
        for prof in profiles[1:]:
            stats.add(prof)
        stats.dump_stats(out + ".part")
        os.replace(out + ".part", out)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


async def _profile_main(n: int, top: int, pipelined: bool) -> None:
    import cProfile
    import io
    import pstats

    workdir = Path(tempfile.mkdtemp(prefix="sandboxer-bench-prof-"))
    host_out = workdir / "host.prof"
    # Without -I: the wrapper is this file, run by path (the env is still the clean one).
    handle = await _start_plugin(workdir, host_argv_prefix=[
        sys.executable, str(HERE), "--profile-host", str(host_out), "--"])
    try:
        await _sequential(handle.call, ("echo", PAYLOAD), 2000, [])
        samples: list[int] = []
        prof = cProfile.Profile()
        gc.disable()
        prof.enable()
        t0 = time.perf_counter_ns()
        if pipelined:
            n = (await _pipelined(handle.call, ("echo", PAYLOAD), n))[0]
        else:
            await _sequential(handle.call, ("echo", PAYLOAD), n, samples)
        elapsed = time.perf_counter_ns() - t0
        prof.disable()
        gc.enable()
    finally:
        await _stop_plugin(handle)
    for _ in range(50):
        if host_out.exists():
            break
        await asyncio.sleep(0.1)

    def show(title: str, stats: pstats.Stats) -> None:
        buf = io.StringIO()
        stats.stream = buf  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(top)
        print(f"\n===== {title} (sorted by tottime) =====")
        print(buf.getvalue().split("\n", 4)[-1] if "ncalls" in buf.getvalue() else buf.getvalue())

    what = f"{IN_FLIGHT} in flight" if pipelined else "sequential"
    print(f"{n} calls ({what}) under cProfile on the client: {elapsed / n / 1000:.1f} µs "
          "per call (profiled, so inflated)"
          + (f"; p50 {_summary(samples)['p50_us']} µs" if samples else ""))
    show("client side (event loop thread)", pstats.Stats(prof))
    if host_out.exists():
        show("plugin host side (all server worker threads; socket.recv is idle waiting)",
             pstats.Stats(str(host_out)))
    else:
        print("(no host profile was written)")
    shutil.rmtree(workdir, ignore_errors=True)


# -- command line ----------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--profile-host"]:
        rest = argv[2:]
        _profile_host(argv[1], rest[1:] if rest[:1] == ["--"] else rest)
    parser = argparse.ArgumentParser(prog="benchmarks/rpc.py", description=__doc__.split("\n")[0])
    parser.add_argument("--child", choices=("echo_blocking", "loop", "grpc"))
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--sandboxed", action="store_true",
                        help="--child loop: also measure a sandboxed plugin host")
    parser.add_argument("--profile", action="store_true",
                        help="profile the sequential call on both sides instead")
    parser.add_argument("--calls", type=int, default=20_000, help="calls for --profile")
    parser.add_argument("--pipelined", action="store_true",
                        help="--profile: 64 calls in flight instead of one at a time")
    parser.add_argument("--top", type=int, default=25, help="rows per profile")
    args = parser.parse_args(argv)
    if args.profile:
        with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
            runner.run(_profile_main(args.calls, args.top, args.pipelined))
        return 0
    if args.child == "echo_blocking":
        result = child_echo_blocking()
    elif args.child == "loop":
        result = child_loop(args.loop, args.sandboxed)
    elif args.child == "grpc":
        result = child_grpc()
    else:
        result = run()
        print(format_table(result), file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
