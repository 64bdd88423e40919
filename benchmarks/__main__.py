"""``python -m benchmarks [NAMES...]``: run benchmarks, merge results into latest.json.

With no names, every benchmark module in this package runs (those not starting with ``_``).
Each result is merged under its name as soon as it is done, so one failing benchmark does not
lose the others'. Exit status 0 when every named benchmark ran, whether or not it met its
targets (targets are reported, never asserted); 1 if one failed; 2 for an unknown name.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import pkgutil
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ._results import RESULTS, merge

PACKAGE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules([str(PACKAGE)])
                  if not m.name.startswith("_") and not m.ispkg)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PACKAGE.parent, text=True,
                             capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=PACKAGE.parent, text=True, capture_output=True, timeout=10)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def _generic_table(result: dict[str, Any], prefix: str = "") -> list[str]:
    lines = []
    for key, value in result.items():
        if isinstance(value, dict):
            lines += _generic_table(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float, bool)) or value is None:
            lines.append(f"  {prefix}{key:<40} {value}")
    return lines


def main(argv: list[str] | None = None) -> int:
    names_known = available()
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description="Run benchmarks and merge their results "
                                                 "into benchmarks/results/latest.json.")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all: {', '.join(names_known)})")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in names_known]
    if unknown:
        print(f"benchmarks: no benchmark named {', '.join(unknown)} "
              f"(there are: {', '.join(names_known)})", file=sys.stderr)
        return 2
    failed = []
    for name in args.names or names_known:
        module = importlib.import_module(f"{__package__}.{name}")
        print(f"== {name} ==", flush=True)
        started = time.monotonic()
        load_before = os.getloadavg()[0]
        try:
            result = module.run()
        except Exception:
            traceback.print_exc()
            print(f"benchmarks: {name} failed; its previous result is kept", file=sys.stderr)
            failed.append(name)
            continue
        meta = result.setdefault("meta", {})
        meta.update({
            "measured_at": datetime.datetime.now(datetime.timezone.utc)
                                            .isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - started, 1),
            "git_commit": _git_commit(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            # Other work on the machine skews every figure: the 1-minute load average before
            # the run (besides this benchmark) says how busy it was.
            "load_average_1m_before": round(load_before, 2),
        })
        merge(name, result)
        formatter = getattr(module, "format_table", None)
        print(formatter(result) if formatter else "\n".join(_generic_table(result)))
        print(f"({meta['seconds']} s; merged into {RESULTS})\n", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
