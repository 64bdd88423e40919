"""Sizes and durations as manifests, the host config and the CLI spell them (sandboxer._units)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings, strategies as st

from sandboxer._units import (
    MAX_DURATION,
    MAX_SIZE,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


# -- parse_size ------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("64MiB", 64 * MiB, id="iec-mib"),
        pytest.param("512M", 512 * MiB, id="single-letter-m-is-binary"),
        pytest.param("1G", GiB, id="single-letter-g-is-binary"),
        pytest.param("1.5G", 3 * GiB // 2, id="fraction-of-g"),
        pytest.param("100MB", 100_000_000, id="spelled-si-mb-is-decimal"),
        pytest.param("1kb", 1000, id="si-kb-lower-case"),
        pytest.param("1k", KiB, id="single-letter-k"),
        pytest.param("1KiB", KiB, id="iec-kib"),
        pytest.param("1gib", GiB, id="unit-case-insensitive"),
        pytest.param("1TB", 10**12, id="si-tb"),
        pytest.param("1T", TiB, id="single-letter-t"),
        pytest.param("4096", 4096, id="digits-only-are-bytes"),
        pytest.param("1b", 1, id="b-is-bytes"),
        pytest.param(" 2 MiB ", 2 * MiB, id="surrounding-and-inner-space"),
        pytest.param(4096, 4096, id="int-is-bytes"),
        pytest.param("1024T", MAX_SIZE, id="exactly-1PiB"),
        pytest.param(MAX_SIZE, MAX_SIZE, id="int-exactly-1PiB"),
        pytest.param("1.0000001k", 1024, id="fraction-floors-to-whole-bytes"),
    ],
)
def test_parse_size_good(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("64XB", id="unknown-unit"),
        pytest.param("1PiB", id="pib-not-a-unit"),
        pytest.param("", id="empty"),
        pytest.param("MiB", id="unit-without-number"),
        pytest.param("-1", id="negative-string"),
        pytest.param(-1, id="negative-int"),
        pytest.param(0, id="zero-int"),
        pytest.param("0", id="zero-string"),
        pytest.param("0.5", id="half-a-byte-floors-to-zero"),
        pytest.param(True, id="bool-true"),
        pytest.param(False, id="bool-false"),
        pytest.param(1.5, id="float"),
        pytest.param(None, id="none"),
        pytest.param(["1M"], id="list"),
        pytest.param("1025T", id="above-1PiB"),
        pytest.param(MAX_SIZE + 1, id="int-above-1PiB"),
        pytest.param(10**400, id="huge-int"),
        pytest.param("1e3", id="exponent"),
        pytest.param("1,000", id="thousands-separator"),
        pytest.param("1 2M", id="two-numbers"),
        pytest.param("0x10", id="hex"),
        pytest.param("1M1", id="trailing-digit"),
        pytest.param(".5M", id="no-leading-digit"),
    ],
)
def test_parse_size_bad(value: object) -> None:
    with pytest.raises(ValueError, match="a size such as"):
        parse_size(value)


@pytest.mark.parametrize(
    "value",
    [pytest.param("1" * 400, id="400-digits"), pytest.param("1" + "0" * 308 + "T", id="1e308T")],
)
def test_parse_size_rejects_overflowing_number_with_valueerror(value: str) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


# -- parse_duration --------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("5s", 5.0, id="seconds"),
        pytest.param("250ms", 0.25, id="milliseconds"),
        pytest.param("2m", 120.0, id="minutes"),
        pytest.param("1h", 3600.0, id="hours"),
        pytest.param("100us", 1e-4, id="microseconds"),
        pytest.param("1.5s", 1.5, id="fractional-seconds"),
        pytest.param(" 5 s ", 5.0, id="spaces"),
        pytest.param("168h", MAX_DURATION, id="exactly-a-week"),
        pytest.param(5, 5.0, id="int-seconds"),
        pytest.param(0.5, 0.5, id="float-seconds"),
        pytest.param(MAX_DURATION, MAX_DURATION, id="number-exactly-a-week"),
    ],
)
def test_parse_duration_good(value: object, expected: float) -> None:
    got = parse_duration(value)
    assert isinstance(got, float)
    assert got == pytest.approx(expected)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("5 parsecs", id="unknown-unit"),
        pytest.param("5", id="string-without-unit"),
        pytest.param("5S", id="unit-upper-case"),
        pytest.param("8d", id="days-not-a-unit"),
        pytest.param("5sec", id="spelled-unit"),
        pytest.param("0", id="zero-string"),
        pytest.param("0s", id="zero-seconds"),
        pytest.param(0, id="zero-int"),
        pytest.param(0.0, id="zero-float"),
        pytest.param(-1, id="negative-int"),
        pytest.param("-1s", id="negative-string"),
        pytest.param("169h", id="more-than-a-week"),
        pytest.param(MAX_DURATION + 1, id="number-more-than-a-week"),
        pytest.param(math.inf, id="inf"),
        pytest.param(math.nan, id="nan"),
        pytest.param(True, id="bool"),
        pytest.param(None, id="none"),
        pytest.param("1e3s", id="exponent"),
        pytest.param("", id="empty"),
        pytest.param("s", id="unit-without-number"),
        pytest.param(["5s"], id="list"),
        pytest.param("1" * 400 + "s", id="400-digit-seconds"),
    ],
)
def test_parse_duration_bad(value: object) -> None:
    with pytest.raises(ValueError, match="a duration such as"):
        parse_duration(value)


def test_parse_duration_rejects_huge_int_with_valueerror() -> None:
    with pytest.raises(ValueError):
        parse_duration(10**400)


# -- format_size / format_duration -----------------------------------------------------------

@pytest.mark.parametrize(
    ("size", "expected"),
    [
        pytest.param(256 * MiB, "256MiB", id="mib"),
        pytest.param(64 * MiB, "64MiB", id="64mib"),
        pytest.param(GiB, "1GiB", id="gib"),
        pytest.param(1025 * GiB, "1025GiB", id="not-a-whole-tib"),
        pytest.param(3 * TiB, "3TiB", id="tib"),
        pytest.param(3 * KiB, "3KiB", id="kib"),
        pytest.param(1536, "1536B", id="not-a-whole-kib"),
        pytest.param(1023, "1023B", id="below-kib"),
        pytest.param(1, "1B", id="one-byte"),
        pytest.param(1024 * TiB, "1024TiB", id="tib-is-the-largest-unit"),
    ],
)
def test_format_size(size: int, expected: str) -> None:
    assert format_size(size) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        pytest.param(5.0, "5s", id="whole-seconds"),
        pytest.param(30.0, "30s", id="thirty-seconds"),
        pytest.param(0.25, "250ms", id="sub-second-as-ms"),
        pytest.param(0.001, "1ms", id="one-ms"),
        pytest.param(1.5, "1.5s", id="fractional-seconds"),
        pytest.param(120.0, "120s", id="minutes-stay-seconds"),
    ],
)
def test_format_duration(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected


@pytest.mark.parametrize("text", ["5s", "250ms", "2m", "1.5s", "168h", "1ms", "999ms"])
def test_format_duration_output_parses_back(text: str) -> None:
    seconds = parse_duration(text)
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["1us", "10000250ms"])
def test_format_duration_is_exact_and_parseable(text: str) -> None:
    seconds = parse_duration(text)
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, rel=1e-12)


# -- properties ------------------------------------------------------------------------------

@given(st.integers(min_value=1, max_value=MAX_SIZE // KiB), st.sampled_from(["KiB", "k", "K"]))
@settings(max_examples=300, deadline=None)
def test_format_size_round_trips_multiples_of_kib(kib: int, unit: str) -> None:
    size = parse_size(f"{kib}{unit}")
    assert size == kib * KiB
    text = format_size(size)
    assert parse_size(text) == size
    # Canonical: formatting what it printed gives the same spelling, with the largest unit.
    assert format_size(parse_size(text)) == text
    number = int(text.rstrip("KMGTiB"))
    assert text.endswith("TiB") or number % 1024 != 0


@given(st.integers(min_value=1, max_value=MAX_SIZE))
@settings(max_examples=300, deadline=None)
def test_format_size_is_exact_for_any_size(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(st.text(max_size=30))
@settings(max_examples=300, deadline=None)
def test_parse_size_and_duration_raise_only_valueerror(text: str) -> None:
    for parse in (parse_size, parse_duration):
        try:
            value = parse(text)
        except ValueError:
            continue
        assert value > 0
