"""Validate a raw partition with Great Expectations and publish its validated table.

``validate_partition`` turns one raw partition (a ``PartitionRef`` from ingest) into a table with
one row per record, runs two expectation suites built from the spec, and writes the result:

1. File-level checks (tabular only) reject a whole CSV file: a UTF-8 byte order mark, a delimiter
   other than comma, duplicate, missing or unexpected columns. The partition then fails.
2. The row-level suite finds bad records (missing values, values out of range or not numbers,
   unknown labels, repeated ids, and for images files that do not decode or have the wrong size,
   mode or brightness). Those records are quarantined with their reason, never dropped silently.
3. The batch-level suite checks the remaining rows as a whole: row count, columns and types. A
   failure raises ``DataValidationError``.

Outputs, under the data root::

    validated/<dataset>/<date>/<raw_hash>-<suite_hash>/   table.parquet, results.json,
                                                          report.html, summary.json
    quarantine/<dataset>/<date>/<raw_hash>/               rejected files or rows,
                                                          quarantine.jsonl, summary.json
                                                          (+ report.html, results.json on failure)

The validated folder is written only when both suites pass, so a later run that finds it returns
the cached reference without running (or importing) Great Expectations. ``suite_hash`` covers
every expectation and its arguments, so a changed spec validates the partition again.

Heavy libraries (great_expectations, pandas, numpy, PIL) are imported inside functions because DAG
files import this module at parse time.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import hashlib
import html
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ml_loop import files
from ml_loop.errors import DataValidationError
from ml_loop.refs import StageRef
from ml_loop.spec import PipelineSpec

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
TABLE_NAME = "table.parquet"
RESULTS_NAME = "results.json"
REPORT_NAME = "report.html"
SUMMARY_NAME = "summary.json"
QUARANTINE_LOG_NAME = "quarantine.jsonl"

# Bump when the table, the quarantine rules or the suites change in a way the expectation
# arguments do not show, so that earlier validated folders are not reused.
VALIDATION_FORMAT_VERSION = 1

# Helper columns of the row-level table, which never reach the validated table.
RECORD_INDEX = "record_index"
FIELD_COUNT = "field_count"
RAW_SUFFIX = "__raw"

IMAGE_TABLE_COLUMNS = (
    "id",
    "label",
    "path",
    "width",
    "height",
    "mode",
    "mean_intensity",
    "std_intensity",
)
IMAGE_COLUMN_TYPES = {
    "id": "str",
    "label": "str",
    "path": "str",
    "width": "int64",
    "height": "int64",
    "mode": "str",
    "mean_intensity": "float64",
    "std_intensity": "float64",
}

# Images above this many pixels are not decoded, so a crafted header cannot exhaust memory.
MAX_DECODE_PIXELS = 1 << 24

# Numbers the tabular parser accepts: float() syntax without underscores or non-ASCII digits.
# NaN and infinity count as numbers, so the null and range checks reject them instead.
FLOAT_REGEX = (
    r"^\s*[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|(?i:nan|inf|infinity))\s*$"
)
INT_REGEX = r"^\s*[+-]?[0-9]+\s*$"

_UTF8_BOM = b"\xef\xbb\xbf"
_HASH_PATTERN = re.compile(r"[0-9a-f]{8,128}")
_REPORT_ROW_LIMIT = 500


@dataclasses.dataclass(frozen=True)
class ValidatedRef(StageRef):
    """Reference to a validated partition, passed downstream by XCom."""

    producer: ClassVar[str] = "ml_loop.validate.validate_partition"

    dataset: str
    partition_date: str
    raw_hash: str
    table_uri: str
    rows: int
    quarantined: int
    report_uri: str
    results_uri: str
    content_hash: str


@dataclasses.dataclass(frozen=True)
class _Source:
    """Origin of one record: its file (relative to the raw folder), and for CSV its row."""

    file: str
    row: int | None = None
    values: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class _FileRejection:
    """A CSV file that fails a file-level check, with the rule and the fix."""

    file: str
    rule: str
    value: Any
    reason: str


@dataclasses.dataclass
class _Records:
    """The row-level table of one partition and the source of each of its rows."""

    frame: pd.DataFrame
    id_column: str
    sources: list[_Source]
    headers: dict[str, list[str]]
    rejections: list[_FileRejection]
    data_files: int


@dataclasses.dataclass(frozen=True)
class _Failure:
    """One failed row-level expectation on one record."""

    column: str | None
    rule: str
    value: Any
    reason: str


@dataclasses.dataclass(frozen=True)
class _Partition:
    dataset: str
    date: str
    raw_hash: str
    raw_dir: Path


# ---------------------------------------------------------------------------------------------
# Expectation configuration


def row_expectations(spec: PipelineSpec) -> list[dict[str, Any]]:
    """Build the row-level suite as plain ``{"type", "kwargs"}`` dicts, in reporting order.

    When a record fails several expectations, its quarantine entry leads with the first one in
    this order, so structural checks come before value checks.
    """
    dataset = spec.dataset
    classes = list(dataset.classes)
    if dataset.kind == "images":
        image = dataset.image
        return [
            _expectation("expect_column_values_to_not_be_null", column=dataset.label_column),
            _expectation("expect_column_values_to_be_in_set", column="decodes", value_set=[True]),
            _expectation(
                "expect_column_values_to_be_in_set", column="width", value_set=[image.width]
            ),
            _expectation(
                "expect_column_values_to_be_in_set", column="height", value_set=[image.height]
            ),
            _expectation(
                "expect_column_values_to_be_in_set", column="mode", value_set=[image.mode]
            ),
            _expectation(
                "expect_column_values_to_be_between",
                column="mean_intensity",
                min_value=image.min_mean_intensity,
                max_value=image.max_mean_intensity,
            ),
            _expectation(
                "expect_column_values_to_be_in_set", column=dataset.label_column, value_set=classes
            ),
            _expectation("expect_column_values_to_be_unique", column=dataset.id_column),
        ]

    expectations = [
        _expectation(
            "expect_column_values_to_be_in_set",
            column=FIELD_COUNT,
            value_set=[len(_tabular_columns(spec))],
        )
    ]
    for column in dataset.columns:
        regex = INT_REGEX if column.dtype == "int" else FLOAT_REGEX
        expectations.append(
            _expectation(
                "expect_column_values_to_match_regex", column=column.name + RAW_SUFFIX, regex=regex
            )
        )
    expectations.append(
        _expectation("expect_column_values_to_not_be_null", column=dataset.id_column)
    )
    expectations.append(
        _expectation("expect_column_values_to_not_be_null", column=dataset.label_column)
    )
    for column in dataset.columns:
        if not column.nullable:
            expectations.append(
                _expectation("expect_column_values_to_not_be_null", column=column.name)
            )
    for column in dataset.columns:
        if column.min is not None or column.max is not None:
            expectations.append(
                _expectation(
                    "expect_column_values_to_be_between",
                    column=column.name,
                    min_value=column.min,
                    max_value=column.max,
                )
            )
    expectations.append(
        _expectation(
            "expect_column_values_to_be_in_set", column=dataset.label_column, value_set=classes
        )
    )
    expectations.append(_expectation("expect_column_values_to_be_unique", column=dataset.id_column))
    return expectations


def batch_expectations(spec: PipelineSpec) -> list[dict[str, Any]]:
    """Build the batch-level suite, checked on the rows left after quarantine."""
    column_types = _table_column_types(spec)
    expectations = [
        _expectation(
            "expect_table_row_count_to_be_between",
            min_value=spec.expectations.min_rows,
            max_value=spec.expectations.max_rows,
        ),
        _expectation("expect_table_columns_to_match_ordered_list", column_list=list(column_types)),
    ]
    for column, type_name in column_types.items():
        expectations.append(
            _expectation("expect_column_values_to_be_of_type", column=column, type_=type_name)
        )
    return expectations


def suite_hash(spec: PipelineSpec) -> str:
    """Return a short SHA-256 of both suites' expectations, which keys the validated folder."""
    payload = {
        "format_version": VALIDATION_FORMAT_VERSION,
        "row_level": row_expectations(spec),
        "batch_level": batch_expectations(spec),
    }
    encoded = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(encoded).hexdigest()[:12]


