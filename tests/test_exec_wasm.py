"""``sandboxer exec PROG.wasm`` (issue 22): unmodified WASI programs, written in plain C
against wasi-libc and compiled by the test with clang --target=wasm32-wasi, run as the
wasmtime CLI would run them, under sandboxer's limits and grants.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wasi_build import compile_wasi

REPO = Path(__file__).resolve().parent.parent

PROGRAMS = {
    "echo": r"""
#include <stdio.h>
#include <stdlib.h>
extern char **environ;
int main(int argc, char **argv) {
    for (int i = 0; i < argc; i++) printf("%s%s", i ? " " : "", argv[i]);
    int n = 0;
    for (char **e = environ; *e; e++) n++;
    const char *foo = getenv("FOO");
    printf("\nenv %d FOO=%s\n", n, foo ? foo : "(none)");
    return 0;
}
""",
    "copy": r"""
#include <errno.h>
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    if (argc != 3) return 64;
    FILE *in = fopen(argv[1], "rb");
    if (!in) { printf("open %s: %s\n", argv[1], strerror(errno)); return 1; }
    FILE *out = fopen(argv[2], "wb");
    if (!out) { printf("create %s: %s\n", argv[2], strerror(errno)); return 2; }
    char buf[4096]; size_t n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0) fwrite(buf, 1, n, out);
    fclose(in); fclose(out);
    printf("copied\n");
    return 0;
}
""",
    "cat": r"""
#include <stdio.h>
int main(void) {
    static char buf[65536]; size_t n; unsigned long long total = 0;
    while ((n = fread(buf, 1, sizeof buf, stdin)) > 0) { fwrite(buf, 1, n, stdout); total += n; }
    fprintf(stderr, "%llu\n", total);
    return 0;
}
""",
    "status": r"""
#include <stdlib.h>
int main(int argc, char **argv) {
    if (argc > 2) exit(atoi(argv[2]));
    return atoi(argv[1]);
}
""",
    "spin": r"""
int main(void) { volatile unsigned long x = 0; for (;;) x++; }
""",
    "hog": r"""
#include <stdlib.h>
#include <string.h>
#include <stdio.h>
char *volatile keep;  /* every block stays reachable: the compiler cannot drop the malloc */
int main(void) {
    for (int i = 0; ; i++) {
        char *p = malloc(1 << 20);
        if (!p) { printf("malloc failed after %d MiB\n", i); fflush(stdout); abort(); }
        memset(p, 1, 1 << 20);
        *(char **)p = keep;
        keep = p;
    }
}
""",
}


@pytest.fixture(scope="module")
def programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("wasi-programs")
    return {name: compile_wasi(out, name, source) for name, source in PROGRAMS.items()}


def sandboxer(*argv: str, stdin: bytes | None = b"", cwd: Path = REPO,
              timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "sandboxer.cli", *argv], input=stdin,
                          capture_output=True, timeout=timeout, cwd=cwd)


def test_argv_and_only_the_environment_given(programs: dict[str, Path]) -> None:
    run = sandboxer("exec", "--", str(programs["echo"]), "a", "b c")
    assert run.returncode == 0, run.stderr
    assert run.stdout.decode().splitlines() == [f"{programs['echo']} a b c", "env 0 FOO=(none)"]
    run = sandboxer("exec", "--env", "FOO=bar=baz", "--", str(programs["echo"]))
    assert run.stdout.decode().splitlines()[1] == "env 1 FOO=bar=baz"


def test_a_file_copied_from_a_read_only_grant_to_a_writable_one(
        programs: dict[str, Path], tmp_path: Path) -> None:
    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    dst.mkdir()
    (src / "x").write_bytes(os.urandom(10_000))
    grants = ["--allow-path", str(src), "--allow-path", f"{dst}:rw"]
    run = sandboxer("exec", *grants, "--", str(programs["copy"]), f"{src}/x", f"{dst}/y")
    assert run.returncode == 0, run.stdout + run.stderr
    assert (dst / "y").read_bytes() == (src / "x").read_bytes()
    # writing into the read-only grant, or anywhere no grant reaches, fails inside
    for target in (f"{src}/z", "/tmp/sandboxer-wasi-escape", f"{tmp_path}/y"):
        run = sandboxer("exec", *grants, "--", str(programs["copy"]), f"{src}/x", target)
        assert run.returncode == 2, (target, run.stdout)
        assert run.stdout.decode().startswith(f"create {target}: ")
        assert not Path(target).exists()
    run = sandboxer("exec", "--", str(programs["copy"]), "/etc/passwd", f"{dst}/p")
    assert run.returncode == 1 and b"open /etc/passwd" in run.stdout  # nothing granted


def test_a_hundred_megabytes_stream_through_in_bounded_memory(programs: dict[str, Path]) -> None:
    """stdin to stdout, neither held whole: the CLI's peak RSS grows by far less than 100 MB."""
    def peak(size: int) -> tuple[int, int]:
        script = (
            "import resource, subprocess, sys\n"
            f"feeder = subprocess.Popen(['head', '-c', '{size}', '/dev/zero'], "
            "stdout=subprocess.PIPE)\n"
            f"run = subprocess.run([sys.executable, '-m', 'sandboxer.cli', 'exec', '--', "
            f"{str(programs['cat'])!r}], stdin=feeder.stdout, stdout=subprocess.PIPE)\n"
            "feeder.wait()\n"
            "print(len(run.stdout), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        )
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=300, cwd=REPO)
        assert done.returncode == 0, done.stderr
        out, rss = done.stdout.split()
        return int(out), int(rss) * 1024

    small, small_rss = peak(1 << 20)
    big, big_rss = peak(100 << 20)
    assert (small, big) == (1 << 20, 100 << 20)
    assert big_rss - small_rss < 32 << 20, (small_rss, big_rss)


