"""Escape probes by system call: the hostile plugin's C probe (hostile/probe.c) makes one raw
syscall by number per run, from inside the sandbox, and each must be blocked.

Blocked means what the issue says: EPERM, EACCES or ENOSYS, or the process killed by SIGSYS.
EINVAL, EFAULT, EBADF, ENOTTY and the like mean the call got past the filter and reached the
kernel's own code. Each case asserts the exact answer this sandbox gives (most: the filter's
default EPERM; clone3: ENOSYS, so that glibc falls back to clone; the i386 and x32 ABIs:
SIGSYS), and every probe is followed by the containment check of ``Fleet.probe()``.

The probe's arguments are chosen so that a call the filter let through would succeed or fail
with an errno only the kernel gives; ``test_the_probe_sees_the_kernel_when_a_call_is_allowed``
proves that with calls the filter does allow.
"""

from __future__ import annotations

import pytest

from .conftest import SIGSYS, Fleet, blocked

pytestmark = [pytest.mark.usefixtures("no_leaks"), pytest.mark.asyncio(loop_scope="module")]

EPERM = "errno=EPERM"
ENOSYS = "errno=ENOSYS"


def case(name: str, expected: str | int, arg: str = "", *, id: str | None = None,
         escape: str | None = None):  # type: ignore[no-untyped-def]
    marks = [pytest.mark.xfail(strict=True, reason=f"ESCAPE: {escape}")] if escape else []
    return pytest.param(name, arg, expected, id=id or name, marks=marks)


async def check(fleet: Fleet, name: str, arg: str, expected: str | int) -> None:
    result = await fleet.run(name, arg)
    assert blocked(result), f"{name} reached the kernel: {result}"
    if expected == SIGSYS:
        assert result["rc"] == SIGSYS, f"{name} was not killed by SIGSYS: {result}"
    else:
        assert (result["rc"], result["out"]) == (0, expected), result


MOUNTS = [
    case("mount-tmpfs", EPERM),
    case("mount-bind-root", EPERM, id="bind-mount-the-root"),
    case("mount-cgroup-v1", EPERM, id="mount-cgroup-v1-for-release-agent"),
    case("mount-cgroup2", EPERM),
    case("umount", EPERM, "/proc/keys", id="umount-the-mask-over-proc-keys"),
    case("umount", EPERM, "/proc/timer_list", id="umount-the-mask-over-proc-timer-list"),
    case("remount-rw", EPERM, "/usr", id="remount-read-only-usr-read-write"),
    case("mount-setattr-rw", EPERM, "/plugin", id="mount-setattr-clear-rdonly-on-plugin"),
    case("fsopen", EPERM),
    case("fsmount", EPERM),
    case("fspick", EPERM),
    case("open-tree", EPERM, id="open-tree-clone-usr"),
    case("move-mount", EPERM, id="move-mount-a-proc-mask-away"),
    case("pivot-root", EPERM),
    case("chroot", EPERM),
]


@pytest.mark.parametrize(("name", "arg", "expected"), MOUNTS)
async def test_mount_calls_are_denied(fleet: Fleet, name: str, arg: str, expected: str) -> None:
    await check(fleet, name, arg, expected)


NAMESPACES = [
    case("unshare-user", EPERM),
    case("unshare-mount", EPERM),
    case("unshare-net", EPERM),
    case("unshare-pid", EPERM),
    case("unshare-uts", EPERM),
    case("unshare-ipc", EPERM),
    case("unshare-cgroup", EPERM),
    case("unshare-time", EPERM),
    case("clone-newuser", EPERM),
    case("clone-newns", EPERM),
    case("clone-newnet", EPERM),
    case("clone-newpid", EPERM),
    case("clone-newuser-highbits", EPERM, id="clone-newuser-with-the-upper-32-bits-set"),
    # clone3 passes its flags in memory the filter cannot read: it must be ENOSYS, whatever
    # the flags, so that the C library falls back to clone, whose flags the filter sees.
    case("clone3", ENOSYS, id="clone3-plain-is-enosys"),
    case("clone3-newuser", ENOSYS, id="clone3-newuser-is-enosys"),
    case("setns", EPERM),
]


@pytest.mark.parametrize(("name", "arg", "expected"), NAMESPACES)
async def test_namespace_calls_are_denied(fleet: Fleet, name: str, arg: str,
                                          expected: str) -> None:
    await check(fleet, name, arg, expected)


OTHER_PROCESSES = [
    case("ptrace-traceme", EPERM),
    case("ptrace-attach-parent", EPERM, id="ptrace-attach-the-plugin-host"),
    case("process-vm-readv", EPERM),
    case("process-vm-writev", EPERM),
    case("kcmp", EPERM),
    case("pidfd-getfd", EPERM, id="pidfd-getfd-steal-the-rpc-socket"),
    case("process-madvise", EPERM),
]


@pytest.mark.parametrize(("name", "arg", "expected"), OTHER_PROCESSES)
async def test_access_to_other_processes_is_denied(fleet: Fleet, name: str, arg: str,
                                                   expected: str) -> None:
    await check(fleet, name, arg, expected)


