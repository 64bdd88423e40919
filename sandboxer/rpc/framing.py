"""NDJSON framing and JSON-RPC 2.0 message shapes (DESIGN section 7).

One JSON object per line, UTF-8, ``\\n``-terminated. The frame limit is enforced while
reading: a peer that sends more than ``max_frame`` bytes without a newline is cut off as soon
as the limit is passed, not after it has made us buffer the whole thing.

Transport-free: no sockets or event loops here, so the host side (asyncio) and the plugin
side (threads) share exactly one parser. Everything a peer sends is untrusted; every check
raises ProtocolError naming what was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import _json
from ..errors import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    ProtocolError,
)
from . import DEFAULT_MAX_FRAME

# typing only for the type checker: the plugin host starts without it (docs/architecture.md)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "DEFAULT_MAX_FRAME",
    "PARSE_ERROR",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "INVALID_PARAMS",
    "INTERNAL_ERROR",
    "LineBuffer",
    "Request",
    "Response",
    "Notification",
    "parse_message",
    "encode_request",
    "encode_notification",
    "encode_result",
    "encode_error",
]

# The JSON-RPC error codes are re-exported from sandboxer.errors, DEFAULT_MAX_FRAME from
# sandboxer.rpc.


class LineBuffer:
    """Splits a byte stream into lines, refusing any line longer than ``max_frame``."""

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held so far."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Complete lines in ``data`` (without their newline); keeps the incomplete rest.

        Linear in the bytes fed: a large frame arriving in many chunks is appended, never
        re-scanned or re-copied per chunk.
        """
        buf, limit = self._buf, self.max_frame
        newline = data.find(b"\n")
        if 0 <= newline == len(data) - 1 and not buf and newline <= limit:
            return [data[:-1]]  # the common case: exactly one whole frame
        if newline < 0:
            if len(buf) + len(data) > limit:
                raise ProtocolError(
                    f"more than {limit} bytes without a newline: frame over the limit"
                )
            buf += data
            return []
        if buf:
            buf += data[:newline]
            lines = [bytes(buf)]
            buf.clear()
            lines += data[newline + 1 :].split(b"\n")
        else:
            lines = data.split(b"\n")
        rest = lines.pop()
        for line in lines:
            if len(line) > limit:
                raise ProtocolError(f"frame of {len(line)} bytes is over the {limit}-byte limit")
        if len(rest) > limit:
            raise ProtocolError(f"more than {limit} bytes without a newline: frame over the limit")
        buf += rest
        return lines


@dataclass(slots=True)
class Request:
    id: int | str
    method: str
    params: Any


@dataclass(frozen=True, slots=True)
class Notification:
    method: str
    params: Any


@dataclass(frozen=True, slots=True)
class Response:
    id: int | str | None
    result: Any = None
    error: dict[str, Any] | None = None


Message = Request | Notification | Response


def _check_id(value: Any) -> int | str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ProtocolError(f"id must be a number or string, not {type(value).__name__}")
    return value


def parse_message(line: bytes) -> Message:
    """One line → one JSON-RPC message, or ProtocolError saying what is wrong with it."""
    try:
        obj = _json.loads(line)
    except _json.JSONError as exc:
        preview = line[:80].decode("utf-8", "replace")
        raise ProtocolError(f"invalid JSON ({exc}) in frame starting {preview!r}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"a frame must be a JSON object, not {type(obj).__name__}")
    if obj.get("jsonrpc") != "2.0":
        raise ProtocolError('a frame must carry "jsonrpc": "2.0"')
    if "method" in obj:
        method = obj["method"]
        if not isinstance(method, str):
            raise ProtocolError("method must be a string")
        params = obj.get("params")
        if params is not None and not isinstance(params, (list, dict)):
            raise ProtocolError("params must be an array or an object")
        if "id" in obj:
            return Request(_check_id(obj["id"]), method, params)
        return Notification(method, params)
    if "id" not in obj:
        raise ProtocolError(
            "a frame must have a method (request, notification) or an id (response)"
        )
    has_result, has_error = "result" in obj, "error" in obj
    if has_result == has_error:
        raise ProtocolError(
            "a response must have exactly one of result and error"
            + (", not both" if has_result else "")
        )
    rid = obj["id"]
    if rid is not None:
        rid = _check_id(rid)
    if has_error:
        error = obj["error"]
        if (
            not isinstance(error, dict)
            or isinstance(error.get("code"), bool)
            or not isinstance(error.get("code"), int)
            or not isinstance(error.get("message"), str)
        ):
            raise ProtocolError("error must be an object with an integer code and a string message")
        return Response(rid, error=error)
    return Response(rid, result=obj["result"])


def encode_request(id: int | str, method: str, params: Any) -> bytes:
    return _json.dumps({"jsonrpc": "2.0", "id": id, "method": method, "params": params}) + b"\n"


def encode_notification(method: str, params: Any) -> bytes:
    return _json.dumps({"jsonrpc": "2.0", "method": method, "params": params}) + b"\n"


def encode_result(id: int | str | None, result: Any) -> bytes:
    return _json.dumps({"jsonrpc": "2.0", "id": id, "result": result}) + b"\n"


def encode_error(id: int | str | None, code: int, message: str, data: Any = None) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return _json.dumps({"jsonrpc": "2.0", "id": id, "error": error}) + b"\n"
