"""The main job of ``python -m local_stack run``: land data, train through the scheduler, report.

One invocation trains exactly once. The training DAG runs ``@daily`` with ``catchup=False`` and
a static start date, and Airflow 3.3.2 treats it as follows. All four points were seen on a
running stack, and ``tests/local_stack`` checks the second and the fourth:

- Unpausing it makes the scheduler create a run for the latest tick at once: the logical date
  is today's midnight UTC, because cron schedules use ``CronTriggerTimetable`` by default.
- When a run with that logical date already exists (for example one triggered through the REST
  API), the scheduler skips creating its own and moves on to the next tick.
- A manual run of a paused DAG stays queued until the DAG is unpaused.
- A second run with the same logical date returns HTTP 409.

So the job triggers a run for today's midnight and then unpauses the DAG. When today's run
already exists, it waits for that run if this stack's scheduler created it (the DAG was left
unpaused by an earlier invocation); otherwise it triggers a manual run without a logical date,
whose tasks date their work by ``run_after``. The data is landed before the scheduler starts, so
a run the scheduler creates at startup finds today's partition.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from local_stack.client import AirflowApiError, AirflowClient, DagImportError, format_log_event
from local_stack.config import ADMIN_USER, CHAMPION_ALIAS, StackConfigError
from local_stack.stack import LocalStack
from local_stack.supervisor import STOP_GRACE_S, StackError

logger = logging.getLogger(__name__)

MAIN_DAG_ID = "train_digits"
MAIN_SPEC = "digits"
LANDED_SPECS = ("digits", "breast_cancer")
PREDICT_PATH = "/invocations"
RUN_TIMEOUT_ENV = "ML_LOOP_RUN_TIMEOUT_S"
DEFAULT_RUN_TIMEOUT_S = 3600.0
DAG_PARSE_TIMEOUT_S = 180.0
LANDING_TIMEOUT_S = 900.0
HTTP_TIMEOUT_S = 30.0
FAILED_LOG_EVENTS = 40
# Metrics of the champion printed for people; the JSON result carries all of them.
SHOWN_METRICS = ("accuracy", "test_macro_f1", "val_accuracy")
# Exit code of a job that a signal stopped, as a shell reports a process killed by SIGINT.
INTERRUPTED_EXIT_CODE = 130


class MainJobError(RuntimeError):
    """The main job could not produce its result, for example no champion model exists."""


def land_data(
    stack: LocalStack, end_date: dt.date, spec_names: tuple[str, ...] = LANDED_SPECS
) -> None:
    """Land each spec's source data as daily batches ending on ``end_date``.

    Each spec gets ``spec.dataset.landing_days`` batches, so every record lands once. Output goes
    to ``logs/landing-<spec>.log``; a failing landing raises StackError with its log tail.
    """
    from ml_loop.spec import load_spec

    for name in spec_names:
        spec = load_spec(name)
        stack.run_logged(
            f"landing-{name}",
            [
                sys.executable,
                "-m",
                "ml_loop.landing",
                "--spec",
                name,
                "--end-date",
                end_date.isoformat(),
                "--days",
                str(spec.dataset.landing_days),
            ],
            timeout_s=LANDING_TIMEOUT_S,
        )


def start_training_run(
    client: AirflowClient, dag_id: str, today: dt.date, stack_started_at: dt.datetime
) -> str:
    """Create (or adopt) the one run of this invocation, unpause the DAG, return the run id."""
    midnight = dt.datetime.combine(today, dt.time(), tzinfo=dt.UTC)
    try:
        run_id = client.trigger(dag_id, logical_date=midnight)
    except AirflowApiError as err:
        if err.status != 409:
            raise
        existing = _run_with_logical_date(client, dag_id, midnight)
        queued_at = existing and existing.get("queued_at")
        if queued_at and dt.datetime.fromisoformat(queued_at) >= stack_started_at:
            run_id = existing["dag_run_id"]
            logger.info("waiting for run %s, which the scheduler created for today", run_id)
        else:
            logger.info("a run for %s exists from earlier; triggering one without a date", today)
            run_id = client.trigger(dag_id, logical_date=None)
    client.unpause(dag_id)
    return run_id


def _run_with_logical_date(
    client: AirflowClient, dag_id: str, logical_date: dt.datetime
) -> dict[str, Any] | None:
    for run in client.list_runs(dag_id):
        value = run.get("logical_date")
        if value and dt.datetime.fromisoformat(value) == logical_date:
            return run
    return None


def describe_failure(client: AirflowClient, dag_id: str, run_id: str) -> str:
    """Return each failed task of a run with the end of its log, for the terminal.

    The end of a log is its last FAILED_LOG_EVENTS events, and an event with an exception
    shows the exception's type, message and last frames. When the task's last exception was
    logged before those events, it is shown first.
    """
    lines = [f"{dag_id} run {run_id} did not succeed; task states:"]
    failed = []
    for ti in client.task_instances(dag_id, run_id):
        lines.append(f"  {ti['task_id']}: {ti['state']}")
        if ti["state"] == "failed":
            failed.append(ti)
    for ti in failed:
        task_id = ti["task_id"]
        try_number = max(ti["try_number"], 1)
        try:
            events = client.task_log_events(dag_id, run_id, task_id, try_number)
        except AirflowApiError as err:
            lines.append(f"--- log of {task_id} (try {try_number}) not available: {err}")
            continue
        tail_start = max(len(events) - FAILED_LOG_EVENTS, 0)
        errors = [index for index, event in enumerate(events) if _has_exception(event)]
        if errors and errors[-1] < tail_start:
            lines.append(
                f"--- last exception in the log of {task_id} (try {try_number}):\n"
                f"{format_log_event(events[errors[-1]])}"
            )
        tail = "\n".join(format_log_event(event) for event in events[tail_start:])
        lines.append(
            f"--- last {len(events) - tail_start} log events of {task_id} (try {try_number}):\n"
            f"{tail or '(the log is empty)'}"
        )
    return "\n".join(lines)


def _has_exception(event: dict[str, Any] | str) -> bool:
    return isinstance(event, dict) and bool(event.get("error_detail"))


def champion_summary(mlflow_url: str, model_name: str) -> dict[str, Any]:
    """Read the champion version of a registered model and its run's metrics from MLflow."""
    with httpx.Client(base_url=mlflow_url, timeout=HTTP_TIMEOUT_S) as http:
        response = http.get(
            "/api/2.0/mlflow/registered-models/alias",
            params={"name": model_name, "alias": CHAMPION_ALIAS},
        )
        if response.status_code == 404:
            raise MainJobError(
                f"registered model {model_name!r} has no @{CHAMPION_ALIAS} alias in MLflow at "
                f"{mlflow_url}; the run finished without promoting a version (see the evaluate "
                "and register task logs)"
            )
        response.raise_for_status()
        version = response.json()["model_version"]
        response = http.get("/api/2.0/mlflow/runs/get", params={"run_id": version["run_id"]})
        response.raise_for_status()
    metrics = {
        metric["key"]: metric["value"]
        for metric in response.json()["run"]["data"].get("metrics", [])
    }
    if "test_accuracy" not in metrics:
        raise MainJobError(
            f"MLflow run {version['run_id']} of {model_name} version {version['version']} has no "
            "test_accuracy metric; the evaluate task logs it on the training run"
        )
    metrics["accuracy"] = metrics["test_accuracy"]
    return {"model_version": version["version"], "run_id": version["run_id"], "metrics": metrics}


