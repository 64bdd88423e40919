"""Plugin discovery: scan() and watch() (sandboxer.discovery)."""

from __future__ import annotations

import asyncio
import fcntl
import gc
import json
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any, Sequence

import pytest
from inotify_simple import Event, flags

from sandboxer._digest import tree_checksum
from sandboxer.discovery import (
    DiscoveredPlugin,
    PluginWatcher,
    ScanError,
    WatchEvent,
    elf_exports,
    is_ignored_name,
    scan,
    watch,
)
from sandboxer.manifest import LoaderType

DEBOUNCE = 0.05
WAIT = 3.0  # the longest an expected event may take (it takes about DEBOUNCE)
WASM = b"\0asm\x01\0\0\0"  # the smallest valid module: magic and version


# -- building plugins ------------------------------------------------------------------------

def manifest(plugin_id: str, entrypoint: str = "plugin.py") -> str:
    return (f'[plugin]\nid = "{plugin_id}"\nversion = "1.0.0"\ntype = "python"\n'
            f'entrypoint = "{entrypoint}"\n')


def write_plugin(parent: Path, name: str, *, body: str = "def greet(n):\n    return n\n"
                 ) -> Path:
    """A python plugin directory ``parent/name`` (id = name)."""
    root = parent / name
    root.mkdir(parents=True, exist_ok=True)
    (root / "plugin.py").write_text(body)
    (root / "plugin.toml").write_text(manifest(name))
    return root


NATIVE_C = """
#include <stddef.h>
#include <stdint.h>
int sandboxer_call(const char *m, const uint8_t *a, size_t n, uint8_t **o, size_t *ol)
{ *o = 0; *ol = 0; return 0; }
void sandboxer_free(uint8_t *p, size_t n) {}
"""
PLAIN_C = "int add(int a, int b) { return a + b; }\n"
IMPORTS_C = "extern int sandboxer_call(void);\nint relay(void) { return sandboxer_call(); }\n"


@pytest.fixture(scope="module")
def libs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real shared objects built by gcc: one exporting sandboxer_call, one exporting something
    else, one that imports sandboxer_call (undefined) without defining it."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is not installed; apt-get install gcc (scripts/bootstrap.sh does)",
                    pytrace=False)
    out = tmp_path_factory.mktemp("libs")
    built = {}
    for name, source in [("native", NATIVE_C), ("plain", PLAIN_C), ("imports", IMPORTS_C)]:
        (out / f"{name}.c").write_text(source)
        lib = out / f"lib{name}.so"
        run = subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(out / f"{name}.c")],
                             capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        built[name] = lib
    return built


def make_elf(symbols: Sequence[tuple[str | int, int, int, int]] = (("sandboxer_call", 0x12, 0, 7),),
             *, bits: int = 64, order: str = "<", e_type: int = 3, strtab: bytes = b"\0",
             no_section_headers: bool = False) -> bytes:
    """A minimal ELF file: header, .dynstr, .dynsym and three section headers.

    Each symbol is (name, st_info, st_other, st_shndx); a str name is appended to the string
    table, an int is an offset into ``strtab`` as given. st_info 0x12 = global function.
    """
    names, entries = bytearray(strtab), []
    for name, info, other, shndx in symbols:
        if isinstance(name, str):
            offset, names = len(names), names + name.encode() + b"\0"
        else:
            offset = name
        entries.append((offset, info, other, shndx))
    if bits == 64:
        ehdr, shdr, sym = order + "16sHHIQQQIHHHHHH", order + "IIQQQQIIQQ", order + "IBBHQQ"
        pack_sym = lambda n, i, o, s: struct.pack(sym, n, i, o, s, 0, 0)  # noqa: E731
    else:
        ehdr, shdr, sym = order + "16sHHIIIIIHHHHHH", order + "IIIIIIIIII", order + "IIIBBH"
        pack_sym = lambda n, i, o, s: struct.pack(sym, n, 0, 0, i, o, s)  # noqa: E731
    symtab = pack_sym(0, 0, 0, 0) + b"".join(pack_sym(*e) for e in entries)
    ehsize, shentsize = struct.calcsize(ehdr), struct.calcsize(shdr)
    str_off = ehsize
    sym_off = str_off + len(names)
    sh_off = sym_off + len(symtab)
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1 if order == "<" else 2, 1]) + bytes(9)
    header = struct.pack(ehdr, ident, e_type, 62, 1, 0, 0, 0 if no_section_headers else sh_off,
                         0, ehsize, 0, 0, shentsize, 3, 0)
    sections = [
        struct.pack(shdr, *([0] * 10)),
        struct.pack(shdr, 0, 11, 0, 0, sym_off, len(symtab), 2, 1, 8, struct.calcsize(sym)),
        struct.pack(shdr, 0, 3, 0, 0, str_off, len(names), 0, 0, 1, 0),
    ]
    return header + bytes(names) + symtab + b"".join(sections)


