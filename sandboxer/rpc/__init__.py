"""The wire protocol: NDJSON JSON-RPC 2.0 framing, the host-side client, the plugin-side server."""