def write_sample_request(data_dir: Path, out_path: Path) -> tuple[Path, str]:
    """Write a request body with one held-out landed digit image; return its path and label.

    The image is scaled to [0, 1] and nested as shape (1, 1, 28, 28), the model's input.
    """
    import numpy as np
    from PIL import Image

    image_path = _held_out_image(data_dir / "landing" / MAIN_SPEC)
    with Image.open(image_path) as image:
        pixels = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    payload = {"inputs": [[pixels.round(4).tolist()]]}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(payload) + "\n")
    return out_path, image_path.parent.name


def _held_out_image(landing_dir: Path) -> Path:
    """Return a landed image in the test split, which training does not use."""
    from ml_loop.process import split_for_id
    from ml_loop.spec import load_spec

    images = sorted(landing_dir.glob("*/*/*.png"))
    if not images:
        raise MainJobError(f"no landed images under {landing_dir}; the landing step wrote none")
    split = load_spec(MAIN_SPEC).split
    for path in images:
        if split_for_id(path.stem, split) == "test":
            return path
    raise MainJobError(f"none of the {len(images)} images under {landing_dir} is in the test split")


def check_prediction(url: str, payload_path: Path, token: str | None = None) -> str:
    """POST the sample request to the model server; describe its prediction or the error."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        response = httpx.post(
            url, content=payload_path.read_bytes(), headers=headers, timeout=HTTP_TIMEOUT_S
        )
        body = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError) as err:
        return f"the request to the model server failed: {err}"
    if not body or not body.get("predictions"):
        return (
            f"the model server returned HTTP {response.status_code}: {response.text.strip()[:300]}"
        )
    return (
        f"the model server predicts {body['predictions'][0]} "
        f"(model version {body.get('model_version')})"
    )


RESULT_KEYS = (
    "dag_id",
    "run_id",
    "state",
    "model_name",
    "model_version",
    "alias",
    "metrics",
    "serving_url",
    "airflow_url",
    "mlflow_url",
    "elapsed_s",
)


def new_result(stack: LocalStack) -> dict[str, Any]:
    """Return the final JSON line's fields, with what is known before the job starts."""
    result: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    result.update(
        dag_id=MAIN_DAG_ID,
        alias=CHAMPION_ALIAS,
        metrics={},
        airflow_url=stack.config.airflow_url,
        mlflow_url=stack.config.mlflow_url,
        serving_url=stack.config.serving_url(MAIN_SPEC),
    )
    return result


