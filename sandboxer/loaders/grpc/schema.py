"""A gRPC plugin's methods, from its protobuf descriptors, and their JSON mapping.

The manifest names the service (``[grpc] service``) and where its types are described
(``[grpc] proto``). From a descriptor set (``protoc --descriptor_set_out --include_imports``)
this builds the service's methods with their request and response message types, refusing at
load what cannot be called as a JSON method: a service that is not there, a streaming method,
a descriptor set that does not parse or does not hold together.

A call's argument is one JSON object in protobuf's canonical proto3 JSON mapping (or none: an
empty request); the answer comes back the same way (bytes as base64, 64-bit integers as
strings, fields at their default left out). A field the message does not have is refused with
the message's name, never dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from ...errors import INVALID_PARAMS, PluginCallError, PluginLoadError

__all__ = ["GrpcMethod", "GrpcSchema", "load_schema", "encode_request", "decode_response"]


@dataclass(frozen=True)
class GrpcMethod:
    """One unary method: its gRPC path (``/package.Service/Method``) and message types."""

    name: str
    path: str
    request: type[Message]
    response: type[Message]


@dataclass(frozen=True)
class GrpcSchema:
    service: str
    methods: Mapping[str, GrpcMethod]


def load_schema(data: bytes, service: str, *, plugin_id: str, source: str) -> GrpcSchema:
    """The methods of ``service`` in the descriptor set ``data`` (read from ``source``)."""

    def refuse(why: str) -> PluginLoadError:
        return PluginLoadError(f"plugin {plugin_id}: {source}: {why}", plugin_id=plugin_id)

    files = descriptor_pb2.FileDescriptorSet()
    try:
        files.ParseFromString(data)
    except DecodeError as exc:
        raise refuse(f"not a protobuf descriptor set ({exc})") from None
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        try:
            pool.Add(file)  # type: ignore[no-untyped-call]  # (types-protobuf leaves the pool untyped)
        except (TypeError, KeyError, ValueError) as exc:
            raise refuse(
                f"its descriptor of {file.name!r} does not hold together ({exc})"
            ) from None
    try:
        found: ServiceDescriptor = pool.FindServiceByName(service)  # type: ignore[no-untyped-call]
    except KeyError:
        services = sorted(
            f"{f.package}.{s.name}" if f.package else s.name for f in files.file for s in f.service
        )
        raise refuse(
            f"no service {service!r} (services: {', '.join(services) or 'none'})"
        ) from None
    streaming = [m.name for m in found.methods if m.client_streaming or m.server_streaming]
    if streaming:
        raise refuse(
            f"{service} has streaming methods ({', '.join(streaming)}); sandboxer calls unary "
            "gRPC methods only"
        )
    methods = {
        m.name: GrpcMethod(
            name=m.name,
            path=f"/{service}/{m.name}",
            request=message_factory.GetMessageClass(m.input_type),
            response=message_factory.GetMessageClass(m.output_type),
        )
        for m in found.methods
    }
    return GrpcSchema(service, MappingProxyType(methods))


def encode_request(method: GrpcMethod, args: tuple[Any, ...], *, plugin_id: str) -> bytes:
    """The request's bytes from a call's arguments: none, or one JSON object."""
    type_name = method.request.DESCRIPTOR.full_name
    if len(args) > 1 or (args and not isinstance(args[0], dict)):
        raise PluginCallError(
            f"plugin {plugin_id}: {method.name} takes one argument, a JSON object for "
            f"{type_name}, not {len(args)} argument(s)"
            + (f" of type {type(args[0]).__name__}" if len(args) == 1 else ""),
            code=INVALID_PARAMS,
            plugin_id=plugin_id,
            method=method.name,
        )
    request = method.request()
    if args:
        try:
            json_format.ParseDict(args[0], request, ignore_unknown_fields=False)
        except json_format.ParseError as exc:
            raise PluginCallError(
                f"plugin {plugin_id}: the argument of {method.name} does not match "
                f"{type_name}: {exc}",
                code=INVALID_PARAMS,
                plugin_id=plugin_id,
                method=method.name,
            ) from None
    data: bytes = request.SerializeToString()
    return data


def decode_response(method: GrpcMethod, data: bytes) -> Any:
    """The response as canonical proto3 JSON (ValueError: not that message's bytes)."""
    response = method.response()
    try:
        response.ParseFromString(data)
    except DecodeError as exc:
        raise ValueError(f"not a {method.response.DESCRIPTOR.full_name}: {exc}") from None
    return json_format.MessageToDict(response)
