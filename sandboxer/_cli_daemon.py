"""The commands that go through ``sandboxer serve``: ``call --connect`` (or with
$SANDBOXER_SOCKET), ``serve`` itself, ``status`` and ``restart``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ._cli_common import (
    config_override,
    parse_call_arg,
    print_json,
    print_result,
    report_error,
    split_target,
)
from ._cli_parser import UsageError
from ._units import format_duration, format_size
from .config import HostConfig
from .errors import SandboxerError

__all__ = ["call_through_daemon", "cmd_serve", "cmd_restart", "cmd_status"]


async def call_through_daemon(args: argparse.Namespace) -> int:
    """``call`` by way of ``sandboxer serve``: load, call, unload there, under the caller's
    tenant's policy (which is why the sandbox options, the operator's, are refused here)."""
    from .daemon.client import connect

    chosen = [
        option
        for option, given in (
            ("--profile", args.profile),
            ("--memory-limit", args.memory_limit is not None),
            ("--cpu-limit", args.cpu_limit is not None),
            ("--allow-path", args.allow_path),
            ("--deny-path", args.deny_path),
            ("--network", args.network),
            ("--allow-host", args.allow_host),
            ("--no-sandbox", args.no_sandbox),
            ("--registry", args.registry),
            ("--trusted-key", args.trusted_key),
        )
        if given
    ]
    if chosen:
        raise UsageError(
            f"{', '.join(chosen)}: through the daemon a plugin runs under its tenant's policy, "
            "which the caller does not choose"
        )
    config = config_override(args)
    call_args = [parse_call_arg(a) for a in args.args]
    async with await connect(args.connect) as daemon:
        if "@" in args.target and not Path(args.target).exists():
            plugin_id, wanted = split_target(args.target)
            plugin = await daemon.load_from_registry(plugin_id, wanted, config=config)
        else:
            plugin = await daemon.load(args.target, config=config)
        extra: dict[str, Any] = {
            "plugin": {"id": plugin.id, "version": plugin.version},
            "startedWarm": plugin.started_warm,
        }
        try:
            result = await plugin.call(args.method, *call_args, timeout=args.timeout)
        except SandboxerError as exc:
            return report_error(exc, as_json=args.json, extra=extra)
        finally:
            await daemon.unload(plugin.id)
    if args.json:
        print_json({"ok": True, "result": result, "error": None, **extra})
    else:
        print_result(result)
    return 0


async def cmd_serve(args: argparse.Namespace) -> int:
    from .daemon.server import Daemon, systemd_socket

    for name in ("sandboxer.audit", "sandboxer.daemon"):  # its own lines, whatever -v says
        logging.getLogger(name).setLevel(logging.INFO)
    config = HostConfig.load(args.config)
    daemon = Daemon(
        config,
        args.socket,
        config_path=args.config or config.source or None,
        metrics=args.metrics,
    )
    await daemon.start(systemd_socket())
    await daemon.serve_until_stopped()
    return 0


async def cmd_restart(args: argparse.Namespace) -> int:
    """``restart ID``: the daemon starts the caller's failed or quarantined plugin again."""
    from .daemon.client import connect

    async with await connect(args.connect) as daemon:
        plugin = await daemon.restart(args.plugin)
    if args.json:
        print_json({"ok": True, "plugin": plugin.description})
    else:
        print(f"{plugin.id} {plugin.version}: {plugin.description['state']}")
    return 0


async def cmd_status(args: argparse.Namespace) -> int:
    """``status``: what the daemon runs for the caller (the administrator: for everyone)."""
    from .daemon.client import connect

    async with await connect(args.connect) as daemon:
        status = await daemon.status()
    if args.json:
        print_json(status)
        return 0
    print(f"tenants: {', '.join(t['name'] for t in status['tenants']) or 'none'}")
    print(
        f"{'TENANT':10} {'PLUGIN':24} {'STATE':12} {'GEN':>3} {'RESTARTS':>8} {'CALLS':>7} "
        f"{'FAILED':>6} {'MEMORY':>9} {'CPU':>8} {'P50':>9} {'P99':>9}"
    )
    for p in status["plugins"]:
        memory = format_size(p["memory_peak_bytes"]) if p["memory_peak_bytes"] else "-"
        cpu = f"{p['cpu_time_s']:.2f}s" if p["cpu_time_s"] is not None else "-"
        p50, p99 = (format_duration(p[k]) if p[k] is not None else "-" for k in ("p50_s", "p99_s"))
        print(
            f"{p['tenant']:10} {p['id']:24} {p['state']:12} {p['generation']:>3} "
            f"{p['restarts']:>8} {p['calls']:>7} {p['failures']:>6} {memory:>9} {cpu:>8} "
            f"{p50:>9} {p99:>9}"
        )
    return 0
