"""go-plugin plugins log on stderr in hclog's JSON (``{"@level": "debug", "@message": …}``):
each such line is logged at its own level, as its message and its other fields; any other
line as the plain text it is."""

from __future__ import annotations

import json
import logging
from typing import Any

from ...sandbox.child import LineLog

__all__ = ["HclogLines", "LEVELS"]

LEVELS = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class HclogLines(LineLog):
    """A plugin's stderr: hclog JSON lines at their level, the rest at ``level``."""

    def render(self, text: str) -> tuple[int, str]:
        if not text.startswith("{"):
            return super().render(text)
        try:
            entry: Any = json.loads(text)
        except ValueError:
            return super().render(text)
        if not isinstance(entry, dict) or not isinstance(entry.get("@message"), str):
            return super().render(text)
        level = LEVELS.get(str(entry.get("@level", "")).lower(), logging.INFO)
        fields = " ".join(
            f"{key}={value}" for key, value in entry.items() if not str(key).startswith("@")
        )
        return level, entry["@message"] + (f" {fields}" if fields else "")
