"""External plugins that do the least the wire protocol asks (DESIGN section 7), sandboxed.

A plugin in any language needs only the handshake and its own methods: every reserved method
(``sandboxer.init``, ``.health``, ``.shutdown``, ``.export_state``, ``.import_state``) is
optional, and a -32601 answer means "not implemented". The plugins here are written from
that section and the README alone, with no sandboxer code: one in plain POSIX sh (dash in the
sandbox), one in C with a few lines of hand-made JSON handling. Each answers ``add`` and
``count`` (a per-process counter, to see whether a generation is fresh); variants answer
-32601 or ``null`` to every reserved method, answer ``sandboxer.health`` in each way the
rule names, or ignore the end of their input after shutdown.

Everything runs under the default sandbox profile through ``PluginManager`` or the CLI, and
(``no_leaks``) leaves no fd, child process, cgroup or mount behind.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import REPO
from sandboxer import PluginLoadError, PluginManager, PluginState

pytestmark = pytest.mark.usefixtures("no_leaks")

# How a plugin may answer a reserved method, as the text after `"id":N,` in its reply.
NOT_IMPLEMENTED = '"error":{"code":-32601,"message":"method not found"}'
NULL = '"result":null'
HEALTHY = '"result":true'

# The host's grace period after shutdown (sandboxer/loaders/out_of_process.py): a plugin that
# exits at the end of its input must be gone long before it; one that does not is killed
# after it.
GRACE = 2.0

SH_PLUGIN = r"""#!/bin/sh
# add and count over the sandboxer wire protocol, in POSIX sh. The host writes one compact
# JSON-RPC object per line on fd $SANDBOXER_RPC_FD; only the fields we need are picked out.
RESERVED='@RESERVED@'   # the reply to sandboxer.* requests (after "id":N,)
HEALTH='@HEALTH@'       # the reply to sandboxer.health
AT_EOF='@AT_EOF@'       # exit, or linger: ignore the end of input (and SIGTERM)
fd=${SANDBOXER_RPC_FD:-3}
n=0

send() { printf '%s\n' "$1" >&"$fd"; }
reply() { send "{\"jsonrpc\":\"2.0\",\"id\":$1,$2}"; }

[ "$AT_EOF" = linger ] && trap '' TERM

send "{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"sandboxer.handshake\",\"params\":{\"cookie\":\"$SANDBOXER_MAGIC_COOKIE\",\"protocols\":[1],\"plugin\":{\"name\":\"sh-adder\",\"version\":\"1.0.0\"},\"methods\":[\"add\",\"count\"@STATE@]}}"
IFS= read -r answer <&"$fd" || exit 1
case $answer in
    *'"result"'*) ;;
    *) echo "the host refused the handshake: $answer" >&2; exit 1 ;;
esac

while IFS= read -r line <&"$fd"; do
    case $line in *'"method"'*) ;; *) continue ;; esac
    method=${line#*'"method":"'}; method=${method%%'"'*}
    id=${line#*'"id":'}; id=${id%%[!0-9]*}
    case $method in
        sandboxer.cancel) ;;  # a notification: nothing to answer
        add)
            args=${line#*'"params":['}; a=${args%%,*}; b=${args#*,}; b=${b%%]*}
            reply "$id" "\"result\":$((a + b))" ;;
        count) n=$((n + 1)); reply "$id" "\"result\":$n" ;;
        sandboxer.health) reply "$id" "$HEALTH" ;;
        sandboxer.*) reply "$id" "$RESERVED" ;;
        *) reply "$id" '"error":{"code":-32601,"message":"method not found"}' ;;
    esac
done

if [ "$AT_EOF" = linger ]; then
    while :; do sleep 1; done
