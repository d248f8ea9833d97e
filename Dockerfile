# Project image for the Airflow services, the MLflow server and the model server of
# docker-compose.yaml. The base is a build argument so an air-gapped site can point it at its own
# mirror of the official Airflow image.
ARG BASE_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${BASE_IMAGE}

COPY --chown=airflow:root requirements.txt constraints.txt /opt/ml-loop/
# psycopg2 is the PostgreSQL driver that Airflow and MLflow need for their stores in compose; the
# local stack runs on SQLite and does not install it.
RUN pip install --no-cache-dir -r /opt/ml-loop/requirements.txt -c /opt/ml-loop/constraints.txt \
        psycopg2-binary==2.9.13 \
    && pip check

COPY --chown=airflow:root include/ /opt/airflow/include/
COPY --chown=airflow:root plugins/ /opt/airflow/plugins/
COPY --chown=airflow:root dags/ /opt/airflow/dags/
ENV PYTHONPATH=/opt/airflow/include:/opt/airflow/plugins
