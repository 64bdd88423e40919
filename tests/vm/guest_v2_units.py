"""The VM suite's last file in the cgroup v2 guest (after tests/escapes): the daemon's
systemd units, installed as an operator installs them.

It runs last because it changes systemd's state: ``systemctl daemon-reload`` makes systemd
apply its own cgroup settings again to the units it manages, the test run's session scope
included, which takes back the controllers a supervisor enabled below a cgroup that was never
delegated to it. Run before the others, it would leave them without a memory controller.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.vm.guest_v2 import CGROUP_ROOT, HERE, ROOTLESS_UID, ROOTLESS_USER, Record, python_plugin

pytestmark = pytest.mark.timeout(600)


def test_the_daemon_unit_serves_a_tenant_and_a_kill_9_leaves_nothing(
        record_property: Record) -> None:
    """contrib/systemd as an operator installs it: the socket activates the service, an
    ordinary user in a tenant calls through it, and when the daemon is killed with SIGKILL
    its plugins are gone within 2 s and the restarted daemon removes their cgroups."""
    repo = HERE.parent.parent
    workdir = Path(tempfile.mkdtemp(prefix="sandboxer-tenant-", dir="/var/tmp"))
    workdir.chmod(0o755)
    plugin = python_plugin(workdir / "hello", 'def greet(n):\n    return "Hello, " + n\n')
    for path in (workdir, plugin, *plugin.iterdir()):
        os.chown(path, ROOTLESS_UID, ROOTLESS_UID)
    config = Path("/etc/sandboxer/sandboxer.toml")
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f'[tenants.vm]\nuids = [{ROOTLESS_UID}]\npath_roots = ["{workdir}"]\n')
    units = [Path("/etc/systemd/system") / n for n in ("sandboxer.service", "sandboxer.socket")]
    for unit in units:
        shutil.copy(repo / "contrib" / "systemd" / unit.name, unit)
    systemctl = ["systemctl"]
    subprocess.run([*systemctl, "daemon-reload"], check=True, timeout=60)
    subprocess.run([*systemctl, "start", "sandboxer.socket"], check=True, timeout=60)
    as_user = ["runuser", "-u", ROOTLESS_USER, "--", "env",
               "SANDBOXER_SOCKET=/run/sandboxer/sandboxer.sock"]
    service = CGROUP_ROOT / "system.slice" / "sandboxer.service"
    try:
        call = subprocess.run([*as_user, "/usr/local/bin/sandboxer", "call", str(plugin), "greet",
                               "vm"], capture_output=True, text=True, timeout=300)
        assert call.returncode == 0, call.stderr
        assert call.stdout.strip() == "Hello, vm"
        keep = subprocess.run(
            [*as_user, "/opt/sandboxer-venv/bin/python", "-c",
             "import asyncio, sandboxer\n"
             "async def main():\n"
             "    async with await sandboxer.connect() as d:\n"
             f"        p = await d.load({str(plugin)!r})\n"
             "        print(await p.call('greet', 'kept'))\n"
             "asyncio.run(main())\n"],
            capture_output=True, text=True, timeout=300)
        assert keep.stdout.strip() == "Hello, kept", keep.stderr
        main_pid = subprocess.run([*systemctl, "show", "-p", "MainPID", "--value",
                                   "sandboxer.service"], capture_output=True, text=True,
                                  check=True).stdout.strip()
        groups = sorted(service.glob(f"sandboxer-{main_pid}-*"))
        assert groups, f"no plugin cgroup below {service}"
        assert any((g / "cgroup.procs").read_text().split() for g in groups)
        killed_at = time.monotonic()
        subprocess.run([*systemctl, "kill", "-s", "SIGKILL", "--kill-whom=main",
                        "sandboxer.service"], check=True, timeout=60)
        while time.monotonic() - killed_at < 2.0 and any(
                (g / "cgroup.procs").read_text().split() for g in groups if g.exists()):
            time.sleep(0.05)
        gone_after = time.monotonic() - killed_at
        assert not any((g / "cgroup.procs").read_text().split() for g in groups if g.exists())
        # systemd starts it again (Restart=on-failure); the new daemon sweeps the old cgroups
        deadline = time.monotonic() + 120
        while any(g.exists() for g in groups) and time.monotonic() < deadline:
            time.sleep(0.5)
        record_property("report", json.dumps({"plugins_gone_s": round(gone_after, 2),
                                              "swept_s": round(time.monotonic() - killed_at, 1)}))
        assert not any(g.exists() for g in groups), "the restarted daemon did not sweep"
        again = subprocess.run([*as_user, "/usr/local/bin/sandboxer", "call", str(plugin),
                                "greet", "again"], capture_output=True, text=True, timeout=300)
        assert again.stdout.strip() == "Hello, again", again.stderr
    finally:
        subprocess.run([*systemctl, "stop", "sandboxer.socket", "sandboxer.service"],
                       check=False, timeout=120)
        for unit in units:
            unit.unlink(missing_ok=True)
        subprocess.run([*systemctl, "daemon-reload"], check=False, timeout=60)
        subprocess.run([*systemctl, "reset-failed"], check=False, timeout=60)
        config.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    assert not service.exists() or not any(service.glob("sandboxer-*")), "cgroups outlived it"
