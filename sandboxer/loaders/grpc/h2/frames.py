"""HTTP/2 frames (RFC 9113 sections 4 and 6): their codes, their layout, reading and writing.

``FrameReader`` cuts a byte stream into frames and checks only what does not depend on the
connection's state: the frame header, the size limit we advertised, and each type's fixed
layout (lengths, stream 0 or not, padding). What a frame means for the connection is
channel.py's. Every violation is an ``H2Error`` carrying the RFC's error code; the reader never
buffers more than one frame beyond what it was given.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

__all__ = [
    "PREFACE",
    "FrameType",
    "Flag",
    "ErrorCode",
    "Setting",
    "H2Error",
    "Frame",
    "FrameReader",
    "frame",
    "settings_frame",
    "window_update_frame",
    "rst_stream_frame",
    "goaway_frame",
    "DEFAULT_MAX_FRAME_SIZE",
    "MAX_FRAME_SIZE_LIMIT",
    "MAX_WINDOW",
    "DEFAULT_WINDOW",
    "HEADER_SIZE",
    "parse_settings",
    "parse_u32",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # the client connection preface (3.4)
HEADER_SIZE = 9
DEFAULT_MAX_FRAME_SIZE = 16384  # 2^14, also the least a peer may set
MAX_FRAME_SIZE_LIMIT = (1 << 24) - 1
MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65535

_HEADER = struct.Struct(">IBI")  # (24-bit length << 8 | type), flags, stream
_U32 = struct.Struct(">I")
_SETTING = struct.Struct(">HI")
_GOAWAY = struct.Struct(">II")


class FrameType(enum.IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class Flag:
    """Frame flags, plain ints: they are tested on every frame (enum.IntFlag's ``&`` is a
    Python-level call)."""

    END_STREAM = 0x1
    ACK = 0x1  # SETTINGS and PING
    END_HEADERS = 0x4
    PADDED = 0x8
    PRIORITY = 0x20


class ErrorCode(enum.IntEnum):
    """RFC 9113 section 7."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD

    @classmethod
    def describe(cls, code: int) -> str:
        try:
            return cls(code).name
        except ValueError:
            return f"unknown error code {code:#x}"


class Setting(enum.IntEnum):
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


class H2Error(Exception):
    """A connection error (RFC 9113 5.4.1): what the server did and the code to send it."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{message} ({code.name})")
        self.code = code


_TYPES = tuple(FrameType)  # by code: 0-9, no gaps

# The fixed lengths of the control frames, and whether each lives on stream 0.
_FIXED_LENGTH = {
    FrameType.PRIORITY: 5,
    FrameType.RST_STREAM: 4,
    FrameType.PING: 8,
    FrameType.WINDOW_UPDATE: 4,
}
_CONNECTION_ONLY = frozenset({FrameType.SETTINGS, FrameType.PING, FrameType.GOAWAY})
_STREAM_ONLY = frozenset(
    {
        FrameType.DATA,
        FrameType.HEADERS,
        FrameType.PRIORITY,
        FrameType.RST_STREAM,
        FrameType.PUSH_PROMISE,
        FrameType.CONTINUATION,
    }
)


class Frame(NamedTuple):
    """One frame; ``payload`` with padding and the priority block already taken off."""

    type: int  # a FrameType, or an unknown type to ignore
    flags: int
    stream: int
    payload: bytes
    length: int  # the frame's whole payload length, padding included (flow control counts it)


def _unpad(type_: FrameType, flags: int, payload: bytes) -> bytes:
    """DATA and HEADERS without their padding (6.1, 6.2) and HEADERS' priority block."""
    start, end = 0, len(payload)
    if flags & Flag.PADDED:
        if not payload:
            raise H2Error(ErrorCode.FRAME_SIZE_ERROR, f"a padded {type_.name} frame is empty")
        start = 1
        end -= payload[0]
    if type_ is FrameType.HEADERS and flags & Flag.PRIORITY:
        start += 5
    if start > end:
        raise H2Error(
            ErrorCode.PROTOCOL_ERROR, f"a {type_.name} frame's padding is longer than the frame"
        )
    return payload[start:end]


