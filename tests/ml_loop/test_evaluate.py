"""Tests for scoring and gating a candidate against a real MLflow server and registry."""

from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from ml_loop import models, train
from ml_loop.errors import MlLoopError
from ml_loop.evaluate import Evaluation, classification_scores, decide_gate, evaluate_candidate
from ml_loop.files import sha256_file
from ml_loop.spec import GateSpec, PipelineSpec, RunConfig, load_spec


def write_snapshot(root: Path, x: np.ndarray, y: np.ndarray, split: np.ndarray) -> Path:
    """Write a breast_cancer snapshot folder in the store step's layout; return its path."""
    version = uuid.uuid4().hex
    folder = root / "snapshots" / "breast_cancer" / version
    folder.mkdir(parents=True)
    ids = np.array([f"row-{i:04d}" for i in range(len(x))])
    np.savez(
        folder / "data.npz",
        x=x.astype(np.float32),
        y=y.astype(np.int64),
        ids=ids,
        split=split.astype(np.uint8),
    )
    train_x = x[split == train.SPLIT_TRAIN]
    manifest = {
        "version_id": version,
        "dataset": "breast_cancer",
        "stats": {"mean": train_x.mean(axis=0).tolist(), "std": train_x.std(axis=0).tolist()},
        "counts": {"rows": len(x)},
        "source_partitions": [],
        "data_sha256": sha256_file(folder / "data.npz"),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def separable_data(rows: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return 30 uniform features, labels ``feature 0 > 0.5`` and 70/15/15 split codes."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (rows, 30))
    split = np.zeros(rows, dtype=np.uint8)
    split[int(rows * 0.7) : int(rows * 0.85)] = train.SPLIT_VALIDATION
    split[int(rows * 0.85) :] = train.SPLIT_TEST
    return x, (x[:, 0] > 0.5).astype(np.int64), split


def fresh_spec(spec: PipelineSpec, **gate) -> PipelineSpec:
    """Return the spec with a model name of its own, so each test has its own registry entry."""
    return dataclasses.replace(
        spec,
        model_name=f"test-evaluate-{uuid.uuid4().hex[:8]}",
        gate=dataclasses.replace(spec.gate, **gate),
    )


def register_champion(
    client: MlflowClient, model_name: str, result: dict, *, tag_sha: bool = True
) -> str:
    """Register the run's model as a new version with alias ``champion``; return the version."""
    client.create_registered_model(model_name)
    version = client.create_model_version(
        model_name,
        source=result["model_uri"],
        run_id=result["run_id"],
        model_id=result["model_uri"].removeprefix("models:/"),
    )
    if tag_sha:
        client.set_model_version_tag(
            model_name, version.version, models.WEIGHTS_SHA_TAG, result["weights_sha256"]
        )
    client.set_registered_model_alias(model_name, "champion", version.version)
    return version.version


@pytest.fixture(scope="module")
def setup(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Train a strong and a weak candidate once on the same snapshot."""
    root = tmp_path_factory.mktemp("evaluate-data")
    base = load_spec("breast_cancer")
    spec = dataclasses.replace(base, name=f"test-evaluate-{uuid.uuid4().hex[:8]}")
    x, y, split = separable_data()
    snapshot = write_snapshot(root, x, y, split)
    strong_config = RunConfig.from_params(
        spec, {"epochs": 10, "batch_size": 32, "learning_rate": 0.01}
    )
    weak_config = RunConfig.from_params(
        spec, {"epochs": 1, "batch_size": 16, "learning_rate": 1e-6, "seed": 11}
    )
    strong = train.train_model(spec, snapshot, strong_config, root=root, tracking_uri=mlflow_server)
    weak = train.train_model(spec, snapshot, weak_config, root=root, tracking_uri=mlflow_server)
    return {
        "spec": spec,
        "root": root,
        "snapshot": snapshot,
        "strong": strong.to_dict(),
        "weak": weak.to_dict(),
        "y_test": y[split == train.SPLIT_TEST],
    }


def test_scores_missing_class() -> None:
    scores = classification_scores(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), ["a", "b", "c"])
    assert scores["accuracy"] == 0.75
    assert scores["per_class_recall"] == {"a": 0.5, "b": 1.0, "c": None}
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_scores_empty_split() -> None:
    with pytest.raises(MlLoopError, match="empty test split"):
        classification_scores(np.array([], dtype=int), np.array([], dtype=int), ["a"])


def test_gate_tie_at_regression_bound() -> None:
    gate = GateSpec(min_accuracy=0.5, max_regression=0.01)
    passed, reasons = decide_gate(gate, {"accuracy": 0.95}, {"accuracy": 0.96}, "4", model_name="m")
    assert passed
    assert "champion version 4 accuracy 0.9600" in reasons[1]


def test_gate_regression_below_bound() -> None:
    gate = GateSpec(min_accuracy=0.5, max_regression=0.01)
    passed, reasons = decide_gate(gate, {"accuracy": 0.94}, {"accuracy": 0.96}, "4", model_name="m")
    assert not passed
    assert "0.9400 is below 0.9500" in reasons[1]


def test_gate_keeps_champion_on_newer_data() -> None:
    gate = GateSpec(min_accuracy=0.5, max_regression=0.01)
    passed, reasons = decide_gate(
        gate,
        {"accuracy": 0.97},
        {"accuracy": 0.96},
        "4",
        model_name="m",
        candidate_window_end="2026-12-02",
        champion_window_end="2026-12-04",
    )
    assert not passed
    assert "before the champion's 2026-12-04" in reasons[-1]


def test_gate_accepts_same_data_end() -> None:
    gate = GateSpec(min_accuracy=0.5, max_regression=0.01)
    passed, reasons = decide_gate(
        gate,
        {"accuracy": 0.97},
        {"accuracy": 0.96},
        "4",
        model_name="m",
        candidate_window_end="2026-12-04",
        champion_window_end="2026-12-04",
    )
    assert passed
    assert "not before the champion's 2026-12-04" in reasons[-1]


@pytest.mark.mlflow
def test_gate_passes_without_champion(setup, mlflow_server) -> None:
    spec = fresh_spec(setup["spec"], min_accuracy=0.9)
    client = MlflowClient(tracking_uri=mlflow_server)

    evaluation = evaluate_candidate(
        spec, setup["snapshot"], setup["strong"], tracking_uri=mlflow_server
    )

    metrics = client.get_run(setup["strong"]["run_id"]).data.metrics
    assert evaluation.passed
    assert evaluation.champion is None
    assert evaluation.champion_version is None
    assert evaluation.candidate["accuracy"] >= 0.9
    assert "meets the floor 0.9000" in evaluation.reasons[0]
    assert "no version with alias 'champion'" in evaluation.reasons[1]
    assert metrics["test_accuracy"] == evaluation.candidate["accuracy"]
    assert metrics["test_macro_f1"] == evaluation.candidate["macro_f1"]
    assert metrics["test_recall_malignant"] == evaluation.candidate["per_class_recall"]["malignant"]
    assert metrics["test_recall_benign"] == evaluation.candidate["per_class_recall"]["benign"]
    assert "champion_test_accuracy" not in metrics


@pytest.mark.mlflow
def test_confusion_matrix_logged(setup, mlflow_server) -> None:
    spec = fresh_spec(setup["spec"])
    evaluation = evaluate_candidate(
        spec, setup["snapshot"], setup["weak"], tracking_uri=mlflow_server
    )
    artifacts = MlflowClient(tracking_uri=mlflow_server).list_artifacts(
        setup["weak"]["run_id"], "evaluation"
    )
    assert [item.path for item in artifacts] == ["evaluation/confusion_matrix.png"]
    assert evaluation.confusion_uri.endswith(
        f"{setup['weak']['run_id']}/artifacts/evaluation/confusion_matrix.png"
    )


@pytest.mark.mlflow
def test_smoke_samples_sorted(setup, mlflow_server) -> None:
    spec = fresh_spec(setup["spec"])
    evaluation = evaluate_candidate(
        spec, setup["snapshot"], setup["strong"], tracking_uri=mlflow_server
    )
    ids = [sample["id"] for sample in evaluation.smoke_samples]
    assert len(ids) == min(16, len(setup["y_test"]))
    assert ids == sorted(ids)
    assert {sample["prediction"] for sample in evaluation.smoke_samples} <= {"malignant", "benign"}


@pytest.mark.mlflow
def test_gate_fails_by_floor(setup, mlflow_server) -> None:
    spec = fresh_spec(setup["spec"], min_accuracy=0.9)
    evaluation = evaluate_candidate(
        spec, setup["snapshot"], setup["weak"], tracking_uri=mlflow_server
    )
    assert evaluation.candidate["accuracy"] < 0.9
    assert not evaluation.passed
    assert "is below the floor 0.9000" in evaluation.reasons[0]


@pytest.mark.mlflow
def test_gate_fails_by_regression(setup, mlflow_server) -> None:
    spec = fresh_spec(setup["spec"], min_accuracy=0.0, max_regression=0.02)
    client = MlflowClient(tracking_uri=mlflow_server)
    version = register_champion(client, spec.model_name, setup["strong"])

    evaluation = evaluate_candidate(
        spec, setup["snapshot"], setup["weak"], tracking_uri=mlflow_server
    )

    metrics = client.get_run(setup["weak"]["run_id"]).data.metrics
    assert not evaluation.passed
    assert evaluation.champion_version == version
    assert evaluation.champion["accuracy"] > evaluation.candidate["accuracy"] + 0.02
    assert f"champion version {version} accuracy" in evaluation.reasons[1]
    assert "meets the floor" in evaluation.reasons[0]
    assert metrics["champion_test_accuracy"] == evaluation.champion["accuracy"]


@pytest.mark.mlflow
def test_gate_passes_against_weaker_champion(setup, mlflow_server) -> None:
    spec = fresh_spec(setup["spec"], min_accuracy=0.0)
    client = MlflowClient(tracking_uri=mlflow_server)
    register_champion(client, spec.model_name, setup["weak"])
    evaluation = evaluate_candidate(
        spec, setup["snapshot"], setup["strong"], tracking_uri=mlflow_server
    )
    assert evaluation.passed
    assert evaluation.champion["accuracy"] < evaluation.candidate["accuracy"]


@pytest.mark.mlflow
def test_gate_champion_is_candidate(setup, mlflow_server) -> None:
    spec = fresh_spec(setup["spec"], min_accuracy=0.0)
    client = MlflowClient(tracking_uri=mlflow_server)
    register_champion(client, spec.model_name, setup["weak"])
    evaluation = evaluate_candidate(
        spec, setup["snapshot"], setup["weak"], tracking_uri=mlflow_server
    )
    assert evaluation.passed
    assert evaluation.champion == evaluation.candidate
    assert "this candidate's own run" in evaluation.reasons[1]


@pytest.mark.mlflow
def test_registered_model_without_alias(setup, mlflow_server) -> None:
    spec = fresh_spec(setup["spec"])
    MlflowClient(tracking_uri=mlflow_server).create_registered_model(spec.model_name)
    evaluation = evaluate_candidate(
        spec, setup["snapshot"], setup["weak"], tracking_uri=mlflow_server
    )
    assert evaluation.champion is None
    assert evaluation.champion_version is None


@pytest.mark.mlflow
def test_champion_without_sha_tag(setup, mlflow_server) -> None:
    spec = fresh_spec(setup["spec"])
    client = MlflowClient(tracking_uri=mlflow_server)
    register_champion(client, spec.model_name, setup["strong"], tag_sha=False)
    with pytest.raises(models.ModelIntegrityError, match=r"has no ml_loop\.weights_sha256 tag"):
        evaluate_candidate(spec, setup["snapshot"], setup["weak"], tracking_uri=mlflow_server)


@pytest.mark.mlflow
def test_candidate_wrong_sha_raises(setup, mlflow_server) -> None:
    spec = fresh_spec(setup["spec"])
    tampered = {**setup["weak"], "weights_sha256": "0" * 64}
    with pytest.raises(models.ModelIntegrityError):
        evaluate_candidate(spec, setup["snapshot"], tampered, tracking_uri=mlflow_server)


@pytest.mark.mlflow
def test_recall_of_class_missing_from_test(setup, mlflow_server) -> None:
    x, y, split = separable_data()
    split[(split == train.SPLIT_TEST) & (y == 1)] = train.SPLIT_VALIDATION
    snapshot = write_snapshot(setup["root"], x, y, split)
    spec = fresh_spec(setup["spec"])
    client = MlflowClient(tracking_uri=mlflow_server)
    run_id = setup["strong"]["run_id"]

    evaluation = evaluate_candidate(spec, snapshot, setup["strong"], tracking_uri=mlflow_server)

    # All metrics of one evaluation share one timestamp, which identifies this evaluation's batch.
    logged_at = max(
        metric.timestamp for metric in client.get_metric_history(run_id, "test_accuracy")
    )
    malignant = {
        metric.timestamp for metric in client.get_metric_history(run_id, "test_recall_malignant")
    }
    benign = {
        metric.timestamp for metric in client.get_metric_history(run_id, "test_recall_benign")
    }
    assert evaluation.candidate["per_class_recall"]["benign"] is None
    assert evaluation.candidate["per_class_recall"]["malignant"] is not None
    assert "Classes benign have no rows in the test split" in evaluation.reasons[-1]
    assert logged_at in malignant
    assert logged_at not in benign


@pytest.mark.mlflow
def test_evaluate_empty_test_split(setup, mlflow_server) -> None:
    x, y, split = separable_data()
    split[split == train.SPLIT_TEST] = train.SPLIT_VALIDATION
    snapshot = write_snapshot(setup["root"], x, y, split)
    with pytest.raises(MlLoopError, match="no rows in the test split"):
        evaluate_candidate(
            fresh_spec(setup["spec"]), snapshot, setup["weak"], tracking_uri=mlflow_server
        )


@pytest.mark.mlflow
def test_evaluation_roundtrip(setup, mlflow_server) -> None:
    evaluation = evaluate_candidate(
        fresh_spec(setup["spec"]), setup["snapshot"], setup["weak"], tracking_uri=mlflow_server
    )
    assert Evaluation.from_dict(json.loads(json.dumps(evaluation.to_dict()))) == evaluation
