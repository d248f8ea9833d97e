"""Deploy step: make the model server serve the new champion, check it, roll back on failure.

The registry step has already moved the ``champion`` alias. This step sends ``POST /reload`` to
the model server (``ml_loop.serving``), waits until the server reports the new version, and
sends the evaluation's smoke samples. Their raw features come from the snapshot's ``data.npz``,
looked up by record id, and the served predictions must equal the ones the evaluation computed
offline. On any failure the alias goes back to ``previous``, the server reloads again, and
DeployError is raised.
"""

from __future__ import annotations

import collections
import dataclasses
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
    token: str | None = None,
) -> dict[str, Any]:
    """Make the server at ``serving_url`` serve the registered version and verify it.

    ``smoke_samples`` are ``[{"id": record_id, "prediction": class_label}, ...]`` from the
    evaluation; ``snapshot_uri`` is the snapshot folder (or its ``data.npz``) that contains those
    records. ``timeout_s`` bounds the whole reload and wait; ``http_timeout_s`` bounds each
    other HTTP call. ``token`` is the server's bearer token, sent when given.

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
    with _client(serving_url, http_timeout_s, token) as client:
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


def _client(serving_url: str, http_timeout_s: float, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return httpx.Client(base_url=serving_url, timeout=http_timeout_s, headers=headers)


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
    # The smoke samples check the champion, so a running canary must not route them elsewhere.
    response = client.post(
        "/invocations", params={"variant": "champion"}, json={"inputs": features}
    )
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


@dataclasses.dataclass(frozen=True)
class CanaryCriteria:
    """Limits a challenger must meet on live traffic to be promoted.

    ``max_error_rate_increase`` bounds the challenger's rate of 5xx responses minus the
    champion's. ``max_latency_ratio`` bounds the challenger's mean /invocations latency over the
    champion's. ``min_agreement`` is the least share of challenger rows whose class the champion
    also predicts. ``max_confidence_drop`` bounds the champion's mean confidence minus the
    challenger's. A limit set to None is not checked.
    """

    min_requests: int
    max_error_rate_increase: float
    max_latency_ratio: float | None
    min_agreement: float | None
    max_confidence_drop: float | None


def canary_deploy(
    serving_url: str,
    registration: dict[str, Any],
    share: float = 0.1,
    min_requests: int = 100,
    max_error_rate_increase: float = 0.01,
    *,
    max_latency_ratio: float | None = 2.0,
    min_agreement: float | None = None,
    max_confidence_drop: float | None = None,
    timeout_s: float = 900,
    poll_interval_s: float = 2.0,
    tracking_uri: str | None = None,
    http_timeout_s: float = 10,
    token: str | None = None,
) -> dict[str, Any]:
    """Route ``share`` of live traffic to the registered challenger, then promote or roll back.

    The version must be the ``challenger`` of its model and not the ``champion`` (register it
    with ``promote_on_pass=False``). The server at ``serving_url`` turns its canary on and this
    function reads ``GET /metrics`` until the challenger has served ``min_requests`` requests
    or ``timeout_s`` passes. Then it compares the two variants over that window (see
    CanaryCriteria). When every limit holds, ``champion`` moves to the version, the canary goes
    off and the server reloads; otherwise the canary goes off, the champion stays, and the
    version gets the tags ``ml_loop.canary=rolled_back`` and ``ml_loop.canary_reason``.

    Returns ``{"serving_url", "served_version", "decision": "promoted" | "rolled_back",
    "reasons": [...], "window": {...}}``; ``window`` holds each variant's requests, errors,
    error rate, mean latency and mean confidence, and the agreement. Raises DeployError when
    the aliases do not allow a canary or the server cannot be reached.
    """
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
        raise DeployError(f"share={share!r} is invalid; expected a number with 0 < share <= 1")
    if min_requests < 1:
        raise DeployError(f"min_requests={min_requests!r} is invalid; expected an integer >= 1")
    criteria = CanaryCriteria(
        min_requests, max_error_rate_increase, max_latency_ratio, min_agreement,
        max_confidence_drop,
    )  # fmt: skip
    reg = registry.Registration.from_dict(registration)
    _check_canary_aliases(reg, tracking_uri)
    logger.info(
        "canary of %s version %s on %s: share %.3f, at least %d requests within %.0f s",
        reg.model_name,
        reg.version,
        serving_url,
        share,
        min_requests,
        timeout_s,
    )
    with _client(serving_url, http_timeout_s, token) as client:
        try:
            window, reasons = _run_canary(
                client, reg.version, share, criteria, timeout_s, poll_interval_s
            )
        except httpx.HTTPError as err:
            _canary_off(client)
            raise DeployError(
                f"canary of {reg.model_name} version {reg.version} on {serving_url} failed: "
                f"{type(err).__name__}: {err}; the champion is unchanged"
            ) from err
        _canary_off(client)
        if reasons:
            return _reject_canary(serving_url, reg, reasons, window, tracking_uri)
        registry.promote(reg.model_name, reg.version, tracking_uri=tracking_uri)
        _tag(reg, {registry.CANARY_TAG: "promoted"}, tracking_uri)
        deadline = time.monotonic() + timeout_s
        try:
            _reload(client, reg.version, deadline, http_timeout_s)
            _wait_for_version(client, reg.version, deadline)
        except Exception as err:
            _roll_back(client, reg, err, tracking_uri, max(timeout_s, http_timeout_s))
    logger.info(
        "canary passed: %s version %s is the champion; window %s",
        reg.model_name,
        reg.version,
        window,
    )
    return {
        "serving_url": serving_url,
        "served_version": reg.version,
        "decision": "promoted",
        "reasons": [],
        "window": window,
    }


def _check_canary_aliases(reg: registry.Registration, tracking_uri: str | None) -> None:
    champion = registry.get_alias_version(reg.model_name, registry.CHAMPION, tracking_uri)
    challenger = registry.get_alias_version(reg.model_name, registry.CHALLENGER, tracking_uri)
    if champion is None:
        raise DeployError(
            f"{reg.model_name} has no champion to compare version {reg.version} with; deploy "
            "the first version with deploy_champion"
        )
    if champion == reg.version:
        raise DeployError(
            f"{reg.model_name} version {reg.version} is already the champion, so a canary has "
            "nothing to compare; register it with promote_on_pass=False for a canary deploy"
        )
    if challenger != reg.version:
        raise DeployError(
            f"the challenger alias of {reg.model_name} points to version {challenger}, not "
            f"{reg.version}; a newer registration replaced it, so this canary is skipped"
        )


def _run_canary(
    client: httpx.Client,
    version: str,
    share: float,
    criteria: CanaryCriteria,
    timeout_s: float,
    poll_interval_s: float,
) -> tuple[dict[str, Any], list[str]]:
    """Turn the canary on and watch it; return the window's numbers and the failed limits."""
    response = client.post("/canary", json={"share": share}, timeout=max(timeout_s, 30))
    if response.status_code == 503:
        error = response.json().get("error")
        return {}, [f"the server could not load the challenger version {version}: {error}"]
    response.raise_for_status()
    served = response.json().get("challenger_version")
    if served != version:
        return {}, [f"the server loaded challenger version {served}, not {version}"]
    baseline = _scrape(client)
    deadline = time.monotonic() + timeout_s
    while True:
        window = _window(baseline, _scrape(client))
        if window["challenger"]["requests"] >= criteria.min_requests:
            break
        state = client.get("/canary").json()
        if state.get("challenger_version") != version:
            reason = (
                f"the server stopped serving challenger version {version} during the canary "
                f"(now {state.get('challenger_version')}; last error "
                f"{state.get('challenger_last_error')})"
            )
            return window, [reason]
        if time.monotonic() >= deadline:
            return window, [
                f"the challenger served {window['challenger']['requests']} requests within "
                f"{timeout_s:.0f} s, fewer than the {criteria.min_requests} required"
            ]
        time.sleep(poll_interval_s)
    return window, _failed_limits(window, criteria)


