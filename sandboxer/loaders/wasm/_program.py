"""WASI programs as they are (``sandboxer exec PROG.wasm``): an unmodified WASI preview 1
command run once, in this process, under wasmtime's limits.

The program gets the argv it is given (``[PROG, ARG...]``), no environment but what the
caller names, this process's standard input if asked (else none), its stdout and stderr
straight to this process's own (or to callbacks), as they are written: nothing is held
whole, so a program that writes 100 MB holds 100 MB nowhere. Each allowed path is preopened
at the same path inside (``_grants``), and nothing else of the host is reachable: WASI
preview 1 has no sockets to open. Memory is the store's limit, time the epoch deadline,
and CPU, if asked, fuel.

``proc_exit(n)`` is the exit status n, and returning from ``_start`` is 0; a trap is no
status of the program's: it is reported as the limit it hit (memory, time, fuel) or as the
trap it was. A WASI 0.2 component, or a module that is no command (no ``_start``) or
imports what sandboxer does not provide, is refused before it runs, saying which.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

import wasmtime

from ..._wasm_magic import WASM_MAGIC
from ...errors import (
    CallTimeout,
    CpuLimitExceeded,
    MemoryLimitExceeded,
    PluginCrashed,
    PluginLoadError,
    SandboxerError,
)
from ...sandbox.policy import SandboxConfig
from ._abi import WASI_MODULE
from ._call import first_line
from ._engine import WasmEngine
from ._grants import check_grants, open_grants
from ._instance import Store, running
from ._module_cache import file_identity
from ._wasi import WasiContexts, define_wasi

__all__ = ["ProgramResult", "run_program"]

log = logging.getLogger("sandboxer.exec")

# A component's preamble: the magic, then version 0x0d and layer 1 (a core module's is 1, 0).
_COMPONENT = WASM_MAGIC + b"\x0d\x00\x01\x00"
_NO_DEADLINE = 10 * 365 * 86400.0


@dataclass(frozen=True, slots=True)
class ProgramResult:
    """How the run ended: the program's exit status, or (``error``) the limit or trap that
    stopped it, with the linear memory it had then."""

    exit_status: int | None
    error: SandboxerError | None
    memory_bytes: int
    fallbacks: tuple[str, ...] = ()


def run_program(
    path: str,
    argv: list[str],
    sandbox: SandboxConfig,
    *,
    env: dict[str, str],
    timeout: float | None,
    stdin: bool,
    stdout: Callable[[bytes], Any] | None = None,
    stderr: Callable[[bytes], Any] | None = None,
    grant_owner: tuple[int, int] | None = None,
    fallbacks: tuple[str, ...] = (),
) -> ProgramResult:
    """Run the WASI command at ``path`` to its end (blocking: call it on a worker thread).
    PluginLoadError when it cannot run at all (unreadable, not a command, a component, a
    grant WASI cannot give)."""
    who = "the program"
    try:
        with open(path, "rb") as f:
            head = f.read(len(_COMPONENT))
            if head.startswith(_COMPONENT):
                raise PluginLoadError(
                    f"{path} is a WebAssembly component (WASI 0.2), which the wasmtime Python "
                    "API here cannot run: build it as a WASI preview 1 command (wasm32-wasip1, "
                    "formerly wasm32-wasi)"
                )
            if not head.startswith(WASM_MAGIC):
                raise PluginLoadError(f"{path} is not a WebAssembly module")
            check_grants(sandbox, who, kind="program")
            engine = WasmEngine(workers=1)
            try:
                module = _module(engine, path, f, head)
            except BaseException:
                engine.close()
                raise
    except OSError as exc:
        raise PluginLoadError(f"{who}: cannot read {path}: {exc.strerror}") from None
    try:
        _check_command(path, module)
        grants, used = open_grants(sandbox, who, grant_owner=grant_owner, fallbacks=fallbacks)
        wasi = WasiContexts(
            "exec",
            enabled=True,
            grants=grants,
            engine=engine,
            log=log,
            closed_error=lambda: PluginLoadError("the program's grants were closed"),
        )
        try:
            config = wasi.for_program(argv, env, stdin=stdin, stdout=stdout, stderr=stderr)
            assert config is not None
            status, error, size = _run(engine, module, config, sandbox, timeout)
        finally:
            wasi.close()
        return ProgramResult(status, error, size, used)
    finally:
        engine.close()


def _module(engine: WasmEngine, path: str, f: BinaryIO, head: bytes) -> wasmtime.Module:
    """The program compiled: from the cache without reading the file when its SHA-256 is
    remembered for this very file (``_module_cache``), else read once, hashed and compiled
    from those bytes (or found compiled under their digest)."""
    st = os.fstat(f.fileno())
    digest = engine.remembered(st)
    module = engine.stored(digest) if digest is not None else None
    if module is not None:
        return module
    data = head + f.read()
    digest = hashlib.sha256(data).hexdigest()
    unchanged = file_identity(os.fstat(f.fileno())) == file_identity(st)
    if unchanged and len(data) == st.st_size:
        engine.remember(st, digest)  # unchanged while it was read: these bytes are the file's
    try:
        return engine.module(data, digest)
    except wasmtime.WasmtimeError as exc:
        detail = first_line(exc)
        raise PluginLoadError(f"{path} is not a valid WebAssembly module: {detail}") from None


def _check_command(path: str, module: wasmtime.Module) -> None:
    start = [e for e in module.exports if e.name == "_start"]
    if not start or not isinstance(start[0].type, wasmtime.FuncType):
        raise PluginLoadError(
            f"{path} is not a WASI command: it exports no _start function (a reactor or a "
            "library is loaded as a plugin, not run)"
        )
    foreign = sorted(f"{i.module}.{i.name}" for i in module.imports if i.module != WASI_MODULE)
    if foreign:
        raise PluginLoadError(
            f"{path} imports {', '.join(foreign[:5])}, which a WASI preview 1 program is not "
            f"given (only {WASI_MODULE})"
        )


def _run(
    engine: WasmEngine,
    module: wasmtime.Module,
    config: wasmtime.WasiConfig,
    sandbox: SandboxConfig,
    timeout: float | None,
) -> tuple[int | None, SandboxerError | None, int]:
    """The exit status, or the error that stopped it, and the linear memory at the end."""
    store = Store(engine, sandbox)
    linker = wasmtime.Linker(engine.engine)
    define_wasi(linker)
    memory: wasmtime.Memory | None = None
    try:
        store.store.set_wasi(config)
        store.arm(_NO_DEADLINE if timeout is None else timeout)
        try:
            with engine.ticking(), running(store):
                instance = linker.instantiate(store.store, module)
                exported = instance.exports(store.store).get("memory")
                memory = exported if isinstance(exported, wasmtime.Memory) else None
                start = instance.exports(store.store)["_start"]
                assert isinstance(start, wasmtime.Func)
                start(store.store)
            status, failure = 0, None
        except wasmtime.ExitTrap as exc:
            status, failure = exc.code, None
        except (wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            status, failure = None, exc
        size = memory.data_len(store.store) if memory is not None else 0
        if failure is None:
            return status, None, size
        return None, _stopped(failure, store, sandbox, timeout, size), size
    finally:
        store.release()


def _stopped(
    failure: BaseException,
    store: Store,
    sandbox: SandboxConfig,
    timeout: float | None,
    size: int,
) -> SandboxerError:
    """What stopped the program: a limit it hit, or the trap itself."""
    code = failure.trap_code if isinstance(failure, wasmtime.Trap) else None
    if store.timed_out and timeout is not None:
        return CallTimeout(
            f"the program did not finish within its timeout (--timeout {timeout:g}s) and was "
            "stopped",
            timeout=timeout,
        )
    if code is wasmtime.TrapCode.OUT_OF_FUEL:
        return CpuLimitExceeded(f"the program used up its fuel ({sandbox.fuel})")
    limit = sandbox.memory_limit
    if size + (64 << 10) > limit:
        return MemoryLimitExceeded(
            f"the program failed at its memory limit ({limit} bytes; linear memory {size} "
            f"bytes): {first_line(failure)}; raise --memory-limit if it needs more",
            limit=limit,
            peak=size,
        )
    near = ""
    if size * 4 >= limit * 3:  # a refused memory.grow is no trap itself: say what it was near
        near = (
            f" (its linear memory was {size} of its {limit}-byte memory limit: an allocation "
            "the limit refused may be why; raise --memory-limit if it needs more)"
        )
    return PluginCrashed(f"the program trapped: {first_line(failure)}{near}")
