"""The daemon (issue 21): `sandboxer serve`, its clients and its tenants."""

__all__ = ["DEFAULT_SOCKET"]

# Where `sandboxer serve` listens and its clients connect, unless told otherwise.
DEFAULT_SOCKET = "/run/sandboxer/sandboxer.sock"