def _failed_limits(window: dict[str, Any], criteria: CanaryCriteria) -> list[str]:
    champion, challenger = window["champion"], window["challenger"]
    reasons = []
    increase = challenger["error_rate"] - champion["error_rate"]
    if increase > criteria.max_error_rate_increase:
        reasons.append(
            f"the challenger's error rate {challenger['error_rate']:.4f} exceeds the champion's "
            f"{champion['error_rate']:.4f} by {increase:.4f}, more than the allowed "
            f"{criteria.max_error_rate_increase}"
        )
    ratio = None
    if champion["mean_latency_s"] and challenger["mean_latency_s"] is not None:
        ratio = challenger["mean_latency_s"] / champion["mean_latency_s"]
    limit = criteria.max_latency_ratio
    if limit is not None and ratio is not None and ratio > limit:
        reasons.append(
            f"the challenger's mean latency is {ratio:.2f} times the champion's, more than the "
            f"allowed {limit}"
        )
    agreement = window["agreement"]
    required = criteria.min_agreement
    if required is not None and agreement is not None and agreement < required:
        reasons.append(
            f"the champion predicts the same class for {agreement:.4f} of the challenger's "
            f"rows, less than the required {required}"
        )
    if criteria.max_confidence_drop is not None:
        champion_confidence = champion["mean_confidence"]
        challenger_confidence = challenger["mean_confidence"]
        if champion_confidence is not None and challenger_confidence is not None:
            drop = champion_confidence - challenger_confidence
            if drop > criteria.max_confidence_drop:
                reasons.append(
                    f"the challenger's mean confidence {challenger_confidence:.4f} is "
                    f"{drop:.4f} below the champion's {champion_confidence:.4f}, more than the "
                    f"allowed {criteria.max_confidence_drop}"
                )
    return reasons


