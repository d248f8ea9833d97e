"""Build the training DAG of one pipeline spec: ingest, validate, process, store, train,
evaluate, register, deploy.

Each task unpacks its context, calls one step from ``ml_loop.pipeline`` and returns the small
reference that step produced. The stage modules, and torch, mlflow, pandas and Great
Expectations with them, are imported inside the task bodies, so parsing a DAG file stays fast.
The train task is a ``TrainOperator``, which runs the train entry point locally, in a Docker
container or in a Kubernetes pod, as the run's ``train_backend`` param selects.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from airflow.sdk import DAG, Param, dag, task
from airflow.sdk.exceptions import AirflowSkipException

from ml_loop.spec import TRAIN_BACKENDS, PipelineSpec, RunConfig, load_spec
from ml_loop_airflow.assets import retrain_note, retrain_reason, set_run_note, training_schedule
from ml_loop_airflow.task_context import airflow_tags, dag_arguments, serving_connection
from ml_loop_airflow.train_operator import BACKEND_PARAM, TrainOperator

logger = logging.getLogger(__name__)


def build_params(spec: PipelineSpec) -> dict[str, Param]:
    """Return the trigger form's typed params, with the spec's training section as defaults."""
    defaults = spec.training
    return {
        "epochs": Param(
            defaults.epochs,
            type="integer",
            minimum=1,
            maximum=1000,
            title="Epochs",
            description="Passes over the training split.",
        ),
        "learning_rate": Param(
            defaults.learning_rate,
            type="number",
            exclusiveMinimum=0,
            maximum=1,
            title="Learning rate",
            description="Adam learning rate.",
        ),
        "batch_size": Param(
            defaults.batch_size,
            type="integer",
            minimum=1,
            maximum=65536,
            title="Batch size",
            description="Training samples per optimiser step.",
        ),
        "seed": Param(
            defaults.seed,
            type="integer",
            minimum=0,
            title="Seed",
            description="Seed for weight initialisation and shuffling; logged with the run.",
        ),
        "training_window_days": Param(
            defaults.training_window_days,
            type="integer",
            minimum=1,
            maximum=366,
            title="Training window (days)",
            description="Validated daily partitions, ending at the run's date, to train on.",
        ),
        "force_promote": Param(
            defaults.force_promote,
            type="boolean",
            title="Force promote",
            description="Move the champion alias to the new version even if the gate fails.",
        ),
        BACKEND_PARAM: Param(
            spec.compute.backend,
            type="string",
            enum=list(TRAIN_BACKENDS),
            title="Train backend",
            description="Where the train task runs: local (a subprocess of the Airflow worker), "
            "docker (a container on the worker's Docker engine) or kubernetes (a pod). The "
            "default is the spec's compute.backend.",
        ),
    }


def _run_context(context: dict[str, Any]) -> tuple[PipelineSpec, RunConfig]:
    spec = load_spec(context["params"]["spec"])
    return spec, RunConfig.from_params(spec, context["params"])


def _check_conf_keys(context: dict[str, Any]) -> None:
    """Raise on run conf keys that are not params, such as a misspelled ``epoch``.

    Airflow passes unknown conf keys through to the tasks, where they would be ignored.
    """
    conf = context["dag_run"].conf or {}
    declared = sorted(context["dag"].params)
    unknown = sorted(set(conf) - set(declared))
    if unknown:
        raise ValueError(
            f"unknown run param {', '.join(map(repr, unknown))} in the run conf; the params of "
            f"{context['dag'].dag_id} are {', '.join(declared)}; fix the name and trigger again"
        )


def _data_root():
    from ml_loop.files import data_root

    return data_root()


@task
def ingest(**context: Any) -> dict[str, Any]:
    """Copy the run's partition, and the earlier days of its window, into the raw area.

    A run started by a retrain request logs the request's reason and writes it into the run's
    note.
    """
    import httpx

    from ml_loop.ingest import resolve_partition_date
    from ml_loop.pipeline import ingest_step

    _check_conf_keys(context)
    spec, config = _run_context(context)
    reason = retrain_reason(context)
    if reason is not None:
        logger.info(
            "run started by a retrain request of %s: %s",
            reason.get("source_dag_id"),
            reason.get("reason"),
        )
        try:
            set_run_note(context, retrain_note(reason))
        except httpx.HTTPError as err:
            # The note only repeats the reason, which the MLflow run's tags also record, so a
            # failed API call must not fail the retrain.
            logger.warning("run note of %s not set: %s", context["run_id"], err)
    run_date = resolve_partition_date(context.get("logical_date"), context["dag_run"].run_after)
    logger.info(
        "ingesting %s for %s, window %d days, spec digest %s",
        spec.name,
        run_date,
        config.training_window_days,
        spec.digest(),
    )
    return ingest_step(spec, run_date, config, _data_root())


@task
def validate(ingested: dict[str, Any], **context: Any) -> dict[str, Any]:
    """Run the spec's expectations; quarantine bad records and stop on a bad batch."""
    from ml_loop.pipeline import validate_step

    spec, _ = _run_context(context)
    return validate_step(spec, ingested, _data_root())


