"""go-plugin's gRPC protocol: unmodified HashiCorp go-plugin plugins, sandboxed (issue 19).

``handshake``: the environment a plugin starts with and the line it answers with.
"""
