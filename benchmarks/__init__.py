"""Benchmarks run by ``make bench`` (``python -m benchmarks [NAMES...]``).

Each module here not starting with ``_`` is one benchmark: it exposes ``run() -> dict`` and
optionally ``format_table(result) -> str``. The runner merges each result under the module's
name into ``benchmarks/results/latest.json``. Benchmarks report ratios against baselines
measured in the same run; timings never become test assertions (DESIGN section 11).
"""
