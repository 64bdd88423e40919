"""The h2 prototype (sandboxer/loaders/grpc/h2): HPACK against RFC 7541 Appendix C, frames
against RFC 9113's layout rules, a scripted hostile server for every way a connection must end,
and real servers: the unmodified Go KV plugin (grpc-go, unsandboxed here: the client is under
test, not the sandbox) and grpcio's own Python server, for interop with a second implementation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import IN_CI
from hypothesis import given, settings
from hypothesis import strategies as st

from sandboxer.loaders.grpc.h2 import ConnectionLost, GrpcStatusError, H2Channel, ProtocolViolation
from sandboxer.loaders.grpc.h2.frames import (
    MAX_WINDOW,
    ErrorCode,
    Flag,
    Frame,
    FrameReader,
    FrameType,
    H2Error,
    Setting,
    frame,
    goaway_frame,
    parse_u32,
    rst_stream_frame,
    settings_frame,
    window_update_frame,
)
from sandboxer.loaders.grpc.h2.hpack import (
    Decoder,
    HpackError,
    encode_indexed,
    encode_integer,
    encode_literal,
)
from sandboxer.loaders.grpc.h2.huffman import CODES, HuffmanError, huffman_decode
from sandboxer.loaders.grpc.h2.stream import grpc_timeout

# -- HPACK: RFC 7541 Appendix C ----------------------------------------------------------------

REQUESTS = [  # C.3 and C.4: the same three requests, plain then Huffman-coded
    (
        [(":method", "GET"), (":scheme", "http"), (":path", "/"),
         (":authority", "www.example.com")],
        [(":authority", "www.example.com")],
        57,
    ),
    (
        [(":method", "GET"), (":scheme", "http"), (":path", "/"),
         (":authority", "www.example.com"), ("cache-control", "no-cache")],
        [("cache-control", "no-cache"), (":authority", "www.example.com")],
        110,
    ),
    (
        [(":method", "GET"), (":scheme", "https"), (":path", "/index.html"),
         (":authority", "www.example.com"), ("custom-key", "custom-value")],
        [("custom-key", "custom-value"), ("cache-control", "no-cache"),
         (":authority", "www.example.com")],
        164,
    ),
]  # fmt: skip
C3 = [
    "828684410f7777772e6578616d706c652e636f6d",
    "828684be58086e6f2d6361636865",
    "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
]
C4 = [
    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
    "828684be5886a8eb10649cbf",
    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
]
DATE1 = "Mon, 21 Oct 2013 20:13:21 GMT"
DATE2 = "Mon, 21 Oct 2013 20:13:22 GMT"
COOKIE = "foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
LOCATION = "https://www.example.com"
RESPONSES = [  # C.5 and C.6: a 256-byte table, so entries are evicted
    (
        [(":status", "302"), ("cache-control", "private"), ("date", DATE1),
         ("location", LOCATION)],
        [("location", LOCATION), ("date", DATE1), ("cache-control", "private"),
         (":status", "302")],
        222,
    ),
    (
        [(":status", "307"), ("cache-control", "private"), ("date", DATE1),
         ("location", LOCATION)],
        [(":status", "307"), ("location", LOCATION), ("date", DATE1),
         ("cache-control", "private")],
        222,
    ),
    (
        [(":status", "200"), ("cache-control", "private"), ("date", DATE2),
         ("location", LOCATION), ("content-encoding", "gzip"), ("set-cookie", COOKIE)],
        [("set-cookie", COOKIE), ("content-encoding", "gzip"), ("date", DATE2)],
        215,
    ),
]  # fmt: skip
C5 = [
    "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d"
    "546e1768747470733a2f2f7777772e6578616d706c652e636f6d",
    "4803333037c1c0bf",
    "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a69707738666f"
    "6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d6167653d333630303b"
    "2076657273696f6e3d31",
]
C6 = [
    "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c7"
    "8f0b97c8e9ae82ae43d3",
    "4883640effc1c0bf",
    "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335"
    "dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
]


def _pairs(items: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in items]


@pytest.mark.parametrize(
    ("blocks", "expected", "table_size"),
    [(C3, REQUESTS, 4096), (C4, REQUESTS, 4096), (C5, RESPONSES, 256), (C6, RESPONSES, 256)],
    ids=["C.3 requests", "C.4 requests, Huffman", "C.5 responses", "C.6 responses, Huffman"],
)
def test_hpack_decodes_rfc7541_appendix_c(
    blocks: list[str],
    expected: list[tuple[list[tuple[str, str]], list[tuple[str, str]], int]],
    table_size: int,
) -> None:
    decoder = Decoder(max_table_size=table_size)
    for block, (headers, table, size) in zip(blocks, expected, strict=True):
        assert decoder.decode(bytes.fromhex(block)) == _pairs(headers)
        assert decoder.entries == tuple(_pairs(table))
        assert decoder.size == size


def test_huffman_codes_are_rfc7541_appendix_b() -> None:
    # A few rows of Appendix B, as (code, bits): the table is built from lengths alone.
    assert CODES[0] == (0x1FF8, 13)
    assert CODES[ord("0")] == (0x0, 5)
    assert CODES[ord("a")] == (0x3, 5)
    assert CODES[ord("z")] == (0x7B, 7)
    assert CODES[255] == (0x3FFFFEE, 26)
    assert CODES[256] == (0x3FFFFFFF, 30)  # EOS


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\xff", id="eight bits of padding"),
        pytest.param(b"\x18", id="padding that is not ones"),  # 'a' (00011) then 000
        pytest.param(b"\xff\xff\xff\xff", id="EOS inside the string"),
    ],
)
def test_bad_huffman_is_an_error(data: bytes) -> None:
    with pytest.raises(HuffmanError):
        huffman_decode(data)


def _huffman_encode(data: bytes) -> bytes:
    bits, count = 0, 0
    for octet in data:
        code, length = CODES[octet]
        bits, count = bits << length | code, count + length
    pad = -count % 8
    return (bits << pad | ((1 << pad) - 1)).to_bytes((count + pad) // 8, "big")


@given(st.binary(max_size=300))
def test_huffman_round_trips(data: bytes) -> None:
    assert huffman_decode(_huffman_encode(data)) == data


@given(st.binary(max_size=64))
def test_any_bytes_decode_or_are_a_huffman_error(data: bytes) -> None:
    try:
        huffman_decode(data)
    except HuffmanError:
        pass


@given(st.binary(max_size=200))
def test_any_header_block_decodes_or_is_an_hpack_error(block: bytes) -> None:
    decoder = Decoder(max_header_list_size=4096)
    try:
        headers = decoder.decode(block)
    except HpackError:
        return
    assert sum(len(n) + len(v) + 32 for n, v in headers) <= 4096
    assert decoder.size <= decoder.table_size


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b"\x80", id="index 0"),
        pytest.param(b"\xbe", id="index past the empty dynamic table"),
        pytest.param(b"\xff", id="an integer cut short"),
        pytest.param(b"\xff\xff\xff\xff\xff\xff\x7f", id="an integer over 2^32"),
        pytest.param(b"\x40\x05ab", id="a string past the block"),
        pytest.param(b"\x40", id="a block ending before the name"),
        pytest.param(encode_integer(8192, 5, 0x20), id="a table size over ours"),
        pytest.param(b"\x82\x20", id="a table size update after a field"),
        pytest.param(b"\x40\x81\xff\x01a", id="bad Huffman in a name"),
    ],
)
def test_malformed_header_blocks_are_hpack_errors(block: bytes) -> None:
    with pytest.raises(HpackError):
        Decoder().decode(block)


def test_the_header_list_is_bounded() -> None:
    decoder = Decoder(max_header_list_size=100)
    decoder.decode(encode_literal(b"a", b"x" * 60))  # 93 bytes listed
    with pytest.raises(HpackError, match="MAX_HEADER_LIST_SIZE"):
        decoder.decode(encode_literal(b"a", b"x" * 60) + encode_indexed(8))


def test_a_smaller_table_size_evicts_the_oldest_entries_first() -> None:
    decoder = Decoder()
    for block in C3:
        decoder.decode(bytes.fromhex(block))
    assert decoder.size == 164
    assert decoder.decode(encode_integer(110, 5, 0x20) + encode_indexed(63)) == [
        (b"cache-control", b"no-cache")
    ]
    assert decoder.entries == ((b"custom-key", b"custom-value"), (b"cache-control", b"no-cache"))
    assert decoder.size == 107
    with pytest.raises(HpackError, match="beyond the dynamic table"):
        decoder.decode(encode_indexed(64))  # :authority was evicted


def test_dynamic_table_size_updates_and_oversized_entries_evict() -> None:
    decoder = Decoder()
    decoder.decode(bytes.fromhex(C3[0]))
    assert decoder.size == 57
    decoder.decode(b"\x20")  # size 0: everything goes
    assert decoder.entries == ()
    decoder.decode(
        encode_integer(100, 5, 0x20) + b"\x40\x01a" + encode_integer(200, 7, 0) + b"x" * 200
    )
    assert decoder.entries == ()  # bigger than the table: not an error, the table is empty


# -- frames ------------------------------------------------------------------------------------

FRAME_ERRORS = [
    (
        "over our MAX_FRAME_SIZE",
        frame(FrameType.DATA, 0, 1, b"x" * 16385),
        ErrorCode.FRAME_SIZE_ERROR,
    ),
    ("SETTINGS on a stream", frame(FrameType.SETTINGS, 0, 1), ErrorCode.PROTOCOL_ERROR),
    ("SETTINGS of 5 bytes", frame(FrameType.SETTINGS, 0, 0, b"\0" * 5), ErrorCode.FRAME_SIZE_ERROR),
    (
        "SETTINGS ACK with payload",
        frame(FrameType.SETTINGS, Flag.ACK, 0, b"\0" * 6),
        ErrorCode.FRAME_SIZE_ERROR,
    ),
    ("PING of 7 bytes", frame(FrameType.PING, 0, 0, b"\0" * 7), ErrorCode.FRAME_SIZE_ERROR),
    ("PING on a stream", frame(FrameType.PING, 0, 3, b"\0" * 8), ErrorCode.PROTOCOL_ERROR),
    (
        "WINDOW_UPDATE of 3 bytes",
        frame(FrameType.WINDOW_UPDATE, 0, 0, b"\0" * 3),
        ErrorCode.FRAME_SIZE_ERROR,
    ),
    (
        "RST_STREAM on stream 0",
        frame(FrameType.RST_STREAM, 0, 0, b"\0" * 4),
        ErrorCode.PROTOCOL_ERROR,
    ),
    ("DATA on stream 0", frame(FrameType.DATA, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR),
    ("HEADERS on stream 0", frame(FrameType.HEADERS, 0, 0, b"x"), ErrorCode.PROTOCOL_ERROR),
    (
        "padding longer than DATA",
        frame(FrameType.DATA, Flag.PADDED, 1, b"\x09abc"),
        ErrorCode.PROTOCOL_ERROR,
    ),
    ("empty padded HEADERS", frame(FrameType.HEADERS, Flag.PADDED, 1), ErrorCode.FRAME_SIZE_ERROR),
    ("GOAWAY of 7 bytes", frame(FrameType.GOAWAY, 0, 0, b"\0" * 7), ErrorCode.FRAME_SIZE_ERROR),
    ("PRIORITY of 4 bytes", frame(FrameType.PRIORITY, 0, 1, b"\0" * 4), ErrorCode.FRAME_SIZE_ERROR),
]


@pytest.mark.parametrize(
    ("data", "code"), [c[1:] for c in FRAME_ERRORS], ids=[c[0] for c in FRAME_ERRORS]
)
def test_malformed_frames_are_connection_errors(data: bytes, code: ErrorCode) -> None:
    with pytest.raises(H2Error) as caught:
        FrameReader().feed(data)
    assert caught.value.code == code


def test_an_oversized_frame_is_refused_on_its_header_alone() -> None:
    with pytest.raises(H2Error):
        FrameReader().feed(frame(FrameType.DATA, 0, 1, b"x" * 20000)[:9])


def test_padding_and_priority_are_taken_off_and_unknown_types_pass() -> None:
    frames = FrameReader().feed(
        frame(FrameType.DATA, Flag.PADDED, 1, b"\x02abcPP")
        + frame(FrameType.HEADERS, Flag.PRIORITY | Flag.END_HEADERS, 1, b"\0\0\0\3\x10\x82")
        + frame(0x42, 0, 7, b"whatever")  # type: ignore[arg-type]
    )
    assert [(f.type, f.payload, f.length) for f in frames] == [
        (FrameType.DATA, b"abc", 6),
        (FrameType.HEADERS, b"\x82", 6),
        (0x42, b"", 8),
    ]


@given(
    st.lists(st.tuples(st.sampled_from([0, 1, 9]), st.integers(1, 99), st.binary(max_size=300))),
    st.lists(st.integers(1, 64), min_size=1),
)
def test_frames_read_back_whatever_the_chunking(
    frames: list[tuple[int, int, bytes]], cuts: list[int]
) -> None:
    data = b"".join(frame(FrameType(t), 0, s, p) for t, s, p in frames)
    reader = FrameReader()
    got: list[Frame] = []
    at, i = 0, 0
    while at < len(data):
        step = cuts[i % len(cuts)]
        got += reader.feed(data[at : at + step])
        at, i = at + step, i + 1
    assert [(f.type, f.stream, f.payload) for f in got] == frames
    assert reader.buffered == 0


# -- a scripted server -------------------------------------------------------------------------

STATUS_200 = encode_indexed(8)
GRPC_TYPE = encode_literal(31, b"application/grpc")
OK = encode_literal(b"grpc-status", b"0")


def headers(stream: int, *fields: bytes, end: bool = False) -> bytes:
    flags = Flag.END_HEADERS | (Flag.END_STREAM if end else 0)
    return frame(FrameType.HEADERS, flags, stream, b"".join(fields))


def message(payload: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + len(payload).to_bytes(4, "big") + payload


def answer(stream: int, payload: bytes) -> bytes:
    return (
        headers(stream, STATUS_200, GRPC_TYPE)
        + frame(FrameType.DATA, 0, stream, message(payload))
        + headers(stream, OK, end=True)
    )


@dataclass
class Peer:
    """The server's end of one connection: frames the client sent, and a way to answer."""

    frames: asyncio.Queue[Frame]
    writer: asyncio.StreamWriter
    decoder: Decoder

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def expect(self, kind: FrameType, timeout: float = 5.0) -> Frame:
        async with asyncio.timeout(timeout):
            while True:
                got = await self.frames.get()
                if got.type == kind:
                    return got


