"""Monitor the served champion: input drift, prediction drift, live accuracy and traffic.

The reference is the training split of the snapshot the champion was trained on: the model
version's tag ``ml_loop.snapshot_version`` names the folder ``snapshots/<dataset>/<version>/``
under the data root. Live data is the model server's prediction log (``ml_loop.prediction_log``)
for the monitoring window, and labels come from the feedback landing zone::

    feedback/<dataset>/<YYYY-MM-DD>/labels.csv     columns id,label (header row, UTF-8)

where ``<YYYY-MM-DD>`` is the UTC date of the predictions the labels belong to and ``id`` is the
prediction log's row id. A label that names no class of the spec is ignored with a WARNING.

Statistics use numpy and scipy only:

- PSI (population stability index) per feature, on ``psi_bins`` bins cut at quantiles of the
  reference; see ``psi``.
- The two-sample Kolmogorov-Smirnov test per feature (``scipy.stats.ks_2samp``).
- For images, the features are per-image statistics: mean intensity, ink fraction (share of
  pixels above 0.5) and the mean of every pixel row and column (the row and column profiles).
  The pooled pixel-intensity histogram is compared on fixed bins over [0, 1] with PSI.
- Prediction drift: the Jensen-Shannon distance (base 2) and the PSI between the class
  frequencies of the reference labels and of the live predictions. The reference has no
  predictions of its own without running the model, so its labels stand in for them; for a
  champion with high test accuracy the two are close.

``run_monitoring`` computes a ``MonitoringResult``, logs it as a run of the MLflow experiment
``<spec name>-monitoring``, tags the model version with that run's id, and writes a
self-contained HTML report to ``monitoring/<spec>/<window end>/report.html`` and to the run's
artifacts.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import datetime as dt
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

from ml_loop.errors import MlLoopError
from ml_loop.files import data_root, write_atomic, write_json_atomic
from ml_loop.spec import MonitoringSpec, PipelineSpec

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

MONITORING_AREA = "monitoring"
FEEDBACK_AREA = "feedback"
LABELS_FILE = "labels.csv"
REPORT_FILE = "report.html"
RESULT_FILE = "result.json"
REPORT_ARTIFACT_DIR = "monitoring"
SNAPSHOT_VERSION_TAG = "ml_loop.snapshot_version"
OFFLINE_ACCURACY_TAG = "ml_loop.candidate_accuracy"
LAST_MONITORING_RUN_TAG = "ml_loop.last_monitoring_run"
LAST_MONITORING_WINDOW_TAG = "ml_loop.last_monitoring_window_end"
MONITOR_KEY_TAG = "ml_loop.monitor_key"
CHAMPION_ALIAS = "champion"
# Floor of every bin share in PSI. An empty bin would make ln(share) infinite; with the floor,
# one empty bin adds at most about share * ln(share / 1e-4) instead.
PSI_EPSILON = 1e-4
INK_THRESHOLD = 0.5
HISTOGRAM_BINS = 10
# Per-class statistics are compared only for classes with at least this many rows on each side.
MIN_CLASS_ROWS = 20
TRAIN_SPLIT_CODE = 0


# ---------------------------------------------------------------------------------------------
# Statistics


def psi(
    reference: np.ndarray, current: np.ndarray, bins: int = 10, epsilon: float = PSI_EPSILON
) -> float:
    """Return the population stability index of ``current`` against ``reference``.

    The cut points are the reference's quantiles at 1/bins, ..., (bins-1)/bins, deduplicated,
    so a feature with repeated values (many zero pixels) gets fewer, wider bins, and the outer
    bins are open-ended. Each bin's share is floored at ``epsilon``. PSI is
    ``sum((c - r) * ln(c / r))`` over the bins, 0 for identical distributions; above 0.2 is
    commonly read as a significant shift.
    """
    reference = np.asarray(reference, dtype=np.float64).ravel()
    current = np.asarray(current, dtype=np.float64).ravel()
    if reference.size == 0 or current.size == 0:
        raise ValueError(
            f"PSI needs values on both sides, got {reference.size} reference and "
            f"{current.size} current values"
        )
    quantiles = np.quantile(reference, np.arange(1, bins) / bins)
    cuts = np.unique(quantiles)
    return _psi_from_counts(
        _bin_counts(reference, cuts), _bin_counts(current, cuts), epsilon=epsilon
    )


def psi_fixed_bins(
    reference: np.ndarray, current: np.ndarray, edges: np.ndarray, epsilon: float = PSI_EPSILON
) -> float:
    """Return PSI on the fixed bin ``edges`` (values outside go to the outer bins)."""
    cuts = np.asarray(edges, dtype=np.float64)[1:-1]
    return _psi_from_counts(
        _bin_counts(np.asarray(reference).ravel(), cuts),
        _bin_counts(np.asarray(current).ravel(), cuts),
        epsilon=epsilon,
    )


def _bin_counts(values: np.ndarray, cuts: np.ndarray) -> np.ndarray:
    # Bins are closed on the right, (c[i-1], c[i]], so a value equal to a cut point goes to the
    # bin below it; a feature whose reference is mostly one value (zero pixels) keeps that value
    # in a bin of its own.
    return np.bincount(np.searchsorted(cuts, values, side="left"), minlength=len(cuts) + 1)


def _psi_from_counts(
    reference_counts: np.ndarray, current_counts: np.ndarray, epsilon: float = PSI_EPSILON
) -> float:
    reference_share = np.maximum(reference_counts / max(reference_counts.sum(), 1), epsilon)
    current_share = np.maximum(current_counts / max(current_counts.sum(), 1), epsilon)
    return float(
        np.sum((current_share - reference_share) * np.log(current_share / reference_share))
    )


def ks_test(reference: np.ndarray, current: np.ndarray) -> tuple[float, float]:
    """Return the two-sample Kolmogorov-Smirnov statistic and p-value (two-sided)."""
    result = ks_2samp(np.asarray(reference).ravel(), np.asarray(current).ravel())
    return float(result.statistic), float(result.pvalue)


def class_frequencies(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Return the share of each class in ``labels``, in ``classes`` order (zeros when empty)."""
    counts = Counter(labels)
    values = np.array([counts.get(label, 0) for label in classes], dtype=np.float64)
    total = values.sum()
    return values / total if total else values


