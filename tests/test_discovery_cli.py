"""`sandboxer scan` and `sandboxer watch` as a user runs them."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("no_leaks")

MANIFEST = '[plugin]\nid = "{id}"\nversion = "1.0.0"\ntype = "python"\nentrypoint = "p.py"\n'


def plugin(root: Path, plugin_id: str) -> Path:
    d = root / plugin_id
    d.mkdir(parents=True)
    (d / "p.py").write_text("def hi():\n    return 1\n")
    (d / "plugin.toml").write_text(MANIFEST.format(id=plugin_id))
    return d


def test_scan_json_lists_plugins_and_error_entries(tmp_path: Path) -> None:
    plugin(tmp_path, "good.one")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "plugin.toml").write_text("[plugin]\nid = 5\n")
    run = subprocess.run([sys.executable, "-m", "sandboxer.cli", "scan", str(tmp_path),
                          "--json"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2  # an error entry makes the scan fail, after listing everything
    entries = json.loads(run.stdout)
    good = [e for e in entries if "error" not in e or e.get("error") is None]
    bad = [e for e in entries if e.get("error")]
    assert [e["id"] for e in good] == ["good.one"]
    assert good[0]["checksum"].startswith("sha256:")
    assert len(bad) == 1 and bad[0]["path"].endswith("broken") and "plugin.id" in bad[0]["error"]


def test_scan_of_a_clean_tree_exits_0(tmp_path: Path) -> None:
    plugin(tmp_path, "good.one")
    run = subprocess.run([sys.executable, "-m", "sandboxer.cli", "scan", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "good.one@1.0.0" in run.stdout


def _line(proc: subprocess.Popen[str], timeout: float = 10.0) -> dict[str, object]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "no event printed in time"
    return json.loads(proc.stdout.readline())


def test_watch_prints_events_as_they_happen(tmp_path: Path) -> None:
    plugin(tmp_path, "first")
    proc = subprocess.Popen([sys.executable, "-m", "sandboxer.cli", "watch", str(tmp_path),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        first = _line(proc)
        assert (first["kind"], Path(str(first["path"])).name) == ("added", "first")
        time.sleep(0.3)
        plugin(tmp_path, "second")
        second = _line(proc)
        assert (second["kind"], Path(str(second["path"])).name) == ("added", "second")
        (tmp_path / "second" / "p.py").write_text("def hi():\n    return 2\n")
        assert _line(proc)["kind"] == "changed"
        os.unlink(tmp_path / "first" / "plugin.toml")
        os.unlink(tmp_path / "first" / "p.py")
        os.rmdir(tmp_path / "first")
        assert _line(proc)["kind"] == "removed"
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
