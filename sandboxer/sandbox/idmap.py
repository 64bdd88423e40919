"""Writable grants through idmapped mounts: what a plugin writes belongs, on the host, to the
grant's owner, and the plugin can write what that owner can.

A rootful plugin runs as an unprivileged host uid of its own (sandbox/ids.py). Without help, a
``:rw`` grant of a directory root owns would not be writable by it, and what it wrote
elsewhere would belong to uid 1,800,000-something on the host. An idmapped mount fixes both:
the grant is mounted with an idmapping in which the on-disk owner O (and group G) of the
granted directory stand for the plugin's host uid (and gid), and every other id for itself.
Through that mount, files of O look like the plugin's own, so owner permissions apply to it,
and whatever it creates is written to disk as O:G. Files of anyone else stay theirs: the
plugin meets them as any other user would. (A wasm plugin runs in the
supervisor's process: for it O stands for the supervisor's uid, so what WASI creates belongs
to O, not to root.)

The idmapping is a user namespace: the kernel reads a mount's idmapping from one. Making one
takes a process, so a short-lived helper unshares, the supervisor writes its maps (inside O,
outside the plugin's uid), keeps the namespace's fd and lets the helper go.

Only the supervisor, privileged over the filesystem, can idmap a mount (and only a detached
one, from ``open_tree``): it is done before the tree goes to the launcher. A filesystem that
cannot be idmapped (tmpfs before Linux 6.3, many network filesystems) fails the load, unless
the host policy names the fallback ``rw-without-idmap``.

Idmapping gives the plugin the owner's say over the grant, so it must never be able to leave
a set-user-id or set-group-id file there (a set-uid-root program, were O root): the seccomp
groups refuse such modes everywhere (profiles/seccomp.toml, files), and device nodes cannot
be made at all.
"""

from __future__ import annotations

import os
import select
import sys

from ..errors import SandboxUnavailable
from . import _syscalls as sc

__all__ = ["userns_mapping", "idmap_tree", "owned_tree", "FALLBACK"]

FALLBACK = "rw-without-idmap"
# The helper: a new user namespace, "ok" on stdout, then wait for stdin to close.
_HELPER = (
    "import ctypes, os\n"
    "ok = ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0\n"
    "os.write(1, b'ok' if ok else b'no')\n"
    "os.read(0, 1)\n"
)
_HELPER_TIMEOUT = 10.0


_ID_END = 4294967295  # (uid_t)-1 is no id


def shifted_identity(inside: int, outside: int) -> str:
    """A uid_map/gid_map text in which ``inside`` maps to ``outside`` and every other id to
    itself, but for ``outside`` (taken: it stays unmapped).

    Through a mount idmapped with it, only the owner changes: files of ``inside`` are the
    plugin's, files of anyone else stay theirs (so "other" permission bits apply as on any
    mount). A single-id map would leave everyone else's files unmapped, and the kernel
    refuses every write to a directory or file whose owner or group is unmapped (EACCES),
    however open its mode."""
    if inside == outside:
        return f"0 0 {_ID_END}\n"
    lines = [f"{inside} {outside} 1"]
    start = 0
    for skip in sorted({inside, outside}):
        if skip > start:
            lines.append(f"{start} {start} {skip - start}")
        start = skip + 1
    lines.append(f"{start} {start} {_ID_END - start}")
    return "\n".join(lines) + "\n"


def userns_mapping(uid: tuple[int, int], gid: tuple[int, int]) -> int:
    """The fd of a new user namespace whose maps shift ``uid`` = (inside, outside) and ``gid``
    likewise, every other id mapped to itself (``shifted_identity``)."""
    stdin_r, stdin_w = os.pipe2(os.O_CLOEXEC)
    stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
    python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    try:
        pid = os.posix_spawn(
            python,
            [python, "-I", "-S", "-c", _HELPER],
            {},
            file_actions=[(os.POSIX_SPAWN_DUP2, stdin_r, 0), (os.POSIX_SPAWN_DUP2, stdout_w, 1)],
        )
    except OSError as exc:
        for fd in (stdin_r, stdin_w, stdout_r, stdout_w):
            os.close(fd)
        raise SandboxUnavailable(
            f"cannot start the helper that makes an idmapping: {exc.strerror}",
            missing="idmapped mounts",
        ) from None
    os.close(stdin_r)
    os.close(stdout_w)
    try:
        ready, _, _ = select.select([stdout_r], [], [], _HELPER_TIMEOUT)
        said = os.read(stdout_r, 2) if ready else b""
        if said != b"ok":
            raise SandboxUnavailable(
                f"cannot make a user namespace for an idmapped mount (the helper said {said!r})",
                missing="idmapped mounts",
            )
        try:
            with open(f"/proc/{pid}/uid_map", "w") as f:
                f.write(shifted_identity(*uid))
            with open(f"/proc/{pid}/gid_map", "w") as f:
                f.write(shifted_identity(*gid))
            return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SandboxUnavailable(
                f"cannot write the idmapping {uid}/{gid}: {exc.strerror}", missing="idmapped mounts"
            ) from None
    finally:
        os.close(stdin_w)  # the helper reads EOF and exits
        os.close(stdout_r)
        os.waitpid(pid, 0)


def idmap_tree(
    tree: int, *, owner: tuple[int, int], outside: tuple[int, int], path: str, plugin_id: str | None
) -> None:
    """Idmap the detached mount ``tree`` (of the grant at ``path``, owned on disk by
    ``owner``) so that the owner's ids stand for ``outside``. SandboxUnavailable naming the
    path, its owner, the ids and the way out when the filesystem cannot be idmapped."""
    userns = userns_mapping((owner[0], outside[0]), (owner[1], outside[1]))
    try:
        sc.mount_setattr_idmap(tree, userns)
    except OSError as exc:
        raise SandboxUnavailable(
            f"plugin {plugin_id}: the writable allowed path {path} (owner uid {owner[0]}, gid "
            f"{owner[1]}) cannot be mounted so that the plugin (host uid {outside[0]}) writes "
            f"as its owner: this filesystem or kernel cannot make idmapped mounts "
            f"({exc.strerror}); grant a directory on ext4, xfs or btrfs (tmpfs from Linux "
            f"6.3), or let the plugin write as its own uid: make {path} writable by uid "
            f'{outside[0]} and add "{FALLBACK}" to fallbacks under [host] in the host config',
            missing="idmapped mounts",
        ) from None
    finally:
        os.close(userns)


def owned_tree(
    source: int,
    *,
    path: str,
    outside: tuple[int, int],
    owner: tuple[int, int] | None,
    fallbacks: tuple[str, ...],
    plugin_id: str | None,
) -> tuple[int, bool]:
    """A detached copy of the writable grant ``source`` (an fd of it) through which
    ``outside`` writes as ``owner`` (default: the grant's own owner), and whether the policy's
    fallback was taken instead (the copy then plain: ``outside`` writes as itself)."""
    st = os.fstat(source)
    tree = sc.open_tree(source)
    try:
        idmap_tree(
            tree,
            owner=owner or (st.st_uid, st.st_gid),
            outside=outside,
            path=path,
            plugin_id=plugin_id,
        )
    except SandboxUnavailable:
        if FALLBACK not in fallbacks:
            os.close(tree)
            raise
        return tree, True
    except BaseException:
        os.close(tree)
        raise
    return tree, False
