"""Stages of the machine-learning loop, as plain Python with no Airflow import."""
