"""Escape probes against the supervisor itself, through the one channel a plugin has to it:
the RPC socket (fd 3) and its stdout/stderr pipes.

A broken frame ends the hostile plugin's session (ProtocolError, the process killed, the
plugin FAILED); nothing it sends can take the supervisor or the neighbour with it, and no
descriptor it passes along lands in the supervisor.
"""

from __future__ import annotations

import os

import pytest

from sandboxer import PluginState, ProtocolError

from .conftest import Fleet

pytestmark = [pytest.mark.usefixtures("no_leaks"), pytest.mark.asyncio(loop_scope="module")]


async def test_descriptors_passed_over_the_rpc_socket_do_not_reach_the_supervisor(
        fleet: Fleet) -> None:
    before = set(os.listdir("/proc/self/fd"))
    assert await fleet.probe("rpc_send_fds") == 1  # one byte of whitespace between frames
    assert await fleet.probe("ping") == "pong"
    after = set(os.listdir("/proc/self/fd"))
    assert after - before == set(), [os.readlink(f"/proc/self/fd/{fd}") for fd in after - before]


async def test_a_stderr_flood_does_not_stall_the_supervisor(fleet: Fleet) -> None:
    written = await fleet.probe("flood_stderr", 32, timeout=30)
    assert written >= 32 << 20
    assert await fleet.probe("ping") == "pong"


@pytest.mark.parametrize("data", [
    pytest.param("not json\n", id="garbage-frame"),
    pytest.param('{"jsonrpc": "2.0", "id": 999999, "result": "forged"}\n',
                 id="answer-to-a-call-never-made"),
    pytest.param('{"jsonrpc": "2.0", "id": 424242, "method": "sandboxer.handshake", '
                 '"params": {}}\n', id="second-handshake"),
])
async def test_a_broken_frame_fails_only_the_plugin(fresh_fleet: Fleet, data: str) -> None:
    with pytest.raises(ProtocolError):
        await fresh_fleet.hostile.call("rpc_write", data, timeout=10)
    assert fresh_fleet.hostile.state is PluginState.FAILED
    await fresh_fleet.assert_contained()


async def test_an_endless_frame_is_cut_off_at_the_frame_limit(fresh_fleet: Fleet) -> None:
    with pytest.raises(ProtocolError, match="without a newline"):
        await fresh_fleet.hostile.call("rpc_oversized", 20, timeout=30)
    assert fresh_fleet.hostile.state is PluginState.FAILED
    await fresh_fleet.assert_contained()