def js_distance(reference: np.ndarray, current: np.ndarray) -> float:
    """Return the Jensen-Shannon distance (base 2, from 0 to 1) of two frequency vectors."""
    if not np.sum(reference) or not np.sum(current):
        raise ValueError("Jensen-Shannon distance needs two non-empty frequency vectors")
    return float(jensenshannon(reference, current, base=2))


def image_features(images: np.ndarray) -> dict[str, np.ndarray]:
    """Return per-image statistics of ``images`` (``(n, H, W)`` or ``(n, 1, H, W)``, in [0, 1]).

    ``mean_intensity`` and ``ink_fraction`` (share of pixels above 0.5), and ``row_XX`` and
    ``col_XX``: the mean intensity of each pixel row and column, which move when digits are
    shifted, rotated or resized.
    """
    pixels = _as_gray(images)
    features = {
        "mean_intensity": pixels.mean(axis=(1, 2)),
        "ink_fraction": (pixels > INK_THRESHOLD).mean(axis=(1, 2)),
    }
    rows = pixels.mean(axis=2)
    columns = pixels.mean(axis=1)
    for index in range(pixels.shape[1]):
        features[f"row_{index:02d}"] = rows[:, index]
    for index in range(pixels.shape[2]):
        features[f"col_{index:02d}"] = columns[:, index]
    return features


def intensity_histogram(images: np.ndarray, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Return the share of pooled pixels in each of ``bins`` equal bins over [0, 1]."""
    pixels = _as_gray(images).ravel()
    counts, _ = np.histogram(np.clip(pixels, 0.0, 1.0), bins=bins, range=(0.0, 1.0))
    return counts / max(counts.sum(), 1)


def _as_gray(images: np.ndarray) -> np.ndarray:
    array = np.asarray(images, dtype=np.float32)
    if array.ndim == 4:
        if array.shape[1] != 1:
            raise ValueError(
                f"images of shape {array.shape} have {array.shape[1]} channels; the image "
                "statistics expect one grayscale channel, (n, 1, H, W)"
            )
        array = array[:, 0]
    if array.ndim != 3:
        raise ValueError(f"images of shape {array.shape}: expected (n, H, W) or (n, 1, H, W)")
    return array


def feature_drift(
    reference: Mapping[str, np.ndarray],
    current: Mapping[str, np.ndarray],
    monitoring: MonitoringSpec,
) -> dict[str, dict[str, Any]]:
    """Return PSI, KS statistic, KS p-value and the drifted flag of every feature."""
    thresholds = monitoring.thresholds
    result = {}
    for name, reference_values in reference.items():
        value = psi(reference_values, current[name], bins=monitoring.psi_bins)
        statistic, pvalue = ks_test(reference_values, current[name])
        result[name] = {
            "psi": value,
            "ks_statistic": statistic,
            "ks_pvalue": pvalue,
            "drifted": bool(value > thresholds.psi and pvalue < thresholds.ks_pvalue),
        }
    return result


# ---------------------------------------------------------------------------------------------
# Inputs: reference snapshot, prediction log records, labels


@dataclasses.dataclass(frozen=True)
class Reference:
    """The champion's training data and offline scores, which live data is compared with."""

    model_name: str
    model_version: str
    snapshot_version: str
    snapshot_uri: str
    x: np.ndarray
    labels: list[str]
    offline_accuracy: float | None
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class LiveData:
    """Logged predictions of one window: one entry per predicted row, sorted by time."""

    ids: list[str]
    request_ids: list[str]
    times: list[dt.datetime]
    model_versions: list[str]
    variants: list[str]
    predictions: list[str]
    confidence: np.ndarray
    x: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, mask: np.ndarray) -> LiveData:
        """Return the rows where ``mask`` is true."""
        indices = np.flatnonzero(mask)
        return LiveData(
            ids=[self.ids[i] for i in indices],
            request_ids=[self.request_ids[i] for i in indices],
            times=[self.times[i] for i in indices],
            model_versions=[self.model_versions[i] for i in indices],
            variants=[self.variants[i] for i in indices],
            predictions=[self.predictions[i] for i in indices],
            confidence=self.confidence[indices],
            x=self.x[indices],
        )


def load_reference(
    spec: PipelineSpec,
    model_version: str | None = None,
    root: str | Path | None = None,
    tracking_uri: str | None = None,
) -> Reference:
    """Load the training split of the snapshot that a version of ``spec.model_name`` learned.

    ``model_version`` defaults to the ``champion`` alias. Raises MlLoopError when the version
    does not exist or has no ``ml_loop.snapshot_version`` tag, and FileNotFoundError when its
    snapshot folder is gone.
    """
    from mlflow.exceptions import MlflowException

    from ml_loop.store import SNAPSHOT_AREA, load_snapshot

    client = _client(tracking_uri)
    reference = model_version or CHAMPION_ALIAS
    try:
        if reference.isdigit():
            version = client.get_model_version(spec.model_name, reference)
        else:
            version = client.get_model_version_by_alias(spec.model_name, reference)
    except MlflowException as err:
        raise MlLoopError(
            f"model {spec.model_name!r} has no version or alias {reference!r}: {err.message}; "
            "train and promote a champion before monitoring it"
        ) from err
    snapshot_version = version.tags.get(SNAPSHOT_VERSION_TAG)
    if not snapshot_version:
        raise MlLoopError(
            f"{spec.model_name} version {version.version} has no {SNAPSHOT_VERSION_TAG} tag, so "
            "its training data is unknown; register versions with the training DAG"
        )
    snapshot_dir = data_root(root) / SNAPSHOT_AREA / spec.dataset.name / snapshot_version
    arrays, _ = load_snapshot(snapshot_dir)
    train = arrays["split"] == TRAIN_SPLIT_CODE
    classes = list(spec.dataset.classes)
    offline = version.tags.get(OFFLINE_ACCURACY_TAG)
    if offline is None:
        offline = client.get_run(version.run_id).data.metrics.get("test_accuracy")
    return Reference(
        model_name=spec.model_name,
        model_version=str(version.version),
        snapshot_version=snapshot_version,
        snapshot_uri=str(snapshot_dir),
        x=arrays["x"][train],
        labels=[classes[int(index)] for index in arrays["y"][train]],
        offline_accuracy=None if offline is None else float(offline),
        created_at=dt.datetime.fromtimestamp(version.creation_timestamp / 1000, tz=dt.UTC),
    )


