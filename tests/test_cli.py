"""The sandboxer command: results, exit codes 0/1/2/3/4 and the --json shape."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, REPO
from sandboxer.sandbox import seccomp_cache

HELLO = str(EXAMPLES / "hello")


def sandboxer(*args: str, env: dict[str, str] | None = None, input: str | None = None,
              cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    # Without input, /dev/null: exec forwards stdin, and pytest's own may be a terminal.
    return subprocess.run([sys.executable, "-m", "sandboxer.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env, input=input, cwd=cwd,
                          stdin=subprocess.DEVNULL if input is None else None)


def test_call_prints_the_result():
    run = sandboxer("call", "--no-sandbox", HELLO, "greet", "world")
    assert (run.returncode, run.stdout, run.stderr) == (0, "Hello, world!\n", "")


def test_args_that_parse_as_json_are_json():
    run = sandboxer("call", "--no-sandbox", HELLO, "add", "2", "40")
    assert (run.returncode, run.stdout) == (0, "42\n")
    run = sandboxer("call", "--no-sandbox", HELLO, "add", '"2"', "x")
    assert (run.returncode, run.stdout) == (0, "2x\n")


def test_config_override_reaches_init():
    run = sandboxer("call", "--no-sandbox", "--config", '{"greeting": "Hi"}', HELLO,
                    "greet", "you")
    assert (run.returncode, run.stdout) == (0, "Hi, you!\n")


def test_json_output_of_a_successful_call():
    run = sandboxer("call", "--no-sandbox", "--json", HELLO, "greet", "json")
    assert run.returncode == 0
    doc = json.loads(run.stdout)
    assert doc["ok"] is True and doc["result"] == "Hello, json!" and doc["error"] is None
    assert doc["plugin"] == {"id": "example.hello", "version": "1.0.0", "type": "python"}
    assert set(doc["stats"]) >= {"durationMs", "peakMemoryBytes", "cpuTimeSeconds", "calls"}
    assert doc["stats"]["calls"] == 1 and doc["sandbox"]["enabled"] is False


def test_plugin_error_exits_1():
    run = sandboxer("call", "--no-sandbox", HELLO, "fail", "on purpose")
    assert run.returncode == 1
    assert "ValueError: on purpose" in run.stderr and run.stdout == ""
    run = sandboxer("call", "--no-sandbox", "--json", HELLO, "fail", "on purpose")
    doc = json.loads(run.stdout)
    assert run.returncode == 1 and doc["ok"] is False
    assert doc["error"]["type"] == "PluginCallError" and doc["error"]["code"] == 1
    assert doc["error"]["data"]["type"] == "ValueError"


def test_unknown_method_exits_1_with_method_not_found():
    run = sandboxer("call", "--no-sandbox", "--json", HELLO, "nope")
    doc = json.loads(run.stdout)
    assert run.returncode == 1 and doc["error"]["type"] == "MethodNotFound"
    assert doc["error"]["code"] == -32601


@pytest.mark.parametrize("argv, needle", [
    (["call", "--no-sandbox", "/nonexistent/plugin", "f"], "ManifestError"),
    (["call", "--no-sandbox", "--memory-limit", "lots", HELLO, "f"], "SIZE"),
    (["call", "--no-sandbox", "--config", "[1]", HELLO, "greet", "x"], "JSON object"),
    (["call"], "required"),
    (["frobnicate"], "invalid choice"),
], ids=["missing-plugin", "bad-size-option", "config-not-object", "no-target", "bad-command"])
def test_usage_and_invalid_plugins_exit_2(argv, needle):
    run = sandboxer(*argv)
    assert run.returncode == 2
    assert needle in run.stderr


def test_bad_manifest_exits_2_naming_the_field(tmp_path: Path):
    (tmp_path / "p.py").write_text("def f():\n    return 1\n")
    (tmp_path / "plugin.toml").write_text('[plugin]\nid = "Bad Id"\nversion = "1.0.0"\n'
                                          'type = "python"\nentrypoint = "p.py"\n')
    for command in (["call", "--no-sandbox", str(tmp_path), "f"], ["inspect", str(tmp_path)]):
        run = sandboxer(*command)
        assert run.returncode == 2
        assert "ManifestError" in run.stderr and "plugin.id" in run.stderr
        assert str(tmp_path / "plugin.toml") in run.stderr
    run = sandboxer("call", "--json", "--no-sandbox", str(tmp_path), "f")
    doc = json.loads(run.stdout)
    assert doc["error"]["type"] == "ManifestError" and doc["error"]["field"] == "plugin.id"


def test_call_runs_sandboxed_by_default():
    run = sandboxer("call", "--json", HELLO, "greet", "sandbox")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["result"] == "Hello, sandbox!" and doc["sandbox"]["enabled"] is True
    assert doc["stats"]["peakMemoryBytes"] > 0 and doc["stats"]["cpuTimeSeconds"] > 0


def test_a_sandbox_this_host_cannot_enforce_exits_4(tmp_path):
    """A CPU quota for in-process wasm cannot be enforced: the load fails closed, exit 4."""
    import wasmtime
    (tmp_path / "add.wasm").write_bytes(wasmtime.wat2wasm(
        '(module (func (export "add") (param i32 i32) (result i32) '
        'local.get 0 local.get 1 i32.add))'))
    (tmp_path / "plugin.toml").write_text(
        '[plugin]\nid = "cpu.quota"\nversion = "1.0.0"\ntype = "wasm"\n'
        'entrypoint = "add.wasm"\n[sandbox]\ncpu_limit = 0.5\n')
    run = sandboxer("call", str(tmp_path), "add", "1", "2")
    assert run.returncode == 4
    assert "SandboxUnavailable" in run.stderr and "cpu_limit = 0.5" in run.stderr


def test_exec_returns_the_programs_exit_status():
    run = sandboxer("exec", "--", "/bin/sh", "-c", "echo out; echo err >&2; exit 7")
    assert (run.returncode, run.stdout, run.stderr) == (7, "out\n", "err\n")
    run = sandboxer("exec", "--", "sh", "-c", "id -u; kill -9 $$")
    assert (run.returncode, run.stdout) == (137, "1000\n")


# -- exec: the deadline, stdin, programs not found inside, --json (issue 17.5) ----------------

@pytest.fixture(params=["/var/tmp", "/root"])
def hidden_dir(request):
    """A fresh host directory the sandbox does not see unless granted (not under /tmp:
    the sandbox has its own), holding an executable script ``prog``."""
    path = Path(tempfile.mkdtemp(prefix="sandboxer-exec-", dir=request.param))
    path.chmod(0o755)
    (path / "prog").write_text("#!/bin/sh\necho \"prog ran: $*\"\n")
    (path / "prog").chmod(0o755)
    yield path
    shutil.rmtree(path)


def _still_running(marker: str) -> list[str]:
    """Processes whose command line holds ``marker`` (the test's own, never a broad name)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline and "pytest" not in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def test_exec_stops_the_program_at_its_timeout_and_exits_3():
    """Fails on 17.5's report: it ran 10 s and exited 0."""
    start = time.monotonic()
    run = sandboxer("exec", "--timeout", "1s", "--", "sleep", "10")
    took = time.monotonic() - start
    assert run.returncode == 3, run.stderr
    assert took < 1 + 2 + 3, took  # the deadline, the grace, start-up on a busy machine
    assert run.stderr.startswith("sandboxer: CallTimeout: the program did not finish within "
                                 "its timeout (--timeout 1s) and was stopped"), run.stderr
    assert "it was killed by SIGTERM" in run.stderr
    assert "Traceback" not in run.stderr


def test_exec_kills_a_program_that_ignores_sigterm_after_the_grace():
    """SIGTERM is ignored: SIGKILL follows after the grace, and every process of the
    sandbox (the ignored one's child too) is gone when sandboxer exits."""
    marker = f"{os.getpid()}.{time.monotonic_ns() % 10**6}"
    start = time.monotonic()
    run = sandboxer("exec", "--timeout", "500ms", "--", "sh", "-c",
                    f"trap '' TERM; sleep {marker} & sleep {marker}")
    took = time.monotonic() - start
    assert run.returncode == 3, run.stderr
    assert 0.5 + 2 <= took < 0.5 + 2 + 4, took
    assert "it was killed by SIGKILL" in run.stderr and "Traceback" not in run.stderr
    assert _still_running(marker) == []


def test_exec_forwards_stdin():
    """Fails before: the program read /dev/null."""
    run = sandboxer("exec", "--", "cat", input="x\n")
    assert (run.returncode, run.stdout, run.stderr) == (0, "x\n", "")


def test_exec_stdin_feeds_sqlite3_as_a_stranger_would():
    run = sandboxer("exec", "--", "sqlite3", input="create table t(n); insert into t "
                    "values (6), (7); select n from t; select 6 * 7;\n")
    assert (run.returncode, run.stdout) == (0, "6\n7\n42\n"), run.stderr


def test_exec_with_stdin_closed_reads_nothing():
    run = subprocess.run(["sh", "-c", f"exec <&- {sys.executable} -m sandboxer.cli exec -- "
                          "sh -c 'cat; echo done'"], capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout, run.stderr) == (0, "done\n", "")


def test_exec_a_terminal_on_stdin_gives_no_tiocsti():
    """A terminal passed in is read as a terminal, but the program cannot push input into
    it (TIOCSTI, denied by the seccomp filter): EPERM, not ENOTTY as /dev/null would say."""
    code = ("import fcntl, sys, termios\n"
            "try:\n"
            "    fcntl.ioctl(0, termios.TIOCSTI, b'x')\n"
            "    print('TIOCSTI allowed')\n"
            "except OSError as exc:\n"
            "    print('TIOCSTI errno', exc.errno)\n"
            "print(sys.stdin.isatty(), sys.stdin.readline().strip())\n")
    controller, terminal = pty.openpty()
    try:
        os.write(controller, b"typed\n")
        run = subprocess.run([sys.executable, "-m", "sandboxer.cli", "exec", "--", "python3",
                              "-c", code], stdin=terminal, capture_output=True, text=True,
                             timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"TIOCSTI errno {errno.EPERM}\nTrue typed\n"


def test_exec_a_missing_program_exits_2_saying_so():
    """Fails before on the message ("no such program in /usr/local/bin ...")."""
    run = sandboxer("exec", "--", "no-such-program-anywhere")
    assert run.returncode == 2
    assert run.stderr == ("sandboxer: PluginLoadError: not found inside the sandbox: "
                          "no-such-program-anywhere (grant its directory with --allow-path)\n")


def test_exec_a_program_the_sandbox_does_not_see_exits_2_until_granted(hidden_dir):
    """Fails before with exit 4 ("sandbox setup failed at step exec the plugin")."""
    prog = str(hidden_dir / "prog")
    want = (f"sandboxer: PluginLoadError: not found inside the sandbox: {prog} (grant its "
            "directory with --allow-path)\n")
    run = sandboxer("exec", "--", prog, "a")
    assert (run.returncode, run.stderr) == (2, want)
    run = sandboxer("exec", "--", "./prog", "a", cwd=str(hidden_dir))  # as a shell reads it
    assert (run.returncode, run.stderr) == (2, want)
    run = sandboxer("exec", "--allow-path", str(hidden_dir), "--", "./prog", "b",
                    cwd=str(hidden_dir))
    assert (run.returncode, run.stdout) == (0, "prog ran: b\n"), run.stderr
    # By name, on the caller's PATH: found there once its directory is granted.
    env = {**os.environ, "PATH": f"{hidden_dir}:{os.environ['PATH']}"}
    run = sandboxer("exec", "--", "prog", env=env)
    assert (run.returncode, run.stderr) == (2, want)
    run = sandboxer("exec", "--allow-path", str(hidden_dir), "--", "prog", "c", env=env)
    assert (run.returncode, run.stdout) == (0, "prog ran: c\n"), run.stderr


def test_exec_a_script_whose_interpreter_is_missing_inside_names_it(hidden_dir):
    (hidden_dir / "prog").write_text("#!/opt/no-such-runtime/bin/python\nprint(1)\n")
    run = sandboxer("exec", "--allow-path", str(hidden_dir), "--", str(hidden_dir / "prog"))
    assert run.returncode == 2
    assert ("not found inside the sandbox: /opt/no-such-runtime/bin/python (the interpreter "
            f"{hidden_dir}/prog names; grant its directory with --allow-path)") in run.stderr


def test_exec_json_carries_output_status_and_stats():
    """Fails before: --json was accepted and ignored (the program's output, no JSON)."""
    run = sandboxer("exec", "--json", "--", "python3", "-c",
                    "import sys; print('out'); print('err', file=sys.stderr); sys.exit(5)")
    assert run.returncode == 5, run.stderr
    doc = json.loads(run.stdout)
    assert doc["ok"] is False and (doc["exitStatus"], doc["signal"]) == (5, None)
    assert doc["result"] == {"stdout": "out\n", "stderr": "err\n", "truncated": []}
    assert doc["error"] == {"type": "ProgramFailed", "message": "the program exited with "
                            "status 5", "exitStatus": 5, "signal": None}
    assert doc["plugin"] is None and doc["program"]["argv"][0] == "python3"
    assert doc["sandbox"]["enabled"] is True and doc["sandbox"]["timeout"] is None
    assert doc["stats"]["peakMemoryBytes"] > 0 and doc["stats"]["cpuTimeSeconds"] > 0
    assert doc["stats"]["durationMs"] > 0 and run.stderr == ""


def test_exec_json_of_a_third_party_program_that_succeeds():
    run = sandboxer("exec", "--json", "--", "git", "--version")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert (doc["ok"], doc["error"], doc["exitStatus"], doc["signal"]) == (True, None, 0, None)
    assert doc["result"]["stdout"].startswith("git version ")


def test_exec_json_of_a_program_killed_by_a_signal():
    run = sandboxer("exec", "--json", "--", "sh", "-c", "kill -SEGV $$")
    assert run.returncode == 128 + signal.SIGSEGV
    doc = json.loads(run.stdout)
    assert (doc["ok"], doc["exitStatus"], doc["signal"]) == (False, None, signal.SIGSEGV)
    assert doc["error"]["message"] == "the program was killed by SIGSEGV"


def test_exec_json_of_a_timeout_and_of_a_program_not_found():
    run = sandboxer("exec", "--json", "--timeout", "500ms", "--", "sh", "-c",
                    "echo started; exec sleep 10")
    assert run.returncode == 3
    doc = json.loads(run.stdout)
    assert doc["ok"] is False and doc["error"]["type"] == "CallTimeout"
    assert doc["error"]["timeout"] == 0.5 and doc["sandbox"]["timeout"] == "500ms"
    assert (doc["exitStatus"], doc["signal"]) == (None, signal.SIGTERM)
    assert doc["result"]["stdout"] == "started\n"
    run = sandboxer("exec", "--json", "--", "/root/no-such-program")
    assert run.returncode == 2
    doc = json.loads(run.stdout)
    assert (doc["ok"], doc["result"], doc["exitStatus"], doc["signal"]) == (False, None, None,
                                                                           None)
    assert doc["error"]["message"].startswith("not found inside the sandbox: /root/no-such")


@pytest.mark.parametrize("option", [["--config", "{}"], ["--no-sandbox"]],
                         ids=["config-is-for-a-plugins-init", "no-sandbox"])
def test_exec_refuses_options_it_cannot_honour(option):
    """Fails before for --config: accepted and ignored."""
    run = sandboxer("exec", *option, "--", "true")
    assert run.returncode == 2
    assert f"unrecognized arguments: {option[0]}" in run.stderr


def test_exec_help_says_what_timeout_means_there():
    run = sandboxer("exec", "--help")
    assert "deadline for the whole run" in " ".join(run.stdout.split())
    assert "--config" not in run.stdout and "--no-sandbox" not in run.stdout


# -- inspect verifies the manifest's sha256 (issue 17.7) -------------------------------------

def _plugin_with_digest(root: Path, digest: str | None) -> Path:
    root.mkdir()
    (root / "plugin.py").write_text("def hi():\n    return 'hi'\n")
    (root / "plugin.toml").write_text(
        '[plugin]\nid = "digest.test"\nversion = "1.0.0"\ntype = "python"\n'
        'entrypoint = "plugin.py"\n' + (f'sha256 = "{digest}"\n' if digest else ""))
    return root


def test_inspect_refuses_a_sha256_mismatch_naming_both_digests(tmp_path):
    """Fails before: it printed the manifest and exited 0."""
    wrong = "0" * 64
    plugin = _plugin_with_digest(tmp_path / "p", wrong)
    actual = hashlib.sha256((plugin / "plugin.py").read_bytes()).hexdigest()
    for json_flag in ([], ["--json"]):
        run = sandboxer("inspect", *json_flag, str(plugin))
        assert run.returncode == 2, run.stdout
        said = run.stdout if json_flag else run.stderr
        assert "IntegrityError" in said and wrong in said and actual in said


def test_inspect_says_a_matching_sha256_was_verified(tmp_path):
    plugin = tmp_path / "p"
    actual = hashlib.sha256(b"def hi():\n    return 'hi'\n").hexdigest()
    _plugin_with_digest(plugin, actual)
    run = sandboxer("inspect", "--json", str(plugin))
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["plugin"]["sha256"] == actual
    assert doc["integrity"] == "the entrypoint matches the manifest's sha256"
    run = sandboxer("inspect", str(_plugin_with_digest(tmp_path / "bare", None)))
    assert run.returncode == 0 and "no sha256 in the manifest" in run.stdout


def test_inspect_shows_manifest_checksum_and_effective_sandbox():
    run = sandboxer("inspect", "--json", HELLO)
    assert run.returncode == 0
    doc = json.loads(run.stdout)
    assert doc["kind"] == "python" and doc["checksum"].startswith("sha256:")
    assert doc["plugin"]["id"] == "example.hello"
    assert doc["sandbox"]["memoryLimit"] == "64MiB" and doc["sandbox"]["timeout"] == "5s"
    run = sandboxer("inspect", "--memory-limit", "32M", "--allow-path", "/srv:rw", HELLO)
    assert run.returncode == 0
    assert "sandbox.memoryLimit     32MiB" in run.stdout
    assert '["/srv:rw"]' in run.stdout


def test_demo_runs_the_examples():
    run = sandboxer("demo")
    assert run.returncode == 0, run.stderr
    assert "Hello, world!" in run.stdout
    assert "trusted in-process" in run.stdout


# -- what a command imports ----------------------------------------------------------------------
# Each command imports what it uses (docs/architecture.md, "Start-up imports"): the manager,
# the loaders, the manifest parser, the registry and the third-party engines are not for
# `exec`, and `--help` needs none of them, nor the sandbox's launch.
NOT_FOR_EXEC = ("grpc", "google", "wasmtime", "cryptography", "inotify_simple",
                "sandboxer.manager", "sandboxer.loaders", "sandboxer.manifest",
                "sandboxer.registry", "sandboxer.discovery", "sandboxer._minisign",
                "sandboxer.rpc.client", "sandboxer.sandbox.runtime",
                "orjson")  # JSON only with --json
NOT_FOR_HELP = (*NOT_FOR_EXEC, "sandboxer.sandbox.program", "sandboxer.sandbox.seccomp",
                "pyseccomp")

MODULES_AFTER = """\
import json, sys
from sandboxer.cli import main
try:
    main(sys.argv[2:])
except SystemExit:
    pass
with open(sys.argv[1], "w") as f:
    json.dump(sorted(sys.modules), f)
"""


def _modules_after(tmp_path: Path, *argv: str) -> list[str]:
    out = tmp_path / "modules.json"
    subprocess.run([sys.executable, "-c", MODULES_AFTER, str(out), *argv], capture_output=True,
                   text=True, timeout=60, cwd=REPO, stdin=subprocess.DEVNULL, check=True)
    return json.loads(out.read_text())


def _among(modules: list[str], unwanted: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules for bad in unwanted if m == bad or m.startswith(bad + "."))


def test_exec_imports_only_what_it_runs(tmp_path):
    modules = _modules_after(tmp_path, "exec", "--", "/bin/true")
    assert "sandboxer.sandbox.program" in modules  # the check sees what exec imported
    assert _among(modules, NOT_FOR_EXEC) == []
    # The second run finds the seccomp program compiled by the first (as root, or with a
    # private $XDG_RUNTIME_DIR): libseccomp's compiler is not loaded at all.
    again = _modules_after(tmp_path, "exec", "--", "/bin/true")
    if seccomp_cache._directory() is not None:
        assert _among(again, ("pyseccomp", "sandboxer.sandbox.seccomp")) == []


def test_help_imports_no_command(tmp_path):
    modules = _modules_after(tmp_path, "--help")
    assert "sandboxer._cli_parser" in modules
    assert _among(modules, NOT_FOR_HELP) == []


LAUNCH_ORDER = """\
import sys
events = []
def hook(event, args):
    if event == "import" and args[0] in ("asyncio", "sandboxer.sandbox.policy"):
        events.append(args[0])
    elif event == "os.posix_spawn" and "sandboxer-launcher" in args[1]:
        events.append("fork server")
sys.addaudithook(hook)
from sandboxer.cli import main
code = main(sys.argv[1:])
print(",".join(dict.fromkeys(events)))
sys.exit(code)
"""


@pytest.mark.parametrize("argv", [["exec", "--", "/bin/true"], ["-v", "exec", "--", "/bin/true"]])
def test_exec_starts_the_fork_server_before_its_imports(argv):
    """Its interpreter start then runs beside the CLI's imports, not after them."""
    run = subprocess.run([sys.executable, "-c", LAUNCH_ORDER, *argv], capture_output=True,
                         text=True, timeout=60, cwd=REPO, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1].split(",")[:2] == ["fork server", "asyncio"], run.stdout


def test_help_starts_no_fork_server():
    run = subprocess.run([sys.executable, "-c", LAUNCH_ORDER, "--help"], capture_output=True,
                         text=True, timeout=60, cwd=REPO, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    assert "fork server" not in run.stdout.splitlines()[-1], run.stdout
