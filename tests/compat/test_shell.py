"""Shells and the ordinary tools of a shell script, outside and under ``sandboxer exec``.

Each test runs one script on both sides and compares exit status, stdout and stderr
(harness.same). The differences a test accepts are named in it; what the default profile
denies on purpose is asserted as docs/profiles.md promises it.
"""

from __future__ import annotations

import pytest

from .harness import HOSTNAME, run_inside, run_outside, same, sh, username

pytestmark = pytest.mark.timeout(120)

PIPELINES = r"""
set -u
echo "c b a b" | tr ' ' '\n' | sort | uniq -c | sort -k2
printf '%s\n' 3 1 2 | sort -n | paste -sd+ - | bc
x=$(echo sub | sed s/s/S/); echo "substituted: $x"
(cd /usr && pwd); echo "subshell kept cwd: $(pwd)"
cat <<EOF | wc -l
one
two
EOF
mkfifo fifo; (echo through a fifo > fifo &); cat fifo
seq 1 100 | xargs -P 4 -n 10 echo | wc -l
seq 1 5 | while read -r n; do printf '%s ' "$((n * n))"; done; echo
sleep 0.1 & sleep 0.1 & wait; echo "waited for two"
trap 'echo trapped USR1' USR1; kill -USR1 $$
find /usr/share/zoneinfo -maxdepth 1 -name 'UTC' | head -1
date -u -d @86400 +%F
printf 'x\ny\n' > f && cp f g && cmp f g && mv g h && ls
tar -cf a.tar f h && tar -tf a.tar && gzip -9 a.tar && gunzip -c a.tar.gz | tar -tf - | wc -l
sha256sum f | cut -c1-16
echo "$HOME $PATH $LANG"
umask; ulimit -c
false || echo "status of false: $?"
"""


def test_pipelines_redirections_and_job_control_match() -> None:
    same(["sh", "-c", PIPELINES])


BASH = r"""
set -euo pipefail
diff <(printf 'a\nb\n') <(printf 'a\nb\n') && echo "process substitution"
declare -A seen=([x]=1); seen[y]=2; echo "assoc: ${!seen[*]}" | tr ' ' '\n' | sort | xargs
coproc upper { tr a-z A-Z; }; echo "to a coprocess" >&"${upper[1]}"; exec {upper[1]}>&-
read -r line <&"${upper[0]}"; echo "$line"; wait
printf -v padded '%05d' 42; echo "$padded"
exec 3>out.txt; echo "to fd 3" >&3; exec 3>&-; cat out.txt
echo "here string" | { read -r a b; echo "$b $a"; }
arr=( $(seq 3) ); echo "${#arr[@]} ${arr[-1]}"
echo "\$BASH_VERSION is set: ${BASH_VERSION:+yes}"
"""


def test_bash_features_match() -> None:
    same(["bash", "-c", BASH])


@pytest.mark.parametrize(("script", "status"), [
    pytest.param("exit 3", 3, id="exit-3"),
    pytest.param("echo out; echo err >&2; exit 7", 7, id="output-and-exit-7"),
    pytest.param("kill -TERM $$", 128 + 15, id="killed-by-sigterm"),
    pytest.param("kill -KILL $$", 128 + 9, id="killed-by-sigkill"),
    pytest.param("kill -SEGV $$", 128 + 11, id="killed-by-sigsegv"),
    pytest.param("timeout 0.2 sleep 5", 124, id="timeout-exits-124"),
    pytest.param("sh -c 'kill -INT $$'; echo inner $?", 0, id="child-killed-by-sigint"),
])
def test_exit_statuses_match(script: str, status: int) -> None:
    outside, _ = same(sh(script))
    assert outside.status == status


def test_what_is_piped_in_reaches_the_program() -> None:
    """``producer | sandboxer exec -- filter``: the program reads the pipe as its stdin."""
    outside, _ = same(sh("tr a-z A-Z; wc -l < /dev/stdin; echo done"),
                      stdin=b"piped in\nsecond line\n")
    assert outside.stdout == "PIPED IN\nSECOND LINE\n0\ndone\n"


def test_dev_stdout_and_dev_stderr_open() -> None:
    """``echo oops > /dev/stderr``, ``tee /dev/stderr``, ``open("/dev/stdout")``: a program
    reopens its own output by name (through /proc/self/fd)."""
    outside, _ = same(sh("echo out > /dev/stdout; echo err > /dev/stderr; "
                         "echo both | tee /dev/stderr; "
                         "python3 -c 'open(\"/dev/stdout\", \"w\").write(\"python\\n\")'"))
    assert (outside.stdout, outside.stderr) == ("out\nboth\npython\n", "err\nboth\n")


def test_the_program_gets_the_argv0_it_was_given() -> None:
    """``sandboxer exec -- cat x``: cat's argv[0] is "cat", as a shell gives it; programs
    name themselves by it in messages, and multi-call programs dispatch on it."""
    same(["cat", "/nonexistent"])
    same(["sh", "-c", "ps -o args= -p $$"])


def test_identity_matches_but_for_the_named_differences() -> None:
    """uid and gid are the same number (1000) on both sides; the names differ."""
    same(sh("id; id -un; whoami; hostname; uname -n; echo ~"),
         tolerated=[HOSTNAME, username()])


