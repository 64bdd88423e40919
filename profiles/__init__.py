"""Sandbox profiles shipped with sandboxer (the *.toml files beside this one)."""
