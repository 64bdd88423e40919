"""Compiled seccomp programs on disk (sandboxer/sandbox/seccomp_cache.py).

A program from the cache must be exactly what ``compile_filter`` makes for the same inputs,
another process must find it without loading libseccomp's compiler, and an entry that anyone
but the owner could have written, or that does not say what it holds, is never used: each
case below plants a different, valid program (the strict profile's) behind one defect, and
the default profile's own program must come back all the same.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import REPO
from sandboxer.sandbox import seccomp_cache
from sandboxer.sandbox.profiles import builtin_dir
from sandboxer.sandbox.seccomp import compile_filter

pytestmark = pytest.mark.usefixtures("no_leaks")

NOBODY = 65534


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty cache directory of this test's own, and no program remembered in-process."""
    where = tmp_path / "sandboxer" / "seccomp"
    monkeypatch.setattr(seccomp_cache, "_directory", lambda: str(where))
    monkeypatch.setattr(seccomp_cache, "_memo", {})
    yield where


def entries(where: Path) -> list[Path]:
    return sorted(where.glob("*.bpf"))


def test_a_stored_program_is_the_compiled_one(cache: Path) -> None:
    program = seccomp_cache.filter_for("default", network=False)
    assert program == compile_filter("default", network=False, mode="explain")
    [entry] = entries(cache)
    assert entry.stat().st_mode & 0o777 == 0o600 and cache.stat().st_mode & 0o777 == 0o700
    assert entry.read_bytes().endswith(program)
    assert seccomp_cache.filter_for("default", network=False) is program  # remembered


FIND_AGAIN = """\
import hashlib, json, sys
from sandboxer.sandbox import seccomp_cache
seccomp_cache._directory = lambda: {where!r}
program = seccomp_cache.filter_for("default", network=False)
print(json.dumps({{"sha256": hashlib.sha256(program).hexdigest(),
                  "compiler loaded": "pyseccomp" in sys.modules}}))
"""


def test_another_process_finds_it_without_the_compiler(cache: Path) -> None:
    import hashlib

    program = seccomp_cache.filter_for("default", network=False)
    ran = subprocess.run([sys.executable, "-c", FIND_AGAIN.format(where=str(cache))],
                         capture_output=True, text=True, timeout=60, cwd=REPO, check=True)
    assert json.loads(ran.stdout) == {"sha256": hashlib.sha256(program).hexdigest(),
                                      "compiler loaded": False}


