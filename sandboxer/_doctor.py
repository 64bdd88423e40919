"""``sandboxer doctor``: what this host can enforce, found by trying, not by guessing.

Each namespace type is checked by unsharing it in a short-lived child; seccomp by the kernel's
own report; cgroups by detecting the backend the sandbox would use. Read-only: it creates and
removes nothing on the host except those children.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from .config import HostConfig
from .errors import SandboxUnavailable

__all__ = ["diagnose"]

_NAMESPACES = {
    "user": 0x10000000,
    "mount": 0x00020000,
    "pid": 0x20000000,
    "net": 0x40000000,
    "ipc": 0x08000000,
    "uts": 0x04000000,
    "cgroup": 0x02000000,
}


def _in_child(action: Callable[[], None]) -> str:
    """ "yes", or the reason it failed, by running ``action`` in a forked child."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a few syscalls, report, exit; never returns to Python callers
        os.close(read_end)
        try:
            action()
            os.write(write_end, b"yes")
        except OSError as exc:
            os.write(write_end, f"no ({exc.strerror})".encode())
        os._exit(0)
    os.close(write_end)
    answer = os.read(read_end, 200).decode() or "no (the check died)"
    os.close(read_end)
    os.waitpid(pid, 0)
    return answer


def _can_unshare(flag: int) -> str:
    from .sandbox import _syscalls as sc

    return _in_child(
        lambda: sc.unshare(flag if flag == _NAMESPACES["user"] else flag | _NAMESPACES["user"])
    )


def _proxy_port() -> None:
    """What the launcher does for a proxied plugin: loopback up in a new net namespace, and
    the proxy's port bound on it."""
    import socket

    from .sandbox import _syscalls as sc
    from .sandbox.egress import PROXY_HOST, PROXY_PORT

    sc.unshare(_NAMESPACES["user"] | _NAMESPACES["net"])
    sc.loopback_up()
    with socket.create_server((PROXY_HOST, PROXY_PORT)):
        pass


def _network(config: HostConfig) -> dict[str, Any]:
    from .sandbox.egress import EGRESS_SOCKET, PROXY_HOST, PROXY_PORT

    proxy = _in_child(_proxy_port)
    return {
        "ok": proxy == "yes",
        "default": (
            "a net namespace of its own with only its loopback, up: TCP and UDP reach "
            "the plugin itself, nothing else (the strict profile: no inet socket)"
        ),
        "allowed_hosts": (
            f"through the egress proxy (HTTP CONNECT, HTTP, SOCKS5) at "
            f"{PROXY_HOST}:{PROXY_PORT} in the plugin's namespace and "
            f"{EGRESS_SOCKET}; wasm through sandboxer.http_request"
            if proxy == "yes"
            else f"unavailable: the proxy port: {proxy}"
        ),
        "full_network": (
            "allowed by the host policy (allow_full_network = true)"
            if config.allow_full_network
            else "refused by the host policy (allow_full_network = false)"
        ),
        "hosts_file": config.egress_hosts_file,
        "max_connections_per_plugin": config.egress_max_connections,
    }


def _seccomp() -> str:
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail") as f:
            actions = f.read().split()
    except OSError:
        return "no (the kernel has no seccomp filter support)"
    return "yes" if "errno" in actions and "kill_process" in actions else f"partial {actions}"


def _denials() -> str:
    """Whether a denial can be explained (sandbox/denials.py): the kernel's user notification."""
    from .sandbox.denials import available

    why = available()
    if why is None:
        return "yes"
    return f"no ({why}); the filter still refuses, but denials cannot be explained"


def _cgroups() -> dict[str, Any]:
    from .sandbox import cgroups

    try:
        backend = cgroups.detect()
    except SandboxUnavailable as exc:
        return {"ok": False, "error": str(exc)}
    except OSError as exc:
        return {"ok": False, "error": f"{exc.strerror}: {exc.filename}"}
    where = getattr(backend, "bases", None) or {"v2": getattr(backend, "parent", "")}
    return {
        "ok": True,
        "version": backend.version,
        "controllers": list(backend.CONTROLLERS),  # type: ignore[attr-defined]
        "parents": where,
    }


