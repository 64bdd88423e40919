"""The public surface: everything in __all__ imports, nothing private leaks into it."""

import importlib
import types

import sandboxer


def test_every_public_name_imports():
    for name in sandboxer.__all__:
        assert getattr(sandboxer, name) is not None, name


def test_nothing_private_is_public():
    assert [n for n in sandboxer.__all__ if n.startswith("_") and n != "__version__"] == []
    exported = {n for n in dir(sandboxer) if not n.startswith("_")
                and not isinstance(getattr(sandboxer, n), types.ModuleType)}
    assert exported - set(sandboxer.__all__) == set()


def test_error_tree_matches_the_design():
    e = sandboxer
    assert issubclass(e.HandshakeError, e.PluginLoadError)
    assert issubclass(e.IntegrityError, e.PluginLoadError)
    assert issubclass(e.SandboxUnavailable, e.PluginLoadError)
    assert issubclass(e.MethodNotFound, e.PluginCallError)
    for limit in (e.MemoryLimitExceeded, e.CallTimeout, e.CpuLimitExceeded):
        assert issubclass(limit, e.ResourceLimitExceeded)
    for top in (e.ManifestError, e.PluginNotFound, e.PluginLoadError, e.PluginCallError,
                e.PluginCrashed, e.ResourceLimitExceeded, e.ProtocolError, e.RegistryError,
                e.ReloadError):
        assert issubclass(top, e.SandboxerError)


def test_py_typed_ships():
    spec = importlib.util.find_spec("sandboxer")
    assert spec and spec.origin
    from pathlib import Path
    assert (Path(spec.origin).parent / "py.typed").is_file()


def test_the_manifest_types_are_public_and_the_same_objects():
    from sandboxer import manifest
    for name in ("LoaderType", "Plugin", "Protocol", "GrpcSpec", "GoPluginHandshake"):
        assert name in sandboxer.__all__, name
        assert getattr(sandboxer, name) is getattr(manifest, name), name
    assert [p.value for p in sandboxer.Protocol] == ["jsonrpc", "grpc"]
