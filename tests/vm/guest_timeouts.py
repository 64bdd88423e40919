"""A pytest plugin for the guest run only (``-p vm.guest_timeouts``): start-up timeouts for
a TCG guest.

Python in the guest runs 12-15 times slower than on the host, and a sandboxed plugin's
start-up is Python (launcher, plugin host). The default 10 s handshake and sandbox-setup
timeouts are sized for real hardware; the escape probes' fleets, built with a default
``PluginManager()``, would hit them when the guest is busy. This raises the handshake
timeout of default managers and the setup timeout (``HostConfig.setup_timeout``) of every
manager to at least 60 s for the guest session and changes nothing else: every limit and
every call timeout a test sets stays as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from sandboxer import HostConfig, PluginManager

START_UP_TIMEOUT = 60.0


def pytest_configure(config: pytest.Config) -> None:
    original = PluginManager.__init__

    def __init__(self: PluginManager, config: HostConfig | None = None, **kwargs: Any) -> None:
        config = config if config is not None else HostConfig(handshake_timeout=START_UP_TIMEOUT)
        original(self, dataclasses.replace(
            config, setup_timeout=max(config.setup_timeout, START_UP_TIMEOUT)), **kwargs)

    PluginManager.__init__ = __init__  # type: ignore[method-assign]
