from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ml_loop.datasets import load_source
from ml_loop.errors import DataValidationError
from ml_loop.files import sha256_file
from ml_loop.ingest import ingest_window
from ml_loop.landing import land_partition
from ml_loop.process import (
    SPLIT_CODES,
    STD_FLOOR,
    ProcessedRef,
    load_processed,
    process_window,
    split_for_id,
)
from ml_loop.spec import ColumnSpec, SplitSpec, load_spec

DAY = dt.date(2026, 12, 4)
FEATURES = ("width", "depth")


@pytest.fixture(scope="module")
def digits():
    return load_spec("digits")


@pytest.fixture(scope="module")
def tabular():
    """The breast cancer spec cut down to two features, for hand-made tables."""
    spec = load_spec("breast_cancer")
    columns = tuple(ColumnSpec(name=name) for name in FEATURES)
    return dataclasses.replace(spec, dataset=dataclasses.replace(spec.dataset, columns=columns))


def write_table(
    root: Path, spec, day: dt.date, table: pd.DataFrame, source: str = "landing"
) -> dict:
    """Write a validated table for ``day`` as the validate stage would; return its reference."""
    raw_hash = hashlib.sha256(f"{spec.dataset.name}-{day}-{source}".encode()).hexdigest()
    folder = root / "validated" / spec.dataset.name / day.isoformat() / f"{raw_hash}-suite"
    folder.mkdir(parents=True, exist_ok=True)
    table.to_parquet(folder / "table.parquet", index=False)
    return {
        "dataset": spec.dataset.name,
        "partition_date": day.isoformat(),
        "raw_hash": raw_hash,
        "table_uri": str(folder / "table.parquet"),
        "rows": len(table),
        "quarantined": 0,
        "report_uri": str(folder / "report.html"),
        "results_uri": str(folder / "results.json"),
        "content_hash": sha256_file(folder / "table.parquet"),
    }


def feature_table(ids, labels, width, depth=None) -> pd.DataFrame:
    depth = width if depth is None else depth
    return pd.DataFrame(
        {
            "id": list(ids),
            "label": list(labels),
            "width": np.asarray(width, dtype=np.float64),
            "depth": np.asarray(depth, dtype=np.float64),
        }
    )


def ids_in_split(split_spec, name, count, prefix="r"):
    found = []
    index = 0
    while len(found) < count:
        record_id = f"{prefix}-{index:05d}"
        if split_for_id(record_id, split_spec) == name:
            found.append(record_id)
        index += 1
    return found


def validate_images(root: Path, spec, partition_ref) -> dict:
    """Build the validated table of an ingested image partition, as the validate stage would."""
    raw = Path(partition_ref.raw_uri)
    rows = []
    for path in sorted(raw.rglob("*.png")):
        with Image.open(path) as picture:
            pixels = np.asarray(picture, dtype=np.float64)
            rows.append(
                {
                    "id": path.stem,
                    "label": path.parent.name,
                    "path": path.relative_to(raw).as_posix(),
                    "width": picture.width,
                    "height": picture.height,
                    "mode": picture.mode,
                    "mean_intensity": pixels.mean(),
                    "std_intensity": pixels.std(),
                }
            )
    ref = write_table(
        root, spec, dt.date.fromisoformat(partition_ref.partition_date), pd.DataFrame(rows)
    )
    ref["raw_hash"] = partition_ref.content_hash
    return ref


def test_split_for_id_is_stable():
    split_spec = SplitSpec(validation=0.1, test=0.15)
    ids = [f"mnist-{index:05d}" for index in range(200)]
    first = [split_for_id(record_id, split_spec) for record_id in ids]
    again = [split_for_id(record_id, SplitSpec(validation=0.1, test=0.15)) for record_id in ids]
    assert first == again
    assert set(first) == {"train", "validation", "test"}


def test_split_shares_close_to_spec():
    split_spec = SplitSpec(validation=0.1, test=0.15)
    splits = [split_for_id(f"id-{index}", split_spec) for index in range(20_000)]
    assert splits.count("test") / len(splits) == pytest.approx(0.15, abs=0.01)
    assert splits.count("validation") / len(splits) == pytest.approx(0.1, abs=0.01)
    assert splits.count("train") / len(splits) == pytest.approx(0.75, abs=0.01)


def test_split_without_holdout_is_train():
    split_spec = SplitSpec(validation=0.0, test=0.0)
    assert {split_for_id(f"id-{index}", split_spec) for index in range(500)} == {"train"}


