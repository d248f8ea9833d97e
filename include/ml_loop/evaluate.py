"""Score a trained candidate and the current champion on the snapshot's test split, and gate it.

Both models are loaded from their ``weights/`` artifacts after a SHA-256 check and score the same
frozen test split of the snapshot the candidate was trained on. The candidate passes the gate when
its test accuracy reaches ``spec.gate.min_accuracy`` and, if a champion exists, is at most
``spec.gate.max_regression`` below the champion's.

The scores, the champion's accuracy and a confusion-matrix PNG are logged to the candidate's
MLflow run. Every error propagates, so a broken model or artifact fails the gate loudly instead of
scoring zero.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

from ml_loop import models, registry
from ml_loop.errors import MlLoopError
from ml_loop.refs import StageRef
from ml_loop.spec import GateSpec, PipelineSpec
from ml_loop.train import SPLIT_TEST, Snapshot, TrainResult

logger = logging.getLogger(__name__)

CHAMPION_ALIAS = registry.CHAMPION
CONFUSION_ARTIFACT_DIR = "evaluation"
CONFUSION_FILE = "confusion_matrix.png"
SMOKE_SAMPLE_COUNT = 16
# Subtracting max_regression from an accuracy can round the result up in its last bits. This
# margin keeps a candidate that ties the bound from failing the gate.
_TIE_TOLERANCE = 1e-9


@dataclasses.dataclass(frozen=True)
class Evaluation(StageRef):
    """The gate decision with the scores behind it, passed to the register and deploy steps.

    ``candidate`` and ``champion`` are score dicts ``{accuracy, macro_f1, per_class_recall}``.
    ``smoke_samples`` are test-split ids with the candidate's predicted label, for comparing the
    model server's predictions after deployment.
    """

    producer: ClassVar[str] = "ml_loop.evaluate.evaluate_candidate"

    candidate: dict[str, Any]
    champion: dict[str, Any] | None
    champion_version: str | None
    passed: bool
    reasons: list[str]
    smoke_samples: list[dict[str, str]]
    confusion_uri: str


def classification_scores(
    y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Return accuracy, macro F1 and the recall of each class label.

    Macro F1 averages over the classes present in ``y_true``. A class absent from ``y_true`` has
    recall None, because its recall is undefined.
    """
    if len(y_true) == 0:
        raise MlLoopError("cannot score an empty test split")
    present = sorted(set(np.unique(y_true).tolist()))
    recalls = recall_score(y_true, y_pred, labels=present, average=None, zero_division=0)
    recall_by_index = dict(zip(present, recalls.tolist(), strict=True))
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(
            f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)
        ),
        "per_class_recall": {
            label: recall_by_index.get(index) for index, label in enumerate(classes)
        },
    }


