"""Out-of-process plugins (sandboxer/loaders/out_of_process.py) over the real wire, against
real processes.

The hostile plugins are small Python scripts written into tmp_path: each does the handshake
correctly (or breaks exactly the part under test) and then misbehaves in one way. Every case
checks the exact error a user sees, that the broken plugin is dead and reaped, that a
well-behaved neighbour (examples/hello in the plugin host) still answers, and (``no_leaks``)
that no fd or child process is left behind. The sandbox launcher is not built yet, so the
loader runs with ``SandboxConfig(enabled=False)``; the supervisor-side code under test is the
same either way.

Positive cases run the SDK, the plugin host (python and native plugins) and the Node.js, C and
Go examples for real.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from conftest import EXAMPLES
from sandboxer import (
    CallTimeout,
    HandshakeError,
    Health,
    LoaderType,
    MethodNotFound,
    PluginCallError,
    PluginCrashed,
    PluginLoadError,
    PluginStateError,
    ProtocolError,
    SandboxConfig,
    SandboxerError,
    load_plugin,
)
from sandboxer.loaders.out_of_process import ProcessHandle, ProcessLoader

pytestmark = pytest.mark.usefixtures("no_leaks")

TRUSTED = SandboxConfig(enabled=False)
MiB = 1 << 20
MAX_FRAME = MiB
HOSTILE_ID = "test.hostile"

# The helper every hostile plugin starts with: no sandboxer code, the protocol by hand.
PRELUDE = '''\
import json, os, resource, signal, socket, sys, threading, time

resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
COOKIE = os.environ["SANDBOXER_MAGIC_COOKIE"]
sock = socket.socket(fileno=int(os.environ["SANDBOXER_RPC_FD"]))
_buf = b""
_send_lock = threading.Lock()


def send(obj):
    """A frame to the host: bytes as they are, anything else as one JSON line."""
    data = obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\\n"
    with _send_lock:
        sock.sendall(data)


def recv():
    """The next frame from the host; exits quietly when the host hangs up."""
    global _buf
    while b"\\n" not in _buf:
        chunk = sock.recv(65536)
        if not chunk:
            os._exit(0)
        _buf += chunk
    line, _, _buf = _buf.partition(b"\\n")
    record(line)
    return json.loads(line)


def recv_request():
    """The next request (frames without an id, the host's notifications, are skipped)."""
    while True:
        message = recv()
        if "id" in message:
            return message


def record(line):
    """Every frame the host sends is appended to RECORD (when the test set one)."""
    if RECORD:
        with open(RECORD, "ab") as f:
            f.write(line + b"\\n")


def answer(request, result):
    send({"jsonrpc": "2.0", "id": request["id"], "result": result})


def handshake(cookie=None, protocols=(1,), methods=("greet", "slow", "crash")):
    send({"jsonrpc": "2.0", "id": 0, "method": "sandboxer.handshake",
          "params": {"cookie": COOKIE if cookie is None else cookie,
                     "protocols": list(protocols),
                     "plugin": {"name": "hostile", "version": "1.0.0"},
                     "methods": list(methods)}})
    return recv()


def serve_greet_forever():
    while True:
        request = recv_request()
        answer(request, "hi " + request["params"][0])
'''


# -- fixtures and helpers --------------------------------------------------------------------------

def _write_plugin(root: Path, script: str, *, plugin_id: str, methods: list[str] | None = None,
                  config: dict[str, Any] | None = None) -> Path:
    root.mkdir()
    entry = root / "plugin.py"
    entry.write_text(script)
    entry.chmod(0o755)
    manifest = textwrap.dedent(f"""\
        [plugin]
        id = "{plugin_id}"
        version = "1.0.0"
        type = "external"
        entrypoint = "plugin.py"
        """)
    if methods is not None:
        manifest += f"methods = {json.dumps(methods)}\n"
    if config:
        manifest += "\n[config]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items())
    (root / "plugin.toml").write_text(manifest)
    return root


@pytest.fixture
def hostile(tmp_path: Path) -> Callable[..., Any]:
    """``hostile(body, record=None)``: an external plugin running PRELUDE, then ``body``."""
    counter = iter(range(1000))

    def build(body: str, *, record: Path | None = None, plugin_id: str = HOSTILE_ID):
        script = ("#!/usr/bin/python3\n" + PRELUDE
                  + f"RECORD = {str(record) if record else None!r}\n\n"
                  + textwrap.dedent(body))
        return load_plugin(_write_plugin(tmp_path / f"hostile{next(counter)}", script,
                                         plugin_id=plugin_id))

    return build


@pytest.fixture
def sdk_plugin(tmp_path: Path) -> Callable[..., Any]:
    """``sdk_plugin(body)``: an external plugin in Python using ``sandboxer.sdk``."""
    counter = iter(range(1000))

    def build(body: str, *, plugin_id: str = "test.sdk", **manifest: Any):
        script = f"#!{sys.executable}\n" + textwrap.dedent(body)
        return load_plugin(_write_plugin(tmp_path / f"sdk{next(counter)}", script,
                                         plugin_id=plugin_id, **manifest))

    return build


@pytest.fixture
async def neighbour():
    """examples/hello in the plugin host: it must keep answering whatever the others do."""
    loader = ProcessLoader(LoaderType.PYTHON, handshake_timeout=10.0, max_frame=MAX_FRAME)
    handle = await loader.start(load_plugin(EXAMPLES / "hello"), TRUSTED, generation=1)
    yield handle
    await handle.close()
    assert handle._proc.returncode is not None


async def still_serving(neighbour: ProcessHandle) -> None:
    assert await neighbour.call("greet", "neighbour", timeout=5) == "Hello, neighbour!"
    assert neighbour._proc.returncode is None


@pytest.fixture
async def launch():
    """``await launch(plugin, kind=..., handshake_timeout=..., max_frame=...)``; closed after."""
    handles: list[ProcessHandle] = []

    async def start(plugin: Any, *, kind: LoaderType = LoaderType.EXTERNAL,
                    handshake_timeout: float = 10.0, max_frame: int = MAX_FRAME) -> ProcessHandle:
        loader = ProcessLoader(kind, handshake_timeout=handshake_timeout, max_frame=max_frame)
        handle = await loader.start(plugin, TRUSTED, generation=1)
        handles.append(handle)
        return handle

    yield start
    for handle in handles:
        await handle.close()
        assert handle._proc.returncode is not None, "close() left the process running"


def failures_of(handle: ProcessHandle) -> list[SandboxerError]:
    seen: list[SandboxerError] = []
    handle.on_failure(seen.append)
    return seen


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def assert_killed_for_it(handle: ProcessHandle) -> None:
    """The supervisor killed the process (SIGKILL) because of what it did, before close()."""
    assert await handle._proc.wait(3.0) == -signal.SIGKILL


async def assert_broken(handle: ProcessHandle, seen: list[SandboxerError],
                        call: Awaitable[Any], error: type[SandboxerError], fragment: str, *,
                        names_plugin: bool = True) -> None:
    """``call`` fails with ``error``; on_failure got that same error once; the plugin is killed;
    later calls fail at once with it."""
    with pytest.raises(error) as info:
        await call
    assert fragment in str(info.value), str(info.value)
    if names_plugin:  # (see test_a_frame_over_the_limit_names_the_plugin)
        assert f"plugin {handle.plugin.id}" in str(info.value)
        assert info.value.plugin_id == handle.plugin.id
    assert seen == [info.value]
    await assert_killed_for_it(handle)
    started = time.monotonic()
    with pytest.raises(error) as again:
        await handle.call("greet", "again", timeout=5)
    assert again.value is info.value
    assert time.monotonic() - started < 0.5


# -- what the plugin process is given -------------------------------------------------------------

FD_PROBE = """\
    handshake(methods=["inspect"])
    request = recv_request()
    fds = []
    for fd in range(4096):
        try:
            os.fstat(fd)
        except OSError:
            continue
        fds.append(fd)
    answer(request, {"env": dict(os.environ), "fds": fds,
                     "stdin": os.readlink("/proc/self/fd/0"),
                     "own_session": os.getsid(0) == os.getpid(),
                     "fd3": socket.socket(fileno=os.dup(3)).family.name})
    serve_greet_forever()
    """


def _inheritable_fds() -> set[int]:
    """Fds of this process that an exec would pass on (beyond stdin/stdout/stderr)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.get_inheritable(int(name)):
                found.add(int(name))
        except OSError:
            pass
    return found - {0, 1, 2}


async def test_the_plugin_sees_a_clean_environment_and_none_of_sandboxers_fds(hostile, launch):
    inherited = _inheritable_fds()  # not sandboxer's
    handle = await launch(hostile(FD_PROBE))
    seen = await handle.call("inspect", timeout=5)
    env = seen["env"]
    assert sorted(env) == ["HOME", "LANG", "PATH", "SANDBOXER_MAGIC_COOKIE", "SANDBOXER_MAX_FRAME",
                           "SANDBOXER_RPC_FD"]
    assert env["SANDBOXER_RPC_FD"] == "3" and env["SANDBOXER_MAX_FRAME"] == str(MAX_FRAME)
    assert len(env["SANDBOXER_MAGIC_COOKIE"]) >= 32
    assert set(seen["fds"]) - inherited == {0, 1, 2, 3}, "a supervisor fd leaked into the plugin"
    assert seen["stdin"] == "/dev/null"
    assert seen["own_session"] is True
    assert seen["fd3"] == "AF_UNIX"


async def test_an_inheritable_fd_of_the_supervisor_does_not_reach_the_plugin(hostile, launch):
    r, w = os.pipe()
    try:
        os.set_inheritable(w, True)  # as if the supervisor had been started with it open
        handle = await launch(hostile(FD_PROBE))
        seen = await handle.call("inspect", timeout=5)
    finally:
        os.close(r)
        os.close(w)
    assert w not in seen["fds"], f"the supervisor's fd {w} is open in the plugin: {seen['fds']}"
    assert seen["fds"] == [0, 1, 2, 3]


async def test_each_start_gets_a_fresh_cookie(hostile, launch):
    body = """\
        handshake(methods=["cookie"])
        answer(recv_request(), COOKIE)
        serve_greet_forever()
        """
    first = await launch(hostile(body))
    second = await launch(hostile(body))
    assert await first.call("cookie", timeout=5) != await second.call("cookie", timeout=5)


async def test_the_manifest_methods_limit_what_can_be_called(tmp_path, launch, neighbour):
    record = tmp_path / "frames"
    root = _write_plugin(tmp_path / "p", "#!/usr/bin/python3\n" + PRELUDE
                         + f"RECORD = {str(record)!r}\n"
                         "handshake(methods=['greet', 'slow', 'crash'])\nserve_greet_forever()\n",
                         plugin_id=HOSTILE_ID, methods=["greet"])
    handle = await launch(load_plugin(root))
    assert handle.methods == ("greet",)
    with pytest.raises(MethodNotFound) as info:
        await handle.call("crash", timeout=5)
    assert info.value.data == {"available": ["greet"]}
    assert await handle.call("greet", "x", timeout=5) == "hi x"
    methods = [json.loads(line).get("method") for line in record.read_bytes().splitlines()]
    assert methods == [None, "greet"]  # the handshake reply, then greet: crash never sent
    await still_serving(neighbour)


# -- broken frames after the handshake ---------------------------------------------------------

# Sent in answer to the first call; "ID" becomes that call's id.
BAD_ANSWERS = {
    "garbage_line": (b"this is not json-rpc\n", ProtocolError, "invalid JSON"),
    "invalid_json": (b'{"jsonrpc":"2.0","id":ID,"result":\n', ProtocolError, "invalid JSON"),
    "invalid_utf8": (b'{"jsonrpc":"2.0","id":ID,"result":"\xff"}\n', ProtocolError,
                     "invalid JSON"),
    "json_array": (b'[{"jsonrpc":"2.0","id":ID,"result":"x"}]\n', ProtocolError,
                   "must be a JSON object, not list"),
    "empty_line": (b"\n", ProtocolError, "empty frame"),
    "blank_line": (b"   \r\n", ProtocolError, "empty frame"),
    "unknown_id": (b'{"jsonrpc":"2.0","id":999999,"result":"x"}\n', ProtocolError,
                   "answered id 999999, which no call is waiting for"),
    "id_as_string": (b'{"jsonrpc":"2.0","id":"ID","result":"x"}\n', ProtocolError,
                     "which no call is waiting for"),
    "null_id_result": (b'{"jsonrpc":"2.0","id":null,"result":"x"}\n', ProtocolError,
                       "which no call is waiting for"),
    "both_result_and_error": (b'{"jsonrpc":"2.0","id":ID,"result":1,'
                              b'"error":{"code":1,"message":"m"}}\n', ProtocolError, "not both"),
    "missing_version": (b'{"id":ID,"result":"x"}\n', ProtocolError, '"jsonrpc": "2.0"'),
    "error_without_code": (b'{"jsonrpc":"2.0","id":ID,"error":{"message":"m"}}\n',
                           ProtocolError, "integer code"),
    "second_handshake": (b'{"jsonrpc":"2.0","id":0,"method":"sandboxer.handshake",'
                         b'"params":{}}\n', ProtocolError, "handshake twice"),
}


@pytest.mark.parametrize("frame,error,fragment", BAD_ANSWERS.values(), ids=BAD_ANSWERS.keys())
async def test_a_broken_answer_fails_the_call_and_kills_the_plugin(
        hostile, launch, neighbour, frame: bytes, error: type[SandboxerError], fragment: str):
    handle = await launch(hostile(f"""\
        handshake()
        request = recv_request()
        send({frame!r}.replace(b"ID", str(request["id"]).encode()))
        time.sleep(30)
        """))
    seen = failures_of(handle)
    await assert_broken(handle, seen, handle.call("greet", "x", timeout=5), error, fragment)
    await still_serving(neighbour)


async def test_an_answer_sent_twice_is_a_protocol_error(hostile, launch, neighbour):
    handle = await launch(hostile("""\
        handshake()
        request = recv_request()
        answer(request, "first")
        time.sleep(0.2)
        answer(request, "again")
        time.sleep(30)
        """))
    seen = failures_of(handle)
    assert await handle.call("greet", "x", timeout=5) == "first"
    await wait_for(lambda: bool(seen), 3, "the failure callback")
    assert isinstance(seen[0], ProtocolError)
    assert "which no call is waiting for" in str(seen[0])
    await assert_killed_for_it(handle)
    await still_serving(neighbour)


async def test_unsolicited_garbage_fails_the_plugin_with_no_call_in_flight(
        hostile, launch, neighbour):
    handle = await launch(hostile("""\
        handshake()
        time.sleep(0.2)
        send(b"\\x00\\x01 binary junk\\n")
        time.sleep(30)
        """))
    seen = failures_of(handle)
    await wait_for(lambda: bool(seen), 3, "the failure callback")
    assert len(seen) == 1 and isinstance(seen[0], ProtocolError)
    assert "invalid JSON" in str(seen[0])
    await assert_killed_for_it(handle)
    with pytest.raises(ProtocolError):
        await handle.call("greet", "x", timeout=5)
    await still_serving(neighbour)


async def test_a_handshake_sent_twice_is_a_protocol_error(hostile, launch, neighbour):
    handle = await launch(hostile("""\
        handshake()
        handshake()
        serve_greet_forever()
        """))
    with pytest.raises(ProtocolError, match="sent the handshake twice"):
        await handle.call("greet", "x", timeout=5)
    await assert_killed_for_it(handle)
    await still_serving(neighbour)


OVERSIZED = {
    # One frame of max_frame + 10 bytes, newline-terminated.
    "with_newline": f"""\
        head = b'{{"jsonrpc":"2.0","id":%d,"result":"' % request["id"]
        send(head + b"x" * ({MAX_FRAME} + 10) + b'"}}\\n')
        """,
    # 2 MiB of 'x' and never a newline.
    "never_ending": """\
        for _ in range(32):
            send(b"x" * 65536)
        """,
}


def _oversized(hostile, case: str) -> Any:
    return hostile("handshake()\nrequest = recv_request()\ntry:\n"
                   + textwrap.indent(textwrap.dedent(OVERSIZED[case]), "    ")
                   + "except OSError:\n    pass  # the host hangs up on us halfway\n"
                   + "time.sleep(30)\n")


@pytest.mark.parametrize("case", OVERSIZED)
async def test_a_frame_over_the_limit_is_refused(hostile, launch, neighbour, case):
    handle = await launch(_oversized(hostile, case))
    seen = failures_of(handle)
    await assert_broken(handle, seen, handle.call("greet", "x", timeout=5), ProtocolError,
                        f"{MAX_FRAME}", names_plugin=False)
    assert "limit" in str(seen[0])
    # Cut off at the limit: the supervisor never held much more than max_frame of it.
    assert handle._conn._buffer.pending <= MAX_FRAME
    await still_serving(neighbour)


@pytest.mark.parametrize("case", OVERSIZED)
async def test_a_frame_over_the_limit_names_the_plugin(hostile, launch, case):
    handle = await launch(_oversized(hostile, case))
    with pytest.raises(ProtocolError) as info:
        await handle.call("greet", "x", timeout=5)
    assert f"plugin {HOSTILE_ID}" in str(info.value)
    assert info.value.plugin_id == HOSTILE_ID


async def test_a_request_from_the_plugin_gets_method_not_found_and_the_session_goes_on(
        hostile, launch, neighbour):
    handle = await launch(hostile("""\
        handshake()
        send({"jsonrpc": "2.0", "id": 77, "method": "host.secrets", "params": []})
        reply = request = None
        while reply is None or request is None:    # in either order
            message = recv()
            if message.get("method") == "greet":
                request = message
            elif message.get("id") == 77:
                reply = message
        answer(request, reply)
        time.sleep(30)
        """))
    reply = await handle.call("greet", "x", timeout=5)
    assert reply["id"] == 77 and reply["error"]["code"] == -32601
    assert "host.secrets" in reply["error"]["message"]
    await still_serving(neighbour)


# -- the handshake -------------------------------------------------------------------------------

async def _load_fails(hostile_plugin: Any, *, handshake_timeout: float = 5.0) -> BaseException:
    loader = ProcessLoader(LoaderType.EXTERNAL, handshake_timeout=handshake_timeout,
                           max_frame=MAX_FRAME)
    with pytest.raises(SandboxerError) as info:
        await loader.start(hostile_plugin, TRUSTED, generation=1)
    return info.value


async def test_a_wrong_cookie_is_a_handshake_error(hostile, neighbour):
    error = await _load_fails(hostile("""\
        reply = handshake(cookie="0" * 32)
        sys.stderr.write(f"reply: {reply}\\n")
        time.sleep(30)
        """))
    assert type(error) is HandshakeError
    assert "wrong magic cookie" in str(error) and f"plugin {HOSTILE_ID}" in str(error)
    await still_serving(neighbour)


async def test_a_missing_cookie_is_a_handshake_error(hostile, neighbour):
    error = await _load_fails(hostile("""\
        send({"jsonrpc": "2.0", "id": 0, "method": "sandboxer.handshake",
              "params": {"protocols": [1], "methods": []}})
        time.sleep(30)
        """))
    assert type(error) is HandshakeError and "cookie" in str(error)
    await still_serving(neighbour)


async def test_no_common_protocol_is_a_handshake_error_naming_both_lists(hostile, neighbour):
    error = await _load_fails(hostile("""\
        handshake(protocols=[99])
        time.sleep(30)
        """))
    assert type(error) is HandshakeError
    assert "no common protocol version" in str(error)
    assert "the plugin speaks [99]" in str(error) and "this host speaks [1]" in str(error)
    await still_serving(neighbour)


@pytest.mark.parametrize("body", [
    "time.sleep(30)",
    "send(b'{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"sandboxer.hand'); time.sleep(30)",
], ids=["silence", "half_a_handshake"])
async def test_no_handshake_within_the_timeout_is_a_handshake_error(hostile, neighbour, body):
    started = time.monotonic()
    error = await _load_fails(hostile(body), handshake_timeout=1.0)
    elapsed = time.monotonic() - started
    assert type(error) is HandshakeError
    assert f"plugin {HOSTILE_ID}: sent no handshake within 1s" == str(error)
    assert 1.0 <= elapsed < 3.0
    await still_serving(neighbour)


@pytest.mark.parametrize("frame", [
    {"jsonrpc": "2.0", "method": "sandboxer.log", "params": {"level": "info", "message": "hi"}},
    {"jsonrpc": "2.0", "id": 0, "method": "greet", "params": []},
    {"jsonrpc": "2.0", "id": 0, "result": {"protocol": 1}},
], ids=["a_notification", "another_request", "a_response"])
async def test_a_first_frame_that_is_not_the_handshake_is_a_handshake_error(
        hostile, neighbour, frame):
    error = await _load_fails(hostile(f"""\
        send({frame!r})
        time.sleep(30)
        """))
    assert type(error) is HandshakeError
    assert "the first frame must be the sandboxer.handshake request" in str(error)
    await still_serving(neighbour)


@pytest.mark.parametrize("frame", [b"hello host\n", b"\n", b"[1, 2]\n"],
                         ids=["garbage", "empty_line", "json_array"])
async def test_a_first_frame_that_is_not_json_rpc_is_a_handshake_error(hostile, frame):
    error = await _load_fails(hostile(f"""\
        send({frame!r})
        time.sleep(30)
        """))
    assert isinstance(error, HandshakeError), f"{type(error).__name__}: {error}"


async def test_an_exit_before_the_handshake_names_the_status_and_stderr(hostile, neighbour):
    started = time.monotonic()
    error = await _load_fails(hostile("""\
        sys.stderr.write("fatal: missing config\\n")
        sys.exit(3)
        """))
    assert type(error) is HandshakeError
    assert isinstance(error, PluginLoadError)
    assert "exited before the handshake" in str(error)
    assert "exited with status 3" in str(error)
    assert "fatal: missing config" in str(error)
    assert isinstance(error.__cause__, PluginCrashed) and error.__cause__.exit_status == 3
    assert time.monotonic() - started < 3.0
    await still_serving(neighbour)


async def test_a_manifest_method_the_process_does_not_offer_fails_the_load(tmp_path, neighbour):
    root = _write_plugin(tmp_path / "p", "#!/usr/bin/python3\n" + PRELUDE + "RECORD = None\n"
                         "handshake(methods=['greet'])\nserve_greet_forever()\n",
                         plugin_id=HOSTILE_ID, methods=["greet", "missing"])
    error = await _load_fails(load_plugin(root))
    assert type(error) is HandshakeError
    assert "does not offer: missing" in str(error)
    await still_serving(neighbour)


# -- crashes mid-call ------------------------------------------------------------------------------

async def test_closing_the_socket_mid_call_is_a_crash_within_seconds(hostile, launch, neighbour):
    handle = await launch(hostile("""\
        handshake()
        recv_request()
        sock.close()
        time.sleep(30)
        """))
    seen = failures_of(handle)
    started = time.monotonic()
    with pytest.raises(PluginCrashed) as info:
        await handle.call("greet", "x", timeout=20)
    assert time.monotonic() - started < 3.0
    assert info.value.signal == signal.SIGKILL and info.value.exit_status is None
    assert "killed by SIGKILL" in str(info.value)
    assert seen == [info.value]
    await still_serving(neighbour)


async def test_an_exit_mid_call_is_a_crash_with_status_and_stderr(hostile, launch, neighbour):
    handle = await launch(hostile("""\
        handshake()
        recv_request()
        sys.stderr.write("first line\\nabout to die\\n")
        sys.stderr.flush()
        os._exit(4)
        """))
    seen = failures_of(handle)
    with pytest.raises(PluginCrashed) as info:
        await handle.call("greet", "x", timeout=5)
    error = info.value
    assert error.exit_status == 4 and error.signal is None
    assert error.stderr_tail[-2:] == ["first line", "about to die"]
    assert "exited with status 4" in str(error) and "about to die" in str(error)
    assert seen == [error]
    with pytest.raises(PluginCrashed):
        await handle.call("greet", "again", timeout=5)
    await still_serving(neighbour)


async def test_a_segfault_mid_call_is_a_crash_with_the_signal(hostile, launch, neighbour):
    handle = await launch(hostile("""\
        handshake()
        recv_request()
        os.kill(os.getpid(), signal.SIGSEGV)
        """))
    seen = failures_of(handle)
    with pytest.raises(PluginCrashed) as info:
        await handle.call("greet", "x", timeout=5)
    assert info.value.signal == signal.SIGSEGV and info.value.exit_status is None
    assert "killed by SIGSEGV" in str(info.value)
    assert seen == [info.value]
    await still_serving(neighbour)


async def test_every_call_in_flight_gets_the_crash(hostile, launch, neighbour):
    handle = await launch(hostile("""\
        handshake()
        for _ in range(5):
            recv_request()
        os._exit(9)
        """))
    results = await asyncio.gather(*(handle.call("greet", str(i), timeout=5) for i in range(5)),
                                   return_exceptions=True)
    assert all(isinstance(r, PluginCrashed) and r.exit_status == 9 for r in results), results
    assert len({id(r) for r in results}) == 1
    await still_serving(neighbour)


async def test_close_with_a_call_in_flight_fails_it_without_calling_on_failure(
        hostile, launch, neighbour):
    handle = await launch(hostile("""\
        handshake()
        recv_request()
        time.sleep(30)
        """))
    seen = failures_of(handle)
    call = asyncio.ensure_future(handle.call("greet", "x", timeout=20))
    await asyncio.sleep(0.2)
    await handle.close()
    with pytest.raises(PluginStateError, match="closed while calls were in flight"):
        await call
    assert seen == []
    assert handle._proc.returncode is not None
    await handle.close()  # idempotent
    await still_serving(neighbour)


# -- flood, concurrency, timeouts --------------------------------------------------------------

def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


FLOOD_LINES = 400_000  # of 100 bytes, after one 10 MiB line: ~50 MB in all


async def test_a_stdout_flood_neither_stalls_calls_nor_grows_memory(hostile, launch, neighbour):
    handle = await launch(hostile(f"""\
        handshake()
        done = threading.Event()

        def flood():
            out = sys.stdout.buffer
            out.write(b"y" * (10 << 20) + b"\\n")        # one 10 MiB line
            block = (b"x" * 99 + b"\\n") * 10_000          # 1 MB of 100-byte lines
            for _ in range({FLOOD_LINES} // 10_000):
                out.write(block)
            out.write(b"flood done\\n")
            out.flush()
            done.set()

        threading.Thread(target=flood, daemon=True).start()
        while True:
            request = recv_request()
            if request["method"] == "slow":             # "slow" here: wait for the flood
                done.wait()
            answer(request, "hi")
        """))
    rss_before = _rss_kib()
    started = time.monotonic()
    assert await handle.call("greet", "x", timeout=2) == "hi"
    assert time.monotonic() - started < 2.0
    lines_at_answer = handle._proc.stdout.lines
    assert lines_at_answer < FLOOD_LINES, "the call was not answered during the flood"
    await still_serving(neighbour)
    assert await handle.call("slow", timeout=30) == "hi"
    await wait_for(lambda: handle._proc.stdout.lines >= FLOOD_LINES + 2, 30, "the flood to drain")
    capture = handle._proc.stdout
    assert capture.lines == FLOOD_LINES + 2
    assert len(capture.tail) <= 50
    assert capture.tail[-1] == "flood done"
    assert all(len(line) <= 4097 for line in capture.tail)
    assert (_rss_kib() - rss_before) < 50 * 1024, "reading the flood grew the supervisor's RSS"
    await still_serving(neighbour)


LONG_LINE = """\
    handshake()
    sys.stdout.write("z" * 100_000 + "\\nshort\\n")
    sys.stdout.flush()
    serve_greet_forever()
    """


async def test_an_overlong_output_line_is_cut(hostile, launch, neighbour):
    handle = await launch(hostile(LONG_LINE))
    await wait_for(lambda: handle._proc.stdout.lines >= 2, 5, "the output")
    cut, short = list(handle._proc.stdout.tail)
    assert cut.startswith("z" * 4096) and len(cut) <= 4097
    assert short == "short"
    assert handle._proc.stdout.lines == 2
    await still_serving(neighbour)


async def test_an_overlong_output_line_is_marked_as_cut(hostile, launch):
    handle = await launch(hostile(LONG_LINE))
    await wait_for(lambda: handle._proc.stdout.lines >= 2, 5, "the output")
    assert handle._proc.stdout.tail[0] == "z" * 4096 + "…"


ASYNC_SLEEPER = """\
import asyncio
from sandboxer import sdk

async def nap(i):
    await asyncio.sleep(0.2)
    return i

if __name__ == "__main__":
    sdk.serve(name="sleeper", version="1.0.0")
"""


async def test_a_hundred_calls_in_flight_run_concurrently(sdk_plugin, launch, neighbour):
    handle = await launch(sdk_plugin(ASYNC_SLEEPER))
    started = time.monotonic()
    results = await asyncio.gather(*(handle.call("nap", i, timeout=10) for i in range(100)))
    elapsed = time.monotonic() - started
    assert results == list(range(100))
    assert elapsed < 2.0, f"100 calls of 0.2 s took {elapsed:.2f}s: not concurrent"
    assert handle._conn.in_flight == 0
    await still_serving(neighbour)


async def test_a_call_timeout_sends_cancel_with_that_id(tmp_path, hostile, launch, neighbour):
    record = tmp_path / "frames"
    handle = await launch(hostile("""\
        handshake()
        while True:
            message = recv()
            if message.get("method") == "slow":
                slow = message                          # never answered ... until cancelled
            elif message.get("method") == "sandboxer.cancel":
                answer(slow, "too late")                # a late answer must be dropped quietly
            elif "id" in message:
                answer(message, "hi")
        """, record=record))
    seen = failures_of(handle)
    started = time.monotonic()
    with pytest.raises(CallTimeout) as info:
        await handle.call("slow", timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 1.5
    assert info.value.timeout == 0.3 and info.value.method == "slow"
    assert f"plugin {HOSTILE_ID}: slow did not answer within 0.3s" == str(info.value)

    def frames() -> list[dict[str, Any]]:
        return [json.loads(line) for line in record.read_bytes().splitlines()]

    await wait_for(lambda: any(f.get("method") == "sandboxer.cancel" for f in frames()), 3,
                   "the cancel notification")
    slow = next(f for f in frames() if f.get("method") == "slow")
    cancel = next(f for f in frames() if f.get("method") == "sandboxer.cancel")
    assert "id" not in cancel and cancel["params"] == {"id": slow["id"]}
    # The late answer to the cancelled call did not break the session.
    assert await handle.call("greet", "x", timeout=5) == "hi"
    assert seen == []
    await still_serving(neighbour)


async def test_a_cancelled_caller_sends_cancel_too(tmp_path, hostile, launch, neighbour):
    record = tmp_path / "frames"
    handle = await launch(hostile("""\
        handshake()
        while True:
            message = recv()
            if "id" in message and message["method"] != "slow":
                answer(message, "hi")
        """, record=record))
    call = asyncio.ensure_future(handle.call("slow", timeout=20))
    await asyncio.sleep(0.2)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call

    def cancels() -> list[dict[str, Any]]:
        return [f for f in map(json.loads, record.read_bytes().splitlines())
                if f.get("method") == "sandboxer.cancel"]

    await wait_for(lambda: bool(cancels()), 3, "the cancel notification")
    slow = next(f for f in map(json.loads, record.read_bytes().splitlines())
                if f.get("method") == "slow")
    assert cancels()[0]["params"] == {"id": slow["id"]}
    assert await handle.call("greet", "x", timeout=5) == "hi"
    await still_serving(neighbour)


# -- the SDK -------------------------------------------------------------------------------------

SDK_PLUGIN = """\
import asyncio
from sandboxer import sdk

_config = None
_state = {"count": 0}
_healthy = True
_cancelled = []

def init(config):
    global _config
    _config = config

def health_check():
    return _healthy

def export_state():
    return _state

def import_state(state, from_version):
    _state.update(state, imported_from=from_version)

def config():
    return _config

def count():
    _state["count"] += 1
    return _state["count"]

def make_unhealthy():
    global _healthy
    _healthy = False

def echo(*values):
    return list(values)

async def add_later(a, b):
    await asyncio.sleep(0.01)
    return a + b

async def wait_forever():
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        _cancelled.append(True)
        raise

def was_cancelled():
    return bool(_cancelled)

def shout(message):
    sdk.log("warning", message.upper())
    sdk.log("info", message)
    return None

def boom():
    raise KeyError("nope")

def _private():
    return "hidden"

if __name__ == "__main__":
    sdk.serve(name="sdk-test", version="2.0.0")
"""


@pytest.fixture
async def sdk_handle(sdk_plugin, launch):
    return await launch(sdk_plugin(SDK_PLUGIN))


async def test_sdk_offers_its_public_functions_and_state(sdk_handle, neighbour):
    assert sdk_handle.methods == ("add_later", "boom", "config", "count", "echo",
                                  "make_unhealthy", "shout", "wait_forever", "was_cancelled")
    assert sdk_handle.has_state is True
    assert sdk_handle._info.name == "sdk-test" and sdk_handle._info.version == "2.0.0"
    with pytest.raises(MethodNotFound) as info:
        await sdk_handle.call("_private", timeout=5)
    assert info.value.data == {"available": list(sdk_handle.methods)}
    await still_serving(neighbour)


async def test_sdk_sync_and_async_handlers_answer(sdk_handle, neighbour):
    assert await sdk_handle.call("echo", 1, "two", [3], {"four": None}, timeout=5) == [
        1, "two", [3], {"four": None}]
    assert await sdk_handle.call("add_later", 2, 3, timeout=5) == 5
    assert await sdk_handle.call("count", timeout=5) == 1
    with pytest.raises(PluginCallError) as info:
        await sdk_handle.call("boom", timeout=5)
    assert info.value.code == 1 and info.value.data == {"type": "KeyError", "message": "'nope'"}
    assert "boom raised KeyError" in str(info.value)
    await still_serving(neighbour)


async def test_sdk_lifecycle(sdk_handle, neighbour):
    await sdk_handle.init({"greeting": "Hi", "nested": {"a": [1, 2]}})
    assert await sdk_handle.call("config", timeout=5) == {"greeting": "Hi", "nested": {"a": [1, 2]}}
    assert await sdk_handle.health() == Health(True)
    await sdk_handle.call("make_unhealthy", timeout=5)
    health = await sdk_handle.health()
    assert health.ok is False and "health_check returned False" in health.message
    await sdk_handle.call("count", timeout=5)
    assert await sdk_handle.export_state() == {"count": 1}
    await sdk_handle.import_state({"count": 41}, "0.9.0")
    assert await sdk_handle.call("count", timeout=5) == 42
    assert await sdk_handle.export_state() == {"count": 42, "imported_from": "0.9.0"}
    await sdk_handle.shutdown()
    assert sdk_handle._proc.returncode == 0
    await still_serving(neighbour)


async def test_sdk_log_reaches_the_host_logging(sdk_handle, neighbour, caplog):
    with caplog.at_level(logging.INFO, logger="sandboxer.plugin.test.sdk"):
        assert await sdk_handle.call("shout", "careful now", timeout=5) is None
    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records
               if r.name == "sandboxer.plugin.test.sdk"]
    assert records == [("sandboxer.plugin.test.sdk", logging.WARNING, "CAREFUL NOW"),
                       ("sandboxer.plugin.test.sdk", logging.INFO, "careful now")]
    await still_serving(neighbour)


async def test_sdk_async_handler_is_cancelled_on_timeout(sdk_handle, neighbour):
    with pytest.raises(CallTimeout):
        await sdk_handle.call("wait_forever", timeout=0.3)
    await wait_for_async(lambda: sdk_handle.call("was_cancelled", timeout=5), 3)
    assert await sdk_handle.call("count", timeout=5) == 1  # the session goes on
    await still_serving(neighbour)


async def wait_for_async(probe: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await probe():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_sdk_refuses_to_run_outside_sandboxer(sdk_plugin):
    plugin = sdk_plugin(ASYNC_SLEEPER)
    run = subprocess.run([str(plugin.entrypoint)], capture_output=True, text=True, timeout=30,
                         env={"PATH": os.environ["PATH"]})
    assert run.returncode != 0
    assert "not started by sandboxer" in run.stderr


# -- the plugin host: examples/hello ---------------------------------------------------------------

async def test_plugin_host_python_example(launch, neighbour):
    handle = await launch(load_plugin(EXAMPLES / "hello"), kind=LoaderType.PYTHON)
    assert handle.methods == ("add", "fail", "greet")
    await handle.init({"greeting": "Howdy"})
    assert await handle.call("greet", "you", timeout=5) == "Howdy, you!"
    assert await handle.call("add", 2, 40, timeout=5) == 42
    with pytest.raises(PluginCallError) as info:
        await handle.call("fail", "on purpose", timeout=5)
    assert type(info.value) is PluginCallError
    assert info.value.data["type"] == "ValueError" and info.value.data["message"] == "on purpose"
    assert "on purpose" in str(info.value)
    with pytest.raises(MethodNotFound) as missing:
        await handle.call("nope", timeout=5)
    assert missing.value.data == {"available": ["add", "fail", "greet"]}
    assert await handle.health() == Health(True)
    await handle.shutdown()
    assert handle._proc.returncode == 0
    await still_serving(neighbour)


async def test_a_reserved_name_is_not_callable(launch, neighbour):
    handle = await launch(load_plugin(EXAMPLES / "hello"), kind=LoaderType.PYTHON)
    for reserved in ("sandboxer.shutdown", "sandboxer.export_state", "sandboxer.handshake"):
        with pytest.raises(MethodNotFound) as info:
            await handle.call(reserved, timeout=5)
        assert info.value.method == reserved
        assert info.value.data == {"available": ["add", "fail", "greet"]}
    # Had the shutdown reached the plugin, it would have exited by now.
    await asyncio.sleep(0.2)
    assert handle._proc.returncode is None
    assert await handle.call("greet", "still here", timeout=5) == "Hello, still here!"
    await still_serving(neighbour)


async def test_a_reserved_name_never_reaches_the_wire(tmp_path, hostile, launch):
    record = tmp_path / "frames"
    handle = await launch(hostile("""\
        handshake(methods=[])
        serve_greet_forever()
        """, record=record))
    assert handle.methods == ()
    with pytest.raises(MethodNotFound):
        await handle.call("sandboxer.shutdown", timeout=5)
    assert await handle.call("greet", "x", timeout=5) == "hi x"
    frames = [json.loads(line) for line in record.read_bytes().splitlines()]
    assert [f.get("method") for f in frames[1:]] == ["greet"]


# -- the Node.js example ---------------------------------------------------------------------------

@pytest.fixture(scope="session")
def node() -> str:
    path = shutil.which("node")
    if path is None:
        pytest.fail("node is not installed; examples/external-node needs it: apt-get install "
                    "nodejs (scripts/bootstrap.sh installs it)", pytrace=False)
    return path


async def test_node_example(node, launch, neighbour, caplog):
    with caplog.at_level(logging.INFO, logger="sandboxer.plugin.example.external-node"):
        handle = await launch(load_plugin(EXAMPLES / "external-node"))
        assert handle._info.name == "node-hello"
        assert handle.methods == ("add", "greet", "increment", "sleep")
        assert handle.has_state is False  # it does not declare the state methods
        await handle.init({"greeting": "Hey"})
    assert any("initialised" in r.getMessage() for r in caplog.records)
    assert await handle.call("greet", "node", timeout=5) == "Hey, node!"
    assert await handle.call("add", 1.5, 2, timeout=5) == 3.5
    with pytest.raises(PluginCallError) as info:
        await handle.call("add", "a", 2, timeout=5)
    assert info.value.code == -32602
    started = time.monotonic()
    assert await asyncio.gather(*(handle.call("sleep", 300, timeout=5) for _ in range(20))) == \
        [300] * 20
    assert time.monotonic() - started < 1.5
    await handle.shutdown()
    assert handle._proc.returncode == 0
    await still_serving(neighbour)


# -- the native examples in the plugin host -------------------------------------------------------

def _make(example: str, artifact: str) -> Path:
    for tool in ("make", "gcc") + (("go",) if "go" in example else ()):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; examples/{example} needs it "
                        "(scripts/bootstrap.sh installs it)", pytrace=False)
    run = subprocess.run(["make", "-C", str(EXAMPLES / example)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f"make -C examples/{example} failed:\n{run.stdout}{run.stderr}"
    assert (EXAMPLES / example / artifact).is_file()
    return EXAMPLES / example


@pytest.fixture(scope="session")
def native_c() -> Path:
    return _make("native-c", "libhello.so")


@pytest.fixture(scope="session")
def native_go() -> Path:
    return _make("native-go", "libgohello.so")


async def test_native_c_example_in_the_plugin_host(native_c, launch, neighbour):
    handle = await launch(load_plugin(native_c), kind=LoaderType.NATIVE)
    assert set(handle.methods) == {"greet", "add", "crash", "fail"}
    await handle.init({"greeting": "Salut"})
    assert await handle.call("greet", "C", timeout=5) == "Salut, C!"
    assert await handle.call("add", 2, 3, timeout=5) == 5
    with pytest.raises(PluginCallError) as info:
        await handle.call("fail", timeout=5)
    assert info.value.code == 7
    seen = failures_of(handle)
    with pytest.raises(PluginCrashed) as crash:
        await handle.call("crash", timeout=5)
    assert crash.value.signal == signal.SIGSEGV and "killed by SIGSEGV" in str(crash.value)
    assert seen == [crash.value]
    await still_serving(neighbour)


async def test_native_go_example_in_the_plugin_host(native_go, launch, neighbour):
    handle = await launch(load_plugin(native_go), kind=LoaderType.NATIVE)
    await handle.init({"greeting": "Ciao"})
    assert await handle.call("greet", "Go", timeout=5) == "Ciao, Go!"
    seen = failures_of(handle)
    with pytest.raises(PluginCrashed) as crash:
        await handle.call("crash", timeout=10)
    # Go's runtime turns the nil dereference into a panic and then SIGABRT (see main.go).
    assert crash.value.signal == signal.SIGABRT
    assert any("nil pointer dereference" in line for line in crash.value.stderr_tail) or \
        "goroutine" in "\n".join(crash.value.stderr_tail)
    assert seen == [crash.value]
    await still_serving(neighbour)