KERNEL = [
    case("keyctl", EPERM),
    case("add-key", EPERM),
    case("request-key", EPERM),
    case("bpf", EPERM, id="bpf-map-create"),
    case("perf-event-open", EPERM, id="perf-event-open-own-cpu-clock"),
    case("init-module", EPERM),
    case("finit-module", EPERM),
    case("delete-module", EPERM),
    case("kexec-load", EPERM),
    case("kexec-file-load", EPERM),
    case("io-uring-setup", EPERM),
    case("io-uring-enter", EPERM),
    case("io-uring-register", EPERM),
    case("userfaultfd", EPERM, id="userfaultfd-user-mode-only"),
    case("open-by-handle-at", EPERM),
    case("name-to-handle-at", EPERM),
    case("fanotify-init", EPERM),
    case("syslog", EPERM),
    case("modify-ldt", EPERM, id="modify-ldt-read"),
    case("iopl", EPERM),
    case("ioperm", EPERM),
    case("set-mempolicy", EPERM),
    case("memfd-secret", EPERM),
    case("swapon", EPERM),
    case("acct", EPERM),
    case("vhangup", EPERM),
    case("quotactl", EPERM),
]


@pytest.mark.parametrize(("name", "arg", "expected"), KERNEL)
async def test_kernel_interfaces_are_denied(fleet: Fleet, name: str, arg: str,
                                            expected: str) -> None:
    await check(fleet, name, arg, expected)


ABIS = [
    case("personality-read-implies-exec", EPERM),
    case("personality-addr-no-randomize", EPERM),
    case("personality-linux32", EPERM),
    # The other ABIs' tables are where filters that only list x86_64 numbers leak: a call
    # through them must kill the process, whatever it asks for.
    case("x32-getpid", SIGSYS, id="x32-syscall-number-getpid"),
    case("x32-unshare", SIGSYS, id="x32-syscall-number-unshare"),
    case("i386-getpid", SIGSYS, id="int-0x80-getpid"),
    case("i386-unshare", SIGSYS, id="int-0x80-unshare"),
]


@pytest.mark.parametrize(("name", "arg", "expected"), ABIS)
async def test_personality_and_foreign_abis_are_refused(fleet: Fleet, name: str, arg: str,
                                                        expected: str | int) -> None:
    await check(fleet, name, arg, expected)


MACHINE = [
    case("reboot", EPERM),
    case("clock-settime", EPERM),
    case("settimeofday", EPERM),
    case("adjtimex", EPERM, id="adjtimex-read"),
    case("clock-adjtime", EPERM, id="clock-adjtime-read"),
    case("sethostname", EPERM),
    case("setdomainname", EPERM),
]


@pytest.mark.parametrize(("name", "arg", "expected"), MACHINE)
async def test_machine_wide_settings_are_denied(fleet: Fleet, name: str, arg: str,
                                                expected: str) -> None:
    await check(fleet, name, arg, expected)


SCHEDULING = [
    # A real-time or top-priority spinner would starve the host; a higher fd limit would
    # escape nofile. The kernel refuses these for want of a capability (or RLIMIT_RTPRIO and
    # RLIMIT_NICE of 0), which the sandbox dropped.
    case("sched-fifo", EPERM, id="sched-setscheduler-fifo"),
    case("nice-minus-20", "errno=EACCES", id="setpriority-nice-minus-20"),
    case("ioprio-realtime", EPERM, id="ioprio-set-realtime-class"),
    case("raise-nofile", EPERM, id="prlimit-raise-the-hard-nofile-limit"),
]


@pytest.mark.parametrize(("name", "arg", "expected"), SCHEDULING)
async def test_priority_and_limits_cannot_be_raised(fleet: Fleet, name: str, arg: str,
                                                    expected: str) -> None:
    await check(fleet, name, arg, expected)


DEVICES = [
    case("mknod-mem", EPERM, id="mknod-dev-mem"),
    case("mknodat-kmsg", EPERM, id="mknodat-dev-kmsg"),
    case("mknod-block", EPERM, id="mknod-the-host-disk"),
    # The kernel reads an ioctl request as 32 bits: TIOCSTI with garbage in the upper half
    # is still TIOCSTI, and must still be refused.
    case("tiocsti", EPERM),
    case("tiocsti-highbits", EPERM, id="tiocsti-with-the-upper-32-bits-set"),
    case("tioclinux", EPERM),
]


@pytest.mark.parametrize(("name", "arg", "expected"), DEVICES)
async def test_devices_and_terminal_injection_are_denied(fleet: Fleet, name: str, arg: str,
                                                         expected: str) -> None:
    await check(fleet, name, arg, expected)



IDENTITY = [
    case("setuid-0", EPERM),
    case("setresuid-0", EPERM),
    case("setgid-0", EPERM),
    case("setgroups", EPERM, id="setgroups-root"),
    case("setgroups-empty", EPERM),
    case("capset-all", EPERM, id="capset-raise-every-capability"),
]


@pytest.mark.parametrize(("name", "arg", "expected"), IDENTITY)
async def test_identity_changes_are_denied(fleet: Fleet, name: str, arg: str,
                                           expected: str) -> None:
    await check(fleet, name, arg, expected)


async def test_the_probe_sees_the_kernel_when_a_call_is_allowed(fleet: Fleet) -> None:
    """The control: calls the filter allows get the kernel's own answers, so the EPERMs
    above are the filter's (or a missing capability's), not the probe's."""
    plain = await fleet.run("clone-plain")
    assert plain["rc"] == 0 and plain["out"].startswith("ok ") and int(plain["out"][3:]) > 1
    assert await fleet.run("mknod-fifo") == {"rc": 0, "out": "ok 0", "err": ""}
    # an ordinary ioctl on /dev/null: ENOTTY from the tty layer, not EPERM from the filter
    assert await fleet.run("tiocgwinsz") == {"rc": 0, "out": "errno=ENOTTY", "err": ""}
    assert not blocked(await fleet.run("tiocgwinsz"))
