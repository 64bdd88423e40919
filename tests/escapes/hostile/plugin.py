"""The hostile plugin of the escape probes: every method tries something a sandboxed plugin
must not be able to do and reports what happened, without judging it (the tests judge).

Outcomes are JSON: ``{"ok": value}`` when the action worked, ``{"errno": "EPERM"}`` when it
failed with an OSError; ``run()`` reports the C probe's exit code and output. Nothing here
raises for a blocked action, so a probe's call always answers, except where taking the plugin
down is the point: the bombs (``memory_bomb``, ``spin``) and the methods that break the wire
protocol on purpose (``rpc_write``, ``rpc_oversized``).
"""

import errno
import os
import socket
import subprocess
import sys
import time

PROBE = "/plugin/probe"


def _outcome(action, *args):
    try:
        return {"ok": action(*args)}
    except OSError as exc:
        return {"errno": errno.errorcode.get(exc.errno, str(exc.errno))}


# -- the C probe: one raw syscall per run -------------------------------------------------------

def run(name, arg="", program=PROBE):
    """``probe NAME ARG``: its return code (negative: the signal that killed it) and output."""
    done = subprocess.run([program, name, arg], capture_output=True, text=True, timeout=20,
                          stdin=subprocess.DEVNULL)
    return {"rc": done.returncode, "out": done.stdout.strip(), "err": done.stderr.strip()}


# -- files -------------------------------------------------------------------------------------

def _read(path):
    with open(path, "rb") as f:
        return f.read(1 << 20).decode("utf-8", "replace")


def read(path):
    return _outcome(_read, path)


def listdir(path):
    return _outcome(lambda p: sorted(os.listdir(p)), path)


