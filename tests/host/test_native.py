"""The native kind's ctypes adapter (sandboxer/host/native.py) and the C and Go examples.

The examples are built for real with their Makefiles; a missing toolchain fails the tests with
the Debian package to install (no skips: these examples are what the native kind promises).
The C library runs in-process, each test on its own copy so its globals start fresh; the Go
library runs in a subprocess (one Go runtime per process, and `crash` must kill something
that is not pytest). A small misbehaving library, compiled from C here, checks every way a
library can hand back something the adapter must refuse.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import EXAMPLES, REPO
from sandboxer.errors import MethodNotFound, PluginCallError, PluginLoadError, PluginStateError
from sandboxer.host.native import MAX_OUT_BYTES, NativeLibrary

TOOLS = {"make": "make", "gcc": "gcc", "go": "golang-go"}


def _require(*tools: str) -> None:
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; the native examples need it: "
                        f"apt-get install {TOOLS[tool]} (scripts/bootstrap.sh installs it)",
                        pytrace=False)


def _make(example: str, artifact: str) -> Path:
    run = subprocess.run(["make", "-C", str(EXAMPLES / example)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f"make -C examples/{example} failed:\n{run.stdout}{run.stderr}"
    built = EXAMPLES / example / artifact
    assert built.is_file(), f"make -C examples/{example} did not produce {artifact}"
    return built


@pytest.fixture(scope="session")
def c_example() -> Path:
    _require("make", "gcc")
    return _make("native-c", "libhello.so")


@pytest.fixture(scope="session")
def go_example() -> Path:
    _require("make", "gcc", "go")  # cgo needs the C compiler too
    return _make("native-go", "libgohello.so")


@pytest.fixture
def hello(c_example: Path, tmp_path: Path) -> NativeLibrary:
    """A fresh instance of the C example: dlopen of a private copy, so its globals are new."""
    copy = tmp_path / "libhello.so"
    shutil.copyfile(c_example, copy)
    return NativeLibrary(copy)


def _run_python(code: str, *, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Runs code in a fresh interpreter, without core dumps (a crash is expected there)."""
    prologue = "import resource; resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
    return subprocess.run([sys.executable, "-c", prologue + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


# -- the C example, in-process ---------------------------------------------------------------

def test_c_lists_its_methods_and_has_no_state(hello: NativeLibrary) -> None:
    assert hello.methods == ("greet", "add", "crash", "fail")
    assert hello.has_state is False


@pytest.mark.parametrize(
    ("name", "greeting"),
    [
        ("world", "Hello, world!"),
        ('quote " and \\ backslash', 'Hello, quote " and \\ backslash!'),
        ("line\nbreak\ttab\x00nul\x1fus", "Hello, line\nbreak\ttab\x00nul\x1fus!"),
        ("wörld ☃ 🐍", "Hello, wörld ☃ 🐍!"),
        ("", "Hello, !"),
    ],
    ids=["plain", "quote-backslash", "control-chars", "non-ascii", "empty"],
)
def test_c_greet_escapes_what_it_echoes(hello: NativeLibrary, name: str, greeting: str) -> None:
    assert hello.call("greet", [name]) == greeting


@pytest.mark.parametrize(
    ("a", "b", "total"),
    [(2, 3, 5), (-1.5, 0.25, -1.25), (0.1, 0.2, 0.1 + 0.2), (2**52, 1, 2**52 + 1), (1e308, 0, 1e308)],
)
def test_c_add(hello: NativeLibrary, a: float, b: float, total: float) -> None:
    assert hello.call("add", [a, b]) == total


@pytest.mark.parametrize(
    ("method", "args"),
    [("add", [1]), ("add", [1, "2"]), ("add", [1, 2, 3]), ("add", [1e308, 1e308]),
     ("greet", []), ("greet", [1]), ("greet", [["nested"]])],
    ids=["add-one-arg", "add-string", "add-three-args", "add-overflow", "greet-no-arg",
         "greet-number", "greet-list"],
)
def test_c_bad_arguments_are_invalid_params(hello: NativeLibrary, method: str,
                                            args: list[Any]) -> None:
    with pytest.raises(PluginCallError) as info:
        hello.call(method, args)
    assert info.value.code == -32602
    assert info.value.method == method


def test_c_fail_is_a_plugin_error_with_its_code(hello: NativeLibrary) -> None:
    with pytest.raises(PluginCallError) as info:
        hello.call("fail", [])
    assert type(info.value) is PluginCallError
    assert info.value.code == 7
    assert info.value.message == "fail() always fails"


def test_c_unknown_method_is_the_librarys_own_answer(hello: NativeLibrary) -> None:
    with pytest.raises(MethodNotFound) as info:
        hello.call("nope", [])
    assert info.value.code == -32601
    assert info.value.message == "no such method: nope"
    assert info.value.data == {"available": ["greet", "add", "crash", "fail"]}


def test_c_init_sets_the_greeting(hello: NativeLibrary) -> None:
    hello.init({"other": [1, {"deep": None}], "greeting": "Howdy \"pardner\"", "x": True})
    assert hello.call("greet", ["Tex"]) == 'Howdy "pardner", Tex!'
    hello.init({})  # no greeting: keeps the current one
    assert hello.call("greet", ["Tex"]) == 'Howdy "pardner", Tex!'


def test_c_init_failure_is_reported(hello: NativeLibrary) -> None:
    with pytest.raises(PluginCallError) as info:
        hello.init({"greeting": 5})
    assert info.value.data == {"status": 3}
    assert "sandboxer_init returned status 3" in str(info.value)


def test_c_health(hello: NativeLibrary) -> None:
    assert hello.health() == (True, "")


def test_c_shutdown_is_idempotent_and_ends_calls(hello: NativeLibrary) -> None:
    hello.shutdown()
    hello.shutdown()
    with pytest.raises(PluginStateError, match="after sandboxer_shutdown"):
        hello.call("greet", ["late"])
    with pytest.raises(PluginStateError):
        hello.health()


def test_c_has_no_state_hooks(hello: NativeLibrary) -> None:
    with pytest.raises(MethodNotFound, match="no state hooks"):
        hello.export_state()


def test_args_must_be_json(hello: NativeLibrary) -> None:
    with pytest.raises(PluginCallError) as info:
        hello.call("greet", [{1, 2}])
    assert info.value.code == -32602
    with pytest.raises(TypeError):
        hello.call("greet", ("tuple",))  # type: ignore[arg-type]


def test_concurrent_callers_are_served_one_at_a_time(hello: NativeLibrary) -> None:
    results: list[Any] = []

    def worker(n: int) -> None:
        for i in range(50):
            results.append(hello.call("add", [n, i]))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(n + i for n in range(8) for i in range(50))


# -- the C example's own parser, fed malformed bytes directly through the ABI ----------------

def _raw(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.sandboxer_call.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t,
                                   ctypes.POINTER(ctypes.c_void_p),
                                   ctypes.POINTER(ctypes.c_size_t)]
    lib.sandboxer_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.sandboxer_init.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    return lib


@pytest.mark.parametrize(
    ("args", "length"),
    [
        (b"", None), (b"[", None), (b'["a"', None), (b"[1,]", None), (b"[,1]", None),
        (b'["\\ud800"]', None), (b'["\\udc00"]', None), (b'["\\x"]', None), (b'["\\u12"]', None),
        (b'["a\nb"]', None), (b"[01]", None), (b"[1.]", None), (b"[-]", None), (b"[1e]", None),
        (b"[" + b"9" * 100 + b"]", None), (b"[tru]", None), (b"[[" * 200 + b"]]" * 200, None),
        (b'["abc"] x', None), (b'{"a":1}', None), (b'["abc"]', 4),
    ],
    ids=["empty", "open", "unterminated-array", "trailing-comma", "leading-comma",
         "lone-high-surrogate", "lone-low-surrogate", "bad-escape", "short-unicode-escape",
         "raw-newline-in-string", "leading-zero", "bare-dot", "bare-minus", "bare-exponent",
         "huge-number", "bad-literal", "too-deep", "trailing-garbage", "object-not-array",
         "cut-by-args-len"],
)
def test_c_example_refuses_malformed_args(hello: NativeLibrary, args: bytes,
                                          length: int | None) -> None:
    lib = _raw(Path(hello.path))
    out, out_len = ctypes.c_void_p(), ctypes.c_size_t()
    n = len(args) if length is None else length
    status = lib.sandboxer_call(b"greet", args, n, ctypes.byref(out), ctypes.byref(out_len))
    try:
        error = json.loads(ctypes.string_at(out.value, out_len.value))
    finally:
        lib.sandboxer_free(out, out_len)
    assert status != 0
    assert error["code"] == -32602


@pytest.mark.parametrize(
    "config",
    [b"", b"{", b"[]", b'{"greeting"}', b'{"greeting":', b'{"greeting":"x"', b'{"greeting":5}',
     b'{"greeting":"x"} {}', b'{"a":' + b"[" * 200 + b"]" * 200 + b"}",
     b'{"greeting":"' + b"x" * 2000 + b'"}', b'{"greeting":"\\ud800"}'],
    ids=["empty", "open", "array", "key-only", "no-value", "unterminated", "not-a-string",
         "trailing-garbage", "too-deep", "too-long", "lone-surrogate"],
)
def test_c_example_init_refuses_malformed_config(hello: NativeLibrary, config: bytes) -> None:
    lib = _raw(Path(hello.path))
    assert lib.sandboxer_init(config, len(config)) != 0
    assert hello.call("greet", ["x"]) == "Hello, x!"


# -- the Go example, in a subprocess ---------------------------------------------------------

def test_go_library(go_example: Path) -> None:
    run = _run_python(f"""
        import json
        from sandboxer.errors import PluginCallError
        from sandboxer.host.native import NativeLibrary
        lib = NativeLibrary({str(go_example)!r})
        out = {{"methods": lib.methods, "has_state": lib.has_state, "health": lib.health(),
               "greet": lib.call("greet", ["wörld \\"q\\""]), "add": lib.call("add", [2, 3.5])}}
        lib.init({{"greeting": "Hi"}})
        out["greet_after_init"] = lib.call("greet", ["you"])
        for method, args in [("nope", []), ("add", [1]), ("greet", [1])]:
            try:
                lib.call(method, args)
            except PluginCallError as exc:
                out[method + "/" + str(len(args))] = [type(exc).__name__, exc.code, exc.message]
        print(json.dumps(out))
        """)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {
        "methods": ["greet", "add", "crash"],
        "has_state": False,
        "health": [True, ""],
        "greet": 'Hello, wörld "q"!',
        "add": 5.5,
        "greet_after_init": "Hi, you!",
        "nope/0": ["MethodNotFound", -32601, "no such method: nope"],
        "add/1": ["PluginCallError", -32602, "add takes two arguments: numbers"],
        "greet/1": ["PluginCallError", -32602, "greet takes one argument: a name (string)"],
    }


# -- crash kills the process that called it --------------------------------------------------

_CRASH = """
    import sys
    from sandboxer.host.native import NativeLibrary
    NativeLibrary(sys.argv[1] if len(sys.argv) > 1 else {path!r}).call("crash", [])
    print("survived")
    """


def test_c_crash_is_a_real_segfault(c_example: Path) -> None:
    run = _run_python(_CRASH.format(path=str(c_example)))
    assert run.returncode == -signal.SIGSEGV, (run.returncode, run.stderr)
    assert "survived" not in run.stdout


def test_go_crash_kills_the_process(go_example: Path) -> None:
    # Go turns the nil dereference into a panic, and in a c-shared library an unrecovered
    # panic aborts the process (SIGABRT) rather than exit(2) as a Go program would.
    run = _run_python(_CRASH.format(path=str(go_example)))
    assert run.returncode == -signal.SIGABRT, (run.returncode, run.stderr)
    assert "nil pointer dereference" in run.stderr
    assert "survived" not in run.stdout


# -- a misbehaving library -------------------------------------------------------------------

_MISBEHAVING_C = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int freed;               /* how many buffers came back through sandboxer_free */
size_t last_freed_len;   /* the length passed with the last one */
volatile int entered, released, in_call, max_in_call;

static uint8_t stored[4096];
static size_t stored_len;

static int give(const char *text, size_t len, int status, uint8_t **out, size_t *out_len) {
    uint8_t *p = malloc(len ? len : 1);
    memcpy(p, text, len);
    *out = p;
    *out_len = len;
    return status;
}
#define GIVE(text, status) give(text, sizeof(text) - 1, status, out, out_len)

#ifndef NO_CALL
int sandboxer_call(const char *m, const uint8_t *args, size_t args_len, uint8_t **out,
                   size_t *out_len) {
    if (!strcmp(m, "echo")) return give((const char *)args, args_len, 0, out, out_len);
    if (!strcmp(m, "bad_json")) return GIVE("{not json", 0);
    if (!strcmp(m, "bad_utf8")) return GIVE("\"\xff\"", 0);
    if (!strcmp(m, "empty_out")) return GIVE("", 0);
    if (!strcmp(m, "null_out")) { *out = NULL; *out_len = 5; return 0; }
    if (!strcmp(m, "null_result")) { *out = NULL; *out_len = 0; return 0; }
    if (!strcmp(m, "huge_len")) { GIVE("1", 0); *out_len = (size_t)100 << 20; return 0; }
    if (!strcmp(m, "negative_len")) { GIVE("1", 0); *out_len = (size_t)-1; return 0; }
    if (!strcmp(m, "error_data"))
        return GIVE("{\"code\":5,\"message\":\"m\",\"data\":{\"k\":[1]}}", 1);
    if (!strcmp(m, "error_not_object")) return GIVE("[1,2]", 1);
    if (!strcmp(m, "error_bad_code")) return GIVE("{\"code\":\"5\",\"message\":\"m\"}", 1);
    if (!strcmp(m, "error_bool_code")) return GIVE("{\"code\":true,\"message\":\"m\"}", 1);
    if (!strcmp(m, "error_not_json")) return GIVE("oops", 2);
    if (!strcmp(m, "error_no_out")) { *out = NULL; *out_len = 0; return 3; }
    if (!strcmp(m, "import_state")) {
        if (args_len > sizeof stored) return GIVE("{\"code\":1,\"message\":\"too big\"}", 1);
        memcpy(stored, args, args_len);
        stored_len = args_len;
        return GIVE("null", 0);
    }
    if (!strcmp(m, "export_state")) return give((const char *)stored, stored_len, 0, out, out_len);
    if (!strcmp(m, "wait")) {
        entered = 1;
        for (int i = 0; i < 10000 && !released; i++) usleep(1000);
        return released ? GIVE("\"released\"", 0) : GIVE("\"timed out\"", 0);
    }
    if (!strcmp(m, "overlap")) {
        int now = __sync_add_and_fetch(&in_call, 1);
        if (now > max_in_call) max_in_call = now;
        usleep(500);
        __sync_sub_and_fetch(&in_call, 1);
        return GIVE("null", 0);
    }
    return GIVE("{\"code\":-32601,\"message\":\"unknown\"}", 1);
}
#endif

void release_wait(void) { released = 1; }

#ifndef NO_FREE
void sandboxer_free(uint8_t *ptr, size_t len) { freed++; last_freed_len = len; free(ptr); }
#endif

#ifdef METHODS
const char *sandboxer_methods(void) { return METHODS; }
#endif
#ifdef METHODS_NULL
const char *sandboxer_methods(void) { return NULL; }
#endif
"""


@pytest.fixture(scope="module")
def build_misbehaving(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    _require("gcc")
    root = tmp_path_factory.mktemp("misbehaving")
    source = root / "misbehaving.c"
    source.write_text(_MISBEHAVING_C)
    built: dict[tuple[str, ...], Path] = {}

    def build(*defines: str) -> Path:
        if defines not in built:
            out = root / f"lib{len(built)}.so"
            run = subprocess.run(
                ["gcc", "-shared", "-fPIC", "-O1", "-Wall", "-o", str(out), str(source),
                 *(f"-D{d}" for d in defines)], capture_output=True, text=True, timeout=60)
            assert run.returncode == 0, run.stderr
            built[defines] = out
        return built[defines]

    return build


@pytest.fixture
def misbehaving(build_misbehaving: Callable[..., Path], tmp_path: Path) -> NativeLibrary:
    copy = tmp_path / "libmisbehaving.so"
    shutil.copyfile(build_misbehaving(), copy)
    return NativeLibrary(copy)


def _freed(lib: NativeLibrary) -> tuple[int, int]:
    raw = ctypes.CDLL(lib.path)
    return (ctypes.c_int.in_dll(raw, "freed").value,
            ctypes.c_size_t.in_dll(raw, "last_freed_len").value)


@pytest.mark.parametrize(
    ("method", "fault", "freed"),
    [
        ("bad_json", "returned invalid JSON as its result", True),
        ("bad_utf8", "returned invalid JSON as its result", True),
        ("empty_out", "returned invalid JSON as its result", True),
        ("null_out", "returned a NULL out buffer with out_len 5", False),
        ("huge_len", f"returned {100 << 20} bytes, over the 64 MiB limit", True),
        ("negative_len", "returned a negative length (-1) in out_len", True),
        ("error_not_object", "an error that is not {\"code\": int, \"message\": str}", True),
        ("error_bad_code", "an error that is not {\"code\": int, \"message\": str}", True),
        ("error_bool_code", "an error that is not {\"code\": int, \"message\": str}", True),
        ("error_not_json", "failed with status 2 and its error is not valid JSON", True),
        ("error_no_out", "failed with status 3 and no error object", False),
    ],
)
def test_malformed_answers_are_internal_errors(misbehaving: NativeLibrary, method: str,
                                               fault: str, freed: bool) -> None:
    with pytest.raises(PluginCallError) as info:
        misbehaving.call(method, [])
    assert type(info.value) is PluginCallError
    assert info.value.code == -32603
    assert fault in info.value.message
    assert info.value.method == method
    # out is handed back exactly when it is non-NULL, with the length the library gave.
    count, length = _freed(misbehaving)
    assert count == (1 if freed else 0)
    if method == "huge_len":
        assert length == 100 << 20


def test_max_out_is_64_mib() -> None:
    assert MAX_OUT_BYTES == 64 << 20


def test_error_data_is_passed_through(misbehaving: NativeLibrary) -> None:
    with pytest.raises(PluginCallError) as info:
        misbehaving.call("error_data", [])
    assert (info.value.code, info.value.message, info.value.data) == (5, "m", {"k": [1]})


def test_null_out_with_zero_length_is_a_null_result(misbehaving: NativeLibrary) -> None:
    assert misbehaving.call("null_result", []) is None
    assert _freed(misbehaving) == (0, 0)


def test_args_arrive_as_one_json_array(misbehaving: NativeLibrary) -> None:
    args = [1, "two", {"three": [3.0, None, True]}, b"\x00\xff"]
    assert misbehaving.call("echo", args) == [1, "two", {"three": [3.0, None, True]}, "AP8="]
    assert _freed(misbehaving)[0] == 1


def test_no_methods_export_means_none(misbehaving: NativeLibrary) -> None:
    assert misbehaving.methods is None
    assert misbehaving.has_state is False


def test_state_goes_through_sandboxer_call(build_misbehaving: Callable[..., Path]) -> None:
    lib = NativeLibrary(build_misbehaving('METHODS="[\\"echo\\",\\"export_state\\",'
                                          '\\"import_state\\"]"'))
    assert lib.has_state is True
    assert lib.methods == ("echo",)
    lib.import_state({"count": 3}, "0.9.0")
    assert lib.export_state() == [{"count": 3}, "0.9.0"]


@pytest.mark.parametrize(
    ("define", "fault"),
    [
        ('METHODS="{\\"a\\":1}"', "must return a JSON array of strings"),
        ('METHODS="[\\"a\\",1]"', "must return a JSON array of strings"),
        ('METHODS="\\"greet\\""', "must return a JSON array of strings"),
        ('METHODS="[\\"a\\""', "did not return valid JSON"),
        ('METHODS="[\\"has space\\"]"', "is not a method name"),
        ('METHODS="[\\"\\"]"', "is not a method name"),
        ('METHODS="[\\"a\\",\\"a\\"]"', "lists a name twice"),
        ("METHODS_NULL", "sandboxer_methods returned NULL"),
    ],
    ids=["object", "non-string", "bare-string", "invalid-json", "space-in-name", "empty-name",
         "duplicate", "null"],
)
def test_bad_method_lists_fail_the_load(build_misbehaving: Callable[..., Path], define: str,
                                        fault: str) -> None:
    path = build_misbehaving(define)
    with pytest.raises(PluginLoadError, match="sandboxer_methods") as info:
        NativeLibrary(path)
    assert fault in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("symbol", ["sandboxer_free", "sandboxer_call"])
def test_missing_required_symbol_fails_the_load(build_misbehaving: Callable[..., Path],
                                                symbol: str) -> None:
    path = build_misbehaving("NO_FREE" if symbol == "sandboxer_free" else "NO_CALL")
    with pytest.raises(PluginLoadError, match=f"required symbol {symbol} is not exported"):
        NativeLibrary(path)


@pytest.mark.parametrize("content", [None, b"not an ELF file"], ids=["missing", "not-elf"])
def test_dlopen_failure_is_a_load_error(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "libnothing.so"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PluginLoadError, match="dlopen failed") as info:
        NativeLibrary(path)
    assert isinstance(info.value.__cause__, OSError)


def test_foreign_calls_release_the_gil(misbehaving: NativeLibrary) -> None:
    # `wait` blocks inside the library until release_wait() is called. If the call held the
    # GIL this thread could never run to release it, and `wait` would time out.
    raw = ctypes.CDLL(misbehaving.path)
    result: list[Any] = []
    caller = threading.Thread(target=lambda: result.append(misbehaving.call("wait", [])))
    caller.start()
    entered = ctypes.c_int.in_dll(raw, "entered")
    while not entered.value:
        caller.join(0.001)
    raw.release_wait()
    caller.join(15)
    assert result == ["released"]


def test_calls_are_serialized(misbehaving: NativeLibrary) -> None:
    threads = [threading.Thread(target=lambda: [misbehaving.call("overlap", []) for _ in range(20)])
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert ctypes.c_int.in_dll(ctypes.CDLL(misbehaving.path), "max_in_call").value == 1
