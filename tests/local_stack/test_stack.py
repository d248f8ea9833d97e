"""Tests of the local stack launcher: ports, the lock, failing services and a real Airflow run."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from local_stack import (
    AIRFLOW_SERVICES,
    MLFLOW_SERVICE,
    AirflowApiError,
    DagImportError,
    HttpCheck,
    LocalStack,
    PortBinding,
    PortInUseError,
    ServiceSpec,
    ServiceStartError,
    StackConfig,
    StackConfigError,
    StackError,
    StackLockedError,
)
from local_stack.main_job import describe_failure
from local_stack.supervisor import group_members, process_start_ticks

REPO_ROOT = Path(__file__).resolve().parents[2]

ConfigFactory = Callable[..., StackConfig]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def python_service(name: str, code: str, **kwargs) -> ServiceSpec:
    return ServiceSpec(name=name, argv=(sys.executable, "-c", code), **kwargs)


def web_service(port: int, **kwargs) -> ServiceSpec:
    return ServiceSpec(
        name="web",
        argv=(sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"),
        ready=HttpCheck(f"http://127.0.0.1:{port}/"),
        **kwargs,
    )


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A port on 127.0.0.1 that a socket of this test listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("service", "env_var", "offset"),
    [
        ("mlflow", "ML_LOOP_MLFLOW_PORT", 0),
        ("api-server", "ML_LOOP_AIRFLOW_PORT", 0),
        ("scheduler", "ML_LOOP_WORKER_LOG_PORT", 0),
        ("model-server-digits", "ML_LOOP_SERVING_PORT", 0),
        ("model-server-breast_cancer", "ML_LOOP_SERVING_PORT + 1", 1),
    ],
)
def test_busy_port_names_port_and_variable(
    make_config: ConfigFactory, listening_port: int, service: str, env_var: str, offset: int
) -> None:
    variable = env_var.split()[0]
    config = make_config([service], **{variable: str(listening_port - offset)})
    stack = LocalStack(config)
    with pytest.raises(PortInUseError) as raised:
        stack.start()
    message = str(raised.value)
    assert f"port {listening_port}" in message
    assert env_var in message
    assert stack.started_groups == []
    assert not (config.state_dir / "airflow" / "airflow.db").exists()


def test_busy_port_releases_lock(make_config: ConfigFactory, listening_port: int) -> None:
    config = make_config(["mlflow"], ML_LOOP_MLFLOW_PORT=str(listening_port))
    with pytest.raises(PortInUseError):
        LocalStack(config).start()
    again = LocalStack(make_config([]))
    again.start()
    again.stop()


def test_invalid_port_variable_rejected(make_config: ConfigFactory) -> None:
    with pytest.raises(StackConfigError, match="ML_LOOP_AIRFLOW_PORT='eighty'"):
        make_config([], ML_LOOP_AIRFLOW_PORT="eighty")


@pytest.mark.parametrize(
    ("first", "second", "variables"),
    [
        ("api-server", "mlflow", {"ML_LOOP_AIRFLOW_PORT": 0, "ML_LOOP_MLFLOW_PORT": 0}),
        (
            "mlflow",
            "model-server-breast_cancer",
            {"ML_LOOP_MLFLOW_PORT": 0, "ML_LOOP_SERVING_PORT": 1},
        ),
        ("scheduler", "triggerer", {"ML_LOOP_WORKER_LOG_PORT": 0, "ML_LOOP_TRIGGERER_LOG_PORT": 0}),
    ],
)
def test_shared_port_rejected(
    make_config: ConfigFactory, first: str, second: str, variables: dict[str, int]
) -> None:
    # Each variable is set so that the variable plus its offset is the shared port.
    port = free_port()
    env = {name: str(port - offset) for name, offset in variables.items()}
    with pytest.raises(StackConfigError) as raised:
        make_config(["mlflow"], **env)
    message = str(raised.value)
    assert f"{first} and {second} would both listen on port {port}" in message
    for name, offset in variables.items():
        shown = f"{name} + {offset}" if offset else name
        assert f"{shown} = {port}" in message


def test_shared_port_with_extra_service_rejected(make_config: ConfigFactory) -> None:
    port = free_port()
    extra = python_service("extra", "pass", ports=(PortBinding(port, "EXTRA_PORT"),))
    with pytest.raises(StackConfigError) as raised:
        make_config([extra], ML_LOOP_MLFLOW_PORT=str(port))
    message = str(raised.value)
    assert f"mlflow and extra would both listen on port {port}" in message
    assert f"ML_LOOP_MLFLOW_PORT = {port}" in message
    assert f"EXTRA_PORT = {port}" in message


def test_second_serving_port_out_of_range(make_config: ConfigFactory) -> None:
    with pytest.raises(StackConfigError) as raised:
        make_config([], ML_LOOP_SERVING_PORT="65535")
    message = str(raised.value)
    assert "invalid port 65536 for model-server-breast_cancer" in message
    assert "ML_LOOP_SERVING_PORT + 1" in message


def test_unknown_service_rejected(make_config: ConfigFactory) -> None:
    with pytest.raises(StackConfigError, match="unknown service 'webserver'"):
        LocalStack(make_config(["webserver"]))


def test_missing_dependency_rejected(make_config: ConfigFactory) -> None:
    stack = LocalStack(make_config(["model-server-digits"]))
    with pytest.raises(StackConfigError, match="starts after mlflow"):
        stack.start()
    assert stack.started_groups == []


def test_live_lock_blocks_second_start(make_config: ConfigFactory) -> None:
    config = make_config([])
    holder_code = textwrap.dedent(
        """
        import sys, time
        from pathlib import Path
        from local_stack.supervisor import StackLock
        lock = StackLock(Path(sys.argv[1]))
        lock.acquire()
        print("locked", flush=True)
        time.sleep(120)
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_code, str(config.state_dir / "stack.lock")],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "include")},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StackLockedError) as raised:
            LocalStack(config).start()
        message = str(raised.value)
        assert f"pid {holder.pid}" in message
        assert f"kill {holder.pid}" in message
        assert "already running" in message
    finally:
        holder.terminate()
        holder.wait(timeout=10)


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def sleeper() -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )


