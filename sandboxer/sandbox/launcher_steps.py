"""The sandbox launcher's steps and how a failed one is reported: the ``Step`` enum, the
``with step(Step.X, path):`` guard that turns an OSError into ``SetupFailed``, and ``fail()``,
which writes ``{"step", "what", "error", "errno", "path"}`` to the status socket (fd 5) for
the supervisor (sandbox/start.py) and exits 127.

Part of the launcher (``launcher.py``): imported by bare name from its directory
(``SANDBOXER_LAUNCHER_DIR``), so it imports nothing but the standard library. It must never
print a traceback: one would name host paths in the plugin's log.
"""

from __future__ import annotations

import enum
import json
import os
from types import TracebackType

__all__ = [
    "RPC_FD",
    "CONTROL_FD",
    "STATUS_FD",
    "Step",
    "SetupFailed",
    "report",
    "step",
    "failure",
    "fail",
]

# The fds the launcher starts with (the table is in launcher.py's docstring).
RPC_FD, CONTROL_FD, STATUS_FD = 3, 4, 5


class Step(enum.Enum):
    LAUNCHER = "run the sandbox launcher"
    SPEC = "read the spec"
    PRIVILEGES = "drop supplementary groups"
    NAMESPACES = "unshare namespaces"
    NETWORK = "set up the net namespace (loopback, the proxy port)"
    SOURCES = "receive the sources"
    ID_MAPS = "wait for the id maps"
    PID1 = "fork PID 1"
    ROOT = "build the new root"
    BIND = "bind-mount a path"
    COPY = "copy the plugin directory"
    VERIFY = "verify the copied plugin files"
    PROC = "mount /proc"
    DEV = "build /dev"
    MASK = "mask a path"
    PIVOT = "pivot_root"
    HOSTNAME = "set the hostname"
    RLIMITS = "set rlimits"
    FDS = "close inherited fds"
    IDS = "switch to the sandbox uid/gid"
    CAPS = "drop capabilities"
    NO_NEW_PRIVS = "set no_new_privs"
    SECCOMP = "load the seccomp filter"
    EXEC = "exec the plugin"


class SetupFailed(Exception):
    def __init__(self, step: Step, error: OSError | str, path: str | None = None) -> None:
        super().__init__(step.value)
        self.step = step
        self.errno = error.errno if isinstance(error, OSError) else None
        self.error = error.strerror if isinstance(error, OSError) else str(error)
        self.path = path or (error.filename if isinstance(error, OSError) else None)


def report(failure: SetupFailed) -> None:
    message = (
        json.dumps(
            {
                "step": failure.step.name,
                "what": failure.step.value,
                "error": failure.error,
                "errno": failure.errno,
                "path": failure.path,
            }
        ).encode()
        + b"\n"
    )
    try:
        os.write(STATUS_FD, message)
    except OSError:
        pass


class step:  # lower case: read as a verb, ``with step(Step.X):``
    """``with step(Step.X):`` turns an error in its block into SetupFailed for that step."""

    def __init__(self, which: Step, path: str | None = None) -> None:
        self.which, self.path = which, path

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, Exception) and not isinstance(exc, SetupFailed):
            raise SetupFailed(
                self.which,
                exc if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}",
                self.path,
            ) from exc


def failure(error: BaseException) -> SetupFailed:
    """``error`` as the step that failed (any other exception: the launcher's own)."""
    if isinstance(error, SetupFailed):
        return error
    return SetupFailed(Step.LAUNCHER, f"{type(error).__name__}: {error}")


def fail(error: BaseException) -> None:
    """Report ``error`` and exit 127, never printing a traceback (it would name host paths
    in the plugin's log)."""
    report(failure(error))
    os._exit(127)
