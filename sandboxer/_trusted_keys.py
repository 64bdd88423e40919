"""Which plugin ids a trusted registry key may sign for (DESIGN section 8, "Registry").

A host trusts a minisign public key either for every plugin id (the key file's path alone) or
for the ids its patterns cover (``{key = "/etc/sandboxer/acme.pub", ids = ["acme.*", "acme"]}``
in the host config, ``--trusted-key acme.pub=acme.*,acme`` on the command line).

A pattern is an exact plugin id (``acme``, ``acme.tool``) or ``PREFIX.*``, PREFIX being a
plugin id that does not end in ``.``. The ``*`` stands for one or more characters of the id
alphabet (``a-z 0-9 . _ -``) after that dot, sub-namespaces included: ``acme.*`` covers
``acme.tool`` and ``acme.tools.x``, but not ``acme`` itself (list it on its own) and never
``acmeevil.tool``. Nothing else is a pattern: no ``*`` alone, no ``acme*``, no ``*.tool``.

This module parses and matches scopes only. It reads no key file and imports no crypto, so the
host config (sandbox/policy.py) can use it; registry.py loads the keys and enforces the scopes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ._plugin_id import ID_RE

__all__ = [
    "TrustedKey",
    "parse_trusted_keys",
    "parse_trusted_key_option",
    "covers",
    "describe_scope",
]

WILDCARD = ".*"
_TABLE_FIELDS = ("key", "ids")


def _check_pattern(pattern: object) -> str:
    if not isinstance(pattern, str):
        raise ValueError(f"an id pattern is a string, not {type(pattern).__name__}")
    wildcard = pattern.endswith(WILDCARD)
    prefix = pattern[: -len(WILDCARD)] if wildcard else pattern
    if ID_RE.fullmatch(prefix) is None or (wildcard and prefix.endswith(".")):
        raise ValueError(
            f"an id pattern is an exact plugin id (acme.tool) or PREFIX.* (acme.*), not {pattern!r}"
        )
    return pattern


def covers(patterns: tuple[str, ...] | None, plugin_id: str) -> bool:
    """Whether ``plugin_id`` is one of the ids ``patterns`` allow (None: every id)."""
    if patterns is None:
        return True
    for pattern in patterns:
        if pattern.endswith(WILDCARD):
            prefix = pattern[:-1]  # "acme." : the dot is part of the prefix
            if plugin_id.startswith(prefix) and len(plugin_id) > len(prefix):
                return True
        elif plugin_id == pattern:
            return True
    return False


def describe_scope(patterns: tuple[str, ...] | None) -> str:
    """How a key is trusted, for messages: "for any plugin id", "only for ids [acme.*]"."""
    return "for any plugin id" if patterns is None else f"only for ids [{', '.join(patterns)}]"


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """A minisign public key file the host trusts, and the plugin ids it may sign for.

    ``ids`` None trusts the key for every id; otherwise a non-empty tuple of patterns (see the
    module's docstring). Invalid patterns raise ValueError at construction.
    """

    path: str
    ids: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path or "\0" in self.path:
            raise ValueError(f"a key file path, not {self.path!r}")
        if self.ids is not None:
            if not isinstance(self.ids, tuple) or not self.ids:
                raise ValueError(
                    "ids must list at least one id pattern (leave ids out to "
                    "trust the key for every id)"
                )
            for pattern in self.ids:
                _check_pattern(pattern)

    def covers(self, plugin_id: str) -> bool:
        return covers(self.ids, plugin_id)


def parse_trusted_keys(
    value: object, *, parse_path: Callable[[object], str]
) -> tuple[TrustedKey, ...]:
    """The host config's ``trusted_keys``: a list of key file paths (any id) and tables
    ``{key = PATH, ids = [PATTERN, ...]}``. ``parse_path`` checks each path (the host config
    wants absolute ones). ValueError names the entry and the field that is wrong."""
    if not isinstance(value, list):
        raise ValueError(
            'a list of key files ("/etc/sandboxer/k.pub", trusted for any id) '
            'or tables {key = "/etc/sandboxer/k.pub", ids = ["acme.*"]}, not '
            f"{type(value).__name__}"
        )
    out = []
    for number, item in enumerate(value):
        where = f"[{number}]"
        if isinstance(item, str):
            try:
                out.append(TrustedKey(parse_path(item)))
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            continue
        if not isinstance(item, dict):
            raise ValueError(
                f"{where}: a key file path or a table {{key = ..., ids = [...]}}, "
                f"not {type(item).__name__}"
            )
        unknown = sorted(set(item) - set(_TABLE_FIELDS))
        if unknown:
            raise ValueError(
                f"{where}: unknown field {unknown[0]!r} (a key table has "
                f"{' and '.join(_TABLE_FIELDS)})"
            )
        if "key" not in item:
            raise ValueError(f"{where}: the table has no key (the public key file's path)")
        try:
            path = parse_path(item["key"])
        except ValueError as exc:
            raise ValueError(f"{where}.key: {exc}") from None
        ids = item.get("ids")
        if "ids" in item:
            if not isinstance(ids, list) or not ids:
                raise ValueError(
                    f"{where}.ids: a non-empty list of id patterns such as "
                    f'["acme.*", "acme"] (leave ids out to trust the key for every '
                    f"id), not {ids!r}"
                )
            for position, pattern in enumerate(ids):
                try:
                    _check_pattern(pattern)
                except ValueError as exc:
                    raise ValueError(f"{where}.ids[{position}]: {exc}") from None
        out.append(TrustedKey(path, None if ids is None else tuple(ids)))
    return tuple(out)


def parse_trusted_key_option(text: str) -> TrustedKey:
    """The CLI's ``--trusted-key``: ``PUB`` (any id) or ``PUB=PATTERN[,PATTERN...]``.

    The text is split at its last ``=``, so a key file whose name holds a ``=`` can only be
    given with patterns after it (or in the host config)."""
    path, sep, patterns = text.rpartition("=")
    if not sep:
        return TrustedKey(text)
    if not path:
        raise ValueError(f"PUB=PATTERN[,PATTERN...] with a key file before '=', not {text!r}")
    ids = tuple(patterns.split(","))
    for pattern in ids:
        _check_pattern(pattern)
    return TrustedKey(path, ids)
