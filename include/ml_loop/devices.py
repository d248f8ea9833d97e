"""Device selection and pre-flight checks for the train entry point ``python -m ml_loop.train``.

The Airflow operator that starts training imports this module at DAG parse time to build the
container command, so it imports only the standard library at module level. The functions that
need torch import it when they are called.

The pre-flight checks run before the trainer reads the snapshot or contacts MLflow. A training
container on a host without the GPUs or the shared memory it needs then fails within seconds,
with a message that names the fix, instead of training on CPU or crashing a DataLoader worker
later.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml_loop.errors import SpecError, TrainingError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TRAIN_MODULE = "ml_loop.train"
# JSON of the device request the backend made for the container, for example
# {"backend": "docker", "device_requests": [{"count": 1, "capabilities": [["gpu"]]}]}.
DEVICE_REQUEST_ENV = "ML_LOOP_DEVICE_REQUEST"
SHARED_MEMORY_PATH = "/dev/shm"
# Each batch that a DataLoader worker sends to the main process lives in shared memory until the
# main process releases it. Besides the prefetch_factor batches queued per worker, the main
# process keeps the batch it is training on, the pin-memory thread keeps a copy, and each
# tensor's segment is rounded up to whole pages. A factor of 2 over the queued batches covers
# those, and leaves room for other processes in the container that use the same tmpfs.
SHARED_MEMORY_SAFETY_FACTOR = 2
PRECISIONS = ("bf16", "fp16", "fp32")
MIB = 2**20


class GpuUnavailableError(TrainingError):
    """GPUs were requested, but torch detects none or fewer than requested."""


class SharedMemoryError(TrainingError):
    """The shared memory is too small for the requested DataLoader workers."""


@dataclasses.dataclass(frozen=True)
class DistributedContext:
    """This process's place in a torchrun job, read from the variables torchrun sets.

    A process not started by torchrun is rank 0 of a world of one.
    """

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DistributedContext:
        """Read RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE; raise SpecError if invalid."""
        environ = os.environ if environ is None else environ
        values = {}
        for field, name in (
            ("rank", "RANK"),
            ("local_rank", "LOCAL_RANK"),
            ("world_size", "WORLD_SIZE"),
            ("local_world_size", "LOCAL_WORLD_SIZE"),
        ):
            text = environ.get(name)
            if text is None or text == "":
                continue
            try:
                values[field] = int(text)
            except ValueError as err:
                raise SpecError(
                    f"invalid {name}={text!r}: expected an integer, as torchrun sets it"
                ) from err
        context = cls(**values)
        if "local_world_size" not in values and "world_size" in values:
            # One node: torchrun --standalone sets both, a hand-made launch may set only one.
            context = dataclasses.replace(context, local_world_size=context.world_size)
        if context.world_size < 1 or not 0 <= context.rank < context.world_size:
            raise SpecError(
                f"invalid RANK={context.rank} for WORLD_SIZE={context.world_size}: expected "
                "0 <= RANK < WORLD_SIZE; start distributed training through torchrun"
            )
        if not 0 <= context.local_rank < max(context.local_world_size, 1):
            raise SpecError(
                f"invalid LOCAL_RANK={context.local_rank} for LOCAL_WORLD_SIZE="
                f"{context.local_world_size}: expected 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE"
            )
        return context

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def train_command(gpus: int, args: Sequence[str], python: str = "python") -> list[str]:
    """Return the command that runs ``python -m ml_loop.train`` with ``args`` on ``gpus`` GPUs.

    More than one GPU (``gpus`` > 1), or every visible GPU (``gpus`` == -1), starts one process
    per GPU with ``torchrun --standalone`` on this node. torch 2.13's torchrun reads
    ``--nproc-per-node gpu`` as ``torch.cuda.device_count()`` processes, and exits with
    ``ValueError: Cuda is not available.`` before starting any process on a host without CUDA.
    Otherwise a single process runs with ``python``.
    """
    _check_gpu_count(gpus)
    if gpus > 1 or gpus == -1:
        nproc = "gpu" if gpus == -1 else str(gpus)
        return [
            "torchrun",
            "--standalone",
            "--nnodes",
            "1",
            "--nproc-per-node",
            nproc,
            "-m",
            TRAIN_MODULE,
            *args,
        ]
    return [python, "-m", TRAIN_MODULE, *args]


def check_gpus(
    requested: int,
    *,
    visible: int | None = None,
    local_rank: int = 0,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Check that torch detects the requested GPUs; return how many this run uses (0: CPU).

    ``requested`` is 0 for CPU, N for N GPUs or -1 for every visible GPU. ``visible`` is the
    number of GPUs torch detects (None: ``torch.cuda.device_count()``). A process of a torchrun job
    also needs the GPU of its ``local_rank``. Raises GpuUnavailableError when the GPUs are not
    there: training never falls back to the CPU on its own.
    """
    _check_gpu_count(requested)
    if requested == 0:
        return 0
    if visible is None:
        import torch

        visible = torch.cuda.device_count()
    needed = max(1 if requested == -1 else requested, local_rank + 1)
    if visible < needed:
        environ = os.environ if environ is None else environ
        raise GpuUnavailableError(_gpu_message(requested, needed, visible, local_rank, environ))
    return visible if requested == -1 else requested


