"""Clients that abuse the daemon (issue 21): each is cut off or bounded with a log line, and
a neighbour's calls go on. The daemon runs in this process (its limits made small so the
tests are quick); the abusers are raw sockets, written from the wire protocol alone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandboxer import HostConfig, connect
from sandboxer.daemon.server import Daemon, Limits

pytestmark = pytest.mark.usefixtures("no_leaks")

LIMITS = Limits(
    connections=40, connections_per_uid=24, in_flight=8, frame_seconds=0.5, write_seconds=0.5,
    garbage_frames=3,
)


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    served = Daemon(HostConfig(), str(tmp_path / "d.sock"), limits=LIMITS,
                    staging=str(tmp_path / "staging"))
    await served.start()
    try:
        yield served
    finally:
        await served.aclose()


@pytest.fixture
def plugin(tmp_path: Path) -> Path:
    path = tmp_path / "echo.py"
    path.write_text("def echo(x):\n    return x\n")
    return path


def _raw(daemon: Daemon) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(daemon.socket_path)
    return sock


async def _closed_by_daemon(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """What the daemon sent before it closed ``sock`` (fails if it never does)."""
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    got = b""
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await loop.sock_recv(sock, 65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
    sock.close()
    return got


async def test_a_slow_client_is_cut_and_a_neighbour_goes_on(
    daemon: Daemon, plugin: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with await connect(daemon.socket_path) as neighbour:
        p = await neighbour.load(plugin)
        slow = _raw(daemon)
        slow.sendall(b'{"jsonrpc": "2.0", "id": 1, "meth')  # and nothing more
        assert await p.call("echo", 1) == 1
        assert await _closed_by_daemon(slow) == b""
        assert "a frame begun was not finished within 0.5s" in caplog.text
        assert await p.call("echo", 2) == 2


async def test_garbage_is_answered_then_cut(
    daemon: Daemon, caplog: pytest.LogCaptureFixture
) -> None:
    bad = _raw(daemon)
    bad.sendall(b"garbage\n[1, 2]\n{\"jsonrpc\": \"2.0\", \"result\": 1, \"id\": 9}\n")
    replies = [json.loads(line) for line in (await _closed_by_daemon(bad)).splitlines()]
    assert [r["error"]["code"] for r in replies] == [-32700, -32600, -32600]
    assert "3 frames that were no requests" in caplog.text


async def test_a_client_that_never_reads_is_cut(
    daemon: Daemon, plugin: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with await connect(daemon.socket_path) as neighbour:
        p = await neighbour.load(plugin)
        deaf = _raw(daemon)
        deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = b'{"jsonrpc": "2.0", "id": 1, "method": "list", "params": {}}\n'
        deaf.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "read nothing" not in caplog.text:
            try:
                sent += deaf.send(request * 200)
            except BlockingIOError:
                await asyncio.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                break
            assert await p.call("echo", sent) == sent  # the neighbour is served meanwhile
        assert "read nothing for 0.5s" in caplog.text
        deaf.close()
        assert await p.call("echo", "after") == "after"


async def test_a_thousand_connections_are_bounded(
    daemon: Daemon, plugin: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sandboxer.audit")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    try:
        async with await connect(daemon.socket_path) as neighbour:
            p = await neighbour.load(plugin)
            flood: list[socket.socket] = []
            slowest = 0.0
            try:
                for n in range(1000):
                    flood.append(_raw(daemon))
                    if n % 50 == 0:
                        t0 = time.perf_counter()
                        assert await p.call("echo", n) == n
                        slowest = max(slowest, time.perf_counter() - t0)
                await asyncio.sleep(0.2)
                held = sum(1 for s in flood if not _refused(s))
            finally:
                for sock in flood:
                    sock.close()
            assert held <= LIMITS.connections_per_uid - 1  # the neighbour holds one
            assert "connections already" in caplog.text
            assert slowest < 1.0, slowest  # not starved (the benchmark measures it properly)
            assert await p.call("echo", "after") == "after"
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _refused(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        data = sock.recv(4096)
    except BlockingIOError:
        return False  # held open, waiting for requests
    return data == b"" or b"connections" in data


async def test_requests_in_flight_are_bounded(daemon: Daemon, tmp_path: Path) -> None:
    path = tmp_path / "slow.py"
    path.write_text("import time\n\ndef nap():\n    time.sleep(0.5)\n    return 'ok'\n")
    async with await connect(daemon.socket_path) as client:
        p = await client.load(path)
        results = await asyncio.gather(*(p.call("nap") for _ in range(12)), return_exceptions=True)
        refused = [r for r in results if isinstance(r, Exception)]
        assert len(refused) >= 12 - LIMITS.in_flight
        assert all("in flight" in str(r) for r in refused)
        assert await p.call("nap") == "ok"


async def test_a_client_that_stops_sending_still_gets_its_answers(
    daemon: Daemon, plugin: Path
) -> None:
    """As `printf '...' | socat - UNIX:sock` does: requests, then EOF."""
    async with await connect(daemon.socket_path) as client:
        p = await client.load(plugin)
        raw = _raw(daemon)
        raw.sendall(
            b'{"jsonrpc": "2.0", "id": 1, "method": "call", "params": '
            b'{"plugin": "echo", "method": "echo", "args": ["one"]}}\n'
            b'{"jsonrpc": "2.0", "id": 2, "method": "list", "params": {}}\n'
        )
        raw.shutdown(socket.SHUT_WR)
        replies = {r["id"]: r for r in map(json.loads, (await _closed_by_daemon(raw)).splitlines())}
        assert replies[1]["result"] == "one" and replies[2]["result"][0]["id"] == "echo"
        assert await p.call("echo", "still") == "still"