def test_the_network_flag_and_the_profile_content_are_in_the_key(cache: Path,
                                                                 tmp_path: Path) -> None:
    without = seccomp_cache.filter_for("default", network=False)
    with_network = seccomp_cache.filter_for("default", network=True)
    assert with_network == compile_filter("default", network=True, mode="explain")
    assert len(entries(cache)) == 2  # (default's network group is among its groups anyway)
    mine = tmp_path / "profiles"
    mine.mkdir()
    profile = mine / "mine.toml"
    profile.write_text((builtin_dir() / "default.toml").read_text())
    copied = seccomp_cache.filter_for("mine", network=False, extra_dirs=(str(mine),))
    assert copied == without and len(entries(cache)) == 2  # the same content, the same entry
    # The same modification time, other content: the key is the content, not the mtime.
    stat = profile.stat()
    profile.write_text(profile.read_text().replace('"memfd", "inet",', '"inet",', 1))
    os.utime(profile, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed = seccomp_cache.filter_for("mine", network=False, extra_dirs=(str(mine),))
    assert changed != without and len(entries(cache)) == 3
    assert changed == compile_filter("mine", network=False, extra_dirs=(str(mine),), mode="explain")


def _forge(where: Path) -> tuple[Path, bytes, bytes]:
    """The default profile's entry, then the strict profile's program written in its place
    as a well-formed entry: (the entry's path, the real program, the forged one)."""
    real = seccomp_cache.filter_for("default", network=False)
    [entry] = entries(where)
    key = entry.name.removesuffix(".bpf")
    forged = compile_filter("strict", network=False, mode="explain")
    assert forged != real
    entry.write_bytes(seccomp_cache._entry(key, forged))
    seccomp_cache._memo.clear()
    return entry, real, forged


def _mode(mode: int) -> Callable[[Path, Path], None]:
    return lambda entry, where: entry.chmod(mode)


def _others_file(entry: Path, where: Path) -> None:
    os.chown(entry, NOBODY, NOBODY)


def _open_directory(entry: Path, where: Path) -> None:
    where.chmod(0o777)


def _others_directory(entry: Path, where: Path) -> None:
    os.chown(where, NOBODY, NOBODY)


def _a_link(entry: Path, where: Path) -> None:
    elsewhere = where.parent / "elsewhere.bpf"
    entry.rename(elsewhere)
    entry.symlink_to(elsewhere)


def _program_changed(entry: Path, where: Path) -> None:
    data = bytearray(entry.read_bytes())
    data[-8] ^= 0xFF  # the last instruction: the header's SHA-256 no longer matches
    entry.write_bytes(bytes(data))


def _another_key(entry: Path, where: Path) -> None:
    data = entry.read_bytes()
    header, _, program = data.partition(b"\n")
    entry.write_bytes(seccomp_cache._entry("0" * 64, program))


def _truncated(entry: Path, where: Path) -> None:
    data = entry.read_bytes()
    entry.write_bytes(data[:-4])


@pytest.mark.parametrize("defect", [
    pytest.param(_mode(0o622), id="group-and-others-may-write-the-entry"),
    pytest.param(_others_file, id="the-entry-is-someone-elses"),
    pytest.param(_open_directory, id="anyone-may-write-the-directory"),
    pytest.param(_others_directory, id="the-directory-is-someone-elses"),
    pytest.param(_a_link, id="the-entry-is-a-symbolic-link"),
    pytest.param(_program_changed, id="the-program-is-not-the-one-its-header-names"),
    pytest.param(_another_key, id="the-header-names-another-key"),
    pytest.param(_truncated, id="a-truncated-entry"),
])
def test_an_entry_that_is_not_beyond_doubt_is_never_used(
        cache: Path, defect: Callable[[Path, Path], None]) -> None:
    entry, real, forged = _forge(cache)
    defect(entry, cache)
    assert seccomp_cache.filter_for("default", network=False) == real


def test_a_well_formed_entry_of_the_owner_is_used(cache: Path) -> None:
    """The control for the cases above: the forged entry without a defect is taken (the
    owner, root, is trusted with the filter), so each refusal above is the defect's."""
    entry, real, forged = _forge(cache)
    assert seccomp_cache.filter_for("default", network=False) == forged


def test_without_a_usable_directory_every_call_compiles(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    monkeypatch.setattr(seccomp_cache, "_directory", lambda: str(blocked / "seccomp"))
    monkeypatch.setattr(seccomp_cache, "_memo", {})
    assert seccomp_cache.filter_for("default", network=False) == \
        compile_filter("default", network=False, mode="explain")
    monkeypatch.setattr(seccomp_cache, "_directory", lambda: None)  # rootless, no XDG dir
    assert seccomp_cache.filter_for("strict", network=False) == \
        compile_filter("strict", network=False, mode="explain")


def test_errors_are_the_compilers(cache: Path) -> None:
    """An unknown profile, or network from a profile without it: compile_filter's errors,
    and nothing stored."""
    from sandboxer.errors import PluginLoadError

    with pytest.raises(PluginLoadError, match="no sandbox profile named 'nope'"):
        seccomp_cache.filter_for("nope", network=False)
    with pytest.raises(PluginLoadError, match="never allows network"):
        seccomp_cache.filter_for("strict", network=True)
    assert entries(cache) == []


def test_old_entries_are_pruned(cache: Path) -> None:
    cache.mkdir(parents=True, mode=0o700)
    for i in range(seccomp_cache._MAX_ENTRIES + 5):
        old = cache / f"{i:064x}.bpf"
        old.write_bytes(b"")
        os.utime(old, ns=(0, i))
    program = seccomp_cache.filter_for("default", network=False)
    kept = entries(cache)
    assert len(kept) == seccomp_cache._MAX_ENTRIES
    assert any(p.read_bytes().endswith(program) for p in kept)
    assert not (cache / f"{0:064x}.bpf").exists()


def test_the_launcher_runs_with_a_program_from_the_cache(cache: Path) -> None:
    """End to end: `sandboxer exec` twice; the second finds the program on disk."""
    env = {**os.environ, "XDG_RUNTIME_DIR": ""}
    script = textwrap.dedent(f"""\
        import sys
        from sandboxer.sandbox import seccomp_cache
        seccomp_cache._directory = lambda: {str(cache)!r}
        from sandboxer.cli import main
        code = main(["exec", "--", "/bin/sh", "-c", "echo inside"])
        print("compiler loaded" if "pyseccomp" in sys.modules else "from the cache")
        sys.exit(code)
        """)
    outputs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=60, cwd=REPO, env=env, stdin=subprocess.DEVNULL)
               for _ in range(2)]
    assert [(r.returncode, r.stdout) for r in outputs] == [
        (0, "inside\ncompiler loaded\n"), (0, "inside\nfrom the cache\n")]


def test_the_mode_is_part_of_the_key(cache: Path) -> None:
    """The explaining filter (denials to the supervisor) and the plain one are different
    programs: one profile's two never share an entry."""
    explain = seccomp_cache.filter_for("default", network=False)
    learn = seccomp_cache.filter_for("default", network=False, learn=True)
    assert explain == compile_filter("default", network=False, mode="explain")
    assert learn == compile_filter("default", network=False, mode="learn")
    assert explain != compile_filter("default", network=False, mode="plain") != learn
    assert len(entries(cache)) == 2
