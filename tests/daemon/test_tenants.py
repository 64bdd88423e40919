"""The host config's [tenants] (issue 21): parsed strictly, ceilings only narrowing, and each
caller identified as the kernel names it."""

from __future__ import annotations

import pytest

from sandboxer import ConfigError, HostConfig
from sandboxer._tenants import identify


def _config(tenants: dict, **host: object) -> HostConfig:
    return HostConfig.from_mapping({"host": host, "tenants": tenants}, source="t.toml")


ALICE = {"uids": [1001], "path_roots": ["/srv/alice"]}


def test_a_tenant_as_the_issue_writes_it() -> None:
    config = _config({"alice": {**ALICE, "max_plugins": 10, "max_memory": "2GiB",
                                "allow_network": False}})
    (alice,) = config.tenants
    assert (alice.name, alice.uids, alice.path_roots) == ("alice", (1001,), ("/srv/alice",))
    assert alice.max_plugins == 10 and alice.max_memory == 2 << 30
    narrowed = alice.policy(config)
    assert narrowed.allow_unsandboxed is False  # never, for a tenant
    assert narrowed.path_roots == ()  # no grants: the daemon would open them as root
    assert narrowed.allowed_hosts == () and narrowed.allow_full_network is False


def test_ceilings_only_narrow() -> None:
    config = HostConfig.from_mapping({
        "host": {"allow_full_network": False, "allowed_hosts": ["example.com:443"]},
        "limits": {"max_memory_limit": "512MiB"},
        "tenants": {"alice": {**ALICE, "max_memory_limit": "1GiB", "max_cpu_limit": 0.5,
                              "allow_full_network": True, "allowed_hosts": ["example.com:443"]}},
    })
    narrowed = config.tenants[0].policy(config)
    assert narrowed.max_memory_limit == 512 << 20  # the host's is smaller
    assert narrowed.max_cpu_limit == 0.5
    assert narrowed.allow_full_network is False  # the host does not allow it
    assert narrowed.allowed_hosts == ("example.com:443",)
    with pytest.raises(ConfigError, match="tenants.alice.allowed_hosts: hosts among the host's"):
        _config({"alice": {**ALICE, "allowed_hosts": ["evil.example:443"]}})


@pytest.mark.parametrize(("tenants", "field"), [
    ({"alice": {"path_roots": ["/srv/alice"]}}, "tenants.alice: uids or gids"),
    ({"alice": {"uids": [1001]}}, "tenants.alice.path_roots"),
    ({"alice": {**ALICE, "uids": [0]}}, "tenants.alice.uids"),
    ({"alice": {**ALICE, "uids": ["1001"]}}, "tenants.alice.uids"),
    ({"alice": {**ALICE, "path_roots": ["relative"]}}, "tenants.alice.path_roots"),
    ({"alice": {**ALICE, "max_plugins": 0}}, "tenants.alice.max_plugins"),
    ({"alice": {**ALICE, "allow_unsandboxed": True}}, "tenants.alice.allow_unsandboxed"),
    ({"alice": ALICE, "bob": {"uids": [1001], "path_roots": ["/srv/bob"]}}, "tenants.bob.uids"),
    ({"alice": "nope"}, "tenants.alice"),
    ([], "tenants"),
])
def test_a_bad_tenant_is_named(tenants: object, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        HostConfig.from_mapping({"tenants": tenants}, source="t.toml")
    assert field in str(info.value)


def test_path_roots_lie_under_the_hosts() -> None:
    with pytest.raises(ConfigError, match="under the host's path_roots"):
        _config({"alice": ALICE}, path_roots=["/srv/tenants"])
    assert _config({"alice": {**ALICE, "path_roots": ["/srv/tenants/alice"]}},
                   path_roots=["/srv/tenants"]).tenants


def test_who_is_who() -> None:
    config = _config({"alice": ALICE, "ops": {"gids": [2000], "path_roots": ["/srv/ops"]}})
    alice, ops = sorted(config.tenants, key=lambda t: t.name)
    assert identify(config.tenants, 1001, 1001, ()) is alice
    assert identify(config.tenants, 1500, 2000, ()) is ops  # by its gid
    assert identify(config.tenants, 1500, 1500, (10, 2000)) is ops  # by a supplementary group
    assert identify(config.tenants, 1001, 2000, ()) is alice  # the uid first
    assert identify(config.tenants, 1500, 1500, (10,)) is None


def test_a_library_reads_a_file_with_tenants(tmp_path) -> None:
    path = tmp_path / "sandboxer.toml"
    path.write_text('[host]\ndrain_timeout = "5s"\n\n[tenants.alice]\nuids = [1001]\n'
                    'path_roots = ["/srv/alice"]\n')
    config = HostConfig.load(path)
    assert config.drain_timeout == 5 and config.tenants[0].name == "alice"
