"""Process: turn a window of validated partitions into model-ready arrays and normalisation stats.

Input: the ``ValidatedRef`` dicts of the validate stage, one per partition date, each pointing at
a ``table.parquet``. Images are read from the PNG files of the raw partition and scaled to
[0, 1]. Tabular features are taken in spec order. A record id seen on several days keeps the
copy of the latest partition date. Each record's split comes from a hash of its id
(``split_for_id``), so a record stays in its split across days and reruns.

Output: ``processed/<dataset>/<key>/data.npz`` and ``stats.json``. The npz file contains the
arrays ``x`` (float32, ``(n, C, H, W)`` or ``(n, F)``), ``y`` (int64 index into
``spec.dataset.classes``), ``ids`` (str) and ``split`` (uint8: 0 train, 1 validation, 2 test),
with rows sorted by id. ``stats.json`` contains the ``mean`` and ``std`` fitted on the train split
only. The key hashes the validated content hashes, the spec
digest and ``PROCESS_FORMAT``, so a rerun with the same inputs returns the existing output.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from ml_loop.errors import DataValidationError
from ml_loop.files import data_root, remove_stale_staging, staged_dir, write_json_atomic
from ml_loop.refs import StageRef
from ml_loop.spec import PipelineSpec, SplitSpec

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

PROCESSED_AREA = "processed"
DATA_FILE = "data.npz"
STATS_FILE = "stats.json"
# Part of every processed key. Bump it when the arrays this module writes change for the same
# inputs, so that old outputs are not reused.
PROCESS_FORMAT = 1
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
# A feature whose train-split standard deviation is below this gets a std of 1.0, so that
# normalisation only centres it (scikit-learn's StandardScaler does the same).
STD_FLOOR = 1e-6
ARRAY_NAMES = ("x", "y", "ids", "split")

Split = Literal["train", "validation", "test"]
VALIDATED_KEYS = ("dataset", "partition_date", "raw_hash", "table_uri", "rows", "content_hash")


@dataclasses.dataclass(frozen=True)
class ProcessedRef(StageRef):
    """The processed arrays of one window, with row counts per split and per class."""

    producer: ClassVar[str] = "ml_loop.process.process_window"

    dataset: str
    processed_uri: str
    rows: int
    split_counts: dict[str, int]
    class_counts: dict[str, int]
    content_hash: str


def split_for_id(record_id: str, split_spec: SplitSpec) -> Split:
    """Return the split of a record from the SHA-256 of its id.

    The first 8 hex digits give a fraction f in [0, 1): test when f < test, validation when
    f < test + validation, train otherwise.
    """
    fraction = int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    if fraction < split_spec.test:
        return "test"
    if fraction < split_spec.test + split_spec.validation:
        return "validation"
    return "train"


def content_digest(arrays: Mapping[str, np.ndarray], *parts: Any) -> str:
    """Return the SHA-256 of the arrays' names, dtypes, shapes and values, then of ``parts``.

    The digest depends on the array contents only, not on the bytes of a file that stores them,
    which also depend on the compression settings and the zip writer. Each part is hashed as
    canonical JSON.
    """
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        header = {"name": name, "dtype": array.dtype.str, "shape": list(array.shape)}
        digest.update(json.dumps(header, sort_keys=True).encode())
        digest.update(array.tobytes())
    for part in parts:
        digest.update(json.dumps(part, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def processing_key(spec: PipelineSpec, validated_refs: Sequence[Mapping[str, Any]]) -> str:
    """Return the output key of a window: a hash of its validated partitions and the spec."""
    payload = {
        "format": PROCESS_FORMAT,
        "spec_digest": spec.digest(),
        "partitions": sorted(
            [ref["partition_date"], ref["content_hash"]] for ref in validated_refs
        ),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def process_window(
    spec: PipelineSpec, validated_refs: Sequence[Mapping[str, Any]], root: str | Path | None = None
) -> ProcessedRef:
    """Build the processed arrays of a window of validated partitions and return a reference.

    Raises DataValidationError when there is no partition, when a reference or a table does not
    match the spec, or when no record of the window falls in the train split.
    """
    root = data_root(root)
    refs = _check_refs(spec, validated_refs)
    key = processing_key(spec, refs)
    final = root / PROCESSED_AREA / spec.dataset.name / key
    if (final / DATA_FILE).is_file() and (final / STATS_FILE).is_file():
        arrays, stats = load_processed(final)
        logger.info("processed output %s exists for these partitions; reusing it", final)
        return _processed_ref(spec, final, arrays, stats)

    logger.info(
        "processing %d partitions of %s (%s to %s), spec digest %s",
        len(refs),
        spec.dataset.name,
        refs[0]["partition_date"],
        refs[-1]["partition_date"],
        spec.digest(),
    )
    remove_stale_staging(final.parent)
    tables = [_read_table(spec, ref) for ref in refs]
    latest_rows = _deduplicate(spec, refs, tables)
    ids = sorted(latest_rows)
    y = _encode_labels(spec, ids, latest_rows, tables)
    split = np.array([SPLIT_CODES[split_for_id(rid, spec.split)] for rid in ids], dtype=np.uint8)
    train = split == SPLIT_CODES["train"]
    if not train.any():
        raise DataValidationError(
            f"none of the {len(ids)} records of the window falls in the train split "
            f"(validation {spec.split.validation}, test {spec.split.test}), so no normalisation "
            "can be fitted; widen the window or lower the validation and test shares"
        )
    if spec.dataset.kind == "images":
        x = _load_images(root, spec, refs, ids, latest_rows, tables)
    else:
        x = _load_features(spec, ids, latest_rows, tables)
    stats = _fit_stats(spec, x, train)
    if spec.dataset.kind == "tabular":
        x = _fill_missing(x, stats["mean"]).astype(np.float32)

    arrays = {"x": x, "y": y, "ids": np.array(ids, dtype=np.str_), "split": split}
    with staged_dir(final) as staging:
        np.savez_compressed(staging / DATA_FILE, **arrays)
        write_json_atomic(staging / STATS_FILE, stats)
    ref = _processed_ref(spec, final, arrays, stats)
    logger.info(
        "processed %d records into %s: splits %s, train class counts %s",
        ref.rows,
        final,
        ref.split_counts,
        ref.class_counts,
    )
    return ref


def load_processed(directory: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read ``data.npz`` and ``stats.json`` of a processed output folder."""
    directory = Path(directory)
    with np.load(directory / DATA_FILE, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    missing = [name for name in ARRAY_NAMES if name not in arrays]
    if missing:
        raise DataValidationError(
            f"processed data {directory / DATA_FILE} lacks the arrays {missing}; delete "
            f"{directory} and rerun the process stage"
        )
    stats = json.loads((directory / STATS_FILE).read_text())
    return arrays, stats


def check_validated_refs(spec: PipelineSpec, validated_refs: Sequence[Mapping[str, Any]]) -> None:
    """Raise DataValidationError when a reference lacks keys or belongs to another dataset."""
    for ref in validated_refs:
        missing = [name for name in VALIDATED_KEYS if name not in ref]
        if missing:
            raise DataValidationError(
                f"invalid validated reference {dict(ref)!r}: missing keys {missing}; pass the "
                "dicts that ml_loop.validate returned"
            )
        if ref["dataset"] != spec.dataset.name:
            raise DataValidationError(
                f"validated partition {ref['table_uri']} belongs to dataset {ref['dataset']!r}, "
                f"not to {spec.dataset.name!r} of spec {spec.name!r}"
            )


def _check_refs(
    spec: PipelineSpec, validated_refs: Sequence[Mapping[str, Any]]
) -> list[Mapping[str, Any]]:
    """Return the references sorted by partition date, after checking their keys and dataset."""
    if not validated_refs:
        raise DataValidationError(
            f"no validated partitions to process for {spec.dataset.name}: every partition of "
            "the window was missing or rejected; check the validate task's reports and the "
            "quarantine folder, or land data for the window"
        )
    check_validated_refs(spec, validated_refs)
    refs = sorted(validated_refs, key=lambda ref: ref["partition_date"])
    # A day can have a regular and a feedback partition, which are different raw copies; the
    # same raw copy twice would count its records twice.
    keys = [(ref["partition_date"], ref["raw_hash"]) for ref in refs]
    repeated = sorted({date for date, raw in keys if keys.count((date, raw)) > 1})
    if repeated:
        raise DataValidationError(
            f"several validated partitions of the same raw partition for the dates {repeated}; "
            "pass one per raw partition"
        )
    return refs


def _read_table(spec: PipelineSpec, ref: Mapping[str, Any]) -> pd.DataFrame:
    import pandas as pd

    table = pd.read_parquet(ref["table_uri"])
    required = [spec.dataset.id_column, spec.dataset.label_column]
    if spec.dataset.kind == "images":
        required.append("path")
    else:
        required.extend(spec.dataset.feature_names)
    missing = [name for name in required if name not in table.columns]
    if missing:
        raise DataValidationError(
            f"validated table {ref['table_uri']} lacks the columns {missing}; rerun the "
            "validate stage for that partition"
        )
    if len(table) != int(ref["rows"]):
        raise DataValidationError(
            f"validated table {ref['table_uri']} has {len(table)} rows, but its reference records "
            f"{ref['rows']}; the table was replaced after validation, so rerun the validate stage"
        )
    duplicated = table[spec.dataset.id_column].duplicated()
    if duplicated.any():
        examples = table.loc[duplicated, spec.dataset.id_column].head(3).tolist()
        raise DataValidationError(
            f"validated table {ref['table_uri']} repeats {int(duplicated.sum())} ids, for "
            f"example {examples}; ids must be unique within a partition"
        )
    return table


def _deduplicate(
    spec: PipelineSpec, refs: Sequence[Mapping[str, Any]], tables: Sequence[pd.DataFrame]
) -> dict[str, tuple[int, int]]:
    """Map each id to (partition index, row position) of its copy on the latest date."""
    latest_rows: dict[str, tuple[int, int]] = {}
    for index, table in enumerate(tables):
        for position, record_id in enumerate(table[spec.dataset.id_column].astype(str)):
            latest_rows[record_id] = (index, position)
    total = sum(len(table) for table in tables)
    if total > len(latest_rows):
        logger.info(
            "dropped %d older copies of ids that appear on several days between %s and %s; "
            "the latest partition date wins",
            total - len(latest_rows),
            refs[0]["partition_date"],
            refs[-1]["partition_date"],
        )
    return latest_rows


def _encode_labels(
    spec: PipelineSpec,
    ids: Sequence[str],
    latest_rows: Mapping[str, tuple[int, int]],
    tables: Sequence[pd.DataFrame],
) -> np.ndarray:
    index_of = {label: index for index, label in enumerate(spec.dataset.classes)}
    labels = [
        tables[i][spec.dataset.label_column].iloc[j] for i, j in (latest_rows[rid] for rid in ids)
    ]
    unknown = sorted({str(label) for label in labels} - set(index_of))
    if unknown:
        raise DataValidationError(
            f"validated tables contain labels {unknown} that are not in the classes "
            f"{list(spec.dataset.classes)} of spec {spec.name!r}; rerun the validate stage, which "
            "quarantines such records"
        )
    return np.array([index_of[str(label)] for label in labels], dtype=np.int64)


def _load_images(
    root: Path,
    spec: PipelineSpec,
    refs: Sequence[Mapping[str, Any]],
    ids: Sequence[str],
    latest_rows: Mapping[str, tuple[int, int]],
    tables: Sequence[pd.DataFrame],
) -> np.ndarray:
    from PIL import Image

    image = spec.dataset.image
    assert image is not None, "load_spec guarantees an image section for images datasets"
    channels = Image.getmodebands(image.mode)
    x = np.empty((len(ids), channels, image.height, image.width), dtype=np.float32)
    raw_dirs = [_raw_dir(root, spec, ref) for ref in refs]
    for row, record_id in enumerate(ids):
        index, position = latest_rows[record_id]
        path = raw_dirs[index] / str(tables[index]["path"].iloc[position])
        with Image.open(path) as picture:
            if picture.mode != image.mode or picture.size != (image.width, image.height):
                raise DataValidationError(
                    f"image {path} is {picture.mode} {picture.size[0]}x{picture.size[1]}, but "
                    f"spec {spec.name!r} expects {image.mode} {image.width}x{image.height}; "
                    "rerun the validate stage, which quarantines such files"
                )
            pixels = np.asarray(picture, dtype=np.uint8)
        # Mode L gives (H, W) and multi-band modes give (H, W, C), which is stored channels first.
        pixels = pixels[np.newaxis] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
        x[row] = pixels.astype(np.float32) / 255.0
    return x


def _raw_dir(root: Path, spec: PipelineSpec, ref: Mapping[str, Any]) -> Path:
    """Return the raw partition that a validated table's ``path`` column is relative to."""
    if "raw_uri" in ref:
        return Path(ref["raw_uri"])
    date = dt.date.fromisoformat(ref["partition_date"]).isoformat()
    return root / "raw" / spec.dataset.name / date / ref["raw_hash"]


def _load_features(
    spec: PipelineSpec,
    ids: Sequence[str],
    latest_rows: Mapping[str, tuple[int, int]],
    tables: Sequence[pd.DataFrame],
) -> np.ndarray:
    names = spec.dataset.feature_names
    matrices = [table[names].to_numpy(dtype=np.float64, na_value=np.nan) for table in tables]
    x = np.empty((len(ids), len(names)), dtype=np.float64)
    for row, record_id in enumerate(ids):
        index, position = latest_rows[record_id]
        x[row] = matrices[index][position]
    if np.isinf(x).any():
        columns = [names[i] for i in np.flatnonzero(np.isinf(x).any(axis=0))]
        raise DataValidationError(
            f"features {columns} contain infinite values; rerun the validate stage, whose "
            "bounds quarantine such records"
        )
    nullable = {column.name for column in spec.dataset.columns if column.nullable}
    missing = [names[i] for i in np.flatnonzero(np.isnan(x).any(axis=0))]
    required = [name for name in missing if name not in nullable]
    if required:
        raise DataValidationError(
            f"features {required} contain missing values but are not nullable in spec "
            f"{spec.name!r}; rerun the validate stage, or mark them nullable: true"
        )
    return x


def _fit_stats(spec: PipelineSpec, x: np.ndarray, train: np.ndarray) -> dict[str, list[float]]:
    """Fit the mean and std per channel (images) or per feature (tabular) on the train rows."""
    if spec.dataset.kind == "images":
        axes = (0, 2, 3)
        mean = x[train].mean(axis=axes, dtype=np.float64)
        std = x[train].std(axis=axes, dtype=np.float64)
    else:
        mean = np.nanmean(x[train], axis=0)
        std = np.nanstd(x[train], axis=0)
        empty = np.isnan(mean)
        if empty.any():
            names = [spec.dataset.feature_names[i] for i in np.flatnonzero(empty)]
            raise DataValidationError(
                f"features {names} are missing in every train record, so they cannot be "
                "normalised or filled; land data with values for them"
            )
    std = np.where(std < STD_FLOOR, 1.0, std)
    return {"mean": [float(value) for value in mean], "std": [float(value) for value in std]}


def _fill_missing(x: np.ndarray, mean: Sequence[float]) -> np.ndarray:
    """Fill missing values of nullable features with the train mean of their column."""
    gaps = np.isnan(x)
    if gaps.any():
        x = np.where(gaps, np.asarray(mean, dtype=x.dtype), x)
        logger.info("filled %d missing nullable feature values with the train mean", gaps.sum())
    return x


def _processed_ref(
    spec: PipelineSpec, directory: Path, arrays: Mapping[str, np.ndarray], stats: dict[str, Any]
) -> ProcessedRef:
    split = arrays["split"]
    train_labels = arrays["y"][split == SPLIT_CODES["train"]]
    per_class = np.bincount(train_labels, minlength=len(spec.dataset.classes))
    return ProcessedRef(
        dataset=spec.dataset.name,
        processed_uri=str(directory),
        rows=len(arrays["ids"]),
        split_counts={name: int((split == code).sum()) for name, code in SPLIT_CODES.items()},
        class_counts={
            label: int(count) for label, count in zip(spec.dataset.classes, per_class, strict=True)
        },
        content_hash=content_digest(arrays, stats),
    )
