"""docker-compose.yaml as `docker-compose config` resolves it: profiles, ports and secrets."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from compose_stack import COMPOSE_FILE, INIT_ENV_SCRIPT, REPO_ROOT, read_env_file

pytestmark = pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="docker-compose is not installed"
)

PROFILES = {"default": "", "celery": "celery"}
PUBLISHED = {
    "airflow-apiserver": 8080,
    "mlflow": 5000,
    "model-server-digits": 8000,
    "model-server-breast-cancer": 8000,
}


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compose-config") / ".env"
    subprocess.run(
        [sys.executable, str(INIT_ENV_SCRIPT), "--env-file", str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return path


def resolved_config(env_file: Path, profiles: str, **environ: str) -> dict[str, Any]:
    # Only the variables given here reach compose, so the defaults of the file apply.
    result = subprocess.run(
        [
            "docker-compose",
            "--file",
            str(COMPOSE_FILE),
            "--project-name",
            "ml-loop-config-test",
            "--env-file",
            str(env_file),
            "config",
        ],
        env={"PATH": "/usr/bin:/bin", "COMPOSE_PROFILES": profiles, **environ},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def port_binding(entry: str | dict[str, Any]) -> tuple[str, int]:
    """Return ``(host_ip, container_port)`` of a port entry in short or long syntax.

    docker-compose 1.29 prints the short form ``HOST_IP:HOST_PORT:CONTAINER_PORT``; without a
    host address a port listens on every interface, reported here as 0.0.0.0.
    """
    if isinstance(entry, dict):
        return entry.get("host_ip", "0.0.0.0"), int(entry["target"])
    parts = str(entry).split(":")
    host_ip = parts[0] if len(parts) == 3 else "0.0.0.0"
    return host_ip, int(parts[-1].split("/")[0])


def active_services(config: dict[str, Any], profiles: str) -> dict[str, Any]:
    """Return the services that `up` starts with ``profiles`` active.

    docker-compose 1.29 lists every service in `config`, whatever the active profiles, so the
    services of inactive profiles are dropped here.
    """
    wanted = set(filter(None, profiles.split(",")))
    return {
        name: service
        for name, service in config["services"].items()
        if not service.get("profiles") or wanted & set(service["profiles"])
    }


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_config_valid(env_file: Path, profile: str) -> None:
    services = active_services(resolved_config(env_file, PROFILES[profile]), PROFILES[profile])
    assert "postgres" in services
    assert ("airflow-worker" in services) == (profile == "celery")
    assert ("redis" in services) == (profile == "celery")


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_only_uis_published(env_file: Path, profile: str) -> None:
    services = active_services(resolved_config(env_file, PROFILES[profile]), PROFILES[profile])
    published = {name for name, service in services.items() if service.get("ports")}
    assert published == set(PUBLISHED)


def test_database_and_broker_unpublished(env_file: Path) -> None:
    services = resolved_config(env_file, "celery,cli,train-image")["services"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port_binding(port)[1] not in (5432, 6379), name
    assert "ports" not in services["postgres"]
    assert "ports" not in services["redis"]


def test_ports_bind_localhost(env_file: Path) -> None:
    services = resolved_config(env_file, "celery")["services"]
    for name, target in PUBLISHED.items():
        (port,) = services[name]["ports"]
        assert port_binding(port) == ("127.0.0.1", target), name


def test_bind_address_variable(env_file: Path) -> None:
    services = resolved_config(env_file, "", ML_LOOP_BIND_ADDRESS="0.0.0.0")["services"]
    for name in PUBLISHED:
        assert port_binding(services[name]["ports"][0])[0] == "0.0.0.0", name


def test_secrets_come_from_env(env_file: Path) -> None:
    values = read_env_file(env_file)
    services = resolved_config(env_file, "celery")["services"]
    environment = services["airflow-scheduler"]["environment"]
    assert environment["AIRFLOW__CORE__FERNET_KEY"] == values["AIRFLOW_FERNET_KEY"]
    assert environment["AIRFLOW__API_AUTH__JWT_SECRET"] == values["AIRFLOW_JWT_SECRET"]
    assert values["AIRFLOW_DB_PASSWORD"] in environment["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert values["REDIS_PASSWORD"] in environment["AIRFLOW__CELERY__BROKER_URL"]


def test_jwt_secret_shared(env_file: Path) -> None:
    services = resolved_config(env_file, "celery")["services"]
    airflow = [name for name in services if name.startswith("airflow-")]
    secrets = {services[name]["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"] for name in airflow}
    assert len(secrets) == 1


def test_missing_secret_rejected(tmp_path: Path, env_file: Path) -> None:
    partial = tmp_path / ".env"
    partial.write_text(
        "".join(
            line + "\n"
            for line in env_file.read_text().splitlines()
            if not line.startswith("AIRFLOW_FERNET_KEY=")
        )
    )
    result = subprocess.run(
        ["docker-compose", "--file", str(COMPOSE_FILE), "--env-file", str(partial), "config"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert result.returncode != 0
    assert "AIRFLOW_FERNET_KEY" in result.stderr


def test_every_service_checks_health(env_file: Path) -> None:
    services = active_services(resolved_config(env_file, "celery"), "celery")
    one_shot = {"airflow-init"}
    for name, service in services.items():
        if name in one_shot:
            continue
        assert "healthcheck" in service, name
        assert service["restart"] == "unless-stopped", name


def test_training_containers_join_data_volume_and_network(env_file: Path) -> None:
    config = resolved_config(env_file, "", COMPOSE_PROJECT_NAME="stack-a")
    environment = config["services"]["airflow-scheduler"]["environment"]
    assert environment["ML_LOOP_TRAIN_DATA_VOLUME"] == "stack-a_ml-loop-data"
    assert config["volumes"]["ml-loop-data"]["name"] == "stack-a_ml-loop-data"
    assert environment["ML_LOOP_TRAIN_NETWORK"] == "stack-a_default"
    assert config["networks"]["default"]["name"] == "stack-a_default"
