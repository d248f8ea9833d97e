"""An embedded local stack: Airflow 3, MLflow and the model servers on 127.0.0.1.

Every piece is the real server, run as a child process, with all state in one folder
(``<repo>/.stack`` by default, or ``$ML_LOOP_STATE_DIR``). ``python -m local_stack run`` starts
it, lands the data, trains through the scheduler and keeps everything up until Ctrl-C; tests use
``LocalStack`` directly::

    config = StackConfig.from_env(repo_root, state_dir=tmp_path, dags_folder=dags)
    with LocalStack(config) as stack:
        run_id = stack.client.trigger("my_dag")
        assert stack.client.wait_for_run("my_dag", run_id, timeout_s=120) == "success"
"""

from local_stack.client import AirflowApiError, AirflowClient, DagImportError
from local_stack.config import (
    AIRFLOW_SERVICES,
    MIGRATE_SERVICE,
    MLFLOW_SERVICE,
    MODEL_SERVER_PREFIX,
    HeartbeatCheck,
    HttpCheck,
    PortBinding,
    ServiceSpec,
    StackConfig,
    StackConfigError,
)
from local_stack.stack import LocalStack
from local_stack.supervisor import (
    PortInUseError,
    ServiceStartError,
    StackError,
    StackLockedError,
)

__all__ = [
    "AIRFLOW_SERVICES",
    "MIGRATE_SERVICE",
    "MLFLOW_SERVICE",
    "MODEL_SERVER_PREFIX",
    "AirflowApiError",
    "AirflowClient",
    "DagImportError",
    "HeartbeatCheck",
    "HttpCheck",
    "LocalStack",
    "PortBinding",
    "PortInUseError",
    "ServiceSpec",
    "ServiceStartError",
    "StackConfig",
    "StackConfigError",
    "StackError",
    "StackLockedError",
]