def _expectation(type_name: str, **kwargs: Any) -> dict[str, Any]:
    return {"type": type_name, "kwargs": kwargs}


def _tabular_columns(spec: PipelineSpec) -> list[str]:
    dataset = spec.dataset
    return [dataset.id_column, dataset.label_column, *dataset.feature_names]


def _table_column_types(spec: PipelineSpec) -> dict[str, str]:
    """Map each column of the validated table to its pandas type name, in table order."""
    dataset = spec.dataset
    if dataset.kind == "images":
        types = dict(IMAGE_COLUMN_TYPES)
        types[dataset.id_column] = types.pop("id")
        types[dataset.label_column] = types.pop("label")
        return {name: types[name] for name in _image_table_columns(spec)}
    return {
        dataset.id_column: "str",
        dataset.label_column: "str",
        **{name: "float64" for name in dataset.feature_names},
    }


def _image_table_columns(spec: PipelineSpec) -> list[str]:
    dataset = spec.dataset
    renamed = {"id": dataset.id_column, "label": dataset.label_column}
    return [renamed.get(name, name) for name in IMAGE_TABLE_COLUMNS]


# ---------------------------------------------------------------------------------------------
# Public entry points


def validate_partition(
    spec: PipelineSpec, partition: dict[str, Any], root: str | Path | None = None
) -> ValidatedRef:
    """Validate one raw partition and return the reference to its validated table.

    Rejected records are quarantined and the rest are written to ``table.parquet``. A rerun with
    the same raw hash and suite returns the cached reference. Raises ``DataValidationError`` when
    a CSV file fails a file-level check or the remaining rows fail the batch-level suite. The
    report and the quarantine are written first, and the message names their paths.
    """
    started = time.perf_counter()
    source = _check_partition(spec, partition)
    data_root = files.data_root(root)
    suite_digest = suite_hash(spec)
    validated_dir = (
        data_root / "validated" / source.dataset / source.date / f"{source.raw_hash}-{suite_digest}"
    )
    cached = _load_cached(validated_dir)
    if cached is not None:
        logger.info(
            "partition %s of %s already validated with suite %s: %s",
            source.date,
            source.dataset,
            suite_digest,
            validated_dir,
        )
        return cached

    logger.info(
        "validating partition %s of %s (raw %s, suite %s)",
        source.date,
        source.dataset,
        source.raw_hash,
        suite_digest,
    )
    # NOTE: the data layout keys the quarantine by raw hash only, so it shows the latest suite
    # that ran on this partition (its summary.json names the suite hash). A cached rerun of an
    # older suite leaves it as it is.
    quarantine_dir = data_root / "quarantine" / source.dataset / source.date / source.raw_hash
    files.remove_stale_staging(validated_dir.parent)
    files.remove_stale_staging(quarantine_dir.parent)

    records = _build_records(spec, source.raw_dir)
    if records.rejections:
        _publish_file_rejections(source, records.rejections, quarantine_dir, suite_digest)
        raise DataValidationError(
            _file_rejection_message(source, records.rejections, quarantine_dir)
        )

    with _quiet_gx():
        row_result, batch_result, table, failures = _run_suites(spec, records)
    results = {
        "row_level": _json_safe(row_result.to_json_dict()),
        "batch_level": _json_safe(batch_result.to_json_dict()),
    }
    batch_failures = [item for item in results["batch_level"]["results"] if not item["success"]]
    summary = _summary(spec, source, suite_digest, records, table, failures, batch_failures)
    summary["duration_s"] = round(time.perf_counter() - started, 3)
    report = _render_report(summary, results, records, failures)

    _publish_quarantine(
        quarantine_dir,
        records,
        failures,
        summary,
        report=report if batch_failures else None,
        results=results if batch_failures else None,
    )
    if batch_failures:
        raise DataValidationError(
            _batch_failure_message(source, summary, records, batch_failures, quarantine_dir)
        )

    ref = _publish_validated(validated_dir, source, table, results, report, summary)
    logger.info(
        "validated partition %s of %s: %d rows kept, %d quarantined, %.2f s; table %s",
        source.date,
        source.dataset,
        ref.rows,
        ref.quarantined,
        time.perf_counter() - started,
        ref.table_uri,
    )
    return ref