@dataclasses.dataclass
class JobOutcome:
    """Outcome of a job on the stack: ended by an error, by a signal, or neither."""

    failed: bool = False
    interrupted: bool = False


def run_on_stack(
    stack: LocalStack,
    once: bool,
    job: Callable[[], None],
    result: dict[str, Any],
    started: float,
    errors: tuple[type[BaseException], ...] = (),
) -> JobOutcome:
    """Run ``job`` under the stack's lock, keep the stack up unless ``once``, then stop it.

    ``result["state"]`` becomes ``interrupted`` or ``error`` when the job ended that way before
    it set a state; ``result["elapsed_s"]`` is set when the job leaves it unset. The expected
    errors (the stack's, the API client's, HTTP and timeouts, plus ``errors``) are logged, not
    raised.
    """
    outcome = JobOutcome()
    expected = (
        StackError,
        StackConfigError,
        MainJobError,
        AirflowApiError,
        DagImportError,
        TimeoutError,
        httpx.HTTPError,
        *errors,
    )
    with StopOnSignal() as signals:
        try:
            stack.prepare()
            try:
                job()
                result["elapsed_s"] = round(time.monotonic() - started, 1)
                if not once:
                    print("Everything stays up; press Ctrl-C to stop.", flush=True)
                    watch_services(stack)
            finally:
                signals.shield()
                stack.stop()
        except KeyboardInterrupt as interrupt:
            logger.warning("stopped the stack on %s before the job finished", interrupt)
            outcome.interrupted = True
            result["state"] = result["state"] or "interrupted"
        except expected as err:
            logger.error("%s", err)
            outcome.failed = True
            result["state"] = result["state"] or "error"
    if result["elapsed_s"] is None:
        result["elapsed_s"] = round(time.monotonic() - started, 1)
    return outcome


def run_main_job(stack: LocalStack, once: bool) -> int:
    """Start the stack, land the data, run the training DAG once and report; return the exit code.

    Without ``once`` everything stays up until Ctrl-C, SIGTERM or SIGHUP. Either way the last
    stdout line is one JSON object with the keys in RESULT_KEYS. Its ``state`` is the run's
    final state, ``error`` when the job failed before the run finished, or ``interrupted`` when
    a signal stopped it before that. Errors go to stderr. The exit code is 0 when the run
    succeeded and nothing failed, 130 when a signal came before the job reached the "stays up"
    phase, and 1 after any error, even after a successful run.
    """
    started = time.monotonic()
    result = new_result(stack)
    outcome = run_on_stack(stack, once, lambda: _train_once(stack, result), result, started)
    print(json.dumps(result), flush=True)
    if outcome.interrupted:
        return INTERRUPTED_EXIT_CODE
    return 0 if result["state"] == "success" and not outcome.failed else 1