fi
"""

C_PLUGIN = r"""
/* add and count over the sandboxer wire protocol, in C with no JSON library. The host writes
   one compact JSON-RPC object per line on fd $SANDBOXER_RPC_FD. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef RESERVED
#define RESERVED "\"error\":{\"code\":-32601,\"message\":\"method not found\"}"
#endif

static int fd = 3;
static char buf[1 << 16];
static size_t have;

static void send_line(const char *line) {
    size_t len = strlen(line), done = 0;
    while (done <= len) {  /* the line, then its newline */
        const char *from = done < len ? line + done : "\n";
        ssize_t n = write(fd, from, done < len ? len - done : 1);
        if (n <= 0) exit(1);
        done += (size_t)n;
    }
}

/* The next line, without its newline, or NULL at the end of input. */
static char *read_line(void) {
    static char line[sizeof buf];
    for (;;) {
        char *nl = memchr(buf, '\n', have);
        if (nl) {
            size_t len = (size_t)(nl - buf);
            memcpy(line, buf, len);
            line[len] = 0;
            have -= len + 1;
            memmove(buf, nl + 1, have);
            return line;
        }
        if (have == sizeof buf) exit(1);
        ssize_t n = read(fd, buf + have, sizeof buf - have);
        if (n <= 0) return NULL;
        have += (size_t)n;
    }
}

static void reply(long id, const char *body) {
    char out[512];
    snprintf(out, sizeof out, "{\"jsonrpc\":\"2.0\",\"id\":%ld,%s}", id, body);
    send_line(out);
}

int main(void) {
    const char *fd_text = getenv("SANDBOXER_RPC_FD"), *cookie = getenv("SANDBOXER_MAGIC_COOKIE");
    char out[1024], method[128];
    long count = 0;
    if (fd_text) fd = atoi(fd_text);
    if (!cookie) return 2;
    snprintf(out, sizeof out,
             "{\"jsonrpc\":\"2.0\",\"id\":0,\"method\":\"sandboxer.handshake\",\"params\":"
             "{\"cookie\":\"%s\",\"protocols\":[1],\"plugin\":{\"name\":\"c-adder\","
             "\"version\":\"1.0.0\"},\"methods\":[\"add\",\"count\"]}}", cookie);
    send_line(out);
    char *line = read_line();
    if (!line || !strstr(line, "\"result\"")) return 1;
    while ((line = read_line())) {
        char *m = strstr(line, "\"method\":\""), *i = strstr(line, "\"id\":");
        if (!m) continue;
        m += strlen("\"method\":\"");
        size_t len = strcspn(m, "\"");
        if (len >= sizeof method) len = sizeof method - 1;
        memcpy(method, m, len);
        method[len] = 0;
        if (!strcmp(method, "sandboxer.cancel") || !i) continue;  /* a notification */
        long id = strtol(i + strlen("\"id\":"), NULL, 10);
        if (!strcmp(method, "add")) {
            char *p = strstr(line, "\"params\":["), *rest;
            long a = p ? strtol(p + strlen("\"params\":["), &rest, 10) : 0;
            long b = p ? strtol(strchr(rest, ',') ? strchr(rest, ',') + 1 : rest, NULL, 10) : 0;
            snprintf(out, sizeof out, "\"result\":%ld", a + b);
            reply(id, out);
        } else if (!strcmp(method, "count")) {
            snprintf(out, sizeof out, "\"result\":%ld", ++count);
            reply(id, out);
        } else if (!strncmp(method, "sandboxer.", strlen("sandboxer."))) {
            reply(id, RESERVED);
        } else {
            reply(id, "\"error\":{\"code\":-32601,\"message\":\"method not found\"}");
        }
    }
    return 0;
}
"""


def _manifest(root: Path, plugin_id: str, entrypoint: str) -> None:
    (root / "plugin.toml").write_text(
        f'[plugin]\nid = "{plugin_id}"\nversion = "1.0.0"\ntype = "external"\n'
        f'entrypoint = "{entrypoint}"\n')


def sh_plugin(root: Path, *, reserved: str = NOT_IMPLEMENTED, health: str | None = None,
              at_eof: str = "exit", state: bool = False, plugin_id: str = "test.sh-adder",
              entrypoint: str = "adder.sh") -> Path:
    """A plugin dir with the sh plugin, answering ``reserved`` to sandboxer.* requests
    (``health`` to sandboxer.health); ``state`` lists export/import_state in its handshake."""
    root.mkdir(parents=True)
    script = (SH_PLUGIN.replace("@RESERVED@", reserved)
              .replace("@HEALTH@", reserved if health is None else health)
              .replace("@AT_EOF@", at_eof)
              .replace("@STATE@", ',\\"sandboxer.export_state\\",\\"sandboxer.import_state\\"'
                       if state else ""))
    (root / entrypoint).write_text(script)
    (root / entrypoint).chmod(0o755)
    _manifest(root, plugin_id, entrypoint)
    return root


def c_plugin(root: Path, *, reserved: str = NOT_IMPLEMENTED,
             plugin_id: str = "test.c-adder") -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed (apt-get install gcc)")
    root.mkdir(parents=True)
    (root / "adder.c").write_text(C_PLUGIN)
    define = "-DRESERVED=" + '"' + reserved.replace('"', '\\"') + '"'
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", define, "-o", str(root / "adder"),
                    str(root / "adder.c")], check=True, timeout=120)
    _manifest(root, plugin_id, "adder")
    return root


def sandboxer_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandboxer.cli", *args], capture_output=True,
                          text=True, timeout=60)


def processes_running(marker: str) -> list[str]:
    """Command lines of live processes that mention ``marker`` (zombies have none)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