def test_exit_statuses_are_the_programs(programs: dict[str, Path]) -> None:
    assert sandboxer("exec", "--", str(programs["status"]), "0").returncode == 0
    assert sandboxer("exec", "--", str(programs["status"]), "7").returncode == 7
    assert sandboxer("exec", "--", str(programs["status"]), "0", "42").returncode == 42


def test_limits_stop_a_program_with_exit_3_and_the_reason(programs: dict[str, Path]) -> None:
    run = sandboxer("exec", "--timeout", "1s", "--", str(programs["spin"]))
    assert run.returncode == 3 and b"did not finish within its timeout" in run.stderr
    run = sandboxer("exec", "--fuel", "100000000", "--", str(programs["spin"]))
    assert run.returncode == 3 and b"used up its fuel" in run.stderr, run.stderr
    run = sandboxer("exec", "--memory-limit", "32MiB", "--", str(programs["hog"]))
    assert run.returncode == 3, run.stderr
    assert b"of its 33554432-byte memory limit" in run.stderr, run.stderr
    assert b"malloc failed after" in run.stdout


def test_json_output(programs: dict[str, Path]) -> None:
    run = sandboxer("exec", "--json", "--", str(programs["status"]), "0", "5")
    doc = json.loads(run.stdout)
    assert run.returncode == 5 and doc["exitStatus"] == 5 and doc["program"]["wasm"] is True
    assert doc["error"]["type"] == "ProgramFailed"
    run = sandboxer("exec", "--json", "--env", "FOO=1", "--", str(programs["echo"]), "x")
    doc = json.loads(run.stdout)
    assert doc["ok"] and doc["result"]["stdout"].endswith("env 1 FOO=1\n")
    run = sandboxer("exec", "--json", "--timeout", "500ms", "--", str(programs["spin"]))
    doc = json.loads(run.stdout)
    assert run.returncode == 3 and doc["error"]["type"] == "CallTimeout"


def test_what_is_no_wasi_command_is_refused_saying_why(
        programs: dict[str, Path], tmp_path: Path) -> None:
    reactor = compile_wasi(tmp_path, "lib", "int add(int a, int b) { return a + b; }\n",
                           reactor=True)
    run = sandboxer("exec", "--", str(reactor))
    assert run.returncode == 2 and b"is not a WASI command: it exports no _start" in run.stderr
    component = tmp_path / "c.wasm"
    component.write_bytes(b"\0asm\x0d\x00\x01\x00" + bytes(32))
    run = sandboxer("exec", "--", str(component))
    assert run.returncode == 2 and b"is a WebAssembly component (WASI 0.2)" in run.stderr
    broken = tmp_path / "broken.wasm"
    broken.write_bytes(b"\0asm\x01\x00\x00\x00garbage")
    run = sandboxer("exec", "--", str(broken))
    assert run.returncode == 2 and b"is not a valid WebAssembly module" in run.stderr
    for options in (["--network"], ["--profile", "strict"], ["--cpu-limit", "0.5"]):
        run = sandboxer("exec", *options, "--", str(programs["echo"]))
        assert run.returncode == 2, options
    run = sandboxer("exec", "--fuel", "10", "--", "/bin/true")
    assert run.returncode == 2 and b"--fuel is for WebAssembly programs" in run.stderr


def test_denied_or_nested_grants_wasi_cannot_honour(programs: dict[str, Path],
                                                    tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    run = sandboxer("exec", "--allow-path", str(tmp_path / "a"), "--deny-path",
                    str(tmp_path / "a" / "b"), "--", str(programs["echo"]))
    assert run.returncode == 2 and b"WASI cannot mask part of a preopened directory" in run.stderr


def test_the_host_policys_fuel_applies_without_fuel_option(
        programs: dict[str, Path], tmp_path: Path) -> None:
    config = tmp_path / "sandboxer.toml"
    config.write_text('[limits]\nmax_fuel = 50000000\n')
    run = subprocess.run(
        [sys.executable, "-m", "sandboxer.cli", "exec", "--", str(programs["spin"])],
        capture_output=True, timeout=120, cwd=REPO,
        env={**os.environ, "SANDBOXER_CONFIG": str(config)})
    assert run.returncode == 3 and b"used up its fuel (50000000)" in run.stderr, run.stderr
