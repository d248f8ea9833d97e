"""The DAG factory: typed trigger-form params and the model-server connection."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import ParamValidationError

from ml_loop.spec import RunConfig, load_spec
from ml_loop_airflow.training_dag import _check_conf_keys, _serving_url, build_params


@pytest.fixture
def params() -> ParamsDict:
    return ParamsDict(build_params(load_spec("digits")))


def test_params_default_to_spec(params: ParamsDict) -> None:
    training = load_spec("digits").training
    values = params.validate()
    assert values["epochs"] == training.epochs
    assert values["learning_rate"] == training.learning_rate
    assert values["force_promote"] is False


def test_params_keep_types(params: ParamsDict) -> None:
    params.update({"learning_rate": 0.0005, "epochs": 20})
    values = params.validate()
    assert isinstance(values["learning_rate"], float)
    assert isinstance(values["epochs"], int)
    config = RunConfig.from_params(load_spec("digits"), values)
    assert config.learning_rate == 0.0005
    assert config.epochs == 20


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("epochs", "twenty"),
        ("epochs", 2.5),
        ("epochs", 0),
        ("learning_rate", "0.001"),
        ("learning_rate", 0),
        ("batch_size", -1),
        ("force_promote", "yes"),
    ],
)
def test_params_reject_wrong_value(params: ParamsDict, name: str, value: object) -> None:
    with pytest.raises(ParamValidationError, match=name):
        params[name] = value


def test_serving_url_from_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_MODEL_SERVER_DIGITS", "http://127.0.0.1:8123")
    assert _serving_url(load_spec("digits")) == "http://127.0.0.1:8123"


def test_serving_url_missing_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_MODEL_SERVER_DIGITS", raising=False)
    with pytest.raises(Exception, match="model_server_digits"):
        _serving_url(load_spec("digits"))


def _context(conf: dict) -> dict:
    from ml_loop_airflow.training_dag import build_training_dag

    dag = build_training_dag("digits", dag_id="train_digits", doc_md=None)
    return {"dag": dag, "dag_run": SimpleNamespace(conf=conf), "params": {**dag.params, **conf}}


def test_conf_with_known_params_accepted() -> None:
    _check_conf_keys(_context({"epochs": 3, "learning_rate": 0.01}))


def test_conf_with_misspelled_param_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown run param 'epoch'.*epochs"):
        _check_conf_keys(_context({"epoch": 3}))
