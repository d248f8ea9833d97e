"""
# train_breast_cancer

Daily training loop for tabular data: scikit-learn's copy of the Wisconsin breast-cancer
diagnostic data (569 rows, 30 numeric features), landed as daily CSV batches. It runs the same
DAG code as `train_digits`; only the spec differs.

**Reads** the landing partition `landing/breast_cancer/<YYYY-MM-DD>/part-*.csv` of the run's date
(a manual run without a logical date uses its `run_after` date) and the earlier days of the
training window.

**Writes** an immutable raw copy, validated tables with a Great Expectations report, quarantined
rows with their reasons, and a content-addressed training snapshot under `$ML_LOOP_DATA_DIR`; an
MLflow run in the experiment `breast_cancer`; a version of the registered model
`breast-cancer-mlp` with the aliases `challenger`, and `champion` and `previous` when the gate
passes.

**Needs** `MLFLOW_TRACKING_URI`, `ML_LOOP_DATA_DIR` and the Airflow connection
`model_server_breast_cancer` pointing at its model server. The spec is
`include/specs/breast_cancer.yaml`.
"""

from pathlib import Path

from ml_loop_airflow.training_dag import build_training_dag

dag = build_training_dag("breast_cancer", dag_id=Path(__file__).stem, doc_md=__doc__)
