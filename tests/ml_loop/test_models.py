"""Tests for the model classes and for saving and loading their weights."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from ml_loop import models
from ml_loop.errors import MlLoopError

CNN_HYPERPARAMETERS = {"channels": [4, 8], "hidden_units": 16, "dropout": 0.25}
MLP_HYPERPARAMETERS = {"hidden_units": [8, 4], "dropout": 0.1}


def cnn_config(mean: float = 0.2, std: float = 0.3) -> dict:
    return models.model_config("cnn", CNN_HYPERPARAMETERS, (1, 28, 28), list("0123"), [mean], [std])


def mlp_config(features: int = 5) -> dict:
    mean = [float(i) for i in range(features)]
    std = [1.0 + i for i in range(features)]
    return models.model_config("mlp", MLP_HYPERPARAMETERS, (features,), ["a", "b", "c"], mean, std)


def test_cnn_output_shape() -> None:
    model = models.build_model(cnn_config()).eval()
    logits = model(torch.rand(3, 1, 28, 28))
    assert logits.shape == (3, 4)


def test_mlp_output_shape() -> None:
    model = models.build_model(mlp_config()).eval()
    logits = model(torch.rand(6, 5))
    assert logits.shape == (6, 3)


def test_cnn_rejects_wrong_channels() -> None:
    model = models.build_model(cnn_config()).eval()
    with pytest.raises(RuntimeError):
        model(torch.rand(2, 3, 28, 28))


def test_normalisation_applied_inside() -> None:
    torch.manual_seed(0)
    normalised = models.build_model(cnn_config(mean=0.2, std=0.3)).eval()
    plain = models.build_model(cnn_config(mean=0.0, std=1.0)).eval()
    weights = {k: v for k, v in normalised.state_dict().items() if not k.startswith("normalize")}
    plain.load_state_dict(weights, strict=False)
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(normalised(x), plain((x - 0.2) / 0.3), atol=1e-5)


def test_normalisation_in_state_dict() -> None:
    state = models.build_model(mlp_config()).state_dict()
    assert torch.equal(state["normalize.mean"].flatten(), torch.arange(5, dtype=torch.float32))
    assert torch.equal(state["normalize.std"].flatten(), torch.arange(1, 6, dtype=torch.float32))


def test_normalisation_zero_std_finite() -> None:
    config = models.model_config("mlp", MLP_HYPERPARAMETERS, (2,), ["a", "b"], [0.5, 0.5], [0, 0])
    model = models.build_model(config).eval()
    assert torch.isfinite(model(torch.rand(4, 2))).all()


def test_build_model_unknown_family() -> None:
    config = {**mlp_config(), "family": "transformer"}
    with pytest.raises(MlLoopError, match="transformer"):
        models.build_model(config)


def test_weights_roundtrip(tmp_path) -> None:
    model = models.build_model(cnn_config()).eval()
    sha256 = models.save_weights(model, cnn_config(), tmp_path)
    loaded, config = models.load_weights(tmp_path, sha256)
    x = torch.rand(2, 1, 28, 28)
    assert config == cnn_config()
    assert not loaded.training
    assert torch.equal(loaded(x), model(x))


def test_weights_config_file_is_json(tmp_path) -> None:
    models.save_weights(models.build_model(mlp_config()), mlp_config(), tmp_path)
    config = json.loads((tmp_path / models.CONFIG_FILE).read_text())
    assert config["classes"] == ["a", "b", "c"]
    assert config["input_shape"] == [5]


def test_tampered_weights_rejected(tmp_path) -> None:
    model = models.build_model(mlp_config())
    sha256 = models.save_weights(model, mlp_config(), tmp_path)
    state = model.state_dict()
    state["layers.0.weight"] = state["layers.0.weight"] + 1
    torch.save(state, tmp_path / models.STATE_DICT_FILE)
    with pytest.raises(models.ModelIntegrityError, match=sha256):
        models.load_weights(tmp_path, sha256)


def test_load_weights_without_expected_sha(tmp_path) -> None:
    models.save_weights(models.build_model(mlp_config()), mlp_config(), tmp_path)
    _, config = models.load_weights(tmp_path, None)
    assert config["family"] == "mlp"


def test_predict_proba_rows_sum_to_one() -> None:
    model = models.build_model(mlp_config())
    probabilities = models.predict_proba(model, torch.rand(1100, 5), batch_size=512)
    assert probabilities.shape == (1100, 3)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(1100))
    assert not model.training


def test_predict_proba_empty_input() -> None:
    probabilities = models.predict_proba(models.build_model(mlp_config()), torch.empty(0, 5))
    assert probabilities.numel() == 0


@pytest.mark.mlflow
def test_load_run_model_uses_run_tag(mlflow_tracking, tmp_path) -> None:
    model = models.build_model(mlp_config()).eval()
    mlflow.set_experiment("test-models")
    with mlflow.start_run() as run:
        sha256 = models.save_weights(model, mlp_config(), tmp_path)
        mlflow.log_artifacts(str(tmp_path), models.WEIGHTS_ARTIFACT_DIR)
        mlflow.set_tag(models.WEIGHTS_SHA_TAG, sha256)
    loaded, _ = models.load_run_model(run.info.run_id, None)
    x = torch.rand(3, 5)
    assert torch.equal(loaded(x), model(x))


@pytest.mark.mlflow
def test_load_run_model_rejects_wrong_sha(mlflow_tracking, tmp_path) -> None:
    mlflow.set_experiment("test-models")
    with mlflow.start_run() as run:
        models.save_weights(models.build_model(mlp_config()), mlp_config(), tmp_path)
        mlflow.log_artifacts(str(tmp_path), models.WEIGHTS_ARTIFACT_DIR)
    with pytest.raises(models.ModelIntegrityError):
        models.load_run_model(run.info.run_id, "0" * 64)


@pytest.mark.mlflow
def test_load_run_model_untagged_run(mlflow_tracking) -> None:
    mlflow.set_experiment("test-models")
    with mlflow.start_run() as run:
        pass
    assert models.WEIGHTS_SHA_TAG not in MlflowClient().get_run(run.info.run_id).data.tags
    with pytest.raises(models.ModelIntegrityError, match=r"no ml_loop\.weights_sha256 tag"):
        models.load_run_model(run.info.run_id, None)


def test_config_keeps_feature_names() -> None:
    config = models.model_config(
        "mlp", {"hidden_units": [4]}, (2,), ["a", "b"], [0.0, 0.0], [1.0, 1.0], ["x1", "x2"]
    )
    assert config["feature_names"] == ["x1", "x2"]
    assert models.build_model(config)(torch.zeros(3, 2)).shape == (3, 2)


def test_config_without_feature_names() -> None:
    config = models.model_config(
        "mlp", {"hidden_units": [4]}, (2,), ["a", "b"], [0.0] * 2, [1.0] * 2
    )
    assert "feature_names" not in config