def by_path(results: Sequence[Any]) -> dict[Path, Any]:
    return {r.path: r for r in results}


# -- scan: what is a plugin ------------------------------------------------------------------

def test_scan_finds_plugin_dirs_and_bare_py_wasm_and_so_files(tmp_path: Path,
                                                              libs: dict[str, Path]) -> None:
    d = write_plugin(tmp_path, "hello")
    (tmp_path / "solo.py").write_text("def f():\n    return 1\n")
    (tmp_path / "calc.wasm").write_bytes(WASM)
    shutil.copyfile(libs["native"], tmp_path / "libnative.so")
    found = scan([tmp_path])
    assert all(isinstance(r, DiscoveredPlugin) for r in found), found
    assert [(r.path, r.type) for r in found] == [
        (tmp_path / "calc.wasm", LoaderType.WASM),
        (d, LoaderType.PYTHON),
        (tmp_path / "libnative.so", LoaderType.NATIVE),
        (tmp_path / "solo.py", LoaderType.PYTHON),
    ]
    hello = by_path(found)[d]
    assert hello.manifest.id == "hello" and hello.manifest.entrypoint == d / "plugin.py"
    assert by_path(found)[tmp_path / "solo.py"].manifest.id == "solo"


def test_checksum_is_the_tree_checksum_of_the_dir_or_the_file(tmp_path: Path) -> None:
    d = write_plugin(tmp_path, "hello")
    (d / "pkg").mkdir()
    (d / "pkg" / "data.bin").write_bytes(bytes(range(256)))
    solo = tmp_path / "solo.py"
    solo.write_text("x = 1\n")
    found = by_path(scan([tmp_path]))
    assert found[d].checksum == tree_checksum(d)
    assert found[solo].checksum == tree_checksum(solo)
    for result in found.values():
        assert result.checksum.startswith("sha256:") and len(result.checksum) == 7 + 64


@pytest.mark.parametrize(("toml", "field"), [
    ("[plugin\nid = 'x'\n", "(file)"),                                     # not TOML
    ('[plugin]\nid = "x"\ntype = "python"\nentrypoint = "plugin.py"\n', "plugin.version"),
    (manifest("x", entrypoint="missing.py"), "plugin.entrypoint"),
    (manifest("x") + "colour = 'red'\n", "plugin.colour"),                 # unknown field
    (manifest("x") + "[sandbox]\nmemory_limit = 'lots'\n", "sandbox.memory_limit"),
])
def test_broken_manifest_is_an_error_naming_the_path_and_the_problem(
        tmp_path: Path, toml: str, field: str) -> None:
    good = write_plugin(tmp_path, "good")
    bad = write_plugin(tmp_path, "bad")
    (bad / "plugin.toml").write_text(toml)
    found = by_path(scan([tmp_path]))
    assert isinstance(found[good], DiscoveredPlugin)
    error = found[bad]
    assert isinstance(error, ScanError)
    assert str(bad / "plugin.toml") in error.message and field in error.message
    assert error.field == field


def test_files_that_are_not_plugins_are_ignored(tmp_path: Path, libs: dict[str, Path]) -> None:
    (tmp_path / "README").write_text("read me\n")
    (tmp_path / "notes.txt").write_text("notes\n")
    (tmp_path / "data.json").write_text("{}\n")
    (tmp_path / "tool.sh").write_text("#!/bin/sh\n")
    (tmp_path / "tool.sh").chmod(0o755)                  # an executable needs a manifest
    shutil.copyfile(libs["plain"], tmp_path / "libplain.so")      # ELF, no sandboxer_call
    shutil.copyfile(libs["imports"], tmp_path / "libimports.so")  # imports it, defines none
    (tmp_path / "libc.so").write_text("GROUP ( /lib/libc.so.6 )\n")  # a linker script
    assert scan([tmp_path]) == []


def test_a_wasm_file_without_the_magic_is_an_error(tmp_path: Path) -> None:
    """A .wasm name promises a module: a text file or a truncated download is a mistake
    worth showing (documented choice), while a non-ELF .so is just some library."""
    (tmp_path / "calc.wasm").write_text("(module)\n")
    (tmp_path / "empty.wasm").write_bytes(b"")
    found = scan([tmp_path])
    assert [type(r) for r in found] == [ScanError, ScanError]
    assert all("\\0asm" in r.message and str(r.path) in r.message for r in found)


