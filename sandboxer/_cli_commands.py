"""The ``sandboxer`` command's commands (DESIGN section 10; the entry point is ``cli.main``).

Exit codes: 0 ok · 1 the plugin returned an error · 2 usage or invalid plugin (manifest,
integrity, load) · 3 a limit was hit or the plugin crashed · 4 this host cannot enforce the
requested sandbox. Human-readable output by default; ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._cli_common import (
    config_override,
    dumps,
    parse_call_arg,
    print_json,
    print_result,
    report_error,
    sandbox_for,
    sandbox_from,
    split_target,
)
from ._cli_daemon import call_through_daemon, cmd_restart, cmd_serve, cmd_status
from ._cli_exec import cmd_exec
from ._cli_parser import EXIT_USAGE, UsageError, build_parser
from .config import HostConfig
from .errors import SandboxerError

# Each command imports what only it uses (the manager, the loaders, the manifest parser, the
# registry, the sandbox's launch): `sandboxer exec` must not pay for wasmtime or grpc, nor
# `--help` for any of them (docs/architecture.md, "Start-up imports").
if TYPE_CHECKING:
    from .registry import Fetched, Registry, TrustedPublicKey

__all__ = ["run"]

# -- shared pieces ---------------------------------------------------------------------------


# -- commands --------------------------------------------------------------------------------


def _registry_and_keys(
    what: str, args: argparse.Namespace, host: HostConfig
) -> tuple[Registry, list[TrustedPublicKey]]:
    """The registry and the loaded trusted keys the options (or the host config) name."""
    from .errors import RegistryError
    from .registry import Registry, load_trusted_keys

    location = args.registry or host.registry
    if not location:
        raise UsageError(f"{what}: give --registry (or set registry in the host config)")
    try:
        keys = load_trusted_keys(args.trusted_key or host.trusted_keys)
    except RegistryError as exc:
        raise UsageError(str(exc)) from None
    return Registry(location), keys


def _registry_fetch(target: str, args: argparse.Namespace, host: HostConfig) -> Fetched:
    """Fetch ``ID@VERSION`` from the registry the options (or host config) name."""
    from .registry import fetch_verified

    registry, keys = _registry_and_keys(f"{target} names a registry plugin", args, host)
    plugin_id, wanted = split_target(target)
    return fetch_verified(registry, plugin_id, wanted, trusted_keys=keys, cache_dir=host.cache_dir)


async def _cmd_call(args: argparse.Namespace) -> int:
    from .manager import PluginManager
    from .manifest import load_plugin

    if args.connect or os.environ.get("SANDBOXER_SOCKET"):
        return await call_through_daemon(args)
    host = HostConfig.load()
    config = config_override(args)
    call_args = [parse_call_arg(a) for a in args.args]
    checksum = None  # a registry's: what its signed archive unpacks to
    if "@" in args.target and not Path(args.target).exists():
        fetched = await asyncio.to_thread(_registry_fetch, args.target, args, host)
        args.target, checksum = str(fetched.directory), fetched.checksum
    plugin = load_plugin(args.target)
    sandbox = sandbox_for(plugin, host, args)
    extra: dict[str, Any] = {
        "plugin": {"id": plugin.id, "version": plugin.version, "type": plugin.type.value}
    }
    async with PluginManager(config=host) as mgr:
        loaded = await mgr.load(args.target, sandbox=sandbox, config=config, checksum=checksum)
        extra["sandbox"] = sandbox.to_json()
        start = time.perf_counter()
        try:
            result = await loaded.call(args.method, *call_args, timeout=args.timeout)
        except SandboxerError as exc:
            extra["stats"] = _stats(loaded, start)
            return report_error(exc, as_json=args.json, extra=extra)
        extra["stats"] = _stats(loaded, start)
    if args.json:
        print_json({"ok": True, "result": result, "error": None, **extra})
    else:
        print_result(result)
    return 0


def _stats(loaded: Any, start: float) -> dict[str, Any]:
    stats = loaded.statistics()
    return {
        "durationMs": round((time.perf_counter() - start) * 1000, 3),
        "peakMemoryBytes": stats.peak_memory_bytes,
        "cpuTimeSeconds": stats.cpu_time_s,
        "calls": stats.calls,
        "failures": stats.failures,
        "denied": stats.denied,
    }


async def _cmd_inspect(args: argparse.Namespace) -> int:
    from ._digest import tree_checksum
    from .loaders import run_mode
    from .manifest import load_plugin, verify_integrity

    host = HostConfig.load()
    plugin = load_plugin(args.target)
    sandbox = sandbox_for(plugin, host, args)
    # As a load would: a manifest whose sha256 no longer matches is an IntegrityError (exit
    # 2, naming both digests), not a manifest to show.
    await asyncio.to_thread(verify_integrity, plugin)
    checksum = await asyncio.to_thread(tree_checksum, plugin.root)
    integrity = (
        "no sha256 in the manifest"
        if plugin.sha256 is None
        else "the entrypoint matches the manifest's sha256"
    )
    report = {
        "plugin": plugin.to_json(),
        "kind": plugin.type.value,
        "checksum": checksum,
        "integrity": integrity,
        "sandbox": sandbox.to_json(),
        "mode": run_mode(plugin.type, sandbox),
    }
    if args.json:
        print_json(report)
        return 0
    rows = [
        ("id", plugin.id),
        ("version", plugin.version),
        ("kind", plugin.type.value),
        ("name", plugin.name or ""),
        ("entrypoint", str(plugin.entrypoint)),
        ("manifest", str(plugin.manifest_path or "(bare file, no manifest)")),
        ("methods", ", ".join(plugin.methods) if plugin.methods else "(all public)"),
        ("checksum", checksum),
        ("integrity", integrity),
        ("mode", report["mode"]),
    ]
    rows += [
        (f"sandbox.{k}", dumps(v) if not isinstance(v, str) else v)
        for k, v in sandbox.to_json().items()
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


async def _cmd_doctor(args: argparse.Namespace) -> int:
    from ._doctor import diagnose
    from .loaders import run_mode
    from .manifest import load_plugin

    host = HostConfig.load()
    report = diagnose(host)
    if args.target:
        plugin = load_plugin(args.target)
        sandbox = sandbox_from(plugin.sandbox, plugin.id, host, _no_overrides())
        report["plugin"] = {
            "id": plugin.id,
            "kind": plugin.type.value,
            "mode": run_mode(plugin.type, sandbox),
            "sandbox": sandbox.to_json(),
        }
    if args.json:
        print_json(report)
    else:
        for key, value in report.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k, v in value.items():
                    shown = dumps(v) if isinstance(v, (dict, list)) else v
                    print(f"  {k:<22} {shown}")
            else:
                print(f"{key:<24} {value}")
    return 0 if report["ok"] else 4


def _no_overrides() -> argparse.Namespace:
    return argparse.Namespace(
        profile=None,
        memory_limit=None,
        cpu_limit=None,
        timeout=None,
        allow_path=[],
        deny_path=[],
        network=False,
        allow_host=[],
        no_sandbox=False,
    )


async def _cmd_demo(args: argparse.Namespace) -> int:
    from ._demo import run_demo

    return await run_demo(args.examples, as_json=args.json)


def _describe(found: Any) -> str:
    """One line for a scan result or a watch event's plugin."""
    from .discovery import ScanError

    if isinstance(found, ScanError):
        return f"{found.path}  ERROR  {found.message}"
    return (
        f"{found.path}  {found.type.value}  {found.manifest.id}@{found.manifest.version}"
        f"  {found.checksum}"
    )


