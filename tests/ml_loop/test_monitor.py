"""Monitoring: drift statistics, real digits under real transforms, accuracy, MLflow logging."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from ml_loop import monitor
from ml_loop.datasets import load_source
from ml_loop.files import sha256_file, write_json_atomic
from ml_loop.prediction_log import PredictionBatch, PredictionLogWriter
from ml_loop.spec import load_spec

WINDOW_END = dt.datetime(2026, 12, 3, 12, tzinfo=dt.UTC)


# ---------------------------------------------------------------------------------------------
# Statistics on synthetic arrays


def test_psi_shifted_normal_fires() -> None:
    rng = np.random.default_rng(0)
    assert monitor.psi(rng.normal(0, 1, 5000), rng.normal(1, 1, 2000)) > 0.2


def test_psi_same_distribution_quiet() -> None:
    rng = np.random.default_rng(1)
    assert monitor.psi(rng.normal(0, 1, 5000), rng.normal(0, 1, 2000)) < 0.05


def test_psi_constant_reference_finite() -> None:
    value = monitor.psi(np.zeros(100), np.ones(100))
    assert np.isfinite(value)
    assert value > 0.2


def test_psi_empty_side_rejected() -> None:
    with pytest.raises(ValueError, match="both sides"):
        monitor.psi(np.zeros(10), np.array([]))


def test_ks_shifted_normal_fires() -> None:
    rng = np.random.default_rng(2)
    _, pvalue = monitor.ks_test(rng.normal(0, 1, 2000), rng.normal(0.5, 1, 500))
    assert pvalue < 0.01


def test_ks_same_distribution_quiet() -> None:
    rng = np.random.default_rng(3)
    _, pvalue = monitor.ks_test(rng.normal(0, 1, 2000), rng.normal(0, 1, 500))
    assert pvalue > 0.01


def test_js_distance_bounds() -> None:
    same = np.array([0.5, 0.5])
    assert monitor.js_distance(same, same) == pytest.approx(0.0)
    assert monitor.js_distance(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)


def test_feature_drift_needs_psi_and_ks() -> None:
    spec = load_spec("breast_cancer")
    rng = np.random.default_rng(4)
    reference = {"a": rng.normal(0, 1, 3000), "b": rng.normal(0, 1, 3000)}
    current = {"a": rng.normal(1.5, 1, 500), "b": rng.normal(0, 1, 500)}
    drift = monitor.feature_drift(reference, current, spec.monitoring)
    assert drift["a"]["drifted"] is True
    assert drift["b"]["drifted"] is False


# ---------------------------------------------------------------------------------------------
# Real digits with real transforms


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    records = load_source(load_spec("digits"))
    order = np.random.default_rng(5).permutation(len(records.ids))
    images = records.images[order].astype(np.float32) / 255.0
    labels = np.array(records.labels)[order]
    return {
        "reference": images[:3500],
        "reference_labels": labels[:3500],
        "held_out": images[4000:],
        "held_out_labels": labels[4000:],
    }


def _reference(spec, x: np.ndarray, labels, accuracy: float = 0.96) -> monitor.Reference:
    return monitor.Reference(
        model_name=spec.model_name,
        model_version="1",
        snapshot_version="snap",
        snapshot_uri="unused",
        x=x,
        labels=[str(label) for label in labels],
        offline_accuracy=accuracy,
        created_at=WINDOW_END - dt.timedelta(days=3),
    )


def _image_records(images: np.ndarray, predictions, version: str = "1") -> list[dict]:
    start = WINDOW_END - dt.timedelta(hours=12)
    return [
        {
            "id": f"r{index}",
            "request_id": f"q{index // 10}",
            "time": (start + dt.timedelta(seconds=index)).isoformat(),
            "model_name": "digits-cnn",
            "model_version": version,
            "variant": "champion",
            "prediction": str(prediction),
            "confidence": 0.9,
            "input_array": image[None],
        }
        for index, (image, prediction) in enumerate(zip(images, predictions, strict=True))
    ]


def _digits_result(digits, images: np.ndarray) -> monitor.MonitoringResult:
    spec = load_spec("digits")
    reference = _reference(
        spec, digits["reference"][:, None], digits["reference_labels"], accuracy=0.96
    )
    live = monitor.live_data(spec, _image_records(images, digits["held_out_labels"]))
    empty = monitor.live_data(spec, [])
    start, end, labelled_start, labelled_end = monitor.monitoring_windows(
        spec.monitoring, WINDOW_END
    )
    return monitor.compute_monitoring(
        spec,
        reference,
        live,
        empty,
        {},
        window_start=start,
        window_end=end,
        labelled_start=labelled_start,
        labelled_end=labelled_end,
    )


def _shift(images: np.ndarray) -> np.ndarray:
    return ndimage.shift(images, (0, 4, 4), order=0)


def _rotate(images: np.ndarray) -> np.ndarray:
    return np.clip(ndimage.rotate(images, 30, axes=(1, 2), reshape=False, order=1), 0, 1)


def _invert(images: np.ndarray) -> np.ndarray:
    return 1.0 - images


def _thicken(images: np.ndarray) -> np.ndarray:
    return ndimage.grey_dilation(images, size=(1, 3, 3))


def test_digits_held_out_no_drift(digits) -> None:
    result = _digits_result(digits, digits["held_out"])
    assert result.drift_judged is True
    assert result.drift_detected is False
    assert result.reasons == []
    assert result.drift["drift_share"] < 0.3


@pytest.mark.parametrize(
    ("transform", "metric"),
    [
        (_shift, "feature_drift_share"),
        (_rotate, "feature_drift_share"),
        (_invert, "image_histogram_psi"),
        (_thicken, "image_ink_fraction_psi"),
    ],
    ids=["shift", "rotate", "invert", "thicken"],
)
def test_digits_transform_drifts(digits, transform, metric: str) -> None:
    result = _digits_result(digits, transform(digits["held_out"]))
    assert result.drift_detected is True
    assert metric in [reason["metric"] for reason in result.reasons]


def test_per_class_image_statistics(digits) -> None:
    result = _digits_result(digits, _thicken(digits["held_out"]))
    entry = result.per_class["1"]
    assert entry["predicted"] > monitor.MIN_CLASS_ROWS
    assert entry["live_ink_fraction"] > entry["reference_ink_fraction"]
    assert entry["ink_fraction_psi"] > 0.2


# ---------------------------------------------------------------------------------------------
# Tabular: prediction drift, accuracy, traffic


@pytest.fixture(scope="module")
def cancer() -> dict:
    spec = load_spec("breast_cancer")
    records = load_source(spec)
    x = records.features[spec.dataset.feature_names].to_numpy(dtype=np.float64)
    return {"spec": spec, "x": x, "labels": list(records.labels), "ids": list(records.ids)}


def _tabular_records(spec, x, predictions, start, prefix="p") -> list[dict]:
    return [
        {
            "id": f"{prefix}{index}",
            "request_id": f"{prefix}q{index}",
            "time": (start + dt.timedelta(seconds=30 * index)).isoformat(),
            "model_name": spec.model_name,
            "model_version": "1",
            "variant": "champion",
            "prediction": prediction,
            "confidence": 0.8,
            "inputs": row.tolist(),
        }
        for index, (row, prediction) in enumerate(zip(x, predictions, strict=True))
    ]


def _cancer_result(cancer, predictions, labels: dict, rows: int = 300):
    spec = cancer["spec"]
    reference = _reference(spec, cancer["x"], cancer["labels"], accuracy=0.97)
    start, end, labelled_start, labelled_end = monitor.monitoring_windows(
        spec.monitoring, WINDOW_END
    )
    live_records = _tabular_records(spec, cancer["x"][:rows], predictions[:rows], start)
    labelled_records = _tabular_records(
        spec, cancer["x"][:rows], predictions[:rows], labelled_start, prefix="l"
    )
    return monitor.compute_monitoring(
        spec,
        reference,
        monitor.live_data(spec, live_records),
        monitor.live_data(spec, labelled_records),
        labels,
        window_start=start,
        window_end=end,
        labelled_start=labelled_start,
        labelled_end=labelled_end,
        server_errors={"requests": 100.0, "errors": 5.0},
    )


def test_accuracy_drop_detected(cancer) -> None:
    truth = cancer["labels"]
    flipped = {"benign": "malignant", "malignant": "benign"}
    # Every fourth prediction is wrong.
    predictions = [label if index % 4 else flipped[label] for index, label in enumerate(truth)]
    labels = {f"l{index}": label for index, label in enumerate(truth[:300])}
    result = _cancer_result(cancer, predictions, labels)
    assert result.accuracy["labelled"] == 300
    assert result.accuracy["live_accuracy"] == pytest.approx(0.75)
    assert result.accuracy_dropped is True
    assert sum(map(sum, result.accuracy["confusion_matrix"])) == 300


def test_accuracy_kept_no_finding(cancer) -> None:
    truth = cancer["labels"]
    labels = {f"l{index}": label for index, label in enumerate(truth[:300])}
    result = _cancer_result(cancer, truth, labels)
    assert result.accuracy["live_accuracy"] == pytest.approx(1.0)
    assert result.accuracy_dropped is False
    assert result.reasons == []
    assert result.traffic["error_rate"] == pytest.approx(0.05)


def test_too_few_labels_not_judged(cancer) -> None:
    truth = cancer["labels"]
    labels = {f"l{index}": "malignant" for index in range(10)}
    result = _cancer_result(cancer, truth, labels)
    assert result.accuracy["labelled"] == 10
    assert result.accuracy_judged is False
    assert result.accuracy_dropped is False


def test_too_little_traffic_not_judged(cancer) -> None:
    result = _cancer_result(cancer, cancer["labels"], {}, rows=20)
    assert result.drift_judged is False
    assert result.drift["features"] == {}


def test_prediction_drift_fires(cancer) -> None:
    result = _cancer_result(cancer, ["malignant"] * 569, {})
    assert result.prediction_drift["js_distance"] > 0.1
    assert "prediction_js_distance" in [reason["metric"] for reason in result.reasons]


def test_result_to_dict_is_json(cancer) -> None:
    result = _cancer_result(cancer, cancer["labels"], {})
    assert json.loads(json.dumps(result.to_dict()))["spec"] == "breast_cancer"


def test_read_labels_skips_unknown(data_root: Path) -> None:
    spec = load_spec("breast_cancer")
    day = dt.date(2026, 12, 2)
    monitor.write_labels(
        monitor.labels_path(data_root, "breast_cancer", day), {"a": "benign", "b": "tumour"}
    )
    assert monitor.read_labels(spec, [day], data_root) == {"a": "benign"}


def test_read_labels_bad_header(data_root: Path) -> None:
    spec = load_spec("breast_cancer")
    day = dt.date(2026, 12, 2)
    path = monitor.labels_path(data_root, "breast_cancer", day)
    path.parent.mkdir(parents=True)
    path.write_text("row,class\n1,benign\n")
    with pytest.raises(Exception, match="expected a header row with id,label"):
        monitor.read_labels(spec, [day], data_root)


def test_server_errors_from_prometheus_text() -> None:
    text = (
        "# TYPE http_requests_total counter\n"
        'http_requests_total{status="200"} 90\n'
        'http_requests_total{status="422"} 6\n'
        'http_requests_total{status="500"} 4\n'
    )
    assert monitor.read_server_errors(text) == {"requests": 100.0, "errors": 10.0}


def test_server_errors_absent() -> None:
    assert monitor.read_server_errors("# TYPE up gauge\nup 1\n") is None


# ---------------------------------------------------------------------------------------------
# run_monitoring against the real MLflow server and the real prediction log writer


def register_champion(spec, root: Path, x: np.ndarray, y: np.ndarray, accuracy: float) -> str:
    """Store a snapshot by hand, register a version trained on it and make it champion."""
    from mlflow import MlflowClient

    version_id = f"snap{abs(hash((spec.name, str(root)))) % 10**8:08d}"
    folder = root / "snapshots" / spec.dataset.name / version_id
    folder.mkdir(parents=True)
    split = np.zeros(len(y), dtype=np.uint8)
    np.savez(
        folder / "data.npz", x=x, y=y, ids=np.array([str(i) for i in range(len(y))]), split=split
    )
    write_json_atomic(
        folder / "manifest.json",
        {"version_id": version_id, "data_sha256": sha256_file(folder / "data.npz")},
    )
    client = MlflowClient()
    experiment = client.get_experiment_by_name(spec.name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(spec.name)
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "test_accuracy", accuracy)
    client.set_terminated(run.info.run_id)
    model_name = spec.model_name
    if not client.search_registered_models(f"name = '{model_name}'"):
        client.create_registered_model(model_name)
    version = client.create_model_version(
        model_name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    client.set_model_version_tag(
        model_name, version.version, "ml_loop.snapshot_version", version_id
    )
    client.set_model_version_tag(
        model_name, version.version, "ml_loop.candidate_accuracy", str(accuracy)
    )
    client.set_registered_model_alias(model_name, "champion", version.version)
    return str(version.version)


def write_log(log_dir: Path, spec, records: list[dict], inputs: np.ndarray | None = None) -> None:
    """Write records through the real prediction log writer."""
    with PredictionLogWriter(log_dir, spec.model_name, flush_interval_s=0.1) as writer:
        writer.submit(PredictionBatch(records=records, inputs=inputs))


@pytest.mark.mlflow
def test_run_monitoring_logs_and_reports(mlflow_tracking: str, data_root: Path, cancer) -> None:
    from mlflow import MlflowClient

    spec = cancer["spec"]
    y = np.array([spec.dataset.classes.index(label) for label in cancer["labels"]])
    version = register_champion(spec, data_root, cancer["x"].astype(np.float32), y, 0.97)
    start, _, labelled_start, _ = monitor.monitoring_windows(spec.monitoring, WINDOW_END)
    log_dir = data_root / "predictions"
    live = _tabular_records(spec, cancer["x"][:300] * 1.6, cancer["labels"][:300], start)
    labelled = _tabular_records(
        spec, cancer["x"][:300], ["benign"] * 300, labelled_start, prefix="l"
    )
    for record in live + labelled:
        record["model_version"] = version
        record["probabilities"] = [0.2, 0.8]
        record["row"] = 0
        record["input_ref"] = None
    write_log(log_dir, spec, labelled)
    write_log(log_dir, spec, live)
    labels = {f"l{index}": label for index, label in enumerate(cancer["labels"][:300])}
    monitor.write_labels(
        monitor.labels_path(data_root, spec.dataset.name, labelled_start.date()), labels
    )

    result = monitor.run_monitoring(spec, WINDOW_END, data_root, log_dir=log_dir)

    assert result.model_version == version
    assert result.traffic["predictions"] == 300
    assert result.accuracy["labelled"] == 300
    assert result.drift_detected is True
    assert result.accuracy_dropped is True
    client = MlflowClient()
    run = client.get_run(result.mlflow_run_id)
    assert run.data.metrics["predictions"] == 300
    assert run.data.metrics["live_accuracy"] == pytest.approx(result.accuracy["live_accuracy"])
    assert run.data.tags["ml_loop.model_version"] == version
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "breast_cancer-monitoring"
    tags = client.get_model_version(spec.model_name, version).tags
    assert tags[monitor.LAST_MONITORING_RUN_TAG] == result.mlflow_run_id
    artifacts = [item.path for item in client.list_artifacts(result.mlflow_run_id, "monitoring")]
    assert "monitoring/report.html" in artifacts
    report = Path(result.report_path).read_text()
    assert report.count("data:image/png;base64,") >= 3
    assert Path(result.report_path).parent == monitor.report_dir(data_root, spec.name, WINDOW_END)

    again = monitor.run_monitoring(spec, WINDOW_END, data_root, log_dir=log_dir)
    assert again.mlflow_run_id == result.mlflow_run_id


@pytest.mark.mlflow
def test_load_reference_needs_snapshot_tag(mlflow_tracking: str, data_root: Path) -> None:
    from mlflow import MlflowClient

    spec = load_spec("breast_cancer")
    client = MlflowClient()
    name = "monitor-no-tag"
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment("monitor-no-tag"))
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    spec = spec.__class__(**{**spec.__dict__, "model_name": name})
    with pytest.raises(Exception, match=r"ml_loop\.snapshot_version"):
        monitor.load_reference(spec, str(version.version), data_root)
