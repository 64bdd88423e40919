"""Escape probes on a wasm plugin's allowed paths (issue 16, point 1).

A wasm plugin runs inside the supervisor's process, as root: what keeps its WASI file access
inside its grants is only how each grant is preopened and how wasmtime resolves guest paths
beneath a preopen. The hostile program (``HOSTILE_C``) is a WASI command module in C, so every
call runs ``_start`` in a fresh instance with a fresh WASI context: a loader that preopened the
grants by name again for each one would follow whatever link had been put in a grant's place
since the last call. The program reports each outcome as JSON (``{"ok": true, ...}`` or
``{"ok": false, "op": ..., "errno": N}``, WASI errno numbers) instead of crashing, so a test
tells "refused" from "broken".

The host side of every test (``Host``), under the test's tmp_path:

    R/                  the host's only path root: HostConfig(path_roots=(R,))
      x/                granted "R/x:rw"
        sub/            granted "R/x/sub" (or "R/x/sub:rw"), holding own.txt
    secret/             0700, root's, outside every root: secret.txt (0600)
    outside.txt         beside the root: a file no write may reach

After every probe the host is compared with what the test wrote: the secret, outside.txt (its
bytes and times) and nothing new beside them; probes that aim at /etc check that nothing
appeared there. Everything goes through a real PluginManager, as a user loads plugins.

The issue's attack (``test_a_grant_swapped_for_a_link_by_the_plugin``) escaped on 9a2199a for
every way of planting the link; the link-following probes of ``PROBES`` were already refused
there by wasmtime's own resolution (openat2 RESOLVE_BENEATH beneath each preopen) and guard
that it stays so.
"""

from __future__ import annotations

import gc
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import pytest
import pytest_asyncio

from sandboxer import HostConfig, PluginCallError, PluginLoadError, PluginManager, ReloadError
from wasi_build import compile_wasi

pytestmark = [pytest.mark.usefixtures("no_leaks"), pytest.mark.asyncio(loop_scope="module")]

SECRET_TEXT = "host secret behind 0700/0600: a wasm plugin must never read this\n"
OUTSIDE_TEXT = "beside the path root: no write may reach this\n"
OWN_TEXT = "the granted sub directory's own file\n"
RO_TEXT = "a read-only grant's file\n"
WASI_EINVAL, WASI_ENOENT, WASI_EPERM, WASI_ENOTCAPABLE = 28, 44, 63, 76

# -- the hostile programs ------------------------------------------------------------------------

PREOPEN_C = r"""/* The descriptor of the preopen named exactly NAME: the raw WASI view, without wasi-libc's
   choice of the longest matching preopen for a path. */
static int preopen(const char *name) {
    for (int fd = 3; fd < 64; fd++) {
        __wasi_prestat_t ps;
        char buf[1024];
        if (__wasi_fd_prestat_get((__wasi_fd_t)fd, &ps) != 0) continue;
        if (ps.u.dir.pr_name_len >= sizeof buf) continue;
        if (__wasi_fd_prestat_dir_name((__wasi_fd_t)fd, (uint8_t *)buf,
                                       ps.u.dir.pr_name_len) != 0) continue;
        buf[ps.u.dir.pr_name_len] = 0;
        if (!strcmp(buf, name)) return fd;
    }
    return -1;
}
"""

