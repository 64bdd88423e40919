"""``sandboxer serve`` (issue 21): the daemon, its tenants, ordinary users calling it.

The daemon runs as root in a child process, started as a unit would start it
(``sandboxer serve --socket S --config C``, readiness by sd_notify over $NOTIFY_SOCKET). Its
clients are other processes running as uids 1001 (tenant alice), 1002 (tenant bob) and 1003
(no tenant), through the CLI or ``sandboxer.connect`` exactly as the README shows. Plugins
are what a stranger writes: the README's hello, a bare .py file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sandboxer.sandbox import cgroups

pytestmark = pytest.mark.usefixtures("no_leaks")

REPO = Path(__file__).resolve().parents[2]
ALICE, BOB, STRANGER = 1001, 1002, 1003

HELLO = """\
def greet(name):
    return f"Hello, {name}!"

def whoami():
    import os
    return {"uid": os.getuid(), "cwd_files": sorted(os.listdir("/plugin"))}
"""


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    socket: str
    root: Path  # the tenants' directories: root/alice, root/bob
    log: Path

    def as_user(
        self, uid: int, *argv: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``sandboxer ARGV`` run as ``uid`` (its gid the same, no other group)."""
        return subprocess.run(
            [sys.executable, "-m", "sandboxer.cli", *argv],
            user=uid,
            group=uid,
            extra_groups=[],
            env={"PATH": "/usr/bin:/bin", "SANDBOXER_SOCKET": self.socket, **(env or {})},
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def client(self, uid: int, script: str) -> subprocess.CompletedProcess[str]:
        """A Python program using ``sandboxer.connect``, run as ``uid``; its stdout."""
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)],
            user=uid,
            group=uid,
            extra_groups=[],
            env={"PATH": "/usr/bin:/bin", "SANDBOXER_SOCKET": self.socket,
                 "PYTHONPATH": str(REPO)},
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )


def _plugin(directory: Path, owner: int, plugin_id: str = "acme.hello") -> Path:
    directory.mkdir(parents=True)
    (directory / "hello.py").write_text(HELLO)
    (directory / "plugin.toml").write_text(
        f'[plugin]\nid = "{plugin_id}"\nversion = "1.0.0"\ntype = "python"\n'
        'entrypoint = "hello.py"\n'
    )
    for path in (directory, *directory.iterdir()):
        os.chown(path, owner, owner)
    return directory


def _theirs(pid: int) -> list[Path]:
    return sorted(g for home in cgroups.detect().homes() for g in Path(home).glob(f"sandboxer-{pid}-*"))


@pytest.fixture
def served() -> Iterator[Served]:
    root = Path(tempfile.mkdtemp(prefix="sandboxer-tenants-"))
    root.chmod(0o755)
    for name, uid in (("alice", ALICE), ("bob", BOB)):
        (root / name).mkdir()
        os.chown(root / name, uid, uid)
    from sandboxer import _minisign
    from sandboxer.registry import publish

    public, secret = _minisign.generate_keypair()
    (root / "trusted.pub").write_text(public.to_file_text())
    published = _plugin(root / "published" / "hello", 0, plugin_id="acme.published")
    publish(published, root / "registry", secret)
    config = root / "sandboxer.toml"
    config.write_text(textwrap.dedent(f"""\
        [host]
        registry = "{root}/registry"
        trusted_keys = ["{root}/trusted.pub"]
        cache_dir = "{root}/cache"

        [tenants.alice]
        uids = [{ALICE}]
        path_roots = ["{root}/alice"]
        max_plugins = 3

        [tenants.bob]
        uids = [{BOB}]
        path_roots = ["{root}/bob"]
        max_memory = "300MiB"
        """))
    sock = str(root / "sandboxer.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(root / "notify"))
    notify.settimeout(60)
    log = root / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandboxer.cli", "serve", "--socket", sock, "--config",
             str(config)],
            env={**os.environ, "NOTIFY_SOCKET": str(root / "notify")},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO,
        )
    served = Served(proc, sock, root, log)
    try:
        ready = notify.recv(256)
        assert ready == b"READY=1", ready
        yield served
    finally:
        notify.close()
        proc = served.proc  # a test may have started another in its place
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)
    assert proc.returncode == 0, log.read_text() if log.exists() else ""
    assert _theirs(proc.pid) == []  # every plugin's cgroup gone with the drain


