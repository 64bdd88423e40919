"""The plugin side of the wire (sandboxer/rpc/server.py), as the plugin host runs it.

The host end is played by hand here, over a real socketpair, so each test sees the exact
frames the plugin side sends. The rule under test is DESIGN section 7's: every reserved
method is optional, and a lifecycle function the plugin lacks is answered -32601 ("not
implemented"), so the supervisor treats a python plugin without it exactly like an external
plugin that never heard of it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest

pytestmark = pytest.mark.usefixtures("no_leaks")

COOKIE = "c0ffee"
RESERVED = ["sandboxer.init", "sandboxer.health", "sandboxer.export_state",
            "sandboxer.import_state", "sandboxer.shutdown"]


class Host:
    """The supervisor's end of one plugin host, speaking NDJSON by hand."""

    def __init__(self, sock: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        self.sock = sock
        self.proc = proc
        self._file = sock.makefile("rb")
        self._next_id = 1

    def receive(self) -> Any:
        line = self._file.readline()
        assert line, "the plugin host closed the connection"
        return json.loads(line)

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(json.dumps({"jsonrpc": "2.0", **message}).encode() + b"\n")

    def call(self, method: str, *params: Any) -> dict[str, Any]:
        rid, self._next_id = self._next_id, self._next_id + 1
        self.send({"id": rid, "method": method, "params": list(params)})
        answer = self.receive()
        assert answer["id"] == rid
        return answer  # type: ignore[no-any-return]


@pytest.fixture
def plugin_host(tmp_path: Path) -> Iterator[Any]:
    started: list[Host] = []

    def start(code: str) -> Host:
        entry = tmp_path / f"plugin{len(started)}.py"
        entry.write_text(textwrap.dedent(code))
        ours, theirs = socket.socketpair()
        env = {"PATH": os.environ["PATH"], "SANDBOXER_RPC_FD": str(theirs.fileno()),
               "SANDBOXER_MAGIC_COOKIE": COOKIE}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "sandboxer.host", "--kind", "python",
             "--entrypoint", str(entry), "--root", str(tmp_path), "--id", "test.server",
             "--version", "1.0.0"], env=env, pass_fds=(theirs.fileno(),))
        theirs.close()
        host = Host(ours, proc)
        started.append(host)
        handshake = host.receive()
        assert handshake["method"] == "sandboxer.handshake"
        assert handshake["params"]["cookie"] == COOKIE
        host.send({"id": handshake["id"], "result": {"protocol": 1}})
        return host

    yield start
    for host in started:
        host._file.close()
        host.sock.close()
        if host.proc.poll() is None:
            host.proc.kill()
        host.proc.wait(10)


def test_lifecycle_functions_a_module_lacks_are_answered_not_implemented(plugin_host):
    host = plugin_host("def add(a, b):\n    return a + b\n")
    assert host.call("add", 2, 3)["result"] == 5
    for method in RESERVED:
        answer = host.call(method, *([{}] if method == "sandboxer.init" else []))
        assert "result" not in answer, method
        assert answer["error"]["code"] == -32601, method
        assert "not implemented" in answer["error"]["message"]
    # It was told to shut down: it stops at once, without waiting for the host to hang up.
    assert host.proc.wait(5) == 0


def test_lifecycle_functions_a_module_has_are_answered(plugin_host):
    host = plugin_host("""\
        state = {}
        def init(config):
            state.update(config)
        def health_check():
            return state.get("healthy", True)
        def shutdown():
            pass
        def get():
            return state
        """)
    assert host.call("sandboxer.init", {"healthy": False}) == {
        "jsonrpc": "2.0", "id": 1, "result": None}
    assert host.call("get")["result"] == {"healthy": False}
    assert host.call("sandboxer.health")["result"] == {
        "ok": False, "message": "health_check returned False"}
    assert host.call("sandboxer.export_state")["error"]["code"] == -32601  # has no state
    assert host.call("sandboxer.shutdown")["result"] is None
    assert host.proc.wait(5) == 0


def test_a_plugin_host_exits_at_the_end_of_its_input(plugin_host):
    host = plugin_host("def add(a, b):\n    return a + b\n")
    host.sock.shutdown(socket.SHUT_WR)
    assert host.proc.wait(5) == 0
