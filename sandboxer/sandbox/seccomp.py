"""Seccomp filters for sandboxed plugins: a profile's ``[seccomp]`` table and the named syscall
groups of ``seccomp.toml``, validated, flattened into rules and compiled by libseccomp
(pyseccomp) into the classic-BPF program the launcher loads as its last step before exec.

The filter is an allow-list for the native x86_64 ABI only: whatever no group or rule allows
is answered EPERM, and a call through the i386 (``int 0x80``) or x32 ABI kills the process
(libseccomp's bad-architecture action, which it also applies to x32 syscall numbers).
Compiled programs are cached per profile file, groups file (both by mtime), network flag and
mode, in this process; ``seccomp_cache`` keeps them on disk for the next one.

Modes (docs/architecture.md, "Seccomp denials and learn mode"): "plain" answers what no rule
allows with EPERM in the kernel; "explain" hands exactly those calls to the supervisor's
listener instead (SECCOMP_RET_USER_NOTIF), which answers EPERM too and logs why
(sandbox/denials.py); rules with another errno (clone3's ENOSYS) and every kill keep their
action. "learn" notifies every call but the launcher's handover, the kills and the
non-EPERM answers of any group, for ``sandboxer exec --learn``.

This module must never fail open: a profile or groups file that cannot be read, names an
unknown group, syscall, errno or constant, lacks a comment, asks for something libseccomp
cannot express exactly, or allows inet sockets other than TCP and UDP is a PluginLoadError
naming the file and the field, never a filter with less (or more) in it. It never loads a
filter into the calling process: it only produces bytes.
"""

from __future__ import annotations

import errno as _errno
import functools
import os
import platform
import socket
import tempfile
import tomllib
from dataclasses import dataclass, field
from typing import Any

import pyseccomp

from ..errors import PluginLoadError, SandboxUnavailable
from .profiles import GROUPS_FILE, groups_path, load_profile
from .syscall_groups import Check, DeniedGroup, Group, GroupRule, SyscallGroups

__all__ = [
    "compile_filter",
    "filter_within",
    "has_network",
    "syscall_groups",
    "syscall_name",
    "profile_groups",
    "GROUPS_FILE",
    "MODES",
    "HANDOVER_NEEDS",
]

DEFAULT_ERRNO = _errno.EPERM
# What the filter answers for every call no rule allows. Docker answers EPERM too: programs
# treat it as "not permitted here" and carry on, where ENOSYS would make some of them try an
# older syscall that is equally denied.
DEFAULT_ACTION = pyseccomp.ERRNO(DEFAULT_ERRNO)
# i386 and x32 calls: never legitimate for the x86_64 programs we run, and the classic way
# around filters that only list x86_64 numbers. Killing the process (not just the thread)
# makes the attempt visible as SIGSYS.
BAD_ARCH_ACTION = pyseccomp.KILL_PROCESS
BPF_MAXINSNS = 4096  # the kernel refuses longer classic-BPF programs (EINVAL)
# The launcher loads the filter and then, under it, changes to the plugin's directory and
# execs the plugin (or writes its failure report and exits): a profile that does not allow
# these could never start anything.
LAUNCHER_NEEDS = ("chdir", "execve", "write", "exit_group")
# With a listener the launcher also sends its fd to the supervisor and closes its own copy,
# under the filter: a call notified then would wait for a listener only it holds. A profile
# that does not allow both gets the "plain" filter (denials unexplained, never a hang).
HANDOVER_NEEDS = ("sendmsg", "close")
MODES = ("plain", "explain", "learn")
_U64 = (1 << 64) - 1
_LOW_32 = 0xFFFFFFFF  # an int argument: the kernel reads only the register's low half
# Inet sockets a filter may allow: TCP and UDP, each as (type, protocols). socket(2)'s type
# keeps SOCK_NONBLOCK and SOCK_CLOEXEC above its low 4 bits; its protocol 0 is the type's own.
# Every other protocol of these families (SCTP, MPTCP, UDP-Lite, ICMP ping sockets, raw IP)
# is kernel code a TCP/UDP program never asks for. Checked on every compiled filter, whatever
# group or profile allows the socket (``_check_inet_sockets``).
_INET_FAMILIES = (int(socket.AF_INET), int(socket.AF_INET6))
_INET_KINDS = {
    int(socket.SOCK_STREAM): (0, int(socket.IPPROTO_TCP)),
    int(socket.SOCK_DGRAM): (0, int(socket.IPPROTO_UDP)),
}
_SOCKET_TYPE_BITS = 0xF  # SOCK_TYPE_MASK in the kernel's net.h
_SOCKET_CALLS = ("socket", "socketpair")  # both create sockets (socketpair fails only after)