class FakeServer:
    """A Unix socket where each connection gets a ``Peer``; SETTINGS first unless told not."""

    def __init__(self, path: str, *, settings: bytes) -> None:
        self.path = path
        self.settings = settings
        self.peers: asyncio.Queue[Peer] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[Frame] = asyncio.Queue()
        writer.write(self.settings)
        frames = FrameReader(MAX_WINDOW)
        preface = await reader.readexactly(24)
        assert preface == b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        await self.peers.put(Peer(queue, writer, Decoder(max_header_list_size=1 << 20)))
        try:
            while data := await reader.read(65536):
                for item in frames.feed(data):
                    queue.put_nowait(item)
        finally:
            writer.close()

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.append(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            writer.close()


@pytest.fixture
def socket_dir() -> Iterator[str]:
    # Not tmp_path: a Unix socket's path must fit in 108 bytes.
    path = tempfile.mkdtemp(prefix="h2-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def fake(socket_dir: str) -> AsyncIterator[FakeServer]:
    server = FakeServer(os.path.join(socket_dir, "s"), settings=settings_frame({}))
    listener = await asyncio.start_unix_server(server.handler, server.path)
    yield server
    listener.close()
    for task in server._tasks:
        task.cancel()
    await listener.wait_closed()


async def connected(fake: FakeServer, *, max_message: int = 1 << 22) -> tuple[H2Channel, Peer]:
    channel = await H2Channel.connect(fake.path, max_message=max_message)
    peer = await asyncio.wait_for(fake.peers.get(), 5)
    await peer.expect(FrameType.SETTINGS)
    return channel, peer


VIOLATIONS = [
    ("DATA on a stream never opened", frame(FrameType.DATA, 0, 3, b"x"), ErrorCode.PROTOCOL_ERROR),
    (
        "a frame over our MAX_FRAME_SIZE",
        frame(FrameType.DATA, 0, 1, b"x" * 16385),
        ErrorCode.FRAME_SIZE_ERROR,
    ),
    ("an HPACK index past the table", headers(1, b"\xbe"), ErrorCode.COMPRESSION_ERROR),
    (
        "an HPACK table size over ours",
        headers(1, encode_integer(8192, 5, 0x20)),
        ErrorCode.COMPRESSION_ERROR,
    ),
    ("bad Huffman padding", headers(1, b"\x40\x81\xff\x01a"), ErrorCode.COMPRESSION_ERROR),
    (
        "a header block over 16 KiB",
        frame(FrameType.HEADERS, 0, 1, b"\x82" * 10000)
        + frame(FrameType.CONTINUATION, 0, 1, b"\x82" * 10000),
        ErrorCode.ENHANCE_YOUR_CALM,
    ),
    (
        "a header list over 16 KiB from a small block",
        headers(
            1, STATUS_200, b"\x40\x01x" + encode_integer(3000, 7, 0) + b"y" * 3000 + b"\xbe" * 5
        ),
        ErrorCode.COMPRESSION_ERROR,
    ),
    (
        "a PING inside a header block",
        frame(FrameType.HEADERS, 0, 1, STATUS_200) + frame(FrameType.PING, 0, 0, b"\0" * 8),
        ErrorCode.PROTOCOL_ERROR,
    ),
    (
        "CONTINUATION alone",
        frame(FrameType.CONTINUATION, Flag.END_HEADERS, 1, STATUS_200),
        ErrorCode.PROTOCOL_ERROR,
    ),
    (
        "PUSH_PROMISE",
        frame(FrameType.PUSH_PROMISE, Flag.END_HEADERS, 1, b"\0\0\0\2\x82"),
        ErrorCode.PROTOCOL_ERROR,
    ),
    (
        "a connection window over 2^31-1",
        window_update_frame(0, MAX_WINDOW),
        ErrorCode.FLOW_CONTROL_ERROR,
    ),
    (
        "a stream window over 2^31-1",
        window_update_frame(1, MAX_WINDOW),
        ErrorCode.FLOW_CONTROL_ERROR,
    ),
    ("a WINDOW_UPDATE of 0", window_update_frame(0, 0), ErrorCode.PROTOCOL_ERROR),
    (
        "an upper-case header name",
        headers(1, STATUS_200, encode_literal(b"X-Bad", b"1")),
        ErrorCode.PROTOCOL_ERROR,
    ),
    (
        "a pseudo-header in trailers",
        headers(1, STATUS_200, GRPC_TYPE) + headers(1, STATUS_200, OK, end=True),
        ErrorCode.PROTOCOL_ERROR,
    ),
    ("a response without :status", headers(1, GRPC_TYPE), ErrorCode.PROTOCOL_ERROR),
    (
        "trailers without END_STREAM",
        headers(1, STATUS_200, GRPC_TYPE) + headers(1, OK),
        ErrorCode.PROTOCOL_ERROR,
    ),
    ("DATA before HEADERS", frame(FrameType.DATA, 0, 1, message(b"x")), ErrorCode.PROTOCOL_ERROR),
    ("ENABLE_PUSH 1", settings_frame({Setting.ENABLE_PUSH: 1}), ErrorCode.PROTOCOL_ERROR),
    ("MAX_FRAME_SIZE 100", settings_frame({Setting.MAX_FRAME_SIZE: 100}), ErrorCode.PROTOCOL_ERROR),
    (
        "INITIAL_WINDOW_SIZE 2^31",
        settings_frame({Setting.INITIAL_WINDOW_SIZE: 1 << 31}),
        ErrorCode.FLOW_CONTROL_ERROR,
    ),
    (
        "RST_STREAM on a stream never opened",
        rst_stream_frame(7, ErrorCode.CANCEL),
        ErrorCode.PROTOCOL_ERROR,
    ),
    ("a malformed PING", frame(FrameType.PING, 0, 0, b"\0" * 7), ErrorCode.FRAME_SIZE_ERROR),
]


@pytest.mark.parametrize(
    ("data", "code"), [c[1:] for c in VIOLATIONS], ids=[c[0] for c in VIOLATIONS]
)
@pytest.mark.usefixtures("no_leaks")
async def test_a_protocol_violation_ends_the_connection_for_every_call(
    fake: FakeServer, data: bytes, code: ErrorCode
) -> None:
    channel, peer = await connected(fake)
    calls = [asyncio.ensure_future(channel.unary("/s/M", b"req", timeout=30)) for _ in range(3)]
    await peer.expect(FrameType.HEADERS)
    peer.send(data)
    done = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert all(isinstance(e, ProtocolViolation) and e.code == code for e in done), done
    goaway = await peer.expect(FrameType.GOAWAY)
    assert parse_u32(goaway.payload, 4) == code
    assert channel.statistics().protocol_error is not None
    with pytest.raises(ProtocolViolation):
        await channel.unary("/s/M", b"req", timeout=30)
    await channel.close()


async def test_a_first_frame_other_than_settings_fails_connect(socket_dir: str) -> None:
    server = FakeServer(
        os.path.join(socket_dir, "s"), settings=frame(FrameType.PING, 0, 0, b"\0" * 8)
    )
    listener = await asyncio.start_unix_server(server.handler, server.path)
    try:
        with pytest.raises(ProtocolViolation, match="first frame"):
            await H2Channel.connect(server.path, timeout=5)
    finally:
        listener.close()
        for task in server._tasks:
            task.cancel()


async def test_no_server_is_connection_lost(socket_dir: str) -> None:
    with pytest.raises(ConnectionLost, match="cannot connect"):
        await H2Channel.connect(os.path.join(socket_dir, "nobody"))


async def test_a_silent_server_fails_connect_on_time(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "s")
    listener = await asyncio.start_unix_server(lambda r, w: None, path)
    try:
        t0 = time.monotonic()
        with pytest.raises(ConnectionLost, match="no SETTINGS"):
            await H2Channel.connect(path, timeout=0.3)
        assert time.monotonic() - t0 < 2
    finally:
        listener.close()


CALL_ERRORS = [
    ("no grpc-status", headers(1, STATUS_200, GRPC_TYPE, end=True), 13, "no grpc-status"),
    (
        "a compressed message",
        headers(1, STATUS_200, GRPC_TYPE) + frame(FrameType.DATA, 0, 1, message(b"x", flag=1)),
        13,
        "compressed",
    ),
    (
        "a message over max_message",
        headers(1, STATUS_200, GRPC_TYPE) + frame(FrameType.DATA, 0, 1, b"\0\0\x10\0\x01"),
        8,
        "1048577 bytes",
    ),
    (
        "two messages",
        headers(1, STATUS_200, GRPC_TYPE)
        + frame(FrameType.DATA, 0, 1, message(b"a") + message(b"b")),
        13,
        "two response messages",
    ),
    (
        "gzip encoding",
        headers(1, STATUS_200, GRPC_TYPE, encode_literal(b"grpc-encoding", b"gzip")),
        13,
        "gzip",
    ),
    ("HTTP 404", headers(1, encode_indexed(13), end=True), 12, "HTTP status 404"),
    (
        "not gRPC's content-type",
        headers(1, STATUS_200, encode_literal(31, b"text/html")),
        2,
        "text/html",
    ),
    (
        "RST_STREAM REFUSED_STREAM",
        headers(1, STATUS_200, GRPC_TYPE) + rst_stream_frame(1, ErrorCode.REFUSED_STREAM),
        14,
        "REFUSED_STREAM",
    ),
    (
        "status OK but no message",
        headers(1, STATUS_200, GRPC_TYPE) + headers(1, OK, end=True),
        13,
        "no response message",
    ),
    (
        "a message cut short",
        headers(1, STATUS_200, GRPC_TYPE)
        + frame(FrameType.DATA, 0, 1, message(b"abc")[:6])
        + headers(1, OK, end=True),
        13,
        "cut short",
    ),
    (
        "no trailers",
        headers(1, STATUS_200, GRPC_TYPE)
        + frame(FrameType.DATA, Flag.END_STREAM, 1, message(b"x")),
        13,
        "without trailers",
    ),
    (
        "a status percent-encoded",
        headers(
            1,
            STATUS_200,
            GRPC_TYPE,
            encode_literal(b"grpc-status", b"5"),
            encode_literal(b"grpc-message", b"caf%C3%A9 100%25 %zz"),
            end=True,
        ),
        5,
        "café 100% %zz",
    ),
]


@pytest.mark.parametrize(
    ("data", "code", "text"), [c[1:] for c in CALL_ERRORS], ids=[c[0] for c in CALL_ERRORS]
)
async def test_a_bad_response_fails_its_call_and_the_connection_goes_on(
    fake: FakeServer, data: bytes, code: int, text: str
) -> None:
    channel, peer = await connected(fake, max_message=1 << 20)
    call = asyncio.ensure_future(channel.unary("/s/M", b"req", timeout=30))
    await peer.expect(FrameType.HEADERS)
    peer.send(data)
    with pytest.raises(GrpcStatusError) as caught:
        await asyncio.wait_for(call, 5)
    assert caught.value.code == code
    assert text in caught.value.message
    second = asyncio.ensure_future(channel.unary("/s/M", b"req", timeout=30))
    got = await peer.expect(FrameType.HEADERS)
    assert got.stream == 3
    peer.send(answer(3, b"fine"))
    assert await asyncio.wait_for(second, 5) == b"fine"
    await channel.close()


async def test_a_deadline_fails_on_time_and_resets_the_stream(fake: FakeServer) -> None:
    channel, peer = await connected(fake)
    t0 = time.monotonic()
    call = asyncio.ensure_future(channel.unary("/s/Slow", b"req", timeout=0.2))
    sent = await peer.expect(FrameType.HEADERS)
    fields = dict(peer.decoder.decode(sent.payload))
    assert fields[b":path"] == b"/s/Slow"
    assert fields[b"te"] == b"trailers"
    assert fields[b"grpc-timeout"].endswith(b"u")
    assert 190_000 <= int(fields[b"grpc-timeout"][:-1]) <= 200_000
    with pytest.raises(GrpcStatusError) as caught:
        await asyncio.wait_for(call, 5)
    assert caught.value.name == "DEADLINE_EXCEEDED"
    assert 0.19 <= time.monotonic() - t0 < 1.5
    reset = await peer.expect(FrameType.RST_STREAM)
    assert (reset.stream, parse_u32(reset.payload)) == (1, ErrorCode.CANCEL)
    await channel.close()


async def test_a_cancelled_call_resets_its_stream(fake: FakeServer) -> None:
    channel, peer = await connected(fake)
    call = asyncio.ensure_future(channel.unary("/s/M", b"req"))
    await peer.expect(FrameType.HEADERS)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    reset = await peer.expect(FrameType.RST_STREAM)
    assert parse_u32(reset.payload) == ErrorCode.CANCEL
    assert channel.statistics().in_flight == 0
    await channel.close()


async def test_ping_is_acknowledged_with_its_payload(fake: FakeServer) -> None:
    channel, peer = await connected(fake)
    peer.send(frame(FrameType.PING, 0, 0, b"12345678"))
    ack = await peer.expect(FrameType.PING)
    assert (ack.flags, ack.payload) == (Flag.ACK, b"12345678")
    await channel.close()


async def test_goaway_fails_streams_above_its_last_id_and_refuses_new_calls(
    fake: FakeServer,
) -> None:
    channel, peer = await connected(fake)
    first = asyncio.ensure_future(channel.unary("/s/M", b"1", timeout=30))
    second = asyncio.ensure_future(channel.unary("/s/M", b"2", timeout=30))
    await peer.expect(FrameType.HEADERS)
    await peer.expect(FrameType.HEADERS)
    peer.send(goaway_frame(1, ErrorCode.NO_ERROR, b"draining"))
    with pytest.raises(ConnectionLost, match="not processed"):
        await asyncio.wait_for(second, 5)
    with pytest.raises(ConnectionLost, match="GOAWAY"):
        await channel.unary("/s/M", b"3")
    peer.send(answer(1, b"one"))
    assert await asyncio.wait_for(first, 5) == b"one"
    await channel.close()


@pytest.mark.usefixtures("no_leaks")
async def test_the_server_closing_fails_pending_calls(fake: FakeServer) -> None:
    channel, peer = await connected(fake)
    call = asyncio.ensure_future(channel.unary("/s/M", b"req"))
    await peer.expect(FrameType.HEADERS)
    peer.writer.close()
    with pytest.raises(ConnectionLost, match="closed the connection") as caught:
        await asyncio.wait_for(call, 5)
    assert not isinstance(caught.value, ProtocolViolation)
    await channel.close()
    await channel.close()  # twice is fine
    with pytest.raises(ConnectionLost):
        await channel.unary("/s/M", b"req")


async def test_a_server_that_never_reads_cannot_make_us_buffer_answers(socket_dir: str) -> None:
    path = os.path.join(socket_dir, "s")
    writers: list[asyncio.StreamWriter] = []

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)  # it reads nothing, and asks for a PING ACK 150,000 times
        writer.write(settings_frame({}) + frame(FrameType.PING, 0, 0, b"12345678") * 150_000)

    listener = await asyncio.start_unix_server(flood, path)
    try:
        channel = await H2Channel.connect(path)
        with pytest.raises(ProtocolViolation, match="does not read") as caught:
            await asyncio.wait_for(channel.unary("/s/M", b"req", timeout=30), 10)
        assert caught.value.code == ErrorCode.ENHANCE_YOUR_CALM
        await channel.close()
    finally:
        listener.close()
        for writer in writers:
            writer.close()


async def test_max_concurrent_streams_queues_calls(socket_dir: str) -> None:
    server = FakeServer(
        os.path.join(socket_dir, "s"), settings=settings_frame({Setting.MAX_CONCURRENT_STREAMS: 1})
    )
    listener = await asyncio.start_unix_server(server.handler, server.path)
    try:
        channel, peer = await connected(server)
        calls = [asyncio.ensure_future(channel.unary("/s/M", b"r", timeout=30)) for _ in range(2)]
        assert (await peer.expect(FrameType.HEADERS)).stream == 1
        with pytest.raises(TimeoutError):
            await peer.expect(FrameType.HEADERS, timeout=0.2)
        peer.send(answer(1, b"a"))
        assert (await peer.expect(FrameType.HEADERS)).stream == 3
        peer.send(answer(3, b"b"))
        assert await asyncio.wait_for(asyncio.gather(*calls), 5) == [b"a", b"b"]
        await channel.close()
    finally:
        listener.close()
        for task in server._tasks:
            task.cancel()


async def test_a_request_waits_for_the_servers_window(socket_dir: str) -> None:
    server = FakeServer(
        os.path.join(socket_dir, "s"), settings=settings_frame({Setting.INITIAL_WINDOW_SIZE: 10})
    )
    listener = await asyncio.start_unix_server(server.handler, server.path)
    try:
        channel, peer = await connected(server)
        call = asyncio.ensure_future(channel.unary("/s/M", b"x" * 100, timeout=30))
        await peer.expect(FrameType.HEADERS)
        got = b""
        while True:
            data = await peer.expect(FrameType.DATA)
            got += data.payload
            assert len(data.payload) <= 10
            if data.flags & Flag.END_STREAM:
                break
            peer.send(window_update_frame(1, len(data.payload)))
        assert got == message(b"x" * 100)
        peer.send(answer(1, b"ok"))
        assert await asyncio.wait_for(call, 5) == b"ok"
        await channel.close()
    finally:
        listener.close()
        for task in server._tasks:
            task.cancel()


async def test_an_answer_before_the_whole_request_stops_the_upload(socket_dir: str) -> None:
    server = FakeServer(
        os.path.join(socket_dir, "s"), settings=settings_frame({Setting.INITIAL_WINDOW_SIZE: 10})
    )
    listener = await asyncio.start_unix_server(server.handler, server.path)
    try:
        channel, peer = await connected(server)
        call = asyncio.ensure_future(channel.unary("/s/M", b"x" * 100, timeout=30))
        await peer.expect(FrameType.HEADERS)
        first = await peer.expect(FrameType.DATA)
        assert not first.flags & Flag.END_STREAM
        status = encode_literal(b"grpc-status", b"3")
        peer.send(headers(1, STATUS_200, GRPC_TYPE, status, end=True))
        with pytest.raises(GrpcStatusError, match="INVALID_ARGUMENT"):
            await asyncio.wait_for(call, 5)
        reset = await peer.expect(FrameType.RST_STREAM)
        assert (reset.stream, parse_u32(reset.payload)) == (1, ErrorCode.CANCEL)
        peer.send(window_update_frame(1, 1000))  # too late: nothing more is sent on stream 1
        second = asyncio.ensure_future(channel.unary("/s/M", b"y", timeout=30))
        assert (await peer.expect(FrameType.HEADERS)).stream == 3
        data = await peer.expect(FrameType.DATA)
        assert (data.stream, data.payload) == (3, message(b"y"))
        peer.send(answer(3, b"ok"))
        assert await asyncio.wait_for(second, 5) == b"ok"
        await channel.close()
    finally:
        listener.close()
        for task in server._tasks:
            task.cancel()


async def test_a_reset_during_the_upload_is_not_answered_with_a_reset(socket_dir: str) -> None:
    server = FakeServer(
        os.path.join(socket_dir, "s"), settings=settings_frame({Setting.INITIAL_WINDOW_SIZE: 10})
    )
    listener = await asyncio.start_unix_server(server.handler, server.path)
    try:
        channel, peer = await connected(server)
        call = asyncio.ensure_future(channel.unary("/s/M", b"x" * 100, timeout=30))
        await peer.expect(FrameType.DATA)
        peer.send(rst_stream_frame(1, ErrorCode.REFUSED_STREAM))
        with pytest.raises(GrpcStatusError, match="UNAVAILABLE"):
            await asyncio.wait_for(call, 5)
        peer.send(frame(FrameType.PING, 0, 0, b"after..."))
        seen = []
        while not (seen and seen[-1] == (FrameType.PING, b"after...")):
            got = await asyncio.wait_for(peer.frames.get(), 5)
            seen.append((got.type, got.payload))
        assert FrameType.RST_STREAM not in [kind for kind, _ in seen]
        await channel.close()
    finally:
        listener.close()
        for task in server._tasks:
            task.cancel()


async def test_goaway_debug_text_is_shown_without_control_characters(fake: FakeServer) -> None:
    channel, peer = await connected(fake)
    call = asyncio.ensure_future(channel.unary("/s/M", b"1", timeout=30))
    await peer.expect(FrameType.HEADERS)
    peer.send(goaway_frame(0, ErrorCode.ENHANCE_YOUR_CALM, b"bye\x1b[31m\n"))
    with pytest.raises(ConnectionLost) as caught:
        await asyncio.wait_for(call, 5)
    assert "ENHANCE_YOUR_CALM: bye?[31m?" in str(caught.value)
    await channel.close()


async def test_a_header_block_split_by_continuation_is_one_block(fake: FakeServer) -> None:
    channel, peer = await connected(fake)
    call = asyncio.ensure_future(channel.unary("/s/M", b"req", timeout=30))
    await peer.expect(FrameType.HEADERS)
    peer.send(
        frame(FrameType.HEADERS, 0, 1, STATUS_200)
        + frame(FrameType.CONTINUATION, 0, 1, GRPC_TYPE[:3])
        + frame(FrameType.CONTINUATION, Flag.END_HEADERS, 1, GRPC_TYPE[3:])
        + frame(FrameType.DATA, 0, 1, message(b"split"))
        + headers(1, OK, end=True)
    )
    assert await asyncio.wait_for(call, 5) == b"split"
    await channel.close()


async def test_headers_of_a_stream_we_reset_still_feed_the_hpack_table(fake: FakeServer) -> None:
    channel, peer = await connected(fake)
    with pytest.raises(GrpcStatusError, match="DEADLINE_EXCEEDED"):
        await channel.unary("/s/M", b"req", timeout=0.05)
    await peer.expect(FrameType.RST_STREAM)
    # Too late for stream 1, but its block adds "grpc-status: 0" to the table (index 62) ...
    peer.send(headers(1, STATUS_200, GRPC_TYPE, b"\x40" + OK[1:], end=True))
    call = asyncio.ensure_future(channel.unary("/s/M", b"req", timeout=30))
    await peer.expect(FrameType.HEADERS)
    # ... which stream 3's trailers refer to by index alone.
    peer.send(
        headers(3, STATUS_200, GRPC_TYPE)
        + frame(FrameType.DATA, 0, 3, message(b"indexed"))
        + headers(3, encode_indexed(62), end=True)
    )
    assert await asyncio.wait_for(call, 5) == b"indexed"
    await channel.close()


async def test_long_request_headers_go_out_in_continuation_frames(fake: FakeServer) -> None:
    channel, peer = await connected(fake)
    path = "/s/" + "m" * 20_000
    call = asyncio.ensure_future(channel.unary(path, b"req", timeout=30))
    first = await peer.expect(FrameType.HEADERS)
    assert not first.flags & Flag.END_HEADERS
    rest = await peer.expect(FrameType.CONTINUATION)
    assert rest.flags & Flag.END_HEADERS
    assert dict(peer.decoder.decode(first.payload + rest.payload))[b":path"] == path.encode()
    peer.send(answer(1, b"long"))
    assert await asyncio.wait_for(call, 5) == b"long"
    await channel.close()


@pytest.mark.parametrize(
    ("seconds", "value"),
    [(0.2, b"200000u"), (1e-7, b"1u"), (150.0, b"150000m"), (1e6, b"1000000S"),
     (1e9, b"16666667M"), (1e12, b"99999999H")],
)  # fmt: skip
def test_grpc_timeout_is_eight_digits_rounded_up(seconds: float, value: bytes) -> None:
    assert grpc_timeout(seconds) == value


class _Sink(asyncio.Transport):
    """A transport that keeps what is written: the channel driven without a socket."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0


_STREAMS = st.sampled_from([0, 1, 1, 1, 3, 2, 1 << 31 | 1])
_FLAGS = st.sampled_from([0, 1, 4, 5, 8, 0x24, 0x25, 0xFF])
_BLOCKS = st.sampled_from(
    [
        STATUS_200 + GRPC_TYPE,
        OK,
        STATUS_200 + GRPC_TYPE + OK,
        b"\x40\x01a\x01b",
        b"\xbe",
        b"\x3f\xe1\x1f",
    ]
)
_U32 = st.integers(0, (1 << 32) - 1).map(lambda n: n.to_bytes(4, "big"))
_PAYLOADS = {
    FrameType.DATA: st.one_of(st.sampled_from([message(b"m"), b"\0\0"]), st.binary(max_size=20)),
    FrameType.HEADERS: st.one_of(_BLOCKS, st.binary(max_size=20)),
    FrameType.CONTINUATION: st.one_of(_BLOCKS, st.binary(max_size=8)),
    FrameType.RST_STREAM: _U32,
    FrameType.SETTINGS: st.lists(
        st.tuples(st.integers(0, 9), st.integers(0, (1 << 32) - 1)), max_size=3
    ).map(lambda pairs: b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in pairs)),
    FrameType.PING: st.binary(min_size=8, max_size=8),
    FrameType.GOAWAY: st.tuples(_U32, _U32, st.binary(max_size=8)).map(b"".join),
    FrameType.WINDOW_UPDATE: _U32,
    FrameType.PRIORITY: st.binary(min_size=5, max_size=5),
    FrameType.PUSH_PROMISE: st.binary(max_size=8),
}  # fmt: skip
SERVER_FRAMES = st.lists(
    st.one_of(
        *(st.tuples(st.just(int(t)), _FLAGS, _STREAMS, p) for t, p in _PAYLOADS.items()),
        st.tuples(st.integers(10, 255), _FLAGS, _STREAMS, st.binary(max_size=8)),
    ),
    max_size=12,
)


@settings(max_examples=300, deadline=None)
@given(SERVER_FRAMES)
def test_whatever_the_server_sends_a_call_ends_in_one_of_our_errors(
    frames: list[tuple[int, int, int, bytes]],
) -> None:
    async def main() -> None:
        channel = H2Channel(max_message=1024, authority=b"localhost")
        channel.connection_made(_Sink())
        channel.data_received(settings_frame({}))
        call = asyncio.ensure_future(channel.unary("/s/M", b"req", 5))
        await asyncio.sleep(0)  # stream 1 is open
        for kind, flags, stream, payload in frames:
            channel.data_received(frame(kind, flags, stream, payload))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        if call.done():
            error = call.exception()
            assert error is None or isinstance(error, (ConnectionLost, GrpcStatusError)), error
        channel.connection_lost(None)
        with contextlib.suppress(ConnectionLost, GrpcStatusError):
            await asyncio.wait_for(call, 1)
        assert channel.statistics().in_flight == 0

    asyncio.run(main())


# -- the Go KV plugin (grpc-go via go-plugin), unsandboxed -------------------------------------

PLUGIN_ENV = {
    "PATH": "/usr/bin:/bin",
    "BASIC_PLUGIN": "hello",
    "PLUGIN_PROTOCOL_VERSIONS": "1",
    "PLUGIN_MIN_PORT": "10000",
    "PLUGIN_MAX_PORT": "25000",
}


@pytest.fixture(scope="module")
def kv_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from grpc_build import GO_BINARY, ToolchainMissing, build_kv_go

    built = tmp_path_factory.mktemp("kv-go")
    try:
        build_kv_go(built)
    except ToolchainMissing as exc:
        if IN_CI:
            raise
        pytest.skip(str(exc))
    return built / GO_BINARY


@pytest.fixture
def go_plugin(kv_binary: Path, socket_dir: str) -> Iterator[str]:
    """The plugin's socket path, from its handshake line."""
    proc = subprocess.Popen(
        [str(kv_binary)],
        env={**PLUGIN_ENV, "TMPDIR": socket_dir},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=socket_dir,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        fields = line.split("|")
        assert fields[2] == "unix", line
        yield fields[3]
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


async def test_go_plugin_put_get_and_health(go_plugin: str) -> None:
    channel = await H2Channel.connect(go_plugin)
    try:
        assert (
            await channel.unary("/grpc.health.v1.Health/Check", b"\n\x06plugin", 5) == b"\x08\x01"
        )
        assert await channel.unary("/proto.KV/Put", b"\n\x01a\x12\x02hi", 5) == b""
        assert await channel.unary("/proto.KV/Get", b"\n\x01a", 5) == b"\n\x02hi"
    finally:
        await channel.close()


async def test_go_plugin_error_status(go_plugin: str) -> None:
    channel = await H2Channel.connect(go_plugin)
    try:
        with pytest.raises(GrpcStatusError) as caught:
            await channel.unary("/proto.KV/Get", b"\n\x07missing", 5)
        assert (caught.value.code, caught.value.name) == (2, "UNKNOWN")
        assert "no value for key" in caught.value.message
        with pytest.raises(GrpcStatusError) as caught:
            await channel.unary("/proto.KV/Nope", b"", 5)
        assert caught.value.name == "UNIMPLEMENTED"
        assert (
            await channel.unary("/grpc.health.v1.Health/Check", b"\n\x06plugin", 5) == b"\x08\x01"
        )
    finally:
        await channel.close()


@pytest.mark.usefixtures("no_leaks")
async def test_go_plugin_64_concurrent_calls(go_plugin: str) -> None:
    channel = await H2Channel.connect(go_plugin)
    try:
        await asyncio.gather(
            *(channel.unary("/proto.KV/Put", b"\n\x02k" + bytes([i]) + b"\x12\x01" + bytes([i]), 5)
              for i in range(64))
        )  # fmt: skip
        answers = await asyncio.gather(
            *(channel.unary("/proto.KV/Get", b"\n\x02k" + bytes([i]), 5) for i in range(64))
        )
        assert answers == [b"\n\x01" + bytes([i]) for i in range(64)]
        assert channel.statistics().peak_in_flight == 64
        assert channel.statistics().in_flight == 0
    finally:
        await channel.close()


async def test_go_plugin_deadline(go_plugin: str) -> None:
    channel = await H2Channel.connect(go_plugin)
    try:
        with pytest.raises(GrpcStatusError) as caught:
            await channel.unary("/proto.KV/Get", b"\n\x01a", 1e-6)
        assert caught.value.name == "DEADLINE_EXCEEDED"
        with pytest.raises(GrpcStatusError, match="DEADLINE_EXCEEDED"):
            await channel.unary("/proto.KV/Get", b"\n\x01a", 0)
        assert (
            await channel.unary("/grpc.health.v1.Health/Check", b"\n\x06plugin", 5) == b"\x08\x01"
        )
    finally:
        await channel.close()


async def test_go_plugin_large_values_cross_both_windows(go_plugin: str) -> None:
    # 300 KB each way: past grpc-go's 64 KiB initial windows and our 256 KiB stream window.
    value = os.urandom(300_000)
    put = b"\n\x01v\x12" + _varint(len(value)) + value
    channel = await H2Channel.connect(go_plugin)
    try:
        await channel.unary("/proto.KV/Put", put, 10)
        assert (
            await channel.unary("/proto.KV/Get", b"\n\x01v", 10)
            == b"\n" + _varint(len(value)) + value
        )
    finally:
        await channel.close()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


# -- grpcio's Python server --------------------------------------------------------------------


@pytest.fixture
async def grpcio_server(socket_dir: str) -> AsyncIterator[tuple[str, list[str]]]:
    pytest.importorskip("grpc")
    import grpc
    import grpc.aio

    events: list[str] = []

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    async def fail(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "nothing here: café 100%")

    async def slow(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            events.append("cancelled")
            raise
        return b""

    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
        },
    )
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 8 << 20),
                 ("grpc.max_send_message_length", 8 << 20)]
    )  # fmt: skip
    server.add_generic_rpc_handlers((handler,))
    path = os.path.join(socket_dir, "grpcio")
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    yield path, events
    await server.stop(None)