def _check_gpu_count(gpus: int) -> None:
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < -1:
        raise SpecError(
            f"invalid GPU count {gpus!r}: expected 0 (CPU), a positive number of GPUs or -1 "
            "(every visible GPU); set compute.gpus in the spec or --gpus"
        )


def _gpu_message(
    requested: int, needed: int, visible: int, local_rank: int, environ: Mapping[str, str]
) -> str:
    import torch

    requested_text = "all GPUs (-1)" if requested == -1 else f"{requested} GPU(s)"
    if visible == 0:
        problem = f"{requested_text} requested, torch detects none"
    else:
        problem = f"{requested_text} requested, torch detects only {visible}"
    if needed > max(requested, 1):
        problem += f" and this process has LOCAL_RANK={local_rank}, so it needs GPU {local_rank}"
    request = environ.get(DEVICE_REQUEST_ENV)
    if request:
        try:
            request = json.dumps(json.loads(request), sort_keys=True)
        except ValueError:
            request = f"{request!r} (not valid JSON)"
    else:
        request = "none recorded"
    cuda_build = torch.version.cuda or "none (a CPU-only build of torch, which cannot use a GPU)"
    return (
        f"no GPU visible in the container: {problem}. "
        f"Device request made by the backend ({DEVICE_REQUEST_ENV}): {request}. "
        f"CUDA_VISIBLE_DEVICES={_env_value(environ, 'CUDA_VISIBLE_DEVICES')}, "
        f"NVIDIA_VISIBLE_DEVICES={_env_value(environ, 'NVIDIA_VISIBLE_DEVICES')}. "
        f"torch {torch.__version__}, CUDA build {cuda_build}. "
        "Fix: run on a GPU host with the NVIDIA driver and the NVIDIA container toolkit "
        "(Docker needs a GPU device request, Kubernetes the nvidia.com/gpu resource and the "
        "NVIDIA device plugin), or set compute.gpus to 0 to train on CPU"
    )


def _env_value(environ: Mapping[str, str], name: str) -> str:
    value = environ.get(name)
    return "<unset>" if value is None else repr(value)


def shared_memory_estimate(workers: int, batch_bytes: int, prefetch_factor: int = 2) -> int:
    """Return the estimated shared memory, in bytes, that ``workers`` DataLoader workers use."""
    return workers * prefetch_factor * batch_bytes * SHARED_MEMORY_SAFETY_FACTOR


def check_shared_memory(
    workers: int,
    batch_bytes: int,
    path: str | Path = SHARED_MEMORY_PATH,
    prefetch_factor: int = 2,
) -> int:
    """Check that ``path`` has room for the batches of ``workers`` DataLoader workers.

    ``workers`` counts every worker on the host (workers per process times the processes), and
    ``batch_bytes`` is the size of one batch of features and labels. Returns the estimate in
    bytes (0 when ``workers`` is 0). Raises SharedMemoryError when the free space of ``path`` is
    below the estimate.
    """
    if workers < 0 or batch_bytes < 0 or prefetch_factor < 1:
        raise SpecError(
            f"invalid shared-memory check: workers={workers}, batch_bytes={batch_bytes}, "
            f"prefetch_factor={prefetch_factor}; expected workers and batch_bytes of at least 0 "
            "and prefetch_factor of at least 1"
        )
    if workers == 0:
        return 0
    estimate = shared_memory_estimate(workers, batch_bytes, prefetch_factor)
    try:
        stats = os.statvfs(path)
    except OSError as err:
        raise SharedMemoryError(
            f"shared memory {path} cannot be read ({err}), but {workers} DataLoader workers "
            "need it; mount a tmpfs at /dev/shm or set compute.dataloader_workers to 0"
        ) from err
    size = stats.f_blocks * stats.f_frsize
    free = stats.f_bavail * stats.f_frsize
    if free < estimate:
        raise SharedMemoryError(
            f"shared memory {path} is too small for {workers} DataLoader workers: "
            f"{free / MIB:.1f} MiB free of {size / MIB:.1f} MiB, but the workers need an "
            f"estimated {estimate / MIB:.1f} MiB ({workers} workers x {prefetch_factor} "
            f"prefetched batches x {batch_bytes / MIB:.2f} MiB per batch x "
            f"{SHARED_MEMORY_SAFETY_FACTOR} safety factor). Fix: raise compute.docker.shm_size "
            "(Docker) or the sizeLimit of the pod's /dev/shm emptyDir "
            "(compute.kubernetes.shm_size), or lower compute.dataloader_workers"
        )
    logger.debug(
        "shared memory %s: %.1f MiB free, %.1f MiB estimated for %d DataLoader workers",
        path,
        free / MIB,
        estimate / MIB,
        workers,
    )
    return estimate