def _wasm() -> dict[str, Any]:
    """Whether wasm plugins can run: an engine with epochs and fuel that runs a tiny module."""
    try:
        from importlib.metadata import version

        import wasmtime

        from .loaders.wasm import WasmEngine

        engine = WasmEngine(workers=1)
        try:
            module = wasmtime.Module(
                engine.engine,
                bytes(
                    wasmtime.wat2wasm(
                        '(module (func (export "add") (param i32 i32) (result i32) '
                        "local.get 0 local.get 1 i32.add))"
                    )
                ),
            )
            store = wasmtime.Store(engine.engine)
            store.set_fuel(1000)
            store.set_epoch_deadline(1)
            add = wasmtime.Instance(store, module, []).exports(store)["add"]
            assert isinstance(add, wasmtime.Func) and add(store, 2, 3) == 5
        finally:
            engine.close()
    except Exception as exc:  # any failure is the answer
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {
        "ok": True,
        "wasmtime": version("wasmtime"),
        "limits": ["memory", "tables", "instances", "epoch deadline", "fuel"],
        "wasi": "preopened allowed paths only; no sockets, no environment",
        "network": "sandboxer.http_request, through the egress proxy's allow-list",
        "cache": _wasm_cache(),
    }


def _wasm_cache() -> dict[str, Any]:
    """Where compiled modules are kept between processes, and what is there; or why they
    are not (then every process compiles every module)."""
    from .loaders.wasm import _module_cache

    found = _module_cache.usage()
    if isinstance(found, str):
        return {"directory": None, "reason": found}
    return {
        "directory": found.directory,
        "entries": found.entries,
        "bytes": found.bytes,
        "max_bytes": _module_cache.MAX_BYTES,
    }


def _grpc() -> dict[str, Any]:
    """Whether go-plugin gRPC plugins can load: grpcio and protobuf, protoc for .proto files,
    and whether a TCP plugin's own namespace can be entered (root only)."""
    import importlib.util
    import shutil
    from importlib.metadata import PackageNotFoundError, version

    try:
        versions = {name: version(name) for name in ("grpcio", "protobuf")}
    except PackageNotFoundError as exc:
        return {"ok": False, "error": f"{exc.name} is not installed (pip install {exc.name})"}
    if importlib.util.find_spec("grpc") is None:
        return {"ok": False, "error": "grpcio is installed but grpc cannot be imported"}
    protoc = shutil.which("protoc", path="/usr/local/bin:/usr/bin:/bin")
    return {
        "ok": True,
        **versions,
        "protoc": protoc
        or "missing: .proto files cannot be compiled (descriptor sets still load); "
        "apt-get install protobuf-compiler",
        "tcp_plugins": "reached inside their own network namespace"
        if os.geteuid() == 0
        else "not reachable by a rootless supervisor (Unix-socket plugins only)",
    }


def diagnose(config: HostConfig | None = None) -> dict[str, Any]:
    """The report; ``config`` (default: HostConfig()) for the network policy's settings."""
    namespaces = {name: _can_unshare(flag) for name, flag in _NAMESPACES.items()}
    cgroup = _cgroups()
    seccomp = _seccomp()
    wasm = _wasm()
    grpc = _grpc()
    network = _network(config if config is not None else HostConfig())
    ok = (
        all(v == "yes" for v in namespaces.values())
        and cgroup["ok"]
        and seccomp == "yes"
        and wasm["ok"]
        and grpc["ok"]
        and network["ok"]
    )
    return {
        "ok": ok,
        "mode": "rootful" if os.geteuid() == 0 else "rootless",
        "kernel": os.uname().release,
        "namespaces": namespaces,
        "seccomp": seccomp,
        "seccomp_denials_explained": _denials(),
        "cgroups": cgroup,
        "wasm": wasm,
        "grpc": grpc,
        "network": network,
    }
