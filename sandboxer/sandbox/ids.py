"""Host uids for rootful sandboxes: one unprivileged uid (and the gid of the same number) per
running sandbox, unique on the whole host, not just in one supervisor.

Two supervisors (two ``sandboxer exec`` at once, a daemon and a CLI) must never hand out the
same uid: plugins sharing one would share their files in writable grants and one
RLIMIT_NPROC count. So a uid is taken by holding an exclusive ``flock`` on
``/run/sandboxer/uids/<uid>`` for as long as the sandbox runs. A lock dies with its holder, so
a supervisor that crashes frees its uids without any clean-up: nothing stale is ever read
from these files (they stay empty and are never removed, so that no lock can be held on a
file another process has just unlinked).

This module never trusts the lock directory's path blindly: it must be a real directory owned
by root, not writable by anyone else.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading

from ..errors import SandboxUnavailable

__all__ = ["HostIds", "LOCK_DIR", "FIRST_UID", "UID_COUNT"]

LOCK_DIR = "/run/sandboxer/uids"
FIRST_UID = 1_800_000
UID_COUNT = 65_536


class HostIds:
    """Allocates host uids from ``[first, first + count)``, host-wide through lock files in
    ``lock_dir``. Thread-safe; ``release`` is idempotent."""

    def __init__(
        self, first: int = FIRST_UID, count: int = UID_COUNT, lock_dir: str = LOCK_DIR
    ) -> None:
        self.first, self.count, self.lock_dir = first, count, lock_dir
        self._held: dict[int, int] = {}  # uid -> the fd holding its lock
        self._mutex = threading.Lock()

    def _directory(self) -> int:
        """The lock directory's fd: made 0700 by root where missing, refused if it is a link,
        not a directory, or open to anyone but root."""
        parent = os.path.dirname(self.lock_dir)
        for path in (parent, self.lock_dir):
            try:
                os.mkdir(path, 0o700 if path == self.lock_dir else 0o755)
            except FileExistsError:
                pass
            except OSError as exc:
                raise self._unavailable(f"cannot create {path}: {exc.strerror}") from None
        try:
            fd = os.open(self.lock_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            raise self._unavailable(f"cannot open {self.lock_dir}: {exc.strerror}") from None
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            os.close(fd)
            raise self._unavailable(
                f"{self.lock_dir} must be owned by root and writable by "
                f"no one else (owner uid {st.st_uid}, mode "
                f"{stat.filemode(st.st_mode)})"
            )
        return fd

    def _unavailable(self, why: str) -> SandboxUnavailable:
        return SandboxUnavailable(
            f"no host uid for the sandbox: {why}", missing="host uid lock directory"
        )

    def acquire(self) -> int:
        with self._mutex:
            directory = self._directory()
            try:
                for uid in range(self.first, self.first + self.count):
                    if uid in self._held:
                        continue
                    fd = os.open(
                        str(uid),
                        os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                        0o600,
                        dir_fd=directory,
                    )
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError as exc:
                        os.close(fd)
                        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                            continue  # another supervisor's sandbox runs as this uid
                        raise
                    self._held[uid] = fd
                    return uid
            finally:
                os.close(directory)
        raise SandboxUnavailable(
            f"all {self.count} sandbox uids from {self.first} are in use on this host",
            missing="free sandbox uid",
        )

    def release(self, uid: int) -> None:
        with self._mutex:
            fd = self._held.pop(uid, None)
        if fd is not None:
            os.close(fd)  # closing the last fd drops the flock

    def held(self) -> frozenset[int]:
        """The uids this process holds now."""
        with self._mutex:
            return frozenset(self._held)
