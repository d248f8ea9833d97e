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

Hardware comes from the spec's ``compute`` section or the CLI flags: ``--gpus`` (0 CPU, N GPUs,
-1 every visible GPU) and ``--dataloader-workers``. The GPU and shared-memory pre-flight checks of
``ml_loop.devices`` run first, so a container without the requested GPUs fails at once and never
trains on the CPU instead. On CUDA the epoch loop runs under autocast in bfloat16, or in float16
with loss scaling on GPUs without native bfloat16; the CPU trains in float32. Several GPUs run
under ``torchrun`` (``ml_loop.devices.train_command``) with DistributedDataParallel: rank 0 alone
talks to MLflow, writes the checkpoint and prints the result line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlparse

import mlflow
import numpy as np
import torch
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from torch import nn

from ml_loop import devices, models
from ml_loop.errors import MlLoopError, SpecError, TrainingError
from ml_loop.files import data_root, write_atomic, write_json_atomic
from ml_loop.process import SPLIT_CODES
from ml_loop.refs import StageRef
from ml_loop.spec import TRAIN_BACKENDS, PipelineSpec, RunConfig, check_train_backend, load_spec
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
TRAIN_BACKEND_TAG = "ml_loop.train_backend"
WORLD_SIZE_TAG = "ml_loop.world_size"
# Fields of devices.describe_device and the run tags they are recorded as.
DEVICE_DESCRIPTION_TAGS = {
    "device_name": "ml_loop.device_name",
    "device_count": "ml_loop.device_count",
    "cuda_version": "ml_loop.cuda_version",
    "torch_version": "ml_loop.torch_version",
    "precision": "ml_loop.precision",
}

MODEL_ARTIFACT_NAME = "model"
LEARNING_CURVE_ARTIFACT = "plots/learning_curve.png"
VALIDATION_ARTIFACT_DIR = "validation"
CHECKPOINT_FILE = "last.pt"
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
DATALOADER_PREFETCH_FACTOR = 2


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


def snapshot_model_config(spec: PipelineSpec, snapshot: Snapshot) -> dict[str, Any]:
    """Return the config of the spec's model for the snapshot's feature shape and statistics."""
    return models.model_config(
        spec.model.family,
        spec.model.hyperparameters,
        input_shape=snapshot.x.shape[1:],
        classes=spec.dataset.classes,
        mean=snapshot.manifest["stats"]["mean"],
        std=snapshot.manifest["stats"]["std"],
        feature_names=spec.dataset.feature_names or None,
    )


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
    gpus: int | None = None,
    dataloader_workers: int | None = None,
    backend: str = "local",
) -> TrainResult:
    """Train the spec's model on the snapshot's train split and log the run to MLflow.

    ``root`` is the data root that contains ``checkpoints/`` (None: ``$ML_LOOP_DATA_DIR``).
    ``run_tags`` are added to the run, for example ``airflow.dag_id`` and ``airflow.run_id``.
    ``tracking_uri``, when given, becomes the process-wide MLflow tracking URI, because
    ``mlflow.pytorch.log_model`` logs through the fluent API. ``on_epoch_end(epoch, metrics)`` is
    called on rank 0 after each epoch's checkpoint is written.

    ``gpus`` (None: ``spec.compute.gpus``) is 0 for CPU, N for N GPUs or -1 for every visible
    GPU, and ``dataloader_workers`` (None: ``spec.compute.dataloader_workers``) is the number of
    DataLoader worker processes per training process (0: batches are sliced from in-memory
    tensors). ``backend`` is recorded as the run tag ``ml_loop.train_backend``. Both pre-flight
    checks (GPUs, shared memory) run before the snapshot is read or MLflow is contacted.

    Under torchrun (WORLD_SIZE > 1) every process trains a DistributedDataParallel replica on its
    share of each epoch, and rank 0 alone talks to MLflow and writes the checkpoint. Every rank
    returns the same TrainResult.

    Raises GpuUnavailableError when the requested GPUs are not visible, SharedMemoryError when
    /dev/shm is too small for the DataLoader workers, and TrainingError on a non-finite training
    loss; the MLflow run is then FAILED and has no model.
    """
    gpus = spec.compute.gpus if gpus is None else gpus
    workers = spec.compute.dataloader_workers if dataloader_workers is None else dataloader_workers
    check_train_backend(backend)
    if workers < 0:
        raise SpecError(
            f"invalid dataloader_workers={workers!r}: expected 0 (no worker processes) or more"
        )
    context = devices.DistributedContext.from_env()
    gpus_in_use = devices.check_gpus(gpus, local_rank=context.local_rank)
    if workers:
        devices.check_shared_memory(
            workers * context.local_world_size, _batch_bytes(spec, config.batch_size)
        )
    if gpus_in_use > 1 and not context.is_distributed:
        logger.warning(
            "%d GPUs requested, but this process was not started by torchrun, so it trains on "
            "GPU 0 alone; start it with the command of ml_loop.devices.train_command",
            gpus_in_use,
        )
    device = devices.select_device(gpus_in_use, context.local_rank)
    with devices.DistributedSession(context, device) as session:
        return _train_in_session(
            session,
            spec,
            snapshot_uri,
            config,
            root=root,
            run_tags=run_tags,
            tracking_uri=tracking_uri,
            on_epoch_end=on_epoch_end,
            workers=workers,
            backend=backend,
        )