def test_an_elf_so_whose_tables_cannot_be_read_is_an_error(tmp_path: Path,
                                                            libs: dict[str, Path]) -> None:
    (tmp_path / "libcut.so").write_bytes(libs["native"].read_bytes()[:300])
    (tmp_path / "libnosections.so").write_bytes(make_elf(no_section_headers=True))
    (tmp_path / "libmagic.so").write_bytes(b"\x7fELF")
    found = scan([tmp_path])
    assert [r.path.name for r in found] == ["libcut.so", "libmagic.so", "libnosections.so"]
    assert all(isinstance(r, ScanError) and str(r.path) in r.message for r in found)
    assert "malformed ELF" in found[0].message
    assert "without section headers" in found[2].message


# -- the ELF reader --------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("order", ["<", ">"])
def test_elf_exports_reads_both_classes_and_byte_orders(tmp_path: Path, bits: int,
                                                        order: str) -> None:
    lib = tmp_path / "lib.so"
    cases = {
        "global function": ([("sandboxer_call", 0x12, 0, 7)], True),
        "weak function": ([("sandboxer_call", 0x22, 0, 7)], True),
        "among others": ([("init", 0x12, 0, 7), ("sandboxer_call", 0x12, 0, 7)], True),
        "undefined (imported)": ([("sandboxer_call", 0x12, 0, 0)], False),
        "hidden": ([("sandboxer_call", 0x12, 2, 7)], False),
        "local": ([("sandboxer_call", 0x02, 0, 7)], False),
        "an object": ([("sandboxer_call", 0x11, 0, 7)], False),
        "a longer name": ([("sandboxer_call_v2", 0x12, 0, 7)], False),
        "no symbols": ([], False),
    }
    for what, (symbols, expected) in cases.items():
        lib.write_bytes(make_elf(symbols, bits=bits, order=order))
        assert elf_exports(lib) is expected, what
    lib.write_bytes(make_elf(bits=bits, order=order, e_type=2))  # an executable
    assert elf_exports(lib) is False


def test_elf_exports_finds_a_name_stored_as_another_names_tail(tmp_path: Path) -> None:
    lib = tmp_path / "lib.so"
    lib.write_bytes(make_elf([(4, 0x12, 0, 7)], strtab=b"\0my_sandboxer_call\0"))
    assert elf_exports(lib) is True
    lib.write_bytes(make_elf([(1, 0x12, 0, 7)], strtab=b"\0my_sandboxer_call\0"))
    assert elf_exports(lib) is False


def test_elf_exports_on_real_libraries(libs: dict[str, Path], tmp_path: Path) -> None:
    assert elf_exports(libs["native"]) is True
    assert elf_exports(libs["plain"]) is False
    assert elf_exports(libs["imports"]) is False
    assert elf_exports(libs["plain"], "add") is True
    (tmp_path / "text.so").write_text("not elf")
    assert elf_exports(tmp_path / "text.so") is None


# -- scan: where it looks --------------------------------------------------------------------

def test_a_plugin_dir_is_one_plugin_not_searched_further(tmp_path: Path,
                                                         libs: dict[str, Path]) -> None:
    d = write_plugin(tmp_path, "outer")
    (d / "helper.py").write_text("x = 1\n")
    shutil.copyfile(libs["native"], d / "libnative.so")
    write_plugin(d, "inner")
    assert [r.path for r in scan([tmp_path])] == [d]


def test_scan_recurses_and_skips_hidden_pycache_and_editor_files(tmp_path: Path) -> None:
    deep = write_plugin(tmp_path / "a" / "b" / "c", "deep")
    (tmp_path / "a" / "mid.py").write_text("x = 1\n")
    write_plugin(tmp_path / ".hidden", "secret")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "cached.py").write_text("x = 1\n")
    for name in [".solo.py.swp", "solo.py~", ".#solo.py", "#solo.py#", ".dot.py"]:
        (tmp_path / name).write_text("x = 1\n")
    assert [r.path for r in scan([tmp_path])] == [deep, tmp_path / "a" / "mid.py"]


def test_editor_temp_file_names() -> None:
    for name in [".x.py.swp", ".x.swo", "x.swx", "x.py~", ".#x.py", "#x.py#"]:
        assert is_ignored_name(name), name
    for name in ["x.py", "plugin.toml", "#", "swp.py", "x.swz"]:
        assert not is_ignored_name(name), name


