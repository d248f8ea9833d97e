"""Settings of the local stack: folders, ports, secrets and the environment of every service.

Everything the stack writes lives under one state folder (default ``<repo>/.stack``, or
``$ML_LOOP_STATE_DIR``)::

    airflow/            AIRFLOW_HOME: airflow.cfg, airflow.db (SQLite), task logs, the password file
    mlflow/             mlflow.db (SQLite backend store) and artifacts/ (served by the server)
    data/               ML_LOOP_DATA_DIR: landing/, raw/, validated/, processed/, snapshots/
    logs/<service>.log  stdout and stderr of each service the stack started
    data/predictions/   prediction log of the model servers (ML_LOOP_PREDICTION_LOG_DIR)
    secrets/            jwt_secret, api_secret_key and serving_token, each readable by the owner
                        only
    stack.lock          pid of the running stack, locked while it runs
    processes.json      process groups of the running stack's services

Ports come from environment variables, each with a default:

    ML_LOOP_AIRFLOW_PORT        8080  Airflow API server and UI
    ML_LOOP_MLFLOW_PORT         5000  MLflow tracking server and UI
    ML_LOOP_SERVING_PORT        8000  model server of the first spec; the next spec gets port + 1
    ML_LOOP_WORKER_LOG_PORT     8793  log server of the scheduler's LocalExecutor workers
    ML_LOOP_TRIGGERER_LOG_PORT  8794  log server of the triggerer

The model servers require ``Authorization: Bearer <token>`` on every endpoint except ``/health``
and ``/ready``; the token is ``secrets/serving_token``, and the Airflow connections
``model_server_<spec>`` carry it as their password. ``airflow pools set gpu`` runs after the
database migration with ``$ML_LOOP_GPU_SLOTS`` slots (default 1), so training tasks that ask for a
GPU have their pool.

Every service needs a port of its own, so ``StackConfig`` rejects settings where two share one,
for example ``ML_LOOP_MLFLOW_PORT`` equal to ``ML_LOOP_SERVING_PORT + 1``.

All servers listen on 127.0.0.1, except the two log servers: Airflow 3.3.2 binds them to every
interface and has no setting to change that. They answer only requests signed with the stack's
secret key.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import secrets
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

STATE_DIR_ENV = "ML_LOOP_STATE_DIR"
GPU_SLOTS_ENV = "ML_LOOP_GPU_SLOTS"
DEFAULT_GPU_SLOTS = 1
GPU_POOL = "gpu"
SERVING_TOKEN_SECRET = "serving_token"
SECRET_NAMES = ("jwt_secret", "api_secret_key", SERVING_TOKEN_SECRET)
STARTUP_TIMEOUT_ENV = "ML_LOOP_STARTUP_TIMEOUT_S"
DEFAULT_STARTUP_TIMEOUT_S = 240.0

AIRFLOW_PORT_ENV = "ML_LOOP_AIRFLOW_PORT"
MLFLOW_PORT_ENV = "ML_LOOP_MLFLOW_PORT"
SERVING_PORT_ENV = "ML_LOOP_SERVING_PORT"
WORKER_LOG_PORT_ENV = "ML_LOOP_WORKER_LOG_PORT"
TRIGGERER_LOG_PORT_ENV = "ML_LOOP_TRIGGERER_LOG_PORT"
DEFAULT_PORTS = {
    AIRFLOW_PORT_ENV: 8080,
    MLFLOW_PORT_ENV: 5000,
    SERVING_PORT_ENV: 8000,
    WORKER_LOG_PORT_ENV: 8793,
    TRIGGERER_LOG_PORT_ENV: 8794,
}

HOST = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"
ADMIN_USER = "admin"
# LocalExecutor forks this many worker processes up front; sized for a 2-core machine, where
# more workers only compete for the same cores.
PARALLELISM = 4
# Interval, in seconds, at which the dag-processor lists the DAG folder for new files (Airflow's
# default is 300 s).
DAG_REFRESH_INTERVAL_S = 5
SIMPLE_AUTH_MANAGER = (
    "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
)
PASSWORD_FILE_NAME = "simple_auth_manager_passwords.json.generated"
CHAMPION_ALIAS = "champion"

AIRFLOW_SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")
# Runs before the Airflow services (it creates or upgrades the metadata database), while MLflow
# starts beside it.
MIGRATE_SERVICE = "airflow-db-migrate"
# Runs after the migration, beside the Airflow services, and creates or updates the GPU pool.
GPU_POOL_SERVICE = "airflow-pools-set-gpu"
MLFLOW_SERVICE = "mlflow"
MODEL_SERVER_PREFIX = "model-server-"
# Specs listed here get the first serving ports in this order; any other spec follows in
# alphabetical order.
SERVING_PORT_ORDER = ("digits", "breast_cancer")


SQLITE_BUSY_TIMEOUT_S = 30


class StackConfigError(ValueError):
    """An invalid setting of the local stack, such as a port that is not a number."""


@dataclasses.dataclass(frozen=True)
class PortBinding:
    """A port a service listens on, and the environment variable that moves it."""

    port: int
    env_var: str
    host: str = HOST


@dataclasses.dataclass(frozen=True)
class HttpCheck:
    """Readiness probe: the URL returns HTTP 200.

    The supervisor counts a response only when a process of the service listens on the URL's
    port, so another server that responds on a port the service failed to bind cannot make the
    service ready.
    """

    url: str

    @property
    def port(self) -> int:
        """The TCP port the probe connects to."""
        parts = urllib.parse.urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    def __call__(self, started_at: dt.datetime) -> bool:
        try:
            with urllib.request.urlopen(self.url, timeout=2) as response:
                return response.status == 200
        except (OSError, ValueError):
            return False


@dataclasses.dataclass(frozen=True)
class HeartbeatCheck:
    """Readiness probe for an Airflow job: a heartbeat newer than the service's start.

    The API server's ``/api/v2/monitor/health`` reports the latest heartbeat of each job type.
    A heartbeat older than the start time belongs to a process of an earlier run of the stack.
    """

    health_url: str
    component: str

    def __call__(self, started_at: dt.datetime) -> bool:
        try:
            with urllib.request.urlopen(self.health_url, timeout=2) as response:
                health = json.load(response)
        except (OSError, ValueError):
            return False
        info = health.get(self.component) or {}
        heartbeat = info.get(f"latest_{self.component}_heartbeat")
        if info.get("status") != "healthy" or not heartbeat:
            return False
        return dt.datetime.fromisoformat(heartbeat) >= started_at


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """One process of the stack: a server, or a one-shot command such as a database migration.

    ``after`` names services that must be ready before this one starts. ``ready`` is called
    with the UTC time the process was started and returns True once the service serves. A
    server without it counts as ready once started. A one-shot service is ready when it exits
    with code 0.
    """

    name: str
    argv: tuple[str, ...]
    ready: Callable[[dt.datetime], bool] | None = None
    ports: tuple[PortBinding, ...] = ()
    after: tuple[str, ...] = ()
    timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    one_shot: bool = False


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """Folders, ports and services of one local stack; build it with ``from_env``.

    ``services`` lists service names (``api-server``, ``scheduler``, ``dag-processor``,
    ``triggerer``, ``mlflow``, ``model-server-<spec>``) and any extra ``ServiceSpec``.
    """

    repo_root: Path
    state_dir: Path
    dags_folder: Path
    plugins_folder: Path
    airflow_port: int
    mlflow_port: int
    serving_port: int
    worker_log_port: int
    triggerer_log_port: int
    startup_timeout_s: float
    gpu_slots: int
    services: tuple[str | ServiceSpec, ...]
    serving_specs: tuple[tuple[str, str], ...]
    base_environ: Mapping[str, str]

    def __post_init__(self) -> None:
        self.check_ports()

    @classmethod
    def from_env(
        cls,
        repo_root: str | Path,
        state_dir: str | Path | None = None,
        dags_folder: str | Path | None = None,
        services: Sequence[str | ServiceSpec] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> StackConfig:
        """Build the config from arguments, then ``ML_LOOP_*`` variables, then defaults.

        ``services=None`` starts the whole stack: Airflow, MLflow and one model server per
        spec in ``include/specs``. ``environ`` defaults to ``os.environ`` and is also the base
        of every service's environment.
        """
        environ = dict(os.environ if environ is None else environ)
        repo_root = Path(repo_root).resolve()
        if state_dir is None:
            state_dir = environ.get(STATE_DIR_ENV) or repo_root / ".stack"
        ports = {name: _read_port(environ, name) for name in DEFAULT_PORTS}
        serving_specs = _serving_specs(repo_root)
        if services is None:
            services = (
                *AIRFLOW_SERVICES,
                MLFLOW_SERVICE,
                *(MODEL_SERVER_PREFIX + name for name, _ in serving_specs),
            )
        return cls(
            repo_root=repo_root,
            state_dir=Path(state_dir).resolve(),
            dags_folder=Path(dags_folder or repo_root / "dags").resolve(),
            plugins_folder=repo_root / "plugins",
            airflow_port=ports[AIRFLOW_PORT_ENV],
            mlflow_port=ports[MLFLOW_PORT_ENV],
            serving_port=ports[SERVING_PORT_ENV],
            worker_log_port=ports[WORKER_LOG_PORT_ENV],
            triggerer_log_port=ports[TRIGGERER_LOG_PORT_ENV],
            startup_timeout_s=_read_timeout(environ),
            gpu_slots=_read_gpu_slots(environ),
            services=tuple(services),
            serving_specs=serving_specs,
            base_environ=environ,
        )

    @property
    def airflow_home(self) -> Path:
        return self.state_dir / "airflow"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def secrets_dir(self) -> Path:
        return self.state_dir / "secrets"

    @property
    def serving_token_file(self) -> Path:
        """File with the model servers' bearer token; ``prepare_state`` writes it."""
        return self.secrets_dir / SERVING_TOKEN_SECRET

    @property
    def prediction_log_dir(self) -> Path:
        return self.data_dir / "predictions"

    def serving_token(self) -> str:
        """Return the model servers' bearer token; it is a secret, so never log it."""
        return self._secret(SERVING_TOKEN_SECRET)

    @property
    def password_file(self) -> Path:
        return self.airflow_home / PASSWORD_FILE_NAME

    @property
    def airflow_url(self) -> str:
        return f"http://{HOST}:{self.airflow_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    def serving_port_for(self, spec_name: str) -> int:
        """Return the model server port of a spec: the serving port plus the spec's index."""
        names = [name for name, _ in self.serving_specs]
        if spec_name not in names:
            raise StackConfigError(
                f"no model server for spec {spec_name!r}; specs with one: {', '.join(names)}"
            )
        return self.serving_port + names.index(spec_name)

    def check_ports(self) -> None:
        """Raise StackConfigError when a port is out of range or two services share one.

        Every service this config defines counts, not only those in ``services``, because the
        environment of every service and task points at all of them (``MLFLOW_TRACKING_URI``,
        the Execution API URL, the model server connections). Extra ``ServiceSpec`` entries in
        ``services`` count too.
        """
        owners: dict[int, tuple[str, PortBinding]] = {}
        for spec in self._port_owners():
            for binding in spec.ports:
                if not 1 <= binding.port <= 65535:
                    raise StackConfigError(
                        f"invalid port {binding.port} for {spec.name} ({binding.env_var}): "
                        f"expected a TCP port from 1 to 65535; lower {binding.env_var.split()[0]}"
                    )
                owner = owners.setdefault(binding.port, (spec.name, binding))
                if owner[1] is binding:
                    continue
                owner_name, owner_binding = owner
                raise StackConfigError(
                    f"{owner_name} and {spec.name} would both listen on port {binding.port} "
                    f"({owner_binding.env_var} = {binding.port}, {binding.env_var} = "
                    f"{binding.port}); set these variables so that each service gets its own port"
                )

    def _port_owners(self) -> list[ServiceSpec]:
        extra = [service for service in self.services if isinstance(service, ServiceSpec)]
        return [*self._known_services().values(), *extra]

    def serving_url(self, spec_name: str) -> str:
        return f"http://{HOST}:{self.serving_port_for(spec_name)}"

    def admin_password(self) -> str:
        """Return the generated password of the Airflow user ``admin``; ``prepare`` writes it."""
        try:
            return json.loads(self.password_file.read_text())[ADMIN_USER]
        except (OSError, ValueError, KeyError) as err:
            raise StackConfigError(
                f"no password for user {ADMIN_USER!r} in {self.password_file}; start the stack "
                "once to generate it, or delete the file to generate a new one"
            ) from err

    def prepare_state(self) -> None:
        """Create the state folders and the secrets that are generated on first start."""
        for folder in (self.airflow_home, self.data_dir, self.logs_dir, self.state_dir / "mlflow"):
            folder.mkdir(parents=True, exist_ok=True)
        self.secrets_dir.mkdir(mode=0o700, exist_ok=True)
        if not self.password_file.exists():
            _write_private(
                self.password_file, json.dumps({ADMIN_USER: secrets.token_urlsafe(16)}) + "\n"
            )
        for name in SECRET_NAMES:
            path = self.secrets_dir / name
            if not path.exists():
                _write_private(path, secrets.token_urlsafe(48))

    def _secret(self, name: str) -> str:
        path = self.secrets_dir / name
        try:
            return path.read_text().strip()
        except OSError as err:
            raise StackConfigError(
                f"secret {path} is missing, so the stack in {self.state_dir} has never been "
                "started: run `make run` once to create its database and secrets (from code, "
                "LocalStack.prepare() creates the secrets)"
            ) from err

    @property
    def env(self) -> dict[str, str]:
        """Return the environment of every service, task and ``airflow`` CLI call of this stack.

        It contains secrets (the JWT secret, the API secret key, the serving token as the
        password of the model server connections, and the admin password in the API
        connection): pass it to subprocesses, never log it.
        """
        env = dict(self.base_environ)
        # The stack's model servers read their token from the file set in their own spec, so a
        # token in the caller's environment would conflict with it.
        for name in ("ML_LOOP_SERVING_TOKEN", "ML_LOOP_SERVING_TOKEN_FILE"):
            env.pop(name, None)
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", os.defpath)])
        env.update(
            {
                STATE_DIR_ENV: str(self.state_dir),
                "PYTHONPATH": os.pathsep.join(
                    [str(self.repo_root / "include"), str(self.plugins_folder)]
                ),
                "ML_LOOP_DATA_DIR": str(self.data_dir),
                "MLFLOW_TRACKING_URI": self.mlflow_url,
                "MLFLOW_DISABLE_TELEMETRY": "true",
                "GX_ANALYTICS_ENABLED": "False",
                **self._airflow_env(),
            }
        )
        token = urllib.parse.quote(self.serving_token(), safe="")
        for name, _ in self.serving_specs:
            host = f"{HOST}:{self.serving_port_for(name)}"
            env[f"AIRFLOW_CONN_MODEL_SERVER_{name.upper()}"] = f"http://:{token}@{host}"
        # A training run started by a retrain request writes the reason into its run note
        # through the REST API, which needs a user (ml_loop_airflow.assets.set_run_note).
        password = urllib.parse.quote(self.admin_password(), safe="")
        env["AIRFLOW_CONN_ML_LOOP_AIRFLOW_API"] = (
            f"http://{ADMIN_USER}:{password}@{HOST}:{self.airflow_port}"
        )
        return env

    def _airflow_env(self) -> dict[str, str]:
        api_url = self.airflow_url
        return {
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(self.plugins_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(PARALLELISM),
            "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH_MANAGER,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.password_file),
            # Task processes reach the Execution API through this URL, so it must follow the port.
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
            # SQLite allows one writer at a time. The scheduler, the API server and a CLI call
            # such as `backfill create` write at once, so each waits up to 30 s for the lock
            # instead of failing with "database is locked" after the default 5 s.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": (
                f"sqlite:///{self.airflow_home / 'airflow.db'}?timeout={SQLITE_BUSY_TIMEOUT_S}"
            ),
            "AIRFLOW__API__HOST": HOST,
            "AIRFLOW__API__PORT": str(self.airflow_port),
            "AIRFLOW__API__BASE_URL": api_url,
            "AIRFLOW__API__SECRET_KEY": self._secret("api_secret_key"),
            "AIRFLOW__API_AUTH__JWT_SECRET": self._secret("jwt_secret"),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.worker_log_port),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.triggerer_log_port),
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": str(DAG_REFRESH_INTERVAL_S),
            "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_STORAGE_PATH": str(self.airflow_home / "bundles"),
        }

    def service_specs(self) -> list[ServiceSpec]:
        """Resolve ``services`` into specs, in the order they were listed.

        When the list contains an Airflow service, ``airflow db migrate`` comes first, every
        Airflow service starts after it, and ``airflow pools set gpu`` runs after it too.
        """
        known = self._known_services()
        specs = []
        for service in self.services:
            if isinstance(service, ServiceSpec):
                specs.append(service)
            elif service in known:
                specs.append(known[service])
            else:
                raise StackConfigError(
                    f"unknown service {service!r}; known services: {', '.join(known)}"
                )
        if any(spec.name in AIRFLOW_SERVICES for spec in specs):
            specs[0:0] = [known[MIGRATE_SERVICE], known[GPU_POOL_SERVICE]]
        return specs

    def _known_services(self) -> dict[str, ServiceSpec]:
        health_url = f"{self.airflow_url}/api/v2/monitor/health"
        api_port = PortBinding(self.airflow_port, AIRFLOW_PORT_ENV)
        worker_log_port = PortBinding(self.worker_log_port, WORKER_LOG_PORT_ENV, ALL_INTERFACES)
        triggerer_log_port = PortBinding(
            self.triggerer_log_port, TRIGGERER_LOG_PORT_ENV, ALL_INTERFACES
        )
        airflow = {
            "api-server": ServiceSpec(
                name="api-server",
                argv=("airflow", "api-server"),
                ready=HttpCheck(health_url),
                ports=(api_port,),
            ),
            "scheduler": ServiceSpec(
                name="scheduler",
                argv=("airflow", "scheduler"),
                ready=HeartbeatCheck(health_url, "scheduler"),
                ports=(worker_log_port,),
            ),
            "dag-processor": ServiceSpec(
                name="dag-processor",
                argv=("airflow", "dag-processor"),
                ready=HeartbeatCheck(health_url, "dag_processor"),
            ),
            "triggerer": ServiceSpec(
                name="triggerer",
                argv=("airflow", "triggerer"),
                ready=HeartbeatCheck(health_url, "triggerer"),
                ports=(triggerer_log_port,),
            ),
        }
        services = {
            MIGRATE_SERVICE: ServiceSpec(
                name=MIGRATE_SERVICE,
                argv=("airflow", "db", "migrate"),
                timeout_s=self.startup_timeout_s,
                one_shot=True,
            )
        }
        services[GPU_POOL_SERVICE] = ServiceSpec(
            name=GPU_POOL_SERVICE,
            argv=(
                "airflow",
                "pools",
                "set",
                GPU_POOL,
                str(self.gpu_slots),
                "GPU slots for training tasks",
            ),
            after=(MIGRATE_SERVICE,),
            timeout_s=self.startup_timeout_s,
            one_shot=True,
        )
        for name, spec in airflow.items():
            services[name] = dataclasses.replace(
                spec, after=(MIGRATE_SERVICE,), timeout_s=self.startup_timeout_s
            )
        services[MLFLOW_SERVICE] = ServiceSpec(
            name=MLFLOW_SERVICE,
            argv=(
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.state_dir / 'mlflow' / 'mlflow.db'}",
                "--artifacts-destination",
                str(self.state_dir / "mlflow" / "artifacts"),
                "--host",
                HOST,
                "--port",
                str(self.mlflow_port),
                "--workers",
                "1",
            ),
            ready=HttpCheck(f"{self.mlflow_url}/health"),
            ports=(PortBinding(self.mlflow_port, MLFLOW_PORT_ENV),),
            timeout_s=self.startup_timeout_s,
            # The job runner serves GenAI evaluation jobs, which this project does not use. With
            # it off, the server runs 2 processes instead of 10 and leaves no folder in /dev/shm.
            env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        for name, model_name in self.serving_specs:
            port = self.serving_port_for(name)
            offset = port - self.serving_port
            env_var = SERVING_PORT_ENV if offset == 0 else f"{SERVING_PORT_ENV} + {offset}"
            services[MODEL_SERVER_PREFIX + name] = ServiceSpec(
                name=MODEL_SERVER_PREFIX + name,
                argv=(
                    "python",
                    "-m",
                    "ml_loop.serving",
                    "--model-name",
                    model_name,
                    "--alias",
                    CHAMPION_ALIAS,
                    "--host",
                    HOST,
                    "--port",
                    str(port),
                    "--prediction-log-dir",
                    str(self.prediction_log_dir),
                ),
                env={"ML_LOOP_SERVING_TOKEN_FILE": str(self.serving_token_file)},
                # /health returns 200 without a model too, because before the first training
                # run there is no champion to serve (``/ready`` returns 200 once one is loaded).
                ready=HttpCheck(f"http://{HOST}:{port}/health"),
                ports=(PortBinding(port, env_var),),
                after=(MLFLOW_SERVICE,),
                timeout_s=self.startup_timeout_s,
            )
        return services


