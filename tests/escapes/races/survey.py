#!/usr/bin/python3 -IS
"""The plugin of the race probes (tests/escapes/test_races.py): an external plugin in plain
Python (the system interpreter, no sandboxer code) that reports what it sees at a path.

It speaks the wire protocol by hand (DESIGN section 7: the handshake, then one request per
line on fd 3) with one method of its own, ``survey(path)``; of the reserved methods it
answers ``sandboxer.init``, ``sandboxer.health`` and ``sandboxer.shutdown``. Run as
``survey.py --once PATH`` it prints one survey as JSON on stdout instead (for runs through
``sandbox.program.run``, as ``sandboxer exec`` does).

A survey walks PATH breadth first without following any link and describes every entry by
its path: ``dev``, ``ino``, ``mode``, and for a directory its ``names``, for a file its first
bytes as ``text``, for a link its ``link``; an entry it cannot stat, list or read carries the
``errno`` name instead. It never judges what it saw: the tests do.
"""

import errno
import json
import os
import socket
import stat
import sys

MAX_ENTRIES = 200
MAX_TEXT = 1024


def describe(path):
    try:
        st = os.lstat(path)
    except OSError as exc:
        return {"errno": errno.errorcode.get(exc.errno, str(exc.errno))}
    info = {"dev": st.st_dev, "ino": st.st_ino, "mode": st.st_mode}
    try:
        if stat.S_ISLNK(st.st_mode):
            info["link"] = os.readlink(path)
        elif stat.S_ISDIR(st.st_mode):
            info["names"] = sorted(os.listdir(path))
        elif stat.S_ISREG(st.st_mode):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                info["text"] = os.read(fd, MAX_TEXT).decode("utf-8", "replace")
            finally:
                os.close(fd)
    except OSError as exc:
        info["errno"] = errno.errorcode.get(exc.errno, str(exc.errno))
    return info


def survey(root):
    entries, queue = {}, [root]
    while queue and len(entries) < MAX_ENTRIES:
        path = queue.pop(0)
        entries[path] = info = describe(path)
        queue += [os.path.join(path, name) for name in info.get("names", ())]
    return {"entries": entries, "truncated": bool(queue)}


def serve():
    sock = socket.socket(fileno=int(os.environ["SANDBOXER_RPC_FD"]))
    frames = sock.makefile("rb")

    def send(message):
        sock.sendall(json.dumps(message).encode() + b"\n")

    send({"jsonrpc": "2.0", "id": 0, "method": "sandboxer.handshake",
          "params": {"cookie": os.environ["SANDBOXER_MAGIC_COOKIE"], "protocols": [1],
                     "plugin": {"name": "race-survey", "version": "1.0.0"},
                     "methods": ["survey"]}})
    for line in frames:
        message = json.loads(line)
        if "method" not in message or "id" not in message:
            continue  # the handshake's answer, or a notification
        reply = {"jsonrpc": "2.0", "id": message["id"]}
        if message["method"] == "survey":
            reply["result"] = survey(*message["params"])
        elif message["method"] in ("sandboxer.init", "sandboxer.shutdown"):
            reply["result"] = None
        elif message["method"] == "sandboxer.health":
            reply["result"] = {"ok": True}
        else:
            reply["error"] = {"code": -32601, "message": "method not found"}
        send(reply)
        if message["method"] == "sandboxer.shutdown":
            return


if __name__ == "__main__":
    if sys.argv[1:2] == ["--once"]:
        print(json.dumps(survey(sys.argv[2])))
    else:
        serve()