def test_process_images(data_root, digits):
    records = load_source(digits).take(range(0, 5000, 50))
    for offset in range(digits.dataset.landing_days):
        land_partition(digits, DAY - dt.timedelta(days=offset), records=records)
    partitions = ingest_window(digits, DAY, digits.dataset.landing_days)
    refs = [validate_images(data_root, digits, partition) for partition in partitions]
    ref = process_window(digits, refs)
    arrays, stats = load_processed(ref.processed_uri)
    index = list(arrays["ids"]).index(records.ids[7])
    assert ref.rows == 100
    assert arrays["x"].shape == (100, 1, 28, 28)
    assert arrays["x"].dtype == np.float32
    assert arrays["x"].min() >= 0.0
    assert arrays["x"].max() <= 1.0
    assert np.array_equal(arrays["x"][index, 0], records.images[7].astype(np.float32) / 255)
    assert arrays["y"][index] == digits.dataset.classes.index(records.labels[7])
    assert list(arrays["ids"]) == sorted(records.ids)
    assert len(stats["mean"]) == 1
    assert len(stats["std"]) == 1


def test_process_images_stats_from_train(data_root, digits):
    records = load_source(digits).take(range(0, 5000, 100))
    land_partition(digits, DAY, records=records)
    partitions = ingest_window(digits, DAY, 1)
    ref = process_window(digits, [validate_images(data_root, digits, partitions[0])])
    arrays, stats = load_processed(ref.processed_uri)
    train = arrays["x"][arrays["split"] == SPLIT_CODES["train"]]
    assert stats["mean"][0] == pytest.approx(float(train.mean(dtype=np.float64)), rel=1e-6)
    assert stats["std"][0] == pytest.approx(float(train.std(dtype=np.float64)), rel=1e-6)


def test_process_tabular_arrays(data_root, tabular):
    ids = [f"r-{index:05d}" for index in range(40)]
    labels = ["benign", "malignant"] * 20
    ref = process_window(
        tabular, [write_table(data_root, tabular, DAY, feature_table(ids, labels, range(40)))]
    )
    arrays, _ = load_processed(ref.processed_uri)
    expected_splits = [SPLIT_CODES[split_for_id(record_id, tabular.split)] for record_id in ids]
    assert arrays["x"].shape == (40, 2)
    assert arrays["x"].dtype == np.float32
    assert arrays["y"].dtype == np.int64
    assert arrays["split"].dtype == np.uint8
    assert arrays["split"].tolist() == expected_splits
    assert arrays["y"].tolist() == [1, 0] * 20
    assert sum(ref.split_counts.values()) == 40
    assert ref.split_counts["train"] == expected_splits.count(0)


def test_stats_fitted_on_train_only(data_root, tabular):
    train_ids = ids_in_split(tabular.split, "train", 20)
    held_out = ids_in_split(tabular.split, "test", 10) + ids_in_split(
        tabular.split, "validation", 10
    )
    widths = [float(index) for index in range(20)] + [1000.0] * 20
    table = feature_table(train_ids + held_out, ["benign"] * 40, widths)
    ref = process_window(tabular, [write_table(data_root, tabular, DAY, table)])
    _, stats = load_processed(ref.processed_uri)
    assert stats["mean"][0] == pytest.approx(np.mean(range(20)))
    assert stats["std"][0] == pytest.approx(np.std(range(20)))
    assert ref.split_counts == {"train": 20, "validation": 10, "test": 10}


def test_constant_feature_std_is_one(data_root, tabular):
    ids = ids_in_split(tabular.split, "train", 10)
    table = feature_table(ids, ["benign"] * 10, [3.0] * 10, range(10))
    ref = process_window(tabular, [write_table(data_root, tabular, DAY, table)])
    _, stats = load_processed(ref.processed_uri)
    assert stats["mean"][0] == pytest.approx(3.0)
    assert stats["std"][0] == 1.0
    assert stats["std"][1] > STD_FLOOR


def test_zero_count_class_listed(data_root, tabular):
    ids = [f"r-{index:05d}" for index in range(30)]
    ref = process_window(
        tabular,
        [write_table(data_root, tabular, DAY, feature_table(ids, ["benign"] * 30, range(30)))],
    )
    assert ref.class_counts == {"malignant": 0, "benign": ref.split_counts["train"]}


def test_dedup_latest_date_wins(data_root, tabular, caplog):
    ids = [f"r-{index:05d}" for index in range(10)]
    older = write_table(
        data_root,
        tabular,
        DAY - dt.timedelta(days=1),
        feature_table(ids[:6], ["benign"] * 6, [1.0] * 6),
    )
    newer = write_table(
        data_root, tabular, DAY, feature_table(ids[4:], ["malignant"] * 6, [2.0] * 6)
    )
    with caplog.at_level(logging.INFO, logger="ml_loop.process"):
        ref = process_window(tabular, [newer, older])
    arrays, _ = load_processed(ref.processed_uri)
    by_id = dict(zip(arrays["ids"].tolist(), arrays["x"][:, 0].tolist(), strict=True))
    assert ref.rows == 10
    assert by_id["r-00004"] == 2.0
    assert by_id["r-00005"] == 2.0
    assert by_id["r-00000"] == 1.0
    assert any("dropped 2 older copies" in record.getMessage() for record in caplog.records)


