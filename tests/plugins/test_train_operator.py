"""The train operator: its arguments, the local backend for real, the docker backend with the real
engine and training image, and the Kubernetes pod it would submit, checked offline.

The operator runs outside a scheduler here, with the context it reads: the task instance (ids
and try number), the run id and the params. The store task's snapshot is passed as the dict the
XCom would hold.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import docker
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from ml_loop.errors import SpecError
from ml_loop.files import sha256_file
from ml_loop.spec import load_spec
from ml_loop_airflow import train_operator
from ml_loop_airflow.train_operator import (
    NO_GPU_MESSAGE,
    POD_TASK_LABEL,
    TrainBackendError,
    TrainOperator,
    container_name,
    delete_task_pods,
    docker_device_requests,
    parse_train_result,
    train_pool,
)

DAG_ID = "train_digits"
TEST_LABELS = {"ml-loop.test": "1"}
RUN_PARAMS = {"epochs": 2, "batch_size": 16, "learning_rate": 0.001, "seed": 7}
DOCKER_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]+$")


def write_spec(root: Path, **compute: Any) -> Path:
    """Write the digits spec under a fresh name into ``root/specs``, with ``compute`` overrides.

    The file lies in the data root, so a training container reads it at the same path.
    """
    raw = yaml.safe_load(load_spec("digits").source_path.read_text())
    name = f"test-digits-{uuid.uuid4().hex[:8]}"
    raw["name"] = name
    raw["model_name"] = name
    for key, value in compute.items():
        if isinstance(value, dict):
            raw["compute"].setdefault(key, {}).update(value)
        else:
            raw["compute"][key] = value
    path = root / "specs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def write_snapshot(root: Path, rows: int = 96, seed: int = 0) -> dict[str, Any]:
    """Write a digits snapshot of 28x28 images whose bright quadrant gives the class.

    Returns the SnapshotRef dict that the store task would pass on.
    """
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, rows)
    x = rng.uniform(0, 0.2, (rows, 1, 28, 28))
    for i, label in enumerate(y):
        row, column = divmod(int(label), 2)
        x[i, 0, row * 14 : row * 14 + 14, column * 14 : column * 14 + 14] += 0.7
    split = np.zeros(rows, dtype=np.uint8)
    split[int(rows * 0.7) : int(rows * 0.85)] = 1
    split[int(rows * 0.85) :] = 2
    version = uuid.uuid4().hex
    folder = root / "snapshots" / "digits" / version
    folder.mkdir(parents=True)
    np.savez(
        folder / "data.npz",
        x=x.astype(np.float32),
        y=y.astype(np.int64),
        ids=np.array([f"digits-{i:05d}" for i in range(rows)]),
        split=split,
    )
    train_x = x[split == 0]
    manifest = {
        "version_id": version,
        "dataset": "digits",
        "stats": {"mean": [float(train_x.mean())], "std": [float(train_x.std())]},
        "counts": {"rows": rows},
        "source_partitions": [],
        "data_sha256": sha256_file(folder / "data.npz"),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return {
        "dataset": "digits",
        "version_id": version,
        "uri": str(folder),
        "manifest_uri": str(folder / "manifest.json"),
        "rows": rows,
        "parent_version": None,
    }


def make_context(
    params: dict[str, Any] | None = None,
    try_number: int = 1,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Build the part of an Airflow task context that TrainOperator and the providers read."""
    run_id = run_id or f"manual__2026-12-04T06:00:00.{uuid.uuid4().hex[:6]}+00:00"
    pushed: dict[str, Any] = {}
    ti = SimpleNamespace(
        dag_id=DAG_ID,
        task_id="train",
        run_id=run_id,
        try_number=try_number,
        map_index=-1,
        xcom_push=lambda key, value: pushed.__setitem__(key, value),
        pushed=pushed,
    )
    return {
        "ti": ti,
        "run_id": run_id,
        "dag": SimpleNamespace(dag_id=DAG_ID),
        "dag_run": SimpleNamespace(run_id=run_id, conf={}),
        "params": {**RUN_PARAMS, **(params or {})},
    }


