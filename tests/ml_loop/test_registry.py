"""Registry tests against the session's real MLflow server, with runs that hold real weights."""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from ml_loop import models, registry
from ml_loop.errors import MlLoopError

CONFIG = models.model_config(
    "mlp", {"hidden_units": [8]}, [4], ["a", "b", "c"], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 2.0]
)


def log_weights_run(
    tmp_path: Path, seed: int = 0, *, tamper: bool = False
) -> tuple[dict[str, Any], torch.nn.Module]:
    """Log a run with ``weights/`` artifacts and the SHA-256 tag; return a train result and model.

    With ``tamper``, the uploaded state_dict is another model's, while the tag keeps the SHA-256
    of the original, as if the artifact had been replaced after training.
    """
    torch.manual_seed(seed)
    model = models.build_model(CONFIG).eval()
    weights_dir = tmp_path / f"weights-{uuid.uuid4().hex[:8]}"
    sha = models.save_weights(model, CONFIG, weights_dir)
    if tamper:
        torch.manual_seed(seed + 1000)
        models.save_weights(models.build_model(CONFIG), CONFIG, weights_dir)
    client = MlflowClient()
    run_id = client.create_run("0").info.run_id
    client.log_artifacts(run_id, str(weights_dir), models.WEIGHTS_ARTIFACT_DIR)
    client.set_tag(run_id, models.WEIGHTS_SHA_TAG, sha)
    client.set_terminated(run_id)
    train_result = {
        "run_id": run_id,
        "experiment_id": "0",
        "model_uri": f"runs:/{run_id}/model",
        "weights_sha256": sha,
    }
    return train_result, model


def evaluation(passed: bool, accuracy: float = 0.95, champion_version: str | None = None) -> dict:
    champion = {"accuracy": 0.93, "macro_f1": 0.92} if champion_version else None
    return {
        "candidate": {"accuracy": accuracy, "macro_f1": accuracy - 0.01},
        "champion": champion,
        "champion_version": champion_version,
        "passed": passed,
        "reasons": [] if passed else [f"accuracy {accuracy} is below the floor 0.9"],
        "smoke_samples": [],
        "confusion_uri": None,
    }


@pytest.fixture
def model_name(mlflow_tracking: str) -> str:
    return f"reg-{uuid.uuid4().hex[:8]}"


def test_register_first_version_is_champion(model_name: str, tmp_path: Path) -> None:
    train_result, _ = log_weights_run(tmp_path)
    tags = {"airflow.dag_id": "train_digits", "ml_loop.snapshot_version": "v1"}

    reg = registry.register_candidate(model_name, train_result, evaluation(True), tags=tags)

    version = MlflowClient().get_model_version(model_name, reg.version)
    assert reg.version == "1"
    assert reg.run_id == train_result["run_id"]
    assert reg.promoted is True
    assert reg.forced is False
    assert reg.previous_version is None
    assert reg.aliases == ["challenger", "champion"]
    assert version.tags[registry.WEIGHTS_SHA_TAG] == train_result["weights_sha256"]
    assert version.tags[registry.GATE_TAG] == "passed"
    assert version.tags[registry.CANDIDATE_ACCURACY_TAG] == "0.95"
    assert json.loads(version.tags[registry.GATE_REASONS_TAG]) == []
    assert version.tags["airflow.dag_id"] == "train_digits"
    assert version.tags["ml_loop.snapshot_version"] == "v1"


def test_register_twice_one_version(model_name: str, tmp_path: Path) -> None:
    train_result, _ = log_weights_run(tmp_path)

    first = registry.register_candidate(model_name, train_result, evaluation(True))
    second = registry.register_candidate(model_name, train_result, evaluation(True))

    versions = MlflowClient().search_model_versions(f"name = '{model_name}'")
    assert second.version == first.version
    assert len(versions) == 1
    assert second.aliases == ["challenger", "champion"]


def test_rerun_keeps_creation_tags(model_name: str, tmp_path: Path) -> None:
    train_result, _ = log_weights_run(tmp_path)
    first_tags = {"airflow.run_id": "scheduled__2026-12-03", "ml_loop.snapshot_version": "v1"}
    registry.register_candidate(model_name, train_result, evaluation(True), tags=first_tags)

    rerun_tags = {"airflow.run_id": "manual__2026-12-04", "airflow.try_number": "2"}
    reg = registry.register_candidate(model_name, train_result, evaluation(True), tags=rerun_tags)

    tags = MlflowClient().get_model_version(model_name, reg.version).tags
    assert tags["airflow.run_id"] == "scheduled__2026-12-03"
    assert tags["ml_loop.snapshot_version"] == "v1"
    assert tags["airflow.try_number"] == "2"


