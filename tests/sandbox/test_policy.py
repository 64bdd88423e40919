"""Sandbox policy: path grants, host patterns, the host config, and effective_config()."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sandboxer import config as host_config
from sandboxer.config import HostConfig
from sandboxer.errors import ConfigError, PluginLoadError
from sandboxer.sandbox import policy
from sandboxer.sandbox.policy import (
    PathGrant,
    SandboxConfig,
    SandboxRequest,
    effective_config,
    parse_host_pattern,
    parse_path_grant,
)

MiB = 1 << 20


# -- parse_path_grant ------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "grant"),
    [
        pytest.param("/data", PathGrant("/data", False), id="bare-is-read-only"),
        pytest.param("/data:ro", PathGrant("/data", False), id="explicit-ro"),
        pytest.param("/data:rw", PathGrant("/data", True), id="rw"),
        pytest.param("/data/", PathGrant("/data", False), id="trailing-slash-trimmed"),
        pytest.param("/srv/a/b:rw", PathGrant("/srv/a/b", True), id="deep-rw"),
        pytest.param("/", PathGrant("/", False), id="root"),
        pytest.param("/:rw", PathGrant("/", True), id="root-rw"),
    ],
)
def test_parse_path_grant_good(text: str, grant: PathGrant) -> None:
    assert parse_path_grant(text) == grant


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("data", id="relative"),
        pytest.param("./data", id="dot-relative"),
        pytest.param("", id="empty"),
        pytest.param(":rw", id="mode-without-path"),
        pytest.param("/data/../etc", id="dotdot"),
        pytest.param("/data/./x", id="dot-component"),
        pytest.param("/a//b", id="double-slash-inside"),
        pytest.param("//data", id="double-slash-leading"),
        pytest.param("/da\0ta", id="nul-byte"),
        pytest.param(1, id="int"),
        pytest.param(None, id="none"),
        pytest.param(["/data"], id="list"),
    ],
)
def test_parse_path_grant_bad(text: object) -> None:
    with pytest.raises(ValueError):
        parse_path_grant(text)


def test_path_grant_str_spells_mode() -> None:
    assert str(PathGrant("/data", True)) == "/data:rw"
    assert str(PathGrant("/data")) == "/data"
    assert parse_path_grant(str(PathGrant("/x/y", True))) == PathGrant("/x/y", True)


# -- parse_host_pattern ----------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        pytest.param("example.com", "example.com", id="hostname"),
        pytest.param("*.example.com", "*.example.com", id="wildcard"),
        pytest.param("example.com:443", "example.com:443", id="hostname-port"),
        pytest.param("*.example.com:8443", "*.example.com:8443", id="wildcard-port"),
        pytest.param("10.0.0.1", "10.0.0.1", id="ipv4"),
        pytest.param("10.0.0.1:53", "10.0.0.1:53", id="ipv4-port"),
        pytest.param("[::1]:8080", "[::1]:8080", id="ipv6-bracketed-port"),
        pytest.param("[::1]", "[::1]", id="ipv6-bracketed"),
        pytest.param("::1", "::1", id="ipv6-bare"),
        pytest.param("10.0.0.0/8", "10.0.0.0/8", id="ipv4-cidr"),
        pytest.param("fd00::/8", "fd00::/8", id="ipv6-cidr"),
        pytest.param("Example.COM", "example.com", id="lower-cased"),
        pytest.param("localhost", "localhost", id="single-label"),
        pytest.param("a-b.example.co.uk:65535", "a-b.example.co.uk:65535", id="max-port"),
        pytest.param("example.com:1", "example.com:1", id="min-port"),
    ],
)
def test_parse_host_pattern_good(text: str, normalised: str) -> None:
    assert parse_host_pattern(text) == normalised


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("*.com", id="wildcard-one-label"),
        pytest.param("*", id="wildcard-alone"),
        pytest.param("*.*.example.com", id="double-wildcard"),
        pytest.param("ex*ample.com", id="star-inside-label"),
        pytest.param("exa mple.com", id="space"),
        pytest.param("exa_mple.com", id="underscore"),
        pytest.param("-example.com", id="label-starts-with-dash"),
        pytest.param("example.com.", id="trailing-dot"),
        pytest.param("example..com", id="empty-label"),
        pytest.param("a" * 64 + ".com", id="label-over-63"),
        pytest.param(".".join(["a" * 63] * 4), id="name-over-253"),
        pytest.param("a" * 301, id="over-300-chars"),
        pytest.param("example.com:0", id="port-zero"),
        pytest.param("example.com:70000", id="port-too-big"),
        pytest.param("example.com:", id="empty-port"),
        pytest.param("example.com:http", id="named-port"),
        pytest.param("[::1", id="unclosed-bracket"),
        pytest.param("[::1]x", id="junk-after-bracket"),
        pytest.param("[::1]:", id="bracket-empty-port"),
        pytest.param("[example.com]:80", id="hostname-in-brackets"),
        pytest.param("1.2.3", id="three-octets"),
        pytest.param("256.1.1.1", id="octet-too-big"),
        pytest.param("10.0.0.1/8", id="cidr-host-bits-set"),
        pytest.param("10.0.0.0/8:80", id="cidr-with-port"),
        pytest.param("example.com/8", id="hostname-with-prefix"),
        pytest.param("http://example.com", id="url"),
        pytest.param("", id="empty"),
        pytest.param(42, id="int"),
        pytest.param(None, id="none"),
    ],
)
def test_parse_host_pattern_bad(text: object) -> None:
    with pytest.raises(ValueError):
        parse_host_pattern(text)


# -- HostConfig.from_mapping -----------------------------------------------------------------

def test_from_mapping_empty_is_defaults() -> None:
    assert HostConfig.from_mapping({}) == HostConfig()
    assert HostConfig.from_mapping({"host": {}, "limits": {}}, source="x") == HostConfig(source="x")


def test_from_mapping_reads_every_field() -> None:
    cfg = HostConfig.from_mapping(
        {
            "host": {
                "allow_unsandboxed": False,
                "allow_full_network": True,
                "default_profile": "strict",
                "path_roots": ["/data/", "/srv"],
                "drain_timeout": "2s",
                "handshake_timeout": 3,
                "max_frame": "1MiB",
                "profile_dirs": ["/etc/sandboxer/profiles"],
            },
            "limits": {
                "max_memory_limit": "512MiB",
                "max_cpu_limit": 2,
                "max_timeout": "1m",
                "max_pids": 64,
            },
        },
        source="/etc/sandboxer/sandboxer.toml",
    )
    assert cfg == HostConfig(
        allow_unsandboxed=False,
        allow_full_network=True,
        default_profile="strict",
        path_roots=("/data", "/srv"),
        max_memory_limit=512 * MiB,
        max_cpu_limit=2.0,
        max_timeout=60.0,
        max_pids=64,
        drain_timeout=2.0,
        handshake_timeout=3.0,
        max_frame=MiB,
        profile_dirs=("/etc/sandboxer/profiles",),
        source="/etc/sandboxer/sandboxer.toml",
    )
    assert isinstance(cfg.max_cpu_limit, float)


@pytest.mark.parametrize(
    ("mapping", "field"),
    [
        pytest.param({"extra": {}}, "extra", id="unknown-table"),
        pytest.param({"host": 1}, "host", id="host-not-table"),
        pytest.param({"limits": []}, "limits", id="limits-not-table"),
        pytest.param({"host": {"colour": "red"}}, "host.colour", id="host-unknown-key"),
        pytest.param({"host": {"allow_unsandboxed": "yes"}}, "host.allow_unsandboxed",
                     id="allow-unsandboxed-string"),
        pytest.param({"host": {"allow_full_network": 1}}, "host.allow_full_network",
                     id="allow-full-network-int"),
        pytest.param({"host": {"default_profile": "Strict"}}, "host.default_profile",
                     id="default-profile-upper-case"),
        pytest.param({"host": {"default_profile": 1}}, "host.default_profile",
                     id="default-profile-int"),
        pytest.param({"host": {"path_roots": "/data"}}, "host.path_roots",
                     id="path-roots-not-list"),
        pytest.param({"host": {"path_roots": ["data"]}}, "host.path_roots",
                     id="path-roots-relative"),
        pytest.param({"host": {"path_roots": ["/data/../etc"]}}, "host.path_roots",
                     id="path-roots-dotdot"),
        pytest.param({"host": {"path_roots": [1]}}, "host.path_roots", id="path-roots-int-item"),
        pytest.param({"host": {"profile_dirs": ["profiles"]}}, "host.profile_dirs",
                     id="profile-dirs-relative"),
        pytest.param({"host": {"drain_timeout": 0}}, "host.drain_timeout", id="drain-timeout-0"),
        pytest.param({"host": {"handshake_timeout": "soon"}}, "host.handshake_timeout",
                     id="handshake-timeout-word"),
        pytest.param({"host": {"max_frame": "big"}}, "host.max_frame", id="max-frame-word"),
        pytest.param({"host": {"max_frame": 0}}, "host.max_frame", id="max-frame-zero"),
        pytest.param({"limits": {"max_memory_limit": "lots"}}, "limits.max_memory_limit",
                     id="max-memory-word"),
        pytest.param({"limits": {"max_memory_limit": 0}}, "limits.max_memory_limit",
                     id="max-memory-zero"),
        pytest.param({"limits": {"max_memory_limit": True}}, "limits.max_memory_limit",
                     id="max-memory-bool"),
        pytest.param({"limits": {"max_cpu_limit": 0}}, "limits.max_cpu_limit", id="max-cpu-zero"),
        pytest.param({"limits": {"max_cpu_limit": "2"}}, "limits.max_cpu_limit",
                     id="max-cpu-string"),
        pytest.param({"limits": {"max_cpu_limit": True}}, "limits.max_cpu_limit",
                     id="max-cpu-bool"),
        pytest.param({"limits": {"max_cpu_limit": 2000}}, "limits.max_cpu_limit",
                     id="max-cpu-above-1024"),
        pytest.param({"limits": {"max_cpu_limit": float("nan")}}, "limits.max_cpu_limit",
                     id="max-cpu-nan"),
        pytest.param({"limits": {"max_timeout": "1 fortnight"}}, "limits.max_timeout",
                     id="max-timeout-unknown-unit"),
        pytest.param({"limits": {"max_timeout": -1}}, "limits.max_timeout",
                     id="max-timeout-negative"),
        pytest.param({"limits": {"max_pids": 0}}, "limits.max_pids", id="max-pids-zero"),
        pytest.param({"limits": {"max_fuel": 0}}, "limits.max_fuel", id="max-fuel-zero"),
        pytest.param({"limits": {"max_fuel": "x"}}, "limits.max_fuel", id="max-fuel-word"),
        pytest.param({"host": {"wasm_instances": 0}}, "host.wasm_instances", id="pool-zero"),
        pytest.param({"host": {"wasm_instances": 65}}, "host.wasm_instances", id="pool-65"),
        pytest.param({"host": {"wasm_instances": True}}, "host.wasm_instances", id="pool-bool"),
        pytest.param({"host": {"egress_max_connections": 0}}, "host.egress_max_connections",
                     id="egress-connections-zero"),
        pytest.param({"host": {"egress_max_connections": "many"}},
                     "host.egress_max_connections", id="egress-connections-word"),
        pytest.param({"host": {"egress_header_timeout": "soon"}}, "host.egress_header_timeout",
                     id="egress-header-timeout-word"),
        pytest.param({"host": {"egress_hosts_file": "relative/hosts"}},
                     "host.egress_hosts_file", id="egress-hosts-relative"),
        pytest.param({"limits": {"max_pids": True}}, "limits.max_pids", id="max-pids-bool"),
        pytest.param({"limits": {"max_pids": 1.5}}, "limits.max_pids", id="max-pids-float"),
        pytest.param({"limits": {"max_pids": (1 << 22) + 1}}, "limits.max_pids",
                     id="max-pids-too-many"),
        pytest.param({"limits": {"max_files": 10}}, "limits.max_files", id="limits-unknown-key"),
    ],
)
def test_from_mapping_bad(mapping: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        HostConfig.from_mapping(mapping, source="/etc/sandboxer/test.toml")
    err = info.value
    assert err.field == field
    assert err.path == "/etc/sandboxer/test.toml"
    assert str(err).startswith(f"/etc/sandboxer/test.toml: {field}: ")


@pytest.mark.parametrize("key", ["max_cpu_limit", "max_timeout"])
def test_from_mapping_huge_int_is_a_config_error(key: str) -> None:
    with pytest.raises(ConfigError):
        HostConfig.from_mapping({"limits": {key: 10**400}})


# -- HostConfig.load -------------------------------------------------------------------------

GOOD_CONFIG = textwrap.dedent("""\
    [host]
    allow_full_network = true
    path_roots = ["/data"]

    [limits]
    max_memory_limit = "128MiB"
    """)


@pytest.fixture
def no_env_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No $SANDBOXER_CONFIG, and the system path pointed at a file that does not exist."""
    monkeypatch.delenv("SANDBOXER_CONFIG", raising=False)
    absent = tmp_path / "etc" / "sandboxer.toml"
    # load() reads the module global at call time, so patching the module attribute works.
    monkeypatch.setattr(host_config, "DEFAULT_CONFIG_PATH", str(absent))
    return absent


