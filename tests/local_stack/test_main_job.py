"""Tests of the main job: how it picks the one training run, and a full `run --once` twice."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from local_stack import (
    AIRFLOW_SERVICES,
    MLFLOW_SERVICE,
    AirflowApiError,
    LocalStack,
    StackConfig,
    main_job,
)
from local_stack.main_job import RESULT_KEYS, run_main_job, start_training_run

ConfigFactory = Callable[..., StackConfig]
TODAY = dt.date(2026, 12, 4)
MIDNIGHT = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)
STACK_STARTED = dt.datetime(2026, 12, 4, 9, 0, tzinfo=dt.UTC)


class RecordingClient:
    """Stands in for AirflowClient in the run-selection tests; records every call."""

    def __init__(self, existing: list[dict[str, Any]], trigger_error: int | None = None) -> None:
        self.existing = existing
        self.trigger_error = trigger_error
        self.calls: list[tuple[str, Any]] = []

    def trigger(self, dag_id: str, logical_date: dt.datetime | None = None) -> str:
        self.calls.append(("trigger", logical_date))
        used_dates = {run["logical_date"] for run in self.existing}
        if logical_date is not None and logical_date.isoformat() in used_dates:
            raise AirflowApiError("POST", "/dagRuns", 409, "Unique constraint violation")
        if self.trigger_error:
            raise AirflowApiError("POST", "/dagRuns", self.trigger_error, "invalid")
        return f"manual__{logical_date}"

    def list_runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.existing

    def unpause(self, dag_id: str) -> None:
        self.calls.append(("unpause", dag_id))


def test_run_selection_triggers_today() -> None:
    client = RecordingClient(existing=[])
    run_id = start_training_run(client, "train_digits", TODAY, STACK_STARTED)
    assert run_id == f"manual__{MIDNIGHT}"
    assert client.calls == [("trigger", MIDNIGHT), ("unpause", "train_digits")]


def test_run_selection_adopts_scheduler_run() -> None:
    scheduled = {
        "dag_run_id": "scheduled__2026-12-04T00:00:00+00:00",
        "logical_date": MIDNIGHT.isoformat(),
        "queued_at": "2026-12-04T09:00:05+00:00",
    }
    client = RecordingClient(existing=[scheduled])
    run_id = start_training_run(client, "train_digits", TODAY, STACK_STARTED)
    assert run_id == scheduled["dag_run_id"]
    assert client.calls == [("trigger", MIDNIGHT), ("unpause", "train_digits")]


def test_run_selection_adds_manual_run_after_earlier_one() -> None:
    earlier = {
        "dag_run_id": "manual__2026-12-04T08:00:00+00:00",
        "logical_date": MIDNIGHT.isoformat(),
        "queued_at": "2026-12-04T08:00:00+00:00",
    }
    client = RecordingClient(existing=[earlier])
    run_id = start_training_run(client, "train_digits", TODAY, STACK_STARTED)
    assert run_id == "manual__None"
    assert client.calls == [("trigger", MIDNIGHT), ("trigger", None), ("unpause", "train_digits")]


def test_run_selection_raises_other_errors() -> None:
    client = RecordingClient(existing=[], trigger_error=400)
    with pytest.raises(AirflowApiError, match="HTTP 400"):
        start_training_run(client, "train_digits", TODAY, STACK_STARTED)
    assert ("unpause", "train_digits") not in client.calls


# Stands in for the real training DAG: it checks that today's partition was landed, then logs a
# run with test metrics and registers it as the champion, as the register task does.
FAKE_TRAIN_DAG = """
import datetime as dt
import os
from pathlib import Path

from airflow.sdk import dag, task


@dag(schedule="@daily", start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), catchup=False)
def train_digits():
    @task
    def check_landing(**context):
        run = context["dag_run"]
        run_date = (run.logical_date or run.run_after).date().isoformat()
        partition = Path(os.environ["ML_LOOP_DATA_DIR"]) / "landing" / "digits" / run_date
        if not partition.is_dir():
            raise FileNotFoundError(f"partition {partition} was not landed")
        return run_date

    @task
    def register(run_date):
        import mlflow
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        mlflow.set_experiment("digits")
        with mlflow.start_run() as run:
            mlflow.log_metrics({"test_accuracy": 0.97, "test_macro_f1": 0.96})
        client = MlflowClient()
        try:
            client.create_registered_model("digits-cnn")
        except MlflowException:
            pass
        version = client.create_model_version(
            "digits-cnn", source=f"runs:/{run.info.run_id}/weights", run_id=run.info.run_id
        )
        client.set_registered_model_alias("digits-cnn", "champion", version.version)
        return version.version

    register(check_landing())


train_digits()
"""


def land_sample_images(stack: LocalStack, end_date: dt.date) -> None:
    """Write 40 small digit images for ``end_date``, enough that some fall in the test split."""
    import numpy as np
    from PIL import Image

    partition = stack.config.data_dir / "landing" / "digits" / end_date.isoformat() / "7"
    partition.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[4:24, 14] = 255
    for index in range(40):
        Image.fromarray(pixels).save(partition / f"sample-{index:03d}.png")


def invoke_once(config: StackConfig, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict, str]:
    code = run_main_job(LocalStack(config), once=True)
    output = capsys.readouterr().out
    return code, json.loads(output.strip().splitlines()[-1]), output


@pytest.mark.e2e
def test_run_once_trains_once_per_invocation(
    make_config: ConfigFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(main_job, "land_data", land_sample_images)
    config = make_config([*AIRFLOW_SERVICES, MLFLOW_SERVICE])
    config.dags_folder.mkdir(parents=True)
    (config.dags_folder / "train_digits.py").write_text(FAKE_TRAIN_DAG)

    code, first, output = invoke_once(config, capsys)
    assert code == 0, output
    assert tuple(first) == RESULT_KEYS
    assert first["state"] == "success"
    assert first["dag_id"] == "train_digits"
    assert first["model_name"] == "digits-cnn"
    assert first["model_version"] == "1"
    assert first["alias"] == "champion"
    assert first["metrics"]["accuracy"] == pytest.approx(0.97)
    assert first["airflow_url"] == config.airflow_url
    assert first["mlflow_url"] == config.mlflow_url
    assert first["serving_url"] == config.serving_url("digits")
    assert f"password {config.admin_password()}" in output
    assert f"curl -s -X POST {config.serving_url('digits')}/invocations" in output

    payload_path = config.state_dir / "requests" / "digits-sample.json"
    image = json.loads(payload_path.read_text())["inputs"]
    assert [len(image), len(image[0]), len(image[0][0]), len(image[0][0][0])] == [1, 1, 28, 28]
    assert max(max(row) for row in image[0][0]) == 1.0
    assert min(min(row) for row in image[0][0]) == 0.0

    code, second, output = invoke_once(config, capsys)
    assert code == 0, output
    assert second["state"] == "success"
    assert second["run_id"] != first["run_id"]
    assert second["model_version"] == "2"

    listed = LocalStack(config).airflow_cli("dags", "list-runs", "train_digits", "-o", "json")
    runs = {run["run_id"]: run for run in json.loads(listed.stdout.strip().splitlines()[-1])}
    assert sorted(runs) == sorted([first["run_id"], second["run_id"]])
    midnight = dt.datetime.combine(dt.datetime.now(dt.UTC).date(), dt.time(), tzinfo=dt.UTC)
    assert dt.datetime.fromisoformat(runs[first["run_id"]]["logical_date"]) == midnight
    assert runs[second["run_id"]]["logical_date"] == ""
    assert not (Path(config.state_dir) / "processes.json").exists()