def test_register_passing_moves_champion(model_name: str, tmp_path: Path) -> None:
    first_run, _ = log_weights_run(tmp_path, seed=1)
    second_run, _ = log_weights_run(tmp_path, seed=2)
    registry.register_candidate(model_name, first_run, evaluation(True))

    second = registry.register_candidate(model_name, second_run, evaluation(True, 0.97, "1"))
    rerun = registry.register_candidate(model_name, second_run, evaluation(True, 0.97, "1"))

    aliases = MlflowClient().get_registered_model(model_name).aliases
    assert second.version == "2"
    assert second.previous_version == "1"
    assert aliases == {"challenger": "2", "champion": "2", "previous": "1"}
    assert rerun.version == "2"
    assert rerun.previous_version == "1"


def test_register_failed_gate_keeps_champion(model_name: str, tmp_path: Path) -> None:
    first_run, _ = log_weights_run(tmp_path, seed=1)
    second_run, _ = log_weights_run(tmp_path, seed=2)
    registry.register_candidate(model_name, first_run, evaluation(True))

    second = registry.register_candidate(model_name, second_run, evaluation(False, 0.5, "1"))

    client = MlflowClient()
    aliases = client.get_registered_model(model_name).aliases
    tags = client.get_model_version(model_name, "2").tags
    assert second.promoted is False
    assert second.previous_version is None
    assert second.aliases == ["challenger"]
    assert aliases == {"challenger": "2", "champion": "1"}
    assert tags[registry.GATE_TAG] == "failed"
    assert tags[registry.CHAMPION_VERSION_TAG] == "1"
    assert tags[registry.CHAMPION_ACCURACY_TAG] == "0.93"
    assert json.loads(tags[registry.GATE_REASONS_TAG]) == ["accuracy 0.5 is below the floor 0.9"]


def test_register_force_promote(model_name: str, tmp_path: Path) -> None:
    first_run, _ = log_weights_run(tmp_path, seed=1)
    second_run, _ = log_weights_run(tmp_path, seed=2)
    registry.register_candidate(model_name, first_run, evaluation(True))

    second = registry.register_candidate(
        model_name, second_run, evaluation(False, 0.5, "1"), force_promote=True
    )

    client = MlflowClient()
    assert second.promoted is True
    assert second.forced is True
    assert second.previous_version == "1"
    assert client.get_registered_model(model_name).aliases["champion"] == "2"
    assert client.get_model_version(model_name, "2").tags[registry.GATE_TAG] == "forced"


def test_register_run_without_sha_tag(model_name: str) -> None:
    client = MlflowClient()
    run_id = client.create_run("0").info.run_id

    with pytest.raises(models.ModelIntegrityError, match=r"no ml_loop\.weights_sha256 tag"):
        registry.register_candidate(model_name, {"run_id": run_id}, evaluation(True))


def test_register_sha_mismatch(model_name: str, tmp_path: Path) -> None:
    train_result, _ = log_weights_run(tmp_path)
    train_result["weights_sha256"] = "0" * 64

    with pytest.raises(models.ModelIntegrityError, match="the train result reports"):
        registry.register_candidate(model_name, train_result, evaluation(True))


def test_register_evaluation_without_passed(model_name: str, tmp_path: Path) -> None:
    train_result, _ = log_weights_run(tmp_path)

    with pytest.raises(MlLoopError, match="evaluation has no 'passed' key"):
        registry.register_candidate(model_name, train_result, {"candidate": {}})


def test_register_logged_model_uri(model_name: str, tmp_path: Path) -> None:
    import mlflow

    train_result, model = log_weights_run(tmp_path)
    # Other tests leave a different active experiment in this process's MLflow state.
    run = MlflowClient().get_run(train_result["run_id"])
    mlflow.set_experiment(experiment_id=run.info.experiment_id)
    with mlflow.start_run(run_id=train_result["run_id"]):
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=np.zeros((2, 4), dtype=np.float32),
            pip_requirements=["torch"],
        )
    train_result["model_uri"] = info.model_uri

    reg = registry.register_candidate(model_name, train_result, evaluation(True))

    version = MlflowClient().get_model_version(model_name, reg.version)
    assert info.model_uri.startswith("models:/m-")
    assert version.source == info.model_uri
    assert version.run_id == train_result["run_id"]


