"""The VM stage of ``make test``: sandboxer on real systemd hosts with pure cgroup v2 and with
systemd's legacy cgroup v1 layout.

This machine is a v1/v2 hybrid, so here the v2 backend is only unit-tested. This module boots
a Debian 12 guest (scripts/vm/qemu-run: qemu in TCG mode, loopback-only networking, the image
cached by scripts/vm/build-image.sh), runs tests/vm/guest_v2.py and the escape probes
(tests/escapes) in it as root with CI=true, and reads their JUnit report back; then boots the
same image with systemd.unified_cgroup_hierarchy=0 and runs the limits of tests/vm/guest_v1.py
there. Each test below is one promise of the VM stage, passed only if the guest's test for it
passed; the figures the guests measured (cpu use under cpu.max, the OOM peak, ...) and the time
of each phase are printed at the end of the run. With CI=true nothing here may skip
(tests/conftest.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import REPO

from .conftest import REPORTS

QEMU_RUN = REPO / "scripts" / "vm" / "qemu-run"
STAGE_TIMEOUT = 1500  # seconds; the stage's budget is 12 minutes, this only stops a hang

pytestmark = pytest.mark.timeout(STAGE_TIMEOUT + 120)


@dataclass
class Case:
    name: str
    outcome: str  # passed, failed, skipped, xfailed
    message: str = ""
    figures: dict[str, str] = field(default_factory=dict)


@dataclass
class Stage:
    returncode: int
    output: str
    cases: dict[str, Case]

    def case(self, name: str) -> Case:
        assert name in self.cases, (f"the guest did not run {name}; guest output:\n"
                                    f"{self.output[-4000:]}")
        return self.cases[name]

    def passed(self, name: str) -> Case:
        case = self.case(name)
        assert case.outcome == "passed", f"in the guest, {name} {case.outcome}:\n{case.message}"
        return case


def read_junit(path: Path) -> dict[str, Case]:
    cases: dict[str, Case] = {}
    for element in ET.parse(path).iter("testcase"):
        module = element.get("classname", "")
        name = f"{module}::{element.get('name')}"
        outcome, message = "passed", ""
        for child in element:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or "") + "\n" + (child.text or "")
            elif child.tag == "skipped":
                xfail = child.get("type") == "pytest.xfail"
                outcome, message = ("xfailed" if xfail else "skipped"), child.get("message") or ""
        figures = {p.get("name", ""): p.get("value", "") for p in element.iter("property")}
        cases[name] = Case(name, outcome, message, figures)
    return cases


def run_stage(name: str, out: Path, *extra: str, guest_tests: str) -> Stage:
    """Boot a guest, run ``guest_tests`` (pytest arguments) in it, and read the report."""
    if os.geteuid() != 0:
        pytest.skip("the VM stage runs as root (it builds a Debian image with debootstrap)")
    missing = [tool for tool in ("qemu-system-x86_64", "debootstrap", "mkfs.ext4", "ssh")
               if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the VM stage needs {', '.join(missing)}: run scripts/vm/setup.sh")
    os.chmod(out, 0o777)  # the guest's root writes the report through 9p
    command = f"scripts/vm/guest-suite -o junit_family=xunit1 --junitxml=/out/junit.xml {guest_tests}"
    start = time.monotonic()
    try:
        result = subprocess.run([str(QEMU_RUN), *extra, "--share", f"{out}:/out", "--", command],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=STAGE_TIMEOUT,
                                check=False)
    except subprocess.TimeoutExpired as exc:  # qemu-run kills its guest on SIGTERM
        raise AssertionError(f"the VM stage took longer than {STAGE_TIMEOUT} s:\n"
                             f"{(exc.stdout or '')[-4000:]}") from None
    wall = time.monotonic() - start
    phases = {m[1]: float(m[2]) for m in re.finditer(r"^qemu-run: (\w+) ([\d.]+) s$",
                                                     result.stdout, re.MULTILINE)}
    junit = out / "junit.xml"
    cases = read_junit(junit) if junit.exists() else {}
    # Kept for a look after the run (build/ is ignored by git): the guest's report and output.
    keep = REPO / "build" / "vm-stage"
    keep.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"\W+", "-", name.split(" (")[0]).strip("-")
    (keep / f"{slug}.log").write_text(result.stdout)
    if junit.exists():
        shutil.copy(junit, keep / f"{slug}-junit.xml")
    counts: dict[str, int] = {}
    for case in cases.values():
        counts[case.outcome] = counts.get(case.outcome, 0) + 1
    REPORTS.append({"name": name, "phases": phases, "wall": wall,
                    "summary": ", ".join(f"{n} {o}" for o, n in sorted(counts.items())),
                    "figures": {c.name.rpartition("::")[2]: c.figures for c in cases.values()
                                if c.figures}})
    assert cases, f"the guest wrote no test report (exit {result.returncode}):\n" \
                  f"{result.stdout[-6000:]}"
    return Stage(result.returncode, result.stdout, cases)


@pytest.fixture(scope="module")
def v2(tmp_path_factory: pytest.TempPathFactory) -> Stage:
    return run_stage("cgroup v2 guest (Debian 12, systemd)", tmp_path_factory.mktemp("vm-v2"),
                     guest_tests="tests/vm/guest_v2.py tests/escapes tests/vm/guest_v2_units.py")


V2 = "tests.vm.guest_v2::"


def test_the_guest_is_pure_cgroup_v2(v2: Stage) -> None:
    case = v2.passed(V2 + "test_the_guest_is_pure_cgroup_v2_with_memory_cpu_pids")
    assert {"memory", "cpu", "pids"} <= set(case.figures["controllers"].split())


def test_sandboxer_doctor_in_the_guest_says_v2(v2: Stage) -> None:
    case = v2.passed(V2 + "test_sandboxer_doctor_says_v2")
    assert '"version": 2' in case.figures["doctor_cgroups"]


def test_memory_max_oom_is_memory_limit_exceeded_with_the_peak(v2: Stage) -> None:
    case = v2.passed(V2 + "test_memory_max_oom_is_reported_with_its_peak")
    assert int(case.figures["memory_peak_bytes"]) <= int(case.figures["memory_limit_bytes"])


def test_a_quarter_cpu_is_at_most_0_3_cpu_seconds_per_second(v2: Stage) -> None:
    case = v2.passed(V2 + "test_cpu_max_holds_a_spinning_plugin_to_a_quarter_cpu")
    assert float(case.figures["cpu_s_per_s"]) <= 0.3


def test_pids_max_stops_a_fork_bomb(v2: Stage) -> None:
    v2.passed(V2 + "test_pids_max_stops_a_fork_bomb")
    case = v2.passed(V2 + "test_pids_max_alone_stops_a_fork_bomb")
    assert int(case.figures["pids_events_max"]) > 0


def test_cgroup_kill_leaves_no_process_setsid_orphans_included(v2: Stage) -> None:
    v2.passed(V2 + "test_unload_kills_setsid_orphans_through_cgroup_kill")
    v2.passed(V2 + "test_cgroup_kill_empties_a_cgroup_of_setsid_orphans")


def test_memory_oom_group_kills_the_whole_plugin(v2: Stage) -> None:
    case = v2.passed(V2 + "test_memory_oom_group_kills_every_process_of_the_cgroup")
    assert case.figures["hog_returncode"] == "-9"


def test_a_delegate_yes_service_supervises_in_its_subtree(v2: Stage) -> None:
    v2.passed(V2 + "test_a_systemd_service_with_delegate_yes_supervises_in_its_subtree")


def test_a_rootless_supervisor_in_a_user_slice_gets_real_limits(v2: Stage) -> None:
    v2.passed(V2 + "test_a_rootless_supervisor_in_a_user_slice_gets_real_limits")


def test_fifty_load_unload_cycles_leave_no_cgroup(v2: Stage) -> None:
    v2.passed(V2 + "test_fifty_load_unload_cycles_leave_no_cgroup")


def test_the_daemon_unit_serves_a_tenant_and_a_kill_9_leaves_nothing(v2: Stage) -> None:
    case = v2.passed(
        "tests.vm.guest_v2_units::test_the_daemon_unit_serves_a_tenant_and_a_kill_9_leaves_nothing"
    )
    assert json.loads(case.figures["report"])["plugins_gone_s"] <= 2.0


def test_the_escape_probes_hold_in_the_guest(v2: Stage) -> None:
    escapes = {n: c for n, c in v2.cases.items() if n.startswith("tests.escapes.")}
    assert len(escapes) > 200, f"only {len(escapes)} escape probes ran in the guest"
    bad = {n: c.message[:500] for n, c in escapes.items() if c.outcome not in ("passed", "xfailed")}
    assert not bad, bad


def test_the_guest_suite_exited_cleanly(v2: Stage) -> None:
    failed = [n for n, c in v2.cases.items() if c.outcome in ("failed", "skipped")]
    assert failed == [] and v2.returncode == 0, (failed, v2.output[-4000:])


# -- the same image booted with systemd's legacy cgroup v1 layout --------------------------------

@pytest.fixture(scope="module")
def v1(tmp_path_factory: pytest.TempPathFactory) -> Stage:
    return run_stage("cgroup v1 guest (Debian 12, systemd's legacy layout)",
                     tmp_path_factory.mktemp("vm-v1"), "--v1", guest_tests="tests/vm/guest_v1.py")


V1 = "tests.vm.guest_v1::"


def test_the_v1_guest_has_systemds_v1_layout_and_doctor_says_v1(v1: Stage) -> None:
    case = v1.passed(V1 + "test_the_guest_has_the_systemd_v1_layout")
    assert '"version": 1' in case.figures["doctor_cgroups"]


def test_v1_memory_limit_oom_is_memory_limit_exceeded_with_the_peak(v1: Stage) -> None:
    case = v1.passed(V1 + "test_memory_limit_oom_is_reported_with_its_peak")
    assert int(case.figures["memory_peak_bytes"]) <= int(case.figures["memory_limit_bytes"])


def test_v1_a_quarter_cpu_is_at_most_0_3_cpu_seconds_per_second(v1: Stage) -> None:
    case = v1.passed(V1 + "test_cfs_quota_holds_a_spinning_plugin_to_a_quarter_cpu")
    assert float(case.figures["cpu_s_per_s"]) <= 0.3


def test_v1_pids_max_stops_a_fork_bomb(v1: Stage) -> None:
    v1.passed(V1 + "test_pids_max_stops_a_fork_bomb")


def test_v1_load_unload_cycles_leave_no_cgroup(v1: Stage) -> None:
    v1.passed(V1 + "test_load_unload_cycles_leave_no_cgroup")


def test_the_v1_guest_suite_exited_cleanly(v1: Stage) -> None:
    failed = [n for n, c in v1.cases.items() if c.outcome in ("failed", "skipped")]
    assert failed == [] and v1.returncode == 0, (failed, v1.output[-4000:])
