"""Tests of the main job: how it picks the one training run, and a full `run --once` twice."""

from __future__ import annotations

import datetime as dt
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from local_stack import (
    AIRFLOW_SERVICES,
    MLFLOW_SERVICE,
    AirflowApiError,
    LocalStack,
    ServiceSpec,
    StackConfig,
    main_job,
)
from local_stack.main_job import (
    FAILED_LOG_EVENTS,
    RESULT_KEYS,
    describe_failure,
    run_main_job,
    start_training_run,
)
from local_stack.supervisor import group_members
from servers import REPO_ROOT, free_port

ConfigFactory = Callable[..., StackConfig]
TODAY = dt.date(2026, 12, 4)
MIDNIGHT = dt.datetime(2026, 12, 4, tzinfo=dt.UTC)
STACK_STARTED = dt.datetime(2026, 12, 4, 9, 0, tzinfo=dt.UTC)


class RecordingClient:
    """Stands in for AirflowClient in the run-selection tests; records every call."""

    def __init__(self, existing: list[dict[str, Any]], trigger_error: int | None = None) -> None:
        self.existing = existing
        self.trigger_error = trigger_error
        self.calls: list[tuple[str, Any]] = []

    def trigger(self, dag_id: str, logical_date: dt.datetime | None = None) -> str:
        self.calls.append(("trigger", logical_date))
        used_dates = {run["logical_date"] for run in self.existing}
        if logical_date is not None and logical_date.isoformat() in used_dates:
            raise AirflowApiError("POST", "/dagRuns", 409, "Unique constraint violation")
        if self.trigger_error:
            raise AirflowApiError("POST", "/dagRuns", self.trigger_error, "invalid")
        return f"manual__{logical_date}"

    def list_runs(self, dag_id: str) -> list[dict[str, Any]]:
        return self.existing

    def unpause(self, dag_id: str) -> None:
        self.calls.append(("unpause", dag_id))


def test_run_selection_triggers_today() -> None:
    client = RecordingClient(existing=[])
    run_id = start_training_run(client, "train_digits", TODAY, STACK_STARTED)
    assert run_id == f"manual__{MIDNIGHT}"
    assert client.calls == [("trigger", MIDNIGHT), ("unpause", "train_digits")]


def test_run_selection_adopts_scheduler_run() -> None:
    scheduled = {
        "dag_run_id": "scheduled__2026-12-04T00:00:00+00:00",
        "logical_date": MIDNIGHT.isoformat(),
        "queued_at": "2026-12-04T09:00:05+00:00",
    }
    client = RecordingClient(existing=[scheduled])
    run_id = start_training_run(client, "train_digits", TODAY, STACK_STARTED)
    assert run_id == scheduled["dag_run_id"]
    assert client.calls == [("trigger", MIDNIGHT), ("unpause", "train_digits")]


def test_run_selection_adds_manual_run_after_earlier_one() -> None:
    earlier = {
        "dag_run_id": "manual__2026-12-04T08:00:00+00:00",
        "logical_date": MIDNIGHT.isoformat(),
        "queued_at": "2026-12-04T08:00:00+00:00",
    }
    client = RecordingClient(existing=[earlier])
    run_id = start_training_run(client, "train_digits", TODAY, STACK_STARTED)
    assert run_id == "manual__None"
    assert client.calls == [("trigger", MIDNIGHT), ("trigger", None), ("unpause", "train_digits")]


def test_run_selection_raises_other_errors() -> None:
    client = RecordingClient(existing=[], trigger_error=400)
    with pytest.raises(AirflowApiError, match="HTTP 400"):
        start_training_run(client, "train_digits", TODAY, STACK_STARTED)
    assert ("unpause", "train_digits") not in client.calls


def failed_import_event() -> dict[str, Any]:
    """A task log event as Airflow 3.3.2 logs an exception that failed a task."""
    return {
        "timestamp": "2026-12-04T09:00:07.000000Z",
        "event": "Task failed with exception",
        "level": "error",
        "error_detail": [
            {
                "exc_type": "ModuleNotFoundError",
                "exc_value": "No module named 'ml_loop.train'",
                "exc_notes": [],
                "is_cause": False,
                "frames": [{"filename": "/dags/train_digits.py", "lineno": 40, "name": "train"}],
                "exceptions": [],
            }
        ],
    }


def info_events(count: int) -> list[dict[str, Any]]:
    return [{"level": "info", "event": f"step {index}"} for index in range(count)]


