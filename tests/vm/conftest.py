"""The VM stage's report: phase times and the figures measured in the guests, printed at the
end of the run (timings are output, never assertions)."""

from __future__ import annotations

from typing import Any

import pytest

# Filled by tests/vm/test_stage.py's stage fixtures: one entry per guest that ran.
REPORTS: list[dict[str, Any]] = []


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int,
                            config: pytest.Config) -> None:
    for report in REPORTS:
        write = terminalreporter.write_line
        terminalreporter.section(f"VM stage: {report['name']}")
        phases = report["phases"]
        write("phases: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in phases.items())
              + f" (wall {report['wall']:.1f} s)")
        write(f"guest tests: {report['summary']}")
        for case, figures in report["figures"].items():
            if figures:
                write(f"  {case}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))
