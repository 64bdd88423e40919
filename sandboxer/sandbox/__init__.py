"""The sandbox: policy (what is enforced), and, from the launcher on, how it is enforced.

Usable on its own: nothing here imports loaders/ or the manager. The policy's names are
imported when first used, not with the package: the CLI starts the launcher's fork server
(``sandbox.forkserver``) before any other import, and the policy costs ~15 ms to import.
"""

_TYPE_CHECKING = False
if _TYPE_CHECKING:
    from typing import Any as _Any

    from .policy import PathGrant, SandboxConfig, SandboxPolicy, SandboxRequest, effective_config

__all__ = ["PathGrant", "SandboxConfig", "SandboxPolicy", "SandboxRequest", "effective_config"]


def __getattr__(name: str) -> "_Any":
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from . import policy

    value = getattr(policy, name)
    globals()[name] = value
    return value
