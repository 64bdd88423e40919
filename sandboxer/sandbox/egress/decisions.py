"""The egress decisions: every attempt checked, resolved, logged and counted, whoever made it.

``Checkpoint`` is what the proxy's wire protocols and the wasm fetch share: it checks a target
against the rules, resolves a listed name on the proxy's own resolver threads, keeps the
addresses the rules allow, and records the verdict: one line on the ``sandboxer.egress``
logger and the plugin's ``EgressCounters``. The errors an attempt ends in live here too:
``EgressFailed`` (an allowed target that could not be reached) and ``Rejected`` (a request
refused before it named a target, the client already answered).

It must never resolve a name that has not passed the allow-list, and never write what a
plugin sent into the log unescaped (a plugin could forge a line of its own).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

from .resolver import Resolver
from .rules import AllowList, EgressRefused, IPAddress, check_target, usable_addresses

__all__ = ["Checkpoint", "EgressCounters", "EgressFailed", "Rejected", "log", "printable"]

log = logging.getLogger("sandboxer.egress")


def printable(text: str) -> str:
    """``text`` with every unprintable character escaped (a newline shows as \\n)."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


class EgressFailed(Exception):
    """An allowed target that could not be reached: ``kind`` ("timeout", "unreachable",
    "connection refused", "deadline", "failed") for the reply, the words in ``str()``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Rejected(Exception):
    """A request refused for its form rather than its target (malformed, an unsupported
    protocol or command), after its client was answered. Logged and counted as refused under
    ``via``, with ``target`` "-" when the request named none."""

    def __init__(self, via: str, reason: str, *, target: str = "-") -> None:
        super().__init__(reason)
        self.via = via
        self.target = target


class EgressCounters:
    """One plugin's egress, across its generations: attempts by verdict, connections open
    now, bytes each way. Updated from the event loop and from wasm worker threads."""

    __slots__ = (
        "_lock",
        "active",
        "allowed",
        "bytes_received",
        "bytes_sent",
        "failed",
        "refused",
    )

    def __init__(self) -> None:
        self.allowed = self.refused = self.failed = self.active = 0
        self.bytes_sent = self.bytes_received = 0
        self._lock = threading.Lock()

    def add(self, **amounts: int) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def to_json(self) -> dict[str, int]:
        with self._lock:
            return {
                "allowed": self.allowed,
                "refused": self.refused,
                "failed": self.failed,
                "active": self.active,
                "bytesSent": self.bytes_sent,
                "bytesReceived": self.bytes_received,
            }

    def __repr__(self) -> str:
        return f"EgressCounters({self.to_json()})"


class Checkpoint:
    """The rules applied and recorded: the resolver (and its threads), the log line and every
    plugin's counters. ``EgressProxy`` is one; the wasm fetch goes through it too."""

    def __init__(self, *, hosts_file: str | None = None, connect_timeout: float = 10.0) -> None:
        self.resolver = Resolver(hosts_file)
        self.connect_timeout = connect_timeout
        self._counters: dict[str, EgressCounters] = {}
        self._lookups: concurrent.futures.ThreadPoolExecutor | None = None

    def counters(self, plugin_id: str) -> EgressCounters:
        counters = self._counters.get(plugin_id)
        if counters is None:  # setdefault: wasm worker threads may race here
            counters = self._counters.setdefault(plugin_id, EgressCounters())
        return counters

    def statistics(self, plugin_id: str) -> EgressCounters | None:
        """The plugin's counters, or None if it never had network access."""
        return self._counters.get(plugin_id)

    def close(self) -> None:
        """Stop the resolver threads (idempotent); a lookup under way is left to finish."""
        if self._lookups is not None:
            self._lookups.shutdown(wait=False, cancel_futures=True)
            self._lookups = None

    # -- the record ------------------------------------------------------------------------------
    def record(self, plugin_id: str, via: str, target: str, verdict: str, detail: str = "") -> None:
        """Count ``verdict`` ("allowed", "refused", "failed") for the plugin and log its line."""
        self.counters(plugin_id).add(**{verdict: 1})
        level = logging.INFO if verdict == "allowed" else logging.WARNING
        # target and detail carry what the plugin sent: escaped, so that no plugin can write
        # a line of its own (a forged verdict) into the host's log.
        log.log(
            level,
            "egress plugin=%s via=%s target=%s verdict=%s%s",
            plugin_id,
            via,
            printable(target),
            verdict,
            f" ({printable(detail)})" if detail else "",
        )

    @contextlib.contextmanager
    def attempt(self, plugin_id: str, via: str, target: str) -> Iterator[None]:
        """Log and count a refusal or failure raised inside (then re-raise it); the caller
        reports "allowed" itself, once it is connected."""
        try:
            yield
        except EgressRefused as exc:
            self.record(plugin_id, via, target, "refused", str(exc))
            raise
        except EgressFailed as exc:
            self.record(plugin_id, via, target, "failed", str(exc))
            raise

    # -- the decision ----------------------------------------------------------------------------
    def prepare(self, allow: AllowList, host: str, port: int) -> tuple[str, list[IPAddress] | None]:
        """The target checked against the list, nothing resolved: (name, addresses), where
        addresses are an IP literal's own, the hosts file's for a name, or None when DNS must
        answer (``lookup``). EgressRefused for a target the list does not name."""
        name, literal = check_target(allow, host, port)
        if literal is not None:
            return name, [literal]
        return name, self.resolver.static(name)

    def lookup(self, name: str, port: int) -> concurrent.futures.Future[list[IPAddress]]:
        """A DNS lookup on the proxy's own threads: getaddrinfo cannot be interrupted, and a
        stalled resolver must not hold the event loop's default executor."""
        if self._lookups is None:
            self._lookups = concurrent.futures.ThreadPoolExecutor(
                4, thread_name_prefix="sandboxer-resolve"
            )
        return self._lookups.submit(self.resolver.resolve, name, port)

    def decide_blocking(
        self, allow: AllowList, host: str, port: int, *, deadline: Callable[[], float] | None = None
    ) -> list[IPAddress]:
        """The addresses to dial for ``host``, from a worker thread (wasm's http_request).
        A DNS lookup waits at most until ``deadline()`` (time.monotonic(), re-read as it
        waits): getaddrinfo cannot be interrupted, so it runs on the resolver's own thread and
        is left to finish there. EgressRefused, or EgressFailed."""
        name, addresses = self.prepare(allow, host, port)
        if addresses is None:
            lookup = self.lookup(name, port)
            while True:
                left = None if deadline is None else deadline() - time.monotonic()
                if left is not None and left <= 0:
                    raise EgressFailed("deadline", f"resolving {name}: the call's deadline passed")
                try:
                    addresses = lookup.result(None if left is None else min(left, 0.05))
                    break
                except concurrent.futures.TimeoutError:
                    continue
                except OSError as exc:
                    raise EgressFailed("unreachable", str(exc)) from None
        return usable_addresses(allow, name, port, addresses)
