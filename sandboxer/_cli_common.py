"""What the ``sandboxer`` commands share: their arguments read, the sandbox they ask for,
and their output (a result, an error and its exit code, one JSON object with --json)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING, Any

from ._cli_parser import UsageError
from .config import HostConfig
from .errors import PluginLoadError, SandboxerError, exit_code
from .sandbox.policy import SandboxConfig, SandboxRequest, effective_config

if TYPE_CHECKING:
    from .manifest import Plugin

__all__ = [
    "dumps",
    "parse_call_arg",
    "config_override",
    "sandbox_for",
    "sandbox_from",
    "print_json",
    "print_result",
    "report_error",
    "split_target",
]


def parse_call_arg(text: str) -> Any:
    from . import _json

    try:
        return _json.loads(text)
    except _json.JSONError:
        return text


def config_override(args: argparse.Namespace) -> dict[str, Any]:
    if args.config is None:
        return {}
    from . import _json

    try:
        value = _json.loads(args.config)
    except _json.JSONError as exc:
        raise UsageError(f"--config: a JSON object, not {args.config!r} ({exc})") from None
    if not isinstance(value, dict):
        raise UsageError(f"--config: a JSON object, not {type(value).__name__}")
    return value


def sandbox_for(plugin: Plugin, host: HostConfig, args: argparse.Namespace) -> SandboxConfig:
    """The manifest's request clamped by the host policy, then the operator's CLI choices."""
    return sandbox_from(plugin.sandbox, plugin.id, host, args)


def sandbox_from(
    request: SandboxRequest, plugin_id: str | None, host: HostConfig, args: argparse.Namespace
) -> SandboxConfig:
    if args.network and not args.allow_host and not host.allow_full_network:
        raise PluginLoadError(
            "--network without --allow-host asks for the host's full network, which the "
            "host policy does not allow (allow_full_network = false); name the hosts with "
            "--allow-host",
            plugin_id=plugin_id,
        )
    # The operator's choices widen the policy the manifest is checked against: a profile
    # and hosts named on the command line are the operator's to give.
    if args.profile:
        request = dataclasses.replace(request, profile=args.profile)
        host = dataclasses.replace(
            host, allowed_profiles=(*(host.allowed_profiles or ()), args.profile)
        )
    if args.allow_host:
        host = dataclasses.replace(host, allowed_hosts=host.allowed_hosts + tuple(args.allow_host))
    limits = {
        name: getattr(args, name)
        for name in ("memory_limit", "cpu_limit", "timeout")
        if getattr(args, name) is not None
    }
    # A limit the operator sets replaces the manifest's, which is then not checked.
    unchecked = dataclasses.replace(
        request,
        memory_limit=None if "memory_limit" in limits else request.memory_limit,
        cpu_limit=None if "cpu_limit" in limits else request.cpu_limit,
        timeout=None if "timeout" in limits else request.timeout,
    )
    config = effective_config(unchecked, host, plugin_id=plugin_id)
    changes: dict[str, Any] = dict(limits)
    if args.allow_path:
        changes["allowed_paths"] = config.allowed_paths + tuple(args.allow_path)
    if args.deny_path:
        changes["denied_paths"] = config.denied_paths + tuple(args.deny_path)
    if args.network or args.allow_host:
        changes["network_allowed"] = True
        changes["allowed_hosts"] = config.allowed_hosts + tuple(args.allow_host)
    if args.no_sandbox:
        changes["enabled"] = False
    return config.replace(**changes) if changes else config


def dumps(value: Any) -> str:
    # orjson (with the uuid, datetime and platform modules it loads) only for JSON output:
    # not for a plain `sandboxer exec`
    from . import _json

    return _json.dumps(value).decode()


def print_json(value: Any) -> None:
    sys.stdout.write(dumps(value) + "\n")


def print_result(value: Any) -> None:
    if isinstance(value, str):
        print(value)
    else:
        print(dumps(value))


def report_error(
    error: BaseException, *, as_json: bool, extra: dict[str, Any] | None = None
) -> int:
    code = exit_code(error)
    payload = (
        error.to_json()
        if isinstance(error, SandboxerError)
        else {"type": type(error).__name__, "message": str(error)}
    )
    if as_json:
        print_json({"ok": False, "error": payload, **(extra or {})})
    else:
        print(f"sandboxer: {payload['type']}: {error}", file=sys.stderr)
    return code


def split_target(text: str) -> tuple[str, str]:
    plugin_id, _, wanted = text.partition("@")
    if not plugin_id or not wanted:
        raise UsageError(
            f"{text!r} is not ID@VERSION (e.g. acme.hello@1.2.0, acme.hello@^1.2, "
            "acme.hello@latest)"
        )
    return plugin_id, wanted
