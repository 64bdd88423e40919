"""The ``sandboxer`` command's grammar: its subcommands, options and their types (DESIGN
section 10). What each command does is in ``sandboxer.cli``; a value an option cannot take is
an argparse error (exit 2) naming the option and what it expects.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._trusted_keys import parse_trusted_key_option
from ._units import parse_duration, parse_size
from .daemon import DEFAULT_SOCKET
from .sandbox.policy import (
    KILL_GRACE,
    parse_cpu,
    parse_denied_path,
    parse_fuel,
    parse_host_pattern,
    parse_path_grant,
)

__all__ = ["build_parser", "UsageError", "EXIT_USAGE"]

EXIT_USAGE = 2


class UsageError(Exception):
    """A command-line mistake: exit 2 with the message."""


def _arg_type(parse: Any, what: str) -> Any:
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{what}: {exc}") from None

    return convert


def _cpu(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"a number of CPUs such as 0.5, not {text!r}") from None
    return parse_cpu(value)


def _add_registry_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "registry options (default: registry and trusted_keys under [host] in the host config)"
    )
    g.add_argument("--registry", metavar="REG", help="registry directory or http(s) URL")
    g.add_argument(
        "--trusted-key",
        metavar="PUB[=IDS]",
        action="append",
        default=[],
        type=_arg_type(parse_trusted_key_option, "PUB[=IDS]"),
        help="minisign public key the registry's index and plugins must be signed "
        "with; repeat for more. PUB alone is trusted for every plugin id; "
        "PUB=acme.*,acme only for the ids listed, each an exact id or PREFIX.* "
        "(acme.* covers acme.tool and acme.x.y, not acme nor acmeevil.x). Replaces "
        "the host config's trusted_keys",
    )


def _fuel(value: str) -> int:
    return parse_fuel(int(value))


def _env_pair(value: str) -> tuple[str, str]:
    name, sep, text = value.partition("=")
    if not sep or not name or "\0" in value or not name.replace("_", "a").isalnum():
        raise ValueError(f"NAME=VALUE, NAME letters, digits and _, not {value!r}")
    return name, text


def _add_sandbox_options(p: argparse.ArgumentParser, *, program: bool = False) -> None:
    """The sandbox options; for ``exec`` (``program``) without those a program cannot
    honour (``--no-sandbox``, ``--config``), which argparse then refuses (exit 2)."""
    g = p.add_argument_group(
        "sandbox options (the operator's choice: they override the manifest and the host policy)"
    )
    g.add_argument("--profile", metavar="NAME", help="sandbox profile (profiles/NAME.toml)")
    g.add_argument("--memory-limit", metavar="SIZE", type=_arg_type(parse_size, "SIZE"))
    g.add_argument("--cpu-limit", metavar="CPUS", type=_arg_type(_cpu, "CPUS"))
    g.add_argument(
        "--timeout",
        metavar="DUR",
        type=_arg_type(parse_duration, "DUR"),
        help=(
            "deadline for the whole run, e.g. 30s: then SIGTERM, SIGKILL "
            f"{KILL_GRACE:g}s later, exit 3 (default: none)"
        )
        if program
        else "per-call timeout, e.g. 5s or 250ms",
    )
    g.add_argument(
        "--allow-path",
        metavar="PATH[:rw]",
        action="append",
        default=[],
        type=_arg_type(parse_path_grant, "PATH"),
    )
    g.add_argument(
        "--deny-path",
        metavar="PATH",
        action="append",
        default=[],
        type=_arg_type(parse_denied_path, "PATH"),
    )
    g.add_argument("--network", action="store_true", help="allow network access")
    g.add_argument(
        "--allow-host",
        metavar="HOST",
        action="append",
        default=[],
        type=_arg_type(parse_host_pattern, "HOST"),
        help="reachable host (implies --network); repeat for more",
    )
    if program:
        p.set_defaults(no_sandbox=False, config=None)
        g.add_argument(
            "--env",
            metavar="NAME=VALUE",
            action="append",
            default=[],
            type=_arg_type(_env_pair, "NAME=VALUE"),
            help="set an environment variable for the program; repeat for more (a WASI "
            "program gets no other)",
        )
        g.add_argument(
            "--fuel",
            metavar="N",
            type=_arg_type(_fuel, "N"),
            help="a WebAssembly program's fuel: it stops after about N instructions",
        )
        p.add_argument(
            "--json",
            action="store_true",
            help="print one JSON object: the program's output, exit status, "
            "signal and stats (its output is captured, not passed through)",
        )
        return
    g.add_argument(
        "--no-sandbox",
        action="store_true",
        help="run a trusted python/native plugin in-process, unsandboxed",
    )
    p.add_argument(
        "--config", metavar="JSON", help="JSON object overriding the plugin's [config] for init()"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandboxer", description="Load and run plugins in a hardened sandbox."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    call = sub.add_parser("call", help="load a plugin, call one method, print the result")
    call.add_argument(
        "target",
        metavar="TARGET",
        help="plugin directory or file, or ID@VERSION_OR_RANGE from a registry",
    )
    call.add_argument("method", metavar="METHOD")
    call.add_argument(
        "args", metavar="ARG", nargs="*", help="arguments: JSON if it parses as JSON, else a string"
    )
    _add_registry_options(call)
    _add_sandbox_options(call)
    call.add_argument(
        "--connect",
        metavar="SOCKET",
        help="call through the sandboxer daemon listening there (also: $SANDBOXER_SOCKET); "
        "it runs the plugin under its tenant's policy",
    )

    serve = sub.add_parser(
        "serve", help="run the privileged supervisor as a daemon for many tenants"
    )
    serve.add_argument(
        "--socket",
        metavar="PATH",
        default=DEFAULT_SOCKET,
        help=f"the Unix socket clients connect to (default: {DEFAULT_SOCKET})",
    )
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="the host config, [tenants] included (SIGHUP reads it again)",
    )
    serve.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="also answer GET /metrics there, in Prometheus' text format (e.g. 127.0.0.1:9464)",
    )

    restart = sub.add_parser(
        "restart", help="start a failed or quarantined plugin of the daemon's again"
    )
    restart.add_argument("plugin", metavar="ID")
    restart.add_argument(
        "--connect", metavar="SOCKET", help="the daemon's socket (also: $SANDBOXER_SOCKET)"
    )
    restart.add_argument("--json", action="store_true", help="print one JSON object")

    status = sub.add_parser(
        "status", help="the daemon's tenants and plugins: states, restarts, memory, CPU, calls"
    )
    status.add_argument(
        "--connect", metavar="SOCKET", help="the daemon's socket (also: $SANDBOXER_SOCKET)"
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")

    scan = sub.add_parser("scan", help="find plugins under paths (errors included)")
    scan.add_argument("paths", metavar="PATH", nargs="+", type=Path)
    scan.add_argument("--json", action="store_true", help="print a JSON list")
    watch = sub.add_parser(
        "watch",
        help="load the plugins under paths, reload them when their "
        "files change, print what happens (JSON lines with --json)",
    )
    watch.add_argument("paths", metavar="PATH", nargs="+", type=Path)
    watch.add_argument(
        "--no-load", action="store_true", help="only print plugins added, changed and removed"
    )
    watch.add_argument("--json", action="store_true")

    registry = sub.add_parser("registry", help="manage a signed plugin registry")
    rsub = registry.add_subparsers(dest="registry_command", metavar="ACTION")
    rsub.required = True
    keygen = rsub.add_parser(
        "keygen", help="make a signing key pair: DIR/NAME.pub and DIR/NAME.key"
    )
    keygen.add_argument("directory", metavar="DIR", type=Path)
    keygen.add_argument("--name", default="sandboxer", help="file name stem (default sandboxer)")
    publish = rsub.add_parser("publish", help="sign a plugin directory into a registry")
    publish.add_argument("plugin", metavar="PLUGIN_DIR", type=Path)
    publish.add_argument("--registry", metavar="REG", required=True, type=Path)
    publish.add_argument("--key", metavar="SECRET_KEY", required=True, type=Path)
    sign_index = rsub.add_parser(
        "sign-index",
        help="sign a registry's index.json as it "
        "stands with the next sequence number (publish does this "
        "too): for a registry published before indexes were signed, "
        "or to re-sign it with another key",
    )
    sign_index.add_argument("--registry", metavar="REG", required=True, type=Path)
    sign_index.add_argument("--key", metavar="SECRET_KEY", required=True, type=Path)
    listing = rsub.add_parser(
        "list", help="list a registry's plugins and versions (its index verified first)"
    )
    _add_registry_options(listing)
    listing.add_argument("--json", action="store_true")
    fetch = rsub.add_parser(
        "fetch", help="download, verify and extract ID@VERSION; prints the plugin directory"
    )
    fetch.add_argument("target", metavar="ID@VERSION")
    _add_registry_options(fetch)
    fetch.add_argument("--json", action="store_true")

    inspect = sub.add_parser(
        "inspect", help="show a plugin's manifest, checksum and the sandbox it would get"
    )
    inspect.add_argument("target", metavar="TARGET")
    _add_sandbox_options(inspect)

    run = sub.add_parser(
        "exec", help="run any program in the sandbox, stdin forwarded; exits with its status"
    )
    _add_sandbox_options(run, program=True)
    run.add_argument(
        "--learn",
        metavar="FILE.toml",
        type=Path,
        help="run with every isolation but let through what some seccomp group allows, then "
        "write FILE.toml: a profile allowing exactly the groups the program used",
    )
    run.add_argument("program", metavar="-- CMD ARG", nargs=argparse.REMAINDER)

    doctor = sub.add_parser(
        "doctor",
        help="what this host can enforce (and, given a plugin, what would be enforced for it)",
    )
    doctor.add_argument("target", metavar="TARGET", nargs="?")
    doctor.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo", help="run the example plugins and show what each did")
    demo.add_argument(
        "--examples",
        metavar="DIR",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "examples",
    )
    demo.add_argument("--json", action="store_true")
    return parser
