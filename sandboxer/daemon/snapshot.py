"""A snapshot of a client's plugin, taken with the client's own rights.

The daemon runs as root and loads plugins for unprivileged clients; reading a client's path
itself, it would be a confused deputy (a client naming /etc/shadow, another tenant's plugin,
or a link to either). So it never reads a tenant's path: a walker process running as the
client (``_walker.py``: its uid, gid and supplementary groups) opens and walks it, the kernel
checking every access, and streams it here; this side writes the copy into a root-owned
directory of the daemon's, which the daemon then loads with its normal machinery.

This side must never read a file the tenant controls (a FUSE file could block a root thread
for good: the walker reads, we read its socket under a deadline), trust anything the walker
sends (the client owns its uid and can ptrace it), write outside ``into`` or through a link,
or leave a walker, an fd or a partial copy behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass

from ..errors import PluginLoadError
from ..sandbox import launcher_mounts
from ..sandbox.sources import MAX_COPY_BYTES, MAX_COPY_ENTRIES

__all__ = ["Caller", "snapshot_as", "receive", "MAX_COPY_BYTES", "MAX_COPY_ENTRIES"]

HEADER_LIMIT = 65536  # a header line: a path of at most PATH_MAX bytes, JSON-escaped
CHUNK = 256 << 10
PATH_MAX = 4096  # and so the walker's request line fits its socket's buffer

_WALKER_DIR = os.path.dirname(os.path.abspath(__file__))
_LAUNCHER_DIR = os.path.dirname(os.path.abspath(launcher_mounts.__file__))

# Run with -I -S: PYTHONPATH, the user's site directory and the venv's site-packages are
# not read; the walker imports the standard library and the launcher's modules only.
# It starts as root and becomes the caller (groups, gid, uid: every one of the three ids of
# each, so no capability is left) before it imports or opens anything: the daemon's loop may be
# uvloop, whose subprocesses take no user/group arguments.
_BOOTSTRAP = """\
import json, os, sys
fd = int(sys.argv[3])
try:
    uid, gid = int(sys.argv[4]), int(sys.argv[5])
    os.setgroups([int(g) for g in sys.argv[6].split(",") if g])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise PermissionError("the ids did not change")
    sys.path[:0] = sys.argv[1:3]
    import _walker
except BaseException as exc:
    error = {"kind": "error", "error": "the walker cannot start: " + type(exc).__name__}
    os.write(fd, json.dumps(error).encode() + b"\\n")
    raise SystemExit(1)
