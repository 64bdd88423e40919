"""The daemon (issue 21): `sandboxer serve`, its clients and its tenants."""
