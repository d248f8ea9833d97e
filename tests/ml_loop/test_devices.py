"""Tests for the train command, the GPU and shared-memory pre-flight checks and device helpers."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed import run as torchrun

from ml_loop import devices
from ml_loop.errors import SpecError, TrainingError

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_REQUEST = {"backend": "docker", "device_requests": [{"count": 1, "capabilities": [["gpu"]]}]}


def test_train_command_cpu() -> None:
    command = devices.train_command(0, ["--spec", "digits"])
    assert command == ["python", "-m", "ml_loop.train", "--spec", "digits"]


def test_train_command_one_gpu() -> None:
    command = devices.train_command(1, ["--spec", "digits"], python="/venv/bin/python")
    assert command == ["/venv/bin/python", "-m", "ml_loop.train", "--spec", "digits"]


def test_train_command_several_gpus() -> None:
    command = devices.train_command(4, ["--spec", "digits"])
    assert command == [
        "torchrun",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "4",
        "-m",
        "ml_loop.train",
        "--spec",
        "digits",
    ]


def test_train_command_all_gpus() -> None:
    command = devices.train_command(-1, ["--spec", "digits"])
    assert command == [
        "torchrun",
        "--standalone",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "gpu",
        "-m",
        "ml_loop.train",
        "--spec",
        "digits",
    ]


@pytest.mark.parametrize("gpus", [-2, True, 1.5])
def test_train_command_rejects_count(gpus) -> None:
    with pytest.raises(SpecError, match="invalid GPU count"):
        devices.train_command(gpus, [])


def test_torchrun_parses_all_gpus_command() -> None:
    command = devices.train_command(-1, ["--spec", "digits", "--gpus", "-1"])
    args = torchrun.get_args_parser().parse_args(command[1:])
    assert args.standalone
    assert args.nproc_per_node == "gpu"
    assert args.module
    assert args.training_script == "ml_loop.train"
    assert args.training_script_args == ["--spec", "digits", "--gpus", "-1"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_torchrun_all_gpus_without_cuda() -> None:
    with pytest.raises(ValueError, match="Cuda is not available"):
        torchrun.determine_local_world_size("gpu")


def test_check_gpus_cpu() -> None:
    assert devices.check_gpus(0, visible=0) == 0


def test_check_gpus_enough() -> None:
    assert devices.check_gpus(2, visible=4) == 2


def test_check_gpus_all_visible() -> None:
    assert devices.check_gpus(-1, visible=3) == 3


def test_check_gpus_none_visible() -> None:
    environ = {
        devices.DEVICE_REQUEST_ENV: json.dumps(DOCKER_REQUEST),
        "NVIDIA_VISIBLE_DEVICES": "all",
    }
    with pytest.raises(devices.GpuUnavailableError) as excinfo:
        devices.check_gpus(1, visible=0, environ=environ)
    message = str(excinfo.value)
    assert message.startswith("no GPU visible in the container: 1 GPU(s) requested")
    assert "torch detects none" in message
    assert '"backend": "docker"' in message
    assert '"capabilities": [["gpu"]]' in message
    assert "CUDA_VISIBLE_DEVICES=<unset>" in message
    assert "NVIDIA_VISIBLE_DEVICES='all'" in message
    assert f"torch {torch.__version__}" in message
    assert "NVIDIA container toolkit" in message
    assert "set compute.gpus to 0" in message
    assert isinstance(excinfo.value, TrainingError)


def test_check_gpus_fewer_visible() -> None:
    environ = {"CUDA_VISIBLE_DEVICES": "0"}
    with pytest.raises(devices.GpuUnavailableError) as excinfo:
        devices.check_gpus(2, visible=1, environ=environ)
    message = str(excinfo.value)
    assert message.startswith("no GPU visible in the container: 2 GPU(s) requested")
    assert "torch detects only 1" in message
    assert "CUDA_VISIBLE_DEVICES='0'" in message
    assert "none recorded" in message


def test_check_gpus_all_requested_none_visible() -> None:
    with pytest.raises(devices.GpuUnavailableError, match=r"all GPUs \(-1\) requested"):
        devices.check_gpus(-1, visible=0, environ={})


def test_check_gpus_local_rank_beyond() -> None:
    with pytest.raises(devices.GpuUnavailableError, match="LOCAL_RANK=2, so it needs GPU 2"):
        devices.check_gpus(-1, visible=2, local_rank=2, environ={})


def test_check_gpus_invalid_request_json() -> None:
    environ = {devices.DEVICE_REQUEST_ENV: "{count: 1"}
    with pytest.raises(devices.GpuUnavailableError, match="not valid JSON"):
        devices.check_gpus(1, visible=0, environ=environ)


def test_check_gpus_rejects_count() -> None:
    with pytest.raises(SpecError, match="invalid GPU count -3"):
        devices.check_gpus(-3, visible=8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU")
def test_check_gpus_asks_torch() -> None:
    with pytest.raises(devices.GpuUnavailableError, match="CUDA build"):
        devices.check_gpus(1)


def test_shared_memory_estimate() -> None:
    assert devices.shared_memory_estimate(4, 1000, prefetch_factor=3) == 4 * 3 * 1000 * 2


def free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def test_check_shared_memory_fits(tmp_path) -> None:
    estimate = devices.check_shared_memory(2, 1024, path=tmp_path)
    assert estimate == devices.shared_memory_estimate(2, 1024)
    assert estimate < free_bytes(tmp_path)


def test_check_shared_memory_too_small(tmp_path) -> None:
    # One batch is as large as the free space, so the estimate is 8 times the free space.
    batch_bytes = free_bytes(tmp_path)
    with pytest.raises(devices.SharedMemoryError) as excinfo:
        devices.check_shared_memory(2, batch_bytes, path=tmp_path)
    message = str(excinfo.value)
    assert message.startswith(f"shared memory {tmp_path} is too small for 2 DataLoader workers")
    assert "MiB free of" in message
    assert "2 workers x 2 prefetched batches" in message
    assert "compute.docker.shm_size" in message
    assert "emptyDir" in message
    assert "lower compute.dataloader_workers" in message


def test_check_shared_memory_no_workers(tmp_path) -> None:
    assert devices.check_shared_memory(0, 10**15, path=tmp_path / "absent") == 0


def test_check_shared_memory_missing_path(tmp_path) -> None:
    with pytest.raises(devices.SharedMemoryError, match="cannot be read"):
        devices.check_shared_memory(1, 1024, path=tmp_path / "absent")


def test_check_shared_memory_rejects_workers(tmp_path) -> None:
    with pytest.raises(SpecError, match="workers=-1"):
        devices.check_shared_memory(-1, 1024, path=tmp_path)


@pytest.mark.parametrize(
    ("device_type", "bf16", "expected"),
    [
        ("cuda", True, "bf16"),
        ("cuda", False, "fp16"),
        ("cpu", True, "fp32"),
        ("cpu", False, "fp32"),
    ],
)
def test_pick_precision(device_type, bf16, expected) -> None:
    assert devices.pick_precision(device_type, bf16) == expected


def test_pick_precision_rejects_device() -> None:
    with pytest.raises(SpecError, match="'mps'"):
        devices.pick_precision("mps", True)


def test_bf16_supported_cpu() -> None:
    assert devices.bf16_supported(torch.device("cpu")) is False


def test_select_device_cpu() -> None:
    assert devices.select_device(0) == torch.device("cpu")


def test_describe_device_cpu() -> None:
    description = devices.describe_device(torch.device("cpu"), world_size=2)
    assert description == {
        "device_type": "cpu",
        "device_name": devices.cpu_model_name(),
        "device_count": 1,
        "cuda_version": torch.version.cuda or "none",
        "torch_version": torch.__version__,
        "precision": "fp32",
    }


def test_cpu_model_name_from_cpuinfo(tmp_path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Example CPU 9000\nflags\t: fpu\n")
    assert devices.cpu_model_name(cpuinfo) == "Example CPU 9000"


def test_cpu_model_name_missing_file(tmp_path) -> None:
    name = devices.cpu_model_name(tmp_path / "absent")
    assert name == (platform.processor() or platform.machine() or "unknown CPU")
    assert name


def test_context_single_process() -> None:
    context = devices.DistributedContext.from_env({})
    assert context == devices.DistributedContext(0, 0, 1, 1)
    assert not context.is_distributed
    assert context.is_main


def test_context_from_torchrun_env() -> None:
    environ = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    context = devices.DistributedContext.from_env(environ)
    assert context == devices.DistributedContext(3, 1, 4, 2)
    assert context.is_distributed
    assert not context.is_main


def test_context_world_size_only() -> None:
    context = devices.DistributedContext.from_env({"WORLD_SIZE": "2", "RANK": "1"})
    assert context.local_world_size == 2


def test_context_rejects_text() -> None:
    with pytest.raises(SpecError, match="invalid WORLD_SIZE='two'"):
        devices.DistributedContext.from_env({"WORLD_SIZE": "two"})


def test_context_rejects_rank_beyond_world() -> None:
    with pytest.raises(SpecError, match="invalid RANK=2 for WORLD_SIZE=2"):
        devices.DistributedContext.from_env({"WORLD_SIZE": "2", "RANK": "2"})


def test_context_rejects_local_rank_beyond() -> None:
    environ = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"}
    with pytest.raises(SpecError, match="invalid LOCAL_RANK=2"):
        devices.DistributedContext.from_env(environ)


def test_session_single_process() -> None:
    context = devices.DistributedContext()
    with devices.DistributedSession(context, torch.device("cpu")) as session:
        tensor = torch.tensor([1.0, 2.0])
        assert session.run_on_main(lambda: {"value": 7}, "testing") == {"value": 7}
        assert session.all_reduce_sum(tensor) is tensor
        assert tensor.tolist() == [1.0, 2.0]
        assert not torch.distributed.is_initialized()


def test_session_single_process_error() -> None:
    def fail() -> None:
        raise KeyError("lost")

    session = devices.DistributedSession(devices.DistributedContext(), torch.device("cpu"))
    with session, pytest.raises(KeyError, match="lost"):
        session.run_on_main(fail, "testing")


def test_import_loads_no_torch() -> None:
    code = "import sys, ml_loop.devices; print(sorted({'torch', 'mlflow'} & set(sys.modules)))"
    completed = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "include")},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert completed.stdout.strip() == "[]"
