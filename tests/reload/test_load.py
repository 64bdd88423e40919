"""Hot reload under load: a stateful counter is replaced 20 times while callers hammer it.

For each kind (python in the sandboxed plugin host, native C in the plugin host, wasm in
process under wasmtime, an external executable on the SDK) a counter plugin is loaded from a
directory by ``PluginManager(hot_reload=True)``. Four caller tasks call ``incr()`` (which
answers ``[count, version]``) in a loop, and now and then ``version()``, while a driver
replaces the plugin's files 20 times (each file written aside, then renamed over: the
entrypoint first, the manifest last), bumping the manifest version each time, and waits for
the manager's ``reloaded`` / ``reload_failed`` event for that replacement before the next. Only
the file watcher triggers reloads; the test never calls ``mgr.reload``.

Every other replacement is broken, a different way each time: a module that cannot be loaded
(two forms per kind), init failing, the health check failing, a crash at start, and
import_state raising. The last replacement is broken, so the last good one (1.0.19) must be
the one serving at the end.

It holds when: no call failed; every count was handed out exactly once and the final count
equals the number of successful incr() calls (no update lost or repeated in a migration);
each caller saw versions only go forward, and never a broken one; each good version served;
the last good version serves at the end; and after the manager closes nothing leaked.

Run with ``-s`` to see the figures per kind.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest

from sandboxer import HostConfig, PluginEvent, PluginManager

pytestmark = pytest.mark.usefixtures("no_leaks")

CALLERS = 4
REPLACEMENTS = 20
EVENT_TIMEOUT = 30.0  # seconds for one replacement to be taken (reloaded or rolled back)
VERSION_EVERY = 25    # a caller asks version() instead of incr() once in this many calls
# What the even-numbered replacements break, in order (the odd-numbered ones are good).
BROKEN = ("bad_module", "init", "health", "crash", "import_state",
          "bad_module_2", "init", "health", "crash", "import_state")
SCHEDULE: list[str | None] = [None if k % 2 else BROKEN[k // 2 - 1]
                              for k in range(1, REPLACEMENTS + 1)]
# What a rolled-back reload's error mentions, per breakage (one of these, case-insensitive).
EXPECTED_ERROR = {
    "init": ("init failed",), "health": ("health check failed",),
    "crash": ("sigsegv", "wasm trap"), "import_state": ("import_state refuses",),
}

# -- the plugins ------------------------------------------------------------------------------

# Python, for the plugin host (python kind) and, with a shebang and sdk.serve(), external.
# Sync handlers may run on several threads of the plugin's server at once: hence the lock.
PY_COUNTER = '''\
"""A stateful counter for the hot-reload load test, version @VERSION@."""
import threading

VERSION = "@VERSION@"
_lock = threading.Lock()
_count = 0
@AT_IMPORT@


def init(config):
    @IN_INIT@


def health_check():
    return @HEALTHY@


def incr():
    global _count
    with _lock:
        _count += 1
        return [_count, VERSION]


def version():
    return VERSION


def export_state():
    with _lock:
        return {"count": _count, "version": VERSION}


def import_state(state, from_version):
    global _count
    @IN_IMPORT@
    # from_version is the manifest's version: a bare file has none (0.0.0)
    if state["version"] != from_version and from_version != "0.0.0":
        raise ValueError(f"state exported by {state['version']} arrived as from {from_version}")
    with _lock:
        _count = state["count"]
'''

PY_SERVE = '''

if __name__ == "__main__":
    from sandboxer import sdk

    sdk.serve(name="load-external", version=VERSION)
'''

CRASH_PY = "import ctypes\nctypes.string_at(0)  # a real SIGSEGV, before anything is served"

# The C kinds read their version from a placeholder patched into the built binary, so one
# build per variant serves every version. The copy goes through a volatile read so that the
# compiler cannot fold the placeholder's text into the code.
VERSION_PLACEHOLDER = b"@@SANDBOXER-LOAD-VERSION@@"

C_COMMON = r'''
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const volatile char LOAD_TEST_VERSION[40] = "@@SANDBOXER-LOAD-VERSION@@";
static char version[40];
static long long count;

static void load_version(void) {
    for (size_t i = 0; i + 1 < sizeof version; i++)
        version[i] = LOAD_TEST_VERSION[i];
    version[sizeof version - 1] = 0;
}

/* The string value after "key" in a NUL-terminated JSON text (no escapes expected). */
static int string_after(const char *text, const char *key, char *out, size_t cap) {
    const char *p = strstr(text, key);
    if (!p) return 0;
    p += strlen(key);
    while (*p == ' ' || *p == ':') p++;
    if (*p++ != '"') return 0;
    size_t n = 0;
    while (*p && *p != '"' && n + 1 < cap) out[n++] = *p++;
    out[n] = 0;
    return *p == '"';
}

/* import_state's arguments [{"count": n, "version": "v"}, "from"]: 0 and an error message
 * unless they are well formed and the state was exported by the version it claims. */
__attribute__((unused)) static const char *take_state(const char *args, size_t len) {
    char text[512], exported[40], from[40];
    if (len >= sizeof text) return "state too long";
    memcpy(text, args, len);
    text[len] = 0;
    const char *key = strstr(text, "\"count\"");
    if (!key) return "state has no count";
    key += 7;
    while (*key == ' ' || *key == ':') key++;
    char *end;
    long long n = strtoll(key, &end, 10);
    if (end == key) return "count is not a number";
    if (!string_after(text, "\"version\"", exported, sizeof exported))
        return "state has no version";
    const char *last = strrchr(text, ']');
    const char *close = last;
    while (close > text && *--close != '"') {}
    const char *open = close;
    while (open > text && *--open != '"') {}
    if (!last || close <= open || (size_t)(close - open - 1) >= sizeof from)
        return "no from_version";
    memcpy(from, open + 1, (size_t)(close - open - 1));
    from[close - open - 1] = 0;
    if (strcmp(from, exported) != 0) return "state arrived with the wrong from_version";
    count = n;
    return 0;
}

#ifdef BREAK_CRASH
__attribute__((constructor)) static void crash_at_start(void) {
    volatile int *volatile nowhere = NULL;
    *nowhere = 1;
#ifdef __wasm__
    __builtin_trap();
#endif
}
#endif
'''

NATIVE_C = C_COMMON + r'''
static int answer(const char *text, int status, uint8_t **out, size_t *out_len) {
    size_t n = strlen(text);
    uint8_t *buf = malloc(n);
    if (!buf) return 1;
    memcpy(buf, text, n);
    *out = buf;
    *out_len = n;
    return status;
}

__attribute__((constructor)) static void setup(void) { load_version(); }

int sandboxer_call(const char *method, const uint8_t *args, size_t args_len, uint8_t **out,
                   size_t *out_len) {
    char text[128];
    *out = NULL;
    *out_len = 0;
    if (strcmp(method, "incr") == 0) {
        snprintf(text, sizeof text, "[%lld,\"%s\"]", ++count, version);
        return answer(text, 0, out, out_len);
    }
    if (strcmp(method, "version") == 0) {
        snprintf(text, sizeof text, "\"%s\"", version);
        return answer(text, 0, out, out_len);
    }
    if (strcmp(method, "export_state") == 0) {
        snprintf(text, sizeof text, "{\"count\":%lld,\"version\":\"%s\"}", count, version);
        return answer(text, 0, out, out_len);
    }
    if (strcmp(method, "import_state") == 0) {
#ifdef BREAK_IMPORT
        (void)args; (void)args_len;
        return answer("{\"code\":9,\"message\":\"import_state refuses (broken on purpose)\"}",
                      1, out, out_len);
#else
        const char *refused = take_state((const char *)args, args_len);
        if (refused) {
            snprintf(text, sizeof text, "{\"code\":9,\"message\":\"%s\"}", refused);
            return answer(text, 1, out, out_len);
        }
        return answer("null", 0, out, out_len);
#endif
    }
    return answer("{\"code\":-32601,\"message\":\"no such method\"}", 1, out, out_len);
}

void sandboxer_free(uint8_t *ptr, size_t len) { (void)len; free(ptr); }

int sandboxer_init(const uint8_t *config, size_t len) {
    (void)config; (void)len;
#ifdef BREAK_INIT
    return 5;
#else
    return 0;
#endif
}

int sandboxer_health(void) {
#ifdef BREAK_HEALTH
    return 1;
#else
    return 0;
#endif
}

int sandboxer_shutdown(void) { return 0; }

const char *sandboxer_methods(void) {
    return "[\"incr\",\"version\",\"export_state\",\"import_state\"]";
}
'''

WASM_C = C_COMMON + r'''
#define EXPORT(name) __attribute__((export_name(name)))

static char reply_buf[256];

static int64_t reply(int n) {
    return (int64_t)(uintptr_t)reply_buf << 32 | (int64_t)n;
}

static int64_t error(const char *message) {
    return reply(snprintf(reply_buf, sizeof reply_buf,
                          "{\"error\":{\"code\":9,\"message\":\"%s\"}}", message));
}

EXPORT("sandboxer_alloc") void *plugin_alloc(int32_t len) { return malloc((size_t)len); }
EXPORT("sandboxer_free") void plugin_free(void *ptr, int32_t len) { (void)len; free(ptr); }

EXPORT("init") int64_t plugin_init(const char *args, int32_t len) {
    (void)args; (void)len;
    load_version();
#ifdef BREAK_INIT
    return error("init refuses (broken on purpose)");
#else
    return reply(snprintf(reply_buf, sizeof reply_buf, "{\"result\":null}"));
#endif
}

EXPORT("health_check") int64_t plugin_health(const char *args, int32_t len) {
    (void)args; (void)len;
#ifdef BREAK_HEALTH
    return reply(snprintf(reply_buf, sizeof reply_buf, "{\"result\":false}"));
#else
    return reply(snprintf(reply_buf, sizeof reply_buf, "{\"result\":true}"));
#endif
}

EXPORT("incr") int64_t plugin_incr(const char *args, int32_t len) {
    (void)args; (void)len;
    return reply(snprintf(reply_buf, sizeof reply_buf, "{\"result\":[%lld,\"%s\"]}", ++count,
                          version));
}

EXPORT("version") int64_t plugin_version(const char *args, int32_t len) {
    (void)args; (void)len;
    return reply(snprintf(reply_buf, sizeof reply_buf, "{\"result\":\"%s\"}", version));
}

EXPORT("export_state") int64_t plugin_export_state(const char *args, int32_t len) {
    (void)args; (void)len;
    return reply(snprintf(reply_buf, sizeof reply_buf,
                          "{\"result\":{\"count\":%lld,\"version\":\"%s\"}}", count, version));
}

EXPORT("import_state") int64_t plugin_import_state(const char *args, int32_t len) {
#ifdef BREAK_IMPORT
    (void)args; (void)len;
    return error("import_state refuses (broken on purpose)");
#else
    const char *refused = take_state(args, (size_t)len);
    if (refused) return error(refused);
    return reply(snprintf(reply_buf, sizeof reply_buf, "{\"result\":null}"));
#endif
}
'''

C_VARIANTS = {"good": [], "init": ["-DBREAK_INIT"], "health": ["-DBREAK_HEALTH"],
              "crash": ["-DBREAK_CRASH"], "import_state": ["-DBREAK_IMPORT"]}


def _manifest(plugin_id: str, version: str, kind: str, entrypoint: str) -> str:
    return (f'[plugin]\nid = "{plugin_id}"\nversion = "{version}"\ntype = "{kind}"\n'
            f'entrypoint = "{entrypoint}"\n')


def _python_source(version: str, breakage: str | None, *, external: bool) -> str:
    at_import, in_init, healthy, in_import = "", "pass", "True", "pass"
    if breakage == "bad_module":
        at_import = "def incr(:  # a syntax error"
    elif breakage == "bad_module_2":
        at_import = ("import sys\nprint('refusing to start', file=sys.stderr)\nsys.exit(3)"
                     if external else "import sandboxer_load_test_no_such_module")
    elif breakage == "init":
        in_init = "raise RuntimeError('init refuses (broken on purpose)')"
    elif breakage == "health":
        healthy = "False"
    elif breakage == "crash":
        at_import = CRASH_PY
    elif breakage == "import_state":
        in_import = "raise RuntimeError('import_state refuses (broken on purpose)')"
    source = (PY_COUNTER.replace("@VERSION@", version).replace("@AT_IMPORT@", at_import)
              .replace("@IN_INIT@", in_init).replace("@HEALTHY@", healthy)
              .replace("@IN_IMPORT@", in_import))
    if external:
        source = "#!/usr/bin/env python3\n" + source + PY_SERVE
    return source


def _patch_version(binary: bytes, version: str) -> bytes:
    assert binary.count(VERSION_PLACEHOLDER) == 1, "the version placeholder is not in the build"
    return binary.replace(VERSION_PLACEHOLDER,
                          version.encode().ljust(len(VERSION_PLACEHOLDER), b"\0"))


def _compile(cc: list[str], source: str, out_dir: Path, suffix: str) -> dict[str, bytes]:
    """Every variant of ``source`` built at once; their bytes by variant name."""
    if shutil.which(cc[0]) is None:
        pytest.fail(f"{cc[0]} is not installed; this test compiles C plugins with it "
                    "(scripts/bootstrap.sh installs the toolchain)", pytrace=False)
    out_dir.mkdir()
    src = out_dir / "counter.c"
    src.write_text(source)
    procs = {name: subprocess.Popen([*cc, *flags, "-o", str(out_dir / f"{name}{suffix}"),
                                     str(src)], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
             for name, flags in C_VARIANTS.items()}
    built: dict[str, bytes] = {}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"{' '.join(cc)} could not build the {name} variant:\n{output}",
                        pytrace=False)
        built[name] = (out_dir / f"{name}{suffix}").read_bytes()
    return built


@dataclass
class Kind:
    """How to build and write one kind's counter plugin."""

    name: str
    entrypoint: str
    files: Callable[[str, str | None], tuple[bytes, int]]  # (version, breakage) -> data, mode
    build: Callable[[Path], None] = lambda _: None
    bare: bool = False  # a bare file, no manifest: loaded by the file's own path

    @property
    def plugin_id(self) -> str:
        return Path(self.entrypoint).stem if self.bare else f"load.counter-{self.name}"

    def target(self, plugin_dir: Path) -> Path:
        return plugin_dir / self.entrypoint if self.bare else plugin_dir

    def install(self, plugin_dir: Path, staging: Path, version: str,
                breakage: str | None) -> None:
        """Write the files aside, then rename them over the plugin's: entrypoint, manifest."""
        data, mode = self.files(version, breakage)
        kind = self.name.removesuffix("-bare")
        manifest = _manifest(self.plugin_id, version, kind, self.entrypoint).encode()
        files = [(self.entrypoint, data, mode)]
        if not self.bare:
            files.append(("plugin.toml", manifest, 0o644))
        for name, content, file_mode in files:
            aside = staging / name
            aside.write_bytes(content)
            os.chmod(aside, file_mode)
            os.replace(aside, plugin_dir / name)


def _python_kind() -> Kind:
    return Kind("python", "counter.py",
                lambda v, b: (_python_source(v, b, external=False).encode(), 0o644))


def _external_kind() -> Kind:
    def files(version: str, breakage: str | None) -> tuple[bytes, int]:
        if breakage == "bad_module":  # a good script, but not executable
            return _python_source(version, None, external=True).encode(), 0o644
        return _python_source(version, breakage, external=True).encode(), 0o755
    return Kind("external", "counter.py", files)


def _native_kind() -> Kind:
    builds: dict[str, bytes] = {}

    def build(out: Path) -> None:
        builds.update(_compile(["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Wextra",
                                "-Werror"], NATIVE_C, out, ".so"))

    def files(version: str, breakage: str | None) -> tuple[bytes, int]:
        if breakage == "bad_module":
            return b"this is not a shared object, just text\n" * 20, 0o755
        if breakage == "bad_module_2":  # an ELF header, and then nothing
            return _patch_version(builds["good"], version)[:512], 0o755
        return _patch_version(builds[breakage or "good"], version), 0o755
    return Kind("native", "libcounter.so", files, build)


def _wasm_kind() -> Kind:
    builds: dict[str, bytes] = {}

    def build(out: Path) -> None:
        if shutil.which("wasm-ld") is None:
            pytest.fail("wasm-ld is not installed (install clang lld wasi-libc "
                        "libclang-rt-14-dev-wasm32; scripts/bootstrap.sh does)", pytrace=False)
        builds.update(_compile(["clang", "--target=wasm32-wasi", "-mexec-model=reactor",
                                "-O2", "-Wall", "-Wextra", "-Werror", "-Wl,--strip-all"],
                               WASM_C, out, ".wasm"))

    def files(version: str, breakage: str | None) -> tuple[bytes, int]:
        if breakage == "bad_module":  # not wasm at all
            return bytes(range(256)) * 8, 0o644
        if breakage == "bad_module_2":  # the magic and version, then garbage
            return b"\0asm\x01\0\0\0" + b"\xff\x13garbage section" * 32, 0o644
        return _patch_version(builds[breakage or "good"], version), 0o644
    return Kind("wasm", "counter.wasm", files, build)


