"""Session fixtures shared by the test suite.

A real MLflow tracking server on 127.0.0.1, and the Docker engine and training image of the
container tests (see tests/containers.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

import containers
from servers import free_port, wait_for_http


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start ``mlflow server`` with a SQLite store and served artifacts; yield its URL."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log_path = root / "mlflow.log"
    # Without the job runner the server is two processes instead of ten and starts faster.
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("mlflow")),
                "server",
                "--backend-store-uri",
                f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination",
                str(root / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process, log_path, timeout_s=120)
        yield url
    finally:
        # The CLI starts its web workers as children; signal the whole process group.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def mlflow_tracking(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the MLflow client of this test at the session's tracking server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return mlflow_server


@pytest.fixture
def data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data root, also exported as ``ML_LOOP_DATA_DIR``."""
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("ML_LOOP_DATA_DIR", str(root))
    return root


@pytest.fixture(scope="session")
def docker_engine() -> docker.DockerClient:
    """A client of the Docker engine at ``DOCKER_HOST``; skips the test when none responds."""
    client, reason = containers.connect_engine()
    if client is None:
        pytest.skip(reason)
    return client


@pytest.fixture(scope="session")
def train_image(docker_engine: docker.DockerClient, request: pytest.FixtureRequest) -> str:
    """The tag of a training image built from Dockerfile.train on a local Debian base.

    The first session on a machine builds the base image, the wheelhouse and the image, which
    takes minutes. Later sessions reuse them while Dockerfile.train, requirements-train.txt,
    constraints.txt and the code under include/ are unchanged.
    """
    capture = request.config.pluginmanager.getplugin("capturemanager")

    def progress(message: str) -> None:
        # Shown while the build runs, because pytest would only show logs of a failed test.
        with capture.global_and_fixture_disabled():
            sys.stderr.write(f"[train_image] {message}\n")
            sys.stderr.flush()

    try:
        return containers.ensure_train_image(docker_engine, progress=progress)
    except containers.PrerequisiteMissingError as err:
        pytest.skip(str(err))
