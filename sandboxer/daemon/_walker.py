"""The snapshot walker: a short-lived process running as a daemon's client (its uid, gid and
supplementary groups, which it takes first thing, before it imports or opens anything), which
reads a plugin directory or bare file with the client's own rights and streams it to the
daemon (daemon/snapshot.py).

It walks exactly as the sandbox launcher copies a plugin directory (launcher_mounts'
``open_copies``: from the opened path's fd, through no link, each entry checked to be the
inode its listing showed; links sent as links, anything but directories, files and links left
out), so the daemon's snapshot is what a cold launch would have copied into /plugin.

Imported by bare name (``sys.path`` holds this directory and the launcher's), so it imports
nothing but the standard library and the launcher's modules. The client owns this process
(same uid: it can ptrace or kill it): the daemon trusts nothing it sends.

The stream, one JSON header line per entry, a file's bytes right after its line:

    request (daemon → walker): {"path": "/abs/plugin", "name": "plugin", "max_entries": N}
    {"kind": "d", "path": ["plugin", "sub"], "mode": 493}
    {"kind": "f", "path": ["plugin", "sub", "a.py"], "mode": 420, "size": 12}  + 12 bytes
    {"kind": "l", "path": ["plugin", "link"], "target": "sub/a.py"}
    {"kind": "end"}                                  the walk is complete
    {"kind": "error", "error": "...", "path": "..."}  it is not (path: an entry, or null)
"""

from __future__ import annotations

import json
import os
import socket
import stat

TYPE_CHECKING = False  # (as in launcher_mounts: mypy reads these as the package's modules)
if TYPE_CHECKING:
    from ..sandbox import launcher_mounts as fs
    from ..sandbox.launcher_steps import SetupFailed
else:
    import launcher_mounts as fs
    from launcher_steps import SetupFailed

__all__ = ["main"]

REQUEST_LIMIT = 65536


def _send(sock: socket.socket, header: dict[str, object]) -> None:
    sock.sendall(json.dumps(header).encode() + b"\n")


def _stream(sock: socket.socket, path: str, name: str, max_entries: int) -> None:
    try:
        source = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        _send(sock, {"kind": "error", "error": exc.strerror, "path": None})
        return
    try:
        st = os.fstat(source)
        if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
            _send(sock, {"kind": "error", "error": "neither a directory nor a regular file"})
            return
        fs.raise_nofile()  # open_copies holds every file open at once, as the launcher does
        # target "": a failed open is then reported with the entry's name (launcher_steps.step)
        spec = {"copies": [{"target": "", "fd": 0, "name": name, "max_entries": max_entries}]}
        try:
            ((_, entries),) = fs.open_copies(spec, [source])
        except SetupFailed as exc:
            _send(sock, {"kind": "error", "error": exc.error, "path": exc.path})
            return
    finally:
        os.close(source)
    top = [name] if stat.S_ISDIR(st.st_mode) else []
    try:
        if top:
            _send(sock, {"kind": "d", "path": top, "mode": st.st_mode & 0o7777})
        for rel, kind, mode, payload in entries:
            parts = [*top, *rel.split("/")]
            if kind == "x":
                continue  # a fifo, socket or device: never copied
            if kind == "l":
                _send(sock, {"kind": "l", "path": parts, "target": payload})
            elif kind == "d":
                _send(sock, {"kind": "d", "path": parts, "mode": mode})
            else:
                fd = int(payload)
                size = os.fstat(fd).st_size
                _send(sock, {"kind": "f", "path": parts, "mode": mode, "size": size})
                sent = 0
                while sent < size:
                    n = os.sendfile(sock.fileno(), fd, sent, size - sent)
                    if n == 0:  # it shrank: the daemon sees the stream end inside the file
                        return
                    sent += n
        _send(sock, {"kind": "end"})
    finally:
        for _, kind, _, payload in entries:
            if kind == "f":
                os.close(int(payload))


def main(fd: int) -> None:
    """Read the daemon's request from the socket ``fd`` and answer it; any failure of our
    own is reported as an error line (this process must never print a path it read)."""
    with socket.socket(fileno=fd) as sock:
        try:
            with sock.makefile("rb") as reader:
                request = json.loads(reader.readline(REQUEST_LIMIT))
            _stream(sock, request["path"], request["name"], int(request["max_entries"]))
        except BrokenPipeError:
            pass  # the daemon gave up on us
        except Exception as exc:
            _send(sock, {"kind": "error", "error": f"the walker failed: {type(exc).__name__}"})