def validate_window(
    spec: PipelineSpec,
    partitions: list[dict[str, Any]],
    run_date: str | dt.date,
    root: str | Path | None = None,
) -> list[ValidatedRef]:
    """Validate every partition of a training window, raising only for the run's own batch.

    A ``DataValidationError`` on the regular partition dated ``run_date`` is raised. Earlier
    partitions, and feedback partitions of any date, that fail are skipped with a WARNING naming
    the date and the reason, so one bad batch does not block training on the rest of the window.
    Other errors are raised for every date.
    """
    run_day = run_date.isoformat() if isinstance(run_date, dt.date) else str(run_date)
    validated = []
    for partition in partitions:
        try:
            validated.append(validate_partition(spec, partition, root))
        except DataValidationError as err:
            is_feedback = partition.get("source") == "feedback"
            if partition.get("partition_date") == run_day and not is_feedback:
                raise
            logger.warning(
                "skipping partition %s of %s from the window of run date %s: %s",
                partition.get("partition_date"),
                spec.dataset.name,
                run_day,
                err,
            )
    return validated


def _check_partition(spec: PipelineSpec, partition: dict[str, Any]) -> _Partition:
    """Check the PartitionRef fields used to build output paths, so none can leave the root."""
    required = ("dataset", "partition_date", "raw_uri", "content_hash")
    missing = [key for key in required if key not in partition]
    if missing:
        raise ValueError(f"invalid PartitionRef {partition!r}: missing keys {missing}")

    if partition["dataset"] != spec.dataset.name:
        raise ValueError(
            f"PartitionRef dataset {partition['dataset']!r} does not match spec dataset "
            f"{spec.dataset.name!r}; pass the spec the partition was ingested with"
        )

    date = str(partition["partition_date"])
    try:
        dt.date.fromisoformat(date)
    except ValueError as err:
        raise ValueError(
            f"invalid PartitionRef partition_date {date!r}: expected YYYY-MM-DD"
        ) from err

    raw_hash = str(partition["content_hash"])
    if not _HASH_PATTERN.fullmatch(raw_hash):
        raise ValueError(
            f"invalid PartitionRef content_hash {raw_hash!r}: expected 8 to 128 lowercase "
            "hex digits"
        )

    raw_dir = Path(partition["raw_uri"])
    if not raw_dir.is_dir():
        raise DataValidationError(
            f"raw folder {raw_dir} of partition {date} of {spec.dataset.name} not found; "
            "run ingest for that date again"
        )
    return _Partition(spec.dataset.name, date, raw_hash, raw_dir)


def _load_cached(validated_dir: Path) -> ValidatedRef | None:
    summary_path = validated_dir / SUMMARY_NAME
    if not summary_path.is_file():
        return None
    return ValidatedRef.from_dict(json.loads(summary_path.read_text())["ref"])


# ---------------------------------------------------------------------------------------------
# Row-level table


def _build_records(spec: PipelineSpec, raw_dir: Path) -> _Records:
    if spec.dataset.kind == "images":
        return _build_image_records(spec, raw_dir)
    return _build_tabular_records(spec, raw_dir)


def _data_files(raw_dir: Path) -> list[Path]:
    """List every file under the raw folder except the top-level manifest.

    Symbolic links are listed as entries of their own and never followed, so they are rejected
    instead of reading data from outside the raw folder.
    """
    found = []
    for folder, dirnames, filenames in os.walk(raw_dir, followlinks=False):
        dirnames.sort()
        links = [name for name in dirnames if (Path(folder) / name).is_symlink()]
        for name in sorted([*filenames, *links]):
            path = Path(folder) / name
            if path.parent == raw_dir and name == MANIFEST_NAME:
                continue
            found.append(path)
    return found


