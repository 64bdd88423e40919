"""Fixtures of the escape probes: the hostile plugin, the host's canaries, and fleets.

A fleet is a PluginManager with the hostile plugin and a neighbour (``examples/hello``)
loaded side by side. Every probe goes through ``Fleet.probe()``: it asks the hostile plugin
to do one thing, then checks that the supervisor (this process, its event loop and its
manager) is alive, the neighbour still answers and the host's canaries are intact, and only
then hands the outcome back for the test to judge. A probe therefore fails on containment
even when its own outcome is what the test expected, and containment is checked for the
probes that are known escapes (xfail) too.

Probe outcomes (see hostile/plugin.py): ``{"ok": value}`` when the action worked,
``{"errno": "NAME"}`` when it failed; the C probe's runs are ``{"rc", "out", "err"}`` with
``out`` one of ``ok RET`` or ``errno=NAME``, and ``rc == -SIGSYS`` when the filter killed it.

The rule for syscall probes (from the issue): a call counts as blocked only on EPERM, ENOSYS,
EACCES or SIGSYS. EFAULT, EINVAL, EBADF (or any other errno the kernel's own code gives) mean
the call reached the kernel. Filesystem probes are judged by what a user would see (EROFS,
ENOENT, EXDEV ... and that the host's file is unchanged); network probes by "no connection".
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import pytest_asyncio

from conftest import EXAMPLES
from sandboxer import HostConfig, LoadedPlugin, PluginManager, PluginState, SandboxConfig

HOSTILE_SOURCE = Path(__file__).resolve().parent / "hostile"
SIGSYS = -int(signal.SIGSYS)
BLOCKED_ERRNOS = ("EPERM", "EACCES", "ENOSYS")
CANARY_TEXT = "the host's canary: a plugin must never change this file\n"
SECRET_TEXT = "host secret: a plugin must never read this\n"
# Where probes write inside the sandbox (its own root, /usr, /tmp, /dev/shm): none of these
# may ever appear on the host.
HOST_UNTOUCHED = ("/escape-probe", "/usr/escape-probe", "/tmp/probe-fifo", "/tmp/mem",
                  "/tmp/kmsg", "/tmp/vda", "/tmp/fill", "/dev/shm/fill", "/tmp/plugin.py",
                  "/dev/shm/probe-copy", "/tmp/probe-exec", "/dev/shm/probe-exec",
                  "/tmp/probe-copy")


@pytest.fixture(scope="session")
def hostile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of hostile/ with the C probe compiled into it (mounted at /plugin inside), plus
    two copies of the probe the sandbox must refuse to honour: one set-uid root, one with
    every file capability."""
    root = tmp_path_factory.mktemp("hostile") / "hostile"
    shutil.copytree(HOSTILE_SOURCE, root)
    probe = root / "probe"
    subprocess.run(["gcc", "-O1", "-Wall", "-Werror", "-o", str(probe), str(root / "probe.c")],
                   check=True, timeout=120)
    setuid = root / "probe-setuid"
    shutil.copy2(probe, setuid)
    os.chown(setuid, 0, 0)
    os.chmod(setuid, 0o4755)
    filecaps = root / "probe-filecaps"
    shutil.copy2(probe, filecaps)
    # struct vfs_cap_data, revision 2 with the effective bit: every capability permitted.
    os.setxattr(filecaps, "security.capability",
                struct.pack("<IIIII", 0x02000001, 0xFFFFFFFF, 0, 0xFFFFFFFF, 0))
    for path in (root, *root.iterdir()):
        os.chmod(path, os.stat(path).st_mode | 0o444 | (0o111 if path.is_dir() else 0))
    for name in ("plugin.py", "plugin.toml"):
        # World-writable on the host: only the read-only mount of /plugin can stop the plugin
        # from rewriting its own code (EROFS), not the files' permissions (EACCES).
        os.chmod(root / name, 0o666)
    return root


@dataclass
class Canaries:
    """Host files a plugin must neither change nor read, and the host's identity."""

    root: Path
    canary: Path
    secret: Path
    hostname_file: bytes
    hostname: str
    listing: list[str] = field(default_factory=list)

    def check(self) -> None:
        assert self.canary.read_text() == CANARY_TEXT, "the host canary file changed"
        assert self.secret.read_text() == SECRET_TEXT, "the host secret file changed"
        assert sorted(os.listdir(self.root)) == self.listing, "files appeared on the host"
        with open("/etc/hostname", "rb") as f:
            assert f.read() == self.hostname_file, "the host's /etc/hostname changed"
        assert socket.gethostname() == self.hostname, "the host's hostname changed"
        for path in HOST_UNTOUCHED:
            assert not os.path.lexists(path), f"{path} appeared on the host"


