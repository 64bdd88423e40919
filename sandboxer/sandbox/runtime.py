"""What a sandboxed plugin host (and an SDK plugin) runs on: the Python interpreter and the
sandboxer package, at neutral paths inside the sandbox.

Nothing inside a sandbox may show where the host keeps its files (DESIGN section 6). So:

- The interpreter is the supervisor's base interpreter, never its virtualenv. Under /usr it
  is already mounted (with /usr itself). Elsewhere (pyenv, a uv-managed Python, /opt) its
  whole prefix (``sys.base_prefix``, the standard library with it) is bound read-only at
  ``/run/sandboxer/python``; such builds often find libpython through an absolute RUNPATH,
  so ``LD_LIBRARY_PATH`` then names the prefix's lib directory inside.
- The sandboxer package and orjson, everything the plugin host and the SDK import, are copied
  once into a private runtime directory, content-addressed (``/run/sandboxer/runtime/<sha>``
  as root; rootless under ``$XDG_RUNTIME_DIR``, or a private directory of the process), and
  bound read-only at
  ``/run/sandboxer/site``. A copy and not a bind of the checkout or the venv: a bind shows its
  source's path in /proc/self/mountinfo, and a copy's source is the runtime directory.
  ``PYTHONPATH`` names it, so a plugin's own ``python3`` can ``import sandboxer``.

The supervisor's venv and its other packages are not the plugin's: a python plugin sees the
standard library, the SDK and its own directory.

This module never writes into a runtime directory it did not create, and never reuses one
that anyone but its owner could have changed.
"""

from __future__ import annotations

import atexit
import compileall
import functools
import hashlib
import os
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SandboxUnavailable
from .spec import Mount

__all__ = ["Runtime", "runtime", "SITE", "PYTHON_PREFIX"]

SITE = "/run/sandboxer/site"
PYTHON_PREFIX = "/run/sandboxer/python"
# What the plugin side imports (checked by a test against a real import of the plugin host).
PACKAGES = ("sandboxer", "orjson")
_COMPLETE = ".complete"


@dataclass(frozen=True, slots=True)
class Runtime:
    """The interpreter's path inside, the mounts that make it and the SDK visible, and the
    environment entries they need."""

    python: str
    mounts: tuple[Mount, ...]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def bin_dir(self) -> str:
        return os.path.dirname(self.python)

    def host_argv(self, *args: str) -> list[str]:
        """The plugin host (``sandboxer.host``) run from the copy at ``SITE``: -I keeps the
        environment and the user's site out, so the path is given here; -S keeps out the
        ``site`` module, the interpreter's site-packages and the code its ``.pth`` files
        run, which are not the plugin's (and cost every start)."""
        boot = (
            f"import sys; sys.path.insert(0, {SITE!r}); import runpy; "
            "runpy.run_module('sandboxer.host', run_name='__main__', alter_sys=True)"
        )
        return [self.python, "-I", "-S", "-c", boot, *args]


def _package_dirs() -> list[Path]:
    import orjson

    return [Path(__file__).resolve().parent.parent, Path(orjson.__file__).resolve().parent]


def _files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and not p.is_symlink() and "__pycache__" not in p.parts
    )


def _digest(dirs: list[Path]) -> str:
    h = hashlib.sha256(f"{sys.version}\0".encode())
    for directory in dirs:
        for path in _files(directory):
            h.update(f"{directory.name}/{path.relative_to(directory)}\0".encode())
            h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()[:32]


def _allows_exec(path: Path) -> bool:
    """Whether the filesystem that holds (or would hold) ``path`` is mounted without noexec:
    orjson is a shared library, and a bind keeps its source's noexec (systemd mounts /run
    noexec)."""
    while not path.exists():
        path = path.parent
    return not os.statvfs(path).f_flag & os.ST_NOEXEC


