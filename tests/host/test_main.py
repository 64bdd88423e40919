"""The plugin host's entry point (sandboxer/host/__main__.py): what a sandboxed python plugin
starts with, and the command line the supervisor gives it.

Every python plugin pays the host's start-up at every load, so it imports only what it uses:
a real sandboxed plugin reports the modules its process holds, and none of the supervisor's
(manager, loaders, sandbox, config), none of the heavy third-party ones and none of the
standard library's that the host avoids on purpose may be among them. ``site`` is not: the
host runs with -S, so the interpreter's site-packages and their ``.pth`` code stay out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from sandboxer.sandbox import runtime as runtime_module

# Modules (and their submodules) the plugin host never needs on its start or call path.
NOT_ON_THE_START_PATH = (
    "site",  # -S: no site module, no site-packages, no .pth files
    "typing",
    "argparse",
    "pathlib",
    "traceback",  # imported when a plugin's error is reported, not before
    "base64",  # imported when a result carries bytes
    "asyncio",  # imported for the first async handler
    "urllib",
    "tomllib",
    "ctypes",  # the native kind's, not the python kind's
    "grpc",
    "wasmtime",
    "cryptography",
    "sandboxer.manager",
    "sandboxer.loaders",
    "sandboxer.sandbox",
    "sandboxer.manifest",
    "sandboxer.config",
    "sandboxer.registry",
    "sandboxer.cli",
)

MODULES = """\
import sys

def modules():
    return sorted(sys.modules)

def flags():
    import builtins
    return {"no_site": sys.flags.no_site, "path": sys.path, "exit": hasattr(builtins, "exit")}
"""


def _call(target: Path, method: str) -> object:
    ran = subprocess.run([sys.executable, "-m", "sandboxer.cli", "call", "--json", str(target),
                          method], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return json.loads(ran.stdout)["result"]


@pytest.mark.usefixtures("no_leaks")
def test_a_sandboxed_python_plugin_starts_without_what_the_host_does_not_use(
        tmp_path: Path) -> None:
    plugin = tmp_path / "modules.py"
    plugin.write_text(MODULES)
    loaded = _call(plugin, "modules")
    assert isinstance(loaded, list)
    # the check sees the host's own modules
    assert {"sandboxer.rpc.server", "sandboxer._pymodule", "orjson"} <= set(loaded)
    unwanted = sorted(m for m in loaded for bad in NOT_ON_THE_START_PATH
                      if m == bad or m.startswith(bad + "."))
    assert unwanted == []


@pytest.mark.usefixtures("no_leaks")
def test_a_sandboxed_python_plugin_sees_no_site_packages(tmp_path: Path) -> None:
    """docs: a python plugin has the standard library, the SDK and its own directory; the
    base interpreter's site-packages (dist-packages on Debian) are not on its path, and the
    ``exit``/``quit`` helpers that ``site`` adds are not there (``sys.exit`` is)."""
    plugin = tmp_path / "flags.py"
    plugin.write_text(MODULES)
    seen = _call(plugin, "flags")
    assert isinstance(seen, dict)
    assert seen["no_site"] == 1 and seen["exit"] is False
    assert seen["path"][0] == runtime_module.SITE
    assert [p for p in seen["path"] if "-packages" in p] == []


@pytest.mark.parametrize(("argv", "message"), [
    pytest.param([], "the following arguments are required: --kind, --entrypoint, --root, "
                 "--id, --version", id="nothing"),
    pytest.param(["--kind", "python", "--entrypoint", "p.py", "--root", "/plugin",
                  "--id", "x"], "the following arguments are required: --version",
                 id="a-required-one-missing"),
    pytest.param(["--kind", "ruby", "--entrypoint", "p.py", "--root", "/plugin", "--id", "x",
                  "--version", "1"],
                 "argument --kind: invalid choice: 'ruby' (choose from 'python', 'native')",
                 id="an-unknown-kind"),
    pytest.param(["--kind", "python", "--colour", "red"], "unrecognized argument: --colour",
                 id="an-unknown-option"),
    pytest.param(["python"], "unrecognized argument: python", id="a-bare-word"),
    pytest.param(["--kind"], "argument --kind: expected one argument", id="a-value-missing"),
])
def test_a_command_line_the_supervisor_would_not_write_is_refused(argv: list[str],
                                                                  message: str) -> None:
    ran = subprocess.run([sys.executable, "-m", "sandboxer.host", *argv],
                         capture_output=True, text=True, timeout=60, cwd=REPO,
                         env={"PATH": os.environ["PATH"]})
    assert ran.returncode == 2
    assert ran.stderr.splitlines()[-1] == f"python -m sandboxer.host: error: {message}"
    assert ran.stderr.startswith("usage: python -m sandboxer.host --kind {python,native}")