@pytest.fixture(scope="session")
def canaries(tmp_path_factory: pytest.TempPathFactory) -> Canaries:
    root = tmp_path_factory.mktemp("host-canaries")
    os.chmod(root, 0o755)  # readable by anyone: only the sandbox may keep a plugin out
    canary = root / "canary.txt"
    canary.write_text(CANARY_TEXT)
    secret = root / "secret.txt"
    secret.write_text(SECRET_TEXT)
    for path in (canary, secret):
        os.chmod(path, 0o666)  # even world-writable: the sandbox, not permissions, must hold
    with open("/etc/hostname", "rb") as f:
        hostname_file = f.read()
    found = Canaries(root, canary, secret, hostname_file, socket.gethostname())
    found.listing = sorted(os.listdir(root))
    return found


@dataclass
class Fleet:
    """A manager with the hostile plugin and a neighbour, and the host's canaries."""

    manager: PluginManager
    hostile: LoadedPlugin
    neighbour: LoadedPlugin
    canaries: Canaries
    # more host state to verify after every probe (files a module granted or denied)
    checks: list[Callable[[], None]] = field(default_factory=list)

    async def probe(self, method: str, *args: Any, timeout: float | None = 30) -> Any:
        """Ask the hostile plugin to try something; check containment; return the outcome."""
        outcome = await self.hostile.call(method, *args, timeout=timeout)
        await self.assert_contained()
        assert self.hostile.state is PluginState.READY, self.hostile.error
        return outcome

    async def run(self, name: str, arg: str = "") -> dict[str, Any]:
        """One run of the C probe (a raw syscall)."""
        result: dict[str, Any] = await self.probe("run", name, arg)
        assert not result["err"], result  # an unknown probe name or a broken helper
        return result

    async def assert_contained(self) -> None:
        """The supervisor is alive and serving, the neighbour answers, the host is intact."""
        await asyncio.sleep(0)  # this event loop still runs
        assert self.neighbour.id in {p.id for p in await self.manager.list()}
        assert self.neighbour.state is PluginState.READY, self.neighbour.error
        assert await self.neighbour.call("greet", "neighbour", timeout=10) == "Hello, neighbour!"
        self.canaries.check()
        for check in self.checks:
            check()


# How the fleets' plugins start: every probe that uses a fleet runs against both.
STARTS = ("cold", "warm")


async def start_fleet(canaries: Canaries, hostile_dir: Path, *,
                      sandbox: SandboxConfig | None = None,
                      manager: PluginManager | None = None,
                      start: str = "cold") -> tuple[PluginManager, Fleet]:
    """Load the neighbour, then the hostile plugin (with ``sandbox`` if given). ``start``
    "warm": both start in warm sandboxes made ahead (sandbox/pool.py), the hostile plugin's
    shape taught to the pool by one load first; "cold": no warm sandboxes at all."""
    if manager is None:
        manager = PluginManager(config=HostConfig(warm_sandboxes=2 if start == "warm" else 0))
    try:
        if start == "warm":
            await manager.unload((await manager.load(hostile_dir, sandbox=sandbox)).id)
            await manager.warm_up()
        neighbour = await manager.load(EXAMPLES / "hello")
        hostile = await manager.load(hostile_dir, sandbox=sandbox)
        if start == "warm":  # the refill done: no sandbox half made while a probe runs
            await manager.warm_up()
    except BaseException:
        await manager.aclose()
        raise
    assert hostile.sandbox is not None and hostile.sandbox.enabled
    assert neighbour.sandbox is not None and neighbour.sandbox.enabled
    assert hostile.started_warm == neighbour.started_warm == (start == "warm"), start
    return manager, Fleet(manager, hostile, neighbour, canaries)


@pytest_asyncio.fixture(scope="module", loop_scope="module", autouse=True)
async def _module_event_loop() -> AsyncIterator[None]:
    """The modules run on a module-scoped event loop; this makes it exist before any
    function-scoped fixture, so that ``no_leaks`` never counts the loop's own fds."""
    yield


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=STARTS)
async def fleet(request: pytest.FixtureRequest, canaries: Canaries,
                hostile_dir: Path) -> AsyncIterator[Fleet]:
    """One fleet for a module's probes that leave the plugin running (most of them)."""
    manager, found = await start_fleet(canaries, hostile_dir, start=request.param)
    try:
        yield found
    finally:
        await manager.aclose()
    canaries.check()


@pytest_asyncio.fixture(loop_scope="module", params=STARTS)
async def fresh_fleet(request: pytest.FixtureRequest, canaries: Canaries,
                      hostile_dir: Path) -> AsyncIterator[Fleet]:
    """A fleet of its own, for a probe that may take the hostile plugin down."""
    manager, found = await start_fleet(canaries, hostile_dir, start=request.param)
    try:
        yield found
    finally:
        await manager.aclose()
    canaries.check()


def blocked(result: dict[str, Any]) -> bool:
    """The issue's rule for syscall probes: EPERM, EACCES, ENOSYS or SIGSYS."""
    return result["rc"] == SIGSYS or result["out"] in {f"errno={e}" for e in BLOCKED_ERRNOS}


def unique_marker(what: str) -> str:
    return f"sandboxer-escape-{what}-{secrets.token_hex(6)}"
