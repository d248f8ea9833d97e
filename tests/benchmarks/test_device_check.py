"""Smoke tests of benchmarks/device_check.py on the CPU, run as a script like on a GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "device_check.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=300
    )


def test_device_check_cpu() -> None:
    completed = run_script(
        "--device", "cpu", "--epochs", "1", "--rows", "200", "--batch-size", "50"
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout)
    assert result["ran_on"] == "cpu"
    assert "ran on CPU" in result["note"]
    assert "ran on CPU" in completed.stderr
    assert result["precision"] == "fp32"
    assert result["device"]["device_type"] == "cpu"
    assert result["setup"]["steps_timed"] == 4
    assert result["trainer"]["samples_per_s"] > 0
    assert result["plain"]["samples_per_s"] > 0
    assert result["trainer"]["peak_gpu_memory_bytes"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_device_check_cuda_without_gpu() -> None:
    completed = run_script("--device", "cuda", "--epochs", "1", "--rows", "200")

    assert completed.returncode == 1
    assert "no GPU visible in the container" in completed.stderr
    assert completed.stdout == ""


def test_device_check_light_install() -> None:
    """The check runs on requirements-train.txt plus mlxtend, so it loads no Airflow or GX."""
    code = (
        "import runpy, sys\n"
        # As when run as a script: its folder comes first on sys.path.
        f"sys.path.insert(0, {str(SCRIPT.parent)!r})\n"
        f"sys.argv = [{str(SCRIPT)!r}, '--device', 'cpu', '--epochs', '1', '--rows', '100',"
        " '--batch-size', '50']\n"
        "status = 0\n"
        "try:\n"
        f"    runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    status = exit.code\n"
        "loaded = [name for name in ('airflow', 'great_expectations') if name in sys.modules]\n"
        "sys.stderr.write('loaded heavy modules: ' + repr(loaded) + '\\n')\n"
        "sys.exit(status)\n"
    )
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    completed = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "loaded heavy modules: []" in completed.stderr
