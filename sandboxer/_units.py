"""Parsing of the human units used in manifests, host config and the CLI: sizes, durations.

Only parsing; no policy. Every function raises ValueError with a short "expected ..." text
that the caller wraps into the error naming its file and field.
"""

from __future__ import annotations

import math
import re

# Binary units for the single letters and the IEC names, as cgroups, Docker and systemd read
# "512M"; decimal only where the SI name is spelled out ("500MB").
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 10**3,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
}
_SIZE_RE = re.compile(r"\s*([0-9]{1,20}(?:\.[0-9]{1,20})?)\s*([a-zA-Z]*)\s*", re.ASCII)
MAX_SIZE = 1 << 50  # 1 PiB: anything above is a typo, not a limit

_DURATION_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "us": 1e-6}
_DURATION_RE = re.compile(r"\s*([0-9]{1,20}(?:\.[0-9]{1,20})?)\s*(us|ms|s|m|h)\s*", re.ASCII)
MAX_DURATION = 7 * 24 * 3600.0

SIZE_EXPECTED = 'a size such as "64MiB", "512M", "1G" or a number of bytes'
DURATION_EXPECTED = 'a duration such as "5s", "250ms", "2m" or a number of seconds'


def parse_size(value: object) -> int:
    """Bytes from ``"64MiB"``, ``"512M"``, ``"1.5G"``, ``"100MB"`` or an int; > 0."""
    if isinstance(value, bool):
        raise ValueError(f"{SIZE_EXPECTED}, not a boolean")
    if isinstance(value, int):
        size = value  # exact: Python ints never overflow, the range check below bounds it
    elif isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _SIZE_UNITS:
            raise ValueError(f"{SIZE_EXPECTED}, not {value!r}")
        size = math.floor(float(m.group(1)) * _SIZE_UNITS[unit])
    else:
        raise ValueError(f"{SIZE_EXPECTED}, not {type(value).__name__}")
    if size <= 0 or size > MAX_SIZE:
        raise ValueError(f"{SIZE_EXPECTED} between 1 byte and 1PiB, not {value!r}")
    return size


def parse_duration(value: object) -> float:
    """Seconds from ``"5s"``, ``"250ms"``, ``"2m"``, ``"1h"`` or a number; > 0, <= 1 week."""
    if isinstance(value, bool):
        raise ValueError(f"{DURATION_EXPECTED}, not a boolean")
    if isinstance(value, int) and abs(value) > MAX_DURATION:
        raise ValueError(f"{DURATION_EXPECTED}, at most a week, not {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.fullmatch(value)
        if m is None:
            raise ValueError(f"{DURATION_EXPECTED}, not {value!r}")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"{DURATION_EXPECTED}, not {type(value).__name__}")
    if not math.isfinite(seconds) or seconds <= 0 or seconds > MAX_DURATION:
        raise ValueError(f"{DURATION_EXPECTED}, more than 0 and at most a week, not {value!r}")
    return seconds


def format_size(size: int) -> str:
    """The shortest exact binary spelling: 268435456 -> "256MiB"."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def format_duration(seconds: float) -> str:
    """An exact spelling that parse_duration reads back: 30 -> "30s", 0.25 -> "250ms"."""
    if seconds < 1:
        for unit, factor in (("ms", 1e-3), ("us", 1e-6)):
            count = seconds / factor
            if count >= 1 and abs(count - round(count)) < 1e-9 * count:
                return f"{round(count)}{unit}"
    # Decimal seconds, never exponent notation; nine places keep nanoseconds.
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"
