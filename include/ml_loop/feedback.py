"""Feedback: decide whether monitoring requests a retrain, and turn labels into training data.

``decide_retraining`` applies the spec's guardrails to a ``MonitoringResult`` and records every
decision, requested or skipped with its reason, as one line of
``monitoring/<spec>/decisions.jsonl`` under the data root. A retry of the same window finds its
decision there and returns it unchanged, so a retried task never counts twice against the
cooldown or the daily maximum.

``materialize_feedback`` joins one day's logged predictions with their labels
(``feedback/<dataset>/<YYYY-MM-DD>/labels.csv``, see ``ml_loop.monitor``) and writes them as a
landing partition in the landing step's format, in a separate area beside the regular one::

    landing_feedback/<dataset>/<YYYY-MM-DD>/<label>/<id>.png      images (ImageFolder layout)
    landing_feedback/<dataset>/<YYYY-MM-DD>/part-00000.csv        tabular (id,label,<features>)
    landing_feedback/<dataset>/<YYYY-MM-DD>/_manifest.json        written last; source "feedback"

The regular partition ``landing/<dataset>/<YYYY-MM-DD>/`` is never touched, so relanding a day
stays possible, and ingest reads the feedback partition of a day as one more partition of the
training window. A partition with fewer rows than the spec's ``expectations.min_rows`` is held
back until enough labels have arrived, because validation would reject it as a batch.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import fcntl
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ml_loop.files import data_root, remove_stale_staging, staged_dir, write_json_atomic
from ml_loop.ingest import FEEDBACK_SOURCE, feedback_landing_dir
from ml_loop.landing import CSV_FILE, MANIFEST_FILE, as_partition_date, build_manifest
from ml_loop.spec import PipelineSpec

logger = logging.getLogger(__name__)

DECISIONS_FILE = "decisions.jsonl"
RETRAIN_DECISION_TAG = "ml_loop.retrain_decision"
RETRAIN_REASON_TAG = "ml_loop.retrain_reason"
# Ids become file names in the ImageFolder layout, so only these characters are accepted.
SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")

FeedbackStatus = Literal["written", "unchanged", "replaced", "held_back", "empty"]


# ---------------------------------------------------------------------------------------------
# The retraining decision


@dataclasses.dataclass(frozen=True)
class RetrainDecision:
    """Whether one monitoring window requests a retrain, and every guardrail check behind it.

    ``checks`` lists ``{rule, passed, detail}`` in the order they are applied; ``reason`` is
    the first failed check's detail, or the findings when the retrain is requested.
    """

    key: str
    spec: str
    model_name: str
    model_version: str
    requested: bool
    reason: str
    checks: list[dict[str, Any]]
    findings: list[dict[str, Any]]
    numbers: dict[str, Any]
    window_start: str
    window_end: str
    decided_at: str
    monitoring_run_id: str | None
    report_uri: str | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def asset_extra(self) -> dict[str, Any]:
        """Return the asset event's metadata: reason, numbers, window and model version."""
        return {
            "spec": self.spec,
            "reason": self.reason,
            "findings": [
                {key: item[key] for key in ("metric", "value", "threshold")}
                for item in self.findings
            ],
            "numbers": self.numbers,
            "window_start": self.window_start,
            "window_end": self.window_end,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "monitoring_run_id": self.monitoring_run_id,
            "report_uri": self.report_uri,
            "decision_key": self.key,
        }


def decisions_path(root: Path, spec_name: str) -> Path:
    """Return ``monitoring/<spec>/decisions.jsonl`` under ``root``."""
    return root / "monitoring" / spec_name / DECISIONS_FILE


def read_decisions(root: str | Path | None, spec_name: str) -> list[dict[str, Any]]:
    """Return every recorded decision of ``spec_name``, oldest first."""
    path = decisions_path(data_root(root), spec_name)
    if not path.is_file():
        return []
    decisions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            decisions.append(json.loads(line))
        except ValueError:
            # A torn last line from a killed writer; the decision it held is made again.
            logger.warning("decision log %s line %d is not valid JSON; ignoring it", path, number)
    return decisions


