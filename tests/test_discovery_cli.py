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


_pending: dict[int, bytes] = {}


def _line(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> dict[str, object]:
    """The next JSON line the process prints (read from the fd directly: a buffered reader
    would hide lines that arrived together from select)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    while b"\n" not in _pending.get(fd, b""):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, "no event printed in time"
        chunk = os.read(fd, 65536)
        assert chunk, "the watcher exited"
        _pending[fd] = _pending.get(fd, b"") + chunk
    line, _, rest = _pending[fd].partition(b"\n")
    _pending[fd] = rest
    return json.loads(line)


def test_watch_prints_events_as_they_happen(tmp_path: Path) -> None:
    plugin(tmp_path, "first")
    proc = subprocess.Popen([sys.executable, "-m", "sandboxer.cli", "watch", str(tmp_path),
                             "--no-load", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
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


def test_watch_loads_plugins_and_reloads_them_on_change(tmp_path: Path) -> None:
    """Without --no-load, watch loads what it finds (sandboxed) and reloads it on change."""
    d = plugin(tmp_path, "live.one")
    proc = subprocess.Popen([sys.executable, "-m", "sandboxer.cli", "watch", str(tmp_path),
                             "--json"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        ready = _line(proc, 30)
        assert (ready["event"], ready["plugin"], ready["state"]) == ("state", "live.one",
                                                                    "ready")
        time.sleep(0.3)
        (d / "plugin.toml").write_text(MANIFEST.format(id="live.one").replace("1.0.0", "1.1.0"))
        while True:
            event = _line(proc, 30)
            if event["event"] == "reloaded":
                break
        assert (event["version"], event["generation"]) == ("1.1.0", 2)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
