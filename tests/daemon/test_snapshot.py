"""daemon/snapshot.py, as a tenant would attack it: a root daemon copies a client's plugin
with the client's own rights, and never gives it anything it could not read itself.

Run as root, with real files of unprivileged uids (1001, 1002: no /etc/passwd entries needed).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandboxer.daemon.snapshot import Caller, receive, snapshot_as
from sandboxer.errors import PluginLoadError

pytestmark = [
    pytest.mark.usefixtures("no_leaks"),
    pytest.mark.skipif(os.geteuid() != 0, reason="snapshots run walkers as other uids: root"),
]

ALICE = Caller(uid=1001, gid=1001, groups=(), pid=4242)
BOB_UID = 1002
SHARED_GID = 2001  # a group Alice is in as a supplementary group (only in some tests)


@pytest.fixture
def base() -> Iterator[Path]:
    """A world-searchable directory for the tenants' homes (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="snapshot-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.fixture
def into(tmp_path: Path) -> Path:
    """The daemon's staging directory: root-owned, 0700."""
    path = tmp_path / "into"
    path.mkdir(mode=0o700)
    return path


def put(path: Path, content: bytes | None = None, *, uid: int = 1001, gid: int | None = None,
        mode: int | None = None) -> Path:
    """A directory (content None) or file, owned by ``uid``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        path.mkdir(exist_ok=True)
    else:
        path.write_bytes(content)
    os.chown(path, uid, uid if gid is None else gid)
    path.chmod(mode if mode is not None else (0o755 if content is None else 0o644))
    return path


def link(path: Path, target: str, *, uid: int = 1001) -> Path:
    path.symlink_to(target)
    os.chown(path, uid, uid, follow_symlinks=False)
    return path


def tree(root: Path) -> dict[str, tuple[object, ...]]:
    """What the copy holds, read without following a link; every entry must be root's."""
    found: dict[str, tuple[object, ...]] = {}
    entries = [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]
    for path in entries:
        st = path.lstat()
        assert st.st_uid == 0, f"{path} is not root's"
        rel = str(path.relative_to(root)) if path != root else "."
        if stat.S_ISLNK(st.st_mode):
            found[rel] = ("l", os.readlink(path))
        elif stat.S_ISDIR(st.st_mode):
            found[rel] = ("d", stat.S_IMODE(st.st_mode))
        else:
            found[rel] = ("f", stat.S_IMODE(st.st_mode), path.read_bytes())
    return found


def alice_plugin(base: Path) -> Path:
    home = put(base / "alice")
    plug = put(home / "plug")
    put(plug / "plugin.toml", b'[plugin]\nid = "a"\n')
    put(plug / "plugin.py", b"def hello():\n    return 1\n")
    put(plug / "bin" / "run", b"#!/bin/sh\n", mode=0o755)
    put(plug / "pkg" / "deep" / "data.bin", bytes(range(256)) * 40)
    put(plug / "pkg" / "deep" / "empty", b"")
    link(plug / "alias", "pkg/deep/data.bin")
    return plug


# -- what the caller can read is copied as a cold launch would copy it -----------------------


async def test_a_directory_the_caller_can_read_is_copied_with_its_names_contents_and_modes(
    base: Path, into: Path
) -> None:
    plug = alice_plugin(base)
    put(plug / "suid", b"x", mode=0o4755)  # copied, but never setuid
    put(plug / "private", b"mine", mode=0o600)  # her own: she reads it
    put(plug / "shared", b"group", uid=BOB_UID, gid=SHARED_GID, mode=0o640)
    os.mkfifo(plug / "fifo")  # anything but directories, files and links is left out
    alice = Caller(uid=1001, gid=1001, groups=(SHARED_GID,))

    copy = await snapshot_as(alice, str(plug), str(into))

    assert copy == str(into / "plug")
    assert tree(Path(copy)) == {
        ".": ("d", 0o755),
        "alias": ("l", "pkg/deep/data.bin"),
        "bin": ("d", 0o755),
        "bin/run": ("f", 0o755, b"#!/bin/sh\n"),
        "pkg": ("d", 0o755),
        "pkg/deep": ("d", 0o755),
        "pkg/deep/data.bin": ("f", 0o644, bytes(range(256)) * 40),
        "pkg/deep/empty": ("f", 0o644, b""),
        "plugin.py": ("f", 0o644, b"def hello():\n    return 1\n"),
        "plugin.toml": ("f", 0o644, b'[plugin]\nid = "a"\n'),
        "private": ("f", 0o644, b"mine"),
        "shared": ("f", 0o644, b"group"),
        "suid": ("f", 0o755, b"x"),
    }


