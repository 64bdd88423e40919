"""The ``sandboxer`` command's commands (DESIGN section 10; the entry point is ``cli.main``).

Exit codes: 0 ok · 1 the plugin returned an error · 2 usage or invalid plugin (manifest,
integrity, load) · 3 a limit was hit or the plugin crashed · 4 this host cannot enforce the
requested sandbox. Human-readable output by default; ``--json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._cli_parser import EXIT_USAGE, UsageError, build_parser
from ._units import format_duration, format_size
from .config import HostConfig
from .errors import CallTimeout, MemoryLimitExceeded, PluginLoadError, SandboxerError, exit_code
from .sandbox.policy import (
    SandboxConfig,
    SandboxRequest,
    effective_config,
)

# Each command imports what only it uses (the manager, the loaders, the manifest parser, the
# registry, the sandbox's launch): `sandboxer exec` must not pay for wasmtime or grpc, nor
# `--help` for any of them (docs/architecture.md, "Start-up imports").
if TYPE_CHECKING:
    from .manifest import Plugin
    from .registry import Registry, TrustedPublicKey

__all__ = ["run"]

# -- shared pieces ---------------------------------------------------------------------------


def _parse_call_arg(text: str) -> Any:
    from . import _json

    try:
        return _json.loads(text)
    except _json.JSONError:
        return text


def _config_override(args: argparse.Namespace) -> dict[str, Any]:
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


def _sandbox_for(plugin: Plugin, host: HostConfig, args: argparse.Namespace) -> SandboxConfig:
    """The manifest's request clamped by the host policy, then the operator's CLI choices."""
    return _sandbox_from(plugin.sandbox, plugin.id, host, args)


def _sandbox_from(
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


def _dumps(value: Any) -> str:
    # orjson (with the uuid, datetime and platform modules it loads) only for JSON output:
    # not for a plain `sandboxer exec`
    from . import _json

    return _json.dumps(value).decode()


def _print_json(value: Any) -> None:
    sys.stdout.write(_dumps(value) + "\n")


def _print_result(value: Any) -> None:
    if isinstance(value, str):
        print(value)
    else:
        print(_dumps(value))


def _report_error(
    error: BaseException, *, as_json: bool, extra: dict[str, Any] | None = None
) -> int:
    code = exit_code(error)
    payload = (
        error.to_json()
        if isinstance(error, SandboxerError)
        else {"type": type(error).__name__, "message": str(error)}
    )
    if as_json:
        _print_json({"ok": False, "error": payload, **(extra or {})})
    else:
        print(f"sandboxer: {payload['type']}: {error}", file=sys.stderr)
    return code


# -- commands --------------------------------------------------------------------------------


def _split_target(text: str) -> tuple[str, str]:
    plugin_id, _, wanted = text.partition("@")
    if not plugin_id or not wanted:
        raise UsageError(
            f"{text!r} is not ID@VERSION (e.g. acme.hello@1.2.0, acme.hello@^1.2, "
            "acme.hello@latest)"
        )
    return plugin_id, wanted


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


def _registry_fetch(target: str, args: argparse.Namespace, host: HostConfig) -> Path:
    """Fetch ``ID@VERSION`` from the registry the options (or host config) name."""
    from .registry import fetch

    registry, keys = _registry_and_keys(f"{target} names a registry plugin", args, host)
    plugin_id, wanted = _split_target(target)
    _, directory = fetch(registry, plugin_id, wanted, trusted_keys=keys, cache_dir=host.cache_dir)
    return directory


async def _cmd_call(args: argparse.Namespace) -> int:
    from .manager import PluginManager
    from .manifest import load_plugin

    if args.connect or os.environ.get("SANDBOXER_SOCKET"):
        return await _call_through_daemon(args)
    host = HostConfig.load()
    config = _config_override(args)
    call_args = [_parse_call_arg(a) for a in args.args]
    if "@" in args.target and not Path(args.target).exists():
        args.target = str(await asyncio.to_thread(_registry_fetch, args.target, args, host))
    plugin = load_plugin(args.target)
    sandbox = _sandbox_for(plugin, host, args)
    extra: dict[str, Any] = {
        "plugin": {"id": plugin.id, "version": plugin.version, "type": plugin.type.value}
    }
    async with PluginManager(config=host) as mgr:
        loaded = await mgr.load(args.target, sandbox=sandbox, config=config)
        extra["sandbox"] = sandbox.to_json()
        start = time.perf_counter()
        try:
            result = await loaded.call(args.method, *call_args, timeout=args.timeout)
        except SandboxerError as exc:
            extra["stats"] = _stats(loaded, start)
            return _report_error(exc, as_json=args.json, extra=extra)
        extra["stats"] = _stats(loaded, start)
    if args.json:
        _print_json({"ok": True, "result": result, "error": None, **extra})
    else:
        _print_result(result)
    return 0


async def _call_through_daemon(args: argparse.Namespace) -> int:
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
    config = _config_override(args)
    call_args = [_parse_call_arg(a) for a in args.args]
    async with await connect(args.connect) as daemon:
        if "@" in args.target and not Path(args.target).exists():
            plugin_id, wanted = _split_target(args.target)
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
            return _report_error(exc, as_json=args.json, extra=extra)
        finally:
            await daemon.unload(plugin.id)
    if args.json:
        _print_json({"ok": True, "result": result, "error": None, **extra})
    else:
        _print_result(result)
    return 0


async def _cmd_serve(args: argparse.Namespace) -> int:
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


async def _cmd_restart(args: argparse.Namespace) -> int:
    """``restart ID``: the daemon starts the caller's failed or quarantined plugin again."""
    from .daemon.client import connect

    async with await connect(args.connect) as daemon:
        plugin = await daemon.restart(args.plugin)
    if args.json:
        _print_json({"ok": True, "plugin": plugin.description})
    else:
        print(f"{plugin.id} {plugin.version}: {plugin.description['state']}")
    return 0


