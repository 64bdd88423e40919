"""Names to addresses for the egress proxy: the host's hosts file first, then the system resolver.

Plugins never resolve: the proxy does, here, and dials exactly the addresses it got (after
``rules.usable_addresses`` dropped the refused ones), so no second lookup can rebind a name.
It must never be asked for a name that has not passed the allow-list (``rules.check_target``
comes first), and ``resolve`` blocks: it runs on the proxy's own threads, never on the event
loop.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import threading

from .rules import IPAddress

__all__ = ["Resolver"]


class Resolver:
    """Names to addresses for the proxy: a hosts file first (``egress_hosts_file`` in the host
    config; re-read when it changes), then the system resolver. Plugins never resolve."""

    def __init__(self, hosts_file: str | None = None) -> None:
        self.hosts_file = hosts_file
        self._table: dict[str, list[IPAddress]] = {}
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()

    def static(self, name: str) -> list[IPAddress] | None:
        """The hosts file's addresses for ``name`` (None: not in it)."""
        if self.hosts_file is None:
            return None
        with self._lock:
            try:
                st = os.stat(self.hosts_file)
            except OSError:
                self._table, self._stamp = {}, None
                return None
            if (st.st_mtime_ns, st.st_size) != self._stamp:
                self._table = _read_hosts(self.hosts_file)
                self._stamp = (st.st_mtime_ns, st.st_size)
            return self._table.get(name)

    def resolve(self, name: str, port: int) -> list[IPAddress]:
        """Blocking (it may ask DNS): call it off the event loop."""
        found = self.static(name)
        if found is not None:
            return found
        try:
            infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise OSError(
                f"cannot resolve {name}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        addresses: list[IPAddress] = []
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if address not in addresses:
                addresses.append(address)
        return addresses


def _read_hosts(path: str) -> dict[str, list[IPAddress]]:
    table: dict[str, list[IPAddress]] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read(1 << 20).splitlines()
    except OSError:
        return table
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            address = ipaddress.ip_address(fields[0])
        except ValueError:
            continue
        for name in fields[1:]:
            entry = table.setdefault(name.lower().rstrip("."), [])
            if address not in entry:
                entry.append(address)
    return table