def _read_port(environ: Mapping[str, str], name: str) -> int:
    raw = environ.get(name)
    if raw is None or raw == "":
        return DEFAULT_PORTS[name]
    try:
        port = int(raw)
    except ValueError as err:
        raise StackConfigError(
            f"invalid {name}={raw!r}: expected a TCP port number from 1 to 65535"
        ) from err
    if not 1 <= port <= 65535:
        raise StackConfigError(f"invalid {name}={raw!r}: expected a TCP port from 1 to 65535")
    return port


def _read_timeout(environ: Mapping[str, str]) -> float:
    raw = environ.get(STARTUP_TIMEOUT_ENV)
    if not raw:
        return DEFAULT_STARTUP_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError as err:
        raise StackConfigError(
            f"invalid {STARTUP_TIMEOUT_ENV}={raw!r}: expected a number of seconds"
        ) from err
    if value <= 0:
        raise StackConfigError(f"invalid {STARTUP_TIMEOUT_ENV}={raw!r}: expected more than 0")
    return value


def _read_gpu_slots(environ: Mapping[str, str]) -> int:
    raw = environ.get(GPU_SLOTS_ENV)
    if not raw:
        return DEFAULT_GPU_SLOTS
    try:
        value = int(raw)
    except ValueError as err:
        raise StackConfigError(
            f"invalid {GPU_SLOTS_ENV}={raw!r}: expected a whole number of GPU slots, such as 1"
        ) from err
    if value < 0:
        raise StackConfigError(f"invalid {GPU_SLOTS_ENV}={raw!r}: expected 0 or more")
    return value


def _serving_specs(repo_root: Path) -> tuple[tuple[str, str], ...]:
    """Return ``(spec name, registered model name)`` for every spec, in serving-port order."""
    from ml_loop.spec import load_spec

    names = sorted(path.stem for path in (repo_root / "include" / "specs").glob("*.yaml"))
    ordered = [name for name in SERVING_PORT_ORDER if name in names]
    ordered += [name for name in names if name not in SERVING_PORT_ORDER]
    specs_dir = repo_root / "include" / "specs"
    return tuple((name, load_spec(specs_dir / f"{name}.yaml").model_name) for name in ordered)


def _write_private(path: Path, text: str) -> None:
    """Write a file that only the owner can read, creating it with mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
