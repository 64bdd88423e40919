"""The egress proxy's cost: what a plugin pays for going through it rather than straight out.

Three processes: this one (the client, blocking sockets), an upstream server (blocking
sockets, a thread per connection: echo, or count and discard for bulk), and the proxy
(sandboxer's EgressEndpoint on its own event loop: the default asyncio loop, and uvloop
where installed). The client runs every measurement against the upstream directly (the
baseline: the same client and server with nothing in between) and through the proxy via
HTTP CONNECT and SOCKS5, alternating in rounds so that machine noise hits all alike:

- ``rtt``: one 64-byte echo round trip on an open connection (a tunnel's per-message cost);
- ``connect``: a new connection, its proxy handshake and one echo (a request's setup cost);
- ``bulk``: 64 MiB client to server over one connection (throughput).

No timing is asserted; there is no target in the issue. Run: ``python -m benchmarks egress``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

if __package__:
    from ._results import describe_loop, versions
else:  # run by path as a child process
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks._results import describe_loop, versions

ROUNDS = 5
RTT_N = 4000
CONNECT_N = 300
BULK_BYTES = 64 << 20
MESSAGE = b"x" * 63 + b"\n"


# -- the upstream server (child) -----------------------------------------------------------------

def _upstream() -> None:
    server = socket.create_server(("127.0.0.1", 0), backlog=512)
    print(server.getsockname()[1], flush=True)

    def serve(conn: socket.socket) -> None:
        with conn:
            mode = conn.recv(1)
            if mode == b"B":  # bulk: count to the announced size, then answer once
                size = struct.unpack(">Q", conn.recv(8, socket.MSG_WAITALL))[0]
                got = 0
                while got < size:
                    chunk = conn.recv(1 << 20)
                    if not chunk:
                        return
                    got += len(chunk)
                conn.sendall(b"K")
                return
            while True:  # echo
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    def parent_gone() -> None:  # stdin closes when the benchmark is done with us
        sys.stdin.read()
        os._exit(0)

    threading.Thread(target=parent_gone, daemon=True).start()
    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


# -- the proxy (child) ---------------------------------------------------------------------------

def _proxy(loop_name: str) -> None:
    if loop_name == "uvloop":
        import uvloop
        uvloop.install()
    from sandboxer.sandbox.egress import EgressProxy

    async def main() -> None:
        proxy = EgressProxy(max_connections=4096, header_timeout=30)
        point = proxy.endpoint("bench", ["127.0.0.1"])
        listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        await point.start(listener)
        print(listener.getsockname()[1], describe_loop(asyncio.get_running_loop()),
              flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        proxy.close()

    import logging
    logging.getLogger("sandboxer.egress").setLevel(logging.ERROR)  # a line per attempt
    asyncio.run(main())


# -- the client (this process) -------------------------------------------------------------------

def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    return sock.recv(n, socket.MSG_WAITALL)


def _open(how: str, upstream: int, proxy: int) -> socket.socket:
    """A connection to the upstream: directly, or through the proxy's CONNECT or SOCKS5."""
    if how == "direct":
        return _connect(upstream)
    sock = _connect(proxy)
    if how == "connect":
        sock.sendall(f"CONNECT 127.0.0.1:{upstream} HTTP/1.1\r\n\r\n".encode())
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 200"), head
    else:
        sock.sendall(b"\x05\x01\x00")
        assert _recv_exactly(sock, 2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                     + struct.pack(">H", upstream))
        assert _recv_exactly(sock, 10)[:2] == b"\x05\x00"
    return sock


def _rtt(how: str, upstream: int, proxy: int) -> float:
    sock = _open(how, upstream, proxy)
    sock.sendall(b"E")
    try:
        start = time.perf_counter_ns()
        for _ in range(RTT_N):
            sock.sendall(MESSAGE)
            _recv_exactly(sock, len(MESSAGE))
        return (time.perf_counter_ns() - start) / RTT_N / 1000
    finally:
        sock.close()


def _setup(how: str, upstream: int, proxy: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(CONNECT_N):
        sock = _open(how, upstream, proxy)
        sock.sendall(b"E" + MESSAGE)
        _recv_exactly(sock, len(MESSAGE))
        sock.close()
    return (time.perf_counter_ns() - start) / CONNECT_N / 1000


def _bulk(how: str, upstream: int, proxy: int) -> float:
    sock = _open(how, upstream, proxy)
    block = b"\0" * (1 << 20)
    try:
        start = time.perf_counter_ns()
        sock.sendall(b"B" + struct.pack(">Q", BULK_BYTES))
        for _ in range(BULK_BYTES // len(block)):
            sock.sendall(block)
        assert _recv_exactly(sock, 1) == b"K"
        return BULK_BYTES / ((time.perf_counter_ns() - start) / 1e9) / (1 << 20)
    finally:
        sock.close()


def _child(*args: str) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().split()


def _median(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def run() -> dict[str, Any]:
    import importlib.util
    loops = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])
    upstream_proc, (upstream,) = _child("--upstream")
    proxies = {name: _child("--proxy", name) for name in loops}
    try:
        up = int(upstream)
        ports = {name: int(words[0]) for name, (_, words) in proxies.items()}
        described = {name: " ".join(words[1:]) for name, (_, words) in proxies.items()}
        kinds: dict[str, Callable[[str, int, int], float]] = {
            "rtt_us": _rtt, "connect_us": _setup, "bulk_mib_s": _bulk}
        ways = ["direct"] + [f"{how}/{loop}" for loop in loops for how in ("connect", "socks5")]
        samples: dict[str, dict[str, list[float]]] = {k: {w: [] for w in ways} for k in kinds}
        for _ in range(ROUNDS):
            for kind, measure in kinds.items():
                for way in ways:
                    how, _, loop = way.partition("/")
                    samples[kind][way].append(measure(how, up, ports.get(loop, 0)))
    finally:
        for proc, _ in [(upstream_proc, None), *proxies.values()]:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    result: dict[str, Any] = {
        "baseline": "direct: a blocking-socket client (this process) to a blocking-socket "
                    "server (one thread per connection, another process) over loopback TCP, "
                    "TCP_NODELAY, nothing in between",
        "proxy": {loop: f"sandboxer's EgressEndpoint in a third process on {described[loop]}, "
                        "127.0.0.1 listed; the client speaks HTTP CONNECT or SOCKS5 to it"
                  for loop in loops},
        "method": f"medians of {ROUNDS} rounds, every way in each round; rtt: {RTT_N} 64-byte "
                  f"echoes on an open connection; connect: {CONNECT_N} x (new connection, "
                  f"proxy handshake, one echo, close); bulk: {BULK_BYTES >> 20} MiB one way",
        "versions": versions("uvloop", "sandboxer"),
    }
    for kind in kinds:
        direct = _median(samples[kind]["direct"])
        entry: dict[str, Any] = {"direct": direct}
        for way in ways[1:]:
            value = _median(samples[kind][way])
            entry[way] = {"value": value, "ratio_vs_direct": round(value / direct, 2)}
        result[kind] = entry
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [f"  baseline: {result['baseline']}"]
    for kind in ("rtt_us", "connect_us", "bulk_mib_s"):
        entry = result[kind]
        lines.append(f"  {kind:<12} direct {entry['direct']:>9}")
        for way, figures in entry.items():
            if way != "direct":
                lines.append(f"  {'':<12} {way:<16} {figures['value']:>9}  "
                              f"(x{figures['ratio_vs_direct']} of direct)")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1] == "--upstream":
        _upstream()
    elif sys.argv[1] == "--proxy":
        _proxy(sys.argv[2])
