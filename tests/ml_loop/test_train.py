"""Tests for the trainer against a real MLflow server, on tiny synthetic snapshots."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from ml_loop import devices, models, train
from ml_loop.errors import DataValidationError, MlLoopError, SpecError, TrainingError
from ml_loop.files import sha256_file
from ml_loop.spec import PipelineSpec, RunConfig, load_spec

REPO_ROOT = Path(__file__).resolve().parents[2]


def write_snapshot(
    root: Path,
    dataset: str,
    x: np.ndarray,
    y: np.ndarray,
    split: np.ndarray,
    *,
    version: str | None = None,
    source_partitions: list[dict] | None = None,
) -> Path:
    """Write a snapshot folder in the store step's layout; return its path."""
    version = version or uuid.uuid4().hex
    folder = root / "snapshots" / dataset / version
    folder.mkdir(parents=True)
    ids = np.array([f"{dataset}-{i:04d}" for i in range(len(x))])
    np.savez(
        folder / "data.npz",
        x=x.astype(np.float32),
        y=y.astype(np.int64),
        ids=ids,
        split=split.astype(np.uint8),
    )
    train_x = x[split == train.SPLIT_TRAIN] if (split == train.SPLIT_TRAIN).any() else x
    axes = (0, 2, 3) if x.ndim == 4 else 0
    manifest = {
        "version_id": version,
        "dataset": dataset,
        "stats": {
            "mean": np.atleast_1d(train_x.mean(axis=axes)).tolist(),
            "std": np.atleast_1d(train_x.std(axis=axes)).tolist(),
        },
        "counts": {"rows": len(x)},
        "source_partitions": source_partitions or [],
        "data_sha256": sha256_file(folder / "data.npz"),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def split_codes(rows: int) -> np.ndarray:
    """Return split codes with about 70% train, 15% validation and 15% test."""
    codes = np.zeros(rows, dtype=np.uint8)
    codes[int(rows * 0.7) : int(rows * 0.85)] = train.SPLIT_VALIDATION
    codes[int(rows * 0.85) :] = train.SPLIT_TEST
    return codes


def image_data(rows: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return 28x28 images whose bright quadrant gives one of 4 classes (of the 10 digits)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, rows)
    x = rng.uniform(0, 0.2, (rows, 1, 28, 28))
    for i, label in enumerate(y):
        row, column = divmod(int(label), 2)
        x[i, 0, row * 14 : row * 14 + 14, column * 14 : column * 14 + 14] += 0.7
    return x, y


def tabular_data(rows: int = 160, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return 30 uniform features; the class is whether feature 0 exceeds 0.5."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (rows, 30))
    return x, (x[:, 0] > 0.5).astype(np.int64)


def unique_spec(name: str) -> PipelineSpec:
    """Load a shipped spec under a fresh name, so each test has its own experiment."""
    spec = load_spec(name)
    suffix = uuid.uuid4().hex[:8]
    return dataclasses.replace(
        spec, name=f"test-{name}-{suffix}", model_name=f"test-{name}-{suffix}"
    )


def run_config(spec: PipelineSpec, **overrides) -> RunConfig:
    return RunConfig.from_params(spec, {"epochs": 2, "batch_size": 16, **overrides})


def write_spec_file(spec: PipelineSpec, path: Path) -> Path:
    """Write the spec's YAML under its test name, for code that loads a spec by path."""
    raw = yaml.safe_load(spec.source_path.read_text())
    raw["name"] = spec.name
    raw["model_name"] = spec.model_name
    path.write_text(yaml.safe_dump(raw))
    return path


def subprocess_env(tracking_uri: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT / "include"),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }


@pytest.fixture(scope="module")
def trained(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train the CNN once for 2 epochs; the tests below inspect the run it logged."""
    root = tmp_path_factory.mktemp("train-data")
    report = root / "report.html"
    report.write_text("<html><body>validation report</body></html>")
    spec = unique_spec("digits")
    x, y = image_data()
    snapshot = write_snapshot(
        root,
        spec.dataset.name,
        x,
        y,
        split_codes(len(x)),
        source_partitions=[{"partition_date": "2026-11-01", "report_uri": str(report)}],
    )
    config = run_config(spec)
    result = train.train_model(
        spec,
        snapshot,
        config,
        root=root,
        run_tags={"airflow.dag_id": "train_digits", "airflow.run_id": "manual__1"},
        tracking_uri=mlflow_server,
    )
    run = MlflowClient(tracking_uri=mlflow_server).get_run(result.run_id)
    return {
        "spec": spec,
        "snapshot": snapshot,
        "config": config,
        "root": root,
        "result": result,
        "run": run,
        "x": x,
    }


def test_class_weights_inverse_frequency() -> None:
    weights = train.class_weights(np.array([0, 0, 0, 1]), num_classes=2)
    assert torch.allclose(weights, torch.tensor([4 / 6, 2.0]))


def test_class_weights_missing_class() -> None:
    weights = train.class_weights(np.array([0, 0, 2]), num_classes=4)
    assert torch.isfinite(weights).all()
    assert weights[1] == 0
    assert weights[3] == 0
    assert weights[0] > 0


def test_class_weights_no_rows() -> None:
    weights = train.class_weights(np.array([], dtype=np.int64), num_classes=3)
    assert torch.equal(weights, torch.zeros(3))


def test_train_key_ignores_promotion() -> None:
    spec = load_spec("digits")
    config = RunConfig.from_params(spec, None)
    promoted = dataclasses.replace(config, force_promote=True)
    assert train.compute_train_key(spec, "v1", config) == train.compute_train_key(
        spec, "v1", promoted
    )


def test_train_key_changes_with_inputs() -> None:
    spec = load_spec("digits")
    config = RunConfig.from_params(spec, None)
    key = train.compute_train_key(spec, "v1", config)
    assert key != train.compute_train_key(spec, "v2", config)
    assert key != train.compute_train_key(spec, "v1", dataclasses.replace(config, seed=1))
    assert key != train.compute_train_key(dataclasses.replace(spec, name="other"), "v1", config)


def test_snapshot_load_missing_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        train.Snapshot.load(tmp_path / "absent")


def test_snapshot_load_bad_split_code(tmp_path) -> None:
    x, y = tabular_data(10)
    folder = write_snapshot(tmp_path, "breast_cancer", x, y, np.full(10, 7))
    with pytest.raises(MlLoopError, match="split codes"):
        train.Snapshot.load(folder)


def test_snapshot_load_changed_data(tmp_path) -> None:
    x, y = tabular_data(10)
    folder = write_snapshot(tmp_path, "breast_cancer", x, y, split_codes(10))
    np.savez(folder / "data.npz", x=x[:5], y=y[:5], ids=np.arange(5).astype(str), split=y[:5])
    with pytest.raises(DataValidationError, match="SHA-256"):
        train.Snapshot.load(folder)


def test_snapshot_load_splits(tmp_path) -> None:
    x, y = tabular_data(20)
    folder = write_snapshot(tmp_path, "breast_cancer", x, y, split_codes(20), version="v7")
    snapshot = train.Snapshot.load(folder)
    x_test, y_test, ids_test = snapshot.subset(train.SPLIT_TEST)
    assert snapshot.version_id == "v7"
    assert x_test.dtype == np.float32
    assert np.array_equal(y_test, y[17:])
    assert list(ids_test) == ["breast_cancer-0017", "breast_cancer-0018", "breast_cancer-0019"]


@pytest.mark.mlflow
def test_train_logs_params(trained) -> None:
    params = trained["run"].data.params
    config = trained["config"]
    assert params["epochs"] == str(config.epochs)
    assert params["learning_rate"] == str(config.learning_rate)
    assert params["batch_size"] == str(config.batch_size)
    assert params["seed"] == str(config.seed)
    assert params["model_family"] == "cnn"
    assert params["model_channels"] == "[32, 64]"
    assert params["spec_digest"] == trained["spec"].digest()
    assert params["snapshot_version"] == trained["snapshot"].name


@pytest.mark.mlflow
def test_train_logs_metrics_per_epoch(trained, mlflow_server) -> None:
    client = MlflowClient(tracking_uri=mlflow_server)
    for name in train.EPOCH_METRICS:
        history = client.get_metric_history(trained["result"].run_id, name)
        assert sorted(metric.step for metric in history) == [1, 2], name


@pytest.mark.mlflow
def test_train_sets_tags(trained) -> None:
    tags = trained["run"].data.tags
    result = trained["result"]
    assert tags[train.TRAIN_KEY_TAG] == result.train_key
    assert tags[train.SNAPSHOT_VERSION_TAG] == trained["snapshot"].name
    assert tags[train.SPEC_TAG] == trained["spec"].name
    assert tags[train.SPEC_DIGEST_TAG] == trained["spec"].digest()
    assert tags[train.DEVICE_TAG] == result.device
    assert tags[train.RESUMED_FROM_EPOCH_TAG] == "0"
    assert tags[models.WEIGHTS_SHA_TAG] == result.weights_sha256
    assert tags["airflow.dag_id"] == "train_digits"
    assert tags["airflow.run_id"] == "manual__1"


@pytest.mark.mlflow
def test_train_logs_dataset_input(trained) -> None:
    (dataset_input,) = trained["run"].inputs.dataset_inputs
    context = {tag.key: tag.value for tag in dataset_input.tags}["mlflow.data.context"]
    assert dataset_input.dataset.digest == trained["snapshot"].name
    assert str(trained["snapshot"]) in dataset_input.dataset.source
    assert context == "training"


@pytest.mark.mlflow
def test_train_logs_artifacts(trained, mlflow_server) -> None:
    client = MlflowClient(tracking_uri=mlflow_server)
    run_id = trained["result"].run_id
    weights = {item.path for item in client.list_artifacts(run_id, "weights")}
    reports = {item.path for item in client.list_artifacts(run_id, "validation/2026-11-01")}
    plots = {item.path for item in client.list_artifacts(run_id, "plots")}
    assert weights == {"weights/state_dict.pt", "weights/model.json"}
    assert reports == {"validation/2026-11-01/report.html"}
    assert plots == {train.LEARNING_CURVE_ARTIFACT}
    assert trained["run"].data.tags[train.VALIDATION_REPORTS_TAG].endswith("/validation")


@pytest.mark.mlflow
def test_train_weights_verified(trained, mlflow_server) -> None:
    result = trained["result"]
    model, config = models.load_run_model(
        result.run_id, result.weights_sha256, tracking_uri=mlflow_server
    )
    assert config["classes"] == list(trained["spec"].dataset.classes)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.mlflow
def test_pyfunc_predicts_batch_of_five(trained) -> None:
    pyfunc_model = mlflow.pyfunc.load_model(trained["result"].model_uri)
    batch = trained["x"][:5].astype(np.float32)
    predictions = np.asarray(pyfunc_model.predict(batch))
    assert predictions.shape == (5, 10)
    assert np.isfinite(predictions).all()


@pytest.mark.mlflow
def test_pyfunc_matches_weights(trained, mlflow_server) -> None:
    result = trained["result"]
    model, _ = models.load_run_model(
        result.run_id, result.weights_sha256, tracking_uri=mlflow_server
    )
    batch = trained["x"][:5].astype(np.float32)
    expected = model(torch.from_numpy(batch)).detach().numpy()
    predictions = np.asarray(mlflow.pyfunc.load_model(result.model_uri).predict(batch))
    assert np.allclose(predictions, expected, atol=1e-5)


@pytest.mark.mlflow
def test_train_result_metrics(trained) -> None:
    metrics = trained["result"].metrics
    assert set(metrics) == set(train.EPOCH_METRICS)
    assert 0 <= metrics["train_accuracy"] <= 1


@pytest.mark.mlflow
def test_train_removes_checkpoint(trained) -> None:
    checkpoint_dir = trained["root"] / "checkpoints" / trained["result"].train_key
    assert not checkpoint_dir.exists()


@pytest.mark.mlflow
def test_train_rerun_returns_same_run(trained, mlflow_server) -> None:
    rerun = train.train_model(
        trained["spec"],
        trained["snapshot"],
        trained["config"],
        root=trained["root"],
        tracking_uri=mlflow_server,
    )
    runs = MlflowClient(tracking_uri=mlflow_server).search_runs([trained["result"].experiment_id])
    assert rerun == trained["result"]
    assert len(runs) == 1


@pytest.mark.mlflow
def test_train_result_roundtrip(trained) -> None:
    result = trained["result"]
    assert train.TrainResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


@pytest.mark.mlflow
def test_train_rejects_other_dataset(mlflow_tracking, tmp_path) -> None:
    x, y = tabular_data(20)
    snapshot = write_snapshot(tmp_path, "breast_cancer", x, y, split_codes(20))
    spec = unique_spec("digits")
    with pytest.raises(MlLoopError, match="'breast_cancer'"):
        train.train_model(spec, snapshot, run_config(spec), root=tmp_path)


@pytest.mark.mlflow
def test_train_rejects_empty_train_split(mlflow_tracking, tmp_path) -> None:
    x, y = tabular_data(20)
    snapshot = write_snapshot(tmp_path, "breast_cancer", x, y, np.full(20, train.SPLIT_TEST))
    spec = unique_spec("breast_cancer")
    with pytest.raises(TrainingError, match="no rows in the train split"):
        train.train_model(spec, snapshot, run_config(spec), root=tmp_path)


@pytest.mark.mlflow
def test_train_non_finite_loss(mlflow_tracking, tmp_path) -> None:
    x, y = tabular_data(160)
    x[:, 3] = np.nan
    snapshot = write_snapshot(tmp_path, "breast_cancer", x, y, split_codes(160))
    spec = unique_spec("breast_cancer")
    client = MlflowClient()

    with pytest.raises(TrainingError, match=r"at epoch 1, batch 1 of 7") as excinfo:
        train.train_model(spec, snapshot, run_config(spec), root=tmp_path)

    experiment = client.get_experiment_by_name(spec.name)
    (run,) = client.search_runs([experiment.experiment_id])
    assert "not finite" in str(excinfo.value)
    assert run.info.status == "FAILED"
    assert models.WEIGHTS_SHA_TAG not in run.data.tags
    assert client.list_artifacts(run.info.run_id, "weights") == []
    assert client.search_logged_models([experiment.experiment_id]) == []
    assert not (tmp_path / "checkpoints").exists()


KILL_AFTER_EPOCH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from ml_loop.spec import RunConfig, load_spec
    from ml_loop.train import train_model

    spec = load_spec(sys.argv[1])
    config = RunConfig.from_params(spec, {"epochs": 3, "batch_size": 16})

    def kill_after_first_epoch(epoch, metrics):
        if epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    train_model(spec, sys.argv[2], config, root=sys.argv[3], on_epoch_end=kill_after_first_epoch)
    """
)


@pytest.mark.mlflow
def test_train_resumes_after_kill(mlflow_tracking, tmp_path) -> None:
    spec = load_spec(write_spec_file(unique_spec("breast_cancer"), tmp_path / "spec.yaml"))
    x, y = tabular_data(160)
    snapshot = write_snapshot(tmp_path, spec.dataset.name, x, y, split_codes(160))
    config = RunConfig.from_params(spec, {"epochs": 3, "batch_size": 16})
    key = train.compute_train_key(spec, snapshot.name, config)
    client = MlflowClient()

    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_EPOCH_SCRIPT, str(spec.source_path), snapshot, tmp_path],
        env=subprocess_env(mlflow_tracking),
        capture_output=True,
        text=True,
        timeout=300,
    )
    experiment_id = client.get_experiment_by_name(spec.name).experiment_id
    (killed_run,) = client.search_runs([experiment_id])
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert killed_run.info.status == "RUNNING"
    assert (tmp_path / "checkpoints" / key / train.CHECKPOINT_FILE).is_file()

    epochs_run = []
    result = train.train_model(
        spec,
        snapshot,
        config,
        root=tmp_path,
        on_epoch_end=lambda epoch, metrics: epochs_run.append(epoch),
    )

    resumed_run = client.get_run(result.run_id)
    history = client.get_metric_history(result.run_id, "train_loss")
    assert result.resumed_from_epoch == 1
    assert epochs_run == [2, 3]
    assert result.run_id != killed_run.info.run_id
    assert client.get_run(killed_run.info.run_id).info.status == "FAILED"
    assert resumed_run.info.status == "FINISHED"
    assert resumed_run.data.tags[train.RESUMED_FROM_EPOCH_TAG] == "1"
    assert resumed_run.data.tags[train.RESUMED_FROM_RUN_TAG] == killed_run.info.run_id
    assert sorted(metric.step for metric in history) == [1, 2, 3]


