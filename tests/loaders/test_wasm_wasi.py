"""The WASI side of the wasm loader (sandboxer/loaders/wasm.py), against real C modules.

The C programs below are compiled once per session with Debian's clang for wasm32-wasi. The
command module (``CMD_C``) dispatches on its argv[1], the method: each call runs ``_start`` in
a fresh instance with the call's arguments as a JSON array on stdin, and what it prints is the
result. Filesystem probes report success or the errno as JSON on stdout instead of crashing,
so a test can tell "the sandbox said no" from "the program broke". The reactor (``REACTOR_C``)
exports numeric functions (no JSON ABI) and counts its ``_initialize`` runs through a
constructor. examples/wasm-c is built with its own Makefile and driven through the manager and
the ``sandboxer call`` command.

Every test runs under ``no_leaks``. The wasmtime runtime behind WASI keeps a few descriptors
for the life of the process (a tokio runtime's epoll and eventfd), made on first use, so a
session fixture makes them before any test's snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import EXAMPLES
from wasi_build import compile_wasi, need_toolchain
from sandboxer import (
    CallTimeout,
    MethodNotFound,
    PluginCallError,
    PluginLoadError,
    PluginManager,
    PluginStateError,
)
from sandboxer.config import HostConfig

pytestmark = pytest.mark.usefixtures("no_leaks")

WASI_EPERM = 63          # wasi-libc's errno values (WASI numbering)
WASI_ENOTCAPABLE = 76
WASI_ENOTSOCK = 57
WASI_SOCKET_TYPES = {5, 6}  # __WASI_FILETYPE_SOCKET_DGRAM, __WASI_FILETYPE_SOCKET_STREAM

# -- the C programs -----------------------------------------------------------------------------

CMD_C = r"""
#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <wasi/api.h>

extern char **environ;

__attribute__((import_module("sandboxer"), import_name("config_get")))
int32_t sandboxer_config_get(const char *key, int32_t key_len, char *buf, int32_t cap);

static char input[1 << 16], raw[1 << 16];
static size_t input_len;
static char *arg[8];
static int nargs;
static int runs;  /* how often main ran in this instance */

static void read_stdin(void) {
    size_t n;
    while ((n = fread(input + input_len, 1, sizeof input - 1 - input_len, stdin)) > 0)
        input_len += n;
    input[input_len] = 0;
    memcpy(raw, input, input_len + 1);
}

/* The string elements of the JSON array on stdin (only \" and \\ escapes); edits input. */
static void parse_args(void) {
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
        else if (c < 0x20) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

static void put_cstring(const char *s) {
    if (s) put_string(s, strlen(s)); else printf("null");
}

static void failed(const char *op) {
    int e = errno;
    printf("{\"ok\":false,\"op\":\"%s\",\"errno\":%d,\"error\":", op, e);
    put_cstring(strerror(e));
    printf("}");
}

static void do_read(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) { failed("open"); return; }
    char buf[4096];
    size_t n = fread(buf, 1, sizeof buf, f);
    if (ferror(f)) { fclose(f); failed("read"); return; }
    fclose(f);
    printf("{\"ok\":true,\"data\":");
    put_string(buf, n);
    printf("}");
}

static void do_write(const char *path, const char *text, const char *mode) {
    FILE *f = fopen(path, mode);
    if (!f) { failed("open"); return; }
    if (fputs(text, f) < 0) { fclose(f); failed("write"); return; }
    if (fclose(f) != 0) { failed("close"); return; }
    printf("{\"ok\":true}");
}

static void do_list(const char *path) {
    DIR *d = opendir(path);
    if (!d) { failed("opendir"); return; }
    printf("{\"ok\":true,\"names\":[");
    int first = 1;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        if (!first) putchar(',');
        first = 0;
        put_cstring(e->d_name);
    }
    closedir(d);
    printf("]}");
}

/* Every open descriptor with its WASI file type, and what sock_accept says about it. */
static void do_fds(void) {
    printf("[");
    int first = 1;
    for (int fd = 0; fd < 64; fd++) {
        __wasi_fdstat_t st;
        if (__wasi_fd_fdstat_get((__wasi_fd_t)fd, &st) != 0) continue;
        __wasi_fd_t accepted;
        __wasi_errno_t e = __wasi_sock_accept((__wasi_fd_t)fd, 0, &accepted);
        printf("%s{\"fd\":%d,\"type\":%d,\"accept_errno\":%d}", first ? "" : ",", fd,
               st.fs_filetype, e);
        first = 0;
    }
    printf("]");
}