def decide_retraining(
    spec: PipelineSpec,
    result: Mapping[str, Any],
    *,
    active_training_runs: int,
    now: dt.datetime | None = None,
    root: str | Path | None = None,
) -> RetrainDecision:
    """Decide whether the monitoring ``result`` (a ``MonitoringResult`` dict) requests a retrain.

    The rules, in order: a finding exists (drift or an accuracy drop); there is enough traffic
    behind it (``min_predictions`` for drift, ``min_labelled`` for accuracy); the champion is
    older than ``min_champion_age_hours``; no training run is queued or running
    (``active_training_runs``, which the caller reads from Airflow); no request in the last
    ``cooldown_hours``; fewer than ``max_retrains_per_day`` requests in the last 24 hours.
    The decision is appended to the decision log before it is returned.
    """
    root = data_root(root)
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    key = f"{spec.name}:{result['model_name']}:{result['model_version']}:{result['window_end']}"
    earlier = read_decisions(root, spec.name)
    for decision in earlier:
        if decision.get("key") == key:
            logger.info("window %s was decided before; returning that decision", key)
            return RetrainDecision(**decision)

    monitoring = spec.monitoring
    guardrails = monitoring.guardrails
    traffic = result["traffic"]
    accuracy = result["accuracy"]
    findings = list(result.get("reasons") or [])
    drift_findings = [item for item in findings if item["metric"] != "accuracy_drop"]
    accuracy_findings = [item for item in findings if item["metric"] == "accuracy_drop"]
    predictions = int(traffic["predictions"])
    labelled = int(accuracy["labelled"])
    enough_for_drift = bool(drift_findings) and predictions >= monitoring.min_predictions
    enough_for_accuracy = bool(accuracy_findings) and labelled >= monitoring.min_labelled

    champion_created = dt.datetime.fromisoformat(result["champion_created_at"])
    champion_age_h = (now - champion_created).total_seconds() / 3600
    requests = [
        dt.datetime.fromisoformat(item["decided_at"]) for item in earlier if item.get("requested")
    ]
    last_request = max(requests, default=None)
    since_last_h = None if last_request is None else (now - last_request).total_seconds() / 3600
    last_day = sum(1 for moment in requests if now - moment < dt.timedelta(hours=24))

    checks = [
        _check(
            "finding",
            bool(findings),
            "no drift or accuracy drop detected"
            if not findings
            else "findings: " + ", ".join(item["metric"] for item in findings),
        ),
        _check(
            "enough_traffic",
            enough_for_drift or enough_for_accuracy,
            f"{predictions} predictions (min_predictions {monitoring.min_predictions}) and "
            f"{labelled} labelled (min_labelled {monitoring.min_labelled}) in the window",
        ),
        _check(
            "champion_age",
            champion_age_h >= guardrails.min_champion_age_hours,
            f"champion version {result['model_version']} is {champion_age_h:.1f} h old "
            f"(min_champion_age_hours {guardrails.min_champion_age_hours})",
        ),
        _check(
            "no_active_training",
            active_training_runs == 0,
            f"{active_training_runs} training runs are queued or running",
        ),
        _check(
            "cooldown",
            since_last_h is None or since_last_h >= guardrails.cooldown_hours,
            "no earlier request"
            if since_last_h is None
            else f"last request {since_last_h:.1f} h ago (cooldown_hours "
            f"{guardrails.cooldown_hours})",
        ),
        _check(
            "daily_maximum",
            last_day < guardrails.max_retrains_per_day,
            f"{last_day} requests in the last 24 h (max_retrains_per_day "
            f"{guardrails.max_retrains_per_day})",
        ),
    ]
    failed = [check for check in checks if not check["passed"]]
    requested = not failed
    if requested:
        reason = "; ".join(item["message"] for item in findings)
    else:
        reason = f"skipped ({failed[0]['rule']}): {failed[0]['detail']}"
    drift = result.get("drift") or {}
    decision = RetrainDecision(
        key=key,
        spec=spec.name,
        model_name=result["model_name"],
        model_version=str(result["model_version"]),
        requested=requested,
        reason=reason,
        checks=checks,
        findings=findings,
        numbers={
            "predictions": predictions,
            "labelled": labelled,
            "drift_share": drift.get("drift_share"),
            "live_accuracy": accuracy.get("live_accuracy"),
            "offline_accuracy": accuracy.get("offline_accuracy"),
            "accuracy_drop": accuracy.get("drop"),
        },
        window_start=result["window_start"],
        window_end=result["window_end"],
        decided_at=now.isoformat(),
        monitoring_run_id=result.get("mlflow_run_id"),
        report_uri=result.get("report_uri"),
    )
    _append_decision(decisions_path(root, spec.name), decision)
    if requested:
        logger.info("retrain of %s requested: %s", spec.name, reason)
    else:
        logger.info("retrain of %s not requested: %s", spec.name, reason)
    return decision