@pytest.mark.mlflow
def test_resume_matches_uninterrupted(mlflow_tracking, tmp_path) -> None:
    spec = unique_spec("breast_cancer")
    x, y = tabular_data(160)
    snapshot = write_snapshot(tmp_path, spec.dataset.name, x, y, split_codes(160))
    config = run_config(spec, epochs=3)

    class Interrupted(Exception):
        pass

    def interrupt_after_first_epoch(epoch, metrics):
        if epoch == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        train.train_model(
            spec, snapshot, config, root=tmp_path, on_epoch_end=interrupt_after_first_epoch
        )
    resumed = train.train_model(spec, snapshot, config, root=tmp_path)
    # Another spec name gives another train key, so this run starts from scratch.
    whole_spec = dataclasses.replace(spec, name=f"{spec.name}-whole")
    whole = train.train_model(whole_spec, snapshot, config, root=tmp_path)

    resumed_model, _ = models.load_run_model(resumed.run_id, resumed.weights_sha256)
    whole_model, _ = models.load_run_model(whole.run_id, whole.weights_sha256)
    assert resumed.resumed_from_epoch == 1
    assert whole.resumed_from_epoch == 0
    assert resumed.metrics == whole.metrics
    for name, tensor in whole_model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], tensor), name


@pytest.mark.mlflow
def test_cli_prints_result_last(mlflow_tracking, tmp_path) -> None:
    spec = load_spec(write_spec_file(unique_spec("breast_cancer"), tmp_path / "spec.yaml"))
    x, y = tabular_data(100)
    snapshot = write_snapshot(tmp_path, spec.dataset.name, x, y, split_codes(100))
    result_file = tmp_path / "result.json"
    command = [
        sys.executable,
        "-m",
        "ml_loop.train",
        "--spec",
        str(spec.source_path),
        "--snapshot-uri",
        str(snapshot),
        "--epochs",
        "1",
        "--learning-rate",
        "0.01",
        "--batch-size",
        "32",
        "--seed",
        "3",
        "--run-tag",
        "airflow.dag_id=train_breast_cancer",
        "--data-dir",
        str(tmp_path),
        "--result-file",
        str(result_file),
    ]

    completed = subprocess.run(
        command, env=subprocess_env(mlflow_tracking), capture_output=True, text=True, timeout=300
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    printed = json.loads(completed.stdout.strip().splitlines()[-1])
    run = MlflowClient().get_run(printed["run_id"])
    assert printed == json.loads(result_file.read_text())
    assert printed["resumed_from_epoch"] == 0
    assert run.data.params["seed"] == "3"
    assert run.data.params["learning_rate"] == "0.01"
    assert run.data.tags["airflow.dag_id"] == "train_breast_cancer"


def test_cli_rejects_bad_run_tag(capsys) -> None:
    with pytest.raises(SystemExit) as excinfo:
        train.main(["--spec", "digits", "--snapshot-uri", "x", "--run-tag", "no-separator"])
    assert excinfo.value.code == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


@pytest.mark.mlflow
def test_train_records_device(trained) -> None:
    tags = trained["run"].data.tags
    assert tags[train.TRAIN_BACKEND_TAG] == "local"
    assert tags[train.WORLD_SIZE_TAG] == "1"
    assert tags["ml_loop.device_name"] == devices.cpu_model_name()
    assert tags["ml_loop.device_count"] == "1"
    assert tags["ml_loop.cuda_version"] == (torch.version.cuda or "none")
    assert tags["ml_loop.torch_version"] == torch.__version__
    assert tags["ml_loop.precision"] == "fp32"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
@pytest.mark.mlflow
def test_train_gpus_without_gpu(mlflow_tracking, tmp_path) -> None:
    spec = unique_spec("digits")
    # The snapshot does not exist: the GPU check must fail before anything reads it.
    with pytest.raises(devices.GpuUnavailableError, match=r"^no GPU visible in the container"):
        train.train_model(spec, tmp_path / "absent", run_config(spec), root=tmp_path, gpus=1)
    assert MlflowClient().get_experiment_by_name(spec.name) is None


@pytest.mark.mlflow
def test_train_rejects_unknown_backend(mlflow_tracking, tmp_path) -> None:
    spec = unique_spec("digits")
    with pytest.raises(SpecError, match="slurm"):
        train.train_model(
            spec, tmp_path / "absent", run_config(spec), root=tmp_path, backend="slurm"
        )
    assert MlflowClient().get_experiment_by_name(spec.name) is None


@pytest.mark.mlflow
def test_train_rejects_negative_workers(mlflow_tracking, tmp_path) -> None:
    spec = unique_spec("digits")
    with pytest.raises(SpecError, match="dataloader_workers=-1"):
        train.train_model(
            spec, tmp_path / "absent", run_config(spec), root=tmp_path, dataloader_workers=-1
        )


@pytest.mark.mlflow
def test_train_shared_memory_too_small(mlflow_tracking, tmp_path) -> None:
    spec = unique_spec("digits")
    config = run_config(spec, batch_size=65536)
    batch_bytes = 65536 * (4 * 28 * 28 + 8)
    stats = os.statvfs(devices.SHARED_MEMORY_PATH)
    free = stats.f_bavail * stats.f_frsize
    # Enough workers that the estimate is twice the free space of /dev/shm on this host.
    per_worker = devices.shared_memory_estimate(1, batch_bytes)
    workers = 2 * free // per_worker + 1
    with pytest.raises(devices.SharedMemoryError, match="/dev/shm is too small"):
        train.train_model(
            spec, tmp_path / "absent", config, root=tmp_path, dataloader_workers=workers
        )
    assert MlflowClient().get_experiment_by_name(spec.name) is None


@pytest.mark.mlflow
def test_train_dataloader_workers(mlflow_tracking, tmp_path) -> None:
    spec = unique_spec("breast_cancer")
    x, y = tabular_data(160)
    snapshot = write_snapshot(tmp_path, spec.dataset.name, x, y, split_codes(160))
    config = run_config(spec, epochs=3)

    loaded = train.train_model(spec, snapshot, config, root=tmp_path, dataloader_workers=2)
    # Another spec name gives another train key, so this run trains again without workers.
    in_memory_spec = dataclasses.replace(spec, name=f"{spec.name}-in-memory")
    in_memory = train.train_model(
        in_memory_spec, snapshot, config, root=tmp_path, dataloader_workers=0
    )

    assert set(loaded.metrics) == set(train.EPOCH_METRICS)
    assert all(np.isfinite(value) for value in loaded.metrics.values())
    assert MlflowClient().get_run(loaded.run_id).info.status == "FINISHED"
    # The loader yields the same batches in the same order, so the runs match exactly.
    assert loaded.metrics == in_memory.metrics
    assert loaded.weights_sha256 == in_memory.weights_sha256


def test_shard_equal_shares() -> None:
    order = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    shares = [train._shard(order, rank, 3) for rank in range(3)]
    assert [len(share) for share in shares] == [4, 4, 4]
    assert set(torch.cat(shares).tolist()) == set(range(11))
    assert torch.equal(torch.cat(shares).sort().values[:11], torch.arange(11))


def test_shard_fewer_rows_than_processes() -> None:
    shares = [train._shard(torch.tensor([5]), rank, 2) for rank in range(2)]
    assert [share.tolist() for share in shares] == [[5], [5]]


def test_cli_rejects_bad_gpus(capsys) -> None:
    with pytest.raises(SystemExit) as excinfo:
        train.main(["--spec", "digits", "--snapshot-uri", "x", "--gpus", "-2"])
    assert excinfo.value.code == 2
    assert "expected an integer of at least -1" in capsys.readouterr().err


def test_cli_rejects_bad_workers(capsys) -> None:
    with pytest.raises(SystemExit) as excinfo:
        train.main(["--spec", "digits", "--snapshot-uri", "x", "--dataloader-workers", "two"])
    assert excinfo.value.code == 2
    assert "expected an integer of at least 0" in capsys.readouterr().err


def test_cli_rejects_bad_backend(capsys) -> None:
    with pytest.raises(SystemExit) as excinfo:
        train.main(["--spec", "digits", "--snapshot-uri", "x", "--backend", "slurm"])
    assert excinfo.value.code == 2
    assert "invalid choice: 'slurm'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_cli_gpus_without_gpu(tmp_path) -> None:
    request = {"backend": "docker", "device_requests": [{"count": 1, "capabilities": [["gpu"]]}]}
    env = {
        **subprocess_env("http://127.0.0.1:9"),
        devices.DEVICE_REQUEST_ENV: json.dumps(request),
        "NVIDIA_VISIBLE_DEVICES": "all",
    }
    command = [
        sys.executable,
        "-m",
        "ml_loop.train",
        "--spec",
        "digits",
        "--snapshot-uri",
        str(tmp_path / "absent"),
        "--gpus",
        "1",
    ]

    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    assert completed.returncode == 1
    assert "GpuUnavailableError: no GPU visible in the container" in completed.stderr
    assert '"backend": "docker"' in completed.stderr
    assert "NVIDIA_VISIBLE_DEVICES='all'" in completed.stderr
    assert completed.stdout == ""


def torchrun_command(spec: PipelineSpec, snapshot: Path, root: Path, *extra: str) -> list[str]:
    return [
        str(Path(sys.executable).with_name("torchrun")),
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "-m",
        "ml_loop.train",
        "--spec",
        str(spec.source_path),
        "--snapshot-uri",
        str(snapshot),
        "--data-dir",
        str(root),
        *extra,
    ]


def json_lines(text: str) -> list[dict]:
    """Return the lines of ``text`` that are JSON objects."""
    objects = []
    for line in text.splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            objects.append(value)
    return objects


def torchrun_env(tracking_uri: str) -> dict[str, str]:
    return {**subprocess_env(tracking_uri), "OMP_NUM_THREADS": "1"}


@pytest.mark.mlflow
def test_torchrun_two_processes(mlflow_tracking, tmp_path) -> None:
    spec = load_spec(write_spec_file(unique_spec("digits"), tmp_path / "spec.yaml"))
    x, y = image_data(120)
    snapshot = write_snapshot(tmp_path, spec.dataset.name, x, y, split_codes(120))
    command = torchrun_command(
        spec, snapshot, tmp_path, "--epochs", "2", "--batch-size", "16", "--backend", "docker"
    )
    client = MlflowClient()

    completed = subprocess.run(
        command, env=torchrun_env(mlflow_tracking), capture_output=True, text=True, timeout=300
    )

    assert completed.returncode == 0, completed.stderr[-4000:]
    printed = json_lines(completed.stdout)
    last = json.loads(completed.stdout.strip().splitlines()[-1])
    experiment_id = client.get_experiment_by_name(spec.name).experiment_id
    (run,) = client.search_runs(
        [experiment_id], filter_string=f"tags.`{train.TRAIN_KEY_TAG}` = '{last['train_key']}'"
    )
    history = client.get_metric_history(run.info.run_id, "train_loss")
    # Rank 1 prints nothing on stdout, so rank 0's result is the only JSON line.
    assert printed == [last]
    assert train.TrainResult.from_dict(last).run_id == run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.tags[train.WORLD_SIZE_TAG] == "2"
    assert run.data.tags[train.TRAIN_BACKEND_TAG] == "docker"
    assert run.data.tags[train.DEVICE_TAG] == "cpu"
    assert sorted(metric.step for metric in history) == [1, 2]
    assert all(np.isfinite(value) for value in last["metrics"].values())
    assert not (tmp_path / "checkpoints" / last["train_key"]).exists()
    model, _ = models.load_run_model(run.info.run_id, last["weights_sha256"])
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)

    rerun = subprocess.run(
        command, env=torchrun_env(mlflow_tracking), capture_output=True, text=True, timeout=300
    )

    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert json_lines(rerun.stdout) == [last]
    assert len(client.search_runs([experiment_id])) == 1