int main(int argc, char **argv) {
    const char *method = argc > 1 ? argv[1] : "";
    runs++;
    read_stdin();
    parse_args();
    const char *a0 = nargs > 0 ? arg[0] : "";
    const char *a1 = nargs > 1 ? arg[1] : "";
    if (!strcmp(method, "argv")) {
        printf("[");
        for (int i = 0; i < argc; i++) { if (i) putchar(','); put_cstring(argv[i]); }
        printf("]");
    } else if (!strcmp(method, "runs")) {
        printf("%d", runs);
    } else if (!strcmp(method, "silent")) {
        /* no output: the result is None */
    } else if (!strcmp(method, "exit3")) {
        fprintf(stderr, "something went wrong\nlast words\n");
        return 3;
    } else if (!strcmp(method, "notjson")) {
        printf("this is not json");
    } else if (!strcmp(method, "two")) {
        printf("1 2");
    } else if (!strcmp(method, "big")) {
        long n = strtol(raw + 1, NULL, 10);
        putchar('"');
        for (long i = 0; i < n; i++) putchar('x');
        putchar('"');
    } else if (!strcmp(method, "loop")) {
        volatile unsigned long spin = 0;
        for (;;) spin++;
    } else if (!strcmp(method, "sleep")) {
        sleep((unsigned)strtol(raw + 1, NULL, 10));
        printf("\"woke\"");
    } else if (!strcmp(method, "crash")) {
        __builtin_trap();
    } else if (!strcmp(method, "stderr")) {
        fprintf(stderr, "first warning\nsecond warning\n");
        printf("true");
    } else if (!strcmp(method, "env")) {
        int count = 0;
        for (char **e = environ; e && *e; e++) count++;
        printf("{\"PATH\":");
        put_cstring(getenv("PATH"));
        printf(",\"HOME\":");
        put_cstring(getenv("HOME"));
        printf(",\"count\":%d}", count);
    } else if (!strcmp(method, "read")) {
        do_read(a0);
    } else if (!strcmp(method, "write")) {
        do_write(a0, a1, "w");
    } else if (!strcmp(method, "append")) {
        do_write(a0, a1, "a");
    } else if (!strcmp(method, "unlink")) {
        if (unlink(a0) != 0) failed("unlink"); else printf("{\"ok\":true}");
    } else if (!strcmp(method, "mkdir")) {
        if (mkdir(a0, 0755) != 0) failed("mkdir"); else printf("{\"ok\":true}");
    } else if (!strcmp(method, "list")) {
        do_list(a0);
    } else if (!strcmp(method, "fds")) {
        do_fds();
    } else if (!strcmp(method, "config")) {
        char buf[256];
        int32_t n = sandboxer_config_get(a0, (int32_t)strlen(a0), buf, sizeof buf);
        if (n < 0 || n > (int32_t)sizeof buf) printf("null");
        else fwrite(buf, 1, (size_t)n, stdout);
    } else {
        printf("{\"method\":");
        put_cstring(method);
        printf(",\"args\":%s}", raw);
    }
    return 0;
}
"""

REACTOR_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#define EXPORT(name) __attribute__((export_name(name)))

static int inits, calls;

/* Constructors run from _initialize, once per instance. */
__attribute__((constructor)) static void setup(void) {
    inits++;
    printf("reactor initialised\n");
    fflush(stdout);
}

EXPORT("inits") int get_inits(void) { return inits; }
EXPORT("hello") int hello(int n) {
    calls += n;
    printf("hello, calls = %d\n", calls);
    fflush(stdout);
    return calls;
}
EXPORT("warn") void warn(void) { fprintf(stderr, "reactor warning\n"); }
EXPORT("crash") void crash(void) { __builtin_trap(); }
EXPORT("quit") void quit(void) { exit(5); }
EXPORT("spin") void spin(void) { volatile unsigned long i = 0; for (;;) i++; }
EXPORT("nap") int nap(int seconds) { sleep((unsigned)seconds); return seconds; }
"""

BADINIT_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void setup(void) {
    fprintf(stderr, "cannot start\n");
    __builtin_trap();
}
__attribute__((export_name("ping"))) int ping(void) { return 1; }
"""


# -- building ------------------------------------------------------------------------------------





@pytest.fixture(scope="session")
def wasm_build(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Every C program of this file, compiled once per session."""
    need_toolchain()
    out = tmp_path_factory.mktemp("wasi-build")
    return SimpleNamespace(
        cmd=compile_wasi(out, "cmd", CMD_C),
        reactor=compile_wasi(out, "reactor", REACTOR_C, reactor=True),
        badinit=compile_wasi(out, "badinit", BADINIT_C, reactor=True),
    )


