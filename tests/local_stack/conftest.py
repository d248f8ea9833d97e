"""Helpers for the local stack tests: configs whose ports are all free, in a temporary folder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from local_stack import ServiceSpec, StackConfig
from servers import REPO_ROOT, stack_environ

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
        environ = stack_environ(**env)
        return StackConfig.from_env(
            REPO_ROOT,
            state_dir=root / "state",
            dags_folder=root / "dags",
            services=services,
            environ=environ,
        )

    return build
