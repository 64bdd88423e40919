"""sandboxer.http_request: a wasm plugin's only way to the network, through the egress rules.

The plugin under test is a small WAT module whose ``http`` method hands its first argument (a
request object) to ``sandboxer.http_request`` and returns the response JSON it reads back with
``sandboxer.http_response``, so each test sees exactly what a plugin would. The targets are
tests/egress_servers.py's loopback servers (HTTP on 127.0.0.2, TLS on 127.0.0.3 with a test
CA), reached through names in the egress proxy's hosts file. Every refusal is checked three
ways: the error the plugin gets, the log line on ``sandboxer.egress``, and the counters in the
plugin's statistics. examples/wasm-http, built by its Makefile, is driven at the end.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import EXAMPLES, loop_gap
from egress_servers import (HOST_ALLOWED_HOSTS, HTTP_ADDRESS, TLS_ADDRESS, TLS_NAME,
                            LoopbackServers)
from sandboxer import CallTimeout, HostConfig, PluginCallError, PluginManager, PluginStateError
from loaders.test_wasm import BUMP_ALLOC, JSON_RUNTIME, WORKER, write_plugin

pytestmark = pytest.mark.usefixtures("no_leaks")

HTTP_IMPORTS = """
  (import "sandboxer" "http_request" (func $http_request (param i32 i32) (result i32)))
  (import "sandboxer" "http_response" (func $http_response (param i32 i32) (result i32)))