def test_an_ordinary_user_calls_through_the_daemon_as_the_readme_shows(served: Served) -> None:
    _plugin(served.root / "alice" / "hello", ALICE)
    run = served.as_user(ALICE, "call", str(served.root / "alice" / "hello"), "greet", "alice")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "Hello, alice!"
    # its sandbox is an ordinary one: another uid inside, the plugin's files copied
    run = served.as_user(ALICE, "call", "--json", str(served.root / "alice" / "hello"), "whoami")
    doc = json.loads(run.stdout)
    assert doc["ok"] and doc["result"]["cwd_files"] == ["hello.py", "plugin.toml"]
    assert doc["result"]["uid"] != ALICE
    audit = served.log.read_text()
    assert f"load uid={ALICE}" in audit and "tenant=alice plugin=acme.hello" in audit


def test_who_is_in_no_tenant_is_refused(served: Served) -> None:
    _plugin(served.root / "alice" / "hello", ALICE)
    run = served.as_user(STRANGER, "call", str(served.root / "alice" / "hello"), "greet", "x")
    assert run.returncode == 2
    assert f"uid {STRANGER} belongs to no tenant" in run.stderr
    assert f"refused uid={STRANGER}" in served.log.read_text()


def test_tenants_see_only_their_own_plugins_with_the_same_ids(served: Served) -> None:
    _plugin(served.root / "alice" / "hello", ALICE)
    _plugin(served.root / "bob" / "hello", BOB)
    keep = """\
        import asyncio, json, sandboxer
        async def main():
            async with await sandboxer.connect() as d:
                p = await d.load("{path}")
                print(json.dumps({{"id": p.id, "greet": await p.call("greet", "{who}"),
                                  "list": [x["id"] + "@" + x["tenant"] for x in await d.list()]}}))
        asyncio.run(main())
    """
    alice = served.client(ALICE, keep.format(path=served.root / "alice" / "hello", who="a"))
    assert alice.returncode == 0, alice.stderr
    bob = served.client(BOB, keep.format(path=served.root / "bob" / "hello", who="b"))
    assert bob.returncode == 0, bob.stderr
    assert json.loads(alice.stdout) == {
        "id": "acme.hello", "greet": "Hello, a!", "list": ["acme.hello@alice"]}
    assert json.loads(bob.stdout) == {
        "id": "acme.hello", "greet": "Hello, b!", "list": ["acme.hello@bob"]}
    # alice cannot call, reload or unload bob's, nor name his tenant
    meddle = """\
        import asyncio, sandboxer
        async def main():
            async with await sandboxer.connect() as d:
                for verb in ("unload", "reload", "restart", "stats"):
                    try:
                        await getattr(d, verb)("acme.hello")
                        print(verb, "worked")
                    except sandboxer.SandboxerError as exc:
                        print(verb, type(exc).__name__)
                try:
                    await d._request("list", {"tenant": "bob"})
                except sandboxer.SandboxerError as exc:
                    print("tenant", exc)
        asyncio.run(main())
    """
    run = served.client(ALICE, meddle)
    assert run.returncode == 0, run.stderr
    # her own acme.hello is the one she unloads first; bob's is never reachable
    lines = run.stdout.splitlines()
    assert lines[0] == "unload worked"
    assert lines[1:4] == ["reload PluginNotFound", "restart PluginNotFound", "stats PluginNotFound"]
    assert "only the administrator names a tenant" in lines[4]
    bob_again = served.client(BOB, """\
        import asyncio, sandboxer
        async def main():
            async with await sandboxer.connect() as d:
                print(await d.call("acme.hello", "greet", "still"))
        asyncio.run(main())
    """)
    assert bob_again.stdout.strip() == "Hello, still!", bob_again.stderr


def test_paths_outside_the_tenants_roots_are_refused(served: Served) -> None:
    bobs = _plugin(served.root / "bob" / "hello", BOB)
    for path in (bobs, served.root / "alice" / ".." / "bob" / "hello", REPO / "examples" / "hello"):
        run = served.as_user(ALICE, "call", str(path), "greet", "x")
        assert run.returncode == 2, run.stdout
        assert "not under the path_roots of tenant alice" in run.stderr, run.stderr
    run = served.as_user(ALICE, "call", "examples/hello", "greet", "x")  # relative: made absolute
    assert run.returncode == 2