def _assert_good(cfg: HostConfig, source: Path) -> None:
    assert cfg.allow_full_network is True
    assert cfg.path_roots == ("/data",)
    assert cfg.max_memory_limit == 128 * MiB
    assert cfg.source == str(source)


def test_load_explicit_file(no_env_config: Path, tmp_path: Path) -> None:
    f = tmp_path / "host.toml"
    f.write_text(GOOD_CONFIG)
    _assert_good(HostConfig.load(f), f)
    _assert_good(HostConfig.load(str(f)), f)


def test_load_explicit_missing_file_is_an_error(no_env_config: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        HostConfig.load(missing)
    assert info.value.field == "(file)"
    assert str(missing) in str(info.value)


def test_load_directory_is_an_error(no_env_config: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        HostConfig.load(tmp_path)
    assert info.value.field == "(file)"


def test_load_from_environment(
    no_env_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "env.toml"
    f.write_text(GOOD_CONFIG)
    # A system file exists too: the environment wins over it.
    no_env_config.parent.mkdir()
    no_env_config.write_text('[host]\ndefault_profile = "strict"\n')
    monkeypatch.setenv("SANDBOXER_CONFIG", str(f))
    cfg = HostConfig.load()
    _assert_good(cfg, f)
    assert cfg.default_profile == "default"


def test_load_environment_missing_file_is_an_error(
    no_env_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "env-missing.toml"
    monkeypatch.setenv("SANDBOXER_CONFIG", str(missing))
    with pytest.raises(ConfigError) as info:
        HostConfig.load()
    assert info.value.field == "(file)"
    assert str(missing) in str(info.value)


def test_load_argument_beats_environment(
    no_env_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "arg.toml"
    f.write_text(GOOD_CONFIG)
    monkeypatch.setenv("SANDBOXER_CONFIG", str(tmp_path / "env-missing.toml"))
    _assert_good(HostConfig.load(f), f)


def test_load_missing_system_file_gives_defaults(no_env_config: Path) -> None:
    assert not no_env_config.exists()
    assert HostConfig.load() == HostConfig()


def test_load_empty_environment_falls_back_to_system_file(
    no_env_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SANDBOXER_CONFIG", "")
    assert HostConfig.load() == HostConfig()


def test_load_reads_system_file(no_env_config: Path) -> None:
    no_env_config.parent.mkdir()
    no_env_config.write_text(GOOD_CONFIG)
    _assert_good(HostConfig.load(), no_env_config)


def test_load_broken_system_file_is_an_error(no_env_config: Path) -> None:
    no_env_config.parent.mkdir()
    no_env_config.write_text("[host\n")
    with pytest.raises(ConfigError) as info:
        HostConfig.load()
    assert info.value.field == "(file)"
    assert str(no_env_config) in str(info.value)


@pytest.mark.parametrize(
    ("content", "field"),
    [
        pytest.param(b"[host]\nallow_full_network = \n", "(file)", id="invalid-toml"),
        pytest.param(b"[host]\ndefault_profile = \"\xff\"\n", "(file)", id="bad-utf8"),
        pytest.param(b"[limits]\nmax_pids = 0\n", "limits.max_pids", id="bad-value"),
        pytest.param(b"[hosts]\n", "hosts", id="misspelt-table"),
    ],
)
def test_load_bad_file(no_env_config: Path, tmp_path: Path, content: bytes, field: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        HostConfig.load(f)
    assert info.value.field == field
    assert str(f) in str(info.value)


# -- effective_config ------------------------------------------------------------------------

def test_default_profile_defaults() -> None:
    cfg = effective_config(SandboxRequest(), HostConfig())
    assert cfg == SandboxConfig(
        enabled=True,
        profile="default",
        memory_limit=256 * MiB,
        cpu_limit=1.0,
        timeout=30.0,
        pids_limit=128,
        tmp_size=64 * MiB,
        nofile=1024,
    )
    assert cfg.network_allowed is False
    assert cfg.allowed_paths == () and cfg.allowed_hosts == () and cfg.denied_paths == ()


def test_strict_profile_has_smaller_limits() -> None:
    cfg = effective_config(SandboxRequest(profile="strict"), HostConfig())
    assert cfg.profile == "strict"
    assert (cfg.memory_limit, cfg.cpu_limit, cfg.pids_limit, cfg.tmp_size, cfg.nofile,
            cfg.timeout) == (64 * MiB, 0.5, 16, 8 * MiB, 128, 5.0)
    default = effective_config(SandboxRequest(), HostConfig())
    assert cfg.memory_limit < default.memory_limit
    assert cfg.pids_limit < default.pids_limit


def test_host_default_profile_applies() -> None:
    host = HostConfig(default_profile="strict")
    assert effective_config(SandboxRequest(), host).profile == "strict"
    assert effective_config(SandboxRequest(), host).memory_limit == 64 * MiB


def test_a_manifest_cannot_pick_a_wider_profile_than_the_hosts_default() -> None:
    """Under a host whose default is strict, a manifest saying profile = "default" escaped to
    the wider profile: it is refused, with the way to allow it."""
    host = HostConfig(default_profile="strict")
    with pytest.raises(PluginLoadError, match="allowed_profiles") as info:
        effective_config(SandboxRequest(profile="default"), host, plugin_id="acme.wide")
    assert "'default'" in str(info.value) and "'strict'" in str(info.value)
    assert info.value.plugin_id == "acme.wide"
    allowed = HostConfig(default_profile="strict", allowed_profiles=("default",))
    overridden = effective_config(SandboxRequest(profile="default"), allowed)
    assert (overridden.profile, overridden.memory_limit) == ("default", 256 * MiB)


def test_a_manifest_may_pick_a_narrower_profile() -> None:
    assert effective_config(SandboxRequest(profile="strict"), HostConfig()).profile == "strict"


def test_allowed_profiles_is_the_whole_list() -> None:
    host = HostConfig(allowed_profiles=())
    with pytest.raises(PluginLoadError, match="allowed: default"):
        effective_config(SandboxRequest(profile="strict"), host)
    assert effective_config(SandboxRequest(profile="default"), host).profile == "default"


WIDE_PROFILE = textwrap.dedent("""\
    [profile]
    description = "the default's filter with a bigger limit"
    [limits]
    memory = "{memory}"
    cpu = 1.0
    pids = 128
    tmp_size = "64MiB"
    nofile = 1024
    timeout = "30s"
    [mounts]
    tmp_exec = {tmp_exec}
    [seccomp]
    groups = {groups}
    network_groups = ["inet"]
    {rules}
    """)
DEFAULT_GROUPS = ('["io", "files", "memory", "runtime", "signals", "time", "events", "process",'
                  ' "identity", "exec", "exec-fd", "processes", "threads", "ipc", "aio", '
                  '"sockets", "ioctl", "personality"]')


OWN_ALLOW_RULE = ('[[seccomp.rules]]\nsyscalls = ["ptrace"]\naction = "allow"\n'
                  'comment = "a syscall no group of the default allows"')


@pytest.mark.parametrize(("memory", "rules", "allowed"), [
    pytest.param("256MiB", "", True, id="default-groups"),
    pytest.param("128MiB", "", True, id="smaller-limit"),
    pytest.param("1GiB", "", False, id="larger-limit"),
    pytest.param("256MiB", OWN_ALLOW_RULE, False, id="an-allow-rule-of-its-own"),
])
def test_a_profile_is_no_wider_only_when_its_limits_and_filter_are(
        tmp_path: Path, memory: str, rules: str, allowed: bool) -> None:
    (tmp_path / "mine.toml").write_text(WIDE_PROFILE.format(
        memory=memory, groups=DEFAULT_GROUPS, tmp_exec="true", rules=rules))
    host = HostConfig(profile_dirs=(str(tmp_path),))
    request = SandboxRequest(profile="mine")
    if allowed:
        assert effective_config(request, host).profile == "mine"
    else:
        with pytest.raises(PluginLoadError, match="allows more than"):
            effective_config(request, host)


def test_request_values_are_used() -> None:
    request = SandboxRequest(memory_limit=64 * MiB, cpu_limit=0.25, timeout=5.0)
    cfg = effective_config(request, HostConfig())
    assert (cfg.memory_limit, cfg.cpu_limit, cfg.timeout) == (64 * MiB, 0.25, 5.0)
    # Limits the request cannot name come from the profile.
    assert (cfg.pids_limit, cfg.tmp_size, cfg.nofile) == (128, 64 * MiB, 1024)


@pytest.mark.parametrize(("request_", "ceiling"), [
    pytest.param(SandboxRequest(memory_limit=1 << 30), "memory_limit = 1GiB, above the host's "
                 "ceiling of 128MiB ([limits] max_memory_limit)", id="memory"),
    pytest.param(SandboxRequest(cpu_limit=4.0), "cpu_limit = 4 CPUs, above the host's ceiling "
                 "of 0.5 CPUs ([limits] max_cpu_limit)", id="cpu"),
    pytest.param(SandboxRequest(timeout=600.0), "timeout = 600s, above the host's ceiling of "
                 "10s ([limits] max_timeout)", id="timeout"),
    pytest.param(SandboxRequest(fuel=5000), "fuel = 5000 per call, above the host's ceiling "
                 "of 1000 ([limits] max_fuel)", id="fuel"),
])
def test_a_request_above_a_ceiling_is_refused_naming_it(request_: SandboxRequest,
                                                         ceiling: str) -> None:
    host = HostConfig(max_memory_limit=128 * MiB, max_cpu_limit=0.5, max_timeout=10.0,
                      max_pids=32, max_fuel=1000)
    with pytest.raises(PluginLoadError) as info:
        effective_config(request_, host, plugin_id="acme.big")
    assert str(info.value) == f"plugin acme.big: asks for {ceiling}"


@pytest.mark.parametrize(("request_", "ceiling"), [
    pytest.param(SandboxRequest(memory_limit=64 << 30), "64GiB, above the host's ceiling of "
                 "256MiB", id="memory"),
    pytest.param(SandboxRequest(cpu_limit=1024), "1024 CPUs, above the host's ceiling of "
                 "1 CPUs", id="cpu"),
    pytest.param(SandboxRequest(timeout=168 * 3600), "604800s, above the host's ceiling of 30s",
                 id="timeout"),
])
def test_without_host_ceilings_the_default_profiles_limits_are_the_ceilings(
        request_: SandboxRequest, ceiling: str) -> None:
    """With no host config a manifest got 64 GiB, 1,024 CPUs and a week's timeout."""
    with pytest.raises(PluginLoadError, match="max_") as info:
        effective_config(request_, HostConfig(), plugin_id="acme.big")
    assert ceiling in str(info.value)
    assert "the limit of the profile 'default'" in str(info.value)


def test_a_profiles_limits_are_its_plugins_ceilings() -> None:
    with pytest.raises(PluginLoadError, match="timeout = 20s, above the host's ceiling of 5s "
                                              r"\(the limit of the profile 'strict'"):
        effective_config(SandboxRequest(profile="strict", timeout=20.0), HostConfig())


def test_host_ceilings_may_raise_the_profiles_limits() -> None:
    host = HostConfig(max_memory_limit=4 << 30, max_cpu_limit=2.0, max_timeout=3600.0)
    cfg = effective_config(SandboxRequest(memory_limit=2 << 30, cpu_limit=2.0, timeout=600.0),
                           host)
    assert (cfg.memory_limit, cfg.cpu_limit, cfg.timeout) == (2 << 30, 2.0, 600.0)


def test_request_below_ceilings_is_kept() -> None:
    host = HostConfig(max_memory_limit=128 * MiB, max_cpu_limit=2.0, max_timeout=60.0)
    request = SandboxRequest(memory_limit=32 * MiB, cpu_limit=0.5, timeout=2.0)
    cfg = effective_config(request, host)
    assert (cfg.memory_limit, cfg.cpu_limit, cfg.timeout) == (32 * MiB, 0.5, 2.0)


def test_ceilings_clamp_profile_defaults_too() -> None:
    host = HostConfig(max_memory_limit=100 * MiB, max_cpu_limit=0.5, max_timeout=3.0,
                      max_pids=8)
    cfg = effective_config(SandboxRequest(), host)
    assert (cfg.memory_limit, cfg.cpu_limit, cfg.timeout, cfg.pids_limit) == (
        100 * MiB, 0.5, 3.0, 8)


def test_path_outside_roots_is_refused() -> None:
    host = HostConfig(path_roots=("/data",))
    request = SandboxRequest(allowed_paths=(PathGrant("/etc"),))
    with pytest.raises(PluginLoadError) as info:
        effective_config(request, host, plugin_id="acme.hello")
    assert info.value.plugin_id == "acme.hello"
    assert "acme.hello" in str(info.value)
    assert "/etc" in str(info.value)
    assert "/data" in str(info.value)


def test_any_path_is_refused_without_roots() -> None:
    request = SandboxRequest(allowed_paths=(PathGrant("/data"),))
    with pytest.raises(PluginLoadError, match="/data"):
        effective_config(request, HostConfig())


def test_sibling_with_common_prefix_is_not_under_root() -> None:
    host = HostConfig(path_roots=("/data",))
    with pytest.raises(PluginLoadError, match="/database"):
        effective_config(SandboxRequest(allowed_paths=(PathGrant("/database"),)), host)


@pytest.mark.parametrize(
    ("roots", "path", "expected_root"),
    [
        pytest.param(("/data",), "/data", "/data", id="the-root-itself"),
        pytest.param(("/data",), "/data/plugins/x", "/data", id="below-root"),
        pytest.param(("/srv", "/data/"), "/data/x", "/data", id="second-root-trailing-slash"),
        pytest.param(("/",), "/etc", "/", id="slash-root-allows-all"),
        pytest.param(("/", "/data", "/data/x"), "/data/x/y", "/data/x", id="deepest-root"),
    ],
)
def test_path_under_root_is_allowed(roots: tuple[str, ...], path: str,
                                    expected_root: str) -> None:
    grants = (PathGrant(path, True),)
    request = SandboxRequest(allowed_paths=grants, denied_paths=("/data/secret",))
    cfg = effective_config(request, HostConfig(path_roots=roots))
    assert cfg.allowed_paths == (PathGrant(path, True, root=expected_root),)
    assert cfg.denied_paths == ("/data/secret",)


def test_full_network_refused_unless_host_allows() -> None:
    request = SandboxRequest(network_allowed=True)
    with pytest.raises(PluginLoadError, match="allow_full_network") as info:
        effective_config(request, HostConfig(), plugin_id="acme.net")
    assert info.value.plugin_id == "acme.net"
    cfg = effective_config(request, HostConfig(allow_full_network=True))
    assert cfg.network_allowed is True
    assert cfg.allowed_hosts == ()


def test_a_manifests_hosts_need_the_hosts_allow_list() -> None:
    """With no host config, a manifest listing 127.0.0.1 and 0.0.0.0/0 reached the host's
    loopback and any address: the host's allowed_hosts (empty by default) decides."""
    request = SandboxRequest(network_allowed=True,
                             allowed_hosts=("example.com:443", "127.0.0.1", "0.0.0.0/0"))
    with pytest.raises(PluginLoadError) as info:
        effective_config(request, HostConfig(), plugin_id="acme.net")
    assert str(info.value) == (
        "plugin acme.net: asks to reach example.com:443, 127.0.0.1, 0.0.0.0/0, which the host "
        "policy does not allow (the host's allowed_hosts: none); list them under [host] "
        "allowed_hosts in the host config, or pass --allow-host")
    host = HostConfig(allowed_hosts=("example.com",))
    with pytest.raises(PluginLoadError, match="reach 127.0.0.1, 0.0.0.0/0, which"):
        effective_config(request, host)
    cfg = effective_config(dataclasses.replace(request, allowed_hosts=("example.com:443",)),
                           host)
    assert (cfg.network_allowed, cfg.allowed_hosts) == (True, ("example.com:443",))


@pytest.mark.parametrize(("host_list", "wanted", "covered"), [
    pytest.param(["example.com"], "example.com", True, id="same-name"),
    pytest.param(["example.com"], "example.com:443", True, id="any-port-covers-one"),
    pytest.param(["example.com:443"], "example.com", False, id="one-port-not-any"),
    pytest.param(["example.com:443"], "example.com:80", False, id="other-port"),
    pytest.param(["example.com"], "www.example.com", False, id="name-not-subdomain"),
    pytest.param(["*.example.com"], "www.example.com", True, id="wildcard-covers-name"),
    pytest.param(["*.example.com"], "example.com", False, id="wildcard-not-suffix"),
    pytest.param(["*.example.com"], "*.a.example.com", True, id="wildcard-covers-deeper"),
    pytest.param(["*.a.example.com"], "*.example.com", False, id="wildcard-not-wider"),
    pytest.param(["*.example.com"], "badexample.com", False, id="wildcard-label-boundary"),
    pytest.param(["*.example.com"], "*.badexample.com", False, id="wildcard-label-boundary-2"),
    pytest.param(["10.0.0.0/8"], "10.1.2.3", True, id="range-covers-address"),
    pytest.param(["10.0.0.0/8"], "10.1.0.0/16", True, id="range-covers-subrange"),
    pytest.param(["10.1.0.0/16"], "10.0.0.0/8", False, id="range-not-wider"),
    pytest.param(["10.0.0.0/8"], "example.com", False, id="range-not-name"),
    pytest.param(["*.example.com"], "93.184.216.34", False, id="name-not-address"),
    pytest.param(["0.0.0.0/0"], "127.0.0.1", True, id="operator-listed-everything"),
    pytest.param(["0.0.0.0/0"], "[::1]", False, id="v4-not-v6"),
    pytest.param(["[2001:db8::]/32".strip("[]").replace("]", "")], "2001:db8::1", True,
                 id="v6-range"),
])
def test_host_allow_list_coverage(host_list: list[str], wanted: str, covered: bool) -> None:
    host = HostConfig(allowed_hosts=tuple(host_list))
    request = SandboxRequest(network_allowed=True, allowed_hosts=(wanted,))
    if covered:
        assert effective_config(request, host).allowed_hosts == (wanted,)
    else:
        with pytest.raises(PluginLoadError, match="does not allow"):
            effective_config(request, host)


def test_full_network_host_lets_a_manifest_list_hosts() -> None:
    request = SandboxRequest(network_allowed=True, allowed_hosts=("example.com",))
    assert effective_config(request, HostConfig(allow_full_network=True)).allowed_hosts == (
        "example.com",)


@pytest.mark.parametrize("tmp_exec", [True, False])
def test_a_profile_that_runs_files_from_tmp_is_wider_than_strict(tmp_path: Path,
                                                                 tmp_exec: bool) -> None:
    strict = (Path(policy.__file__).parent.parent / "profiles" / "strict.toml").read_text()
    assert "tmp_exec = false" in strict
    (tmp_path / "mine.toml").write_text(strict.replace("tmp_exec = false",
                                                       f"tmp_exec = {str(tmp_exec).lower()}"))
    host = HostConfig(profile_dirs=(str(tmp_path),), default_profile="strict")
    if tmp_exec:
        with pytest.raises(PluginLoadError, match="allows more than"):
            effective_config(SandboxRequest(profile="mine"), host)
    else:
        assert effective_config(SandboxRequest(profile="mine"), host).profile == "mine"


def test_host_config_reads_allowed_hosts_and_profiles() -> None:
    host = HostConfig.from_mapping({"host": {"allowed_hosts": ["Example.com:443", "10.0.0.0/8"],
                                             "allowed_profiles": ["strict"]}})
    assert host.allowed_hosts == ("example.com:443", "10.0.0.0/8")
    assert host.allowed_profiles == ("strict",)
    assert HostConfig().allowed_hosts == () and HostConfig().allowed_profiles is None
    for bad in ({"allowed_hosts": "example.com"}, {"allowed_hosts": ["http://x"]},
                {"allowed_profiles": "strict"}, {"allowed_profiles": ["No Such"]}):
        with pytest.raises(ConfigError) as info:
            HostConfig.from_mapping({"host": bad})
        assert info.value.field == f"host.{next(iter(bad))}"


def test_unknown_profile_lists_known_profiles() -> None:
    with pytest.raises(PluginLoadError) as info:
        effective_config(SandboxRequest(profile="nosuch"), HostConfig())
    message = str(info.value)
    assert "nosuch" in message
    assert "default" in message and "strict" in message


def test_unknown_host_default_profile_is_refused() -> None:
    with pytest.raises(PluginLoadError, match="nosuch"):
        effective_config(SandboxRequest(), HostConfig(default_profile="nosuch"))


PROFILE = textwrap.dedent("""\
    [profile]
    description = "tiny"

    [limits]
    memory = "{memory}"
    cpu = 0.2
    pids = 4
    tmp_size = "1MiB"
    nofile = 32
    timeout = "1s"

    [mounts]
    tmp_exec = true
    """)


def test_host_profile_dir_adds_profiles_and_is_searched_first(tmp_path: Path) -> None:
    (tmp_path / "tiny.toml").write_text(PROFILE.format(memory="16MiB"))
    (tmp_path / "default.toml").write_text(PROFILE.format(memory="32MiB"))
    host = HostConfig(profile_dirs=(str(tmp_path),), allowed_profiles=("tiny",))
    tiny = effective_config(SandboxRequest(profile="tiny"), host)
    assert (tiny.memory_limit, tiny.cpu_limit, tiny.pids_limit, tiny.tmp_size, tiny.nofile,
            tiny.timeout) == (16 * MiB, 0.2, 4, MiB, 32, 1.0)
    assert effective_config(SandboxRequest(), host).memory_limit == 32 * MiB
    # Without the directory neither exists / the built-in default applies.
    with pytest.raises(PluginLoadError):
        effective_config(SandboxRequest(profile="tiny"), HostConfig())


def test_broken_profile_names_file_and_field(tmp_path: Path) -> None:
    (tmp_path / "broken.toml").write_text(PROFILE.format(memory="lots"))
    host = HostConfig(profile_dirs=(str(tmp_path),))
    with pytest.raises(PluginLoadError) as info:
        effective_config(SandboxRequest(profile="broken"), host)
    assert str(tmp_path / "broken.toml") in str(info.value)
    assert "limits.memory" in str(info.value)


def test_sandbox_config_to_json_uses_spec_keys() -> None:
    request = SandboxRequest(
        network_allowed=True,
        allowed_hosts=("example.com",),
        allowed_paths=(PathGrant("/data", True), PathGrant("/srv")),
        denied_paths=("/data/secret",),
    )
    cfg = effective_config(request, HostConfig(path_roots=("/",), allowed_hosts=("example.com",)))
    assert cfg.to_json() == {
        "enabled": True,
        "profile": "default",
        "allowedPaths": ["/data:rw", "/srv"],
        "deniedPaths": ["/data/secret"],
        "networkAllowed": True,
        "allowedHosts": ["example.com"],
        "memoryLimit": "256MiB",
        "cpuLimit": 1.0,
        "timeout": "30s",
        "pidsLimit": 128,
        "tmpSize": "64MiB",
        "nofile": 1024,
        "fuel": None,
    }


def test_host_config_fallbacks_are_named_and_checked():
    assert HostConfig.from_mapping({"host": {"fallbacks": ["rlimit"]}}).fallbacks == ("rlimit",)
    assert HostConfig().fallbacks == ()
    with pytest.raises(ConfigError) as info:
        HostConfig.from_mapping({"host": {"fallbacks": ["ignore-limits"]}})
    assert info.value.field == "host.fallbacks"


@pytest.mark.parametrize(
    ("requested", "ceiling", "expected"),
    [
        pytest.param(None, None, None, id="unmetered"),
        pytest.param(5000, None, 5000, id="plugin-asks"),
        pytest.param(500, 1000, 500, id="under-the-cap"),
        pytest.param(None, 1000, 1000, id="host-imposes"),
    ],
)
def test_fuel_is_metered_when_plugin_or_host_asks(requested: int | None, ceiling: int | None,
                                                   expected: int | None) -> None:
    """Fuel (wasm) per call: the plugin's request, capped by the host's max_fuel, which also
    applies on its own."""
    cfg = effective_config(SandboxRequest(fuel=requested), HostConfig(max_fuel=ceiling))
    assert cfg.fuel == expected


def test_host_config_reads_wasm_settings() -> None:
    host = HostConfig.from_mapping({"host": {"wasm_instances": 4},
                                    "limits": {"max_fuel": 10_000_000}})
    assert host.wasm_instances == 4
    assert host.max_fuel == 10_000_000


def test_host_config_reads_the_setup_timeout() -> None:
    assert HostConfig().setup_timeout == 10.0
    assert HostConfig.from_mapping({"host": {"setup_timeout": "1m"}}).setup_timeout == 60.0
    with pytest.raises(ConfigError):
        HostConfig.from_mapping({"host": {"setup_timeout": "soon"}})


def test_host_config_reads_egress_settings() -> None:
    host = HostConfig.from_mapping({"host": {
        "egress_hosts_file": "/etc/sandboxer/hosts", "egress_max_connections": 8,
        "egress_header_timeout": "2s", "egress_idle_timeout": "1m",
        "egress_ca_file": "/etc/sandboxer/ca.pem", "allow_full_network": True}})
    assert (host.egress_hosts_file, host.egress_max_connections, host.egress_header_timeout,
            host.egress_idle_timeout, host.egress_ca_file, host.allow_full_network) == (
        "/etc/sandboxer/hosts", 8, 2.0, 60.0, "/etc/sandboxer/ca.pem", True)
