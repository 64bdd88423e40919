"""Modules of CPython's own test suite (libpython3.11-testsuite), outside and under
``sandboxer exec``, compared test case by test case.

Each module runs as ``python3 -m test -v NAME...`` on both sides; the verbose output gives
each test case's verdict (``test_x (module.Class.test_x) ... ok|FAIL|ERROR|skipped
'reason'|expected failure|unexpected success``; the FAIL:/ERROR: headers of the report
also count, for subtests and class fixtures). The verdicts must be the same test by test,
except where ``DENIED`` names the test, the verdict the sandbox gives it, and the
docs/profiles.md promise that makes the difference deliberate.

Every run of the module starts at once (``WORKERS`` at a time, longest first): most of
these modules sleep more than they compute. A test case whose verdicts differ is run again
by itself on both sides, one after the other, before it counts: timing tests (itimers,
timeouts) may flake under load on either side, a sandbox difference does not go away. A
rerun that agrees is reported as a warning.
"""

from __future__ import annotations

import concurrent.futures
import re
import warnings
from dataclasses import dataclass

import pytest

from .harness import Ran, nothing_left, run_inside, run_outside

pytestmark = pytest.mark.timeout(900)

# name -> the regrtest names it runs, in the order they start (the longest first).
# test_asyncio as a whole takes a minute a side: its modules that exercise the kernel
# (event loops, subprocesses, unix events, sockets, streams) stand for it.
MODULES: dict[str, tuple[str, ...]] = {
    "test_multiprocessing_spawn": ("test_multiprocessing_spawn",),
    "test_signal": ("test_signal",),
    "test_socket": ("test_socket",),
    "test_subprocess": ("test_subprocess",),
    "test_asyncio": ("test.test_asyncio.test_events", "test.test_asyncio.test_subprocess",
                     "test.test_asyncio.test_unix_events",
                     "test.test_asyncio.test_sock_lowlevel",
                     "test.test_asyncio.test_base_events", "test.test_asyncio.test_streams"),
    "test_logging": ("test_logging",),
    "test_selectors": ("test_selectors",),
    "test_venv": ("test_venv",),
    "test_threading": ("test_threading",),
    "test_largefile": ("test_largefile",),
    "test_eintr": ("test_eintr",),
    "test_threadsignals": ("test_threadsignals",),
    "test_zipfile": ("test_zipfile",),
    "test_tarfile": ("test_tarfile",),
    "test_time": ("test_time",),
    "test_httpservers": ("test_httpservers",),
    "test_urllib2_localnet": ("test_urllib2_localnet",),
    "test_file_eintr": ("test_file_eintr",),
    "test_select": ("test_select",),
    "test_support": ("test_support",),
    "test_os": ("test_os",),
    "test_posix": ("test_posix",),
    "test_pathlib": ("test_pathlib",),
    "test_shutil": ("test_shutil",),
    "test_tempfile": ("test_tempfile",),
    "test_mmap": ("test_mmap",),
    "test_fcntl": ("test_fcntl",),
    "test_pty": ("test_pty",),
    "test_resource": ("test_resource",),
    "test_epoll": ("test_epoll",),
    "test_fileio": ("test_fileio",),
    "test_getpass": ("test_getpass",),
    "test_platform": ("test_platform",),
    "test_site": ("test_site",),
    "test_zoneinfo": ("test_zoneinfo",),
    "test_pwd": ("test_pwd",),
    "test_grp": ("test_grp",),
}
# The part of a module that runs (regrtest --match patterns): test_multiprocessing_spawn
# whole is 80 s a side; its classes with real processes (not threads, not a manager's
# proxies of the same tests) and the module-level ones are a third of that.
SUBSET: dict[str, tuple[str, ...]] = {
    "test_multiprocessing_spawn": (
        "*WithProcesses*", "*TestSyncManagerTypes*", "*TestResourceTracker*",
        "*TestStartMethod*", "*TestWait*", "*TestSimpleQueue*",
        "*TestStdinBadfiledescriptor*", "*MiscTestCase*"),
}
WORKERS = 4
RUN_TIMEOUT = 300.0


@dataclass(frozen=True)
class Denied:
    """Test cases (``tests``, a regex on the id) whose verdict inside is ``inside`` (a
    regex), because the default profile denies something on purpose: ``promise`` names
    where docs/profiles.md says so."""

    tests: str
    inside: str
    promise: str
    why: str

    def covers(self, test: str, verdict: str) -> bool:
        return re.fullmatch(self.tests, test) is not None and \
            re.fullmatch(self.inside, verdict) is not None