HOSTILE_C = r"""
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <wasi/api.h>

static char input[1 << 16];
static size_t input_len;
static char *arg[8];
static int nargs;

/* The string elements of the JSON array on stdin (only \" and \\ escapes). */
static void read_args(void) {
    size_t n;
    while ((n = fread(input + input_len, 1, sizeof input - 1 - input_len, stdin)) > 0)
        input_len += n;
    input[input_len] = 0;
    char *p = input;
    while (*p && nargs < 8) {
        if (*p != '"') { p++; continue; }
        char *start = ++p, *out = p;
        while (*p && *p != '"') {
            if (*p == '\\' && p[1]) p++;
            *out++ = *p++;
        }
        if (*p) p++;
        *out = 0;
        arg[nargs++] = start;
    }
}

static void put_string(const char *s, size_t n) {
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c < 0x20 || c >= 0x7f) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

static void fail(const char *op, int e) {
    printf("{\"ok\":false,\"op\":\"%s\",\"errno\":%d}", op, e);
}
static void ok(void) { printf("{\"ok\":true}"); }

@PREOPEN_C@
static void read_fd(int fd) {
    char buf[4096];
    ssize_t n = read(fd, buf, sizeof buf);
    int e = errno;
    close(fd);
    if (n < 0) { fail("read", e); return; }
    printf("{\"ok\":true,\"data\":");
    put_string(buf, (size_t)n);
    printf("}");
}

static void write_fd(int fd, const char *text) {
    ssize_t n = write(fd, text, strlen(text));
    int e = errno;
    close(fd);
    if (n < 0) fail("write", e); else ok();
}

static void do_open(const char *path, int flags, const char *text) {
    int fd = open(path, flags, 0644);
    if (fd < 0) { fail("open", errno); return; }
    if (text) write_fd(fd, text); else read_fd(fd);
}

static void do_list(const char *path) {
    DIR *d = opendir(path);
    if (!d) { fail("opendir", errno); return; }
    printf("{\"ok\":true,\"names\":[");
    int first = 1;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (!first) putchar(',');
        put_string(e->d_name, strlen(e->d_name));
        first = 0;
    }
    closedir(d);
    printf("]}");
}

/* The issue's attack, in one call: on the preopen DIR, move NAME (a granted directory) away
   and put a link to TARGET in its place, made HOW: "symlink" in place, "rename" (made beside
   it, renamed onto the name) or "link" (made beside it, hard-linked as the name). */
static void plant(const char *dir, const char *name, const char *target, const char *how) {
    int fd = preopen(dir);
    if (fd < 0) { fail("preopen", ENOENT); return; }
    char moved[512], beside[512];
    snprintf(moved, sizeof moved, "%s.moved", name);
    snprintf(beside, sizeof beside, "%s.link", name);
    __wasi_errno_t e = __wasi_path_rename((__wasi_fd_t)fd, name, (__wasi_fd_t)fd, moved);
    if (e) { fail("path_rename", e); return; }
    if (!strcmp(how, "symlink")) {
        e = __wasi_path_symlink(target, (__wasi_fd_t)fd, name);
        if (e) { fail("path_symlink", e); return; }
    } else {
        e = __wasi_path_symlink(target, (__wasi_fd_t)fd, beside);
        if (e) { fail("path_symlink", e); return; }
        if (!strcmp(how, "rename"))
            e = __wasi_path_rename((__wasi_fd_t)fd, beside, (__wasi_fd_t)fd, name);
        else
            e = __wasi_path_link((__wasi_fd_t)fd, 0, beside, (__wasi_fd_t)fd, name);
        if (e) { fail(how, e); return; }
    }
    ok();
}

/* path_open on the preopen DIR itself, following links: what wasmtime resolves there. */
static void raw_open(const char *dir, const char *path, const char *text) {
    int fd = preopen(dir);
    if (fd < 0) { fail("preopen", ENOENT); return; }
    __wasi_fd_t opened;
    __wasi_errno_t e = __wasi_path_open(
        (__wasi_fd_t)fd, __WASI_LOOKUPFLAGS_SYMLINK_FOLLOW, path,
        text ? __WASI_OFLAGS_CREAT | __WASI_OFLAGS_TRUNC : 0,
        text ? __WASI_RIGHTS_FD_WRITE : __WASI_RIGHTS_FD_READ, 0, 0, &opened);
    if (e) { fail("path_open", e); return; }
    if (text) write_fd((int)opened, text); else read_fd((int)opened);
}

int main(int argc, char **argv) {
    const char *m = argc > 1 ? argv[1] : "";
    read_args();
    const char *a0 = nargs > 0 ? arg[0] : "", *a1 = nargs > 1 ? arg[1] : "";
    const char *a2 = nargs > 2 ? arg[2] : "", *a3 = nargs > 3 ? arg[3] : "";
    struct stat st;
    struct timespec epoch[2] = {{1, 0}, {1, 0}};
    if (!strcmp(m, "read")) do_open(a0, O_RDONLY, NULL);
    else if (!strcmp(m, "write")) do_open(a0, O_WRONLY | O_CREAT | O_TRUNC, a1);
    else if (!strcmp(m, "append")) do_open(a0, O_WRONLY | O_CREAT | O_APPEND, a1);
    else if (!strcmp(m, "truncate")) do_open(a0, O_WRONLY | O_TRUNC, "");
    else if (!strcmp(m, "list")) do_list(a0);
    else if (!strcmp(m, "stat")) {
        if (stat(a0, &st) != 0) fail("stat", errno);
        else printf("{\"ok\":true,\"size\":%lld}", (long long)st.st_size);
    } else if (!strcmp(m, "touch")) {
        if (utimensat(AT_FDCWD, a0, epoch, 0) != 0) fail("utimensat", errno); else ok();
    } else if (!strcmp(m, "symlink")) {
        if (symlink(a0, a1) != 0) fail("symlink", errno); else ok();
    } else if (!strcmp(m, "symlink-read")) {
        if (symlink(a0, a1) != 0) fail("symlink", errno); else do_open(a1, O_RDONLY, NULL);
    } else if (!strcmp(m, "symlink-write")) {
        if (symlink(a0, a1) != 0) fail("symlink", errno);
        else do_open(a1, O_WRONLY | O_CREAT | O_TRUNC, a2);
    } else if (!strcmp(m, "rename")) {
        if (rename(a0, a1) != 0) fail("rename", errno); else ok();
    } else if (!strcmp(m, "link")) {
        if (linkat(AT_FDCWD, a0, AT_FDCWD, a1, 0) != 0) fail("link", errno); else ok();
    } else if (!strcmp(m, "link-follow")) {
        if (linkat(AT_FDCWD, a0, AT_FDCWD, a1, AT_SYMLINK_FOLLOW) != 0) fail("link", errno);
        else ok();
    } else if (!strcmp(m, "mkdir")) {
        if (mkdir(a0, 0755) != 0) fail("mkdir", errno); else ok();
    } else if (!strcmp(m, "plant")) plant(a0, a1, a2, a3);
    else if (!strcmp(m, "raw-read")) raw_open(a0, a1, NULL);
    else if (!strcmp(m, "raw-write")) raw_open(a0, a1, a2);
    else fail(m, EINVAL);
    return 0;
}
"""

