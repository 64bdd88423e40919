"""go-plugin gRPC plugins under the sandbox: an unmodified Go plugin, and hostile ones.

The Go plugin is go-plugin's KV example built offline from Debian's go-plugin 1.0.1 sources
(tests/grpc_build.py); the hostile ones are a few lines of sh, written from go-plugin's
handshake description alone. Everything runs sandboxed under the default profile through
``PluginManager`` and (``no_leaks``) leaves no fd, child process, cgroup or mount behind.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import conftest
from conftest import IN_CI
from sandboxer import (
    CallTimeout,
    HandshakeError,
    HostConfig,
    PluginCallError,
    PluginCrashed,
    PluginManager,
    PluginState,
    PluginStateError,
)
from sandboxer.sandbox import forkserver

pytestmark = pytest.mark.usefixtures("no_leaks_but_grpc_engine")

# grpcio's engine: one set of these per process, made at its first connection and again for
# each new event loop (an epoll, eventfds, a socket pair); never more than this many.
GRPC_ENGINE_FDS = 6
ENGINE_KINDS = ("anon_inode:[eventfd]", "anon_inode:[eventpoll]", "socket:[")


@pytest.fixture
def no_leaks_but_grpc_engine() -> Iterator[None]:
    """conftest's no_leaks, but for grpcio's own engine (bounded; test_no_fd_grows_with_use
    shows it does not grow with use): no process, cgroup, mount or other fd left behind."""
    forkserver.prestart()  # as no_leaks does: it lives as long as the process
    fds, kids = conftest._open_fds(), conftest._children()
    groups, mounts = conftest._plugin_cgroups(), conftest._mounts()
    yield
    leaked = {
        fd: os.readlink(f"/proc/self/fd/{fd}")
        for fd in conftest._open_fds() - fds
        if os.path.exists(f"/proc/self/fd/{fd}")
    }
    engine = [link for link in leaked.values() if link.startswith(ENGINE_KINDS)]
    assert len(engine) <= GRPC_ENGINE_FDS, f"leaked fds: {sorted(leaked.values())}"
    assert len(engine) == len(leaked), f"leaked fds: {sorted(leaked.values())}"
    assert conftest._children() - kids == set(), "leaked child processes"
    assert conftest._plugin_cgroups() - groups == set(), "plugin cgroups left behind"
    assert conftest._mounts() == mounts, "mounts changed"


MANIFEST = """\
[plugin]
id = "acme.kv"
version = "1.0.0"
type = "external"
protocol = "grpc"
entrypoint = "{entrypoint}"

[grpc]
proto = ["{proto}"]
service = "proto.KV"

