"""The upstream system's landing step: one day's batch of source records per partition folder.

``land_partition`` writes ``landing/<dataset>/<YYYY-MM-DD>/``. Images are PNG files (mode L) in
ImageFolder layout ``<label>/<id>.png``. Tabular records go to ``part-00000.csv`` with the header
``id,label,<features...>``, comma-delimited, UTF-8 without BOM, floats in Python's shortest
round-trip form. ``_manifest.json`` is written last and lists every file with its size and
SHA-256, so the ingest step can tell a complete batch from a damaged one.

Records are spread over ``spec.dataset.landing_days`` cohorts by a hash of their id, and each
date lands the cohort ``date.toordinal() % landing_days``. Any ``landing_days`` consecutive days
therefore hold every record exactly once, and later days repeat the cycle.

Landing is deterministic: the same spec and date give byte-identical files, and landing a date
whose partition is already complete and matching changes nothing. Run it from the repository root::

    PYTHONPATH=include python -m ml_loop.landing --spec digits --end-date 2026-12-04 --days 5

The CLI prints one JSON summary line on stdout.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from ml_loop.datasets import SourceRecords, load_source
from ml_loop.errors import MlLoopError
from ml_loop.files import (
    TMP_PREFIX,
    data_root,
    remove_stale_staging,
    sha256_file,
    staged_dir,
    write_json_atomic,
)
from ml_loop.spec import PipelineSpec, load_spec

logger = logging.getLogger(__name__)

LANDING_AREA = "landing"
MANIFEST_FILE = "_manifest.json"
CSV_FILE = "part-00000.csv"

LandingStatus = Literal["written", "unchanged", "replaced"]


class LandingConflictError(MlLoopError, FileExistsError):
    """A landing partition already exists and differs from the batch the source gives for it."""


@dataclasses.dataclass(frozen=True)
class LandingResult:
    """One landed partition: where it is, what it contains and whether this call wrote it."""

    dataset: str
    partition_date: str
    path: str
    record_count: int
    class_counts: dict[str, int]
    status: LandingStatus

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def as_partition_date(value: dt.date | str) -> dt.date:
    """Convert ``value`` to a date, parsing a ``YYYY-MM-DD`` string.

    A datetime is rejected, because its calendar date depends on its time zone: convert it with
    ``ml_loop.ingest.resolve_partition_date`` first.
    """
    if isinstance(value, dt.datetime):
        raise TypeError(
            f"partition date {value!r} is a datetime; pass its UTC date "
            "(ml_loop.ingest.resolve_partition_date converts one)"
        )
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(value)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"invalid partition date {value!r}: expected a date in the form YYYY-MM-DD"
        ) from err


def landing_partition_dir(root: Path, dataset: str, date: dt.date) -> Path:
    """Return the folder ``landing/<dataset>/<YYYY-MM-DD>`` under ``root``."""
    return root / LANDING_AREA / dataset / date.isoformat()


def cohort_for_id(record_id: str, landing_days: int) -> int:
    """Return a record's cohort: the first 8 hex digits of its id's SHA-256, mod landing_days."""
    return int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16) % landing_days


def cohort_for_date(date: dt.date, landing_days: int) -> int:
    """Return the cohort that lands on ``date``. Consecutive dates take consecutive cohorts."""
    return date.toordinal() % landing_days


def select_for_date(ids: Sequence[str], date: dt.date, landing_days: int) -> list[int]:
    """Return the positions, in source order, of the records that land on ``date``."""
    if landing_days < 1:
        raise ValueError(
            f"invalid landing_days={landing_days!r}: expected an integer of at least 1"
        )
    cohort = cohort_for_date(date, landing_days)
    return [
        i for i, record_id in enumerate(ids) if cohort_for_id(record_id, landing_days) == cohort
    ]


def land_partition(
    spec: PipelineSpec,
    date: dt.date | str,
    root: str | Path | None = None,
    *,
    records: SourceRecords | None = None,
    overwrite: bool = False,
) -> LandingResult:
    """Write the batch of ``date`` to the landing area and return what was landed.

    ``records`` defaults to the whole source of the spec. Pass them in to land several days from
    one load, or to land a slice in tests. An existing partition that matches the batch is left
    untouched. One that differs raises LandingConflictError unless ``overwrite`` is set, in which
    case it is replaced.
    """
    date = as_partition_date(date)
    root = data_root(root)
    if records is None:
        records = load_source(spec)
    final = landing_partition_dir(root, spec.dataset.name, date)
    remove_stale_staging(final.parent)

    batch = records.take(select_for_date(records.ids, date, spec.dataset.landing_days))
    payloads = _encode_batch(spec, batch)
    manifest = build_manifest(spec, date, batch.labels, batch.source, payloads)
    result = LandingResult(
        dataset=spec.dataset.name,
        partition_date=date.isoformat(),
        path=str(final),
        record_count=len(batch),
        class_counts=manifest["class_counts"],
        status="written",
    )

    set_aside = None
    if final.exists():
        problem = _compare_partition(final, manifest)
        if problem is None:
            logger.info("landing partition %s is complete and matches; left as is", final)
            return dataclasses.replace(result, status="unchanged")
        if not overwrite:
            raise LandingConflictError(
                f"landing partition {final} already exists and differs from the batch of "
                f"{date.isoformat()} ({problem}); remove it, or land with overwrite "
                "(--overwrite on the command line) to replace it"
            )
        set_aside = _set_aside(final)
        result = dataclasses.replace(result, status="replaced")

    try:
        with staged_dir(final) as staging:
            _write_files(staging, payloads)
            # The manifest goes last, so its presence means that every listed file was written.
            write_json_atomic(staging / MANIFEST_FILE, manifest)
    except BaseException:
        if set_aside is not None and not final.exists():
            os.rename(set_aside, final)
        raise
    if set_aside is not None:
        shutil.rmtree(set_aside, ignore_errors=True)
    logger.info(
        "landed %d records of %s for %s at %s (%s)",
        len(batch),
        spec.dataset.name,
        date.isoformat(),
        final,
        result.status,
    )
    return result


def land_days(
    spec: PipelineSpec,
    end_date: dt.date | str,
    days: int,
    root: str | Path | None = None,
    *,
    overwrite: bool = False,
) -> list[LandingResult]:
    """Land ``days`` consecutive days ending at ``end_date``, oldest first."""
    end_date = as_partition_date(end_date)
    if days < 1:
        raise ValueError(f"invalid days={days!r}: expected an integer of at least 1")
    records = load_source(spec)
    dates = [end_date - dt.timedelta(days=offset) for offset in range(days - 1, -1, -1)]
    return [
        land_partition(spec, date, root, records=records, overwrite=overwrite) for date in dates
    ]


def _write_files(folder: Path, payloads: dict[str, bytes]) -> None:
    for relative, data in payloads.items():
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _encode_batch(spec: PipelineSpec, batch: SourceRecords) -> dict[str, bytes]:
    """Return the batch's files as ``{relative path: bytes}``, sorted by path."""
    if spec.dataset.kind == "images":
        return _encode_images(batch)
    return {CSV_FILE: _encode_csv(spec, batch)}


