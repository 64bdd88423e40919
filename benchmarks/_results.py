"""benchmarks/results/latest.json: one key per benchmark, merged, written atomically."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["RESULTS", "load", "merge", "scale", "describe_loop", "versions"]

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def load(path: Path = RESULTS) -> dict[str, Any]:
    """The stored results; {} when there are none yet (or the file is not a JSON object)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise SystemExit(f"benchmarks: cannot read {path}: {exc}; move it away to start anew")
    return data if isinstance(data, dict) else {}


def merge(name: str, result: dict[str, Any], path: Path = RESULTS) -> None:
    """Set ``name`` to ``result``, keeping every other benchmark's key as it was.

    Read, update, write to a temp file beside the target (``*.tmp``, git-ignored), fsync,
    os.replace: a reader sees the old file or the new one, never a half-written one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    data = load(path)
    data[name] = result
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        # mkstemp makes it 0600; the results are for everyone to read, like any other file.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def scale() -> float:
    """SANDBOXER_BENCH_SCALE=0.1 runs a tenth of the iterations (a smoke test, not a result)."""
    try:
        return max(0.001, float(os.environ.get("SANDBOXER_BENCH_SCALE", "1")))
    except ValueError:
        return 1.0


def describe_loop(loop: Any) -> str:
    """An event loop named exactly, for a result's baseline description."""
    cls = type(loop)
    text = f"{cls.__module__}.{cls.__qualname__}"
    selector = getattr(loop, "_selector", None)
    if selector is not None:
        text += f" ({type(selector).__name__})"
    return text


def versions(*dists: str) -> dict[str, str | None]:
    """The installed version of each distribution (None when absent), for a result's record."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out
