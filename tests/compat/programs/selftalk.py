"""A Python program that talks to itself: asyncio over 127.0.0.1, UDP, unix sockets,
threads, subprocess pipelines, signals, the standard library's own files. One line per step."""

import asyncio
import os
import signal
import socket
import sqlite3
import ssl
import subprocess
import tempfile
import threading
import zoneinfo
from datetime import datetime


async def echo_server():
    async def handle(reader, writer):
        writer.write((await reader.readline()).upper())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"over tcp\n")
    print("asyncio tcp", (await reader.readline()).decode().strip())
    writer.close()
    server.close()
    await server.wait_closed()
    proc = await asyncio.create_subprocess_exec("sh", "-c", "echo from asyncio; exit 4",
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    print("asyncio subprocess", out.decode().strip(), proc.returncode)


def main():
    asyncio.run(echo_server())
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as a, \
            socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as b:
        a.bind(("::1", 0))
        b.sendto(b"over udp6", a.getsockname())
        print("udp6", a.recv(64).decode())
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "sock")
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen()
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        peer, _ = server.accept()
        client.sendall(b"over a unix socket")
        print("unix", peer.recv(64).decode())
        for s in (peer, client, server):
            s.close()
    results = []
    threads = [threading.Thread(target=results.append, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("threads", sorted(results))
    first = subprocess.Popen(["seq", "1", "5"], stdout=subprocess.PIPE)
    second = subprocess.run(["tac"], stdin=first.stdout, capture_output=True, text=True)
    first.wait()
    print("pipeline", second.stdout.split())
    caught = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: caught.append(signum))
    os.kill(os.getpid(), signal.SIGUSR1)
    print("signal", caught == [signal.SIGUSR1])
    pid = os.fork()
    if pid == 0:
        os._exit(9)
    print("fork", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    db = sqlite3.connect(":memory:")
    print("sqlite3", db.execute("select sqlite_version() > '3'").fetchone())
    context = ssl.create_default_context()
    print("ssl", context.verify_mode == ssl.CERT_REQUIRED, len(context.get_ca_certs()) >= 0)
    when = datetime(2024, 6, 1, 12, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))
    print("zoneinfo", when.utcoffset())
    print("cpus", os.cpu_count() == len(os.sched_getaffinity(0)))


if __name__ == "__main__":
    main()
