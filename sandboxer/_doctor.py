"""``sandboxer doctor``: what this host can enforce, found by trying, not by guessing.

Each namespace type is checked by unsharing it in a short-lived child; seccomp by the kernel's
own report; cgroups by detecting the backend the sandbox would use. Read-only: it creates and
removes nothing on the host except those children.
"""

from __future__ import annotations

import os
from typing import Any

from .errors import SandboxUnavailable

__all__ = ["diagnose"]

_NAMESPACES = {
    "user": 0x10000000, "mount": 0x00020000, "pid": 0x20000000, "net": 0x40000000,
    "ipc": 0x08000000, "uts": 0x04000000, "cgroup": 0x02000000,
}


def _can_unshare(flag: int) -> str:
    """"yes", or the reason it failed, by unsharing in a forked child."""
    from .sandbox import _syscalls as sc

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one syscall, report, exit; never returns to Python callers
        os.close(read_end)
        try:
            sc.unshare(flag if flag == _NAMESPACES["user"] else flag | _NAMESPACES["user"])
            os.write(write_end, b"yes")
        except OSError as exc:
            os.write(write_end, f"no ({exc.strerror})".encode())
        os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 200).decode() or "no (the check died)"
    os.close(read_end)
    os.waitpid(pid, 0)
    return answer


def _seccomp() -> str:
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail") as f:
            actions = f.read().split()
    except OSError:
        return "no (the kernel has no seccomp filter support)"
    return "yes" if "errno" in actions and "kill_process" in actions else f"partial {actions}"


def _cgroups() -> dict[str, Any]:
    from .sandbox import cgroups

    try:
        backend = cgroups.detect()
    except SandboxUnavailable as exc:
        return {"ok": False, "error": str(exc)}
    except OSError as exc:
        return {"ok": False, "error": f"{exc.strerror}: {exc.filename}"}
    where = getattr(backend, "bases", None) or {"v2": getattr(backend, "parent", "")}
    return {"ok": True, "version": backend.version,
            "controllers": list(backend.CONTROLLERS),  # type: ignore[attr-defined]
            "parents": where}


def _wasm() -> dict[str, Any]:
    """Whether wasm plugins can run: an engine with epochs and fuel that runs a tiny module."""
    try:
        from importlib.metadata import version

        import wasmtime

        from .loaders.wasm import WasmEngine
        engine = WasmEngine(workers=1)
        try:
            module = wasmtime.Module(engine.engine, wasmtime.wat2wasm(
                '(module (func (export "add") (param i32 i32) (result i32) '
                'local.get 0 local.get 1 i32.add))'))
            store = wasmtime.Store(engine.engine)
            store.set_fuel(1000)
            store.set_epoch_deadline(1)
            add = wasmtime.Instance(store, module, []).exports(store)["add"]
            assert isinstance(add, wasmtime.Func) and add(store, 2, 3) == 5
        finally:
            engine.close()
    except Exception as exc:  # any failure is the answer
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "wasmtime": version("wasmtime"),
            "limits": ["memory", "tables", "instances", "epoch deadline", "fuel"],
            "wasi": "preopened allowed paths only; no sockets, no environment"}


def diagnose() -> dict[str, Any]:
    namespaces = {name: _can_unshare(flag) for name, flag in _NAMESPACES.items()}
    cgroup = _cgroups()
    seccomp = _seccomp()
    wasm = _wasm()
    ok = (all(v == "yes" for v in namespaces.values()) and cgroup["ok"] and seccomp == "yes"
          and wasm["ok"])
    return {
        "ok": ok,
        "mode": "rootful" if os.geteuid() == 0 else "rootless",
        "kernel": os.uname().release,
        "namespaces": namespaces,
        "seccomp": seccomp,
        "cgroups": cgroup,
        "wasm": wasm,
        "network_policy": "no network only (allow-listed egress is not built yet)",
    }
