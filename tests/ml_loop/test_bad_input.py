"""Bad raw partitions: each case writes one small bad input and checks what validation reports.

Every test first validates a good partition of an earlier day and checks that the bad one leaves
that validated folder unchanged. The bad partition is either quarantined row by row (the entry
names the file, the row or column, and the rule) or rejected with a DataValidationError whose
message names them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml_loop import files, validate
from ml_loop.errors import DataValidationError
from ml_loop.spec import ExpectationsSpec, PipelineSpec, load_spec

DAY = "2026-11-03"
EARLIER_DAY = "2026-11-02"
CSV_NAME = "part-00000.csv"


def tiny_digits(min_rows: int = 2, max_rows: int = 20) -> PipelineSpec:
    spec = load_spec("digits")
    return dataclasses.replace(spec, expectations=ExpectationsSpec(min_rows, max_rows))


def tiny_tabular(min_rows: int = 2, max_rows: int = 20) -> PipelineSpec:
    spec = load_spec("breast_cancer")
    dataset = dataclasses.replace(spec.dataset, columns=spec.dataset.columns[:3])
    return dataclasses.replace(
        spec, dataset=dataset, expectations=ExpectationsSpec(min_rows, max_rows)
    )


def raw_folder(root: Path, dataset: str, day: str) -> Path:
    raw = root / "raw" / dataset / day / "copy"
    raw.mkdir(parents=True)
    (raw / validate.MANIFEST_NAME).write_text("{}")
    return raw


def write_png(path: Path, size: tuple[int, int] = (28, 28), mode: str = "L", value: int = 60):
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode).save(path)


def good_images(raw: Path, count: int = 3) -> None:
    for i in range(count):
        write_png(raw / str(i) / f"{raw.parent.name}-{i}.png")


def header(spec: PipelineSpec) -> str:
    return ",".join(["id", "label", *spec.dataset.feature_names]) + "\n"


def good_lines(count: int = 3, prefix: str = "r") -> str:
    return "".join(f"{prefix}{i},benign,{10 + i % 20},20.5,80\n" for i in range(count))


def ref_for(spec: PipelineSpec, raw: Path, day: str = DAY) -> dict:
    return {
        "dataset": spec.dataset.name,
        "partition_date": day,
        "raw_uri": str(raw),
        "file_count": sum(1 for p in raw.rglob("*") if p.is_file()),
        "bytes": sum(p.stat().st_size for p in raw.rglob("*") if p.is_file()),
        "content_hash": files.sha256_tree(raw),
    }


def validate_earlier(root: Path, spec: PipelineSpec) -> tuple[Path, str]:
    """Validate a good partition of the day before; return its folder and content hash."""
    raw = raw_folder(root, spec.dataset.name, EARLIER_DAY)
    if spec.dataset.kind == "images":
        good_images(raw)
    else:
        (raw / CSV_NAME).write_text(header(spec) + good_lines(prefix="e"))
    ref = validate.validate_partition(spec, ref_for(spec, raw, EARLIER_DAY), root)
    folder = Path(ref.table_uri).parent
    return folder, files.sha256_tree(folder)


def assert_unchanged(root: Path, spec: PipelineSpec, earlier: tuple[Path, str]) -> None:
    folder, digest = earlier
    validated = root / "validated" / spec.dataset.name / EARLIER_DAY
    assert [path.name for path in validated.iterdir()] == [folder.name]
    assert files.sha256_tree(folder) == digest


def quarantine_entries(root: Path, partition: dict) -> list[dict]:
    folder = root / "quarantine" / partition["dataset"] / DAY / partition["content_hash"]
    lines = (folder / validate.QUARANTINE_LOG_NAME).read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.fixture
def tabular(tmp_path):
    spec = tiny_tabular()
    return spec, validate_earlier(tmp_path, spec)


@pytest.fixture
def images(tmp_path):
    spec = tiny_digits()
    return spec, validate_earlier(tmp_path, spec)


def test_empty_partition(tmp_path, images):
    spec, earlier = images
    partition = ref_for(spec, raw_folder(tmp_path, "digits", DAY))

    with pytest.raises(DataValidationError) as raised:
        validate.validate_partition(spec, partition, tmp_path)
    message = str(raised.value)

    assert f"partition {DAY} of digits" in message
    assert "expect_table_row_count_to_be_between: observed 0 rows" in message
    assert "contains no data files" in message
    assert_unchanged(tmp_path, spec, earlier)


def test_csv_header_only(tmp_path, tabular):
    spec, earlier = tabular
    raw = raw_folder(tmp_path, "breast_cancer", DAY)
    (raw / CSV_NAME).write_text(header(spec))
    partition = ref_for(spec, raw)

    with pytest.raises(DataValidationError) as raised:
        validate.validate_partition(spec, partition, tmp_path)
    message = str(raised.value)

    assert "expect_table_row_count_to_be_between: observed 0 rows, expected 2 to 20" in message
    assert CSV_NAME in message
    assert "contain no records" in message
    assert_unchanged(tmp_path, spec, earlier)


def test_csv_semicolon_delimiter(tmp_path, tabular):
    spec, earlier = tabular
    raw = raw_folder(tmp_path, "breast_cancer", DAY)
    (raw / CSV_NAME).write_text((header(spec) + good_lines()).replace(",", ";"))
    partition = ref_for(spec, raw)

    with pytest.raises(DataValidationError) as raised:
        validate.validate_partition(spec, partition, tmp_path)
    message = str(raised.value)
    (entry,) = quarantine_entries(tmp_path, partition)

    assert CSV_NAME in message
    assert "csv_delimiter" in message
    assert "semicolon" in message
    assert "comma-separated" in message
    assert entry["file"] == CSV_NAME
    assert entry["rule"] == "csv_delimiter"
    assert_unchanged(tmp_path, spec, earlier)


def test_csv_utf8_bom(tmp_path, tabular):
    spec, earlier = tabular
    raw = raw_folder(tmp_path, "breast_cancer", DAY)
    (raw / CSV_NAME).write_text(header(spec) + good_lines(), encoding="utf-8-sig")
    partition = ref_for(spec, raw)

    with pytest.raises(DataValidationError) as raised:
        validate.validate_partition(spec, partition, tmp_path)
    message = str(raised.value)
    copy = tmp_path / "quarantine" / "breast_cancer" / DAY / partition["content_hash"] / CSV_NAME

    assert CSV_NAME in message
    assert "csv_utf8_bom" in message
    assert "byte order mark" in message
    assert copy.read_bytes() == (raw / CSV_NAME).read_bytes()
    assert_unchanged(tmp_path, spec, earlier)


def test_csv_duplicate_columns(tmp_path, tabular):
    spec, earlier = tabular
    raw = raw_folder(tmp_path, "breast_cancer", DAY)
    duplicated = header(spec).replace("mean_texture", "mean_radius")
    (raw / CSV_NAME).write_text(duplicated + good_lines())
    partition = ref_for(spec, raw)

    with pytest.raises(DataValidationError) as raised:
        validate.validate_partition(spec, partition, tmp_path)
    message = str(raised.value)

    assert CSV_NAME in message
    assert "csv_duplicate_columns" in message
    assert "'mean_radius'" in message
    assert_unchanged(tmp_path, spec, earlier)


def test_csv_missing_column(tmp_path, tabular):
    spec, earlier = tabular
    raw = raw_folder(tmp_path, "breast_cancer", DAY)
    (raw / CSV_NAME).write_text(header(spec).replace("mean_texture", "texture") + good_lines())
    partition = ref_for(spec, raw)

    with pytest.raises(DataValidationError) as raised:
        validate.validate_partition(spec, partition, tmp_path)
    message = str(raised.value)

    assert CSV_NAME in message
    assert "csv_missing_columns" in message
    assert "['mean_texture']" in message
    assert "['texture']" in message
    assert_unchanged(tmp_path, spec, earlier)


def test_csv_stray_text(tmp_path, tabular):
    spec, earlier = tabular
    raw = raw_folder(tmp_path, "breast_cancer", DAY)
    (raw / CSV_NAME).write_text(header(spec) + good_lines() + "r9,benign,12.5 mm,20.5,80\n")
    partition = ref_for(spec, raw)

    ref = validate.validate_partition(spec, partition, tmp_path)
    (entry,) = quarantine_entries(tmp_path, partition)

    assert ref.quarantined == 1
    assert entry["file"] == CSV_NAME
    assert entry["row"] == 4
    assert entry["column"] == "mean_radius"
    assert entry["rule"] == "expect_column_values_to_match_regex"
    assert entry["value"] == "12.5 mm"
    assert "is not a number" in entry["reason"]
    assert_unchanged(tmp_path, spec, earlier)


def test_csv_nan_feature(tmp_path, tabular):
    spec, earlier = tabular
    raw = raw_folder(tmp_path, "breast_cancer", DAY)
    lines = "r8,benign,NaN,20.5,80\nr9,benign,11,,80\n"
    (raw / CSV_NAME).write_text(header(spec) + good_lines() + lines)
    partition = ref_for(spec, raw)

    ref = validate.validate_partition(spec, partition, tmp_path)
    entries = quarantine_entries(tmp_path, partition)

    assert ref.quarantined == 2
    assert [entry["row"] for entry in entries] == [4, 5]
    assert [entry["column"] for entry in entries] == ["mean_radius", "mean_texture"]
    assert {entry["rule"] for entry in entries} == {"expect_column_values_to_not_be_null"}
    assert "'NaN' is NaN" in entries[0]["reason"]
    assert all(entry["file"] == CSV_NAME for entry in entries)
    assert_unchanged(tmp_path, spec, earlier)


def test_csv_unknown_label(tmp_path, tabular):
    spec, earlier = tabular
    raw = raw_folder(tmp_path, "breast_cancer", DAY)
    (raw / CSV_NAME).write_text(header(spec) + good_lines() + "r9,borderline,11,20.5,80\n")
    partition = ref_for(spec, raw)

    ref = validate.validate_partition(spec, partition, tmp_path)
    (entry,) = quarantine_entries(tmp_path, partition)

    assert ref.quarantined == 1
    assert entry["file"] == CSV_NAME
    assert entry["row"] == 4
    assert entry["column"] == "label"
    assert entry["rule"] == "expect_column_values_to_be_in_set"
    assert entry["value"] == "borderline"
    assert_unchanged(tmp_path, spec, earlier)


def test_png_not_decodable(tmp_path, images):
    spec, earlier = images
    raw = raw_folder(tmp_path, "digits", DAY)
    good_images(raw)
    (raw / "4" / "broken.png").parent.mkdir()
    (raw / "4" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    partition = ref_for(spec, raw)

    ref = validate.validate_partition(spec, partition, tmp_path)
    (entry,) = quarantine_entries(tmp_path, partition)
    copy = tmp_path / "quarantine" / "digits" / DAY / partition["content_hash"] / "4" / "broken.png"

    assert ref.quarantined == 1
    assert entry["file"] == "4/broken.png"
    assert entry["column"] == "decodes"
    assert entry["rule"] == "expect_column_values_to_be_in_set"
    assert "PIL cannot decode it" in entry["reason"]
    assert copy.read_bytes() == (raw / "4" / "broken.png").read_bytes()
    assert_unchanged(tmp_path, spec, earlier)


def test_zero_byte_image(tmp_path, images):
    spec, earlier = images
    raw = raw_folder(tmp_path, "digits", DAY)
    good_images(raw)
    (raw / "5").mkdir()
    (raw / "5" / "empty.png").write_bytes(b"")
    partition = ref_for(spec, raw)

    ref = validate.validate_partition(spec, partition, tmp_path)
    (entry,) = quarantine_entries(tmp_path, partition)

    assert ref.quarantined == 1
    assert entry["file"] == "5/empty.png"
    assert entry["column"] == "decodes"
    assert "zero-byte file" in entry["reason"]
    assert_unchanged(tmp_path, spec, earlier)


def test_image_wrong_size(tmp_path, images):
    spec, earlier = images
    raw = raw_folder(tmp_path, "digits", DAY)
    good_images(raw)
    write_png(raw / "6" / "large.png", size=(32, 28))
    partition = ref_for(spec, raw)

    ref = validate.validate_partition(spec, partition, tmp_path)
    (entry,) = quarantine_entries(tmp_path, partition)

    assert ref.quarantined == 1
    assert entry["file"] == "6/large.png"
    assert entry["column"] == "width"
    assert entry["rule"] == "expect_column_values_to_be_in_set"
    assert entry["value"] == 32
    assert_unchanged(tmp_path, spec, earlier)


def test_image_wrong_mode(tmp_path, images):
    spec, earlier = images
    raw = raw_folder(tmp_path, "digits", DAY)
    good_images(raw)
    write_png(raw / "7" / "colour.png", mode="RGB")
    partition = ref_for(spec, raw)

    ref = validate.validate_partition(spec, partition, tmp_path)
    (entry,) = quarantine_entries(tmp_path, partition)

    assert ref.quarantined == 1
    assert entry["file"] == "7/colour.png"
    assert entry["column"] == "mode"
    assert entry["value"] == "RGB"
    assert entry["rule"] == "expect_column_values_to_be_in_set"
    assert_unchanged(tmp_path, spec, earlier)


def test_image_outside_label_folder(tmp_path, images):
    spec, earlier = images
    raw = raw_folder(tmp_path, "digits", DAY)
    good_images(raw)
    write_png(raw / "stray.png")
    partition = ref_for(spec, raw)

    ref = validate.validate_partition(spec, partition, tmp_path)
    (entry,) = quarantine_entries(tmp_path, partition)

    assert ref.quarantined == 1
    assert entry["file"] == "stray.png"
    assert entry["column"] == "label"
    assert entry["rule"] == "expect_column_values_to_not_be_null"
    assert "not inside a label folder" in entry["reason"]
    assert_unchanged(tmp_path, spec, earlier)


def test_partition_ten_times_max(tmp_path, tabular):
    spec, earlier = tabular
    raw = raw_folder(tmp_path, "breast_cancer", DAY)
    (raw / CSV_NAME).write_text(header(spec) + good_lines(count=10 * spec.expectations.max_rows))
    partition = ref_for(spec, raw)

    with pytest.raises(DataValidationError) as raised:
        validate.validate_partition(spec, partition, tmp_path)
    message = str(raised.value)

    assert f"partition {DAY} of breast_cancer" in message
    assert "expect_table_row_count_to_be_between: observed 200 rows, expected 2 to 20" in message
    assert "earlier dataset versions are unchanged" in message
    assert not (tmp_path / "validated" / "breast_cancer" / DAY).exists()
    assert_unchanged(tmp_path, spec, earlier)


def test_every_row_quarantined(tmp_path, tabular):
    spec, earlier = tabular
    raw = raw_folder(tmp_path, "breast_cancer", DAY)
    (raw / CSV_NAME).write_text(header(spec) + "r1,benign,-1,20.5,80\nr2,benign,999,20.5,80\n")
    partition = ref_for(spec, raw)

    with pytest.raises(DataValidationError) as raised:
        validate.validate_partition(spec, partition, tmp_path)
    message = str(raised.value)
    entries = quarantine_entries(tmp_path, partition)

    assert "expect_table_row_count_to_be_between: observed 0 rows, expected 2 to 20" in message
    assert "2 of 2 records were quarantined" in message
    assert [entry["row"] for entry in entries] == [1, 2]
    assert {entry["rule"] for entry in entries} == {"expect_column_values_to_be_between"}
    assert_unchanged(tmp_path, spec, earlier)
