"""gcc, g++ and make, sqlite3 and node, outside and under ``sandboxer exec``.

The programs are in programs/ (a read-only grant inside, at the same path); what they
build and write goes to /tmp, which the default profile keeps executable
(docs/profiles.md, default, **runs-what-it-builds**).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import run_inside, run_outside, same, sh

pytestmark = pytest.mark.timeout(180)


def test_gcc_builds_a_program_and_a_library_that_run_the_same(programs: Path) -> None:
    outside, _ = same(sh(f"""
        gcc -O2 -Wall -pthread -o /tmp/compat {programs}/compat.c &&
        gcc -O2 -Wall -shared -fPIC -o /tmp/libanswer.so {programs}/answer.c &&
        /tmp/compat /tmp/libanswer.so"""), allow=[str(programs)])
    assert outside.status == 3 and "dlopen: answer 42" in outside.stdout, outside


def test_make_builds_cxx_in_parallel_the_same(programs: Path) -> None:
    outside, _ = same(sh(f"make -s -j2 -C /tmp -f {programs}/Makefile && /tmp/hello && "
                         "ar t /tmp/libanswer.a"), allow=[str(programs)])
    assert outside.stdout.endswith("thrown and caught\nanswer.o\n"), outside


def _asan(programs: Path, leaks: int) -> list[str]:
    return sh(f"ASAN_OPTIONS=detect_leaks={leaks} && export ASAN_OPTIONS && "
              f"gcc -g -fsanitize=address -o /tmp/leak {programs}/leak.c && /tmp/leak")


def test_address_sanitizer_runs_the_same_without_leak_checking(programs: Path) -> None:
    outside, _ = same(_asan(programs, 0), allow=[str(programs)])
    assert outside.stdout == "ran 1\n"


def test_leak_sanitizer_needs_ptrace_which_the_profile_denies(programs: Path) -> None:
    """docs/profiles.md, default, **no-ptrace**: LeakSanitizer (on by default with gcc
    -fsanitize=address) stops the program's threads with ptrace to scan them; inside it
    cannot, and says so, instead of reporting the leak. Everything else matches."""
    outside = run_outside(_asan(programs, 1))
    inside = run_inside(_asan(programs, 1), allow=[str(programs)])
    assert (outside.status, outside.stdout) == (1, "ran 1\n")
    assert "ERROR: LeakSanitizer: detected memory leaks" in outside.stderr
    assert (inside.status, inside.stdout) == (1, "ran 1\n")
    assert "LeakSanitizer has encountered a fatal error" in inside.stderr
    assert "LeakSanitizer does not work under ptrace" in inside.stderr


def test_sqlite3_runs_the_same(programs: Path) -> None:
    outside, _ = same(sh(f"sqlite3 /tmp/compat.db '.read {programs}/compat.sql' && "
                         "sqlite3 -readonly /tmp/compat.db 'SELECT count(*) FROM item' && "
                         "ls /tmp"), allow=[str(programs)])
    assert "the sandbox runs sqlite" in outside.stdout and "\nok\n" in outside.stdout, outside


def test_node_runs_the_same(programs: Path) -> None:
    outside, _ = same(["node", f"{programs}/compat.js"], allow=[str(programs)])
    assert (outside.status, outside.stderr) == (3, "to stderr\n"), outside
    assert "http: you asked for /compat" in outside.stdout, outside


def test_node_cannot_list_network_interfaces_which_the_profile_denies() -> None:
    """docs/profiles.md, default, **unix-and-inet-sockets-only**: os.networkInterfaces()
    asks the kernel over a netlink socket (getifaddrs(3)), which is EPERM; node throws.
    Outside it lists at least the loopback."""
    script = ("const os = require('node:os'); "
              "try { console.log('lo' in os.networkInterfaces()); } "
              "catch (e) { console.log(e.code, e.info.syscall, e.info.errno); }")
    outside = run_outside(["node", "-e", script])
    inside = run_inside(["node", "-e", script])
    assert (outside.status, outside.stdout, outside.stderr) == (0, "true\n", "")
    assert (inside.status, inside.stdout, inside.stderr) == (
        0, "ERR_SYSTEM_ERROR uv_interface_addresses 1\n", "")
    assert inside.denied.startswith("sandboxer: denied: socket \u00d7")  # AF_NETLINK
