"""JSON as sandboxer moves it: orjson, with bytes as base64 strings (DESIGN section 3).

Every value that crosses into or out of a plugin goes through ``normalize`` (in-process) or
``dumps``/``loads`` (on the wire), so an in-process plugin sees and returns exactly what an
out-of-process one would: no shared mutable objects, no sets or custom classes.
"""

from __future__ import annotations

import orjson

# typing only for the type checker: the plugin host starts without it (docs/architecture.md)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["dumps", "loads", "normalize", "JSONError"]

JSONError = orjson.JSONDecodeError
_OPTIONS = orjson.OPT_NON_STR_KEYS


def _default(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        import base64  # only when bytes are sent: not at every plugin's start

        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (set, frozenset)):
        raise TypeError("a set is not a JSON value; return a list")
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def dumps(value: Any) -> bytes:
    """Serialise; TypeError (orjson.JSONEncodeError) names the first value JSON cannot carry."""
    return orjson.dumps(value, default=_default, option=_OPTIONS)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    return orjson.loads(data)


def normalize(value: Any) -> Any:
    """The value after a trip over the wire: a deep copy made only of JSON types."""
    return orjson.loads(dumps(value))
