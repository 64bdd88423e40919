"""Writable grants (``:rw``): writable by the plugin, and what it makes belongs on the host to
the grant's owner, for every kind; never a set-uid/set-gid file or a device node.

Issue 17 found a ``:rw`` grant of a root-owned 0755 directory unwritable (EACCES: the plugin
runs as a host uid of its own), files written elsewhere owned by uid 1,800,000-odd, and WASI
writing as root. Rootful grants are now idmapped mounts (sandbox/idmap.py): the grant's owner
stands for the plugin. That gives the plugin its owner's say over the grant, so the other half
is a plugin that tries to leave a set-uid file there, which would be a set-uid program of the
owner (root, here) for anyone reaching it through another mount.

The plugins are a stranger's: a bare python file, a plain sh external plugin (the handshake
and one method, DESIGN section 7), a WASI command in C, and programs under ``sandboxer exec``
(sh, git).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from sandboxer import HostConfig, PluginManager, SandboxUnavailable
from wasi_build import compile_wasi

pytestmark = [pytest.mark.usefixtures("no_leaks"),
              pytest.mark.skipif(os.geteuid() != 0, reason="idmapped grants are rootful"),
              pytest.mark.asyncio(loop_scope="module")]

OWNER = 4242  # "another user" owning a grant


@pytest.fixture
def grants(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A root-owned 0755 directory and one owned by uid 4242 (0755), outside /tmp (the
    sandbox has a /tmp of its own)."""
    base = Path(os.environ.get("SANDBOXER_TEST_VAR", "/var/tmp")) / f"grants-{os.getpid()}-" \
        f"{tmp_path.name}"
    base.mkdir(mode=0o755)
    made = {"root-owned": base / "root", "user-owned": base / "user"}
    made["root-owned"].mkdir(mode=0o755)
    made["user-owned"].mkdir(mode=0o755)
    os.chown(made["user-owned"], OWNER, OWNER)
    try:
        yield made
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=True)


PYTHON = textwrap.dedent("""\
    import os

    def write(path, text):
        with open(path, "w") as f:
            f.write(text)
        return os.stat(path).st_uid

    def try_setuid(directory):
        out = {}
        target = os.path.join(directory, "plain")
        open(target, "w").close()
        for name, action in (
                ("chmod-u+s", lambda: os.chmod(target, 0o4755)),
                ("chmod-g+s", lambda: os.chmod(target, 0o2755)),
                ("create-04755", lambda: os.close(os.open(os.path.join(directory, "c4755"),
                                                           os.O_CREAT | os.O_WRONLY, 0o4755))),
                ("create-02755", lambda: os.close(os.open(os.path.join(directory, "c2755"),
                                                           os.O_CREAT | os.O_WRONLY, 0o2755))),
                ("mknod-char", lambda: os.mknod(os.path.join(directory, "null"),
                                                0o666 | 0o020000, os.makedev(1, 3))),
                ("mknod-block", lambda: os.mknod(os.path.join(directory, "disk"),
                                                 0o666 | 0o060000, os.makedev(8, 0))),
                ("mkfifo", lambda: os.mkfifo(os.path.join(directory, "fifo"), 0o666))):
            try:
                action()
                out[name] = "done"
            except OSError as exc:
                out[name] = exc.strerror
        return out
    """)

SH_PLUGIN = r"""#!/bin/sh
# One method, "write": params ["PATH"]; writes "from sh" to PATH. DESIGN section 7 only.
fd=${SANDBOXER_RPC_FD:-3}
printf '%s\n' "{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"sandboxer.handshake\",\"params\":{\"cookie\":\"$SANDBOXER_MAGIC_COOKIE\",\"protocols\":[1],\"plugin\":{\"name\":\"sh-writer\",\"version\":\"1.0.0\"},\"methods\":[\"write\"]}}" >&"$fd"
IFS= read -r answer <&"$fd" || exit 1
while IFS= read -r line <&"$fd"; do
    case $line in *'"method"'*) ;; *) continue ;; esac
    method=${line#*'"method":"'}; method=${method%%'"'*}
    id=${line#*'"id":'}; id=${id%%[!0-9]*}
    if [ "$method" = write ]; then
        path=${line#*'"params":["'}; path=${path%%'"'*}
        if printf 'from sh' > "$path"; then result=true; else result=false; fi
        printf '%s\n' "{\"jsonrpc\":\"2.0\",\"id\":$id,\"result\":$result}" >&"$fd"
    else
        printf '%s\n' "{\"jsonrpc\":\"2.0\",\"id\":$id,\"error\":{\"code\":-32601,\"message\":\"no\"}}" >&"$fd"
    fi
done
"""

