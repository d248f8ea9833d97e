"""The monitoring DAG factory, the retrain asset, and the tasks run in-process end to end."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Metadata
from airflow.sdk.exceptions import AirflowSkipException

from ml_loop.datasets import load_source
from ml_loop.files import sha256_file, write_json_atomic
from ml_loop.monitor import labels_path, monitoring_windows, write_labels
from ml_loop.prediction_log import PredictionBatch, PredictionLogWriter
from ml_loop.spec import load_spec
from ml_loop_airflow import monitoring_dag
from ml_loop_airflow.assets import (
    retrain_asset,
    retrain_note,
    retrain_reason,
    retrain_tags,
    training_schedule,
)

WINDOW_END = dt.datetime(2026, 12, 3, 12, tzinfo=dt.UTC)


def test_retrain_asset_name_and_uri() -> None:
    asset = retrain_asset("digits")
    assert asset.name == "ml_loop_retrain_digits"
    assert asset.uri == "x-ml-loop://retrain/digits"


def test_training_schedule_is_cron_or_asset() -> None:
    schedule = training_schedule(load_spec("digits"))
    assert isinstance(schedule, AssetOrTimeSchedule)
    assert isinstance(schedule.timetable, CronTriggerTimetable)
    assert list(schedule.asset_condition.objects) == [retrain_asset("digits")]


def _event(extra: dict, minutes: int) -> SimpleNamespace:
    return SimpleNamespace(
        extra=extra,
        timestamp=WINDOW_END + dt.timedelta(minutes=minutes),
        source_dag_id="monitor_digits",
        source_run_id=f"scheduled__{minutes}",
    )


def _training_context(run_type: str, events: list) -> dict:
    triggering = {retrain_asset("digits"): events}
    return {
        "dag_run": SimpleNamespace(run_type=SimpleNamespace(value=run_type)),
        "params": {"spec": "digits"},
        "triggering_asset_events": triggering,
    }


def test_retrain_reason_takes_latest_event() -> None:
    events = [_event({"reason": "old"}, 0), _event({"reason": "new", "findings": []}, 5)]
    reason = retrain_reason(_training_context("asset_triggered", events))
    assert reason["reason"] == "new"
    assert reason["event_count"] == 2
    assert reason["source_run_id"] == "scheduled__5"
    assert retrain_tags(reason)["ml_loop.trigger"] == "retrain_request"


def test_retrain_reason_none_for_scheduled_run() -> None:
    assert retrain_reason(_training_context("scheduled", [_event({}, 0)])) is None
    assert retrain_tags(None) == {}


def test_retrain_note_is_short() -> None:
    findings = [{"metric": f"m{i}", "value": 0.5, "threshold": 0.2} for i in range(200)]
    note = retrain_note({"findings": findings, "model_version": "3"})
    assert note.startswith("**Retrain requested by monitoring**")
    assert len(note) <= 1000


def test_window_end_sources() -> None:
    run = SimpleNamespace(run_after=WINDOW_END)
    assert monitoring_dag.window_end({"params": {}, "dag_run": run}) == WINDOW_END
    explicit = {"params": {"window_end": "2026-12-01T00:00:00Z"}, "dag_run": run}
    assert monitoring_dag.window_end(explicit) == dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def test_skipped_request_emits_nothing() -> None:
    events = monitoring_dag.request_retraining_events(
        "digits", {"requested": False, "reason": "skipped (cooldown): last request 1 h ago"}
    )
    with pytest.raises(AirflowSkipException, match="cooldown"):
        list(events)


def test_dag_shape() -> None:
    dag = monitoring_dag.build_monitoring_dag("digits", "monitor_digits", "# monitor_digits")
    assert dag.task_dict.keys() == {
        "compute_monitoring",
        "materialize_feedback",
        "decide_retraining",
        "request_retraining",
    }
    outlets = dag.task_dict["request_retraining"].outlets
    assert outlets == [retrain_asset("digits")]
    assert all(task.retries >= 1 for task in dag.tasks)


# ---------------------------------------------------------------------------------------------
# The task bodies in-process against the real prediction log and the real MLflow server


def _register_champion(spec, root: Path, x: np.ndarray, y: np.ndarray) -> str:
    from mlflow import MlflowClient

    folder = root / "snapshots" / spec.dataset.name / "dagsnap"
    folder.mkdir(parents=True)
    ids = np.array([str(i) for i in range(len(y))])
    np.savez(folder / "data.npz", x=x, y=y, ids=ids, split=np.zeros(len(y), dtype=np.uint8))
    write_json_atomic(folder / "manifest.json", {"data_sha256": sha256_file(folder / "data.npz")})
    client = MlflowClient()
    run = client.create_run(client.create_experiment(f"dag-{root.name}-{id(root)}"))
    name = f"dag-test-{id(root)}"
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_model_version_tag(name, version.version, "ml_loop.snapshot_version", "dagsnap")
    client.set_model_version_tag(name, version.version, "ml_loop.candidate_accuracy", "0.97")
    client.set_registered_model_alias(name, "champion", version.version)
    return name


class TaskInstance:
    """The parts of the Task SDK's RuntimeTaskInstance that the tasks call."""

    try_number = 1

    def __init__(self, active_runs: int) -> None:
        self.active_runs = active_runs
        self.dr_count_calls: list[dict] = []

    def get_dr_count(self, dag_id: str, states: list[str]) -> int:
        self.dr_count_calls.append({"dag_id": dag_id, "states": states})
        return self.active_runs