@functools.cache
def _base_dir() -> Path:
    """Where runtime copies live: as root /run/sandboxer/runtime, or /var/cache/sandboxer/
    runtime where /run is noexec; else under the user's own $XDG_RUNTIME_DIR (systemd's
    /run/user/UID, 0700) when there is one and it allows exec, or a private directory of
    this process (removed at exit): never a shared path others could prepare."""
    if os.geteuid() == 0:
        candidates = [Path("/run/sandboxer/runtime"), Path("/var/cache/sandboxer/runtime")]
    else:
        candidates = []
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        if xdg and os.path.isabs(xdg) and os.path.isdir(xdg):
            st = os.stat(xdg)
            if st.st_uid == os.geteuid() and not st.st_mode & 0o077:
                candidates.append(Path(xdg) / "sandboxer" / "runtime")
    for candidate in candidates:
        if _allows_exec(candidate):
            return candidate
    if os.geteuid() == 0:
        raise SandboxUnavailable(
            "no place for the plugin runtime allows exec: "
            f"{', '.join(map(str, candidates))} are on noexec mounts",
            missing="plugin runtime directory",
        )
    private = Path(tempfile.mkdtemp(prefix="sandboxer-runtime-"))
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    return private


def _trusted(path: Path) -> bool:
    """Ours and writable by no one else: a directory someone else could have filled is never
    bound into a sandbox."""
    st = os.lstat(path)
    return (
        stat.S_ISDIR(st.st_mode)
        and st.st_uid == os.geteuid()
        and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    )


def _site_copy() -> Path:
    """The runtime directory for this sandboxer and orjson, made once (content-addressed)."""
    dirs = _package_dirs()
    base = _base_dir()
    try:
        base.mkdir(mode=0o755, parents=True, exist_ok=True)
        if not _trusted(base):
            raise SandboxUnavailable(
                f"the runtime directory {base} is not the supervisor's own, or others can "
                "write it; remove it (it is made again)",
                missing="plugin runtime directory",
            )
        target = base / _digest(dirs)
        if (target / _COMPLETE).is_file() and _trusted(target):
            return target
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=base))
        try:
            for directory in dirs:
                for path in _files(directory):
                    dest = staging / directory.name / path.relative_to(directory)
                    dest.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                    shutil.copy2(path, dest)  # mtimes kept: the bytecode below stays valid
            # Bytecode made here: the copy is read-only inside, where nothing could cache it.
            compileall.compile_dir(str(staging), quiet=2, workers=1)
            for path in [staging, *staging.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
            (staging / _COMPLETE).touch(0o644)
            try:
                os.rename(staging, target)
            except OSError:  # another supervisor made it meanwhile
                shutil.rmtree(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    except OSError as exc:
        raise SandboxUnavailable(
            f"cannot make the plugin runtime under {base}: {exc.strerror} ({exc.filename})",
            missing="plugin runtime directory",
        ) from None
    if not ((target / _COMPLETE).is_file() and _trusted(target)):
        raise SandboxUnavailable(
            f"the plugin runtime {target} is incomplete or not the supervisor's own; remove it",
            missing="plugin runtime directory",
        )
    return target


@functools.cache
def runtime() -> Runtime:
    """The runtime of sandboxed python plugins: made on first use, then reused."""
    executable = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    prefix = os.path.realpath(sys.base_prefix)
    mounts = [Mount(str(_site_copy()), SITE)]  # executable: orjson is a shared library
    env = {"PYTHONPATH": SITE}
    if prefix == "/usr" or prefix.startswith("/usr/"):
        python = executable
    else:
        if not executable.startswith(prefix + "/"):
            raise SandboxUnavailable(
                f"the Python interpreter {executable} is not inside its prefix {prefix}; "
                "sandboxed python plugins need an interpreter under its sys.base_prefix",
                missing="python runtime",
            )
        mounts.append(Mount(prefix, PYTHON_PREFIX))
        python = PYTHON_PREFIX + executable[len(prefix) :]
        env["LD_LIBRARY_PATH"] = f"{PYTHON_PREFIX}/lib"
    return Runtime(python, tuple(mounts), env)
