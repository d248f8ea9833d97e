"""The local stack: Airflow's four components, MLflow and the model servers as child processes."""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

from local_stack.client import AirflowClient
from local_stack.config import ADMIN_USER, StackConfig
from local_stack.supervisor import (
    LOG_TAIL_CHARS,
    ProcessRecord,
    RunningService,
    StackError,
    StackLock,
    check_ports_free,
    find_exited,
    start_all,
    stop_all,
)

logger = logging.getLogger(__name__)


class LocalStack:
    """Start, watch and stop every service of one state folder; usable as a context manager.

    ``start()`` takes the state folder's lock, checks that every port is free, writes the
    secrets on first use, then starts the services and waits until each is ready. With an
    Airflow service in the list, ``airflow db migrate`` runs first, beside MLflow's startup.
    When anything fails it stops what it started, releases the lock and raises StackError with
    the failing service's log tail.
    """

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self._specs = config.service_specs()
        self._lock = StackLock(config.state_dir / "stack.lock")
        self._record = ProcessRecord(config.state_dir / "processes.json")
        self._services: list[RunningService] = []
        self._started_groups: list[int] = []
        self._client: AirflowClient | None = None

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses that belong to this stack, such as the ``airflow`` CLI."""
        return self.config.env

    @property
    def services(self) -> list[RunningService]:
        return list(self._services)

    @property
    def process_groups(self) -> list[int]:
        """Process group ids of the running services (each equals the service's pid)."""
        return [service.pgid for service in self._services]

    @property
    def started_groups(self) -> list[int]:
        """Process group ids of every service this object started, including stopped ones."""
        return list(self._started_groups)

    @property
    def client(self) -> AirflowClient:
        """A REST client logged in as ``admin``; valid while the API server runs."""
        if self._client is None:
            self._client = AirflowClient(
                self.config.airflow_url, ADMIN_USER, self.config.admin_password()
            )
        return self._client

    def prepare(self) -> None:
        """Take the lock, stop services a dead launcher left behind, check ports, write secrets.

        ``start()`` calls it; call it first to do work under the lock before the services start.
        """
        if self._lock.held:
            return
        taken_over = self._lock.acquire()
        try:
            if taken_over:
                stopped = self._record.stop_leftovers()
                if stopped:
                    logger.warning("stopped services left running: %s", ", ".join(stopped))
            check_ports_free(self._specs)
            self.config.prepare_state()
        except BaseException:
            self._lock.release()
            raise

    def start(self) -> None:
        started_at = time.monotonic()
        self.prepare()
        try:
            start_all(
                self._specs, self.env, self.config.logs_dir, self._services, self._record.write
            )
        except BaseException:
            self._started_groups.extend(self.process_groups)
            self.stop()
            raise
        self._started_groups.extend(self.process_groups)
        logger.info(
            "local stack is up after %.1f s: %s",
            time.monotonic() - started_at,
            ", ".join(spec.name for spec in self._specs),
        )

    def stop(self) -> None:
        """Stop every started service by its process group and release the lock."""
        if self._client is not None:
            self._client.close()
            self._client = None
        try:
            if self._services:
                stop_all(self._services)
        finally:
            self._services.clear()
            self._record.clear()
            self._lock.release()

    def check_alive(self) -> None:
        """Raise StackError, with the log tail, when a started service has exited."""
        exited = find_exited(self._services)
        if exited is not None:
            raise StackError(
                f"service {exited.spec.name} (pid {exited.pgid}) exited with code "
                f"{exited.process.returncode}; log {exited.log_path} ends with:\n"
                f"{exited.log_tail()}"
            )

    def airflow_cli(
        self, *args: str, check: bool = True, timeout_s: float = 300.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``airflow ARGS...`` against this stack's home and database; capture its output."""
        result = subprocess.run(
            ["airflow", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if check and result.returncode != 0:
            output = (result.stdout + result.stderr)[-LOG_TAIL_CHARS:]
            raise StackError(
                f"`airflow {' '.join(args)}` failed with exit code {result.returncode}:\n{output}"
            )
        return result

    def run_logged(self, name: str, argv: list[str], timeout_s: float) -> None:
        """Run a one-off command of the stack with its output in ``logs/<name>.log``.

        Raises StackError with the log tail when the command fails or times out.
        """
        log_path = self.config.logs_dir / f"{name}.log"
        self.config.logs_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with log_path.open("w") as log:
            try:
                result = subprocess.run(
                    argv,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=timeout_s,
                    check=False,
                )
                failure = f"failed with exit code {result.returncode}" if result.returncode else ""
            except subprocess.TimeoutExpired:
                failure = f"timed out after {timeout_s:.0f} s"
        if failure:
            raise StackError(
                f"`{' '.join(argv)}` {failure}; log {log_path} ends with:\n{_tail(log_path)}"
            )
        logger.info("%s finished in %.1f s", name, time.monotonic() - started)


def _tail(path: Path, max_chars: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as err:
        return f"(log {path} not readable: {err})"
    return text[-max_chars:] if text else "(the log is empty)"
