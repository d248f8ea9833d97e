"""Ingest: copy landing partitions into the immutable, content-addressed raw area.

A landing partition ``landing/<dataset>/<YYYY-MM-DD>/`` is copied to
``raw/<dataset>/<YYYY-MM-DD>/<content_hash>/``, where ``content_hash`` is ``files.sha256_tree`` of
the landing folder. The copy is staged, renamed into place and made read-only. An existing copy
with the same hash is returned without copying again, so reruns and backfills are cheap and never
change data that later stages have already read.

When the partition carries the landing step's ``_manifest.json``, every listed file must be
present with its size and SHA-256, and no other file may be present; otherwise the partition is
rejected as a whole. A partition without a manifest (data placed there by hand) is accepted with
a WARNING, and the validate stage checks its records.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import stat
from pathlib import Path, PurePosixPath
from typing import ClassVar

from ml_loop.errors import DataValidationError, PartitionNotFoundError, SpecError
from ml_loop.files import data_root, remove_stale_staging, sha256_file, sha256_tree, staged_dir
from ml_loop.landing import (
    MANIFEST_FILE,
    as_partition_date,
    landing_partition_dir,
)
from ml_loop.refs import StageRef
from ml_loop.spec import PipelineSpec

logger = logging.getLogger(__name__)

RAW_AREA = "raw"
READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
LANDING_SOURCE = "landing"
FEEDBACK_SOURCE = "feedback"
# Labelled live traffic, written by ml_loop.feedback in the landing layout.
FEEDBACK_LANDING_AREA = "landing_feedback"


@dataclasses.dataclass(frozen=True)
class PartitionRef(StageRef):
    """One ingested partition in the raw area.

    ``file_count`` and ``bytes`` count the data files, without ``_manifest.json``. ``source`` is
    ``landing`` for a regular batch and ``feedback`` for labelled live traffic that the monitoring
    DAG wrote under ``landing_feedback/``.
    """

    producer: ClassVar[str] = "ml_loop.ingest.ingest_partition"

    dataset: str
    partition_date: str
    raw_uri: str
    file_count: int
    bytes: int
    content_hash: str
    source: str = LANDING_SOURCE


def resolve_partition_date(logical_date: dt.datetime | None, run_after: dt.datetime) -> dt.date:
    """Return the UTC date of the partition a DAG run reads.

    Scheduled and backfill runs carry a logical date. A manual run may have none, and then the
    time the run was queued for (``run_after``) decides. A naive datetime is taken as UTC.
    """
    moment = logical_date if logical_date is not None else run_after
    if moment.tzinfo is not None:
        moment = moment.astimezone(dt.UTC)
    return dt.date(moment.year, moment.month, moment.day)


def raw_partition_dir(root: Path, dataset: str, date: dt.date, content_hash: str) -> Path:
    """Return the folder ``raw/<dataset>/<YYYY-MM-DD>/<content_hash>`` under ``root``."""
    return root / RAW_AREA / dataset / date.isoformat() / content_hash


def feedback_landing_dir(root: Path, dataset: str, date: dt.date) -> Path:
    """Return the folder ``landing_feedback/<dataset>/<YYYY-MM-DD>`` under ``root``."""
    return root / FEEDBACK_LANDING_AREA / dataset / date.isoformat()


def ingest_partition(
    spec: PipelineSpec,
    date: dt.date | str,
    root: str | Path | None = None,
    *,
    source_kind: str = LANDING_SOURCE,
) -> PartitionRef:
    """Copy the landing partition of ``date`` into the raw area and return a reference to it.

    ``source_kind`` ``feedback`` reads the feedback partition under ``landing_feedback/``
    instead. Raises PartitionNotFoundError when the partition does not exist, and
    DataValidationError when its manifest does not match its files.
    """
    date = as_partition_date(date)
    root = data_root(root)
    dataset = spec.dataset.name
    if source_kind == FEEDBACK_SOURCE:
        source = feedback_landing_dir(root, dataset, date)
    else:
        source = landing_partition_dir(root, dataset, date)
    if not source.is_dir():
        raise PartitionNotFoundError(
            f"landing partition of {dataset} for {date.isoformat()} not found at {source}; "
            f"land the data for that date first (python -m ml_loop.landing --spec {spec.name} "
            f"--end-date {date.isoformat()} --days 1) or pick a date that has landed data"
            f"{_landed_dates_hint(source.parent)}"
        )

    content_hash = sha256_tree(source)
    final = raw_partition_dir(root, dataset, date, content_hash)
    if final.is_dir():
        _check_raw_copy(final, content_hash)
        ref = _partition_ref(dataset, date, final, content_hash, source_kind)
        logger.info("partition %s already ingested at %s; reusing it", date.isoformat(), final)
        return ref

    remove_stale_staging(final.parent)
    with staged_dir(final) as staging:
        _copy_tree(source, staging)
        copied_hash = sha256_tree(staging)
        if copied_hash != content_hash:
            raise DataValidationError(
                f"landing partition {source} changed while it was copied (SHA-256 {content_hash} "
                f"before, {copied_hash} after); wait until the landing step has finished and "
                "rerun the ingest"
            )
        _check_manifest(staging, source, dataset, date)
        _make_read_only(staging)
    ref = _partition_ref(dataset, date, final, content_hash, source_kind)
    logger.info(
        "ingested %s %s partition %s: %d files, %d bytes, content hash %s, at %s",
        dataset,
        source_kind,
        date.isoformat(),
        ref.file_count,
        ref.bytes,
        content_hash,
        final,
    )
    return ref


def ingest_window(
    spec: PipelineSpec, run_date: dt.date | str, window_days: int, root: str | Path | None = None
) -> list[PartitionRef]:
    """Ingest ``run_date`` and the ``window_days - 1`` days before it; return them oldest first.

    The run's own date is required. Earlier days that were never landed are skipped with a
    WARNING. Days after ``run_date`` are never read, so a backfill run reads only the data that
    existed up to its own date. A day's feedback partition, when one exists, comes just before
    that day's regular partition.
    """
    run_date = as_partition_date(run_date)
    if window_days < 1:
        raise SpecError(
            f"invalid training_window_days={window_days!r}: expected an integer of at least 1"
        )
    root = data_root(root)
    dates = [run_date - dt.timedelta(days=offset) for offset in range(window_days - 1, -1, -1)]
    # The run's own date first, so a missing partition fails before anything is copied.
    run_ref = ingest_partition(spec, run_date, root)

    refs = []
    skipped = []
    for date in dates:
        if feedback_landing_dir(root, spec.dataset.name, date).is_dir():
            refs.append(ingest_partition(spec, date, root, source_kind=FEEDBACK_SOURCE))
        if date == run_date:
            refs.append(run_ref)
        elif landing_partition_dir(root, spec.dataset.name, date).is_dir():
            refs.append(ingest_partition(spec, date, root))
        else:
            skipped.append(date.isoformat())
    if skipped:
        logger.warning(
            "window of %d days ending %s: skipped %d days that were never landed: %s",
            window_days,
            run_date.isoformat(),
            len(skipped),
            ", ".join(skipped),
        )
    logger.info(
        "window ending %s: %d partitions ingested, %d files in all",
        run_date.isoformat(),
        len(refs),
        sum(ref.file_count for ref in refs),
    )
    return refs


def _landed_dates_hint(dataset_dir: Path) -> str:
    if not dataset_dir.is_dir():
        return f" (nothing has been landed under {dataset_dir})"
    dates = sorted(
        entry.name for entry in dataset_dir.iterdir() if entry.is_dir() and entry.name[:1] != "."
    )
    if not dates:
        return f" (nothing has been landed under {dataset_dir})"
    return f" (landed dates: {dates[0]} to {dates[-1]}, {len(dates)} in all)"


def _copy_tree(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*")):
        destination = target / path.relative_to(source)
        if path.is_dir():
            destination.mkdir(parents=True, exist_ok=True)
        elif path.is_file():
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)


def _check_manifest(copy: Path, source: Path, dataset: str, date: dt.date) -> None:
    """Raise DataValidationError unless the copy's files match its ``_manifest.json``."""
    manifest_path = copy / MANIFEST_FILE
    if not manifest_path.is_file():
        logger.warning(
            "landing partition %s has no %s, so its files cannot be checked against the "
            "landing step's list; ingesting them as they are",
            source,
            MANIFEST_FILE,
        )
        return
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        listed = {entry["path"]: entry for entry in manifest["files"]}
        manifest_dataset = manifest["dataset"]
        manifest_date = manifest["partition_date"]
    except (ValueError, KeyError, TypeError) as err:
        raise DataValidationError(
            f"invalid manifest {source / MANIFEST_FILE}: {err!r}; expected the JSON the landing "
            "step writes, with dataset, partition_date and files [{path, bytes, sha256}]"
        ) from err

    if manifest_dataset != dataset or manifest_date != date.isoformat():
        raise DataValidationError(
            f"manifest {source / MANIFEST_FILE} is for {manifest_dataset} on {manifest_date}, "
            f"but the partition is {dataset} on {date.isoformat()}; the batch was landed in "
            "the wrong folder, so land it again"
        )
    present = {
        path.relative_to(copy).as_posix(): path
        for path in copy.rglob("*")
        if path.is_file() and path != manifest_path
    }
    for relative, entry in sorted(listed.items()):
        pure = PurePosixPath(relative)
        if pure.is_absolute() or ".." in pure.parts:
            raise DataValidationError(
                f"manifest {source / MANIFEST_FILE} lists the path {relative!r}, which points "
                "outside the partition; the manifest is not the landing step's"
            )
        path = present.get(relative)
        if path is None:
            raise DataValidationError(
                f"file {source / relative} is listed in {MANIFEST_FILE} but missing; the batch "
                "is incomplete, so land it again"
            )
        size = path.stat().st_size
        digest = sha256_file(path)
        if size != entry.get("bytes") or digest != entry.get("sha256"):
            raise DataValidationError(
                f"file {source / relative} does not match {MANIFEST_FILE}: {size} bytes with "
                f"SHA-256 {digest}, but the manifest lists {entry.get('bytes')} bytes with "
                f"SHA-256 {entry.get('sha256')}; the file was changed or damaged after landing, "
                "so land the batch again"
            )
    unlisted = sorted(set(present) - set(listed))
    if unlisted:
        raise DataValidationError(
            f"landing partition {source} contains {len(unlisted)} files that {MANIFEST_FILE} "
            f"does not list, for example {source / unlisted[0]}; remove them or land the batch "
            "again"
        )


def _check_raw_copy(copy: Path, content_hash: str) -> None:
    actual = sha256_tree(copy)
    if actual != content_hash:
        raise DataValidationError(
            f"raw partition {copy} has SHA-256 {actual}, not the {content_hash} in its name; "
            "the copy was changed after ingest, so delete the folder and rerun the ingest"
        )


def _make_read_only(tree: Path) -> None:
    for path in tree.rglob("*"):
        if path.is_file():
            os.chmod(path, READ_ONLY)


def _partition_ref(
    dataset: str, date: dt.date, copy: Path, content_hash: str, source_kind: str
) -> PartitionRef:
    data_files = [
        path for path in copy.rglob("*") if path.is_file() and path != copy / MANIFEST_FILE
    ]
    return PartitionRef(
        dataset=dataset,
        partition_date=date.isoformat(),
        raw_uri=str(copy),
        file_count=len(data_files),
        bytes=sum(path.stat().st_size for path in data_files),
        content_hash=content_hash,
        source=source_kind,
    )
