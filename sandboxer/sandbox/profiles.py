"""Sandbox profiles: named bundles of default limits, mount flags (and, with the launcher,
the seccomp policy), read from ``profiles/*.toml``.

Profiles ship with the package (``sandboxer.profiles``); a host may add directories of its
own (``HostConfig.profile_dirs``), searched first. A profile is parsed strictly and cached per
file; an unknown or broken profile is a PluginLoadError naming the file and the field.
"""

from __future__ import annotations

import functools
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._units import parse_duration, parse_size
from ..errors import PluginLoadError

__all__ = [
    "Profile",
    "ProfileLimits",
    "load_profile",
    "profile_names",
    "groups_path",
    "NAME_RE",
    "GROUPS_FILE",
]

NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


@dataclass(frozen=True, slots=True)
class ProfileLimits:
    memory: int
    cpu: float
    pids: int
    tmp_size: int
    nofile: int
    timeout: float

    def within(self, other: ProfileLimits) -> bool:
        """Whether every limit here is at most ``other``'s."""
        return all(getattr(self, f) <= getattr(other, f) for f in self.__slots__)


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    description: str
    limits: ProfileLimits
    path: str
    # [mounts] tmp_exec: whether the private /tmp lets programs run (exec, mmap PROT_EXEC)
    # what is written there. Every other writable mount is noexec under every profile.
    tmp_exec: bool


def builtin_dir() -> Path:
    """The package's own profiles (``sandboxer/profiles``), beside this file's package: what
    ``importlib.resources.files`` gives for a package on disk, without its imports (zipfile,
    shutil, bz2, lzma), which every command that reads a profile would pay for."""
    return Path(__file__).parent.parent / "profiles"


def _search_dirs(extra: tuple[str, ...]) -> list[Path]:
    return [Path(d) for d in extra] + [builtin_dir()]


# profiles/seccomp.toml holds the named syscall groups that profiles refer to; not a profile.
GROUPS_FILE = "seccomp.toml"
_NOT_PROFILES = frozenset({"seccomp"})


def groups_path(profile_path: str) -> str:
    """The seccomp groups file for the profile at ``profile_path``: the seccomp.toml beside
    it (a host's profile dir may bring its own groups), else the one shipped with the
    package."""
    beside = Path(profile_path).with_name(GROUPS_FILE)
    return str(beside if beside.is_file() else builtin_dir() / GROUPS_FILE)


def profile_names(extra_dirs: tuple[str, ...] = ()) -> list[str]:
    names = {p.stem for d in _search_dirs(extra_dirs) if d.is_dir() for p in d.glob("*.toml")}
    return sorted(n for n in names if NAME_RE.fullmatch(n) and n not in _NOT_PROFILES)


def load_profile(name: str, extra_dirs: tuple[str, ...] = ()) -> Profile:
    """The profile called ``name``; PluginLoadError if there is none or it is invalid."""
    if not NAME_RE.fullmatch(name) or name in _NOT_PROFILES:
        raise PluginLoadError(f"sandbox profile name {name!r} is not valid")
    for directory in _search_dirs(extra_dirs):
        candidate = directory / f"{name}.toml"
        if candidate.is_file():
            return _parse_profile(str(candidate), candidate.stat().st_mtime_ns)
    known = ", ".join(profile_names(extra_dirs)) or "none"
    raise PluginLoadError(f"no sandbox profile named {name!r} (known profiles: {known})")


_LIMIT_FIELDS = {
    "memory": parse_size,
    "tmp_size": parse_size,
    "timeout": parse_duration,
}


@functools.lru_cache(maxsize=64)
def _parse_profile(path: str, _mtime_ns: int) -> Profile:
    def fail(field: str, expected: str) -> PluginLoadError:
        return PluginLoadError(f"sandbox profile {path}: {field}: {expected}")

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise fail("(file)", f"readable TOML ({exc})") from exc
    meta = data.get("profile", {})
    limits = data.get("limits", {})
    if not isinstance(meta, dict) or not isinstance(limits, dict):
        raise fail("profile/limits", "tables")
    values: dict[str, Any] = {}
    for key in ("memory", "cpu", "pids", "tmp_size", "nofile", "timeout"):
        if key not in limits:
            raise fail(f"limits.{key}", "a value (every limit must be set)")
        raw = limits[key]
        try:
            if key in _LIMIT_FIELDS:
                values[key] = _LIMIT_FIELDS[key](raw)
            elif key == "cpu":
                if isinstance(raw, bool) or not isinstance(raw, (int, float)) or raw <= 0:
                    raise ValueError("a positive number of CPUs")
                values[key] = float(raw)
            else:
                if isinstance(raw, bool) or not isinstance(raw, int) or raw <= 0:
                    raise ValueError("a positive whole number")
                values[key] = raw
        except ValueError as exc:
            raise fail(f"limits.{key}", str(exc)) from None
    return Profile(
        name=Path(path).stem,
        description=str(meta.get("description", "")),
        limits=ProfileLimits(**values),
        path=path,
        tmp_exec=_tmp_exec(data.get("mounts"), fail),
    )


_MOUNT_KEYS = {"tmp_exec"}


def _tmp_exec(mounts: Any, fail: Callable[[str, str], PluginLoadError]) -> bool:
    """``[mounts] tmp_exec``: required, so that every profile says whether programs may run
    what they write to /tmp; an unknown key is refused, since a misspelt one would leave a
    profile's promise unsaid."""
    if not isinstance(mounts, dict):
        raise fail("mounts", "a [mounts] table (with tmp_exec = true or false)")
    unknown = sorted(set(mounts) - _MOUNT_KEYS)
    if unknown:
        known = ", ".join(sorted(_MOUNT_KEYS))
        raise fail(f"mounts.{unknown[0]}", f"not a known key (known: {known})")
    value = mounts.get("tmp_exec")
    if not isinstance(value, bool):
        raise fail(
            "mounts.tmp_exec", "true or false (may programs run files written to /tmp?), required"
        )
    return value
