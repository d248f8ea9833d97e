"""Deploy step: make the model server serve the new champion, check it, roll back on failure.

The registry step has already moved the ``champion`` alias. This step sends ``POST /reload`` to
the model server (``ml_loop.serving``), waits until the server reports the new version, and
sends the evaluation's smoke samples. Their raw features come from the snapshot's ``data.npz``,
looked up by record id, and the served predictions must equal the ones the evaluation computed
offline. On any failure the alias goes back to ``previous``, the server reloads again, and
DeployError is raised.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import httpx

from ml_loop import registry
from ml_loop.errors import DeployError

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
SNAPSHOT_DATA_FILE = "data.npz"


class _CheckFailed(Exception):
    """Verification of the served version failed; the message names the cause."""


def deploy_champion(
    serving_url: str,
    registration: dict[str, Any],
    smoke_samples: list[dict[str, Any]],
    snapshot_uri: str,
    *,
    timeout_s: float = 120,
    tracking_uri: str | None = None,
    http_timeout_s: float = 10,
) -> dict[str, Any]:
    """Make the server at ``serving_url`` serve the registered version and verify it.

    ``smoke_samples`` are ``[{"id": record_id, "prediction": class_label}, ...]`` from the
    evaluation; ``snapshot_uri`` is the snapshot folder (or its ``data.npz``) that contains those
    records. ``timeout_s`` bounds the whole reload and wait; ``http_timeout_s`` bounds each
    other HTTP call.

    Returns ``{"serving_url", "served_version"}``; ``served_version`` is None when the version
    was not promoted, in which case nothing is sent to the server. Raises DeployError, after
    moving ``champion`` back, when the server fails to load the version, does not report it
    within ``timeout_s``, returns an HTTP error, or serves different smoke predictions.
    """
    reg = registry.Registration.from_dict(registration)
    if not reg.promoted:
        logger.info(
            "%s version %s was not promoted, so the champion is unchanged; nothing to deploy",
            reg.model_name,
            reg.version,
        )
        return {"serving_url": serving_url, "served_version": None}

    logger.info(
        "deploying %s version %s to %s with %d smoke samples",
        reg.model_name,
        reg.version,
        serving_url,
        len(smoke_samples),
    )
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=serving_url, timeout=http_timeout_s) as client:
        try:
            features = _smoke_features(snapshot_uri, smoke_samples)
            _reload(client, reg.version, deadline, http_timeout_s)
            _wait_for_version(client, reg.version, deadline)
            _check_smoke_predictions(client, reg.version, smoke_samples, features)
        except Exception as err:
            # Whatever stopped the check, champion now points to an unverified version.
            _roll_back(client, reg, err, tracking_uri, max(timeout_s, http_timeout_s))
    logger.info("deployed %s version %s to %s", reg.model_name, reg.version, serving_url)
    return {"serving_url": serving_url, "served_version": reg.version}


def _smoke_features(snapshot_uri: str, smoke_samples: list[dict[str, Any]]) -> list[list[Any]]:
    import numpy as np

    if not smoke_samples:
        raise _CheckFailed("no smoke samples were given, so the served model cannot be verified")
    path = Path(snapshot_uri)
    if path.is_dir():
        path = path / SNAPSHOT_DATA_FILE
    with np.load(path, allow_pickle=False) as data:
        ids = [str(record_id) for record_id in data["ids"]]
        x = data["x"]
    positions = {record_id: i for i, record_id in enumerate(ids)}
    requested_ids = [str(sample["id"]) for sample in smoke_samples]
    missing = [record_id for record_id in requested_ids if record_id not in positions]
    if missing:
        raise _CheckFailed(f"smoke sample ids {missing} are not in {path}")
    return x[[positions[record_id] for record_id in requested_ids]].tolist()


def _reload(client: httpx.Client, version: str, deadline: float, http_timeout_s: float) -> None:
    # A reload returns once the server has downloaded and loaded the model, which can take
    # longer than an ordinary call, so it may use all the time left before the deadline.
    timeout = max(deadline - time.monotonic(), http_timeout_s)
    response = client.post("/reload", timeout=timeout)
    if response.status_code == 503:
        body = response.json()
        if body.get("alias_version") == version and body.get("error"):
            raise _CheckFailed(f"the server could not load version {version}: {body['error']}")
        # Any other 503 (for example a registry hiccup) is left to the wait, which the server's
        # poller may still satisfy.
        logger.warning("POST /reload returned 503: %s; waiting for the server's own poll", body)
        return
    response.raise_for_status()


def _wait_for_version(client: httpx.Client, version: str, deadline: float) -> None:
    last_seen: Any = None
    while True:
        try:
            response = client.get("/version")
            response.raise_for_status()
            last_seen = response.json()
            if last_seen.get("version") == version:
                return
        except httpx.HTTPError as err:
            last_seen = f"{type(err).__name__}: {err}"
        if time.monotonic() >= deadline:
            raise _CheckFailed(
                f"the server did not report version {version} before the timeout; last "
                f"GET /version: {last_seen}"
            )
        time.sleep(POLL_INTERVAL_S)


def _check_smoke_predictions(
    client: httpx.Client,
    version: str,
    smoke_samples: list[dict[str, Any]],
    features: list[list[Any]],
) -> None:
    response = client.post("/invocations", json={"inputs": features})
    if response.status_code != 200:
        raise _CheckFailed(
            f"POST /invocations with the smoke samples returned {response.status_code}: "
            f"{response.text[:2000]}"
        )
    body = response.json()
    if str(body.get("model_version")) != version:
        raise _CheckFailed(
            f"the smoke request was served by version {body.get('model_version')}, not {version}"
        )
    served = body.get("predictions")
    if not isinstance(served, list) or len(served) != len(smoke_samples):
        raise _CheckFailed(
            f"the server returned {served!r} as predictions; expected a list of "
            f"{len(smoke_samples)} labels, one per smoke sample"
        )
    mismatches = [
        f"{sample['id']} (expected {sample['prediction']!r}, served {prediction!r})"
        for sample, prediction in zip(smoke_samples, served, strict=True)
        if str(sample["prediction"]) != str(prediction)
    ]
    if mismatches:
        raise _CheckFailed(
            f"{len(mismatches)} of {len(smoke_samples)} smoke predictions differ from the "
            f"offline ones: {', '.join(mismatches)}"
        )


def _roll_back(
    client: httpx.Client,
    reg: registry.Registration,
    err: Exception,
    tracking_uri: str | None,
    reload_timeout_s: float,
) -> None:
    reason = str(err) if isinstance(err, _CheckFailed) else f"{type(err).__name__}: {err}"
    logger.error(
        "deploy of %s version %s failed: %s; rolling back", reg.model_name, reg.version, reason
    )
    try:
        restored = registry.rollback_champion(
            reg.model_name, failed_version=reg.version, tracking_uri=tracking_uri
        )
    except Exception as rollback_err:
        raise DeployError(
            f"deploy of {reg.model_name} version {reg.version} failed: {reason}. The rollback "
            f"failed too ({type(rollback_err).__name__}: {rollback_err}), so champion may still "
            f"point to version {reg.version}; move the champion alias back to the previous "
            "version in the MLflow registry and POST /reload to the model server"
        ) from rollback_err
    try:
        response = client.post("/reload", timeout=reload_timeout_s)
        server_state = f"the server reports {response.status_code}: {response.text[:500]}"
    except httpx.HTTPError as reload_err:
        server_state = (
            f"the server did not confirm the reload ({type(reload_err).__name__}: {reload_err}) "
            "and follows the alias at its next poll"
        )
    if restored is None:
        outcome = (
            "no previous version exists, so the champion alias was removed and the server "
            "serves nothing"
        )
    else:
        outcome = f"champion now points to the restored version {restored}"
    raise DeployError(
        f"deploy of {reg.model_name} version {reg.version} failed: {reason}. Rolled back: "
        f"{outcome}; {server_state}"
    ) from err
