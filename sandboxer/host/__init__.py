"""The plugin host: the program that runs a python or native plugin out of process.

``python -m sandboxer.host --kind python|native --entrypoint PATH ...`` imports the plugin (or
dlopens it), then serves it over the wire protocol on fd 3 until the supervisor says
shutdown. It runs inside the sandbox; it trusts nothing it loads and imports nothing of the
supervisor's (manager, loaders).
"""

__all__ = ["WARM"]

# The one argument of a plugin host started ahead in a warm sandbox (sandbox/pool.py): it
# starts, then waits on its RPC socket for the rest of its arguments as one JSON line, sent
# once the plugin's files are in place.
WARM = "--warm"
