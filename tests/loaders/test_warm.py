"""Warm sandboxes (sandbox/pool.py): plugins that start in a sandbox made ahead of time.

Written as a stranger would use it: bare files and plain modules, no SDK, no lifecycle
methods. A warm start must be a start like any other (the same files at /plugin, read-only;
the plugin's own limits), and nothing of one plugin may reach the next one that takes a
sandbox from the same pool: no file, no /tmp, no process, no environment, no memory.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from sandboxer import HostConfig, MemoryLimitExceeded, PluginManager, SandboxUnavailable

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="sandboxed plugins need root here"),
    pytest.mark.usefixtures("no_leaks"),
]


def bare(tmp_path: Path, name: str, code: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return path


def plain_plugin(root: Path, plugin_id: str, code: str, extra: str = "") -> Path:
    """A plugin directory with a manifest written from the README, and one module."""
    root.mkdir(parents=True)
    (root / "plugin.toml").write_text(
        f'[plugin]\nid = "{plugin_id}"\nversion = "1.0.0"\ntype = "python"\n'
        f'entrypoint = "main.py"\n{extra}'
    )
    (root / "main.py").write_text(textwrap.dedent(code))
    return root


async def test_a_bare_file_starts_warm_and_sees_its_files_read_only(tmp_path):
    path = bare(tmp_path, "adder.py", """\
        import os

        def add(a, b):
            return a + b

        def where():
            try:
                open(__file__, "a").close()
                writable = True
            except OSError:
                writable = False
            return {"file": __file__, "listing": sorted(os.listdir("/plugin")),
                    "cwd": os.getcwd(), "writable": writable}
        """)
    async with PluginManager() as mgr:
        await mgr.warm_up()
        plugin = await mgr.load(path)
        assert plugin.started_warm
        assert await plugin.call("add", 2, 3) == 5
        seen = await plugin.call("where")
        assert seen == {"file": "/plugin/adder.py", "listing": ["adder.py"], "cwd": "/plugin",
                        "writable": False}


async def test_a_package_with_data_starts_warm(tmp_path):
    """A multi-file plugin is a package (docs/architecture.md), with a data file beside it."""
    root = tmp_path / "p"
    (root / "greeter").mkdir(parents=True)
    (root / "plugin.toml").write_text(
        '[plugin]\nid = "stranger.pkg"\nversion = "1.0.0"\ntype = "python"\n'
        'entrypoint = "greeter"\n'
    )
    (root / "greeter" / "__init__.py").write_text(textwrap.dedent("""\
        from pathlib import Path
        from .words import shout

        def hello(name):
            return shout(Path(__file__).with_name("greeting.txt").read_text().strip(), name)
        """))
    (root / "greeter" / "words.py").write_text(
        "def shout(greeting, name):\n    return f'{greeting.upper()}, {name}!'\n")
    (root / "greeter" / "greeting.txt").write_text("hello\n")
    async with PluginManager() as mgr:
        await mgr.warm_up()
        plugin = await mgr.load(root)
        assert plugin.started_warm
        assert await plugin.call("hello", "you") == "HELLO, you!"


LEAVE = """\
    import os, subprocess

    KEPT = []

    def leave(marker):
        for place in ("/tmp", "/dev/shm"):
            with open(f"{place}/{marker}", "w") as f:
                f.write(marker)
        os.environ["LEFT_BEHIND"] = marker
        KEPT.append((marker + "-in-memory-") * 1000)
        subprocess.Popen(["/bin/sleep", "60"], env={"LEFT_BEHIND": marker},
                         start_new_session=True)
        return os.readlink("/proc/self/ns/pid")
    """

LOOK = """\
    import os

    def look(marker):
        found = []
        for place in ("/tmp", "/dev/shm"):
            found += [f"{place}/{n}" for n in os.listdir(place) if marker in n]
        found += [f"env {k}" for k, v in os.environ.items() if marker in v or k == "LEFT_BEHIND"]
        for pid in filter(str.isdigit, os.listdir("/proc")):
            for what in ("cmdline", "environ"):
                try:
                    with open(f"/proc/{pid}/{what}", "rb") as f:
                        if marker.encode() in f.read():
                            found.append(f"/proc/{pid}/{what}")
                except OSError:
                    pass
        # Its own memory: a process of the next sandbox is never a copy of the last one's,
        # which held the needle a thousand times over (this one holds it once or twice).
        needle, copies = (marker + "-in-memory-").encode(), 0
        with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb") as mem:
            for line in maps:
                span, perms = line.split()[:2]
                if not perms.startswith("r") or "[v" in line:
                    continue
                start, end = (int(x, 16) for x in span.split("-"))
                try:
                    mem.seek(start)
                    copies += mem.read(end - start).count(needle)
                except (OSError, OverflowError, ValueError):
                    pass
        if copies > 10:
            found.append(f"memory: {copies} copies")
        return {"found": found, "pid_ns": os.readlink("/proc/self/ns/pid")}
    """


async def test_nothing_of_one_plugin_reaches_the_next_from_the_same_pool(tmp_path):
    marker = "left-by-the-first-" + os.urandom(4).hex()
    first = plain_plugin(tmp_path / "a", "stranger.first", LEAVE)
    after = [plain_plugin(tmp_path / f"b{n}", f"stranger.next{n}", LOOK) for n in range(2)]
    async with PluginManager(config=HostConfig(warm_sandboxes=2)) as mgr:
        await mgr.warm_up()
        a = await mgr.load(first)
        assert a.started_warm
        first_ns = await a.call("leave", marker)
        # one made before the first plugin ran (it waited beside it), one made after
        b = await mgr.load(after[0])
        await mgr.unload(a.id)
        await mgr.warm_up()
        c = await mgr.load(after[1])
        for plugin in (b, c):
            assert plugin.started_warm
            seen = await plugin.call("look", marker)
            assert seen["found"] == [], f"{plugin.id} found the first plugin's {seen['found']}"
            if plugin is b:  # alive beside the first: another namespace (c's may reuse its number)
                assert seen["pid_ns"] != first_ns


async def test_a_warm_plugin_gets_its_own_memory_limit(tmp_path):
    """The pool's sandboxes wait with the default limit (256 MiB); the plugin's own is set
    on the cgroup when it takes one."""
    root = plain_plugin(tmp_path / "p", "stranger.hog", """\
        def hog(mib):
            block = bytearray(mib << 20)
            for i in range(0, len(block), 4096):
                block[i] = 1
            return len(block)
        """, extra='[sandbox]\nmemory_limit = "64MiB"\n')
    async with PluginManager() as mgr:
        await mgr.warm_up()
        plugin = await mgr.load(root)
        assert plugin.started_warm
        assert await plugin.call("hog", 8) == 8 << 20
        with pytest.raises(MemoryLimitExceeded):
            await plugin.call("hog", 128)


async def test_another_shape_starts_cold_then_is_kept_warm(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(data, 0o755)
    (data / "fact.txt").write_text("water is wet\n")
    os.chmod(data / "fact.txt", 0o644)
    code = f"def fact():\n    return open({str(data / 'fact.txt')!r}).read().strip()\n"
    extra = f'[sandbox]\nallowed_paths = ["{data}"]\n'
    config = HostConfig(path_roots=(str(tmp_path),))
    async with PluginManager(config=config) as mgr:
        await mgr.warm_up()
        first = await mgr.load(plain_plugin(tmp_path / "p1", "stranger.shape1", code, extra))
        assert not first.started_warm  # a grant: not the default shape
        assert await first.call("fact") == "water is wet"
        await mgr.warm_up()
        second = await mgr.load(plain_plugin(tmp_path / "p2", "stranger.shape2", code, extra))
        assert second.started_warm  # the pool learnt the shape from the first
        assert await second.call("fact") == "water is wet"


async def test_no_pool_means_every_start_is_cold(tmp_path):
    path = bare(tmp_path, "one.py", "def one():\n    return 1\n")
    async with PluginManager(config=HostConfig(warm_sandboxes=0)) as mgr:
        await mgr.warm_up()
        plugin = await mgr.load(path)
        assert not plugin.started_warm
        assert await plugin.call("one") == 1


async def test_a_large_directory_starts_cold(tmp_path):
    root = plain_plugin(tmp_path / "p", "stranger.large", "def n():\n    import os\n"
                        "    return len(os.listdir('/plugin/data'))\n")
    (root / "data").mkdir()
    for n in range(300):
        (root / "data" / f"{n}.txt").write_text(str(n))
    async with PluginManager() as mgr:
        await mgr.warm_up()
        plugin = await mgr.load(root)
        assert not plugin.started_warm
        assert await plugin.call("n") == 300


async def test_a_broken_plugin_fails_its_warm_start_cleanly(tmp_path):
    path = bare(tmp_path, "broken.py", "def broken(:\n")
    good = bare(tmp_path, "good.py", "def ok():\n    return 'ok'\n")
    async with PluginManager() as mgr:
        await mgr.warm_up()
        with pytest.raises(Exception) as info:
            await mgr.load(path)
        assert "broken" in str(info.value) or "SyntaxError" in str(info.value)
        plugin = await mgr.load(good)
        assert plugin.started_warm and await plugin.call("ok") == "ok"


# -- any program: the sandbox made ahead, the program exec'd at take time ----------------------

def readme_sh_plugin(root: Path, plugin_id: str) -> Path:
    """The README's minimal sh plugin, as a stranger copies it."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("#!/bin/sh\n# add(a, b)")
    root.mkdir(parents=True)
    (root / "adder.sh").write_text(readme[start:readme.index("```", start)])
    (root / "adder.sh").chmod(0o755)
    (root / "plugin.toml").write_text(
        f'[plugin]\nid = "{plugin_id}"\nversion = "1.0.0"\ntype = "external"\n'
        'entrypoint = "adder.sh"\n')
    return root


