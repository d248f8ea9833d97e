"""docker-compose.yaml, brought up for real with locally built images.

One module-scoped stack runs the tests in file order: every service healthy, a short
``train_digits`` run through the REST API, the champion in MLflow, predictions with and without
the model server's token, a restart that keeps the state, and the celery profile with a task on
a worker container. The stack, its volumes and network, and the images built here are removed at
the end, also after a failure; ``ML_LOOP_COMPOSE_KEEP_IMAGES=1`` keeps the images for the next
session.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import docker
import httpx
import pytest
from compose_stack import (
    INIT_ENV_SCRIPT,
    ComposeProject,
    build_images,
    free_port,
    read_env_file,
    remove_images,
)

pytestmark = [pytest.mark.compose, pytest.mark.timeout(2400)]

DAG_ID = "train_digits"
MODEL_NAME = "digits-cnn"
RUN_CONF = {"epochs": 2}
DEFAULT_SERVICES = [
    "airflow-apiserver",
    "airflow-dag-processor",
    "airflow-scheduler",
    "airflow-triggerer",
    "mlflow",
    "model-server-breast-cancer",
    "model-server-digits",
    "postgres",
]
RUN_TIMEOUT_S = 900.0
HTTP_TIMEOUT_S = 30.0


class Stack:
    """The running compose project, its published URLs and the admin login."""

    def __init__(self, project: ComposeProject, env: dict[str, str], ports: dict[str, int]):
        self.project = project
        self.env = env
        self.airflow_url = f"http://127.0.0.1:{ports['ML_LOOP_AIRFLOW_PORT']}"
        self.mlflow_url = f"http://127.0.0.1:{ports['ML_LOOP_MLFLOW_PORT']}"
        self.serving_url = f"http://127.0.0.1:{ports['ML_LOOP_SERVING_PORT']}"
        self.runs: dict[str, str] = {}

    def airflow(self) -> httpx.Client:
        """A REST client logged in as admin with the password from the generated .env."""
        response = httpx.post(
            f"{self.airflow_url}/auth/token",
            json={"username": "admin", "password": self.env["AIRFLOW_ADMIN_PASSWORD"]},
            timeout=HTTP_TIMEOUT_S,
        )
        response.raise_for_status()
        token = response.json()["access_token"]
        return httpx.Client(
            base_url=f"{self.airflow_url}/api/v2",
            headers={"Authorization": f"Bearer {token}"},
            timeout=HTTP_TIMEOUT_S,
        )

    def champion(self) -> dict[str, Any]:
        response = httpx.get(
            f"{self.mlflow_url}/api/2.0/mlflow/registered-models/alias",
            params={"name": MODEL_NAME, "alias": "champion"},
            timeout=HTTP_TIMEOUT_S,
        )
        response.raise_for_status()
        return response.json()["model_version"]


def wait_for_dag(client: httpx.Client, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get(f"/dags/{DAG_ID}").status_code != 200:
        if time.monotonic() > deadline:
            errors = client.get("/importErrors").text[:3000]
            raise TimeoutError(
                f"{DAG_ID} not parsed after {timeout_s:.0f} s; import errors: {errors}"
            )
        time.sleep(3)


def trigger_and_wait(client: httpx.Client, logical_date: str | None) -> tuple[str, str]:
    """Trigger a run of DAG_ID with RUN_CONF, then unpause the DAG; return the run id and state.

    Unpausing a DAG makes the scheduler create a run for the latest tick of its schedule (today's
    midnight, with the spec's 12 epochs) unless a run with that logical date exists already. So
    the first run is triggered for today's midnight while the DAG is still paused.
    """
    response = client.post(
        f"/dags/{DAG_ID}/dagRuns", json={"logical_date": logical_date, "conf": RUN_CONF}
    )
    response.raise_for_status()
    run_id = response.json()["dag_run_id"]
    client.patch(f"/dags/{DAG_ID}", json={"is_paused": False}).raise_for_status()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        state = client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}").json()["state"]
        if state in ("success", "failed") or time.monotonic() > deadline:
            return run_id, state
        time.sleep(5)


def task_states(client: httpx.Client, run_id: str) -> dict[str, dict[str, Any]]:
    response = client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
    response.raise_for_status()
    return {ti["task_id"]: ti for ti in response.json()["task_instances"]}


def sample_request(stack: Stack) -> dict[str, Any]:
    """Return a scoring payload of one landed digit, read inside the model server container."""
    output = stack.project.command(
        "exec",
        "-T",
        "model-server-digits",
        "python",
        "-c",
        "import json, pathlib, numpy, PIL.Image; "
        "path = sorted(pathlib.Path('/opt/ml-loop/data/landing/digits').glob('*/*/*.png'))[0]; "
        "pixels = numpy.asarray(PIL.Image.open(path).convert('L'), dtype='float32') / 255; "
        "print(json.dumps({'inputs': [[pixels.round(4).tolist()]]}))",
    )
    return json.loads(output.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def stack(
    docker_engine: docker.DockerClient,
    train_image: str,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[Stack]:
    work_dir = tmp_path_factory.mktemp("compose")
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def progress(message: str) -> None:
        with capture.global_and_fixture_disabled():
            sys.stderr.write(f"[compose] {message}\n")
            sys.stderr.flush()

    started = time.monotonic()
    images = build_images(docker_engine, work_dir, progress)
    progress(f"images ready after {time.monotonic() - started:.0f} s")
    env_file = work_dir / ".env"
    subprocess.run(
        [sys.executable, str(INIT_ENV_SCRIPT), "--env-file", str(env_file)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    ports = {
        name: free_port()
        for name in (
            "ML_LOOP_AIRFLOW_PORT",
            "ML_LOOP_MLFLOW_PORT",
            "ML_LOOP_SERVING_PORT",
            "ML_LOOP_SERVING_BREAST_CANCER_PORT",
        )
    }
    project = ComposeProject(
        f"ml-loop-test-{uuid.uuid4().hex[:8]}",
        env_file,
        {
            **images,
            **{name: str(port) for name, port in ports.items()},
            "ML_LOOP_TRAIN_IMAGE": train_image,
            "COMPOSE_PROFILES": "",
        },
    )
    try:
        project.command("up", "--detach", "--no-build")
        project.wait_healthy(docker_engine)
        progress(f"stack healthy after {time.monotonic() - started:.0f} s")
        yield Stack(project, read_env_file(env_file), ports)
    finally:
        try:
            project.down(volumes=True)
        finally:
            for container in project.containers(docker_engine):
                container.remove(force=True, v=True)
            if os.environ.get("ML_LOOP_COMPOSE_KEEP_IMAGES") != "1":
                remove_images(list(images.values()))
        progress(f"module finished after {time.monotonic() - started:.0f} s")


def test_default_services_healthy(stack: Stack, docker_engine: docker.DockerClient) -> None:
    assert stack.project.wait_healthy(docker_engine) == DEFAULT_SERVICES


def test_admin_login_rejects_wrong_password(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.airflow_url}/auth/token",
        json={"username": "admin", "password": "not-the-password"},
        timeout=HTTP_TIMEOUT_S,
    )
    assert response.status_code == 401


def test_train_digits_succeeds(stack: Stack) -> None:
    today = dt.datetime.now(dt.UTC).date()
    stack.project.command(
        "run",
        "--rm",
        "--no-deps",
        "airflow-cli",
        "python",
        "-m",
        "ml_loop.landing",
        "--spec",
        "digits",
        "--end-date",
        today.isoformat(),
        "--days",
        "5",
    )
    with stack.airflow() as client:
        wait_for_dag(client)
        midnight = dt.datetime.combine(today, dt.time(), tzinfo=dt.UTC).isoformat()
        run_id, state = trigger_and_wait(client, logical_date=midnight)
        stack.runs["first"] = run_id
        states = {task: ti["state"] for task, ti in task_states(client, run_id).items()}
    assert state == "success", states


def test_champion_registered(stack: Stack) -> None:
    champion = stack.champion()
    assert champion["name"] == MODEL_NAME
    assert "champion" in champion["aliases"]


def test_prediction_with_token(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.serving_url}/invocations",
        json=sample_request(stack),
        headers={"Authorization": f"Bearer {stack.env['ML_LOOP_SERVING_TOKEN']}"},
        timeout=HTTP_TIMEOUT_S,
    )
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == stack.champion()["version"]
    assert len(response.json()["predictions"]) == 1


def test_prediction_without_token(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.serving_url}/invocations", json=sample_request(stack), timeout=HTTP_TIMEOUT_S
    )
    assert response.status_code == 401


def test_restart_keeps_state(stack: Stack, docker_engine: docker.DockerClient) -> None:
    champion = stack.champion()
    runs_before = _mlflow_run_ids(stack)
    stack.project.down(volumes=False)
    stack.project.command("up", "--detach", "--no-build")
    stack.project.wait_healthy(docker_engine)
    with stack.airflow() as client:
        run_ids = [
            run["dag_run_id"] for run in client.get(f"/dags/{DAG_ID}/dagRuns").json()["dag_runs"]
        ]
    assert stack.runs["first"] in run_ids
    assert _mlflow_run_ids(stack) == runs_before
    assert stack.champion()["version"] == champion["version"]


def test_celery_worker_runs_tasks(stack: Stack, docker_engine: docker.DockerClient) -> None:
    celery = stack.project.with_environ(
        COMPOSE_PROFILES="celery", ML_LOOP_EXECUTOR="CeleryExecutor"
    )
    celery.command("up", "--detach", "--no-build")
    services = celery.wait_healthy(docker_engine)
    assert "airflow-worker" in services
    assert "redis" in services
    worker_hosts = {
        container.attrs["Config"]["Hostname"]
        for container in celery.service_containers(docker_engine, "airflow-worker")
    }
    with stack.airflow() as client:
        run_id, state = trigger_and_wait(client, logical_date=None)
        tasks = task_states(client, run_id)
    assert state == "success", {task: ti["state"] for task, ti in tasks.items()}
    ran = [ti for ti in tasks.values() if ti["state"] == "success"]
    assert ran
    for ti in ran:
        assert ti["hostname"] in worker_hosts, (ti["task_id"], ti["hostname"], worker_hosts)


def _mlflow_run_ids(stack: Stack) -> set[str]:
    experiment = httpx.get(
        f"{stack.mlflow_url}/api/2.0/mlflow/experiments/get-by-name",
        params={"experiment_name": "digits"},
        timeout=HTTP_TIMEOUT_S,
    )
    experiment.raise_for_status()
    response = httpx.post(
        f"{stack.mlflow_url}/api/2.0/mlflow/runs/search",
        json={"experiment_ids": [experiment.json()["experiment"]["experiment_id"]]},
        timeout=HTTP_TIMEOUT_S,
    )
    response.raise_for_status()
    return {run["info"]["run_id"] for run in response.json().get("runs", [])}
