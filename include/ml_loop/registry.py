"""Model registry: register a trained run as a model version and move its aliases.

The registry uses aliases only, never stages:

- ``challenger`` marks the latest registered candidate, whether or not it passed the gate.
- ``champion`` marks the version the model server serves. It moves only when the gate passed or
  promotion was forced.
- ``previous`` marks the champion that the current champion replaced, so a failed deploy can
  move ``champion`` back to it.

Every version carries the SHA-256 of its weights as the tag ``ml_loop.weights_sha256``, copied
from the training run, and ``load_model`` refuses weights that no longer match it. The gate's
verdict and numbers are version tags too, so the registry UI shows why a version was or was not
promoted.

MLflow and torch are imported inside the functions, because DAG files may import this module.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from ml_loop.errors import MlLoopError
from ml_loop.refs import StageRef

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion
    from torch import nn

logger = logging.getLogger(__name__)

CHALLENGER = "challenger"
CHAMPION = "champion"
PREVIOUS = "previous"

# Kept equal to ml_loop.models.WEIGHTS_SHA_TAG; not imported from there because that module
# imports torch at load time.
WEIGHTS_SHA_TAG = "ml_loop.weights_sha256"
GATE_TAG = "ml_loop.gate"
GATE_REASONS_TAG = "ml_loop.gate_reasons"
CANDIDATE_ACCURACY_TAG = "ml_loop.candidate_accuracy"
CANDIDATE_MACRO_F1_TAG = "ml_loop.candidate_macro_f1"
CHAMPION_ACCURACY_TAG = "ml_loop.champion_accuracy"
CHAMPION_VERSION_TAG = "ml_loop.champion_version"
REPLACED_VERSION_TAG = "ml_loop.replaced_version"
ROLLED_BACK_TAG = "ml_loop.rolled_back"
# Outcome of a canary deploy ("promoted" or "rolled_back") and, for a rollback, its reason.
CANARY_TAG = "ml_loop.canary"
CANARY_REASON_TAG = "ml_loop.canary_reason"
# Last partition date of the snapshot a version was trained on; the gate keeps a champion
# trained on newer data.
DATA_WINDOW_END_TAG = "ml_loop.data_window_end"


@dataclasses.dataclass(frozen=True)
class Registration(StageRef):
    """Outcome of registering one training run: its version and where the aliases point now."""

    model_name: str
    version: str
    run_id: str
    promoted: bool
    forced: bool
    previous_version: str | None
    aliases: list[str]

    producer: ClassVar[str] = "ml_loop.registry.register_candidate"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Registration:
        """Build a Registration from ``to_dict`` output, with versions as strings."""
        registration = super().from_dict(data)
        previous = registration.previous_version
        return dataclasses.replace(
            registration,
            version=str(registration.version),
            previous_version=None if previous is None else str(previous),
            aliases=list(registration.aliases),
        )


def _client(tracking_uri: str | None) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _error_code(err: Exception) -> str | None:
    return getattr(err, "error_code", None)


def register_candidate(
    model_name: str,
    train_result: dict[str, Any],
    evaluation: dict[str, Any],
    *,
    force_promote: bool = False,
    promote_on_pass: bool = True,
    tags: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
) -> Registration:
    """Register the trained run as a version of ``model_name``, tag it and move the aliases.

    A retry or rerun for the same run id finds the version made the first time and returns it
    instead of creating a second version. Its gate tags and aliases are set again, and the
    ``tags`` given when it was created are kept. The version is
    promoted to ``champion`` when ``evaluation["passed"]`` is true (and ``promote_on_pass`` is
    set) or ``force_promote`` is set; the champion it replaces becomes ``previous``. A canary
    deploy registers with ``promote_on_pass=False`` and promotes after the canary with
    ``promote``.

    Raises ModelIntegrityError when the run has no ``ml_loop.weights_sha256`` tag, or when that
    tag differs from ``train_result["weights_sha256"]``.
    """
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    run_id = _required(train_result, "run_id", "train_result", "ml_loop.train")
    passed = bool(_required(evaluation, "passed", "evaluation", "ml_loop.evaluate"))
    weights_sha = _run_weights_sha(client, run_id, train_result.get("weights_sha256"))

    try:
        client.create_registered_model(model_name)
        logger.info("created registered model %s", model_name)
    except MlflowException as err:
        if _error_code(err) != "RESOURCE_ALREADY_EXISTS":
            raise

    provenance = {key: str(value) for key, value in (tags or {}).items() if value is not None}
    version = _find_version(client, model_name, run_id)
    if version is None:
        version = _create_version(client, model_name, run_id, train_result, weights_sha)
    else:
        logger.info(
            "run %s is already registered as %s version %s; reusing it", run_id, model_name, version
        )
        # A rerun adds only tags the version does not have yet, so the tags of the registration
        # that created it (its Airflow run, its snapshot) stay.
        existing = client.get_model_version(model_name, version).tags
        provenance = {key: value for key, value in provenance.items() if key not in existing}

    promote = (passed and promote_on_pass) or force_promote
    forced = force_promote and not passed
    if passed:
        gate = "passed"
    elif forced:
        gate = "forced"
    else:
        gate = "failed"
    version_tags = {
        WEIGHTS_SHA_TAG: weights_sha,
        GATE_TAG: gate,
        **_gate_tags(evaluation),
        **provenance,
    }
    for key, value in version_tags.items():
        client.set_model_version_tag(model_name, version, key, value)

    client.set_registered_model_alias(model_name, CHALLENGER, version)
    previous_version = None
    if promote:
        previous_version = _promote(client, model_name, version)

    aliases = sorted(
        alias
        for alias, target in client.get_registered_model(model_name).aliases.items()
        if target == version
    )
    registration = Registration(
        model_name=model_name,
        version=version,
        run_id=run_id,
        promoted=promote,
        forced=forced,
        previous_version=previous_version,
        aliases=aliases,
    )
    logger.info(
        "registered %s version %s from run %s: gate %s, promoted=%s, previous champion %s, "
        "aliases %s",
        model_name,
        version,
        run_id,
        gate,
        promote,
        previous_version,
        aliases,
    )
    return registration


def _required(data: dict[str, Any], key: str, name: str, stage: str) -> Any:
    if key not in data:
        raise MlLoopError(
            f"{name} has no {key!r} key (keys: {sorted(data)}); pass the dict returned by {stage}"
        )
    return data[key]


def _run_weights_sha(client: MlflowClient, run_id: str, expected: str | None) -> str:
    from ml_loop.models import ModelIntegrityError

    run_sha = client.get_run(run_id).data.tags.get(WEIGHTS_SHA_TAG)
    if run_sha is None:
        raise ModelIntegrityError(
            f"run {run_id} has no {WEIGHTS_SHA_TAG} tag, so its weights cannot be verified when "
            "they are served; log the weights with ml_loop.models.save_weights and set the tag"
        )
    if expected is not None and expected != run_sha:
        raise ModelIntegrityError(
            f"run {run_id} has {WEIGHTS_SHA_TAG}={run_sha}, but the train result reports "
            f"{expected}; the run was changed after training, so it is not registered"
        )
    return run_sha


def _find_version(client: MlflowClient, model_name: str, run_id: str) -> str | None:
    # Filtering on run_id alone and matching the name here avoids quoting the model name into
    # the filter string.
    versions = [
        mv for mv in client.search_model_versions(f"run_id = '{run_id}'") if mv.name == model_name
    ]
    if not versions:
        return None
    numbers = sorted(int(mv.version) for mv in versions)
    if len(numbers) > 1:
        logger.warning(
            "run %s is registered %d times as %s (versions %s); using the first, version %s",
            run_id,
            len(numbers),
            model_name,
            numbers,
            numbers[0],
        )
    return str(numbers[0])


def _create_version(
    client: MlflowClient,
    model_name: str,
    run_id: str,
    train_result: dict[str, Any],
    weights_sha: str,
) -> str:
    source = train_result.get("model_uri") or f"runs:/{run_id}/model"
    # The tracking server links a version to a logged model (URI models:/m-...) only when the
    # request also names the model_id. A runs:/ URI needs only the run id.
    model_id = _logged_model_id(source)
    model_version = client.create_model_version(
        name=model_name,
        source=source,
        run_id=run_id,
        tags={WEIGHTS_SHA_TAG: weights_sha},
        model_id=model_id,
    )
    logger.info(
        "created %s version %s from %s (run %s)", model_name, model_version.version, source, run_id
    )
    return str(model_version.version)


def _logged_model_id(model_uri: str) -> str | None:
    prefix = "models:/"
    if not model_uri.startswith(prefix):
        return None
    rest = model_uri[len(prefix) :]
    if rest.startswith("m-") and "/" not in rest and "@" not in rest:
        return rest
    return None


def _gate_tags(evaluation: dict[str, Any]) -> dict[str, str]:
    candidate = evaluation.get("candidate") or {}
    champion = evaluation.get("champion") or {}
    values = {
        CANDIDATE_ACCURACY_TAG: candidate.get("accuracy"),
        CANDIDATE_MACRO_F1_TAG: candidate.get("macro_f1"),
        CHAMPION_ACCURACY_TAG: champion.get("accuracy"),
        CHAMPION_VERSION_TAG: evaluation.get("champion_version"),
    }
    tags = {key: str(value) for key, value in values.items() if value is not None}
    tags[GATE_REASONS_TAG] = json.dumps(list(evaluation.get("reasons") or []))
    return tags


def _promote(client: MlflowClient, model_name: str, version: str) -> str | None:
    """Point ``champion`` at ``version``; return the champion it replaced, if any."""
    current = client.get_registered_model(model_name).aliases.get(CHAMPION)
    version_tags = client.get_model_version(model_name, version).tags
    if ROLLED_BACK_TAG in version_tags:
        # A rerun promotes a version that a failed deploy rolled back; the deploy checks it again.
        logger.warning(
            "promoting %s version %s again after an earlier rollback", model_name, version
        )
        client.delete_model_version_tag(model_name, version, ROLLED_BACK_TAG)
    if current == version:
        # A rerun after a successful promotion: report what the first run replaced.
        return version_tags.get(REPLACED_VERSION_TAG) or None
    if current is not None:
        # Set previous before moving champion, so champion never points at nothing.
        client.set_registered_model_alias(model_name, PREVIOUS, current)
        client.set_model_version_tag(model_name, version, REPLACED_VERSION_TAG, current)
    client.set_registered_model_alias(model_name, CHAMPION, version)
    return current


def promote(model_name: str, version: str, tracking_uri: str | None = None) -> str | None:
    """Point ``champion`` at ``version`` and ``previous`` at the champion it replaces.

    Returns the replaced champion, or None when there was none. Promoting the current champion
    again changes nothing.
    """
    return _promote(_client(tracking_uri), model_name, str(version))


def get_alias_version(model_name: str, alias: str, tracking_uri: str | None = None) -> str | None:
    """Return the version that ``alias`` points to, or None when the alias or model is missing.

    Other MLflow errors, such as an unreachable tracking server, are raised.
    """
    from mlflow.exceptions import MlflowException

    try:
        registered = _client(tracking_uri).get_registered_model(model_name)
    except MlflowException as err:
        if _error_code(err) == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return registered.aliases.get(alias)


def rollback_champion(
    model_name: str, *, failed_version: str, tracking_uri: str | None = None
) -> str | None:
    """Move ``champion`` from ``failed_version`` back to ``previous``; return the restored version.

    The failed version gets the tag ``ml_loop.rolled_back``. Without a usable ``previous``
    version the champion alias is removed, so no server loads an unverified model, and None is
    returned. When ``champion`` no longer points at ``failed_version`` (someone moved it), the
    alias is left alone and the current champion is returned.
    """
    client = _client(tracking_uri)
    failed_version = str(failed_version)
    aliases = client.get_registered_model(model_name).aliases
    champion = aliases.get(CHAMPION)
    previous = aliases.get(PREVIOUS)
    if champion is not None and champion != failed_version:
        logger.warning(
            "champion of %s points to version %s, not to the failed version %s; leaving it there",
            model_name,
            champion,
            failed_version,
        )
        client.set_model_version_tag(model_name, failed_version, ROLLED_BACK_TAG, "true")
        return champion

    if previous is None or previous == failed_version:
        client.delete_registered_model_alias(model_name, CHAMPION)
        client.set_model_version_tag(model_name, failed_version, ROLLED_BACK_TAG, "true")
        logger.warning(
            "rolled back %s version %s, but no previous champion exists: the champion alias is "
            "removed, so model servers following it serve nothing until a version is promoted",
            model_name,
            failed_version,
        )
        return None

    client.set_registered_model_alias(model_name, CHAMPION, previous)
    client.set_model_version_tag(model_name, failed_version, ROLLED_BACK_TAG, "true")
    logger.warning(
        "rolled back %s: champion moved from version %s back to version %s",
        model_name,
        failed_version,
        previous,
    )
    return previous


def load_model(
    model_name: str, version_or_alias: str | int, tracking_uri: str | None = None
) -> tuple[nn.Module, dict[str, Any], ModelVersion]:
    """Load a registered version's weights, verified against its ``ml_loop.weights_sha256`` tag.

    ``version_or_alias`` is a version number ("3" or 3) or an alias ("champion"). Returns the
    model in eval mode on CPU, its config (``model.json``) and the MLflow ModelVersion. Raises
    ModelIntegrityError when the version has no SHA-256 tag or the weights do not match it, and
    MlLoopError when the version or alias does not exist.
    """
    from mlflow.exceptions import MlflowException

    from ml_loop.models import ModelIntegrityError, load_run_model

    client = _client(tracking_uri)
    reference = str(version_or_alias)
    try:
        if reference.isdigit():
            model_version = client.get_model_version(model_name, reference)
        else:
            model_version = client.get_model_version_by_alias(model_name, reference)
    except MlflowException as err:
        raise MlLoopError(
            f"model {model_name!r} has no version or alias {reference!r}: {err.message}; "
            "check the name, or register and promote a version first"
        ) from err

    expected_sha = model_version.tags.get(WEIGHTS_SHA_TAG)
    if not expected_sha:
        raise ModelIntegrityError(
            f"{model_name} version {model_version.version} has no {WEIGHTS_SHA_TAG} tag, so its "
            "weights cannot be verified; register it with ml_loop.registry.register_candidate"
        )
    model, config = load_run_model(model_version.run_id, expected_sha, tracking_uri=tracking_uri)
    logger.info(
        "loaded %s version %s (run %s, weights %s)",
        model_name,
        model_version.version,
        model_version.run_id,
        expected_sha[:12],
    )
    return model, config, model_version
