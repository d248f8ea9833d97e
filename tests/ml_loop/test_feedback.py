"""Feedback: the retrain guardrails, the decision log, and labelled feedback as landing data."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest

from ml_loop import feedback, ingest, landing, validate
from ml_loop.datasets import load_source
from ml_loop.spec import load_spec

NOW = dt.datetime(2026, 12, 3, 12, tzinfo=dt.UTC)
DAY = dt.date(2026, 12, 2)


def _result(**changes) -> dict:
    result = {
        "spec": "digits",
        "model_name": "digits-cnn",
        "model_version": "3",
        "window_start": (NOW - dt.timedelta(hours=24)).isoformat(),
        "window_end": NOW.isoformat(),
        "champion_created_at": (NOW - dt.timedelta(days=3)).isoformat(),
        "traffic": {"predictions": 1000},
        "accuracy": {"labelled": 500, "live_accuracy": 0.8, "offline_accuracy": 0.96, "drop": 0.16},
        "drift": {"drift_share": 0.5},
        "reasons": [
            {"metric": "feature_drift_share", "value": 0.5, "threshold": 0.3, "message": "drift"}
        ],
        "mlflow_run_id": None,
        "report_uri": None,
    }
    result.update(changes)
    return result


def _decide(root: Path, result: dict | None = None, *, active: int = 0, now=NOW, spec=None):
    return feedback.decide_retraining(
        spec or load_spec("digits"),
        result or _result(),
        active_training_runs=active,
        now=now,
        root=root,
    )


def _failed_rule(decision) -> str:
    return next(check["rule"] for check in decision.checks if not check["passed"])


def test_decision_requested(tmp_path: Path) -> None:
    decision = _decide(tmp_path)
    assert decision.requested is True
    assert decision.asset_extra()["model_version"] == "3"
    assert decision.asset_extra()["findings"][0]["metric"] == "feature_drift_share"


def test_decision_recorded_once(tmp_path: Path) -> None:
    first = _decide(tmp_path)
    second = _decide(tmp_path)
    assert second == first
    assert len(feedback.read_decisions(tmp_path, "digits")) == 1


def test_no_finding_skipped(tmp_path: Path) -> None:
    decision = _decide(tmp_path, _result(reasons=[]))
    assert decision.requested is False
    assert _failed_rule(decision) == "finding"
    assert "no drift" in decision.reason


def test_little_traffic_skipped(tmp_path: Path) -> None:
    decision = _decide(tmp_path, _result(traffic={"predictions": 50}))
    assert decision.requested is False
    assert _failed_rule(decision) == "enough_traffic"


def test_few_labels_skip_accuracy_finding(tmp_path: Path) -> None:
    reasons = [{"metric": "accuracy_drop", "value": 0.2, "threshold": 0.05, "message": "drop"}]
    accuracy = {"labelled": 20, "live_accuracy": 0.7, "offline_accuracy": 0.96, "drop": 0.26}
    decision = _decide(tmp_path, _result(reasons=reasons, accuracy=accuracy))
    assert decision.requested is False
    assert _failed_rule(decision) == "enough_traffic"


def test_fresh_champion_skipped(tmp_path: Path) -> None:
    fresh = (NOW - dt.timedelta(hours=2)).isoformat()
    decision = _decide(tmp_path, _result(champion_created_at=fresh))
    assert decision.requested is False
    assert _failed_rule(decision) == "champion_age"


def test_active_training_skipped(tmp_path: Path) -> None:
    decision = _decide(tmp_path, active=1)
    assert decision.requested is False
    assert _failed_rule(decision) == "no_active_training"


def test_cooldown_skipped(tmp_path: Path) -> None:
    assert _decide(tmp_path).requested is True
    later = NOW + dt.timedelta(hours=2)
    decision = _decide(tmp_path, _result(window_end=later.isoformat()), now=later)
    assert decision.requested is False
    assert _failed_rule(decision) == "cooldown"


def test_cooldown_over_requested(tmp_path: Path) -> None:
    assert _decide(tmp_path).requested is True
    later = NOW + dt.timedelta(hours=13)
    decision = _decide(tmp_path, _result(window_end=later.isoformat()), now=later)
    assert decision.requested is True


def test_daily_maximum_skipped(tmp_path: Path) -> None:
    spec = load_spec("digits")
    guardrails = dataclasses.replace(spec.monitoring.guardrails, cooldown_hours=0)
    spec = dataclasses.replace(
        spec, monitoring=dataclasses.replace(spec.monitoring, guardrails=guardrails)
    )
    for hours in (0, 1):
        moment = NOW + dt.timedelta(hours=hours)
        result = _result(window_end=moment.isoformat())
        assert _decide(tmp_path, result, now=moment, spec=spec).requested
    third = NOW + dt.timedelta(hours=23)
    decision = _decide(tmp_path, _result(window_end=third.isoformat()), now=third, spec=spec)
    assert decision.requested is False
    assert _failed_rule(decision) == "daily_maximum"


def test_decision_log_is_jsonl(tmp_path: Path) -> None:
    _decide(tmp_path, active=1)
    lines = feedback.decisions_path(tmp_path, "digits").read_text().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["requested"] is False


# ---------------------------------------------------------------------------------------------
# Labelled feedback as training data


def _tabular_records(spec, count: int) -> tuple[list[dict], dict[str, str]]:
    source = load_source(spec)
    x = source.features[spec.dataset.feature_names].to_numpy(dtype=np.float64)
    time = dt.datetime.combine(DAY, dt.time(9), tzinfo=dt.UTC)
    records = [
        {
            "id": f"req{index}-0",
            "time": (time + dt.timedelta(seconds=index)).isoformat(),
            "prediction": "benign",
            "inputs": x[index].tolist(),
        }
        for index in range(count)
    ]
    labels = {f"req{index}-0": source.labels[index] for index in range(count)}
    return records, labels


def _image_records(spec, count: int) -> tuple[list[dict], dict[str, str]]:
    source = load_source(spec)
    time = dt.datetime.combine(DAY, dt.time(9), tzinfo=dt.UTC)
    records = [
        {
            "id": f"img{index}",
            "time": (time + dt.timedelta(seconds=index)).isoformat(),
            "prediction": source.labels[index],
            "input_array": source.images[index][None].astype(np.float32) / 255.0,
        }
        for index in range(count)
    ]
    labels = {f"img{index}": source.labels[index] for index in range(count)}
    return records, labels


def _ingest_feedback(spec, root: Path, monkeypatch: pytest.MonkeyPatch):
    ref = ingest.ingest_partition(spec, DAY, root, source_kind=ingest.FEEDBACK_SOURCE)
    assert ref.source == "feedback"
    return ref, validate.validate_partition(spec, ref.to_dict(), root)


def test_tabular_feedback_read_by_ingest(data_root: Path, monkeypatch) -> None:
    spec = load_spec("breast_cancer")
    records, labels = _tabular_records(spec, 80)
    partition = feedback.materialize_feedback(spec, DAY, data_root, records=records, labels=labels)
    assert partition.status == "written"
    assert partition.record_count == 80
    ref, validated = _ingest_feedback(spec, data_root, monkeypatch)
    assert ref.file_count == 1
    assert validated.rows == 80
    assert validated.quarantined == 0


def test_image_feedback_read_by_ingest(data_root: Path, monkeypatch) -> None:
    spec = load_spec("digits")
    records, labels = _image_records(spec, 210)
    partition = feedback.materialize_feedback(spec, DAY, data_root, records=records, labels=labels)
    assert partition.status == "written"
    assert sum(partition.class_counts.values()) == 210
    ref, validated = _ingest_feedback(spec, data_root, monkeypatch)
    assert ref.file_count == 210
    assert validated.rows == 210
    assert validated.quarantined == 0


def test_image_feedback_keeps_pixels(data_root: Path) -> None:
    from PIL import Image

    spec = load_spec("digits")
    records, labels = _image_records(spec, 200)
    partition = feedback.materialize_feedback(spec, DAY, data_root, records=records, labels=labels)
    path = Path(partition.path) / labels["img0"] / "img0.png"
    pixels = np.asarray(Image.open(path))
    assert np.array_equal(pixels, load_source(spec).images[0])


def test_feedback_below_min_rows_held_back(data_root: Path) -> None:
    spec = load_spec("breast_cancer")
    records, labels = _tabular_records(spec, 10)
    partition = feedback.materialize_feedback(spec, DAY, data_root, records=records, labels=labels)
    assert partition.status == "held_back"
    assert not Path(partition.path).exists()


def test_feedback_rerun_unchanged(data_root: Path) -> None:
    spec = load_spec("breast_cancer")
    records, labels = _tabular_records(spec, 60)
    feedback.materialize_feedback(spec, DAY, data_root, records=records, labels=labels)
    again = feedback.materialize_feedback(spec, DAY, data_root, records=records, labels=labels)
    assert again.status == "unchanged"


def test_feedback_more_labels_replaced(data_root: Path) -> None:
    spec = load_spec("breast_cancer")
    records, labels = _tabular_records(spec, 90)
    some = dict(list(labels.items())[:60])
    feedback.materialize_feedback(spec, DAY, data_root, records=records, labels=some)
    partition = feedback.materialize_feedback(spec, DAY, data_root, records=records, labels=labels)
    assert partition.status == "replaced"
    manifest = json.loads((Path(partition.path) / landing.MANIFEST_FILE).read_text())
    assert manifest["record_count"] == 90
    assert manifest["source"] == "feedback"


def test_feedback_unsafe_ids_left_out(data_root: Path) -> None:
    spec = load_spec("breast_cancer")
    records, labels = _tabular_records(spec, 60)
    records[0]["id"] = "../escape"
    labels["../escape"] = labels.pop("req0-0")
    partition = feedback.materialize_feedback(spec, DAY, data_root, records=records, labels=labels)
    assert partition.record_count == 59


def test_feedback_reads_log_and_labels(data_root: Path) -> None:
    from ml_loop.monitor import labels_path, write_labels
    from ml_loop.prediction_log import PredictionBatch, PredictionLogWriter

    spec = load_spec("breast_cancer")
    records, labels = _tabular_records(spec, 60)
    for record in records:
        record.update(
            request_id=record["id"],
            row=0,
            model_name=spec.model_name,
            model_version="1",
            variant="champion",
            confidence=0.9,
            probabilities=[0.1, 0.9],
            input_ref=None,
        )
    log_dir = data_root / "predictions"
    with PredictionLogWriter(log_dir, spec.model_name, flush_interval_s=0.1) as writer:
        writer.submit(PredictionBatch(records=records))
    write_labels(labels_path(data_root, spec.dataset.name, DAY), labels)
    partition = feedback.materialize_feedback(spec, DAY, data_root, log_dir=log_dir)
    assert partition.status == "written"
    assert partition.record_count == 60