def _build_image_records(spec: PipelineSpec, raw_dir: Path) -> _Records:
    import pandas as pd

    dataset = spec.dataset
    rows = []
    sources = []
    for path in _data_files(raw_dir):
        relative = path.relative_to(raw_dir).as_posix()
        parts = relative.split("/")
        row = {
            dataset.id_column: path.stem,
            dataset.label_column: parts[0] if len(parts) == 2 else None,
            "path": relative,
            **_inspect_image(path),
        }
        if len(parts) != 2 and row["error"] is None:
            row["error"] = "not inside a label folder: expected <label>/<id>.png"
        row[RECORD_INDEX] = len(rows)
        rows.append(row)
        sources.append(_Source(file=relative))

    dtypes = {
        dataset.id_column: "str",
        dataset.label_column: "str",
        "path": "str",
        "bytes": "int64",
        "decodes": "bool",
        "error": "str",
        "width": "Int64",
        "height": "Int64",
        "mode": "str",
        "mean_intensity": "float64",
        "std_intensity": "float64",
        RECORD_INDEX: "int64",
    }
    frame = pd.DataFrame(rows, columns=list(dtypes)).astype(dtypes)
    return _Records(
        frame, dataset.id_column, sources, headers={}, rejections=[], data_files=len(sources)
    )


def _inspect_image(path: Path) -> dict[str, Any]:
    """Return the image's metadata, with ``decodes`` False and the reason when it is unusable."""
    import numpy as np
    from PIL import Image

    info: dict[str, Any] = {
        "bytes": path.lstat().st_size,
        "decodes": False,
        "error": None,
        "width": None,
        "height": None,
        "mode": None,
        "mean_intensity": None,
        "std_intensity": None,
    }
    if path.is_symlink():
        info["error"] = "symbolic link: raw partitions contain regular files only"
        return info
    if info["bytes"] == 0:
        info["error"] = "zero-byte file"
        return info
    try:
        with Image.open(path, formats=["PNG"]) as image:
            info["width"], info["height"] = image.size
            info["mode"] = image.mode
            if image.width * image.height > MAX_DECODE_PIXELS:
                info["error"] = (
                    f"{image.width}x{image.height} pixels exceeds the decode limit of "
                    f"{MAX_DECODE_PIXELS} pixels"
                )
                return info
            image.load()
            pixels = np.asarray(image, dtype=np.float64)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        message = str(err).replace(str(path), path.name)
        info["error"] = f"PIL cannot decode it as PNG: {type(err).__name__}: {message}"
        return info
    info["decodes"] = True
    info["mean_intensity"] = float(pixels.mean()) if pixels.size else None
    info["std_intensity"] = float(pixels.std()) if pixels.size else None
    return info


def _build_tabular_records(spec: PipelineSpec, raw_dir: Path) -> _Records:
    import pandas as pd

    dataset = spec.dataset
    columns = _tabular_columns(spec)
    csv_files = []
    for path in _data_files(raw_dir):
        if path.parent == raw_dir and path.suffix == ".csv":
            csv_files.append(path)
        else:
            logger.warning(
                "ignoring %s in raw partition %s: tabular partitions contain top-level *.csv "
                "files and %s only",
                path.relative_to(raw_dir),
                raw_dir,
                MANIFEST_NAME,
            )

    rows: list[dict[str, Any]] = []
    sources: list[_Source] = []
    headers: dict[str, list[str]] = {}
    rejections: list[_FileRejection] = []
    for path in csv_files:
        name = path.name
        parsed = _read_csv(path, columns)
        if isinstance(parsed, _FileRejection):
            rejections.append(parsed)
            continue
        header, body = parsed
        headers[name] = header
        position = {column: header.index(column) for column in columns}
        for row_number, values in body:
            row = _tabular_row(spec, values, position)
            row[RECORD_INDEX] = len(rows)
            rows.append(row)
            sources.append(_Source(file=name, row=row_number, values=tuple(values)))

    dtypes = {
        FIELD_COUNT: "int64",
        dataset.id_column: "str",
        dataset.label_column: "str",
        **{name: "float64" for name in dataset.feature_names},
        **{name + RAW_SUFFIX: "str" for name in dataset.feature_names},
        RECORD_INDEX: "int64",
    }
    frame = pd.DataFrame(rows, columns=list(dtypes)).astype(dtypes)
    return _Records(
        frame, dataset.id_column, sources, headers, rejections, data_files=len(csv_files)
    )


def _tabular_row(spec: PipelineSpec, values: list[str], position: dict[str, int]) -> dict[str, Any]:
    """Turn one CSV row into a row of the row-level table: text kept, numbers parsed."""
    dataset = spec.dataset

    def cell(column: str) -> str | None:
        index = position[column]
        text = values[index] if index < len(values) else ""
        return text if text.strip() else None

    row: dict[str, Any] = {
        FIELD_COUNT: len(values),
        dataset.id_column: cell(dataset.id_column),
        dataset.label_column: cell(dataset.label_column),
    }
    for name in dataset.feature_names:
        text = cell(name)
        row[name + RAW_SUFFIX] = text
        row[name] = _parse_float(text)
    return row


def _parse_float(text: str | None) -> float:
    if text is None:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return math.nan