def record_leftover(config: StackConfig, process: subprocess.Popen, start_ticks: int) -> None:
    config.state_dir.mkdir(parents=True, exist_ok=True)
    entry = {"name": "leftover", "pgid": process.pid, "start_ticks": start_ticks}
    (config.state_dir / "processes.json").write_text(json.dumps([entry]))


def test_stale_lock_taken_over(make_config: ConfigFactory) -> None:
    config = make_config([])
    config.state_dir.mkdir(parents=True)
    lock_path = config.state_dir / "stack.lock"
    lock_path.write_text(f"{dead_pid()}\n")
    stack = LocalStack(config)
    stack.start()
    try:
        assert lock_path.read_text().strip() == str(os.getpid())
    finally:
        stack.stop()
    assert lock_path.read_text() == ""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process start times come from /proc")
def test_stale_lock_stops_leftover_services(make_config: ConfigFactory) -> None:
    config = make_config([])
    leftover = sleeper()
    try:
        record_leftover(config, leftover, process_start_ticks(leftover.pid))
        (config.state_dir / "stack.lock").write_text(f"{dead_pid()}\n")
        stack = LocalStack(config)
        stack.start()
        stack.stop()
        assert leftover.wait(timeout=10) == -signal.SIGTERM
    finally:
        leftover.kill()
        leftover.wait()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process start times come from /proc")
def test_stale_lock_spares_reused_pid(make_config: ConfigFactory) -> None:
    config = make_config([])
    unrelated = sleeper()
    try:
        record_leftover(config, unrelated, process_start_ticks(unrelated.pid) + 1)
        (config.state_dir / "stack.lock").write_text(f"{dead_pid()}\n")
        stack = LocalStack(config)
        stack.start()
        stack.stop()
        assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait()


