"""Helpers that the benchmark scripts share.

Importing this module puts ``include/`` and ``plugins/`` on ``sys.path``, so that a script run
as ``python benchmarks/<name>.py`` imports ``ml_loop``, ``local_stack`` and ``ml_loop_airflow``
without a PYTHONPATH. Heavy libraries (torch, mlflow, Airflow) are imported inside the functions
that use them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
for _folder in ("include", "plugins"):
    if str(REPO_ROOT / _folder) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / _folder))

# The landing date of the digits snapshot that the benchmarks train on.
SNAPSHOT_DATE = dt.date(2026, 11, 5)
STACK_PORT_NAMES = ("AIRFLOW", "MLFLOW", "WORKER_LOG", "TRIGGERER_LOG", "SERVING")


def machine_description() -> str:
    """Describe this machine in one line: cores, CPU model, memory, system, Python and torch."""
    import torch

    from ml_loop.devices import cpu_model_name

    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu_model_name()}), {memory_gib:.0f} GiB memory, no GPU used, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def load_average() -> list[float]:
    """Return the 1, 5 and 15 minute load averages of the machine, rounded to 0.01."""
    return [round(value, 2) for value in os.getloadavg()]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stack_ports() -> dict[str, str]:
    """Pick distinct free ports for a local stack, as its ``ML_LOOP_*_PORT`` variables.

    The model servers listen on ``ML_LOOP_SERVING_PORT`` and the port after it, so that one must
    be free too.
    """
    while True:
        ports = {f"ML_LOOP_{name}_PORT": free_port() for name in STACK_PORT_NAMES}
        used = [*ports.values(), ports["ML_LOOP_SERVING_PORT"] + 1]
        if len(set(used)) == len(used) and port_is_free(ports["ML_LOOP_SERVING_PORT"] + 1):
            return {name: str(port) for name, port in ports.items()}


@contextlib.contextmanager
def mlflow_server(state_dir: Path) -> Iterator[str]:
    """Start the local stack's MLflow server alone, on free ports; yield its URL; stop it.

    The server is the one ``make run`` starts (``local_stack``: SQLite store and artifacts under
    ``state_dir/mlflow``, one web worker, 127.0.0.1). It stops by its process group on exit,
    also when the block raises.
    """
    from local_stack.config import StackConfig
    from local_stack.stack import LocalStack

    config = StackConfig.from_env(
        REPO_ROOT,
        state_dir=state_dir,
        services=["mlflow"],
        environ={**os.environ, **stack_ports()},
    )
    with LocalStack(config) as stack:
        yield stack.config.mlflow_url


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block, then restore their earlier values."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def build_snapshot(spec: Any, root: Path, run_date: dt.date = SNAPSHOT_DATE) -> dict[str, Any]:
    """Land the spec's batches and run ingest, validate, process and store under ``root``.

    Return the store step's SnapshotRef dict. The steps are the pipeline's own, so the snapshot
    is the one a DAG run of ``run_date`` trains on.
    """
    from ml_loop.landing import land_days
    from ml_loop.pipeline import ingest_step, process_step, store_step, validate_step
    from ml_loop.spec import RunConfig

    config = RunConfig.from_params(spec, None)
    land_days(spec, run_date, spec.dataset.landing_days, root)
    ingested = ingest_step(spec, run_date, config, root)
    validated = validate_step(spec, ingested, root)
    processed = process_step(spec, validated, root)
    return store_step(spec, processed, validated, root)


def in_memory_snapshot(x: Any, y: Any, split: Any = None) -> Any:
    """Wrap arrays as an ``ml_loop.train.Snapshot``; ``split=None`` puts every row in train.

    The normalisation stats are the mean and standard deviation of all of ``x``.
    """
    import numpy as np

    from ml_loop.train import SPLIT_TRAIN, Snapshot

    if split is None:
        split = np.full(len(y), SPLIT_TRAIN, dtype=np.uint8)
    return Snapshot(
        uri="memory:digits",
        version_id="in-memory",
        dataset="digits",
        manifest={"stats": {"mean": [float(x.mean())], "std": [float(x.std())]}},
        x=x,
        y=y,
        ids=np.array([f"digit-{index:05d}" for index in range(len(y))]),
        split=split,
    )


class PlainLoop:
    """The spec's model trained on a snapshot's train split by a minimal PyTorch loop.

    It is the baseline the trainer is measured against: Adam and unweighted cross-entropy over
    shuffled batches sliced from tensors on ``device``, with no validation, tracking, checkpoint
    or class weights. ``precision`` "bf16" or "fp16" runs the forward pass under autocast, and
    "fp16" adds a GradScaler, as the trainer does. The loop keeps its own state of the global
    CPU generator (dropout on the CPU) and restores the caller's after each epoch, so running
    it between the trainer's epochs leaves the trainer's random draws unchanged.
    """

    def __init__(
        self,
        spec: Any,
        snapshot: Any,
        config: Any,
        device: Any = None,
        precision: str = "fp32",
    ) -> None:
        import torch
        from torch import nn

        from ml_loop import models
        from ml_loop.train import SPLIT_TRAIN, snapshot_model_config

        self.device = torch.device("cpu") if device is None else device
        x, y, _ = snapshot.subset(SPLIT_TRAIN)
        self.x = torch.from_numpy(x).to(self.device)
        self.y = torch.from_numpy(y).to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = models.build_model(snapshot_model_config(spec, snapshot)).to(self.device)
            self.rng_state = torch.get_rng_state()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.learning_rate)
        self.criterion = nn.CrossEntropyLoss()
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # A disabled GradScaler passes the loss and the optimizer step through unchanged.
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
        self.generator = torch.Generator().manual_seed(config.seed)
        self.batch_size = config.batch_size

    @property
    def train_rows(self) -> int:
        return len(self.y)

    def run_epoch(self) -> float:
        """Train one epoch; return its wall time in seconds, up to the last loss on the host."""
        import torch

        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng_state)
            self.model.train()
            order = torch.randperm(self.train_rows, generator=self.generator).to(self.device)
            x_epoch, y_epoch = self.x[order], self.y[order]
            for begin in range(0, self.train_rows, self.batch_size):
                x_batch = x_epoch[begin : begin + self.batch_size]
                y_batch = y_epoch[begin : begin + self.batch_size]
                with torch.autocast(
                    device_type=self.device.type,
                    dtype=self.amp_dtype,
                    enabled=self.amp_dtype is not None,
                ):
                    loss = self.criterion(self.model(x_batch), y_batch)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            # The trainer reads its epoch metrics back to the host, which waits for the device;
            # reading the last loss does the same once.
            float(loss.detach())
            self.rng_state = torch.get_rng_state()
        return time.perf_counter() - start
