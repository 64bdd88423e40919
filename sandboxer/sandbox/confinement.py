"""A sandboxed launch in its own cgroup, and what the process holds besides itself
(``Confinement``: the cgroup, the host uid, the egress endpoint, its scratch directories)
until it is released.

The supervisor's side: ``start.launch`` starts the launcher; this module creates and limits
the cgroup first, puts the launcher in it before it may go on, and never leaves a cgroup, a
uid or an endpoint behind when the launch fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import SandboxUnavailable
from . import child
from .cgroups import Cgroup, CgroupBackend, CgroupLimits, CgroupStats
from .cgroups import new_name as new_cgroup_name
from .egress import EGRESS_SOCKET, EgressEndpoint, EgressProxy, network_mode, proxy_environment
from .policy import SETUP_TIMEOUT
from .sources import Sources, release_uid
from .spec import LaunchSpec, Mount
from .start import launch

__all__ = ["Confinement", "launch_confined", "off_loop"]

T = TypeVar("T")


class Confinement:
    """What a sandboxed process holds besides itself: its cgroup, its host uid, its egress
    proxy endpoint and its scratch directories (``scratch``: target inside → path on the
    host). ``release()`` (idempotent) kills anything left in the cgroup, removes it, closes
    the endpoint, removes the scratch directories, frees the uid."""

    def __init__(
        self,
        cgroup: Cgroup | None,
        host_uid: int,
        memory_limit: int,
        fallbacks: tuple[str, ...] = (),
        egress: EgressEndpoint | None = None,
    ) -> None:
        self.cgroup = cgroup
        self.egress = egress
        self.fallbacks = fallbacks
        self.host_uid = host_uid
        self.memory_limit = memory_limit
        self.scratch: dict[str, str] = {}
        self._last: CgroupStats | None = None
        self._released = False

    def stats(self) -> CgroupStats | None:
        if not self._released and self.cgroup is not None:
            try:
                self._last = self.cgroup.stats()
            except OSError:
                pass
        return self._last

    def oom_killed(self) -> bool:
        stats = self.stats()
        return stats is not None and stats.oom_kills > 0

    async def aclose(self) -> None:
        """``release()`` with the cgroup's removal (kill, wait, rmdir) on a worker thread."""
        if self._released:
            return
        self.stats()
        if self.egress is not None:
            self.egress.close()
        group, self.cgroup = self.cgroup, None  # stats() keeps its last reading meanwhile
        if group is not None:
            await off_loop(group.remove)
        if self.scratch:
            await off_loop(_remove_scratch, self.scratch)
        self.release()

    def release(self) -> None:
        if self._released:
            return
        self.stats()
        self._released = True
        try:
            if self.egress is not None:
                self.egress.close()
            if self.cgroup is not None:
                self.cgroup.remove()
        finally:
            _remove_scratch(self.scratch)
            release_uid(self.host_uid)


def _make_scratch(spec: LaunchSpec) -> tuple[LaunchSpec, dict[str, str]]:
    """``spec`` with a fresh directory bound at each of its scratch targets, and those
    directories (0700, the supervisor's; writable inside through an idmapped bind, as a
    writable grant of the operator's is)."""
    made: dict[str, str] = {}
    try:
        for target in spec.scratch:
            made[target] = tempfile.mkdtemp(prefix="sandboxer-scratch-")
    except BaseException:
        _remove_scratch(made)
        raise
    binds = tuple(
        Mount(path, target, writable=True, exec=False, root="/") for target, path in made.items()
    )
    return dataclasses.replace(spec, scratch=(), mounts=(*spec.mounts, *binds)), made


def _remove_scratch(scratch: dict[str, str]) -> None:
    # rmtree never follows a link the plugin made there (it walks by fd, without following).
    for path in scratch.values():
        shutil.rmtree(path, ignore_errors=True)
    scratch.clear()


