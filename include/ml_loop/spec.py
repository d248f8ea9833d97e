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
from pathlib import Path
from typing import Any, Literal

import yaml

from ml_loop.errors import SpecError

SPECS_DIR = Path(__file__).resolve().parent.parent / "specs"

DatasetKind = Literal["images", "tabular"]


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

    def digest(self) -> str:
        """Return a short SHA-256 of the spec's content, logged with every run."""
        payload = json.dumps(to_dict(self), sort_keys=True, default=str).encode()
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
    return sorted(path.stem for path in SPECS_DIR.glob("*.yaml"))


def load_spec(name_or_path: str | Path) -> PipelineSpec:
    """Load a spec by name (a file in ``include/specs``) or by path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix not in {".yaml", ".yml"}:
        path = SPECS_DIR / f"{name_or_path}.yaml"
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
    )
    RunConfig.from_params(spec, None)
    return spec


def to_dict(spec: PipelineSpec) -> dict[str, Any]:
    """Return the spec as plain JSON-ready data, without its file path."""
    data = dataclasses.asdict(spec)
    data.pop("source_path")
    data["start_date"] = spec.start_date.isoformat()
    return data
