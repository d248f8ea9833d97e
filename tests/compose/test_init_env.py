"""include/compose/init-env.py: the generated .env and its guarantees."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from compose_stack import INIT_ENV_SCRIPT, REPO_ROOT, read_env_file
from cryptography.fernet import Fernet

SECRET_NAMES = (
    "AIRFLOW_ADMIN_PASSWORD",
    "AIRFLOW_JWT_SECRET",
    "AIRFLOW_API_SECRET_KEY",
    "AIRFLOW_FERNET_KEY",
    "POSTGRES_PASSWORD",
    "AIRFLOW_DB_PASSWORD",
    "MLFLOW_DB_PASSWORD",
    "REDIS_PASSWORD",
    "ML_LOOP_SERVING_TOKEN",
)


def run_init_env(env_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(INIT_ENV_SCRIPT), "--env-file", str(env_file), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    path = tmp_path / ".env"
    result = run_init_env(path)
    assert result.returncode == 0, result.stderr
    return path


def test_env_has_every_secret(env_file: Path) -> None:
    values = read_env_file(env_file)
    for name in SECRET_NAMES:
        assert values.get(name), f"{name} missing or empty"


def test_env_secrets_all_differ(env_file: Path) -> None:
    values = [read_env_file(env_file)[name] for name in SECRET_NAMES]
    assert len(set(values)) == len(values)


def test_env_avoids_example_placeholders(env_file: Path) -> None:
    placeholders = {value for value in read_env_file(REPO_ROOT / ".env.example").values() if value}
    generated = read_env_file(env_file)
    for name in SECRET_NAMES:
        assert generated[name] not in placeholders, name


def test_example_documents_every_secret() -> None:
    example = read_env_file(REPO_ROOT / ".env.example")
    for name in SECRET_NAMES:
        assert name in example


def test_fernet_key_format(env_file: Path) -> None:
    key = read_env_file(env_file)["AIRFLOW_FERNET_KEY"]
    assert len(base64.urlsafe_b64decode(key)) == 32
    token = Fernet(key.encode()).encrypt(b"check")
    assert Fernet(key.encode()).decrypt(token) == b"check"


def test_env_file_private(env_file: Path) -> None:
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600


def test_login_printed_once(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    first = run_init_env(path)
    second = run_init_env(path)
    password = read_env_file(path)["AIRFLOW_ADMIN_PASSWORD"]
    assert password in first.stdout
    assert second.returncode == 0
    assert password not in second.stdout + second.stderr


def test_existing_env_unchanged(tmp_path: Path) -> None:
    path = tmp_path / ".env"
    path.write_text("AIRFLOW_ADMIN_PASSWORD=kept\n")
    result = run_init_env(path)
    assert result.returncode == 0
    assert path.read_text() == "AIRFLOW_ADMIN_PASSWORD=kept\n"
    assert "left unchanged" in result.stdout


def test_two_runs_differ(tmp_path: Path) -> None:
    first, second = tmp_path / "a.env", tmp_path / "b.env"
    run_init_env(first)
    run_init_env(second)
    for name in SECRET_NAMES:
        assert read_env_file(first)[name] != read_env_file(second)[name], name


def test_missing_folder_rejected(tmp_path: Path) -> None:
    result = run_init_env(tmp_path / "absent" / ".env")
    assert result.returncode == 2
    assert "does not exist" in result.stderr


def test_docker_gid_from_socket(tmp_path: Path) -> None:
    socket_path = tmp_path / "docker.sock"
    socket_path.write_text("")
    path = tmp_path / ".env"
    run_init_env(path, "--docker-socket", str(socket_path))
    assert read_env_file(path)["ML_LOOP_DOCKER_GID"] == str(os.stat(socket_path).st_gid)


def test_env_file_ignored_by_git() -> None:
    result = subprocess.run(
        ["git", "check-ignore", "--quiet", ".env"], cwd=REPO_ROOT, check=False, timeout=30
    )
    assert result.returncode == 0
