"""``sandboxer exec --learn FILE.toml`` (sandboxer/_learn.py): learn the groups a program
uses under a profile's other isolation, write a profile of exactly those, and run the program
under it (``--profile FILE.toml``) with no denial and the same output.

Real programs: a C program a stranger would write (an inet socket and a fork, both denied by
the strict profile), sh and python3; and keyctl, which learning still refuses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from conftest import REPO
from sandboxer.sandbox import denials
from sandboxer.sandbox.seccomp import syscall_groups
from sandboxer.sandbox.syscall_groups import NEVER_LEARNED

pytestmark = pytest.mark.usefixtures("no_leaks")

NET_FORK_C = r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
int main(void) {
    int s = socket(AF_INET, SOCK_STREAM, 0);
    printf("socket: %s\n", s < 0 ? strerror(errno) : "ok");
    pid_t p = fork();
    if (p == 0) _exit(7);
    int st = 0;
    if (p > 0) waitpid(p, &st, 0);
    printf("fork: %s %d\n", p < 0 ? strerror(errno) : "ok", p > 0 ? WEXITSTATUS(st) : -1);
    long k = syscall(SYS_keyctl, 0, -3, 0, 0, 0);
    printf("keyctl: %s\n", k < 0 ? strerror(errno) : "allowed");
    return 0;
}
"""


def sandboxer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandboxer.cli", *args], capture_output=True,
                          text=True, timeout=180, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def net_fork(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if denials.available() is not None:
        pytest.skip(f"learn mode needs seccomp user notification: {denials.available()}")
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to build the C program")
    root = tmp_path_factory.mktemp("netfork")
    (root / "prog.c").write_text(NET_FORK_C)
    subprocess.run([gcc, "-o", str(root / "prog"), str(root / "prog.c")], check=True,
                   timeout=120)
    return root / "prog"


def test_a_learned_profile_runs_the_program_with_no_denial(net_fork, tmp_path):
    prog = str(net_fork)
    # Under strict as it is: the socket and the fork are denied (so this test can fail).
    strict = sandboxer("exec", "--profile", "strict", "--allow-path", prog, "--", prog)
    assert strict.stdout.splitlines()[:2] == ["socket: Operation not permitted",
                                              "fork: Operation not permitted -1"]
    learned = tmp_path / "netfork.toml"
    learn = sandboxer("exec", "--profile", "strict", "--allow-path", prog,
                      "--learn", str(learned), "--", prog)
    assert learn.returncode == 0, learn.stderr
    assert learn.stdout.splitlines() == ["socket: ok", "fork: ok 7",
                                         "keyctl: Operation not permitted"]
    # keyctl stays refused while learning (no profile may allow it), and says so.
    assert "denied: keyctl ×1 (group keyring, denied in every profile)" in learn.stderr
    text = learned.read_text()
    profile = tomllib.loads(text)
    groups = profile["seccomp"]["groups"]
    assert "inet" in groups and "processes" in groups
    assert not {"memfd", "exec-fd", "aio", "ipc", "ioctl", "personality"} & set(groups)
    assert "    # inet: socket\n" in text and "# processes: clone" in text
    assert "keyctl x1 (group keyring, denied in every profile)" in text
    assert profile["limits"]["memory"] == "64MiB"  # strict's limits and mounts
    assert profile["mounts"]["tmp_exec"] is False
    again = sandboxer("exec", "--profile", str(learned), "--allow-path", prog, "--", prog)
    assert again.returncode == 0, again.stderr
    assert again.stdout == learn.stdout
    # keyctl's EPERM is still a denial; nothing else is.
    assert again.stderr.strip().splitlines()[-1] == \
        "sandboxer: denied: keyctl ×1 (group keyring, denied in every profile)"


@pytest.mark.parametrize(("name", "argv", "expect"), [
    ("sh", ["sh", "-c", "echo hi | tr h H; ls / >/dev/null"], "Hi\n"),
    ("python3", ["python3", "-c", "import socket, threading, subprocess; "
                 "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
                 "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join(); "
                 "print(subprocess.run(['true']).returncode)"], "thread\n0\n"),
])
def test_learned_profiles_of_real_programs(net_fork, tmp_path, name, argv, expect):
    learned = tmp_path / f"{name}.toml"
    learn = sandboxer("exec", "--profile", "strict", "--learn", str(learned), "--", *argv)
    assert (learn.returncode, learn.stdout) == (0, expect), learn.stderr
    assert "denied:" not in learn.stderr
    again = sandboxer("exec", "--profile", str(learned), "--", *argv)
    assert (again.returncode, again.stdout) == (0, expect), again.stderr
    assert "denied" not in again.stderr


def test_the_groups_learn_mode_never_allows_are_denied_groups():
    table = syscall_groups("default")
    assert set(NEVER_LEARNED) <= {d.name for d in table.denied}
    for denied in table.denied:  # no group allows them: learning refuses them
        for name in denied.syscalls:
            assert table.allowing(name, (0,) * 6) == []