def test_failing_service_prints_tail_and_stops_rest(make_config: ConfigFactory) -> None:
    web = web_service(free_port())
    broken = python_service(
        "broken",
        "print('broken service marker'); raise SystemExit(3)",
        ready=HttpCheck("http://127.0.0.1:9/"),
        after=("web",),
    )
    config = make_config([web, broken])
    stack = LocalStack(config)
    with pytest.raises(ServiceStartError) as raised:
        stack.start()
    message = str(raised.value)
    assert "service broken exited with code 3" in message
    assert "broken service marker" in message
    assert str(config.logs_dir / "broken.log") in message
    assert len(stack.started_groups) == 2
    assert [group_members(pgid) for pgid in stack.started_groups] == [[], []]
    assert stack.process_groups == []
    assert (config.state_dir / "stack.lock").read_text() == ""


def test_unready_service_times_out(make_config: ConfigFactory) -> None:
    silent = python_service(
        "silent",
        "import time; print('silent service marker', flush=True); time.sleep(120)",
        ready=HttpCheck(f"http://127.0.0.1:{free_port()}/"),
        timeout_s=2,
    )
    stack = LocalStack(make_config([silent]))
    with pytest.raises(ServiceStartError) as raised:
        stack.start()
    message = str(raised.value)
    assert "service silent was not ready within 2 s" in message
    assert "ML_LOOP_STARTUP_TIMEOUT_S" in message
    assert "silent service marker" in message
    assert [group_members(pgid) for pgid in stack.started_groups] == [[]]


class OkHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def serve_foreign() -> Iterator[Callable[[int], None]]:
    """Start HTTP servers of this test process that return 200 to every GET, on given ports."""
    servers = []

    def serve(port: int) -> None:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), OkHandler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="socket owners come from /proc")
def test_probe_answered_by_other_process_rejected(
    make_config: ConfigFactory, serve_foreign: Callable[[int], None]
) -> None:
    port = free_port()
    # The service never binds its port, as a server does while it imports its code or after it
    # failed with "address already in use", and a server of the test takes the port after the
    # port check, so that it responds to the probe.
    idle = python_service(
        "idle",
        "import time; time.sleep(120)",
        ready=HttpCheck(f"http://127.0.0.1:{port}/health"),
        ports=(PortBinding(port, "IDLE_PORT"),),
    )
    config = make_config([idle])
    stack = LocalStack(config)
    stack.prepare()
    serve_foreign(port)
    with pytest.raises(ServiceStartError) as raised:
        stack.start()
    message = str(raised.value)
    assert "no process of idle" in message
    assert f"listens on port {port}" in message
    assert "set IDLE_PORT to a free port" in message
    assert str(config.logs_dir / "idle.log") in message
    assert [group_members(pgid) for pgid in stack.started_groups] == [[]]


def test_exited_service_detected_after_start(make_config: ConfigFactory) -> None:
    port = free_port()
    stack = LocalStack(make_config([web_service(port)]))
    with stack:
        stack.check_alive()
        os.killpg(stack.process_groups[0], signal.SIGKILL)
        stack.services[0].process.wait(timeout=10)
        with pytest.raises(StackError, match=r"service web \(pid \d+\) exited with code -9"):
            stack.check_alive()


def test_env_follows_ports(tmp_path: Path, make_config: ConfigFactory) -> None:
    config = make_config([], ML_LOOP_AIRFLOW_PORT="18123", ML_LOOP_SERVING_PORT="18200")
    config.prepare_state()
    env = config.env
    assert env["AIRFLOW__API__BASE_URL"] == "http://127.0.0.1:18123"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:18123/execution/"
    token = config.serving_token()
    assert env["AIRFLOW_CONN_MODEL_SERVER_DIGITS"] == f"http://:{token}@127.0.0.1:18200"
    assert env["AIRFLOW_CONN_MODEL_SERVER_BREAST_CANCER"] == f"http://:{token}@127.0.0.1:18201"
    assert env["AIRFLOW_HOME"] == str(config.state_dir / "airflow")
    assert env["ML_LOOP_DATA_DIR"] == str(config.state_dir / "data")
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(tmp_path / "dags")
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert env["PYTHONPATH"].split(os.pathsep) == [
        str(REPO_ROOT / "include"),
        str(REPO_ROOT / "plugins"),
    ]


