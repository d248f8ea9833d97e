"""Content hashes and atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ml_loop.files import (
    remove_stale_staging,
    sha256_tree,
    staged_dir,
    write_json_atomic,
)


def test_sha256_tree_covers_names_and_content(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.txt").write_text("1")
    first = sha256_tree(tmp_path)
    (tmp_path / "a" / "x.txt").rename(tmp_path / "a" / "y.txt")
    renamed = sha256_tree(tmp_path)
    (tmp_path / "a" / "y.txt").write_text("2")
    assert len({first, renamed, sha256_tree(tmp_path)}) == 3


def test_staged_dir_publishes_on_success(tmp_path: Path) -> None:
    final = tmp_path / "out" / "v1"
    with staged_dir(final) as staging:
        (staging / "data.txt").write_text("ok")
        assert not final.exists()
    assert (final / "data.txt").read_text() == "ok"
    assert [p.name for p in final.parent.iterdir()] == ["v1"]


def _write_then_fail(final: Path) -> None:
    with staged_dir(final) as staging:
        (staging / "data.txt").write_text("partial")
        raise RuntimeError("killed")


def test_staged_dir_discards_on_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        _write_then_fail(tmp_path / "v1")
    assert list(tmp_path.iterdir()) == []


def test_staged_dir_keeps_existing_version(tmp_path: Path) -> None:
    final = tmp_path / "v1"
    with staged_dir(final) as staging:
        (staging / "data.txt").write_text("first")
    with staged_dir(final) as staging:
        (staging / "data.txt").write_text("second")
    assert (final / "data.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["v1"]


def test_stale_staging_of_dead_writer_removed(tmp_path: Path) -> None:
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from ml_loop.files import staged_dir\n"
        "with staged_dir(Path(sys.argv[1])) as staging:\n"
        "    (staging / 'half').write_text('x')\n"
        "    os._exit(1)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "include")}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "v1")], env=env, check=False)
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1
    assert leftovers[0].name.startswith(".tmp-v1@")
    assert remove_stale_staging(tmp_path) == leftovers
    assert list(tmp_path.iterdir()) == []


def test_live_writer_staging_kept(tmp_path: Path) -> None:
    with staged_dir(tmp_path / "v1"):
        assert remove_stale_staging(tmp_path) == []


def test_write_json_atomic_replaces(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    write_json_atomic(target, {"a": 1})
    write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
