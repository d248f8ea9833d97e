"""Pipeline specs: one YAML file per dataset drives every stage of the loop.

A spec names the dataset and its schema, the expectations, the model family and its
hyperparameters, the training window, the split and the gate thresholds. The DAG factory builds
one DAG per spec, and the trigger form's params take their defaults from the spec's
``training`` section, so each default is written once, in the YAML file.

This module imports only the standard library and PyYAML, because DAG files load it at parse time.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml

from ml_loop.errors import SpecError

SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"
# When set, spec names are looked up in this folder instead of SPECS_DIR.
SPECS_DIR_ENV = "ML_LOOP_SPECS_DIR"


def specs_dir() -> Path:
    """Return the folder that spec names are looked up in: ``$ML_LOOP_SPECS_DIR`` or SPECS_DIR."""
    value = os.environ.get(SPECS_DIR_ENV)
    return Path(value) if value else SPECS_DIR


DatasetKind = Literal["images", "tabular"]
TrainBackend = Literal["local", "docker", "kubernetes"]
TRAIN_BACKENDS: tuple[str, ...] = ("local", "docker", "kubernetes")


@dataclasses.dataclass(frozen=True)
class ColumnSpec:
    """One feature column of a tabular dataset."""

    name: str
    dtype: Literal["float", "int"] = "float"
    min: float | None = None
    max: float | None = None
    nullable: bool = False


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """Expected geometry and intensity range of every image in an image dataset."""

    width: int
    height: int
    mode: str = "L"
    min_mean_intensity: float = 0.0
    max_mean_intensity: float = 255.0


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the data is, where it comes from and what each record must look like."""

    name: str
    kind: DatasetKind
    source: str
    classes: tuple[str, ...]
    id_column: str = "id"
    label_column: str = "label"
    columns: tuple[ColumnSpec, ...] = ()
    image: ImageSpec | None = None
    landing_days: int = 5

    @property
    def feature_names(self) -> list[str]:
        return [column.name for column in self.columns]


