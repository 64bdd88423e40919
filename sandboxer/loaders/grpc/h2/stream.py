"""One call's stream: its flow-control windows and its response read as gRPC frames it.

A gRPC unary response is HEADERS (``:status`` 200, a gRPC content-type), one length-prefixed
message in DATA, and trailers carrying grpc-status; or a trailers-only HEADERS. ``Stream`` checks
each part as it arrives and says what is wrong as a ``GrpcStatusError`` for the call; it never
buffers more than one message of at most ``max_message`` bytes. ``validate_headers`` refuses
header lists RFC 9113 calls malformed; those are the connection's problem (``H2Error``).
"""

from __future__ import annotations

import asyncio
import math

from .frames import ErrorCode, H2Error
from .status import GrpcStatusError, StatusCode, decode_grpc_message, status_for_http

__all__ = ["STREAM_WINDOW", "Stream", "grpc_timeout", "validate_headers"]

STREAM_WINDOW = 1 << 18  # our INITIAL_WINDOW_SIZE: what the server may send a stream unasked
PREFIX = 5  # gRPC's message prefix: compressed flag, 4-byte big-endian length
_FORBIDDEN = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


class Stream:
    """One call's stream: windows both ways, the request body still to send, the response."""

    __slots__ = (
        "buffer",
        "done",
        "headers",
        "id",
        "message",
        "pending",
        "recv_window",
        "send_window",
        "timer",
        "unacked",
    )

    def __init__(self, stream_id: int, done: asyncio.Future[bytes], send_window: int) -> None:
        self.id = stream_id
        self.done = done
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW
        self.unacked = 0  # received bytes not yet given back by WINDOW_UPDATE
        self.headers = False  # the response's HEADERS arrived
        self.buffer = bytearray()  # the response message so far
        self.pending = bytearray()  # the request body the windows have not let through yet
        self.message: bytes | None = None
        self.timer: asyncio.TimerHandle | None = None

    def take(self, data: bytes, max_message: int) -> GrpcStatusError | None:
        """DATA's bytes: one message, its 5-byte prefix checked as soon as it is in."""
        if not data:
            return None
        if self.message is not None:
            return GrpcStatusError(StatusCode.INTERNAL, "two response messages for a unary call")
        buffer = self.buffer
        buffer += data
        if len(buffer) < PREFIX:
            return None
        flag = buffer[0]
        length = int.from_bytes(buffer[1:PREFIX], "big")
        if flag:
            return GrpcStatusError(
                StatusCode.INTERNAL,
                f"a response message with flag {flag} (compressed): we accept identity only",
            )
        if length > max_message:
            return GrpcStatusError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"a response message of {length} bytes (the limit is {max_message})",
            )
        if len(buffer) > PREFIX + length:
            return GrpcStatusError(StatusCode.INTERNAL, "two response messages for a unary call")
        if len(buffer) == PREFIX + length:
            self.message = bytes(buffer[PREFIX:])
            buffer.clear()
        return None

    def head(self, fields: dict[bytes, bytes]) -> GrpcStatusError | None:
        """The response's first HEADERS: HTTP status, content-type, encoding."""
        self.headers = True
        status = fields[b":status"]
        if status != b"200":
            code = status_for_http(int(status))
            return GrpcStatusError(code, f"HTTP status {status.decode()}")
        content_type = fields.get(b"content-type", b"")
        if not content_type.startswith(b"application/grpc"):
            shown = content_type.decode(errors="replace")
            return GrpcStatusError(StatusCode.UNKNOWN, f"content-type {shown!r} is not gRPC's")
        encoding = fields.get(b"grpc-encoding", b"identity")
        if encoding != b"identity":
            shown = encoding.decode(errors="replace")
            return GrpcStatusError(
                StatusCode.INTERNAL, f"grpc-encoding {shown!r}: we accept identity only"
            )
        return None

    def outcome(self, trailers: dict[bytes, bytes]) -> bytes | GrpcStatusError:
        """The call's result, from its trailers and the message read."""
        raw = trailers.get(b"grpc-status")
        if raw is None:
            return GrpcStatusError(StatusCode.INTERNAL, "the response has no grpc-status")
        if not raw.isdigit() or len(raw) > 3:
            shown = raw.decode(errors="replace")
            return GrpcStatusError(StatusCode.INTERNAL, f"grpc-status {shown!r}")
        code = int(raw)
        if code:
            return GrpcStatusError(code, decode_grpc_message(trailers.get(b"grpc-message", b"")))
        if self.buffer:
            return GrpcStatusError(StatusCode.INTERNAL, "the response message was cut short")
        if self.message is None:
            return GrpcStatusError(StatusCode.INTERNAL, "status OK but no response message")
        return self.message


def grpc_timeout(seconds: float) -> bytes:
    """The grpc-timeout value: at most 8 digits, rounded up, in the finest unit that fits."""
    for unit, scale in ((b"u", 1e6), (b"m", 1e3), (b"S", 1.0), (b"M", 1 / 60), (b"H", 1 / 3600)):
        value = math.ceil(seconds * scale)
        if value < 100_000_000:
            return str(value).encode() + unit
    return b"99999999H"


def validate_headers(headers: list[tuple[bytes, bytes]], *, trailers: bool) -> dict[bytes, bytes]:
    """A response's header list as a dict, malformed ones (RFC 9113 8.2, 8.3.2) refused."""
    fields: dict[bytes, bytes] = {}
    regular = False
    for name, value in headers:
        if name[:1] == b":":
            if trailers or regular or name != b":status" or name in fields:
                raise H2Error(ErrorCode.PROTOCOL_ERROR, f"pseudo-header {name!r} misplaced")
            if len(value) != 3 or not value.isdigit():
                raise H2Error(ErrorCode.PROTOCOL_ERROR, f":status {value!r}")
        else:
            regular = True
            if not name or name.lower() != name or name in _FORBIDDEN:
                raise H2Error(ErrorCode.PROTOCOL_ERROR, f"header name {name!r}")
        fields[name] = value
    if not trailers and b":status" not in fields:
        raise H2Error(ErrorCode.PROTOCOL_ERROR, "a response without :status")
    return fields
