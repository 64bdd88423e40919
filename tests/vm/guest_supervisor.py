"""A supervisor run the way users deploy it, for the VM suite (tests/vm/guest_v2.py): as a
systemd service with Delegate=yes, or rootless in a delegated scope of a user's systemd.

It loads one python plugin with memory, cpu and pids limits, reads the plugin's cgroup and
its own from the kernel, drives the plugin over its memory limit, unloads it, and prints one
JSON object with what it saw. It judges nothing: guest_v2.py asserts on the report.

    python tests/vm/guest_supervisor.py WORKDIR
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from sandboxer import HostConfig, MemoryLimitExceeded, PluginManager, load_plugin

CGROUP_ROOT = Path("/sys/fs/cgroup")
MEMORY_LIMIT = 160 << 20
CODE = """\
import os, signal

def hog(mib):
    block = bytearray(mib << 20)
    return len(block)

def bomb():
    children, errno = [], None
    while len(children) < 1000:
        try:
            pid = os.fork()
        except OSError as exc:
            errno = exc.errno
            break
        if pid == 0:  # exec at once: a forked Python would dirty its pages and hit memory.max
            os.execv("/bin/sleep", ["sleep", "600"])
        children.append(pid)
    for pid in children:  # free the pids again: the plugin host needs threads for calls
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return {"made": len(children), "errno": errno}
"""


def cgroup_of(pid: int | str) -> Path:
    """The v2 cgroup directory of ``pid`` (the "0::" line of /proc/PID/cgroup)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return CGROUP_ROOT / line[3:].lstrip("/")
    raise RuntimeError(f"process {pid} has no cgroup v2 membership")


def read(path: Path) -> str:
    return path.read_text().strip()


async def supervise(workdir: Path) -> dict[str, object]:
    plugin_dir = workdir / "hog"
    plugin_dir.mkdir(parents=True, exist_ok=True)
    (plugin_dir / "plugin.py").write_text(CODE)
    (plugin_dir / "plugin.toml").write_text(
        '[plugin]\nid = "vm.hog"\nversion = "1.0.0"\ntype = "python"\nentrypoint = "plugin.py"\n'
        '\n[sandbox]\ncpu_limit = 1.0\n')
    report: dict[str, object] = {"uid": os.geteuid(), "cgroup_before": str(cgroup_of("self"))}
    # Plugin start-up is Python inside the plugin's cgroup: slow under TCG, so a long handshake.
    async with PluginManager(HostConfig(handshake_timeout=120.0)) as mgr:
        sandbox = mgr.resolve_sandbox(load_plugin(plugin_dir)).replace(memory_limit=MEMORY_LIMIT)
        plugin = await mgr.load(plugin_dir, sandbox=sandbox)
        group = cgroup_of(plugin.handle.pid)  # type: ignore[union-attr]
        parent = group.parent
        report.update({
            "fallbacks": list(plugin.fallbacks),
            "plugin_cgroup": str(group),
            "supervisor_cgroup": str(cgroup_of("self")),
            "parent_procs": read(parent / "cgroup.procs").split(),
            "parent_subtree_control": read(parent / "cgroup.subtree_control").split(),
            "memory.max": read(group / "memory.max"),
            "memory.oom.group": read(group / "memory.oom.group"),
            "cpu.max": read(group / "cpu.max"),
            "pids.max": read(group / "pids.max"),
            "memory_limit": MEMORY_LIMIT,
            "call": await plugin.call("hog", 4, timeout=60),
        })
        bomb = await plugin.call("bomb", timeout=120)
        bomb["pids.events max"] = int(read(group / "pids.events").split()[1])
        report["fork_bomb"] = bomb
        try:
            await plugin.call("hog", 400, timeout=120)
            report["oom"] = None
        except MemoryLimitExceeded as exc:
            report["oom"] = {"limit": exc.limit, "peak": exc.peak}
        await mgr.unload(plugin.id)
        # After an OOM kill the manager retires the failed generation in a background task,
        # and unload() does not wait for it (yet): give that cleanup a bounded moment.
        report["plugin_cgroup_left_at_unload"] = group.exists()
        deadline = time.monotonic() + 10
        while group.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        report["plugin_cgroup_left"] = group.exists()
    return report


def main() -> int:
    report = asyncio.run(supervise(Path(sys.argv[1])))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
