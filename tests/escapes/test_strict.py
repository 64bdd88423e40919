"""Escape probes of the strict profile's promise: a program can run no file it wrote. Every
writable mount is noexec (/tmp included: the default profile leaves it executable on purpose),
memfd_create is denied (a memfd is a file no mount holds, so no noexec covers it) and so is
execveat; docs/profiles.md states the promise.

A strict plugin cannot fork, so it cannot start the C probe as the other modules do. Most
probes here therefore run the probe as the sandboxed program itself, the way ``sandboxer exec
--profile strict -- probe NAME ARG`` does (``program.run``), one sandbox per probe, with the
host's canaries checked after each. The exec probes copy /bin/echo somewhere and run the copy
with "exec-worked", which is what they print if the exec succeeds. Two probes go through the
hostile plugin itself, loaded under strict by the manager, since that is the path a plugin
takes: it tries memfd_create, and it replaces itself with a copy of the probe it wrote to /tmp.

Under the default profile the same copies run (the controls at the end): the probes can see
an exec succeed, so the refusals above are the profile's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
import pytest_asyncio

from sandboxer import HostConfig, PathGrant, PluginManager, load_plugin
from sandboxer.config import HostConfig
from sandboxer.sandbox import cgroups, program
from sandboxer.sandbox.policy import SandboxConfig, SandboxRequest, effective_config
from sandboxer.sandbox.seccomp import compile_filter

from .conftest import STARTS, Canaries, Fleet, start_fleet

pytestmark = [pytest.mark.usefixtures("no_leaks"), pytest.mark.asyncio(loop_scope="module")]

WORKED = "exec-worked"
EACCES = "errno=EACCES"
EPERM = "errno=EPERM"


def probe_sandbox(profile: str, hostile_dir: Path) -> SandboxConfig:
    """The profile's sandbox as the host policy makes it, with the probe's directory granted
    read-only (a read-only grant may hold programs: it is not data the plugin wrote)."""
    return effective_config(SandboxRequest(profile=profile), HostConfig()).replace(
        allowed_paths=(PathGrant(str(hostile_dir)),))


async def run_probe(canaries: Canaries, hostile_dir: Path, profile: str, name: str,
                    arg: str = "") -> dict[str, Any]:
    """``probe NAME ARG`` as the sandboxed program under ``profile``; its return code and
    output, after checking that the host is intact."""
    sandbox = probe_sandbox(profile, hostile_dir)
    out: list[bytes] = []
    err: list[bytes] = []
    result = await program.run(
        [str(hostile_dir / "probe"), name, arg], sandbox, backend=cgroups.detect(),
        seccomp_bpf=compile_filter(profile, network=False), sinks=(out.append, err.append))
    canaries.check()
    return {"rc": result.returncode, "out": b"".join(out).decode().strip(),
            "err": b"".join(err).decode().strip()}


def case(name: str, arg: str, expected: str, *, id: str):  # type: ignore[no-untyped-def]
    return pytest.param(name, arg, expected, id=id)


STRICT = [
    # The report: a copy of /bin/echo in /tmp ran.
    case("exec-copy", "/tmp/probe-exec", EACCES, id="exec-a-copy-in-tmp"),
    case("exec-copy", "/dev/shm/probe-exec", EACCES, id="exec-a-copy-in-dev-shm"),
    # fexecve's fallback: the file by its fd, through /proc/self/fd; noexec is the mount's.
    case("exec-copy-by-fd", "/tmp/probe-exec", EACCES, id="exec-a-copy-in-tmp-by-its-fd"),
    case("exec-tmpfile", "/tmp", EACCES, id="exec-an-unnamed-file-in-tmp-by-its-fd"),
    # The report: execv of a memfd ran. memfd_create itself is refused now.
    case("memfd-create", "", EPERM, id="memfd-create"),
    case("exec-memfd", "", EPERM, id="exec-a-memfd"),
    case("execveat-fd", "", EPERM, id="execveat-an-open-file"),
    case("execveat-path", "", EPERM, id="execveat-a-path"),
]


@pytest.mark.parametrize(("name", "arg", "expected"), STRICT)
async def test_strict_runs_no_file_the_program_wrote(canaries: Canaries, hostile_dir: Path,
                                                      name: str, arg: str,
                                                      expected: str) -> None:
    ran = await run_probe(canaries, hostile_dir, "strict", name, arg)
    assert (ran["rc"], ran["out"]) == (0, expected), ran


async def test_strict_the_dynamic_loader_cannot_map_a_copy_in_tmp(canaries: Canaries,
                                                                  hostile_dir: Path) -> None:
    """``ld.so /tmp/copy`` execs the loader (from /usr, allowed) and lets it map the copy:
    no execve of the copy at all. noexec refuses the executable mapping (mmap PROT_EXEC on
    a noexec mount is EPERM), so the loader gives up."""
    ran = await run_probe(canaries, hostile_dir, "strict", "exec-copy-via-ldso",
                          "/tmp/probe-exec")
    assert ran["rc"] == 127 and WORKED not in ran["out"], ran
    assert "failed to map segment from shared object" in ran["err"], ran


# -- through the hostile plugin, loaded under strict ------------------------------------------

@pytest_asyncio.fixture(loop_scope="module", params=STARTS)
async def strict_fleet(request: pytest.FixtureRequest, canaries: Canaries,
                       hostile_dir: Path) -> AsyncIterator[Fleet]:
    """The hostile plugin under strict as the manager loads it (its own limits and filter),
    beside the neighbour under default; a fleet per test, as a probe that works on a broken
    sandbox replaces the plugin."""
    start = request.param
    manager = PluginManager(config=HostConfig(warm_sandboxes=2 if start == "warm" else 0))
    asked = dataclasses.replace(load_plugin(hostile_dir).sandbox, profile="strict")
    sandbox = effective_config(asked, manager.config)
    manager, fleet = await start_fleet(canaries, hostile_dir, sandbox=sandbox, manager=manager,
                                       start=start)
    try:
        assert fleet.hostile.sandbox is not None and fleet.hostile.sandbox.profile == "strict"
        yield fleet
    finally:
        await manager.aclose()
    canaries.check()


async def test_a_strict_plugin_cannot_make_a_memfd(strict_fleet: Fleet) -> None:
    assert await strict_fleet.probe("memfd") == {"errno": "EPERM"}


async def test_a_strict_plugin_cannot_become_a_program_it_wrote(strict_fleet: Fleet) -> None:
    """It cannot fork, but it could replace itself: exec of a copy of the probe in /tmp. Had
    it worked, the plugin would be gone and the call would never answer."""
    assert await strict_fleet.probe("copy_executable", "/plugin/probe", "/tmp/probe-copy") == \
        {"ok": True}
    assert await strict_fleet.probe("exec_in_place", "/tmp/probe-copy", "euid") == \
        {"errno": "EACCES"}


# -- the controls: the default profile runs what it writes ----------------------------------------

@pytest.mark.parametrize(("name", "arg"), [
    pytest.param("exec-copy", "/tmp/probe-exec", id="exec-a-copy-in-tmp"),
    pytest.param("exec-copy-by-fd", "/tmp/probe-exec", id="exec-a-copy-in-tmp-by-its-fd"),
    pytest.param("exec-copy-via-ldso", "/tmp/probe-exec", id="ld-so-maps-a-copy-in-tmp"),
    pytest.param("exec-memfd", "", id="exec-a-memfd"),
])
async def test_the_default_profile_runs_what_it_wrote(canaries: Canaries, hostile_dir: Path,
                                                      name: str, arg: str) -> None:
    """Compilers and test suites run programs from /tmp, so the default keeps it executable;
    this is also the proof that the probes above would see an exec that works."""
    ran = await run_probe(canaries, hostile_dir, "default", name, arg)
    assert (ran["rc"], ran["out"]) == (0, WORKED), ran


async def test_the_default_profile_still_keeps_dev_shm_noexec(canaries: Canaries,
                                                              hostile_dir: Path) -> None:
    ran = await run_probe(canaries, hostile_dir, "default", "exec-copy", "/dev/shm/probe-exec")
    assert (ran["rc"], ran["out"]) == (0, EACCES), ran