async def test_a_bare_file_is_copied(base: Path, into: Path) -> None:
    script = put(base / "alice" / "tool.py", b"print('hi')\n", mode=0o700)

    copy = await snapshot_as(ALICE, str(script), str(into))

    assert copy == str(into / "tool.py")
    assert tree(Path(copy)) == {".": ("f", 0o755, b"print('hi')\n")}


async def test_links_in_the_path_s_prefix_are_followed_as_the_caller_may(
    base: Path, into: Path
) -> None:
    plug = alice_plugin(base)
    link(base / "alice" / "current", "plug")  # her own link, to her own directory
    put(base / "bob", uid=BOB_UID, mode=0o700)
    put(base / "bob" / "plug", uid=BOB_UID)
    link(base / "alice" / "bobs", str(base / "bob"))  # a link she may make, not traverse

    copy = await snapshot_as(ALICE, str(base / "alice" / "current"), str(into))
    assert tree(Path(copy)) == tree_of_source(plug, into)
    shutil.rmtree(copy)
    with pytest.raises(PluginLoadError, match="Permission denied") as refused:
        await snapshot_as(ALICE, str(base / "alice" / "bobs" / "plug"), str(into))
    assert str(base / "alice" / "bobs" / "plug") in str(refused.value)
    assert os.listdir(into) == []


def tree_of_source(plug: Path, into: Path) -> dict[str, tuple[object, ...]]:
    """The tree a snapshot of ``plug`` shows (made by root here, as a reference)."""
    reference = into.parent / "reference"
    shutil.copytree(plug, reference, symlinks=True)
    try:
        for path in [reference, *reference.rglob("*")]:
            if not path.is_symlink():
                path.chmod(0o755 if path.is_dir() or path.stat().st_mode & 0o111 else 0o644)
        return tree(reference)
    finally:
        shutil.rmtree(reference)


# -- what the caller cannot read is refused, naming the path ---------------------------------


def _bobs_private_directory(base: Path) -> Path:
    put(base / "bob", uid=BOB_UID, mode=0o700)
    return put(base / "bob" / "plug", uid=BOB_UID)


def _root_file_in_alices_directory(base: Path) -> Path:
    plug = alice_plugin(base)
    put(plug / "secret", b"root's", uid=0, mode=0o600)
    return plug


def _through_a_directory_without_search_permission(base: Path) -> Path:
    put(base / "bob", uid=BOB_UID, mode=0o700)
    put(base / "bob" / "open", uid=BOB_UID, mode=0o755)
    return put(base / "bob" / "open" / "plug", uid=BOB_UID, mode=0o755)


def _last_component_a_link_to_bobs_directory(base: Path) -> Path:
    _bobs_private_directory(base)
    put(base / "alice")
    return link(base / "alice" / "plug", str(base / "bob" / "plug"))


def _etc_shadow(base: Path) -> Path:
    return Path("/etc/shadow")


def _a_fifo(base: Path) -> Path:
    put(base / "alice")
    os.mkfifo(base / "alice" / "plug")
    return base / "alice" / "plug"