DENIED = [
    Denied(r"test\.test_os\.MakedirTests\.test_exist_ok_s_isgid_directory",
           r"skipped 'Cannot set S_ISGID for dir\.'", "default/no-set-id-modes",
           "mkdir with S_ISGID, then chmod g+s: EPERM, and the test skips"),
    Denied(r"test\.test_mmap\.LargeMmapTests\.test_(around_4GB|large_filesize|large_offset)",
           r"skipped 'filesystem does not have largefile support'",
           "default/file-limits",
           "the test makes a sparse file past 4 GiB: RLIMIT_FSIZE refuses it (EFBIG), and "
           "the test takes that for a filesystem without large files"),
    Denied(r"test\.test_resource\.ResourceTest\.test_fsize_ismax", "FAIL",
           "default/file-limits",
           "the test asserts RLIMIT_FSIZE is unlimited; the sandbox's is 4 GiB"),
    Denied(r"test\.test_venv\.BasicTest\.test_zippath_from_non_installed_posix", "ERROR",
           "default/file-limits",
           "the test copies the standard library into /tmp: ENOSPC in the profile's 64 MiB"),
    Denied(r"test\.test_largefile\.(TestCopyfile|TestSocketSendfile)\.test_it",
           r"skipped 'required \d+ MiB of free disk space'", "default/file-limits",
           "the test wants 6 GB free in its working directory, /tmp: 64 MiB there"),
    Denied(r"test\.test_support\.TestSupport\.test_forget", "ERROR",
           "default/read-only-system",
           "import_helper.forget unlinks a .pyc that does not exist beside the standard "
           "library: ENOENT outside (ignored), EROFS on the read-only /usr"),
    Denied(r"test\.test_subprocess\.ProcessTestCase(NoPoll)?\.test_no_leaking", "ok",
           "default/file-limits",
           "the test opens fds until it reaches RLIMIT_NOFILE or 1026: inside it reaches "
           "the profile's 1024; outside, on a host whose limit is higher, it skips"),
    Denied(r"test\.test_socket\.\w*UDPLITE\w*\.\w+", "ERROR",
           "default/loopback-only-without-network", "UDP-Lite sockets are EPERM"),
    Denied(r"test\.test_socket\.\w*SCTP\w*\.\w+",
           r"skipped \"can't create socket\(AF_INET, SOCK_STREAM, IPPROTO_SCTP\): "
           r"\[Errno 1\] Operation not permitted\"",
           "default/loopback-only-without-network",
           "SCTP sockets are EPERM (outside they may be EPROTONOSUPPORT, a skip too)"),
    Denied(r"test\.test_socket\.GeneralModuleTests\.(testInterfaceNameIndex|"
           r"test_getaddrinfo_ipv6_scopeid_symbolic|test_getnameinfo_ipv6_scopeid_symbolic)",
           "ERROR", "default/unix-and-inet-sockets-only",
           "if_nameindex(3) asks the kernel over a netlink socket, which is EPERM"),
]

# Verdict texts that name a pid (os_helper.TESTFN is "@test_<pid>_tmp"): the sandbox has
# a pid namespace of its own, so its pids are small; the text around them must match.
PIDS = (re.compile(r"@test_\d+_tmp"), "@test_<pid>_tmp")

VERDICT = re.compile(r"ok|FAIL|ERROR|skipped .*|expected failure|unexpected success")
HEADER = re.compile(r"(\w+) \(([\w.]+)\)(?: \.\.\. (.*))?")
REPORT = re.compile(r"(FAIL|ERROR): (\w+) \(([\w.]+)\)")
FAILURES = ("FAIL", "ERROR", "unexpected success")


def verdicts(output: str) -> dict[str, str]:
    """``{test id: verdict}`` from ``python -m test -v`` output."""
    lines = output.splitlines()
    found: dict[str, str] = {}
    for i, line in enumerate(lines):
        if header := HEADER.fullmatch(line):
            test, rest = header.group(2), header.group(3)
            j = i
            if rest is None and i + 1 < len(lines) and " ... " in lines[i + 1]:
                j, rest = i + 1, lines[i + 1].split(" ... ", 1)[1]  # a docstring line
            if rest is not None:
                # what the test itself prints may come between "... " and the verdict
                while not VERDICT.fullmatch(rest) and j + 1 < min(len(lines), i + 50):
                    j += 1
                    rest = lines[j]
                found[test] = PIDS[0].sub(PIDS[1], rest) if VERDICT.fullmatch(rest) \
                    else "(no verdict found)"
        elif report := REPORT.match(line):
            kind, name, where = report.groups()
            found[where if where.endswith(f".{name}") else f"{where}.{name}"] = kind
    return found