# A reactor: one instance kept across calls, a fresh one only after a trap. The attack the
# same way: plant() swaps the granted directory (names from [config]), crash() traps, and
# peek() reads [config] path in the replacement instance: 1 if it read the secret, 0 if it
# read something else, -errno if it could not.
REACTOR_C = r"""
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <wasi/api.h>
#define EXPORT(name) __attribute__((export_name(name)))

__attribute__((import_module("sandboxer"), import_name("config_get")))
int32_t config_get(const char *key, int32_t key_len, char *buf, int32_t cap);

/* A string from [config] (its JSON, quotes taken off). */
static const char *config(const char *key) {
    static char buf[4][512];
    static int next;
    char *out = buf[next++ % 4];
    int32_t n = config_get(key, (int32_t)strlen(key), out, 511);
    if (n < 2 || n > 511) return "";
    out[n - 1] = 0;
    return out + 1;
}

@PREOPEN_C@
EXPORT("plant") int plant(void) {
    int fd = preopen(config("dir"));
    if (fd < 0) return -ENOENT;
    const char *name = config("name");
    char moved[512];
    strcpy(moved, name);
    strcat(moved, ".moved");
    __wasi_errno_t e = __wasi_path_rename((__wasi_fd_t)fd, name, (__wasi_fd_t)fd, moved);
    if (!e) e = __wasi_path_symlink(config("target"), (__wasi_fd_t)fd, name);
    return -(int)e;
}

EXPORT("peek") int peek(void) {
    int fd = open(config("path"), O_RDONLY);
    if (fd < 0) return -errno;
    char buf[64] = {0};
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n < 0) return -errno;
    return strncmp(buf, "host secret", 11) == 0;
}

EXPORT("crash") void crash(void) { __builtin_trap(); }
"""