def pick_precision(device_type: str, bf16_supported: bool) -> str:
    """Return the training precision: bf16 or fp16 autocast on CUDA, fp32 on CPU.

    fp16 needs loss scaling (``torch.amp.GradScaler``), because small gradients underflow in
    float16. bf16 has float32's exponent range and needs none.
    """
    if device_type == "cuda":
        return "bf16" if bf16_supported else "fp16"
    if device_type == "cpu":
        return "fp32"
    raise SpecError(
        f"invalid device type {device_type!r}: the trainer runs on 'cuda' or 'cpu' only"
    )


def bf16_supported(device: torch.device) -> bool:
    """Return whether ``device`` computes bfloat16 natively (Ampere and newer NVIDIA GPUs)."""
    if device.type != "cuda":
        return False
    import torch

    # Without including_emulation=False, torch 2.13 also reports True for GPUs that only emulate
    # bfloat16, and emulated autocast is slower than float32.
    return torch.cuda.is_bf16_supported(including_emulation=False)


def select_device(gpus_in_use: int, local_rank: int = 0) -> torch.device:
    """Return the device of this process: the CPU for 0 GPUs, else the GPU of ``local_rank``.

    ``gpus_in_use`` is what ``check_gpus`` returned. Selecting a GPU also makes it the current
    CUDA device, which NCCL requires of each process.
    """
    import torch

    if gpus_in_use == 0:
        return torch.device("cpu")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def describe_device(device: torch.device, world_size: int) -> dict[str, Any]:
    """Describe the training hardware: type, name, count, CUDA and torch versions, precision.

    ``device_count`` is the number of GPUs the job trains on (one per process) on CUDA, and 1 on
    CPU, where every process shares the host's CPU.
    """
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        count = world_size
    else:
        name = cpu_model_name()
        count = 1
    return {
        "device_type": device.type,
        "device_name": name,
        "device_count": count,
        "cuda_version": torch.version.cuda or "none",
        "torch_version": torch.__version__,
        "precision": pick_precision(device.type, bf16_supported(device)),
    }


def cpu_model_name(cpuinfo: str | Path = "/proc/cpuinfo") -> str:
    """Return the CPU model from ``cpuinfo`` (Linux), else what ``platform`` reports."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


class DistributedSession:
    """The process group of a torchrun job, joined on enter and destroyed on exit.

    Gradients and metric sums travel over NCCL on CUDA and gloo on CPU. Messages from rank 0
    (the outcome of its MLflow calls) travel over a separate gloo group, so the other ranks wait
    for them on the CPU and no NCCL timeout applies while rank 0 logs the model. With a world of
    one, entering and leaving do nothing and every method runs locally.
    """

    # Rank 0 may spend this long on MLflow calls (model logging included) while the others wait.
    MESSAGE_TIMEOUT_S = 1800

    def __init__(self, context: DistributedContext, device: torch.device) -> None:
        self.context = context
        self.device = device
        self._owns_group = False
        self._message_group: Any = None

    def __enter__(self) -> DistributedSession:
        if not self.context.is_distributed:
            return self
        import datetime as dt

        import torch.distributed as dist

        if not dist.is_initialized():
            if self.device.type == "cuda":
                dist.init_process_group("nccl", device_id=self.device)
            else:
                dist.init_process_group("gloo")
            self._owns_group = True
        if dist.get_world_size() != self.context.world_size:
            raise TrainingError(
                f"the process group has {dist.get_world_size()} processes, but WORLD_SIZE is "
                f"{self.context.world_size}; start training through torchrun"
            )
        self._message_group = dist.new_group(
            backend="gloo", timeout=dt.timedelta(seconds=self.MESSAGE_TIMEOUT_S)
        )
        logger.info(
            "rank %d of %d joined the process group (%s backend) on %s",
            self.context.rank,
            self.context.world_size,
            dist.get_backend(),
            self.device,
        )
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owns_group = False
        self._message_group = None

    @property
    def is_main(self) -> bool:
        return self.context.is_main

    def run_on_main(self, func: Callable[[], Any], step: str) -> Any:
        """Run ``func`` on rank 0 only and return its result on every rank.

        The result must pickle. When ``func`` raises on rank 0, rank 0 re-raises it and every
        other rank raises TrainingError naming ``step`` and the error, so no rank waits forever.
        """
        if not self.context.is_distributed:
            return func()
        import torch.distributed as dist

        message: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                message[0] = ("ok", func())
            except BaseException as err:
                error = err
                message[0] = ("error", f"{type(err).__name__}: {err}")
        dist.broadcast_object_list(message, src=0, group=self._message_group)
        if error is not None:
            raise error
        status, value = message[0]
        if status == "error":
            raise TrainingError(f"rank 0 failed while {step}: {value}")
        return value

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over every rank in place and return it."""
        if self.context.is_distributed:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor
