"""Helpers for the local stack tests: configs whose ports are all free, in a temporary folder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from local_stack import ServiceSpec, StackConfig
from servers import REPO_ROOT, STACK_PORT_ENV_VARS, stack_environ

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
        environ = distinct_ports_environ(env)
        return StackConfig.from_env(
            REPO_ROOT,
            state_dir=root / "state",
            dags_folder=root / "dags",
            services=services,
            environ=environ,
        )

    return build


def distinct_ports_environ(overrides: dict[str, str]) -> dict[str, str]:
    """Return ``stack_environ(**overrides)`` with no free port picked twice.

    Each free port comes from its own bind to port 0, so two picks can return the same port,
    which StackConfig rejects. Overrides are kept as given, so tests of that check still fail.
    """
    while True:
        environ = stack_environ(**overrides)
        picked = [int(environ[name]) for name in STACK_PORT_ENV_VARS if name not in overrides]
        if "ML_LOOP_SERVING_PORT" not in overrides:
            serving = int(environ["ML_LOOP_SERVING_PORT"])
            picked += [serving, serving + 1]
        if len(set(picked)) == len(picked):
            return environ