def test_symlinked_directories_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    write_plugin(outside, "far")
    (outside / "loose.py").write_text("x = 1\n")
    root = tmp_path / "root"
    root.mkdir()
    (root / "to-plugins").symlink_to(outside)             # a dir of plugins, elsewhere
    (root / "to-plugin").symlink_to(outside / "far")      # a plugin dir, elsewhere
    assert scan([root]) == []


def test_symlinked_files_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "far.py").write_text("x = 1\n")
    root = tmp_path / "root"
    root.mkdir()
    (root / "near.py").symlink_to(outside / "far.py")
    (root / "dangling.py").symlink_to(tmp_path / "nowhere.py")
    assert scan([root]) == []


def test_links_inside_a_plugin_dir_never_lead_the_scan_outside(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key").write_text("one\n")
    d = write_plugin(tmp_path / "root", "linky")
    (d / "leak").symlink_to(secret)
    (d / "leak-file").symlink_to(secret / "key")
    before = scan([tmp_path / "root"])
    assert [r.path for r in before] == [d] and before[0].checksum == tree_checksum(d)
    (secret / "key").write_text("two\n")                  # outside content is never read
    assert scan([tmp_path / "root"])[0].checksum == before[0].checksum


def test_a_manifest_that_links_outside_its_dir_is_an_error(tmp_path: Path) -> None:
    elsewhere = write_plugin(tmp_path / "elsewhere", "real")
    d = tmp_path / "root" / "fake"
    d.mkdir(parents=True)
    (d / "plugin.py").write_text("x = 1\n")
    (d / "plugin.toml").symlink_to(elsewhere / "plugin.toml")
    [error] = scan([tmp_path / "root"])
    assert isinstance(error, ScanError) and error.path == d
    assert "outside the plugin directory" in error.message and error.field == "plugin.toml"


def test_an_entrypoint_that_links_outside_its_dir_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "far.py").write_text("x = 1\n")
    d = tmp_path / "root" / "p"
    d.mkdir(parents=True)
    (d / "plugin.py").symlink_to(tmp_path / "far.py")
    (d / "plugin.toml").write_text(manifest("p"))
    [error] = scan([tmp_path / "root"])
    assert isinstance(error, ScanError) and error.field == "plugin.entrypoint"


def test_scanning_a_plugin_itself_reports_that_plugin(tmp_path: Path,
                                                     libs: dict[str, Path]) -> None:
    d = write_plugin(tmp_path, "hello")
    (d / "extra.py").write_text("x = 1\n")
    solo = tmp_path / "solo.py"
    solo.write_text("x = 1\n")
    lib = tmp_path / "libnative.so"
    shutil.copyfile(libs["native"], lib)
    assert [r.path for r in scan([d])] == [d]
    assert [r.path for r in scan(d / "plugin.toml")] == [d]       # a single path works too
    assert [r.path for r in scan([solo])] == [solo]
    assert [r.type for r in scan([lib])] == [LoaderType.NATIVE]
    (tmp_path / "link").symlink_to(d)                            # a named link is followed
    assert [r.path for r in scan([tmp_path / "link"])] == [tmp_path / "link"]


def test_a_missing_path_or_a_named_non_plugin_file_is_an_error(tmp_path: Path,
                                                               libs: dict[str, Path]) -> None:
    (tmp_path / "README").write_text("x\n")
    shutil.copyfile(libs["plain"], tmp_path / "libplain.so")
    found = scan([tmp_path / "nope", tmp_path / "README", tmp_path / "libplain.so"])
    assert [type(r) for r in found] == [ScanError] * 3
    assert "does not exist" in found[0].message
    assert "not a plugin" in found[1].message
    assert "does not export sandboxer_call" in found[2].message


def test_overlapping_and_repeated_paths_report_each_plugin_once(tmp_path: Path) -> None:
    a = write_plugin(tmp_path / "sub", "a")
    found = scan([tmp_path / "sub", tmp_path, a, tmp_path / "sub"])
    assert [r.path for r in found] == [a]


def test_scan_results_are_json(tmp_path: Path) -> None:
    d = write_plugin(tmp_path, "hello")
    (tmp_path / "bad.wasm").write_text("x")
    plugin, error = sorted(scan([tmp_path]), key=lambda r: r.path.name != "hello")
    data = json.loads(json.dumps(plugin.to_json()))
    assert data["path"] == str(d) and data["type"] == "python" and data["id"] == "hello"
    assert data["checksum"] == tree_checksum(d) and data["manifest"]["version"] == "1.0.0"
    data = json.loads(json.dumps(error.to_json()))
    assert data["path"] == str(tmp_path / "bad.wasm") and "\\0asm" in data["error"]


