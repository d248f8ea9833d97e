#!/usr/bin/env bash
# Create the Airflow and MLflow databases and their owners on the first start of PostgreSQL.
# The official postgres image runs this once, when its data volume is empty.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    --set=airflow_password="$AIRFLOW_DB_PASSWORD" --set=mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE USER airflow WITH PASSWORD :'airflow_password';
CREATE DATABASE airflow OWNER airflow;
CREATE USER mlflow WITH PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
SQL