async def test_grpcio_server_echo_error_and_concurrency(
    grpcio_server: tuple[str, list[str]],
) -> None:
    path, _ = grpcio_server
    channel = await H2Channel.connect(path)
    try:
        assert await channel.unary("/test.Echo/Echo", b"hello", 5) == b"hello"
        assert await channel.unary("/test.Echo/Echo", b"", 5) == b""
        with pytest.raises(GrpcStatusError) as caught:
            await channel.unary("/test.Echo/Fail", b"x", 5)
        assert (caught.value.name, caught.value.message) == ("NOT_FOUND", "nothing here: café 100%")
        answers = await asyncio.gather(
            *(channel.unary("/test.Echo/Echo", str(i).encode(), 5) for i in range(64))
        )
        assert answers == [str(i).encode() for i in range(64)]
    finally:
        await channel.close()


async def test_grpcio_server_large_messages_and_our_limit(
    grpcio_server: tuple[str, list[str]],
) -> None:
    path, _ = grpcio_server
    big = os.urandom(3 << 20)
    channel = await H2Channel.connect(path, max_message=4 << 20)
    try:
        assert await channel.unary("/test.Echo/Echo", big, 20) == big
    finally:
        await channel.close()
    small = await H2Channel.connect(path, max_message=1 << 20)
    try:
        with pytest.raises(GrpcStatusError, match="RESOURCE_EXHAUSTED"):
            await small.unary("/test.Echo/Echo", big[: 1 << 20] + b"x", 20)
        # Echo of exactly the limit: the answer is at the limit, accepted.
        assert await small.unary("/test.Echo/Echo", big[: 1 << 20], 20) == big[: 1 << 20]
    finally:
        await small.close()


async def test_grpcio_server_sees_our_deadline(grpcio_server: tuple[str, list[str]]) -> None:
    path, events = grpcio_server
    channel = await H2Channel.connect(path)
    try:
        t0 = time.monotonic()
        with pytest.raises(GrpcStatusError, match="DEADLINE_EXCEEDED"):
            await channel.unary("/test.Echo/Slow", b"", 0.3)
        assert time.monotonic() - t0 < 2
        for _ in range(50):
            if events:
                break
            await asyncio.sleep(0.05)
        assert events == ["cancelled"]
        assert await channel.unary("/test.Echo/Echo", b"still", 5) == b"still"
    finally:
        await channel.close()