def test_model_server_gets_token_and_log(make_config: ConfigFactory) -> None:
    config = make_config(["model-server-digits"], ML_LOOP_SERVING_TOKEN="x" * 32)
    config.prepare_state()
    (spec,) = config.service_specs()

    token_file = config.secrets_dir / "serving_token"
    assert spec.env == {"ML_LOOP_SERVING_TOKEN_FILE": str(token_file)}
    assert "ML_LOOP_SERVING_TOKEN" not in config.env
    assert spec.argv[-2:] == ("--prediction-log-dir", str(config.data_dir / "predictions"))
    assert len(config.serving_token()) >= 32
    assert token_file.stat().st_mode & 0o077 == 0
    assert config.serving_token() not in " ".join(spec.argv)


def test_connection_carries_token(make_config: ConfigFactory) -> None:
    from airflow.models.connection import Connection

    config = make_config([])
    config.prepare_state()

    conn = Connection(uri=config.env["AIRFLOW_CONN_MODEL_SERVER_DIGITS"])

    assert conn.password == config.serving_token()
    assert conn.host == "127.0.0.1"
    assert conn.port == config.serving_port_for("digits")


def test_gpu_pool_after_migrate(make_config: ConfigFactory) -> None:
    config = make_config(["scheduler"], ML_LOOP_GPU_SLOTS="3")

    names = [spec.name for spec in config.service_specs()]
    pool = config.service_specs()[1]

    assert names == ["airflow-db-migrate", "airflow-pools-set-gpu", "scheduler"]
    assert pool.argv == ("airflow", "pools", "set", "gpu", "3", "GPU slots for training tasks")
    assert pool.after == ("airflow-db-migrate",)
    assert pool.one_shot is True
    assert make_config(["scheduler"]).gpu_slots == 1


@pytest.mark.parametrize("value", ["two", "-1", "1.5"])
def test_invalid_gpu_slots_rejected(make_config: ConfigFactory, value: str) -> None:
    with pytest.raises(StackConfigError, match=f"invalid ML_LOOP_GPU_SLOTS={value!r}"):
        make_config([], ML_LOOP_GPU_SLOTS=value)


def test_state_dir_from_env(tmp_path: Path) -> None:
    config = StackConfig.from_env(
        REPO_ROOT, environ={**os.environ, "ML_LOOP_STATE_DIR": str(tmp_path / "elsewhere")}
    )
    assert config.state_dir == tmp_path / "elsewhere"
    assert config.dags_folder == REPO_ROOT / "dags"


def test_secrets_kept_across_starts(make_config: ConfigFactory) -> None:
    config = make_config([])
    config.prepare_state()
    password = config.admin_password()
    jwt_secret = config.env["AIRFLOW__API_AUTH__JWT_SECRET"]
    config.prepare_state()
    assert config.admin_password() == password
    assert config.env["AIRFLOW__API_AUTH__JWT_SECRET"] == jwt_secret
    assert len(password) >= 16
    assert config.password_file.stat().st_mode & 0o077 == 0
    assert (config.secrets_dir / "jwt_secret").stat().st_mode & 0o077 == 0


def test_secrets_differ_between_state_dirs(tmp_path: Path, make_config: ConfigFactory) -> None:
    first = make_config([], root=tmp_path / "a")
    second = make_config([], root=tmp_path / "b")
    first.prepare_state()
    second.prepare_state()
    assert first.admin_password() != second.admin_password()
    assert first.env["AIRFLOW__API_AUTH__JWT_SECRET"] != second.env["AIRFLOW__API_AUTH__JWT_SECRET"]


def test_password_missing_before_prepare(make_config: ConfigFactory) -> None:
    with pytest.raises(StackConfigError, match="no password for user 'admin'"):
        make_config([]).admin_password()


# A throwaway DAG for the end-to-end test: two tasks, a typed param, a daily schedule with a
# static start date, and one task that reports the environment the stack gives to tasks.
SMOKE_DAG = """
import datetime as dt
import os
import urllib.request

from airflow.sdk import Param, dag, task


@dag(
    schedule="@daily",
    start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    params={"epochs": Param(3, type="integer", minimum=1)},
)
def stack_smoke():
    @task
    def read_env(**context):
        with urllib.request.urlopen(os.environ["MLFLOW_TRACKING_URI"] + "/health", timeout=10) as r:
            mlflow_status = r.status
        return {
            "data_dir": os.environ["ML_LOOP_DATA_DIR"],
            "model_server": os.environ["AIRFLOW_CONN_MODEL_SERVER_DIGITS"],
            "mlflow_status": mlflow_status,
            "epochs": context["params"]["epochs"],
        }

    @task
    def echo(value):
        print("echo task saw", value)
        return value

    echo(read_env())


stack_smoke()
"""