def live_data(spec: PipelineSpec, records: Sequence[Mapping[str, Any]]) -> LiveData:
    """Build the live data from prediction log records (see ``ml_loop.prediction_log``).

    Tabular records carry their features in ``inputs``. Image records carry ``input_array``,
    which ``read_predictions(..., with_inputs=True)`` adds from the ``.npz`` beside the log.
    """
    rows = sorted(records, key=lambda record: record["time"])
    if spec.dataset.kind == "images":
        image = spec.dataset.image
        shape = (1, image.height, image.width)
        arrays = []
        for record in rows:
            if record.get("input_array") is None:
                raise MlLoopError(
                    f"prediction {record.get('id')!r} has no input_array; read the log with "
                    "read_predictions(..., with_inputs=True)"
                )
            arrays.append(np.asarray(record["input_array"], dtype=np.float32).reshape(shape))
        x = np.stack(arrays) if arrays else np.zeros((0, *shape), dtype=np.float32)
    else:
        width = len(spec.dataset.columns)
        x = np.array([record["inputs"] for record in rows], dtype=np.float64).reshape(-1, width)
    return LiveData(
        ids=[str(record["id"]) for record in rows],
        request_ids=[str(record.get("request_id", "")) for record in rows],
        times=[dt.datetime.fromisoformat(record["time"]) for record in rows],
        model_versions=[str(record.get("model_version", "")) for record in rows],
        variants=[str(record.get("variant") or CHAMPION_ALIAS) for record in rows],
        predictions=[str(record["prediction"]) for record in rows],
        confidence=np.array([float(record["confidence"]) for record in rows], dtype=np.float64),
        x=x,
    )


def labels_path(root: Path, dataset: str, date: dt.date) -> Path:
    """Return ``feedback/<dataset>/<YYYY-MM-DD>/labels.csv`` under ``root``."""
    return root / FEEDBACK_AREA / dataset / date.isoformat() / LABELS_FILE


def read_labels(
    spec: PipelineSpec, dates: Sequence[dt.date], root: str | Path | None = None
) -> dict[str, str]:
    """Return ``{id: label}`` from the label files of ``dates``; later files win on repeats.

    A missing file means no labels for that date yet. A file without the columns ``id`` and
    ``label`` raises MlLoopError.
    """
    root = data_root(root)
    classes = set(spec.dataset.classes)
    labels: dict[str, str] = {}
    for date in sorted(dates):
        path = labels_path(root, spec.dataset.name, date)
        if not path.is_file():
            continue
        unknown = 0
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"id", "label"} <= set(reader.fieldnames):
                raise MlLoopError(
                    f"label file {path} has the columns {reader.fieldnames}; expected a header "
                    "row with id,label"
                )
            for row in reader:
                label = (row["label"] or "").strip()
                if label not in classes:
                    unknown += 1
                    continue
                labels[row["id"].strip()] = label
        if unknown:
            logger.warning(
                "label file %s: ignored %d labels that are not classes of %s (%s)",
                path,
                unknown,
                spec.name,
                ", ".join(spec.dataset.classes),
            )
    return labels