def _read_csv(
    path: Path, columns: list[str]
) -> tuple[list[str], list[tuple[int, list[str]]]] | _FileRejection:
    """Read a CSV file as text, or return why the whole file is rejected.

    The header is read with the csv module because pandas renames duplicate columns. Rows are
    numbered from 1 for the first row after the header, and blank lines are skipped.
    """
    name = path.name
    if path.is_symlink():
        return _FileRejection(
            name,
            "csv_symlink",
            None,
            "the file is a symbolic link; raw partitions contain regular files only, so run "
            "ingest again to copy the data itself",
        )
    content = path.read_bytes()
    if content.startswith(_UTF8_BOM):
        return _FileRejection(
            name,
            "csv_utf8_bom",
            "EF BB BF",
            "the file starts with a UTF-8 byte order mark (BOM) before the header; save it as "
            "UTF-8 without a BOM (in Python: encoding='utf-8', not 'utf-8-sig')",
        )
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as err:
        return _FileRejection(
            name,
            "csv_not_utf8",
            f"byte {err.start}",
            f"the file is not valid UTF-8 ({err.reason} at byte {err.start}); save it as UTF-8",
        )
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if not header:
            return _FileRejection(
                name,
                "csv_no_header",
                None,
                f"the file is empty: expected a header row with the columns {', '.join(columns)}",
            )
        rejection = _check_header(name, header, columns)
        if rejection is not None:
            return rejection
        body = [(number, row) for number, row in enumerate(reader, start=1) if row]
    except csv.Error as err:
        return _FileRejection(
            name,
            "csv_malformed",
            f"line {reader.line_num}",
            f"the csv module cannot parse line {reader.line_num}: {err}; write the file with a "
            "standard CSV writer",
        )
    return header, body


def _check_header(name: str, header: list[str], columns: list[str]) -> _FileRejection | None:
    header_line = ",".join(header)
    for delimiter, label in ((";", "semicolon"), ("\t", "tab")):
        if delimiter in header_line:
            return _FileRejection(
                name,
                "csv_delimiter",
                delimiter,
                f"the header contains a {label} ({delimiter!r}), so the file uses a delimiter "
                "other than comma; write it comma-separated (pandas: to_csv(sep=','))",
            )
    duplicates = sorted(column for column, count in Counter(header).items() if count > 1)
    if duplicates:
        return _FileRejection(
            name,
            "csv_duplicate_columns",
            duplicates,
            f"the header repeats the columns {duplicates}; keep one column of each name",
        )
    missing = [column for column in columns if column not in header]
    extra = [column for column in header if column not in columns]
    problems = []
    if missing:
        problems.append(f"the header lacks the spec columns {missing}")
    if extra:
        problems.append(f"the header has columns the spec does not list: {extra}")
    if not problems:
        return None
    return _FileRejection(
        name,
        "csv_missing_columns" if missing else "csv_unexpected_columns",
        {"missing": missing, "unexpected": extra},
        " and ".join(problems) + "; make the header match the spec's id, label and "
        "dataset.columns names exactly (names are case- and space-sensitive), or change the spec",
    )


# ---------------------------------------------------------------------------------------------
# Great Expectations


@contextlib.contextmanager
def _quiet_gx() -> Iterator[None]:
    """Turn off GX analytics and its INFO logging for the block, then restore both.

    GX 1.24 logs over a hundred INFO lines on import and more per expectation, which would
    flood Airflow task logs. Progress bars are turned off in the context's own config
    (``_gx_context``), because GX passes ``disable`` to tqdm explicitly and so ignores tqdm's
    environment variables.
    """
    settings = {"GX_ANALYTICS_ENABLED": "False"}
    saved = {name: os.environ.get(name) for name in settings}
    gx_logger = logging.getLogger("great_expectations")
    saved_level = gx_logger.level
    os.environ.update(settings)
    gx_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        gx_logger.setLevel(saved_level)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _gx_context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _run_checkpoint(
    context: Any,
    name: str,
    expectations: list[dict[str, Any]],
    frame: pd.DataFrame,
    result_format: dict[str, Any],
) -> Any:
    """Run one suite on ``frame`` through a Checkpoint and return its suite validation result."""
    import great_expectations as gx
    from great_expectations.expectations.expectation_configuration import (
        ExpectationConfiguration,
    )

    source = context.data_sources.add_or_update_pandas(name="ml_loop")
    asset_name = f"{name}_frame"
    try:
        asset = source.get_asset(asset_name)
    except LookupError:
        asset = source.add_dataframe_asset(name=asset_name)
    try:
        batch = asset.get_batch_definition("whole")
    except KeyError:
        batch = asset.add_batch_definition_whole_dataframe("whole")

    suite = gx.ExpectationSuite(
        name=name,
        expectations=[
            ExpectationConfiguration(type=item["type"], kwargs=item["kwargs"]).to_domain_obj()
            for item in expectations
        ],
    )
    suite = context.suites.add_or_update(suite)
    definition = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(name=name, data=batch, suite=suite)
    )
    checkpoint = context.checkpoints.add_or_update(
        gx.Checkpoint(name=name, validation_definitions=[definition], result_format=result_format)
    )
    result = checkpoint.run(batch_parameters={"dataframe": frame})
    (suite_result,) = result.run_results.values()
    return suite_result


def _run_suites(spec: PipelineSpec, records: _Records) -> tuple[Any, Any, pd.DataFrame, dict]:
    """Run the row-level suite, drop the failing rows, then run the batch-level suite on the rest.

    Returns both suite results, the validated table and the failures by record index.
    """
    dataset = spec.dataset
    context = _gx_context()
    row_result = _run_checkpoint(
        context,
        f"{dataset.name}_rows",
        row_expectations(spec),
        records.frame,
        {
            "result_format": "COMPLETE",
            # Ids can be missing or repeated in bad input, so the record index names each row.
            "unexpected_index_column_names": [dataset.id_column, RECORD_INDEX],
        },
    )
    failures = _row_failures(spec, records, row_result)
    passed_rows = records.frame[~records.frame[RECORD_INDEX].isin(list(failures))]
    table = _validated_table(spec, passed_rows)
    batch_result = _run_checkpoint(
        context,
        f"{dataset.name}_batch",
        batch_expectations(spec),
        table,
        {"result_format": "SUMMARY"},
    )
    return row_result, batch_result, table, failures