def _train_once(stack: LocalStack, result: dict[str, Any]) -> None:
    """Land today's data, start the stack and run the DAG once; fill ``result`` on the way."""
    today = dt.datetime.now(dt.UTC).date()
    run_timeout_s = float(os.environ.get(RUN_TIMEOUT_ENV) or DEFAULT_RUN_TIMEOUT_S)
    land_data(stack, today)
    stack_started_at = dt.datetime.now(dt.UTC)
    stack.start()
    client = stack.client
    client.wait_for_dag(MAIN_DAG_ID, timeout_s=DAG_PARSE_TIMEOUT_S)
    run_id = start_training_run(client, MAIN_DAG_ID, today, stack_started_at)
    result["run_id"] = run_id
    state = client.wait_for_run(
        MAIN_DAG_ID, run_id, timeout_s=run_timeout_s, check=stack.check_alive
    )
    result["state"] = state
    # A service that died during the run (a model server that lost its port, for example)
    # fails the job with its log tail, even when the DAG run itself succeeded.
    stack.check_alive()
    result.update(_report(stack, state, client, run_id))


def _report(stack: LocalStack, state: str, client: AirflowClient, run_id: str) -> dict[str, Any]:
    """Print the URLs, the login, the champion and a curl command; return the result fields."""
    from ml_loop.spec import load_spec

    config = stack.config
    model_name = load_spec(MAIN_SPEC).model_name
    serving_url = config.serving_url(MAIN_SPEC)
    report: dict[str, Any] = {
        "model_name": model_name,
        "model_version": None,
        "alias": CHAMPION_ALIAS,
        "metrics": {},
        "serving_url": serving_url,
        "airflow_url": config.airflow_url,
        "mlflow_url": config.mlflow_url,
    }
    lines = [
        f"Airflow UI  {config.airflow_url}  (user {ADMIN_USER}, password "
        f"{config.admin_password()})",
        f"MLflow UI   {config.mlflow_url}",
        f"DAG run     {MAIN_DAG_ID} {run_id}: {state}",
    ]
    if state != "success":
        print("\n".join(lines), flush=True)
        print(describe_failure(client, MAIN_DAG_ID, run_id), file=sys.stderr, flush=True)
        return report
    champion = champion_summary(config.mlflow_url, model_name)
    report["model_version"] = champion["model_version"]
    report["metrics"] = champion["metrics"]
    metric_text = ", ".join(
        f"{key} {champion['metrics'][key]:.4f}"
        for key in SHOWN_METRICS
        if key in champion["metrics"]
    )
    lines.append(f"Champion    {model_name} version {champion['model_version']}: {metric_text}")
    payload_path, label = write_sample_request(
        config.data_dir, config.state_dir / "requests" / f"{MAIN_SPEC}-sample.json"
    )
    predict_url = serving_url + PREDICT_PATH
    # The command reads the token from its file when it runs, so the token is never printed.
    token_file = shlex.quote(str(config.serving_token_file))
    curl = (
        f"curl -s -X POST {predict_url} -H 'Content-Type: application/json' "
        f'-H "Authorization: Bearer $(cat {token_file})" '
        f"-d @{shlex.quote(str(payload_path))}"
    )
    lines.append(f"Prediction  {curl}")
    outcome = check_prediction(predict_url, payload_path, config.serving_token())
    lines.append(f"            (a held-out image of a {label}; {outcome})")
    print("\n".join(lines), flush=True)
    return report


def watch_services(stack: LocalStack) -> None:
    """Block until Ctrl-C, SIGTERM or SIGHUP; raise StackError when a service exits meanwhile."""
    try:
        while True:
            stack.check_alive()
            time.sleep(2.0)
    except KeyboardInterrupt as interrupt:
        logger.info("stopping on %s", interrupt)


class StopOnSignal:
    """Turn SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt, so each one stops the stack.

    SIGINT gets its handler explicitly, because a process that starts with SIGINT ignored (a
    background job of a non-interactive shell) inherits that, and Python then installs no
    handler of its own. Only the first signal interrupts. After it, and after ``shield()``,
    signals are logged and otherwise ignored, so none can cut the stop of the services short.
    """

    _signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __enter__(self) -> StopOnSignal:
        self._previous = {sig: signal.signal(sig, self._interrupt) for sig in self._signals}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def shield(self) -> None:
        """Log signals from now on instead of raising, while the services stop."""
        for sig in self._signals:
            signal.signal(sig, self._log_while_stopping)

    def _interrupt(self, signum: int, frame: object) -> None:
        self.shield()
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def _log_while_stopping(self, signum: int, frame: object) -> None:
        logger.warning(
            "ignoring %s while the services stop; processes still running after %.0f s get SIGKILL",
            signal.Signals(signum).name,
            STOP_GRACE_S,
        )