"""
# http(request) -> the response JSON, verbatim: {"result":<what http_response copied>}.
# The args arrive as [<request>]: the request is the array minus its brackets.
HTTP_PLUGIN = ("(module " + HTTP_IMPORTS + '(memory (export "memory") 1)' + BUMP_ALLOC
               + JSON_RUNTIME + """
  (global $last (mut i32) (i32.const 0))
  (func (export "http") (param $p i32) (param $n i32) (result i64)
    (local $len i32) (local $out i32) (local $got i32)
    (local.set $len (call $http_request (i32.add (local.get $p) (i32.const 1))
                                        (i32.sub (local.get $n) (i32.const 2))))
    (local.set $out (call $alloc (i32.add (local.get $len) (i32.const 11))))
    (if (i32.eqz (local.get $out)) (then unreachable))
    (memory.copy (local.get $out) (i32.const 0) (i32.const 10))
    (local.set $got (call $http_response (i32.add (local.get $out) (i32.const 10))
                                         (local.get $len)))
    (i32.store8 (i32.add (local.get $out) (i32.add (local.get $got) (i32.const 10)))
                (i32.const 125))
    (call $pack (local.get $out) (i32.add (local.get $got) (i32.const 11))))
  ;; the host functions with whatever pointers the test picks
  (func (export "raw_request") (param i32 i32) (result i32)
    (call $http_request (local.get 0) (local.get 1)))
  (func (export "raw_response") (param i32 i32) (result i32)
    (call $http_response (local.get 0) (local.get 1)))
  (func (export "add") (param i32 i32) (result i32) (i32.add (local.get 0) (local.get 1)))
)""")
SCRATCH = 2560  # 1536 bytes the runtime leaves to host functions


@pytest.fixture
def servers(tmp_path: Path):
    running = LoopbackServers(tmp_path / "servers")
    yield running
    running.stop()
    # The servers' handler threads are daemons, which stop() does not join: a /slow handler
    # the plugin gave up on still holds its connection. Wait for it (no_leaks counts fds).
    give_up = time.monotonic() + 10
    while any("process_request_thread" in t.name for t in threading.enumerate()):
        assert time.monotonic() < give_up, "a loopback server handler did not finish"
        time.sleep(0.02)


@pytest.fixture
def host(servers: LoopbackServers) -> Callable[..., HostConfig]:
    def config(**overrides: Any) -> HostConfig:
        return HostConfig(egress_hosts_file=str(servers.hosts_file),
                          egress_ca_file=str(servers.ca_file),
                          allowed_hosts=HOST_ALLOWED_HOSTS, **overrides)
    return config


@pytest.fixture
def plugin(tmp_path: Path) -> Callable[..., Path]:
    """``plugin(allowed_hosts, **sandbox)``: the HTTP plugin with that network request."""
    counter = iter(range(10_000))

    def build(allowed: list[str] | None, *, plugin_id: str = "t.http", **sandbox: Any) -> Path:
        box: dict[str, Any] = {"network_allowed": allowed is not None, **sandbox}
        if allowed:
            box["allowed_hosts"] = allowed
        return write_plugin(tmp_path / f"plugin{next(counter)}", HTTP_PLUGIN,
                            plugin_id=plugin_id, sandbox=box)
    return build


def url(servers: LoopbackServers, name: str, path: str = "/hello", *, tls: bool = False) -> str:
    port = servers.tls.port if tls else servers.http.port
    return f"{'https' if tls else 'http'}://{name}:{port}{path}"


async def get(p: Any, target: str, **request: Any) -> dict[str, Any]:
    return await p.call("http", {"method": "GET", "url": target, **request})


async def network(mgr: PluginManager, plugin_id: str = "t.http") -> dict[str, int] | None:
    return mgr.get(plugin_id).statistics().network


def egress_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sandboxer.egress"]


def refused(reply: dict[str, Any]) -> str:
    assert set(reply) == {"error"}, reply
    assert reply["error"]["kind"] == "refused", reply
    return str(reply["error"]["message"])


ZERO = {"allowed": 0, "refused": 0, "failed": 0, "active": 0, "bytesSent": 0,
        "bytesReceived": 0}


# -- allowed ----------------------------------------------------------------------------------

async def test_a_listed_name_is_fetched_and_the_attempt_logged_and_counted(servers, host,
                                                                          plugin, caplog):
    """allowed.test resolves (hosts file) to 127.0.0.2, loopback, so the literal is listed
    too; the plugin gets status, lower-cased headers and the body; the log names the plugin,
    the target and the verdict; the counters add up to the bytes on the wire."""
    async with PluginManager(host()) as mgr:
        p = await mgr.load(plugin(["allowed.test", HTTP_ADDRESS]))
        assert await network(mgr) == ZERO  # no attempt yet
        with caplog.at_level(logging.INFO, logger="sandboxer.egress"):
            reply = await get(p, url(servers, "allowed.test"))
        assert reply["status"] == 200
        assert reply["body"] == "hello from http"
        assert reply["headers"]["content-type"] == "text/plain"
        assert reply["headers"]["content-length"] == "15"
        assert servers.http.hits == 1
        target = f"allowed.test:{servers.http.port}"
        assert any("plugin=t.http" in m and "via=wasm" in m and f"target={target}" in m
                   and "verdict=allowed" in m and HTTP_ADDRESS in m
                   for m in egress_records(caplog)), egress_records(caplog)
        stats = await network(mgr)
        assert stats is not None
        assert (stats["allowed"], stats["refused"], stats["failed"], stats["active"]) == \
            (1, 0, 0, 0)
        # request line + headers out; status line, headers and 15 body bytes back
        assert 60 < stats["bytesSent"] < 400, stats
        assert 15 + 60 < stats["bytesReceived"] < 400, stats


async def test_a_listed_ip_literal_is_fetched(servers, host, plugin):
    async with PluginManager(host()) as mgr:
        p = await mgr.load(plugin([HTTP_ADDRESS]))
        reply = await get(p, url(servers, HTTP_ADDRESS))
        assert (reply["status"], reply["body"]) == (200, "hello from http")
        # the Host header names what the URL named
        headers = await get(p, url(servers, HTTP_ADDRESS, "/headers"))
        assert json.loads(headers["body"])["Host"] == f"{HTTP_ADDRESS}:{servers.http.port}"


async def test_https_is_verified_against_the_hosts_ca(servers, host, plugin):
    """tls.test with the host's egress_ca_file: verified by name, and by IP SAN for the
    literal; without the CA the same request fails verification (and is not a refusal)."""
    async with PluginManager(host()) as mgr:
        p = await mgr.load(plugin([TLS_NAME, TLS_ADDRESS]))
        reply = await get(p, url(servers, TLS_NAME, tls=True))
        assert (reply["status"], reply["body"]) == (200, "hello from tls")
        reply = await get(p, url(servers, TLS_ADDRESS, tls=True))
        assert (reply["status"], reply["body"]) == (200, "hello from tls")
    async with PluginManager(HostConfig(egress_hosts_file=str(servers.hosts_file),
                                        allowed_hosts=HOST_ALLOWED_HOSTS)) as mgr:
        p = await mgr.load(plugin([TLS_NAME, TLS_ADDRESS]))
        reply = await get(p, url(servers, TLS_NAME, tls=True))
        assert reply["error"]["kind"] == "failed", reply
        assert "certificate verification failed" in reply["error"]["message"], reply
        assert servers.tls.hits == 2


async def test_a_post_body_and_headers_reach_the_server(servers, host, plugin):
    async with PluginManager(host()) as mgr:
        p = await mgr.load(plugin(["allowed.test", HTTP_ADDRESS]))
        reply = await p.call("http", {"method": "POST", "url": url(servers, "allowed.test", "/"),
                                      "headers": {"Content-Type": "text/x-test"},
                                      "body": "héllo, wörld"})
        assert reply["status"] == 200
        assert reply["body"] == "héllo, wörld"
        assert reply["headers"]["content-type"] == "text/x-test"
        raw = bytes([0, 255, 10, 13, 128])
        reply = await p.call("http", {"method": "POST", "url": url(servers, "allowed.test", "/"),
                                      "body_base64": base64.b64encode(raw).decode()})
        assert base64.b64decode(reply["body_base64"]) == raw
        reply = await get(p, url(servers, "allowed.test", "/headers"),
                          headers={"X-Plugin": "yes"})
        seen = json.loads(reply["body"])
        assert seen["X-Plugin"] == "yes"
        assert seen["Host"] == f"allowed.test:{servers.http.port}"


async def test_a_binary_body_comes_back_as_base64(servers, host, plugin):
    async with PluginManager(host()) as mgr:
        p = await mgr.load(plugin(["allowed.test", HTTP_ADDRESS]))
        reply = await get(p, url(servers, "allowed.test", "/binary"))
        assert "body" not in reply
        assert base64.b64decode(reply["body_base64"]) == bytes(range(256))


async def test_redirects_and_errors_are_returned_not_followed(servers, host, plugin):
    async with PluginManager(host()) as mgr:
        p = await mgr.load(plugin(["allowed.test", HTTP_ADDRESS]))
        reply = await get(p, url(servers, "allowed.test", "/nowhere"))
        assert (reply["status"], reply["body"]) == (404, "not found")


# -- refused ----------------------------------------------------------------------------------

REFUSALS = {
    "unlisted_name": (["allowed.test", HTTP_ADDRESS], "tls.test", "is not in allowed_hosts"),
    "unlisted_literal": (["allowed.test"], HTTP_ADDRESS, "is reachable only when"),
    "wildcard_not_its_suffix": (["*.wild.test", HTTP_ADDRESS], "wild.test",
                                "is not in allowed_hosts"),
    "wildcard_not_a_longer_label": (["*.wild.test", HTTP_ADDRESS], "badwild.test",
                                    "is not in allowed_hosts"),
    "listed_name_resolving_to_loopback": (["rebind.test"], "rebind.test",
                                          "127.0.0.2 (loopback)"),
    "listed_name_resolving_to_link_local": (["metadata.test"], "metadata.test",
                                            "169.254.169.254 (link-local)"),
    "listed_name_resolving_to_private": (["private.test"], "private.test",
                                         "10.11.12.13 (private)"),
    "listed_name_resolving_to_mapped_loopback": (["mapped.test"], "mapped.test",
                                                 "::ffff:127.0.0.2 (loopback)"),
    "listed_name_other_port": (["allowed.test:1", HTTP_ADDRESS], "allowed.test",
                               "is not in allowed_hosts"),
}


@pytest.mark.parametrize("allowed,name,fragment", REFUSALS.values(), ids=REFUSALS.keys())
async def test_a_target_the_allow_list_does_not_cover_is_refused(servers, host, plugin, caplog,
                                                                allowed, name, fragment):
    """Refused before anything is dialled: the server sees nothing; the log says who, where
    and why; the refusal is counted."""
    async with PluginManager(host()) as mgr:
        p = await mgr.load(plugin(allowed))
        with caplog.at_level(logging.INFO, logger="sandboxer.egress"):
            message = refused(await get(p, url(servers, name)))
        assert fragment in message, message
        assert servers.http.hits == 0
        target = f"{name}:{servers.http.port}"
        lines = [m for m in egress_records(caplog) if f"target={target}" in m]
        assert len(lines) == 1, egress_records(caplog)
        assert "plugin=t.http" in lines[0] and "verdict=refused" in lines[0], lines
        assert fragment in lines[0], lines
        stats = await network(mgr)
        assert stats is not None and (stats["allowed"], stats["refused"]) == (0, 1), stats


async def test_a_wildcard_covers_every_depth_below_its_suffix(servers, host, plugin):
    async with PluginManager(host()) as mgr:
        p = await mgr.load(plugin(["*.wild.test", HTTP_ADDRESS]))
        for name in ("a.wild.test", "deep.a.wild.test"):
            reply = await get(p, url(servers, name))
            assert reply.get("status") == 200, (name, reply)
        for name in ("wild.test", "badwild.test"):
            refused(await get(p, url(servers, name)))
        stats = await network(mgr)
        assert stats is not None and (stats["allowed"], stats["refused"]) == (2, 2), stats


async def test_a_listed_port_allows_that_port_only(servers, host, plugin):
    async with PluginManager(host()) as mgr:
        p = await mgr.load(plugin([f"allowed.test:{servers.http.port}", HTTP_ADDRESS]))
        assert (await get(p, url(servers, "allowed.test")))["status"] == 200
        other = f"http://allowed.test:{servers.http.port + 1}/hello"
        assert "is not in allowed_hosts" in refused(await get(p, other))


async def test_without_network_allowed_every_request_is_refused_and_counted(servers, host,
                                                                          plugin, caplog):
    async with PluginManager(host()) as mgr:
        p = await mgr.load(plugin(None))
        with caplog.at_level(logging.INFO, logger="sandboxer.egress"):
            message = refused(await get(p, url(servers, HTTP_ADDRESS)))
        assert "network_allowed is false" in message
        assert servers.http.hits == 0
        assert any("plugin=t.http" in m and "verdict=refused" in m
                   for m in egress_records(caplog)), egress_records(caplog)
        stats = await network(mgr)
        assert stats is not None and (stats["allowed"], stats["refused"]) == (0, 1), stats


async def test_full_network_reaches_any_address_when_the_host_allows_it(servers, host,
                                                                      plugin):
    """network_allowed without allowed_hosts is the host's network, only under the host
    policy's allow_full_network: then even a loopback name is reachable."""
    async with PluginManager(host(allow_full_network=True)) as mgr:
        p = await mgr.load(plugin([]))
        assert (await get(p, url(servers, "rebind.test")))["status"] == 200
        assert (await get(p, url(servers, HTTP_ADDRESS)))["status"] == 200


