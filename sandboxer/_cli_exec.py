"""``sandboxer exec``: any program in the sandbox (the launch, sandbox/program.py), or a
WASI program as it is, in this process under wasmtime (loaders/wasm/_program.py).

Exit codes: the program's own status passes through (128+N when a signal N killed it);
sandboxer's own outcomes use its codes: 2 the program cannot run inside (usage, not found),
3 sandboxer stopped it (the --timeout deadline, the memory limit, fuel, a trap), 4 this host
cannot enforce the sandbox. Those collide with a program's own 2-4, so each of sandboxer's
is said on stderr ("sandboxer: ...") and, with --json, as ``error``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
import time
from typing import Any

from ._cli_common import print_json, report_error, sandbox_from
from ._cli_parser import UsageError
from ._units import format_duration, format_size
from ._wasm_magic import is_wasm
from .config import HostConfig
from .errors import CallTimeout, MemoryLimitExceeded, SandboxerError
from .sandbox.policy import SandboxRequest

__all__ = ["cmd_exec"]


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

    def sink(self, chunk: bytes) -> int:
        """``write`` as a WASI output callback: it reports the bytes taken."""
        self.write(chunk)
        return len(chunk)

    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    @staticmethod
    def result(out: _Captured, err: _Captured) -> dict[str, Any]:
        """``--json``'s ``result``: both streams as text, and which were cut."""
        return {
            "stdout": out.text(),
            "stderr": err.text(),
            "truncated": [
                name
                for name, stream in (("stdout", out), ("stderr", err))
                if stream.total > len(stream.data)
            ],
        }


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


async def cmd_exec(args: argparse.Namespace) -> int:
    """``exec``: the program's own exit status passes through (128+N when a signal N killed
    it); sandboxer's own outcomes use its codes: 2 the program cannot run inside (usage,
    not found), 3 sandboxer stopped it (the --timeout deadline, the memory limit), 4 this
    host cannot enforce the sandbox. Those collide with a program's own 2-4, so each of
    sandboxer's is said on stderr ("sandboxer: ...") and, with --json, as ``error``."""
    from ._learn import profile_file, write_profile
    from .sandbox import cgroups, program
    from .sandbox.denials import summary
    from .sandbox.egress import EgressProxy
    from .sandbox.seccomp_cache import filter_for

    command = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not command:
        raise UsageError("exec: name the program to run after --")
    host = HostConfig.load()
    host, args.profile = profile_file(host, args.profile)
    if is_wasm(command[0]):  # wasmtime is imported only for one
        return await _exec_wasm(args, command, host)
    if args.fuel is not None:
        raise UsageError("exec: --fuel is for WebAssembly programs (native ones: --cpu-limit)")
    sandbox = sandbox_from(SandboxRequest(), None, host, args)
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
                sandbox.profile,
                network=sandbox.network_allowed,
                extra_dirs=host.profile_dirs,
                learn=args.learn is not None,
            ),
            learn=args.learn is not None,
            sinks=sinks,
            egress=egress,
            setup_timeout=host.setup_timeout,
            profile_dirs=host.profile_dirs,
            fallbacks=host.fallbacks,
            grant_owner=host.grant_owner,
            stdin=_exec_stdin(),
            timeout=args.timeout,
            env=dict(args.env),
        )
    except SandboxerError as exc:
        return report_error(
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
            "denied": result.denied,
        },
        exitStatus=status,
        signal=signum,
    )
    denied = summary(result.denied or {}, result.explained)
    if denied:  # after the program's own output, which went ahead of this line
        print(f"sandboxer: {denied}", file=sys.stderr)
    if args.learn is not None:
        groups = write_profile(
            args.learn,
            learned=result.learned,
            refused=result.denied or {},
            explained=result.explained,
            profile=sandbox.profile,
            profile_dirs=host.profile_dirs,
            argv=command,
            network=sandbox.network_allowed,
        )
        print(
            f"sandboxer: learned profile {args.learn} (run it with --profile {args.learn}): "
            f"groups {', '.join(groups)}",
            file=sys.stderr,
        )
    if args.json:
        extra["result"] = _Captured.result(out, err)
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
        return report_error(stopped, as_json=args.json, extra=extra)
    if args.json:
        ok = code == 0
        print_json(
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


async def _exec_wasm(args: argparse.Namespace, command: list[str], host: HostConfig) -> int:
    """``exec PROG.wasm``: a WASI command run as it is, in this process, under wasmtime's
    limits (loaders/wasm/_program.py): its exit status is ours; a limit or a trap that
    stopped it is 3, said on stderr (and, with --json, as ``error``)."""
    from .loaders.wasm._program import run_program

    unfit = [
        option
        for option, given in (
            ("--network", args.network),
            ("--allow-host", args.allow_host),
            ("--profile", args.profile),
            ("--learn", args.learn),
        )
        if given
    ]
    if unfit:
        raise UsageError(
            f"exec: {', '.join(unfit)}: a WASI program has no sockets and no syscalls of its "
            "own to filter (it runs under wasmtime in this process)"
        )
    if args.cpu_limit is not None and args.cpu_limit < 1.0:
        raise UsageError(
            "exec: --cpu-limit below 1 cannot be enforced for a WASI program (it runs on one "
            "thread of this process): bound it with --timeout or --fuel"
        )
    sandbox = sandbox_from(SandboxRequest(), None, host, args)
    if args.fuel is not None:  # the operator's choice, as --memory-limit is; else the policy's
        sandbox = dataclasses.replace(sandbox, fuel=args.fuel)
    extra: dict[str, Any] = {
        "result": None,
        "plugin": None,
        "program": {"argv": command, "wasm": True},
        "sandbox": {
            **sandbox.to_json(),
            "timeout": None if args.timeout is None else format_duration(args.timeout),
        },
    }
    out = err = None
    if args.json:
        out, err = _Captured(host.max_frame), _Captured(host.max_frame)
    start = time.perf_counter()
    try:
        result = await asyncio.to_thread(
            run_program,
            command[0],
            command,
            sandbox,
            env=dict(args.env),
            timeout=args.timeout,
            stdin=_exec_stdin() is not None,
            stdout=out.sink if out is not None else None,
            stderr=err.sink if err is not None else None,
            grant_owner=host.grant_owner,
            fallbacks=host.fallbacks,
        )
    except SandboxerError as exc:
        return report_error(
            exc, as_json=args.json, extra={**extra, "exitStatus": None, "signal": None}
        )
    extra.update(
        stats={
            "durationMs": round((time.perf_counter() - start) * 1000, 3),
            "peakMemoryBytes": result.memory_bytes,
            "cpuTimeSeconds": None,
        },
        exitStatus=result.exit_status,
        signal=None,
    )
    if out is not None and err is not None:
        extra["result"] = _Captured.result(out, err)
    if result.error is not None:
        return report_error(result.error, as_json=args.json, extra=extra)
    status = result.exit_status or 0
    if args.json:
        print_json(
            {
                "ok": status == 0,
                "result": extra.pop("result"),
                "error": None
                if status == 0
                else {
                    "type": "ProgramFailed",
                    "message": f"the program exited with status {status}",
                    "exitStatus": status,
                    "signal": None,
                },
                **extra,
            }
        )
    return status
