"""The supervisor's side of a sandboxed launch: every host path it needs, opened once, here
(``Sources``), and the host uid the plugin runs as (taken with them, ``release_uid`` gives it
back).

The launcher (``launcher.py``, inside the new namespaces) receives these as fds; this module
never hands it a path string to open by name instead.
"""

from __future__ import annotations

import os
import stat

from ..errors import PluginLoadError
from . import _syscalls
from .idmap import FALLBACK as IDMAP_FALLBACK
from .idmap import owned_tree
from .ids import HostIds
from .paths import OpenedPath, open_grant, open_path
from .policy import PathGrant
from .spec import DEVICES, LaunchSpec, Mount

__all__ = [
    "Sources",
    "release_uid",
    "MAX_COPY_BYTES",
    "MAX_COPY_ENTRIES",
    "open_copy_source",
    "copy_entry",
    "tree_size",
]

# Host uids for rootful plugins: one per running sandbox, unique host-wide (sandbox/ids.py).
_ids = HostIds()

MAX_COPY_BYTES = 512 << 20
MAX_COPY_ENTRIES = 20_000


def tree_size(path: str) -> int:
    """Bytes a copy of ``path`` needs in a tmpfs (with room for inodes), or PluginLoadError
    when the tree is too large to copy."""
    total, entries = 0, 0
    if os.path.isdir(path):
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                entries += 1
                full = os.path.join(dirpath, name)
                if os.path.isfile(full) and not os.path.islink(full):
                    total += os.path.getsize(full)
    else:
        entries, total = 1, os.path.getsize(path)
    if total > MAX_COPY_BYTES or entries > MAX_COPY_ENTRIES:
        raise PluginLoadError(
            f"the plugin directory {path} is too large to run sandboxed ({total} bytes in "
            f"{entries} entries; at most {MAX_COPY_BYTES} bytes and {MAX_COPY_ENTRIES} "
            "entries): it is copied into the sandbox, so that no host path shows inside"
        )
    return total + entries * 4096 + (1 << 20)


class Sources:
    """Every host path a launch needs, opened once, here, by the supervisor: the binds
    (grants beneath their root through no link; the system's paths as named), the devices,
    the copied plugin directory. The launcher receives these fds and never opens a host
    path by name: a name swapped for a link after this point changes nothing.

    Rootful, each bind goes as a detached copy of its mount tree (``open_tree``), which the
    launcher attaches in its own mount namespace; a writable grant's copy is idmapped so that
    the plugin writes as the grant's owner (sandbox/idmap.py). A rootless supervisor cannot
    clone mounts, so it sends the ``O_PATH`` fds; the launcher re-opens each by the path the
    kernel reports for it, through no link, and uses it only if it is the same inode (else the
    load fails); there the plugin is the caller's own uid, which needs no idmapping.

    The host uid the plugin will run as is taken here too (the idmapping names it): give it
    back with ``release_uid(sources.host_uid)`` if the launch does not happen.
    """

    def __init__(
        self, spec: LaunchSpec, *, plugin_id: str | None = None, fallbacks: tuple[str, ...] = ()
    ) -> None:
        self.fds: list[int] = []
        self.binds: list[dict[str, object]] = []
        self.copies: list[dict[str, object]] = []
        self.cloned = clone = os.geteuid() == 0
        self.fallbacks: set[str] = set()
        self.host_uid = _ids.acquire() if clone else os.geteuid()
        self.host_gid = self.host_uid if clone else os.getegid()
        try:
            for mount, device in [(m, False) for m in spec.mounts] + [
                (Mount(d, d, writable=True, exec=False), True) for d in DEVICES
            ]:
                opened = (
                    _open_system_path(mount.source, plugin_id)
                    if mount.root is None
                    else open_grant(
                        PathGrant(mount.source, mount.writable, root=mount.root),
                        plugin_id=plugin_id,
                    )
                )
                with opened:
                    self.binds.append(
                        {
                            "target": mount.target,
                            "writable": mount.writable,
                            "exec": mount.exec,
                            "device": device,
                            "host_path": opened.host_path,
                            "dir": opened.is_dir,
                            "fd": len(self.fds),
                        }
                    )
                    if not clone:
                        self._keep(os.dup(opened.fd))
                    elif mount.writable and mount.root is not None:  # a writable grant
                        tree, fell_back = owned_tree(
                            opened.fd,
                            path=opened.path,
                            outside=(self.host_uid, self.host_gid),
                            owner=spec.grant_owner,
                            fallbacks=fallbacks,
                            plugin_id=plugin_id,
                        )
                        self._keep(tree)
                        if fell_back:
                            self.fallbacks.add(IDMAP_FALLBACK)
                    else:
                        self._keep(_syscalls.open_tree(opened.fd))
            for copy in spec.copies:
                size = tree_size(copy.source)
                fd = open_copy_source(copy.source, plugin_id)
                self._keep(fd)
                self.copies.append(copy_entry(copy, fd=len(self.fds) - 1, source=fd, size=size))
        except BaseException:
            self.close()
            release_uid(self.host_uid)
            raise

    def _keep(self, fd: int) -> None:
        self.fds.append(fd)

    def close(self) -> None:
        """Close the fds (sent, or no longer needed); the uid lives on with the sandbox."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

    def discard(self) -> None:
        """The launch will not happen: close the fds and give the uid back."""
        self.close()
        release_uid(self.host_uid)


def _open_system_path(path: str, plugin_id: str | None) -> OpenedPath:
    try:
        return open_path(path)
    except OSError as exc:
        raise PluginLoadError(
            f"plugin {plugin_id}: {path} cannot be opened to mount it in the "
            f"sandbox: {exc.strerror}",
            plugin_id=plugin_id,
        ) from None


def open_copy_source(path: str, plugin_id: str | None) -> int:
    """The plugin directory (or bare file) to copy, opened for reading as the host program
    named it; the launcher walks it from this fd, through no link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise PluginLoadError(
            f"plugin {plugin_id}: {path} cannot be opened: {exc.strerror}", plugin_id=plugin_id
        ) from None
    mode = os.fstat(fd).st_mode
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        os.close(fd)
        raise PluginLoadError(
            f"plugin {plugin_id}: {path} is neither a directory nor a regular file",
            plugin_id=plugin_id,
        )
    return fd


def copy_entry(copy: Mount, *, fd: int, source: int, size: int) -> dict[str, object]:
    """A copied tree as the launcher's spec (or a warm sandbox's handover) names it: its fd's
    place, its size, whether it is a bare file (as the opened ``source`` is, not as its name
    now says) and the digests the copy must have."""
    return {
        "target": copy.target,
        "fd": fd,
        "name": os.path.basename(copy.source),
        "size": size,
        "max_entries": MAX_COPY_ENTRIES,
        "bare": not stat.S_ISDIR(os.fstat(source).st_mode),
        "expect": [d.to_json() for d in copy.digests],
    }


def release_uid(uid: int) -> None:
    """Give back the host uid a launch took (rootless, it is the caller's own: nothing to do)."""
    if os.geteuid() == 0:
        _ids.release(uid)