class LogClient:
    """Stands in for AirflowClient in the failure summary tests: one failed task and its log."""

    def __init__(self, events: list[dict[str, Any] | str] | None = None) -> None:
        self.events = events
        self.requested: list[tuple[str, int]] = []

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return [
            {"task_id": "train", "state": "failed", "try_number": 1},
            {"task_id": "register", "state": "upstream_failed", "try_number": 0},
        ]

    def task_log_events(
        self, dag_id: str, run_id: str, task_id: str, try_number: int
    ) -> list[dict[str, Any] | str]:
        self.requested.append((task_id, try_number))
        if self.events is None:
            raise AirflowApiError("GET", "/logs/1", 404, "TaskInstance not found")
        return self.events


def test_failure_summary_shows_exception() -> None:
    client = LogClient([*info_events(3), failed_import_event(), *info_events(2)])
    summary = describe_failure(client, "train_digits", "manual__1")
    assert "  train: failed" in summary
    assert "  register: upstream_failed" in summary
    assert "--- last 6 log events of train (try 1):" in summary
    assert "ModuleNotFoundError: No module named 'ml_loop.train'" in summary
    assert 'File "/dags/train_digits.py", line 40, in train' in summary
    assert "last exception" not in summary
    assert client.requested == [("train", 1)]


def test_failure_summary_keeps_early_exception() -> None:
    client = LogClient([failed_import_event(), *info_events(FAILED_LOG_EVENTS + 5)])
    summary = describe_failure(client, "train_digits", "manual__1")
    assert "--- last exception in the log of train (try 1):" in summary
    assert "ModuleNotFoundError: No module named 'ml_loop.train'" in summary
    assert f"--- last {FAILED_LOG_EVENTS} log events of train (try 1):" in summary
    assert "step 4\n" not in summary
    assert summary.endswith(f"step {FAILED_LOG_EVENTS + 4}")


def test_failure_summary_without_log() -> None:
    summary = describe_failure(LogClient(events=None), "train_digits", "manual__1")
    assert "--- log of train (try 1) not available:" in summary
    assert "HTTP 404" in summary


class FinishedRunClient:
    """Stands in for AirflowClient: the run succeeds once the stack's service ``dying`` exits."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack

    def wait_for_dag(self, dag_id: str, timeout_s: float) -> dict[str, Any]:
        return {"dag_id": dag_id}

    def trigger(self, dag_id: str, logical_date: dt.datetime | None = None) -> str:
        return "manual__1"

    def unpause(self, dag_id: str) -> None:
        pass

    def wait_for_run(self, dag_id: str, run_id: str, timeout_s: float, **kwargs: Any) -> str:
        # Ignores the liveness check it is given, as if the service died after the last poll.
        dying = next(service for service in self.stack.services if service.spec.name == "dying")
        dying.process.wait(timeout=30)
        return "success"


class FakeAirflowStack(LocalStack):
    @property
    def client(self) -> FinishedRunClient:
        return FinishedRunClient(self)


def test_run_once_fails_when_service_died(
    make_config: ConfigFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    dying = ServiceSpec(
        name="dying",
        argv=(
            sys.executable,
            "-c",
            "import time; print('dying service marker', flush=True); time.sleep(1); exit(3)",
        ),
    )
    monkeypatch.setattr(main_job, "land_data", lambda stack, end_date: None)
    monkeypatch.setattr(main_job, "_report", lambda stack, state, client, run_id: {})
    code = run_main_job(FakeAirflowStack(make_config([dying])), once=True)
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 1
    assert result["state"] == "success"
    assert "service dying" in caplog.text
    assert "exited with code 3" in caplog.text
    assert "dying service marker" in caplog.text


# The launcher of the signal tests: run_main_job on one throwaway web server, with the training
# step replaced. Phase "training" blocks in it, "watch" reaches the stays-up loop, and
# "stopping" runs with --once and sends itself SIGINT as the stack starts to stop.
LAUNCHER = """
import json, logging, os, signal, sys, time
from local_stack import HttpCheck, LocalStack, ServiceSpec, StackConfig, main_job

logging.basicConfig(level=logging.INFO)
repo_root, state_dir, port, phase = sys.argv[1:]
web = ServiceSpec(
    name="web",
    argv=(sys.executable, "-m", "http.server", port, "--bind", "127.0.0.1"),
    ready=HttpCheck(f"http://127.0.0.1:{port}/"),
)
stack = LocalStack(StackConfig.from_env(repo_root, state_dir=state_dir, services=[web]))


