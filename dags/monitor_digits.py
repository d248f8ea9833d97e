"""
# monitor_digits

Hourly monitoring of the handwritten digits model `digits-cnn` as served: input drift against the
champion's training snapshot, prediction drift, live accuracy on labelled feedback, confidence and
traffic. Requests a retrain of `train_digits` through the asset `ml_loop_retrain_digits` when drift
or an accuracy drop is found and the guardrails (cooldown, daily maximum, no training run active,
enough traffic, champion old enough) allow it.

**Reads** the model server's prediction log (`$ML_LOOP_PREDICTION_LOG_DIR`, default `<data
root>/predictions/digits-cnn/`), labels from `feedback/digits/<YYYY-MM-DD>/labels.csv` (columns
`id,label`), and the champion's snapshot under `snapshots/digits/`.

**Writes** an MLflow run in the experiment `digits-monitoring` with an HTML report, the report also
under `monitoring/digits/<window end>/report.html`, the decision log
`monitoring/digits/decisions.jsonl`, and labelled feedback as training data under
`landing_feedback/digits/<YYYY-MM-DD>/`.

**Needs** `MLFLOW_TRACKING_URI` and `ML_LOOP_DATA_DIR`; the connection `model_server_digits` is
optional and adds the server's error rate. The thresholds are in the `monitoring` section of
`include/specs/digits.yaml`.
"""

from pathlib import Path

from ml_loop_airflow.monitoring_dag import build_monitoring_dag

dag = build_monitoring_dag("digits", dag_id=Path(__file__).stem, doc_md=__doc__)
