"""vagrant/run on a fresh machine: it installs what it needs before it boots anything.

The README's `vagrant/run -- sandboxer doctor --json` failed with "debootstrap: command not
found" until `make vm-setup` had run. Here the package manager is simulated (a dpkg-query that
finds nothing installed, an apt-get that records what it is asked), so the test proves the
order without touching the machine's packages; qemu-run then stops at its own usage error
(no command), before any image is built or guest booted.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent


@pytest.mark.timeout(120)
def test_vagrant_run_installs_the_vm_packages_first(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("installing packages needs root; vagrant/run needs root anyway")
    stubs = tmp_path / "bin"
    stubs.mkdir()
    asked = tmp_path / "apt-get.log"
    (stubs / "dpkg-query").write_text("#!/bin/sh\nexit 1\n")  # nothing is installed
    (stubs / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {asked}\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}"}
    run = subprocess.run([str(REPO / "vagrant" / "run")], env=env, capture_output=True,
                         text=True, timeout=110)
    calls = asked.read_text().splitlines() if asked.exists() else []
    installs = [c.split() for c in calls if c.split()[:1] == ["install"]]
    assert installs, (calls, run.stderr)
    wanted = {"debootstrap", "qemu-system-x86", "qemu-utils", "e2fsprogs", "openssh-client"}
    assert wanted <= set(installs[-1]), installs
    # Then qemu-run itself, which refuses the missing command: nothing was booted.
    assert run.returncode == 2 and "no command given" in run.stderr, run.stderr
    assert run.stdout == ""  # the installers' chatter goes to stderr
    assert "vm-setup: installing" in run.stderr
