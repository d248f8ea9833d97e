"""The model server connection and the MLflow tags read from a task's context."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ml_loop.spec import load_spec
from ml_loop_airflow.task_context import airflow_tags, serving_connection


def test_serving_connection_without_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DIGITS", "http://127.0.0.1:8123")
    assert serving_connection(load_spec("digits")) == ("http://127.0.0.1:8123", None)


def test_serving_connection_token_is_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DIGITS", "http://:s3cret-token@127.0.0.1:8123")
    url, token = serving_connection(load_spec("digits"))
    assert url == "http://127.0.0.1:8123"
    assert token == "s3cret-token"


def test_serving_url_missing_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_MODEL_SERVER_DIGITS", raising=False)
    with pytest.raises(Exception, match="model_server_digits"):
        serving_connection(load_spec("digits"))


def test_airflow_tags_name_the_try() -> None:
    context = {
        "dag": SimpleNamespace(dag_id="train_digits"),
        "run_id": "manual__1",
        "ti": SimpleNamespace(try_number=2),
    }
    assert airflow_tags(context) == {
        "airflow.dag_id": "train_digits",
        "airflow.run_id": "manual__1",
        "airflow.try_number": "2",
    }
