"""The syscall groups of ``seccomp.toml`` as plain data, for explaining a call the filter
refused and for learning which groups a program needs: which groups would allow a call
(name and arguments), which catalogued group denies it in every profile.

Built by ``seccomp.syscall_groups`` from the same validated, flattened rules the filter is
compiled from; this module holds no parser and imports no libseccomp, so the supervisor can
keep a table per profile without loading it. It decides nothing about what a sandbox may do:
the filter does that in the kernel; this only says why.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Check", "GroupRule", "Group", "DeniedGroup", "SyscallGroups", "NEVER_LEARNED"]

_U64 = (1 << 64) - 1

# Denied groups that learn mode refuses like any profile would, whatever the program asks:
# a learned profile could never allow them, and letting them run once is already too much.
# (Every denied group is refused in learn mode; these are the ones the issue names, checked
# by tests/test_learn.py to exist in seccomp.toml.)
NEVER_LEARNED = ("kernel-modules", "kexec", "bpf", "namespaces", "mount")


@dataclass(frozen=True, slots=True)
class Check:
    """One argument comparison, as libseccomp makes it (unsigned 64-bit)."""

    index: int
    op: str  # eq, ne, lt, le, gt, ge, masked_eq
    value: int
    mask: int = 0

    def matches(self, args: tuple[int, ...]) -> bool:
        arg = args[self.index] & _U64
        if self.op == "masked_eq":
            return arg & self.mask == self.value
        return {
            "eq": arg == self.value,
            "ne": arg != self.value,
            "lt": arg < self.value,
            "le": arg <= self.value,
            "gt": arg > self.value,
            "ge": arg >= self.value,
        }[self.op]


@dataclass(frozen=True, slots=True)
class GroupRule:
    syscall: str
    allow: bool  # False: an exception the group answers with an errno or kill
    checks: tuple[Check, ...] = ()

    def matches(self, name: str, args: tuple[int, ...]) -> bool:
        return self.syscall == name and all(c.matches(args) for c in self.checks)


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    comment: str
    rules: tuple[GroupRule, ...]

    def allows(self, name: str, args: tuple[int, ...]) -> bool:
        """Whether a profile with this group allows the call: an allow rule matches it and
        none of the group's exceptions does (ioctl but not TIOCSTI, clone without CLONE_NEW*)."""
        return any(r.allow and r.matches(name, args) for r in self.rules) and not any(
            not r.allow and r.matches(name, args) for r in self.rules
        )

    def names(self, name: str) -> bool:
        return any(r.syscall == name for r in self.rules)


@dataclass(frozen=True, slots=True)
class DeniedGroup:
    name: str
    comment: str
    syscalls: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SyscallGroups:
    """Every group of one groups file, and its catalogue of what no profile may allow."""

    path: str
    groups: tuple[Group, ...]
    denied: tuple[DeniedGroup, ...]

    def allowing(self, name: str, args: tuple[int, ...]) -> list[str]:
        """The groups that would allow ``name(args)``, in the file's order."""
        return [g.name for g in self.groups if g.allows(name, args)]

    def denied_by(self, name: str) -> DeniedGroup | None:
        """The catalogued group that denies ``name`` in every profile, if one does."""
        return next((d for d in self.denied if name in d.syscalls), None)

    def naming(self, name: str) -> list[str]:
        """The groups that have any rule for ``name`` (for other arguments, perhaps)."""
        return [g.name for g in self.groups if g.names(name)]

    def group(self, name: str) -> Group:
        return next(g for g in self.groups if g.name == name)

    def why(self, name: str, args: tuple[int, ...], profile_groups: tuple[str, ...]) -> str:
        """One phrase saying what would allow ``name(args)``: "group inet", "groups
        processes, threads", "group keyring, denied in every profile", "no group allows
        these arguments (groups processes, threads allow clone with others)"."""
        allowing = self.allowing(name, args)
        if allowing:
            label = "group" if len(allowing) == 1 else "groups"
            text = f"{label} {', '.join(allowing)}"
            missing = [g for g in allowing if g not in profile_groups]
            if profile_groups and missing == allowing:
                text += ", not in this profile"
            return text
        denied = self.denied_by(name)
        if denied is not None:
            return f"group {denied.name}, denied in every profile"
        naming = self.naming(name)
        if naming:
            return (
                f"no group allows these arguments ({'group' if len(naming) == 1 else 'groups'} "
                f"{', '.join(naming)} allow {name} with others)"
            )
        return "no group allows it, denied in every profile"