def write_labels(path: Path, labels: Mapping[str, str]) -> None:
    """Write ``labels`` as a ``labels.csv`` file (header id,label), atomically."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["id", "label"])
    for record_id, label in labels.items():
        writer.writerow([record_id, label])
    write_atomic(path, lambda handle: handle.write(buffer.getvalue().encode("utf-8")))


def read_server_errors(metrics_text: str) -> dict[str, float] | None:
    """Return ``{"requests", "errors"}`` from a Prometheus text page, or None when absent.

    Counters whose name contains ``request`` and that have a ``status``, ``status_code`` or
    ``code`` label are summed; a status of 400 or more counts as an error.
    """
    from prometheus_client.parser import text_string_to_metric_families

    requests = errors = 0.0
    found = False
    for family in text_string_to_metric_families(metrics_text):
        if family.type != "counter" or "request" not in family.name:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            status = next(
                (
                    sample.labels[key]
                    for key in ("status", "status_code", "code")
                    if key in sample.labels
                ),
                None,
            )
            if status is None:
                continue
            found = True
            requests += sample.value
            if str(status)[:1] in {"4", "5"}:
                errors += sample.value
    if not found:
        return None
    return {"requests": requests, "errors": errors}


# ---------------------------------------------------------------------------------------------
# The result


@dataclasses.dataclass
class MonitoringResult:
    """Every number of one monitoring window, the verdict and where the report is.

    ``reasons`` lists each finding as ``{metric, value, threshold, message}``.
    """

    spec: str
    dataset: str
    kind: str
    model_name: str
    model_version: str
    snapshot_version: str
    window_start: str
    window_end: str
    labelled_window_start: str
    labelled_window_end: str
    traffic: dict[str, Any]
    drift: dict[str, Any]
    prediction_drift: dict[str, Any] | None
    per_class: dict[str, Any]
    confidence: dict[str, Any]
    accuracy: dict[str, Any]
    drift_judged: bool
    accuracy_judged: bool
    drift_detected: bool
    accuracy_dropped: bool
    reasons: list[dict[str, Any]]
    champion_created_at: str
    mlflow_run_id: str | None = None
    report_path: str | None = None
    report_uri: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _json_ready(dataclasses.asdict(self))


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def compute_monitoring(
    spec: PipelineSpec,
    reference: Reference,
    live: LiveData,
    labelled: LiveData,
    labels: Mapping[str, str],
    *,
    window_start: dt.datetime,
    window_end: dt.datetime,
    labelled_start: dt.datetime,
    labelled_end: dt.datetime,
    server_errors: Mapping[str, float] | None = None,
) -> MonitoringResult:
    """Compare the window's live data with the reference and decide the verdict.

    ``live`` is every logged prediction of ``[window_start, window_end)``; its inputs are
    compared with the reference whichever version predicted them. Prediction drift,
    confidence and per-class statistics use only the rows predicted by the monitored version.
    ``labelled`` is the monitored version's predictions of ``[labelled_start, labelled_end)``,
    which ``labels`` (``{id: label}``) are joined with for live accuracy.
    """
    monitoring = spec.monitoring
    thresholds = monitoring.thresholds
    classes = list(spec.dataset.classes)
    version = reference.model_version
    own = live.select(np.array([v == version for v in live.model_versions], dtype=bool))
    reasons: list[dict[str, Any]] = []

    traffic = _traffic(live, window_start, window_end, server_errors)
    drift_judged = len(live) >= monitoring.min_predictions
    drift: dict[str, Any] = {"features": {}, "drift_share": None, "drifted_features": []}
    prediction_drift = None
    if drift_judged:
        drift = _input_drift(spec, reference, live)
        share = drift["drift_share"]
        if share >= thresholds.drift_share:
            reasons.append(
                _reason(
                    "feature_drift_share",
                    share,
                    thresholds.drift_share,
                    f"{len(drift['drifted_features'])} of {len(drift['features'])} features "
                    f"drifted (PSI > {thresholds.psi} and KS p < {thresholds.ks_pvalue}): "
                    f"{', '.join(drift['drifted_features'][:8])}",
                )
            )
        reasons.extend(_image_reasons(drift.get("image"), thresholds))
    if len(own) >= monitoring.min_predictions:
        prediction_drift = _prediction_drift(reference, own, classes)
        if prediction_drift["js_distance"] > thresholds.prediction_js:
            reasons.append(
                _reason(
                    "prediction_js_distance",
                    prediction_drift["js_distance"],
                    thresholds.prediction_js,
                    "the predicted class frequencies moved away from the training labels",
                )
            )

    accuracy = _live_accuracy(labelled, labels, classes, reference.offline_accuracy)
    accuracy_judged = accuracy["labelled"] >= monitoring.min_labelled and (
        reference.offline_accuracy is not None
    )
    accuracy_dropped = False
    if accuracy_judged:
        drop = reference.offline_accuracy - accuracy["live_accuracy"]
        accuracy["drop"] = drop
        if drop > thresholds.accuracy_drop:
            accuracy_dropped = True
            reasons.append(
                _reason(
                    "accuracy_drop",
                    drop,
                    thresholds.accuracy_drop,
                    f"live accuracy {accuracy['live_accuracy']:.4f} on {accuracy['labelled']} "
                    f"labelled predictions is {drop:.4f} below the offline test accuracy "
                    f"{reference.offline_accuracy:.4f}",
                )
            )

    drift_detected = any(reason["metric"] != "accuracy_drop" for reason in reasons)
    return MonitoringResult(
        spec=spec.name,
        dataset=spec.dataset.name,
        kind=spec.dataset.kind,
        model_name=reference.model_name,
        model_version=version,
        snapshot_version=reference.snapshot_version,
        window_start=window_start.isoformat(),
        window_end=window_end.isoformat(),
        labelled_window_start=labelled_start.isoformat(),
        labelled_window_end=labelled_end.isoformat(),
        traffic=traffic,
        drift=drift,
        prediction_drift=prediction_drift,
        per_class=_per_class(spec, reference, own),
        confidence=_confidence(own.confidence),
        accuracy=accuracy,
        drift_judged=drift_judged,
        accuracy_judged=accuracy_judged,
        drift_detected=drift_detected,
        accuracy_dropped=accuracy_dropped,
        reasons=reasons,
        champion_created_at=reference.created_at.isoformat(),
    )


def _reason(metric: str, value: float, threshold: float, message: str) -> dict[str, Any]:
    return {"metric": metric, "value": float(value), "threshold": threshold, "message": message}


def _features(spec: PipelineSpec, x: np.ndarray) -> dict[str, np.ndarray]:
    if spec.dataset.kind == "images":
        return image_features(x)
    return {name: x[:, index] for index, name in enumerate(spec.dataset.feature_names)}


def _input_drift(spec: PipelineSpec, reference: Reference, live: LiveData) -> dict[str, Any]:
    features = feature_drift(_features(spec, reference.x), _features(spec, live.x), spec.monitoring)
    drifted = [name for name, values in features.items() if values["drifted"]]
    drift: dict[str, Any] = {
        "features": features,
        "drift_share": len(drifted) / len(features),
        "drifted_features": drifted,
    }
    if spec.dataset.kind == "images":
        edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
        reference_pixels = _as_gray(reference.x).ravel()
        live_pixels = _as_gray(live.x).ravel()
        drift["image"] = {
            "histogram_psi": psi_fixed_bins(
                np.clip(reference_pixels, 0, 1), np.clip(live_pixels, 0, 1), edges
            ),
            "reference_histogram": intensity_histogram(reference.x).tolist(),
            "live_histogram": intensity_histogram(live.x).tolist(),
            "mean_intensity_psi": features["mean_intensity"]["psi"],
            "ink_fraction_psi": features["ink_fraction"]["psi"],
            "reference_mean_intensity": float(reference_pixels.mean()),
            "live_mean_intensity": float(live_pixels.mean()),
        }
    return drift


def _image_reasons(image: Mapping[str, Any] | None, thresholds: Any) -> list[dict[str, Any]]:
    if image is None:
        return []
    reasons = []
    if image["histogram_psi"] > thresholds.image_histogram_psi:
        reasons.append(
            _reason(
                "image_histogram_psi",
                image["histogram_psi"],
                thresholds.image_histogram_psi,
                "the pixel-intensity histogram moved away from the training images",
            )
        )
    for name in ("mean_intensity", "ink_fraction"):
        value = image[f"{name}_psi"]
        if value > thresholds.image_statistic_psi:
            reasons.append(
                _reason(
                    f"image_{name}_psi",
                    value,
                    thresholds.image_statistic_psi,
                    f"the per-image {name.replace('_', ' ')} moved away from the training images",
                )
            )
    return reasons


def _prediction_drift(reference: Reference, own: LiveData, classes: list[str]) -> dict[str, Any]:
    reference_freq = class_frequencies(reference.labels, classes)
    live_freq = class_frequencies(own.predictions, classes)
    counts_ref = np.array([reference.labels.count(label) for label in classes])
    counts_live = np.array([own.predictions.count(label) for label in classes])
    return {
        "js_distance": js_distance(reference_freq, live_freq),
        "psi": _psi_from_counts(counts_ref, counts_live),
        "reference_frequencies": dict(zip(classes, reference_freq.tolist(), strict=True)),
        "live_frequencies": dict(zip(classes, live_freq.tolist(), strict=True)),
    }


def _per_class(spec: PipelineSpec, reference: Reference, own: LiveData) -> dict[str, Any]:
    """Return count, share and mean confidence per predicted class, and image statistics.

    For images, the mean intensity and ink fraction of the rows predicted as a class are
    compared with the reference images labelled with that class (PSI), where both sides have at
    least MIN_CLASS_ROWS rows.
    """
    classes = list(spec.dataset.classes)
    predictions = np.array(own.predictions, dtype=object)
    reference_labels = np.array(reference.labels, dtype=object)
    per_class: dict[str, Any] = {}
    live_stats = ref_stats = None
    if spec.dataset.kind == "images" and len(own):
        live_stats = image_features(own.x)
        ref_stats = image_features(reference.x)
    for label in classes:
        mask = predictions == label
        count = int(mask.sum())
        entry: dict[str, Any] = {
            "predicted": count,
            "share": count / len(own) if len(own) else None,
            "mean_confidence": float(own.confidence[mask].mean()) if count else None,
        }
        if live_stats is not None:
            ref_mask = reference_labels == label
            for name in ("mean_intensity", "ink_fraction"):
                entry[f"live_{name}"] = float(live_stats[name][mask].mean()) if count else None
                entry[f"reference_{name}"] = (
                    float(ref_stats[name][ref_mask].mean()) if ref_mask.any() else None
                )
                enough = count >= MIN_CLASS_ROWS and ref_mask.sum() >= MIN_CLASS_ROWS
                entry[f"{name}_psi"] = (
                    psi(ref_stats[name][ref_mask], live_stats[name][mask]) if enough else None
                )
        per_class[label] = entry
    return per_class


def _confidence(confidence: np.ndarray) -> dict[str, Any]:
    if confidence.size == 0:
        return {"count": 0, "mean": None, "p10": None, "p50": None, "p90": None, "histogram": []}
    counts, _ = np.histogram(confidence, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    p10, p50, p90 = np.quantile(confidence, [0.1, 0.5, 0.9]).tolist()
    return {
        "count": int(confidence.size),
        "mean": float(confidence.mean()),
        "p10": p10,
        "p50": p50,
        "p90": p90,
        "histogram": counts.tolist(),
    }


def _live_accuracy(
    labelled: LiveData, labels: Mapping[str, str], classes: list[str], offline: float | None
) -> dict[str, Any]:
    pairs = [
        (labels[record_id], prediction)
        for record_id, prediction in zip(labelled.ids, labelled.predictions, strict=True)
        if record_id in labels
    ]
    index = {label: position for position, label in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for true, predicted in pairs:
        if predicted in index:
            matrix[index[true], index[predicted]] += 1
    correct = sum(1 for true, predicted in pairs if true == predicted)
    recall = {}
    for label in classes:
        row = matrix[index[label]]
        recall[label] = float(row[index[label]] / row.sum()) if row.sum() else None
    return {
        "predictions": len(labelled),
        "labelled": len(pairs),
        "live_accuracy": correct / len(pairs) if pairs else None,
        "offline_accuracy": offline,
        "drop": None,
        "per_class_recall": recall,
        "confusion_matrix": matrix.tolist(),
    }


def _traffic(
    live: LiveData,
    start: dt.datetime,
    end: dt.datetime,
    server_errors: Mapping[str, float] | None,
) -> dict[str, Any]:
    hours = max((end - start).total_seconds() / 3600, 1e-9)
    traffic: dict[str, Any] = {
        "predictions": len(live),
        "requests": len(set(live.request_ids)),
        "predictions_per_hour": len(live) / hours,
        "by_variant": dict(Counter(live.variants)),
        "by_version": dict(Counter(live.model_versions)),
        "server_requests": None,
        "server_errors": None,
        "error_rate": None,
        "error_source": "unavailable",
    }
    if server_errors is not None:
        requests = float(server_errors["requests"])
        errors = float(server_errors["errors"])
        traffic.update(
            server_requests=requests,
            server_errors=errors,
            error_rate=errors / requests if requests else None,
            # The server's counters run from its start, not from the window's.
            error_source="server_metrics_since_start",
        )
    return traffic


# ---------------------------------------------------------------------------------------------
# Running one window


def monitoring_windows(
    monitoring: MonitoringSpec, window_end: dt.datetime
) -> tuple[dt.datetime, dt.datetime, dt.datetime, dt.datetime]:
    """Return (start, end) of the drift window and (start, end) of the labelled window."""
    end = window_end.astimezone(dt.UTC)
    start = end - dt.timedelta(hours=monitoring.window_hours)
    labelled_end = end - dt.timedelta(hours=monitoring.label_delay_hours)
    labelled_start = labelled_end - dt.timedelta(hours=monitoring.window_hours)
    return start, end, labelled_start, labelled_end


def label_dates(start: dt.datetime, end: dt.datetime) -> list[dt.date]:
    """Return every UTC date that ``[start, end)`` touches."""
    day = start.date()
    last = (end - dt.timedelta(microseconds=1)).date()
    dates = []
    while day <= last:
        dates.append(day)
        day += dt.timedelta(days=1)
    return dates


def report_dir(root: Path, spec_name: str, window_end: dt.datetime) -> Path:
    """Return ``monitoring/<spec>/<window end as YYYYMMDDTHHMMSSZ>/`` under ``root``."""
    stamp = window_end.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return root / MONITORING_AREA / spec_name / stamp


def run_monitoring(
    spec: PipelineSpec,
    window_end: dt.datetime,
    root: str | Path | None = None,
    *,
    log_dir: str | Path | None = None,
    model_version: str | None = None,
    server_errors: Mapping[str, float] | None = None,
    run_tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> MonitoringResult:
    """Monitor the window ending at ``window_end``: compute, log to MLflow, write the report.

    ``log_dir`` defaults to ``ml_loop.prediction_log.default_log_dir()`` and ``model_version``
    to the champion. A retry for the same window and version reuses its MLflow run.
    """
    from ml_loop.prediction_log import default_log_dir, read_predictions

    root = data_root(root)
    log_dir = Path(log_dir) if log_dir is not None else default_log_dir()
    if log_dir is None:
        raise MlLoopError(
            "no prediction log folder: set ML_LOOP_PREDICTION_LOG_DIR or ML_LOOP_DATA_DIR"
        )
    monitoring = spec.monitoring
    start, end, labelled_start, labelled_end = monitoring_windows(monitoring, window_end)
    reference = load_reference(spec, model_version, root, tracking_uri)
    logger.info(
        "monitoring %s version %s for %s to %s (labelled window %s to %s), reference snapshot "
        "%s with %d rows",
        spec.model_name,
        reference.model_version,
        start.isoformat(),
        end.isoformat(),
        labelled_start.isoformat(),
        labelled_end.isoformat(),
        reference.snapshot_version,
        len(reference.labels),
    )
    with_inputs = spec.dataset.kind == "images"
    records = read_predictions(log_dir, spec.model_name, start, end, with_inputs=with_inputs)
    labelled_records = [
        record
        for record in read_predictions(
            log_dir, spec.model_name, labelled_start, labelled_end, with_inputs=with_inputs
        )
        if str(record.get("model_version")) == reference.model_version
    ]
    # Labels are filed under their predictions' date; the day after is read too, for labellers
    # that file them under the day they were given.
    dates = label_dates(labelled_start, labelled_end + dt.timedelta(days=1))
    labels = read_labels(spec, dates, root)
    result = compute_monitoring(
        spec,
        reference,
        live_data(spec, records),
        live_data(spec, labelled_records),
        labels,
        window_start=start,
        window_end=end,
        labelled_start=labelled_start,
        labelled_end=labelled_end,
        server_errors=server_errors,
    )
    history = monitoring_history(spec, reference.model_name, tracking_uri)
    folder = report_dir(root, spec.name, end)
    report = render_report(spec, result, history)
    write_atomic(folder / REPORT_FILE, lambda handle: handle.write(report.encode("utf-8")))
    result.report_path = str(folder / REPORT_FILE)
    run_id, report_uri = log_monitoring_run(
        spec, result, folder / REPORT_FILE, run_tags=run_tags, tracking_uri=tracking_uri
    )
    result.mlflow_run_id = run_id
    result.report_uri = report_uri
    write_json_atomic(folder / RESULT_FILE, result.to_dict())
    logger.info(
        "monitoring of %s version %s: %d predictions, %d labelled, drift %s, accuracy dropped "
        "%s; report %s and %s",
        spec.model_name,
        result.model_version,
        result.traffic["predictions"],
        result.accuracy["labelled"],
        result.drift_detected,
        result.accuracy_dropped,
        result.report_path,
        report_uri,
    )
    for reason in result.reasons:
        logger.info(
            "finding %s = %.4f (threshold %s): %s",
            reason["metric"],
            reason["value"],
            reason["threshold"],
            reason["message"],
        )
    return result


# ---------------------------------------------------------------------------------------------
# MLflow


def _client(tracking_uri: str | None) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def experiment_name(spec: PipelineSpec) -> str:
    return f"{spec.name}-monitoring"


def monitoring_metrics(result: MonitoringResult) -> dict[str, float]:
    """Return the result's numbers as flat MLflow metric names; None values are left out."""
    values: dict[str, float | None] = {
        "predictions": result.traffic["predictions"],
        "requests": result.traffic["requests"],
        "predictions_per_hour": result.traffic["predictions_per_hour"],
        "error_rate": result.traffic["error_rate"],
        "drift_share": result.drift["drift_share"],
        "drift_detected": float(result.drift_detected),
        "accuracy_dropped": float(result.accuracy_dropped),
        "labelled": result.accuracy["labelled"],
        "live_accuracy": result.accuracy["live_accuracy"],
        "offline_accuracy": result.accuracy["offline_accuracy"],
        "accuracy_drop": result.accuracy["drop"],
        "confidence_mean": result.confidence["mean"],
        "confidence_p10": result.confidence["p10"],
    }
    for name, feature in result.drift["features"].items():
        values[f"psi_{name}"] = feature["psi"]
        values[f"ks_pvalue_{name}"] = feature["ks_pvalue"]
    image = result.drift.get("image")
    if image:
        values["image_histogram_psi"] = image["histogram_psi"]
        values["image_mean_intensity"] = image["live_mean_intensity"]
    if result.prediction_drift:
        values["prediction_js_distance"] = result.prediction_drift["js_distance"]
        values["prediction_psi"] = result.prediction_drift["psi"]
    for label, recall in result.accuracy["per_class_recall"].items():
        values[f"live_recall_{_metric_safe(label)}"] = recall
    return {
        key: float(value)
        for key, value in values.items()
        if value is not None and math.isfinite(float(value))
    }