async def _cmd_scan(args: argparse.Namespace) -> int:
    from .discovery import ScanError, scan

    results = await asyncio.to_thread(scan, args.paths)
    if args.json:
        print_json([r.to_json() for r in results])
    else:
        for r in results:
            print(_describe(r))
    return 2 if any(isinstance(r, ScanError) for r in results) else 0


async def _cmd_watch(args: argparse.Namespace) -> int:
    from .discovery import watch
    from .manager import PluginManager

    def show(record: dict[str, Any], line: str) -> None:
        if args.json:
            print_json(record)
        else:
            print(line)
        sys.stdout.flush()

    if args.no_load:
        async with watch(args.paths) as found:
            async for event in found:
                detail = event.plugin or event.error
                show(
                    event.to_json(),
                    f"{event.kind:<8} " + (_describe(detail) if detail else str(event.path)),
                )
        return 0
    async with PluginManager(config=HostConfig.load(), hot_reload=True) as mgr:

        async def report() -> None:
            async for e in mgr.events():
                if e.type == "state" and e.state.value not in ("ready", "failed", "stopped"):
                    continue
                show(
                    e.to_json(),
                    f"{e.type:<14} {e.plugin_id} {e.version} gen {e.generation} "
                    f"{e.state.value}" + (f": {e.error}" if e.error else ""),
                )

        reporter = asyncio.ensure_future(report())
        by_path: dict[Path, str] = {}
        try:
            async with watch(args.paths) as found:
                async for event in found:
                    if event.kind == "error" and event.error is not None:
                        show(
                            {
                                "event": "error",
                                "path": str(event.path),
                                "error": event.error.message,
                            },
                            _describe(event.error),
                        )
                    elif event.kind == "added" and event.plugin is not None:
                        try:
                            loaded = await mgr.load(event.plugin.path)
                            by_path[event.path] = loaded.id
                        except SandboxerError as exc:
                            show(
                                {
                                    "event": "load_failed",
                                    "path": str(event.path),
                                    "error": str(exc),
                                },
                                f"load_failed    {event.path}: {exc}",
                            )
                    elif event.kind == "removed" and event.path in by_path:
                        await mgr.unload(by_path.pop(event.path))
                    # "changed": the manager's hot reload takes it
        finally:
            reporter.cancel()
    return 0