def train_once(stack, result):
    stack.start()
    print(json.dumps({"groups": stack.process_groups}), flush=True)
    if phase == "training":
        time.sleep(120)
    result["state"] = "success"


def signal_then_stop(stop=stack.stop):
    os.kill(os.getpid(), signal.SIGINT)
    stop()


main_job._train_once = train_once
if phase == "stopping":
    stack.stop = signal_then_stop
sys.exit(main_job.run_main_job(stack, once=phase == "stopping"))
"""


class Launcher:
    """A launcher process running LAUNCHER, with its stdout lines in a queue."""

    def __init__(self, config: StackConfig, phase: str, ignore_sigint: bool) -> None:
        env = {**config.base_environ, "PYTHONPATH": str(REPO_ROOT / "include")}
        argv = [sys.executable, "-c", LAUNCHER, str(REPO_ROOT), str(config.state_dir)]
        # A background job of a non-interactive shell starts with SIGINT ignored.
        ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
        self.process = subprocess.Popen(
            [*argv, str(free_port()), phase],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=ignore,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.groups: list[int] = []
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def _read_stderr(self) -> None:
        self.stderr.extend(self.process.stderr)

    def wait_for_line(self, prefix: str, timeout_s: float = 60) -> str:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"the launcher printed no line starting with {prefix!r}")
            self.stdout.append(line)
            if line.startswith('{"groups"'):
                self.groups = json.loads(line)["groups"]
            if line.startswith(prefix):
                return line

    def finish(self, timeout_s: float = 60) -> tuple[int, str]:
        """Wait for the exit; return the exit code and stderr, with stdout in ``self.stdout``."""
        try:
            code = self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the launcher did not exit within {timeout_s:.0f} s")
        for reader in self._readers:
            reader.join(timeout=10)
        while not self.lines.empty():
            self.stdout.append(self.lines.get())
        return code, "".join(self.stderr)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pgid in self.groups:
            if group_members(pgid):
                os.killpg(pgid, signal.SIGKILL)


@pytest.mark.parametrize(
    ("phase", "sig", "ignore_sigint", "expected_code", "expected_state"),
    [
        pytest.param("watch", signal.SIGINT, False, 0, "success", id="sigint-watch"),
        pytest.param("watch", signal.SIGINT, True, 0, "success", id="ignored-sigint-watch"),
        pytest.param("watch", signal.SIGTERM, False, 0, "success", id="sigterm-watch"),
        pytest.param(
            "training", signal.SIGINT, True, 130, "interrupted", id="ignored-sigint-training"
        ),
        pytest.param("training", signal.SIGTERM, False, 130, "interrupted", id="sigterm-training"),
    ],
)
def test_signal_stops_launcher(
    make_config: ConfigFactory,
    phase: str,
    sig: signal.Signals,
    ignore_sigint: bool,
    expected_code: int,
    expected_state: str,
) -> None:
    config = make_config([])
    launcher = Launcher(config, phase, ignore_sigint)
    try:
        launcher.wait_for_line('{"groups"')
        if phase == "watch":
            launcher.wait_for_line("Everything stays up")
        launcher.process.send_signal(sig)
        code, stderr = launcher.finish(timeout_s=30)
    finally:
        launcher.kill()
    result = json.loads(launcher.stdout[-1])
    assert code == expected_code, stderr
    assert result["state"] == expected_state
    assert len(launcher.groups) == 1
    assert [group_members(pgid) for pgid in launcher.groups] == [[]]
    assert f"stopped web (pid {launcher.groups[0]})" in stderr
    assert (config.state_dir / "stack.lock").read_text() == ""


def test_signal_while_stopping_is_ignored(make_config: ConfigFactory) -> None:
    config = make_config([])
    launcher = Launcher(config, "stopping", ignore_sigint=False)
    try:
        launcher.wait_for_line('{"groups"')
        code, stderr = launcher.finish()
    finally:
        launcher.kill()
    assert code == 0, stderr
    assert json.loads(launcher.stdout[-1])["state"] == "success"
    assert "ignoring SIGINT while the services stop" in stderr
    assert [group_members(pgid) for pgid in launcher.groups] == [[]]


# Stands in for the real training DAG: it checks that today's partition was landed, then logs a
# run with test metrics and registers it as the champion, as the register task does.
FAKE_TRAIN_DAG = """
import datetime as dt
import os
from pathlib import Path