def log_monitoring_run(
    spec: PipelineSpec,
    result: MonitoringResult,
    report_path: Path,
    *,
    run_tags: Mapping[str, str] | None = None,
    tracking_uri: str | None = None,
) -> tuple[str, str]:
    """Log the result as a run of ``<spec>-monitoring``; return the run id and report URI.

    Metrics carry the window end as their timestamp, so the runs line up on the window's
    time. The model version gets the tags ``ml_loop.last_monitoring_run`` and
    ``ml_loop.last_monitoring_window_end``.
    """
    from mlflow.entities import Metric, RunTag

    client = _client(tracking_uri)
    name = experiment_name(spec)
    experiment = client.get_experiment_by_name(name)
    experiment_id = (
        experiment.experiment_id if experiment is not None else client.create_experiment(name)
    )
    key = f"{spec.name}:{result.model_name}:{result.model_version}:{result.window_end}"
    existing = client.search_runs(
        [experiment_id], filter_string=f"tags.`{MONITOR_KEY_TAG}` = '{_quote(key)}'", max_results=1
    )
    tags = {
        MONITOR_KEY_TAG: key,
        "ml_loop.spec": spec.name,
        "ml_loop.model_name": result.model_name,
        "ml_loop.model_version": result.model_version,
        "ml_loop.snapshot_version": result.snapshot_version,
        "ml_loop.window_start": result.window_start,
        "ml_loop.window_end": result.window_end,
        "ml_loop.drift_detected": str(result.drift_detected).lower(),
        "ml_loop.accuracy_dropped": str(result.accuracy_dropped).lower(),
        "ml_loop.reasons": json.dumps([reason["metric"] for reason in result.reasons]),
        **dict(run_tags or {}),
    }
    if existing:
        run_id = existing[0].info.run_id
        logger.info("monitoring run %s for this window exists; logging into it again", run_id)
    else:
        run = client.create_run(
            experiment_id,
            run_name=f"monitor {result.model_name} v{result.model_version} {result.window_end}",
            tags=tags,
        )
        run_id = run.info.run_id
    timestamp = int(dt.datetime.fromisoformat(result.window_end).timestamp() * 1000)
    metrics = [
        Metric(key=metric, value=value, timestamp=timestamp, step=0)
        for metric, value in monitoring_metrics(result).items()
    ]
    run_tag_list = [RunTag(key, str(value)[:5000]) for key, value in tags.items()]
    # log_batch takes at most 1000 metrics per call.
    for offset in range(0, max(len(metrics), 1), 1000):
        client.log_batch(
            run_id,
            metrics=metrics[offset : offset + 1000],
            tags=run_tag_list if offset == 0 else [],
            synchronous=True,
        )
    client.log_artifact(run_id, str(report_path), REPORT_ARTIFACT_DIR)
    client.log_text(
        run_id,
        json.dumps({**result.to_dict(), "mlflow_run_id": run_id}, indent=2, sort_keys=True),
        f"{REPORT_ARTIFACT_DIR}/{RESULT_FILE}",
    )
    client.set_terminated(run_id, "FINISHED")
    client.set_model_version_tag(
        result.model_name, result.model_version, LAST_MONITORING_RUN_TAG, run_id
    )
    client.set_model_version_tag(
        result.model_name, result.model_version, LAST_MONITORING_WINDOW_TAG, result.window_end
    )
    artifact_uri = client.get_run(run_id).info.artifact_uri
    return run_id, f"{artifact_uri}/{REPORT_ARTIFACT_DIR}/{REPORT_FILE}"