def test_quotas_hold(served: Served) -> None:
    for n in range(4):
        _plugin(served.root / "alice" / f"p{n}", ALICE, plugin_id=f"acme.p{n}")
    _plugin(served.root / "bob" / "big", BOB, plugin_id="acme.big")
    toml = served.root / "bob" / "big" / "plugin.toml"
    toml.write_text(toml.read_text() + '\n[sandbox]\nmemory_limit = "256MiB"\n')
    _plugin(served.root / "bob" / "second", BOB, plugin_id="acme.second")
    toml = served.root / "bob" / "second" / "plugin.toml"
    toml.write_text(toml.read_text() + '\n[sandbox]\nmemory_limit = "128MiB"\n')
    run = served.client(ALICE, f"""\
        import asyncio, sandboxer
        async def main():
            async with await sandboxer.connect() as d:
                for n in range(4):
                    try:
                        await d.load("{served.root}/alice/p%d" % n)
                        print("loaded", n)
                    except sandboxer.SandboxerError as exc:
                        print("refused", n, exc)
        asyncio.run(main())
    """)
    assert run.stdout.splitlines()[:3] == ["loaded 0", "loaded 1", "loaded 2"], run.stderr
    assert "max_plugins" in run.stdout.splitlines()[3]
    run = served.client(BOB, f"""\
        import asyncio, sandboxer
        async def main():
            async with await sandboxer.connect() as d:
                await d.load("{served.root}/bob/big")
                try:
                    await d.load("{served.root}/bob/second")
                except sandboxer.SandboxerError as exc:
                    print("refused", exc)
        asyncio.run(main())
    """)
    assert "over its max_memory" in run.stdout, run.stderr
    # nor can a reload raise a running plugin's limit past the tenant's cap
    toml = served.root / "bob" / "big" / "plugin.toml"
    steps = f"""\
        import asyncio, sandboxer
        async def main():
            async with await sandboxer.connect() as d:
                for step in ("reload", "load", "reload"):
                    try:
                        if step == "load":
                            await d.load("{served.root}/bob/second")
                        else:
                            await d.reload("acme.big")
                        print(step, "ok", (await d.stats("acme.big"))["generation"])
                    except sandboxer.SandboxerError as exc:
                        print(step, "refused", exc)
                    # the third step's files: big back at 256MiB, now 256 + 128 > 300
                    path = "{toml}"
                    text = open(path).read()
                    open(path, "w").write(text.replace('"128MiB"', '"256MiB"'))
        asyncio.run(main())
    """
    toml.write_text(toml.read_text().replace('"256MiB"', '"128MiB"'))
    os.chown(toml, BOB, BOB)
    run = served.client(BOB, steps)
    lines = run.stdout.splitlines()
    assert lines[0] == "reload ok 2" and lines[1] == "load ok 2", run.stdout + run.stderr
    assert lines[2].startswith("reload refused") and "over its max_memory" in lines[2]
    run = served.client(BOB, """\
        import asyncio, sandboxer
        async def main():
            async with await sandboxer.connect() as d:
                print((await d.stats("acme.big"))["generation"])
        asyncio.run(main())
    """)
    assert run.stdout.strip() == "2"  # the refused reload left generation 2 serving


def test_garbage_and_oversized_frames_cut_only_that_client(served: Served) -> None:
    _plugin(served.root / "alice" / "hello", ALICE)
    run = served.client(ALICE, f"""\
        import asyncio, json, socket, sandboxer
        async def main():
            async with await sandboxer.connect() as d:
                p = await d.load("{served.root}/alice/hello")
                bad = socket.socket(socket.AF_UNIX)
                bad.connect("{served.socket}")
                bad.sendall(b"this is not json\\n")
                print(json.loads(bad.recv(4096))["error"]["code"])
                reply = b""
                try:
                    bad.sendall(b"x" * (17 << 20))  # the daemon stops reading at 16 MiB
                    while b"\\n" not in reply:
                        chunk = bad.recv(4096)
                        if not chunk:
                            break
                        reply += chunk
                    print(json.loads(reply)["error"]["message"][:20])
                    print(bad.recv(4096) == b"")
                except (BrokenPipeError, ConnectionResetError):
                    print("more than 16777216 b")  # cut while it was still sending
                    print(True)
                print(await p.call("greet", "after"))
        asyncio.run(main())
    """)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "-32700", "more than 16777216 b", "True", "Hello, after!"], run.stdout


