"""Helpers for the Airflow context and connections that the training and monitoring tasks read."""

from __future__ import annotations

import datetime as dt
from typing import Any

from ml_loop.spec import PipelineSpec

SERVING_CONN_PREFIX = "model_server_"
RETRIES = 2
RETRY_DELAY = dt.timedelta(seconds=15)


def dag_arguments(spec: PipelineSpec, execution_timeout: dt.timedelta) -> dict[str, Any]:
    """Return the ``dag`` arguments that the spec's training and monitoring DAGs share.

    A static start date from the spec, no catchup, one active run at a time, and retries on
    every task.
    """
    return {
        "start_date": dt.datetime.combine(spec.start_date, dt.time(), tzinfo=dt.UTC),
        "catchup": False,
        "max_active_runs": 1,
        "default_args": {
            "retries": RETRIES,
            "retry_delay": RETRY_DELAY,
            "execution_timeout": execution_timeout,
        },
    }


def airflow_tags(context: dict[str, Any]) -> dict[str, str]:
    """Return the MLflow tags that tie a run or model version to this task's try."""
    return {
        "airflow.dag_id": context["dag"].dag_id,
        "airflow.run_id": context["run_id"],
        "airflow.try_number": str(context["ti"].try_number),
    }


def serving_connection_id(spec: PipelineSpec) -> str:
    """Return the id of the Airflow connection to the spec's model server."""
    return f"{SERVING_CONN_PREFIX}{spec.name}"


def serving_connection(spec: PipelineSpec) -> tuple[str, str | None]:
    """Return the model server's URL and bearer token from the ``model_server_<spec>`` connection.

    The token is the connection's password, for example
    ``AIRFLOW_CONN_MODEL_SERVER_DIGITS=http://:TOKEN@127.0.0.1:8000``; None when it has none.
    Raises AirflowNotFoundException when the connection does not exist.
    """
    from airflow.sdk import Connection

    conn_id = serving_connection_id(spec)
    conn = Connection.get(conn_id)
    scheme = conn.schema or "http"
    if not conn.host:
        raise ValueError(
            f"Airflow connection {conn_id!r} has no host; set it to the model server, for "
            f"example AIRFLOW_CONN_{conn_id.upper()}=http://127.0.0.1:8000"
        )
    port = f":{conn.port}" if conn.port else ""
    return f"{scheme}://{conn.host}{port}", conn.password or None