# -- watch: helpers --------------------------------------------------------------------------

async def take(w: PluginWatcher, n: int = 1, timeout: float = WAIT) -> list[WatchEvent]:
    return [await asyncio.wait_for(w.__anext__(), timeout) for _ in range(n)]


async def quiet(w: PluginWatcher, seconds: float = 6 * DEBOUNCE) -> None:
    """No event for ``seconds`` (a cancelled wait loses nothing: see the test for it)."""
    try:
        event = await asyncio.wait_for(w.__anext__(), seconds)
    except TimeoutError:
        return
    pytest.fail(f"unexpected event: {event}")


def kinds(events: Sequence[WatchEvent]) -> list[tuple[str, Path]]:
    return [(e.kind, e.path) for e in events]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "plugins"
    path.mkdir()
    return path


# -- watch: events ---------------------------------------------------------------------------

async def test_existing_plugins_are_reported_as_added_first(root: Path, no_leaks: None) -> None:
    a = write_plugin(root, "a")
    (root / "b.py").write_text("x = 1\n")
    (root / "bad.wasm").write_text("x")
    async with watch(root, debounce=DEBOUNCE) as w:
        events = await take(w, 3)
        assert kinds(events) == [("added", a), ("added", root / "b.py"),
                                 ("error", root / "bad.wasm")]
        assert events[0].plugin == scan([a])[0]
        await quiet(w)


async def test_added_changed_removed(root: Path, no_leaks: None) -> None:
    async with watch([root], debounce=DEBOUNCE) as w:
        a = write_plugin(root, "a")
        [added] = await take(w)
        assert kinds([added]) == [("added", a)] and added.plugin is not None
        assert added.plugin.checksum == tree_checksum(a)
        (a / "plugin.py").write_text("def greet(n):\n    return 'hi ' + n\n")
        [changed] = await take(w)
        assert kinds([changed]) == [("changed", a)] and changed.plugin is not None
        assert changed.plugin.checksum == tree_checksum(a) != added.plugin.checksum
        shutil.rmtree(a)
        [removed] = await take(w)
        assert kinds([removed]) == [("removed", a)] and removed.plugin == changed.plugin
        await quiet(w)


async def test_changed_only_when_the_checksum_changes(root: Path, no_leaks: None) -> None:
    a = write_plugin(root, "a")
    solo = root / "solo.py"
    solo.write_text("x = 1\n")
    async with watch([root], debounce=DEBOUNCE) as w:
        await take(w, 2)
        (a / "plugin.py").write_text((a / "plugin.py").read_text())   # same bytes
        solo.write_text("x = 1\n")
        os.utime(a / "plugin.toml")
        (a / "plugin.py").chmod(0o600)
        (a / "__pycache__").mkdir()                                    # left out of checksums
        (a / "__pycache__" / "plugin.cpython-311.pyc").write_bytes(b"pyc")
        await quiet(w)
        solo.write_text("x = 2\n")
        assert kinds(await take(w)) == [("changed", solo)]


async def test_watch_is_recursive_including_directories_made_later(root: Path,
                                                                    no_leaks: None) -> None:
    async with watch([root], debounce=DEBOUNCE) as w:
        deep = root / "x" / "y" / "z"
        deep.mkdir(parents=True)
        await quiet(w)                                  # an empty tree is no plugin
        p = write_plugin(deep, "p")
        assert kinds(await take(w)) == [("added", p)]
        (p / "sub").mkdir()
        (p / "sub" / "data.txt").write_text("1")
        assert kinds(await take(w)) == [("changed", p)]
        (p / "sub" / "data.txt").write_text("2")       # inside a subdir made later
        assert kinds(await take(w)) == [("changed", p)]
        (deep / "late.py").write_text("x = 1\n")
        assert kinds(await take(w)) == [("added", deep / "late.py")]


async def test_a_deleted_plugin_toml_turns_the_dir_into_bare_files(root: Path,
                                                                   no_leaks: None) -> None:
    a = write_plugin(root, "a")
    async with watch([root], debounce=DEBOUNCE) as w:
        await take(w)
        (a / "plugin.toml").unlink()
        assert sorted(kinds(await take(w, 2))) == [("added", a / "plugin.py"), ("removed", a)]
        (a / "plugin.toml").write_text(manifest("a"))
        assert sorted(kinds(await take(w, 2))) == [("added", a), ("removed", a / "plugin.py")]