def _write(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        return os.write(fd, data.encode())
    finally:
        os.close(fd)


def write(path, data="pwned by the hostile plugin\n"):
    return _outcome(_write, path, data)


def _open_for_writing(path):
    os.close(os.open(path, os.O_WRONLY))  # no O_CREAT, no O_TRUNC: changes nothing if it works
    return "opened"


def open_for_writing(path):
    return _outcome(_open_for_writing, path)


def _append(path, data):
    with open(path, "ab") as f:
        return f.write(data.encode())


def append(path, data="pwned\n"):
    return _outcome(_append, path, data)


def readlink(path):
    return _outcome(os.readlink, path)


def mkdir(path):
    return _outcome(os.mkdir, path)


def symlink(target, link):
    return _outcome(os.symlink, target, link)


def link(source, target):
    return _outcome(os.link, source, target)


def unlink(path):
    return _outcome(os.unlink, path)


def rename(source, target):
    return _outcome(os.rename, source, target)


def chmod(path, mode):
    return _outcome(os.chmod, path, mode)


def _copy_executable(source, target):
    with open(source, "rb") as src, open(target, "wb") as dst:
        dst.write(src.read())
    os.chmod(target, 0o755)
    return True


def copy_executable(source, target):
    return _outcome(_copy_executable, source, target)


def execute(path, name="euid"):
    """Run a program (a copy of the probe, usually); OSError if it cannot even start."""
    try:
        return {"ok": run(name, program=path)}
    except OSError as exc:
        return {"errno": errno.errorcode.get(exc.errno, str(exc.errno))}


def exec_in_place(path, *args):
    """Replace this process with ``path``: how a plugin that may not fork (the strict profile)
    would run a program it wrote. Answers only if the exec fails; if it works, the plugin is
    gone and the call never returns."""
    return _outcome(os.execv, path, [path, *args])


def memfd():
    """An anonymous in-memory file (memfd_create), closed again."""
    return _outcome(lambda: os.close(os.memfd_create("probe")) or "created")


def fill(path, chunk_mib=1):
    """Write to ``path`` until the filesystem says no; how far it got, and the errno."""
    chunk = b"\xa5" * (chunk_mib << 20)
    written = 0
    try:
        with open(path, "wb", buffering=0) as f:
            while written < 1 << 30:
                written += f.write(chunk)
        return {"ok": written}
    except OSError as exc:
        return {"errno": errno.errorcode.get(exc.errno), "written": written}
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


def _sparse(path, offset):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        return os.pwrite(fd, b"x", offset)
    finally:
        os.close(fd)


def sparse(path, offset):
    """One byte at ``offset``: a file that large without the disk space (RLIMIT_FSIZE)."""
    return _outcome(_sparse, path, offset)


# -- the process and its view ----------------------------------------------------------------

def status():
    with open("/proc/self/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def environment():
    return dict(os.environ)


def fds():
    """Every open fd of this process and what it points at (the listing's own fd left out)."""
    listing = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        names = os.listdir(listing)
        out = {}
        for name in names:
            if int(name) == listing:
                continue
            try:
                out[name] = os.readlink(f"/proc/self/fd/{name}")
            except OSError:
                pass
        return out
    finally:
        os.close(listing)


def processes():
    """Every process this plugin can see: pid, cmdline."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
            except OSError:
                cmdline = "?"
            found.append({"pid": int(entry), "cmdline": cmdline})
    return {"self": os.getpid(), "processes": found}


def ids():
    return {"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
            "groups": os.getgroups()}


# -- sockets ---------------------------------------------------------------------------------

def _connect(family, kind, address):
    with socket.socket(family, kind) as s:
        s.settimeout(3)
        s.connect(address)
        return "connected"


def connect_tcp(host, port):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return _outcome(_connect, family, socket.SOCK_STREAM, (host, port))


def connect_unix(address, abstract=True):
    name = b"\0" + address.encode() if abstract else address
    return _outcome(_connect, socket.AF_UNIX, socket.SOCK_STREAM, name)


def _socket(family, kind, proto):
    socket.socket(family, kind, proto).close()
    return "created"


def open_socket(family, kind, proto=0):
    return _outcome(_socket, family, kind, proto)


def _socketpair(family, kind, proto):
    a, b = socket.socketpair(family, kind, proto)
    a.close()
    b.close()
    return "created"


def open_socketpair(family, kind, proto=0):
    return _outcome(_socketpair, family, kind, proto)


def _loopback_echo():
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as server:
            server.bind((address, 0))
            server.listen()
            with socket.create_connection(server.getsockname()[:2], timeout=5) as client:
                peer, _ = server.accept()
                with peer:
                    client.sendall(b"ping")
                    if peer.recv(4) != b"ping":
                        return "garbled"
    return "echoed over 127.0.0.1 and ::1"


def loopback_echo():
    """A server and a client of its own on the namespace's loopback, IPv4 and IPv6."""
    return _outcome(_loopback_echo)


# -- processes and signals ----------------------------------------------------------------------

def kill_everyone(signum):
    """kill(-1): every process this one may signal."""
    return _outcome(os.kill, -1, signum)


def new_session():
    """A child that starts a new session, then tries to get a terminal: what each step said."""
    code = ("import errno, os\n"
            "out = {'sid_is_pid': os.getsid(0) == os.getpid()}\n"
            "for path in ('/dev/tty', '/dev/console', '/dev/ptmx', '/dev/pts/ptmx'):\n"
            "    try:\n"
            "        os.close(os.open(path, os.O_RDWR | os.O_NOCTTY))\n"
            "        out[path] = 'opened'\n"
            "    except OSError as exc:\n"
            "        out[path] = errno.errorcode[exc.errno]\n"
            "print(out)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=20, start_new_session=True, stdin=subprocess.DEVNULL)
    return {"rc": done.returncode, "out": done.stdout.strip(), "err": done.stderr[-500:]}


def orphan(marker):
    """Leave behind a process in a session of its own that ignores SIGTERM and SIGHUP, whose
    parent has exited (it is reparented), with ``marker`` on its command line."""
    code = ("import os, signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
            "if os.fork():\n"
            "    os._exit(0)\n"
            "while True:\n"
            "    time.sleep(1)\n")
    subprocess.run([sys.executable, "-c", code, marker], start_new_session=True, timeout=20,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    for _ in range(100):  # wait until the orphan is running under its marker
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/cmdline", "rb") as f:
                        if marker.encode() in f.read():
                            return int(entry)
                except OSError:
                    pass
        time.sleep(0.05)
    return None


def fork_bomb(limit=1000):
    made = 0
    for _ in range(limit):
        try:
            pid = os.fork()
        except OSError as exc:
            return {"made": made, "errno": errno.errorcode.get(exc.errno)}
        if pid == 0:
            time.sleep(60)
            os._exit(0)
        made += 1
    return {"made": made, "errno": None}


def memory_bomb(mib):
    """Allocate and touch ``mib`` MiB, 16 MiB at a time."""
    hoard = []
    for _ in range(mib // 16):
        hoard.append(b"\xa5" * (16 << 20))
    return len(hoard) * 16


def spin():
    while True:
        pass


def exhaust_fds():
    opened = []
    try:
        while len(opened) < 1 << 20:
            opened.append(os.open("/dev/null", os.O_RDONLY))
        return {"opened": len(opened), "errno": None}
    except OSError as exc:
        return {"opened": len(opened), "errno": errno.errorcode.get(exc.errno)}
    finally:
        for fd in opened:
            os.close(fd)


# -- the supervisor, through the one channel the plugin has to it ---------------------------------

RPC_FD = int(os.environ.get("SANDBOXER_RPC_FD", "3"))


def rpc_send_fds():
    """Pass descriptors (its root directory, stdin, the RPC socket itself) to the supervisor
    as SCM_RIGHTS along with a byte of whitespace between frames."""
    rpc = socket.socket(fileno=os.dup(RPC_FD))
    root = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        return socket.send_fds(rpc, [b" "], [root, 0, RPC_FD])
    finally:
        os.close(root)
        rpc.close()


def rpc_write(data):
    """Raw bytes on the RPC socket, in the middle of the conversation."""
    return os.write(RPC_FD, data.encode())


def rpc_oversized(mib):
    """A frame that never ends: ``mib`` MiB without a newline."""
    chunk = b"x" * (1 << 20)
    for _ in range(mib):
        os.write(RPC_FD, chunk)
    return mib


def flood_stderr(mib):
    line = b"flood " * 2000 + b"\n"
    written = 0
    while written < mib << 20:
        written += os.write(2, line)
    return written


def ping():
    return "pong"
