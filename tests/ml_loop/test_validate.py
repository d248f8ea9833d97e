"""Unit tests of ml_loop.validate on tiny raw partitions written into tmp_path."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ml_loop import files, validate
from ml_loop.errors import DataValidationError
from ml_loop.spec import ExpectationsSpec, PipelineSpec, load_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
DAY = "2026-11-03"
EARLIER_DAY = "2026-11-02"


def tiny_digits(min_rows: int = 2, max_rows: int = 20) -> PipelineSpec:
    spec = load_spec("digits")
    return dataclasses.replace(spec, expectations=ExpectationsSpec(min_rows, max_rows))


def tiny_tabular(min_rows: int = 2, max_rows: int = 20) -> PipelineSpec:
    spec = load_spec("breast_cancer")
    dataset = dataclasses.replace(spec.dataset, columns=spec.dataset.columns[:3])
    return dataclasses.replace(
        spec, dataset=dataset, expectations=ExpectationsSpec(min_rows, max_rows)
    )


def write_png(path: Path, size: tuple[int, int] = (28, 28), mode: str = "L", value: int = 60):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode).save(path)


def image_partition(root: Path, day: str = DAY, count: int = 4) -> Path:
    raw = root / "raw" / "digits" / day / "copy"
    for i in range(count):
        write_png(raw / str(i % 3) / f"{day}-{i}.png", value=40 + i)
    (raw / validate.MANIFEST_NAME).write_text("{}")
    return raw


def csv_text(spec: PipelineSpec, rows: list[list[object]]) -> str:
    header = ",".join(["id", "label", *spec.dataset.feature_names])
    return header + "\n" + "".join(",".join(str(v) for v in row) + "\n" for row in rows)


def good_rows(count: int = 4, prefix: str = "r") -> list[list[object]]:
    return [
        [f"{prefix}{i}", "benign" if i % 2 else "malignant", 10 + i, 20.5, 80] for i in range(count)
    ]


def tabular_partition(root: Path, text: str, day: str = DAY) -> Path:
    raw = root / "raw" / "breast_cancer" / day / "copy"
    raw.mkdir(parents=True)
    (raw / "part-00000.csv").write_text(text)
    (raw / validate.MANIFEST_NAME).write_text("{}")
    return raw


def ref_for(spec: PipelineSpec, raw: Path, day: str = DAY) -> dict:
    return {
        "dataset": spec.dataset.name,
        "partition_date": day,
        "raw_uri": str(raw),
        "file_count": sum(1 for p in raw.rglob("*") if p.is_file()),
        "bytes": sum(p.stat().st_size for p in raw.rglob("*") if p.is_file()),
        "content_hash": files.sha256_tree(raw),
    }


def quarantine_entries(root: Path, partition: dict) -> list[dict]:
    folder = root / "quarantine" / partition["dataset"] / partition["partition_date"]
    log = folder / partition["content_hash"] / validate.QUARANTINE_LOG_NAME
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_images_table_schema(tmp_path):
    spec = tiny_digits()
    partition = ref_for(spec, image_partition(tmp_path))

    ref = validate.validate_partition(spec, partition, tmp_path)
    table = pd.read_parquet(ref.table_uri)

    assert list(table.columns) == list(validate.IMAGE_TABLE_COLUMNS)
    assert ref.rows == 4
    assert ref.quarantined == 0
    assert table["width"].dtype == "int64"
    assert table["mean_intensity"].dtype == "float64"
    assert set(table["label"]) <= set(spec.dataset.classes)
    assert (Path(partition["raw_uri"]) / table["path"].iloc[0]).is_file()
    assert ref.content_hash == files.sha256_file(Path(ref.table_uri))
    assert Path(ref.report_uri).is_file()
    assert Path(ref.results_uri).is_file()


def test_tabular_table_schema(tmp_path):
    spec = tiny_tabular()
    partition = ref_for(spec, tabular_partition(tmp_path, csv_text(spec, good_rows())))

    ref = validate.validate_partition(spec, partition, tmp_path)
    table = pd.read_parquet(ref.table_uri)

    assert list(table.columns) == ["id", "label", *spec.dataset.feature_names]
    assert all(table[name].dtype == "float64" for name in spec.dataset.feature_names)
    assert table["id"].tolist() == ["r0", "r1", "r2", "r3"]
    assert table["mean_radius"].tolist() == [10.0, 11.0, 12.0, 13.0]


def test_results_contain_both_suites(tmp_path):
    spec = tiny_tabular()
    partition = ref_for(spec, tabular_partition(tmp_path, csv_text(spec, good_rows())))

    ref = validate.validate_partition(spec, partition, tmp_path)
    results = json.loads(Path(ref.results_uri).read_text())

    assert results["row_level"]["success"] is True
    assert results["batch_level"]["success"] is True
    assert len(results["batch_level"]["results"]) == len(validate.batch_expectations(spec))


def test_ref_round_trip():
    ref = validate.ValidatedRef("digits", DAY, "ab" * 8, "/t", 3, 1, "/r", "/j", "cd" * 8)

    assert validate.ValidatedRef.from_dict(ref.to_dict()) == ref


def test_ref_from_dict_missing_key():
    data = validate.ValidatedRef("digits", DAY, "ab" * 8, "/t", 3, 1, "/r", "/j", "cd").to_dict()
    del data["rows"]

    with pytest.raises(ValueError, match="rows"):
        validate.ValidatedRef.from_dict(data)


def test_rerun_returns_cached(tmp_path):
    spec = tiny_digits()
    partition = ref_for(spec, image_partition(tmp_path))
    first = validate.validate_partition(spec, partition, tmp_path)
    folder = Path(first.table_uri).parent
    before = {path: path.stat().st_mtime_ns for path in folder.iterdir()}

    second = validate.validate_partition(spec, partition, tmp_path)

    assert second == first
    assert {path: path.stat().st_mtime_ns for path in folder.iterdir()} == before


def test_cached_rerun_skips_gx_import(tmp_path):
    spec = tiny_digits()
    partition = ref_for(spec, image_partition(tmp_path))
    first = validate.validate_partition(spec, partition, tmp_path)
    script = (
        "import dataclasses, json, sys\n"
        "from ml_loop import validate\n"
        "from ml_loop.spec import ExpectationsSpec, load_spec\n"
        "spec = dataclasses.replace(load_spec('digits'), expectations=ExpectationsSpec(2, 20))\n"
        f"ref = validate.validate_partition(spec, json.loads({json.dumps(json.dumps(partition))}),"
        f" {str(tmp_path)!r})\n"
        "print(json.dumps({'ref': ref.to_dict(), 'loaded': sorted(m for m in "
        "('great_expectations', 'pandas', 'PIL') if m in sys.modules)}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "include")}

    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    output = json.loads(completed.stdout.strip().splitlines()[-1])

    assert output["ref"] == first.to_dict()
    assert output["loaded"] == []


def test_suite_hash_changes_with_spec(tmp_path):
    spec = tiny_digits()
    wider = tiny_digits(max_rows=30)
    partition = ref_for(spec, image_partition(tmp_path))

    first = validate.validate_partition(spec, partition, tmp_path)
    second = validate.validate_partition(wider, partition, tmp_path)

    assert validate.suite_hash(spec) == validate.suite_hash(tiny_digits())
    assert validate.suite_hash(spec) != validate.suite_hash(wider)
    assert Path(second.table_uri).parent != Path(first.table_uri).parent
    assert Path(first.table_uri).is_file()
    assert Path(second.table_uri).parent.name.endswith(validate.suite_hash(wider))


def test_row_expectations_follow_spec():
    spec = tiny_tabular()
    suite = validate.row_expectations(spec)
    ranges = {
        item["kwargs"]["column"]: (item["kwargs"]["min_value"], item["kwargs"]["max_value"])
        for item in suite
        if item["type"] == "expect_column_values_to_be_between"
    }
    label_sets = [
        item["kwargs"]["value_set"]
        for item in suite
        if item["type"] == "expect_column_values_to_be_in_set"
        and item["kwargs"]["column"] == "label"
    ]

    assert ranges == {column.name: (column.min, column.max) for column in spec.dataset.columns}
    assert label_sets == [["malignant", "benign"]]
    assert "id" not in ranges


def test_row_expectations_images():
    spec = tiny_digits()
    suite = validate.row_expectations(spec)
    checked = {(item["type"], item["kwargs"].get("column")) for item in suite}

    assert ("expect_column_values_to_be_in_set", "decodes") in checked
    assert ("expect_column_values_to_be_in_set", "width") in checked
    assert ("expect_column_values_to_be_between", "mean_intensity") in checked
    assert ("expect_column_values_to_be_unique", "id") in checked
    assert ("expect_column_values_to_match_regex", "mean_radius__raw") not in checked


def test_quarantine_keeps_bad_row(tmp_path):
    spec = tiny_tabular()
    rows = [*good_rows(), ["r9", "benign", 999, 20.5, 80]]
    partition = ref_for(spec, tabular_partition(tmp_path, csv_text(spec, rows)))

    ref = validate.validate_partition(spec, partition, tmp_path)
    (entry,) = quarantine_entries(tmp_path, partition)
    folder = Path(tmp_path / "quarantine" / "breast_cancer" / DAY / partition["content_hash"])
    rejected = pd.read_csv(folder / "part-00000.csv", dtype=str)
    table = pd.read_parquet(ref.table_uri)

    assert ref.rows == 4
    assert ref.quarantined == 1
    assert "r9" not in set(table["id"])
    assert rejected["id"].tolist() == ["r9"]
    assert rejected["mean_radius"].tolist() == ["999"]
    assert entry["row"] == 5
    assert entry["column"] == "mean_radius"
    assert entry["rule"] == "expect_column_values_to_be_between"
    assert entry["value"] == 999.0


def test_duplicate_ids_quarantined(tmp_path):
    spec = tiny_tabular()
    rows = [*good_rows(), ["r1", "benign", 12, 20.5, 80]]
    partition = ref_for(spec, tabular_partition(tmp_path, csv_text(spec, rows)))

    ref = validate.validate_partition(spec, partition, tmp_path)
    entries = quarantine_entries(tmp_path, partition)

    assert ref.quarantined == 2
    assert [entry["row"] for entry in entries] == [2, 5]
    assert {entry["rule"] for entry in entries} == {"expect_column_values_to_be_unique"}


def test_first_failure_leads_entry(tmp_path):
    spec = tiny_tabular()
    rows = [*good_rows(), ["r9", "unknown", "abc", 20.5, -1]]
    partition = ref_for(spec, tabular_partition(tmp_path, csv_text(spec, rows)))

    validate.validate_partition(spec, partition, tmp_path)
    (entry,) = quarantine_entries(tmp_path, partition)
    rules = [(failure["rule"], failure["column"]) for failure in entry["failures"]]

    assert entry["rule"] == "expect_column_values_to_match_regex"
    assert rules[0] == ("expect_column_values_to_match_regex", "mean_radius")
    assert ("expect_column_values_to_be_between", "mean_perimeter") in rules
    assert ("expect_column_values_to_be_in_set", "label") in rules


def test_batch_failure_keeps_report(tmp_path):
    spec = tiny_tabular(min_rows=10)
    partition = ref_for(spec, tabular_partition(tmp_path, csv_text(spec, good_rows())))
    folder = tmp_path / "quarantine" / "breast_cancer" / DAY / partition["content_hash"]

    with pytest.raises(DataValidationError) as raised:
        validate.validate_partition(spec, partition, tmp_path)
    message = str(raised.value)

    assert f"partition {DAY} of breast_cancer" in message
    assert "expect_table_row_count_to_be_between: observed 4 rows, expected 10 to 20" in message
    assert str(folder / validate.REPORT_NAME) in message
    assert (folder / validate.REPORT_NAME).is_file()
    assert (folder / validate.RESULTS_NAME).is_file()
    assert not (tmp_path / "validated" / "breast_cancer" / DAY).exists()


def test_failed_rerun_validates_again(tmp_path):
    spec = tiny_tabular(min_rows=10)
    partition = ref_for(spec, tabular_partition(tmp_path, csv_text(spec, good_rows())))
    with pytest.raises(DataValidationError):
        validate.validate_partition(spec, partition, tmp_path)

    ref = validate.validate_partition(tiny_tabular(), partition, tmp_path)

    assert ref.rows == 4


def test_quarantine_replaced_on_suite_change(tmp_path):
    spec = tiny_tabular()
    rows = [*good_rows(), ["r9", "benign", 40, 20.5, 80]]
    partition = ref_for(spec, tabular_partition(tmp_path, csv_text(spec, rows)))
    validate.validate_partition(spec, partition, tmp_path)
    columns = list(spec.dataset.columns)
    columns[0] = dataclasses.replace(columns[0], max=30.0)
    stricter = dataclasses.replace(
        spec, dataset=dataclasses.replace(spec.dataset, columns=tuple(columns))
    )

    validate.validate_partition(stricter, partition, tmp_path)
    entries = quarantine_entries(tmp_path, partition)
    leftovers = list((tmp_path / "quarantine" / "breast_cancer" / DAY).glob(".tmp-*"))

    assert [entry["id"] for entry in entries] == ["r9"]
    assert leftovers == []


def test_window_skips_earlier_failure(tmp_path, caplog):
    spec = tiny_digits(min_rows=3)
    earlier = ref_for(spec, image_partition(tmp_path, EARLIER_DAY, count=1), EARLIER_DAY)
    today = ref_for(spec, image_partition(tmp_path, DAY, count=4), DAY)

    with caplog.at_level(logging.WARNING, logger="ml_loop.validate"):
        refs = validate.validate_window(spec, [earlier, today], DAY, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    assert [ref.partition_date for ref in refs] == [DAY]
    assert len(warnings) == 1
    assert EARLIER_DAY in warnings[0]
    assert "expect_table_row_count_to_be_between" in warnings[0]


def test_window_raises_on_run_date(tmp_path):
    spec = tiny_digits(min_rows=3)
    earlier = ref_for(spec, image_partition(tmp_path, EARLIER_DAY, count=4), EARLIER_DAY)
    today = ref_for(spec, image_partition(tmp_path, DAY, count=1), DAY)

    with pytest.raises(DataValidationError, match=f"partition {DAY} of digits"):
        validate.validate_window(spec, [earlier, today], DAY, tmp_path)


def test_window_skips_failed_feedback_on_run_date(tmp_path, caplog):
    spec = tiny_digits(min_rows=3)
    feedback = {
        **ref_for(spec, image_partition(tmp_path / "feedback", DAY, count=1), DAY),
        "source": "feedback",
    }
    today = ref_for(spec, image_partition(tmp_path, DAY, count=4), DAY)

    with caplog.at_level(logging.WARNING, logger="ml_loop.validate"):
        refs = validate.validate_window(spec, [feedback, today], DAY, tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    assert [ref.raw_hash for ref in refs] == [today["content_hash"]]
    assert len(warnings) == 1


def test_partition_ref_unsafe_hash(tmp_path):
    spec = tiny_digits()
    partition = {**ref_for(spec, image_partition(tmp_path)), "content_hash": "../../escape"}

    with pytest.raises(ValueError, match="content_hash"):
        validate.validate_partition(spec, partition, tmp_path)
    assert not (tmp_path / "validated").exists()


def test_partition_ref_wrong_dataset(tmp_path):
    partition = ref_for(tiny_digits(), image_partition(tmp_path))

    with pytest.raises(ValueError, match="does not match spec dataset"):
        validate.validate_partition(tiny_tabular(), partition, tmp_path)


def test_partition_raw_folder_missing(tmp_path):
    spec = tiny_digits()
    partition = {**ref_for(spec, image_partition(tmp_path)), "raw_uri": str(tmp_path / "gone")}

    with pytest.raises(DataValidationError, match="not found"):
        validate.validate_partition(spec, partition, tmp_path)


def test_gx_settings_restored(tmp_path, capfd):
    spec = tiny_digits()
    partition = ref_for(spec, image_partition(tmp_path))
    before_env = os.environ.get("GX_ANALYTICS_ENABLED")
    before_level = logging.getLogger("great_expectations").level

    validate.validate_partition(spec, partition, tmp_path)
    captured = capfd.readouterr()

    assert os.environ.get("GX_ANALYTICS_ENABLED") == before_env
    assert logging.getLogger("great_expectations").level == before_level
    assert "Calculating Metrics" not in captured.err


def test_report_escapes_values(tmp_path):
    spec = tiny_tabular()
    rows = [*good_rows(), ["r9", "<script>alert(1)</script>", 12, 20.5, 80]]
    partition = ref_for(spec, tabular_partition(tmp_path, csv_text(spec, rows)))

    ref = validate.validate_partition(spec, partition, tmp_path)
    report = Path(ref.report_uri).read_text()

    assert "<script>" not in report
    assert "&lt;script&gt;" in report
    assert "http" not in report


def test_symlink_image_not_followed(tmp_path):
    spec = tiny_digits()
    raw = image_partition(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the raw folder")
    (raw / "1" / "link.png").symlink_to(secret)
    partition = ref_for(spec, raw)

    validate.validate_partition(spec, partition, tmp_path)
    (entry,) = quarantine_entries(tmp_path, partition)
    copy = tmp_path / "quarantine" / "digits" / DAY / partition["content_hash"] / "1" / "link.png"

    assert entry["file"] == "1/link.png"
    assert "symbolic link" in entry["reason"]
    assert copy.is_symlink()


def test_decode_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(validate, "MAX_DECODE_PIXELS", 100)
    spec = tiny_digits(min_rows=0)
    partition = ref_for(spec, image_partition(tmp_path, count=1))

    ref = validate.validate_partition(spec, partition, tmp_path)
    (entry,) = quarantine_entries(tmp_path, partition)

    assert ref.quarantined == 1
    assert "exceeds the decode limit" in entry["reason"]


def test_tabular_ignores_other_files(tmp_path, caplog):
    spec = tiny_tabular()
    raw = tabular_partition(tmp_path, csv_text(spec, good_rows()))
    (raw / "notes.txt").write_text("not data")
    partition = ref_for(spec, raw)

    with caplog.at_level(logging.WARNING, logger="ml_loop.validate"):
        ref = validate.validate_partition(spec, partition, tmp_path)

    assert ref.rows == 4
    assert any("notes.txt" in record.getMessage() for record in caplog.records)


def test_symlink_folder_not_followed(tmp_path):
    spec = tiny_digits()
    raw = image_partition(tmp_path)
    outside = tmp_path / "outside"
    write_png(outside / "elsewhere.png")
    (raw / "8").symlink_to(outside, target_is_directory=True)
    partition = ref_for(spec, raw)

    ref = validate.validate_partition(spec, partition, tmp_path)
    (entry,) = quarantine_entries(tmp_path, partition)

    assert ref.rows == 4
    assert entry["file"] == "8"
    assert "symbolic link" in entry["reason"]


def test_symlink_csv_rejected(tmp_path):
    spec = tiny_tabular()
    raw = tmp_path / "raw" / "breast_cancer" / DAY / "copy"
    raw.mkdir(parents=True)
    outside = tmp_path / "outside.csv"
    outside.write_text(csv_text(spec, good_rows()))
    (raw / "part-00000.csv").symlink_to(outside)
    partition = ref_for(spec, raw)

    with pytest.raises(DataValidationError, match=r"part-00000\.csv \(csv_symlink\)"):
        validate.validate_partition(spec, partition, tmp_path)
    copy = tmp_path / "quarantine" / "breast_cancer" / DAY / partition["content_hash"]

    assert (copy / "part-00000.csv").is_symlink()
