"""The directories a WASI module is given (a wasm plugin's, or a program's under
``sandboxer exec``): checked against what WASI can enforce, then each opened once.

WASI preopens whole directories: it cannot mask part of one (a denied path inside a grant),
and a read-only grant inside a writable one would be writable through the outer one; both
are refused. Each grant is opened beneath its path root through no link (or, an operator's
grant, from /) and must be a directory; a writable grant is then an idmapped copy of its
mount (as root), so that what WASI creates in it belongs to the grant's owner, not to root.
The descriptors are what WASI preopens later: what happens to the names afterwards does not
matter.
"""

from __future__ import annotations

import os

from ...errors import PluginLoadError
from ...sandbox.idmap import FALLBACK as IDMAP_FALLBACK
from ...sandbox.idmap import owned_tree
from ...sandbox.paths import OpenedPath, open_grant
from ...sandbox.policy import SandboxConfig

__all__ = ["check_grants", "open_grants"]


def check_grants(
    sandbox: SandboxConfig, who: str, *, plugin_id: str | None = None, kind: str = "plugin"
) -> None:
    """PluginLoadError, naming ``who`` ("plugin ID", "the program") and its ``kind``
    ("plugin", "program"), for grants WASI cannot enforce as asked."""
    for grant in sandbox.allowed_paths:
        for outer in sandbox.allowed_paths:
            if (
                outer.writable
                and not grant.writable
                and grant.path != outer.path
                and grant.path.startswith(outer.path.rstrip("/") + "/")
            ):
                raise PluginLoadError(
                    f"{who}: allowed path {grant.path} is read-only but lies inside "
                    f"the writable allowed path {outer.path}; WASI would let the {kind} "
                    f"write it through {outer.path}, so wasm {kind}s may not have it "
                    "(grant it writable, or grant narrower directories)",
                    plugin_id=plugin_id,
                )
        for denied in sandbox.denied_paths:
            if denied == grant.path or denied.startswith(grant.path.rstrip("/") + "/"):
                raise PluginLoadError(
                    f"{who}: denied path {denied} lies inside allowed path "
                    f"{grant.path}; WASI cannot mask part of a preopened directory, so "
                    f"wasm {kind}s may not have it (allow narrower directories instead)",
                    plugin_id=plugin_id,
                )


def open_grants(
    sandbox: SandboxConfig,
    who: str,
    *,
    plugin_id: str | None = None,
    grant_owner: tuple[int, int] | None = None,
    fallbacks: tuple[str, ...] = (),
) -> tuple[tuple[OpenedPath, ...], tuple[str, ...]]:
    """Every allowed path opened once, and the fallbacks that were needed (the idmap's).
    Nothing stays open on failure."""
    opened: list[OpenedPath] = []
    fell_back = False
    try:
        for grant in sandbox.allowed_paths:
            path = open_grant(grant, plugin_id=plugin_id)
            opened.append(path)
            if not path.is_dir:
                raise PluginLoadError(
                    f"{who}: allowed path {grant.path} is not a directory (it is "
                    f"{path.host_path}); WASI can only be given directories",
                    plugin_id=plugin_id,
                )
            if grant.writable and os.geteuid() == 0:
                tree, plain = owned_tree(
                    path.fd,
                    path=grant.path,
                    outside=(0, 0),
                    owner=grant_owner,
                    fallbacks=fallbacks,
                    plugin_id=plugin_id,
                )
                fell_back |= plain
                path.close()
                path.fd = tree
    except BaseException:
        for path in opened:
            path.close()
        raise
    return tuple(opened), (IDMAP_FALLBACK,) if fell_back else ()