@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wasm-grants-build")
    return {"hostile": compile_wasi(out, "hostile", HOSTILE_C.replace("@PREOPEN_C@", PREOPEN_C)),
            "reactor": compile_wasi(out, "reactor", REACTOR_C.replace("@PREOPEN_C@", PREOPEN_C),
                                    reactor=True)}


# -- the host side -------------------------------------------------------------------------------

@dataclass
class Host:
    base: Path
    root: Path
    x: Path
    sub: Path
    secret_dir: Path
    secret: Path
    outside: Path
    plugins: Path  # where the tests write plugin directories (not part of the host's state)
    marker: str  # a name no probe may make appear in /etc
    before: dict[str, Any]

    def state(self) -> dict[str, Any]:
        """Everything outside the path root, as the kernel reports it."""
        found: dict[str, Any] = {}
        for path in sorted(self.base.rglob("*")):
            if path == self.root or self.root in path.parents:
                continue
            st = path.lstat()
            content = path.read_bytes() if path.is_file() and not path.is_symlink() else None
            found[str(path)] = (st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, content)
        return found

    def check(self) -> None:
        assert self.secret.read_text() == SECRET_TEXT
        assert self.outside.read_text() == OUTSIDE_TEXT
        assert self.state() == self.before, "the host changed outside the path root"
        assert not os.path.lexists(f"/etc/{self.marker}"), "a probe wrote into /etc"

    def cleanup(self) -> None:
        """A probe that escaped may have left a file in /etc: take it away."""
        with_marker = Path("/etc") / self.marker
        if with_marker.is_file() or with_marker.is_symlink():
            with_marker.unlink()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    base = tmp_path / "host"
    root, secret_dir = base / "R", base / "secret"
    x, sub = root / "x", root / "x" / "sub"
    sub.mkdir(parents=True)
    (sub / "own.txt").write_text(OWN_TEXT)
    (root / "ro").mkdir()
    (root / "ro" / "data.txt").write_text(RO_TEXT)
    secret_dir.mkdir()
    (secret_dir / "secret.txt").write_text(SECRET_TEXT)
    os.chmod(secret_dir / "secret.txt", 0o600)
    os.chmod(secret_dir, 0o700)
    (base / "outside.txt").write_text(OUTSIDE_TEXT)
    os.utime(base / "outside.txt", (1_000_000_000, 1_000_000_000))
    found = Host(base, root, x, sub, secret_dir, secret_dir / "secret.txt",
                 base / "outside.txt", tmp_path / "plugins",
                 f"sandboxer-wasm-escape-{secrets.token_hex(6)}", {})
    found.before = found.state()
    try:
        yield found
    finally:
        found.cleanup()


def write_plugin(where: Path, wasm: Path, *, plugin_id: str, allowed_paths: list[str],
                 config: dict[str, Any] | None = None) -> Path:
    where.mkdir(parents=True)
    shutil.copy(wasm, where / "plugin.wasm")
    lines = ["[plugin]", f'id = "{plugin_id}"', 'version = "1.0.0"', 'type = "wasm"',
             'entrypoint = "plugin.wasm"', "", "[sandbox]",
             f"allowed_paths = {json.dumps(allowed_paths)}"]
    if config:
        lines += ["", "[config]"] + [f"{k} = {json.dumps(v)}" for k, v in config.items()]
    (where / "plugin.toml").write_text("\n".join(lines) + "\n")
    return where