[grpc.handshake]
protocol_version = {version}
magic_cookie_key = "BASIC_PLUGIN"
magic_cookie_value = "{cookie}"
"""


@pytest.fixture(scope="module")
def kv_go(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from grpc_build import ToolchainMissing, build_kv_go

    built = tmp_path_factory.mktemp("kv-go")
    try:
        build_kv_go(built)
    except ToolchainMissing as exc:
        if IN_CI:
            raise
        pytest.skip(str(exc))
    subprocess.run(
        ["protoc", "--include_imports", "--descriptor_set_out=kv.pb", "kv.proto"],
        cwd=built,
        check=True,
    )
    return built


def plugin_dir(
    tmp_path: Path,
    kv_go: Path,
    *,
    script: str | None = None,
    cookie: str = "hello",
    version: int = 1,
    proto: str = "kv.proto",
) -> Path:
    root = tmp_path / "kv"
    root.mkdir()
    for name in ("kv.proto", "kv.pb"):
        (root / name).write_bytes((kv_go / name).read_bytes())
    if script is None:
        entry = "kv-go-grpc"
        (root / entry).write_bytes((kv_go / entry).read_bytes())
    else:
        entry = "plugin.sh"
        (root / entry).write_text("#!/bin/sh\n" + script)
    os.chmod(root / entry, 0o755)
    (root / "plugin.toml").write_text(
        MANIFEST.format(entrypoint=entry, version=version, cookie=cookie, proto=proto)
    )
    return root


@pytest.mark.parametrize("proto", ["kv.proto", "kv.pb"])
async def test_an_unmodified_go_plugin_answers_sandboxed(
    tmp_path: Path, kv_go: Path, proto: str
) -> None:
    """Its manifest as the README writes it: the .proto file (compiled in a sandbox at load),
    or a descriptor set made from it."""
    async with PluginManager() as mgr:
        p = await mgr.load(plugin_dir(tmp_path, kv_go, proto=proto))
        assert p.sandbox is not None and p.sandbox.enabled
        assert p.handle.methods == ("Get", "Put")
        assert await p.call("Put", {"key": "a", "value": "aGk="}) == {}
        assert await p.call("Get", {"key": "a"}) == {"value": "aGk="}
        with pytest.raises(PluginCallError, match='UNKNOWN: no value for key "missing"') as caught:
            await p.call("Get", {"key": "missing"})  # the example's own error, its gRPC status
        assert caught.value.code == 2 and caught.value.data == {"grpc_status": "UNKNOWN"}
        assert (await p.handle.health()).ok
        with pytest.raises(PluginCallError, match='no field named "nope"'):
            await p.call("Get", {"nope": 1})
        await mgr.unload(p.id)


async def test_a_plugin_that_dies_fails_with_plugin_crashed(tmp_path: Path, kv_go: Path) -> None:
    async with PluginManager() as mgr:
        p = await mgr.load(plugin_dir(tmp_path, kv_go))
        os.kill(p.handle.pid, signal.SIGKILL)
        async with asyncio.timeout(10):
            while p.state is not PluginState.FAILED:
                await asyncio.sleep(0.02)
        assert isinstance(p.error, PluginCrashed)
        with pytest.raises(PluginStateError):
            await p.call("Get", {"key": "a"})


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"cookie": "wrong"}, "This binary is a plugin"),  # go-plugin's own refusal, on stderr
        ({"version": 2}, "app protocol version is '1', but the manifest's"),
        ({"script": "echo hello; sleep 5"}, "not a go-plugin handshake"),
        ({"script": "echo '1|1|tcp|10.1.2.3:1234|grpc'; sleep 5"}, "not a loopback address"),
        ({"script": "echo '1|1|unix|/etc/passwd|grpc'; sleep 5"}, "not directly in"),
        ({"script": 'echo "1|1|unix|$TMPDIR/none|grpc|"; sleep 5'}, "cannot be opened"),
        ({"script": 'touch "$TMPDIR/f"; echo "1|1|unix|$TMPDIR/f|grpc|"; sleep 5'}, "not a socket"),
        (
            # a link out of its directory is never followed: the link itself is no socket
            {
                "script": 'ln -s /run/systemd/private "$TMPDIR/l"; echo "1|1|unix|$TMPDIR/l|grpc"; sleep 5'
            },
            "not a socket",
        ),
        ({"script": "exit 3"}, "exited before its handshake"),
    ],
)
async def test_a_bad_handshake_is_a_named_error(
    tmp_path: Path, kv_go: Path, options: dict[str, object], says: str
) -> None:
    async with PluginManager() as mgr:
        with pytest.raises(HandshakeError, match="plugin acme.kv") as caught:
            await mgr.load(plugin_dir(tmp_path, kv_go, **options))  # type: ignore[arg-type]
        assert says in str(caught.value)
        assert await mgr.list() == []


async def test_silence_and_a_plugin_that_never_serves_time_out(tmp_path: Path, kv_go: Path) -> None:
    async with PluginManager(config=HostConfig(handshake_timeout=1.0)) as mgr:
        with pytest.raises(HandshakeError, match="printed no go-plugin handshake line within 1s"):
            await mgr.load(plugin_dir(tmp_path, kv_go, script="sleep 30"))
    script = (
        'python3 -c "import socket,os,time; s=socket.socket(socket.AF_UNIX); '
        "s.bind(os.environ['TMPDIR']+'/mute'); s.listen(); "
        "print('1|1|unix|'+os.environ['TMPDIR']+'/mute|grpc|', flush=True); time.sleep(30)\""
    )
    (tmp_path / "second").mkdir()
    async with PluginManager(config=HostConfig(handshake_timeout=2.0)) as mgr:
        with pytest.raises(HandshakeError, match='health check of service "plugin" never answered'):
            await mgr.load(plugin_dir(tmp_path / "second", kv_go, script=script))


@pytest.fixture(scope="module")
def kv_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from grpc_build import ToolchainMissing, kv_python

    built = tmp_path_factory.mktemp("kv-py") / "kvpy"
    try:
        kv_python(built)
    except ToolchainMissing as exc:
        if IN_CI:
            raise
        pytest.skip(str(exc))
    return built


async def test_python_plugins_on_their_own_port_1234_sandboxed(kv_python: Path) -> None:
    """go-plugin's Python guide: grpcio on 127.0.0.1:1234. Two copies at once, each on the
    loopback of its own network namespace, and nothing on the host's."""
    import socket

    async with PluginManager() as mgr:
        one = await mgr.load(kv_python)
        second = kv_python.parent / "second"
        if not second.exists():
            import shutil

            shutil.copytree(kv_python, second)
            manifest = second / "plugin.toml"
            manifest.write_text(manifest.read_text().replace("acme.kvpy", "acme.kvpy2"))
        two = await mgr.load(second)
        await one.call("Put", {"key": "k", "value": "b25l"})
        await two.call("Put", {"key": "k", "value": "dHdv"})
        assert await one.call("Get", {"key": "k"}) == {"value": "b25l"}
        assert await two.call("Get", {"key": "k"}) == {"value": "dHdv"}
        with pytest.raises(PluginCallError, match="NOT_FOUND") as caught:
            await one.call("Get", {"key": "absent"})
        assert caught.value.data == {"grpc_status": "NOT_FOUND"}
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", 1234), timeout=1).close()