def _python_bare_kind() -> Kind:
    """The python counter as a bare file: what a stranger writes first."""
    return Kind("python-bare", "counter.py",
                lambda v, b: (_python_source(v, b, external=False).encode(), 0o644), bare=True)


KINDS: dict[str, Callable[[], Kind]] = {
    "python": _python_kind, "native": _native_kind, "wasm": _wasm_kind,
    "external": _external_kind, "python-bare": _python_bare_kind,
}


# -- the run ----------------------------------------------------------------------------------

def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@dataclass
class Caller:
    counts: list[int] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)  # each version as first seen, in order
    backwards: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    calls: int = 0

    def saw(self, version: str) -> None:
        if not self.versions or self.versions[-1] != version:
            if self.versions and _key(version) < _key(self.versions[-1]):
                self.backwards.append(f"{self.versions[-1]} -> {version}")
            self.versions.append(version)


@dataclass
class Outcome:
    number: int
    version: str
    breakage: str | None
    event: PluginEvent
    seconds: float
    error: str | None  # LoadedPlugin.error once the event was seen
    manifest_version: str = ""  # what the event names: the version, or a bare file's 0.0.0

    @property
    def as_expected(self) -> bool:
        if self.breakage is None:
            return (self.event.type == "reloaded"
                    and self.event.version == (self.manifest_version or self.version)
                    and self.error is None)
        return self.event.type == "reload_failed" and self.error == self.event.error

    def describe(self) -> str:
        what = self.breakage or "good"
        error = (self.event.error or "").replace("\n", " ")
        error = error.partition(" keeps serving: ")[2] or error  # the cause, after the preamble
        return (f"{self.version} {what:<12} -> {self.event.type} (serving "
                f"{self.event.version}, gen {self.event.generation}) in {self.seconds:.2f}s"
                + (f": {error[:300]}" if error else ""))