def _row_failures(
    spec: PipelineSpec, records: _Records, row_result: Any
) -> dict[int, list[_Failure]]:
    """Collect the failed expectations of each record, in the order of ``row_expectations``.

    GX returns results in its own order, so each failure is ranked by its expectation's position
    in the suite.
    """
    suite = row_expectations(spec)
    positions = {(item["type"], item["kwargs"].get("column")): n for n, item in enumerate(suite)}
    ranked: dict[int, list[tuple[int, _Failure]]] = {}
    frame = records.frame.set_index(RECORD_INDEX, drop=False)
    for item in row_result.results:
        if item.success:
            continue
        config = item.expectation_config
        kwargs = dict(config.kwargs)
        checked_column = kwargs.get("column")
        if item.exception_info.get("raised_exception"):
            raise RuntimeError(
                f"expectation {config.type} on {checked_column!r} raised an error in "
                f"Great Expectations: {item.exception_info.get('exception_message')}; the "
                "row-level table lacks a column the suite expects"
            )
        position = positions.get((config.type, checked_column), len(positions))
        column = checked_column
        if column and column.endswith(RAW_SUFFIX):
            column = column.removesuffix(RAW_SUFFIX)
        for unexpected in item.result.get("unexpected_index_list", []):
            index = int(unexpected[RECORD_INDEX])
            value = _json_safe(unexpected.get(checked_column))
            reason = _failure_reason(config.type, column, kwargs, value, frame.loc[index])
            failure = _Failure(column, config.type, value, reason)
            ranked.setdefault(index, []).append((position, failure))
    return {
        index: [failure for _, failure in sorted(found, key=lambda pair: pair[0])]
        for index, found in sorted(ranked.items())
    }


def _failure_reason(
    rule: str,
    column: str | None,
    kwargs: dict[str, Any],
    value: Any,
    row: pd.Series,
) -> str:
    """Describe one failure as ``<rule> on <column>: <what is wrong>[; <decode error>]``."""
    if column == FIELD_COUNT:
        detail = f"the row has {value} fields, the header has {kwargs['value_set'][0]}"
    elif rule == "expect_column_values_to_match_regex":
        kind = "an integer" if kwargs["regex"] == INT_REGEX else "a number"
        detail = f"value {value!r} is not {kind}"
    elif rule == "expect_column_values_to_not_be_null":
        raw = row.get(f"{column}{RAW_SUFFIX}")
        detail = f"value {raw!r} is NaN" if isinstance(raw, str) else "value is missing"
    elif rule == "expect_column_values_to_be_between":
        detail = (
            f"value {value!r} is outside {kwargs.get('min_value')} to {kwargs.get('max_value')}"
        )
    elif rule == "expect_column_values_to_be_in_set":
        allowed = kwargs["value_set"]
        preview = allowed if len(allowed) <= 12 else [*allowed[:12], "..."]
        detail = f"value {value!r} is not one of {preview}"
    elif rule == "expect_column_values_to_be_unique":
        detail = f"value {value!r} occurs more than once in the partition"
    else:
        detail = f"value {value!r} is unexpected"
    reason = f"{rule} on {column}: {detail}"
    error = row.get("error") if "error" in row.index else None
    if isinstance(error, str) and error:
        reason = f"{reason}; {error}"
    return reason


def _validated_table(spec: PipelineSpec, passed_rows: pd.DataFrame) -> pd.DataFrame:
    """Select and type the validated table's columns from the rows that passed."""
    column_types = _table_column_types(spec)
    table = passed_rows[list(column_types)].reset_index(drop=True)
    return table.astype(column_types)


# ---------------------------------------------------------------------------------------------
# Outputs


def _summary(
    spec: PipelineSpec,
    source: _Partition,
    suite_digest: str,
    records: _Records,
    table: pd.DataFrame,
    failures: dict[int, list[_Failure]],
    batch_failures: list[dict[str, Any]],
) -> dict[str, Any]:
    import great_expectations as gx

    by_rule = Counter(f"{found[0].rule} on {found[0].column}" for found in failures.values())
    return {
        "dataset": source.dataset,
        "partition_date": source.date,
        "raw_hash": source.raw_hash,
        "raw_uri": str(source.raw_dir),
        "suite_hash": suite_digest,
        "spec_digest": spec.digest(),
        "success": not batch_failures,
        "data_files": records.data_files,
        "records": len(records.frame),
        "rows": len(table),
        "quarantined": len(failures),
        "quarantined_by_first_rule": dict(sorted(by_rule.items())),
        "failed_batch_expectations": [
            item["expectation_config"]["type"] for item in batch_failures
        ],
        "great_expectations_version": gx.__version__,
        "validated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def _quarantine_entries(
    records: _Records, failures: dict[int, list[_Failure]]
) -> list[dict[str, Any]]:
    """Build one quarantine.jsonl entry per rejected record, led by its first failure."""
    frame = records.frame.set_index(RECORD_INDEX, drop=False)
    entries = []
    for index, found in failures.items():
        source = records.sources[index]
        record_id = frame.at[index, records.id_column]
        first = found[0]
        entries.append(
            {
                "file": source.file,
                "id": record_id if isinstance(record_id, str) else None,
                "row": source.row,
                "column": first.column,
                "rule": first.rule,
                "value": first.value,
                "reason": first.reason,
                "failures": [dataclasses.asdict(failure) for failure in found],
            }
        )
    return entries