INVALID = {
    "not_an_object": (["http://x/"], "must be a JSON object"),
    "unknown_field": ({"url": "http://allowed.test/", "header": {}}, "unknown request field"),
    "ftp": ({"url": "ftp://allowed.test/"}, "only http:// and https://"),
    "method_with_space": ({"method": "GET /x", "url": "http://allowed.test/"},
                          "HTTP token"),
    "header_with_newline": ({"url": "http://allowed.test/", "headers": {"X": "a\r\nB: c"}},
                            "without CR, LF"),
    "header_name_with_colon": ({"url": "http://allowed.test/", "headers": {"X:Y": "1"}},
                               "not an HTTP token"),
    "framing_header": ({"url": "http://allowed.test/", "headers": {"Content-Length": "1"}},
                       "set by sandboxer"),
    "host_header": ({"url": "http://allowed.test/", "headers": {"host": "elsewhere.example"}},
                    "set by sandboxer"),
    "path_with_space": ({"url": "http://allowed.test/a b"}, "spaces, control characters"),
    "path_not_ascii": ({"url": "http://allowed.test/caf\u00e9"}, "non-ASCII characters"),
    "header_value_not_latin1": ({"url": "http://allowed.test/", "headers": {"X": "\u20ac"}},
                                "outside ISO-8859-1"),
    "host_not_a_name": ({"url": "http://\u2603\u2603..x/"}, "not a valid host name"),
    "credentials": ({"url": "http://u:p@allowed.test/"}, "credentials"),
    "both_bodies": ({"url": "http://allowed.test/", "body": "", "body_base64": ""},
                    "not both"),
    "bad_base64": ({"url": "http://allowed.test/", "body_base64": "!!"}, "not valid base64"),
    "body_over_the_limit": ({"url": "http://allowed.test/", "body": "x" * 5000},
                            "more than the 4096-byte limit"),
}