async def test_no_fd_grows_with_use(tmp_path: Path, kv_go: Path) -> None:
    """Loads, calls, failed calls, health checks, crashes and unloads, many times over (the
    first load cold, the others warm): after the first rounds the process's fds are the same
    in number every round."""
    counts = []
    async with PluginManager() as mgr:
        for round_ in range(6):
            (tmp_path / str(round_)).mkdir()
            p = await mgr.load(plugin_dir(tmp_path / str(round_), kv_go))
            await p.call("Put", {"key": "a", "value": "aGk="})
            assert await p.call("Get", {"key": "a"}) == {"value": "aGk="}
            with pytest.raises(PluginCallError):
                await p.call("Get", {"key": "missing"})
            assert (await p.handle.health()).ok
            if round_ % 2:
                os.kill(p.handle.pid, signal.SIGKILL)
                async with asyncio.timeout(10):
                    while p.state is not PluginState.FAILED:
                        await asyncio.sleep(0.02)
            await mgr.unload(p.id)
            if mgr.warm_pool is not None:  # its waiting sandboxes hold fds too: a full pool
                await mgr.warm_pool.filled()
            counts.append(len(conftest._open_fds()))
    assert len(set(counts[2:])) == 1, f"fds after each round: {counts}"


async def test_typed_stubs_through_grpc_channel_and_a_hot_reload(
    tmp_path: Path, kv_go: Path
) -> None:
    """A Python host with generated messages uses the channel to the current generation; a
    reload starts a fresh process (go-plugin has no state hooks), and the new channel works."""
    root = plugin_dir(tmp_path, kv_go)
    subprocess.run(["protoc", f"--python_out={tmp_path}", "kv.proto"], cwd=kv_go, check=True)
    import importlib.util

    spec = importlib.util.spec_from_file_location("kv_pb2_for_test", tmp_path / "kv_pb2.py")
    assert spec is not None and spec.loader is not None
    kv_pb2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kv_pb2)
    async with PluginManager() as mgr:
        p = await mgr.load(root)
        channel = p.grpc_channel()
        put = channel.unary_unary(
            "/proto.KV/Put",
            request_serializer=kv_pb2.PutRequest.SerializeToString,
            response_deserializer=kv_pb2.Empty.FromString,
        )
        get = channel.unary_unary(
            "/proto.KV/Get",
            request_serializer=kv_pb2.GetRequest.SerializeToString,
            response_deserializer=kv_pb2.GetResponse.FromString,
        )
        await put(kv_pb2.PutRequest(key="typed", value=b"stub"))
        assert (await get(kv_pb2.GetRequest(key="typed"))).value == b"stub"
        assert await p.call("Get", {"key": "typed"}) == {"value": "c3R1Yg=="}
        first = p.handle.pid
        (root / "plugin.toml").write_text(
            (root / "plugin.toml").read_text().replace('version = "1.0.0"', 'version = "1.1.0"')
        )
        await mgr.reload(p.id)
        assert p.generation == 2 and p.handle.pid != first
        with pytest.raises(PluginCallError, match="no value for key"):
            await p.call("Get", {"key": "typed"})  # a fresh process: nothing migrated
        await p.call("Put", {"key": "k", "value": "AA=="})
        assert p.grpc_channel() is not channel
    async with PluginManager() as mgr:
        with pytest.raises(PluginStateError, match="no gRPC channel"):
            (await mgr.load(_jsonrpc_plugin(tmp_path))).grpc_channel()


