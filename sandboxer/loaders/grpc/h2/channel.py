"""``H2Channel``: gRPC unary calls over one HTTP/2 connection, as an asyncio protocol.

A client of RFC 9113 for exactly what gRPC unary calls need: the preface and SETTINGS, odd
streams opened by HEADERS (+CONTINUATION) and one DATA with END_STREAM, flow control both ways,
PING, GOAWAY and RST_STREAM, and the response read as HEADERS, one length-prefixed message,
trailers. No TLS, no push, no priorities, no compression.

The server is untrusted (a sandboxed plugin). Anything it sends that HTTP/2 or HPACK forbids ends
the connection: a GOAWAY with the RFC's code, then every pending call fails with
``ProtocolViolation`` naming what it did. What gRPC forbids inside one response (a bad status, a
missing grpc-status, two messages, a compressed or oversized message) fails that call alone and
resets its stream. Memory is bounded by our own advertisements: one frame (MAX_FRAME_SIZE), one
header block (MAX_HEADER_LIST_SIZE), one message per stream (``max_message``), the bytes of
control frames we owe an unread peer. A call given a deadline never waits past it (the local
timer resets the stream whatever the server does); one without waits as long as the server.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import cast

from .frames import (
    DEFAULT_MAX_FRAME_SIZE,
    DEFAULT_WINDOW,
    MAX_FRAME_SIZE_LIMIT,
    MAX_WINDOW,
    PREFACE,
    ErrorCode,
    Flag,
    Frame,
    FrameReader,
    FrameType,
    H2Error,
    Setting,
    frame,
    goaway_frame,
    parse_settings,
    parse_u32,
    rst_stream_frame,
    settings_frame,
    window_update_frame,
)
from .hpack import TABLE_SIZE_ZERO, Decoder, HpackError, encode_indexed, encode_literal
from .status import (
    ConnectionLost,
    GrpcStatusError,
    ProtocolViolation,
    StatusCode,
    status_for_reset,
)
from .stream import PREFIX, STREAM_WINDOW, Stream, grpc_timeout, validate_headers

__all__ = ["H2Channel", "ChannelStatistics", "DEFAULT_MAX_MESSAGE"]

DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024  # grpcio's default receive limit
CONNECTION_WINDOW = 1 << 20  # our connection receive window
MAX_HEADER_LIST = 16384  # our MAX_HEADER_LIST_SIZE (decoded); also bounds one header block
MAX_OWED = 1 << 20  # control frames we may owe a peer that does not read before we give up
# Our DATA frames stay small whatever the server allows, so a request never fills the write
# buffer past its high-water mark by more than a frame: what stays there is control frames.
MAX_DATA_FRAME = 1 << 16
_SETTINGS = {
    Setting.ENABLE_PUSH: 0,
    Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
    Setting.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
}


@dataclass(frozen=True, slots=True)
class ChannelStatistics:
    calls: int  # started
    failures: int  # ended with an exception of any kind
    in_flight: int
    peak_in_flight: int
    protocol_error: str | None  # why the connection ended, if we ended it


class H2Channel(asyncio.Protocol):
    """One HTTP/2 connection to a gRPC server over a Unix socket (``connect()``)."""

    def __init__(self, *, max_message: int, authority: bytes) -> None:
        self._loop = asyncio.get_running_loop()
        self._max_message = max_message
        self._authority = authority
        self._transport: asyncio.Transport | None = None
        self._reader = FrameReader(DEFAULT_MAX_FRAME_SIZE)
        self._decoder = Decoder(max_header_list_size=MAX_HEADER_LIST)
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._streams: dict[int, Stream] = {}
        self._next_id = 1
        self._last_id = 0  # the highest stream we opened: above it, streams are idle
        self._settings_seen = False
        self._peer_max_frame = DEFAULT_MAX_FRAME_SIZE
        self._data_frame = DEFAULT_MAX_FRAME_SIZE  # the DATA we write at once
        self._peer_window = DEFAULT_WINDOW  # the server's INITIAL_WINDOW_SIZE
        self._peer_max_streams = MAX_WINDOW
        self._peer_max_headers = MAX_WINDOW
        self._send_window = DEFAULT_WINDOW  # connection-level, towards the server
        self._recv_window = CONNECTION_WINDOW
        self._recv_unacked = 0
        self._continuation: tuple[int, int, bytearray] | None = None  # stream, flags, block
        self._goaway: int | None = None  # the server's last-stream-id, once it said GOAWAY
        self._error: ConnectionLost | None = None
        self._paused = False
        self._senders: list[asyncio.Future[None]] = []  # waiting for window or writability
        self._slots: deque[asyncio.Future[None]] = deque()  # waiting for a stream slot
        self._prefixes: dict[str, tuple[bytes, int]] = {}  # path -> header block, list size
        self._calls = self._failures = self._peak = 0
        self._out: list[bytes] = []  # frames for the next write (``_flush``)
        self._owed = 0  # bytes of control frames queued since the transport paused

    # -- the public surface --------------------------------------------------------------
    @classmethod
    async def connect(
        cls,
        path: str,
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
        timeout: float = 10.0,
        authority: str = "localhost",
    ) -> H2Channel:
        """Connect to the Unix socket at ``path`` and wait for the server's SETTINGS."""
        loop = asyncio.get_running_loop()
        channel = cls(max_message=max_message, authority=authority.encode())
        try:
            await loop.create_unix_connection(lambda: channel, path)
        except OSError as exc:
            raise ConnectionLost(f"cannot connect to {path}: {exc}") from exc
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(channel._ready)
        except TimeoutError:
            await channel.close()
            raise ConnectionLost(f"{path}: no SETTINGS from the server in {timeout} s") from None
        except BaseException:
            await channel.close()
            raise
        return channel

    async def unary(self, path: str, request: bytes, timeout: float | None = None) -> bytes:
        """Call the unary method ``path`` ("/pkg.Service/Method") with a serialized request."""
        if timeout is not None and timeout <= 0:
            raise GrpcStatusError(StatusCode.DEADLINE_EXCEEDED, "the deadline had passed")
        if len(request) > self._max_message:
            raise GrpcStatusError(
                StatusCode.RESOURCE_EXHAUSTED,
                f"a request of {len(request)} bytes (the limit is {self._max_message})",
            )
        deadline = None if timeout is None else self._loop.time() + timeout
        while len(self._streams) >= self._peer_max_streams and self._error is None:
            waiter = self._loop.create_future()
            self._slots.append(waiter)
            try:
                await self._until(waiter, deadline)
            finally:
                if waiter in self._slots:
                    self._slots.remove(waiter)
        stream = self._open(path, request, deadline)
        try:
            if stream.pending:
                await self._send_body(stream)
            return await stream.done
        except asyncio.CancelledError:
            self._reset(stream, ErrorCode.CANCEL, None)
            raise
        except BaseException:
            self._failures += 1
            raise
        finally:
            if stream.timer is not None:
                stream.timer.cancel()

    async def close(self) -> None:
        """Say GOAWAY, fail what is pending, close the socket; twice is fine."""
        if self._error is None:
            self._end(ConnectionLost("the channel was closed"), ErrorCode.NO_ERROR)
        try:
            async with asyncio.timeout(1.0):
                await asyncio.shield(self._closed)
        except TimeoutError:
            if self._transport is not None:
                self._transport.abort()

    def statistics(self) -> ChannelStatistics:
        error = self._error
        return ChannelStatistics(
            calls=self._calls,
            failures=self._failures,
            in_flight=len(self._streams),
            peak_in_flight=self._peak,
            protocol_error=str(error) if isinstance(error, ProtocolViolation) else None,
        )

    # -- opening a stream and sending the request -----------------------------------------
    def _request_headers(self, path: str) -> tuple[bytes, int]:
        cached = self._prefixes.get(path)
        if cached is None:
            if len(self._prefixes) >= 1024:
                self._prefixes.clear()  # a cache of the caller's paths, not a growing one
            fields = (
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path.encode()),
                (b":authority", self._authority),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                (b"grpc-accept-encoding", b"identity"),
            )
            block = (
                TABLE_SIZE_ZERO
                + encode_indexed(3)  # :method POST
                + encode_indexed(6)  # :scheme http
                + encode_literal(4, fields[2][1])  # :path
                + encode_literal(1, self._authority)  # :authority
                + encode_literal(31, b"application/grpc")  # content-type
                + encode_literal(b"te", b"trailers")
                + encode_literal(b"grpc-accept-encoding", b"identity")
            )
            size = sum(len(name) + len(value) + 32 for name, value in fields)
            cached = self._prefixes[path] = (block, size)
        return cached

    def _open(self, path: str, request: bytes, deadline: float | None) -> Stream:
        """Allocate the stream and write HEADERS (and the body, when the windows allow it)
        in one step: streams must open in the order of their ids."""
        if self._error is not None:
            raise self._lost()
        if self._goaway is not None:
            raise ConnectionLost("the server said GOAWAY: the connection takes no new calls")
        stream_id = self._next_id
        if stream_id > MAX_WINDOW:
            raise ConnectionLost("the connection has used all its stream ids: reconnect")
        block, size = self._request_headers(path)
        if deadline is not None:
            value = grpc_timeout(max(deadline - self._loop.time(), 1e-6))
            block += encode_literal(b"grpc-timeout", value)
            size += 12 + len(value) + 32
        if size > self._peer_max_headers:
            raise GrpcStatusError(
                StatusCode.INTERNAL,
                f"the request headers ({size} bytes) exceed the server's limit "
                f"({self._peer_max_headers})",
            )
        self._next_id += 2
        self._last_id = stream_id
        stream = Stream(stream_id, self._loop.create_future(), self._peer_window)
        self._streams[stream_id] = stream
        self._calls += 1
        self._peak = max(self._peak, len(self._streams))
        if deadline is not None:
            stream.timer = self._loop.call_at(deadline, self._expire, stream)
        out = bytearray(self._headers_frames(stream_id, block))
        body = len(request).to_bytes(PREFIX, "big") + request  # flag 0: not compressed
        n = len(body)
        if (
            n <= self._data_frame
            and n <= stream.send_window
            and n <= self._send_window
            and not self._paused
        ):
            out += frame(FrameType.DATA, Flag.END_STREAM, stream_id, body)
            stream.send_window -= n
            self._send_window -= n
        else:
            stream.pending += body  # sent by _send_body as the windows open
        self._write(bytes(out))
        return stream

    def _headers_frames(self, stream_id: int, block: bytes) -> bytes:
        limit = self._peer_max_frame
        if len(block) <= limit:
            return frame(FrameType.HEADERS, Flag.END_HEADERS, stream_id, block)
        parts = [block[at : at + limit] for at in range(0, len(block), limit)]
        out = [frame(FrameType.HEADERS, 0, stream_id, parts[0])]
        out += [frame(FrameType.CONTINUATION, 0, stream_id, part) for part in parts[1:-1]]
        out.append(frame(FrameType.CONTINUATION, Flag.END_HEADERS, stream_id, parts[-1]))
        return b"".join(out)

    async def _send_body(self, stream: Stream) -> None:
        """The rest of a request the windows did not let through at once."""
        body = stream.pending
        while body and not stream.done.done():
            n = min(len(body), self._data_frame, stream.send_window, self._send_window)
            if n <= 0 or self._paused:
                waiter = self._loop.create_future()
                self._senders.append(waiter)
                await waiter
                continue
            flags = Flag.END_STREAM if n == len(body) else 0
            self._write(frame(FrameType.DATA, flags, stream.id, bytes(body[:n])))
            self._flush()  # now: the transport must get the chance to pause us
            del body[:n]
            stream.send_window -= n
            self._send_window -= n

    async def _until(self, waiter: asyncio.Future[None], deadline: float | None) -> None:
        if deadline is None:
            await waiter
            return
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        except TimeoutError:
            raise GrpcStatusError(
                StatusCode.DEADLINE_EXCEEDED, "the deadline passed waiting for a stream slot"
            ) from None
        if self._error is not None:
            raise self._lost()

    # -- ending streams -----------------------------------------------------------------
    def _close_stream(self, stream: Stream) -> None:
        del self._streams[stream.id]
        if stream.timer is not None:
            stream.timer.cancel()
        self._wake_slots()
        if self._senders:
            self._wake_senders()  # its sender may be waiting and must see the stream is over
        if self._goaway is not None and not self._streams:
            self._end(ConnectionLost("the server said GOAWAY"), ErrorCode.NO_ERROR)

    def _finish(self, stream: Stream, result: bytes | BaseException) -> None:
        if stream.id in self._streams:
            if stream.pending and self._error is None:
                # Answered before we sent it all (RFC 9113 8.1): stop, and close our half.
                stream.pending.clear()
                self._write(rst_stream_frame(stream.id, ErrorCode.CANCEL), control=True)
            self._close_stream(stream)
        if not stream.done.done():
            if isinstance(result, BaseException):
                stream.done.set_exception(result)
            else:
                stream.done.set_result(result)

    def _reset(self, stream: Stream, code: ErrorCode, error: BaseException | None) -> None:
        """End a stream from our side: RST_STREAM, and the call fails with ``error``."""
        if stream.id in self._streams and self._error is None:
            stream.pending.clear()
            self._write(rst_stream_frame(stream.id, code), control=True)
        if error is None:
            if stream.id in self._streams:
                self._close_stream(stream)
            if stream.done.done() and not stream.done.cancelled():
                stream.done.exception()  # its outcome lost the race with the cancel: consumed
            stream.done.cancel()
        else:
            self._finish(stream, error)

    def _expire(self, stream: Stream) -> None:
        stream.timer = None
        error = GrpcStatusError(StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed")
        self._reset(stream, ErrorCode.CANCEL, error)

    def _lost(self) -> ConnectionLost:
        """A fresh exception for each call (one shared instance would chain tracebacks)."""
        error = self._error
        if isinstance(error, ProtocolViolation):
            return ProtocolViolation(str(error), error.code)
        return ConnectionLost(str(error))

    def _end(self, error: ConnectionLost, code: ErrorCode) -> None:
        """End the connection: GOAWAY with ``code``, every pending call fails with ``error``."""
        if self._error is not None:
            return
        self._error = error
        transport = self._transport
        if transport is not None and not transport.is_closing():
            debug = str(error).encode()[:256] if code else b""
            transport.write(b"".join(self._out) + goaway_frame(0, code, debug))
            self._out.clear()
            transport.close()
            if transport.get_write_buffer_size() > (MAX_OWED if code == ErrorCode.NO_ERROR else 0):
                transport.abort()  # a server that broke the protocol gets no time to read
        for stream in list(self._streams.values()):
            self._finish(stream, self._lost())
        for waiter in self._slots:
            if not waiter.done():
                waiter.set_result(None)
        self._slots.clear()
        self._wake_senders()
        if not self._ready.done():
            self._ready.set_exception(self._lost())
            self._ready.exception()  # connect() may already have gone: not "never retrieved"

    def _violation(self, exc: H2Error | HpackError) -> None:
        if isinstance(exc, HpackError):
            code, what = ErrorCode.COMPRESSION_ERROR, f"HPACK: {exc}"
        else:
            code, what = exc.code, str(exc)
        self._end(ProtocolViolation(f"the server broke HTTP/2: {what}", code), code)

    # -- the asyncio.Protocol side ------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not asyncio.Transport subclasses, so no isinstance).
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(
            PREFACE
            + settings_frame(_SETTINGS)
            + window_update_frame(0, CONNECTION_WINDOW - DEFAULT_WINDOW)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        why = f": {exc}" if exc is not None else ""
        self._end(ConnectionLost(f"the server closed the connection{why}"), ErrorCode.NO_ERROR)
        if not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._owed = 0
        self._wake_senders()

    def eof_received(self) -> bool | None:
        return None  # close the transport: a half-closed HTTP/2 connection is of no use

    def data_received(self, data: bytes) -> None:
        if self._error is not None:
            return
        try:
            for item in self._reader.feed(data):
                self._frame(item)
                if self._ended():
                    return
        except (H2Error, HpackError) as exc:
            self._violation(exc)

    def _ended(self) -> bool:
        return self._error is not None

    def _write(self, data: bytes, *, control: bool = False) -> None:
        """Queue ``data``; what a turn of the loop queues goes out in one write (64 calls
        opened in one turn cost one syscall, not 64). Control frames (answers the server can
        provoke: acknowledgements, window updates, resets) are counted while the server does
        not read; past ``MAX_OWED`` of them the connection ends."""
        if control and self._paused:
            self._owed += len(data)
            if self._owed > MAX_OWED:
                self._violation(H2Error(ErrorCode.ENHANCE_YOUR_CALM, "the server does not read"))
                return
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        transport = self._transport
        if not out or transport is None or transport.is_closing():
            return
        transport.write(b"".join(out))

    def _wake_slots(self) -> None:
        while self._slots and len(self._streams) < self._peer_max_streams:
            waiter = self._slots.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _wake_senders(self) -> None:
        senders, self._senders = self._senders, []
        for waiter in senders:
            if not waiter.done():
                waiter.set_result(None)

    # -- frames from the server ---------------------------------------------------------
    def _frame(self, item: Frame) -> None:
        kind = item.type
        if self._continuation is not None:
            self._continue(item)
        elif not self._settings_seen and kind != FrameType.SETTINGS:
            raise H2Error(ErrorCode.PROTOCOL_ERROR, f"the server's first frame is {kind}")
        elif kind == FrameType.DATA:
            self._data(item)
        elif kind == FrameType.HEADERS:
            self._headers(item)
        elif kind == FrameType.SETTINGS:
            self._settings(item)
        elif kind == FrameType.WINDOW_UPDATE:
            self._window_update(item)
        elif kind == FrameType.PING:
            if not item.flags & Flag.ACK:
                self._write(frame(FrameType.PING, Flag.ACK, 0, item.payload), control=True)
        elif kind == FrameType.RST_STREAM:
            self._rst_stream(item)
        elif kind == FrameType.GOAWAY:
            self._goaway_frame(item)
        elif kind == FrameType.PUSH_PROMISE:
            raise H2Error(ErrorCode.PROTOCOL_ERROR, "PUSH_PROMISE, and we disabled push")
        elif kind == FrameType.CONTINUATION:
            raise H2Error(ErrorCode.PROTOCOL_ERROR, "CONTINUATION outside a header block")
        # PRIORITY and unknown types are ignored (RFC 9113 5.3.2, 4.1).

    def _known(self, stream_id: int, what: str) -> Stream | None:
        """The open stream, or None if it is closed; a stream we never opened is an error."""
        if stream_id > self._last_id or not stream_id & 1:
            raise H2Error(ErrorCode.PROTOCOL_ERROR, f"{what} on stream {stream_id}, not opened")
        return self._streams.get(stream_id)

    def _data(self, item: Frame) -> None:
        if item.length > self._recv_window:
            raise H2Error(ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self._recv_window -= item.length
        self._recv_unacked += item.length
        if self._recv_unacked >= CONNECTION_WINDOW // 2:
            # Data is consumed as it arrives (a stream buffers at most one bounded message).
            self._write(window_update_frame(0, self._recv_unacked), control=True)
            self._recv_window += self._recv_unacked
            self._recv_unacked = 0
        stream = self._known(item.stream, "DATA")
        if stream is None:
            return  # a stream we reset or finished: its data is dropped
        if not stream.headers:
            raise H2Error(ErrorCode.PROTOCOL_ERROR, f"DATA before HEADERS on stream {stream.id}")
        if item.length > stream.recv_window:
            raise H2Error(ErrorCode.FLOW_CONTROL_ERROR, f"DATA beyond stream {stream.id}'s window")
        stream.recv_window -= item.length
        error = stream.take(item.payload, self._max_message)
        if error is not None:
            self._reset(stream, ErrorCode.CANCEL, error)
            return
        if item.flags & Flag.END_STREAM:
            self._finish(
                stream, GrpcStatusError(StatusCode.INTERNAL, "the response ended without trailers")
            )
            return
        stream.unacked += item.length
        if stream.unacked >= STREAM_WINDOW // 2:
            self._write(window_update_frame(stream.id, stream.unacked), control=True)
            stream.recv_window += stream.unacked
            stream.unacked = 0

    def _headers(self, item: Frame) -> None:
        if item.flags & Flag.END_HEADERS:
            self._header_block(item.stream, item.flags, item.payload)
        else:
            self._continuation = (item.stream, item.flags, bytearray(item.payload))
            self._check_block_size(len(item.payload))

    def _continue(self, item: Frame) -> None:
        assert self._continuation is not None  # _frame's test; not a trust boundary
        stream_id, flags, block = self._continuation
        if item.type != FrameType.CONTINUATION or item.stream != stream_id:
            raise H2Error(
                ErrorCode.PROTOCOL_ERROR,
                f"{item.type} on stream {item.stream} inside stream {stream_id}'s header block",
            )
        block += item.payload
        self._check_block_size(len(block))
        if item.flags & Flag.END_HEADERS:
            self._continuation = None
            self._header_block(stream_id, flags, bytes(block))

    def _check_block_size(self, size: int) -> None:
        if size > MAX_HEADER_LIST:
            raise H2Error(
                ErrorCode.ENHANCE_YOUR_CALM,
                f"a header block over {MAX_HEADER_LIST} bytes (our MAX_HEADER_LIST_SIZE)",
            )

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        stream = self._known(stream_id, "HEADERS")
        headers = self._decoder.decode(block)  # always: the table is the connection's
        if stream is None:
            return
        end = bool(flags & Flag.END_STREAM)
        fields = validate_headers(headers, trailers=stream.headers)
        if not stream.headers:
            if fields[b":status"][:1] == b"1" and not end:
                return  # an informational response; the real one follows
            error = stream.head(fields)
            if error is not None:
                if end:
                    self._finish(stream, error)
                else:
                    self._reset(stream, ErrorCode.CANCEL, error)
                return
            if not end:
                return
        elif not end:
            raise H2Error(ErrorCode.PROTOCOL_ERROR, f"trailers without END_STREAM on {stream_id}")
        self._finish(stream, stream.outcome(fields))

    def _settings(self, item: Frame) -> None:
        if item.flags & Flag.ACK:
            return
        for key, value in parse_settings(item.payload):
            if key == Setting.ENABLE_PUSH and value != 0:
                raise H2Error(ErrorCode.PROTOCOL_ERROR, f"the server set ENABLE_PUSH {value}")
            elif key == Setting.MAX_CONCURRENT_STREAMS:
                self._peer_max_streams = value
            elif key == Setting.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2Error(ErrorCode.FLOW_CONTROL_ERROR, f"INITIAL_WINDOW_SIZE {value}")
                delta = value - self._peer_window
                self._peer_window = value
                for stream in self._streams.values():
                    stream.send_window += delta
                    if stream.send_window > MAX_WINDOW:
                        raise H2Error(ErrorCode.FLOW_CONTROL_ERROR, "a stream window overflowed")
            elif key == Setting.MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME_SIZE <= value <= MAX_FRAME_SIZE_LIMIT:
                    raise H2Error(ErrorCode.PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
                self._peer_max_frame = value
                self._data_frame = min(value, MAX_DATA_FRAME)
            elif key == Setting.MAX_HEADER_LIST_SIZE:
                self._peer_max_headers = value
            # HEADER_TABLE_SIZE needs nothing: every block we send starts with a size update
            # to 0. Unknown settings are ignored (RFC 9113 6.5.2).
        self._write(frame(FrameType.SETTINGS, Flag.ACK, 0), control=True)
        self._settings_seen = True
        if not self._ready.done():
            self._ready.set_result(None)
        self._wake_senders()
        self._wake_slots()

    def _window_update(self, item: Frame) -> None:
        increment = parse_u32(item.payload) & MAX_WINDOW
        if item.stream == 0:
            if increment == 0:
                raise H2Error(ErrorCode.PROTOCOL_ERROR, "a WINDOW_UPDATE of 0 on the connection")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise H2Error(ErrorCode.FLOW_CONTROL_ERROR, "the connection window overflowed")
        else:
            stream = self._known(item.stream, "WINDOW_UPDATE")
            if increment == 0:
                raise H2Error(ErrorCode.PROTOCOL_ERROR, f"a WINDOW_UPDATE of 0 on {item.stream}")
            if stream is None:
                return
            stream.send_window += increment
            if stream.send_window > MAX_WINDOW:
                raise H2Error(
                    ErrorCode.FLOW_CONTROL_ERROR, f"stream {stream.id}'s window overflowed"
                )
        if self._senders:
            self._wake_senders()

    def _rst_stream(self, item: Frame) -> None:
        stream = self._known(item.stream, "RST_STREAM")
        if stream is None:
            return
        code = parse_u32(item.payload)
        stream.pending.clear()  # no RST_STREAM answers one (RFC 9113 5.4.2)
        self._finish(
            stream,
            GrpcStatusError(
                status_for_reset(code),
                f"the server reset the stream ({ErrorCode.describe(code)})",
            ),
        )

    def _goaway_frame(self, item: Frame) -> None:
        last = parse_u32(item.payload) & MAX_WINDOW
        code = parse_u32(item.payload, 4)
        if self._goaway is not None and last > self._goaway:
            raise H2Error(ErrorCode.PROTOCOL_ERROR, "a GOAWAY raised its last-stream-id")
        self._goaway = last
        debug = "".join(
            c if c.isprintable() else "?"
            for c in item.payload[8:200].decode("utf-8", errors="replace")
        )  # the server's text, in our message: no control characters
        why = f"the server said GOAWAY ({ErrorCode.describe(code)}{': ' + debug if debug else ''})"
        for stream in [s for s in self._streams.values() if s.id > last]:
            stream.pending.clear()  # the server dropped the stream: nothing to reset
            self._finish(stream, ConnectionLost(f"{why}; the call was not processed"))
        if not self._streams:
            self._end(ConnectionLost(why), ErrorCode.NO_ERROR)