def monitoring_history(
    spec: PipelineSpec, model_name: str, tracking_uri: str | None = None, max_runs: int = 500
) -> list[dict[str, Any]]:
    """Return earlier monitoring runs of ``model_name`` as ``{window_end, version, metrics}``."""
    client = _client(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name(spec))
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`ml_loop.model_name` = '{_quote(model_name)}'",
        max_results=max_runs,
    )
    history = []
    for run in runs:
        window_end = run.data.tags.get("ml_loop.window_end")
        if window_end is None:
            continue
        history.append(
            {
                "window_end": window_end,
                "model_version": run.data.tags.get("ml_loop.model_version"),
                "metrics": dict(run.data.metrics),
            }
        )
    history.sort(key=lambda entry: entry["window_end"])
    return history


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _metric_safe(label: str) -> str:
    return "".join(char if char.isalnum() or char in "_-. /" else "_" for char in label)


# ---------------------------------------------------------------------------------------------
# HTML report


def render_report(
    spec: PipelineSpec, result: MonitoringResult, history: Sequence[Mapping[str, Any]]
) -> str:
    """Return a self-contained HTML page of the result: tables and inline PNG plots."""
    verdict = []
    if result.drift_detected:
        verdict.append("drift detected")
    if result.accuracy_dropped:
        verdict.append("accuracy dropped")
    if not verdict:
        verdict.append("no drift or accuracy drop")
    judged = []
    if not result.drift_judged:
        judged.append(
            f"drift not judged: {result.traffic['predictions']} predictions, fewer than "
            f"{spec.monitoring.min_predictions}"
        )
    if not result.accuracy_judged:
        judged.append(
            f"accuracy not judged: {result.accuracy['labelled']} labelled predictions, fewer "
            f"than {spec.monitoring.min_labelled}, or no offline accuracy"
        )
    sections = [
        f"<h1>Monitoring of {escape(result.model_name)} version "
        f"{escape(result.model_version)}</h1>",
        f"<p>Window {escape(result.window_start)} to {escape(result.window_end)}; labelled "
        f"window {escape(result.labelled_window_start)} to "
        f"{escape(result.labelled_window_end)}. Reference: snapshot "
        f"{escape(result.snapshot_version)} (training split).</p>",
        f"<h2>Verdict: {escape(', '.join(verdict))}</h2>",
        _list([escape(item) for item in judged]),
        _table(
            ["metric", "value", "threshold", "finding"],
            [
                [r["metric"], f"{r['value']:.4f}", str(r["threshold"]), r["message"]]
                for r in result.reasons
            ],
        ),
        "<h2>Traffic</h2>",
        _table(
            ["measure", "value"],
            [[key, _format(value)] for key, value in result.traffic.items()],
        ),
        "<h2>Input drift</h2>",
        _image_tag(_plot_feature_drift(result, spec.monitoring.thresholds.psi)),
        _table(
            ["feature", "PSI", "KS statistic", "KS p-value", "drifted"],
            [
                [
                    name,
                    f"{values['psi']:.4f}",
                    f"{values['ks_statistic']:.4f}",
                    f"{values['ks_pvalue']:.3g}",
                    "yes" if values["drifted"] else "",
                ]
                for name, values in result.drift["features"].items()
            ],
        ),
    ]
    image = result.drift.get("image")
    if image:
        sections.append("<h2>Pixel intensities</h2>")
        sections.append(_image_tag(_plot_histograms(image)))
        sections.append(
            _table(
                ["measure", "value"],
                [
                    [key, _format(value)]
                    for key, value in image.items()
                    if not key.endswith("histogram")
                ],
            )
        )
    if result.prediction_drift:
        drift = result.prediction_drift
        sections.append("<h2>Prediction drift</h2>")
        sections.append(
            _table(
                ["class", "reference share", "live share"],
                [
                    [label, f"{share:.4f}", f"{drift['live_frequencies'][label]:.4f}"]
                    for label, share in drift["reference_frequencies"].items()
                ],
            )
        )
        sections.append(
            f"<p>Jensen-Shannon distance {drift['js_distance']:.4f}, PSI {drift['psi']:.4f}.</p>"
        )
    sections.append("<h2>Per predicted class</h2>")
    columns = sorted({key for entry in result.per_class.values() for key in entry})
    sections.append(
        _table(
            ["class", *columns],
            [
                [label, *(_format(entry.get(column)) for column in columns)]
                for label, entry in result.per_class.items()
            ],
        )
    )
    sections.append("<h2>Live accuracy</h2>")
    sections.append(
        _table(
            ["measure", "value"],
            [
                [key, _format(result.accuracy[key])]
                for key in ("predictions", "labelled", "live_accuracy", "offline_accuracy", "drop")
            ],
        )
    )
    sections.append(_image_tag(_plot_accuracy_history(result, history)))
    if result.accuracy["labelled"]:
        sections.append(_image_tag(_plot_confusion(result, list(spec.dataset.classes))))
    sections.append("<h2>Confidence</h2>")
    sections.append(_image_tag(_plot_confidence(result)))
    body = "\n".join(section for section in sections if section)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{escape(result.spec)} monitoring {escape(result.window_end)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:2px 8px;text-align:left}th{background:#eee}img{max-width:100%}</style>"
        f"</head><body>\n{body}\n</body></html>\n"
    )


