"""The sandboxer command: results, exit codes 0/1/2/4 and the --json shape."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import EXAMPLES

HELLO = str(EXAMPLES / "hello")


def sandboxer(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sandboxer.cli", *args], capture_output=True,
                          text=True, timeout=60, env=env)


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
