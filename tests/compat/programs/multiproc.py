"""multiprocessing and concurrent.futures under each start method. One line per step."""

import concurrent.futures
import multiprocessing as mp
import os
import signal
import sys
import time
from multiprocessing import shared_memory
from multiprocessing.managers import SharedMemoryManager


def say(*parts):
    """One line straight to fd 1, unbuffered: Pool forks its workers from a thread of its
    own, and a fork taken while a line sat in this process's stdout buffer would print it
    twice (the child flushes its copy when it exits), outside and inside alike."""
    os.write(1, (" ".join(str(p) for p in parts) + "\n").encode())


def square(x):
    return x * x


def fail(x):
    raise ValueError(f"failed on {x}")


def fill(array, value):
    with array.get_lock():
        for i in range(len(array)):
            array[i] = value


def ping(conn):
    conn.send(("pong", os.getpid() != os.getppid()))
    conn.close()


def wait_at(barrier, event, queue):
    barrier.wait(timeout=30)
    event.wait(timeout=30)
    queue.put("past the barrier")


def sleeper():
    time.sleep(60)


def exits(code):
    sys.exit(code)


def by_method(method):
    ctx = mp.get_context(method)
    with ctx.Pool(2, maxtasksperchild=2) as pool:
        say(method, "pool map", pool.map(square, range(8)))
        say(method, "pool imap", sorted(pool.imap_unordered(square, range(5))))
        try:
            pool.apply_async(fail, (3,)).get(timeout=30)
        except ValueError as exc:
            say(method, "pool error", exc)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as executor:
        say(method, "executor", list(executor.map(square, range(4))))
        say(method, "executor error", type(executor.submit(fail, 1).exception(30)).__name__)
    array = ctx.Array("i", 3)
    child = ctx.Process(target=fill, args=(array, 7))
    child.start()
    child.join(30)
    say(method, "array", list(array), child.exitcode)
    parent_end, child_end = ctx.Pipe()
    child = ctx.Process(target=ping, args=(child_end,))
    child.start()
    say(method, "pipe", parent_end.recv())
    child.join(30)
    barrier, event, queue = ctx.Barrier(3), ctx.Event(), ctx.Queue()
    children = [ctx.Process(target=wait_at, args=(barrier, event, queue)) for _ in range(2)]
    for c in children:
        c.start()
    barrier.wait(timeout=30)
    event.set()
    say(method, "barrier", [queue.get(timeout=30) for _ in children])
    for c in children:
        c.join(30)
    child = ctx.Process(target=sleeper)
    child.start()
    child.terminate()
    child.join(30)
    say(method, "terminated", child.exitcode == -signal.SIGTERM)
    child = ctx.Process(target=exits, args=(5,))
    child.start()
    child.join(30)
    say(method, "exit code", child.exitcode)


def main():
    say("start methods", mp.get_all_start_methods())
    for method in ("fork", "spawn", "forkserver"):
        by_method(method)
    with mp.Manager() as manager:
        shared, items, lock = manager.dict(a=1), manager.list([1, 2]), manager.Lock()
        namespace = manager.Namespace()
        with lock:
            shared["b"] = 2
            items.append(3)
            namespace.x = "set"
        say("manager", sorted(shared.items()), list(items), namespace.x)
    block = shared_memory.SharedMemory(create=True, size=16)
    block.buf[:5] = b"hello"
    other = shared_memory.SharedMemory(block.name)
    say("shared memory", bytes(other.buf[:5]))
    other.close()
    block.close()
    block.unlink()
    with SharedMemoryManager() as smm:
        values = smm.ShareableList([1, "two", 3.0])
        say("shareable list", list(values))
    semaphore = mp.Semaphore(2)
    semaphore.acquire()
    say("semaphore", semaphore.get_value())
    value = mp.Value("d", 1.5)
    say("value", value.value)


if __name__ == "__main__":
    main()