def _write_rejected(
    staging: Path, raw_dir: Path, records: _Records, failures: dict[int, list[_Failure]]
) -> None:
    """Copy rejected image files, or write rejected CSV rows as read, into the quarantine."""
    rejected_rows: dict[str, list[tuple[str, ...]]] = {}
    for index in failures:
        source = records.sources[index]
        if source.values is None:
            target = staging / source.file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(raw_dir / source.file, target, follow_symlinks=False)
        else:
            rejected_rows.setdefault(source.file, []).append(source.values)
    for name, rows in rejected_rows.items():
        with (staging / name).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(records.headers[name])
            writer.writerows(rows)


def _publish_quarantine(
    quarantine_dir: Path,
    records: _Records,
    failures: dict[int, list[_Failure]],
    summary: dict[str, Any],
    report: str | None,
    results: dict[str, Any] | None,
) -> None:
    raw_dir = Path(summary["raw_uri"])

    def write(staging: Path) -> None:
        _write_rejected(staging, raw_dir, records, failures)
        entries = _quarantine_entries(records, failures)
        _write_jsonl(staging / QUARANTINE_LOG_NAME, entries)
        _write_json(staging / SUMMARY_NAME, summary)
        if report is not None:
            (staging / REPORT_NAME).write_text(report, encoding="utf-8")
        if results is not None:
            _write_json(staging / RESULTS_NAME, results)

    _replace_dir(quarantine_dir, write)
    if failures:
        logger.info("quarantined %d records in %s", len(failures), quarantine_dir)


def _publish_file_rejections(
    source: _Partition,
    rejections: list[_FileRejection],
    quarantine_dir: Path,
    suite_digest: str,
) -> None:
    def write(staging: Path) -> None:
        entries = []
        for rejection in rejections:
            shutil.copy2(
                source.raw_dir / rejection.file, staging / rejection.file, follow_symlinks=False
            )
            entries.append(
                {
                    "file": rejection.file,
                    "id": None,
                    "row": None,
                    "column": None,
                    "rule": rejection.rule,
                    "value": rejection.value,
                    "reason": rejection.reason,
                    "failures": [],
                }
            )
        _write_jsonl(staging / QUARANTINE_LOG_NAME, entries)
        _write_json(
            staging / SUMMARY_NAME,
            {
                "dataset": source.dataset,
                "partition_date": source.date,
                "raw_hash": source.raw_hash,
                "raw_uri": str(source.raw_dir),
                "suite_hash": suite_digest,
                "success": False,
                "rejected_files": [rejection.file for rejection in rejections],
            },
        )

    _replace_dir(quarantine_dir, write)


def _publish_validated(
    validated_dir: Path,
    source: _Partition,
    table: pd.DataFrame,
    results: dict[str, Any],
    report: str,
    summary: dict[str, Any],
) -> ValidatedRef:
    with files.staged_dir(validated_dir) as staging:
        table.to_parquet(staging / TABLE_NAME, index=False)
        _write_json(staging / RESULTS_NAME, results)
        (staging / REPORT_NAME).write_text(report, encoding="utf-8")
        ref = ValidatedRef(
            dataset=source.dataset,
            partition_date=source.date,
            raw_hash=source.raw_hash,
            table_uri=str(validated_dir / TABLE_NAME),
            rows=len(table),
            quarantined=summary["quarantined"],
            report_uri=str(validated_dir / REPORT_NAME),
            results_uri=str(validated_dir / RESULTS_NAME),
            content_hash=files.sha256_file(staging / TABLE_NAME),
        )
        _write_json(staging / SUMMARY_NAME, {**summary, "ref": ref.to_dict()})
    # A concurrent run of the same inputs may have published first, and staged_dir keeps that.
    return _load_cached(validated_dir) or ref


def _replace_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Build a folder in a staging folder beside ``final``, then swap it in place of ``final``.

    Unlike ``files.staged_dir``, an existing ``final`` is replaced, because the quarantine of a
    raw partition depends on the suite, which may have changed since the last run. Readers can
    find no ``final`` for the moment between the two renames. Staging names follow
    ``files.staged_dir``, so ``files.remove_stale_staging`` removes what a killed run leaves.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    owner = f"{socket.gethostname()}@{os.getpid()}"
    staging = Path(
        tempfile.mkdtemp(prefix=f"{files.TMP_PREFIX}{final.name}@{owner}@", dir=final.parent)
    )
    try:
        write(staging)
        if final.exists():
            retired = (
                final.parent / f"{files.TMP_PREFIX}{final.name}@{owner}@{uuid.uuid4().hex[:8]}"
            )
            os.rename(final, retired)
            try:
                os.rename(staging, final)
            except OSError:
                os.rename(retired, final)
                raise
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(_json_safe(payload), indent=2, sort_keys=True), encoding="utf-8")


def _write_jsonl(path: Path, entries: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for entry in entries:
            handle.write(json.dumps(_json_safe(entry), sort_keys=True) + "\n")


def _json_safe(value: Any) -> Any:
    """Convert numpy scalars to Python, missing and non-finite values to None, others to str."""
    if type(value).__name__ in {"NAType", "NaTType"}:
        return None
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "item"):
        return _json_safe(value.item())
    return str(value)


