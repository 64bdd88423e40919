"""A gRPC plugin's methods from its descriptor set, and the JSON mapping of its messages."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sandboxer.errors import PluginCallError, PluginLoadError
from sandboxer.loaders.grpc.schema import GrpcSchema, decode_response, encode_request, load_schema

KV_PROTO = """\
syntax = "proto3";
package proto;
import "google/protobuf/timestamp.proto";

message GetRequest { string key = 1; }
message GetResponse { bytes value = 1; }
message PutRequest { string key = 1; bytes value = 2; }
message Empty {}
message Many { int64 n = 1; repeated string tags = 2; uint32 small = 3; double d = 4;
               google.protobuf.Timestamp at = 5; map<string, int32> counts = 6; }

service KV {
    rpc Get(GetRequest) returns (GetResponse);
    rpc Put(PutRequest) returns (Empty);
    rpc Echo(Many) returns (Many);
}
service Streamer { rpc Watch(GetRequest) returns (stream GetResponse); }
service Uploader { rpc Send(stream PutRequest) returns (Empty); }
"""


def descriptor_set(tmp_path: Path, proto: str = KV_PROTO) -> bytes:
    protoc = shutil.which("protoc")
    assert protoc, "protoc is missing: apt-get install protobuf-compiler (scripts/bootstrap.sh)"
    (tmp_path / "kv.proto").write_text(proto)
    out = tmp_path / "kv.pb"
    subprocess.run(
        [protoc, f"-I{tmp_path}", "--include_imports", f"--descriptor_set_out={out}", "kv.proto"],
        check=True,
        cwd=tmp_path,
    )
    return out.read_bytes()


@pytest.fixture
def kv(tmp_path: Path) -> GrpcSchema:
    return load_schema(descriptor_set(tmp_path), "proto.KV", plugin_id="acme.kv", source="kv.pb")


def test_the_service_methods_and_their_paths(kv: GrpcSchema) -> None:
    assert sorted(kv.methods) == ["Echo", "Get", "Put"]
    assert kv.methods["Get"].path == "/proto.KV/Get"
    assert kv.methods["Put"].request.DESCRIPTOR.full_name == "proto.PutRequest"


def test_canonical_proto3_json_both_ways(kv: GrpcSchema) -> None:
    echo = kv.methods["Echo"]
    data = encode_request(
        echo,
        (
            {
                "n": "-9007199254740993",
                "tags": ["a", "b"],
                "small": 7,
                "d": "Infinity",
                "at": "2026-12-06T01:02:03Z",
                "counts": {"x": 1},
            },
        ),
        plugin_id="acme.kv",
    )
    assert decode_response(echo, data) == {
        "n": "-9007199254740993",  # 64-bit integers as strings, exactly
        "tags": ["a", "b"],
        "small": 7,
        "d": "Infinity",
        "at": "2026-12-06T01:02:03Z",
        "counts": {"x": 1},
    }
    put = encode_request(kv.methods["Put"], ({"key": "k", "value": "aGk="},), plugin_id="acme.kv")
    assert kv.methods["Put"].request.FromString(put).value == b"hi"  # bytes from base64
    get = kv.methods["Get"]
    assert decode_response(get, get.response(value=b"\x00\xff").SerializeToString()) == {
        "value": "AP8="
    }
    assert decode_response(get, b"") == {}  # defaults are left out
    assert encode_request(get, (), plugin_id="acme.kv") == b""  # no argument: empty request


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (({"nope": 1},), 'has no field named "nope"'),
        (({"key": 3},), "Failed to parse key field"),
        (({"value": "not base64!"},), "does not match proto.GetRequest"),
        ((["key"],), "one argument, a JSON object for proto.GetRequest"),
        (("key",), "of type str"),
        (({"key": "a"}, {"key": "b"}), "not 2 argument(s)"),
    ],
)
def test_a_request_that_does_not_match_is_a_named_error(
    kv: GrpcSchema, args: tuple[object, ...], says: str
) -> None:
    with pytest.raises(PluginCallError) as caught:
        encode_request(kv.methods["Get"], args, plugin_id="acme.kv")
    assert says in caught.value.message and caught.value.code == -32602
    assert caught.value.method == "Get"


def test_a_response_that_is_not_the_message_is_refused(kv: GrpcSchema) -> None:
    with pytest.raises(ValueError, match="not a proto.GetResponse"):
        decode_response(kv.methods["Get"], b"\xff\xff\xff")


@pytest.mark.parametrize(
    ("service", "says"),
    [
        ("proto.Nope", "no service 'proto.Nope' (services: proto.KV, proto.Streamer, proto.Uploader)"),
        ("proto.Streamer", "streaming methods (Watch)"),
        ("proto.Uploader", "streaming methods (Send)"),
    ],
)
def test_a_service_sandboxer_cannot_call_is_refused_at_load(
    tmp_path: Path, service: str, says: str
) -> None:
    with pytest.raises(PluginLoadError, match="plugin acme.kv: kv.pb: ") as caught:
        load_schema(descriptor_set(tmp_path), service, plugin_id="acme.kv", source="kv.pb")
    assert says in str(caught.value)


def test_a_malformed_descriptor_set_is_refused_at_load(tmp_path: Path) -> None:
    with pytest.raises(PluginLoadError, match="not a protobuf descriptor set"):
        load_schema(b"\xff garbage", "proto.KV", plugin_id="acme.kv", source="kv.pb")
    # one that parses but does not hold together: the Timestamp import left out
    whole = descriptor_set(tmp_path)
    from google.protobuf import descriptor_pb2

    files = descriptor_pb2.FileDescriptorSet.FromString(whole)
    del files.file[0]  # google/protobuf/timestamp.proto comes first (--include_imports)
    with pytest.raises(PluginLoadError, match="does not hold together"):
        load_schema(files.SerializeToString(), "proto.KV", plugin_id="acme.kv", source="kv.pb")