WASI_WRITER = r"""
#include <stdio.h>
#include <string.h>
/* A WASI command: args on stdin as ["PATH"]; writes "from wasm" there, prints true. */
int main(void) {
    char in[4096] = {0};
    size_t n = fread(in, 1, sizeof in - 1, stdin);
    in[n] = 0;
    char *start = strchr(in, '"'), *end = start ? strchr(start + 1, '"') : NULL;
    if (!start || !end) { printf("false"); return 0; }
    *end = 0;
    FILE *f = fopen(start + 1, "w");
    if (!f) { printf("false"); return 0; }
    fputs("from wasm", f);
    fclose(f);
    printf("true");
    return 0;
}
"""


@pytest_asyncio.fixture(scope="module", loop_scope="module", autouse=True)
async def _wasi_runtime(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[None]:
    """wasmtime's process-wide WASI runtime keeps a few descriptors for the life of the
    process, made on first use: made here, before the first test's leak snapshot."""
    base = tmp_path_factory.mktemp("wasi-warmup")
    grant = base / "grant"
    grant.mkdir()
    async with PluginManager(config=HostConfig(path_roots=(str(base),))) as mgr:
        loaded = await mgr.load(_plugin("wasm", base, grant))
        assert await loaded.call("write", str(grant / "warm")) is True
    yield


def _manifest(root: Path, kind: str, entry: str, grant: Path) -> Path:
    (root / "plugin.toml").write_text(textwrap.dedent(f"""\
        [plugin]
        id = "outsider.{kind}"
        version = "1.0.0"
        type = "{kind}"
        entrypoint = "{entry}"

        [sandbox]
        allowed_paths = ["{grant}:rw"]
        """))
    return root


def _plugin(kind: str, base: Path, grant: Path) -> Path:
    root = base / kind
    root.mkdir()
    if kind == "python":
        (root / "plugin.py").write_text(PYTHON)
        return _manifest(root, kind, "plugin.py", grant)
    if kind == "external":
        script = root / "writer.sh"
        script.write_text(SH_PLUGIN)
        script.chmod(0o755)
        return _manifest(root, kind, "writer.sh", grant)
    wasm = compile_wasi(base, "writer", WASI_WRITER)
    (root / "writer.wasm").write_bytes(wasm.read_bytes())
    return _manifest(root, "wasm", "writer.wasm", grant)


@pytest.mark.parametrize("owner", ["root-owned", "user-owned"])
@pytest.mark.parametrize("kind", ["python", "external", "wasm"])
async def test_a_writable_grant_is_written_as_its_owner(tmp_path: Path, grants: dict[str, Path],
                                                        kind: str, owner: str) -> None:
    grant = grants[owner]
    plugin = _plugin(kind, tmp_path, grant)
    target = grant / f"made-by-{kind}"
    host = HostConfig(path_roots=(str(grant.parent),))
    async with PluginManager(config=host) as mgr:
        loaded = await mgr.load(plugin)
        result = await loaded.call("write", str(target), "from python")
        assert result not in (False, None) or kind == "python", result
    made, directory = target.stat(), grant.stat()
    assert (made.st_uid, made.st_gid) == (directory.st_uid, directory.st_gid), \
        f"{kind} wrote {target} as {made.st_uid}:{made.st_gid}, not as the grant's owner"
    assert target.read_text() in ("from python", "from sh", "from wasm")
    assert not made.st_mode & 0o6000


async def test_no_set_uid_file_or_device_node_reaches_the_host(tmp_path: Path,
                                                               grants: dict[str, Path]) -> None:
    grant = grants["root-owned"]
    plugin = _plugin("python", tmp_path, grant)
    async with PluginManager(config=HostConfig(path_roots=(str(grant.parent),))) as mgr:
        loaded = await mgr.load(plugin)
        outcome = await loaded.call("try_setuid", str(grant))
    assert outcome == {"chmod-u+s": "Operation not permitted",
                       "chmod-g+s": "Operation not permitted",
                       "create-04755": "Operation not permitted",
                       "create-02755": "Operation not permitted",
                       "mknod-char": "Operation not permitted",
                       "mknod-block": "Operation not permitted",
                       "mkfifo": "done"}, outcome
    for path in grant.iterdir():
        st = path.lstat()
        assert not st.st_mode & 0o6000, f"{path} is {stat.filemode(st.st_mode)}"
        assert not (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)), path
        assert (st.st_uid, st.st_gid) == (0, 0)


