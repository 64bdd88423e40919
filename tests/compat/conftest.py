"""Fixtures of the compatibility suite (harness.py runs and compares).

The suite needs root: the baseline runs in a mount namespace of its own (a private /tmp)
as an ordinary account, and ``sandboxer exec`` runs rootful, as in the rest of the suite.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from .harness import baseline_user, nothing_left

PROGRAMS = Path(__file__).resolve().parent / "programs"


@pytest.fixture(scope="session")
def compat_host() -> None:
    """What the harness needs of the host: root, and an ordinary account of uid 1000."""
    if os.geteuid() != 0:
        pytest.fail("the compat suite runs as root (a private /tmp for the baseline, "
                    "rootful sandboxes)")
    baseline_user()
    for tool in ("unshare", "setpriv", "env"):
        if shutil.which(tool) is None:
            pytest.fail(f"the compat suite needs {tool} (util-linux, coreutils)")


@pytest.fixture(scope="session")
def workspace(compat_host: None) -> Iterator[Path]:
    """A directory outside /tmp (the baseline's /tmp is private), readable by every uid;
    ``programs/`` in it holds the suite's program files, at the same path on both sides (a
    read-only grant inside)."""
    root = Path(tempfile.mkdtemp(prefix="sandboxer-compat-", dir="/var/tmp"))
    try:
        root.chmod(0o755)
        shutil.copytree(PROGRAMS, root / "programs")
        for path in [root / "programs", *(root / "programs").rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield root
    finally:
        shutil.rmtree(root)


@pytest.fixture
def programs(workspace: Path) -> Path:
    return workspace / "programs"


@pytest.fixture(autouse=True)
def _nothing_left(compat_host: None, no_leaks: None) -> Iterator[None]:
    """No test of the suite leaves a sandbox's process behind (harness.nothing_left); each
    ``sandboxer exec`` run also checks its cgroups are gone (harness.run_inside). Inside
    tests/conftest.py's ``no_leaks`` (fds, children, cgroups, mounts of this process),
    which then sees what is left once the orphans are gone."""
    with nothing_left():
        yield