def _missing(base: Path) -> Path:
    return put(base / "alice") / "nothing"


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (_bobs_private_directory, "Permission denied"),
        (_root_file_in_alices_directory, "Permission denied ('secret')"),
        (_through_a_directory_without_search_permission, "Permission denied"),
        (_last_component_a_link_to_bobs_directory, "Permission denied"),
        (_etc_shadow, "Permission denied"),
        (_a_fifo, "neither a directory nor a regular file"),
        (_missing, "No such file or directory"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
async def test_what_the_caller_cannot_read_is_refused_naming_the_path(
    base: Path, into: Path, make, error: str
) -> None:
    path = make(base)

    with pytest.raises(PluginLoadError) as refused:
        await snapshot_as(ALICE, str(path), str(into))

    message = str(refused.value)
    assert f"plugin path {str(path)!r} (client uid 1001, pid 4242)" in message
    assert error in message
    assert os.listdir(into) == []


async def test_the_daemon_s_own_supplementary_groups_are_not_the_walker_s(
    base: Path, into: Path
) -> None:
    plug = alice_plugin(base)
    put(plug / "staff-only", b"the daemon's group", uid=0, gid=7777, mode=0o640)
    before = os.getgroups()
    os.setgroups([7777])  # the daemon is in group 7777; Alice (groups=()) is not
    try:
        with pytest.raises(PluginLoadError, match=r"Permission denied \('staff-only'\)"):
            await snapshot_as(ALICE, str(plug), str(into))
        alice_in_it = Caller(uid=1001, gid=1001, groups=(7777,))
        copy = await snapshot_as(alice_in_it, str(plug), str(into))
    finally:
        os.setgroups(before)
    assert tree(Path(copy))["staff-only"] == ("f", 0o644, b"the daemon's group")


@pytest.mark.parametrize(
    "target",
    ["/etc/shadow", "../../bob/plug/secret", "pkg/../../../etc/shadow", "/"],
)
async def test_a_link_in_the_tree_that_leads_out_is_refused_never_followed(
    base: Path, into: Path, target: str
) -> None:
    plug = alice_plugin(base)
    put(base / "bob", uid=BOB_UID, mode=0o711)
    put(base / "bob" / "plug", uid=BOB_UID)
    put(base / "bob" / "plug" / "secret", b"BOB'S SECRET", uid=BOB_UID, mode=0o600)
    link(plug / "plugin.toml.real", target)  # root would follow it reading the manifest

    with pytest.raises(PluginLoadError, match="a symbolic link where none may be") as refused:
        await snapshot_as(ALICE, str(plug), str(into))

    assert f"'plug/plugin.toml.real' -> {target!r}" in str(refused.value)
    assert os.listdir(into) == []


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("{base}/alice/plug/../../bob/plug", "'..' is refused"),
        ("{base}/alice/plug/..", "'..' is refused"),
        ("{base}/alice/..", "'..' is refused"),
        ("alice/plug", "must be an absolute path"),
        ("../alice/plug", "must be an absolute path"),
        ("/", "names no file or directory"),
        ("{base}/alice/plug/.", "names no file or directory"),
        ("{base}/alice/plug\0/etc", "must be an absolute path"),
        ("/" + "x" * 5000, "longer than 4096"),
    ],
)
async def test_dot_dot_tricks_in_the_path_are_refused(
    base: Path, into: Path, path: str, error: str
) -> None:
    alice_plugin(base)
    _bobs_private_directory(base)

    with pytest.raises(PluginLoadError, match=error):
        await snapshot_as(ALICE, path.format(base=base), str(into))
    assert os.listdir(into) == []


async def test_a_trailing_slash_names_the_directory(base: Path, into: Path) -> None:
    plug = alice_plugin(base)
    assert await snapshot_as(ALICE, f"{plug}/", str(into)) == str(into / "plug")


async def test_a_copy_that_is_already_there_is_refused_and_left_alone(
    base: Path, into: Path
) -> None:
    plug = alice_plugin(base)
    (into / "plug").mkdir()
    (into / "plug" / "mine").write_text("the daemon's")

    with pytest.raises(PluginLoadError, match="File exists"):
        await snapshot_as(ALICE, str(plug), str(into))
    assert os.listdir(into / "plug") == ["mine"]


# -- a tenant racing the walk ----------------------------------------------------------------

SWAPPER = textwrap.dedent("""\
    import os, sys
    plug, secret = sys.argv[1:3]
    while True:
        for victim in (plug + "/pkg", plug):
            os.rename(victim, victim + ".real")
            os.symlink(secret, victim)
            os.unlink(victim)
            os.rename(victim + ".real", victim)
""")


async def test_swapping_directories_for_links_to_root_s_during_snapshots_leaks_nothing(
    base: Path, into: Path
) -> None:
    plug = alice_plugin(base)
    put(plug / "pkg" / "data.txt", b"public")
    secret = put(base / "secret", uid=0, mode=0o700)
    put(secret / "data.txt", b"ROOT-ONLY SECRET", uid=0, mode=0o600)
    put(secret / "deep", uid=0, mode=0o700)
    put(secret / "deep" / "data.bin", b"ROOT-ONLY SECRET", uid=0, mode=0o600)
    swapper = subprocess.Popen(
        [sys.executable, "-I", "-c", SWAPPER, str(plug), str(secret)],
        user=1001, group=1001, extra_groups=[], cwd="/",
    )
    outcomes: dict[str, int] = {}
    try:
        for _ in range(200):
            try:
                copy = Path(await snapshot_as(ALICE, str(plug), str(into)))
            except PluginLoadError as exc:
                reason = str(exc).split(": ", 1)[1][:40]
                outcomes[reason] = outcomes.get(reason, 0) + 1
                assert os.listdir(into) == []
                continue
            outcomes["copied"] = outcomes.get("copied", 0) + 1
            for entry in tree(copy).values():
                assert not any(b"SECRET" in v for v in entry if isinstance(v, bytes))
                assert entry[0] != "l" or not str(entry[1]).startswith("/")
            shutil.rmtree(copy)
        assert swapper.poll() is None, "the swapper stopped: the race did not run"
    finally:
        swapper.kill()
        swapper.wait()
    assert sum(outcomes.values()) == 200
    print(outcomes)