_walker.main(fd)
"""


@dataclass(frozen=True, slots=True)
class Caller:
    """A client as SO_PEERCRED and its supplementary groups name it."""

    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups
    pid: int = 0  # for messages/audit only


class _Refused(Exception):
    """Why the snapshot is refused (``receive`` names the path and the client)."""


async def snapshot_as(
    caller: Caller,
    path: str,
    into: str,
    *,
    max_bytes: int = MAX_COPY_BYTES,
    max_entries: int = MAX_COPY_ENTRIES,
    timeout: float = 30.0,
) -> str:
    """Copy the plugin directory or bare file at ``path`` into ``into`` (an existing
    root-owned 0700 directory of the daemon's) as ``caller`` could read it, and return the
    copy's path, ``into/<basename of path>``. PluginLoadError when the caller cannot read it
    all, or it breaks a rule or a limit; nothing is then left in ``into``."""
    name = _copy_name(caller, path)
    request = json.dumps({"path": path, "name": name, "max_entries": max_entries}).encode()
    ours, theirs = socket.socketpair()
    try:
        # Sent before the walker starts, into the socket's empty buffer: never blocks.
        ours.sendall(request + b"\n")
        try:
            walker = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-I", "-S", "-c", _BOOTSTRAP, _WALKER_DIR, _LAUNCHER_DIR, str(theirs.fileno())),
                *(str(caller.uid), str(caller.gid), ",".join(map(str, caller.groups))),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                cwd="/",
                env={"PATH": "/usr/bin:/bin"},
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise PluginLoadError(
                f"{_who(caller, path)}: the walker cannot be started as that uid: {exc}"
            ) from exc
        finally:
            theirs.close()
        copy = None
        try:
            copy = await receive(
                ours,
                caller,
                path,
                into,
                max_bytes=max_bytes,
                max_entries=max_entries,
                timeout=timeout,
            )
        finally:
            try:
                await _reap(walker)
            except BaseException:  # cancelled while reaping: the copy is not handed out
                if copy is not None:
                    _remove(copy)
                raise
        return copy
    finally:
        ours.close()


async def _reap(walker: asyncio.subprocess.Process) -> None:
    """Kill the walker (done, or not to be waited for) and reap it; a cancellation meanwhile
    is raised once it is reaped, so that no walker outlives its snapshot."""
    if walker.returncode is None:
        walker.kill()
    waiting = asyncio.ensure_future(walker.wait())
    cancelled = False
    while not waiting.done():
        try:
            await asyncio.shield(waiting)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


async def receive(
    sock: socket.socket,
    caller: Caller,
    path: str,
    into: str,
    *,
    max_bytes: int = MAX_COPY_BYTES,
    max_entries: int = MAX_COPY_ENTRIES,
    timeout: float = 30.0,
) -> str:
    """The daemon's side of a snapshot: read the walker's stream from ``sock`` (the format is
    in ``_walker.py``'s docstring) within ``timeout`` seconds, and write the copy it describes
    as ``into/<basename of path>``; return that path. Everything the walker says is checked:
    names, kinds, modes, links, sizes against the bytes sent, the limits. The caller closes
    ``sock``; on any failure (cancellation too) the partial copy is removed."""
    name = _copy_name(caller, path)
    copy = _Copy(into, name, max_bytes=max_bytes, max_entries=max_entries)
    try:
        try:
            async with asyncio.timeout(timeout):
                await copy.fill(_Stream(sock))
        except TimeoutError:
            raise _Refused(
                f"it was not read within {timeout} s (a file that blocks, such as one on a "
                "FUSE mount?); the walker was stopped"
            ) from None
        except _WalkerFailed as exc:
            raise _Refused(f"copying it as that uid failed: {exc}") from None
        except OSError as exc:  # named inside the copy: the staging directory is the daemon's
            where = os.path.relpath(exc.filename, into) if isinstance(exc.filename, str) else ""
            raise _Refused(
                f"the copy could not be made: {exc.strerror}" + (f" ({where!r})" if where else "")
            ) from None
    except _Refused as exc:
        copy.remove()
        raise PluginLoadError(f"{_who(caller, path)}: {exc}") from None
    except BaseException:
        copy.remove()
        raise
    return copy.top


def _who(caller: Caller, path: str) -> str:
    pid = f", pid {caller.pid}" if caller.pid else ""
    return f"plugin path {path!r} (client uid {caller.uid}{pid})"


def _copy_name(caller: Caller, path: str) -> str:
    """The copy's name, the path's last component; the path is absolute, without '..'."""
    refused = None
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        refused = "it must be an absolute path"
    elif len(path) > PATH_MAX:
        refused = f"it is longer than {PATH_MAX} characters"
    elif ".." in path.split("/"):
        refused = "'..' is refused in it: give the plugin's path as it is"
    elif not _is_name(name := os.path.basename(path.rstrip("/"))):
        refused = "it names no file or directory"
    if refused is not None:
        raise PluginLoadError(f"{_who(caller, path)}: {refused}")
    return name


def _is_name(name: object) -> bool:
    """One path component: not empty, not '.' or '..', no '/' or NUL, at most 255 bytes."""
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\0" in name:
        return False
    try:
        return len(os.fsencode(name)) <= 255
    except UnicodeEncodeError:  # a lone surrogate that no file name can have
        return False


def _link_target(target: object, where: str) -> str:
    """A link in the copy leads only downwards inside it: relative, no '..'. The copy is a
    host directory that root reads (the manifest, the entrypoint): a link out of it would
    have the daemon follow it with root's rights."""
    if not isinstance(target, str) or not target or "\0" in target:
        raise _Refused(f"the walker sent a bad link target for {where!r}: {target!r}")
    if target.startswith("/") or ".." in target.split("/"):
        raise _Refused(
            f"a symbolic link where none may be: {where!r} -> {target!r} (a link in a plugin "
            "must be relative and lead only downwards, without '..')"
        )
    return target


def _number(header: dict[str, object], field: str, most: int) -> int:
    value = header.get(field)
    if type(value) is not int or not 0 <= value <= most:
        raise _Refused(f"the walker sent a bad {field}: {value!r}")
    return value


class _WalkerFailed(Exception):
    """The walker reported that it could not read the plugin (its own words)."""


class _Stream:
    """Buffered reads from the walker's socket, on the event loop."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._buffer = bytearray()
        self._loop = asyncio.get_running_loop()

    async def _more(self) -> bool:
        data = await self._loop.sock_recv(self._sock, CHUNK)
        self._buffer += data
        return bool(data)

    async def header(self) -> dict[str, object]:
        while (end := self._buffer.find(b"\n", 0, HEADER_LIMIT)) < 0:
            if len(self._buffer) >= HEADER_LIMIT:
                raise _Refused(f"the walker sent a header line over {HEADER_LIMIT} bytes")
            if not await self._more():
                raise _Refused("the walker's stream ended before the walk did")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        try:
            header = json.loads(line)
        except (ValueError, RecursionError):
            raise _Refused(f"the walker sent a line that is not JSON: {line[:80]!r}") from None
        if not isinstance(header, dict):
            raise _Refused(f"the walker sent a header that is no object: {line[:80]!r}")
        return header

    async def some(self, most: int) -> bytes:
        """Up to ``most`` bytes, b"" at the end of the stream."""
        if not self._buffer and not await self._more():
            return b""
        chunk = bytes(self._buffer[:most])
        del self._buffer[: len(chunk)]
        return chunk


class _Copy:
    """The copy being written under ``into``: every entry's parent a directory made here."""

    def __init__(self, into: str, name: str, *, max_bytes: int, max_entries: int) -> None:
        self.into, self.name = into, name
        self.top = os.path.join(into, name)
        self.max_bytes, self.max_entries = max_bytes, max_entries
        self.made = False  # the top entry exists: ours to remove on failure
        self.entries = self.total = 0
        self.dirs: set[tuple[str, ...]] = set()

    async def fill(self, stream: _Stream) -> None:
        while True:
            header = await stream.header()
            kind = header.get("kind")
            if kind == "end":
                if not self.made:
                    raise _Refused("the walker's stream ended before its first entry")
                return
            if kind == "error":
                raise _WalkerFailed(_walker_error(header))
            parts = self._path(header.get("path"))
            dest = os.path.join(self.into, *parts)
            if kind == "d":
                _number(header, "mode", 0o7777)
                os.mkdir(dest, 0o700)
                self.made = True
                os.chmod(dest, 0o755)  # as the launcher's tmpfs shows it; never setgid/sticky
                self.dirs.add(tuple(parts))
            elif kind == "l":
                if len(parts) == 1:
                    raise _Refused("the walker sent a link as the plugin itself")
                os.symlink(_link_target(header.get("target"), "/".join(parts)), dest)
            elif kind == "f":
                await self._file(stream, header, dest)
            else:
                raise _Refused(f"the walker sent an entry of a bad kind: {kind!r}")

    def _path(self, path: object) -> list[str]:
        """The entry's path in the copy: its name first, then names of directories made."""
        if not isinstance(path, list) or not path or not all(_is_name(p) for p in path):
            raise _Refused(f"the walker sent a bad entry path: {path!r}")
        if not self.made:
            if path != [self.name]:
                raise _Refused(f"the walker sent {path!r} first, not {self.name!r}")
            return path
        if tuple(path[:-1]) not in self.dirs:
            raise _Refused(f"the walker sent {path!r}, outside any directory it sent")
        self.entries += 1
        if self.entries > self.max_entries:
            raise _Refused(f"it has more than {self.max_entries} entries, the limit")
        return path

    async def _file(self, stream: _Stream, header: dict[str, object], dest: str) -> None:
        mode = _number(header, "mode", 0o7777)
        size = _number(header, "size", 1 << 62)  # the limit is checked below, in total
        self.total += size
        if self.total > self.max_bytes:
            raise _Refused(f"it holds more than {self.max_bytes} bytes, the limit")
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0)
        self.made = True
        try:
            left = size
            while left:
                chunk = await stream.some(min(left, CHUNK))
                if not chunk:
                    raise _Refused(
                        f"the walker's stream ended {size - left} bytes into "
                        f"{os.path.relpath(dest, self.into)!r}, announced as {size} bytes "
                        "(did the file change while it was copied?)"
                    )
                left -= len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            # as the launcher copies (no setuid, setgid or sticky bit), and readable
            os.fchmod(fd, 0o755 if mode & 0o111 else 0o644)
        finally:
            os.close(fd)

    def remove(self) -> None:
        if self.made:
            _remove(self.top)
            self.made = False


def _remove(top: str) -> None:
    """Remove a copy (a root-owned tree of our own in ``into``: no one else writes in it)."""
    if os.path.isdir(top) and not os.path.islink(top):
        shutil.rmtree(top)
    else:
        os.unlink(top)


def _walker_error(header: dict[str, object]) -> str:
    """The walker's error line, in a message: its own words, bounded and printable."""
    error, where = header.get("error"), header.get("path")
    text = error[:200] if isinstance(error, str) else "(no reason given)"
    text = text if text.isprintable() else repr(text)
    return text + (f" ({where[:200]!r})" if isinstance(where, str) and where else "")