@pytest.mark.parametrize("request_,fragment", INVALID.values(), ids=INVALID.keys())
async def test_a_malformed_request_is_invalid_and_nothing_is_attempted(servers, host, plugin,
                                                                      request_, fragment):
    async with PluginManager(host(max_frame=4096)) as mgr:
        p = await mgr.load(plugin(["allowed.test", HTTP_ADDRESS]))
        reply = await p.call("http", request_)
        assert reply["error"]["kind"] == "invalid", reply
        assert fragment in reply["error"]["message"], reply
        assert servers.http.hits == 0
        assert await network(mgr) == ZERO  # not an attempt: nothing counted


# -- limits, timeouts, bad pointers -----------------------------------------------------------

async def test_a_response_over_the_cap_is_an_error(servers, host, plugin):
    """max_frame (here 64 KiB) caps the body: one byte over fails, at the cap passes."""
    cap = 64 << 10
    async with PluginManager(host(max_frame=cap)) as mgr:
        p = await mgr.load(plugin(["allowed.test", HTTP_ADDRESS], memory_limit="16MiB"))
        reply = await get(p, url(servers, "allowed.test", f"/big?n={cap + 1}"))
        assert reply["error"]["kind"] == "failed", reply
        assert f"more than the {cap}-byte limit" in reply["error"]["message"]
        reply = await get(p, url(servers, "allowed.test", f"/big?n={cap - 200}"))
        assert reply["body"] == "x" * (cap - 200)


