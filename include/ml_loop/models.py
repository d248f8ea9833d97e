"""Model classes, and saving and loading their weights without unpickling code.

Every model takes raw features: images scaled to [0, 1] with shape ``(n, 1, H, W)``, or tabular
rows with shape ``(n, F)``. Its first layer applies the normalisation fitted with its dataset
version, so the trainer, the evaluator and the model server all feed it the same inputs.

Weights travel as a ``state_dict`` file plus a JSON config. Loading builds the model from the
project's own classes and reads the weights with ``torch.load(weights_only=True)`` after checking
their SHA-256, so a model artifact never runs code on load.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ml_loop.errors import MlLoopError
from ml_loop.files import sha256_file

logger = logging.getLogger(__name__)

WEIGHTS_ARTIFACT_DIR = "weights"
STATE_DICT_FILE = "state_dict.pt"
CONFIG_FILE = "model.json"
WEIGHTS_SHA_TAG = "ml_loop.weights_sha256"


class ModelIntegrityError(MlLoopError):
    """Weights on disk do not match the SHA-256 recorded when they were logged."""


class Normalize(nn.Module):
    """Subtract the training mean and divide by the training standard deviation."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], feature_dims: int) -> None:
        super().__init__()
        shape = (1, len(mean)) + (1,) * (feature_dims - 1)
        std_tensor = torch.tensor(std, dtype=torch.float32).clamp_min(1e-6)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(shape))
        self.register_buffer("std", std_tensor.reshape(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """Two 3x3 convolution blocks with max-pooling, then one dense hidden layer.

    Input ``(n, C, H, W)`` with H and W divisible by 4; output logits ``(n, num_classes)``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        channels: Sequence[int] = (32, 64),
        hidden_units: int = 128,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        in_channels, height, width = input_shape
        first, second = channels
        self.normalize = Normalize(mean, std, feature_dims=3)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, first, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(first, second, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(second * (height // 4) * (width // 4), hidden_units),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_units, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


class MLP(nn.Module):
    """Fully connected layers with ReLU and dropout; input ``(n, F)``, output logits."""

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        hidden_units: Sequence[int] = (64, 32),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        (num_features,) = input_shape
        self.normalize = Normalize(mean, std, feature_dims=1)
        layers: list[nn.Module] = []
        width = num_features
        for units in hidden_units:
            layers += [nn.Linear(width, units), nn.ReLU(), nn.Dropout(dropout)]
            width = units
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.normalize(x))


MODEL_FAMILIES: dict[str, type[nn.Module]] = {"cnn": SmallCNN, "mlp": MLP}


def model_config(
    family: str,
    hyperparameters: dict[str, Any],
    input_shape: Sequence[int],
    classes: Sequence[str],
    mean: Sequence[float],
    std: Sequence[float],
    feature_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Return the JSON config that ``build_model`` turns back into a model.

    ``feature_names`` (tabular models) lets the model server match request columns by name.
    """
    config = {
        "family": family,
        "hyperparameters": dict(hyperparameters),
        "input_shape": [int(dim) for dim in input_shape],
        "classes": [str(label) for label in classes],
        "mean": [float(value) for value in mean],
        "std": [float(value) for value in std],
    }
    if feature_names:
        config["feature_names"] = [str(name) for name in feature_names]
    return config


def build_model(config: dict[str, Any]) -> nn.Module:
    """Build an untrained model of the config's family with its normalisation buffers."""
    family = config["family"]
    if family not in MODEL_FAMILIES:
        raise MlLoopError(
            f"unknown model family {family!r}; expected one of {sorted(MODEL_FAMILIES)}"
        )
    return MODEL_FAMILIES[family](
        input_shape=config["input_shape"],
        num_classes=len(config["classes"]),
        mean=config["mean"],
        std=config["std"],
        **config["hyperparameters"],
    )


def save_weights(model: nn.Module, config: dict[str, Any], directory: Path) -> str:
    """Write the CPU ``state_dict`` and the config to ``directory``; return the weights' SHA-256."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    torch.save(state, directory / STATE_DICT_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return sha256_file(directory / STATE_DICT_FILE)


def load_weights(directory: Path, expected_sha256: str | None) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model from ``directory`` and load its weights, after checking their SHA-256.

    Raises ModelIntegrityError when ``expected_sha256`` is given and the file differs.
    """
    weights_path = directory / STATE_DICT_FILE
    actual = sha256_file(weights_path)
    if expected_sha256 is not None and actual != expected_sha256:
        raise ModelIntegrityError(
            f"weights {weights_path} have SHA-256 {actual}, but {expected_sha256} was recorded "
            "when they were logged; the artifact was changed after training, so it is not loaded"
        )
    config = json.loads((directory / CONFIG_FILE).read_text())
    model = build_model(config)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model, config


def load_run_model(
    run_id: str, expected_sha256: str | None, tracking_uri: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Download the ``weights/`` artifacts of an MLflow run and load them on CPU.

    With ``expected_sha256`` None, the run's own ``ml_loop.weights_sha256`` tag is the reference.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    if expected_sha256 is None:
        run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
        expected_sha256 = run.data.tags.get(WEIGHTS_SHA_TAG)
        if expected_sha256 is None:
            raise ModelIntegrityError(
                f"run {run_id} has no {WEIGHTS_SHA_TAG} tag, so its weights cannot be verified; "
                "log the model with ml_loop.train"
            )
    with tempfile.TemporaryDirectory(prefix="ml-loop-weights-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id,
            artifact_path=WEIGHTS_ARTIFACT_DIR,
            dst_path=tmp,
            tracking_uri=tracking_uri,
        )
        return load_weights(Path(local), expected_sha256)


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Return class probabilities for ``x`` in batches, with the model in eval mode."""
    model.eval()
    outputs = [
        torch.softmax(model(x[i : i + batch_size]), dim=1) for i in range(0, len(x), batch_size)
    ]
    if not outputs:
        return torch.empty((0, 0))
    return torch.cat(outputs)