# -- limits ----------------------------------------------------------------------------------


async def test_too_many_entries_is_refused_and_nothing_is_left(base: Path, into: Path) -> None:
    plug = alice_plugin(base)  # 9 entries below it
    assert await snapshot_as(ALICE, str(plug), str(into), max_entries=9)
    shutil.rmtree(into / "plug")

    with pytest.raises(PluginLoadError, match="more than 8 entries"):
        await snapshot_as(ALICE, str(plug), str(into), max_entries=8)
    assert os.listdir(into) == []


async def test_too_many_bytes_is_refused_and_nothing_is_left(base: Path, into: Path) -> None:
    plug = alice_plugin(base)
    size = sum(p.stat().st_size for p in plug.rglob("*") if p.is_file() and not p.is_symlink())
    assert await snapshot_as(ALICE, str(plug), str(into), max_bytes=size)
    shutil.rmtree(into / "plug")

    with pytest.raises(PluginLoadError, match=f"more than {size - 1} bytes"):
        await snapshot_as(ALICE, str(plug), str(into), max_bytes=size - 1)
    assert os.listdir(into) == []


async def test_a_cancelled_snapshot_leaves_no_walker_and_no_copy(base: Path, into: Path) -> None:
    plug = alice_plugin(base)
    put(plug / "big", b"\1" * (32 << 20))
    for delay in (0.0, 0.03, 0.1):
        task = asyncio.create_task(snapshot_as(ALICE, str(plug), str(into)))
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            assert os.listdir(into) == []
        else:  # it finished first
            shutil.rmtree(into / "plug")


# -- a hostile walker: the daemon's side against whatever a tenant's process sends -----------


def h(**header: object) -> bytes:
    return json.dumps(header).encode() + b"\n"


TOP = h(kind="d", path=["plug"], mode=0o755)


def f(
    name: str | list[str], data: bytes, *, size: int | None = None, mode: object = 0o644
) -> bytes:
    path = ["plug", name] if isinstance(name, str) else name
    header = h(kind="f", path=path, mode=mode, size=len(data) if size is None else size)
    return header + data