def _command(module: str, tests: tuple[str, ...] = ()) -> list[str]:
    """The module's run, or (``tests``) a run of those test cases alone."""
    return ["python3", "-m", "test", "-v", *MODULES[module],
            *(f"--match={t}" for t in tests or SUBSET.get(module, ()))]


@dataclass(frozen=True)
class Compared:
    outside: Ran
    inside: Ran
    denied: dict[str, tuple[str, str, Denied]]  # test -> (outside, inside, why)
    differ: dict[str, tuple[str, str]]  # test -> (outside, inside): not explained


def compare(outside: Ran, inside: Ran) -> Compared:
    out, ins = verdicts(outside.stdout), verdicts(inside.stdout)
    denied, differ = {}, {}
    for test in sorted(set(out) | set(ins)):
        a, b = out.get(test, "(not run)"), ins.get(test, "(not run)")
        if a == b:
            continue
        reason = next((d for d in DENIED if d.covers(test, b)), None)
        if reason is not None:
            denied[test] = (a, b, reason)
        else:
            differ[test] = (a, b)
    return Compared(outside, inside, denied, differ)


def _run(where: str, module: str) -> Ran:
    run = run_outside if where == "outside" else run_inside
    return run(_command(module), timeout=RUN_TIMEOUT)


@pytest.fixture(scope="module")
def suite_runs(request: pytest.FixtureRequest) -> dict[str, tuple[Ran, Ran]]:
    """Every selected module (``-k test_pty`` runs one), outside and inside, WORKERS runs
    at a time, in MODULES' order: the longest first."""
    selected = {item.callspec.params["module"] for item in request.session.items
                if item.path == request.path and hasattr(item, "callspec")}
    names = [name for name in MODULES if name in selected]
    with nothing_left(), concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = {(name, where): pool.submit(_run, where, name)
                   for name in names for where in ("outside", "inside")}
        return {name: (futures[name, "outside"].result(), futures[name, "inside"].result())
                for name in names}


@pytest.mark.parametrize("module", list(MODULES))
def test_the_module_gives_the_same_verdicts(module: str,
                                            suite_runs: dict[str, tuple[Ran, Ran]]) -> None:
    outside, inside = suite_runs[module]
    ran = verdicts(outside.stdout)
    assert len(ran) > 0 and "Tests result:" in outside.stdout, \
        f"{module} ran nothing outside:\n{outside.stdout[-2000:]}\n{outside.stderr[-2000:]}"
    compared = compare(outside, inside)
    if compared.differ:  # once more, those tests alone, one side after the other
        tests = tuple(compared.differ)
        again = compare(run_outside(_command(module, tests), timeout=RUN_TIMEOUT),
                        run_inside(_command(module, tests), timeout=RUN_TIMEOUT))
        flaked = {t: v for t, v in compared.differ.items() if t not in again.differ}
        if flaked:
            warnings.warn(f"{module}: verdicts that differed once and agreed when run "
                          f"again (load?): {flaked}", stacklevel=1)
        compared = Compared(outside, inside, compared.denied,
                            {t: v for t, v in compared.differ.items() if t in again.differ})
    if compared.differ:
        report = "\n".join(f"  {t}\n    outside: {a}\n    inside:  {b}"
                           for t, (a, b) in compared.differ.items())
        pytest.fail(f"{module}: {len(compared.differ)} of {len(ran)} test cases differ under "
                    f"sandboxer exec (and again when run alone):\n{report}", pytrace=False)
    failing = any(b in FAILURES or a in FAILURES for a, b, _ in compared.denied.values())
    if not failing:
        assert inside.status == outside.status, \
            f"{module}: exit status {outside.status} outside, {inside.status} inside\n" \
            f"{inside.stdout[-3000:]}\n{inside.stderr[-3000:]}"


def test_the_denied_list_names_promises_the_doc_makes() -> None:
    """Every deliberate difference above cites a promise docs/profiles.md lists, which
    tests/sandbox/test_profiles.py therefore checks."""
    from sandbox.test_profiles import PROMISES

    assert {d.promise for d in DENIED} <= set(PROMISES), PROMISES