def _format(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _list(items: Sequence[str]) -> str:
    if not items:
        return ""
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{escape(str(cell))}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _image_tag(png: bytes | None) -> str:
    if png is None:
        return ""
    return f"<img alt='plot' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"


def _figure_png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    return buffer.getvalue()


def _plot_feature_drift(result: MonitoringResult, psi_threshold: float) -> bytes | None:
    from matplotlib.figure import Figure

    features = result.drift["features"]
    if not features:
        return None
    names = list(features)
    values = [features[name]["psi"] for name in names]
    colors = ["tab:red" if features[name]["drifted"] else "tab:blue" for name in names]
    figure = Figure(figsize=(max(6.0, 0.18 * len(names) + 2), 3.5), layout="constrained")
    axis = figure.subplots()
    axis.bar(range(len(names)), values, color=colors)
    axis.axhline(psi_threshold, color="black", linestyle="--", linewidth=1)
    axis.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    axis.set_ylabel("PSI")
    axis.set_title("PSI per feature (red: drifted)")
    return _figure_png(figure)


def _plot_histograms(image: Mapping[str, Any]) -> bytes:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3), layout="constrained")
    axis = figure.subplots()
    positions = np.arange(len(image["reference_histogram"]))
    axis.bar(positions - 0.2, image["reference_histogram"], width=0.4, label="reference")
    axis.bar(positions + 0.2, image["live_histogram"], width=0.4, label="live")
    axis.set_yscale("log")
    axis.set_xticks(positions, [f"{edge / 10:.1f}" for edge in positions])
    axis.set_xlabel("pixel intensity (bin start)")
    axis.set_ylabel("share of pixels")
    axis.legend()
    return _figure_png(figure)