_OPS = {
    "eq": pyseccomp.EQ,
    "ne": pyseccomp.NE,
    "lt": pyseccomp.LT,
    "le": pyseccomp.LE,
    "gt": pyseccomp.GT,
    "ge": pyseccomp.GE,
    "masked_eq": pyseccomp.MASKED_EQ,
}
_RULE_KEYS = {"syscalls", "action", "comment", "args"}
_ARG_KEYS = {"index", "op", "value", "mask", "comment"}
_GROUP_KEYS = {"comment", "syscalls", "rules"}
_DENIED_KEYS = {"comment", "syscalls"}
_TABLE_KEYS = {"groups", "network_groups", "rules"}


@dataclass(frozen=True, slots=True)
class _ArgCheck:
    index: int
    op: str
    value: int
    mask: int = 0  # only for masked_eq


@dataclass(frozen=True, slots=True)
class _Rule:
    syscall: str
    action: str  # "allow", "errno:NAME" or "kill"
    args: tuple[_ArgCheck, ...] = ()
    origin: str = field(default="", compare=False)  # "file: field", for error messages


@dataclass(frozen=True, slots=True)
class _Group:
    comment: str
    rules: tuple[_Rule, ...]


@dataclass(frozen=True, slots=True)
class _Groups:
    path: str
    constants: dict[str, int]
    groups: dict[str, _Group]
    denied: dict[str, DeniedGroup] = field(default_factory=dict)


class _Invalid(Exception):
    """A field is wrong: turned into a PluginLoadError naming the file."""

    def __init__(self, field: str, expected: str) -> None:
        super().__init__(field)
        self.field = field
        self.expected = expected


# -- reading and validating ---------------------------------------------------------------------


