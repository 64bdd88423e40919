"""Escape probes against races from outside the policy (issue 16, points 3 and 4): while a
plugin is being loaded, an unprivileged user who owns a directory on the way swaps a name
the supervisor resolves for a symlink out of it.

3. A grant beneath a path root. The attacker owns ``ROOT/attacker``; the plugin is granted
   ``ROOT/attacker/data``. ``data`` trades places with ``data-link``, a symlink to a
   root-only directory (or to /etc), with ``renameat2(RENAME_EXCHANGE)``. Whatever the
   timing, the plugin must see the granted directory at the grant's path, or the load must
   fail. Through ``PluginManager`` (the manifest's ``allowed_paths``, checked against the
   host's ``path_roots``) and through ``sandbox.program.run`` (an explicit grant, as
   ``sandboxer exec --allow-path`` makes).
4. The copy of the plugin directory into /plugin. The attacker owns the plugin directory;
   ``sub`` trades places with ``sub-link``, a symlink to a root-only directory. Whatever
   the timing, nothing of that directory may reach /plugin.

The attacker is ``races/swapper.c``: started as root, it holds the directory open, becomes
the attacker's uid for good (a uid no one else on this host uses) and swaps as fast as it
can until it is stopped; it prints how many swaps it made. The plugin is
``races/survey.py``: an external plugin in plain Python (about 50 ms a load here) that walks
a path without following links and reports every entry's device and inode, mode, names,
first bytes or link text, or errno. The tests judge what it saw.

Each test loads (or runs) many times with the swapper running and classifies every load:
- **failed cleanly**: the load raised a ``PluginLoadError`` (``SandboxUnavailable`` and the
  launcher's ``SandboxSetupError`` are ones); counted by error type and message, printed;
- **leaked**: the plugin saw something outside what it was given (a host object at the
  grant's path, a secret's text, a host directory's names); the test fails and names the
  load, the path inside and the host file or directory it was;
- **wrong**: the load succeeded but the grant was not there (grant tests only); the test
  fails, since a successful load must have what it was granted;
- **clean**: it saw exactly what it was given. At least one load must be clean, or the
  test did not exercise the path it is about.

The root-only secret directory is mode 0700, so a plugin shown it cannot list it with its
own unprivileged uid: the escape then shows as the grant's device and inode being the
secret directory's (and its mode 0700), which is what is checked. The /etc variant shows
the content leaking too. The plugin directory is copied by the launcher with the host
identity, so there the secret's text itself reaches /plugin.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import stat
import subprocess
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from conftest import EXAMPLES
from sandboxer import (HostConfig, PathGrant, PluginLoadError, PluginManager, PluginState,
                       SandboxConfig, SandboxerError)
from sandboxer.sandbox import cgroups, program
from sandboxer.sandbox.seccomp import compile_filter

from .conftest import Canaries, unique_marker

pytestmark = [pytest.mark.usefixtures("no_leaks"), pytest.mark.asyncio(loop_scope="module")]

RACES = Path(__file__).resolve().parent / "races"
SURVEY = RACES / "survey.py"
# The attacker: a uid (and gid) of its own, no process or file of anyone else's.
ATTACKER = 1_750_000 + os.getpid() % 10_000
# Loads per test (about 55 ms each here when they succeed). On the unfixed code 5-40 % of
# them leak, so a few dozen would show it; these many are for the fix: a window left open
# one load in a hundred still shows (87 %). A test stops early when its loads have taken
# LOOP_BUDGET seconds (never on this host: 200 take 4-11 s), so that the VM stage's TCG
# guest, 12-15 times slower, runs fewer instead of blowing its time budget.
GRANT_LOADS = 200
EXEC_RUNS = 200
COPY_LOADS = 200
LOOP_BUDGET = 20.0
# program.run's sandbox setup timeout: the guest's start-ups need more than the default (the
# managers get theirs from tests/vm/guest_timeouts.py there); a healthy setup takes 50 ms.
RUN_SETUP_TIMEOUT = 60.0
GRANTED_NAME = "granted.txt"
GRANTED_TEXT = "the granted directory's own file: the plugin may read this\n"
# The root-only directory's files, and the attacker's decoys of the same names (see
# test_the_plugin_directory_copy_never_follows_a_swapped_link).
# A dozen: each open in the copy's walk is a chance to land on the secret, and a longer walk
# keeps the window open while the swapper is off the CPU on a busy host.
SECRET_NAMES = ("api.key", "credentials", "db.password", "gshadow", "id_ed25519", "id_rsa",
                "master.key", "session.secret", "shadow", "token.txt", "vault-token",
                "wallet.dat")
MANIFEST = """\
[plugin]
id = "race.survey"
version = "1.0.0"
type = "external"
entrypoint = "survey.py"
"""


# -- the attacker ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def swapper_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    program = tmp_path_factory.mktemp("swapper") / "swapper"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(program),
                    str(RACES / "swapper.c")], check=True, timeout=120)
    return program


@dataclass
class Swapper:
    """One swapper's run: how many swaps it made (known once it is stopped)."""

    directory: Path
    names: tuple[str, str]
    swaps: int = 0

    def __str__(self) -> str:
        a, b = self.names
        return f"{self.swaps} swaps of {a} and {b} as uid {ATTACKER}"


