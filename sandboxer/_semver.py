"""Semantic versions and the ranges the registry resolves (``latest``, exact, ``^``, ``~``,
comparisons joined by commas), following semver.org's precedence and npm's range meaning.

Pre-releases sort before their release and are chosen only when asked for: by an exact
version, or by a range whose own bound names a pre-release of the same major.minor.patch.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

__all__ = ["Version", "VersionRange", "parse_range", "best_match"]

_VERSION = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
)
_PARTIAL = re.compile(
    r"(0|[1-9]\d*)(?:\.(0|[1-9]\d*))?(?:\.(0|[1-9]\d*))?"
    r"(?:-([0-9A-Za-z.-]+))?"
)


@dataclass(frozen=True, order=False)
class Version:
    major: int
    minor: int
    patch: int
    pre: tuple[int | str, ...] = ()
    text: str = ""

    @classmethod
    def parse(cls, text: str) -> Version:
        m = _VERSION.fullmatch(text)
        if not m:
            raise ValueError(f'a semantic version such as "1.2.0", not {text!r}')
        pre = (
            tuple(int(p) if p.isdigit() else p for p in m.group(4).split(".")) if m.group(4) else ()
        )
        return cls(int(m.group(1)), int(m.group(2)), int(m.group(3)), pre, text)

    def _key(self) -> tuple[object, ...]:
        # A release sorts after its pre-releases; numeric identifiers before alphanumeric.
        pre = tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in self.pre)
        return (self.major, self.minor, self.patch, 0 if self.pre else 1, pre)

    def __lt__(self, other: Version) -> bool:
        return self._key() < other._key()

    def __le__(self, other: Version) -> bool:
        return self._key() <= other._key()

    def __gt__(self, other: Version) -> bool:
        return self._key() > other._key()

    def __ge__(self, other: Version) -> bool:
        return self._key() >= other._key()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Version) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        return self.text or f"{self.major}.{self.minor}.{self.patch}"


@dataclass(frozen=True)
class VersionRange:
    """What a caller asked for: a set of comparisons that all must hold."""

    text: str
    checks: tuple[Callable[[Version], bool], ...]
    pre_ok: tuple[tuple[int, int, int], ...]  # releases whose pre-releases the range names
    latest: bool = False

    def allows(self, v: Version) -> bool:
        if v.pre and (v.major, v.minor, v.patch) not in self.pre_ok:
            return False
        return all(check(v) for check in self.checks)


def _bound(text: str, what: str) -> tuple[Version, int]:
    """A partial version ("1", "1.2", "1.2.3-rc.1") as its lowest version and how many parts
    were given."""
    m = _PARTIAL.fullmatch(text)
    if not m:
        raise ValueError(f"{what}: {text!r} is not a version")
    parts = [int(g) for g in m.groups()[:3] if g is not None]
    given = len(parts)
    parts += [0] * (3 - given)
    pre = m.group(4)
    if pre and given < 3:
        raise ValueError(f"{what}: a pre-release needs a full version, not {text!r}")
    return Version.parse(f"{parts[0]}.{parts[1]}.{parts[2]}" + (f"-{pre}" if pre else "")), given


def _next(v: Version, place: int) -> Version:
    """The first version past ``v`` in ``place`` (0 major, 1 minor, 2 patch), as a bound."""
    numbers = [v.major, v.minor, v.patch]
    numbers[place] += 1
    for i in range(place + 1, 3):
        numbers[i] = 0
    # "-0" is the lowest pre-release, so "< X.Y.Z-0" excludes X.Y.Z's pre-releases too.
    return Version(numbers[0], numbers[1], numbers[2], (0,))


def _exactly(low: Version) -> Callable[[Version], bool]:
    return lambda v: v == low


def _from_to(low: Version, high: Version) -> Callable[[Version], bool]:
    return lambda v: low <= v < high


def _at_least(low: Version) -> Callable[[Version], bool]:
    return lambda v: v >= low


def _above(low: Version) -> Callable[[Version], bool]:
    return lambda v: v > low


def _below(high: Version) -> Callable[[Version], bool]:
    return lambda v: v < high


def _at_most(high: Version) -> Callable[[Version], bool]:
    return lambda v: v <= high


def parse_range(text: str) -> VersionRange:
    """``latest``, ``1.2.3``, ``^1.2``, ``~1.2.3``, ``>=1,<2`` (comma: and); ValueError names
    the part that is not understood."""
    spec = text.strip()
    if spec in ("latest", "*", ""):
        return VersionRange(spec or "latest", (), (), latest=True)
    checks: list[Callable[[Version], bool]] = []
    pre_ok: list[tuple[int, int, int]] = []
    for raw in spec.split(","):
        part = raw.strip()
        m = re.fullmatch(r"(\^|~|>=|<=|>|<|=)?\s*(.+)", part)
        if not m:
            raise ValueError(f"version range {text!r}: empty part")
        op, rest = m.group(1) or "", m.group(2)
        low, given = _bound(rest, f"version range {text!r}")
        if low.pre:
            pre_ok.append((low.major, low.minor, low.patch))
        if op in ("", "="):
            # "1.2" means 1.2.x
            checks.append(_exactly(low) if given == 3 else _from_to(low, _next(low, given - 1)))
        elif op == "^":
            place = 0 if low.major else (1 if low.minor or given < 3 else 2)
            if given == 1:
                place = 0
            checks.append(_from_to(low, _next(low, place)))
        elif op == "~":
            checks.append(_from_to(low, _next(low, 1 if given >= 2 else 0)))
        elif op == ">=":
            checks.append(_at_least(low))
        elif op == ">":
            checks.append(_above(low) if given == 3 else _at_least(_next(low, given - 1)))
        elif op == "<":
            checks.append(_below(low))
        elif op == "<=":
            checks.append(_at_most(low) if given == 3 else _below(_next(low, given - 1)))
    return VersionRange(spec, tuple(checks), tuple(pre_ok))


def best_match(wanted: VersionRange, available: Iterable[str]) -> str | None:
    """The highest available version the range allows (``latest``: the highest release, or
    the highest pre-release when there is no release)."""
    versions = []
    for text in available:
        try:
            versions.append(Version.parse(text))
        except ValueError:
            continue
    if wanted.latest:
        releases = [v for v in versions if not v.pre]
        pool = releases or versions
    else:
        pool = [v for v in versions if wanted.allows(v)]
    return str(max(pool)) if pool else None