HOSTILE = {
    "a name with a slash": (TOP + f("a/b", b"x"), "bad entry path"),
    "a name that is ..": (TOP + f("..", b"x"), "bad entry path"),
    "a name that is .": (TOP + h(kind="d", path=["plug", "."], mode=0o755), "bad entry path"),
    "an empty name": (TOP + f("", b"x"), "bad entry path"),
    "a NUL in a name": (TOP + f("a\0b", b"x"), "bad entry path"),
    "a name that is no string": (TOP + h(kind="d", path=["plug", 7], mode=0), "bad entry path"),
    "a path that is a string": (TOP + h(kind="d", path="plug/x", mode=0), "bad entry path"),
    "a name of 256 bytes": (TOP + f("x" * 256, b""), "bad entry path"),
    "a first entry other than the plugin": (h(kind="d", path=["etc"], mode=0o755), "first"),
    "a second top-level entry": (TOP + h(kind="d", path=["other"], mode=0), "outside any"),
    "an entry inside a file": (f(["plug"], b"") + f(["plug", "x"], b""), "outside any"),
    "an entry through a link": (
        TOP + h(kind="l", path=["plug", "l"], target="d") + f(["plug", "l", "x"], b""),
        "outside any",
    ),
    "a file over the byte limit": (TOP + f("big", b"", size=101), "more than 100 bytes"),
    "files together over the byte limit": (
        TOP + f("a", b"x" * 60) + f("b", b"x" * 60),
        "more than 100 bytes",
    ),
    "fewer bytes than announced": (TOP + f("a", b"abcd", size=10), "ended 4 bytes into"),
    "too many entries": (TOP + b"".join(f(str(i), b"") for i in range(5)), "more than 4 entries"),
    "the same name twice": (TOP + f("a", b"1") + f("a", b"2"), "File exists"),
    "garbage JSON": (b"{nope\n", "not JSON"),
    "JSON that is no object": (b"[1, 2]\n", "no object"),
    "deeply nested JSON": (b"[" * 30000 + b"\n", "not JSON"),
    "a header line without end": (b"x" * 70000, "header line over"),
    "a kind that is none": (TOP + h(kind="p", path=["plug", "p"]), "bad kind"),
    "a mode that is a string": (TOP + f("a", b"", mode="0755"), "bad mode"),
    "a mode that is a bool": (TOP + h(kind="d", path=["plug", "d"], mode=True), "bad mode"),
    "a mode out of range": (TOP + f("a", b"", mode=0o17777), "bad mode"),
    "a negative size": (TOP + f("a", b"", size=-1), "bad size"),
    "an absolute link": (
        TOP + h(kind="l", path=["plug", "l"], target="/etc/shadow"),
        "a symbolic link where none may be",
    ),
    "a link up and out": (
        TOP + h(kind="l", path=["plug", "l"], target="a/../../x"),
        "a symbolic link where none may be",
    ),
    "a link with a NUL": (TOP + h(kind="l", path=["plug", "l"], target="a\0b"), "bad link"),
    "a link as the plugin itself": (h(kind="l", path=["plug"], target="x"), "a link as the"),
    "a stream that ends mid-walk": (TOP + f("a", b"1"), "ended before the walk did"),
    "nothing at all": (b"", "ended before the walk did"),
    "an end before any entry": (h(kind="end"), "before its first entry"),
    "the walker's own error": (
        h(kind="error", error="Permission denied", path="secret"),
        "copying it as that uid failed: Permission denied ('secret')",
    ),
    "an error with terminal escapes": (
        h(kind="error", error="\x1b[2Jgone"),
        r"failed: '\x1b[2Jgone'",
    ),
}


@pytest.mark.parametrize(("stream", "error"), HOSTILE.values(), ids=HOSTILE.keys())
async def test_a_hostile_walker_is_refused_and_leaves_nothing(
    base: Path, into: Path, stream: bytes, error: str
) -> None:
    ours, theirs = socket.socketpair()
    try:
        sender = asyncio.create_task(asyncio.to_thread(_send_and_close, theirs, stream))
        with pytest.raises(PluginLoadError) as refused:
            await receive(ours, ALICE, str(base / "plug"), str(into), max_bytes=100,
                          max_entries=4, timeout=10)
        await sender
    finally:
        ours.close()
        theirs.close()
    assert error in str(refused.value)
    assert f"plugin path {str(base / 'plug')!r} (client uid 1001" in str(refused.value)
    assert os.listdir(into) == []


def _send_and_close(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass  # the daemon stopped reading: it refused before the end
    sock.close()


async def test_a_walker_that_never_finishes_times_out(base: Path, into: Path) -> None:
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(TOP + f("a", b"ab", size=3))  # and then nothing, never closed
        with pytest.raises(PluginLoadError, match=r"not read within 0.3 s"):
            await receive(ours, ALICE, str(base / "plug"), str(into), timeout=0.3)
    finally:
        ours.close()
        theirs.close()
    assert os.listdir(into) == []


async def test_a_well_behaved_stream_is_written_with_safe_modes(base: Path, into: Path) -> None:
    ours, theirs = socket.socketpair()
    stream = (
        h(kind="d", path=["plug"], mode=0o3777)
        + h(kind="d", path=["plug", "sub"], mode=0o1777)
        + f(["plug", "sub", "run"], b"#!", mode=0o6777)
        + f(["plug", "data"], b"d" * 300_000, mode=0o666)
        + h(kind="l", path=["plug", "l"], target="./sub//run")
        + h(kind="end")
    )
    try:
        sender = asyncio.create_task(asyncio.to_thread(_send_and_close, theirs, stream))
        copy = await receive(ours, ALICE, str(base / "plug"), str(into), timeout=10)
        await sender
    finally:
        ours.close()
        theirs.close()
    assert tree(Path(copy)) == {
        ".": ("d", 0o755),
        "data": ("f", 0o644, b"d" * 300_000),
        "l": ("l", "./sub//run"),
        "sub": ("d", 0o755),
        "sub/run": ("f", 0o755, b"#!"),
    }
