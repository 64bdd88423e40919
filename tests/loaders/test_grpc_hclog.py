"""A go-plugin plugin's stderr: hclog JSON lines at their own level, anything else as is."""

from __future__ import annotations

import logging

import pytest

from sandboxer.loaders.grpc.hclog import HclogLines


@pytest.mark.parametrize(
    ("line", "level", "shown"),
    [
        (
            '{"@level":"debug","@message":"plugin address","@timestamp":"2026-12-06T03:36:06Z",'
            '"address":"/run/sandboxer/grpc/plugin1","network":"unix"}',
            logging.DEBUG,
            "plugin address address=/run/sandboxer/grpc/plugin1 network=unix",
        ),
        ('{"@level":"error","@message":"disk full"}', logging.ERROR, "disk full"),
        ('{"@level":"warn","@message":"slow"}', logging.WARNING, "slow"),
        ('{"@level":"trace","@message":"t"}', logging.DEBUG, "t"),
        ('{"@level":"nonsense","@message":"m"}', logging.INFO, "m"),
        ("plain text", logging.WARNING, "plain text"),
        ("{not json", logging.WARNING, "{not json"),
        ('{"@level":"error"}', logging.WARNING, '{"@level":"error"}'),  # no message: as is
        ('["@message"]', logging.WARNING, '["@message"]'),
    ],
)
def test_lines_are_logged_at_their_level(
    caplog: pytest.LogCaptureFixture, line: str, level: int, shown: str
) -> None:
    lines = HclogLines(name="stderr", logger=logging.getLogger("t.hclog"), level=logging.WARNING)
    with caplog.at_level(logging.DEBUG, logger="t.hclog"):
        lines.feed(line.encode() + b"\n")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(level, f"[stderr] {shown}")]
    assert list(lines.tail) == [line]  # the crash report keeps the line as written
