"""Helpers for the local stack tests: configs whose ports are all free, in a temporary folder."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from local_stack import ServiceSpec, StackConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
PORT_ENV_VARS = (
    "ML_LOOP_AIRFLOW_PORT",
    "ML_LOOP_MLFLOW_PORT",
    "ML_LOOP_WORKER_LOG_PORT",
    "ML_LOOP_TRIGGERER_LOG_PORT",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port_pair() -> int:
    """Return a free port whose successor is free too, for the two model servers."""
    while True:
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


ConfigFactory = Callable[..., StackConfig]


@pytest.fixture
def make_config(tmp_path: Path) -> ConfigFactory:
    """Build configs under ``tmp_path`` with every port moved to a free one.

    Call it with the service list and any ``ML_LOOP_*`` overrides as keyword arguments; a
    ``root`` keyword puts the state and DAG folders below another folder.
    """

    def build(
        services: Sequence[str | ServiceSpec], root: Path | None = None, **env: str
    ) -> StackConfig:
        root = root or tmp_path
        environ = {**os.environ, **{name: str(free_port()) for name in PORT_ENV_VARS}}
        environ["ML_LOOP_SERVING_PORT"] = str(free_port_pair())
        environ.update(env)
        return StackConfig.from_env(
            REPO_ROOT,
            state_dir=root / "state",
            dags_folder=root / "dags",
            services=services,
            environ=environ,
        )

    return build
