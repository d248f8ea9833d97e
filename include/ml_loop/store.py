"""Store: freeze a processed window as an immutable, versioned dataset snapshot.

A snapshot is ``snapshots/<dataset>/<version_id>/`` with ``data.npz`` (the processed arrays, copied
byte for byte) and ``manifest.json``. The manifest records the schema, row counts per split and
class, the validated partitions the data came from with their report URIs, the normalisation
stats, the window dates, the SHA-256 of ``data.npz`` and the parent version.

``version_id`` is the first 16 hex digits of a SHA-256 over the array contents, the stats and the
schema. It does not depend on the bytes of ``data.npz``, which also depend on the compression
settings and the zip writer, so the same data keeps its id however the file was written. A rerun
with the same inputs therefore finds its version and writes no duplicate.

The parent version is the snapshot of the same dataset whose window ends latest before this
one's. It is recorded in the manifest but kept out of the id, so the same data gets the same
version whatever was stored before it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ml_loop.errors import DataValidationError
from ml_loop.files import (
    TMP_PREFIX,
    data_root,
    remove_stale_staging,
    sha256_file,
    staged_dir,
    write_json_atomic,
)
from ml_loop.process import (
    DATA_FILE,
    SPLIT_CODES,
    SPLITS,
    ProcessedRef,
    check_validated_refs,
    content_digest,
    load_processed,
)
from ml_loop.refs import StageRef
from ml_loop.spec import PipelineSpec

logger = logging.getLogger(__name__)

SNAPSHOT_AREA = "snapshots"
MANIFEST_FILE = "manifest.json"
VERSION_ID_LENGTH = 16


@dataclasses.dataclass(frozen=True)
class SnapshotRef(StageRef):
    """One stored dataset version: its id, folder, manifest and parent version."""

    producer: ClassVar[str] = "ml_loop.store.store_snapshot"

    dataset: str
    version_id: str
    uri: str
    manifest_uri: str
    rows: int
    parent_version: str | None


def snapshot_schema(spec: PipelineSpec, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Return the schema part of the manifest: kind, input shape, classes, features or image."""
    schema: dict[str, Any] = {
        "kind": spec.dataset.kind,
        "input_shape": [int(dim) for dim in arrays["x"].shape[1:]],
        "classes": list(spec.dataset.classes),
    }
    if spec.dataset.kind == "images" and spec.dataset.image is not None:
        image = spec.dataset.image
        schema["image"] = {"width": image.width, "height": image.height, "mode": image.mode}
    else:
        schema["features"] = spec.dataset.feature_names
    return schema


