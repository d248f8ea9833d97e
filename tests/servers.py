"""Ports and readiness checks for tests that start real servers on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
STACK_PORT_ENV_VARS = (
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


def stack_environ(**overrides: str) -> dict[str, str]:
    """Return this process's environment with every local-stack port moved to a free one."""
    while True:
        ports = {name: free_port() for name in STACK_PORT_ENV_VARS}
        serving = free_port_pair()
        used = [*ports.values(), serving, serving + 1]
        # Each pick releases its port, so two picks can return the same one; the stack rejects
        # a port used twice.
        if len(set(used)) == len(used):
            break
    environ = {**os.environ, **{name: str(port) for name, port in ports.items()}}
    environ["ML_LOOP_SERVING_PORT"] = str(serving)
    environ.update(overrides)
    return environ


def wait_for_http(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Poll ``url`` until it returns 200; fail with the log tail if the process dies or stalls."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    tail = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
    pytest.fail(f"server behind {url} did not become ready in {timeout_s:.0f} s; log tail:\n{tail}")