@pytest_asyncio.fixture(scope="module", loop_scope="module", autouse=True)
async def _wasi_runtime(programs: dict[str, Path],
                        tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[None]:
    """wasmtime's process-wide WASI runtime keeps a few descriptors for the life of the process
    (made on first use): make them before the first test's leak snapshot."""
    base = tmp_path_factory.mktemp("wasm-grants-warmup")
    (base / "data").mkdir()
    (base / "data" / "f.txt").write_text("warm")
    plugin = write_plugin(base / "plugin", programs["hostile"], plugin_id="test.warmup",
                          allowed_paths=[str(base / "data")])
    async with PluginManager(HostConfig(path_roots=(str(base),))) as mgr:
        p = await mgr.load(plugin)
        assert await p.call("read", str(base / "data" / "f.txt")) == {"ok": True,
                                                                      "data": "warm"}
    gc.collect()
    yield


@pytest.fixture(autouse=True)
def _collect_before_leak_check(no_leaks: None) -> Any:
    """An error caught in a test sits in a cycle with its traceback: collect it before
    ``no_leaks`` counts descriptors."""
    yield
    gc.collect()


@pytest_asyncio.fixture(loop_scope="module")
async def manager(host: Host) -> AsyncIterator[PluginManager]:
    async with PluginManager(HostConfig(path_roots=(str(host.root),))) as mgr:
        yield mgr
    host.check()


def secret_read(outcome: Any) -> bool:
    return "host secret" in json.dumps(outcome)


def link_targets(host: Host) -> dict[str, str]:
    """Where the planted link leads, as text relative to x (WASI makes no absolute links)."""
    up = "../" * (len(host.x.parts) - 1)
    return {"secret-relative": "../../secret",
            "secret-through-/": up + str(host.secret_dir).lstrip("/"),
            "etc-through-/": up + "etc"}


# -- the attack --------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["symlink", "rename", "link"])
@pytest.mark.parametrize("target", ["secret-relative", "secret-through-/", "etc-through-/"])
@pytest.mark.parametrize("sub_grant", [":ro", ":rw"])
async def test_a_grant_swapped_for_a_link_by_the_plugin(manager: PluginManager, host: Host,
                                                        programs: dict[str, Path], how: str,
                                                        target: str, sub_grant: str) -> None:
    """Granted R/x:rw and R/x/sub: call 1 moves sub away and puts a link out in its place
    (made in place, renamed or hard-linked onto the name); calls 2..n read, list and write
    through /R/x/sub. Every one of them must see sub as it was granted, never the link's
    target: a WASI command's fresh instance per call used to preopen sub by name again."""
    x, sub = str(host.x), str(host.sub)
    plugin = write_plugin(host.plugins / "swap", programs["hostile"], plugin_id="test.swap",
                          allowed_paths=[f"{x}:rw", sub + (":rw" if sub_grant == ":rw" else "")])
    if sub_grant == ":ro":
        # Read-only inside writable: WASI would let the plugin write sub through x's preopen,
        # so such a pair is refused at load, as a denied path inside an allowed one is.
        with pytest.raises(PluginLoadError) as info:
            await manager.load(plugin)
        assert str(info.value) == (
            f"plugin test.swap: allowed path {sub} is read-only but lies inside the writable "
            f"allowed path {x}; WASI would let the plugin write it through {x}, so wasm "
            "plugins may not have it (grant it writable, or grant narrower directories)")
        return
    p = await manager.load(plugin)
    assert await p.call("list", sub) == {"ok": True, "names": ["own.txt"]}

    link = link_targets(host)[target]
    assert await p.call("plant", x, "sub", link, how) == {"ok": True}
    assert os.readlink(host.sub) == link  # the attack took place, on the host
    assert (host.x / "sub.moved" / "own.txt").read_text() == OWN_TEXT

    target_name = "passwd" if target.startswith("etc") else "secret.txt"
    names = ["own.txt"]
    for _ in range(3):
        listing = await p.call("list", sub)
        assert listing["ok"] and sorted(listing["names"]) == names, \
            f"/R/x/sub lists the link's target: {listing}"
        for outcome in (await p.call("read", f"{sub}/{target_name}"),
                        await p.call("raw-read", sub, target_name)):
            assert not secret_read(outcome), f"read the host's secret: {outcome}"
            assert outcome["ok"] is False and outcome["errno"] == WASI_ENOENT, outcome
        # x's own descriptor resolves sub/... to the link now there: refused, as leading out
        outcome = await p.call("raw-read", x, f"sub/{target_name}")
        assert outcome["ok"] is False and outcome["errno"] in (WASI_EPERM, WASI_ENOTCAPABLE), \
            outcome
        assert await p.call("read", f"{sub}/own.txt") == {"ok": True, "data": OWN_TEXT}

        written = await p.call("write", f"{sub}/{host.marker}", "planted by the plugin")
        append = await p.call("append", f"{sub}/{host.marker}", "; appended")
        raw = await p.call("raw-write", x, f"sub/{host.marker}", "through x")
        host.check()  # nothing in the secret's directory, /etc, or beside the root
        assert raw["ok"] is False, f"wrote through x/sub (the link): {raw}"
        planted = host.x / "sub.moved" / host.marker
        if sub_grant == ":rw":  # the write lands in the granted directory, wherever it now is
            assert written == {"ok": True} and append == {"ok": True}
            assert planted.read_text() == "planted by the plugin; appended"
            names = sorted(["own.txt", host.marker])
        else:
            assert written["ok"] is False and append["ok"] is False
            assert not planted.exists()


async def test_a_reactor_replacing_a_trapped_instance_keeps_its_grant(
        manager: PluginManager, host: Host, programs: dict[str, Path]) -> None:
    """The same attack on a reactor: its instance keeps its WASI context, but a trap replaces
    the instance, and the replacement used to preopen the grants by name again."""
    x, sub = str(host.x), str(host.sub)
    plugin = write_plugin(host.plugins / "reactor", programs["reactor"],
                          plugin_id="test.reactor",
                          allowed_paths=[f"{x}:rw", f"{sub}:rw"],
                          config={"dir": x, "name": "sub", "target": "../../secret",
                                  "path": f"{sub}/secret.txt"})
    p = await manager.load(plugin)
    assert await p.call("peek") == -WASI_ENOENT
    assert await p.call("plant") == 0
    assert os.readlink(host.sub) == "../../secret"
    for _ in range(2):
        with pytest.raises(PluginCallError, match="unreachable"):
            await p.call("crash")
        assert await p.call("peek") == -WASI_ENOENT, "the new instance read the secret"


# -- co-tenants: the names change on the host after load -----------------------------------------

@pytest.mark.parametrize("swapped", ["sub", "x"])
async def test_a_grant_swapped_on_the_host_after_load_changes_nothing(
        manager: PluginManager, host: Host, programs: dict[str, Path], swapped: str) -> None:
    """Whoever can write a grant's parent (a co-tenant, a user owning a directory under the
    root) moves the granted directory away after load and puts an absolute link in its place,
    one WASI itself would refuse to make: sub (in x:rw) for a link to the secret's
    directory, or x (x:rw alone) for a link to /etc. The plugin goes on seeing, and writing
    into, the directories it was granted."""
    x, sub = str(host.x), str(host.sub)
    grants = [f"{x}:rw", f"{sub}:rw"] if swapped == "sub" else [f"{x}:rw"]
    plugin = write_plugin(host.plugins / "cotenant", programs["hostile"],
                          plugin_id="test.cotenant", allowed_paths=grants)
    p = await manager.load(plugin)
    seen = sub if swapped == "sub" else x
    names = ["own.txt" if swapped == "sub" else "sub"]
    assert await p.call("list", seen) == {"ok": True, "names": names}

    victim, target = (host.sub, host.secret_dir) if swapped == "sub" else (host.x, Path("/etc"))
    moved = victim.with_name(victim.name + ".moved")
    victim.rename(moved)
    victim.symlink_to(target)

    for _ in range(2):
        listing = await p.call("list", seen)
        assert listing["ok"] and sorted(listing["names"]) == names, \
            f"the plugin sees the link's target: {listing}"
        probe = f"{sub}/secret.txt" if swapped == "sub" else f"{x}/passwd"
        outcome = await p.call("read", probe)
        assert not secret_read(outcome), outcome
        assert outcome["ok"] is False and outcome["errno"] == WASI_ENOENT, outcome
        assert await p.call("write", f"{x}/{host.marker}", "x") == {"ok": True}
        host.check()  # not in /etc
        assert ((moved if swapped == "x" else host.x) / host.marker).read_text() == "x"
        if swapped == "x":
            names = sorted(["sub", host.marker])
    if swapped == "sub":
        assert await p.call("read", f"{sub}/own.txt") == {"ok": True, "data": OWN_TEXT}


async def test_a_new_generation_opens_its_grants_again_and_refuses_a_link(
        manager: PluginManager, host: Host, programs: dict[str, Path]) -> None:
    """Each generation opens the grants afresh, beneath the root: after the swap a reload is
    refused naming the path, the root and the link, and the old generation serves on with its
    own directories."""
    x, sub = str(host.x), str(host.sub)
    plugin = write_plugin(host.plugins / "reload", programs["hostile"], plugin_id="test.reload",
                          allowed_paths=[f"{x}:rw", f"{sub}:rw"])
    p = await manager.load(plugin)
    assert await p.call("plant", x, "sub", "../../secret", "symlink") == {"ok": True}
    with pytest.raises(ReloadError) as info:
        await manager.reload(p.id)
    cause = info.value.cause
    assert isinstance(cause, PluginLoadError)
    assert str(cause) == (f"plugin test.reload: allowed path {sub} cannot be opened beneath its "
                          f"path root {host.root}: a symbolic link is on its way (grants are "
                          "opened through no link below their root: grant the directory the "
                          f"link points to); it resolves to {os.path.realpath(sub)} now")
    assert await p.call("list", sub) == {"ok": True, "names": ["own.txt"]}
    assert p.generation == 1


@pytest.mark.parametrize("link", ["inside", "outside"])
async def test_a_grant_that_is_a_link_at_load_is_refused(manager: PluginManager, host: Host,
                                                         programs: dict[str, Path],
                                                         link: str) -> None:
    """Even a link that stays inside the root: whoever made it can point it elsewhere later."""
    (host.x / "alias").symlink_to("sub" if link == "inside" else str(host.secret_dir))
    plugin = write_plugin(host.plugins / "alias", programs["hostile"], plugin_id="test.alias",
                          allowed_paths=[str(host.x / "alias")])
    with pytest.raises(PluginLoadError) as info:
        await manager.load(plugin)
    assert f"allowed path {host.x / 'alias'} cannot be opened" in str(info.value)
    assert "symbolic link" in str(info.value)
    assert await manager.list() == []


# -- links inside a grant: never followed out of it ----------------------------------------------

REFUSED = (WASI_EPERM, WASI_ENOTCAPABLE)
# Each probe: the calls it makes (each in a fresh instance) and the errnos its last call may
# end with. Grants: R/x:rw and R/ro. {x}, {ro} and {secret} are those directories; {up} leads
# from x to / and back down to the directory above the root. Links the host planted in x
# beforehand: rel (relative, to the secret's directory), abs (absolute, to it), out (relative,
# to outside.txt), gone and absgone (dangling, relative and absolute, beside the root).
PROBES: dict[str, tuple[list[tuple[str, ...]], tuple[int, ...]]] = {
    "read-relative-link": ([("read", "{x}/rel/secret.txt")], REFUSED),
    "read-absolute-link": ([("read", "{x}/abs/secret.txt")], REFUSED),
    "list-absolute-link": ([("list", "{x}/abs")], REFUSED),
    "stat-through-link": ([("stat", "{x}/out")], REFUSED),
    "touch-through-link": ([("touch", "{x}/out")], REFUSED),
    "create-through-dangling-link": ([("write", "{x}/gone", "escaped")], REFUSED),
    "create-through-absolute-dangling-link": ([("write", "{x}/absgone", "escaped")], REFUSED),
    "truncate-through-link": ([("truncate", "{x}/out")], REFUSED),
    "append-through-link": ([("append", "{x}/out", "escaped")], REFUSED),
    "symlink-then-read": ([("symlink-read", "../../secret/secret.txt", "{x}/made")], REFUSED),
    "symlink-through-/-then-read": ([("symlink-read", "{up}/secret/secret.txt", "{x}/made")],
                                    REFUSED),
    "symlink-then-create": ([("symlink-write", "../../escaped.txt", "{x}/made", "x")],
                            REFUSED),
    "absolute-symlink-is-not-made": ([("symlink", "{secret}/secret.txt", "{x}/made")],
                                     REFUSED),
    "hard-link-of-a-link-then-read": ([("link", "{x}/rel", "{x}/hard"),
                                       ("read", "{x}/hard/secret.txt")], REFUSED),
    "hard-link-following-a-link": ([("link-follow", "{x}/out", "{x}/hard")],
                                   (WASI_EINVAL, *REFUSED)),
    # a link made where it stays inside x (x/a/b/../../ is x), then renamed to where the same
    # text leads out of it
    "rename-a-link-then-read": ([("mkdir", "{x}/a"), ("mkdir", "{x}/a/b"),
                                 ("symlink", "../../secret/secret.txt", "{x}/a/b/l"),
                                 ("rename", "{x}/a/b/l", "{x}/l"), ("read", "{x}/l")],
                                REFUSED),
    "rename-a-link-then-append": ([("mkdir", "{x}/a"), ("mkdir", "{x}/a/b"),
                                   ("symlink", "../../outside.txt", "{x}/a/b/l"),
                                   ("rename", "{x}/a/b/l", "{x}/l"),
                                   ("append", "{x}/l", "escaped")], REFUSED),
    "hard-link-out-of-a-read-only-grant": ([("link", "{ro}/data.txt", "{x}/hard")], REFUSED),
}


@pytest.mark.parametrize("probe", PROBES)
async def test_a_link_in_a_grant_is_never_followed_out_of_it(manager: PluginManager,
                                                             host: Host,
                                                             programs: dict[str, Path],
                                                             probe: str) -> None:
    (host.x / "rel").symlink_to("../../secret")
    (host.x / "abs").symlink_to(host.secret_dir)
    (host.x / "out").symlink_to("../../outside.txt")
    (host.x / "gone").symlink_to("../../escaped.txt")
    (host.x / "absgone").symlink_to(host.base / "escaped-abs.txt")
    plugin = write_plugin(host.plugins / "links", programs["hostile"], plugin_id="test.links",
                          allowed_paths=[f"{host.x}:rw", str(host.root / "ro")])
    p = await manager.load(plugin)
    places = {"x": str(host.x), "ro": str(host.root / "ro"), "secret": str(host.secret_dir),
              "up": "../" * (len(host.x.parts) - 1) + str(host.base).lstrip("/")}
    steps, errnos = PROBES[probe]
    outcomes = [await p.call(method, *(arg.format(**places) for arg in args))
                for method, *args in steps]
    host.check()
    assert (host.root / "ro" / "data.txt").read_text() == RO_TEXT
    assert not any(secret_read(o) for o in outcomes), outcomes
    assert outcomes[-1]["ok"] is False and outcomes[-1]["errno"] in errnos, outcomes
