"""Train a model on a dataset snapshot and track the run in MLflow.

``train_model`` is the one entry point, and ``python -m ml_loop.train`` wraps it so that the same
code runs in the Airflow worker, in a container or in a pod. The CLI prints the ``TrainResult`` as
JSON on its last stdout line, which is what a container backend reads as the task's XCom.

A training attempt is identified by its train key, a SHA-256 over the snapshot version, the
training settings, the model spec and the spec digest:

- a FINISHED MLflow run with the same key is returned as it is, without training;
- otherwise training resumes from ``<root>/checkpoints/<train_key>/last.pt`` when an earlier
  attempt was killed. The new attempt opens a new MLflow run, and any run of the same key still
  marked RUNNING is marked FAILED first.

Every run logs its params, one batch of metrics per epoch, the training dataset, a learning curve
and the snapshot's validation reports. The trained model is logged twice: as plain weights under
``weights/``, which the project's loaders verify by SHA-256, and as an MLflow model in the ``pt2``
(torch.export) format for ``mlflow models serve``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

import mlflow
import numpy as np
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from torch import nn

from ml_loop import models
from ml_loop.errors import MlLoopError, TrainingError
from ml_loop.files import data_root, write_atomic, write_json_atomic
from ml_loop.process import SPLIT_CODES
from ml_loop.refs import StageRef
from ml_loop.spec import PipelineSpec, RunConfig, load_spec
from ml_loop.store import MANIFEST_FILE, load_snapshot

logger = logging.getLogger(__name__)

SPLIT_TRAIN = SPLIT_CODES["train"]
SPLIT_VALIDATION = SPLIT_CODES["validation"]
SPLIT_TEST = SPLIT_CODES["test"]

TRAIN_KEY_TAG = "ml_loop.train_key"
SNAPSHOT_VERSION_TAG = "ml_loop.snapshot_version"
SPEC_TAG = "ml_loop.spec"
SPEC_DIGEST_TAG = "ml_loop.spec_digest"
DEVICE_TAG = "ml_loop.device"
RESUMED_FROM_EPOCH_TAG = "ml_loop.resumed_from_epoch"
RESUMED_FROM_RUN_TAG = "ml_loop.resumed_from_run"
MODEL_URI_TAG = "ml_loop.model_uri"
VALIDATION_REPORTS_TAG = "ml_loop.validation_reports"

MODEL_ARTIFACT_NAME = "model"
LEARNING_CURVE_ARTIFACT = "plots/learning_curve.png"
VALIDATION_ARTIFACT_DIR = "validation"
CHECKPOINT_FILE = "last.pt"
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


EpochCallback = Callable[[int, dict[str, float]], None]


@dataclasses.dataclass(frozen=True)
class TrainResult(StageRef):
    """Reference to a finished training run, passed to the evaluate and register steps."""

    producer: ClassVar[str] = "ml_loop.train.train_model"

    run_id: str
    experiment_id: str
    model_uri: str
    metrics: dict[str, float]
    train_key: str
    resumed_from_epoch: int
    weights_sha256: str
    device: str


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A dataset snapshot loaded into memory: features, labels, ids and split codes."""

    uri: str
    version_id: str
    dataset: str
    manifest: dict[str, Any]
    x: np.ndarray
    y: np.ndarray
    ids: np.ndarray
    split: np.ndarray

    @classmethod
    def load(cls, uri: str | Path) -> Snapshot:
        """Load the snapshot folder ``uri`` with ``ml_loop.store.load_snapshot`` and check it.

        Raises FileNotFoundError for a missing snapshot, DataValidationError for a changed
        ``data.npz`` and MlLoopError for arrays that do not fit together.
        """
        arrays, manifest = load_snapshot(uri)
        missing = [name for name in ("x", "y", "ids", "split") if name not in arrays]
        if missing:
            raise MlLoopError(f"invalid snapshot {uri}: data.npz lacks the arrays {missing}")

        lengths = {name: len(arrays[name]) for name in ("x", "y", "ids", "split")}
        if len(set(lengths.values())) != 1:
            raise MlLoopError(f"invalid snapshot {uri}: array lengths differ: {lengths}")
        codes = set(np.unique(arrays["split"]).tolist())
        if not codes <= set(SPLIT_CODES.values()):
            raise MlLoopError(
                f"invalid snapshot {uri}: split codes {sorted(codes)}, expected 0 (train), "
                "1 (validation) and 2 (test)"
            )

        folder = Path(uri)
        return cls(
            uri=str(folder.parent if folder.name == MANIFEST_FILE else folder),
            version_id=str(manifest["version_id"]),
            dataset=str(manifest["dataset"]),
            manifest=manifest,
            x=arrays["x"].astype(np.float32, copy=False),
            y=arrays["y"].astype(np.int64, copy=False),
            ids=arrays["ids"].astype(str),
            split=arrays["split"],
        )

    def subset(self, split_code: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return ``(x, y, ids)`` of one split (SPLIT_TRAIN, SPLIT_VALIDATION or SPLIT_TEST)."""
        mask = self.split == split_code
        return self.x[mask], self.y[mask], self.ids[mask]


def compute_train_key(spec: PipelineSpec, snapshot_version: str, config: RunConfig) -> str:
    """Return the SHA-256 that identifies one training attempt and its checkpoint.

    Only the run settings that change the trained weights count. ``training_window_days`` is
    already captured by the snapshot version, and ``force_promote`` acts after training.
    """
    payload = {
        "snapshot_version": snapshot_version,
        "run_config": {
            "epochs": config.epochs,
            "learning_rate": config.learning_rate,
            "batch_size": config.batch_size,
            "seed": config.seed,
        },
        "model": dataclasses.asdict(spec.model),
        "spec_digest": spec.digest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def class_weights(y: np.ndarray, num_classes: int) -> torch.Tensor:
    """Return inverse-frequency weights ``n / (present_classes * count)`` for cross entropy.

    A class with no training samples gets weight 0, so the weights are always finite.
    """
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    present = counts > 0
    weights = np.zeros(num_classes, dtype=np.float64)
    if present.any():
        weights[present] = counts.sum() / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def train_model(
    spec: PipelineSpec,
    snapshot_uri: str | Path,
    config: RunConfig,
    *,
    root: str | Path | None,
    run_tags: dict[str, str] | None = None,
    tracking_uri: str | None = None,
    on_epoch_end: EpochCallback | None = None,
) -> TrainResult:
    """Train the spec's model on the snapshot's train split and log the run to MLflow.

    ``root`` is the data root that contains ``checkpoints/`` (None: ``$ML_LOOP_DATA_DIR``).
    ``run_tags`` are added to the run, for example ``airflow.dag_id`` and ``airflow.run_id``.
    ``tracking_uri``, when given, becomes the process-wide MLflow tracking URI, because
    ``mlflow.pytorch.log_model`` logs through the fluent API. ``on_epoch_end(epoch, metrics)`` is
    called after each epoch's checkpoint is written.

    Raises TrainingError on a non-finite training loss; the MLflow run is then FAILED and has no
    model.
    """
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    snapshot = Snapshot.load(snapshot_uri)
    _check_snapshot_fits_spec(spec, snapshot)
    train_key = compute_train_key(spec, snapshot.version_id, config)
    client = MlflowClient()
    experiment_id = mlflow.set_experiment(spec.name).experiment_id

    finished = _finished_result(client, experiment_id, train_key)
    if finished is not None:
        return finished
    _fail_interrupted_runs(client, experiment_id, train_key)

    trainer = _Trainer(spec, snapshot, config, _pick_device())
    checkpoint_path = data_root(root) / "checkpoints" / train_key / CHECKPOINT_FILE
    checkpoint = _load_checkpoint(checkpoint_path, train_key)
    resumed_from_run = None
    if checkpoint is not None:
        trainer.restore(checkpoint)
        resumed_from_run = checkpoint.get("run_id")
    _log_start(spec, snapshot, config, trainer, train_key)

    tags = {
        **(run_tags or {}),
        TRAIN_KEY_TAG: train_key,
        SNAPSHOT_VERSION_TAG: snapshot.version_id,
        SPEC_TAG: spec.name,
        SPEC_DIGEST_TAG: spec.digest(),
        DEVICE_TAG: trainer.device.type,
        RESUMED_FROM_EPOCH_TAG: str(trainer.epoch),
    }
    if resumed_from_run:
        tags[RESUMED_FROM_RUN_TAG] = resumed_from_run
    resumed_from_epoch = trainer.epoch
    # The context manager marks the run FAILED when anything below raises.
    with mlflow.start_run(experiment_id=experiment_id, tags=tags) as run:
        run_id = run.info.run_id
        mlflow.log_params(_run_params(spec, snapshot, config, trainer))
        _log_training_dataset(snapshot)
        if trainer.epoch:
            _log_restored_history(client, run_id, trainer.history)
        while trainer.epoch < config.epochs:
            metrics = trainer.run_epoch()
            mlflow.log_metrics(metrics, step=trainer.epoch, synchronous=True)
            _save_checkpoint(checkpoint_path, trainer.checkpoint_state(train_key, run_id))
            if on_epoch_end is not None:
                on_epoch_end(trainer.epoch, metrics)
        _log_learning_curve(trainer.history)
        _log_validation_reports(snapshot, run.info.artifact_uri)
        weights_sha256, model_uri = _log_model(trainer)
        mlflow.set_tags({models.WEIGHTS_SHA_TAG: weights_sha256, MODEL_URI_TAG: model_uri})

    _remove_checkpoint(checkpoint_path)
    result = TrainResult(
        run_id=run_id,
        experiment_id=experiment_id,
        model_uri=model_uri,
        metrics=trainer.final_metrics(),
        train_key=train_key,
        resumed_from_epoch=resumed_from_epoch,
        weights_sha256=weights_sha256,
        device=trainer.device.type,
    )
    logger.info(
        "training run %s finished: %s, model %s, weights SHA-256 %s",
        run_id,
        _format_metrics(result.metrics),
        model_uri,
        weights_sha256,
    )
    return result


def _finished_result(
    client: MlflowClient, experiment_id: str, train_key: str
) -> TrainResult | None:
    """Return the result of a FINISHED run of ``train_key``, or None when there is none."""
    finished = _find_runs(client, experiment_id, train_key, "FINISHED")
    if not finished:
        return None
    run = finished[0]
    missing = [
        tag
        for tag in (MODEL_URI_TAG, RESUMED_FROM_EPOCH_TAG, models.WEIGHTS_SHA_TAG, DEVICE_TAG)
        if tag not in run.data.tags
    ]
    if missing:
        raise MlLoopError(
            f"run {run.info.run_id} of key {train_key} is FINISHED but lacks the tags {missing}, "
            "so it was not completed by ml_loop.train; delete the run to train again"
        )
    logger.info(
        "run %s already trained key %s; returning it without training", run.info.run_id, train_key
    )
    return _result_from_run(run)


def _fail_interrupted_runs(client: MlflowClient, experiment_id: str, train_key: str) -> None:
    """Mark the runs of ``train_key`` that are still RUNNING as FAILED.

    Such a run belongs to an attempt that was killed before MLflow could end the run.
    """
    # NOTE: an attempt of the same key that still runs elsewhere is marked FAILED too, and both
    # attempts then write the same checkpoint. Airflow runs one try of a task at a time, so this
    # needs a lost worker whose training process lives on.
    for stale in _find_runs(client, experiment_id, train_key, "RUNNING"):
        logger.warning(
            "marking run %s of key %s FAILED: it is still RUNNING, so its attempt was killed",
            stale.info.run_id,
            train_key,
        )
        client.set_terminated(stale.info.run_id, status="FAILED")


def _log_start(
    spec: PipelineSpec, snapshot: Snapshot, config: RunConfig, trainer: _Trainer, train_key: str
) -> None:
    logger.info(
        "training %s on snapshot %s (%d train, %d validation rows) on %s: epochs=%d "
        "learning_rate=%g batch_size=%d seed=%d train_key=%s resumed_from_epoch=%d",
        spec.name,
        snapshot.version_id,
        trainer.train_rows,
        trainer.validation_rows,
        trainer.device.type,
        config.epochs,
        config.learning_rate,
        config.batch_size,
        config.seed,
        train_key,
        trainer.epoch,
    )


class _Trainer:
    """The model, its optimizer and the in-memory splits, advanced one epoch at a time."""

    def __init__(
        self, spec: PipelineSpec, snapshot: Snapshot, config: RunConfig, device: torch.device
    ) -> None:
        self.config = config
        self.device = device
        _seed_everything(config.seed)
        x_train, y_train, _ = snapshot.subset(SPLIT_TRAIN)
        x_val, y_val, _ = snapshot.subset(SPLIT_VALIDATION)
        if len(x_train) == 0:
            raise TrainingError(
                f"snapshot {snapshot.uri} has no rows in the train split; check the spec's split "
                "shares and the rows of the training window"
            )

        num_classes = len(spec.dataset.classes)
        self.class_weights = class_weights(y_train, num_classes)
        self.model_config = models.model_config(
            spec.model.family,
            spec.model.hyperparameters,
            input_shape=snapshot.x.shape[1:],
            classes=spec.dataset.classes,
            mean=snapshot.manifest["stats"]["mean"],
            std=snapshot.manifest["stats"]["std"],
            feature_names=spec.dataset.feature_names or None,
        )
        self.model = models.build_model(self.model_config).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate)
        self.criterion = nn.CrossEntropyLoss(weight=self.class_weights.to(device))

        # Shuffling draws from its own generator, so resuming restores the permutation sequence
        # independently of the global RNG that dropout uses.
        self.shuffle_generator = torch.Generator().manual_seed(config.seed)
        self.x_train = torch.from_numpy(x_train).to(device)
        self.y_train = torch.from_numpy(y_train).to(device)
        self.x_val = torch.from_numpy(x_val).to(device)
        self.y_val = torch.from_numpy(y_val).to(device)
        self.train_example = x_train[:2]

        self.epoch = 0
        self.history: dict[str, list[float]] = {}
        if len(x_val) == 0:
            logger.warning(
                "snapshot %s has no validation rows; val_loss and val_accuracy are not logged",
                snapshot.uri,
            )

    @property
    def train_rows(self) -> int:
        return len(self.y_train)

    @property
    def validation_rows(self) -> int:
        return len(self.y_val)

    def run_epoch(self) -> dict[str, float]:
        """Train one epoch, score the validation split and return the epoch's metrics."""
        epoch = self.epoch + 1
        start = time.perf_counter()
        self.model.train()
        order = torch.randperm(self.train_rows, generator=self.shuffle_generator)
        x_epoch = self.x_train[order.to(self.device)]
        y_epoch = self.y_train[order.to(self.device)]
        batch_losses = []
        batch_rows = []
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        batch_size = self.config.batch_size
        for begin in range(0, self.train_rows, batch_size):
            x_batch = x_epoch[begin : begin + batch_size]
            y_batch = y_epoch[begin : begin + batch_size]
            logits = self.model(x_batch)
            loss = self.criterion(logits, y_batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            # Losses stay on the device and are checked once per epoch, which avoids a
            # device-to-host sync after every batch.
            batch_losses.append(loss.detach())
            batch_rows.append(len(y_batch))
            correct += (logits.detach().argmax(dim=1) == y_batch).sum()
        losses = torch.stack(batch_losses)
        _raise_on_non_finite(losses, epoch, batch_size, self.config.learning_rate)
        rows = torch.tensor(batch_rows, dtype=losses.dtype, device=self.device)

        # train_loss is the mean of the batch losses weighted by batch rows. Each batch loss is
        # the class-weighted cross entropy that the optimizer minimises.
        metrics = {
            "train_loss": float((losses * rows).sum()) / self.train_rows,
            "train_accuracy": int(correct) / self.train_rows,
        }
        if self.validation_rows:
            metrics["val_loss"], metrics["val_accuracy"] = self._score_validation()
        self.epoch = epoch
        for name, value in metrics.items():
            self.history.setdefault(name, []).append(value)
        seconds = time.perf_counter() - start
        logger.info(
            "epoch %d/%d: %s (%.2f s, %.0f train samples/s)",
            epoch,
            self.config.epochs,
            _format_metrics(metrics),
            seconds,
            self.train_rows / seconds,
        )
        return metrics

    @torch.inference_mode()
    def _score_validation(self) -> tuple[float, float]:
        """Return the plain (unweighted) mean cross entropy and the accuracy on validation.

        Batches have the training batch size, which is known to fit in the device's memory.
        """
        batch_size = self.config.batch_size
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for begin in range(0, self.validation_rows, batch_size):
            x_batch = self.x_val[begin : begin + batch_size]
            y_batch = self.y_val[begin : begin + batch_size]
            logits = self.model(x_batch)
            loss_sum += nn.functional.cross_entropy(logits, y_batch, reduction="sum")
            correct += (logits.argmax(dim=1) == y_batch).sum()
        return float(loss_sum) / self.validation_rows, int(correct) / self.validation_rows

    def final_metrics(self) -> dict[str, float]:
        return {name: values[-1] for name, values in self.history.items() if values}

    def checkpoint_state(self, train_key: str, run_id: str) -> dict[str, Any]:
        numpy_state = np.random.get_state()
        return {
            "train_key": train_key,
            "run_id": run_id,
            "epoch": self.epoch,
            "model": {
                name: value.detach().cpu() for name, value in self.model.state_dict().items()
            },
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "shuffle": self.shuffle_generator.get_state(),
                "python": random.getstate(),
                "numpy": {
                    "name": numpy_state[0],
                    "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
                    "pos": int(numpy_state[2]),
                    "has_gauss": int(numpy_state[3]),
                    "cached_gaussian": float(numpy_state[4]),
                },
            },
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint["epoch"] > self.config.epochs:
            raise TrainingError(
                f"checkpoint of key {checkpoint['train_key']} is at epoch {checkpoint['epoch']}, "
                f"past the configured {self.config.epochs} epochs; delete the checkpoint folder "
                "to train again"
            )
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.epoch = int(checkpoint["epoch"])
        self.history = {name: list(values) for name, values in checkpoint["history"].items()}
        rng = checkpoint["rng"]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.shuffle_generator.set_state(rng["shuffle"])
        random.setstate(rng["python"])
        numpy_rng = rng["numpy"]
        np.random.set_state(
            (
                numpy_rng["name"],
                numpy_rng["keys"].numpy().astype(np.uint32),
                numpy_rng["pos"],
                numpy_rng["has_gauss"],
                numpy_rng["cached_gaussian"],
            )
        )


def _raise_on_non_finite(
    losses: torch.Tensor, epoch: int, batch_size: int, learning_rate: float
) -> None:
    finite = torch.isfinite(losses)
    if bool(finite.all()):
        return
    first = int((~finite).nonzero()[0])
    raise TrainingError(
        f"training loss is {float(losses[first])} (not finite) at epoch {epoch}, "
        f"batch {first + 1} of {len(losses)} (batch size {batch_size}, learning rate "
        f"{learning_rate:g}); lower the learning rate or check the snapshot's features for NaN "
        "or infinite values. The MLflow run is marked FAILED and no model was logged"
    )


def _check_snapshot_fits_spec(spec: PipelineSpec, snapshot: Snapshot) -> None:
    if snapshot.dataset != spec.dataset.name:
        raise MlLoopError(
            f"snapshot {snapshot.uri} is of dataset {snapshot.dataset!r}, but spec {spec.name!r} "
            f"trains on {spec.dataset.name!r}; pass a snapshot of the spec's dataset"
        )
    if spec.dataset.kind == "images" and spec.dataset.image is not None:
        image = spec.dataset.image
        channels = 1 if image.mode == "L" else len(image.mode)
        expected = (channels, image.height, image.width)
    else:
        expected = (len(spec.dataset.columns),)
    if tuple(snapshot.x.shape[1:]) != tuple(expected):
        raise MlLoopError(
            f"snapshot {snapshot.uri} has feature shape {tuple(snapshot.x.shape[1:])}, but spec "
            f"{spec.name!r} expects {tuple(expected)}; rebuild the snapshot with this spec"
        )
    num_classes = len(spec.dataset.classes)
    if len(snapshot.y) and (snapshot.y.min() < 0 or snapshot.y.max() >= num_classes):
        raise MlLoopError(
            f"snapshot {snapshot.uri} has class indices from {snapshot.y.min()} to "
            f"{snapshot.y.max()}, but spec {spec.name!r} has {num_classes} classes"
        )


def _pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _find_runs(client: MlflowClient, experiment_id: str, train_key: str, status: str) -> list[Run]:
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TRAIN_KEY_TAG}` = '{train_key}' and attributes.status = '{status}'",
        order_by=["attributes.start_time DESC"],
    )


def _result_from_run(run: Run) -> TrainResult:
    tags = run.data.tags
    return TrainResult(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        model_uri=tags[MODEL_URI_TAG],
        metrics={
            name: run.data.metrics[name] for name in EPOCH_METRICS if name in run.data.metrics
        },
        train_key=tags[TRAIN_KEY_TAG],
        resumed_from_epoch=int(tags[RESUMED_FROM_EPOCH_TAG]),
        weights_sha256=tags[models.WEIGHTS_SHA_TAG],
        device=tags[DEVICE_TAG],
    )


def _run_params(
    spec: PipelineSpec, snapshot: Snapshot, config: RunConfig, trainer: _Trainer
) -> dict[str, Any]:
    params: dict[str, Any] = dataclasses.asdict(config)
    params["model_family"] = spec.model.family
    for name, value in spec.model.hyperparameters.items():
        params[f"model_{name}"] = json.dumps(value)
    params["spec_digest"] = spec.digest()
    params["snapshot_version"] = snapshot.version_id
    params["train_rows"] = trainer.train_rows
    params["validation_rows"] = trainer.validation_rows
    params["class_weights"] = json.dumps([round(w, 6) for w in trainer.class_weights.tolist()])
    return params


def _log_training_dataset(snapshot: Snapshot) -> None:
    x_train, y_train, _ = snapshot.subset(SPLIT_TRAIN)
    with warnings.catch_warnings():
        # MLflow 3.17 registers its local-file dataset source class twice, so it warns that a
        # path matches two sources. Both are the same class, so the warning is dropped.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        dataset = mlflow.data.from_numpy(
            x_train,
            targets=y_train,
            source=snapshot.uri,
            name=f"{snapshot.dataset}-train",
            digest=snapshot.version_id,
        )
    mlflow.log_input(dataset, context="training")


def _log_restored_history(
    client: MlflowClient, run_id: str, history: dict[str, list[float]]
) -> None:
    """Copy the metrics of the epochs done before the resume into the new run, in one call."""
    from mlflow.entities import Metric

    now_ms = int(time.time() * 1000)
    metrics = [
        Metric(key=name, value=value, timestamp=now_ms, step=step)
        for name, values in history.items()
        for step, value in enumerate(values, start=1)
    ]
    client.log_batch(run_id, metrics=metrics, synchronous=True)


def _log_learning_curve(history: dict[str, list[float]]) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.5), layout="constrained")
    for axis, quantity in zip(figure.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for split in ("train", "val"):
            values = history.get(f"{split}_{quantity}", [])
            if values:
                axis.plot(range(1, len(values) + 1), values, marker="o", label=split)
        axis.set_xlabel("epoch")
        axis.set_ylabel(quantity)
        axis.grid(alpha=0.3)
        axis.legend()
    mlflow.log_figure(figure, LEARNING_CURVE_ARTIFACT)


def _log_validation_reports(snapshot: Snapshot, artifact_uri: str) -> None:
    """Log the data-validation report of each source partition under ``validation/``."""
    logged = 0
    for index, partition in enumerate(snapshot.manifest.get("source_partitions", [])):
        report_uri = partition.get("report_uri")
        if not report_uri:
            continue
        report = Path(urlparse(report_uri).path if "://" in report_uri else report_uri)
        name = str(partition.get("partition_date") or f"partition-{index}")
        artifact_path = f"{VALIDATION_ARTIFACT_DIR}/{name}"
        if report.is_dir():
            mlflow.log_artifacts(str(report), artifact_path)
        elif report.is_file():
            mlflow.log_artifact(str(report), artifact_path)
        else:
            logger.warning(
                "validation report %s of partition %s not found; it is not logged with the run",
                report,
                name,
            )
            continue
        logged += 1
    if logged:
        mlflow.set_tag(VALIDATION_REPORTS_TAG, f"{artifact_uri}/{VALIDATION_ARTIFACT_DIR}")


def _log_model(trainer: _Trainer) -> tuple[str, str]:
    """Log the plain weights and the MLflow model from a CPU copy; return (SHA-256, model URI).

    The MLflow model uses the ``pt2`` format (torch.export), the MLflow 3.17 default. Exporting a
    CPU copy makes it load on a CPU server whatever device trained it, and the two-row input
    example keeps the batch dimension dynamic (a one-row example fixes it at 1). The ``pickle``
    format is the alternative, but MLflow 3.17 refuses to load it unless
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION is set, because unpickling runs code from the artifact.
    """
    cpu_model = copy.deepcopy(trainer.model).to("cpu").eval()
    with tempfile.TemporaryDirectory(prefix="ml-loop-weights-") as tmp:
        weights_dir = Path(tmp) / models.WEIGHTS_ARTIFACT_DIR
        weights_sha256 = models.save_weights(cpu_model, trainer.model_config, weights_dir)
        mlflow.log_artifacts(str(weights_dir), models.WEIGHTS_ARTIFACT_DIR)

    example = np.ascontiguousarray(trainer.train_example)
    with torch.inference_mode():
        example_output = cpu_model(torch.from_numpy(example)).numpy()
    signature = mlflow.models.infer_signature(example, example_output)
    model_info = mlflow.pytorch.log_model(
        cpu_model,
        name=MODEL_ARTIFACT_NAME,
        signature=signature,
        input_example=example,
        pip_requirements=_pip_requirements(),
        serialization_format="pt2",
    )
    return weights_sha256, model_info.model_uri


def _pip_requirements() -> list[str]:
    """Pin the packages the served model imports, without local labels such as ``+cpu``."""
    torch_version = torch.__version__.split("+", 1)[0]
    return [f"mlflow=={mlflow.__version__}", f"torch=={torch_version}", f"numpy=={np.__version__}"]


def _load_checkpoint(path: Path, train_key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        logger.warning("checkpoint %s could not be read (%s); training from epoch 0", path, err)
        return None
    if checkpoint.get("train_key") != train_key:
        logger.warning(
            "checkpoint %s belongs to key %s, not %s; training from epoch 0",
            path,
            checkpoint.get("train_key"),
            train_key,
        )
        return None
    logger.info(
        "resuming key %s from checkpoint %s at epoch %d", train_key, path, checkpoint["epoch"]
    )
    return checkpoint


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write the checkpoint to a temporary file beside ``path``, then rename it over ``path``."""
    write_atomic(path, lambda handle: torch.save(state, handle), suffix=".pt")


def _remove_checkpoint(path: Path) -> None:
    """Delete the checkpoint of a finished run, because a rerun returns the FINISHED run."""
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        path.parent.rmdir()


def _format_metrics(metrics: dict[str, float]) -> str:
    return " ".join(f"{name}={value:.4f}" for name, value in metrics.items())


def _parse_run_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"invalid run tag {text!r}: expected KEY=VALUE")
    return key, value


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ml_loop.train",
        description="Train the spec's model on a snapshot and log the run to MLflow. "
        "The last stdout line is the TrainResult as JSON. Options left out take the spec's "
        "training defaults.",
    )
    parser.add_argument("--spec", required=True, help="spec name in include/specs, or a YAML path")
    parser.add_argument("--snapshot-uri", required=True, help="snapshot folder to train on")
    parser.add_argument("--epochs", type=int, help="passes over the train split")
    parser.add_argument("--learning-rate", type=float, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, help="samples per optimizer step")
    parser.add_argument("--seed", type=int, help="seed of torch, numpy and Python's random")
    parser.add_argument(
        "--run-tag",
        action="append",
        default=[],
        type=_parse_run_tag,
        metavar="KEY=VALUE",
        help="tag to set on the MLflow run; repeat for more tags",
    )
    parser.add_argument(
        "--data-dir", help="data root that contains checkpoints/ (default: $ML_LOOP_DATA_DIR)"
    )
    parser.add_argument("--result-file", help="also write the TrainResult JSON to this file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    spec = load_spec(args.spec)
    params = {
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    config = RunConfig.from_params(spec, params)
    result = train_model(
        spec, args.snapshot_uri, config, root=args.data_dir, run_tags=dict(args.run_tag)
    )
    payload = result.to_dict()
    if args.result_file:
        write_json_atomic(Path(args.result_file), payload)
    sys.stdout.flush()
    print(json.dumps(payload, sort_keys=True), flush=True)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
