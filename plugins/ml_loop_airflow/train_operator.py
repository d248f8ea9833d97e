"""The train task: one operator that runs ``python -m ml_loop.train`` on one of three backends.

The backend is picked per run by the param ``train_backend`` (default: the spec's
``compute.backend``), so the DAG stays the same whichever backend trains:

- ``local``: a subprocess of the Airflow worker, with the worker's environment;
- ``docker``: a container on the worker's Docker engine, through the Docker provider's
  ``DockerOperator``;
- ``kubernetes``: a pod, through the cncf-kubernetes provider's ``KubernetesPodOperator``.

Every backend runs the same command, built by ``ml_loop.devices.train_command`` from the same
arguments (``TrainJob.args``), and returns the same XCom: the ``TrainResult`` dict that the
entry point prints as JSON on its last stdout line.

The provider operators are not subclassed, because the backend is only known at run time, from
the run's params. ``TrainOperator.execute`` builds the provider operator for the run's backend
and calls its ``execute``. Around that call it does what the providers leave out: it removes the
container or pods of an earlier attempt, it checks that the image exists, and it turns the
engine's errors into messages that name the fix.

The Docker SDK, the Kubernetes client and the provider modules are imported inside methods, so
parsing a DAG file that uses this operator loads none of them.

Environment variables read by the worker:

- ``ML_LOOP_DATA_DIR``: the data root, passed to the entry point as ``--data-dir``.
- ``MLFLOW_TRACKING_URI``: passed to the container or pod. With Docker's host networking a
  ``127.0.0.1`` URI reaches the same server. A pod needs a URI that resolves in the cluster.
- ``ML_LOOP_TRAIN_IMAGE``: when set, the training image for the docker and kubernetes backends,
  in place of ``compute.docker.image`` and ``compute.kubernetes.image``.
- ``ML_LOOP_TRAIN_DATA_VOLUME``: when set, the docker backend mounts this named volume at the
  data root instead of bind-mounting the worker's folder (for a worker in a container).
- ``ML_LOOP_TRAIN_NETWORK``: when set, the training container's network in place of
  ``compute.docker.network_mode``.

The container or pod gets ``ML_LOOP_DEVICE_REQUEST``, the JSON of the device request this
operator made, which the entry point's GPU pre-flight prints when no GPU is visible.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from ml_loop.spec import ComputeSpec, PipelineSpec, RunConfig, check_train_backend, load_spec
from ml_loop_airflow.assets import retrain_reason, retrain_tags

if TYPE_CHECKING:
    from kubernetes.client import models as k8s

logger = logging.getLogger(__name__)

BACKEND_PARAM = "train_backend"
TRAIN_IMAGE_ENV = "ML_LOOP_TRAIN_IMAGE"
TRAIN_DATA_VOLUME_ENV = "ML_LOOP_TRAIN_DATA_VOLUME"
TRAIN_NETWORK_ENV = "ML_LOOP_TRAIN_NETWORK"
DEVICE_REQUEST_ENV = "ML_LOOP_DEVICE_REQUEST"
DATA_DIR_ENV = "ML_LOOP_DATA_DIR"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
MLFLOW_CONN_ID = "mlflow_default"
BACKEND_TAG = "ml_loop.train_backend"
NO_GPU_MESSAGE = "no GPU visible in the container"
# Environment variables of the worker that are copied into a container unchanged, when set.
PASSTHROUGH_ENV = ("MLFLOW_DISABLE_TELEMETRY", "MLFLOW_HTTP_REQUEST_TIMEOUT")
# Credential variables of the MLflow client; a container gets them only as private environment.
MLFLOW_CREDENTIAL_ENV = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
# Lines of output kept for error messages.
TAIL_LINES = 30
CONTAINER_LABEL_PREFIX = "ml-loop."
# Label that every pod of one task instance carries, whatever its try number.
POD_TASK_LABEL = "ml-loop/train-task"
# File that the KubernetesPodOperator's XCom sidecar reads the task result from.
POD_XCOM_FILE = "/airflow/xcom/return.json"
POD_DELETE_TIMEOUT_S = 300.0


class TrainBackendError(RuntimeError):
    """A training backend failed to start or finish the training command."""


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """Everything one training attempt needs, resolved from the spec, the params and the context.

    ``args`` builds the entry point's arguments, the one place where they are built for every
    backend. A backend that mounts the data root at another path passes that path as
    ``data_dir`` and gets the snapshot URI rewritten to it.
    """

    spec_ref: str
    spec: PipelineSpec
    config: RunConfig
    backend: str
    snapshot_uri: str
    data_dir: Path
    run_tags: dict[str, str]

    @property
    def compute(self) -> ComputeSpec:
        return self.spec.compute

    def args(self, data_dir: str | None = None) -> list[str]:
        snapshot_uri = self.snapshot_uri
        spec_ref = self.spec_ref
        if data_dir is not None:
            snapshot_uri = rebase_path(snapshot_uri, self.data_dir, data_dir, "snapshot")
            if is_spec_path(spec_ref):
                spec_ref = rebase_path(spec_ref, self.data_dir, data_dir, "spec file")
        args = [
            "--spec",
            spec_ref,
            "--snapshot-uri",
            snapshot_uri,
            "--epochs",
            str(self.config.epochs),
            "--learning-rate",
            repr(self.config.learning_rate),
            "--batch-size",
            str(self.config.batch_size),
            "--seed",
            str(self.config.seed),
        ]
        for key, value in self.run_tags.items():
            args += ["--run-tag", f"{key}={value}"]
        args += [
            "--data-dir",
            data_dir if data_dir is not None else str(self.data_dir),
            "--gpus",
            str(self.compute.gpus),
            "--dataloader-workers",
            str(self.compute.dataloader_workers),
            "--backend",
            self.backend,
        ]
        return args


def is_spec_path(spec_ref: str) -> bool:
    """Return whether ``spec_ref`` is a YAML file path rather than a spec name."""
    return Path(spec_ref).suffix in {".yaml", ".yml"}


def rebase_path(path: str, old_root: Path, new_root: str, what: str) -> str:
    """Return ``path``, which lies under ``old_root``, as the same file under ``new_root``."""
    try:
        relative = Path(path).resolve().relative_to(old_root)
    except ValueError as err:
        raise TrainBackendError(
            f"{what} {path} is not under the data root {old_root}, so the training container "
            f"or pod cannot see it under {new_root}; keep it under {DATA_DIR_ENV}"
        ) from err
    return str(Path(new_root) / relative)


def train_pool(compute: ComputeSpec) -> tuple[str | None, int]:
    """Return the pool and pool slots of a train task: ``gpu_pool`` with one slot per GPU.

    A CPU task (``gpus`` 0) runs in the default pool (None). ``gpus`` -1 (all GPUs) takes one
    slot, because the count is only known on the Docker host.
    """
    if compute.gpus == 0:
        return None, 1
    return compute.gpu_pool, max(compute.gpus, 1)


def task_instance_key(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """Return a hex digest that names one task instance across its tries."""
    payload = json.dumps([dag_id, run_id, task_id, map_index])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def container_name(dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    """Return the container name of a task instance, the same for every try.

    Docker allows ``[a-zA-Z0-9][a-zA-Z0-9_.-]``, and a run id contains ``:`` and ``+``, so the
    name carries a digest of the ids after a readable prefix.
    """
    readable = "".join(c if c.isalnum() or c in "_.-" else "-" for c in f"{dag_id}.{task_id}")
    return f"ml-loop-{readable[:60]}-{task_instance_key(dag_id, run_id, task_id, map_index)}"


def docker_device_requests(compute: ComputeSpec) -> list[dict[str, Any]]:
    """Return the Docker device requests for ``compute.gpus`` as plain dicts.

    Explicit ``docker.gpu_device_ids`` take precedence over the GPU count.
    """
    if compute.gpus == 0:
        return []
    if compute.docker.gpu_device_ids:
        return [{"device_ids": list(compute.docker.gpu_device_ids), "capabilities": [["gpu"]]}]
    return [{"count": compute.gpus, "capabilities": [["gpu"]]}]


def parse_train_result(stdout_lines: Sequence[str], tail: Sequence[str]) -> dict[str, Any]:
    """Parse the ``TrainResult`` JSON from the last non-empty stdout line of the entry point."""
    last = next((line for line in reversed(stdout_lines) if line.strip()), "")
    try:
        result = json.loads(last)
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict) or not {"run_id", "model_uri", "metrics"} <= result.keys():
        raise TrainBackendError(
            f"the training command exited 0, but its last stdout line is not the TrainResult "
            f"JSON: {last[:500]!r}; the entry point must print the result last. Output ends "
            "with:\n" + "\n".join(tail)
        )
    return result


def _mlflow_credentials() -> dict[str, str]:
    """Return the MLflow credentials of the worker: its environment, then ``mlflow_default``.

    The connection's login and password become ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD``, and a ``token`` in its extra becomes ``MLFLOW_TRACKING_TOKEN``.
    """
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    credentials = {name: os.environ[name] for name in MLFLOW_CREDENTIAL_ENV if os.environ.get(name)}
    try:
        conn = Connection.get(MLFLOW_CONN_ID)
    except AirflowNotFoundException:
        return credentials
    if conn.login:
        credentials["MLFLOW_TRACKING_USERNAME"] = conn.login
    if conn.password:
        credentials["MLFLOW_TRACKING_PASSWORD"] = conn.password
    token = (conn.extra_dejson or {}).get("token")
    if token:
        credentials["MLFLOW_TRACKING_TOKEN"] = str(token)
    return credentials


def _run_nested(operator: BaseOperator, context: Any) -> Any:
    """Call ``operator.execute`` from inside this task's ``execute``.

    Airflow logs a warning when an operator's ``execute`` is called from outside the task
    runner. The provider operator here is part of this task, so the call is marked as such.
    """
    from airflow.sdk.bases.operator import ExecutorSafeguard

    token = ExecutorSafeguard.tracker.set(operator)
    try:
        return operator.execute(context)
    finally:
        ExecutorSafeguard.tracker.reset(token)


class TrainOperator(BaseOperator):
    """Train the spec's model on the store task's snapshot; return the ``TrainResult`` dict.

    :param spec: spec name (a file in ``include/specs``) or path to a spec YAML file.
    :param snapshot: the store task's ``SnapshotRef`` (an XComArg in the DAG); only its ``uri``
        is read. (templated)
    :param container_labels: extra labels for the training container or pod.

    The backend comes from the run's param ``train_backend``, the run settings (epochs, learning
    rate, batch size, seed) from the run's params, and the hardware from the spec's ``compute``
    section. A spec that requests GPUs puts the task into the pool ``compute.gpu_pool`` with one
    slot per GPU, unless ``pool`` is given.

    Each try first removes what an earlier try of the same task instance left running (the
    container of the same name, or the pods with the same task label), so two tries never train
    at once. The new try then resumes from the checkpoint of the train key.
    """

    template_fields: Sequence[str] = ("snapshot",)
    ui_color = "#e8d9f7"

    def __init__(
        self,
        *,
        spec: str,
        snapshot: dict[str, Any] | Any,
        container_labels: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        compute = load_spec(spec).compute
        pool, pool_slots = train_pool(compute)
        if pool is not None:
            kwargs.setdefault("pool", pool)
            kwargs.setdefault("pool_slots", pool_slots)
        super().__init__(**kwargs)
        self.spec = spec
        self.snapshot = snapshot
        self.container_labels = dict(container_labels or {})
        self._process: subprocess.Popen[str] | None = None
        self._kill_container: tuple[str, str] | None = None
        self._pod_operator: BaseOperator | None = None

    def build_job(self, context: Any) -> TrainJob:
        """Resolve the spec, params, snapshot URI and run tags of this try."""
        from ml_loop.files import data_root

        spec = load_spec(self.spec)
        params = context["params"]
        backend = params.get(BACKEND_PARAM) or spec.compute.backend
        check_train_backend(backend)
        ti = context["ti"]
        run_tags = {
            "airflow.dag_id": ti.dag_id,
            "airflow.run_id": context["run_id"],
            "airflow.try_number": str(ti.try_number),
            BACKEND_TAG: backend,
            **retrain_tags(retrain_reason(context)),
        }
        snapshot = self.snapshot
        if not isinstance(snapshot, dict) or "uri" not in snapshot:
            raise TrainBackendError(
                f"snapshot {snapshot!r} is not a SnapshotRef with a 'uri'; pass the store task's "
                "output as the snapshot argument"
            )
        return TrainJob(
            spec_ref=self.spec,
            spec=spec,
            config=RunConfig.from_params(spec, params),
            backend=backend,
            snapshot_uri=str(snapshot["uri"]),
            data_dir=data_root().resolve(),
            run_tags=run_tags,
        )

    def execute(self, context: Any) -> dict[str, Any]:
        job = self.build_job(context)
        self.log.info(
            "training %s on snapshot %s with the %s backend, %d GPU(s), run settings %s",
            job.spec.name,
            job.snapshot_uri,
            job.backend,
            job.compute.gpus,
            dataclasses.asdict(job.config),
        )
        if job.backend == "local":
            result = self.run_local(job)
        elif job.backend == "docker":
            result = self.run_docker(job, context)
        else:
            result = self.run_kubernetes(job, context)
        self.log.info(
            "training run %s finished: model %s, metrics %s, resumed from epoch %s",
            result["run_id"],
            result["model_uri"],
            result["metrics"],
            result.get("resumed_from_epoch"),
        )
        return result

    def on_kill(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            self.log.info("terminating training process group %d", process.pid)
            os.killpg(process.pid, signal.SIGTERM)
        if self._kill_container is not None:
            docker_url, name = self._kill_container
            self.log.info("removing training container %s", name)
            _remove_container(_docker_client(docker_url), name, self.log)
        if self._pod_operator is not None:
            self._pod_operator.on_kill()

    # local

    def local_command(self, job: TrainJob) -> list[str]:
        from ml_loop.devices import train_command

        return train_command(job.compute.gpus, job.args(), python=sys.executable)

    def local_env(self, job: TrainJob) -> dict[str, str]:
        """Return the worker environment with ``include/`` on PYTHONPATH and the device request."""
        import ml_loop

        include_dir = str(Path(ml_loop.__file__).resolve().parent.parent)
        env = dict(os.environ)
        paths = [include_dir, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env["PYTHONUNBUFFERED"] = "1"
        env[DATA_DIR_ENV] = str(job.data_dir)
        env[DEVICE_REQUEST_ENV] = json.dumps({"backend": "local", "gpus": job.compute.gpus})
        return env

    def run_local(self, job: TrainJob) -> dict[str, Any]:
        """Run the training command as a subprocess and stream its output into the task log."""
        command = self.local_command(job)
        self.log.info("running %s", " ".join(command))

        stdout_lines: list[str] = []
        tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        # Its own session, so on_kill can signal torchrun and its workers together.
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=self.local_env(job),
            start_new_session=True,
        )
        self._process = process

        readers = [
            threading.Thread(target=self._stream, args=(process.stdout, stdout_lines, tail)),
            threading.Thread(target=self._stream, args=(process.stderr, None, tail)),
        ]
        try:
            for reader in readers:
                reader.start()
            returncode = process.wait()
            for reader in readers:
                reader.join()
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            self._process = None

        if returncode != 0:
            raise TrainBackendError(
                f"training command {command[0]} exited with code {returncode}; its output ends "
                "with:\n" + "\n".join(tail)
            )
        return parse_train_result(stdout_lines, list(tail))

    def _stream(
        self, stream: Iterable[str], keep: list[str] | None, tail: collections.deque[str]
    ) -> None:
        for raw in stream:
            line = raw.rstrip("\n")
            self.log.info("%s", line)
            tail.append(line)
            if keep is not None:
                keep.append(line)

    # docker

    def docker_image(self, job: TrainJob) -> str:
        return os.environ.get(TRAIN_IMAGE_ENV) or job.compute.docker.image

    def build_docker_operator(self, job: TrainJob, context: Any) -> BaseOperator:
        """Build the ``DockerOperator`` that runs this try's training container.

        ``auto_remove`` is ``never`` because ``run_docker`` reads the container's stdout after it
        exits and then removes it itself, after success and after failure alike.
        """
        from airflow.providers.docker.operators.docker import DockerOperator
        from docker.types import DeviceRequest, Mount

        from ml_loop.devices import train_command

        ti = context["ti"]
        docker = job.compute.docker
        if is_spec_path(job.spec_ref):
            # The data root is the only host folder mounted into the container.
            rebase_path(job.spec_ref, job.data_dir, str(job.data_dir), "spec file")
        device_requests = docker_device_requests(job.compute)
        environment = {
            name: os.environ[name] for name in PASSTHROUGH_ENV if os.environ.get(name) is not None
        }
        environment.update(
            {
                DATA_DIR_ENV: str(job.data_dir),
                DEVICE_REQUEST_ENV: json.dumps(
                    {"backend": "docker", "device_requests": device_requests}
                ),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if os.environ.get(TRACKING_URI_ENV):
            environment[TRACKING_URI_ENV] = os.environ[TRACKING_URI_ENV]
        labels = {
            f"{CONTAINER_LABEL_PREFIX}dag_id": ti.dag_id,
            f"{CONTAINER_LABEL_PREFIX}run_id": context["run_id"],
            f"{CONTAINER_LABEL_PREFIX}task_id": ti.task_id,
            f"{CONTAINER_LABEL_PREFIX}try_number": str(ti.try_number),
            **self.container_labels,
        }
        # A worker that itself runs in a container (the compose stack) has the data root on a
        # named volume and reaches MLflow by service name on its own network, so both can be
        # given by the environment instead of the host path and host networking.
        data_volume = os.environ.get(TRAIN_DATA_VOLUME_ENV)
        if data_volume:
            data_mount = Mount(target=str(job.data_dir), source=data_volume, type="volume")
        else:
            data_mount = Mount(target=str(job.data_dir), source=str(job.data_dir), type="bind")
        return DockerOperator(
            task_id=self.task_id,
            image=self.docker_image(job),
            command=train_command(job.compute.gpus, job.args()),
            container_name=container_name(
                ti.dag_id, context["run_id"], ti.task_id, getattr(ti, "map_index", -1)
            ),
            docker_url=docker.docker_url,
            network_mode=os.environ.get(TRAIN_NETWORK_ENV) or docker.network_mode,
            shm_size=docker.shm_size,
            device_requests=[DeviceRequest(**request) for request in device_requests] or None,
            mounts=[data_mount],
            environment=environment,
            private_environment=_mlflow_credentials(),
            # The calling process's uid and gid, so files written to the data root stay usable
            # by the worker.
            user=f"{os.getuid()}:{os.getgid()}",
            mount_tmp_dir=False,
            force_pull=False,
            auto_remove="never",
            do_xcom_push=False,
            labels=labels,
        )

    def run_docker(self, job: TrainJob, context: Any) -> dict[str, Any]:
        """Run the training container; return the result parsed from its last stdout line."""
        from airflow.providers.docker.exceptions import DockerContainerFailedException
        from docker.errors import APIError, ImageNotFound, NotFound

        operator = self.build_docker_operator(job, context)
        client = operator.cli
        name = operator.container_name
        image = operator.image
        try:
            client.inspect_image(image)
        except ImageNotFound as err:
            raise TrainBackendError(
                f"training image {image!r} not found in the Docker engine at "
                f"{operator.docker_url}; build it with `make train-image`, or set "
                f"{TRAIN_IMAGE_ENV} to an image the engine has. The docker backend never pulls"
            ) from err
        _remove_container(
            client,
            name,
            self.log,
            reason="an earlier try of this task left it; it is killed so that two tries never "
            "train at once, and this try resumes from the checkpoint",
        )
        self._kill_container = (operator.docker_url, name)
        self.log.info("starting container %s from image %s", name, image)
        try:
            try:
                _run_nested(operator, context)
            except APIError as err:
                explanation = str(getattr(err, "explanation", "") or err)
                if "could not select device driver" in explanation:
                    raise TrainBackendError(
                        f"{NO_GPU_MESSAGE}: the Docker engine at {operator.docker_url} rejected "
                        f"the device request {docker_device_requests(job.compute)} with "
                        f"{explanation!r}; install the NVIDIA Container Toolkit on the Docker "
                        "host and restart the daemon, or set compute.gpus to 0 to train on CPU"
                    ) from err
                raise
            except DockerContainerFailedException as err:
                exit_code = _exit_code(client, name)
                lines = list(err.logs or [])[-TAIL_LINES:]
                raise TrainBackendError(
                    f"training container {name} (image {image}) exited with code {exit_code}; "
                    "its output ends with:\n" + "\n".join(lines)
                ) from err
            try:
                stdout = client.logs(name, stdout=True, stderr=False).decode(errors="replace")
            except NotFound as err:
                raise TrainBackendError(
                    f"training container {name} was removed before its output was read; "
                    "something else removed it, so clear the task to train again"
                ) from err
            stdout_lines = stdout.splitlines()
            return parse_train_result(stdout_lines, stdout_lines[-TAIL_LINES:])
        finally:
            _remove_container(client, name, self.log)
            self._kill_container = None

    # kubernetes

    def kubernetes_image(self, job: TrainJob) -> str:
        return os.environ.get(TRAIN_IMAGE_ENV) or job.compute.kubernetes.image

    def build_pod_operator(self, job: TrainJob, context: Any) -> BaseOperator:
        """Build the ``KubernetesPodOperator`` that runs this try's training pod.

        The result comes back through the provider's XCom sidecar: the entry point writes the
        ``TrainResult`` JSON to ``/airflow/xcom/return.json`` with ``--result-file``, so no log
        line has to be parsed. ``durable`` is off, so a retry never reattaches to the pod of
        an earlier try. Instead ``run_kubernetes`` deletes that pod first, and the new pod
        resumes from the checkpoint.
        """
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
        from kubernetes.client import models as k8s

        from ml_loop.devices import train_command

        kube = job.compute.kubernetes
        gpus = job.compute.gpus
        if gpus < 0:
            raise TrainBackendError(
                f"compute.gpus is {gpus} (all GPUs), which a pod cannot request; set "
                "compute.gpus to the number of GPUs the pod needs"
            )
        ti = context["ti"]
        args = [*job.args(data_dir=kube.data_mount_path), "--result-file", POD_XCOM_FILE]
        command = train_command(gpus, args)
        launcher = command[: len(command) - len(args)]
        if command[len(launcher) :] != args:
            raise TrainBackendError(
                f"ml_loop.devices.train_command returned {command}, which does not end with the "
                "training arguments; the pod needs them as the container's args"
            )
        limits = {"memory": kube.memory_limit}
        if gpus:
            limits["nvidia.com/gpu"] = str(gpus)
        resources = k8s.V1ResourceRequirements(
            requests={"cpu": kube.cpu_request, "memory": kube.memory_request}, limits=limits
        )
        env = {
            DATA_DIR_ENV: kube.data_mount_path,
            DEVICE_REQUEST_ENV: json.dumps(
                {"backend": "kubernetes", "resources": {"limits": limits}}
            ),
            "PYTHONUNBUFFERED": "1",
        }
        if os.environ.get(TRACKING_URI_ENV):
            env[TRACKING_URI_ENV] = os.environ[TRACKING_URI_ENV]
        env_from = []
        if kube.mlflow_secret:
            env_from.append(
                k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=kube.mlflow_secret))
            )
        labels = {
            POD_TASK_LABEL: task_instance_key(
                ti.dag_id, context["run_id"], ti.task_id, getattr(ti, "map_index", -1)
            ),
            "app.kubernetes.io/name": "ml-loop-train",
            "ml-loop/spec": job.spec.name,
            **self.container_labels,
        }
        return KubernetesPodOperator(
            task_id=self.task_id,
            name=f"train-{job.spec.name}",
            namespace=kube.namespace,
            image=self.kubernetes_image(job),
            cmds=launcher,
            arguments=args,
            image_pull_policy=kube.image_pull_policy,
            service_account_name=kube.service_account,
            container_resources=resources,
            node_selector=dict(kube.node_selector),
            tolerations=[_toleration(item) for item in kube.tolerations],
            volumes=[
                k8s.V1Volume(
                    name="dshm",
                    empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=kube.shm_size),
                ),
                k8s.V1Volume(
                    name="data",
                    persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
                        claim_name=kube.data_pvc
                    ),
                ),
            ],
            volume_mounts=[
                k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"),
                k8s.V1VolumeMount(name="data", mount_path=kube.data_mount_path),
            ],
            env_vars=env,
            env_from=env_from,
            labels=labels,
            startup_timeout_seconds=kube.startup_timeout_seconds,
            get_logs=True,
            do_xcom_push=True,
            on_finish_action="delete_pod",
            durable=False,
        )

    def build_pod(self, context: Any) -> k8s.V1Pod:
        """Return the ``V1Pod`` that the kubernetes backend would submit for this context.

        It needs no cluster: the provider builds the object without calling the API server.
        """
        job = self.build_job(context)
        operator = self.build_pod_operator(job, context)
        return operator.build_pod_request_obj(context, dry_run=True)

    def run_kubernetes(self, job: TrainJob, context: Any) -> dict[str, Any]:
        """Delete the pods of earlier tries, run the training pod and return its XCom result."""
        operator = self.build_pod_operator(job, context)
        delete_task_pods(
            operator.client,
            job.compute.kubernetes.namespace,
            f"{POD_TASK_LABEL}={operator.labels[POD_TASK_LABEL]}",
            self.log,
        )
        self._pod_operator = operator
        try:
            result = _run_nested(operator, context)
        finally:
            self._pod_operator = None
        if not isinstance(result, dict):
            raise TrainBackendError(
                f"training pod returned {result!r} from {POD_XCOM_FILE}, not the TrainResult "
                "JSON; check that the image's ml_loop.train supports --result-file"
            )
        return result


def delete_task_pods(
    client: Any,
    namespace: str,
    label_selector: str,
    log: Any,
    timeout_s: float = POD_DELETE_TIMEOUT_S,
) -> list[str]:
    """Delete the pods that match ``label_selector`` and wait until they are gone.

    Returns the names of the deleted pods. Raises TrainBackendError when a pod is still listed
    after ``timeout_s`` seconds, because starting the new try then would train twice at once.
    """
    pods = client.list_namespaced_pod(namespace=namespace, label_selector=label_selector).items
    names = [pod.metadata.name for pod in pods]
    for name in names:
        log.info("deleting pod %s/%s of an earlier try", namespace, name)
        client.delete_namespaced_pod(name=name, namespace=namespace)
    deadline = time.monotonic() + timeout_s
    while names:
        remaining = client.list_namespaced_pod(namespace=namespace, label_selector=label_selector)
        if not remaining.items:
            break
        if time.monotonic() > deadline:
            raise TrainBackendError(
                f"pods {[pod.metadata.name for pod in remaining.items]} of an earlier try in "
                f"namespace {namespace} still exist {timeout_s:.0f} s after deletion; delete "
                "them (kubectl delete pod --force) and clear the task"
            )
        time.sleep(2)
    return names


def _toleration(raw: dict[str, Any]) -> k8s.V1Toleration:
    from kubernetes.client import models as k8s

    renamed = {"tolerationSeconds": "toleration_seconds"}
    return k8s.V1Toleration(**{renamed.get(key, key): value for key, value in raw.items()})


def _docker_client(docker_url: str) -> Any:
    import docker

    return docker.APIClient(base_url=docker_url)


def _exit_code(client: Any, name: str) -> int | None:
    """Return the exit code of the stopped container ``name``, or None when it did not run."""
    from docker.errors import NotFound

    try:
        state = client.inspect_container(name)["State"]
    except NotFound:
        return None
    # A container that was created but never started reports the zero time.
    if state.get("Running") or state.get("StartedAt", "").startswith("0001-"):
        return None
    return int(state["ExitCode"])


def _remove_container(client: Any, name: str, log: Any, reason: str = "") -> None:
    """Kill and remove the container ``name`` if it exists; log ``reason`` as a warning."""
    from docker.errors import NotFound

    try:
        state = client.inspect_container(name)["State"]
    except NotFound:
        return
    if reason:
        log.warning("removing container %s (%s): %s", name, state.get("Status"), reason)
    else:
        log.info("removing container %s", name)
    try:
        client.remove_container(name, force=True)
    except NotFound:
        return