@dataclasses.dataclass(frozen=True)
class ExpectationsSpec:
    """Batch-level bounds checked on every validated partition."""

    min_rows: int
    max_rows: int


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Model family and its architecture hyperparameters."""

    family: Literal["cnn", "mlp"]
    hyperparameters: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    """Defaults for the trainer; each field is also a typed param on the trigger form."""

    epochs: int
    learning_rate: float
    batch_size: int
    seed: int
    training_window_days: int
    force_promote: bool = False


@dataclasses.dataclass(frozen=True)
class SplitSpec:
    """Shares of records, picked by a hash of the record id, that go to validation and test."""

    validation: float
    test: float


@dataclasses.dataclass(frozen=True)
class GateSpec:
    """Promotion gate: an absolute floor and the allowed regression against the champion."""

    min_accuracy: float
    max_regression: float


@dataclasses.dataclass(frozen=True)
class DockerComputeSpec:
    """How the docker backend starts the training container.

    The data root is bind-mounted at the same path inside the container, so the snapshot and
    checkpoint paths in the task's references mean the same file on both sides.
    """

    image: str = "ml-loop-train:latest"
    docker_url: str = "unix://var/run/docker.sock"
    network_mode: str = "host"
    shm_size: str = "1g"
    # GPU ids for the device request; empty means "any `gpus` GPUs" (or all when gpus is -1).
    gpu_device_ids: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class KubernetesComputeSpec:
    """How the kubernetes backend builds the training pod."""

    image: str = "ml-loop-train:latest"
    namespace: str = "ml-loop"
    service_account: str = "ml-loop-train"
    image_pull_policy: str = "IfNotPresent"
    # PersistentVolumeClaim that contains the data root, mounted at data_mount_path in the pod.
    data_pvc: str = "ml-loop-data"
    data_mount_path: str = "/data"
    # Kubernetes Secret whose keys become the pod's MLflow credentials (env from secret).
    mlflow_secret: str | None = None
    shm_size: str = "1Gi"
    cpu_request: str = "2"
    memory_request: str = "8Gi"
    memory_limit: str = "16Gi"
    node_selector: dict[str, str] = dataclasses.field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    startup_timeout_seconds: int = 600


@dataclasses.dataclass(frozen=True)
class ComputeSpec:
    """Where the train step runs and on what hardware.

    ``gpus`` is 0 for CPU, N for N GPUs (more than one runs under torchrun with DDP) or -1 for
    every GPU of the Docker host. ``gpu_pool`` is the Airflow pool whose slots are GPUs: a train
    task that requests GPUs takes ``gpus`` slots of it.
    """

    backend: TrainBackend = "local"
    gpus: int = 0
    dataloader_workers: int = 0
    gpu_pool: str = "gpu"
    docker: DockerComputeSpec = dataclasses.field(default_factory=DockerComputeSpec)
    kubernetes: KubernetesComputeSpec = dataclasses.field(default_factory=KubernetesComputeSpec)


@dataclasses.dataclass(frozen=True)
class DriftThresholds:
    """Limits beyond which the monitor reports drift or an accuracy drop.

    ``psi``: a feature drifts when its population stability index against the reference is above
    this value and its KS p-value is below ``ks_pvalue``. Both must agree, because the KS test
    rejects tiny shifts on thousands of rows and PSI is noisy on a few dozen.
    ``drift_share``: data drift is reported when at least this share of the features drifts (the
    spec's columns for tabular data, the per-image statistics and row and column profiles for
    images).
    ``image_histogram_psi``: PSI of the pooled pixel-intensity histogram above which images drift.
    ``image_statistic_psi``: PSI of the per-image mean intensity or ink fraction above which
    images drift.
    ``prediction_js``: Jensen-Shannon distance (base 2, from 0 to 1) between the reference class
    frequencies and the live predicted class frequencies above which predictions drift.
    ``accuracy_drop``: live accuracy this far below the champion's offline test accuracy is an
    accuracy drop.
    """

    psi: float = 0.2
    ks_pvalue: float = 0.01
    drift_share: float = 0.3
    image_histogram_psi: float = 0.2
    image_statistic_psi: float = 0.2
    prediction_js: float = 0.1
    accuracy_drop: float = 0.05


@dataclasses.dataclass(frozen=True)
class GuardrailSpec:
    """Limits on how often monitoring may request a retrain.

    ``cooldown_hours``: hours after a request during which no new request is made.
    ``max_retrains_per_day``: requests allowed in any 24 hours.
    ``min_champion_age_hours``: a champion registered more recently than this is not judged.
    """

    cooldown_hours: float = 12.0
    max_retrains_per_day: int = 2
    min_champion_age_hours: float = 24.0


@dataclasses.dataclass(frozen=True)
class MonitoringSpec:
    """How the monitoring DAG watches the served champion and when it requests a retrain.

    ``schedule``: the monitoring DAG's schedule (a cron expression or preset).
    ``window_hours``: hours of predictions, ending at the run's time, compared with the
    reference for drift.
    ``label_delay_hours``: how long after a prediction its label arrives. Live accuracy is
    computed on the predictions of the window that ends this many hours before the run's time.
    ``min_predictions``: fewer predictions in the window are too little traffic to judge drift.
    ``min_labelled``: fewer labelled predictions are too few to judge accuracy.
    ``psi_bins``: bins of the PSI histograms, cut at quantiles of the reference.
    """

    schedule: str | None = "@hourly"
    window_hours: float = 24
    label_delay_hours: float = 24
    min_predictions: int = 200
    min_labelled: int = 100
    psi_bins: int = 10
    thresholds: DriftThresholds = dataclasses.field(default_factory=DriftThresholds)
    guardrails: GuardrailSpec = dataclasses.field(default_factory=GuardrailSpec)


@dataclasses.dataclass(frozen=True)
class DeploySpec:
    """How the deploy step moves traffic to a candidate that passed the gate.

    With ``canary_share`` 0 the candidate becomes ``champion`` at once. Above 0, and when a
    champion exists, the candidate stays ``challenger`` and the model server sends it this share
    of live traffic until it has served ``canary_min_requests`` requests (or
    ``canary_timeout_s`` passes); it is promoted when its error rate is at most
    ``canary_max_error_rate_increase`` above the champion's, and rolled back otherwise.
    """

    canary_share: float = 0.0
    canary_min_requests: int = 100
    canary_max_error_rate_increase: float = 0.01
    canary_timeout_s: float = 900.0


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    name: str
    description: str
    schedule: str
    start_date: dt.date
    model_name: str
    dataset: DatasetSpec
    expectations: ExpectationsSpec
    model: ModelSpec
    training: TrainingSpec
    split: SplitSpec
    gate: GateSpec
    source_path: Path
    compute: ComputeSpec = dataclasses.field(default_factory=ComputeSpec)
    monitoring: MonitoringSpec = dataclasses.field(default_factory=MonitoringSpec)
    deploy: DeploySpec = dataclasses.field(default_factory=DeploySpec)

    def digest(self) -> str:
        """Return a short SHA-256 of the spec's content, logged with every run.

        The ``compute`` section is left out: it describes where training runs, not what it computes,
        so switching backends keeps the train key and a retry on another backend resumes from
        the same checkpoint. The ``monitoring`` and ``deploy`` sections are left out for the
        same reason: they say when to retrain and how to roll out, not what training computes.
        """
        data = to_dict(self)
        for section in ("compute", "monitoring", "deploy"):
            data.pop(section, None)
        payload = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(payload).hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Training settings for one DAG run: the spec's defaults overridden by trigger params."""

    epochs: int
    learning_rate: float
    batch_size: int
    seed: int
    training_window_days: int
    force_promote: bool

    @classmethod
    def from_params(cls, spec: PipelineSpec, params: dict[str, Any] | None) -> RunConfig:
        """Build the run config, rejecting any param whose type does not match the field."""
        values = dataclasses.asdict(spec.training)
        for field in dataclasses.fields(cls):
            if params is None or field.name not in params or params[field.name] is None:
                continue
            values[field.name] = _coerce_param(field.name, params[field.name], values[field.name])
        config = cls(**values)
        config.check()
        return config

    def check(self) -> None:
        """Raise SpecError when a value is out of its allowed range."""
        rules = [
            ("epochs", self.epochs >= 1, "an integer of at least 1"),
            ("learning_rate", 0 < self.learning_rate <= 1, "a number above 0 and at most 1"),
            ("batch_size", 1 <= self.batch_size <= 65536, "an integer from 1 to 65536"),
            ("training_window_days", self.training_window_days >= 1, "an integer of at least 1"),
        ]
        for name, ok, expected in rules:
            if not ok:
                raise SpecError(
                    f"invalid run param {name}={getattr(self, name)!r}: expected {expected}"
                )