@task
def process(validated: dict[str, Any], **context: Any) -> dict[str, Any]:
    """Clean, split by record id and fit normalisation on the training split."""
    from ml_loop.pipeline import process_step

    spec, _ = _run_context(context)
    return process_step(spec, validated, _data_root())


@task
def store(processed: dict[str, Any], validated: dict[str, Any], **context: Any) -> dict[str, Any]:
    """Write the content-addressed training snapshot of the window."""
    from ml_loop.pipeline import store_step

    spec, _ = _run_context(context)
    return store_step(spec, processed, validated, _data_root())


@task
def evaluate(snapshot: dict[str, Any], trained: dict[str, Any], **context: Any) -> dict[str, Any]:
    """Score candidate and champion on the same test split and decide the gate."""
    from ml_loop.pipeline import evaluate_step

    spec, _ = _run_context(context)
    evaluation = evaluate_step(spec, snapshot, trained)
    for reason in evaluation["reasons"]:
        logger.info("gate: %s", reason)
    return evaluation


@task
def register(
    snapshot: dict[str, Any],
    trained: dict[str, Any],
    evaluation: dict[str, Any],
    **context: Any,
) -> dict[str, Any]:
    """Register the model version and move the aliases; skip deploy when the gate failed.

    A candidate that passed the gate but goes through a canary stays ``challenger`` here, and
    deploy runs the canary.
    """
    from ml_loop.pipeline import register_step, uses_canary

    spec, config = _run_context(context)
    registration = register_step(
        spec, snapshot, trained, evaluation, config, tags=airflow_tags(context)
    )
    if uses_canary(spec, evaluation, config) and not registration["promoted"]:
        logger.info(
            "version %s of %s passed the gate and goes to a canary of %.0f%% of the traffic",
            registration["version"],
            spec.model_name,
            100 * spec.deploy.canary_share,
        )
    elif not registration["promoted"]:
        context["ti"].xcom_push(key="registration", value=registration)
        raise AirflowSkipException(
            f"skipped by gate: version {registration['version']} of {spec.model_name} stays "
            f"challenger and the champion is unchanged; {' '.join(evaluation['reasons'])}"
        )
    return registration


@task
def deploy(
    registration: dict[str, Any],
    evaluation: dict[str, Any],
    snapshot: dict[str, Any],
    **context: Any,
) -> dict[str, Any]:
    """Make the model server serve the new champion and smoke-test it; roll back on failure.

    For a candidate still ``challenger`` (see ``deploy.canary_share`` in the spec), run its
    canary instead, which promotes it or rolls it back.
    """
    from ml_loop.pipeline import deploy_step

    spec, _ = _run_context(context)
    serving_url, serving_token = serving_connection(spec)
    return deploy_step(
        spec, registration, evaluation, snapshot, serving_url, serving_token=serving_token
    )


def build_training_dag(spec_name: str, dag_id: str, doc_md: str | None) -> DAG:
    """Build the daily training DAG for the spec ``spec_name``."""
    spec = load_spec(spec_name)
    params: dict[str, Any] = {
        "spec": Param(
            spec_name,
            type="string",
            enum=[spec_name],
            title="Pipeline spec",
            description="The spec this DAG was built from (fixed).",
        ),
        **build_params(spec),
    }

    @dag(
        dag_id=dag_id,
        description=spec.description,
        doc_md=doc_md,
        schedule=training_schedule(spec),
        tags=["ml_loop", "training", spec.name, spec.dataset.kind],
        params=params,
        **dag_arguments(spec, execution_timeout=dt.timedelta(hours=2)),
    )
    def training_dag() -> None:
        ingested = ingest()
        validated = validate(ingested)
        processed = process(validated)
        snapshot = store(processed, validated)
        # Same task id and XCom (the TrainResult dict) on every backend; a spec with GPUs puts
        # it into the spec's GPU pool.
        trained = TrainOperator(task_id="train", spec=spec_name, snapshot=snapshot).output
        evaluation = evaluate(snapshot, trained)
        registration = register(snapshot, trained, evaluation)
        deploy(registration, evaluation, snapshot)

    return training_dag()