def _jsonrpc_plugin(tmp_path: Path) -> Path:
    root = tmp_path / "plain"
    root.mkdir()
    (root / "plugin.py").write_text("def hello():\n    return 'hi'\n")
    (root / "plugin.toml").write_text(
        '[plugin]\nid = "acme.plain"\nversion = "1.0.0"\ntype = "python"\nentrypoint = "plugin.py"\n'
    )
    return root


def test_the_cli_calls_a_go_plugin(tmp_path: Path, kv_go: Path) -> None:
    import json
    import sys

    root = plugin_dir(tmp_path, kv_go)
    run = subprocess.run(
        [sys.executable, "-m", "sandboxer.cli", "call", "--json", str(root), "Get", '{"key": "x"}'],
        capture_output=True,
        text=True,
        timeout=60,
    )
    doc = json.loads(run.stdout)
    assert run.returncode == 1, run.stderr
    assert (
        doc["error"]["type"] == "PluginCallError" and "no value for key" in doc["error"]["message"]
    )
    inspect = subprocess.run(
        [sys.executable, "-m", "sandboxer.cli", "inspect", "--json", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert inspect.returncode == 0, inspect.stderr
    shown = json.loads(inspect.stdout)
    assert (
        shown["plugin"]["protocol"] == "grpc" and shown["plugin"]["grpc"]["service"] == "proto.KV"
    )


# A gRPC plugin as a stranger writes it from go-plugin's handshake description alone: grpcio
# with raw bytes (no generated code), health SERVING, and a Get that dies on the key "die".
DYING_PLUGIN = """\
#!/usr/bin/python3
import os, sys, time
from concurrent import futures
import grpc

def get(request, context):
    if b"slow" in request:
        time.sleep(5)
    if b"die" in request:
        sys.stderr.write("dying in the middle of Get\\n")
        sys.stderr.flush()
        os._exit(3)
    return b""

def check(request, context):
    return b"\\x08\\x01"  # HealthCheckResponse{status: SERVING}

raw = dict(request_deserializer=None, response_serializer=None)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers([
    grpc.method_handlers_generic_handler("proto.KV", {"Get": grpc.unary_unary_rpc_method_handler(get, **raw)}),
    grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check, **raw)}),
])
server.add_insecure_port("127.0.0.1:1234")
server.start()
print("1|1|tcp|127.0.0.1:1234|grpc", flush=True)
server.wait_for_termination()
"""


async def test_a_plugin_that_dies_mid_call_is_plugin_crashed(tmp_path: Path, kv_go: Path) -> None:
    root = plugin_dir(tmp_path, kv_go, script="")
    (root / "plugin.sh").write_text(DYING_PLUGIN)
    async with PluginManager() as mgr:
        p = await mgr.load(root)
        assert await p.call("Get", {"key": "fine"}) == {}
        with pytest.raises(PluginCrashed, match="exit status 3|exited with status 3") as caught:
            await p.call("Get", {"key": "die"})
        assert "dying in the middle of Get" in caught.value.stderr_tail


async def test_a_go_plugin_from_the_signed_registry(tmp_path: Path, kv_go: Path) -> None:
    """Published, fetched, verified and loaded like any plugin: the proto file travels with it
    and is compiled at load from the fetched copy."""
    from sandboxer import _minisign
    from sandboxer.registry import publish

    public, secret = _minisign.generate_keypair()
    registry = tmp_path / "registry"
    publish(plugin_dir(tmp_path, kv_go), registry, secret)
    pub = tmp_path / "trusted.pub"
    pub.write_text(public.to_file_text())
    host = HostConfig(
        registry=str(registry), trusted_keys=(str(pub),), cache_dir=str(tmp_path / "cache")
    )
    async with PluginManager(host) as mgr:
        p = await mgr.load_from_registry("acme.kv", "^1")
        assert p.plugin.root.is_relative_to(tmp_path / "cache")
        await p.call("Put", {"key": "r", "value": "cmVn"})
        assert await p.call("Get", {"key": "r"}) == {"value": "cmVn"}


async def test_a_call_past_its_timeout_is_call_timeout(tmp_path: Path, kv_go: Path) -> None:
    """The per-call timeout is the gRPC deadline: the call ends on time with CallTimeout, and
    the plugin keeps serving."""
    import time

    root = plugin_dir(tmp_path, kv_go, script="")
    (root / "plugin.sh").write_text(DYING_PLUGIN)
    async with PluginManager() as mgr:
        p = await mgr.load(root)
        started = time.monotonic()
        with pytest.raises(CallTimeout, match="did not answer within 0.5s") as caught:
            await p.call("Get", {"key": "slow"}, timeout=0.5)
        assert time.monotonic() - started < 2.5 and caught.value.timeout == 0.5
        assert await p.call("Get", {"key": "fine"}) == {}


def test_discovery_sees_a_go_plugin(tmp_path: Path, kv_go: Path) -> None:
    from sandboxer.discovery import DiscoveredPlugin, scan

    root = plugin_dir(tmp_path, kv_go)
    (found,) = scan([tmp_path])
    assert isinstance(found, DiscoveredPlugin) and found.path == root
    assert found.manifest.protocol.value == "grpc" and found.manifest.grpc is not None
    assert found.manifest.grpc.service == "proto.KV"


# A gRPC plugin as a stranger writes it: grpcio with raw bytes on a Unix socket in the
# directory go-plugin names, leaving a file of its own there; Get answers with what it sees
# in that directory.
LOOKING_PLUGIN = """\
#!/usr/bin/python3
import os
from concurrent import futures
import grpc

here = os.environ["PLUGIN_UNIX_SOCKET_DIR"]
with open(os.path.join(here, "left-by-" + os.urandom(8).hex()), "w") as f:
    f.write("secret")

def get(request, context):
    names = ",".join(sorted(os.listdir(here))).encode()
    return b"\\x0a" + bytes([len(names)]) + names  # GetResponse{value}

def check(request, context):
    return b"\\x08\\x01"  # HealthCheckResponse{status: SERVING}

def shutdown(request, context):
    os._exit(0)

raw = dict(request_deserializer=None, response_serializer=None)
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
server.add_generic_rpc_handlers([
    grpc.method_handlers_generic_handler("proto.KV", {"Get": grpc.unary_unary_rpc_method_handler(get, **raw)}),
    grpc.method_handlers_generic_handler("grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check, **raw)}),
    grpc.method_handlers_generic_handler("plugin.GRPCController", {"Shutdown": grpc.unary_unary_rpc_method_handler(shutdown, **raw)}),
])
path = os.path.join(here, "plugin.sock")
server.add_insecure_port("unix:" + path)
server.start()
print("1|1|unix|%s|grpc" % path, flush=True)
server.wait_for_termination()
"""


def _scratch_dirs() -> set[str]:
    import tempfile

    return {p.name for p in Path(tempfile.gettempdir()).glob("sandboxer-scratch-*")}


async def test_grpc_plugins_start_warm_each_in_a_socket_directory_of_its_own(
    tmp_path: Path, kv_go: Path
) -> None:
    """The first load of a shape starts cold and teaches the pool the shape; the next ones
    take sandboxes made ahead, each with a fresh socket directory: a stranger's plugin sees
    only what it put there, never what the plugin before it left in its own."""
    import base64

    scratch_before = _scratch_dirs()
    roots = []
    for name in ("a", "b", "c", "go"):
        (tmp_path / name).mkdir()
    for name in ("a", "b", "c"):
        root = plugin_dir(tmp_path / name, kv_go, script="")
        (root / "plugin.sh").write_text(LOOKING_PLUGIN)
        manifest = root / "plugin.toml"
        manifest.write_text(manifest.read_text().replace("acme.kv", f"acme.kv{name}"))
        roots.append(root)
    go_root = plugin_dir(tmp_path / "go", kv_go)
    async with PluginManager(config=HostConfig(warm_sandboxes=1)) as mgr:
        first = await mgr.load(roots[0])
        assert not first.started_warm
        pool = mgr.warm_pool
        assert pool is not None
        await pool.filled()
        seen = []
        for root in roots[1:]:
            p = await mgr.load(root)
            assert p.started_warm
            listing = base64.b64decode((await p.call("Get", {"key": "x"}))["value"]).decode()
            seen.append(listing.split(","))
            await pool.filled()
        for names in seen:
            assert sorted(names)[1] == "plugin.sock" and len(names) == 2, names
        assert seen[0][0] != seen[1][0]  # each its own file, nobody else's
        # go-plugin's own KV example, warm in a sandbox of the same shape
        kv = await mgr.load(go_root)
        assert kv.started_warm
        assert await kv.call("Put", {"key": "a", "value": "aGk="}) == {}
        assert await kv.call("Get", {"key": "a"}) == {"value": "aGk="}
        await pool.filled()
        assert len(_scratch_dirs() - scratch_before) == 4 + 1  # four plugins, one waiting
        for plugin_id in ["acme.kva", "acme.kvb", "acme.kvc", "acme.kv"]:
            await mgr.unload(plugin_id)
    assert _scratch_dirs() == scratch_before  # each sandbox's directory went with it
