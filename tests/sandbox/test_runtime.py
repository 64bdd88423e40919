"""What a sandboxed python plugin runs on (sandbox/runtime.py): the base interpreter and a
private copy of sandboxer, at neutral paths; no host path of the checkout or the venv shows
inside, and interpreters outside /usr (pyenv, /opt, uv) work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from conftest import REPO
from sandboxer.errors import SandboxUnavailable
from sandboxer.sandbox import runtime as runtime_module

pytestmark = pytest.mark.usefixtures("no_leaks")

# A bare python plugin as a stranger writes it: what the sandbox shows it of the host.
LOOK_AROUND = """\
import os, sys

def look():
    seen = []
    for root, dirs, files in os.walk("/", topdown=True):
        dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys", "/dev")]
        seen += [os.path.join(root, n) for n in dirs + files]
    return {"mountinfo": open("/proc/self/mountinfo").read(),
            "environ": dict(os.environ), "cmdline": open("/proc/self/cmdline").read(),
            "paths": seen, "sys_path": sys.path, "executable": sys.executable,
            "prefix": sys.prefix}
"""


def _call(python: str, target: Path, method: str, *, env: dict[str, str] | None = None
          ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([python, "-m", "sandboxer.cli", "call", "--json", str(target), method],
                          capture_output=True, text=True, timeout=120, env=env)


def test_no_host_path_of_the_checkout_or_the_venv_shows_inside(tmp_path: Path) -> None:
    plugin = tmp_path / "look.py"
    plugin.write_text(LOOK_AROUND)
    ran = _call(sys.executable, plugin, "look")
    assert ran.returncode == 0, ran.stderr
    seen = json.loads(ran.stdout)["result"]
    text = json.dumps(seen)
    for host_path in {str(REPO), os.path.realpath(sys.prefix), str(tmp_path)}:
        assert host_path not in text, f"{host_path} shows inside: " + text[:2000]
    assert seen["prefix"] == "/usr" and seen["executable"].startswith("/usr/bin/python3")
    assert runtime_module.SITE in seen["sys_path"]
    mount_points = [line.split()[4] for line in seen["mountinfo"].splitlines()]
    assert runtime_module.SITE in mount_points


def _relocated_python(base: Path) -> Path:
    """Debian's python3.11 and its standard library copied under ``base``: an interpreter
    outside /usr, as pyenv, uv or /opt give."""
    (base / "bin").mkdir(parents=True)
    (base / "lib").mkdir()
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy2(os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
                 base / "bin" / version)
    shutil.copytree(Path(sys.base_prefix) / "lib" / version, base / "lib" / version,
                    symlinks=True, ignore=shutil.ignore_patterns("test", "idlelib", "tkinter",
                                                                 "__pycache__"))
    return base / "bin" / version


PYENV = Path("/root/.pyenv/versions") / (f"{sys.version_info.major}.{sys.version_info.minor}."
                                         f"{sys.version_info.micro}")
INTERPRETERS = ["relocated-copy"] + (["pyenv"] if (PYENV / "bin").is_dir() else [])


@pytest.mark.parametrize("kind", INTERPRETERS)
def test_a_venv_of_an_interpreter_outside_usr_runs_sandboxed_plugins(tmp_path: Path,
                                                                       kind: str) -> None:
    """A supervisor whose venv comes from a Python outside /usr (the issue: a pyenv venv
    failed inside with `No module named 'base64'`, only sys.prefix being bound). pyenv's
    build also finds libpython through an absolute RUNPATH."""
    if kind == "pyenv":
        python = next((PYENV / "bin").glob("python3.*[0-9]"))
    else:
        python = _relocated_python(tmp_path / "opt-python")
    venv = tmp_path / "venv"
    subprocess.run([str(python), "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    ours = sysconfig.get_paths()["purelib"]
    site = next((venv / "lib").glob("python3.*")) / "site-packages"
    # Our dependencies and the checkout, as an installed sandboxer would have them.
    (site / "sandboxer-test.pth").write_text(f"{REPO}\n{ours}\n")
    plugin = tmp_path / "stdlib.py"
    plugin.write_text(textwrap.dedent("""\
        import base64, json, sys

        def encode(text):
            return {"b64": base64.b64encode(text.encode()).decode(), "prefix": sys.prefix,
                    "version": sys.version_info[:2]}
        """))
    ran = subprocess.run([str(venv / "bin" / "python"), "-m", "sandboxer.cli", "call", "--json",
                          str(plugin), "encode", "hi"], capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    result = json.loads(ran.stdout)["result"]
    assert result == {"b64": "aGk=", "prefix": runtime_module.PYTHON_PREFIX,
                      "version": list(sys.version_info[:2])}
    assert str(tmp_path) not in ran.stdout


def test_the_runtime_is_made_once_and_reused() -> None:
    first = runtime_module._site_copy()
    assert runtime_module._site_copy() == first
    assert (first / "sandboxer" / "host" / "__main__.py").is_file()
    assert (first / "orjson").is_dir()
    assert any((first / "sandboxer" / "__pycache__").iterdir())  # bytecode made for it
    for path in [first, *first.rglob("*")]:
        assert not path.lstat().st_mode & 0o022, f"{path} is writable by others"


def test_the_plugin_host_imports_nothing_else() -> None:
    """PACKAGES is what the copy holds: the plugin host and the SDK import nothing more from
    site-packages or the checkout."""
    script = ("import sys; before = set(sys.modules)\n"
              "import sandboxer.host.__main__, sandboxer.sdk, sandboxer.host.native\n"
              "import sandboxer.rpc.server\n"
              "print(sorted({m.split('.')[0] for m, mod in sys.modules.items()\n"
              "  if m not in before and getattr(mod, '__file__', None)\n"
              "  and not mod.__file__.startswith(sys.base_prefix + '/lib/')}))")
    out = subprocess.run([sys.executable, "-I", "-c", script], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert json.loads(out.replace("'", '"')) == sorted(runtime_module.PACKAGES)


def test_a_runtime_directory_others_can_write_is_refused(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    base = tmp_path / "runtime"
    base.mkdir(mode=0o777)
    base.chmod(0o777)
    monkeypatch.setattr(runtime_module, "_base_dir", lambda: base)  # (cached one set aside)
    with pytest.raises(SandboxUnavailable, match="others can write it"):
        runtime_module._site_copy()
    base.chmod(0o755)
    made = runtime_module._site_copy()
    made.chmod(0o775)  # changed behind the supervisor's back: not reused
    with pytest.raises(SandboxUnavailable, match="not the supervisor's own"):
        runtime_module._site_copy()


def test_a_noexec_place_is_passed_over(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd mounts /run noexec: a runtime copy there would bind noexec, and orjson, a
    shared library, could not be mapped inside (found in the VM stage's guest)."""
    noexec = tmp_path / "noexec"
    noexec.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "noexec,size=1m", "tmpfs", str(noexec)],
                   check=True)
    try:
        assert not runtime_module._allows_exec(noexec / "sandboxer" / "runtime")
        assert runtime_module._allows_exec(tmp_path / "elsewhere" / "runtime")
    finally:
        subprocess.run(["umount", str(noexec)], check=True)
    assert runtime_module._allows_exec(runtime_module._base_dir())