def _check(type_: FrameType, flags: int, stream: int, payload: bytes) -> None:
    if type_ in _CONNECTION_ONLY and stream != 0:
        raise H2Error(ErrorCode.PROTOCOL_ERROR, f"{type_.name} on stream {stream}, not 0")
    if type_ in _STREAM_ONLY and stream == 0:
        raise H2Error(ErrorCode.PROTOCOL_ERROR, f"{type_.name} on stream 0")
    fixed = _FIXED_LENGTH.get(type_)
    if fixed is not None and len(payload) != fixed:
        raise H2Error(
            ErrorCode.FRAME_SIZE_ERROR,
            f"a {type_.name} frame of {len(payload)} bytes (it is {fixed})",
        )
    if type_ is FrameType.SETTINGS:
        if flags & Flag.ACK and payload:
            raise H2Error(ErrorCode.FRAME_SIZE_ERROR, "a SETTINGS acknowledgement with a payload")
        if len(payload) % _SETTING.size:
            raise H2Error(
                ErrorCode.FRAME_SIZE_ERROR, f"a SETTINGS frame of {len(payload)} bytes (not 6n)"
            )
    if type_ is FrameType.GOAWAY and len(payload) < _GOAWAY.size:
        raise H2Error(ErrorCode.FRAME_SIZE_ERROR, f"a GOAWAY frame of {len(payload)} bytes")


class FrameReader:
    """Frames out of a byte stream, each checked against our MAX_FRAME_SIZE and its layout."""

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """The frames completed by ``data``; a partial frame stays buffered (at most one
        frame's worth: the length is checked as soon as the header is in)."""
        buffer = self._buffer
        buffer += data
        frames: list[Frame] = []
        pos = 0
        available = len(buffer)
        while available - pos >= HEADER_SIZE:
            word, flags, stream = _HEADER.unpack_from(buffer, pos)
            length = word >> 8
            type_code = word & 0xFF
            if length > self.max_frame_size:
                raise H2Error(
                    ErrorCode.FRAME_SIZE_ERROR,
                    f"a frame of {length} bytes (our MAX_FRAME_SIZE is {self.max_frame_size})",
                )
            end = pos + HEADER_SIZE + length
            if end > available:
                break
            payload = bytes(buffer[pos + HEADER_SIZE : end])
            pos = end
            stream &= MAX_WINDOW  # the reserved bit is ignored (4.1)
            if type_code >= len(_TYPES):
                frames.append(Frame(type_code, flags, stream, b"", length))  # to be ignored
                continue
            type_ = _TYPES[type_code]
            _check(type_, flags, stream, payload)
            if type_ is FrameType.DATA or type_ is FrameType.HEADERS:
                payload = _unpad(type_, flags, payload)
            frames.append(Frame(type_, flags, stream, payload, length))
        if pos:
            del buffer[:pos]
        return frames


def frame(type_: FrameType, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack(len(payload) << 8 | type_, flags, stream) + payload


def settings_frame(settings: dict[Setting, int]) -> bytes:
    payload = b"".join(_SETTING.pack(key, value) for key, value in settings.items())
    return frame(FrameType.SETTINGS, 0, 0, payload)


def window_update_frame(stream: int, increment: int) -> bytes:
    return frame(FrameType.WINDOW_UPDATE, 0, stream, _U32.pack(increment))


def rst_stream_frame(stream: int, code: ErrorCode) -> bytes:
    return frame(FrameType.RST_STREAM, 0, stream, _U32.pack(code))


def goaway_frame(last_stream: int, code: ErrorCode, debug: bytes = b"") -> bytes:
    return frame(FrameType.GOAWAY, 0, 0, _GOAWAY.pack(last_stream, code) + debug)


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    return [_SETTING.unpack_from(payload, at) for at in range(0, len(payload), _SETTING.size)]


def parse_u32(payload: bytes, at: int = 0) -> int:
    value: int = _U32.unpack_from(payload, at)[0]
    return value