async def launch_confined(
    spec: LaunchSpec,
    *,
    backend: CgroupBackend,
    rpc_fd: int,
    logger: logging.Logger,
    sinks: child.Sinks | None = None,
    fallbacks: tuple[str, ...] = (),
    egress: EgressProxy | None = None,
    plugin_id: str = "-",
    setup_timeout: float = SETUP_TIMEOUT,
    stdin: int | None = None,
    handover: Callable[[socket.socket], None] | None = None,
) -> tuple[child.PluginProcess, Confinement]:
    """``start.launch`` inside a fresh cgroup limited as ``spec.sandbox`` says, and, when it lists
    allowed hosts, with an endpoint of ``egress`` (the proxy's socket bound in, the proxy
    variables in its environment) made for ``plugin_id``.

    With ``fallbacks`` naming "rlimit" and no cgroup to be had, the process is limited by
    RLIMIT_AS instead, and the returned Confinement says so."""
    sandbox = spec.sandbox
    spec, scratch = _make_scratch(spec)
    endpoint = None
    if network_mode(sandbox) == "proxy" and egress is not None:  # without one, launch refuses
        endpoint = egress.endpoint(plugin_id, sandbox.allowed_hosts)
        spec = dataclasses.replace(
            spec,
            env={**spec.env, **proxy_environment()},
            mounts=(*spec.mounts, Mount(endpoint.socket_path, EGRESS_SOCKET, exec=False)),
        )
    try:
        proc, confinement = await _launch_in_cgroup(
            spec,
            backend=backend,
            rpc_fd=rpc_fd,
            logger=logger,
            sinks=sinks,
            fallbacks=fallbacks,
            egress=endpoint,
            setup_timeout=setup_timeout,
            plugin_id=plugin_id,
            stdin=stdin,
            handover=handover,
        )
    except BaseException:
        if endpoint is not None:
            endpoint.close()
        _remove_scratch(scratch)
        raise
    confinement.scratch = scratch
    return proc, confinement


async def _launch_in_cgroup(
    spec: LaunchSpec,
    *,
    backend: CgroupBackend,
    rpc_fd: int,
    logger: logging.Logger,
    sinks: child.Sinks | None,
    fallbacks: tuple[str, ...],
    egress: EgressEndpoint | None,
    setup_timeout: float,
    plugin_id: str,
    stdin: int | None,
    handover: Callable[[socket.socket], None] | None,
) -> tuple[child.PluginProcess, Confinement]:
    sandbox = spec.sandbox
    limits = CgroupLimits(
        memory=sandbox.memory_limit, cpu=sandbox.cpu_limit, pids=sandbox.pids_limit
    )
    # A path that cannot be opened: no cgroup
    sources = Sources(spec, plugin_id=plugin_id, fallbacks=fallbacks)
    try:
        group = await off_loop(_create_cgroup, backend, limits)
    except SandboxUnavailable as exc:
        if "rlimit" not in fallbacks or not exc.missing.startswith("cgroup"):
            sources.discard()
            raise
        logger.warning(
            "no cgroup (%s): falling back to RLIMIT_AS as the host policy allows; "
            "CPU and process limits are not enforced",
            exc,
        )
        spec = dataclasses.replace(spec, address_space_limit=sandbox.memory_limit)
        proc, uid = await launch(
            spec,
            rpc_fd=rpc_fd,
            logger=logger,
            sinks=sinks,
            egress=egress,
            setup_timeout=setup_timeout,
            sources=sources,
            stdin=stdin,
            handover=handover,
            plugin_id=plugin_id,
        )
        return proc, Confinement(
            None,
            uid,
            sandbox.memory_limit,
            fallbacks=("rlimit", *sorted(sources.fallbacks)),
            egress=egress,
        )
    except BaseException:
        sources.discard()
        raise
    try:
        proc, uid = await launch(
            spec,
            rpc_fd=rpc_fd,
            logger=logger,
            on_spawn=lambda pid: off_loop(group.add, pid),
            sinks=sinks,
            egress=egress,
            setup_timeout=setup_timeout,
            sources=sources,
            stdin=stdin,
            handover=handover,
            plugin_id=plugin_id,
        )
    except BaseException:
        await off_loop(group.remove)
        raise
    return proc, Confinement(
        group, uid, sandbox.memory_limit, egress=egress, fallbacks=tuple(sorted(sources.fallbacks))
    )


# cgroup writes can take milliseconds (a v1 migration waits for RCU in every hierarchy):
# they run on a worker thread, so that other plugins' calls are not held up meanwhile.
# Creation is serialised: a backend may set itself up (v2: the supervisor's leaf) on first use.
_create_lock = threading.Lock()


def _create_cgroup(backend: CgroupBackend, limits: CgroupLimits) -> Cgroup:
    with _create_lock:
        return backend.create(new_cgroup_name(), limits)


async def off_loop(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` on a worker thread; it finishes even if the caller is cancelled
    (a cgroup half made or half removed is worse than a late one)."""
    return await asyncio.shield(asyncio.to_thread(function, *args))