async def exercise(root: Path) -> None:
    """Load sandboxed, call, check health, reload (a fresh generation), unload quickly."""
    async with PluginManager() as mgr:
        p = await mgr.load(root)
        assert p.state is PluginState.READY and p.sandbox is not None and p.sandbox.enabled
        assert p.methods == ("add", "count")
        assert await p.call("add", 2, 3) == 5
        assert [await p.call("count") for _ in range(3)] == [1, 2, 3]
        assert await mgr.check_health(p.id) is True
        await mgr.reload(p.id)
        assert p.generation == 2 and p.state is PluginState.READY
        assert await p.call("count") == 1  # a new process, started fresh
        assert await p.call("add", -4, 10) == 6
        started = time.monotonic()
        await mgr.unload(p.id)
        took = time.monotonic() - started
        assert took < GRACE / 2, f"unload took {took:.2f}s: it waited for the grace period"
        assert p.state is PluginState.STOPPED


# -- (1, 2, 3) the least a plugin must do, and the same answering null -----------------------

VARIANTS = {"not-implemented": NOT_IMPLEMENTED, "null": NULL}


@pytest.mark.parametrize("reserved", VARIANTS.values(), ids=VARIANTS.keys())
async def test_a_sh_plugin_with_only_the_handshake_and_its_methods_loads(tmp_path, reserved):
    await exercise(sh_plugin(tmp_path / "sh", reserved=reserved))


@pytest.mark.parametrize("reserved", VARIANTS.values(), ids=VARIANTS.keys())
async def test_a_c_plugin_with_only_the_handshake_and_its_methods_loads(tmp_path, reserved):
    await exercise(c_plugin(tmp_path / "c", reserved=reserved))


@pytest.mark.parametrize("build", [sh_plugin, c_plugin], ids=["sh", "c"])
@pytest.mark.parametrize("reserved", VARIANTS.values(), ids=VARIANTS.keys())
def test_sandboxer_call_runs_a_minimal_plugin(tmp_path, build, reserved):
    run = sandboxer_cli("call", str(build(tmp_path / "p", reserved=reserved)), "add", "2", "40")
    assert (run.returncode, run.stdout) == (0, "42\n"), run.stderr


def test_the_readme_sh_plugin_works_as_it_says(tmp_path):
    readme = (REPO / "README.md").read_text()
    start = readme.index("#!/bin/sh\n# add(a, b)")
    root = tmp_path / "adder"
    root.mkdir()
    (root / "adder.sh").write_text(readme[start:readme.index("```", start)])
    (root / "adder.sh").chmod(0o755)
    _manifest(root, "acme.adder", "adder.sh")
    run = sandboxer_cli("call", str(root), "add", "2", "40")
    assert (run.returncode, run.stdout) == (0, "42\n"), run.stderr
    run = sandboxer_cli("call", "--config", '{"greeting": "hi"}', str(root), "nope")
    assert run.returncode == 1 and "no method 'nope'" in run.stderr


