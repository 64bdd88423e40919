"""Shared fixtures: plugin builders, leak checks, and the CI rule that a skip is a failure."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest

from sandboxer.sandbox import forkserver

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
IN_CI = os.environ.get("CI") == "true"
# A python plugin's fork bomb: ``bomb()`` forks sleeping children until fork fails, and
# returns how many it made and the errno that stopped it (EAGAIN from pids.max or NPROC).
FORK_BOMB = ("import os, time\n"
             "def bomb():\n"
             "    made = 0\n"
             "    for _ in range(1000):\n"
             "        try:\n"
             "            pid = os.fork()\n"
             "        except OSError as exc:\n"
             "            return {'made': made, 'errno': exc.errno}\n"
             "        if pid == 0:\n"
             "            time.sleep(600); os._exit(0)\n"
             "        made += 1\n"
             "    return {'made': made, 'errno': None}\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """With CI=true a skipped test fails: CI must prove everything, not skip what it lacks."""
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def _children() -> set[int]:
    kids: set[int] = set()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                kids.update(int(pid) for pid in f.read().split())
        except FileNotFoundError:
            pass
    return kids


def _plugin_modules() -> set[str]:
    return {name for name in sys.modules if name.startswith("_sandboxer_plugin_")}


def _plugin_cgroups() -> set[str]:
    """Every cgroup this process made (sandboxer-PID-*), in every hierarchy."""
    found: set[str] = set()
    with open("/proc/self/cgroup") as f:
        entries = [line.strip().split(":", 2) for line in f]
    for _, controllers, path in entries:
        # v2 lives at /sys/fs/cgroup/unified on a hybrid host, at /sys/fs/cgroup itself on a
        # pure v2 one; there the supervisor may have moved itself into a "supervisor" leaf,
        # so its plugins' cgroups are siblings of its own: look beside it too.
        mounts = [Path("/sys/fs/cgroup") / n for n in controllers.split(",")] if controllers \
            else [Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")]
        for mount in mounts:
            base = mount / path.lstrip("/")
            for where in (base, base.parent):
                if where.is_dir() and where.is_relative_to(mount):
                    found.update(str(d) for d in where.glob(f"sandboxer-{os.getpid()}-*"))
    return found


def _mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return f.read().splitlines()


@pytest.fixture
def no_leaks():
    """Fails the test if it leaves an fd, a child process, a plugin module, a cgroup or a
    mount behind. The sandbox launcher's fork server, which lives as long as the process, is
    started first, so that it counts as there before."""
    forkserver.prestart()
    fds, kids, mods = _open_fds(), _children(), _plugin_modules()
    groups, mounts = _plugin_cgroups(), _mounts()
    yield
    leaked_fds = {fd for fd in _open_fds() - fds if os.path.exists(f"/proc/self/fd/{fd}")}
    assert not leaked_fds, f"leaked fds: {[os.readlink(f'/proc/self/fd/{fd}') for fd in leaked_fds]}"
    assert _children() - kids == set(), "leaked child processes"
    assert _plugin_modules() - mods == set(), "plugin modules left in sys.modules"
    assert _plugin_cgroups() - groups == set(), "plugin cgroups left behind"
    assert _mounts() == mounts, "mounts changed"


@pytest.fixture
def make_plugin(tmp_path: Path) -> Callable[..., Path]:
    """Write a python plugin dir: ``make_plugin(code, id=..., version=..., **manifest)``."""
    counter = iter(range(10_000))

    def build(code: str, *, id: str = "test.plugin", version: str = "1.0.0",
              extra: str = "", name: str | None = None) -> Path:
        root = tmp_path / (name or f"plugin{next(counter)}")
        root.mkdir()
        (root / "plugin.py").write_text(textwrap.dedent(code))
        (root / "plugin.toml").write_text(textwrap.dedent(f"""\
            [plugin]
            id = "{id}"
            version = "{version}"
            type = "python"
            entrypoint = "plugin.py"
            """) + textwrap.dedent(extra))
        return root

    return build


class LoopGap:
    """The longest the event loop went without running a 5 ms ticker (``worst``, seconds)."""

    worst = 0.0


@contextlib.asynccontextmanager
async def loop_gap() -> AsyncIterator[LoopGap]:
    """Watch the running loop while the block runs: how long was it held at worst?"""
    gap, stop = LoopGap(), asyncio.Event()

    async def watch() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gap.worst, last = max(gap.worst, now - last), now

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.02)
    try:
        yield gap
    finally:
        stop.set()
        await watcher


# -- the VM stage's image, built while the host suite runs ------------------------------------

_image_build: subprocess.Popen[bytes] | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """When the VM stage (tests/vm/test_stage.py, collected last) is going to run, start
    building its guest image now, in the background: the build is mostly downloading and
    unpacking, and it overlaps the host suite instead of adding its minutes to the stage.
    The stage's own call of the build waits for this one (they share a lock) and then finds
    the image cached."""
    global _image_build
    if not any(item.nodeid.startswith("tests/vm/test_stage.py") for item in session.items):
        return
    if os.geteuid() != 0 or shutil.which("debootstrap") is None:
        return  # the stage itself says what is missing
    log = REPO / "build" / "vm-stage" / "image-build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        _image_build = subprocess.Popen([str(REPO / "scripts" / "vm" / "build-image.sh")],
                                        stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                        start_new_session=True)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A build the run no longer needs (the stage was deselected or failed early) stops."""
    if _image_build is not None and _image_build.poll() is None:
        os.killpg(_image_build.pid, signal.SIGTERM)  # the build and what it started
        try:
            _image_build.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(_image_build.pid, signal.SIGKILL)
            _image_build.wait()