def _exchange(directory: Path, a: str, b: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.renameat2(-100, str(directory / a).encode(), -100, str(directory / b).encode(),
                      2) != 0:  # AT_FDCWD, RENAME_EXCHANGE
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(directory / a))


@contextlib.contextmanager
def swapping(program: Path, directory: Path, a: str, b: str) -> Iterator[Swapper]:
    """Run the swapper on ``directory``'s entries ``a`` (a directory) and ``b`` (a link)
    for the duration of the block; stopped, reaped and checked on the way out, with ``a``
    back as the directory whatever happened."""
    swapper = Swapper(directory, (a, b))
    proc = subprocess.Popen([str(program), str(directory), str(ATTACKER), str(ATTACKER), a, b],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    expected = f"ready uid={ATTACKER} euid={ATTACKER}\n"
    ready, running = "", False
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()
        if ready == expected:
            yield swapper
            running = proc.poll() is None
    finally:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if stat.S_ISLNK(os.lstat(directory / a).st_mode):  # killed between two swaps
            _exchange(directory, a, b)
    assert ready == expected, f"the swapper did not start as the attacker: {ready!r} {err!r}"
    assert running, f"the swapper stopped before the loads were done: {err.strip()}"
    assert proc.returncode == 0, f"the swapper failed ({proc.returncode}): {err.strip()}"
    found = re.fullmatch(r"swaps=(\d+)\n", out)
    assert found, f"the swapper's output: {out!r}"
    swapper.swaps = int(found.group(1))
    assert swapper.swaps > 1000, f"the swapper hardly ran: {swapper}"


# -- what the plugin saw, judged --------------------------------------------------------------

def _identity(path: str | Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


def _dev(dev: int) -> str:
    return f"{os.major(dev)}:{os.minor(dev)}"


@dataclass
class Tally:
    """What a test's loads came to (see the module docstring)."""

    what: str
    total: int = 0
    clean: int = 0
    failed: Counter[str] = field(default_factory=Counter)
    leaks: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    odd: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    scrub: str = ""  # the test's tmp_path, shortened in messages
    cut: bool = False  # stopped by LOOP_BUDGET before all its loads

    def numbers(self, count: int) -> Iterator[int]:
        """1 .. count, or fewer when LOOP_BUDGET runs out first."""
        deadline = time.monotonic() + LOOP_BUDGET
        for number in range(1, count + 1):
            if time.monotonic() > deadline:
                self.cut = True
                return
            yield number

    def _short(self, text: str) -> str:
        return text.replace(self.scrub, "<tmp>") if self.scrub else text

    def failure(self, exc: PluginLoadError) -> None:
        self.total += 1
        step = getattr(exc, "step", None)
        self.failed[self._short(f"{type(exc).__name__}{f' at {step}' if step else ''}: "
                                f"{str(exc)[:160]}")] += 1

    def judged(self, number: int, leaks: list[str], wrong: list[str],
               odd: list[str] | None = None) -> None:
        self.total += 1
        prefix = f"{self.what} {number}: "
        self.leaks += [self._short(prefix + "; ".join(leaks))] if leaks else []
        self.wrong += [self._short(prefix + "; ".join(wrong))] if wrong else []
        self.odd += [self._short(prefix + "; ".join(odd))] if odd else []
        self.clean += not (leaks or wrong or odd)

    def error(self, number: int, exc: BaseException) -> None:
        self.total += 1
        self.unexpected.append(self._short(f"{self.what} {number}: "
                                           f"{type(exc).__name__}: {exc}"))

    def report(self, swapper: Swapper) -> str:
        lines = [f"{len(self.leaks)} of {self.total} {self.what}s leaked, with the swapper "
                 f"running ({swapper}); {self.clean} clean, {sum(self.failed.values())} "
                 f"failed cleanly, {len(self.wrong)} wrong, {len(self.odd)} odd, "
                 f"{len(self.unexpected)} unexpected errors"
                 + (f" (stopped after {LOOP_BUDGET:g} s)" if self.cut else "")]
        lines += [f"  failed cleanly x{n}: {key}" for key, n in self.failed.most_common()]
        for title, items, shown in (("LEAKED", self.leaks, 12), ("WRONG", self.wrong, 12),
                                    ("UNEXPECTED", self.unexpected, 12),
                                    ("odd (harmless)", self.odd, 3)):
            lines += [f"  {title}: {item}" for item in items[:shown]]
            if len(items) > shown:
                lines.append(f"  ... and {len(items) - shown} more {title}")
        if self.scrub:
            lines.append(f"  (<tmp> is {self.scrub})")
        return "\n".join(lines)

    def check(self, swapper: Swapper) -> None:
        report = self.report(swapper)
        if self.leaks or self.wrong or self.unexpected:
            pytest.fail(report, pytrace=False)
        if not self.clean:
            pytest.fail(f"no {self.what} came through clean: the race was not exercised\n"
                        f"{report}", pytrace=False)
        print(report)  # the counts, for -s or -rP


def _describe(path: str, info: dict[str, Any], host: dict[tuple[int, int], str]) -> str:
    """One entry the plugin saw, in words: which host object it is (when known), its mode,
    and what listing or reading it gave."""
    if "dev" not in info:
        return f"{path}: {info.get('errno')}"
    where = host.get((info["dev"], info["ino"]))
    what = (f"the host's {where}" if where else
            f"dev {_dev(info['dev'])} ino {info['ino']}") + f" ({stat.filemode(info['mode'])})"
    if "names" in info:
        names = info["names"]
        what += f", listing {len(names)} names ({', '.join(names[:6])}" \
                f"{', ...' if len(names) > 6 else ''})"
    if "text" in info:
        what += f", reading {info['text'][:60]!r}"
    if "link" in info:
        what += f", a link to {info['link']}"
    if "errno" in info:
        what += f", {info['errno']} on listing or reading it"
    return f"{path} is {what}"


def _secrets_read(entries: dict[str, dict[str, Any]], secrets: dict[str, str]) -> list[str]:
    """The entries whose text holds a secret's marker, named with the secret's host file
    (the first three, and how many more)."""
    found = [f"{path} holds the text of the host's {host_path}"
             for path, info in entries.items()
             for marker, host_path in secrets.items() if marker in info.get("text", "")]
    return found[:3] + ([f"and {len(found) - 3} more secret files"] if len(found) > 3 else [])


# -- point 3: a grant swapped for a link ------------------------------------------------------

@dataclass
class GrantScene:
    """The path root, the attacker's directory in it, the grant, and the link's target."""

    tmp: Path
    root: Path
    attacker: Path
    grant: Path
    target: Path
    plugin: Path
    granted: dict[str, tuple[int, int]]          # the grant's entries as the host has them
    host: dict[tuple[int, int], str]             # host objects the grant must never show
    secrets: dict[str, str]                      # marker text -> the host file holding it

    def judge(self, survey: dict[str, Any]) -> tuple[list[str], list[str]]:
        """Leaks and wrong entries in one survey of the grant's path: every entry must be
        the granted directory or its file, by device and inode, with their content."""
        entries: dict[str, dict[str, Any]] = survey["entries"]
        leaks = _secrets_read(entries, self.secrets)
        shown = [path for path, info in entries.items()
                 if "dev" in info and not self._as_granted(path, info)]
        # The first entry (the grant's path itself) and the first file read beneath it.
        examples = shown[:1] + [path for path in shown[1:] if "text" in entries[path]][:1]
        leaks += [_describe(path, entries[path], self.host) for path in examples]
        if len(shown) > len(examples):
            files = sum("text" in entries[path] for path in shown)
            leaks.append(f"and {len(shown) - len(examples)} more entries beneath it "
                         f"({files} files read)")
        if shown:
            return leaks, []  # what is missing then is no news
        wrong = [f"{path} is missing although the sandbox came up "
                 f"({entries[path]['errno'] if path in entries else 'not surveyed'})"
                 for path in self.granted if "dev" not in entries.get(path, {})]
        return leaks, wrong

    def _as_granted(self, path: str, info: dict[str, Any]) -> bool:
        if self.granted.get(path) != (info["dev"], info["ino"]):
            return False
        if path == str(self.grant):
            return info.get("names") == [GRANTED_NAME]
        return info.get("text") == GRANTED_TEXT


def _grant_scene(tmp: Path, target: str) -> GrantScene:
    """tmp/root (a path root) / attacker (the attacker's) / data (granted) and data-link
    (the link to swap in); tmp/secret, root-only; tmp/plugin, the survey plugin granted
    root/attacker/data."""
    secret = tmp / "secret"
    secret.mkdir(mode=0o700)
    secrets = {}
    for name in SECRET_NAMES:
        marker = unique_marker(f"secret-{name}")
        (secret / name).write_text(marker + "\n")
        os.chmod(secret / name, 0o600)
        secrets[marker] = str(secret / name)
    root = tmp / "root"
    root.mkdir()
    os.chmod(root, 0o755)
    attacker = root / "attacker"
    grant = attacker / "data"
    grant.mkdir(parents=True)
    (grant / GRANTED_NAME).write_text(GRANTED_TEXT)
    link_target = secret if target == "secret" else Path("/etc")
    (attacker / "data-link").symlink_to(link_target)
    for path in (attacker, grant, grant / GRANTED_NAME, attacker / "data-link"):
        os.lchown(path, ATTACKER, ATTACKER)
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
    host = {_identity(link_target): str(link_target)}
    host.update({_identity(entry.path): entry.path for entry in os.scandir(link_target)})
    plugin = tmp / "plugin"
    plugin.mkdir()
    (plugin / "plugin.toml").write_text(MANIFEST + textwrap.dedent(f"""
        [sandbox]
        allowed_paths = ["{grant}"]
        """))
    (plugin / "survey.py").write_text(SURVEY.read_text())
    os.chmod(plugin / "survey.py", 0o755)
    granted = {str(grant): _identity(grant),
               str(grant / GRANTED_NAME): _identity(grant / GRANTED_NAME)}
    return GrantScene(tmp, root, attacker, grant, link_target, plugin, granted, host, secrets)


@pytest.fixture(params=["secret", "etc"], ids=["link-to-root-only-dir", "link-to-etc"])
def grant_scene(request: pytest.FixtureRequest, tmp_path: Path) -> GrantScene:
    return _grant_scene(tmp_path, request.param)


@pytest.mark.timeout(120)
async def _load_and_survey(manager: PluginManager, plugin: Path, inside: str, loads: int,
                           tally: Tally, judge: Callable[[Any], Any]) -> None:
    """Load ``plugin`` up to ``loads`` times, each time surveying ``inside`` and unloading;
    a load error is a clean failure, anything else an unexpected error, a survey judged."""
    for number in tally.numbers(loads):
        try:
            loaded = await manager.load(plugin)
        except PluginLoadError as exc:
            tally.failure(exc)
            continue
        except SandboxerError as exc:  # not a load error: nothing a race should give
            tally.error(number, exc)
            continue
        try:
            survey = await loaded.call("survey", inside, timeout=30)
        except SandboxerError as exc:
            tally.error(number, exc)
        else:
            tally.judged(number, *judge(survey))
        finally:
            await manager.unload(loaded.id)


async def test_a_granted_directory_swapped_for_a_link_is_never_mounted(
        grant_scene: GrantScene, swapper_program: Path, canaries: Canaries) -> None:
    """Point 3 through the manager: the manifest asks for ROOT/attacker/data, the host's
    path_roots allow ROOT; the attacker swaps data for a link out of ROOT meanwhile."""
    scene = grant_scene
    tally = Tally("load", scrub=str(scene.tmp))
    async with PluginManager(config=HostConfig(path_roots=(str(scene.root),))) as manager:
        neighbour = await manager.load(EXAMPLES / "hello")
        with swapping(swapper_program, scene.attacker, "data", "data-link") as swapper:
            await _load_and_survey(manager, scene.plugin, str(scene.grant), GRANT_LOADS,
                                   tally, scene.judge)
        assert neighbour.state is PluginState.READY, neighbour.error
        assert await neighbour.call("greet", "neighbour", timeout=10) == "Hello, neighbour!"
    canaries.check()
    tally.check(swapper)


@pytest.fixture(scope="module")
def cgroup_backend() -> cgroups.CgroupBackend:
    return cgroups.detect()


@pytest.mark.timeout(120)
async def test_an_exec_grant_swapped_for_a_link_is_never_mounted(
        grant_scene: GrantScene, swapper_program: Path, canaries: Canaries,
        cgroup_backend: cgroups.CgroupBackend) -> None:
    """Point 3 through ``sandbox.program.run`` (``sandboxer exec --allow-path``): the
    operator grants ROOT/attacker/data explicitly; the attacker swaps data for a link."""
    scene = grant_scene
    sandbox = SandboxConfig(allowed_paths=(PathGrant(str(scene.grant)),))
    argv = ["/usr/bin/python3", "-IS", "-c", SURVEY.read_text(), "--once", str(scene.grant)]
    bpf = compile_filter(sandbox.profile, network=False)
    tally = Tally("run", scrub=str(scene.tmp))
    with swapping(swapper_program, scene.attacker, "data", "data-link") as swapper:
        for number in tally.numbers(EXEC_RUNS):
            out: list[bytes] = []
            err: list[bytes] = []
            try:
                result = await program.run(argv, sandbox, backend=cgroup_backend,
                                           seccomp_bpf=bpf, sinks=(out.append, err.append),
                                           setup_timeout=RUN_SETUP_TIMEOUT)
            except PluginLoadError as exc:
                tally.failure(exc)
                continue
            except Exception as exc:  # recorded: the test fails with it after the loop
                tally.error(number, exc)
                continue
            try:
                if result.returncode != 0:
                    raise RuntimeError(f"the survey exited {result.returncode}: "
                                       f"{b''.join(err)[-300:]!r}")
                survey = json.loads(b"".join(out))
            except (RuntimeError, ValueError) as exc:
                tally.error(number, exc)
            else:
                tally.judged(number, *scene.judge(survey))
    canaries.check()
    tally.check(swapper)


# -- point 4: the plugin directory's copy follows a swapped link ----------------------------

@dataclass
class CopyScene:
    tmp: Path
    plugin: Path
    secret: Path
    secrets: dict[str, str]     # marker -> host file
    texts: dict[str, str]       # what each of the attacker's files holds, by name

    def judge(self, survey: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
        """Leaks (a secret's text, or any text the attacker did not write) and odd but
        harmless shapes of the attacker's own tree (a directory copied half-way while its
        name was being swapped)."""
        entries: dict[str, dict[str, Any]] = survey["entries"]
        leaks = _secrets_read(entries, self.secrets)
        odd = []
        for path, info in entries.items():
            name = os.path.basename(path)
            if "text" in info and not any(m in info["text"] for m in self.secrets) \
                    and info["text"] != self.texts.get(name):
                leaks.append(_describe(path, info, {}) + ", which the attacker never wrote")
            if path in ("/plugin/sub", "/plugin/sub-link") and not (
                    info.get("link") == str(self.secret)
                    or info.get("names") == sorted(SECRET_NAMES)):
                odd.append(_describe(path, info, {}))
        return leaks, [], odd


@pytest.fixture
def copy_scene(tmp_path: Path) -> CopyScene:
    """tmp/plugin, owned by the attacker: the survey plugin, ``sub`` with the attacker's
    decoys and ``sub-link`` to tmp/secret (root-only, the same names, secret texts)."""
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    plugin = tmp_path / "plugin"
    sub = plugin / "sub"
    sub.mkdir(parents=True)
    texts = {"plugin.toml": MANIFEST, "survey.py": SURVEY.read_text()[:1024]}
    secrets = {}
    for name in SECRET_NAMES:
        marker = unique_marker(f"secret-{name}")
        (secret / name).write_text(marker + "\n")
        os.chmod(secret / name, 0o600)
        secrets[marker] = str(secret / name)
        texts[name] = f"the attacker's harmless {name}\n"
        (sub / name).write_text(texts[name])
    (plugin / "plugin.toml").write_text(MANIFEST)
    (plugin / "survey.py").write_text(SURVEY.read_text())
    (plugin / "sub-link").symlink_to(secret)
    for path in (plugin, *plugin.rglob("*")):
        os.lchown(path, ATTACKER, ATTACKER)
        if not path.is_symlink():
            os.chmod(path, 0o755 if path.is_dir() or path.name == "survey.py" else 0o644)
    return CopyScene(tmp_path, plugin, secret, secrets, texts)


@pytest.mark.timeout(120)
async def test_the_plugin_directory_copy_never_follows_a_swapped_link(
        copy_scene: CopyScene, swapper_program: Path, canaries: Canaries) -> None:
    """Point 4: the attacker owns the plugin directory and swaps ``sub`` for a link to a
    root-only directory while the launcher copies the directory into /plugin.

    The decoys in ``sub`` bear the secret files' names, as an attacker who knows what it is
    after names them: then no lookup of the copy's walk fails whichever way the names point
    at that instant, and only which file an open reaches decides what is copied."""
    scene = copy_scene
    tally = Tally("load", scrub=str(scene.tmp))
    async with PluginManager() as manager:
        neighbour = await manager.load(EXAMPLES / "hello")
        with swapping(swapper_program, scene.plugin, "sub", "sub-link") as swapper:
            await _load_and_survey(manager, scene.plugin, "/plugin", COPY_LOADS, tally,
                                   scene.judge)
        assert neighbour.state is PluginState.READY, neighbour.error
        assert await neighbour.call("greet", "neighbour", timeout=10) == "Hello, neighbour!"
    canaries.check()
    tally.check(swapper)