async def _cmd_status(args: argparse.Namespace) -> int:
    """``status``: what the daemon runs for the caller (the administrator: for everyone)."""
    from .daemon.client import connect

    async with await connect(args.connect) as daemon:
        status = await daemon.status()
    if args.json:
        _print_json(status)
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


def _stats(loaded: Any, start: float) -> dict[str, Any]:
    stats = loaded.statistics()
    return {
        "durationMs": round((time.perf_counter() - start) * 1000, 3),
        "peakMemoryBytes": stats.peak_memory_bytes,
        "cpuTimeSeconds": stats.cpu_time_s,
        "calls": stats.calls,
        "failures": stats.failures,
    }


async def _cmd_inspect(args: argparse.Namespace) -> int:
    from ._digest import tree_checksum
    from .loaders import run_mode
    from .manifest import load_plugin, verify_integrity

    host = HostConfig.load()
    plugin = load_plugin(args.target)
    sandbox = _sandbox_for(plugin, host, args)
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
        _print_json(report)
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
        (f"sandbox.{k}", _dumps(v) if not isinstance(v, str) else v)
        for k, v in sandbox.to_json().items()
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


class _Captured:
    """One of the program's streams for ``exec --json``: the first ``limit`` bytes kept, the
    rest counted."""

    def __init__(self, limit: int) -> None:
        self.data = bytearray()
        self.total = 0
        self.limit = limit

    def write(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


def _passed_through(stream: Any) -> Any:
    def write(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return write


def _exec_stdin() -> int | None:
    """The stdin we were started with, for the program (``program.run`` refuses a directory
    or O_PATH fd), or None (/dev/null) when we were started without one. Not "whatever fd 0
    is now": started with it closed, fd 0 is the first file we opened (the event loop's
    epoll fd, say), which must not reach the sandbox."""
    original = sys.__stdin__
    if original is None or original.closed:
        return None
    return original.fileno()


def _describe_signal(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


async def _cmd_exec(args: argparse.Namespace) -> int:
    """``exec``: the program's own exit status passes through (128+N when a signal N killed
    it); sandboxer's own outcomes use its codes: 2 the program cannot run inside (usage,
    not found), 3 sandboxer stopped it (the --timeout deadline, the memory limit), 4 this
    host cannot enforce the sandbox. Those collide with a program's own 2-4, so each of
    sandboxer's is said on stderr ("sandboxer: ...") and, with --json, as ``error``."""
    from .sandbox import cgroups, program
    from .sandbox.egress import EgressProxy
    from .sandbox.seccomp_cache import filter_for

    command = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not command:
        raise UsageError("exec: name the program to run after --")
    host = HostConfig.load()
    sandbox = _sandbox_from(SandboxRequest(), None, host, args)
    shown = {
        **sandbox.to_json(),
        "timeout": None if args.timeout is None else format_duration(args.timeout),
    }
    extra: dict[str, Any] = {
        "result": None,
        "plugin": None,
        "program": {"argv": command},
        "sandbox": shown,
    }
    if args.json:
        out, err = _Captured(host.max_frame), _Captured(host.max_frame)
        sinks = (out.write, err.write)
    else:
        sinks = (_passed_through(sys.stdout.buffer), _passed_through(sys.stderr.buffer))
    egress = EgressProxy.from_config(host)
    start = time.perf_counter()
    try:
        result = await program.run(
            command,
            sandbox,
            backend=cgroups.detect(),
            seccomp_bpf=filter_for(
                sandbox.profile, network=sandbox.network_allowed, extra_dirs=host.profile_dirs
            ),
            sinks=sinks,
            egress=egress,
            setup_timeout=host.setup_timeout,
            profile_dirs=host.profile_dirs,
            fallbacks=host.fallbacks,
            grant_owner=host.grant_owner,
            stdin=_exec_stdin(),
            timeout=args.timeout,
        )
    except SandboxerError as exc:
        return _report_error(
            exc, as_json=args.json, extra={**extra, "exitStatus": None, "signal": None}
        )
    finally:
        egress.close()
    code = result.returncode
    status, signum = (None, -code) if code < 0 else (code, None)
    stats = result.stats
    extra.update(
        stats={
            "durationMs": round((time.perf_counter() - start) * 1000, 3),
            "peakMemoryBytes": stats.memory_peak if stats else None,
            "cpuTimeSeconds": stats.cpu_time_s if stats else None,
        },
        exitStatus=status,
        signal=signum,
    )
    if args.json:
        extra["result"] = {
            "stdout": out.text(),
            "stderr": err.text(),
            "truncated": [
                name
                for name, stream in (("stdout", out), ("stderr", err))
                if stream.total > len(stream.data)
            ],
        }
    how = (
        f"exited with status {status}"
        if signum is None
        else f"was killed by {_describe_signal(signum)}"
    )
    stopped: SandboxerError | None = None
    if result.timed_out:
        stopped = CallTimeout(
            f"the program did not finish within its timeout (--timeout "
            f"{format_duration(args.timeout)}) and was stopped: SIGTERM, then SIGKILL after "
            f"{program.KILL_GRACE:g}s if still running; it {how}",
            timeout=args.timeout,
        )
    elif result.oom_killed:
        limit = sandbox.memory_limit
        stopped = MemoryLimitExceeded(
            f"the program was killed for exceeding the memory limit of "
            f"{format_size(limit)} (peak {stats.memory_peak if stats else None} bytes); "
            "raise --memory-limit if it needs more",
            limit=limit,
            peak=stats.memory_peak if stats else None,
        )
    if stopped is not None:
        return _report_error(stopped, as_json=args.json, extra=extra)
    if args.json:
        ok = code == 0
        _print_json(
            {
                "ok": ok,
                "result": extra.pop("result"),
                "error": None
                if ok
                else {
                    "type": "ProgramFailed",
                    "message": f"the program {how}",
                    "exitStatus": status,
                    "signal": signum,
                },
                **extra,
            }
        )
    return 128 - code if code < 0 else code


async def _cmd_doctor(args: argparse.Namespace) -> int:
    from ._doctor import diagnose
    from .loaders import run_mode
    from .manifest import load_plugin

    host = HostConfig.load()
    report = diagnose(host)
    if args.target:
        plugin = load_plugin(args.target)
        sandbox = _sandbox_from(plugin.sandbox, plugin.id, host, _no_overrides())
        report["plugin"] = {
            "id": plugin.id,
            "kind": plugin.type.value,
            "mode": run_mode(plugin.type, sandbox),
            "sandbox": sandbox.to_json(),
        }
    if args.json:
        _print_json(report)
    else:
        for key, value in report.items():
            if isinstance(value, dict):
                print(f"{key}:")
                for k, v in value.items():
                    shown = _dumps(v) if isinstance(v, (dict, list)) else v
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
        _print_json([r.to_json() for r in results])
    else:
        for r in results:
            print(_describe(r))
    return 2 if any(isinstance(r, ScanError) for r in results) else 0


async def _cmd_watch(args: argparse.Namespace) -> int:
    from .discovery import watch
    from .manager import PluginManager

    def show(record: dict[str, Any], line: str) -> None:
        if args.json:
            _print_json(record)
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
            _print_json([e.to_json() for e in entries])
        else:
            print(
                f"# {registry.location}: index sequence {index.sequence}, signed by "
                f"{index.signer.describe()}"
            )
            for e in entries:
                print(f"{e.id}@{e.version}  {e.type}  sha256:{e.sha256[:16]}…  {e.published}")
        return 0
    directory = await asyncio.to_thread(_registry_fetch, args.target, args, host)
    if args.json:
        _print_json({"ok": True, "path": str(directory)})
    else:
        print(directory)
    return 0


_COMMANDS = {
    "call": _cmd_call,
    "inspect": _cmd_inspect,
    "exec": _cmd_exec,
    "serve": _cmd_serve,
    "status": _cmd_status,
    "restart": _cmd_restart,
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
        return asyncio.run(_COMMANDS[args.command](args))
    except UsageError as exc:
        if as_json:
            _print_json({"ok": False, "error": {"type": "UsageError", "message": str(exc)}})
        else:
            print(f"sandboxer: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SandboxerError as exc:
        return _report_error(exc, as_json=as_json)
    except KeyboardInterrupt:
        return 130
