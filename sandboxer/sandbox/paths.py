"""Host paths given to a sandbox, opened once by the supervisor: beneath their root, through
no symbolic link.

A path is a string that others may be able to change after it was checked: whoever can write
one of its parent directories (a co-tenant's sandbox with a ``:rw`` grant, an unprivileged
user owning a directory under a path root) can swap a component for a link to /etc between
the check and the use. So each path is resolved exactly once, here, to an ``O_PATH`` file
descriptor, and from then on only that fd is used: the launcher mounts what it refers to,
WASI preopens it, and what is reported is what the fd is, read back from the kernel.

A grant is opened from its root's fd with
``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)``, or, where the
kernel has no openat2, by a walk of ``O_NOFOLLOW`` opens one component at a time: a link
anywhere below the root fails the open instead of being followed. A grant a manifest asked
for has the host policy's path root it lies under (``PathGrant.root``), opened as the host's
configuration writes it; an operator's grant (an explicit ``SandboxConfig``, the CLI's
``--allow-path``) has "/" as its root, so no link is followed anywhere on its way: whoever
owns a directory on the way could otherwise point the operator's grant elsewhere. The error
names the path it resolves to now, which the operator can grant instead. Only the system's
own paths (/usr, the runtime: ``open_path``) are opened with links followed.

This module never opens a path by name a second time, and never hands out a path string
where an fd can do.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from ..errors import PluginLoadError
from . import _syscalls as sc
from .policy import PathGrant

__all__ = ["OpenedPath", "open_beneath", "open_grant", "open_path"]

_BENEATH = sc.RESOLVE_BENEATH | sc.RESOLVE_NO_SYMLINKS | sc.RESOLVE_NO_MAGICLINKS
_HAVE_OPENAT2 = True  # cleared at the first ENOSYS: the kernel predates openat2 (5.6)


@dataclass(slots=True)
class OpenedPath:
    """An ``O_PATH`` fd for a host path, owned by this object (``close()`` is idempotent).

    ``path`` is where the sandbox sees it (the grant as written), ``host_path`` what the fd
    refers to on the host, as the kernel reports it (for messages and logs only: never opened
    again by that name)."""

    fd: int
    path: str
    host_path: str
    is_dir: bool
    writable: bool = False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def proc_path(self) -> str:
        """The fd's ``/proc/self/fd`` link: opening it opens what the fd refers to, whatever
        has happened to its name since."""
        return f"/proc/self/fd/{self.fd}"

    def __enter__(self) -> OpenedPath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _walk_beneath(root_fd: int, relative: str) -> int:
    """openat2's RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS, done by hand: one ``O_NOFOLLOW``
    open per component; a component that is a link fails with ELOOP. ``relative`` is
    normalised (no '.', '..' or empty components: policy checks the spelling)."""
    current = os.dup(root_fd)
    try:
        for part in relative.split("/"):
            if part in ("", ".", ".."):
                raise OSError(errno.EINVAL, "a normalised relative path", relative)
            following = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=current)
            os.close(current)
            current = following
            if stat.S_ISLNK(os.fstat(current).st_mode):
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), relative)
        return current
    except BaseException:
        os.close(current)
        raise


def open_beneath(root: str, path: str, *, use_openat2: bool = True) -> int:
    """An ``O_PATH`` fd for ``path``, which must lie beneath ``root`` and be reached through no
    symbolic link below it. OSError as the kernel reports it: ELOOP for a link on the way,
    EXDEV for a path leading out of the root, ENOENT, EACCES."""
    global _HAVE_OPENAT2
    relative = os.path.relpath(path, root) if path != root else "."
    if relative == ".." or relative.startswith("../"):
        raise OSError(errno.EXDEV, "not beneath its root", path)
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if relative == ".":
            return os.dup(root_fd)
        if use_openat2 and _HAVE_OPENAT2:
            try:
                return sc.openat2(root_fd, relative, os.O_PATH, _BENEATH)
            except OSError as exc:
                if exc.errno != errno.ENOSYS:
                    raise
                _HAVE_OPENAT2 = False
        return _walk_beneath(root_fd, relative)
    finally:
        os.close(root_fd)


def _host_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def open_path(path: str) -> OpenedPath:
    """One of the system's paths, opened as named, links followed: /usr, /etc/localtime, the
    Python runtime. Never a grant. OSError if it cannot be opened."""
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    return OpenedPath(fd, path, _host_path(fd), stat.S_ISDIR(os.fstat(fd).st_mode))


_WHY = {
    errno.ELOOP: "a symbolic link is on its way (grants are opened through no link below "
    "their root: grant the directory the link points to)",
    errno.EXDEV: "it leads out of its path root",
    errno.ENOENT: "it does not exist",
    errno.ENOTDIR: "a component on its way is not a directory",
    errno.EACCES: "permission denied",
}


def _leads_to(path: str) -> str:
    """Where ``path`` resolves now, for the error message only (it may change under us)."""
    try:
        return f"; it resolves to {os.path.realpath(path)} now"
    except OSError:  # a link swapped while realpath read it
        return ""


def open_grant(grant: PathGrant, *, plugin_id: str | None = None) -> OpenedPath:
    """Open an allowed path once, through no link: beneath its path root when the policy
    checked it against one, else beneath "/" (an operator's grant). PluginLoadError naming
    the path, the root and why when it cannot be."""
    root = grant.root or "/"
    try:
        fd = open_beneath(root, grant.path)
    except OSError as exc:
        why = _WHY.get(exc.errno or 0, exc.strerror or str(exc))
        if exc.errno == errno.ELOOP:
            why += _leads_to(grant.path)
        where = f" beneath its path root {root}" if root != "/" else ""
        raise PluginLoadError(
            f"plugin {plugin_id}: allowed path {grant.path} cannot be opened{where}: {why}",
            plugin_id=plugin_id,
        ) from None
    opened = OpenedPath(fd, grant.path, _host_path(fd), stat.S_ISDIR(os.fstat(fd).st_mode))
    opened.writable = grant.writable
    return opened
