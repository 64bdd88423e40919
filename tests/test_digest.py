"""Content digests: one file, or a plugin directory (sandboxer._digest)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from sandboxer._digest import file_sha256, tree_checksum


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "plugin"
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "plugin.toml").write_text('[plugin]\nid = "x"\n')
    (root / "pkg" / "__init__.py").write_text("from .core import greet\n")
    (root / "pkg" / "core.py").write_text("def greet(n):\n    return 'hi ' + n\n")
    (root / "pkg" / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return root


def test_file_sha256_is_the_hex_digest_of_the_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # more than one read chunk
    f = tmp_path / "blob"
    f.write_bytes(data)
    assert file_sha256(f) == hashlib.sha256(data).hexdigest()


def test_single_file_is_prefixed_file_digest(tmp_path: Path) -> None:
    f = tmp_path / "hello.py"
    f.write_bytes(b"def greet(n):\n    return n\n")
    expected = hashlib.sha256(b"def greet(n):\n    return n\n").hexdigest()
    assert tree_checksum(f) == f"sha256:{expected}"
    assert tree_checksum(str(f)) == f"sha256:{expected}"


def test_tree_checksum_format_and_stable_across_calls(tree: Path) -> None:
    first = tree_checksum(tree)
    assert first.startswith("sha256:")
    assert len(first) == len("sha256:") + 64
    int(first.removeprefix("sha256:"), 16)
    assert tree_checksum(tree) == first
    assert tree_checksum(str(tree)) == first


def test_tree_checksum_differs_from_a_single_files(tree: Path) -> None:
    assert tree_checksum(tree) != tree_checksum(tree / "plugin.toml")


def test_same_content_elsewhere_gives_same_checksum(tree: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tree, copy, symlinks=True)
    assert tree_checksum(copy) == tree_checksum(tree)


def test_creation_order_does_not_matter(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    names = ["z.py", "a.py", "m/n.py", "m/a.py", "b.txt"]
    for root, order in ((a, names), (b, list(reversed(names)))):
        for name in order:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(name)
    assert tree_checksum(a) == tree_checksum(b)


def test_changes_when_a_file_changes(tree: Path) -> None:
    before = tree_checksum(tree)
    (tree / "pkg" / "core.py").write_text("def greet(n):\n    return 'bye ' + n\n")
    assert tree_checksum(tree) != before


def test_changes_when_a_deep_file_changes_by_one_byte(tree: Path) -> None:
    before = tree_checksum(tree)
    data = bytearray((tree / "pkg" / "sub" / "data.bin").read_bytes())
    data[100] ^= 1
    (tree / "pkg" / "sub" / "data.bin").write_bytes(bytes(data))
    assert tree_checksum(tree) != before


def test_changes_when_a_file_is_renamed(tree: Path) -> None:
    before = tree_checksum(tree)
    (tree / "pkg" / "core.py").rename(tree / "pkg" / "kernel.py")
    assert tree_checksum(tree) != before


def test_changes_when_a_file_moves_to_another_dir(tree: Path) -> None:
    before = tree_checksum(tree)
    (tree / "pkg" / "core.py").rename(tree / "pkg" / "sub" / "core.py")
    assert tree_checksum(tree) != before


def test_changes_when_a_file_is_added_or_removed(tree: Path) -> None:
    before = tree_checksum(tree)
    (tree / "pkg" / "extra.py").write_text("")
    added = tree_checksum(tree)
    assert added != before
    (tree / "pkg" / "extra.py").unlink()
    assert tree_checksum(tree) == before


def test_ignores_pycache(tree: Path) -> None:
    before = tree_checksum(tree)
    for cache in (tree / "__pycache__", tree / "pkg" / "__pycache__"):
        cache.mkdir()
        (cache / "core.cpython-311.pyc").write_bytes(os.urandom(64))
    assert tree_checksum(tree) == before
    (tree / "pkg" / "__pycache__" / "core.cpython-311.pyc").write_bytes(os.urandom(64))
    assert tree_checksum(tree) == before


def test_a_file_named_like_pycache_is_not_ignored(tree: Path) -> None:
    before = tree_checksum(tree)
    (tree / "__pycache__.py").write_text("x = 1\n")
    assert tree_checksum(tree) != before


def test_symlink_is_hashed_as_link_not_followed(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("secret v1")
    (tree / "link.txt").symlink_to(outside)
    before = tree_checksum(tree)
    outside.write_text("secret v2, longer and different")
    assert tree_checksum(tree) == before
    outside.unlink()  # a dangling link still hashes, from its target text
    assert tree_checksum(tree) == before


def test_symlink_target_text_counts(tree: Path, tmp_path: Path) -> None:
    (tmp_path / "one").write_text("same")
    (tmp_path / "two").write_text("same")
    (tree / "link").symlink_to(tmp_path / "one")
    before = tree_checksum(tree)
    (tree / "link").unlink()
    (tree / "link").symlink_to(tmp_path / "two")
    assert tree_checksum(tree) != before


def test_symlink_to_outside_dir_is_not_walked(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside_dir"
    outside.mkdir()
    (outside / "a.txt").write_text("a")
    (tree / "linkdir").symlink_to(outside, target_is_directory=True)
    with_link = tree_checksum(tree)
    assert with_link != tree_checksum(tree / "plugin.toml")
    (outside / "a.txt").write_text("changed")
    (outside / "b.txt").write_text("new")
    assert tree_checksum(tree) == with_link
    # ...but the link itself is an entry: removing it changes the checksum.
    (tree / "linkdir").unlink()
    assert tree_checksum(tree) != with_link


def test_file_replaced_by_link_to_identical_content_changes(tree: Path, tmp_path: Path) -> None:
    content = (tree / "pkg" / "core.py").read_bytes()
    before = tree_checksum(tree)
    real = tmp_path / "core_real.py"
    real.write_bytes(content)
    (tree / "pkg" / "core.py").unlink()
    (tree / "pkg" / "core.py").symlink_to(real)
    assert tree_checksum(tree) != before