async def _cmd_registry(args: argparse.Namespace) -> int:
    from . import _minisign
    from .registry import publish, sign_index

    action = args.registry_command
    if action == "keygen":
        public, secret = _minisign.generate_keypair()
        args.directory.mkdir(parents=True, exist_ok=True)
        pub_path = args.directory / f"{args.name}.pub"
        key_path = args.directory / f"{args.name}.key"
        for path in (pub_path, key_path):
            if path.exists():
                raise UsageError(f"{path} exists; not overwriting a key")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret.to_file_text())
        pub_path.write_text(public.to_file_text())
        print(f"public key {pub_path} (key id {public.key_id_hex})\nsecret key {key_path}")
        return 0
    if action in ("publish", "sign-index"):
        try:
            secret = _minisign.SecretKey.from_file(args.key)
        except OSError as exc:
            raise UsageError(f"cannot read secret key {args.key}: {exc.strerror}") from None
        if action == "sign-index":
            sequence = await asyncio.to_thread(sign_index, args.registry, secret)
            print(
                f"signed {args.registry}/index.json: sequence {sequence}, key {secret.key_id_hex}"
            )
            return 0
        entry = await asyncio.to_thread(publish, args.plugin, args.registry, secret)
        print(f"published {entry.id}@{entry.version} sha256:{entry.sha256}")
        return 0
    host = HostConfig.load()
    if action == "list":
        registry, keys = _registry_and_keys("registry list", args, host)
        index = await asyncio.to_thread(registry.index, keys, cache_dir=host.cache_dir)
        entries = index.entries()
        if args.json:
            print_json([e.to_json() for e in entries])
        else:
            print(
                f"# {registry.location}: index sequence {index.sequence}, signed by "
                f"{index.signer.describe()}"
            )
            for e in entries:
                print(f"{e.id}@{e.version}  {e.type}  sha256:{e.sha256[:16]}…  {e.published}")
        return 0
    directory = (await asyncio.to_thread(_registry_fetch, args.target, args, host)).directory
    if args.json:
        print_json({"ok": True, "path": str(directory)})
    else:
        print(directory)
    return 0


_COMMANDS = {
    "call": _cmd_call,
    "inspect": _cmd_inspect,
    "exec": cmd_exec,
    "serve": cmd_serve,
    "status": cmd_status,
    "restart": cmd_restart,
    "doctor": _cmd_doctor,
    "demo": _cmd_demo,
    "registry": _cmd_registry,
    "scan": _cmd_scan,
    "watch": _cmd_watch,
}


def run(argv: Sequence[str] | None = None) -> int:
    """The command ``argv`` names, run to its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    as_json = getattr(args, "json", False)
    try:
        command = _COMMANDS[args.command](args)
        if args.command == "serve":
            # The daemon's hop is its loop's turns; uvloop's cost about half the default's.
            import uvloop

            return int(uvloop.run(command))
        return asyncio.run(command)
    except UsageError as exc:
        if as_json:
            print_json({"ok": False, "error": {"type": "UsageError", "message": str(exc)}})
        else:
            print(f"sandboxer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SandboxerError as exc:
        return report_error(exc, as_json=as_json)
    except KeyboardInterrupt:
        return 130