def test_rollback_restores_previous(model_name: str, tmp_path: Path) -> None:
    first_run, _ = log_weights_run(tmp_path, seed=1)
    second_run, _ = log_weights_run(tmp_path, seed=2)
    registry.register_candidate(model_name, first_run, evaluation(True))
    registry.register_candidate(model_name, second_run, evaluation(True))

    restored = registry.rollback_champion(model_name, failed_version="2")

    client = MlflowClient()
    assert restored == "1"
    assert client.get_registered_model(model_name).aliases["champion"] == "1"
    assert client.get_model_version(model_name, "2").tags[registry.ROLLED_BACK_TAG] == "true"


def test_register_again_after_rollback(model_name: str, tmp_path: Path) -> None:
    first_run, _ = log_weights_run(tmp_path, seed=1)
    second_run, _ = log_weights_run(tmp_path, seed=2)
    registry.register_candidate(model_name, first_run, evaluation(True))
    registry.register_candidate(model_name, second_run, evaluation(True))
    registry.rollback_champion(model_name, failed_version="2")

    rerun = registry.register_candidate(model_name, second_run, evaluation(True))

    tags = MlflowClient().get_model_version(model_name, "2").tags
    assert rerun.version == "2"
    assert rerun.previous_version == "1"
    assert registry.get_alias_version(model_name, "champion") == "2"
    assert registry.ROLLED_BACK_TAG not in tags


def test_rollback_without_previous(
    model_name: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train_result, _ = log_weights_run(tmp_path)
    registry.register_candidate(model_name, train_result, evaluation(True))

    with caplog.at_level(logging.WARNING, logger="ml_loop.registry"):
        restored = registry.rollback_champion(model_name, failed_version="1")

    assert restored is None
    assert registry.get_alias_version(model_name, "champion") is None
    assert "champion alias is removed" in caplog.text


def test_rollback_champion_moved_elsewhere(model_name: str, tmp_path: Path) -> None:
    first_run, _ = log_weights_run(tmp_path, seed=1)
    second_run, _ = log_weights_run(tmp_path, seed=2)
    registry.register_candidate(model_name, first_run, evaluation(True))
    registry.register_candidate(model_name, second_run, evaluation(False))

    restored = registry.rollback_champion(model_name, failed_version="2")

    assert restored == "1"
    assert registry.get_alias_version(model_name, "champion") == "1"


def test_get_alias_version_missing(model_name: str, tmp_path: Path) -> None:
    train_result, _ = log_weights_run(tmp_path)
    registry.register_candidate(model_name, train_result, evaluation(False))

    assert registry.get_alias_version(model_name, "challenger") == "1"
    assert registry.get_alias_version(model_name, "champion") is None
    assert registry.get_alias_version(f"{model_name}-unknown", "champion") is None


def test_load_model_matches_offline(model_name: str, tmp_path: Path) -> None:
    train_result, offline = log_weights_run(tmp_path)
    registry.register_candidate(model_name, train_result, evaluation(True))
    x = torch.rand(5, 4) * 4

    by_alias, config, model_version = registry.load_model(model_name, "champion")
    by_number, _, _ = registry.load_model(model_name, 1)

    expected = models.predict_proba(offline, x)
    assert model_version.version == "1"
    assert config == CONFIG
    assert torch.allclose(models.predict_proba(by_alias, x), expected)
    assert torch.allclose(models.predict_proba(by_number, x), expected)


def test_load_model_tampered(model_name: str, tmp_path: Path) -> None:
    train_result, _ = log_weights_run(tmp_path, tamper=True)
    registry.register_candidate(model_name, train_result, evaluation(True))

    with pytest.raises(models.ModelIntegrityError, match="changed after training"):
        registry.load_model(model_name, "champion")


def test_load_model_unknown_alias(model_name: str, tmp_path: Path) -> None:
    train_result, _ = log_weights_run(tmp_path)
    registry.register_candidate(model_name, train_result, evaluation(False))

    with pytest.raises(MlLoopError, match="has no version or alias 'champion'"):
        registry.load_model(model_name, "champion")


def test_registration_round_trip() -> None:
    reg = registry.Registration("m", "3", "abc", True, False, "2", ["challenger", "champion"])

    assert registry.Registration.from_dict(reg.to_dict()) == reg
    assert registry.Registration.from_dict({**reg.to_dict(), "version": 3}).version == "3"


def test_registration_missing_key() -> None:
    with pytest.raises(MlLoopError, match=r"missing keys \['promoted'"):
        registry.Registration.from_dict({"model_name": "m", "version": "1", "run_id": "r"})


def test_weights_tag_matches_models() -> None:
    assert registry.WEIGHTS_SHA_TAG == models.WEIGHTS_SHA_TAG