def _plot_accuracy_history(
    result: MonitoringResult, history: Sequence[Mapping[str, Any]]
) -> bytes | None:
    from matplotlib.figure import Figure

    points = [
        (dt.datetime.fromisoformat(entry["window_end"]), entry["metrics"]["live_accuracy"])
        for entry in history
        if "live_accuracy" in entry["metrics"] and entry["window_end"] != result.window_end
    ]
    if result.accuracy["live_accuracy"] is not None:
        points.append(
            (dt.datetime.fromisoformat(result.window_end), result.accuracy["live_accuracy"])
        )
    if not points:
        return None
    points.sort()
    figure = Figure(figsize=(6, 3), layout="constrained")
    axis = figure.subplots()
    axis.plot([p[0] for p in points], [p[1] for p in points], marker="o")
    if result.accuracy["offline_accuracy"] is not None:
        axis.axhline(result.accuracy["offline_accuracy"], color="gray", linestyle="--")
    axis.set_ylabel("live accuracy")
    axis.set_title("live accuracy per monitoring window (dashed: offline test accuracy)")
    figure.autofmt_xdate()
    return _figure_png(figure)


def _plot_confusion(result: MonitoringResult, classes: list[str]) -> bytes:
    from matplotlib.figure import Figure

    matrix = np.array(result.accuracy["confusion_matrix"])
    size = max(4.0, 0.5 * len(classes) + 2)
    figure = Figure(figsize=(size, size), layout="constrained")
    axis = figure.subplots()
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(classes)), classes, rotation=45 if max(map(len, classes)) > 3 else 0)
    axis.set_yticks(range(len(classes)), classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("label")
    axis.set_title(f"live confusion matrix, {int(matrix.sum())} labelled predictions")
    threshold = matrix.max() / 2 if matrix.size else 0
    for row in range(matrix.shape[0]):
        for column in range(matrix.shape[1]):
            color = "white" if matrix[row, column] > threshold else "black"
            axis.text(
                column,
                row,
                str(matrix[row, column]),
                ha="center",
                va="center",
                color=color,
                fontsize=8,
            )
    return _figure_png(figure)


def _plot_confidence(result: MonitoringResult) -> bytes | None:
    from matplotlib.figure import Figure

    counts = result.confidence["histogram"]
    if not counts:
        return None
    figure = Figure(figsize=(6, 3), layout="constrained")
    axis = figure.subplots()
    axis.bar(np.arange(len(counts)) / len(counts), counts, width=1 / len(counts), align="edge")
    axis.set_xlabel("confidence (probability of the predicted class)")
    axis.set_ylabel("predictions")
    return _figure_png(figure)
