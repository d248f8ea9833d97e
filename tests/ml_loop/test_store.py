from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml_loop.datasets import load_source
from ml_loop.errors import DataValidationError
from ml_loop.files import sha256_file
from ml_loop.ingest import ingest_window
from ml_loop.landing import CSV_FILE, land_partition
from ml_loop.process import load_processed, process_window
from ml_loop.spec import load_spec
from ml_loop.store import MANIFEST_FILE, SnapshotRef, load_snapshot, store_snapshot

REPO_ROOT = Path(__file__).resolve().parents[2]
DAY = dt.date(2026, 12, 4)

# Stores a snapshot with an on_staged hook that records the staging folder and then blocks, so
# the test can kill the process between writing the files and renaming the folder.
BLOCKING_STORE = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path

    from ml_loop.spec import load_spec
    from ml_loop.store import store_snapshot

    job = json.loads(Path(sys.argv[1]).read_text())

    def block(staging):
        Path(job["marker"]).write_text(str(staging))
        time.sleep(600)

    store_snapshot(
        load_spec("breast_cancer"), job["processed"], job["validated"], job["root"], block
    )
    """
)


@pytest.fixture(scope="module")
def cancer():
    return load_spec("breast_cancer")


@pytest.fixture(scope="module")
def cancer_records():
    return load_source(load_spec("breast_cancer"))


def validate_csv(root: Path, spec, partition_ref) -> dict:
    """Build the validated table of an ingested CSV partition, as the validate stage would."""
    table = pd.read_csv(Path(partition_ref.raw_uri) / CSV_FILE, dtype={"id": str, "label": str})
    folder = (
        root
        / "validated"
        / spec.dataset.name
        / partition_ref.partition_date
        / f"{partition_ref.content_hash}-suite"
    )
    folder.mkdir(parents=True, exist_ok=True)
    table.to_parquet(folder / "table.parquet", index=False)
    return {
        "dataset": spec.dataset.name,
        "partition_date": partition_ref.partition_date,
        "raw_hash": partition_ref.content_hash,
        "table_uri": str(folder / "table.parquet"),
        "rows": len(table),
        "quarantined": 0,
        "report_uri": str(folder / "report.html"),
        "results_uri": str(folder / "results.json"),
        "content_hash": sha256_file(folder / "table.parquet"),
    }


def prepare_window(root: Path, spec, records, end: dt.date, days: int) -> tuple[dict, list[dict]]:
    """Land, ingest, validate and process a window; return the processed and validated refs."""
    for offset in range(days):
        land_partition(spec, end - dt.timedelta(days=offset), root, records=records)
    validated = [validate_csv(root, spec, ref) for ref in ingest_window(spec, end, days, root)]
    return process_window(spec, validated, root).to_dict(), validated


def version_dirs(root: Path, spec) -> list[Path]:
    return sorted((root / "snapshots" / spec.dataset.name).iterdir())


def test_store_writes_manifest(data_root, cancer, cancer_records):
    processed, validated = prepare_window(data_root, cancer, cancer_records, DAY, 3)
    ref = store_snapshot(cancer, processed, validated)
    manifest = json.loads(Path(ref.manifest_uri).read_text())
    assert Path(ref.uri) == data_root / "snapshots" / "breast_cancer" / ref.version_id
    assert len(ref.version_id) == 16
    assert ref.rows == 569
    assert manifest["version_id"] == ref.version_id
    assert manifest["dataset"] == "breast_cancer"
    assert manifest["spec"] == {"name": "breast_cancer", "digest": cancer.digest()}
    assert manifest["schema"]["features"] == cancer.dataset.feature_names
    assert manifest["schema"]["input_shape"] == [30]
    assert manifest["schema"]["classes"] == ["malignant", "benign"]
    assert manifest["window"] == {"start": "2026-12-02", "end": "2026-12-04"}
    assert manifest["parent_version"] is None
    assert manifest["data_sha256"] == sha256_file(Path(ref.uri) / "data.npz")
    assert manifest["stats"] == load_processed(processed["processed_uri"])[1]


def test_store_manifest_counts(data_root, cancer, cancer_records):
    processed, validated = prepare_window(data_root, cancer, cancer_records, DAY, 3)
    manifest = json.loads(
        Path(store_snapshot(cancer, processed, validated).manifest_uri).read_text()
    )
    counts = manifest["counts"]
    assert counts["rows"] == 569
    assert sum(counts["splits"].values()) == 569
    assert counts["splits"] == processed["split_counts"]
    assert counts["classes"]["train"] == processed["class_counts"]
    for split, per_class in counts["classes"].items():
        assert sum(per_class.values()) == counts["splits"][split]
    assert sum(counts["classes"][split]["malignant"] for split in counts["classes"]) == 212


def test_store_manifest_source_partitions(data_root, cancer, cancer_records):
    processed, validated = prepare_window(data_root, cancer, cancer_records, DAY, 3)
    manifest = json.loads(
        Path(store_snapshot(cancer, processed, validated).manifest_uri).read_text()
    )
    sources = manifest["source_partitions"]
    assert [source["partition_date"] for source in sources] == [
        "2026-12-02",
        "2026-12-03",
        "2026-12-04",
    ]
    assert [source["report_uri"] for source in sources] == [ref["report_uri"] for ref in validated]
    assert [source["raw_hash"] for source in sources] == [ref["raw_hash"] for ref in validated]
    assert [source["content_hash"] for source in sources] == [
        ref["content_hash"] for ref in validated
    ]
    assert sum(source["rows"] for source in sources) == 569


def test_store_rerun_same_version(data_root, cancer, cancer_records):
    processed, validated = prepare_window(data_root, cancer, cancer_records, DAY, 3)
    first = store_snapshot(cancer, processed, validated)
    mtime = Path(first.manifest_uri).stat().st_mtime_ns
    second = store_snapshot(cancer, processed, validated)
    assert second == first
    assert Path(second.manifest_uri).stat().st_mtime_ns == mtime
    assert version_dirs(data_root, cancer) == [Path(first.uri)]


def test_version_id_ignores_file_bytes(tmp_path, cancer, cancer_records):
    first_root, second_root = tmp_path / "first", tmp_path / "second"
    first = store_snapshot(
        cancer, *prepare_window(first_root, cancer, cancer_records, DAY, 3), first_root
    )
    processed, validated = prepare_window(second_root, cancer, cancer_records, DAY, 3)
    data_path = Path(processed["processed_uri"]) / "data.npz"
    arrays, _ = load_processed(processed["processed_uri"])
    np.savez(data_path, **arrays)  # the same arrays, stored without compression
    second = store_snapshot(cancer, processed, validated, second_root)
    first_manifest = json.loads(Path(first.manifest_uri).read_text())
    second_manifest = json.loads(Path(second.manifest_uri).read_text())
    assert second_manifest["data_sha256"] != first_manifest["data_sha256"]
    assert second.version_id == first.version_id


def test_parent_version(data_root, cancer, cancer_records):
    previous_day = DAY - dt.timedelta(days=1)
    older = store_snapshot(
        cancer, *prepare_window(data_root, cancer, cancer_records, previous_day, 1)
    )
    newer = store_snapshot(cancer, *prepare_window(data_root, cancer, cancer_records, DAY, 1))
    assert newer.version_id != older.version_id
    assert older.parent_version is None
    assert newer.parent_version == older.version_id


def test_parent_version_skips_later_windows(data_root, cancer, cancer_records):
    later = store_snapshot(cancer, *prepare_window(data_root, cancer, cancer_records, DAY, 1))
    backfilled = store_snapshot(
        cancer, *prepare_window(data_root, cancer, cancer_records, DAY - dt.timedelta(days=1), 1)
    )
    assert later.parent_version is None
    assert backfilled.parent_version is None


def test_load_snapshot_round_trip(data_root, cancer, cancer_records):
    processed, validated = prepare_window(data_root, cancer, cancer_records, DAY, 3)
    ref = store_snapshot(cancer, processed, validated)
    arrays, manifest = load_snapshot(ref.uri)
    expected, _ = load_processed(processed["processed_uri"])
    assert manifest["version_id"] == ref.version_id
    assert sorted(arrays) == ["ids", "split", "x", "y"]
    for name in expected:
        assert np.array_equal(arrays[name], expected[name])
    assert load_snapshot(ref.manifest_uri)[1] == manifest


def test_load_snapshot_changed_data_rejected(data_root, cancer, cancer_records):
    ref = store_snapshot(cancer, *prepare_window(data_root, cancer, cancer_records, DAY, 1))
    with (Path(ref.uri) / "data.npz").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(DataValidationError, match="SHA-256"):
        load_snapshot(ref.uri)


def test_load_snapshot_missing_rejected(data_root):
    with pytest.raises(FileNotFoundError, match=r"manifest\.json"):
        load_snapshot(data_root / "snapshots" / "breast_cancer" / "0123456789abcdef")


def test_changed_processed_output_rejected(data_root, cancer, cancer_records):
    processed, validated = prepare_window(data_root, cancer, cancer_records, DAY, 1)
    processed["content_hash"] = "0" * 64
    with pytest.raises(DataValidationError, match="changed after the process stage"):
        store_snapshot(cancer, processed, validated)


def test_no_validated_partitions_rejected(data_root, cancer, cancer_records):
    processed, _ = prepare_window(data_root, cancer, cancer_records, DAY, 1)
    with pytest.raises(DataValidationError, match="no validated partitions"):
        store_snapshot(cancer, processed, [])


def test_failed_staging_leaves_nothing(data_root, cancer, cancer_records):
    processed, validated = prepare_window(data_root, cancer, cancer_records, DAY, 1)

    def fail(staging):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        store_snapshot(cancer, processed, validated, on_staged=fail)
    assert version_dirs(data_root, cancer) == []


def test_snapshot_ref_round_trip():
    ref = SnapshotRef("digits", "0123456789abcdef", "/s", "/s/manifest.json", 5, None)
    assert SnapshotRef.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref
    with pytest.raises(ValueError, match="version_id"):
        SnapshotRef.from_dict({"dataset": "digits"})


def test_retry_after_kill(tmp_path, data_root, cancer, cancer_records):
    processed, validated = prepare_window(data_root, cancer, cancer_records, DAY, 3)
    marker = tmp_path / "staged.txt"
    job = tmp_path / "job.json"
    job.write_text(
        json.dumps(
            {
                "processed": processed,
                "validated": validated,
                "root": str(data_root),
                "marker": str(marker),
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "include")}
    writer = subprocess.Popen(
        [sys.executable, "-c", BLOCKING_STORE, str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and writer.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), writer.stderr.read().decode() if writer.poll() is not None else ""
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        writer.stdout.close()
        writer.stderr.close()

    staging = Path(marker.read_text())
    leftovers = version_dirs(data_root, cancer)
    assert leftovers == [staging]
    assert staging.name.startswith(".tmp-")
    assert (staging / MANIFEST_FILE).is_file()

    ref = store_snapshot(cancer, processed, validated)
    arrays, manifest = load_snapshot(ref.uri)
    assert version_dirs(data_root, cancer) == [Path(ref.uri)]
    assert manifest["version_id"] == ref.version_id
    assert len(arrays["ids"]) == 569
