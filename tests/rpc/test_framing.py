"""NDJSON framing and JSON-RPC message shapes (sandboxer/rpc/framing.py, DESIGN section 7).

Everything here is what an untrusted plugin can put on the wire: every bad frame must be a
ProtocolError naming what was wrong, never another exception, and the frame limit must hold
however the bytes are chunked.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from sandboxer.errors import ProtocolError
from sandboxer.rpc import framing
from sandboxer.rpc.framing import (
    LineBuffer,
    Notification,
    Request,
    Response,
    encode_error,
    encode_notification,
    encode_request,
    encode_result,
    parse_message,
)

MiB = 1 << 20


def feed_all(buf: LineBuffer, chunks: list[bytes]) -> list[bytes]:
    lines: list[bytes] = []
    for chunk in chunks:
        lines += buf.feed(chunk)
    return lines


# -- LineBuffer ----------------------------------------------------------------------------------

def test_a_line_split_across_chunks_is_joined():
    buf = LineBuffer(1024)
    assert buf.feed(b'{"a"') == []
    assert buf.pending == 4
    assert buf.feed(b":1") == []
    assert buf.feed(b"}\n") == [b'{"a":1}']
    assert buf.pending == 0


def test_many_lines_in_one_chunk_come_out_in_order_and_keep_the_tail():
    buf = LineBuffer(1024)
    assert buf.feed(b"one\ntwo\nthree\nfo") == [b"one", b"two", b"three"]
    assert buf.pending == 2
    assert buf.feed(b"ur\n\nfive\n") == [b"four", b"", b"five"]
    assert buf.pending == 0


def test_a_chunk_that_completes_a_line_and_starts_the_next():
    buf = LineBuffer(1024)
    buf.feed(b"ab")
    assert buf.feed(b"c\nde\nf") == [b"abc", b"de"]
    assert buf.feed(b"\n") == [b"f"]


def test_every_split_point_gives_the_same_lines():
    stream = b"alpha\nbeta\n\ngamma delta\nepsilon\n"
    expected = stream.split(b"\n")[:-1]
    for cut in range(len(stream) + 1):
        for cut2 in range(cut, len(stream) + 1):
            buf = LineBuffer(64)
            assert feed_all(buf, [stream[:cut], stream[cut:cut2], stream[cut2:]]) == expected


@pytest.mark.parametrize("chunking", ["whole", "bytewise", "split_before_newline"])
def test_a_frame_of_exactly_the_limit_is_accepted(chunking: str):
    limit = 100
    frame = b"x" * limit + b"\n"
    chunks = {"whole": [frame], "bytewise": [frame[i:i + 1] for i in range(len(frame))],
              "split_before_newline": [frame[:-1], frame[-1:]]}[chunking]
    buf = LineBuffer(limit)
    assert feed_all(buf, chunks) == [b"x" * limit]


@pytest.mark.parametrize("chunking", ["whole", "bytewise", "two_halves", "after_a_line"])
def test_a_frame_one_over_the_limit_is_refused(chunking: str):
    limit = 100
    frame = b"x" * (limit + 1) + b"\n"
    chunks = {"whole": [frame], "bytewise": [frame[i:i + 1] for i in range(len(frame))],
              "two_halves": [frame[:50], frame[50:]],
              "after_a_line": [b"ok\n" + frame]}[chunking]
    buf = LineBuffer(limit)
    with pytest.raises(ProtocolError, match=r"\b100\b.*limit|limit.*\b100\b"):
        feed_all(buf, chunks)


def test_an_oversized_line_behind_a_good_one_is_refused():
    buf = LineBuffer(10)
    with pytest.raises(ProtocolError, match="limit"):
        buf.feed(b"short\n" + b"y" * 11 + b"\nshort\n")


def test_a_newline_less_stream_is_refused_as_soon_as_it_passes_the_limit():
    limit = 1000
    buf = LineBuffer(limit)
    fed = 0
    with pytest.raises(ProtocolError, match="without a newline"):
        while True:
            buf.feed(b"z" * 7)
            fed += 7
            assert fed <= limit, "kept buffering past the limit"
    # Refused on the very chunk that crossed the limit, and nothing past it was kept.
    assert limit - 7 < fed + 7 <= limit + 7
    assert buf.pending <= limit


def test_a_newline_less_tail_over_the_limit_is_refused_with_a_line_before_it():
    buf = LineBuffer(10)
    with pytest.raises(ProtocolError, match="without a newline"):
        buf.feed(b"ok\n" + b"q" * 11)


def test_a_16_mib_frame_in_4_kib_chunks_comes_out_whole():
    limit = 16 * MiB
    payload = bytes(range(256)).replace(b"\n", b"N") * (limit // 256)
    assert len(payload) == limit
    buf = LineBuffer(limit)
    step = 4096
    out: list[bytes] = []
    for i in range(0, limit, step):
        out += buf.feed(payload[i:i + step])
    assert out == []
    assert buf.pending == limit
    assert buf.feed(b"\nnext") == [payload]
    assert buf.pending == 4


def test_default_limit_is_16_mib():
    assert framing.DEFAULT_MAX_FRAME == 16 * MiB
    assert LineBuffer().max_frame == 16 * MiB


# -- parse_message: bad frames -------------------------------------------------------------------

BAD_FRAMES = {
    "not_an_object_array": (b'[{"jsonrpc":"2.0","id":1,"result":1}]', "object"),
    "not_an_object_string": (b'"hello"', "object"),
    "not_an_object_number": (b"42", "object"),
    "not_an_object_null": (b"null", "object"),
    "missing_jsonrpc": (b'{"id":1,"result":1}', "jsonrpc"),
    "wrong_version": (b'{"jsonrpc":"1.0","id":1,"result":1}', "jsonrpc"),
    "version_as_number": (b'{"jsonrpc":2.0,"id":1,"result":1}', "jsonrpc"),
    "method_not_a_string": (b'{"jsonrpc":"2.0","id":1,"method":7,"params":[]}', "method"),
    "method_null": (b'{"jsonrpc":"2.0","id":1,"method":null}', "method"),
    "params_a_string": (b'{"jsonrpc":"2.0","id":1,"method":"m","params":"x"}', "params"),
    "params_a_number": (b'{"jsonrpc":"2.0","id":1,"method":"m","params":3}', "params"),
    "params_a_bool": (b'{"jsonrpc":"2.0","method":"m","params":true}', "params"),
    "request_id_a_bool": (b'{"jsonrpc":"2.0","id":true,"method":"m","params":[]}', "id"),
    "request_id_a_float": (b'{"jsonrpc":"2.0","id":1.5,"method":"m","params":[]}', "id"),
    "request_id_an_object": (b'{"jsonrpc":"2.0","id":{},"method":"m","params":[]}', "id"),
    "request_id_an_array": (b'{"jsonrpc":"2.0","id":[1],"method":"m","params":[]}', "id"),
    "response_id_a_bool": (b'{"jsonrpc":"2.0","id":false,"result":1}', "id"),
    "response_id_a_float": (b'{"jsonrpc":"2.0","id":1.0,"result":1}', "id"),
    "response_id_an_object": (b'{"jsonrpc":"2.0","id":{"n":1},"result":1}', "id"),
    "response_id_past_64_bits": (b'{"jsonrpc":"2.0","id":18446744073709551616,"result":1}',
                                 "id"),
    "both_result_and_error": (b'{"jsonrpc":"2.0","id":1,"result":1,'
                              b'"error":{"code":1,"message":"m"}}', "not both"),
    "neither_result_nor_error": (b'{"jsonrpc":"2.0","id":1}', "exactly one"),
    "neither_method_nor_id": (b'{"jsonrpc":"2.0","result":1}', "method"),
    "just_the_version": (b'{"jsonrpc":"2.0"}', "method"),
    "error_not_an_object": (b'{"jsonrpc":"2.0","id":1,"error":"bad"}', "error"),
    "error_without_code": (b'{"jsonrpc":"2.0","id":1,"error":{"message":"m"}}', "code"),
    "error_code_a_bool": (b'{"jsonrpc":"2.0","id":1,"error":{"code":true,"message":"m"}}',
                          "code"),
    "error_code_a_float": (b'{"jsonrpc":"2.0","id":1,"error":{"code":1.5,"message":"m"}}',
                           "code"),
    "error_code_a_string": (b'{"jsonrpc":"2.0","id":1,"error":{"code":"1","message":"m"}}',
                            "code"),
    "error_message_not_a_string": (b'{"jsonrpc":"2.0","id":1,"error":{"code":1,"message":2}}',
                                   "message"),
    "error_without_message": (b'{"jsonrpc":"2.0","id":1,"error":{"code":1}}', "message"),
    "invalid_json_truncated": (b'{"jsonrpc":"2.0","id":1,', "invalid JSON"),
    "invalid_json_garbage": (b"this is not json", "invalid JSON"),
    "invalid_json_nan": (b'{"jsonrpc":"2.0","id":1,"result":NaN}', "invalid JSON"),
    "invalid_json_infinite_number": (b'{"jsonrpc":"2.0","id":1,"result":1e400}',
                                     "invalid JSON"),
    "invalid_json_lone_surrogate": (b'{"jsonrpc":"2.0","id":1,"result":"\\ud800"}',
                                    "invalid JSON"),
    "invalid_json_control_character": (b'{"jsonrpc":"2.0","id":1,"result":"a\x01"}',
                                       "invalid JSON"),
    "invalid_json_too_deep": (b'{"jsonrpc":"2.0","id":1,"result":' + b"[" * 5000
                              + b"]" * 5000 + b"}", "invalid JSON"),
    "invalid_utf8": (b'{"jsonrpc":"2.0","id":1,"result":"\xff\xfe"}', "invalid JSON"),
    "invalid_utf8_overlong": (b'{"jsonrpc":"2.0","id":1,"result":"\xc0\xaf"}', "invalid JSON"),
    "empty": (b"", "invalid JSON"),
    "whitespace_only": (b"   ", "invalid JSON"),
}


@pytest.mark.parametrize("frame,fragment", BAD_FRAMES.values(), ids=BAD_FRAMES.keys())
def test_a_bad_frame_is_a_protocol_error_saying_what_is_wrong(frame: bytes, fragment: str):
    with pytest.raises(ProtocolError) as info:
        parse_message(frame)
    assert fragment.lower() in str(info.value).lower()


def test_invalid_json_message_quotes_the_start_of_the_frame():
    with pytest.raises(ProtocolError, match="garbage from plugin"):
        parse_message(b"garbage from plugin" + b"!" * 500)


# -- parse_message: good frames ------------------------------------------------------------------

GOOD_FRAMES = {
    "request_with_array_params": (b'{"jsonrpc":"2.0","id":1,"method":"greet","params":["x"]}',
                                  Request(1, "greet", ["x"])),
    "request_with_object_params": (b'{"jsonrpc":"2.0","id":"a","method":"m","params":{"k":1}}',
                                   Request("a", "m", {"k": 1})),
    "request_without_params": (b'{"jsonrpc":"2.0","id":0,"method":"sandboxer.health"}',
                               Request(0, "sandboxer.health", None)),
    "request_with_negative_id": (b'{"jsonrpc":"2.0","id":-5,"method":"m","params":[]}',
                                 Request(-5, "m", [])),
    "notification": (b'{"jsonrpc":"2.0","method":"sandboxer.log",'
                     b'"params":{"level":"info","message":"hi"}}',
                     Notification("sandboxer.log", {"level": "info", "message": "hi"})),
    "notification_without_params": (b'{"jsonrpc":"2.0","method":"ping"}',
                                    Notification("ping", None)),
    "result": (b'{"jsonrpc":"2.0","id":3,"result":{"a":[1,2.5,null,true,"s"]}}',
               Response(3, result={"a": [1, 2.5, None, True, "s"]})),
    "null_result": (b'{"jsonrpc":"2.0","id":"x","result":null}', Response("x", result=None)),
    "error": (b'{"jsonrpc":"2.0","id":4,"error":{"code":-32601,"message":"no method"}}',
              Response(4, error={"code": -32601, "message": "no method"})),
    "error_with_data": (b'{"jsonrpc":"2.0","id":4,"error":{"code":7,"message":"m",'
                        b'"data":{"type":"ValueError"}}}',
                        Response(4, error={"code": 7, "message": "m",
                                           "data": {"type": "ValueError"}})),
    "error_with_null_id": (b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"p"}}',
                           Response(None, error={"code": -32700, "message": "p"})),
    "surrounding_whitespace": (b' {"jsonrpc":"2.0","id":1,"result":1}\r',
                               Response(1, result=1)),
    "unicode": ('{"jsonrpc":"2.0","id":1,"result":"héllo ☃ 𝄞"}'.encode(),
                Response(1, result="héllo ☃ 𝄞")),
}


@pytest.mark.parametrize("frame,expected", GOOD_FRAMES.values(), ids=GOOD_FRAMES.keys())
def test_a_good_frame_parses_to_its_message(frame: bytes, expected: object):
    message = parse_message(frame)
    assert type(message) is type(expected)
    assert message == expected


def test_error_codes_are_the_json_rpc_spec_table():
    # JSON-RPC 2.0 section 5.1; a project once shipped -32602 for internal error.
    assert framing.PARSE_ERROR == -32700
    assert framing.INVALID_REQUEST == -32600
    assert framing.METHOD_NOT_FOUND == -32601
    assert framing.INVALID_PARAMS == -32602
    assert framing.INTERNAL_ERROR == -32603


def test_encoders_write_one_newline_terminated_line():
    frames = [encode_request(1, "m", ["a\nb"]), encode_notification("n", {"x": "\n"}),
              encode_result(1, "line1\nline2"), encode_error(1, 5, "bad\nthing", {"d": "\n"})]
    for frame in frames:
        assert frame.endswith(b"\n") and frame.count(b"\n") == 1
        assert json.loads(frame)["jsonrpc"] == "2.0"


def test_encode_error_leaves_out_absent_data():
    assert "data" not in json.loads(encode_error(2, -32603, "boom"))["error"]
    assert parse_message(encode_error(2, -32603, "boom")[:-1]) == Response(
        2, error={"code": -32603, "message": "boom"})


# -- properties ----------------------------------------------------------------------------------

@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(1, 200))
@settings(max_examples=500, deadline=None)
def test_any_bytes_raise_nothing_but_protocol_error(chunks: list[bytes], limit: int):
    buf = LineBuffer(limit)
    try:
        for chunk in chunks:
            for line in buf.feed(chunk):
                assert len(line) <= limit
                try:
                    parse_message(line)
                except ProtocolError:
                    pass
    except ProtocolError:
        pass


JSON_KEYS = st.text(max_size=8)
JSON_SCALARS = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
JSON = st.recursive(JSON_SCALARS,
                    lambda inner: st.lists(inner, max_size=5)
                    | st.dictionaries(JSON_KEYS, inner, max_size=5),
                    max_leaves=25)
JSON_STRUCTURED = st.lists(JSON, max_size=5) | st.dictionaries(JSON_KEYS, JSON, max_size=5)
IDS = st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20)


FIELDS = st.sampled_from(["jsonrpc", "id", "method", "params", "result", "error", "code",
                          "message", "data"])
FIELD_VALUES = st.one_of(st.just("2.0"), IDS, JSON, st.fixed_dictionaries(
    {}, optional={"code": JSON | st.integers(), "message": JSON | st.text(), "data": JSON}))
PLAUSIBLE_FRAMES = st.dictionaries(FIELDS, FIELD_VALUES, max_size=6).map(
    lambda obj: json.dumps(obj).encode())


@given(PLAUSIBLE_FRAMES)
@settings(max_examples=500, deadline=None)
def test_any_object_frame_parses_or_raises_protocol_error(frame: bytes):
    try:
        message = parse_message(frame)
    except ProtocolError:
        return
    # What does parse is well-formed enough for the client to act on without checking again.
    assert isinstance(message, (Request, Notification, Response))
    if isinstance(message, (Request, Notification)):
        assert isinstance(message.method, str)
        assert message.params is None or isinstance(message.params, (list, dict))
    if isinstance(message, Request) or (isinstance(message, Response) and message.id is not None):
        assert type(message.id) in (int, str)
    if isinstance(message, Response) and message.error is not None:
        assert type(message.error["code"]) is int and type(message.error["message"]) is str


def _through_the_wire(frame: bytes, split: int):
    buf = LineBuffer(framing.DEFAULT_MAX_FRAME)
    cut = split % (len(frame) + 1)
    lines = buf.feed(frame[:cut]) + buf.feed(frame[cut:])
    assert len(lines) == 1 and buf.pending == 0
    return parse_message(lines[0])


@given(IDS, st.text(min_size=1, max_size=30), JSON_STRUCTURED, st.integers(0, 10_000))
@settings(max_examples=300, deadline=None)
def test_requests_round_trip(rid, method, params, split):
    assert _through_the_wire(encode_request(rid, method, params), split) == Request(
        rid, method, params)


@given(st.text(min_size=1, max_size=30), JSON_STRUCTURED, st.integers(0, 10_000))
@settings(max_examples=200, deadline=None)
def test_notifications_round_trip(method, params, split):
    assert _through_the_wire(encode_notification(method, params), split) == Notification(
        method, params)


@given(IDS, JSON, st.integers(0, 10_000))
@settings(max_examples=300, deadline=None)
def test_results_round_trip(rid, result, split):
    assert _through_the_wire(encode_result(rid, result), split) == Response(rid, result=result)


@given(IDS | st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=40), JSON,
       st.integers(0, 10_000))
@settings(max_examples=300, deadline=None)
def test_errors_round_trip(rid, code, message, data, split):
    error = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    assert _through_the_wire(encode_error(rid, code, message, data), split) == Response(
        rid, error=error)
