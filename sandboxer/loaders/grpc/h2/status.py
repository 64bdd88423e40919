"""gRPC's status codes and the two ways a call over h2 fails, with the spec's mappings.

``GrpcStatusError``: the call ended with a non-zero status (the server's trailers, an HTTP status
or RST_STREAM code mapped as grpc's PROTOCOL-HTTP2.md and http-grpc-status-mapping.md say, or
our own deadline and limits). ``ConnectionLost``: the connection under the call is gone (closed,
refused by GOAWAY, or ended by us because the server broke HTTP/2: ``ProtocolViolation``).
The loader (loader.py, GrpcHandle._call_error) maps them onto sandboxer's error tree.
"""

from __future__ import annotations

import enum
from urllib.parse import unquote_to_bytes

from .frames import ErrorCode

__all__ = [
    "StatusCode",
    "GrpcStatusError",
    "ConnectionLost",
    "ProtocolViolation",
    "status_for_reset",
    "status_for_http",
    "decode_grpc_message",
]


class StatusCode(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class GrpcStatusError(Exception):
    """A call that ended with a non-zero gRPC status."""

    def __init__(self, code: int, message: str) -> None:
        try:
            name = StatusCode(code).name
        except ValueError:
            name = f"CODE_{code}"
        super().__init__(f"{name}: {message}")
        self.code = code
        self.name = name
        self.message = message


class ConnectionLost(Exception):
    """The HTTP/2 connection under a call is gone; the call may or may not have run."""


class ProtocolViolation(ConnectionLost):
    """We ended the connection because the server broke HTTP/2, HPACK or gRPC framing."""

    def __init__(self, message: str, code: ErrorCode) -> None:
        super().__init__(message)
        self.code = code


# PROTOCOL-HTTP2.md, "Errors": RST_STREAM codes the client sees, as a status.
_RESET: dict[int, StatusCode] = {
    ErrorCode.REFUSED_STREAM: StatusCode.UNAVAILABLE,
    ErrorCode.CANCEL: StatusCode.CANCELLED,
    ErrorCode.ENHANCE_YOUR_CALM: StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.INADEQUATE_SECURITY: StatusCode.PERMISSION_DENIED,
}
# http-grpc-status-mapping.md: a response without grpc-status, by its HTTP status.
_HTTP: dict[int, StatusCode] = {
    400: StatusCode.INTERNAL,
    401: StatusCode.UNAUTHENTICATED,
    403: StatusCode.PERMISSION_DENIED,
    404: StatusCode.UNIMPLEMENTED,
    429: StatusCode.UNAVAILABLE,
    502: StatusCode.UNAVAILABLE,
    503: StatusCode.UNAVAILABLE,
    504: StatusCode.UNAVAILABLE,
}


def status_for_reset(code: int) -> StatusCode:
    return _RESET.get(code, StatusCode.INTERNAL)


def status_for_http(status: int) -> StatusCode:
    return _HTTP.get(status, StatusCode.UNKNOWN)


def decode_grpc_message(raw: bytes) -> str:
    """grpc-message is percent-encoded UTF-8; a bad escape or bad UTF-8 is kept, not fatal."""
    return unquote_to_bytes(raw).decode("utf-8", errors="replace")