def _read_toml(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise PluginLoadError(f"{what} {path}: (file): readable TOML ({exc})") from exc


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise _Invalid(
            f"{where}.{unknown[0]}", f"not a known key (known: {', '.join(sorted(allowed))})"
        )


def _comment(table: dict[str, Any], where: str) -> str:
    text = table.get("comment")
    if not isinstance(text, str) or not text.strip():
        raise _Invalid(f"{where}.comment", "a comment saying why this is allowed (required)")
    return text


def _names(value: Any, where: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _Invalid(where, "a non-empty list of names")
    return value


def _syscall(name: str, where: str) -> str:
    # libseccomp answers a negative pseudo-number for calls this architecture does not have
    # (socketcall, stat64 ...) and -1 for names it does not know at all.
    if pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name) < 0:
        raise _Invalid(where, f"a syscall of x86_64 ({name!r} is not one)")
    return name


def _number(value: Any, constants: dict[str, int], where: str) -> int:
    """An integer, or constant names joined by "|" (``"CLONE_NEWNS | CLONE_NEWUSER"``)."""
    if isinstance(value, bool):
        raise _Invalid(where, "a number or named constants joined by |")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and value.strip():
        number = 0
        for name in (part.strip() for part in value.split("|")):
            if name not in constants:
                known = ", ".join(sorted(constants)) or "none"
                raise _Invalid(
                    where,
                    f"a number or named constants joined by | ({name!r} is "
                    f"not a constant of the groups file; known: {known})",
                )
            number |= constants[name]
    else:
        raise _Invalid(where, "a number or named constants joined by |")
    if not 0 <= number <= _U64:
        raise _Invalid(where, "a value between 0 and 2**64-1")
    return number


def _action(value: Any, where: str) -> str:
    if value in ("allow", "kill"):
        return str(value)
    if isinstance(value, str) and value.startswith("errno:"):
        name = value[len("errno:") :]
        if name in _errno.errorcode.values():
            return value
    raise _Invalid(where, '"allow", "kill" or "errno:NAME" with NAME an errno such as EPERM')


def _arg(raw: Any, constants: dict[str, int], where: str) -> _ArgCheck:
    if not isinstance(raw, dict):
        raise _Invalid(where, "a table with index, op and value")
    _check_keys(raw, _ARG_KEYS, where)
    index = raw.get("index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index <= 5:
        raise _Invalid(f"{where}.index", "a syscall argument index from 0 to 5")
    op = raw.get("op")
    if op not in _OPS:
        raise _Invalid(f"{where}.op", f"one of {', '.join(_OPS)}")
    if "value" not in raw:
        raise _Invalid(f"{where}.value", "a value to compare with (required)")
    value = _number(raw["value"], constants, f"{where}.value")
    if op == "masked_eq":
        if "mask" not in raw:
            raise _Invalid(f"{where}.mask", "a mask (required with masked_eq)")
        mask = _number(raw["mask"], constants, f"{where}.mask")
        if value & ~mask:
            raise _Invalid(f"{where}.value", "bits inside the mask only (it could never match)")
        return _ArgCheck(index, op, value, mask)
    if "mask" in raw:
        raise _Invalid(f"{where}.mask", "absent: a mask goes with op masked_eq only")
    return _ArgCheck(index, op, value)


def _rules(raw: Any, constants: dict[str, int], where: str, origin: str) -> list[_Rule]:
    if not isinstance(raw, list):
        raise _Invalid(where, "an array of rule tables ([[...rules]])")
    out: list[_Rule] = []
    for i, entry in enumerate(raw):
        here = f"{where}[{i}]"
        if not isinstance(entry, dict):
            raise _Invalid(here, "a rule table")
        _check_keys(entry, _RULE_KEYS, here)
        _comment(entry, here)
        syscalls = [
            _syscall(name, f"{here}.syscalls")
            for name in _names(entry.get("syscalls"), f"{here}.syscalls")
        ]
        action = _action(entry.get("action"), f"{here}.action")
        args_raw = entry.get("args", [])
        if not isinstance(args_raw, list):
            raise _Invalid(f"{here}.args", "an array of argument checks")
        args = tuple(_arg(a, constants, f"{here}.args[{j}]") for j, a in enumerate(args_raw))
        if len({a.index for a in args}) != len(args):
            raise _Invalid(
                f"{here}.args",
                "at most one check per argument index (libseccomp ANDs them; use two rules for OR)",
            )
        out += [_Rule(name, action, args, f"{origin}: {here}") for name in syscalls]
    return out


@functools.lru_cache(maxsize=16)
def _parse_groups(path: str, _mtime_ns: int) -> _Groups:
    data = _read_toml(path, "seccomp groups")
    try:
        _check_keys(data, {"constants", "groups", "denied"}, "(top level)")
        raw_constants = data.get("constants", {})
        if not isinstance(raw_constants, dict):
            raise _Invalid("constants", "a table of NAME = number")
        constants: dict[str, int] = {}
        for name, value in raw_constants.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64:
                raise _Invalid(f"constants.{name}", "a number between 0 and 2**64-1")
            constants[name] = value
        raw_groups = data.get("groups")
        if not isinstance(raw_groups, dict) or not raw_groups:
            raise _Invalid("groups", "tables of named syscall groups ([groups.NAME])")
        groups: dict[str, _Group] = {}
        for name, table in raw_groups.items():
            where = f"groups.{name}"
            if not isinstance(table, dict):
                raise _Invalid(where, "a table with comment and syscalls and/or rules")
            _check_keys(table, _GROUP_KEYS, where)
            comment = _comment(table, where)
            rules: list[_Rule] = []
            if "syscalls" in table:
                rules += [
                    _Rule(
                        _syscall(s, f"{where}.syscalls"), "allow", (), f"{path}: {where}.syscalls"
                    )
                    for s in _names(table["syscalls"], f"{where}.syscalls")
                ]
            if "rules" in table:
                rules += _rules(table["rules"], constants, f"{where}.rules", path)
            if not rules:
                raise _Invalid(where, "syscalls or rules (a group that allows nothing)")
            groups[name] = _Group(comment, tuple(rules))
        denied = _parse_denied(data.get("denied", {}))
    except _Invalid as exc:
        raise PluginLoadError(f"seccomp groups {path}: {exc.field}: {exc.expected}") from None
    return _Groups(path, constants, groups, denied)


def _parse_denied(raw: Any) -> dict[str, DeniedGroup]:
    if not isinstance(raw, dict):
        raise _Invalid("denied", "tables of named denied groups ([denied.NAME])")
    out: dict[str, DeniedGroup] = {}
    for name, table in raw.items():
        where = f"denied.{name}"
        if not isinstance(table, dict):
            raise _Invalid(where, "a table with comment and syscalls")
        _check_keys(table, _DENIED_KEYS, where)
        comment = _comment(table, where)
        names = [_syscall(s, f"{where}.syscalls") for s in _names(table.get("syscalls"), where)]
        out[name] = DeniedGroup(name, comment, tuple(names))
    return out


def _group_list(table: dict[str, Any], key: str, groups: _Groups, *, required: bool) -> list[str]:
    where = f"seccomp.{key}"
    if key not in table:
        if required:
            raise _Invalid(where, "a list of syscall group names (required)")
        return []
    value = table[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _Invalid(where, "a list of syscall group names")
    if required and not value:
        raise _Invalid(where, "at least one syscall group")
    for i, name in enumerate(value):
        if name not in groups.groups:
            raise _Invalid(
                f"{where}[{i}]",
                f"a group of {groups.path} ({name!r} is not one; "
                f"known: {', '.join(sorted(groups.groups))})",
            )
    if len(set(value)) != len(value):
        raise _Invalid(where, "each group once")
    return value


def _profile_rules(path: str, groups: _Groups, network: bool) -> list[_Rule]:
    """The profile's [seccomp] table, flattened: its groups' rules, then its own."""
    data = _read_toml(path, "sandbox profile")
    try:
        table = data.get("seccomp")
        if not isinstance(table, dict):
            raise _Invalid(
                "seccomp",
                "a [seccomp] table (every profile says which syscalls its plugins may make)",
            )
        _check_keys(table, _TABLE_KEYS, "seccomp")
        names = _group_list(table, "groups", groups, required=True)
        network_names = _group_list(table, "network_groups", groups, required=False)
        own = _rules(table.get("rules", []), groups.constants, "seccomp.rules", path)
    except _Invalid as exc:
        raise PluginLoadError(f"sandbox profile {path}: {exc.field}: {exc.expected}") from None
    if network and not network_names:
        raise PluginLoadError(
            f"sandbox profile {path}: seccomp.network_groups: this profile never allows "
            "network sockets; choose another profile or do not allow network access"
        )
    chosen = names + [n for n in network_names if network and n not in names]
    rules = [rule for name in chosen for rule in groups.groups[name].rules]
    return rules + own


# -- flattening to what libseccomp can express ----------------------------------------------------


def _complement(denied: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Masked patterns (mask, value) matching exactly the values no denied pattern matches.

    libseccomp drops conditional rules for a syscall that also has an unconditional one, so
    "allow ioctl except TIOCSTI" cannot be written as an allow plus a deny. Instead the allowed
    values are covered by masked-equality patterns: walking the bits of the denied masks from
    the top, every branch no denied pattern takes becomes one allow pattern (at most one per
    bit per denied pattern: about 35 rules for ioctl's two requests).
    """
    union = 0
    for mask, _ in denied:
        union |= mask
    bits = [1 << b for b in range(63, -1, -1) if union >> b & 1]
    out: list[tuple[int, int]] = []

    def walk(depth: int, fixed: int, value: int, live: list[tuple[int, int]]) -> None:
        if not live:
            out.append((fixed, value))
            return
        if any(mask & ~fixed == 0 for mask, _ in live):
            return  # a denied pattern matches everything below this branch
        bit = bits[depth]
        for branch in (0, bit):
            walk(
                depth + 1,
                fixed | bit,
                value | branch,
                [(m, v) for m, v in live if not m & bit or v & bit == branch],
            )

    walk(0, 0, 0, denied)
    return out


def _plan(rules: list[_Rule]) -> list[_Rule]:
    """The rules to hand libseccomp, checked for conflicts and with denied exceptions to an
    allowed syscall turned into allow patterns (see ``_complement``)."""
    default = f"errno:{_errno.errorcode[DEFAULT_ERRNO]}"
    by_syscall: dict[str, list[_Rule]] = {}
    for rule in rules:
        if rule not in by_syscall.setdefault(rule.syscall, []):
            by_syscall[rule.syscall].append(rule)
    planned: list[_Rule] = []
    for name, entries in by_syscall.items():
        whole = [r for r in entries if not r.args]
        partial = [r for r in entries if r.args]
        allowed_whole = [r for r in whole if r.action == "allow"]
        other_whole = [r for r in whole if r.action != "allow"]
        if other_whole:
            # An unconditional "errno"/"kill" rule decides the syscall: it must be the only
            # word on it, so that a profile's explicit deny is a guarantee no group undoes.
            others = [r for r in entries if r.action != other_whole[0].action or r.args]
            if others:
                raise PluginLoadError(
                    f"seccomp: {name}: {other_whole[0].origin} answers it "
                    f"{other_whole[0].action} always, but {others[0].origin} also has a rule "
                    f"for it ({others[0].action}); remove one of them"
                )
            if other_whole[0].action != default:
                planned.append(other_whole[0])
            continue
        if allowed_whole:
            exceptions = [r for r in partial if r.action != "allow"]
            if exceptions:
                planned += _carve(name, allowed_whole[0], exceptions, default)
            else:
                planned.append(allowed_whole[0])  # conditional allows add nothing to it
            continue
        planned += [r for r in partial if r.action != default]
    return planned


def _carve(name: str, allowed: _Rule, exceptions: list[_Rule], default: str) -> list[_Rule]:
    index = exceptions[0].args[0].index
    for rule in exceptions:
        if (
            len(rule.args) != 1
            or rule.args[0].op not in ("eq", "masked_eq")
            or rule.args[0].index != index
        ):
            raise PluginLoadError(
                f"seccomp: {name}: {rule.origin}: an exception to an allowed syscall must "
                f"compare one argument (the same index in every exception) with eq or "
                f"masked_eq; libseccomp cannot express more"
            )
    denied = [
        (a.mask if a.op == "masked_eq" else _U64, a.value) for a in (r.args[0] for r in exceptions)
    ]
    patterns = [
        _Rule(
            name,
            "allow",
            (_ArgCheck(index, "masked_eq", value, mask),),
            f"{allowed.origin} (except {', '.join(r.origin for r in exceptions)})",
        )
        for mask, value in _complement(denied)
    ]
    # Exceptions answered with the default action need no rule of their own; any other
    # answer (errno:EACCES, kill) is added for exactly the values they name.
    return patterns + [r for r in exceptions if r.action != default]


# -- inet sockets: TCP and UDP only ---------------------------------------------------------------


def _may_match(check: _ArgCheck | None, low: int) -> bool:
    """Whether ``check`` lets through some register whose low 32 bits are ``low`` (an int
    argument's value as the kernel sees it); no check lets everything through."""
    if check is None or check.op == "ne":  # ne: of low and 2**32 + low, one passes
        return True
    if check.op == "eq":
        return check.value & _LOW_32 == low
    if check.op == "masked_eq":
        return check.value & _LOW_32 == low & check.mask & _LOW_32
    if check.op in ("lt", "le"):  # the smallest such register is low itself
        return low < check.value if check.op == "lt" else low <= check.value
    highest = (_LOW_32 << 32) | low  # gt, ge: the largest such register
    return highest > check.value if check.op == "gt" else highest >= check.value


def _pinned(check: _ArgCheck | None, bits: int) -> int | None:
    """The value of ``bits`` in every register ``check`` lets through, or None if it lets
    through more than one."""
    if check is not None and (
        check.op == "eq" or (check.op == "masked_eq" and check.mask & bits == bits)
    ):
        return check.value & bits
    return None


def _check_inet_sockets(rules: list[_Rule]) -> None:
    """Refuse a filter that could allow an inet socket other than TCP or UDP.

    Every rule that allows socket() or socketpair() for a family that may be AF_INET or
    AF_INET6 must pin the type (its low 4 bits) to SOCK_STREAM or SOCK_DGRAM and the protocol
    (its low 32 bits) to 0 or that type's own. Checked on what libseccomp is given, so it holds
    for every group, profile and host groups file: whoever allows inet sockets (a network
    profile today, loopback in an empty namespace tomorrow) gets only TCP and UDP.
    """
    for rule in rules:
        if rule.syscall not in _SOCKET_CALLS or rule.action != "allow":
            continue
        args = {check.index: check for check in rule.args}
        if not any(_may_match(args.get(0), family) for family in _INET_FAMILIES):
            continue
        kind = _pinned(args.get(1), _SOCKET_TYPE_BITS)
        protocol = _pinned(args.get(2), _LOW_32)
        if kind not in _INET_KINDS or protocol not in _INET_KINDS[kind]:
            raise PluginLoadError(
                f"seccomp: {rule.syscall}: {rule.origin}: allows inet sockets (AF_INET or "
                f"AF_INET6) other than TCP and UDP; such a rule must compare arg 1 (the type, "
                f"masked_eq with SOCK_TYPE_MASK) with SOCK_STREAM or SOCK_DGRAM and arg 2 (the "
                f"protocol, masked_eq with LOW_32_BITS) with 0 or IPPROTO_TCP for a stream, "
                f"0 or IPPROTO_UDP for a datagram"
            )


# -- compiling ----------------------------------------------------------------------------------


def _libseccomp_action(action: str) -> int:
    if action == "allow":
        return int(pyseccomp.ALLOW)
    if action == "kill":
        return int(pyseccomp.KILL_PROCESS)
    return int(pyseccomp.ERRNO(getattr(_errno, action[len("errno:") :])))


def _build(rules: list[_Rule], default_action: int = DEFAULT_ACTION) -> bytes:
    flt = pyseccomp.SyscallFilter(default_action)
    flt.set_attr(pyseccomp.Attr.ACT_BADARCH, BAD_ARCH_ACTION)
    # seccomp_init adds only the native architecture: no x86 or x32 is ever added here.
    flt.set_attr(pyseccomp.Attr.CTL_OPTIMIZE, 2)  # binary search over syscall numbers
    for rule in rules:
        args = [
            pyseccomp.Arg(a.index, _OPS[a.op], a.mask, a.value)
            if a.op == "masked_eq"
            else pyseccomp.Arg(a.index, _OPS[a.op], a.value)
            for a in rule.args
        ]
        try:
            flt.add_rule_exactly(_libseccomp_action(rule.action), rule.syscall, *args)
        except OSError as exc:
            raise PluginLoadError(
                f"seccomp: {rule.origin}: libseccomp refused the rule for "
                f"{rule.syscall} ({exc.strerror})"
            ) from exc
    with tempfile.TemporaryFile() as out:
        try:
            flt.export_bpf(out)
        except OSError as exc:
            raise PluginLoadError(
                f"seccomp: libseccomp could not compile the filter ({exc.strerror})"
            ) from exc
        out.seek(0)
        program = out.read()
    if not program or len(program) % 8 or len(program) // 8 > BPF_MAXINSNS:
        raise PluginLoadError(
            f"seccomp: the compiled filter has {len(program) / 8:g} "
            f"instructions; the kernel loads 1 to {BPF_MAXINSNS}"
        )
    return program


@functools.lru_cache(maxsize=32)
def _compile(
    profile_path: str,
    _profile_mtime_ns: int,
    groups_path: str,
    groups_mtime_ns: int,
    network: bool,
    mode: str = "plain",
) -> bytes:
    groups = _parse_groups(groups_path, groups_mtime_ns)
    rules = _plan(_profile_rules(profile_path, groups, network))
    _check_inet_sockets(rules)
    allowed = {r.syscall for r in rules if r.action == "allow" and not r.args}
    missing = [name for name in LAUNCHER_NEEDS if name not in allowed]
    if missing:
        raise PluginLoadError(
            f"sandbox profile {profile_path}: seccomp.groups: groups that allow "
            f"{', '.join(missing)} (the launcher calls them under the filter to exec the "
            f"plugin, so a profile without them could never start one)"
        )
    _check_denied(profile_path, rules, groups)
    can_hand_over = all(name in allowed for name in HANDOVER_NEEDS)
    if mode == "learn":
        if not can_hand_over:
            raise PluginLoadError(
                f"sandbox profile {profile_path}: learn mode needs a profile that allows "
                f"{', '.join(HANDOVER_NEEDS)} (the launcher hands the listener over with them)"
            )
        return _build(_learn_rules(groups, rules), int(pyseccomp.NOTIFY))
    if mode == "explain" and can_hand_over:
        return _build(rules, int(pyseccomp.NOTIFY))
    return _build(rules)


def _check_denied(profile_path: str, rules: list[_Rule], groups: _Groups) -> None:
    """No profile may allow a syscall of a ``[denied.*]`` group, even for some arguments."""
    for rule in rules:
        for denied in groups.denied.values():
            if rule.action == "allow" and rule.syscall in denied.syscalls:
                raise PluginLoadError(
                    f"sandbox profile {profile_path}: {rule.origin}: allows {rule.syscall}, "
                    f"which group {denied.name} of {groups.path} denies in every profile"
                )


def _learn_rules(groups: _Groups, profile_rules: list[_Rule]) -> list[_Rule]:
    """Learn mode's rules over a default of "notify": the launcher's handover allowed, and
    every kill and every errno other than the default that any group or the profile gives
    kept as it is (clone3's ENOSYS steers the C library to clone, whose flags are seen)."""
    default = f"errno:{_errno.errorcode[DEFAULT_ERRNO]}"
    kept: list[_Rule] = [
        _Rule(name, "allow", (), "learn mode: the launcher's handover") for name in HANDOVER_NEEDS
    ]
    every = [r for g in groups.groups.values() for r in g.rules] + profile_rules
    for rule in every:
        if rule.action not in ("allow", default) and rule not in kept:
            kept.append(rule)
    return kept


def _mtime_ns(path: str, what: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError as exc:
        raise PluginLoadError(f"{what} {path}: (file): readable ({exc.strerror})") from exc


def compile_filter(
    profile: str, *, network: bool, extra_dirs: tuple[str, ...] = (), mode: str = "plain"
) -> bytes:
    """The seccomp BPF program (``struct sock_filter`` array) for the profile named
    ``profile``, with its ``network_groups`` when ``network`` is true.

    Compiled once per profile file, groups file and network flag, and reused until either file
    changes. PluginLoadError if the profile or its groups are invalid, or if ``network`` is
    asked of a profile that never allows it; SandboxUnavailable on a host that is not x86_64
    (the groups name x86_64 syscalls). ``mode``: one of MODES (see the module docstring).
    """
    if mode not in MODES:
        raise ValueError(f"seccomp mode {mode!r}: one of {', '.join(MODES)}")
    if pyseccomp.system_arch() != pyseccomp.Arch.X86_64:
        raise SandboxUnavailable(
            f"the seccomp profiles are written for x86_64 and this host is "
            f"{platform.machine()}; sandboxed plugins need an x86_64 host",
            missing="seccomp filter for this architecture",
        )
    path = load_profile(profile, extra_dirs).path
    groups_file = groups_path(path)
    return _compile(
        path,
        _mtime_ns(path, "sandbox profile"),
        groups_file,
        _mtime_ns(groups_file, "seccomp groups"),
        bool(network),
        mode,
    )


def _allowed(profile_path: str, network: bool) -> frozenset[_Rule]:
    groups_file = groups_path(profile_path)
    groups = _parse_groups(groups_file, _mtime_ns(groups_file, "seccomp groups"))
    return frozenset(
        r for r in _plan(_profile_rules(profile_path, groups, network)) if r.action == "allow"
    )


def has_network(profile: str, extra_dirs: tuple[str, ...] = ()) -> bool:
    """Whether the profile named ``profile`` ever allows inet sockets (has network_groups)."""
    path = load_profile(profile, extra_dirs).path
    groups_file = groups_path(path)
    groups = _parse_groups(groups_file, _mtime_ns(groups_file, "seccomp groups"))
    table = _read_toml(path, "sandbox profile").get("seccomp")
    try:
        return bool(
            _group_list(
                table if isinstance(table, dict) else {}, "network_groups", groups, required=False
            )
        )
    except _Invalid as exc:
        raise PluginLoadError(f"sandbox profile {path}: {exc.field}: {exc.expected}") from None


def filter_within(profile: str, ceiling: str, extra_dirs: tuple[str, ...] = ()) -> bool:
    """Whether every call the filter of ``profile`` allows is allowed by ``ceiling``'s too,
    with and without network: each allow rule of one must be an allow rule of the other.

    Literal comparison of the flattened rules: a rule allowing a subset of another's
    arguments written differently counts as wider. That errs towards refusing, never towards
    letting a plugin pick a profile that allows more than the host's."""
    narrow = load_profile(profile, extra_dirs).path
    wide = load_profile(ceiling, extra_dirs).path
    if not _allowed(narrow, False) <= _allowed(wide, False):
        return False
    if not has_network(profile, extra_dirs):
        return True
    return has_network(ceiling, extra_dirs) and _allowed(narrow, True) <= _allowed(wide, True)


def _table_rule(rule: _Rule) -> GroupRule:
    return GroupRule(
        rule.syscall,
        rule.action == "allow",
        tuple(Check(a.index, a.op, a.value, a.mask) for a in rule.args),
    )


def syscall_groups(profile: str, extra_dirs: tuple[str, ...] = ()) -> SyscallGroups:
    """The groups file beside the profile named ``profile``, as plain data (every group, not
    only the profile's): what explains a denial and what learn mode maps calls to."""
    path = load_profile(profile, extra_dirs).path
    groups_file = groups_path(path)
    groups = _parse_groups(groups_file, _mtime_ns(groups_file, "seccomp groups"))
    return SyscallGroups(
        groups_file,
        tuple(
            Group(name, g.comment, tuple(_table_rule(r) for r in g.rules))
            for name, g in groups.groups.items()
        ),
        tuple(groups.denied.values()),
    )


def profile_groups(profile: str, extra_dirs: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The groups the profile named ``profile`` picks (``groups``, then ``network_groups``)."""
    path = load_profile(profile, extra_dirs).path
    groups_file = groups_path(path)
    groups = _parse_groups(groups_file, _mtime_ns(groups_file, "seccomp groups"))
    table = _read_toml(path, "sandbox profile").get("seccomp")
    table = table if isinstance(table, dict) else {}
    try:
        names = _group_list(table, "groups", groups, required=True)
        extra = _group_list(table, "network_groups", groups, required=False)
    except _Invalid as exc:
        raise PluginLoadError(f"sandbox profile {path}: {exc.field}: {exc.expected}") from None
    return tuple(names + [n for n in extra if n not in names])


def syscall_name(number: int) -> str:
    """The x86_64 name of syscall ``number`` ("syscall_N" for one libseccomp does not know)."""
    try:
        return str(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, number).decode())
    except (ValueError, OSError, AttributeError):
        return f"syscall_{number}"