async def test_the_readme_sh_plugin_starts_warm(tmp_path):
    async with PluginManager() as mgr:
        first = await mgr.load(readme_sh_plugin(tmp_path / "a", "stranger.adder1"))
        assert not first.started_warm  # the first of its kind teaches the pool its shape
        await mgr.warm_up()
        second = await mgr.load(readme_sh_plugin(tmp_path / "b", "stranger.adder2"))
        assert second.started_warm
        assert await first.call("add", 2, 40) == await second.call("add", 40, 2) == 42
        await mgr.reload(second.id)  # its next generation takes one too
        assert second.started_warm and await second.call("add", 1, 1) == 2


async def test_a_program_that_cannot_run_fails_its_warm_start_cleanly(tmp_path):
    good = readme_sh_plugin(tmp_path / "good", "stranger.good")
    bad = readme_sh_plugin(tmp_path / "bad", "stranger.bad")
    (bad / "adder.sh").write_text("#!/nonexistent/interpreter\n")
    async with PluginManager() as mgr:
        await mgr.unload((await mgr.load(good)).id)
        await mgr.warm_up()
        with pytest.raises(SandboxUnavailable) as info:
            await mgr.load(bad)
        assert "exec" in str(info.value)
        plugin = await mgr.load(good)
        assert plugin.started_warm and await plugin.call("add", 1, 2) == 3