def _train_in_session(
    session: devices.DistributedSession,
    spec: PipelineSpec,
    snapshot_uri: str | Path,
    config: RunConfig,
    *,
    root: str | Path | None,
    run_tags: dict[str, str] | None,
    tracking_uri: str | None,
    on_epoch_end: EpochCallback | None,
    workers: int,
    backend: str,
) -> TrainResult:
    if tracking_uri and session.is_main:
        mlflow.set_tracking_uri(tracking_uri)
    snapshot = Snapshot.load(snapshot_uri)
    _check_snapshot_fits_spec(spec, snapshot)
    train_key = compute_train_key(spec, snapshot.version_id, config)

    def find_finished() -> dict[str, Any]:
        experiment_id = mlflow.set_experiment(spec.name).experiment_id
        client = MlflowClient()
        finished = _finished_result(client, experiment_id, train_key)
        if finished is not None:
            return {"finished": finished.to_dict()}
        _fail_interrupted_runs(client, experiment_id, train_key)
        return {"experiment_id": experiment_id}

    start = session.run_on_main(find_finished, "looking up earlier runs of the train key")
    if "finished" in start:
        return TrainResult.from_dict(start["finished"])
    experiment_id = start["experiment_id"]

    trainer = Trainer(
        spec, snapshot, config, session.device, session=session, dataloader_workers=workers
    )
    checkpoint_path = data_root(root) / "checkpoints" / train_key / CHECKPOINT_FILE
    checkpoint = _load_checkpoint(checkpoint_path, train_key)
    resumed_from_run = None
    if checkpoint is not None:
        trainer.restore(checkpoint)
        resumed_from_run = checkpoint.get("run_id")
    trainer.wrap_distributed()
    description = devices.describe_device(session.device, session.context.world_size)
    if session.is_main:
        _log_start(spec, snapshot, config, trainer, train_key, description)

    tags = {
        **(run_tags or {}),
        TRAIN_KEY_TAG: train_key,
        SNAPSHOT_VERSION_TAG: snapshot.version_id,
        SPEC_TAG: spec.name,
        SPEC_DIGEST_TAG: spec.digest(),
        DEVICE_TAG: trainer.device.type,
        RESUMED_FROM_EPOCH_TAG: str(trainer.epoch),
        TRAIN_BACKEND_TAG: backend,
        WORLD_SIZE_TAG: str(session.context.world_size),
        **{tag: str(description[field]) for field, tag in DEVICE_DESCRIPTION_TAGS.items()},
    }
    if resumed_from_run:
        tags[RESUMED_FROM_RUN_TAG] = resumed_from_run
    resumed_from_epoch = trainer.epoch

    # Rank 0 opens the MLflow run; the context manager marks it FAILED when anything below
    # raises. The other ranks only train, and wait for rank 0 after each of its MLflow steps.
    # NOTE: when another rank dies alone (out of memory, killed), rank 0 waits in the next
    # collective until torchrun stops it, so its run stays RUNNING until the next attempt of the
    # key marks it FAILED.
    run_context = (
        mlflow.start_run(experiment_id=experiment_id, tags=tags)
        if session.is_main
        else contextlib.nullcontext()
    )
    with run_context as run, contextlib.closing(trainer):

        def log_run_start() -> None:
            mlflow.log_params(_run_params(spec, snapshot, config, trainer))
            _log_training_dataset(snapshot)
            if trainer.epoch:
                _log_restored_history(MlflowClient(), run.info.run_id, trainer.history)

        def end_epoch(metrics: dict[str, float]) -> None:
            mlflow.log_metrics(metrics, step=trainer.epoch, synchronous=True)
            state = trainer.checkpoint_state(train_key, run.info.run_id)
            _save_checkpoint(checkpoint_path, state)
            if on_epoch_end is not None:
                on_epoch_end(trainer.epoch, metrics)

        def log_outputs() -> dict[str, Any]:
            _log_learning_curve(trainer.history)
            _log_validation_reports(snapshot, run.info.artifact_uri)
            weights_sha256, model_uri = _log_model(trainer)
            mlflow.set_tags({models.WEIGHTS_SHA_TAG: weights_sha256, MODEL_URI_TAG: model_uri})
            return TrainResult(
                run_id=run.info.run_id,
                experiment_id=experiment_id,
                model_uri=model_uri,
                metrics=trainer.final_metrics(),
                train_key=train_key,
                resumed_from_epoch=resumed_from_epoch,
                weights_sha256=weights_sha256,
                device=trainer.device.type,
            ).to_dict()

        session.run_on_main(log_run_start, "logging the run's params and dataset")
        while trainer.epoch < config.epochs:
            metrics = trainer.run_epoch()
            session.run_on_main(
                functools.partial(end_epoch, metrics),
                f"logging epoch {trainer.epoch} and its checkpoint",
            )
        result = TrainResult.from_dict(session.run_on_main(log_outputs, "logging the model"))

    if session.is_main:
        _remove_checkpoint(checkpoint_path)
        logger.info(
            "training run %s finished: %s, model %s, weights SHA-256 %s",
            result.run_id,
            _format_metrics(result.metrics),
            result.model_uri,
            result.weights_sha256,
        )
    return result


