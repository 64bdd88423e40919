"""The wire protocol: NDJSON JSON-RPC 2.0 framing, the host-side client, the plugin-side server."""

__all__ = ["DEFAULT_MAX_FRAME"]

# The largest frame either side accepts unless the host config says otherwise
# (HostConfig.max_frame). Here rather than in ``framing`` (which re-exports it), so that the
# host config and the egress proxy can name it without importing the JSON codec.
DEFAULT_MAX_FRAME = 16 << 20
