"""``sandboxer exec --learn FILE.toml``: write the profile a program needs, and ``--profile
FILE.toml`` to run under such a file.

While learning, the program runs with every isolation of the chosen profile but a "learn"
seccomp filter (sandbox/seccomp.py): the supervisor lets through each call some group of
``seccomp.toml`` allows and records which groups those were (sandbox/denials.py); what no
group allows (the ``[denied.*]`` groups: kernel modules, kexec, bpf, namespaces, mounts, ...)
is refused as any profile refuses it. Here the record becomes a profile file in profiles/'s
format: the chosen profile's limits and mounts, and exactly the groups used, each with a
comment naming the syscalls that needed it. This module must never write a group nobody
needed, nor a rule of its own: the file allows what its groups allow and nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import tomllib
from pathlib import Path
from typing import Any

from .config import HostConfig
from .errors import PluginLoadError
from .sandbox.profiles import NAME_RE, load_profile

__all__ = ["profile_file", "choose_groups", "write_profile"]


def profile_file(host: HostConfig, profile: str | None) -> tuple[HostConfig, str | None]:
    """``--profile`` as given: a name, or a path to a ``NAME.toml`` file, whose directory is
    then searched first (and whose name is the profile's)."""
    if profile is None or not (profile.endswith(".toml") or os.sep in profile):
        return host, profile
    path = Path(profile).resolve()
    if not path.is_file():
        raise PluginLoadError(f"--profile {profile}: no such profile file")
    if not NAME_RE.fullmatch(path.stem) or path.stem == "seccomp":
        raise PluginLoadError(
            f"--profile {profile}: a profile file is named NAME.toml with NAME a profile name "
            f"({NAME_RE.pattern}, not seccomp)"
        )
    return dataclasses.replace(host, profile_dirs=(str(path.parent), *host.profile_dirs)), path.stem


def choose_groups(
    learned: dict[str, set[tuple[str, ...]]], preferred: tuple[str, ...], order: list[str]
) -> dict[str, list[str]]:
    """The groups to allow (in ``order``), each with the syscalls that made it needed. A call
    only one group allows decides first; a call several allow (a thread's clone: processes or
    threads) takes one already chosen, else one of ``preferred`` (the profile it was learned
    under), else the first in ``order``."""
    chosen: dict[str, set[str]] = {}
    pending: list[tuple[str, tuple[str, ...]]] = []
    for name, alternatives in sorted(learned.items()):
        for groups in sorted(alternatives):
            if len(groups) == 1:
                chosen.setdefault(groups[0], set()).add(name)
            else:
                pending.append((name, groups))
    for name, groups in pending:
        have = [g for g in groups if g in chosen]
        pick = (have or [g for g in groups if g in preferred] or list(groups))[0]
        chosen.setdefault(pick, set()).add(name)
    return {g: sorted(chosen[g]) for g in order if g in chosen}


def _launcher_calls(
    learned: dict[str, set[tuple[str, ...]]], profile: str, dirs: tuple[str, ...]
) -> None:
    """The calls the launcher makes under the filter to hand over and exec: a learned profile
    must allow them too, even those learn mode lets through without asking (the handover)."""
    from .sandbox.seccomp import HANDOVER_NEEDS, LAUNCHER_NEEDS, syscall_groups

    table = syscall_groups(profile, dirs)
    for name in (*LAUNCHER_NEEDS, *HANDOVER_NEEDS):
        allowing = table.allowing(name, (0,) * 6)
        if allowing:
            learned.setdefault(name, set()).add(tuple(allowing))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise ValueError(f"not a scalar: {value!r}")


def write_profile(
    path: Path,
    *,
    learned: dict[str, set[tuple[str, ...]]],
    refused: dict[str, int],
    explained: dict[str, str],
    profile: str,
    profile_dirs: tuple[str, ...],
    argv: list[str],
    network: bool,
) -> list[str]:
    """Write the learned profile to ``path``; returns the groups it allows."""
    from .sandbox.seccomp import profile_groups, syscall_groups

    learned = {name: set(alternatives) for name, alternatives in learned.items()}
    _launcher_calls(learned, profile, profile_dirs)
    table = syscall_groups(profile, profile_dirs)
    groups = choose_groups(
        learned, profile_groups(profile, profile_dirs), [g.name for g in table.groups]
    )
    with open(load_profile(profile, profile_dirs).path, "rb") as f:
        base = tomllib.load(f)
    command = shlex.join(argv)
    lines = [
        f"# Learned by `sandboxer exec --learn` from: {command}",
        f"# Limits and mounts are profile {profile}'s; the seccomp groups are exactly those the",
        "# program used (each group's comment in seccomp.toml says why it may be allowed).",
        "# Format: docs/profiles.md.",
    ]
    if refused:
        lines.append("# Refused while learning, as every profile refuses them:")
        lines += [
            f"#   {name} x{n} ({explained.get(name, 'no group allows it')})"
            for name, n in sorted(refused.items())
        ]
    lines += ["", "[profile]", f"description = {_toml_value('Learned from: ' + command[:200])}", ""]
    for table_name in ("limits", "mounts"):
        section = base.get(table_name, {})
        lines.append(f"[{table_name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in section.items()]
        lines.append("")
    lines += ["[seccomp]", "groups = ["]
    for group, calls in groups.items():
        lines.append(f"    # {group}: {', '.join(calls)}")
        lines.append(f"    {_toml_value(group)},")
    lines.append("]")
    if network and "inet" in groups:
        lines.append('network_groups = ["inet"]')
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return list(groups)
