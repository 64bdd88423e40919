"""Version ranges as the registry resolves them (npm's meaning of ^ and ~)."""

from __future__ import annotations

import pytest

from sandboxer._semver import Version, best_match, parse_range

AVAILABLE = ["0.0.3", "0.0.4", "0.2.3", "0.2.9", "0.3.0", "1.0.0", "1.2.0", "1.2.3", "1.2.9",
             "1.3.0", "1.10.0", "2.0.0-rc.1", "2.0.0", "2.1.0-beta", "not.a.version"]


@pytest.mark.parametrize(("spec", "expected"), [
    ("latest", "2.0.0"),
    ("1.2.3", "1.2.3"),
    ("=1.2.0", "1.2.0"),
    ("1.2", "1.2.9"),
    ("1", "1.10.0"),
    ("^1.2", "1.10.0"),
    ("^1.2.3", "1.10.0"),
    ("^0.2.3", "0.2.9"),
    ("^0.0.3", "0.0.3"),
    ("^0", "0.3.0"),
    ("~1.2.3", "1.2.9"),
    ("~1.2", "1.2.9"),
    ("~1", "1.10.0"),
    (">=1,<2", "1.10.0"),
    (">=1.2.1, <1.3", "1.2.9"),
    (">1.2", "2.0.0"),
    ("<=1.2", "1.2.9"),
    ("<1.0.0", "0.3.0"),
    (">=2.0.0-rc.1,<2.0.0", "2.0.0-rc.1"),
    ("2.0.0-rc.1", "2.0.0-rc.1"),
    ("^3", None),
    (">=2.1", None),  # 2.1.0-beta is a pre-release nobody asked for
])
def test_ranges_pick_the_highest_allowed_version(spec: str, expected: str | None) -> None:
    assert best_match(parse_range(spec), AVAILABLE) == expected


def test_precedence_follows_semver() -> None:
    order = ["1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta", "1.0.0-beta.2",
             "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "1.0.1", "1.1.0", "2.0.0"]
    versions = [Version.parse(v) for v in order]
    assert sorted(reversed(versions)) == versions


def test_latest_falls_back_to_pre_releases_only_when_there_is_nothing_else() -> None:
    assert best_match(parse_range("latest"), ["1.0.0-rc.1", "0.9.0-beta"]) == "1.0.0-rc.1"


@pytest.mark.parametrize("spec", ["^", ">=x", "1.2.3.4", "^1.2-rc", ">=1,,<2", "~v1"])
def test_bad_ranges_say_what_is_wrong(spec: str) -> None:
    with pytest.raises(ValueError, match="version range|not a version"):
        parse_range(spec)
