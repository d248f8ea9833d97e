"""
# monitor_breast_cancer

Hourly monitoring of the breast-cancer model `breast-cancer-mlp` as served: input drift against the
champion's training snapshot, prediction drift, live accuracy on labelled feedback, confidence and
traffic. Requests a retrain of `train_breast_cancer` through the asset
`ml_loop_retrain_breast_cancer` when drift or an accuracy drop is found and the guardrails
(cooldown, daily maximum, no training run active, enough traffic, champion old enough) allow it.

**Reads** the model server's prediction log (`$ML_LOOP_PREDICTION_LOG_DIR`, default `<data
root>/predictions/breast-cancer-mlp/`), labels from
`feedback/breast_cancer/<YYYY-MM-DD>/labels.csv` (columns `id,label`), and the champion's snapshot
under `snapshots/breast_cancer/`.

**Writes** an MLflow run in the experiment `breast_cancer-monitoring` with an HTML report, the
report also under `monitoring/breast_cancer/<window end>/report.html`, the decision log
`monitoring/breast_cancer/decisions.jsonl`, and labelled feedback as training data under
`landing_feedback/breast_cancer/<YYYY-MM-DD>/`.

**Needs** `MLFLOW_TRACKING_URI` and `ML_LOOP_DATA_DIR`; the connection `model_server_breast_cancer`
is optional and adds the server's error rate. The thresholds are in the `monitoring` section of
`include/specs/breast_cancer.yaml`.
"""

from pathlib import Path

from ml_loop_airflow.monitoring_dag import build_monitoring_dag

dag = build_monitoring_dag("breast_cancer", dag_id=Path(__file__).stem, doc_md=__doc__)
