"""go-plugin's handshake line, read as hostile input: every refusal names what was wrong."""

from __future__ import annotations

import pytest

from sandboxer.errors import HandshakeError
from sandboxer.loaders.grpc.handshake import GoPluginEndpoint, parse_handshake

DIR = "/run/sandboxer/grpc"


def parse(line: bytes, app: int = 1) -> GoPluginEndpoint:
    return parse_handshake(line, plugin_id="acme.kv", app_version=app, socket_dir=DIR)


@pytest.mark.parametrize(
    ("line", "endpoint"),
    [
        (b"1|1|unix|/run/sandboxer/grpc/plugin123|grpc\n", GoPluginEndpoint(1, "unix", path=f"{DIR}/plugin123")),
        (b"1|1|tcp|127.0.0.1:1234|grpc\n", GoPluginEndpoint(1, "tcp", host="127.0.0.1", port=1234)),
        (b"1|1|tcp|[::1]:10000|grpc", GoPluginEndpoint(1, "tcp", host="::1", port=10000)),
        (b"1|1|tcp|127.0.0.2:25000|grpc\r\n", GoPluginEndpoint(1, "tcp", host="127.0.0.2", port=25000)),
        # go-plugin 1.0's own line: always a sixth field, empty without AutoMTLS
        (b"1|1|unix|/run/sandboxer/grpc/plugin9|grpc|\n", GoPluginEndpoint(1, "unix", path=f"{DIR}/plugin9")),
    ],
)
def test_the_lines_go_plugin_and_its_python_guide_print(line: bytes, endpoint: GoPluginEndpoint) -> None:
    assert parse(line) == endpoint


@pytest.mark.parametrize(
    ("line", "app", "says"),
    [
        (b"", 1, "not a go-plugin handshake"),
        (b"hello world\n", 1, "not a go-plugin handshake"),
        (b"1|1|unix|/run/sandboxer/grpc/p\xff|grpc", 1, "not a go-plugin handshake"),
        (b"1|1|unix|" + b"a" * 5000 + b"|grpc", 1, "not a go-plugin handshake"),
        (b"1|1|tcp|127.0.0.1:1234", 1, "not a go-plugin handshake"),
        (b"2|1|tcp|127.0.0.1:1234|grpc", 1, "core protocol version is '2'"),
        (b"1|3|tcp|127.0.0.1:1234|grpc", 1, "app protocol version is '3'"),
        (b"1|1|tcp|127.0.0.1:1234|grpc", 2, "protocol_version is 2"),
        (b"1|1|tcp|127.0.0.1:1234|netrpc", 1, "gRPC plugins only"),
        (b"1|1|tcp|127.0.0.1:1234|grpc|" + b"Q" * 60, 1, "AutoMTLS"),
        (b"1|1|udp|127.0.0.1:1234|grpc", 1, "network is 'udp'"),
        (b"1|1|tcp|10.0.0.1:1234|grpc", 1, "not a loopback address"),
        (b"1|1|tcp|0.0.0.0:1234|grpc", 1, "not a loopback address"),
        (b"1|1|tcp|localhost:1234|grpc", 1, "not a loopback address"),
        (b"1|1|tcp|127.0.0.1:0|grpc", 1, "not a loopback address"),
        (b"1|1|tcp|127.0.0.1:65536|grpc", 1, "not a loopback address"),
        (b"1|1|tcp|127.0.0.1|grpc", 1, "not a loopback address"),
        (b"1|1|unix|/tmp/plugin123|grpc", 1, "not directly in /run/sandboxer/grpc"),
        (b"1|1|unix|/run/sandboxer/grpc/../../etc/x|grpc", 1, "not directly in"),
        (b"1|1|unix|/run/sandboxer/grpc/sub/plugin|grpc", 1, "not directly in"),
        (b"1|1|unix|/run/sandboxer/grpc/..|grpc", 1, "not directly in"),
        (b"1|1|unix|/run/sandboxer/grpc/|grpc", 1, "not directly in"),
    ],
)
def test_a_bad_line_is_a_named_handshake_error(line: bytes, app: int, says: str) -> None:
    with pytest.raises(HandshakeError, match="plugin acme.kv: ") as caught:
        parse(line, app)
    assert says in str(caught.value)
    assert caught.value.plugin_id == "acme.kv"
