"""The sandbox: policy (what is enforced), and, from the launcher on, how it is enforced.

Usable on its own: nothing here imports loaders/ or the manager.
"""

from .policy import PathGrant, SandboxConfig, SandboxPolicy, SandboxRequest, effective_config

__all__ = ["PathGrant", "SandboxConfig", "SandboxPolicy", "SandboxRequest", "effective_config"]