def test_a_writer_whose_reader_stopped_dies_of_sigpipe() -> None:
    """``yes | head -1``: when head exits, yes is killed by SIGPIPE (status 141, no
    message), as in every shell. A program that finds SIGPIPE ignored instead gets EPIPE,
    prints "Broken pipe" and exits 1."""
    outside, _ = same(["bash", "-c", "set -o pipefail; yes | head -n1; "
                       "echo \"statuses: ${PIPESTATUS[*]}\""])
    assert outside.stdout == "y\nstatuses: 141 0\n"


def test_signal_dispositions_start_at_their_default() -> None:
    """A program starts with the dispositions its caller gave it: here, all default (the
    harness starts both sides so). Signals 32 and 33 are glibc's own (SIGCANCEL,
    SIGSETXID): its posix_spawn sets them ignored in the child, and a program started that
    way inherits that outside too; glibc installs its handlers for them where it uses them.
    So this compares the 31 standard signals."""
    outside, _ = same(sh("for k in SigIgn SigBlk; do "
                         "v=$(awk -v k=$k: '$1 == k { print $2 }' /proc/$$/status); "
                         "echo \"$k $((0x$v & 0x7fffffff))\"; done"))
    assert outside.stdout == "SigIgn 0\nSigBlk 0\n"


def test_only_stdin_stdout_and_stderr_are_open() -> None:
    """A program starts with the fds its caller gave it: 0, 1 and 2 here."""
    outside, _ = same(sh("for fd in 3 4 5 6 7 8 9 10; do "
                         "[ -e /proc/self/fd/$fd ] && echo \"fd $fd: $(readlink /proc/$$/fd/$fd)\";"
                         " done; echo checked"))
    assert outside.stdout == "checked\n"


def test_dev_tty_without_a_controlling_terminal() -> None:
    """Without a controlling terminal (a session of its own, both sides) /dev/tty is still
    there and opening it fails with ENXIO; /dev itself is not the program's to write in."""
    same(sh("echo hi > /dev/tty; echo status $?; touch /dev/made-up; echo status $?; "
            "ls /dev/made-up 2>&1; test -c /dev/tty && echo /dev/tty is a character device"))


def test_pseudo_terminals_open() -> None:
    """openpty(3), pty.spawn and script(1): a program may make its own pseudo-terminal
    (expect, test suites of terminal programs, asyncio's pty tests)."""
    same(sh("python3 -c 'import os; m, s = os.openpty(); "
            "print(os.isatty(s), os.ttyname(s).startswith(\"/dev/pts/\"))'; "
            "script -qec 'echo in a pty; tty | sed s/[0-9]*$//' /dev/null | tr -d '\\r'"))


def test_chown_to_another_user_fails_as_outside() -> None:
    """Giving a file away is EPERM for an ordinary user: the message a user sees is
    "Operation not permitted", whichever user (root, nobody) it names."""
    same(sh("touch f; chown 0 f; chown nobody f; chgrp 0 f; chown 1000:1000 f && echo kept"))


def test_public_system_files_read_as_outside() -> None:
    """World-readable files of /etc that ordinary programs read: os-release and
    debian_version (distribution detection in build tools and installers), timezone, shells
    (getusershell(3)), manpath.config (man(1) refuses to run without it)."""
    same(sh("cat /etc/os-release /etc/debian_version /etc/timezone >/dev/null && "
            "echo readable; grep -c '^/' /etc/shells >/dev/null && echo shells; man -w ls"))


def test_sysfs_reads_as_outside() -> None:
    """/sys: which CPUs are online (glibc's get_nprocs reads it first), lscpu."""
    same(sh("cat /sys/devices/system/cpu/online; lscpu >/dev/null && echo lscpu"))


SET_ID = ("touch f; chmod u+s f && echo 'chmod u+s: done'; mkdir -m 2775 d && echo "
          "'mkdir -m 2775: done'; chmod 755 f && echo 'chmod 755: done'; mkfifo p && echo "
          "'mkfifo: done'")


def test_set_id_modes_are_denied_on_purpose() -> None:
    """docs/profiles.md, default, **no-set-id-modes**: chmod u+s and mkdir -m 2775 are
    EPERM inside; outside an ordinary user may set them on their own files. Everything
    else the script does matches."""
    outside = run_outside(sh(SET_ID))
    inside = run_inside(sh(SET_ID))
    assert (outside.status, outside.stdout, outside.stderr) == (
        0, "chmod u+s: done\nmkdir -m 2775: done\nchmod 755: done\nmkfifo: done\n", "")
    assert (inside.status, inside.stdout) == (0, "chmod 755: done\nmkfifo: done\n")
    # mkdir(2) takes no set-id bit: coreutils makes the directory, then chmods it
    assert inside.stderr == ("chmod: changing permissions of 'f': Operation not permitted\n"
                             "mkdir: cannot change permissions of \u2018d\u2019: Operation not "
                             "permitted\n")
    # and sandboxer says, after the program, what its filter refused (issue 23)
    assert inside.denied.startswith("sandboxer: denied: ")
    assert "fchmodat \u00d71" in inside.denied and "fchmod \u00d71" in inside.denied
