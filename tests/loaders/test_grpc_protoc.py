"""A gRPC plugin's .proto files, compiled by protoc inside the sandbox (issue 19).

Written as a plugin author would: plain .proto files in a plugin directory with a plugin.toml
naming them. protoc runs for real, sandboxed; nothing is left behind (``no_leaks``).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from sandboxer.errors import CallTimeout, PluginLoadError, SandboxUnavailable
from sandboxer.loaders.grpc import protoc
from sandboxer.loaders.grpc.schema import load_schema
from sandboxer.loaders.out_of_process import ProcessLoader
from sandboxer.manifest import LoaderType, Plugin, load_plugin

pytestmark = [
    pytest.mark.usefixtures("no_leaks"),
    # Under CI=true conftest turns this skip into a failure: CI must have protoc.
    pytest.mark.skipif(
        shutil.which("protoc") is None,
        reason="protoc is missing: apt-get install protobuf-compiler (scripts/bootstrap.sh)",
    ),
]

KV_PROTO = """\
syntax = "proto3";
package proto;

message GetRequest { string key = 1; }
message GetResponse { bytes value = 1; }
message PutRequest { string key = 1; bytes value = 2; }
message Empty {}

service KV {
    rpc Get(GetRequest) returns (GetResponse);
    rpc Put(PutRequest) returns (Empty);
}
"""

MANIFEST = """\
[plugin]
id = "acme.kv"
version = "1.0.0"
type = "external"
protocol = "grpc"
entrypoint = "plugin"

[grpc]
proto = {proto}
service = "proto.KV"

