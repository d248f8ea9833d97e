"""The DAG factory: typed trigger-form params, the train task and the model-server connection."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import ParamValidationError

from ml_loop.spec import RunConfig, load_spec
from ml_loop_airflow.training_dag import _check_conf_keys, build_params

REPO_ROOT = Path(__file__).resolve().parents[2]


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


def _context(conf: dict) -> dict:
    from ml_loop_airflow.training_dag import build_training_dag

    dag = build_training_dag("digits", dag_id="train_digits", doc_md=None)
    return {"dag": dag, "dag_run": SimpleNamespace(conf=conf), "params": {**dag.params, **conf}}


def test_conf_with_known_params_accepted() -> None:
    _check_conf_keys(_context({"epochs": 3, "learning_rate": 0.01}))


def test_conf_with_misspelled_param_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown run param 'epoch'.*epochs"):
        _check_conf_keys(_context({"epoch": 3}))


def test_params_train_backend_default(params: ParamsDict) -> None:
    assert params.validate()["train_backend"] == load_spec("digits").compute.backend


def test_params_train_backend_enum(params: ParamsDict) -> None:
    params["train_backend"] = "docker"
    assert params.validate()["train_backend"] == "docker"
    with pytest.raises(ParamValidationError, match="train_backend"):
        params["train_backend"] = "slurm"


def test_train_task_is_train_operator() -> None:
    from ml_loop_airflow.train_operator import TrainOperator
    from ml_loop_airflow.training_dag import build_training_dag

    dag = build_training_dag("digits", dag_id="train_digits", doc_md=None)
    train = dag.get_task("train")
    assert isinstance(train, TrainOperator)
    assert train.upstream_task_ids == {"store"}
    assert dag.get_task("evaluate").upstream_task_ids == {"store", "train"}
    assert dag.get_task("register").upstream_task_ids == {"store", "train", "evaluate"}
    assert train.pool == "default_pool"
    assert train.retries == 2


def test_dag_runs_on_cron_or_retrain_request() -> None:
    from airflow.sdk import AssetOrTimeSchedule

    from ml_loop_airflow.assets import retrain_asset
    from ml_loop_airflow.training_dag import build_training_dag

    dag = build_training_dag("digits", dag_id="train_digits", doc_md=None)
    assert isinstance(dag.timetable, AssetOrTimeSchedule)
    assert dag.timetable.timetable.expression == "0 0 * * *"
    assert list(dag.timetable.asset_condition.objects) == [retrain_asset("digits")]


# Builds the DAG in a fresh interpreter and prints the backend client modules it loaded.
PARSE_MODULES_SCRIPT = """
import json, sys
from ml_loop_airflow.training_dag import build_training_dag
build_training_dag("digits", dag_id="train_digits", doc_md=None)
print(json.dumps(sorted(sys.modules)))
"""


def test_dag_parse_loads_no_backend_client(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / name) for name in ("include", "plugins")),
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
    }
    result = subprocess.run(
        [sys.executable, "-c", PARSE_MODULES_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    top_level = {name.split(".")[0] for name in modules}
    assert "docker" not in top_level
    assert "kubernetes" not in top_level
    assert "torch" not in top_level
    assert [name for name in modules if name.startswith("airflow.providers.docker.operators")] == []
    assert [
        name for name in modules if name.startswith("airflow.providers.cncf.kubernetes.operators")
    ] == []
