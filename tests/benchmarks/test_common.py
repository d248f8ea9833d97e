"""Tests of benchmarks/common.py: ports, the environment block, the MLflow server, PlainLoop."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import common
from ml_loop.spec import RunConfig, load_spec
from ml_loop.train import SPLIT_TRAIN, SPLIT_VALIDATION, Snapshot


def tiny_snapshot(rows: int = 64) -> Snapshot:
    """Random digits-shaped rows, the last 8 in the validation split."""
    generator = np.random.default_rng(0)
    split = np.full(rows, SPLIT_TRAIN, dtype=np.uint8)
    split[-8:] = SPLIT_VALIDATION
    return common.in_memory_snapshot(
        generator.random((rows, 1, 28, 28), dtype=np.float32),
        generator.integers(0, 10, rows).astype(np.int64),
        split,
    )


def test_in_memory_snapshot_all_train() -> None:
    snapshot = common.in_memory_snapshot(np.zeros((3, 1, 28, 28), np.float32), np.arange(3))

    assert snapshot.split.tolist() == [SPLIT_TRAIN] * 3
    assert snapshot.ids.tolist() == ["digit-00000", "digit-00001", "digit-00002"]


def weights_after_one_epoch(seed: int) -> list[torch.Tensor]:
    spec = load_spec("digits")
    config = RunConfig.from_params(spec, {"seed": seed, "batch_size": 16})
    plain = common.PlainLoop(spec, tiny_snapshot(), config)
    plain.run_epoch()
    return [tensor.detach().clone() for tensor in plain.model.state_dict().values()]


def test_stack_ports_distinct() -> None:
    ports = [int(port) for port in common.stack_ports().values()]

    assert len(ports) == len(common.STACK_PORT_NAMES)
    assert len(set(ports)) == len(ports)


def test_stack_ports_serving_neighbour_free() -> None:
    ports = common.stack_ports()
    serving_next = int(ports["ML_LOOP_SERVING_PORT"]) + 1

    assert str(serving_next) not in ports.values()
    assert common.port_is_free(serving_next)


def test_port_is_free_bound_port() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        assert not common.port_is_free(sock.getsockname()[1])


def test_environment_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ML_LOOP_BENCH_KEPT", "before")
    monkeypatch.delenv("ML_LOOP_BENCH_NEW", raising=False)

    with common.environment({"ML_LOOP_BENCH_KEPT": "inside", "ML_LOOP_BENCH_NEW": "inside"}):
        assert os.environ["ML_LOOP_BENCH_KEPT"] == "inside"
        assert os.environ["ML_LOOP_BENCH_NEW"] == "inside"

    assert os.environ["ML_LOOP_BENCH_KEPT"] == "before"
    assert "ML_LOOP_BENCH_NEW" not in os.environ


def test_environment_restores_on_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ML_LOOP_BENCH_NEW", raising=False)

    with pytest.raises(RuntimeError), common.environment({"ML_LOOP_BENCH_NEW": "inside"}):
        raise RuntimeError("fails inside the block")

    assert "ML_LOOP_BENCH_NEW" not in os.environ


def test_plain_loop_train_split_only() -> None:
    spec = load_spec("digits")
    plain = common.PlainLoop(spec, tiny_snapshot(), RunConfig.from_params(spec, None))

    assert plain.train_rows == 56


def test_plain_loop_keeps_caller_rng() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()

    weights_after_one_epoch(seed=7)

    assert torch.equal(torch.get_rng_state(), before)


def test_plain_loop_same_seed_same_weights() -> None:
    first = weights_after_one_epoch(seed=7)
    second = weights_after_one_epoch(seed=7)

    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_plain_loop_other_seed_other_weights() -> None:
    first = weights_after_one_epoch(seed=7)
    other = weights_after_one_epoch(seed=8)

    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_mlflow_server_starts_and_stops(tmp_path: Path) -> None:
    with (
        common.mlflow_server(tmp_path / "mlflow") as url,
        urllib.request.urlopen(f"{url}/health", timeout=10) as response,
    ):
        status = response.status

    assert status == 200
    assert (tmp_path / "mlflow" / "mlflow" / "mlflow.db").is_file()
    # The port itself may stay in TIME_WAIT for a while, so the check is a refused connection.
    with pytest.raises(urllib.error.URLError, match="Connection refused"):
        urllib.request.urlopen(f"{url}/health", timeout=5)
