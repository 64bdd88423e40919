"""The daemon's figures in Prometheus' text exposition format (0.0.4), on an optional
listener (``sandboxer serve --metrics 127.0.0.1:9464``).

Written by hand rather than with prometheus-client: the format is a few lines per family,
and the client would bring a dependency, a process-global registry and an HTTP server of its
own into the privileged process. The listener answers ``GET /metrics`` and nothing else,
reads at most 8 KiB of request within 5 s, and closes after each answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["render", "serve_metrics", "parse_address"]

log = logging.getLogger("sandboxer.daemon")

# (metric, type, help, the status field it comes from)
_FAMILIES = (
    ("sandboxer_plugin_calls_total", "counter", "Calls made to the plugin.", "calls"),
    ("sandboxer_plugin_failures_total", "counter", "Calls that failed.", "failures"),
    ("sandboxer_plugin_restarts_total", "counter", "Restarts after a failure.", "restarts"),
    ("sandboxer_plugin_in_flight", "gauge", "Calls in flight now.", "in_flight"),
    (
        "sandboxer_plugin_memory_peak_bytes",
        "gauge",
        "Peak memory of its sandbox.",
        "memory_peak_bytes",
    ),
    (
        "sandboxer_plugin_memory_limit_bytes",
        "gauge",
        "Memory limit of its sandbox.",
        "memory_limit_bytes",
    ),
    ("sandboxer_plugin_cpu_seconds_total", "counter", "CPU time its sandboxes used.", "cpu_time_s"),
    ("sandboxer_plugin_generation", "gauge", "Its current generation.", "generation"),
)


def _label(value: object) -> str:
    text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{text}"'


def render(status: dict[str, Any]) -> str:
    """``Daemon.status`` as exposition text."""
    plugins = status["plugins"]
    lines = [
        "# HELP sandboxer_tenants Tenants in the host config.",
        "# TYPE sandboxer_tenants gauge",
        f"sandboxer_tenants {len(status['tenants'])}",
        "# HELP sandboxer_plugin_up 1 for each plugin, labelled with its state.",
        "# TYPE sandboxer_plugin_up gauge",
    ]
    for p in plugins:
        labels = f"tenant={_label(p['tenant'])},plugin={_label(p['id'])}"
        lines.append(f"sandboxer_plugin_up{{{labels},state={_label(p['state'])}}} 1")
    for name, kind, text, key in _FAMILIES:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for p in plugins:
            if p.get(key) is not None:
                labels = f"tenant={_label(p['tenant'])},plugin={_label(p['id'])}"
                lines.append(f"{name}{{{labels}}} {p[key]}")
    lines += [
        "# HELP sandboxer_plugin_call_seconds Duration of its recent calls through the daemon.",
        "# TYPE sandboxer_plugin_call_seconds summary",
    ]
    for p in plugins:
        labels = f"tenant={_label(p['tenant'])},plugin={_label(p['id'])}"
        for quantile, key in (("0.5", "p50_s"), ("0.99", "p99_s")):
            if p.get(key) is not None:
                lines.append(
                    f"sandboxer_plugin_call_seconds{{{labels},quantile={_label(quantile)}}} "
                    f"{p[key]}"
                )
    return "\n".join(lines) + "\n"


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (a numeric port) for ``--metrics``."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"HOST:PORT such as 127.0.0.1:9464, not {text!r}")
    return host.strip("[]"), int(port)


async def serve_metrics(
    address: str, status: Callable[[], Awaitable[dict[str, Any]]]
) -> asyncio.Server:
    host, port = parse_address(address)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5.0):
                head = await reader.readuntil(b"\r\n\r\n")
            request = head.split(b"\r\n", 1)[0].split()
            if request[:2] == [b"GET", b"/metrics"]:
                body = render(await status()).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                    + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
            else:
                writer.write(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    server = await asyncio.start_server(answer, host, port, limit=8192)
    log.info("metrics on http://%s:%d/metrics", host, port)
    return server
