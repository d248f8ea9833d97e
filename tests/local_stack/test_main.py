"""Tests of the command line, ``python -m local_stack``, run as a real process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from servers import REPO_ROOT


def run_cli(*args: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "ML_LOOP_STATE_DIR": str(state_dir),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "include"), str(REPO_ROOT / "plugins")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "local_stack", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_airflow_on_empty_state_says_make_run(tmp_path: Path) -> None:
    result = run_cli("airflow", "version", state_dir=tmp_path / "state")
    assert result.returncode == 2
    assert "run `make run` once" in result.stderr
    assert f"secret {tmp_path / 'state' / 'secrets'}" in result.stderr
    assert "is missing" in result.stderr
    assert "LocalStack.prepare() or start" not in result.stderr


def test_airflow_after_prepare_runs_cli(tmp_path: Path) -> None:
    from local_stack import StackConfig

    StackConfig.from_env(REPO_ROOT, state_dir=tmp_path / "state").prepare_state()
    result = run_cli("airflow", "version", state_dir=tmp_path / "state")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("3.")