def evaluate_candidate(
    spec: PipelineSpec,
    snapshot_uri: str | Path,
    train_result: dict[str, Any],
    *,
    tracking_uri: str | None = None,
) -> Evaluation:
    """Score the candidate and the champion on the snapshot's test split and decide the gate.

    ``train_result`` is a ``TrainResult`` dict. The champion is the version of
    ``spec.model_name`` behind the alias ``champion``. Without a registered model or the alias
    there is no champion, and only the accuracy floor applies.
    """
    candidate_run = TrainResult.from_dict(train_result)
    client = MlflowClient(tracking_uri=tracking_uri)
    snapshot = Snapshot.load(snapshot_uri)
    x_test, y_test, ids_test = snapshot.subset(SPLIT_TEST)
    if len(y_test) == 0:
        raise MlLoopError(
            f"snapshot {snapshot.uri} has no rows in the test split, so the candidate cannot be "
            "gated; check the spec's split shares and the rows of the training window"
        )
    classes = list(spec.dataset.classes)
    features = torch.from_numpy(x_test)

    candidate_model, _ = _load_verified(
        candidate_run.run_id, candidate_run.weights_sha256, classes, tracking_uri
    )
    candidate_pred = _predict(candidate_model, features)
    candidate = classification_scores(y_test, candidate_pred, classes)

    champion_version, champion, self_compared = _score_champion(
        client, spec.model_name, candidate_run.run_id, candidate, features, y_test, classes
    )
    champion_window_end = None
    if champion_version is not None and not self_compared:
        champion_tags = client.get_model_version(spec.model_name, champion_version).tags
        champion_window_end = champion_tags.get(registry.DATA_WINDOW_END_TAG)
    passed, reasons = decide_gate(
        spec.gate,
        candidate,
        champion,
        champion_version,
        model_name=spec.model_name,
        self_compared=self_compared,
        candidate_window_end=snapshot.manifest.get("window", {}).get("end"),
        champion_window_end=champion_window_end,
    )
    absent = [label for label, recall in candidate["per_class_recall"].items() if recall is None]
    if absent:
        reasons.append(
            f"Classes {', '.join(absent)} have no rows in the test split of snapshot "
            f"{snapshot.version_id}, so their recall is not reported."
        )

    confusion_uri = _log_to_candidate_run(
        client, candidate_run.run_id, candidate, champion, y_test, candidate_pred, classes
    )
    order = np.argsort(ids_test, kind="stable")[:SMOKE_SAMPLE_COUNT]
    smoke_samples = [
        {"id": str(ids_test[i]), "prediction": classes[int(candidate_pred[i])]} for i in order
    ]

    evaluation = Evaluation(
        candidate=candidate,
        champion=champion,
        champion_version=champion_version,
        passed=passed,
        reasons=reasons,
        smoke_samples=smoke_samples,
        confusion_uri=confusion_uri,
    )
    logger.info(
        "evaluated run %s on %d test rows of snapshot %s: accuracy %.4f, macro F1 %.4f, "
        "champion %s, gate %s",
        candidate_run.run_id,
        len(y_test),
        snapshot.version_id,
        candidate["accuracy"],
        candidate["macro_f1"],
        evaluation.champion_version or "none",
        "passed" if passed else "failed",
    )
    return evaluation


def decide_gate(
    gate: GateSpec,
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    champion_version: str | None,
    *,
    model_name: str,
    self_compared: bool = False,
    candidate_window_end: str | None = None,
    champion_window_end: str | None = None,
) -> tuple[bool, list[str]]:
    """Apply the accuracy floor, the allowed regression and data freshness.

    Returns (passed, reasons). A candidate whose training data ends before the champion's (a
    backfill of an earlier day) fails, so a backfill never replaces a model trained on newer
    data unless the run forces promotion. The window ends are ISO dates.
    """
    accuracy = candidate["accuracy"]
    reasons = []
    meets_floor = accuracy + _TIE_TOLERANCE >= gate.min_accuracy
    reasons.append(
        f"Candidate test accuracy {accuracy:.4f} "
        f"{'meets' if meets_floor else 'is below'} the floor {gate.min_accuracy:.4f} "
        "(gate.min_accuracy)."
    )
    within_regression = True
    if champion is None:
        reasons.append(
            f"{model_name} has no version with alias '{CHAMPION_ALIAS}', so only the floor applies."
        )
    elif self_compared:
        reasons.append(
            f"Champion version {champion_version} is this candidate's own run, so the candidate "
            "is compared with itself and cannot regress."
        )
    else:
        bound = champion["accuracy"] - gate.max_regression
        within_regression = accuracy + _TIE_TOLERANCE >= bound
        reasons.append(
            f"Candidate test accuracy {accuracy:.4f} is "
            f"{'at least' if within_regression else 'below'} {bound:.4f}, the champion version "
            f"{champion_version} accuracy {champion['accuracy']:.4f} minus the allowed regression "
            f"{gate.max_regression:.4f} (gate.max_regression)."
        )
    fresh_enough = True
    if champion is not None and not self_compared and candidate_window_end and champion_window_end:
        fresh_enough = candidate_window_end >= champion_window_end
        if fresh_enough:
            reasons.append(
                f"Candidate data ends on {candidate_window_end}, not before the champion's "
                f"{champion_window_end}."
            )
        else:
            reasons.append(
                f"Candidate data ends on {candidate_window_end}, before the champion's "
                f"{champion_window_end}, so it does not replace a champion trained on newer data "
                "(trigger with force_promote to override)."
            )
    return meets_floor and within_regression and fresh_enough, reasons