def store_snapshot(
    spec: PipelineSpec,
    processed: Mapping[str, Any],
    validated_refs: Sequence[Mapping[str, Any]],
    root: str | Path | None = None,
    on_staged: Callable[[Path], None] | None = None,
) -> SnapshotRef:
    """Store the processed window as a snapshot and return its reference.

    ``processed`` is the ``ProcessedRef`` dict of the process stage and ``validated_refs`` the
    validated partitions it was built from. A snapshot with the same version id is returned as
    it is. ``on_staged`` is called with the staging folder once its files are written and before
    it is renamed into place. Staging folders left by killed writers are removed first.
    """
    root = data_root(root)
    processed_ref = ProcessedRef.from_dict(processed)
    if processed_ref.dataset != spec.dataset.name:
        raise DataValidationError(
            f"processed output {processed_ref.processed_uri} belongs to dataset "
            f"{processed_ref.dataset!r}, not to {spec.dataset.name!r} of spec {spec.name!r}"
        )
    partitions = _source_partitions(spec, validated_refs)
    dataset_dir = root / SNAPSHOT_AREA / spec.dataset.name
    removed = remove_stale_staging(dataset_dir)
    if removed:
        logger.warning(
            "removed %d staging folders left by killed writers: %s",
            len(removed),
            ", ".join(path.name for path in removed),
        )

    arrays, stats = load_processed(processed_ref.processed_uri)
    actual_hash = content_digest(arrays, stats)
    if actual_hash != processed_ref.content_hash:
        raise DataValidationError(
            f"processed output {processed_ref.processed_uri} has content hash {actual_hash}, "
            f"not the {processed_ref.content_hash} its reference records; it changed after the "
            "process stage, so rerun that stage"
        )
    schema = snapshot_schema(spec, arrays)
    version_id = content_digest(arrays, stats, schema)[:VERSION_ID_LENGTH]
    final = dataset_dir / version_id
    if final.exists():
        logger.info("snapshot %s of %s exists; reusing it", version_id, spec.dataset.name)
        return _snapshot_ref(final)

    window = {"start": partitions[0]["partition_date"], "end": partitions[-1]["partition_date"]}
    parent_version = find_parent_version(dataset_dir, window["end"], exclude=version_id)
    with staged_dir(final) as staging:
        shutil.copyfile(Path(processed_ref.processed_uri) / DATA_FILE, staging / DATA_FILE)
        manifest = {
            "version_id": version_id,
            "dataset": spec.dataset.name,
            "spec": {"name": spec.name, "digest": spec.digest()},
            "schema": schema,
            "counts": _counts(spec, arrays),
            "source_partitions": partitions,
            "processed_uri": processed_ref.processed_uri,
            "data_sha256": sha256_file(staging / DATA_FILE),
            "stats": stats,
            "window": window,
            "parent_version": parent_version,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        write_json_atomic(staging / MANIFEST_FILE, manifest)
        if on_staged is not None:
            on_staged(staging)
    ref = _snapshot_ref(final)
    logger.info(
        "stored snapshot %s of %s: %d rows, window %s to %s, parent %s, at %s",
        ref.version_id,
        spec.dataset.name,
        ref.rows,
        window["start"],
        window["end"],
        ref.parent_version,
        final,
    )
    return ref


def load_snapshot(uri: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a snapshot's arrays and manifest, after checking ``data.npz`` against its SHA-256.

    ``uri`` is the snapshot folder or its ``manifest.json``. Raises FileNotFoundError when the
    snapshot does not exist and DataValidationError when its data file was changed.
    """
    directory = Path(uri)
    if directory.name == MANIFEST_FILE:
        directory = directory.parent
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise FileNotFoundError(
            f"snapshot manifest {manifest_path} not found; pass the uri of a SnapshotRef that "
            "ml_loop.store returned"
        )
    manifest = json.loads(manifest_path.read_text())
    data_path = directory / DATA_FILE
    actual = sha256_file(data_path)
    if actual != manifest["data_sha256"]:
        raise DataValidationError(
            f"snapshot data {data_path} has SHA-256 {actual}, but its manifest records "
            f"{manifest['data_sha256']}; the file was changed after the snapshot was stored, so "
            "delete the snapshot folder and rerun the store stage"
        )
    with np.load(data_path, allow_pickle=False) as archive:
        arrays = {name: archive[name] for name in archive.files}
    return arrays, manifest


def find_parent_version(dataset_dir: Path, window_end: str, exclude: str) -> str | None:
    """Return the stored version whose window ends latest before ``window_end``, or None.

    Ties on the end date go to the later window start, then to the greater version id, so the
    result does not depend on the order in which snapshots were written.
    """
    if not dataset_dir.is_dir():
        return None
    candidates = []
    for entry in dataset_dir.iterdir():
        if entry.name.startswith(TMP_PREFIX) or entry.name == exclude:
            continue
        manifest_path = entry / MANIFEST_FILE
        if not manifest_path.is_file():
            continue
        try:
            manifest = json.loads(manifest_path.read_text())
            key = (manifest["window"]["end"], manifest["window"]["start"], manifest["version_id"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("skipped unreadable snapshot manifest %s: %s", manifest_path, err)
            continue
        if key[0] < window_end:
            candidates.append(key)
    return max(candidates)[2] if candidates else None


def _source_partitions(
    spec: PipelineSpec, validated_refs: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    if not validated_refs:
        raise DataValidationError(
            f"no validated partitions given for the snapshot of {spec.dataset.name}; pass the "
            "validated references the processed output was built from"
        )
    check_validated_refs(spec, validated_refs)
    partitions = []
    for ref in sorted(validated_refs, key=lambda ref: ref["partition_date"]):
        partitions.append(
            {
                "partition_date": ref["partition_date"],
                "raw_hash": ref["raw_hash"],
                "content_hash": ref["content_hash"],
                "rows": int(ref["rows"]),
                "quarantined": int(ref.get("quarantined", 0)),
                "report_uri": ref.get("report_uri"),
                "results_uri": ref.get("results_uri"),
            }
        )
    return partitions


def _counts(spec: PipelineSpec, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    split, y = arrays["split"], arrays["y"]
    classes = {}
    for name in SPLITS:
        per_class = np.bincount(y[split == SPLIT_CODES[name]], minlength=len(spec.dataset.classes))
        classes[name] = {
            label: int(count) for label, count in zip(spec.dataset.classes, per_class, strict=True)
        }
    return {
        "rows": len(y),
        "splits": {name: int((split == SPLIT_CODES[name]).sum()) for name in SPLITS},
        "classes": classes,
    }


def _snapshot_ref(directory: Path) -> SnapshotRef:
    manifest_path = directory / MANIFEST_FILE
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as err:
        raise DataValidationError(
            f"snapshot folder {directory} has no {MANIFEST_FILE}; it was not written by "
            "ml_loop.store, so delete it and rerun the store stage"
        ) from err
    return SnapshotRef(
        dataset=manifest["dataset"],
        version_id=manifest["version_id"],
        uri=str(directory),
        manifest_uri=str(manifest_path),
        rows=int(manifest["counts"]["rows"]),
        parent_version=manifest["parent_version"],
    )
