"""Airflow wiring for the ml_loop stages: the training DAG factory and its task bodies."""