def _check(rule: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"rule": rule, "passed": bool(passed), "detail": detail}


def _append_decision(path: Path, decision: RetrainDecision) -> None:
    """Append one JSON line under an exclusive lock, and fsync it before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(decision.to_dict(), sort_keys=True, default=str) + "\n"
    with path.open("a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def record_decision_in_mlflow(decision: RetrainDecision, tracking_uri: str | None = None) -> None:
    """Tag the monitoring run with the decision and log the metric ``retrain_requested``."""
    from mlflow import MlflowClient

    if decision.monitoring_run_id is None:
        logger.warning("decision %s has no monitoring run; nothing logged to MLflow", decision.key)
        return
    client = MlflowClient(tracking_uri=tracking_uri)
    run_id = decision.monitoring_run_id
    client.set_tag(run_id, RETRAIN_DECISION_TAG, "requested" if decision.requested else "skipped")
    client.set_tag(run_id, RETRAIN_REASON_TAG, decision.reason[:5000])
    timestamp = int(dt.datetime.fromisoformat(decision.window_end).timestamp() * 1000)
    client.log_metric(run_id, "retrain_requested", float(decision.requested), timestamp=timestamp)


# ---------------------------------------------------------------------------------------------
# Labelled feedback as training data


@dataclasses.dataclass(frozen=True)
class FeedbackPartition:
    """One day's labelled predictions as a landing partition, or why none was written."""

    dataset: str
    partition_date: str
    path: str
    record_count: int
    class_counts: dict[str, int]
    status: FeedbackStatus
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def join_labels(
    records: Sequence[Mapping[str, Any]], labels: Mapping[str, str]
) -> list[tuple[Mapping[str, Any], str]]:
    """Return ``(record, label)`` for each record with a label; the latest record wins per id."""
    latest: dict[str, Mapping[str, Any]] = {}
    for record in sorted(records, key=lambda item: item["time"]):
        latest[str(record["id"])] = record
    return [
        (record, labels[record_id]) for record_id, record in latest.items() if record_id in labels
    ]


def materialize_feedback(
    spec: PipelineSpec,
    date: dt.date | str,
    root: str | Path | None = None,
    *,
    log_dir: str | Path | None = None,
    records: Sequence[Mapping[str, Any]] | None = None,
    labels: Mapping[str, str] | None = None,
) -> FeedbackPartition:
    """Write the labelled predictions of ``date`` as a landing partition; return what happened.

    ``records`` default to the prediction log of that UTC day (with image inputs) and ``labels``
    to ``feedback/<dataset>/<date>/labels.csv``. An existing partition with the same content is
    left as it is, and one that differs (more labels arrived) is replaced. Fewer joined rows
    than ``expectations.min_rows`` hold the partition back; more than ``max_rows`` keep the
    misclassified rows first, then the rest by id, up to ``max_rows``.
    """
    from ml_loop.monitor import read_labels
    from ml_loop.prediction_log import default_log_dir, read_predictions

    date = as_partition_date(date)
    root = data_root(root)
    dataset = spec.dataset.name
    final = feedback_landing_dir(root, dataset, date)
    if records is None:
        folder = Path(log_dir) if log_dir is not None else default_log_dir()
        start = dt.datetime.combine(date, dt.time(), tzinfo=dt.UTC)
        records = read_predictions(
            folder,
            spec.model_name,
            start,
            start + dt.timedelta(days=1),
            with_inputs=spec.dataset.kind == "images",
        )
    if labels is None:
        labels = read_labels(spec, [date], root)

    joined, rejected = _usable_rows(join_labels(records, labels))
    if rejected:
        logger.warning(
            "feedback of %s for %s: left out %d rows whose id cannot be a file name (expected "
            "letters, digits, '.', '_' and '-')",
            dataset,
            date.isoformat(),
            rejected,
        )
    result = FeedbackPartition(
        dataset=dataset,
        partition_date=date.isoformat(),
        path=str(final),
        record_count=len(joined),
        class_counts={},
        status="written",
        detail="",
    )
    minimum = spec.expectations.min_rows
    if not joined:
        return _logged(dataclasses.replace(result, status="empty", detail="no labelled rows"))
    if len(joined) < minimum:
        detail = (
            f"{len(joined)} labelled rows, fewer than expectations.min_rows {minimum}; held back "
            "until more labels arrive"
        )
        return _logged(dataclasses.replace(result, status="held_back", detail=detail))
    maximum = spec.expectations.max_rows
    if len(joined) > maximum:
        joined.sort(key=lambda pair: (str(pair[0]["prediction"]) == pair[1], str(pair[0]["id"])))
        logger.warning(
            "feedback of %s for %s: %d labelled rows, more than expectations.max_rows %d; "
            "keeping the %d misclassified rows first",
            dataset,
            date.isoformat(),
            len(joined),
            maximum,
            sum(1 for record, label in joined if str(record["prediction"]) != label),
        )
        joined = joined[:maximum]
    joined.sort(key=lambda pair: str(pair[0]["id"]))

    payloads = _encode(spec, joined)
    manifest = build_manifest(spec, date, [label for _, label in joined], FEEDBACK_SOURCE, payloads)
    class_counts = manifest["class_counts"]
    result = dataclasses.replace(result, record_count=len(joined), class_counts=class_counts)
    remove_stale_staging(final.parent)
    set_aside = None
    if final.exists():
        if _manifest(final) == manifest:
            return _logged(dataclasses.replace(result, status="unchanged", detail="same rows"))
        set_aside = final.parent / f".tmp-{final.name}-old@{os.getpid()}"
        if set_aside.exists():
            shutil.rmtree(set_aside)
        os.rename(final, set_aside)
        result = dataclasses.replace(result, status="replaced")
    try:
        with staged_dir(final) as staging:
            for relative, data in payloads.items():
                target = staging / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            # The manifest goes last, so its presence means every listed file was written.
            write_json_atomic(staging / MANIFEST_FILE, manifest)
    except BaseException:
        if set_aside is not None and not final.exists():
            os.rename(set_aside, final)
        raise
    if set_aside is not None:
        shutil.rmtree(set_aside, ignore_errors=True)
    return _logged(dataclasses.replace(result, detail=f"{len(joined)} labelled rows"))