async def _outcome(events: Any, plugin_id: str) -> PluginEvent:
    """The next reloaded / reload_failed event of ``plugin_id``."""
    async with asyncio.timeout(EVENT_TIMEOUT):
        async for event in events:
            if event.plugin_id == plugin_id and event.type in ("reloaded", "reload_failed"):
                return event
    raise AssertionError("the event stream ended")


@pytest.mark.parametrize("kind_name", list(KINDS))
async def test_hot_reload_under_load_loses_no_call_and_no_update(
        kind_name: str, tmp_path: Path) -> None:
    started = time.monotonic()
    kind = KINDS[kind_name]()
    await asyncio.to_thread(kind.build, tmp_path / "build")
    plugin_dir, staging = tmp_path / "plugin", tmp_path / "staging"
    plugin_dir.mkdir()
    staging.mkdir()
    kind.install(plugin_dir, staging, "1.0.0", None)
    built = time.monotonic()

    callers = [Caller() for _ in range(CALLERS)]
    outcomes: list[Outcome] = []
    async with PluginManager(HostConfig(), hot_reload=True, reload_debounce=0.05) as mgr:
        events = mgr.events()
        p = await mgr.load(kind.target(plugin_dir))
        assert p.sandbox is not None and p.sandbox.enabled  # wasm: wasmtime's limits
        stop = asyncio.Event()

        async def hammer(me: Caller) -> None:
            while not stop.is_set():
                try:
                    if me.calls % VERSION_EVERY == VERSION_EVERY - 1:
                        me.saw(await p.call("version"))
                    else:
                        count, version = await p.call("incr")
                        me.counts.append(count)
                        me.saw(version)
                except Exception as exc:  # noqa: BLE001 - every failure is reported below
                    me.failures.append(f"call {me.calls}: {type(exc).__name__}: {exc}")
                me.calls += 1
                await asyncio.sleep(0)  # in-process wasm calls may never yield otherwise

        tasks = [asyncio.create_task(hammer(c)) for c in callers]
        try:
            await asyncio.sleep(0.2)  # the callers are under way before the first reload
            for number, breakage in enumerate(SCHEDULE, start=1):
                version = f"1.0.{number}"
                t0 = time.monotonic()
                kind.install(plugin_dir, staging, version, breakage)
                try:
                    event = await _outcome(events, p.id)
                except TimeoutError:
                    raise AssertionError(
                        f"replacement {version} ({breakage or 'good'}) was not taken within "
                        f"{EVENT_TIMEOUT:g}s; so far:\n"
                        + "\n".join(o.describe() for o in outcomes)) from None
                outcomes.append(Outcome(number, version, breakage, event, time.monotonic() - t0,
                                        str(p.error) if p.error is not None else None,
                                        "0.0.0" if kind.bare else version))
        finally:
            stop.set()
            await asyncio.gather(*tasks)
        final, final_version = await p.call("incr")
        serving = await p.call("version")
        manifest_version, generation = p.version, p.generation
        stats = p.statistics()
        await events.aclose()
    finished = time.monotonic()

    good = ["1.0.0"] + [o.version for o in outcomes if o.breakage is None]
    reloads = sum(o.event.type == "reloaded" for o in outcomes)
    failed_reloads = sum(o.event.type == "reload_failed" for o in outcomes)
    calls = sum(c.calls for c in callers)
    counts = sorted(n for c in callers for n in c.counts)
    print(f"\n[{kind_name}] reloads={reloads} failed_reloads={failed_reloads} calls={calls} "
          f"(incr={len(counts)}, per caller {[c.calls for c in callers]}) final_count={final} "
          f"serving={serving} generation={generation} build={built - started:.1f}s "
          f"run={finished - built:.1f}s")
    for outcome in outcomes:
        print(f"  {outcome.describe()}")

    failures = [f for c in callers for f in c.failures]
    assert not failures, f"{len(failures)} call(s) failed, first ones:\n" + "\n".join(
        failures[:10])
    unexpected = [o.describe() for o in outcomes if not o.as_expected]
    assert not unexpected, "replacements not taken as expected:\n" + "\n".join(unexpected)
    for outcome in outcomes:
        expected = EXPECTED_ERROR.get(outcome.breakage or "", ())
        if expected:
            error = (outcome.event.error or "").lower()
            assert any(e in error for e in expected), outcome.describe()
    # No update lost or repeated: every count handed out once, and the state reached the end.
    assert final - 1 == len(counts), (
        f"{len(counts)} successful incr() calls, but the counter ended at {final - 1}")
    assert counts == list(range(1, len(counts) + 1)), "a count was handed out twice or skipped"
    for c in callers:
        assert all(a < b for a, b in zip(c.counts, c.counts[1:])), "a caller's count went back"
    # Versions only go forward, never a broken one, and every good one served.
    assert not [b for c in callers for b in c.backwards], [c.backwards for c in callers]
    seen = {v for c in callers for v in c.versions}
    assert seen <= set(good), f"broken versions served: {sorted(seen - set(good))}"
    assert seen == set(good), f"good versions that never served: {sorted(set(good) - seen)}"
    # The last good version serves at the end, with every generation counted (a bare file's
    # manifest version is always 0.0.0).
    assert serving == final_version == good[-1]
    assert manifest_version == ("0.0.0" if kind.bare else good[-1])
    assert generation == [o.event.generation for o in outcomes if o.breakage is None][-1]
    assert stats.failures == 0 and stats.calls == calls + 2