# ---------------------------------------------------------------------------------------------
# Messages and report


def _file_rejection_message(
    source: _Partition, rejections: list[_FileRejection], quarantine_dir: Path
) -> str:
    details = "; ".join(
        f"rejected {rejection.file} ({rejection.rule}): {rejection.reason}"
        for rejection in rejections
    )
    return (
        f"partition {source.date} of {source.dataset} failed file-level checks: {details}. "
        f"Copies of the rejected files and their reasons are in {quarantine_dir}; earlier "
        "dataset versions are unchanged"
    )


def _describe_batch_failure(item: dict[str, Any]) -> str:
    config = item["expectation_config"]
    kwargs = config["kwargs"]
    observed = item.get("result", {}).get("observed_value")
    rule = config["type"]
    if rule == "expect_table_row_count_to_be_between":
        return (
            f"{rule}: observed {observed} rows, expected {kwargs.get('min_value')} to "
            f"{kwargs.get('max_value')}"
        )
    if rule == "expect_table_columns_to_match_ordered_list":
        return f"{rule}: observed columns {observed}, expected {kwargs.get('column_list')}"
    if rule == "expect_column_values_to_be_of_type":
        return (
            f"{rule}: column {kwargs.get('column')} has type {observed}, expected "
            f"{kwargs.get('type_')}"
        )
    arguments = {key: value for key, value in kwargs.items() if key != "batch_id"}
    return f"{rule}: observed {observed}, expected {arguments}"


def _batch_failure_message(
    source: _Partition,
    summary: dict[str, Any],
    records: _Records,
    batch_failures: list[dict[str, Any]],
    quarantine_dir: Path,
) -> str:
    details = "; ".join(_describe_batch_failure(item) for item in batch_failures)
    if summary["data_files"] == 0:
        context = "the partition contains no data files"
    elif summary["records"] == 0:
        context = f"its data files ({', '.join(sorted(records.headers))}) contain no records"
    else:
        context = (
            f"{summary['quarantined']} of {summary['records']} records were quarantined, "
            f"see {quarantine_dir / QUARANTINE_LOG_NAME}"
        )
    return (
        f"partition {source.date} of {source.dataset} failed {details} ({context}); earlier "
        f"dataset versions are unchanged. Report: {quarantine_dir / REPORT_NAME}"
    )


_REPORT_STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 2em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
.pass { color: #1a7f37; font-weight: bold; }
.fail { color: #cf222e; font-weight: bold; }
code { font-size: 90%; }
"""


def _render_report(
    summary: dict[str, Any],
    results: dict[str, Any],
    records: _Records,
    failures: dict[int, list[_Failure]],
) -> str:
    """Render a self-contained HTML page with both suites' results and the quarantined records.

    GX Data Docs are not used: their pages load CSS, scripts and a logo from public hosts, so
    they render unstyled offline and contact those hosts whenever someone opens them.
    """
    escape = html.escape
    status = (
        '<span class="pass">passed</span>'
        if summary["success"]
        else ('<span class="fail">failed</span>')
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Validation of {escape(summary['dataset'])} {escape(summary['partition_date'])}"
        "</title>",
        f"<style>{_REPORT_STYLE}</style></head><body>",
        f"<h1>Validation of {escape(summary['dataset'])} partition "
        f"{escape(summary['partition_date'])}: {status}</h1>",
        _html_table(
            ["field", "value"],
            [
                [key, summary[key]]
                for key in (
                    "raw_uri",
                    "raw_hash",
                    "suite_hash",
                    "spec_digest",
                    "data_files",
                    "records",
                    "rows",
                    "quarantined",
                    "great_expectations_version",
                    "validated_at",
                )
            ],
        ),
    ]
    for title, key in (("Row-level suite", "row_level"), ("Batch-level suite", "batch_level")):
        rows = []
        for item in results[key]["results"]:
            config = item["expectation_config"]
            kwargs = {k: v for k, v in config["kwargs"].items() if k != "batch_id"}
            result = item.get("result", {})
            observed = result.get("observed_value", result.get("unexpected_count", ""))
            sample = result.get("partial_unexpected_list", [])[:10]
            rows.append(
                [
                    "pass" if item["success"] else "FAIL",
                    config["type"],
                    json.dumps(kwargs, default=str),
                    observed,
                    json.dumps(sample, default=str) if sample else "",
                ]
            )
        parts.append(f"<h2>{title}</h2>")
        parts.append(
            _html_table(
                ["result", "expectation", "arguments", "observed / unexpected", "sample"], rows
            )
        )

    entries = _quarantine_entries(records, failures)
    parts.append(f"<h2>Quarantined records ({len(entries)})</h2>")
    if len(entries) > _REPORT_ROW_LIMIT:
        parts.append(
            f"<p>Showing the first {_REPORT_ROW_LIMIT}; {QUARANTINE_LOG_NAME} in the quarantine "
            "folder lists all of them.</p>"
        )
    parts.append(
        _html_table(
            ["file", "row", "id", "rule", "column", "value", "reason"],
            [
                [e["file"], e["row"], e["id"], e["rule"], e["column"], e["value"], e["reason"]]
                for e in entries[:_REPORT_ROW_LIMIT]
            ],
        )
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    escape = html.escape
    head = "".join(f"<th>{escape(name)}</th>" for name in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{escape('' if cell is None else str(cell))}</td>" for cell in row)
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