@pytest.mark.mlflow
def test_torchrun_resumes_checkpoint(mlflow_tracking, tmp_path) -> None:
    spec = load_spec(write_spec_file(unique_spec("breast_cancer"), tmp_path / "spec.yaml"))
    x, y = tabular_data(160)
    snapshot = write_snapshot(tmp_path, spec.dataset.name, x, y, split_codes(160))
    config = run_config(spec, epochs=3)

    class Interrupted(Exception):
        pass

    def interrupt_after_first_epoch(epoch, metrics):
        if epoch == 1:
            raise Interrupted

    # One process writes the checkpoint of epoch 1; two processes resume from it.
    with pytest.raises(Interrupted):
        train.train_model(
            spec, snapshot, config, root=tmp_path, on_epoch_end=interrupt_after_first_epoch
        )
    command = torchrun_command(spec, snapshot, tmp_path, "--epochs", "3", "--batch-size", "16")
    completed = subprocess.run(
        command, env=torchrun_env(mlflow_tracking), capture_output=True, text=True, timeout=300
    )

    assert completed.returncode == 0, completed.stderr[-4000:]
    result = train.TrainResult.from_dict(json.loads(completed.stdout.strip().splitlines()[-1]))
    run = MlflowClient().get_run(result.run_id)
    history = MlflowClient().get_metric_history(result.run_id, "val_loss")
    assert result.resumed_from_epoch == 1
    assert run.data.tags[train.WORLD_SIZE_TAG] == "2"
    assert sorted(metric.step for metric in history) == [1, 2, 3]