async def test_a_renamed_plugin_dir_is_removed_and_added(root: Path, no_leaks: None) -> None:
    a = write_plugin(root, "a")
    async with watch([root], debounce=DEBOUNCE) as w:
        await take(w)
        b = root / "b"
        a.rename(b)
        assert kinds(await take(w, 2)) == [("removed", a), ("added", b)]
        (b / "plugin.py").write_text("x = 2\n")       # the moved dir is watched at its name
        assert kinds(await take(w)) == [("changed", b)]
        await quiet(w)


async def test_atomic_rename_saves_give_one_change(root: Path, no_leaks: None) -> None:
    a = write_plugin(root, "a")
    async with watch([root], debounce=DEBOUNCE) as w:
        [added] = await take(w)
        for target, content in [(a / "plugin.py", "x = 2\n"), (a / "plugin.toml",
                                                                manifest("a") + "\n")]:
            temp = a / f".{target.name}.tmp123"
            temp.write_text(content)
            os.replace(temp, target)
            [changed] = await take(w)
            assert kinds([changed]) == [("changed", a)] and changed.plugin is not None
            assert changed.plugin.checksum == tree_checksum(a)
        await quiet(w)
        solo = root / "solo.py"                        # a bare file saved the same way
        (root / "solo.py.tmp").write_text("x = 1\n")
        os.replace(root / "solo.py.tmp", solo)
        assert kinds(await take(w)) == [("added", solo)]
        await quiet(w)


async def test_editor_temp_files_are_ignored(root: Path, no_leaks: None) -> None:
    a = write_plugin(root, "a")
    async with watch([root], debounce=DEBOUNCE) as w:
        await take(w)
        for name in [".plugin.py.swp", "plugin.py~", ".#plugin.py", "#plugin.py#"]:
            (root / name).write_text("junk")          # beside the plugins
            (root / name).unlink()
            (a / name).write_text("junk")             # and inside one: no change either
            (a / name).unlink()
        (root / "solo.py~").write_text("x = 1\n")
        await quiet(w)


async def test_a_burst_of_writes_is_debounced_into_one_event(root: Path,
                                                             no_leaks: None) -> None:
    solo = root / "solo.py"
    async with watch([root], debounce=0.2) as w:
        for i in range(20):
            solo.write_text(f"x = {i}\n")
            await asyncio.sleep(0.005)                 # the loop sees each write
        [event] = await take(w)
        assert kinds([event]) == [("added", solo)] and event.plugin is not None
        assert event.plugin.checksum == tree_checksum(solo)
        await quiet(w, 0.5)


async def test_a_partially_written_manifest_is_not_reported_until_it_parses(
        root: Path, no_leaks: None) -> None:
    async with watch([root], debounce=DEBOUNCE) as w:
        d = root / "slow"
        d.mkdir()
        (d / "plugin.py").write_text("x = 1\n")
        # The new directory's watch is added when its creation is read; a write begun before
        # that (in the same instant) cannot be seen as in progress: only the debounce guards it.
        await asyncio.sleep(DEBOUNCE / 5)
        text = manifest("slow")
        with open(d / "plugin.toml", "w") as f:
            f.write(text[:20])                         # '[plugin]\nid = "slow' ...
            f.flush()
            await quiet(w, 8 * DEBOUNCE)               # still open for writing: held back
            f.write(text[20:])
        [event] = await take(w)
        assert kinds([event]) == [("added", d)] and event.plugin is not None
        assert event.plugin.manifest.id == "slow"


async def test_a_writer_that_never_closes_holds_back_at_most_max_wait(
        root: Path, no_leaks: None) -> None:
    async with watch([root], debounce=DEBOUNCE, max_wait=0.4) as w:
        with open(root / "solo.py", "w") as f:
            f.write("x = 1\n")
            f.flush()
            await quiet(w, 0.25)
            [event] = await take(w, timeout=1.0)
            assert kinds([event]) == [("added", root / "solo.py")]


async def test_a_manifest_that_stays_broken_is_one_error_event(root: Path,
                                                               no_leaks: None) -> None:
    async with watch([root], debounce=DEBOUNCE) as w:
        d = root / "p"
        d.mkdir()
        (d / "plugin.py").write_text("x = 1\n")
        (d / "plugin.toml").write_text('[plugin]\nid = "p"\n')
        [event] = await take(w)
        assert event.kind == "error" and event.path == d and event.error is not None
        assert str(d / "plugin.toml") in event.error.message
        assert event.error.field == "plugin.version"
        (d / "notes.txt").write_text("still broken, same problem\n")
        await quiet(w)
        (d / "plugin.toml").write_text(manifest("p"))
        assert kinds(await take(w)) == [("added", d)]


