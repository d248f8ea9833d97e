"""Tests for the training image of Dockerfile.train, run in real containers."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from containers import REPO_ROOT, TRAIN_REQUIREMENTS, host_user, run_container
from ml_loop.files import sha256_file
from ml_loop.spec import load_spec

pytestmark = pytest.mark.docker

# A UID and GID that have no entry in the image's /etc/passwd, as with `docker run --user`.
UNLISTED_ID = 4321


def pinned_versions() -> dict[str, str]:
    """Return the ``name==version`` pins of requirements-train.txt, by lower-case name."""
    pins = {}
    for line in (REPO_ROOT / TRAIN_REQUIREMENTS).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def write_digits_snapshot(root: Path, rows: int = 64) -> Path:
    """Write a snapshot of random 28x28 images with labels 0 to 3 in the store step's layout."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (rows, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 4, rows).astype(np.int64)
    split = np.zeros(rows, dtype=np.uint8)
    split[int(rows * 0.75) :] = 1
    version = uuid.uuid4().hex[:16]
    folder = root / "snapshots" / "digits" / version
    folder.mkdir(parents=True)
    ids = np.array([f"digits-{i:04d}" for i in range(rows)])
    np.savez(folder / "data.npz", x=x, y=y, ids=ids, split=split)
    manifest = {
        "version_id": version,
        "dataset": "digits",
        "stats": {"mean": [float(x.mean())], "std": [float(x.std())]},
        "counts": {"rows": rows},
        "source_partitions": [],
        "data_sha256": sha256_file(folder / "data.npz"),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def write_unique_spec(path: Path) -> str:
    """Write the digits spec under a fresh name, so the run has its own experiment."""
    raw = yaml.safe_load(load_spec("digits").source_path.read_text())
    raw["name"] = raw["model_name"] = f"test-image-{uuid.uuid4().hex[:8]}"
    path.write_text(yaml.safe_dump(raw))
    return raw["name"]


def python_in_image(docker_engine, train_image, code: str, **kwargs):
    return run_container(docker_engine, train_image, ["python", "-c", code], **kwargs)


def test_help_exits_zero(docker_engine, train_image) -> None:
    result = run_container(docker_engine, train_image, ["python", "-m", "ml_loop.train", "--help"])

    assert result.exit_code == 0, result.stderr[-3000:]
    assert "usage: python -m ml_loop.train" in result.stdout
    assert "--snapshot-uri" in result.stdout


def test_default_command_prints_usage(docker_engine, train_image) -> None:
    result = run_container(docker_engine, train_image, [])

    assert result.exit_code == 0, result.stderr[-3000:]
    assert "usage: python -m ml_loop.train" in result.stdout


def test_torchrun_help(docker_engine, train_image) -> None:
    result = run_container(docker_engine, train_image, ["torchrun", "--help"])

    assert result.exit_code == 0, result.stderr[-3000:]
    assert "usage: torchrun" in result.stdout


def test_image_lacks_airflow_and_gx(docker_engine, train_image) -> None:
    code = (
        "import importlib.metadata, importlib.util, json; "
        "print(json.dumps({"
        "'modules': [m for m in ('airflow', 'great_expectations') "
        "if importlib.util.find_spec(m)], "
        "'distributions': sorted(d.metadata['Name'].lower() "
        "for d in importlib.metadata.distributions())}))"
    )
    result = python_in_image(docker_engine, train_image, code)

    assert result.exit_code == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["modules"] == []
    assert [name for name in found["distributions"] if "airflow" in name] == []
    assert [name for name in found["distributions"] if "great" in name] == []
    assert "mlflow" in found["distributions"]


def test_pinned_versions_installed(docker_engine, train_image) -> None:
    pins = pinned_versions()
    code = (
        "import importlib.metadata, json; "
        f"print(json.dumps({{n: importlib.metadata.version(n) for n in {sorted(pins)!r}}}))"
    )
    result = python_in_image(docker_engine, train_image, code)

    assert result.exit_code == 0, result.stderr[-3000:]
    installed = json.loads(result.stdout.strip().splitlines()[-1])
    # A local label such as "+cpu" or "+cu128" names the build, not the release.
    releases = {name: version.split("+", 1)[0] for name, version in installed.items()}
    assert set(pins) >= {"torch", "mlflow"}
    for name, version in pins.items():
        assert releases[name] == version, name


def test_image_user_non_root(docker_engine, train_image) -> None:
    result = run_container(docker_engine, train_image, ["id", "-u"])

    assert result.exit_code == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "1000"
    assert docker_engine.images.get(train_image).attrs["Config"]["User"] == "1000:1000"


def test_image_labels(docker_engine, train_image) -> None:
    labels = docker_engine.images.get(train_image).labels

    assert labels["org.opencontainers.image.title"] == "ml-loop-train"
    assert labels["ml-loop.test"] == "1"


def test_unlisted_user_writes_bind_mount(docker_engine, train_image, tmp_path) -> None:
    """A container run as the caller's UID writes files that the caller owns on the host."""
    uid = os.getuid() or UNLISTED_ID
    gid = os.getgid() or UNLISTED_ID
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, uid, gid)
    code = (
        "import pathlib, matplotlib.pyplot; "
        "pathlib.Path('/shared/probe.txt').write_text('written'); "
        "pathlib.Path.home().joinpath('probe.txt').write_text('home')"
    )
    result = python_in_image(
        docker_engine,
        train_image,
        code,
        user=f"{uid}:{gid}",
        volumes={str(shared): {"bind": "/shared", "mode": "rw"}},
    )

    assert result.exit_code == 0, result.stderr[-3000:]
    assert "not a writable directory" not in result.stderr
    assert (shared / "probe.txt").read_text() == "written"
    assert (shared / "probe.txt").stat().st_uid == uid
    assert (shared / "probe.txt").stat().st_gid == gid


