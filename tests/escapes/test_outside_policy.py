"""Escapes from outside the policy: what a plugin's own files ask for, and what two
supervisors share. The other probes run inside the sandbox they were given; these check that
a manifest cannot widen that sandbox (network, limits, profile), that two supervisors never
hand out one host uid, and that the namespace's PID 1 gives the plugin nothing to take.

Each was an escape before issue 16: a manifest listing 127.0.0.1 and 0.0.0.0/0 reached a
server on the host's loopback; a manifest got 64 GiB, 1,024 CPUs and a week's timeout (for
wasm, on the supervisor's own process); ``profile = "default"`` escaped a strict host; two
``sandboxer exec`` ran as the same host uid; ``kill -INT 1`` killed PID 1 with a traceback.
"""

from __future__ import annotations

import http.server
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Iterator

import pytest
import wasmtime

from sandboxer import HostConfig, PluginLoadError, PluginManager

ADD_WAT = """(module (func (export "add") (param i32 i32) (result i32)
                 local.get 0 local.get 1 i32.add))"""

pytestmark = [pytest.mark.usefixtures("no_leaks")]


class _Counting(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).hits += 1
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"the host's loopback")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def loopback_server() -> Iterator[tuple[int, type[_Counting]]]:
    handler = type("Handler", (_Counting,), {"hits": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _plugin(root: Path, sandbox: str, code: str = "def ping():\n    return 'pong'\n") -> Path:
    root.mkdir(parents=True)
    (root / "plugin.py").write_text(code)
    (root / "plugin.toml").write_text(textwrap.dedent("""\
        [plugin]
        id = "outsider.widen"
        version = "1.0.0"
        type = "python"
        entrypoint = "plugin.py"

        [sandbox]
        """) + textwrap.dedent(sandbox))
    return root


FETCH = textwrap.dedent("""\
    import os, urllib.request

    def get(url):
        proxies = {"http": os.environ.get("HTTP_PROXY", "")}
        opener = urllib.request.build_opener(urllib.request.ProxyHandler(proxies))
        with opener.open(url, timeout=5) as reply:
            return reply.read().decode()
    """)


@pytest.mark.asyncio
@pytest.mark.parametrize("hosts", [["127.0.0.1", "0.0.0.0/0"], ["0.0.0.0/0"], ["127.0.0.0/8"]])
async def test_a_manifest_cannot_grant_itself_the_network(
        tmp_path: Path, loopback_server: tuple[int, type[_Counting]], hosts: list[str]) -> None:
    port, handler = loopback_server
    root = _plugin(tmp_path / "net", f"network_allowed = true\nallowed_hosts = {hosts!r}\n"
                   .replace("'", '"'), FETCH)
    async with PluginManager(config=HostConfig()) as mgr:
        try:
            plugin = await mgr.load(root)
        except PluginLoadError as exc:
            assert "allowed_hosts" in str(exc) and "host policy does not allow" in str(exc)
        else:
            reached = await plugin.call("get", f"http://127.0.0.1:{port}/")
            pytest.fail(f"a manifest listing {hosts} loaded with no host config and reached "
                        f"the host's loopback server: {reached!r}")
    assert handler.hits == 0


@pytest.mark.asyncio
@pytest.mark.parametrize(("kind", "request_", "field"), [
    ("python", 'memory_limit = "64GiB"', "memory_limit"),
    ("python", "cpu_limit = 1024", "cpu_limit"),
    ("python", 'timeout = "168h"', "timeout"),
    ("wasm", 'memory_limit = "64GiB"', "memory_limit"),
    ("wasm", 'timeout = "168h"', "timeout"),
])
async def test_a_manifest_cannot_raise_its_own_limits(tmp_path: Path, kind: str, request_: str,
                                                      field: str) -> None:
    if kind == "python":
        root = _plugin(tmp_path / "big", request_ + "\n")
    else:
        root = tmp_path / "big"
        root.mkdir()
        (root / "plugin.wasm").write_bytes(wasmtime.wat2wasm(ADD_WAT))
        (root / "plugin.toml").write_text(
            '[plugin]\nid = "outsider.big"\nversion = "1.0.0"\ntype = "wasm"\n'
            f'entrypoint = "plugin.wasm"\n\n[sandbox]\n{request_}\n')
    async with PluginManager(config=HostConfig()) as mgr:
        try:
            plugin = await mgr.load(root)
        except PluginLoadError as exc:
            assert f"asks for {field} = " in str(exc) and "ceiling" in str(exc)
        else:
            got = plugin.sandbox.to_json()  # type: ignore[union-attr]
            pytest.fail(f"with no host config the manifest's {request_} was granted: {got}")


@pytest.mark.asyncio
async def test_a_manifest_cannot_leave_a_strict_host_for_the_default_profile(
        tmp_path: Path) -> None:
    root = _plugin(tmp_path / "wide", 'profile = "default"\n')
    async with PluginManager(config=HostConfig(default_profile="strict")) as mgr:
        try:
            plugin = await mgr.load(root)
        except PluginLoadError as exc:
            assert "allowed_profiles" in str(exc)
        else:
            pytest.fail(f"profile = \"default\" escaped the strict host: "
                        f"{plugin.sandbox.profile}")  # type: ignore[union-attr]


def _exec(*argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "sandboxer.cli", "exec", "--", *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.skipif(__import__("os").geteuid() != 0, reason="host uids are allocated rootful")
def test_two_supervisors_never_share_a_host_uid() -> None:
    """Each ``sandboxer exec`` is its own supervisor; running at once they must map to two
    host uids (their files and RLIMIT_NPROC would be shared otherwise)."""
    script = "cat /proc/self/uid_map; sleep 2"
    runs = [_exec("/bin/sh", "-c", script) for _ in range(3)]
    outputs = [run.communicate(timeout=60) for run in runs]
    for run, (out, err) in zip(runs, outputs):
        assert run.returncode == 0, err
    host_uids = [int(out.split()[1]) for out, _ in outputs]
    assert len(set(host_uids)) == 3, f"supervisors running at once shared host uids: {host_uids}"


def test_pid1_gives_the_plugin_nothing() -> None:
    """The plugin signals PID 1 with everything it may send; PID 1 survives silently, and it
    holds no capability the plugin could take over (ptrace is denied, but a PID 1 with
    capabilities is one bug away)."""
    script = ("for s in INT TERM HUP QUIT USR1 USR2 PIPE ALRM TSTP CHLD; do kill -$s 1; done; "
              "sleep 0.3; grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs)' "
              "/proc/1/status; echo still-here")
    run = _exec("/bin/sh", "-c", script)
    out, err = run.communicate(timeout=60)
    assert run.returncode == 0, (out, err)
    assert out.rstrip().endswith("still-here"), out
    status = dict(line.split(":\t") for line in out.splitlines() if ":\t" in line)
    for field in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert status[field] == "0000000000000000", f"PID 1 {field}: {status[field]}"
    assert status["NoNewPrivs"] == "1"
    assert "Traceback" not in err and "launcher.py" not in err, err
