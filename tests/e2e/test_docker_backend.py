"""The digits DAG on the real stack with the docker train backend.

The test starts Airflow, MLflow and the model server on free ports of 127.0.0.1, points the
docker backend at the session's training image through ``ML_LOOP_TRAIN_IMAGE``, and triggers one
run with ``train_backend=docker``. The train task then runs ``python -m ml_loop.train`` in a
container on the local Docker engine, and evaluate, register and deploy use its result as they
use the local backend's.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import httpx
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from local_stack.config import StackConfig
from local_stack.stack import LocalStack
from servers import REPO_ROOT, stack_environ

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

DAG_ID = "train_digits"
MODEL_NAME = "digits-cnn"
RUN_DAY = dt.datetime.now(dt.UTC).date()
# Two epochs keep the run short. The promotion is forced because this test checks where training
# runs, not whether two epochs clear the gate.
RUN_CONF = {"train_backend": "docker", "epochs": 2, "force_promote": True}
RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, train_image: str):
    config = StackConfig.from_env(
        REPO_ROOT,
        state_dir=tmp_path_factory.mktemp("stack"),
        environ=stack_environ(
            AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False", ML_LOOP_TRAIN_IMAGE=train_image
        ),
    )
    with LocalStack(config) as running:
        yield running


@pytest.fixture(scope="module")
def docker_run(stack: LocalStack) -> str:
    """Land five days of digits and run the DAG once with the docker backend; return the run id."""
    from ml_loop.landing import land_days
    from ml_loop.spec import load_spec

    land_days(load_spec("digits"), RUN_DAY, days=5, root=stack.config.data_dir)
    client = stack.client
    client.wait_for_dag(DAG_ID, timeout_s=180)
    client.unpause(DAG_ID)
    logical_date = dt.datetime.combine(RUN_DAY, dt.time(), tzinfo=dt.UTC)
    run_id = client.trigger(DAG_ID, logical_date=logical_date, conf=RUN_CONF)
    state = client.wait_for_run(DAG_ID, run_id, timeout_s=RUN_TIMEOUT_S)
    assert state == "success", f"run {run_id} ended {state}"
    return run_id


def test_train_log_shows_container_output(
    stack: LocalStack, docker_run: str, train_image: str
) -> None:
    log = stack.client.task_log(DAG_ID, docker_run, "train")
    assert f"Starting docker container from image {train_image}" in log
    # The trainer's own start line, logged inside the container and streamed into the task log.
    assert "train_key=" in log
    assert "removing container ml-loop-train_digits.train-" in log


def test_mlflow_run_tagged_docker(stack: LocalStack, docker_run: str) -> None:
    trained = stack.client.xcom(DAG_ID, docker_run, "train")
    run = MlflowClient(tracking_uri=stack.config.mlflow_url).get_run(trained["run_id"])
    assert run.data.tags["ml_loop.train_backend"] == "docker"
    assert run.data.tags["airflow.run_id"] == docker_run
    assert run.info.status == "FINISHED"


def test_served_version_predicts(stack: LocalStack, docker_run: str) -> None:
    from ml_loop.store import load_snapshot

    registration = stack.client.xcom(DAG_ID, docker_run, "register")
    snapshot = stack.client.xcom(DAG_ID, docker_run, "store")
    arrays, _ = load_snapshot(Path(snapshot["uri"]))
    images = arrays["x"][np.flatnonzero(arrays["split"] == 2)[:4]]
    response = httpx.post(
        f"{stack.config.serving_url('digits')}/invocations",
        json={"inputs": images.tolist()},
        headers={"Authorization": f"Bearer {stack.config.serving_token()}"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == registration["version"]
    assert len(body["predictions"]) == 4
