"""Host paths opened once, beneath their root, through no link (sandbox/paths.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sandboxer.errors import PluginLoadError
from sandboxer.sandbox.paths import open_beneath, open_grant, open_path
from sandboxer.sandbox.policy import PathGrant


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A path root holding a directory, a file, and links inside and out of it."""
    base = tmp_path / "root"
    (base / "data" / "sub").mkdir(parents=True)
    (base / "data" / "file").write_text("inside\n")
    (base / "in-link").symlink_to("data")
    (base / "out-link").symlink_to("/etc")
    (base / "data" / "deep-out").symlink_to("../../..")
    return base


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "walk"])
@pytest.mark.parametrize("relative", ["data", "data/sub", "data/file", "."])
def test_paths_beneath_the_root_open(root: Path, relative: str, openat2: bool) -> None:
    target = os.path.normpath(root / relative)
    fd = open_beneath(str(root), target, use_openat2=openat2)
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == target
    finally:
        os.close(fd)


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "walk"])
@pytest.mark.parametrize("relative", ["in-link", "out-link", "out-link/passwd", "in-link/sub",
                                      "data/deep-out", "data/deep-out/etc"])
def test_a_link_anywhere_below_the_root_is_refused(root: Path, relative: str,
                                                    openat2: bool) -> None:
    """Even a link that stays inside the root: a co-tenant can retarget it after the check."""
    with pytest.raises(OSError) as info:
        os.close(open_beneath(str(root), str(root / relative), use_openat2=openat2))
    assert info.value.errno in (40, 20)  # ELOOP; ENOTDIR when O_NOFOLLOW meets it mid-walk


def test_a_path_outside_the_root_is_refused(root: Path) -> None:
    with pytest.raises(OSError) as info:
        open_beneath(str(root / "data"), str(root / "in-link"))
    assert info.value.errno == 18  # EXDEV


def test_the_fd_keeps_what_was_opened_when_the_name_is_swapped(root: Path) -> None:
    with open_grant(PathGrant(str(root / "data"), root=str(root))) as opened:
        os.rename(root / "data", root / "moved")
        (root / "data").symlink_to("/etc")
        assert sorted(os.listdir(opened.proc_path)) == ["deep-out", "file", "sub"]
        assert opened.host_path == str(root / "data")  # what it was when opened
        assert opened.is_dir


def test_grant_errors_name_the_path_the_root_and_why(root: Path) -> None:
    cases = {
        "out-link": "a symbolic link is on its way",
        "nothing-here": "it does not exist",
    }
    for name, why in cases.items():
        grant = PathGrant(str(root / name), root=str(root))
        with pytest.raises(PluginLoadError) as info:
            open_grant(grant, plugin_id="acme.paths")
        message = str(info.value)
        assert message.startswith(f"plugin acme.paths: allowed path {root / name} cannot be "
                                  f"opened beneath its path root {root}: {why}")
        assert info.value.plugin_id == "acme.paths"


def test_an_operators_grant_follows_no_link_either(root: Path) -> None:
    """No path root: opened from "/", through no link, since whoever owns a directory on the
    way could retarget it; the error says where the path leads now."""
    with open_grant(PathGrant(str(root / "data"))) as opened:
        assert opened.host_path == str(root / "data") and opened.is_dir
    with pytest.raises(PluginLoadError) as info:
        open_grant(PathGrant(str(root / "out-link")), plugin_id="exec")
    assert str(info.value) == (f"plugin exec: allowed path {root / 'out-link'} cannot be "
                               "opened: a symbolic link is on its way (grants are opened "
                               "through no link below their root: grant the directory the "
                               "link points to); it resolves to /etc now")
    with pytest.raises(PluginLoadError, match="does not exist"):
        open_grant(PathGrant(str(root / "missing")))


def test_the_systems_paths_follow_links() -> None:
    with open_path("/dev/null") as opened:
        assert not opened.is_dir
    with open_path("/etc/localtime") as opened:
        assert opened.host_path.startswith("/usr/share/zoneinfo")


def test_close_is_idempotent(root: Path) -> None:
    opened = open_path(str(root))
    fd = opened.fd
    opened.close()
    opened.close()
    with pytest.raises(OSError):
        os.fstat(fd)