from airflow.sdk import dag, task


@dag(schedule="@daily", start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), catchup=False)
def train_digits():
    @task
    def check_landing(**context):
        run = context["dag_run"]
        run_date = (run.logical_date or run.run_after).date().isoformat()
        partition = Path(os.environ["ML_LOOP_DATA_DIR"]) / "landing" / "digits" / run_date
        if not partition.is_dir():
            raise FileNotFoundError(f"partition {partition} was not landed")
        return run_date

    @task
    def register(run_date):
        import mlflow
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        mlflow.set_experiment("digits")
        with mlflow.start_run() as run:
            mlflow.log_metrics({"test_accuracy": 0.97, "test_macro_f1": 0.96})
        client = MlflowClient()
        try:
            client.create_registered_model("digits-cnn")
        except MlflowException:
            pass
        version = client.create_model_version(
            "digits-cnn", source=f"runs:/{run.info.run_id}/weights", run_id=run.info.run_id
        )
        client.set_registered_model_alias("digits-cnn", "champion", version.version)
        return version.version

    register(check_landing())


train_digits()
"""


def land_sample_images(stack: LocalStack, end_date: dt.date) -> None:
    """Write 40 small digit images for ``end_date``, enough that some fall in the test split."""
    import numpy as np
    from PIL import Image

    partition = stack.config.data_dir / "landing" / "digits" / end_date.isoformat() / "7"
    partition.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((28, 28), dtype=np.uint8)
    pixels[4:24, 14] = 255
    for index in range(40):
        Image.fromarray(pixels).save(partition / f"sample-{index:03d}.png")


def invoke_once(config: StackConfig, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict, str]:
    code = run_main_job(LocalStack(config), once=True)
    output = capsys.readouterr().out
    return code, json.loads(output.strip().splitlines()[-1]), output


@pytest.mark.e2e
def test_run_once_trains_once_per_invocation(
    make_config: ConfigFactory,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(main_job, "land_data", land_sample_images)
    config = make_config([*AIRFLOW_SERVICES, MLFLOW_SERVICE])
    config.dags_folder.mkdir(parents=True)
    (config.dags_folder / "train_digits.py").write_text(FAKE_TRAIN_DAG)

    code, first, output = invoke_once(config, capsys)
    assert code == 0, output
    assert tuple(first) == RESULT_KEYS
    assert first["state"] == "success"
    assert first["dag_id"] == "train_digits"
    assert first["model_name"] == "digits-cnn"
    assert first["model_version"] == "1"
    assert first["alias"] == "champion"
    assert first["metrics"]["accuracy"] == pytest.approx(0.97)
    assert first["airflow_url"] == config.airflow_url
    assert first["mlflow_url"] == config.mlflow_url
    assert first["serving_url"] == config.serving_url("digits")
    assert f"password {config.admin_password()}" in output
    assert f"curl -s -X POST {config.serving_url('digits')}/invocations" in output
    assert f'-H "Authorization: Bearer $(cat {config.serving_token_file})"' in output
    assert config.serving_token() not in output

    payload_path = config.state_dir / "requests" / "digits-sample.json"
    image = json.loads(payload_path.read_text())["inputs"]
    assert [len(image), len(image[0]), len(image[0][0]), len(image[0][0][0])] == [1, 1, 28, 28]
    assert max(max(row) for row in image[0][0]) == 1.0
    assert min(min(row) for row in image[0][0]) == 0.0

    code, second, output = invoke_once(config, capsys)
    assert code == 0, output
    assert second["state"] == "success"
    assert second["run_id"] != first["run_id"]
    assert second["model_version"] == "2"

    listed = LocalStack(config).airflow_cli("dags", "list-runs", "train_digits", "-o", "json")
    runs = {run["run_id"]: run for run in json.loads(listed.stdout.strip().splitlines()[-1])}
    assert sorted(runs) == sorted([first["run_id"], second["run_id"]])
    midnight = dt.datetime.combine(dt.datetime.now(dt.UTC).date(), dt.time(), tzinfo=dt.UTC)
    assert dt.datetime.fromisoformat(runs[first["run_id"]]["logical_date"]) == midnight
    assert runs[second["run_id"]]["logical_date"] == ""
    assert not (Path(config.state_dir) / "processes.json").exists()