async def test_a_good_plugin_broken_then_fixed_is_not_removed(root: Path,
                                                              no_leaks: None) -> None:
    a = write_plugin(root, "a")
    async with watch([root], debounce=DEBOUNCE) as w:
        [added] = await take(w)
        (a / "plugin.toml").write_text("[plugin\n")
        [broken] = await take(w)
        assert broken.kind == "error" and broken.path == a
        (a / "plugin.toml").write_text(manifest("a") + "# fixed\n")
        [fixed] = await take(w)
        assert fixed.kind == "changed" and fixed.path == a
        assert fixed.plugin is not None and added.plugin is not None
        assert fixed.plugin.checksum != added.plugin.checksum


async def test_the_watched_dir_deleted_and_recreated(root: Path, no_leaks: None) -> None:
    a = write_plugin(root, "a")
    async with watch([root], debounce=DEBOUNCE) as w:
        await take(w)
        shutil.rmtree(root)
        assert kinds(await take(w)) == [("removed", a)]
        await quiet(w)                                 # a missing root is not an error now
        root.mkdir()
        b = write_plugin(root, "b")
        assert kinds(await take(w)) == [("added", b)]
        (b / "plugin.py").write_text("x = 2\n")        # the new tree is watched
        assert kinds(await take(w)) == [("changed", b)]


async def test_the_watched_dir_and_its_parents_deleted_and_recreated(
        tmp_path: Path, no_leaks: None) -> None:
    root = tmp_path / "x" / "y" / "plugins"
    a = write_plugin(root, "a")
    async with watch([root], debounce=DEBOUNCE) as w:
        await take(w)
        shutil.rmtree(tmp_path / "x")
        assert kinds(await take(w)) == [("removed", a)]
        (tmp_path / "x" / "y").mkdir(parents=True)
        await asyncio.sleep(2 * DEBOUNCE)              # parents back one at a time
        b = write_plugin(root, "b")
        assert kinds(await take(w)) == [("added", b)]
        (b / "plugin.py").write_text("x = 2\n")
        assert kinds(await take(w)) == [("changed", b)]


async def test_a_root_missing_at_start_is_an_error_then_followed(tmp_path: Path,
                                                                 no_leaks: None) -> None:
    root = tmp_path / "later"
    async with watch([root], debounce=DEBOUNCE) as w:
        [event] = await take(w)
        assert event.kind == "error" and event.path == root
        assert event.error is not None and "does not exist" in event.error.message
        a = write_plugin(root, "a")
        assert kinds(await take(w)) == [("added", a)]


async def test_watching_a_bare_file(root: Path, no_leaks: None) -> None:
    solo = root / "solo.py"
    solo.write_text("x = 1\n")
    (root / "other.py").write_text("x = 1\n")
    async with watch([solo], debounce=DEBOUNCE) as w:
        assert kinds(await take(w)) == [("added", solo)]
        (root / "other.py").write_text("x = 2\n")     # a sibling is not watched
        await quiet(w)
        (root / "tmp").write_text("x = 3\n")
        os.replace(root / "tmp", solo)
        assert kinds(await take(w)) == [("changed", solo)]
        solo.unlink()
        assert kinds(await take(w)) == [("removed", solo)]


async def test_symlinks_are_not_followed_while_watching(tmp_path: Path, root: Path,
                                                        no_leaks: None) -> None:
    outside = tmp_path / "outside"
    write_plugin(outside, "far")
    async with watch([root], debounce=DEBOUNCE) as w:
        (root / "to-outside").symlink_to(outside)
        (root / "far.py").symlink_to(outside / "far" / "plugin.py")
        await quiet(w)
        (outside / "far" / "plugin.py").write_text("x = 2\n")
        await quiet(w)


# -- watch: overflow -------------------------------------------------------------------------