@pytest.fixture(scope="session")
def wasm_c() -> Path:
    """examples/wasm-c, built by its Makefile."""
    need_toolchain("make")
    run = subprocess.run(["make", "-C", str(EXAMPLES / "wasm-c")], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f"make -C examples/wasm-c failed:\n{run.stdout}{run.stderr}"
    assert (EXAMPLES / "wasm-c" / "hello.wasm").is_file()
    return EXAMPLES / "wasm-c"


@pytest.fixture(scope="session", autouse=True)
def _wasi_runtime(wasm_build: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Make wasmtime's process-wide WASI runtime (its epoll/eventfd descriptors live as long
    as the process) before the first test's leak snapshot: one command run that reads a file."""
    root = tmp_path_factory.mktemp("wasi-warmup")
    (root / "data").mkdir()
    (root / "data" / "f.txt").write_text("warm")
    plugin = write_plugin(root / "plugin", wasm_build.cmd, plugin_id="test.warmup",
                          sandbox={"allowed_paths": [str(root / "data")]})

    async def warm() -> None:
        async with PluginManager(HostConfig(path_roots=(str(root),))) as mgr:
            p = await mgr.load(plugin)
            assert await p.call("read", str(root / "data" / "f.txt")) == {"ok": True,
                                                                          "data": "warm"}
    asyncio.run(warm())
    gc.collect()


@pytest.fixture(autouse=True)
def _collect_before_leak_check(no_leaks: None) -> Any:
    """Collect cyclic garbage before ``no_leaks`` counts descriptors: an error caught in a
    test sits in a reference cycle with its traceback, and what it references goes only when
    the collector runs. The loader's own share of that is tested on its own
    (test_a_kept_error_does_not_pin_the_module and the _without_gc test)."""
    yield
    gc.collect()


# -- helpers -------------------------------------------------------------------------------------

def write_plugin(root: Path, wasm: Path, *, plugin_id: str, methods: list[str] | None = None,
                 config: dict[str, Any] | None = None,
                 sandbox: dict[str, Any] | None = None) -> Path:
    """A plugin directory: the module copied in as plugin.wasm, and its plugin.toml."""
    root.mkdir(parents=True)
    shutil.copy(wasm, root / "plugin.wasm")
    lines = ["[plugin]", f'id = "{plugin_id}"', 'version = "1.0.0"', 'type = "wasm"',
             'entrypoint = "plugin.wasm"']
    if methods is not None:
        lines.append(f"methods = {json.dumps(methods)}")
    for table, values in (("config", config), ("sandbox", sandbox)):
        if values:
            lines += ["", f"[{table}]"] + [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    (root / "plugin.toml").write_text("\n".join(lines) + "\n")
    return root


def host(tmp_path: Path, **kw: Any) -> HostConfig:
    return HostConfig(path_roots=(str(tmp_path),), **kw)


def plugin_records(caplog: pytest.LogCaptureFixture, plugin_id: str) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records
            if r.name == f"sandboxer.plugin.{plugin_id}"]


def open_fds_under(path: Path) -> list[str]:
    """This process's fds of ``path`` and what lies below it, as the paths they name. A
    writable grant is held as an idmapped detached mount, whose fd names no path: it is found
    by its inode."""
    inodes = {(st.st_dev, st.st_ino): str(p) for p in (path, *path.rglob("*"))
              if p.is_dir() and not p.is_symlink() for st in (p.stat(),)}
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            st = os.stat(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == str(path) or target.startswith(f"{path}/"):
            found.append(target)
        elif target == "/" and (st.st_dev, st.st_ino) in inodes:
            found.append(inodes[(st.st_dev, st.st_ino)])
    return found


@pytest.fixture
def cmd_plugin(tmp_path: Path, wasm_build: SimpleNamespace) -> Path:
    return write_plugin(tmp_path / "cmd", wasm_build.cmd, plugin_id="test.cmd",
                        config={"greeting": "Hi"})


@pytest.fixture
def tree(tmp_path: Path) -> SimpleNamespace:
    """data/ro (granted read-only), data/rw (granted read-write) and, beside them in data/,
    a secret no grant covers; symlinks in the grants point inside and out."""
    data = tmp_path / "data"
    ro, rw = data / "ro", data / "rw"
    ro.mkdir(parents=True)
    rw.mkdir()
    (ro / "data.txt").write_text("hello from the host\n")
    (data / "secret.txt").write_text("top secret\n")
    (ro / "inside").symlink_to("data.txt")
    (ro / "abs").symlink_to("/etc/passwd")
    (ro / "rel").symlink_to("../secret.txt")
    (ro / "dir").symlink_to(data)
    (rw / "out").symlink_to("../escaped.txt")
    (rw / "absout").symlink_to(data / "escaped2.txt")
    return SimpleNamespace(data=data, ro=ro, rw=rw, secret=data / "secret.txt")


@pytest.fixture
def fs_plugin(tmp_path: Path, wasm_build: SimpleNamespace, tree: SimpleNamespace) -> Path:
    return write_plugin(tmp_path / "fs", wasm_build.cmd, plugin_id="test.fs",
                        sandbox={"allowed_paths": [str(tree.ro), f"{tree.rw}:rw"]})


# -- WASI command modules -------------------------------------------------------------------------

async def test_command_argv_is_plugin_id_and_method(tmp_path, cmd_plugin):
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(cmd_plugin)
        assert await p.call("argv") == ["test.cmd", "argv"]


async def test_command_gets_args_as_json_on_stdin_and_any_method_name_works(tmp_path, cmd_plugin):
    args = [1, "two", {"three": [3.5, True, None]}, "wörld"]
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(cmd_plugin)
        assert await p.call("whatever.you-like_9", *args) == {
            "method": "whatever.you-like_9", "args": args}
        assert await p.call("x") == {"method": "x", "args": []}


async def test_command_with_empty_stdout_returns_none(tmp_path, cmd_plugin):
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(cmd_plugin)
        assert await p.call("silent", "ignored") is None


async def test_each_command_call_runs_in_a_fresh_instance(tmp_path, cmd_plugin):
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(cmd_plugin)
        assert [await p.call("runs") for _ in range(3)] == [1, 1, 1]
        assert await asyncio.gather(*(p.call("runs") for _ in range(4))) == [1, 1, 1, 1]


async def test_command_exit_status_is_a_call_error_with_the_stderr_tail(tmp_path, cmd_plugin):
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(cmd_plugin)
        with pytest.raises(PluginCallError) as info:
            await p.call("exit3")
        assert info.value.data["exit_status"] == 3
        assert "status 3" in str(info.value)
        assert "something went wrong" in str(info.value) and "last words" in str(info.value)
        assert info.value.method == "exit3" and info.value.plugin_id == "test.cmd"
        assert await p.call("argv") == ["test.cmd", "argv"]  # the next run is unaffected


async def test_command_stderr_is_logged_at_warning(tmp_path, cmd_plugin, caplog):
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(cmd_plugin)
        with caplog.at_level(logging.INFO, logger="sandboxer.plugin.test.cmd"):
            assert await p.call("stderr") is True
    assert plugin_records(caplog, "test.cmd") == [
        (logging.WARNING, "[stderr] first warning"),
        (logging.WARNING, "[stderr] second warning"),
    ]


@pytest.mark.parametrize("method", ["notjson", "two"])
async def test_command_stdout_that_is_not_one_json_value_is_a_call_error(tmp_path, cmd_plugin,
                                                                         method):
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(cmd_plugin)
        with pytest.raises(PluginCallError) as info:
            await p.call(method)
        assert "one JSON value" in str(info.value)
        assert not isinstance(info.value, MethodNotFound)


async def test_command_stdout_over_max_frame_is_a_call_error(tmp_path, cmd_plugin):
    async with PluginManager(host(tmp_path, max_frame=4096)) as mgr:
        p = await mgr.load(cmd_plugin)
        assert await p.call("big", 4000) == "x" * 4000
        with pytest.raises(PluginCallError) as info:
            await p.call("big", 5000)
        assert "4096" in str(info.value)
        assert await p.call("big", 10) == "x" * 10


async def test_command_trap_is_a_call_error(tmp_path, cmd_plugin):
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(cmd_plugin)
        with pytest.raises(PluginCallError) as info:
            await p.call("crash")
        assert "trapped" in str(info.value) and "unreachable" in str(info.value)
        assert await p.call("runs") == 1


async def test_command_that_loops_forever_times_out(tmp_path, wasm_build):
    plugin = write_plugin(tmp_path / "p", wasm_build.cmd, plugin_id="test.loop",
                          sandbox={"timeout": "1s"})
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(plugin)
        start = time.monotonic()
        with pytest.raises(CallTimeout) as info:
            await p.call("loop", timeout=0.3)
        assert info.value.timeout == 0.3 and time.monotonic() - start < 1.5
        start = time.monotonic()
        with pytest.raises(CallTimeout) as info:  # the manifest's timeout
            await p.call("loop")
        assert info.value.timeout == 1.0 and time.monotonic() - start < 2.5
        assert await p.call("argv") == ["test.loop", "argv"]


async def test_command_blocked_in_a_wasi_sleep_times_out_on_time(tmp_path, cmd_plugin):
    """The deadline is checked at epoch ticks inside wasm code only; a WASI host call that
    blocks (poll_oneoff, i.e. sleep) runs to its end however long it takes."""
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(cmd_plugin)
        start = time.monotonic()
        with pytest.raises(CallTimeout):
            await p.call("sleep", 2, timeout=0.3)
        elapsed = time.monotonic() - start
        assert elapsed < 1.2, f"a 0.3 s timeout ended the call only after {elapsed:.1f} s"


async def test_command_methods_listed_in_the_manifest_are_the_only_ones(tmp_path, wasm_build):
    plugin = write_plugin(tmp_path / "p", wasm_build.cmd, plugin_id="test.listed",
                          methods=["argv", "silent"])
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(plugin)
        assert await p.call("argv") == ["test.listed", "argv"]
        assert await p.call("silent") is None
        with pytest.raises(MethodNotFound) as info:
            await p.call("runs")
        assert info.value.code == MethodNotFound.CODE
        assert sorted(info.value.data["available"]) == ["argv", "silent"]


async def test_bare_command_module_loads_without_a_manifest(tmp_path, wasm_build):
    bare = tmp_path / "cmdtool.wasm"
    shutil.copy(wasm_build.cmd, bare)
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(bare)
        assert p.id == "cmdtool"
        assert await p.call("argv") == ["cmdtool", "argv"]


async def test_command_reads_its_config_through_the_host_function(tmp_path, cmd_plugin):
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(cmd_plugin)
        assert await p.call("config", "greeting") == "Hi"
        assert await p.call("config", "missing") is None
        await mgr.unload(p.id)
        p = await mgr.load(cmd_plugin, config={"greeting": "Yo"})
        assert await p.call("config", "greeting") == "Yo"


# -- the WASI filesystem --------------------------------------------------------------------------

async def test_reading_in_an_allowed_read_only_dir_works(tmp_path, fs_plugin, tree):
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(fs_plugin)
        expected = {"ok": True, "data": "hello from the host\n"}
        assert await p.call("read", str(tree.ro / "data.txt")) == expected
        assert await p.call("read", str(tree.ro / "inside")) == expected  # a link inside
        listing = await p.call("list", str(tree.ro))
        assert sorted(listing["names"]) == ["abs", "data.txt", "dir", "inside", "rel"]


async def test_a_read_only_dir_cannot_be_changed(tmp_path, fs_plugin, tree):
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(fs_plugin)
        attempts = {
            "create": await p.call("write", str(tree.ro / "new.txt"), "x"),
            "truncate": await p.call("write", str(tree.ro / "data.txt"), "x"),
            "append": await p.call("append", str(tree.ro / "data.txt"), "x"),
            "unlink": await p.call("unlink", str(tree.ro / "data.txt")),
            "mkdir": await p.call("mkdir", str(tree.ro / "sub")),
        }
    for what, outcome in attempts.items():
        assert outcome["ok"] is False, f"{what} in a read-only grant succeeded"
        assert outcome["errno"] in (WASI_EPERM, WASI_ENOTCAPABLE), (what, outcome)
    assert (tree.ro / "data.txt").read_text() == "hello from the host\n"
    assert not (tree.ro / "new.txt").exists() and not (tree.ro / "sub").exists()


async def test_a_read_write_dir_can_be_written_and_the_host_sees_it(tmp_path, fs_plugin, tree):
    target = tree.rw / "new.txt"
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(fs_plugin)
        assert await p.call("write", str(target), "written by wasm") == {"ok": True}
        assert await p.call("append", str(target), "; and more") == {"ok": True}
        assert await p.call("read", str(target)) == {"ok": True,
                                                     "data": "written by wasm; and more"}
        assert await p.call("mkdir", str(tree.rw / "sub")) == {"ok": True}
    assert target.read_text() == "written by wasm; and more"
    assert (tree.rw / "sub").is_dir()


async def test_paths_outside_every_preopen_cannot_be_opened(tmp_path, fs_plugin, tree):
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(fs_plugin)
        for path in ("/etc/passwd", str(tree.secret), str(tmp_path / "fs" / "plugin.toml")):
            outcome = await p.call("read", path)
            assert outcome["ok"] is False, f"read {path} from outside the grants: {outcome}"
        for path in ("/", str(tree.data), str(tmp_path.parent)):
            outcome = await p.call("list", path)
            assert outcome["ok"] is False, f"listed {path}: {outcome}"
        assert (await p.call("write", str(tree.data / "planted.txt"), "x"))["ok"] is False
    assert not (tree.data / "planted.txt").exists()


async def test_dotdot_cannot_escape_a_preopen(tmp_path, fs_plugin, tree):
    escapes = [
        f"{tree.ro}/../secret.txt",
        f"{tree.rw}/../secret.txt",
        f"{tree.ro}/../../data/secret.txt",
        f"{tree.rw}/../../../../../../../etc/passwd",
    ]
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(fs_plugin)
        for path in escapes:
            outcome = await p.call("read", path)
            assert outcome["ok"] is False, f"read {path}: {outcome}"
        outcome = await p.call("write", f"{tree.rw}/../dotdot.txt", "x")
        assert outcome["ok"] is False, outcome
    assert not (tree.data / "dotdot.txt").exists()


async def test_symlinks_in_a_grant_cannot_lead_out_of_it(tmp_path, fs_plugin, tree):
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(fs_plugin)
        for link in ("abs", "rel", "dir/secret.txt"):
            outcome = await p.call("read", str(tree.ro / link))
            assert outcome["ok"] is False, f"read through {link}: {outcome}"
        assert (await p.call("list", str(tree.ro / "dir")))["ok"] is False
        for link in ("out", "absout"):
            outcome = await p.call("write", str(tree.rw / link), "escaped")
            assert outcome["ok"] is False, f"wrote through {link}: {outcome}"
    assert not (tree.data / "escaped.txt").exists()
    assert not (tree.data / "escaped2.txt").exists()


async def test_no_grants_means_no_preopens(tmp_path, cmd_plugin, tree):
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(cmd_plugin)
        assert [entry["fd"] for entry in await p.call("fds")] == [0, 1, 2]
        assert (await p.call("read", str(tree.ro / "data.txt")))["ok"] is False


async def test_a_denied_path_inside_an_allowed_path_is_a_load_error(tmp_path, wasm_build, tree):
    for denied in (tree.ro / "data.txt", tree.ro):
        plugin = write_plugin(tmp_path / f"p-{denied.name}", wasm_build.cmd,
                              plugin_id="test.denied",
                              sandbox={"allowed_paths": [str(tree.ro), f"{tree.rw}:rw"],
                                       "denied_paths": [str(denied)]})
        async with PluginManager(host(tmp_path)) as mgr:
            with pytest.raises(PluginLoadError) as info:
                await mgr.load(plugin)
            assert str(denied) in str(info.value) and "WASI" in str(info.value)
    # a denied path beside the grants is fine
    plugin = write_plugin(tmp_path / "p-beside", wasm_build.cmd, plugin_id="test.beside",
                          sandbox={"allowed_paths": [str(tree.ro)],
                                   "denied_paths": [str(tree.secret)]})
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(plugin)
        assert (await p.call("read", str(tree.ro / "data.txt")))["ok"] is True


async def test_an_allowed_path_must_be_an_existing_directory(tmp_path, wasm_build, tree):
    cases = {tree.ro / "data.txt": "is not a directory", tree.data / "missing": "does not exist"}
    for grant, why in cases.items():
        plugin = write_plugin(tmp_path / f"p-{grant.name}", wasm_build.cmd,
                              plugin_id="test.notdir",
                              sandbox={"allowed_paths": [str(grant)]})
        async with PluginManager(host(tmp_path)) as mgr:
            with pytest.raises(PluginLoadError) as info:
                await mgr.load(plugin)
            assert str(grant) in str(info.value) and why in str(info.value)


async def test_an_allowed_path_outside_the_path_roots_is_refused(tmp_path, wasm_build, tree):
    plugin = write_plugin(tmp_path / "p", wasm_build.cmd, plugin_id="test.roots",
                          sandbox={"allowed_paths": ["/etc"]})
    async with PluginManager(host(tmp_path)) as mgr:
        with pytest.raises(PluginLoadError) as info:
            await mgr.load(plugin)
        assert "/etc" in str(info.value) and "path_roots" in str(info.value)


@pytest.mark.parametrize("failure", ["a_later_grant_is_refused", "not_a_module",
                                     "initialize_traps"])
async def test_a_failed_load_keeps_no_grant_open(tmp_path, wasm_build, tree, failure):
    """The grants are opened before the module is compiled and instantiated: whichever step
    fails, every grant opened so far is closed again."""
    wasm = wasm_build.badinit if failure == "initialize_traps" else wasm_build.cmd
    grants = [str(tree.ro), f"{tree.rw}:rw"]
    if failure == "a_later_grant_is_refused":
        grants.append(str(tree.ro / "data.txt"))
    plugin = write_plugin(tmp_path / "p", wasm, plugin_id="test.failed",
                          sandbox={"allowed_paths": grants})
    if failure == "not_a_module":
        (plugin / "plugin.wasm").write_bytes(b"\0asm but not really")
    async with PluginManager(host(tmp_path)) as mgr:
        with pytest.raises(PluginLoadError) as info:
            await mgr.load(plugin)
        assert info.value.plugin_id == "test.failed"
        assert open_fds_under(tree.data) == []


async def test_the_grants_live_as_long_as_the_generation(tmp_path, fs_plugin, tree):
    """One descriptor per grant from load to unload; after close no WASI context can be made
    from them (their numbers may already belong to something else)."""
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(fs_plugin)
        assert sorted(open_fds_under(tree.data)) == [str(tree.ro), str(tree.rw)]
        handle = p.handle
        await mgr.unload(p.id)
        assert open_fds_under(tree.data) == []
        with pytest.raises(PluginStateError):
            handle._wasi.for_instance()


async def test_a_failed_command_call_releases_its_preopens_without_gc(tmp_path, fs_plugin, tree):
    """A command run's store (its WASI context: preopened directories, output callbacks) goes
    when the run ends, not whenever the cycle collector next runs, although the error's
    traceback keeps the run's frame in a reference cycle. What stays open is the one
    descriptor per grant the plugin holds from load to unload."""
    gc.collect()
    gc.disable()
    try:
        async with PluginManager(host(tmp_path)) as mgr:
            p = await mgr.load(fs_plugin)
            grants = open_fds_under(tree.data)
            assert sorted(grants) == [str(tree.ro), str(tree.rw)]
            assert (await p.call("read", str(tree.ro / "data.txt")))["ok"] is True
            assert open_fds_under(tree.data) == grants  # a successful run closes its preopens
            for method in ("exit3", "crash", "notjson"):
                try:
                    await p.call(method)
                except PluginCallError:
                    pass
                else:
                    pytest.fail(f"{method} did not fail")
            held = open_fds_under(tree.data)
            assert held == grants, f"preopens still open after the failed calls ended: {held}"
        assert open_fds_under(tree.data) == [], "the grants outlived the plugin"
    finally:
        gc.enable()


def memory_images() -> set[int]:
    """Descriptors of wasmtime's memory images (a memfd per compiled module with data)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "wasm-memory-image" in os.readlink(f"/proc/self/fd/{fd}"):
                found.add(int(fd))
        except OSError:
            pass
    return found


async def test_a_kept_error_does_not_pin_the_module(tmp_path, cmd_plugin, wasm_build):
    """A caller may keep an error as long as it likes (a log, a report, a retry list); that
    must not keep the unloaded plugin's compiled module, and its memory image, alive. The
    error of a trapped command run and that of a trapped _initialize carry the wasmtime Trap
    as their __context__ (``raise ... from None`` only hides it), and a trap's backtrace
    references the module."""
    badinit = write_plugin(tmp_path / "b", wasm_build.badinit, plugin_id="test.badinit")
    before = memory_images()
    kept: list[Exception] = []
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(cmd_plugin)
        try:
            await p.call("crash")
        except PluginCallError as exc:
            kept.append(exc)
        try:
            await mgr.load(badinit)
        except PluginLoadError as exc:
            kept.append(exc)
    del p
    gc.collect()
    assert len(kept) == 2
    pinned = memory_images() - before
    chained = [type(exc.__context__).__name__ for exc in kept]
    kept.clear()
    assert pinned == set(), (f"{len(pinned)} memory image(s) still open while the errors are "
                             f"kept; their __context__: {chained}")


# -- environment and network ----------------------------------------------------------------------

async def test_a_command_inherits_no_environment(tmp_path, cmd_plugin, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PATH", os.environ.get("PATH") or "/usr/bin")
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(cmd_plugin)
        assert await p.call("env") == {"PATH": None, "HOME": None, "count": 0}


async def test_a_module_has_no_sockets(tmp_path, fs_plugin):
    # Debian's wasi-libc (2022) does not declare socket(): WASI preview 1 cannot create a
    # socket at all (there is no sock_open), only use one the host hands over as a descriptor.
    # So the check is that no descriptor the module holds is a socket and that sock_accept
    # refuses every one of them.
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(fs_plugin)
        fds = await p.call("fds")
    assert [entry["fd"] for entry in fds] == [0, 1, 2, 3, 4]  # stdio and the two grants
    for entry in fds:
        assert entry["type"] not in WASI_SOCKET_TYPES, entry
        assert entry["accept_errno"] == WASI_ENOTSOCK, entry


# -- reactor modules ------------------------------------------------------------------------------

async def test_reactor_initialize_runs_once_per_instance(tmp_path, wasm_build, caplog):
    plugin = write_plugin(tmp_path / "r", wasm_build.reactor, plugin_id="test.reactor")
    with caplog.at_level(logging.INFO, logger="sandboxer.plugin.test.reactor"):
        async with PluginManager(host(tmp_path)) as mgr:
            p = await mgr.load(plugin)
            assert plugin_records(caplog, "test.reactor") == [
                (logging.INFO, "[stdout] reactor initialised")]
            assert [await p.call("inits") for _ in range(3)] == [1, 1, 1]
            assert await p.call("hello", 1) == 1
            assert await p.call("hello", 2) == 3  # the instance and its memory live on
            assert await p.call("inits") == 1
            with pytest.raises(PluginCallError) as info:
                await p.call("crash")
            assert info.value.data == {"trap": "unreachable"}
            assert await p.call("inits") == 1    # a fresh instance, initialised once
            assert await p.call("hello", 1) == 1
    assert plugin_records(caplog, "test.reactor") == [
        (logging.INFO, "[stdout] reactor initialised"),
        (logging.INFO, "[stdout] hello, calls = 1"),
        (logging.INFO, "[stdout] hello, calls = 3"),
        (logging.INFO, "[stdout] reactor initialised"),
        (logging.INFO, "[stdout] hello, calls = 1"),
    ]


async def test_reactor_pool_initialises_each_instance(tmp_path, wasm_build, caplog):
    plugin = write_plugin(tmp_path / "r", wasm_build.reactor, plugin_id="test.pool")
    with caplog.at_level(logging.INFO, logger="sandboxer.plugin.test.pool"):
        async with PluginManager(host(tmp_path, wasm_instances=2)) as mgr:
            p = await mgr.load(plugin)
            assert await asyncio.gather(*(p.call("inits") for _ in range(6))) == [1] * 6
    assert plugin_records(caplog, "test.pool") == [
        (logging.INFO, "[stdout] reactor initialised")] * 2


async def test_reactor_stderr_is_logged_at_warning(tmp_path, wasm_build, caplog):
    plugin = write_plugin(tmp_path / "r", wasm_build.reactor, plugin_id="test.warn")
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(plugin)
        with caplog.at_level(logging.INFO, logger="sandboxer.plugin.test.warn"):
            assert await p.call("warn") is None
    assert plugin_records(caplog, "test.warn") == [(logging.WARNING, "[stderr] reactor warning")]


async def test_reactor_proc_exit_is_a_call_error_and_the_instance_is_replaced(tmp_path,
                                                                              wasm_build):
    plugin = write_plugin(tmp_path / "r", wasm_build.reactor, plugin_id="test.quit")
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(plugin)
        assert await p.call("hello", 5) == 5
        with pytest.raises(PluginCallError) as info:
            await p.call("quit")
        assert info.value.data == {"exit_status": 5}
        assert await p.call("hello", 1) == 1


async def test_reactor_that_loops_forever_times_out(tmp_path, wasm_build):
    plugin = write_plugin(tmp_path / "r", wasm_build.reactor, plugin_id="test.spin")
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(plugin)
        start = time.monotonic()
        with pytest.raises(CallTimeout):
            await p.call("spin", timeout=0.3)
        assert time.monotonic() - start < 1.5
        assert await p.call("inits") == 1


async def test_reactor_blocked_in_a_wasi_sleep_times_out_on_time(tmp_path, wasm_build):
    """As for commands; here the call even succeeds, long after its deadline: the epoch
    callback never runs again between the sleep's return and the function's."""
    plugin = write_plugin(tmp_path / "r", wasm_build.reactor, plugin_id="test.nap")
    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(plugin)
        start = time.monotonic()
        try:
            result = await p.call("nap", 2, timeout=0.3)
        except CallTimeout:
            result = "CallTimeout"
        elapsed = time.monotonic() - start
        assert (result, elapsed < 1.2) == ("CallTimeout", True), (
            f"a 0.3 s timeout: the call gave {result!r} after {elapsed:.1f} s")


async def test_a_reactor_blocked_in_a_wasi_sleep_does_not_hold_the_event_loop(tmp_path,
                                                                               wasm_build):
    """A call starts on the event loop and moves to a worker once it has run about a
    millisecond; a WASI host call that blocks inside that first slice must not stop the loop."""
    plugin = write_plugin(tmp_path / "r", wasm_build.reactor, plugin_id="test.stall")
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async with PluginManager(host(tmp_path)) as mgr:
        p = await mgr.load(plugin)
        task = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.05)
        assert await p.call("nap", 1, timeout=5) == 1
        await asyncio.sleep(0.05)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert max(gaps) < 0.2, f"the event loop stood still for {max(gaps):.2f} s"


async def test_a_trap_in_initialize_is_a_load_error_that_names_the_trap(tmp_path, wasm_build,
                                                                        caplog):
    plugin = write_plugin(tmp_path / "b", wasm_build.badinit, plugin_id="test.badinit")
    with caplog.at_level(logging.INFO, logger="sandboxer.plugin.test.badinit"):
        async with PluginManager(host(tmp_path)) as mgr:
            with pytest.raises(PluginLoadError) as info:
                await mgr.load(plugin)
    message = str(info.value)
    assert (logging.WARNING, "[stderr] cannot start") in plugin_records(caplog, "test.badinit")
    assert message.count("_initialize failed") == 1, message
    assert "unreachable" in message, message


# -- examples/wasm-c ------------------------------------------------------------------------------

async def test_wasm_c_example_greets_with_its_config(wasm_c, caplog):
    with caplog.at_level(logging.INFO, logger="sandboxer.plugin.example.wasm-c"):
        async with PluginManager(HostConfig()) as mgr:
            p = await mgr.load(wasm_c)
            assert await p.call("greet", "wörld") == "Hello, wörld!"
            await mgr.unload(p.id)
            p = await mgr.load(wasm_c, config={"greeting": "Hi"})
            assert await p.call("greet", "wörld") == "Hi, wörld!"
            with pytest.raises(PluginCallError) as info:
                await p.call("greet", 42)
            assert info.value.code == -32602
    records = plugin_records(caplog, "example.wasm-c")
    assert (logging.INFO, "[stdout] wasm-c: initialised") in records
    assert (logging.INFO, "wasm-c: init through sandboxer.log") in records


async def test_wasm_c_example_echo_count_fail_and_crash(wasm_c):
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(wasm_c)
        args = [1, "two", {"three": [3.5, True, None]}, "wörld"]
        assert await p.call("echo", *args) == args
        assert await p.call("echo") == []
        assert [await p.call("count") for _ in range(3)] == [1, 2, 3]
        with pytest.raises(PluginCallError) as info:
            await p.call("fail")
        assert info.value.code == 7 and "asked to fail" in str(info.value)
        assert await p.call("count") == 4  # an error reply is not a trap
        with pytest.raises(PluginCallError) as info:
            await p.call("crash")
        assert info.value.data == {"trap": "unreachable"}
        assert await p.call("count") == 1  # a fresh instance
        assert await p.call("greet", "again") == "Hello, again!"


async def test_wasm_c_example_reload_migrates_the_counter(wasm_c):
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(wasm_c)
        assert [await p.call("count") for _ in range(3)] == [1, 2, 3]
        generation = p.generation
        p = await mgr.reload(p.id)
        assert p.generation == generation + 1
        assert await p.call("count") == 4


async def test_unloaded_wasm_plugins_are_freed(wasm_c):
    """A generation's handle, module and linker go when it is closed: wasmtime-py keeps host
    functions in a process-wide table while their linker lives, so the handle must not be
    reachable from them (else every generation, and its module's memory image, a memfd,
    would stay for the life of the process)."""
    from sandboxer.loaders.wasm import WasmHandle

    def handles() -> int:
        gc.collect()
        return sum(isinstance(o, WasmHandle) for o in gc.get_objects())

    before = handles()
    async with PluginManager(HostConfig()) as mgr:
        p = await mgr.load(wasm_c)
        await p.call("count")
        await mgr.reload(p.id)
        await mgr.unload(p.id)
    assert handles() == before, "WasmHandles outlive their unloaded generations"


# -- the sandboxer command ------------------------------------------------------------------------

def sandboxer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandboxer.cli", *args], capture_output=True,
                          text=True, timeout=60)


def test_cli_calls_the_wasm_c_example(wasm_c):
    run = sandboxer("call", str(wasm_c), "greet", "world")
    assert (run.returncode, run.stdout, run.stderr) == (0, "Hello, world!\n", "")
    run = sandboxer("call", "--config", '{"greeting": "Hi"}', str(wasm_c), "greet", "wörld")
    assert (run.returncode, run.stdout) == (0, "Hi, wörld!\n")
    run = sandboxer("call", "--json", str(wasm_c), "fail")
    assert run.returncode == 1
    error = json.loads(run.stdout)["error"]
    assert (error["type"], error["code"]) == ("PluginCallError", 7)


def test_cli_exits_cleanly_after_a_wasm_plugin_fails_to_load(wasm_build):
    """A store still alive when the interpreter shuts down makes wasmtime finalize its WASI
    output callbacks on one of its tokio threads; Python ends that thread (it may not take
    the GIL any more), the unwind crosses Rust code that cannot unwind, and the process aborts
    or prints a panic. So a failed instance's store must be freed at once, not left to the
    collector through the load error's traceback. Six runs: the failure was not certain."""
    procs = [subprocess.Popen([sys.executable, "-m", "sandboxer.cli", "call",
                               str(wasm_build.badinit), "ping"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(6)]
    outcomes = []
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        outcomes.append((proc.returncode, "panicked" in err))
    assert outcomes == [(2, False)] * 6, (
        f"(exit status, rust panic on stderr) of 6 runs: {outcomes}")