def test_train_missing_snapshot_fails(docker_engine, train_image, tmp_path) -> None:
    missing = tmp_path / "snapshots" / "digits" / "absent"
    command = ["python", "-m", "ml_loop.train", "--spec", "digits", "--snapshot-uri", str(missing)]
    result = run_container(docker_engine, train_image, command)

    assert result.exit_code != 0
    assert f"snapshot manifest {missing}/manifest.json not found" in result.stderr


@pytest.mark.mlflow
def test_train_run_in_container(docker_engine, train_image, mlflow_server, tmp_path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    snapshot = write_digits_snapshot(root)
    spec_path = root / "spec.yaml"
    experiment = write_unique_spec(spec_path)
    command = [
        "python",
        "-m",
        "ml_loop.train",
        "--spec",
        str(spec_path),
        "--snapshot-uri",
        str(snapshot),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--run-tag",
        "airflow.dag_id=train_digits",
    ]

    result = run_container(
        docker_engine,
        train_image,
        command,
        user=host_user(),
        environment={"MLFLOW_TRACKING_URI": mlflow_server, "ML_LOOP_DATA_DIR": str(root)},
        volumes={str(root): {"bind": str(root), "mode": "rw"}},
    )

    assert result.exit_code == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(printed["run_id"])
    weights = {item.path for item in client.list_artifacts(printed["run_id"], "weights")}
    logged_model = client.get_logged_model(printed["model_uri"].removeprefix("models:/"))
    model_files = {item.path for item in client.list_logged_model_artifacts(logged_model.model_id)}
    assert printed["device"] == "cpu"
    assert printed["resumed_from_epoch"] == 0
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == experiment
    assert run.data.tags["airflow.dag_id"] == "train_digits"
    assert run.data.tags["ml_loop.weights_sha256"] == printed["weights_sha256"]
    assert weights == {"weights/state_dict.pt", "weights/model.json"}
    assert logged_model.source_run_id == printed["run_id"]
    assert "MLmodel" in model_files
    assert (root / "checkpoints").stat().st_uid == os.getuid()
