from __future__ import annotations

import datetime as dt
import json
import logging
import os
import stat
from pathlib import Path

import pytest

from ml_loop.datasets import load_source
from ml_loop.errors import DataValidationError, PartitionNotFoundError, SpecError
from ml_loop.files import sha256_tree
from ml_loop.ingest import (
    PartitionRef,
    ingest_partition,
    ingest_window,
    resolve_partition_date,
)
from ml_loop.landing import CSV_FILE, MANIFEST_FILE, land_partition
from ml_loop.spec import load_spec

DAY = dt.date(2026, 12, 4)


@pytest.fixture(scope="module")
def cancer():
    return load_spec("breast_cancer")


@pytest.fixture(scope="module")
def cancer_records():
    return load_source(load_spec("breast_cancer"))


@pytest.fixture(scope="module")
def digits():
    return load_spec("digits")


def days_before(day: dt.date, count: int) -> dt.date:
    return day - dt.timedelta(days=count)


def land(spec, records, day):
    return Path(land_partition(spec, day, records=records).path)


def test_resolve_partition_date_uses_logical_date():
    logical = dt.datetime(2026, 12, 4, 0, 0, tzinfo=dt.UTC)
    run_after = dt.datetime(2026, 12, 5, 0, 0, tzinfo=dt.UTC)
    assert resolve_partition_date(logical, run_after) == DAY


def test_resolve_partition_date_manual_run():
    run_after = dt.datetime(2026, 12, 4, 15, 30, tzinfo=dt.UTC)
    assert resolve_partition_date(None, run_after) == DAY


def test_resolve_partition_date_converts_to_utc():
    eastern = dt.timezone(dt.timedelta(hours=-5))
    run_after = dt.datetime(2026, 12, 3, 23, 30, tzinfo=eastern)
    assert resolve_partition_date(None, run_after) == DAY
    assert resolve_partition_date(dt.datetime(2026, 12, 4, 23, 59), run_after) == DAY


def test_ingest_copies_partition(data_root, cancer, cancer_records):
    landed = land(cancer, cancer_records, DAY)
    ref = ingest_partition(cancer, DAY)
    raw = Path(ref.raw_uri)
    assert ref.content_hash == sha256_tree(landed)
    assert raw == data_root / "raw" / "breast_cancer" / "2026-12-04" / ref.content_hash
    assert (raw / CSV_FILE).read_bytes() == (landed / CSV_FILE).read_bytes()
    assert (raw / MANIFEST_FILE).is_file()
    assert ref.file_count == 1
    assert ref.bytes == (landed / CSV_FILE).stat().st_size
    assert ref.partition_date == "2026-12-04"


def test_ingest_makes_files_read_only(data_root, cancer, cancer_records):
    land(cancer, cancer_records, DAY)
    raw = Path(ingest_partition(cancer, DAY).raw_uri)
    mode = (raw / CSV_FILE).stat().st_mode
    assert not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def test_ingest_images(data_root, digits):
    records = load_source(digits).take(range(0, 5000, 50))
    landed = land(digits, records, DAY)
    ref = ingest_partition(digits, DAY)
    pngs = sorted(p.relative_to(landed) for p in landed.rglob("*.png"))
    assert ref.file_count == len(pngs)
    assert sorted(p.relative_to(ref.raw_uri) for p in Path(ref.raw_uri).rglob("*.png")) == pngs


def test_ingest_is_idempotent(data_root, cancer, cancer_records):
    land(cancer, cancer_records, DAY)
    first = ingest_partition(cancer, DAY)
    mtime = (Path(first.raw_uri) / CSV_FILE).stat().st_mtime_ns
    second = ingest_partition(cancer, DAY)
    assert second == first
    assert (Path(second.raw_uri) / CSV_FILE).stat().st_mtime_ns == mtime
    assert len(list(Path(first.raw_uri).parent.iterdir())) == 1