def test_rerun_returns_existing_output(data_root, tabular):
    ids = [f"r-{index:05d}" for index in range(20)]
    refs = [
        write_table(
            data_root,
            tabular,
            DAY - dt.timedelta(days=1),
            feature_table(ids[:10], ["benign"] * 10, range(10)),
        ),
        write_table(
            data_root, tabular, DAY, feature_table(ids[10:], ["malignant"] * 10, range(10))
        ),
    ]
    first = process_window(tabular, refs)
    mtime = (Path(first.processed_uri) / "data.npz").stat().st_mtime_ns
    second = process_window(tabular, list(reversed(refs)))
    assert second == first
    assert (Path(second.processed_uri) / "data.npz").stat().st_mtime_ns == mtime
    assert len(list((data_root / "processed" / tabular.dataset.name).iterdir())) == 1


def test_other_inputs_get_other_key(data_root, tabular):
    ids = [f"r-{index:05d}" for index in range(20)]
    first = process_window(
        tabular,
        [write_table(data_root, tabular, DAY, feature_table(ids, ["benign"] * 20, range(20)))],
    )
    second = process_window(
        tabular,
        [write_table(data_root, tabular, DAY, feature_table(ids, ["benign"] * 20, range(1, 21)))],
    )
    assert second.processed_uri != first.processed_uri
    assert second.content_hash != first.content_hash


def test_nullable_feature_filled_with_train_mean(data_root, tabular):
    columns = (ColumnSpec(name="width", nullable=True), ColumnSpec(name="depth"))
    spec = dataclasses.replace(
        tabular, dataset=dataclasses.replace(tabular.dataset, columns=columns)
    )
    ids = ids_in_split(spec.split, "train", 5)
    table = feature_table(ids, ["benign"] * 5, [1.0, 2.0, 3.0, np.nan, 6.0], range(5))
    ref = process_window(spec, [write_table(data_root, spec, DAY, table)])
    arrays, stats = load_processed(ref.processed_uri)
    assert stats["mean"][0] == pytest.approx(3.0)
    assert arrays["x"][3, 0] == pytest.approx(3.0)
    assert not np.isnan(arrays["x"]).any()


def test_missing_required_feature_rejected(data_root, tabular):
    table = feature_table(["r-1", "r-2"], ["benign"] * 2, [1.0, np.nan])
    with pytest.raises(DataValidationError, match="'width'"):
        process_window(tabular, [write_table(data_root, tabular, DAY, table)])


def test_no_partitions_rejected(data_root, tabular):
    with pytest.raises(DataValidationError, match="no validated partitions"):
        process_window(tabular, [])


def test_unknown_label_rejected(data_root, tabular):
    table = feature_table(["r-1", "r-2"], ["benign", "cyst"], [1.0, 2.0])
    with pytest.raises(DataValidationError, match="'cyst'"):
        process_window(tabular, [write_table(data_root, tabular, DAY, table)])


def test_other_dataset_rejected(data_root, tabular, digits):
    ref = write_table(data_root, tabular, DAY, feature_table(["r-1"], ["benign"], [1.0]))
    with pytest.raises(DataValidationError, match="'breast_cancer'"):
        process_window(digits, [ref])


def test_repeated_date_rejected(data_root, tabular):
    ref = write_table(data_root, tabular, DAY, feature_table(["r-1"], ["benign"], [1.0]))
    with pytest.raises(DataValidationError, match="2026-12-04"):
        process_window(tabular, [ref, dict(ref)])


def test_feedback_beside_regular_batch_of_a_day(data_root, tabular):
    regular = write_table(data_root, tabular, DAY, feature_table(["r-1"], ["benign"], [1.0]))
    feedback = write_table(
        data_root, tabular, DAY, feature_table(["f-1"], ["benign"], [2.0]), source="feedback"
    )
    processed = process_window(tabular, [feedback, regular])
    assert processed.rows == 2


def test_missing_column_rejected(data_root, tabular):
    table = feature_table(["r-1"], ["benign"], [1.0]).drop(columns=["depth"])
    with pytest.raises(DataValidationError, match="'depth'"):
        process_window(tabular, [write_table(data_root, tabular, DAY, table)])


def test_row_count_mismatch_rejected(data_root, tabular):
    ref = write_table(
        data_root, tabular, DAY, feature_table(["r-1", "r-2"], ["benign"] * 2, [1.0, 2.0])
    )
    ref["rows"] = 3
    with pytest.raises(DataValidationError, match="has 2 rows"):
        process_window(tabular, [ref])


def test_empty_train_split_rejected(data_root, tabular):
    ids = ids_in_split(tabular.split, "test", 3)
    with pytest.raises(DataValidationError, match="train split"):
        process_window(
            tabular,
            [write_table(data_root, tabular, DAY, feature_table(ids, ["benign"] * 3, range(3)))],
        )


def test_processed_ref_round_trip():
    ref = ProcessedRef("digits", "/data/processed/digits/k", 3, {"train": 3}, {"0": 3}, "abc")
    assert ProcessedRef.from_dict(ref.to_dict()) == ref
    with pytest.raises(ValueError, match="content_hash"):
        ProcessedRef.from_dict({"dataset": "digits"})