def _exec(grant: Path, script: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandboxer.cli", "exec", *extra,
                           "--allow-path", f"{grant}:rw", "--", "/bin/sh", "-c", script],
                          capture_output=True, text=True, timeout=120)


async def test_a_git_repository_made_outside_takes_a_commit_inside(grants: dict[str, Path]) -> None:
    """A repository a user made on the host, committed to by git inside the sandbox: git
    sees the repository as the sandbox user's (no "dubious ownership"), and the commit's
    objects belong on the host to the repository's owner."""
    repo = grants["user-owned"] / "repo"
    user = {"HOME": "/nonexistent", "PATH": "/usr/bin:/bin", "GIT_CONFIG_NOSYSTEM": "1"}

    def as_owner(*args: str) -> str:
        return subprocess.run(["setpriv", f"--reuid={OWNER}", f"--regid={OWNER}",
                               "--clear-groups", "git", *args], cwd=repo.parent, env=user,
                              capture_output=True, text=True, check=True).stdout

    as_owner("init", "-q", "-b", "main", str(repo))
    (repo / "README").write_text("made outside\n")
    os.chown(repo / "README", OWNER, OWNER)
    as_owner("-C", str(repo), "-c", "user.name=Owner", "-c", "user.email=o@example.org",
             "add", "README")
    as_owner("-C", str(repo), "-c", "user.name=Owner", "-c", "user.email=o@example.org",
             "commit", "-q", "-m", "outside")
    ran = _exec(grants["user-owned"], f"""
        cd {repo} && echo inside >> README && git add README &&
        git -c user.name=Sandbox -c user.email=s@example.org commit -q -m inside &&
        git log --format=%s""")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.split() == ["inside", "outside"]
    assert as_owner("-C", str(repo), "log", "--format=%s").split() == ["inside", "outside"]
    as_owner("-C", str(repo), "fsck", "--strict")
    strangers = [p for p in repo.rglob("*") if p.lstat().st_uid != OWNER]
    assert strangers == [], f"not the owner's: {strangers[:5]}"


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    """A filesystem that cannot be idmapped (ramfs), mounted for the test alone."""
    point = Path("/var/tmp") / f"ramfs-{os.getpid()}-{tmp_path.name}"
    point.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0777", "ramfs", str(point)], check=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=True)
        point.rmdir()


@pytest.mark.parametrize("kind", ["python", "wasm"])
async def test_a_grant_that_cannot_be_idmapped_fails_closed(tmp_path: Path, ramfs: Path,
                                                            kind: str) -> None:
    plugin = _plugin(kind, tmp_path, ramfs)
    async with PluginManager(config=HostConfig(path_roots=(str(ramfs.parent),))) as mgr:
        with pytest.raises(SandboxUnavailable) as info:
            await mgr.load(plugin)
        message = str(info.value)
        assert f"the writable allowed path {ramfs} (owner uid 0, gid 0) cannot be mounted" \
               in message and "rw-without-idmap" in message, message
        assert await mgr.list() == []
    allowing = HostConfig(path_roots=(str(ramfs.parent),), fallbacks=("rw-without-idmap",))
    async with PluginManager(config=allowing) as mgr:
        loaded = await mgr.load(plugin)
        assert "rw-without-idmap" in loaded.fallbacks
        await loaded.call("write", str(ramfs / "plain"), "x")
    uid = (ramfs / "plain").stat().st_uid  # written as its own uid: the sandbox's, or wasm's
    assert uid >= 1_800_000 if kind == "python" else uid == os.geteuid()  # supervisor's


async def test_exec_writes_as_the_grants_owner_and_host_config_can_name_another(
        tmp_path: Path, grants: dict[str, Path]) -> None:
    grant = grants["root-owned"]
    ran = _exec(grant, f"echo hi > {grant}/by-exec && id -u && stat -c %u {grant}/by-exec")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.split() == ["1000", "1000"]  # inside: the sandbox user's own file
    assert (grant / "by-exec").stat().st_uid == 0
    config = tmp_path / "sandboxer.toml"
    config.write_text('[host]\ngrant_owner = "4242:4343"\n')
    ran = subprocess.run([sys.executable, "-m", "sandboxer.cli", "exec", "--allow-path",
                          f"{grants['user-owned']}:rw", "--", "/bin/sh", "-c",
                          f"echo hi > {grants['user-owned']}/named"],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "SANDBOXER_CONFIG": str(config)})
    assert ran.returncode == 0, ran.stderr
    made = (grants["user-owned"] / "named").stat()
    assert (made.st_uid, made.st_gid) == (4242, 4343)