def _encode_images(batch: SourceRecords) -> dict[str, bytes]:
    from PIL import Image

    if batch.images is None:
        raise ValueError(f"source {batch.source!r} has no images for an images dataset")
    payloads = {}
    for record_id, label, pixels in zip(batch.ids, batch.labels, batch.images, strict=True):
        buffer = io.BytesIO()
        # A 2-D uint8 array becomes a mode L image. PNG output without metadata chunks is a pure
        # function of the pixels and the encoder settings, which makes relanding byte-identical.
        Image.fromarray(pixels).save(buffer, format="PNG", optimize=False, compress_level=6)
        payloads[f"{label}/{record_id}.png"] = buffer.getvalue()
    return dict(sorted(payloads.items()))


def _encode_csv(spec: PipelineSpec, batch: SourceRecords) -> bytes:
    if batch.features is None:
        raise ValueError(f"source {batch.source!r} has no feature table for a tabular dataset")
    names = spec.dataset.feature_names
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([spec.dataset.id_column, spec.dataset.label_column, *names])
    values = batch.features[names].to_numpy(dtype="float64")
    for record_id, label, row in zip(batch.ids, batch.labels, values, strict=True):
        # repr of a Python float is the shortest string that parses back to the same float64.
        writer.writerow([record_id, label, *(repr(float(value)) for value in row)])
    return buffer.getvalue().encode("utf-8")