def _coerce_param(name: str, value: Any, default: Any) -> Any:
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise SpecError(
        f"invalid run param {name}={value!r}: expected type {expected.__name__}, "
        f"got {type(value).__name__}; pass it unquoted in the run conf, for example "
        f'{{"{name}": {json.dumps(default)}}}'
    )


def list_specs() -> list[str]:
    """Return the names of the specs shipped in ``include/specs``."""
    return sorted(path.stem for path in specs_dir().glob("*.yaml"))


def load_spec(name_or_path: str | Path) -> PipelineSpec:
    """Load a spec by name (a file in ``include/specs``) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in {".yaml", ".yml"}:
        path = specs_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise SpecError(
            f"spec {str(name_or_path)!r} not found at {path}; available specs: "
            f"{', '.join(list_specs()) or 'none'}"
        )
    try:
        raw = yaml.safe_load(path.read_text())
        return _parse(raw, path)
    except (KeyError, TypeError, ValueError, yaml.YAMLError) as err:
        raise SpecError(f"invalid spec {path}: {err}") from err


def _parse(raw: dict[str, Any], path: Path) -> PipelineSpec:
    dataset_raw = dict(raw["dataset"])
    columns = tuple(ColumnSpec(**column) for column in dataset_raw.pop("columns", []))
    image_raw = dataset_raw.pop("image", None)
    classes = tuple(str(label) for label in dataset_raw.pop("classes"))
    dataset = DatasetSpec(
        **dataset_raw,
        classes=classes,
        columns=columns,
        image=ImageSpec(**image_raw) if image_raw else None,
    )
    if dataset.kind == "images" and dataset.image is None:
        raise ValueError("an images dataset needs an 'image' section")
    if dataset.kind == "tabular" and not dataset.columns:
        raise ValueError("a tabular dataset needs a 'columns' list")
    start_date = raw["start_date"]
    if isinstance(start_date, str):
        start_date = dt.date.fromisoformat(start_date)
    split = SplitSpec(**raw["split"])
    if not 0 < split.validation + split.test < 1:
        raise ValueError("split.validation + split.test must be between 0 and 1")
    spec = PipelineSpec(
        name=raw["name"],
        description=raw["description"],
        schedule=raw["schedule"],
        start_date=start_date,
        model_name=raw["model_name"],
        dataset=dataset,
        expectations=ExpectationsSpec(**raw["expectations"]),
        model=ModelSpec(**raw["model"]),
        training=TrainingSpec(**raw["training"]),
        split=split,
        gate=GateSpec(**raw["gate"]),
        source_path=path,
        compute=_parse_compute(raw.get("compute") or {}),
        monitoring=_parse_monitoring(raw.get("monitoring") or {}),
        deploy=_parse_deploy(raw.get("deploy") or {}),
    )
    RunConfig.from_params(spec, None)
    return spec


def _parse_compute(raw: dict[str, Any]) -> ComputeSpec:
    raw = dict(raw)
    docker_raw = dict(raw.pop("docker", None) or {})
    if "gpu_device_ids" in docker_raw:
        docker_raw["gpu_device_ids"] = tuple(str(item) for item in docker_raw["gpu_device_ids"])
    kubernetes_raw = dict(raw.pop("kubernetes", None) or {})
    if "tolerations" in kubernetes_raw:
        kubernetes_raw["tolerations"] = tuple(dict(item) for item in kubernetes_raw["tolerations"])
    compute = ComputeSpec(
        **raw,
        docker=DockerComputeSpec(**docker_raw),
        kubernetes=KubernetesComputeSpec(**kubernetes_raw),
    )
    check_train_backend(compute.backend)
    if compute.gpus < -1:
        raise ValueError(f"compute.gpus is {compute.gpus}; use 0 (CPU), N GPUs or -1 (all)")
    if compute.dataloader_workers < 0:
        raise ValueError(
            f"compute.dataloader_workers is {compute.dataloader_workers}; use 0 or more"
        )
    return compute


def _parse_deploy(raw: dict[str, Any]) -> DeploySpec:
    deploy = DeploySpec(**raw)
    if not 0 <= deploy.canary_share <= 1:
        raise ValueError(f"deploy.canary_share is {deploy.canary_share}; use a share from 0 to 1")
    if deploy.canary_min_requests < 1:
        raise ValueError(
            f"deploy.canary_min_requests is {deploy.canary_min_requests}; use 1 or more"
        )
    return deploy


def _parse_monitoring(raw: dict[str, Any]) -> MonitoringSpec:
    """Build the monitoring section; a spec without one gets every default."""
    raw = dict(raw)
    thresholds = DriftThresholds(**(raw.pop("thresholds", None) or {}))
    guardrails = GuardrailSpec(**(raw.pop("guardrails", None) or {}))
    monitoring = MonitoringSpec(**raw, thresholds=thresholds, guardrails=guardrails)
    rules = [
        ("window_hours", monitoring.window_hours > 0, "a number of hours above 0"),
        ("label_delay_hours", monitoring.label_delay_hours >= 0, "a number of hours, at least 0"),
        ("min_predictions", monitoring.min_predictions >= 1, "an integer of at least 1"),
        ("min_labelled", monitoring.min_labelled >= 1, "an integer of at least 1"),
        ("psi_bins", monitoring.psi_bins >= 2, "an integer of at least 2"),
        ("thresholds.psi", thresholds.psi > 0, "a number above 0"),
        ("thresholds.ks_pvalue", 0 < thresholds.ks_pvalue < 1, "a number between 0 and 1"),
        ("thresholds.drift_share", 0 < thresholds.drift_share <= 1, "a number above 0, at most 1"),
        (
            "thresholds.prediction_js",
            0 < thresholds.prediction_js <= 1,
            "a number above 0, at most 1",
        ),
        ("thresholds.accuracy_drop", 0 <= thresholds.accuracy_drop < 1, "a number from 0 to 1"),
        ("guardrails.cooldown_hours", guardrails.cooldown_hours >= 0, "a number of at least 0"),
        (
            "guardrails.max_retrains_per_day",
            guardrails.max_retrains_per_day >= 1,
            "an integer of at least 1",
        ),
        (
            "guardrails.min_champion_age_hours",
            guardrails.min_champion_age_hours >= 0,
            "a number of at least 0",
        ),
    ]
    for name, ok, expected in rules:
        if not ok:
            value = monitoring
            for part in name.split("."):
                value = getattr(value, part)
            raise ValueError(f"monitoring.{name} is {value!r}; expected {expected}")
    return monitoring


def check_train_backend(backend: str) -> None:
    """Raise SpecError unless ``backend`` is one of TRAIN_BACKENDS."""
    if backend not in TRAIN_BACKENDS:
        raise SpecError(
            f"invalid train backend {backend!r}: expected one of {', '.join(TRAIN_BACKENDS)}; set "
            "compute.backend in the spec or the train_backend param"
        )


def to_dict(spec: PipelineSpec) -> dict[str, Any]:
    """Return the spec as plain JSON-ready data, without its file path."""
    data = dataclasses.asdict(spec)
    data.pop("source_path")
    data["start_date"] = spec.start_date.isoformat()
    return data