def _logged(partition: FeedbackPartition) -> FeedbackPartition:
    logger.info(
        "feedback partition of %s for %s: %s, %d rows (%s) at %s",
        partition.dataset,
        partition.partition_date,
        partition.status,
        partition.record_count,
        partition.detail,
        partition.path,
    )
    return partition


def _usable_rows(
    joined: list[tuple[Mapping[str, Any], str]],
) -> tuple[list[tuple[Mapping[str, Any], str]], int]:
    usable = [pair for pair in joined if SAFE_ID.fullmatch(str(pair[0]["id"]))]
    return usable, len(joined) - len(usable)


def _manifest(partition: Path) -> dict[str, Any] | None:
    try:
        return json.loads((partition / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _encode(spec: PipelineSpec, joined: list[tuple[Mapping[str, Any], str]]) -> dict[str, bytes]:
    if spec.dataset.kind == "images":
        return _encode_images(spec, joined)
    return {CSV_FILE: _encode_csv(spec, joined)}


def _encode_images(
    spec: PipelineSpec, joined: list[tuple[Mapping[str, Any], str]]
) -> dict[str, bytes]:
    from PIL import Image

    image = spec.dataset.image
    payloads = {}
    for record, label in joined:
        if record.get("input_array") is None:
            raise ValueError(
                f"prediction {record['id']!r} has no input_array; read the log with "
                "read_predictions(..., with_inputs=True)"
            )
        pixels = np.asarray(record["input_array"], dtype=np.float32).reshape(
            image.height, image.width
        )
        # Inputs are raw values in [0, 1]; landing PNGs hold them as 8-bit grey levels.
        grey = np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(grey).save(buffer, format="PNG", optimize=False, compress_level=6)
        payloads[f"{label}/{record['id']}.png"] = buffer.getvalue()
    return dict(sorted(payloads.items()))


def _encode_csv(spec: PipelineSpec, joined: list[tuple[Mapping[str, Any], str]]) -> bytes:
    names = spec.dataset.feature_names
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([spec.dataset.id_column, spec.dataset.label_column, *names])
    for record, label in joined:
        values = record.get("inputs")
        if values is None or len(values) != len(names):
            raise ValueError(
                f"prediction {record['id']!r} has inputs {values!r}; expected {len(names)} "
                f"feature values in the order {', '.join(names[:3])}, ..."
            )
        # repr of a Python float is the shortest string that parses back to the same float64.
        writer.writerow([record["id"], label, *(repr(float(value)) for value in values)])
    return buffer.getvalue().encode("utf-8")