async def test_overflow_rescans_everything_and_reports_the_differences(
        root: Path, no_leaks: None) -> None:
    """The kernel dropping events is simulated: changes are made while the loop is held
    (no await), their events are read and thrown away, and an IN_Q_OVERFLOW is handed in."""
    a = write_plugin(root, "a")
    keep = write_plugin(root, "keep")
    async with watch([root], debounce=DEBOUNCE) as w:
        await take(w, 2)
        shutil.rmtree(a)
        b = write_plugin(root / "new" / "dir", "b")
        (keep / "plugin.py").write_text("x = 2\n")
        engine = w._engine
        assert engine._inotify is not None
        assert engine._inotify.read(timeout=0)         # the events the kernel "dropped"
        engine.handle([Event(-1, flags.Q_OVERFLOW, 0, "")])
        events = await take(w, 3)
        assert kinds(events) == [("removed", a), ("changed", keep), ("added", b)]
        assert engine.overflows == 1
        await quiet(w)
        (b / "plugin.py").write_text("x = 3\n")       # dirs made meanwhile are watched now
        assert kinds(await take(w)) == [("changed", b)]


MAX_QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")


async def test_a_real_queue_overflow_is_recovered(root: Path, no_leaks: None) -> None:
    """Root only: the queue limit is taken when the inotify instance is made, so it is
    lowered just around start() and restored at once."""
    if not os.access(MAX_QUEUED, os.W_OK):
        pytest.skip(f"needs root to lower {MAX_QUEUED}")
    w = watch([root], debounce=DEBOUNCE)
    # The lock keeps two test runs from saving each other's lowered value as the original.
    with open("/tmp/sandboxer-test-max-queued-events.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        saved = MAX_QUEUED.read_text()
        try:
            MAX_QUEUED.write_text("4\n")
            await w.start()
        finally:
            MAX_QUEUED.write_text(saved)
    try:
        made = [write_plugin(root, f"p{i}") for i in range(10)]   # far more than 4 events
        events = await take(w, 10)
        assert sorted(kinds(events)) == [("added", p) for p in made]
        assert w._engine.overflows >= 1
        await quiet(w)
    finally:
        await w.aclose()


# -- watch: lifetime -------------------------------------------------------------------------

async def test_aclose_closes_the_fd_and_ends_iteration(root: Path, no_leaks: None) -> None:
    w = watch([root], debounce=DEBOUNCE)
    await w.start()
    fd = w._engine._inotify.fileno()  # type: ignore[union-attr]
    assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:inotify"
    await w.aclose()
    assert w.closed
    with pytest.raises(StopAsyncIteration):
        await w.__anext__()
    with pytest.raises(StopAsyncIteration):
        await w.__anext__()


async def test_closing_before_starting_opens_nothing(root: Path, no_leaks: None) -> None:
    w = watch([root], debounce=DEBOUNCE)
    await w.aclose()
    assert [e async for e in w] == []


async def test_breaking_out_and_dropping_the_watcher_closes_it(root: Path,
                                                               no_leaks: None) -> None:
    write_plugin(root, "a")
    async for event in watch([root], debounce=DEBOUNCE):
        assert event.kind == "added"
        break
    gc.collect()
    await asyncio.sleep(0)


async def test_cancelling_the_consumer_closes_the_watcher(root: Path, no_leaks: None) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async with watch([root], debounce=DEBOUNCE) as w:
            started.set()
            async for _ in w:
                pass

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_the_fd_is_closed_when_the_loop_exits(root: Path, no_leaks: None) -> None:
    async def main() -> PluginWatcher:
        w = watch([root], debounce=DEBOUNCE)
        await w.start()
        return w                                       # never closed by its user

    w = asyncio.run(main())
    assert w.closed


async def test_a_timed_out_wait_loses_no_event(root: Path, no_leaks: None) -> None:
    async with watch([root], debounce=DEBOUNCE) as w:
        for _ in range(3):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(w.__anext__(), 0.01)
        solo = root / "solo.py"
        solo.write_text("x = 1\n")
        await asyncio.sleep(10 * DEBOUNCE)
        assert kinds(await take(w)) == [("added", solo)]


async def test_watch_events_are_json(root: Path, no_leaks: None) -> None:
    a = write_plugin(root, "a")
    (root / "bad.wasm").write_text("x")
    async with watch([root], debounce=DEBOUNCE) as w:
        added, error = await take(w, 2)
        data = json.loads(json.dumps(added.to_json()))
        assert data["kind"] == "added" and data["path"] == str(a) and data["error"] is None
        assert data["plugin"]["checksum"] == tree_checksum(a)
        data = json.loads(json.dumps(error.to_json()))
        assert data["kind"] == "error" and data["plugin"] is None
        assert data["error"]["path"] == str(root / "bad.wasm")
        shutil.rmtree(a)
        data = json.loads(json.dumps((await take(w))[0].to_json()))
        assert data["kind"] == "removed" and data["plugin"]["id"] == "a"