def test_ingest_new_landing_gets_new_hash(data_root, cancer, cancer_records):
    landed = land(cancer, cancer_records, DAY)
    first = ingest_partition(cancer, DAY)
    manifest = landed / MANIFEST_FILE
    manifest.unlink()
    (landed / CSV_FILE).write_text("id,label\n")
    second = ingest_partition(cancer, DAY)
    assert second.content_hash != first.content_hash
    assert Path(first.raw_uri).is_dir()
    assert sorted(p.name for p in Path(first.raw_uri).parent.iterdir()) == sorted(
        [first.content_hash, second.content_hash]
    )


def test_ingest_missing_partition_message(data_root, cancer):
    with pytest.raises(PartitionNotFoundError) as info:
        ingest_partition(cancer, DAY)
    message = str(info.value)
    assert str(data_root / "landing" / "breast_cancer" / "2026-12-04") in message
    assert "2026-12-04" in message
    assert "ml_loop.landing" in message
    assert "pick a date" in message


def test_ingest_missing_partition_lists_landed_dates(data_root, cancer, cancer_records):
    land(cancer, cancer_records, days_before(DAY, 3))
    with pytest.raises(PartitionNotFoundError, match="landed dates: 2026-12-01 to 2026-12-01"):
        ingest_partition(cancer, DAY)


def test_ingest_changed_file_rejected(data_root, cancer, cancer_records):
    landed = land(cancer, cancer_records, DAY)
    with (landed / CSV_FILE).open("a") as handle:
        handle.write("bc-99999,benign" + ",1.0" * 30 + "\n")
    with pytest.raises(DataValidationError) as info:
        ingest_partition(cancer, DAY)
    assert str(landed / CSV_FILE) in str(info.value)
    assert "does not match" in str(info.value)
    assert not any((data_root / "raw" / "breast_cancer" / "2026-12-04").glob("[!.]*"))


def test_ingest_missing_listed_file_rejected(data_root, digits):
    records = load_source(digits).take(range(0, 5000, 50))
    landed = land(digits, records, DAY)
    removed = next(landed.rglob("*.png"))
    removed.unlink()
    with pytest.raises(DataValidationError, match="missing") as info:
        ingest_partition(digits, DAY)
    assert str(removed) in str(info.value)


def test_ingest_unlisted_file_rejected(data_root, cancer, cancer_records):
    landed = land(cancer, cancer_records, DAY)
    (landed / "part-00001.csv").write_text("id,label\n")
    with pytest.raises(DataValidationError, match="does not list") as info:
        ingest_partition(cancer, DAY)
    assert "part-00001.csv" in str(info.value)


