"""``sandboxer demo``: run each example plugin that exists and show what it did.

Each step is a real load and call through PluginManager; a step that fails shows its error
and makes the demo exit non-zero. Kinds not built yet are simply absent from examples/.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _json
from .config import HostConfig
from .errors import PluginLoadError, SandboxerError
from .loaders import run_mode
from .manager import LoadedPlugin, PluginManager
from .sandbox.policy import SandboxConfig

__all__ = ["run_demo"]

# Trusted in-process mode is the operator's explicit choice: the demo makes it once, for one
# row, to show the difference; every other example runs sandboxed.
_TRUSTED = SandboxConfig(enabled=False)


@dataclass
class _Row:
    example: str
    kind: str
    mode: str
    action: str
    outcome: str
    ms: float
    ok: bool


async def _greet_and_add(mgr: PluginManager, p: LoadedPlugin) -> list[tuple[str, Any]]:
    return [
        ("greet('world')", await p.call("greet", "world")),
        ("add(2, 3)", await p.call("add", 2, 3)),
    ]


async def _counter(mgr: PluginManager, p: LoadedPlugin) -> list[tuple[str, Any]]:
    for _ in range(3):
        await p.call("increment")
    await mgr.reload(p.id)
    return [
        ("increment() x3, reload, get()", await p.call("get")),
        ("generation after reload", p.generation),
    ]


async def _kv(mgr: PluginManager, p: LoadedPlugin) -> list[tuple[str, Any]]:
    """An unmodified go-plugin gRPC plugin: its KV service, in canonical proto3 JSON."""
    return [
        (
            'Put({"key": "hi", "value": "aGVsbG8="})',
            await p.call("Put", {"key": "hi", "value": "aGVsbG8="}),
        ),
        ('Get({"key": "hi"})', await p.call("Get", {"key": "hi"})),
    ]


async def _wasm_c(mgr: PluginManager, p: LoadedPlugin) -> list[tuple[str, Any]]:
    for _ in range(3):
        await p.call("count")
    await mgr.reload(p.id)
    return [
        ("greet('world')", await p.call("greet", "world")),
        ("count() x3, reload, count()", await p.call("count")),
    ]


async def _wasm_wat(mgr: PluginManager, p: LoadedPlugin) -> list[tuple[str, Any]]:
    return [
        ("add(2, 3)", await p.call("add", 2, 3)),
        ("fib(50)", await p.call("fib", 50)),
        ("describe('x', 1)", await p.call("describe", "x", 1)),
    ]


async def _wasm_command(mgr: PluginManager, p: LoadedPlugin) -> list[tuple[str, Any]]:
    return [
        ("upper('hello, world')", await p.call("upper", "hello, world")),
        ("length('héllo')", await p.call("length", "héllo")),
    ]


@dataclass(frozen=True)
class _Example:
    directory: str
    label: str
    sandbox: SandboxConfig | None  # None: what the manifest and host policy give
    script: Callable[[PluginManager, LoadedPlugin], Awaitable[list[tuple[str, Any]]]]
    build: bool = False  # compiled from source by ``make`` in its directory first


_EXAMPLES = (
    _Example("hello", "hello", None, _greet_and_add),
    _Example("hello", "hello (trusted)", _TRUSTED, _greet_and_add),
    _Example("counter", "counter", None, _counter),
    _Example("native-c", "native-c", None, _greet_and_add, build=True),
    _Example("native-go", "native-go", None, _greet_and_add, build=True),
    _Example("external-python", "external-python", None, _greet_and_add),
    _Example("external-node", "external-node", None, _greet_and_add),
    _Example("wasm-c", "wasm-c", None, _wasm_c, build=True),
    _Example("wasm-wat", "wasm-wat", None, _wasm_wat, build=True),
    _Example("wasm-command", "wasm-command", None, _wasm_command, build=True),
    _Example("grpc-kv-go", "grpc-kv-go", None, _kv, build=True),
    _Example("grpc-kv-python", "grpc-kv-python", None, _kv, build=True),
)


async def _build(directory: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        "make",
        "-s",
        "-C",
        str(directory),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        raise PluginLoadError(
            f"building {directory} failed: {output.decode(errors='replace')[-500:]}"
        )


def _show(value: Any) -> str:
    return value if isinstance(value, str) else _json.dumps(value).decode()


async def run_demo(examples: Path, *, as_json: bool) -> int:
    rows: list[_Row] = []
    async with PluginManager(config=HostConfig.load()) as mgr:
        for example in _EXAMPLES:
            name = example.label
            path = examples / example.directory
            if not path.exists():
                continue
            start = time.perf_counter()
            kind, mode = "?", "?"
            try:
                if example.build:
                    await _build(path)
                    start = time.perf_counter()
                p = await mgr.load(path, sandbox=example.sandbox)
                kind = p.plugin.type.value
                mode = run_mode(p.plugin.type, p.sandbox) if p.sandbox else "?"
                for action, result in await example.script(mgr, p):
                    rows.append(
                        _Row(
                            name,
                            kind,
                            mode,
                            action,
                            _show(result),
                            (time.perf_counter() - start) * 1000,
                            True,
                        )
                    )
                    start = time.perf_counter()
                await mgr.unload(p.id)
            except SandboxerError as exc:
                rows.append(
                    _Row(
                        name,
                        kind,
                        mode,
                        "load/call",
                        f"{type(exc).__name__}: {str(exc)[:200]}",
                        (time.perf_counter() - start) * 1000,
                        False,
                    )
                )
    if as_json:
        sys.stdout.write(_json.dumps([row.__dict__ for row in rows]).decode() + "\n")
    else:
        headers = ("example", "kind", "mode", "action", "result", "ms")
        table = [headers] + [
            (r.example, r.kind, r.mode, r.action, r.outcome, f"{r.ms:.1f}") for r in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
        for i, row in enumerate(table):
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
            if i == 0:
                print("  ".join("-" * w for w in widths))
    if not rows:
        print(f"sandboxer demo: no examples found in {examples}", file=sys.stderr)
        return 2
    return 0 if all(r.ok for r in rows) else 1
