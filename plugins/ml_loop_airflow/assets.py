"""The retrain request asset, and the training DAG's side of it.

The monitoring DAG emits an event on ``retrain_asset(spec)`` when it requests a retrain; the
event's extra contains the reason, the numbers behind it, the window and the model version. The
training DAG runs on its cron schedule and also on every such event
(``training_schedule``), and its first task reads the reason back with ``retrain_reason``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable

if TYPE_CHECKING:
    from ml_loop.spec import PipelineSpec

logger = logging.getLogger(__name__)

RETRAIN_ASSET_PREFIX = "ml_loop_retrain_"
# Airflow applies no scheme rules to URIs whose scheme starts with "x-".
RETRAIN_URI_PREFIX = "x-ml-loop://retrain/"
ASSET_TRIGGERED = "asset_triggered"
AIRFLOW_API_CONN_ID = "ml_loop_airflow_api"
# Airflow 3.3 rejects run notes longer than this.
MAX_NOTE_CHARS = 1000


def retrain_asset(spec_name: str) -> Asset:
    """Return the asset whose events request a retrain of the spec ``spec_name``."""
    return Asset(name=f"{RETRAIN_ASSET_PREFIX}{spec_name}", uri=f"{RETRAIN_URI_PREFIX}{spec_name}")


def training_schedule(spec: PipelineSpec) -> AssetOrTimeSchedule:
    """Return the training DAG's schedule: the spec's cron schedule in UTC, or a retrain request."""
    return AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(spec.schedule, timezone="UTC"),
        assets=[retrain_asset(spec.name)],
    )


def retrain_reason(context: Mapping[str, Any]) -> dict[str, Any] | None:
    """Return the latest retrain request that started this run, or None for other runs.

    The result is the event's extra (see ``ml_loop.feedback.RetrainDecision.asset_extra``)
    plus ``event_count`` (events consumed by this run), ``event_timestamp`` and the monitoring
    run that emitted it (``source_dag_id``, ``source_run_id``).
    """
    dag_run = context.get("dag_run")
    run_type = getattr(dag_run, "run_type", None)
    if getattr(run_type, "value", run_type) != ASSET_TRIGGERED:
        return None
    spec_name = context["params"]["spec"]
    events = list(context["triggering_asset_events"].get(retrain_asset(spec_name), []))
    if not events:
        return None
    latest = max(events, key=lambda event: event.timestamp)
    return {
        **dict(latest.extra or {}),
        "event_count": len(events),
        "event_timestamp": latest.timestamp.isoformat(),
        "source_dag_id": latest.source_dag_id,
        "source_run_id": latest.source_run_id,
    }


def retrain_tags(reason: Mapping[str, Any] | None) -> dict[str, str]:
    """Return MLflow run tags for a retrain request (none for a scheduled or manual run)."""
    if reason is None:
        return {}
    findings = [str(item.get("metric")) for item in reason.get("findings") or []]
    return {
        "ml_loop.trigger": "retrain_request",
        "ml_loop.retrain_reason": str(reason.get("reason", ""))[:5000],
        "ml_loop.retrain_findings": json.dumps(findings),
        "ml_loop.retrain_window_end": str(reason.get("window_end", "")),
        "ml_loop.retrain_model_version": str(reason.get("model_version", "")),
        "ml_loop.retrain_monitoring_run": str(reason.get("monitoring_run_id", "")),
    }


def retrain_note(reason: Mapping[str, Any]) -> str:
    """Return a short Markdown run note that explains why monitoring requested this run."""
    lines = [
        f"**Retrain requested by monitoring** ({reason.get('source_dag_id')}, "
        f"run {reason.get('source_run_id')})",
        "",
        f"Model {reason.get('model_name')} version {reason.get('model_version')}, window "
        f"{reason.get('window_start')} to {reason.get('window_end')}.",
        "",
    ]
    for finding in reason.get("findings") or []:
        lines.append(
            f"- {finding.get('metric')} = {float(finding.get('value', 0)):.4f} "
            f"(threshold {finding.get('threshold')})"
        )
    if reason.get("report_uri"):
        lines.append(f"\nReport: {reason['report_uri']}")
    note = "\n".join(lines)
    return note if len(note) <= MAX_NOTE_CHARS else note[: MAX_NOTE_CHARS - 3] + "..."


def set_run_note(
    context: Mapping[str, Any], note: str, conn_id: str = AIRFLOW_API_CONN_ID, timeout_s: float = 10
) -> bool:
    """Set the note of this task's DAG run through the Airflow REST API; return True on success.

    The Task SDK of Airflow 3.3 has no call that changes a run's note, so this uses the public
    API (``PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}?update_mask=note``) with a token from
    ``POST /auth/token``. The Airflow connection ``conn_id`` gives the API server's address
    (host, port, schema http or https) and a user's login and password. Without the connection
    the note is not set and a WARNING explains how to add it; API errors are raised.
    """
    import httpx
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = Connection.get(conn_id)
    except AirflowNotFoundException:
        logger.warning(
            "Airflow connection %r not found, so the run note is not set; add it with the API "
            "server's URL and a user, for example AIRFLOW_CONN_%s=http://admin:<password>@"
            "127.0.0.1:8080",
            conn_id,
            conn_id.upper(),
        )
        return False
    base = f"{conn.schema or 'http'}://{conn.host}{f':{conn.port}' if conn.port else ''}"
    with httpx.Client(base_url=base, timeout=timeout_s) as client:
        response = client.post(
            "/auth/token", json={"username": conn.login, "password": conn.password}
        )
        response.raise_for_status()
        token = response.json()["access_token"]
        dag_id = context["dag"].dag_id
        run_id = context["run_id"]
        response = client.patch(
            f"/api/v2/dags/{dag_id}/dagRuns/{run_id}",
            params={"update_mask": "note"},
            json={"note": note[:MAX_NOTE_CHARS]},
            headers={"Authorization": f"Bearer {token}"},
        )
        response.raise_for_status()
    logger.info("set the note of run %s of %s", run_id, dag_id)
    return True