VARIANTS = ("champion", "challenger")
INVOCATIONS_ENDPOINT = "/invocations"


def _scrape(client: httpx.Client) -> dict[str, float]:
    """Read the server's metrics into flat sums keyed by ``<variant>.<quantity>``."""
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    response.raise_for_status()
    totals: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = sample.labels
            variant = labels.get("variant")
            if sample.name == "ml_loop_serving_requests_total":
                if labels.get("endpoint") == INVOCATIONS_ENDPOINT and variant in VARIANTS:
                    totals[f"{variant}.requests"] += sample.value
                    if int(labels.get("status", "0")) >= 500:
                        totals[f"{variant}.errors"] += sample.value
            elif sample.name in (
                "ml_loop_serving_request_duration_seconds_sum",
                "ml_loop_serving_request_duration_seconds_count",
            ):
                if labels.get("endpoint") == INVOCATIONS_ENDPOINT and variant in VARIANTS:
                    totals[f"{variant}.latency_{sample.name.rsplit('_', 1)[1]}"] += sample.value
            elif sample.name in (
                "ml_loop_serving_prediction_confidence_sum",
                "ml_loop_serving_prediction_confidence_count",
            ):
                if variant in VARIANTS:
                    totals[f"{variant}.confidence_{sample.name.rsplit('_', 1)[1]}"] += sample.value
            elif sample.name == "ml_loop_serving_canary_agreement_rows_total":
                totals[f"agreement.{labels.get('result')}"] += sample.value
    return dict(totals)


def _window(baseline: dict[str, float], current: dict[str, float]) -> dict[str, Any]:
    """Return each variant's numbers between two scrapes."""

    # NOTE: a server restart during the canary resets its counters. Differences are clamped at
    # zero, so the window then undercounts and may end only at the timeout.
    def delta(key: str) -> float:
        return max(current.get(key, 0.0) - baseline.get(key, 0.0), 0.0)

    window: dict[str, Any] = {}
    for variant in VARIANTS:
        requests = delta(f"{variant}.requests")
        errors = delta(f"{variant}.errors")
        latency_count = delta(f"{variant}.latency_count")
        confidence_count = delta(f"{variant}.confidence_count")
        window[variant] = {
            "requests": int(requests),
            "errors": int(errors),
            "error_rate": errors / requests if requests else 0.0,
            "mean_latency_s": (
                delta(f"{variant}.latency_sum") / latency_count if latency_count else None
            ),
            "mean_confidence": (
                delta(f"{variant}.confidence_sum") / confidence_count if confidence_count else None
            ),
        }
    agree, disagree = delta("agreement.agree"), delta("agreement.disagree")
    window["agreement"] = agree / (agree + disagree) if agree + disagree else None
    return window


def _canary_off(client: httpx.Client) -> None:
    try:
        client.delete("/canary").raise_for_status()
    except httpx.HTTPError as err:
        logger.error(
            "turning the canary off failed (%s: %s); send DELETE /canary to the model server",
            type(err).__name__,
            err,
        )


def _reject_canary(
    serving_url: str,
    reg: registry.Registration,
    reasons: list[str],
    window: dict[str, Any],
    tracking_uri: str | None,
) -> dict[str, Any]:
    reason = "; ".join(reasons)
    _tag(
        reg, {registry.CANARY_TAG: "rolled_back", registry.CANARY_REASON_TAG: reason}, tracking_uri
    )
    champion = registry.get_alias_version(reg.model_name, registry.CHAMPION, tracking_uri)
    logger.warning(
        "canary of %s version %s rolled back: %s; champion stays version %s",
        reg.model_name,
        reg.version,
        reason,
        champion,
    )
    return {
        "serving_url": serving_url,
        "served_version": champion,
        "decision": "rolled_back",
        "reasons": reasons,
        "window": window,
    }


def _tag(reg: registry.Registration, tags: dict[str, str], tracking_uri: str | None) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    for key, value in tags.items():
        # MLflow limits tag values to 5000 characters.
        client.set_model_version_tag(reg.model_name, reg.version, key, value[:5000])