@pytest.mark.mlflow
def test_torchrun_non_finite_loss(mlflow_tracking, tmp_path) -> None:
    spec = load_spec(write_spec_file(unique_spec("breast_cancer"), tmp_path / "spec.yaml"))
    x, y = tabular_data(160)
    x[:5, 3] = np.nan
    snapshot = write_snapshot(tmp_path, spec.dataset.name, x, y, split_codes(160))
    command = torchrun_command(spec, snapshot, tmp_path, "--epochs", "2", "--batch-size", "16")

    completed = subprocess.run(
        command, env=torchrun_env(mlflow_tracking), capture_output=True, text=True, timeout=300
    )

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(spec.name).experiment_id])
    # Every process stops on the all-reduced check, so none waits for the other.
    assert completed.returncode != 0
    assert completed.stderr.count("training loss is") >= 2
    assert run.info.status == "FAILED"
    assert models.WEIGHTS_SHA_TAG not in run.data.tags
    assert json_lines(completed.stdout) == []


@pytest.mark.mlflow
def test_torchrun_rank_zero_error(mlflow_tracking, tmp_path) -> None:
    spec = load_spec(write_spec_file(unique_spec("breast_cancer"), tmp_path / "spec.yaml"))
    x, y = tabular_data(160)
    snapshot = write_snapshot(tmp_path, spec.dataset.name, x, y, split_codes(160))
    config = RunConfig.from_params(spec, {"epochs": 1, "batch_size": 16})
    key = train.compute_train_key(spec, snapshot.name, config)
    client = MlflowClient()
    # A FINISHED run of the key without ml_loop.train's tags makes rank 0 raise at the start.
    experiment_id = client.create_experiment(spec.name)
    foreign = client.create_run(experiment_id, tags={train.TRAIN_KEY_TAG: key})
    client.set_terminated(foreign.info.run_id, status="FINISHED")
    command = torchrun_command(spec, snapshot, tmp_path, "--epochs", "1", "--batch-size", "16")

    completed = subprocess.run(
        command, env=torchrun_env(mlflow_tracking), capture_output=True, text=True, timeout=300
    )

    assert completed.returncode != 0
    assert "lacks the tags" in completed.stderr
    assert "rank 0 failed while looking up earlier runs of the train key" in completed.stderr
    assert len(client.search_runs([experiment_id])) == 1