STATUS_PLUGIN = r'''#!/usr/bin/python3
# An external plugin written from the README's protocol table, without the SDK: it answers
# "status" with what the kernel says of it and of PID 1, and null to the reserved methods.
import json, os
rpc = os.fdopen(int(os.environ.get("SANDBOXER_RPC_FD", "3")), "r+b", buffering=0)
def send(message):
    rpc.write(json.dumps(message).encode() + b"\n")
send({"jsonrpc": "2.0", "id": 0, "method": "sandboxer.handshake",
      "params": {"cookie": os.environ["SANDBOXER_MAGIC_COOKIE"], "protocols": [1],
                 "methods": ["status"]}})
rpc.readline()
FIELDS = ("Uid", "Gid", "Groups", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb",
          "NoNewPrivs", "Seccomp")
def status(pid):
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, v in (line.split(":", 1) for line in f) if k in FIELDS}
for line in rpc:
    request = json.loads(line)
    if "id" not in request:
        continue
    result = ({"self": status("self"), "pid1": status(1), "cwd": os.getcwd(),
               "listing": sorted(os.listdir("/plugin"))}
              if request["method"] == "status" else None)
    send({"jsonrpc": "2.0", "id": request["id"], "result": result})
'''


async def test_a_warm_program_runs_exactly_as_a_cold_one(tmp_path):
    """Ids, capabilities (none, PID 1's too), no_new_privs and seccomp of a program that
    started warm are those of a cold start."""
    def plugin(name: str) -> Path:
        root = tmp_path / name
        root.mkdir()
        (root / "status.py").write_text(STATUS_PLUGIN)
        (root / "status.py").chmod(0o755)
        (root / "plugin.toml").write_text(
            f'[plugin]\nid = "stranger.{name}"\nversion = "1.0.0"\ntype = "external"\n'
            'entrypoint = "status.py"\n')
        return root

    async with PluginManager() as mgr:
        cold = await mgr.load(plugin("cold"))
        await mgr.warm_up()
        warm = await mgr.load(plugin("warm"))
        assert not cold.started_warm and warm.started_warm
        seen = {p.id: await p.call("status") for p in (cold, warm)}
    assert seen["stranger.cold"] == seen["stranger.warm"]
    for what in ("self", "pid1"):
        caps = seen["stranger.warm"][what]
        assert all(int(caps[c], 16) == 0 for c in ("CapInh", "CapPrm", "CapEff", "CapAmb")), caps
        assert caps["NoNewPrivs"] == "1", caps
    assert seen["stranger.warm"]["self"]["Seccomp"] == "2"
    assert seen["stranger.warm"]["cwd"] == "/plugin"
    assert seen["stranger.warm"]["listing"] == ["plugin.toml", "status.py"]