async def test_state_methods_answered_not_implemented_mean_no_state(tmp_path):
    """The handshake says it carries state, the plugin then answers -32601: the reload
    starts the new generation fresh instead of failing."""
    root = sh_plugin(tmp_path / "sh", state=True)
    async with PluginManager() as mgr:
        events = mgr.events()
        p = await mgr.load(root)
        assert p.handle is not None and p.handle.has_state
        assert [await p.call("count") for _ in range(2)] == [1, 2]
        await mgr.reload(p.id)
        assert p.generation == 2 and p.state is PluginState.READY and p.error is None
        assert await p.call("count") == 1
    assert "reload_failed" not in [e.type async for e in events]


# -- (4) what sandboxer.health's answer means ------------------------------------------------

HEALTH = {
    "true": ('"result":true', True),
    "null": ('"result":null', True),
    "empty object": ('"result":{}', True),
    "ok true": ('"result":{"ok":true}', True),
    "not implemented": (NOT_IMPLEMENTED, True),
    "false": ('"result":false', False),
    "ok false": ('"result":{"ok":false,"message":"disk on fire"}', False),
    "an application error": ('"error":{"code":-32000,"message":"disk on fire"}', False),
}


@pytest.mark.parametrize("answer,healthy", HEALTH.values(), ids=HEALTH.keys())
async def test_health_answers(tmp_path, answer, healthy):
    root = sh_plugin(tmp_path / "sh", reserved=NULL, health=answer)  # init, shutdown: null
    async with PluginManager() as mgr:
        if healthy:
            p = await mgr.load(root)
            assert await mgr.check_health(p.id) is True
            assert p.state is PluginState.READY
        else:
            with pytest.raises(PluginLoadError, match="health check failed") as info:
                await mgr.load(root)
            if "disk on fire" in answer:
                assert "disk on fire" in str(info.value)
            assert await mgr.list() == []


# -- (5) shutdown: the host closes its end at once, and kills a plugin that stays ------------

@pytest.mark.parametrize("reserved", VARIANTS.values(), ids=VARIANTS.keys())
async def test_a_plugin_that_exits_at_the_end_of_its_input_is_gone_at_once(tmp_path, reserved):
    entry = f"adder-{uuid.uuid4().hex}.sh"
    root = sh_plugin(tmp_path / "sh", reserved=reserved, health=HEALTHY, entrypoint=entry)
    async with PluginManager() as mgr:
        p = await mgr.load(root)
        assert await p.call("add", 1, 1) == 2
        assert processes_running(entry)
        started = time.monotonic()
        await mgr.unload(p.id)
        took = time.monotonic() - started
        assert processes_running(entry) == []
    # Milliseconds in practice; the bound only has to tell "at once" from the grace period.
    assert took < 0.5, f"unload took {took:.2f}s (the grace period is {GRACE:g}s)"


@pytest.mark.parametrize("reserved", VARIANTS.values(), ids=VARIANTS.keys())
async def test_a_plugin_that_ignores_the_end_of_its_input_is_killed_after_the_grace(
        tmp_path, reserved):
    entry = f"lingerer-{uuid.uuid4().hex}.sh"
    root = sh_plugin(tmp_path / "sh", reserved=reserved, health=HEALTHY, at_eof="linger",
                     entrypoint=entry)
    async with PluginManager() as mgr:
        p = await mgr.load(root)
        assert await p.call("add", 1, 1) == 2
        started = time.monotonic()
        await mgr.unload(p.id)
        took = time.monotonic() - started
        assert processes_running(entry) == []
        assert p.state is PluginState.STOPPED
    # It ignores SIGTERM too: only a kill right after the grace period ends it this soon.
    assert GRACE - 0.1 < took < GRACE + 1.5, f"unload took {took:.2f}s"