def test_ingest_manifest_of_other_date_rejected(data_root, cancer, cancer_records):
    landed = land(cancer, cancer_records, DAY)
    manifest = json.loads((landed / MANIFEST_FILE).read_text())
    manifest["partition_date"] = "2026-12-03"
    (landed / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(DataValidationError, match="2026-12-03"):
        ingest_partition(cancer, DAY)


def test_ingest_invalid_manifest_rejected(data_root, cancer, cancer_records):
    landed = land(cancer, cancer_records, DAY)
    (landed / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(DataValidationError, match="invalid manifest") as info:
        ingest_partition(cancer, DAY)
    assert str(landed / MANIFEST_FILE) in str(info.value)


def test_ingest_without_manifest_warns(data_root, cancer, caplog):
    partition = data_root / "landing" / "breast_cancer" / "2026-12-04"
    partition.mkdir(parents=True)
    (partition / CSV_FILE).write_text("id,label\n")
    with caplog.at_level(logging.WARNING, logger="ml_loop.ingest"):
        ref = ingest_partition(cancer, DAY)
    assert ref.file_count == 1
    assert any(MANIFEST_FILE in record.getMessage() for record in caplog.records)


def test_ingest_empty_partition(data_root, cancer):
    (data_root / "landing" / "breast_cancer" / "2026-12-04").mkdir(parents=True)
    ref = ingest_partition(cancer, DAY)
    assert ref.file_count == 0
    assert ref.bytes == 0
    assert Path(ref.raw_uri).is_dir()


def test_ingest_changed_raw_copy_rejected(data_root, cancer, cancer_records):
    land(cancer, cancer_records, DAY)
    raw_file = Path(ingest_partition(cancer, DAY).raw_uri) / CSV_FILE
    os.chmod(raw_file, 0o644)
    raw_file.write_text("id,label\n")
    with pytest.raises(DataValidationError, match="changed after ingest"):
        ingest_partition(cancer, DAY)


def test_ingest_window_oldest_first(data_root, cancer, cancer_records):
    for offset in range(3):
        land(cancer, cancer_records, days_before(DAY, offset))
    refs = ingest_window(cancer, DAY, 3)
    assert [ref.partition_date for ref in refs] == ["2026-12-02", "2026-12-03", "2026-12-04"]
    assert sum(ref.file_count for ref in refs) == 3


def test_ingest_window_skips_missing_days(data_root, cancer, cancer_records, caplog):
    for offset in (0, 1, 3):
        land(cancer, cancer_records, days_before(DAY, offset))
    with caplog.at_level(logging.WARNING, logger="ml_loop.ingest"):
        refs = ingest_window(cancer, DAY, 5)
    assert [ref.partition_date for ref in refs] == ["2026-12-01", "2026-12-03", "2026-12-04"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2026-11-30, 2026-12-02" in warnings[0]


def test_ingest_window_never_reads_later_days(data_root, cancer, cancer_records):
    for offset in (-2, -1, 0, 1):
        land(cancer, cancer_records, days_before(DAY, offset))
    refs = ingest_window(cancer, DAY, 5)
    raw_dates = sorted(p.name for p in (data_root / "raw" / "breast_cancer").iterdir())
    assert [ref.partition_date for ref in refs] == ["2026-12-03", "2026-12-04"]
    assert raw_dates == ["2026-12-03", "2026-12-04"]


def test_ingest_window_requires_run_date(data_root, cancer, cancer_records):
    land(cancer, cancer_records, days_before(DAY, 1))
    with pytest.raises(PartitionNotFoundError, match="2026-12-04"):
        ingest_window(cancer, DAY, 3)
    assert not (data_root / "raw").exists()


def test_ingest_window_rejects_zero_days(data_root, cancer):
    with pytest.raises(SpecError, match="training_window_days=0"):
        ingest_window(cancer, DAY, 0)


def test_partition_ref_round_trip(data_root, cancer, cancer_records):
    land(cancer, cancer_records, DAY)
    ref = ingest_partition(cancer, DAY)
    payload = json.loads(json.dumps(ref.to_dict()))
    assert PartitionRef.from_dict(payload) == ref


def test_partition_ref_missing_key_rejected():
    with pytest.raises(ValueError, match="content_hash"):
        PartitionRef.from_dict({"dataset": "digits", "partition_date": "2026-12-04"})


def land_feedback(data_root: Path, spec, records, day: dt.date) -> Path:
    """Land a batch the regular way, then move it to the feedback area of the same day."""
    landed = land(spec, records, day)
    target = data_root / "landing_feedback" / spec.dataset.name / day.isoformat()
    target.parent.mkdir(parents=True, exist_ok=True)
    landed.rename(target)
    return target


def test_ingest_window_reads_feedback_before_regular(data_root, cancer, cancer_records):
    land_feedback(data_root, cancer, cancer_records, DAY)
    land_feedback(data_root, cancer, cancer_records, days_before(DAY, 1))
    land(cancer, cancer_records, days_before(DAY, 1))
    land(cancer, cancer_records, DAY)
    refs = ingest_window(cancer, DAY, 2)
    assert [(ref.partition_date, ref.source) for ref in refs] == [
        ("2026-12-03", "feedback"),
        ("2026-12-03", "landing"),
        ("2026-12-04", "feedback"),
        ("2026-12-04", "landing"),
    ]


def test_ingest_window_feedback_not_run_date(data_root, cancer, cancer_records):
    land_feedback(data_root, cancer, cancer_records, DAY)
    with pytest.raises(PartitionNotFoundError, match="2026-12-04"):
        ingest_window(cancer, DAY, 1)