[grpc.handshake]
protocol_version = 1
magic_cookie_key = "BASIC_PLUGIN"
magic_cookie_value = "hello"
"""


def make_plugin(
    root: Path, files: dict[str, str | bytes], proto: list[str] | None = None
) -> Plugin:
    """A plugin directory holding ``files``; its manifest lists ``proto`` (default: all)."""
    root.mkdir()
    (root / "plugin").write_text("#!/bin/sh\nexit 0\n")
    os.chmod(root / "plugin", 0o755)
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            (root / name).write_bytes(content)
        else:
            (root / name).write_text(content)
    listed = list(files) if proto is None else proto
    (root / "plugin.toml").write_text(
        MANIFEST.format(proto="[" + ", ".join(f'"{n}"' for n in listed) + "]")
    )
    return load_plugin(root)


def unique(text: str) -> str:
    """``text`` with a comment no other test has: its first compile cannot be a cache hit."""
    return f"// {uuid.uuid4()}\n{text}"


@pytest.fixture
def loader() -> ProcessLoader:
    return ProcessLoader(LoaderType.EXTERNAL)


async def test_a_good_proto_compiles_to_a_schema(tmp_path: Path, loader: ProcessLoader) -> None:
    plugin = make_plugin(tmp_path / "kv", {"kv.proto": unique(KV_PROTO)})
    data = await protoc.descriptor_set(plugin, loader=loader)
    schema = load_schema(data, "proto.KV", plugin_id=plugin.id, source="kv.proto")
    assert sorted(schema.methods) == ["Get", "Put"]
    assert schema.methods["Put"].path == "/proto.KV/Put"
    assert schema.methods["Get"].response.DESCRIPTOR.full_name == "proto.GetResponse"


async def test_a_well_known_type_import_is_included(tmp_path: Path, loader: ProcessLoader) -> None:
    source = KV_PROTO.replace(
        "package proto;\n",
        'package proto;\nimport "google/protobuf/timestamp.proto";\n',
    ).replace("bytes value = 1; }", "bytes value = 1; google.protobuf.Timestamp at = 2; }")
    plugin = make_plugin(tmp_path / "kv", {"kv.proto": unique(source)})
    data = await protoc.descriptor_set(plugin, loader=loader)
    schema = load_schema(data, "proto.KV", plugin_id=plugin.id, source="kv.proto")
    response = schema.methods["Get"].response
    assert (
        response.DESCRIPTOR.fields_by_name["at"].message_type.full_name
        == "google.protobuf.Timestamp"
    )


async def test_one_listed_file_imports_another(tmp_path: Path, loader: ProcessLoader) -> None:
    messages = "\n".join(line for line in KV_PROTO.splitlines() if line.startswith("message"))
    service = KV_PROTO.split("message Empty {}\n")[1]
    plugin = make_plugin(
        tmp_path / "kv",
        {
            "types/messages.proto": f'syntax = "proto3";\npackage proto;\n{messages}\n',
            "kv.proto": unique(
                'syntax = "proto3";\npackage proto;\nimport "types/messages.proto";\n' + service
            ),
        },
    )
    data = await protoc.descriptor_set(plugin, loader=loader)
    schema = load_schema(data, "proto.KV", plugin_id=plugin.id, source="kv.proto")
    assert schema.methods["Get"].request.DESCRIPTOR.file.name == "types/messages.proto"


async def test_a_syntax_error_is_protocs_message_with_its_line(
    tmp_path: Path, loader: ProcessLoader
) -> None:
    broken = KV_PROTO.replace("message Empty {}", "message Empty { int32 x = }")
    plugin = make_plugin(tmp_path / "kv", {"kv.proto": broken})
    with pytest.raises(PluginLoadError) as caught:
        await protoc.descriptor_set(plugin, loader=loader)
    message = str(caught.value)
    assert "plugin acme.kv" in message and caught.value.plugin_id == "acme.kv"
    assert "kv.proto:7:" in message  # protoc's own "file:line:column: ..."
    assert "Expected field number" in message


@pytest.mark.parametrize(
    ("name", "import_", "why"),
    [
        ("absolute_host_file", "/etc/passwd", "/etc/passwd: File not found"),
        ("parent_directory", "../outside.proto", "are not allowed in the virtual path"),
        ("deeper_parent", "sub/../../outside.proto", "are not allowed in the virtual path"),
        # not listed in [grpc] proto: protoc sees only the listed files
        ("unlisted_sibling", "sibling.proto", "sibling.proto: File not found"),
    ],
)
async def test_an_import_cannot_reach_outside_the_listed_files(
    tmp_path: Path, loader: ProcessLoader, name: str, import_: str, why: str
) -> None:
    secret = 'syntax = "proto3";\nmessage Outside { string secret = 1; }\n'
    (tmp_path / "outside.proto").write_text(secret)
    source = KV_PROTO.replace("package proto;\n", f'package proto;\nimport "{import_}";\n')
    plugin = make_plugin(
        tmp_path / "kv", {"kv.proto": source, "sibling.proto": secret}, proto=["kv.proto"]
    )
    with pytest.raises(PluginLoadError) as caught:
        await protoc.descriptor_set(plugin, loader=loader)
    message = str(caught.value)
    assert why in message
    assert f'Import "{import_}" was not found or had errors' in message


async def test_a_proto_file_swapped_for_a_link_is_refused(
    tmp_path: Path, loader: ProcessLoader
) -> None:
    plugin = make_plugin(tmp_path / "kv", {"kv.proto": KV_PROTO})
    (tmp_path / "elsewhere.proto").write_text(KV_PROTO)
    # After the manifest checked it: the loader's own read must not follow the link.
    (tmp_path / "kv" / "kv.proto").unlink()
    (tmp_path / "kv" / "kv.proto").symlink_to(tmp_path / "elsewhere.proto")
    before = protoc.statistics()
    with pytest.raises(
        PluginLoadError, match=r"\[grpc\] proto kv.proto cannot be read: a symbolic link"
    ):
        await protoc.descriptor_set(plugin, loader=loader)
    assert protoc.statistics().runs == before.runs


async def test_a_directory_on_the_way_swapped_for_a_link_is_refused(
    tmp_path: Path, loader: ProcessLoader
) -> None:
    plugin = make_plugin(tmp_path / "kv", {"protos/kv.proto": KV_PROTO})
    (tmp_path / "kv" / "protos").rename(tmp_path / "real")
    (tmp_path / "kv" / "protos").symlink_to(tmp_path / "real")
    with pytest.raises(PluginLoadError, match="a symbolic link is on its way"):
        await protoc.descriptor_set(plugin, loader=loader)


async def test_the_cache_answers_without_running_protoc_again(
    tmp_path: Path, loader: ProcessLoader
) -> None:
    source = unique(KV_PROTO)
    plugin = make_plugin(tmp_path / "kv", {"kv.proto": source})
    first = await protoc.descriptor_set(plugin, loader=loader)
    after_first = protoc.statistics()
    # Another plugin directory with the same file: same content, same key.
    twin = make_plugin(tmp_path / "twin", {"kv.proto": source})
    assert await protoc.descriptor_set(plugin, loader=loader) == first
    assert await protoc.descriptor_set(twin, loader=loader) == first
    after = protoc.statistics()
    assert (after.runs, after.compiles) == (after_first.runs, after_first.compiles)
    assert after.hits == after_first.hits + 2
    # A changed file is compiled again.
    (tmp_path / "kv" / "kv.proto").write_text(source.replace("string key = 1;", "string name = 1;"))
    changed = await protoc.descriptor_set(plugin, loader=loader)
    assert changed != first
    assert protoc.statistics().compiles == after.compiles + 1


async def test_a_descriptor_set_is_read_without_protoc(
    tmp_path: Path, loader: ProcessLoader
) -> None:
    compiled = await protoc.descriptor_set(
        make_plugin(tmp_path / "src", {"kv.proto": KV_PROTO}), loader=loader
    )
    plugin = make_plugin(tmp_path / "kv", {"kv.pb": compiled})
    before = protoc.statistics()
    data = await protoc.descriptor_set(plugin, loader=loader)
    assert data == compiled
    assert protoc.statistics().runs == before.runs
    assert sorted(load_schema(data, "proto.KV", plugin_id=plugin.id, source="kv.pb").methods) == [
        "Get",
        "Put",
    ]


async def test_a_descriptor_set_swapped_for_a_link_is_refused(
    tmp_path: Path, loader: ProcessLoader
) -> None:
    plugin = make_plugin(tmp_path / "kv", {"kv.pb": b""})
    (tmp_path / "kv" / "kv.pb").unlink()
    (tmp_path / "kv" / "kv.pb").symlink_to("/etc/passwd")
    with pytest.raises(
        PluginLoadError, match=r"\[grpc\] proto kv.pb cannot be read: a symbolic link"
    ):
        await protoc.descriptor_set(plugin, loader=loader)


async def test_a_fifo_is_refused_without_blocking(tmp_path: Path, loader: ProcessLoader) -> None:
    plugin = make_plugin(tmp_path / "kv", {"kv.proto": KV_PROTO})
    (tmp_path / "kv" / "kv.proto").unlink()
    os.mkfifo(tmp_path / "kv" / "kv.proto")
    with pytest.raises(PluginLoadError, match="cannot be read: not a regular file"):
        await protoc.descriptor_set(plugin, loader=loader)


async def test_protoc_past_its_deadline_is_stopped(
    tmp_path: Path, loader: ProcessLoader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protoc, "PROTOC_SANDBOX", protoc.PROTOC_SANDBOX.replace(timeout=0.001))
    monkeypatch.setattr(protoc, "_cache", protoc._Cache())  # its version query runs too
    plugin = make_plugin(tmp_path / "kv", {"kv.proto": unique(KV_PROTO)})
    with pytest.raises(
        CallTimeout, match=r"plugin acme.kv: protoc did not finish .* within 0.001s"
    ):
        await protoc.descriptor_set(plugin, loader=loader)


async def test_without_protoc_the_error_says_how_to_install_it(
    tmp_path: Path, loader: ProcessLoader, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protoc, "EXEC_PATH", (str(tmp_path / "empty-bin"),))
    plugin = make_plugin(tmp_path / "kv", {"kv.proto": KV_PROTO})
    with pytest.raises(SandboxUnavailable, match="apt-get install protobuf-compiler") as caught:
        await protoc.descriptor_set(plugin, loader=loader)
    assert caught.value.missing == "protoc"


def test_protoc_runs_under_the_strict_profile_without_network() -> None:
    sandbox = protoc.PROTOC_SANDBOX
    assert sandbox.profile == "strict" and not sandbox.network_allowed
    assert sandbox.allowed_paths == ()
    assert sandbox.memory_limit == 256 << 20 and sandbox.timeout == 30.0
