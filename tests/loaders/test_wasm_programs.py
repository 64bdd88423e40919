"""Unmodified WASI programs as plugins (issue 22): a manifest saying ``[wasm] mode =
"command"`` makes any wasm32-wasi command a plugin whose one method, ``run``, runs it once
with the arguments as its argv and answers with its exit code and output. The programs are
plain C against wasi-libc, written as for any WASI runtime, compiled by the test.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from sandboxer import (
    CallTimeout,
    ManifestError,
    MethodNotFound,
    PluginCallError,
    PluginLoadError,
    PluginManager,
    load_plugin,
)
from sandboxer.config import HostConfig
from wasi_build import compile_wasi

pytestmark = pytest.mark.usefixtures("no_leaks")

# wasmtime's WASI keeps a tokio runtime for the life of the process (an epoll and an eventfd),
# made on the first file operation: made here before any test's leak snapshot.

TONE = r"""
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    const char *text = "", *out = NULL;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "-t")) text = argv[i + 1];
        else if (!strcmp(argv[i], "-o")) out = argv[i + 1];
        else { fprintf(stderr, "unknown option %s\n", argv[i]); return 2; }
    }
    if (out) {
        FILE *f = fopen(out, "wb");
        if (!f) { perror(out); return 1; }
        fprintf(f, "RIFF%s", text);
        fclose(f);
    }
    printf("%s: %zu bytes\n", argv[0], strlen(text));
    return 0;
}
"""

BYTES = r"""
#include <stdio.h>
int main(void) { for (int i = 255; i >= 0; i--) putchar(i); return 0; }
"""

SPIN = "int main(void) { volatile unsigned long x = 0; for (;;) x++; }\n"


def _plugin(root: Path, wasm: Path, *, extra: str = "", mode: str = "command") -> Path:
    root.mkdir(parents=True)
    (root / "prog.wasm").write_bytes(wasm.read_bytes())
    (root / "plugin.toml").write_text(
        f'[plugin]\nid = "stranger.{root.name}"\nversion = "1.0.0"\ntype = "wasm"\n'
        f'entrypoint = "prog.wasm"\n\n[wasm]\nmode = "{mode}"\n{extra}'
    )
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wasi-plugins")
    return {name: compile_wasi(out, name, src)
            for name, src in (("tone", TONE), ("bytes", BYTES), ("spin", SPIN))}


@pytest.fixture(scope="module", autouse=True)
def _wasi_runtime(built: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> None:
    import asyncio
    import gc

    root = tmp_path_factory.mktemp("warm")
    (root / "out").mkdir()
    plugin = _plugin(root / "tone", built["tone"],
                     extra=f'\n[sandbox]\nallowed_paths = ["{root}/out:rw"]\n')

    async def warm() -> None:
        async with PluginManager(HostConfig(path_roots=(str(root),))) as mgr:
            p = await mgr.load(plugin)
            assert (await p.call("run", "-o", f"{root}/out/w"))["exitCode"] == 0

    asyncio.run(warm())
    gc.collect()


@pytest.fixture(autouse=True)
def _collect_before_leak_check(no_leaks: None) -> Any:
    """An error a test caught sits in a cycle with its traceback: collected before
    ``no_leaks`` counts descriptors (as tests/loaders/test_wasm_wasi.py does)."""
    import gc

    yield
    gc.collect()


async def test_a_wasi_program_runs_as_a_plugin(tmp_path: Path, built: dict[str, Path]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    root = _plugin(tmp_path / "tone", built["tone"],
                   extra=f'\n[sandbox]\nallowed_paths = ["{out}:rw"]\n')
    async with PluginManager(HostConfig(path_roots=(str(tmp_path),))) as mgr:
        p = await mgr.load(root)
        assert p.methods == ("run",)
        answer = await p.call("run", "-t", "hello", "-o", f"{out}/x.wav")
        assert answer == {"exitCode": 0, "stdout": "prog.wasm: 5 bytes\n", "stderr": "",
                          "truncated": []}
        assert (out / "x.wav").read_bytes() == b"RIFFhello"
        # its own failure is an answer, not an error
        answer = await p.call("run", "-x", "y")
        assert answer["exitCode"] == 2 and answer["stderr"] == "unknown option -x\n"
        # outside its grant, the program's own open fails
        answer = await p.call("run", "-t", "x", "-o", "/tmp/escaped.wav")
        assert answer["exitCode"] == 1 and not Path("/tmp/escaped.wav").exists()
        with pytest.raises(PluginCallError, match="strings only"):
            await p.call("run", 1, 2)
        with pytest.raises(MethodNotFound):
            await p.call("main")


async def test_binary_output_comes_as_base64_and_is_capped(
        tmp_path: Path, built: dict[str, Path]) -> None:
    root = _plugin(tmp_path / "bytes", built["bytes"])
    async with PluginManager(HostConfig(max_frame=100)) as mgr:
        answer = await (await mgr.load(root)).call("run")
    assert answer["stdout"] is None and answer["truncated"] == ["stdout"]
    assert base64.b64decode(answer["stdoutBase64"]) == bytes(range(255, 155, -1))


async def test_a_program_past_its_timeout_is_stopped(tmp_path: Path,
                                                     built: dict[str, Path]) -> None:
    root = _plugin(tmp_path / "spin", built["spin"], extra='\n[sandbox]\ntimeout = "500ms"\n')
    async with PluginManager() as mgr:
        p = await mgr.load(root)
        with pytest.raises(CallTimeout):
            await p.call("run")
        with pytest.raises(CallTimeout):  # each run is a fresh instance: it goes on serving
            await p.call("run")


async def test_what_is_no_command_is_refused(tmp_path: Path) -> None:
    lib = compile_wasi(tmp_path, "lib", "int add(int a, int b) { return a + b; }\n",
                       reactor=True)
    root = _plugin(tmp_path / "lib", lib)
    async with PluginManager() as mgr:
        with pytest.raises(PluginLoadError, match='mode = "command" needs a WASI command'):
            await mgr.load(root)


def test_the_wasm_table_is_checked(tmp_path: Path, built: dict[str, Path]) -> None:
    root = _plugin(tmp_path / "bad", built["tone"], mode="program")
    with pytest.raises(ManifestError, match="wasm.mode"):
        load_plugin(root)
    py = tmp_path / "py"
    py.mkdir()
    (py / "p.py").write_text("def f():\n    return 1\n")
    (py / "plugin.toml").write_text(
        '[plugin]\nid = "x.py"\nversion = "1.0.0"\ntype = "python"\nentrypoint = "p.py"\n'
        '\n[wasm]\nmode = "command"\n')
    with pytest.raises(ManifestError, match=r'\[wasm\] is for type = "wasm"'):
        load_plugin(py)


def _say(word: str) -> str:
    return f'#include <stdio.h>\nint main(void) {{ puts("{word}"); return 0; }}\n'


def test_a_program_run_again_is_not_read_again_unless_it_changed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``sandboxer exec`` remembers a program file's SHA-256 by its device, inode, size,
    mtime and ctime: run again, it is found compiled without being read. Any change of the
    file, in place or a new file renamed over it, is read and run as it is now."""
    from sandboxer.loaders.wasm import _module_cache
    from sandboxer.loaders.wasm._program import run_program
    from sandboxer.sandbox.policy import SandboxConfig

    cache = tmp_path / "cache" / "sandboxer" / "wasm"
    cache.parent.parent.mkdir()
    monkeypatch.setattr(_module_cache, "_directory", lambda: str(cache))

    build = tmp_path / "build"
    build.mkdir()
    one, two = (compile_wasi(build, word, _say(word)) for word in ("one", "two"))
    prog = tmp_path / "prog.wasm"
    prog.write_bytes(one.read_bytes())

    def run() -> tuple[str, int]:
        """What the program printed, and how many bytes of it were read to run it."""
        out: list[bytes] = []
        read = []
        opened = open  # noqa: SIM115

        class Counting:
            def __init__(self, f: object) -> None:
                self.f = f

            def __getattr__(self, name: str) -> object:
                return getattr(self.f, name)

            def __enter__(self) -> Counting:
                return self

            def __exit__(self, *exc: object) -> None:
                self.f.close()  # type: ignore[attr-defined]

            def read(self, *n: int) -> bytes:
                data: bytes = self.f.read(*n)  # type: ignore[attr-defined]
                read.append(len(data))
                return data

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("builtins.open", lambda path, *a, **k: Counting(opened(path, *a, **k))
                       if str(path) == str(prog) else opened(path, *a, **k))
            result = run_program(str(prog), ["prog"], SandboxConfig(), env={}, timeout=30,
                                 stdin=False, stdout=out.append)
        assert result.exit_status == 0, result.error
        return b"".join(out).decode(), sum(read)

    # Just written: too fresh to remember (a write in the same clock tick would go unseen).
    assert run() == ("one\n", prog.stat().st_size)
    assert list(cache.glob("*.sha256")) == []
    monkeypatch.setattr(_module_cache, "_SETTLED", 0.0)
    assert run() == ("one\n", prog.stat().st_size)  # read, hashed, and now remembered
    assert len(list(cache.glob("*.sha256"))) == 1
    assert run() == ("one\n", 8)  # only its preamble read: found compiled
    with prog.open("r+b") as f:  # in place: the same inode, new bytes
        f.truncate(0)
        f.write(two.read_bytes())
    assert run() == ("two\n", prog.stat().st_size)
    assert run() == ("two\n", 8)
    replacement = tmp_path / "new.wasm"
    replacement.write_bytes(one.read_bytes())
    replacement.rename(prog)  # a new file in its place
    assert run() == ("one\n", prog.stat().st_size)