@pytest.mark.mlflow
def test_tasks_end_to_end(
    mlflow_tracking: str, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    spec = load_spec("breast_cancer")
    source = load_source(spec)
    x = source.features[spec.dataset.feature_names].to_numpy(dtype=np.float64)
    y = np.array([spec.dataset.classes.index(label) for label in source.labels])
    model_name = _register_champion(spec, data_root, x.astype(np.float32), y)
    # A champion registered a moment ago is too fresh to judge unless the guardrail allows it.
    guardrails = dataclasses.replace(spec.monitoring.guardrails, min_champion_age_hours=0)
    monitoring = dataclasses.replace(spec.monitoring, guardrails=guardrails)
    spec = dataclasses.replace(spec, model_name=model_name, monitoring=monitoring)
    monkeypatch.setattr(monitoring_dag, "load_spec", lambda name: spec)
    monkeypatch.delenv("AIRFLOW_CONN_MODEL_SERVER_BREAST_CANCER", raising=False)

    start, _, labelled_start, _ = monitoring_windows(spec.monitoring, WINDOW_END)
    records = []
    for offset, prefix, scale in ((start, "live", 1.7), (labelled_start, "old", 1.0)):
        for index in range(200):
            records.append(
                {
                    "id": f"{prefix}{index}",
                    "request_id": f"{prefix}{index}",
                    "row": 0,
                    "time": (offset + dt.timedelta(seconds=60 * index)).isoformat(),
                    "model_name": model_name,
                    "model_version": "1",
                    "variant": "champion",
                    "prediction": "benign",
                    "confidence": 0.7,
                    "probabilities": [0.3, 0.7],
                    "inputs": (x[index] * scale).tolist(),
                    "input_ref": None,
                }
            )
    monkeypatch.setenv("ML_LOOP_PREDICTION_LOG_DIR", str(data_root / "predictions"))
    with PredictionLogWriter(data_root / "predictions", model_name, flush_interval_s=0.1) as log:
        log.submit(PredictionBatch(records=records))
    labels = {f"old{index}": source.labels[index] for index in range(200)}
    write_labels(labels_path(data_root, spec.dataset.name, labelled_start.date()), labels)

    ti = TaskInstance(active_runs=0)
    context = {
        "params": {"spec": "breast_cancer", "window_end": WINDOW_END.isoformat()},
        "dag": SimpleNamespace(dag_id="monitor_breast_cancer"),
        "run_id": "manual__test",
        "ti": ti,
        "dag_run": SimpleNamespace(run_after=WINDOW_END),
    }
    result = monitoring_dag.compute_monitoring.function(**context)
    partitions = monitoring_dag.materialize_feedback.function(result, **context)
    decision = monitoring_dag.decide_retraining.function(result, **context)
    events = list(monitoring_dag.request_retraining_events("breast_cancer", decision))

    assert result["drift_detected"] is True
    assert Path(result["report_path"]).is_file()
    assert partitions[0]["status"] == "written"
    assert ti.dr_count_calls == [{"dag_id": "train_breast_cancer", "states": ["queued", "running"]}]
    assert decision["requested"] is True
    (event,) = events
    assert isinstance(event, Metadata)
    assert event.asset == retrain_asset("breast_cancer")
    assert event.extra["window_end"] == WINDOW_END.isoformat()
    assert event.extra["model_version"] == "1"
    assert event.extra["monitoring_run_id"] == result["mlflow_run_id"]

    ti.active_runs = 1
    later = (WINDOW_END + dt.timedelta(hours=1)).isoformat()
    retry = monitoring_dag.decide_retraining.function({**result, "window_end": later}, **context)
    assert retry["requested"] is False
