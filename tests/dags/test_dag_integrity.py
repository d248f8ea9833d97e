"""DAG integrity: every file in dags/ parses cleanly, cheaply and without touching the outside."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted((REPO_ROOT / "dags").glob("*.py"))
HEAVY_MODULES = (
    "torch",
    "mlflow",
    "great_expectations",
    "pandas",
    "sklearn",
    "PIL",
    "scipy",
    "docker",
    "kubernetes",
)
TRAINING_TASKS = {
    "ingest",
    "validate",
    "process",
    "store",
    "train",
    "evaluate",
    "register",
    "deploy",
}
MONITORING_TASKS = {
    "compute_monitoring",
    "materialize_feedback",
    "decide_retraining",
    "request_retraining",
}

# Parses one DAG file in a fresh interpreter with every way out blocked: a metadata DB
# connection, a connection or variable lookup, and any socket. Prints one JSON line.
PARSE_SCRIPT = r"""
import json, socket, sys
import airflow.sdk
import sqlalchemy.engine
from airflow.sdk import Connection, Variable

def blocked(what):
    def fail(*args, **kwargs):
        raise RuntimeError(f"{what} during DAG parsing")
    return fail

sqlalchemy.engine.Engine.connect = blocked("metadata DB connection")
sqlalchemy.engine.Engine.raw_connection = blocked("metadata DB connection")
Connection.get = blocked("Airflow connection lookup")
Variable.get = blocked("Airflow variable lookup")
socket.socket.connect = blocked("network connection")

from airflow.dag_processing.dagbag import DagBag

already_loaded = set(sys.modules)
bag = DagBag(dag_folder=sys.argv[1])
dags = []
for dag in bag.dags.values():
    dags.append({
        "dag_id": dag.dag_id,
        "fileloc": dag.fileloc,
        "tags": sorted(dag.tags),
        "doc_md": dag.doc_md or "",
        "catchup": dag.catchup,
        "max_active_runs": dag.max_active_runs,
        "tasks": {task.task_id: task.retries for task in dag.tasks},
    })
print(json.dumps({
    "import_errors": {str(k): v for k, v in bag.import_errors.items()},
    "dags": dags,
    "new_modules": sorted(set(sys.modules) - already_loaded),
}))
"""


def parse_in_subprocess(dag_file: Path, tmp_path: Path) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(REPO_ROOT / name) for name in ("include", "plugins")),
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'never-created.db'}",
    }
    result = subprocess.run(
        [sys.executable, "-c", PARSE_SCRIPT, str(dag_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=DAG_FILES, ids=[path.name for path in DAG_FILES])
def parsed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return parse_in_subprocess(request.param, tmp_path_factory.mktemp("parse"))


def test_dags_folder_has_training_and_monitoring_per_spec() -> None:
    from ml_loop.spec import list_specs

    expected = [f"{kind}_{name}" for name in list_specs() for kind in ("train", "monitor")]
    assert sorted(path.stem for path in DAG_FILES) == sorted(expected)


def test_dag_file_imports_without_errors(parsed: dict) -> None:
    assert parsed["import_errors"] == {}
    assert len(parsed["dags"]) == 1


def test_dag_file_loads_no_heavy_module(parsed: dict) -> None:
    loaded = {name.split(".")[0] for name in parsed["new_modules"]}
    assert sorted(loaded & set(HEAVY_MODULES)) == []


def test_dag_has_tags_and_docs(parsed: dict) -> None:
    (dag,) = parsed["dags"]
    assert "ml_loop" in dag["tags"]
    assert dag["doc_md"].lstrip().startswith(f"# {dag['dag_id']}")


def test_every_task_retries(parsed: dict) -> None:
    (dag,) = parsed["dags"]
    no_retries = [task_id for task_id, retries in dag["tasks"].items() if retries < 1]
    assert no_retries == []


def test_dag_scheduling_is_explicit(parsed: dict) -> None:
    (dag,) = parsed["dags"]
    assert dag["catchup"] is False
    assert dag["max_active_runs"] == 1


def test_dag_id_matches_file_name(parsed: dict) -> None:
    (dag,) = parsed["dags"]
    assert dag["dag_id"] == Path(dag["fileloc"]).stem


def test_dag_runs_every_stage(parsed: dict) -> None:
    (dag,) = parsed["dags"]
    expected = TRAINING_TASKS if dag["dag_id"].startswith("train_") else MONITORING_TASKS
    assert dag["tasks"].keys() == expected


def test_parse_check_catches_connection_lookup(tmp_path: Path) -> None:
    bad_dag = tmp_path / "bad_dag.py"
    bad_dag.write_text(
        "import datetime\n"
        "from airflow.sdk import Connection, dag, task\n"
        "Connection.get('model_server_digits')\n"
        "@dag(schedule=None, start_date=datetime.datetime(2026, 1, 1), tags=['x'])\n"
        "def bad_dag():\n"
        "    @task\n"
        "    def noop():\n"
        "        pass\n"
        "    noop()\n"
        "bad_dag()\n"
    )
    parsed = parse_in_subprocess(bad_dag, tmp_path)
    (message,) = parsed["import_errors"].values()
    assert "Airflow connection lookup during DAG parsing" in message
