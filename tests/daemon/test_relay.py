"""Calls the daemon relays without a task (Daemon.relay, RpcConnection.relay): what a task
gave for free must still hold on that path. A client that goes away mid-call leaves nothing in
flight; a timeout, a crash and a missing method reach the caller as the same errors as the
library's; a reload drains relayed calls; the latency window sees them. The plugins are bare
files a stranger would write, and the abusive client is a raw socket.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandboxer import HostConfig, connect
from sandboxer.daemon.server import Daemon
from sandboxer.errors import CallTimeout, MethodNotFound, PluginCrashed

pytestmark = pytest.mark.usefixtures("no_leaks")

SLOW = "import os, time\n\ndef nap(s):\n    time.sleep(s)\n    return 'rested'\n\ndef die():\n    os._exit(7)\n"


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    served = Daemon(HostConfig(), str(tmp_path / "d.sock"), staging=str(tmp_path / "staging"))
    await served.start()
    try:
        yield served
    finally:
        await served.aclose()


@pytest.fixture
def slow(tmp_path: Path) -> Path:
    path = tmp_path / "slow.py"
    path.write_text(SLOW)
    return path


def _in_flight(daemon: Daemon, plugin_id: str) -> int:
    return daemon.space(None).manager.get(plugin_id).statistics().in_flight


async def test_a_client_gone_mid_call_leaves_nothing_in_flight(daemon: Daemon, slow: Path) -> None:
    async with await connect(daemon.socket_path) as client:
        p = await client.load(slow)
        raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        raw.connect(daemon.socket_path)
        # An answer left unread makes the close a reset (ECONNRESET at the daemon), not the
        # end of the client's requests (after which its answers would still be sent).
        listing = {"jsonrpc": "2.0", "id": 1, "method": "list", "params": {}}
        raw.sendall(json.dumps(listing).encode() + b"\n")
        await asyncio.sleep(0.2)
        request = {"jsonrpc": "2.0", "id": 2, "method": "call",
                   "params": {"plugin": p.id, "method": "nap", "args": [1.5]}}
        raw.sendall(json.dumps(request).encode() + b"\n")
        for _ in range(100):
            if _in_flight(daemon, p.id) == 1:
                break
            await asyncio.sleep(0.01)
        assert _in_flight(daemon, p.id) == 1
        raw.close()
        for _ in range(50):
            if _in_flight(daemon, p.id) == 0:
                break
            await asyncio.sleep(0.01)
        assert _in_flight(daemon, p.id) == 0
        # Nothing waits on the abandoned call: a reload drains at once.
        async with asyncio.timeout(5):
            await client.reload(p.id)
        assert await p.call("nap", 0) == "rested"


async def test_timeouts_crashes_and_missing_methods_reach_the_caller(
    daemon: Daemon, slow: Path
) -> None:
    async with await connect(daemon.socket_path) as client:
        p = await client.load(slow)
        with pytest.raises(CallTimeout):
            await p.call("nap", 2, timeout=0.2)
        with pytest.raises(MethodNotFound):
            await p.call("nope")
        with pytest.raises(PluginCrashed):
            await p.call("die")
        stats = daemon.space(None).manager.get(p.id).statistics()
        assert stats.failures == 3 and stats.in_flight == 0


async def test_a_reload_drains_relayed_calls_and_latency_is_kept(
    daemon: Daemon, slow: Path
) -> None:
    async with await connect(daemon.socket_path) as client:
        p = await client.load(slow)
        naps = [asyncio.ensure_future(p.call("nap", 0.3)) for _ in range(3)]
        await asyncio.sleep(0.1)
        await client.reload(p.id)
        assert await asyncio.gather(*naps) == ["rested"] * 3
        status = await client.status()
        (entry,) = [e for e in status["plugins"] if e["id"] == p.id]
        assert entry["calls"] == 3 and entry["p50_s"] >= 0.2
