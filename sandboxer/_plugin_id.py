"""A plugin id's grammar (DESIGN section 4), shared by the manifest and the key scopes."""

from __future__ import annotations

import re

ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