async def test_a_slow_response_times_the_call_out_and_the_plugin_goes_on(servers, host,
                                                                          plugin):
    async with PluginManager(host()) as mgr:
        p = await mgr.load(plugin(["allowed.test", HTTP_ADDRESS], timeout="1s"))
        started = time.monotonic()
        with pytest.raises(CallTimeout) as info:
            await get(p, url(servers, "allowed.test", "/slow?s=5"))
        took = time.monotonic() - started
        assert 0.9 < took < 1.5, took
        assert info.value.timeout == 1.0
        assert (await get(p, url(servers, "allowed.test")))["status"] == 200
        stats = await network(mgr)
        assert stats is not None and (stats["allowed"], stats["active"]) == (2, 0), stats


async def test_a_slow_request_does_not_hold_the_event_loop(servers, host, plugin):
    async with PluginManager(host()) as mgr:
        p = await mgr.load(plugin(["allowed.test", HTTP_ADDRESS]))
        async with loop_gap() as gap:
            started = time.perf_counter()
            reply = await get(p, url(servers, "allowed.test", "/slow?s=0.5"))
            took = time.perf_counter() - started
        worst = gap.worst
        assert reply["body"] == "slow"
        assert took > 0.45, took
        assert worst < 0.1, f"the event loop was held for {worst:.3f}s"


async def test_unload_during_a_request_ends_it_at_once(servers, host, plugin):
    async with PluginManager(host(drain_timeout=0.2)) as mgr:
        p = await mgr.load(plugin(["allowed.test", HTTP_ADDRESS], timeout="30s"))
        call = asyncio.create_task(get(p, url(servers, "allowed.test", "/slow?s=3")))
        await asyncio.sleep(0.3)
        started = time.monotonic()
        await mgr.unload(p.id)
        assert time.monotonic() - started < 1.0
        with pytest.raises(PluginStateError) as info:
            await call
        assert "unloaded while http was in flight" in str(info.value)


async def test_a_cancelled_request_stops_at_once_and_the_plugin_goes_on(servers, host,
                                                                       plugin):
    """Cancelling the awaiting task moves the call's deadline: the request stops within a
    step, not when the server answers 3 s later, and the next call gets a fresh instance."""
    async with PluginManager(host()) as mgr:
        p = await mgr.load(plugin(["allowed.test", HTTP_ADDRESS], timeout="30s"))
        call = asyncio.create_task(get(p, url(servers, "allowed.test", "/slow?s=3")))
        await asyncio.sleep(0.3)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        started = time.monotonic()
        assert (await get(p, url(servers, "allowed.test")))["status"] == 200
        assert time.monotonic() - started < 1.0
        stats = await network(mgr)
        assert stats is not None and (stats["allowed"], stats["active"]) == (2, 0), stats


BAD_POINTERS = {
    "request_outside_memory": ("raw_request", (65536 - 4, 8), "the request lies outside"),
    "request_length_wraps": ("raw_request", (16, -1), "the request lies outside"),
    "response_outside_memory": ("raw_response", (65536 - 4, 100), "the buffer lies outside"),
}


