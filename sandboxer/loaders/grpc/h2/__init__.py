"""A minimal gRPC unary client over one HTTP/2 connection on the asyncio loop.

Written from RFC 9113 (HTTP/2), RFC 7541 (HPACK) and grpc's PROTOCOL-HTTP2.md to replace
grpcio's asyncio layer on the call path of go-plugin plugins (loader.py). One module per job:
``frames`` (the wire layout), ``huffman`` and ``hpack`` (header compression), ``status`` (gRPC
status codes and errors), ``channel`` (the connection and its calls). It must never trust the
server: see channel.py's docstring for what a hostile one gets.
"""

from .channel import DEFAULT_MAX_MESSAGE, ChannelStatistics, H2Channel
from .status import ConnectionLost, GrpcStatusError, ProtocolViolation, StatusCode

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "ChannelStatistics",
    "ConnectionLost",
    "GrpcStatusError",
    "H2Channel",
    "ProtocolViolation",
    "StatusCode",
]
