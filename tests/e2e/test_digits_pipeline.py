"""The digits pipeline end to end on the real stack: Airflow's scheduler and API server, the MLflow
server and the model server, all started by the test on free ports of 127.0.0.1.

Two consecutive days run through the scheduler, then a backfill reruns the completed second day.
The scheduler's own cron runs are switched off (``use_job_schedule``) so that only the runs the
test creates exist.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from local_stack.client import AirflowApiError
from local_stack.config import StackConfig
from local_stack.stack import LocalStack
from local_stack.supervisor import StackError
from servers import REPO_ROOT, stack_environ

pytestmark = pytest.mark.e2e

DAG_ID = "train_digits"
MODEL_NAME = "digits-cnn"
DAY_2 = dt.datetime.now(dt.UTC).date()
DAY_1 = DAY_2 - dt.timedelta(days=1)
# Enough epochs to clear the gate's 0.9 floor on four to five days of digits, and few enough to
# keep each run short.
RUN_CONF = {"epochs": 5, "learning_rate": 0.0015}
RUN_TIMEOUT_S = 900
BACKFILL_ATTEMPTS = 3


def midnight(day: dt.date) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(), tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    config = StackConfig.from_env(
        REPO_ROOT,
        state_dir=tmp_path_factory.mktemp("stack"),
        environ=stack_environ(AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False"),
    )
    with LocalStack(config) as running:
        yield running


@pytest.fixture(scope="module")
def mlflow_client(stack: LocalStack) -> MlflowClient:
    return MlflowClient(tracking_uri=stack.config.mlflow_url)


@pytest.fixture(scope="module")
def landed(stack: LocalStack) -> Path:
    """Five landed days of digits ending at DAY_2, so both runs see a full window."""
    from ml_loop.landing import land_days
    from ml_loop.spec import load_spec

    land_days(load_spec("digits"), DAY_2, days=5, root=stack.config.data_dir)
    return stack.config.data_dir


@pytest.fixture(scope="module")
def two_runs(stack: LocalStack, landed: Path) -> dict[dt.date, str]:
    """Run DAY_1, then DAY_2, through the scheduler; return the run id of each day."""
    client = stack.client
    client.wait_for_dag(DAG_ID, timeout_s=180)
    client.unpause(DAG_ID)
    run_ids = {}
    for day in (DAY_1, DAY_2):
        run_ids[day] = client.trigger(DAG_ID, logical_date=midnight(day), conf=RUN_CONF)
        state = client.wait_for_run(DAG_ID, run_ids[day], timeout_s=RUN_TIMEOUT_S)
        assert state == "success", f"run for {day} ended {state}"
    return run_ids


def snapshot_versions(data_dir: Path) -> list[str]:
    folder = data_dir / "snapshots" / "digits"
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def raw_copies(data_dir: Path) -> list[str]:
    folder = data_dir / "raw" / "digits"
    return sorted(str(p.relative_to(folder)) for p in folder.glob("*/*") if p.is_dir())


def model_versions(client: MlflowClient) -> list:
    return client.search_model_versions(f"name='{MODEL_NAME}'")


def test_each_day_new_dataset_version(stack: LocalStack, two_runs: dict) -> None:
    snapshots = [stack.client.xcom(DAG_ID, run_id, "store") for run_id in two_runs.values()]
    assert snapshots[0]["version_id"] != snapshots[1]["version_id"]
    assert snapshot_versions(stack.config.data_dir) == sorted(s["version_id"] for s in snapshots)
    assert snapshots[1]["parent_version"] == snapshots[0]["version_id"]


def test_each_run_one_model_version(
    stack: LocalStack, two_runs: dict, mlflow_client: MlflowClient
) -> None:
    trained_run_ids = {
        stack.client.xcom(DAG_ID, run_id, "train")["run_id"] for run_id in two_runs.values()
    }
    versions = model_versions(mlflow_client)
    assert len(versions) == 2
    assert {version.run_id for version in versions} == trained_run_ids


def test_champion_on_last_gated_version(
    stack: LocalStack, two_runs: dict, mlflow_client: MlflowClient
) -> None:
    registrations = [stack.client.xcom(DAG_ID, run_id, "register") for run_id in two_runs.values()]
    promoted = [r["version"] for r in registrations if r["promoted"]]
    assert promoted, "neither run passed the gate"
    champion = mlflow_client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.version == promoted[-1]
    assert champion.tags["ml_loop.gate"] in {"passed", "forced"}
    assert champion.tags["ml_loop.data_window_end"] == DAY_2.isoformat()
    if len(promoted) == 2:
        previous = mlflow_client.get_model_version_by_alias(MODEL_NAME, "previous")
        assert previous.version == promoted[0]


def test_run_params_keep_types(
    stack: LocalStack, two_runs: dict, mlflow_client: MlflowClient
) -> None:
    trained = stack.client.xcom(DAG_ID, two_runs[DAY_2], "train")
    params = mlflow_client.get_run(trained["run_id"]).data.params
    assert params["epochs"] == "5"
    assert params["learning_rate"] == "0.0015"


def test_served_prediction_matches_offline(stack: LocalStack, two_runs: dict) -> None:
    from ml_loop.registry import load_model
    from ml_loop.store import load_snapshot

    snapshot = stack.client.xcom(DAG_ID, two_runs[DAY_2], "store")
    arrays, _ = load_snapshot(snapshot["uri"])
    test_rows = np.flatnonzero(arrays["split"] == 2)[:8]
    images = arrays["x"][test_rows]
    model, config, version = load_model(
        MODEL_NAME, "champion", tracking_uri=stack.config.mlflow_url
    )
    import torch

    with torch.no_grad():
        offline = model(torch.from_numpy(images)).argmax(dim=1).tolist()
    response = httpx.post(
        f"{stack.config.serving_url('digits')}/invocations",
        json={"inputs": images.tolist()},
        headers={"Authorization": f"Bearer {stack.config.serving_token()}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == version.version
    assert body["predictions"] == [config["classes"][index] for index in offline]


def test_served_prediction_needs_the_token(stack: LocalStack, two_runs: dict) -> None:
    response = httpx.post(
        f"{stack.config.serving_url('digits')}/invocations",
        json={"inputs": [[[[0.0] * 28] * 28]]},
        timeout=30,
    )
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_wrong_param_type_rejected(stack: LocalStack, two_runs: dict) -> None:
    runs_before = len(stack.client.list_runs(DAG_ID))
    with pytest.raises(AirflowApiError) as raised:
        stack.client.trigger(DAG_ID, conf={"epochs": "twenty"})
    assert raised.value.status == 400
    assert "epochs" in str(raised.value)
    assert len(stack.client.list_runs(DAG_ID)) == runs_before


def test_backfill_rerun_adds_nothing(
    stack: LocalStack, two_runs: dict, mlflow_client: MlflowClient
) -> None:
    data_dir = stack.config.data_dir
    snapshots_before = snapshot_versions(data_dir)
    raw_before = raw_copies(data_dir)
    versions_before = sorted(v.version for v in model_versions(mlflow_client))
    finished_before = stack.client.get_run(DAG_ID, two_runs[DAY_2])["end_date"]

    backfill(stack, DAY_2)
    rerun = wait_for_rerun(stack, midnight(DAY_2), finished_before)

    assert rerun["state"] == "success"
    assert snapshot_versions(data_dir) == snapshots_before
    assert raw_copies(data_dir) == raw_before
    assert sorted(v.version for v in model_versions(mlflow_client)) == versions_before


def test_backfill_of_older_day_keeps_champion(
    stack: LocalStack, two_runs: dict, mlflow_client: MlflowClient
) -> None:
    champion_before = mlflow_client.get_model_version_by_alias(MODEL_NAME, "champion").version
    finished_before = stack.client.get_run(DAG_ID, two_runs[DAY_1])["end_date"]

    backfill(stack, DAY_1)
    rerun = wait_for_rerun(stack, midnight(DAY_1), finished_before)

    assert rerun["state"] == "success"
    task_instances = stack.client.task_instances(DAG_ID, rerun["dag_run_id"])
    task_states = {ti["task_id"]: ti["state"] for ti in task_instances}
    assert task_states["register"] == "skipped"
    champion = mlflow_client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.version == champion_before


def backfill(stack: LocalStack, day: dt.date) -> None:
    """Rerun the completed run of ``day`` with the CLI's backfill.

    Airflow allows one unfinished backfill per DAG, and the scheduler marks a backfill complete
    a little after its last run ends, so this first waits for earlier backfills to complete.
    """
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        backfills = stack.client.request("GET", "/backfills", params={"dag_id": DAG_ID})
        if all(item["completed_at"] for item in backfills["backfills"]):
            break
        time.sleep(2)
    else:
        pytest.fail(f"an earlier backfill of {DAG_ID} did not complete: {backfills}")
    for attempt in range(BACKFILL_ATTEMPTS):
        try:
            create_backfill(stack, day)
            return
        except StackError as err:
            if "database is locked" not in str(err) or attempt == BACKFILL_ATTEMPTS - 1:
                raise
        # NOTE: on SQLite, `backfill create` sometimes loses a lock race with the scheduler
        # after it has written the backfill row, which then never completes and blocks the
        # next backfill. Cancel it, then try again.
        for item in stack.client.request("GET", "/backfills", params={"dag_id": DAG_ID})[
            "backfills"
        ]:
            if not item["completed_at"]:
                stack.client.request("PUT", f"/backfills/{item['id']}/cancel")


def create_backfill(stack: LocalStack, day: dt.date) -> None:
    stack.airflow_cli(
        "backfill",
        "create",
        "--dag-id",
        DAG_ID,
        "--from-date",
        day.isoformat(),
        "--to-date",
        day.isoformat(),
        "--reprocess-behavior",
        "completed",
        "--max-active-runs",
        "1",
    )


def wait_for_rerun(stack: LocalStack, logical_date: dt.datetime, finished_before: str) -> dict:
    """Wait until the run of ``logical_date`` has finished again after ``finished_before``."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    last_seen = None
    while time.monotonic() < deadline:
        for run in stack.client.list_runs(DAG_ID):
            if run.get("logical_date") and dt.datetime.fromisoformat(run["logical_date"]) == (
                logical_date
            ):
                last_seen = run
                ended = run.get("end_date")
                if run["state"] in {"success", "failed"} and ended and ended > finished_before:
                    return run
        time.sleep(3)
    pytest.fail(f"the backfill rerun of {logical_date} did not finish; last seen: {last_seen}")


def test_failed_gate_skips_and_keeps_champion(
    stack: LocalStack, two_runs: dict, mlflow_client: MlflowClient
) -> None:
    champion_before = mlflow_client.get_model_version_by_alias(MODEL_NAME, "champion").version
    # One epoch at a tiny learning rate leaves the model far below the 0.9 accuracy floor.
    run_id = stack.client.trigger(DAG_ID, conf={"epochs": 1, "learning_rate": 1e-6})

    state = stack.client.wait_for_run(DAG_ID, run_id, timeout_s=RUN_TIMEOUT_S)

    assert state == "success"
    task_states = {ti["task_id"]: ti["state"] for ti in stack.client.task_instances(DAG_ID, run_id)}
    assert task_states["evaluate"] == "success"
    assert task_states["register"] == "skipped"
    assert task_states["deploy"] == "skipped"
    registration = stack.client.xcom(DAG_ID, run_id, "register", key="registration")
    assert registration["promoted"] is False
    challenger = mlflow_client.get_model_version_by_alias(MODEL_NAME, "challenger")
    assert challenger.version == registration["version"]
    assert challenger.tags["ml_loop.gate"] == "failed"
    champion = mlflow_client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert champion.version == champion_before