async def test_the_host_config_says_which_shapes_wait(tmp_path):
    """warm_profiles: a plugin asking for strict finds a sandbox waiting from the start;
    warm_learn false: a shape that started cold is not kept afterwards."""
    config = HostConfig.from_mapping(
        {"host": {"warm_profiles": ["strict"], "warm_learn": False, "warm_sandboxes": 1}})
    assert config.warm_profiles == ("strict",) and not config.warm_learn
    strict = plain_plugin(tmp_path / "s", "stranger.strict", "def hi():\n    return 'hi'\n",
                          extra='[sandbox]\nprofile = "strict"\n')
    plain = [plain_plugin(tmp_path / f"p{n}", f"stranger.plain{n}",
                          "def hi():\n    return 'hi'\n") for n in range(2)]
    async with PluginManager(config=config) as mgr:
        await mgr.warm_up()
        p = await mgr.load(strict)
        assert p.started_warm and p.sandbox.profile == "strict"
        assert await p.call("hi") == "hi"
        for root in plain:  # the default profile's shape is not kept, nor learnt
            q = await mgr.load(root)
            assert not q.started_warm
            await mgr.warm_up()


def test_bad_warm_settings_are_config_errors():
    from sandboxer import ConfigError

    for host in ({"warm_profiles": "default"}, {"warm_profiles": ["no such!"]},
                 {"warm_learn": "yes"}, {"warm_sandboxes": -1}, {"warm_memory_budget": "lots"}):
        with pytest.raises(ConfigError):
            HostConfig.from_mapping({"host": host})