@pytest.mark.parametrize("method,args,fragment", BAD_POINTERS.values(), ids=BAD_POINTERS.keys())
async def test_bad_pointers_trap_and_the_plugin_goes_on(servers, host, plugin, method, args,
                                                        fragment):
    async with PluginManager(host()) as mgr:
        p = await mgr.load(plugin(["allowed.test", HTTP_ADDRESS]))
        if method == "raw_response":  # a response to copy, so that the copy is attempted
            await get(p, url(servers, "allowed.test"))
        with pytest.raises(PluginCallError) as info:
            await p.call(method, *args)
        assert fragment in str(info.value), str(info.value)
        assert (await get(p, url(servers, "allowed.test")))["status"] == 200
        assert await p.call("add", 2, 3) == 5


async def test_http_response_copies_what_fits_and_keeps_the_reply(servers, host, plugin):
    """Before any request there is nothing to copy; afterwards a short buffer gets the first
    bytes, and the reply stays until the next request."""
    async with PluginManager(host()) as mgr:
        p = await mgr.load(plugin(["allowed.test", HTTP_ADDRESS]))
        assert await p.call("raw_response", SCRATCH, 100) == 0
        whole = await get(p, url(servers, "allowed.test"))
        length = len(json.dumps(whole, separators=(",", ":"), ensure_ascii=False).encode())
        assert await p.call("raw_response", SCRATCH, 10) == 10
        assert await p.call("raw_response", SCRATCH, 1500) == length
        assert await p.call("raw_response", SCRATCH, 0) == 0


async def test_the_counters_add_up_across_verdicts(servers, host, plugin):
    """allowed, refused and failed (a listed target nobody listens on) each counted once per
    attempt; bytes each way only for the exchange that happened."""
    async with PluginManager(host()) as mgr:
        p = await mgr.load(plugin(["allowed.test", HTTP_ADDRESS, "127.0.0.4"]))
        await get(p, url(servers, "allowed.test"))
        await get(p, url(servers, "allowed.test", "/binary"))
        refused(await get(p, url(servers, "tls.test")))
        failed = await get(p, "http://127.0.0.4:9/")
        assert failed["error"]["kind"] == "failed", failed
        assert "connection refused" in failed["error"]["message"].lower(), failed
        stats = await network(mgr)
        assert stats is not None
        assert {k: stats[k] for k in ("allowed", "refused", "failed", "active")} == \
            {"allowed": 2, "refused": 1, "failed": 1, "active": 0}, stats
        assert stats["bytesReceived"] > 256 + 15, stats
        assert stats["bytesSent"] > 0
        assert servers.http.hits == 2


async def test_only_a_module_importing_http_request_leaves_the_event_loop(servers, host,
                                                                         plugin, tmp_path):
    """Importing http_request moves every call off the loop (it waits on the network); a
    module importing only log and config_get still starts its calls on the loop."""
    async with PluginManager(host()) as mgr:
        plain = await mgr.load(write_plugin(tmp_path / "plain", WORKER, plugin_id="t.plain"))
        http = await mgr.load(plugin(["allowed.test", HTTP_ADDRESS]))
        assert plain.handle._inline is True
        assert http.handle._inline is False


# -- the example ------------------------------------------------------------------------------

@pytest.fixture
def wasm_http_example() -> Path:
    run = subprocess.run(["make", "-C", str(EXAMPLES / "wasm-http")], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, f"make -C examples/wasm-http failed:\n{run.stdout}{run.stderr}"
    return EXAMPLES / "wasm-http"


async def test_the_wasm_http_example_fetches_what_its_manifest_allows(servers, host,
                                                                     wasm_http_example):
    async with PluginManager(host()) as mgr:
        p = await mgr.load(wasm_http_example)
        assert "allowed.test" in p.sandbox.allowed_hosts
        reply = await p.call("fetch", url(servers, "allowed.test"))
        assert reply == {"status": 200, "body": "hello from http"}
        with pytest.raises(PluginCallError) as info:
            await p.call("fetch", url(servers, "tls.test"))
        assert "refused" in str(info.value) and "not in allowed_hosts" in str(info.value)
        stats = mgr.get(p.id).statistics().network
        assert stats is not None and (stats["allowed"], stats["refused"]) == (1, 1)
