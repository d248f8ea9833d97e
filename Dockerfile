# Project image of docker-compose.yaml: the Airflow components, the MLflow server and the model
# server all run from it.
#
#   docker compose build        (or: docker build -t ml-loop:local .)
#
# BASE_IMAGE is the official Airflow image by default. Any image with Python 3.11 and its venv
# module works as well, for example a site's own Debian image: the first RUN creates the airflow
# user (uid 50000, group 0) and the folders that the official image has, and on a base without
# Airflow the packages go into a virtual environment at /opt/ml-loop/venv.
#
# PIP_INSTALL_OPTIONS passes extra pip options. An air-gapped build downloads the wheels on a
# machine that reaches the index (pip download -r requirements.txt -r include/compose/requirements.txt
# -c constraints.txt -d wheelhouse), serves the folder (python -m http.server -d wheelhouse 8765)
# and builds with the host's network:
#   docker build --network host --build-arg PIP_INSTALL_OPTIONS="--no-index \
#     --find-links http://127.0.0.1:8765/ --trusted-host 127.0.0.1" -t ml-loop:local .
# The wheels then never become a layer of the image.
#
# Only Dockerfile syntax that Docker's classic builder understands is used.
# NOTE: the tests build this file on a plain Debian bookworm base; the official base image is the
# documented Airflow path (pip install as the airflow user) but cannot be pulled on the test
# machines.
ARG BASE_IMAGE=apache/airflow:3.3.2-python3.11
FROM ${BASE_IMAGE}

ARG AIRFLOW_UID=50000
ARG PIP_INSTALL_OPTIONS=""

ENV AIRFLOW_HOME=/opt/airflow \
    PATH=/opt/ml-loop/venv/bin:${PATH} \
    PYTHONPATH=/opt/airflow/include:/opt/airflow/plugins \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    MPLBACKEND=Agg \
    MLFLOW_DISABLE_TELEMETRY=true \
    GX_ANALYTICS_ENABLED=False

USER root
# Group 0 owns the writable folders, as in the official image, so the stack also runs under an
# arbitrary uid with group 0 (OpenShift style).
RUN if ! id -u airflow >/dev/null 2>&1; then \
        useradd --uid "${AIRFLOW_UID}" --gid 0 --create-home --home-dir /home/airflow \
            --shell /bin/bash airflow; \
    fi \
    && install -d -o airflow -g 0 -m 2775 /opt/airflow /opt/airflow/logs /opt/ml-loop \
        /opt/ml-loop/data /opt/mlflow /opt/mlflow/artifacts

USER airflow
COPY --chown=airflow:0 requirements.txt constraints.txt /opt/ml-loop/
COPY --chown=airflow:0 include/compose/requirements.txt /opt/ml-loop/requirements-compose.txt
# A base without Airflow gets a virtual environment, whose bin/ leads PATH. On the official image
# pip installs into the base's Python as the airflow user, as Airflow's docs describe, and Airflow
# is pinned again on the command line so that no other requirement can move it.
RUN if ! python3 -c "import airflow" >/dev/null 2>&1; then python3 -m venv /opt/ml-loop/venv; fi \
    && python -m pip install ${PIP_INSTALL_OPTIONS} "apache-airflow==3.3.2" \
        -r /opt/ml-loop/requirements.txt -r /opt/ml-loop/requirements-compose.txt \
        -c /opt/ml-loop/constraints.txt \
    && python -m pip check

# The code comes last, so a code change rebuilds only these layers. docker-compose.yaml mounts
# the same folders read-only over them, so edits on the host apply without a rebuild.
COPY --chown=airflow:0 include/ /opt/airflow/include/
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
COPY --chown=airflow:0 dags/ /opt/airflow/dags/
WORKDIR /opt/airflow
