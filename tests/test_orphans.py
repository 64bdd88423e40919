"""No orphans (issue 21, in the library): a supervisor killed with SIGKILL while its plugins
are busy loses them all within 2 s, and the next supervisor to start removes the cgroups it
left, and nobody else's.

The supervisors are child processes, as a host program is: one is killed, one lives on
beside it and must be left untouched, and a third starts afterwards (as a restarted host
would) and sweeps. The plugins are a stranger's: a bare .py file busy in a long call, and
the README's sh plugin.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandboxer.sandbox import cgroups

pytestmark = pytest.mark.usefixtures("no_leaks")

REPO = Path(__file__).resolve().parent.parent
LIMITS = cgroups.CgroupLimits(memory=64 << 20, cpu=1.0, pids=16)

NAPPER = """\
import time

def nap(seconds):
    time.sleep(seconds)
    return "rested"
"""

# A host program: loads the plugins, starts their calls, says where they are, and runs until
# its stdin closes (then it leaves its `async with`, which unloads everything).
HOST = """\
import asyncio, json, sys
from sandboxer import PluginManager

async def main():
    async with PluginManager() as mgr:
        plugins = [await mgr.load(path) for path in sys.argv[1:]]
        busy = asyncio.ensure_future(plugins[0].call("nap", 600))
        assert await plugins[1].call("add", 2, 3) == 5
        await asyncio.sleep(0.2)
        print(json.dumps({
            "pid": __import__("os").getpid(),
            "cgroups": [p.handle.cgroup_path for p in plugins],
        }), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        busy.cancel()

asyncio.run(main())
"""

SWEEPER = """\
import asyncio
from sandboxer import PluginManager

async def main():
    async with PluginManager() as mgr:
        await mgr.swept()

asyncio.run(main())
"""


def _readme_sh_plugin(root: Path) -> Path:
    readme = (REPO / "README.md").read_text()
    start = readme.index("#!/bin/sh\n# add(a, b)")
    root.mkdir()
    (root / "adder.sh").write_text(readme[start : readme.index("```", start)])
    (root / "adder.sh").chmod(0o755)
    (root / "plugin.toml").write_text(
        '[plugin]\nid = "stranger.adder"\nversion = "1.0.0"\ntype = "external"\n'
        'entrypoint = "adder.sh"\n'
    )
    return root


def _host(napper: Path, adder: Path) -> tuple[subprocess.Popen[str], dict]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOST, str(napper), str(adder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the host exited: {proc.wait()}"
    return proc, json.loads(line)


def _theirs(pid: int) -> list[Path]:
    """Every cgroup supervisor ``pid`` made, in every hierarchy it made them in."""
    homes = [Path(home) for home in cgroups.detect().homes()]
    return sorted(g for home in homes for g in home.glob(f"sandboxer-{pid}-*"))


def _procs(group: Path) -> list[str]:
    try:
        return (group / "cgroup.procs").read_text().split()
    except FileNotFoundError:
        return []


def test_a_killed_host_loses_its_plugins_and_the_next_one_sweeps(tmp_path: Path) -> None:
    napper = tmp_path / "napper.py"
    napper.write_text(NAPPER)
    adder = _readme_sh_plugin(tmp_path / "adder")
    killed, shown = _host(napper, adder)
    living, living_shown = _host(napper, adder)
    try:
        theirs = _theirs(shown["pid"])
        # its two plugins, and the warm sandboxes it made meanwhile
        assert {Path(p).name for p in shown["cgroups"]} <= {g.name for g in theirs}
        assert all(_procs(Path(p)) for p in shown["cgroups"])  # busy, and alive
        killed.kill()
        killed.wait()
        deadline = time.monotonic() + 2.0
        while any(_procs(g) for g in theirs) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [str(g) for g in theirs if _procs(g)] == [], "processes outlived their host"
        assert _theirs(shown["pid"]) == theirs  # nothing removed them yet
        # the next host to start removes them, once they are old enough to be sure
        oldest = min(g.stat().st_mtime for g in theirs)
        time.sleep(max(0.0, oldest + cgroups._SWEEP_MIN_AGE + 0.5 - time.time()))
        sweep = subprocess.run([sys.executable, "-c", SWEEPER], cwd=REPO, timeout=60,
                               capture_output=True, text=True)
        assert sweep.returncode == 0, sweep.stderr
        assert _theirs(shown["pid"]) == []
        # the living host's are untouched, and its plugins answer
        assert {Path(p).name for p in living_shown["cgroups"]} <= {
            g.name for g in _theirs(living_shown["pid"])}
        assert all(_procs(Path(p)) for p in living_shown["cgroups"])
    finally:
        for proc in (killed, living):
            if proc.poll() is None:
                assert proc.stdin is not None
                proc.stdin.close()
                proc.wait(timeout=60)
    assert living.returncode == 0
    assert _theirs(living_shown["pid"]) == []  # it unloaded everything on its way out


def test_the_sweep_leaves_a_busy_group_and_any_other_name(tmp_path: Path) -> None:
    """A dead supervisor's cgroup that still holds a process is not removed (its supervisor
    may be alive in another pid namespace), nor anything not named as ours are."""
    backend = cgroups.detect()
    gone = os.getpid() + 1  # a pid no process has
    while True:
        try:
            os.kill(gone, 0)
            gone += 1
        except ProcessLookupError:
            break
    stale = backend.create(f"sandboxer-{gone}-{'a' * 12}", LIMITS)
    held = backend.create(f"sandboxer-{gone}-{'b' * 12}", LIMITS)
    other = backend.create(f"sandboxer-x{gone}-{'c' * 12}", LIMITS)
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        held.add(sleeper.pid)
        old = time.time() - 60
        for group in (stale, held, other):
            for directory in getattr(group, "dirs", {"": group.path}).values():
                os.utime(directory, (old, old))
        removed = backend.sweep()
        assert Path(stale.path).name in {Path(p).name for p in removed}
        assert not os.path.exists(stale.path)
        assert os.path.exists(held.path) and os.path.exists(other.path)
        young = backend.create(f"sandboxer-{gone}-{'d' * 12}", LIMITS)
        backend.sweep()
        assert os.path.exists(young.path)  # just made: its supervisor may be adding to it
        young.remove()
    finally:
        sleeper.kill()
        sleeper.wait()
        held.remove()
        other.remove()