def _score_champion(
    client: MlflowClient,
    model_name: str,
    candidate_run_id: str,
    candidate: dict[str, Any],
    features: torch.Tensor,
    y_test: np.ndarray,
    classes: list[str],
) -> tuple[str | None, dict[str, Any] | None, bool]:
    """Score the champion; return (version, scores, whether it is the candidate's own run).

    The champion is loaded by version number through ``registry.load_model``, which verifies its
    weights against the version's ``ml_loop.weights_sha256`` tag.
    """
    tracking_uri = client.tracking_uri
    version = registry.get_alias_version(model_name, CHAMPION_ALIAS, tracking_uri)
    if version is None:
        logger.info("%s has no version with alias %s", model_name, CHAMPION_ALIAS)
        return None, None, False
    version = str(version)
    if client.get_model_version(model_name, version).run_id == candidate_run_id:
        return version, candidate, True
    model, config, model_version = registry.load_model(model_name, version, tracking_uri)
    _check_classes(model_version.run_id, config, classes)
    return version, classification_scores(y_test, _predict(model, features), classes), False


def _load_verified(
    run_id: str, expected_sha256: str, classes: list[str], tracking_uri: str | None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    model, config = models.load_run_model(run_id, expected_sha256, tracking_uri=tracking_uri)
    _check_classes(run_id, config, classes)
    return model, config


def _check_classes(run_id: str, config: dict[str, Any], classes: list[str]) -> None:
    if list(config["classes"]) != classes:
        raise MlLoopError(
            f"model of run {run_id} predicts classes {config['classes']}, but the spec has "
            f"{classes}; a model trained for other classes cannot be scored on this test split"
        )


def _predict(model: torch.nn.Module, features: torch.Tensor) -> np.ndarray:
    return models.predict_proba(model, features).argmax(dim=1).numpy()


def _log_to_candidate_run(
    client: MlflowClient,
    run_id: str,
    candidate: dict[str, Any],
    champion: dict[str, Any] | None,
    y_test: np.ndarray,
    y_pred: np.ndarray,
    classes: list[str],
) -> str:
    """Log the test metrics in one batch and the confusion matrix; return the PNG's URI."""
    values = {"test_accuracy": candidate["accuracy"], "test_macro_f1": candidate["macro_f1"]}
    for label, recall in candidate["per_class_recall"].items():
        if recall is not None:
            values[f"test_recall_{_metric_safe(label)}"] = recall
    if champion is not None:
        values["champion_test_accuracy"] = champion["accuracy"]
    now_ms = int(time.time() * 1000)
    metrics = [
        Metric(key=key, value=value, timestamp=now_ms, step=0) for key, value in values.items()
    ]
    client.log_batch(run_id, metrics=metrics, synchronous=True)

    with tempfile.TemporaryDirectory(prefix="ml-loop-eval-") as tmp:
        path = Path(tmp) / CONFUSION_FILE
        _plot_confusion_matrix(y_test, y_pred, classes, path)
        client.log_artifact(run_id, str(path), CONFUSION_ARTIFACT_DIR)
    artifact_uri = client.get_run(run_id).info.artifact_uri
    return f"{artifact_uri}/{CONFUSION_ARTIFACT_DIR}/{CONFUSION_FILE}"


def _plot_confusion_matrix(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list[str], path: Path
) -> None:
    from matplotlib.figure import Figure

    matrix = confusion_matrix(y_true, y_pred, labels=list(range(len(classes))))
    size = max(4.0, 0.5 * len(classes) + 2)
    figure = Figure(figsize=(size, size), layout="constrained")
    axis = figure.subplots()
    image = axis.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=axis, shrink=0.8)
    ticks = range(len(classes))
    axis.set_xticks(ticks, classes, rotation=45 if max(map(len, classes)) > 3 else 0)
    axis.set_yticks(ticks, classes)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"test split, {len(y_true)} rows")
    threshold = matrix.max() / 2 if matrix.size else 0
    for row in range(matrix.shape[0]):
        for column in range(matrix.shape[1]):
            count = matrix[row, column]
            color = "white" if count > threshold else "black"
            axis.text(column, row, str(count), ha="center", va="center", color=color, fontsize=8)
    figure.savefig(path, dpi=100)


def _metric_safe(label: str) -> str:
    """Replace characters that MLflow rejects in metric keys with underscores."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", label)