def test_sigterm_drains_and_unloads_everything(served: Served) -> None:
    _plugin(served.root / "alice" / "hello", ALICE)
    run = served.client(ALICE, f"""\
        import asyncio, sandboxer
        async def main():
            async with await sandboxer.connect() as d:
                await d.load("{served.root}/alice/hello")
        asyncio.run(main())
    """)
    assert run.returncode == 0, run.stderr
    assert _theirs(served.proc.pid)  # its plugin (and warm sandboxes) run
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=60) == 0
    assert _theirs(served.proc.pid) == []
    assert not os.path.exists(served.socket)


def test_kill_9_leaves_no_plugin_running_and_the_next_daemon_sweeps(served: Served) -> None:
    _plugin(served.root / "alice" / "hello", ALICE)
    run = served.client(ALICE, f"""\
        import asyncio, sandboxer
        async def main():
            async with await sandboxer.connect() as d:
                await d.load("{served.root}/alice/hello")
        asyncio.run(main())
    """)
    assert run.returncode == 0, run.stderr
    groups = _theirs(served.proc.pid)
    assert groups
    served.proc.kill()
    served.proc.wait()
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline and any(
        (g / "cgroup.procs").read_text().split() for g in groups if g.exists()
    ):
        time.sleep(0.02)
    assert not any((g / "cgroup.procs").read_text().split() for g in groups if g.exists())
    # the next daemon (on the same socket) sweeps them once they are old enough to be sure
    time.sleep(max(0.0, min(g.stat().st_mtime for g in groups) + cgroups._SWEEP_MIN_AGE + 0.5 - time.time()))
    again = subprocess.Popen(
        [sys.executable, "-m", "sandboxer.cli", "serve", "--socket", served.socket],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 30
        while _theirs(served.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _theirs(served.proc.pid) == []
    finally:
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=60) == 0
    served.proc = again  # the fixture's teardown checks this one


def test_socket_activation_as_systemd_does_it(tmp_path: Path) -> None:
    """contrib/systemd/sandboxer.socket's way: the listening socket made by someone else
    and passed as fd 3 (LISTEN_FDS); the daemon serves on it and leaves it in place."""
    activate = shutil.which("systemd-socket-activate")
    assert activate is not None, "systemd-socket-activate (Debian's systemd package) is missing"
    sock = str(tmp_path / "activated.sock")
    plugin = tmp_path / "hello.py"
    plugin.write_text(HELLO)
    proc = subprocess.Popen(
        [activate, "-l", sock, "-E", "PATH", "--", sys.executable, "-m", "sandboxer.cli",
         "serve", "--socket", sock],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.02)
        call = subprocess.run(
            [sys.executable, "-m", "sandboxer.cli", "call", "--connect", sock, str(plugin),
             "greet", "activated"],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )
        assert call.returncode == 0, call.stderr
        assert call.stdout.strip() == "Hello, activated!"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    assert os.path.exists(sock)  # the activator's, not the daemon's to remove
    assert _theirs(proc.pid) == []


def test_status_shows_each_tenant_its_own(served: Served) -> None:
    _plugin(served.root / "alice" / "hello", ALICE)
    _plugin(served.root / "bob" / "hello", BOB)
    keep = """\
        import asyncio, sandboxer
        async def main():
            async with await sandboxer.connect() as d:
                p = await d.load("{path}")
                for _ in range(5):
                    await p.call("greet", "x")
        asyncio.run(main())
    """
    for uid, name in ((ALICE, "alice"), (BOB, "bob")):
        run = served.client(uid, keep.format(path=served.root / name / "hello"))
        assert run.returncode == 0, run.stderr
    run = served.as_user(ALICE, "status", "--json")
    assert run.returncode == 0, run.stderr
    status = json.loads(run.stdout)
    assert [t["name"] for t in status["tenants"]] == ["alice"]
    (mine,) = status["plugins"]
    assert (mine["tenant"], mine["id"], mine["state"], mine["calls"]) == (
        "alice", "acme.hello", "ready", 5)
    assert mine["restarts"] == 0 and mine["p50_s"] > 0 and mine["p99_s"] >= mine["p50_s"]
    assert mine["memory_peak_bytes"] > 0 and mine["cpu_time_s"] > 0
    table = served.as_user(ALICE, "status")
    assert "acme.hello" in table.stdout and "bob" not in table.stdout, table.stdout
    admin = subprocess.run(
        [sys.executable, "-m", "sandboxer.cli", "status", "--json", "--connect", served.socket],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert sorted(p["tenant"] for p in json.loads(admin.stdout)["plugins"]) == ["alice", "bob"]


def test_prometheus_metrics(tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    sock = str(tmp_path / "m.sock")
    plugin = tmp_path / "hello.py"
    plugin.write_text(HELLO)
    proc = subprocess.Popen(
        [sys.executable, "-m", "sandboxer.cli", "serve", "--socket", sock, "--metrics",
         f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock) and time.monotonic() < deadline:
            time.sleep(0.02)
        script = f"""\
import asyncio, sandboxer
async def main():
    async with await sandboxer.connect({sock!r}) as d:
        p = await d.load({str(plugin)!r})
        for _ in range(3):
            await p.call("greet", "m")
asyncio.run(main())
"""
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60, cwd=REPO)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as http:
            http.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = b""
            while chunk := http.recv(65536):
                reply += chunk
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"version=0.0.4" in head
        text = body.decode()
        assert 'sandboxer_plugin_calls_total{tenant="root",plugin="hello"} 3' in text
        assert 'sandboxer_plugin_up{tenant="root",plugin="hello",state="ready"} 1' in text
        assert 'sandboxer_plugin_call_seconds{tenant="root",plugin="hello",quantile="0.99"}' in text
        for line in text.splitlines():  # every sample line is NAME{LABELS} VALUE
            if not line.startswith("#"):
                name_labels, value = line.rsplit(" ", 1)
                float(value)
                assert name_labels.startswith("sandboxer_")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as http:
            http.sendall(b"GET /other HTTP/1.1\r\n\r\n")
            assert http.recv(100).startswith(b"HTTP/1.1 404")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert _theirs(proc.pid) == []


def test_a_tenants_plugin_is_granted_no_host_path(served: Served) -> None:
    """A grant is opened with the daemon's rights, root's: a tenant could be given what it
    cannot open itself (a root-only directory under its own root), so none is given."""
    secret = served.root / "alice" / "private"
    secret.mkdir(mode=0o700)  # root's, under alice's path root
    (secret / "data").write_text("root only")
    root = _plugin(served.root / "alice" / "granted", ALICE)
    toml = root / "plugin.toml"
    toml.write_text(toml.read_text() + f'\n[sandbox]\nallowed_paths = ["{secret}"]\n')
    run = served.as_user(ALICE, "call", str(root), "greet", "x")
    assert run.returncode == 2
    assert f"does not allow path {secret}" in run.stderr, run.stderr


def test_sandboxer_call_through_the_daemon_starts_warm(served: Served) -> None:
    """Issue 20's last start: a one-shot `sandboxer call` has no pool of its own, the daemon
    has; after the first load of a shape, the next calls take sandboxes made ahead."""
    _plugin(served.root / "alice" / "hello", ALICE)
    warm = []
    for _ in range(4):
        run = served.as_user(ALICE, "call", "--json", str(served.root / "alice" / "hello"),
                             "greet", "w")
        doc = json.loads(run.stdout)
        assert doc["ok"] and doc["result"] == "Hello, w!", run.stderr
        warm.append(doc["startedWarm"])
    assert warm[0] is False and any(warm[1:]), warm


def test_a_tenant_restarts_its_crashed_plugin(served: Served) -> None:
    root = _plugin(served.root / "alice" / "hello", ALICE)
    (root / "hello.py").write_text(HELLO + "\ndef die():\n    import os\n    os._exit(9)\n")
    run = served.client(ALICE, f"""\
        import asyncio, sandboxer
        async def main():
            async with await sandboxer.connect() as d:
                p = await d.load("{root}")
                try:
                    await p.call("die")
                except sandboxer.PluginCrashed as exc:
                    print("crashed", exc.exit_status)
                await asyncio.sleep(0.3)
                print((await d.stats(p.id))["state"])
        asyncio.run(main())
    """)
    assert run.stdout.split() == ["crashed", "9", "failed"], run.stderr
    run = served.as_user(ALICE, "restart", "acme.hello")
    assert run.returncode == 0 and "ready" in run.stdout, run.stderr
    run = served.as_user(BOB, "restart", "acme.hello")  # not bob's
    assert run.returncode == 2 and "PluginNotFound" in run.stderr
    run = served.as_user(ALICE, "status", "--json")
    (plugin,) = json.loads(run.stdout)["plugins"]
    assert plugin["restarts"] == 1 and plugin["state"] == "ready"
    assert "restart uid=1001" in served.log.read_text()


def test_a_tenant_loads_from_the_operators_registry(served: Served) -> None:
    run = served.as_user(ALICE, "call", "acme.published@^1", "greet", "signed")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "Hello, signed!"
    run = served.as_user(ALICE, "call", "--registry", "/tmp/mine", "acme.published@^1", "greet",
                         "x")
    assert run.returncode == 2 and "--registry" in run.stderr  # the operator's registry only
    assert "registry=acme.published@^1" in served.log.read_text()


def test_events_reach_their_tenant_and_the_administrator(served: Served) -> None:
    _plugin(served.root / "alice" / "hello", ALICE)
    _plugin(served.root / "bob" / "hello", BOB)
    watcher = """\
        import asyncio, json, sys, sandboxer
        async def main():
            async with await sandboxer.connect(%r) as d:
                seen = []
                async def watch():
                    async for event in d.events():
                        seen.append((event["tenant"], event["plugin"], event["state"]))
                        if len(seen) >= %d:
                            return
                task = asyncio.ensure_future(watch())
                print("subscribed", flush=True)
                await asyncio.wait_for(task, 60)
                print(json.dumps(seen))
        asyncio.run(main())
    """
    admin = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(watcher % (served.socket, 6))],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    alice = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(watcher % (served.socket, 3))],
        stdout=subprocess.PIPE, text=True, cwd=REPO, user=ALICE, group=ALICE, extra_groups=[],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    try:
        for proc in (admin, alice):
            assert proc.stdout is not None and proc.stdout.readline().strip() == "subscribed"
        time.sleep(0.3)  # the subscriptions are in place once the daemon has answered them
        load = """\
            import asyncio, sandboxer
            async def main():
                async with await sandboxer.connect() as d:
                    await d.load("{path}")
            asyncio.run(main())
        """
        for uid, name in ((BOB, "bob"), (ALICE, "alice")):  # bob's space is new to the daemon
            run = served.client(uid, load.format(path=served.root / name / "hello"))
            assert run.returncode == 0, run.stderr
        mine = json.loads(alice.communicate(timeout=60)[0].splitlines()[-1])
        everyone = json.loads(admin.communicate(timeout=60)[0].splitlines()[-1])
    finally:
        for proc in (admin, alice):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert mine == [["alice", "acme.hello", s] for s in ("loading", "initializing", "ready")]
    assert sorted({(t, s) for t, _, s in everyone}) == sorted(
        {(t, s) for t in ("alice", "bob") for s in ("loading", "initializing", "ready")})


def test_sighup_reads_the_tenants_again(served: Served) -> None:
    carols = served.root / "carol"
    carols.mkdir()
    os.chown(carols, STRANGER, STRANGER)
    _plugin(carols / "hello", STRANGER)
    run = served.as_user(STRANGER, "call", str(carols / "hello"), "greet", "c")
    assert run.returncode == 2 and "no tenant" in run.stderr
    config = served.root / "sandboxer.toml"
    config.write_text(config.read_text() + textwrap.dedent(f"""
        [tenants.carol]
        uids = [{STRANGER}]
        path_roots = ["{carols}"]
        """))
    served.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "read again (3 tenants)" not in served.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    run = served.as_user(STRANGER, "call", str(carols / "hello"), "greet", "c")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "Hello, c!"