def _batch_bytes(spec: PipelineSpec, batch_size: int) -> int:
    """Return the bytes of one batch of float32 features and int64 labels of the spec's shape."""
    shape = _expected_feature_shape(spec)
    return batch_size * (4 * math.prod(shape) + 8)


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
    spec: PipelineSpec,
    snapshot: Snapshot,
    config: RunConfig,
    trainer: Trainer,
    train_key: str,
    description: dict[str, Any],
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
    logger.info(
        "device %s: %s, %d device(s), precision %s, CUDA %s, torch %s, %d process(es), "
        "%d DataLoader worker(s) per process",
        description["device_type"],
        description["device_name"],
        description["device_count"],
        description["precision"],
        description["cuda_version"],
        description["torch_version"],
        trainer.world_size,
        trainer.dataloader_workers,
    )


class Trainer:
    """The model, its optimizer and the in-memory splits, advanced one epoch at a time.

    In a torchrun job each process trains a DistributedDataParallel replica on its share of every
    epoch and scores its share of the validation split. The metrics are sums over all processes,
    so every process reports the same values.
    """

    def __init__(
        self,
        spec: PipelineSpec,
        snapshot: Snapshot,
        config: RunConfig,
        device: torch.device,
        *,
        session: devices.DistributedSession | None = None,
        dataloader_workers: int = 0,
        precision: str | None = None,
    ) -> None:
        self.config = config
        self.device = device
        self.session = session or devices.DistributedSession(devices.DistributedContext(), device)
        self.rank = self.session.context.rank
        self.world_size = self.session.context.world_size
        self.dataloader_workers = dataloader_workers
        self.precision = precision or devices.pick_precision(
            device.type, devices.bf16_supported(device)
        )
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
        self.model_config = snapshot_model_config(spec, snapshot)
        # The checkpoint and the logged model store the state of self.model, the plain module.
        # The epoch loop calls self.train_module, which is the DDP wrapper in a torchrun job.
        self.model = models.build_model(self.model_config).to(device)
        self.train_module: nn.Module = self.model
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate)
        self.criterion = nn.CrossEntropyLoss(weight=self.class_weights.to(device))
        # NOTE: the test suite runs on CPU only, so autocast, GradScaler, NCCL and pinned memory
        # run only where benchmarks/device_check.py or a GPU deployment runs them.
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

        # Shuffling draws from its own generator, so resuming restores the permutation sequence
        # independently of the global RNG that dropout uses. Every process draws the same
        # permutation and takes its share of it.
        self.shuffle_generator = torch.Generator().manual_seed(config.seed)
        self.train_rows = len(y_train)
        self.validation_rows = len(y_val)
        # DataLoader workers read CPU tensors; without workers the train split moves to the
        # device once and each batch is a slice of it.
        train_device = torch.device("cpu") if dataloader_workers else device
        self.x_train = torch.from_numpy(x_train).to(train_device)
        self.y_train = torch.from_numpy(y_train).to(train_device)
        self.x_val = torch.from_numpy(x_val[self.rank :: self.world_size]).to(device)
        self.y_val = torch.from_numpy(y_val[self.rank :: self.world_size]).to(device)
        self.train_example = x_train[:2]
        self._loader: Any = None
        self._loader_batches: _EpochBatches | None = None

        self.epoch = 0
        self.history: dict[str, list[float]] = {}
        if len(x_val) == 0 and self.session.is_main:
            logger.warning(
                "snapshot %s has no validation rows; val_loss and val_accuracy are not logged",
                snapshot.uri,
            )

    def wrap_distributed(self) -> None:
        """Wrap the model in DistributedDataParallel when this process is part of a torchrun job.

        Call it after ``restore``: the wrapper copies rank 0's parameters to every process.
        """
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = DistributedDataParallel(self.model, device_ids=device_ids)

    def close(self) -> None:
        """Release the DataLoader, whose persistent workers then exit."""
        self._loader = None
        self._loader_batches = None

    def run_epoch(self) -> dict[str, float]:
        """Train one epoch, score the validation split and return the epoch's metrics."""
        epoch = self.epoch + 1
        start = time.perf_counter()
        self.train_module.train()
        order = torch.randperm(self.train_rows, generator=self.shuffle_generator)
        if self.world_size > 1:
            order = _shard(order, self.rank, self.world_size)
        batch_losses = []
        batch_rows = []
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        for x_batch, y_batch in self._batches(order):
            if self.amp_dtype is None:
                logits = self.train_module(x_batch)
                loss = self.criterion(logits, y_batch)
            else:
                with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype):
                    logits = self.train_module(x_batch)
                    loss = self.criterion(logits, y_batch)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is None:
                loss.backward()
                self.optimizer.step()
            else:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            # Losses stay on the device and are checked once per epoch, which avoids a
            # device-to-host sync after every batch.
            batch_losses.append(loss.detach())
            batch_rows.append(len(y_batch))
            correct += (logits.detach().argmax(dim=1) == y_batch).sum()
        metrics = self._train_metrics(torch.stack(batch_losses), batch_rows, correct, epoch)
        if self.validation_rows:
            metrics["val_loss"], metrics["val_accuracy"] = self._score_validation()
        self.epoch = epoch
        for name, value in metrics.items():
            self.history.setdefault(name, []).append(value)
        seconds = time.perf_counter() - start
        if self.session.is_main:
            logger.info(
                "epoch %d/%d: %s (%.2f s, %.0f train samples/s)",
                epoch,
                self.config.epochs,
                _format_metrics(metrics),
                seconds,
                self.train_rows / seconds,
            )
        return metrics

    def _batches(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the epoch's batches, on the device, in the order of the indices ``order``."""
        batch_size = self.config.batch_size
        if not self.dataloader_workers:
            device_order = order.to(self.device)
            x_epoch = self.x_train[device_order]
            y_epoch = self.y_train[device_order]
            for begin in range(0, len(order), batch_size):
                yield x_epoch[begin : begin + batch_size], y_epoch[begin : begin + batch_size]
            return
        loader = self._dataloader()
        self._loader_batches.batches = list(order.split(batch_size))
        non_blocking = self.device.type == "cuda"
        for x_batch, y_batch in loader:
            yield (
                x_batch.to(self.device, non_blocking=non_blocking),
                y_batch.to(self.device, non_blocking=non_blocking),
            )

    def _dataloader(self) -> Any:
        if self._loader is None:
            from torch.utils.data import DataLoader, TensorDataset

            self._loader_batches = _EpochBatches()
            # batch_size=None makes each sampler item one whole batch of indices, which the
            # TensorDataset gathers in one indexing call. The loader's own generator keeps its
            # worker seeds from consuming the global RNG, so results match the in-memory path.
            self._loader = DataLoader(
                TensorDataset(self.x_train, self.y_train),
                batch_size=None,
                sampler=self._loader_batches,
                num_workers=self.dataloader_workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=True,
                prefetch_factor=DATALOADER_PREFETCH_FACTOR,
                generator=torch.Generator(),
            )
        return self._loader

    def _train_metrics(
        self, losses: torch.Tensor, batch_rows: list[int], correct: torch.Tensor, epoch: int
    ) -> dict[str, float]:
        """Return train_loss and train_accuracy; raise TrainingError on a non-finite loss.

        train_loss is the mean of the batch losses weighted by batch rows. Each batch loss is the
        class-weighted cross entropy that the optimizer minimises. In a torchrun job the sums
        come from every process, and count the few rows that padding repeats so that each
        process gets the same number of batches.
        """
        batch_size = self.config.batch_size
        learning_rate = self.config.learning_rate
        if self.world_size == 1:
            _raise_on_non_finite(losses, epoch, batch_size, learning_rate)
            rows = torch.tensor(batch_rows, dtype=losses.dtype, device=self.device)
            return {
                "train_loss": float((losses * rows).sum()) / self.train_rows,
                "train_accuracy": int(correct) / self.train_rows,
            }
        rows = torch.tensor(batch_rows, dtype=torch.float64, device=self.device)
        local_non_finite = (~torch.isfinite(losses)).sum()
        sums = torch.stack(
            [
                (losses.double() * rows).sum(),
                correct.double(),
                rows.sum(),
                local_non_finite.double(),
            ]
        )
        loss_sum, correct_sum, row_sum, non_finite = self.session.all_reduce_sum(sums).tolist()
        if non_finite:
            if int(local_non_finite):
                _raise_on_non_finite(losses, epoch, batch_size, learning_rate)
            raise TrainingError(
                f"training loss is not finite at epoch {epoch} in another process of the "
                f"torchrun job (batch size {batch_size}, learning rate {learning_rate:g}); lower "
                "the learning rate or check the snapshot's features for NaN or infinite values"
            )
        return {"train_loss": loss_sum / row_sum, "train_accuracy": correct_sum / row_sum}

    @torch.inference_mode()
    def _score_validation(self) -> tuple[float, float]:
        """Return the plain (unweighted) mean cross entropy and the accuracy on validation.

        Batches have the training batch size, which is known to fit in the device's memory.
        """
        batch_size = self.config.batch_size
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        autocast = (
            contextlib.nullcontext()
            if self.amp_dtype is None
            else torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)
        )
        with autocast:
            for begin in range(0, len(self.y_val), batch_size):
                x_batch = self.x_val[begin : begin + batch_size]
                y_batch = self.y_val[begin : begin + batch_size]
                logits = self.model(x_batch)
                loss_sum += nn.functional.cross_entropy(logits, y_batch, reduction="sum")
                correct += (logits.argmax(dim=1) == y_batch).sum()
        if self.world_size == 1:
            return float(loss_sum) / self.validation_rows, int(correct) / self.validation_rows
        sums = torch.stack([loss_sum.double(), correct.double()])
        loss_total, correct_total = self.session.all_reduce_sum(sums).tolist()
        return loss_total / self.validation_rows, correct_total / self.validation_rows

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
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "history": self.history,
            "rng": {
                "torch": torch.get_rng_state(),
                # Only this process's GPU: reading every GPU's state would create a CUDA
                # context on each of them.
                "cuda": (
                    [torch.cuda.get_rng_state(self.device)] if self.device.type == "cuda" else []
                ),
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
        if self.scaler is not None and checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.epoch = int(checkpoint["epoch"])
        self.history = {name: list(values) for name, values in checkpoint["history"].items()}
        rng = checkpoint["rng"]
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and rng["cuda"]:
            torch.cuda.set_rng_state(rng["cuda"][0], self.device)
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


class _EpochBatches(torch.utils.data.Sampler):
    """Sampler over the current epoch's batches of indices, set before each epoch.

    The DataLoader's persistent workers outlive an epoch, so the sampler object stays and only
    its batches change.
    """

    def __init__(self) -> None:
        self.batches: list[torch.Tensor] = []

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Return process ``rank``'s share of the permutation ``order``, as DistributedSampler does.

    ``order`` is padded by repeating its first indices to a multiple of ``world_size``, so every
    process gets the same number of rows and batches, which DDP's gradient all-reduce requires.
    """
    total = math.ceil(len(order) / world_size) * world_size
    if total > len(order):
        order = order.repeat(math.ceil(total / len(order)))[:total]
    return order[rank:total:world_size]


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
    expected = _expected_feature_shape(spec)
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


def _expected_feature_shape(spec: PipelineSpec) -> tuple[int, ...]:
    """Return the shape of one sample's features: (channels, height, width) or (features,)."""
    if spec.dataset.kind == "images" and spec.dataset.image is not None:
        image = spec.dataset.image
        channels = 1 if image.mode == "L" else len(image.mode)
        return (channels, image.height, image.width)
    return (len(spec.dataset.columns),)


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
    spec: PipelineSpec, snapshot: Snapshot, config: RunConfig, trainer: Trainer
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


def _log_model(trainer: Trainer) -> tuple[str, str]:
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


def _parse_int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}: expected an integer of at least {minimum}"
            )
        return value

    return parse


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ml_loop.train",
        description="Train the spec's model on a snapshot and log the run to MLflow. "
        "The last stdout line is the TrainResult as JSON. Options left out take the spec's "
        "training and compute defaults. Under torchrun, rank 0 alone prints the result.",
    )
    parser.add_argument("--spec", required=True, help="spec name in include/specs, or a YAML path")
    parser.add_argument("--snapshot-uri", required=True, help="snapshot folder to train on")
    parser.add_argument("--epochs", type=int, help="passes over the train split")
    parser.add_argument("--learning-rate", type=float, help="Adam learning rate")
    parser.add_argument("--batch-size", type=int, help="samples per optimizer step and process")
    parser.add_argument("--seed", type=int, help="seed of torch, numpy and Python's random")
    parser.add_argument(
        "--gpus",
        type=_parse_int_at_least(-1),
        help="GPUs to train on: 0 for CPU, N for N GPUs, -1 for every visible GPU "
        "(default: the spec's compute.gpus); more than one needs torchrun",
    )
    parser.add_argument(
        "--dataloader-workers",
        type=_parse_int_at_least(0),
        help="DataLoader worker processes per training process; 0 slices batches from "
        "in-memory tensors (default: the spec's compute.dataloader_workers)",
    )
    parser.add_argument(
        "--backend",
        choices=TRAIN_BACKENDS,
        default="local",
        help="where this process runs, recorded as the run tag ml_loop.train_backend "
        "(default: local)",
    )
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
    context = devices.DistributedContext.from_env()
    rank_prefix = f"rank {context.rank} " if context.is_distributed else ""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {rank_prefix}%(name)s %(message)s",
    )
    spec = load_spec(args.spec)
    gpus = spec.compute.gpus if args.gpus is None else args.gpus
    # The GPU check runs again in train_model; running it here first fails a misconfigured
    # container before the config is built.
    devices.check_gpus(gpus, local_rank=context.local_rank)
    params = {
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "batch_size": args.batch_size,
        "seed": args.seed,
    }
    config = RunConfig.from_params(spec, params)
    result = train_model(
        spec,
        args.snapshot_uri,
        config,
        root=args.data_dir,
        run_tags=dict(args.run_tag),
        gpus=gpus,
        dataloader_workers=args.dataloader_workers,
        backend=args.backend,
    )
    if not context.is_main:
        return 0
    payload = result.to_dict()
    if args.result_file:
        write_json_atomic(Path(args.result_file), payload)
    sys.stdout.flush()
    print(json.dumps(payload, sort_keys=True), flush=True)  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