# The dag-processor skips files that mention neither "airflow" nor "dag" (safe mode), so the
# broken file names both before its failing import.
BROKEN_DAG = "from airflow.sdk import dag\nimport does_not_exist_anywhere\n"

# A DAG whose only task fails on a missing module, as a task does when a stage module is missing.
FAILING_DAG = """
import datetime as dt

from airflow.sdk import dag, task


@dag(schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))
def stack_failing():
    @task
    def import_stage():
        import ml_loop.no_such_stage  # noqa: F401

    import_stage()


stack_failing()
"""


@pytest.mark.e2e
def test_stack_runs_dag_through_scheduler(tmp_path: Path, make_config: ConfigFactory) -> None:
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "stack_smoke.py").write_text(SMOKE_DAG)
    (dags / "stack_broken.py").write_text(BROKEN_DAG)
    (dags / "stack_failing.py").write_text(FAILING_DAG)
    config = make_config([*AIRFLOW_SERVICES, MLFLOW_SERVICE])
    stack = LocalStack(config)
    with stack:
        started = stack.process_groups
        client = stack.client
        dag = client.wait_for_dag("stack_smoke", timeout_s=180)
        assert dag["is_paused"] is True
        with pytest.raises(DagImportError, match="does_not_exist_anywhere"):
            client.wait_for_dag("stack_broken", timeout_s=180)

        with pytest.raises(AirflowApiError) as raised:
            client.trigger("stack_smoke", conf={"epochs": "abc"})
        assert raised.value.status == 400
        assert "epochs" in str(raised.value)

        midnight = dt.datetime.combine(dt.datetime.now(dt.UTC).date(), dt.time(), tzinfo=dt.UTC)
        run_id = client.trigger("stack_smoke", logical_date=midnight, conf={"epochs": 5})
        client.unpause("stack_smoke")
        assert client.wait_for_run("stack_smoke", run_id, timeout_s=300) == "success"

        runs = client.list_runs("stack_smoke")
        assert [run["dag_run_id"] for run in runs] == [run_id]
        tomorrow = midnight + dt.timedelta(days=1)
        next_date = client.get_dag("stack_smoke")["next_dagrun_logical_date"]
        assert dt.datetime.fromisoformat(next_date) == tomorrow
        with pytest.raises(AirflowApiError) as raised:
            client.trigger("stack_smoke", logical_date=midnight)
        assert raised.value.status == 409

        value = client.xcom("stack_smoke", run_id, "read_env")
        assert value["data_dir"] == str(config.data_dir)
        assert value["model_server"] == config.env["AIRFLOW_CONN_MODEL_SERVER_DIGITS"]
        pools = json.loads(stack.airflow_cli("pools", "get", "gpu", "-o", "json").stdout)
        assert str(pools[0]["slots"]) == "1"
        assert value["mlflow_status"] == 200
        assert value["epochs"] == 5
        states = {ti["task_id"]: ti["state"] for ti in client.task_instances("stack_smoke", run_id)}
        assert states == {"read_env": "success", "echo": "success"}
        assert "echo task saw" in client.task_log("stack_smoke", run_id, "echo", 1)

        result = stack.airflow_cli("dags", "list-runs", "stack_smoke", "-o", "json")
        assert run_id in result.stdout

        client.wait_for_dag("stack_failing", timeout_s=180)
        client.unpause("stack_failing")
        failing_run = client.trigger("stack_failing")
        assert client.wait_for_run("stack_failing", failing_run, timeout_s=300) == "failed"
        summary = describe_failure(client, "stack_failing", failing_run)
        assert "  import_stage: failed" in summary
        assert "ModuleNotFoundError: No module named 'ml_loop.no_such_stage'" in summary
        assert "stack_failing.py" in summary
    assert stack.process_groups == []
    assert [group_members(pgid) for pgid in started] == [[] for _ in started]
    assert (config.state_dir / "stack.lock").read_text() == ""
