"""The lifecycle hooks a plugin of any kind may implement, by name (DESIGN sections 3 and 7),
and what a plugin's own method may be named.

Every hook is optional. On the wire each is a reserved method (``RESERVED``); in a python
module it is a function of that name, in a native library a ``sandboxer_*`` export or (the
state hooks) a name in ``sandboxer_methods``, in a wasm module an export.
"""

from __future__ import annotations

import re

__all__ = [
    "METHOD_RE",
    "INIT",
    "HEALTH_CHECK",
    "SHUTDOWN",
    "EXPORT_STATE",
    "IMPORT_STATE",
    "LIFECYCLE_HOOKS",
    "STATE_HOOKS",
    "RESERVED",
]

INIT = "init"
HEALTH_CHECK = "health_check"
SHUTDOWN = "shutdown"
EXPORT_STATE = "export_state"
IMPORT_STATE = "import_state"

LIFECYCLE_HOOKS = (INIT, HEALTH_CHECK, SHUTDOWN, EXPORT_STATE, IMPORT_STATE)
# The hot-reload state hooks: a plugin offers both or neither; never callable as methods.
STATE_HOOKS = frozenset({EXPORT_STATE, IMPORT_STATE})

# A method a plugin offers: what a manifest's ``methods`` and a native library's
# ``sandboxer_methods`` may name (the plugin host checks the latter, inside the sandbox,
# without importing the manifest's parser).
METHOD_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")

# The wire's reserved method for each hook.
RESERVED = {
    "sandboxer.init": INIT,
    "sandboxer.health": HEALTH_CHECK,
    "sandboxer.shutdown": SHUTDOWN,
    "sandboxer.export_state": EXPORT_STATE,
    "sandboxer.import_state": IMPORT_STATE,
}