def make_operator(spec: Path | str, snapshot: dict[str, Any]) -> TrainOperator:
    return TrainOperator(
        task_id="train", spec=str(spec), snapshot=snapshot, container_labels=TEST_LABELS
    )


def argument(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# arguments, pools and names


def test_args_from_params(data_root: Path) -> None:
    spec = write_spec(data_root, gpus=0, dataloader_workers=2)
    snapshot = write_snapshot(data_root, rows=20)
    context = make_context({"train_backend": "docker"}, try_number=3)
    job = make_operator(spec, snapshot).build_job(context)
    args = job.args()
    assert argument(args, "--spec") == str(spec)
    assert argument(args, "--snapshot-uri") == snapshot["uri"]
    assert argument(args, "--epochs") == "2"
    assert argument(args, "--learning-rate") == "0.001"
    assert argument(args, "--batch-size") == "16"
    assert argument(args, "--seed") == "7"
    assert argument(args, "--data-dir") == str(data_root.resolve())
    assert argument(args, "--gpus") == "0"
    assert argument(args, "--dataloader-workers") == "2"
    assert argument(args, "--backend") == "docker"
    tags = [args[i + 1] for i, arg in enumerate(args) if arg == "--run-tag"]
    assert tags == [
        f"airflow.dag_id={DAG_ID}",
        f"airflow.run_id={context['run_id']}",
        "airflow.try_number=3",
        "ml_loop.train_backend=docker",
    ]


def test_args_default_backend_from_spec(data_root: Path) -> None:
    spec = write_spec(data_root, backend="docker")
    job = make_operator(spec, write_snapshot(data_root, rows=20)).build_job(make_context())
    assert job.backend == "docker"


def test_args_reject_unknown_backend(data_root: Path) -> None:
    operator = make_operator(write_spec(data_root), write_snapshot(data_root, rows=20))
    with pytest.raises(SpecError, match="invalid train backend 'slurm'"):
        operator.build_job(make_context({"train_backend": "slurm"}))


def test_args_reject_snapshot_without_uri(data_root: Path) -> None:
    operator = make_operator(write_spec(data_root), {"version_id": "v1"})
    with pytest.raises(TrainBackendError, match="not a SnapshotRef"):
        operator.build_job(make_context())


def test_args_rebased_to_mount(data_root: Path) -> None:
    spec = write_spec(data_root)
    snapshot = write_snapshot(data_root, rows=20)
    job = make_operator(spec, snapshot).build_job(make_context())
    args = job.args(data_dir="/data")
    relative = Path(snapshot["uri"]).resolve().relative_to(data_root.resolve())
    assert argument(args, "--snapshot-uri") == f"/data/{relative}"
    assert argument(args, "--spec") == f"/data/specs/{spec.name}"
    assert argument(args, "--data-dir") == "/data"


def test_args_snapshot_outside_root(data_root: Path, tmp_path: Path) -> None:
    outside = write_snapshot(tmp_path / "elsewhere", rows=20)
    job = make_operator(write_spec(data_root), outside).build_job(make_context())
    with pytest.raises(TrainBackendError, match="is not under the data root"):
        job.args(data_dir="/data")


def test_pool_for_gpus() -> None:
    compute = load_spec("digits").compute
    assert train_pool(compute) == (None, 1)
    assert train_pool(_with_gpus(compute, 2)) == ("gpu", 2)
    assert train_pool(_with_gpus(compute, -1)) == ("gpu", 1)


def test_operator_takes_gpu_pool(data_root: Path) -> None:
    operator = make_operator(write_spec(data_root, gpus=2), {"uri": "x"})
    assert operator.pool == "gpu"
    assert operator.pool_slots == 2


def test_operator_cpu_default_pool(data_root: Path) -> None:
    operator = make_operator(write_spec(data_root, gpus=0), {"uri": "x"})
    assert operator.pool == "default_pool"
    assert operator.pool_slots == 1


def test_container_name_per_task_instance() -> None:
    run_id = "manual__2026-12-04T06:00:00.123+00:00"
    name = container_name(DAG_ID, run_id, "train")
    assert DOCKER_NAME.match(name)
    assert name == container_name(DAG_ID, run_id, "train")
    assert name != container_name(DAG_ID, run_id + "x", "train")
    assert name != container_name(DAG_ID, run_id, "train", map_index=0)


def test_device_requests_by_count_and_ids() -> None:
    compute = load_spec("digits").compute
    assert docker_device_requests(compute) == []
    assert docker_device_requests(_with_gpus(compute, -1)) == [
        {"count": -1, "capabilities": [["gpu"]]}
    ]
    pinned = _with_gpus(compute, 2)
    pinned = type(compute)(
        **{**pinned.__dict__, "docker": type(compute.docker)(gpu_device_ids=("0", "3"))}
    )
    assert docker_device_requests(pinned) == [{"device_ids": ["0", "3"], "capabilities": [["gpu"]]}]


def test_parse_result_last_line() -> None:
    result = {"run_id": "r1", "model_uri": "models:/m-1", "metrics": {"val_accuracy": 0.9}}
    lines = ["starting", json.dumps({"run_id": "old"}), json.dumps(result), ""]
    assert parse_train_result(lines, lines) == result


def test_parse_result_rejects_other_line() -> None:
    with pytest.raises(TrainBackendError, match="last stdout line is not the TrainResult"):
        parse_train_result([json.dumps({"run_id": "r1"}), "done"], ["done"])


def test_docker_credentials_private(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv(
        "AIRFLOW_CONN_MLFLOW_DEFAULT",
        json.dumps(
            {
                "conn_type": "http",
                "login": "trainer",
                "password": "s3cret-pass",
                "extra": {"token": "tok-123"},
            }
        ),
    )
    operator = make_operator(write_spec(data_root), write_snapshot(data_root, rows=20))
    context = make_context({"train_backend": "docker"})
    docker_op = operator.build_docker_operator(operator.build_job(context), context)
    assert docker_op._private_environment == {
        "MLFLOW_TRACKING_USERNAME": "trainer",
        "MLFLOW_TRACKING_PASSWORD": "s3cret-pass",
        "MLFLOW_TRACKING_TOKEN": "tok-123",
    }
    rendered = json.dumps(docker_op.environment)
    assert "s3cret-pass" not in rendered
    assert "tok-123" not in rendered
    assert "environment" in docker_op.template_fields
    assert "private_environment" not in docker_op.template_fields
    assert docker_op.environment["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5999"


def test_docker_operator_settings(data_root: Path) -> None:
    operator = make_operator(write_spec(data_root, gpus=1), write_snapshot(data_root, rows=20))
    context = make_context({"train_backend": "docker"})
    docker_op = operator.build_docker_operator(operator.build_job(context), context)
    assert docker_op.force_pull is False
    assert docker_op.mount_tmp_dir is False
    assert docker_op.network_mode == "host"
    assert docker_op.shm_size == "1g"
    assert docker_op.container_name == container_name(DAG_ID, context["run_id"], "train")
    (mount,) = docker_op.mounts
    assert mount["Source"] == str(data_root.resolve())
    assert mount["Target"] == str(data_root.resolve())
    assert mount["Type"] == "bind"
    (request,) = docker_op.device_requests
    assert request["Count"] == 1
    assert request["Capabilities"] == [["gpu"]]
    assert json.loads(docker_op.environment["ML_LOOP_DEVICE_REQUEST"]) == {
        "backend": "docker",
        "device_requests": [{"count": 1, "capabilities": [["gpu"]]}],
    }
    assert docker_op.command[:3] == ["python", "-m", "ml_loop.train"]


def test_docker_operator_in_a_compose_worker(data_root: Path, monkeypatch) -> None:
    monkeypatch.setenv("ML_LOOP_TRAIN_DATA_VOLUME", "ml-loop_ml-loop-data")
    monkeypatch.setenv("ML_LOOP_TRAIN_NETWORK", "ml-loop_default")
    operator = make_operator(write_spec(data_root), write_snapshot(data_root, rows=20))
    context = make_context({"train_backend": "docker"})
    docker_op = operator.build_docker_operator(operator.build_job(context), context)
    (mount,) = docker_op.mounts
    assert mount["Source"] == "ml-loop_ml-loop-data"
    assert mount["Target"] == str(data_root.resolve())
    assert mount["Type"] == "volume"
    assert docker_op.network_mode == "ml-loop_default"


# kubernetes, offline


@pytest.fixture
def kube_spec(data_root: Path) -> Path:
    return write_spec(
        data_root,
        gpus=2,
        kubernetes={
            "image": "registry.example.com/ml-loop-train:1.2",
            "namespace": "training",
            "service_account": "trainer",
            "mlflow_secret": "mlflow-credentials",
            "data_pvc": "ml-loop-data",
            "data_mount_path": "/data",
            "shm_size": "2Gi",
            "cpu_request": "4",
            "memory_request": "8Gi",
            "memory_limit": "16Gi",
            "node_selector": {"nvidia.com/gpu.present": "true"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
        },
    )


@pytest.fixture
def pod(kube_spec: Path, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.ml-loop.svc:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "worker-secret")
    monkeypatch.delenv("ML_LOOP_TRAIN_IMAGE", raising=False)
    snapshot = write_snapshot(data_root, rows=20)
    operator = make_operator(kube_spec, snapshot)
    context = make_context({"train_backend": "kubernetes"}, try_number=2)
    built = operator.build_pod(context)
    built.test_snapshot = snapshot
    built.test_context = context
    return built


def base_container(pod: Any) -> Any:
    (container,) = [c for c in pod.spec.containers if c.name == "base"]
    return container


def test_pod_image_and_command(pod: Any, kube_spec: Path, data_root: Path) -> None:
    container = base_container(pod)
    assert container.image == "registry.example.com/ml-loop-train:1.2"
    assert container.image_pull_policy == "IfNotPresent"
    assert container.command == [
        "torchrun",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "-m",
        "ml_loop.train",
    ]
    args = container.args
    relative = Path(pod.test_snapshot["uri"]).resolve().relative_to(data_root.resolve())
    assert argument(args, "--snapshot-uri") == f"/data/{relative}"
    assert argument(args, "--spec") == f"/data/specs/{kube_spec.name}"
    assert argument(args, "--data-dir") == "/data"
    assert argument(args, "--gpus") == "2"
    assert argument(args, "--backend") == "kubernetes"
    assert argument(args, "--result-file") == "/airflow/xcom/return.json"
    assert "airflow.try_number=2" in args


def test_pod_env_has_no_secret(pod: Any) -> None:
    container = base_container(pod)
    env = {item.name: item.value for item in container.env}
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.ml-loop.svc:5000"
    assert env["ML_LOOP_DATA_DIR"] == "/data"
    assert json.loads(env["ML_LOOP_DEVICE_REQUEST"]) == {
        "backend": "kubernetes",
        "resources": {"limits": {"memory": "16Gi", "nvidia.com/gpu": "2"}},
    }
    assert "worker-secret" not in json.dumps(env)
    assert not [name for name in env if "PASSWORD" in name or "TOKEN" in name]
    assert all(item.value_from is None for item in container.env)
    (source,) = container.env_from
    assert source.secret_ref.name == "mlflow-credentials"


def test_pod_gpu_resources(pod: Any) -> None:
    resources = base_container(pod).resources
    assert resources.limits == {"memory": "16Gi", "nvidia.com/gpu": "2"}
    assert resources.requests == {"cpu": "4", "memory": "8Gi"}


def test_pod_scheduling(pod: Any) -> None:
    assert pod.metadata.namespace == "training"
    assert pod.spec.service_account_name == "trainer"
    assert pod.spec.node_selector == {"nvidia.com/gpu.present": "true"}
    (toleration,) = pod.spec.tolerations
    assert toleration.key == "nvidia.com/gpu"
    assert toleration.operator == "Exists"
    assert toleration.effect == "NoSchedule"
    assert pod.spec.restart_policy == "Never"


def test_pod_volumes(pod: Any) -> None:
    volumes = {volume.name: volume for volume in pod.spec.volumes}
    assert volumes["dshm"].empty_dir.medium == "Memory"
    assert volumes["dshm"].empty_dir.size_limit == "2Gi"
    assert volumes["data"].persistent_volume_claim.claim_name == "ml-loop-data"
    mounts = {mount.name: mount.mount_path for mount in base_container(pod).volume_mounts}
    assert mounts["dshm"] == "/dev/shm"
    assert mounts["data"] == "/data"
    assert mounts["xcom"] == "/airflow/xcom"


def test_pod_labels(pod: Any) -> None:
    labels = pod.metadata.labels
    context = pod.test_context
    assert labels["dag_id"] == DAG_ID
    assert labels["task_id"] == "train"
    assert labels["try_number"] == "2"
    assert labels["run_id"]
    assert labels[POD_TASK_LABEL] == train_operator.task_instance_key(
        DAG_ID, context["run_id"], "train"
    )
    assert pod.metadata.name.startswith("train-test-digits-")


def test_pod_xcom_sidecar(pod: Any) -> None:
    names = [container.name for container in pod.spec.containers]
    assert names == ["base", "airflow-xcom-sidecar"]


def test_pod_single_gpu_runs_python(kube_spec: Path, data_root: Path) -> None:
    spec = write_spec(data_root, gpus=1)
    operator = make_operator(spec, write_snapshot(data_root, rows=20))
    built = operator.build_pod(make_context({"train_backend": "kubernetes"}))
    container = base_container(built)
    assert container.command == ["python", "-m", "ml_loop.train"]
    assert container.resources.limits["nvidia.com/gpu"] == "1"


def test_pod_cpu_has_no_gpu_limit(data_root: Path) -> None:
    operator = make_operator(write_spec(data_root, gpus=0), write_snapshot(data_root, rows=20))
    built = operator.build_pod(make_context({"train_backend": "kubernetes"}))
    assert "nvidia.com/gpu" not in base_container(built).resources.limits


def test_pod_rejects_all_gpus(data_root: Path) -> None:
    operator = make_operator(write_spec(data_root, gpus=-1), write_snapshot(data_root, rows=20))
    with pytest.raises(TrainBackendError, match=r"compute\.gpus is -1"):
        operator.build_pod(make_context({"train_backend": "kubernetes"}))


class FakeCoreV1:
    """Records the pod calls of delete_task_pods; pods disappear one listing after deletion."""

    def __init__(self, names: list[str]) -> None:
        self.names = list(names)
        self.calls: list[tuple] = []
        self.deleted: set[str] = set()

    def list_namespaced_pod(self, namespace: str, label_selector: str) -> Any:
        self.calls.append(("list", namespace, label_selector))
        items = [
            SimpleNamespace(metadata=SimpleNamespace(name=name))
            for name in self.names
            if name not in self.deleted
        ]
        self.names = [name for name in self.names if name not in self.deleted]
        return SimpleNamespace(items=items)

    def delete_namespaced_pod(self, name: str, namespace: str) -> None:
        self.calls.append(("delete", namespace, name))
        self.deleted.add(name)


def test_delete_pods_of_earlier_try() -> None:
    client = FakeCoreV1(["train-digits-abc"])
    selector = f"{POD_TASK_LABEL}=0123"
    deleted = delete_task_pods(client, "training", selector, train_operator.logger)
    assert deleted == ["train-digits-abc"]
    assert client.calls == [
        ("list", "training", selector),
        ("delete", "training", "train-digits-abc"),
        ("list", "training", selector),
    ]


def test_delete_pods_none_found() -> None:
    client = FakeCoreV1([])
    assert delete_task_pods(client, "training", "x=1", train_operator.logger) == []
    assert client.calls == [("list", "training", "x=1")]


def _with_gpus(compute: Any, gpus: int) -> Any:
    return type(compute)(**{**compute.__dict__, "gpus": gpus})


# local backend, for real


@pytest.mark.mlflow
def test_local_backend_trains(
    data_root: Path, mlflow_tracking: str, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = write_spec(data_root)
    operator = make_operator(spec, write_snapshot(data_root))
    result = operator.execute(make_context({"train_backend": "local"}))
    assert result["resumed_from_epoch"] == 0
    assert result["metrics"]["train_loss"] > 0
    assert result["model_uri"].startswith("models:/")
    run = MlflowClient(tracking_uri=mlflow_tracking).get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["ml_loop.train_backend"] == "local"
    assert run.data.tags["airflow.dag_id"] == DAG_ID
    assert "training run" in capsys.readouterr().out


@pytest.mark.mlflow
def test_local_backend_failure_exit_code(data_root: Path, mlflow_tracking: str) -> None:
    snapshot = write_snapshot(data_root, rows=20)
    missing = {**snapshot, "uri": str(data_root / "snapshots" / "digits" / "absent")}
    operator = make_operator(write_spec(data_root), missing)
    with pytest.raises(TrainBackendError, match=r"exited with code 1[^0-9]") as raised:
        operator.execute(make_context({"train_backend": "local"}))
    assert "absent" in str(raised.value)


@pytest.mark.mlflow
def test_local_on_kill_terminates(data_root: Path, mlflow_tracking: str) -> None:
    operator = make_operator(write_spec(data_root), write_snapshot(data_root, rows=20))
    failures: list[BaseException] = []

    def execute() -> None:
        try:
            operator.execute(make_context({"train_backend": "local"}))
        except BaseException as err:
            failures.append(err)

    thread = threading.Thread(target=execute)
    thread.start()
    deadline = time.monotonic() + 60
    while operator._process is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process = operator._process
    assert process is not None
    operator.on_kill()
    thread.join(timeout=60)
    assert process.poll() == -15
    (failure,) = failures
    assert "exited with code -15" in str(failure)


# docker backend, with the real engine and training image


def containers_named(engine: docker.DockerClient, name: str) -> list[Any]:
    return engine.containers.list(all=True, filters={"name": f"^/{name}$"})


@pytest.fixture
def docker_run(
    train_image: str, data_root: Path, mlflow_tracking: str, monkeypatch: pytest.MonkeyPatch
) -> str:
    """Point the docker backend at the session's training image; return the image tag."""
    monkeypatch.setenv("ML_LOOP_TRAIN_IMAGE", train_image)
    return train_image


@pytest.mark.docker
@pytest.mark.mlflow
def test_docker_backend_trains(
    docker_run: str,
    docker_engine: docker.DockerClient,
    data_root: Path,
    mlflow_tracking: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    operator = make_operator(write_spec(data_root), write_snapshot(data_root))
    context = make_context({"train_backend": "docker"})
    result = operator.execute(context)
    assert result["resumed_from_epoch"] == 0
    assert result["device"] == "cpu"
    run = MlflowClient(tracking_uri=mlflow_tracking).get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["ml_loop.train_backend"] == "docker"
    # Lines that the trainer logs inside the container, streamed into the task log by the
    # Docker provider's operator.
    container_lines = [
        line for line in capsys.readouterr().out.splitlines() if "DockerOperator" in line
    ]
    assert any("train_key=" in line for line in container_lines)
    assert any(f"training run {result['run_id']} finished" in line for line in container_lines)
    assert containers_named(docker_engine, container_name(DAG_ID, context["run_id"], "train")) == []


@pytest.mark.docker
@pytest.mark.mlflow
def test_docker_failure_removes_container(
    docker_run: str, docker_engine: docker.DockerClient, data_root: Path
) -> None:
    snapshot = write_snapshot(data_root, rows=20)
    missing = {**snapshot, "uri": str(data_root / "snapshots" / "digits" / "absent")}
    operator = make_operator(write_spec(data_root), missing)
    context = make_context({"train_backend": "docker"})
    with pytest.raises(TrainBackendError, match=r"exited with code 1[^0-9]") as raised:
        operator.execute(context)
    assert "absent" in str(raised.value)
    assert containers_named(docker_engine, container_name(DAG_ID, context["run_id"], "train")) == []


@pytest.mark.docker
def test_docker_gpu_request_fails_fast(
    docker_run: str, docker_engine: docker.DockerClient, data_root: Path
) -> None:
    operator = make_operator(write_spec(data_root, gpus=1), write_snapshot(data_root, rows=20))
    context = make_context({"train_backend": "docker"})
    with pytest.raises(TrainBackendError) as raised:
        operator.execute(context)
    message = str(raised.value)
    assert message.startswith(NO_GPU_MESSAGE)
    assert "'count': 1" in message
    assert "could not select device driver" in message
    assert "NVIDIA Container Toolkit" in message
    assert containers_named(docker_engine, container_name(DAG_ID, context["run_id"], "train")) == []


@pytest.mark.docker
def test_docker_missing_image_not_pulled(
    docker_engine: docker.DockerClient, data_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = f"ml-loop-test/absent:{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("ML_LOOP_TRAIN_IMAGE", image)
    operator = make_operator(write_spec(data_root), write_snapshot(data_root, rows=20))
    with pytest.raises(TrainBackendError, match="make train-image") as raised:
        operator.execute(make_context({"train_backend": "docker"}))
    assert image in str(raised.value)
    assert docker_engine.images.list(name=image) == []


@pytest.mark.docker
@pytest.mark.mlflow
def test_docker_retry_removes_leftover(
    docker_run: str, docker_engine: docker.DockerClient, data_root: Path
) -> None:
    operator = make_operator(write_spec(data_root), write_snapshot(data_root))
    context = make_context({"train_backend": "docker"}, try_number=2)
    name = container_name(DAG_ID, context["run_id"], "train")
    # The container of a try whose worker was lost: still running and never removed.
    leftover = docker_engine.containers.run(
        docker_run, ["sleep", "600"], name=name, detach=True, labels=TEST_LABELS
    )
    try:
        result = operator.execute(context)
    finally:
        for container in containers_named(docker_engine, name):
            container.remove(force=True)
    assert result["resumed_from_epoch"] == 0
    with pytest.raises(docker.errors.NotFound):
        docker_engine.containers.get(leftover.id)


@pytest.mark.docker
@pytest.mark.mlflow
def test_docker_killed_try_resumes(
    docker_run: str, docker_engine: docker.DockerClient, data_root: Path
) -> None:
    spec = write_spec(data_root)
    snapshot = write_snapshot(data_root, rows=1200)
    params = {"train_backend": "docker", "epochs": 8, "batch_size": 32}
    first = make_context(params, try_number=1)
    name = container_name(DAG_ID, first["run_id"], "train")
    failures: list[BaseException] = []

    def first_try() -> None:
        try:
            make_operator(spec, snapshot).execute(first)
        except BaseException as err:
            failures.append(err)

    thread = threading.Thread(target=first_try)
    thread.start()
    checkpoint = wait_for_checkpoint(data_root, thread)
    (container,) = containers_named(docker_engine, name)
    container.kill()
    thread.join(timeout=120)

    assert checkpoint.exists()
    (failure,) = failures
    assert isinstance(failure, TrainBackendError)
    assert "exited with code 137" in str(failure)
    with pytest.raises(docker.errors.NotFound):
        docker_engine.containers.get(container.id)

    second = {**make_context(params, try_number=2, run_id=first["run_id"])}
    result = make_operator(spec, snapshot).execute(second)
    assert result["resumed_from_epoch"] >= 1
    assert containers_named(docker_engine, name) == []


def wait_for_checkpoint(root: Path, thread: threading.Thread, timeout_s: float = 300) -> Path:
    """Wait until the first epoch's checkpoint of the training container exists."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = list((root / "checkpoints").glob("*/last.pt"))
        if found:
            return found[0]
        if not thread.is_alive():
            pytest.fail("the first try ended before it wrote a checkpoint")
        time.sleep(0.2)
    pytest.fail(f"no checkpoint under {root / 'checkpoints'} after {timeout_s:.0f} s")