def build_manifest(
    spec: PipelineSpec,
    date: dt.date,
    labels: Sequence[str],
    source: str,
    payloads: dict[str, bytes],
) -> dict[str, Any]:
    """Return the ``_manifest.json`` content of a partition: counts, files and their SHA-256."""
    class_counts = dict.fromkeys(spec.dataset.classes, 0)
    for label in labels:
        class_counts[label] += 1
    return {
        "dataset": spec.dataset.name,
        "partition_date": date.isoformat(),
        "record_count": len(labels),
        "files": [
            {"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for path, data in payloads.items()
        ],
        "class_counts": class_counts,
        "source": source,
    }


def _compare_partition(partition: Path, expected: dict[str, Any]) -> str | None:
    """Return why ``partition`` differs from the expected manifest, or None when it matches."""
    manifest_path = partition / MANIFEST_FILE
    try:
        existing = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no {MANIFEST_FILE}"
    except (OSError, ValueError) as err:
        return f"its {MANIFEST_FILE} cannot be read: {err}"
    if existing != expected:
        return f"its {MANIFEST_FILE} lists other records or files"
    listed = {entry["path"]: entry for entry in expected["files"]}
    present = {
        path.relative_to(partition).as_posix()
        for path in partition.rglob("*")
        if path.is_file() and path != manifest_path
    }
    if present != set(listed):
        extra = sorted(present - set(listed))
        missing = sorted(set(listed) - present)
        return f"files missing: {missing[:5]}, files not in the manifest: {extra[:5]}"
    for relative, entry in listed.items():
        path = partition / relative
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            return f"file {relative} does not match its manifest entry"
    return None


def _set_aside(partition: Path) -> Path:
    """Rename ``partition`` to a staging name, which ``remove_stale_staging`` deletes later."""
    owner = f"{socket.gethostname()}@{os.getpid()}"
    target = partition.parent / f"{TMP_PREFIX}{partition.name}-old@{owner}@{uuid.uuid4().hex[:8]}"
    os.rename(partition, target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ml_loop.landing",
        description="Land daily batches of a spec's source dataset into the landing area.",
    )
    parser.add_argument("--spec", required=True, help="spec name in include/specs, or a YAML path")
    parser.add_argument(
        "--end-date",
        type=as_partition_date,
        default=None,
        help="last date to land, YYYY-MM-DD (default: today in UTC)",
    )
    parser.add_argument(
        "--days",
        type=int,
        default=None,
        help="number of consecutive days to land, ending at --end-date "
        "(default: the spec's dataset.landing_days)",
    )
    parser.add_argument(
        "--root", default=None, help="data root folder (default: $ML_LOOP_DATA_DIR)"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing partitions that differ from the source batch",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    spec = load_spec(args.spec)
    end_date = args.end_date or dt.datetime.now(dt.UTC).date()
    days = args.days if args.days is not None else spec.dataset.landing_days
    root = data_root(args.root)
    started = time.monotonic()
    results = land_days(spec, end_date, days, root, overwrite=args.overwrite)
    summary = {
        "dataset": spec.dataset.name,
        "root": str(root),
        "end_date": end_date.isoformat(),
        "days": days,
        "records": sum(result.record_count for result in results),
        "partitions": [
            {
                "partition_date": result.partition_date,
                "record_count": result.record_count,
                "status": result.status,
            }
            for result in results
        ],
        "seconds": round(time.monotonic() - started, 3),
    }
    sys.stdout.write(json.dumps(summary, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
