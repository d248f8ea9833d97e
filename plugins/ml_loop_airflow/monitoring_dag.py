"""Build the monitoring DAG of one pipeline spec: compute, materialize feedback, decide, request.

``compute_monitoring`` compares the prediction log of the window with the champion's training
snapshot and logs the result to MLflow with an HTML report. ``materialize_feedback`` writes the
labelled predictions of the labelled window's days as feedback landing partitions.
``decide_retraining`` applies the guardrails, reading the training DAG's queued and running runs
through the Task SDK. ``request_retraining`` emits an event on the retrain asset when a retrain
is requested, and is skipped (no event) otherwise.

Task bodies import the stage modules, so parsing a DAG file loads neither mlflow nor scipy.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from typing import Any

from airflow.sdk import DAG, Metadata, Param, dag, task
from airflow.sdk.exceptions import AirflowSkipException

from ml_loop.spec import PipelineSpec, load_spec
from ml_loop_airflow.assets import retrain_asset
from ml_loop_airflow.task_context import (
    airflow_tags,
    dag_arguments,
    serving_connection,
    serving_connection_id,
)

logger = logging.getLogger(__name__)

TRAINING_DAG_PREFIX = "train_"
ACTIVE_STATES = ["queued", "running"]
METRICS_TIMEOUT_S = 5.0


def training_dag_id(spec: PipelineSpec) -> str:
    """Return the id of the spec's training DAG, ``train_<spec>``."""
    return f"{TRAINING_DAG_PREFIX}{spec.name}"


def window_end(context: dict[str, Any]) -> dt.datetime:
    """Return the end of the run's monitoring window, in UTC.

    The ``window_end`` param wins; otherwise the logical date, or ``run_after`` for a manual
    run without one.
    """
    value = (context.get("params") or {}).get("window_end")
    if value:
        moment = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    else:
        moment = context.get("logical_date") or context["dag_run"].run_after
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC)


def read_server_errors(spec: PipelineSpec) -> dict[str, float] | None:
    """Return request and error counts from the model server's ``/metrics``, or None.

    None when the connection ``model_server_<spec>`` is missing, the server does not respond, or
    its page has no request counter with a status label; the reason is logged.
    """
    import httpx
    from airflow.sdk.exceptions import AirflowNotFoundException

    from ml_loop.monitor import read_server_errors as parse_errors

    try:
        base_url, token = serving_connection(spec)
    except AirflowNotFoundException:
        logger.info(
            "connection %s not found, so this run reports no server error rate",
            serving_connection_id(spec),
        )
        return None
    url = f"{base_url}/metrics"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(url, headers=headers, timeout=METRICS_TIMEOUT_S)
        response.raise_for_status()
    except httpx.HTTPError as err:
        logger.warning("model server metrics at %s not readable (%s); no error rate", url, err)
        return None
    counts = parse_errors(response.text)
    if counts is None:
        logger.info("model server metrics at %s have no request counter with a status", url)
    return counts


@task
def compute_monitoring(**context: Any) -> dict[str, Any]:
    """Compute drift, live accuracy and traffic of the window; log them and write the report."""
    from ml_loop.files import data_root
    from ml_loop.monitor import run_monitoring

    spec = load_spec(context["params"]["spec"])
    result = run_monitoring(
        spec,
        window_end(context),
        data_root(),
        server_errors=read_server_errors(spec),
        run_tags=airflow_tags(context),
    )
    logger.info("monitoring report: %s (MLflow: %s)", result.report_path, result.report_uri)
    return result.to_dict()


@task
def materialize_feedback(result: dict[str, Any], **context: Any) -> list[dict[str, Any]]:
    """Write the labelled predictions of each day of the labelled window as training data."""
    from ml_loop.feedback import materialize_feedback as materialize
    from ml_loop.files import data_root
    from ml_loop.monitor import label_dates

    spec = load_spec(context["params"]["spec"])
    start = dt.datetime.fromisoformat(result["labelled_window_start"])
    end = dt.datetime.fromisoformat(result["labelled_window_end"])
    root = data_root()
    return [materialize(spec, date, root).to_dict() for date in label_dates(start, end)]


@task
def decide_retraining(result: dict[str, Any], **context: Any) -> dict[str, Any]:
    """Apply the guardrails to the result and record the decision."""
    from ml_loop.feedback import decide_retraining as decide
    from ml_loop.feedback import record_decision_in_mlflow
    from ml_loop.files import data_root

    spec = load_spec(context["params"]["spec"])
    training = training_dag_id(spec)
    active = context["ti"].get_dr_count(dag_id=training, states=ACTIVE_STATES)
    logger.info("%s has %d queued or running runs", training, active)
    decision = decide(spec, result, active_training_runs=active, root=data_root())
    record_decision_in_mlflow(decision)
    return decision.to_dict()


def request_retraining_events(spec_name: str, decision: dict[str, Any]) -> Iterator[Metadata]:
    """Yield the retrain asset's event metadata, or raise AirflowSkipException when skipped."""
    if not decision["requested"]:
        raise AirflowSkipException(f"no retrain requested: {decision['reason']}")
    from ml_loop.feedback import RetrainDecision

    extra = RetrainDecision(**decision).asset_extra()
    logger.info("requesting a retrain of %s: %s", spec_name, decision["reason"])
    yield Metadata(retrain_asset(spec_name), extra)


def build_monitoring_dag(spec_name: str, dag_id: str, doc_md: str | None) -> DAG:
    """Build the monitoring DAG for the spec ``spec_name``, scheduled by its monitoring section."""
    spec = load_spec(spec_name)
    asset = retrain_asset(spec.name)
    params: dict[str, Any] = {
        "spec": Param(
            spec_name,
            type="string",
            enum=[spec_name],
            title="Pipeline spec",
            description="The spec this DAG was built from (fixed).",
        ),
        "window_end": Param(
            None,
            type=["null", "string"],
            title="Window end",
            description="End of the window to monitor, ISO 8601 in UTC; empty for the run's "
            "own time.",
        ),
    }

    @task(outlets=[asset])
    def request_retraining(decision: dict[str, Any], **context: Any) -> Iterator[Metadata]:
        """Emit a retrain request on the asset, or skip with the reason when none is requested."""
        yield from request_retraining_events(context["params"]["spec"], decision)

    @dag(
        dag_id=dag_id,
        description=f"Monitor {spec.model_name}: drift, live accuracy and retrain requests.",
        doc_md=doc_md,
        schedule=spec.monitoring.schedule,
        tags=["ml_loop", "monitoring", spec.name, spec.dataset.kind],
        params=params,
        **dag_arguments(spec, execution_timeout=dt.timedelta(minutes=30)),
    )
    def monitoring_dag() -> None:
        result = compute_monitoring()
        feedback = materialize_feedback(result)
        decision = decide_retraining(result)
        # The retrain's ingest reads the feedback partitions, so they are written first.
        feedback >> request_retraining(decision)

    return monitoring_dag()
