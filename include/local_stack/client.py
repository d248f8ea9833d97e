"""A small client of the Airflow 3 REST API (``/api/v2``) for tests and the launcher.

It logs in with ``POST /auth/token`` (SimpleAuthManager) and sends the JWT as a bearer token.
Every request has a timeout. A 4xx or 5xx response raises AirflowApiError with the API's own
message, for example the parameter validation error of a trigger with a wrongly typed param.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from typing import Any

import httpx

logger = logging.getLogger(__name__)

TERMINAL_RUN_STATES = frozenset({"success", "failed"})
DEFAULT_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 2.0
# Frames shown per exception of a task log event; the last ones are nearest to the error.
MAX_TRACEBACK_FRAMES = 5
CAUSE_LINK = "The above exception was the direct cause of the following exception:"
CONTEXT_LINK = "During handling of the above exception, another exception occurred:"


class AirflowApiError(RuntimeError):
    """An Airflow REST call returned an error status; ``status`` and ``detail`` are the API's."""

    def __init__(self, method: str, path: str, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"Airflow API {method} {path} returned HTTP {status}: {detail}")


class DagImportError(RuntimeError):
    """The dag-processor could not import the file that defines a DAG."""


class AirflowClient:
    """REST client for one Airflow API server, logged in as one SimpleAuthManager user."""

    def __init__(
        self,
        base_url: str,
        username: str,
        password: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._username = username
        self._password = password
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout_s)
        self._token: str | None = None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AirflowClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _login(self) -> str:
        response = self._http.post(
            "/auth/token", json={"username": self._username, "password": self._password}
        )
        if response.status_code >= 400:
            raise AirflowApiError("POST", "/auth/token", response.status_code, _detail(response))
        return response.json()["access_token"]

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request under ``/api/v2``; return the decoded JSON body, or None if empty.

        A 401 logs in again once, because tokens expire (after 24 h by default).
        """
        url = f"/api/v2{path}"
        for attempt in range(2):
            if self._token is None:
                self._token = self._login()
            headers = {"Authorization": f"Bearer {self._token}", **kwargs.pop("headers", {})}
            response = self._http.request(method, url, headers=headers, **kwargs)
            if response.status_code == 401 and attempt == 0:
                self._token = None
                continue
            break
        if response.status_code >= 400:
            raise AirflowApiError(method, url, response.status_code, _detail(response))
        return response.json() if response.content else None

    def get_dag(self, dag_id: str) -> dict[str, Any]:
        return self.request("GET", f"/dags/{dag_id}")

    def import_errors(self) -> list[dict[str, Any]]:
        """Return the dag-processor's current import errors (file name and stack trace)."""
        return self.request("GET", "/importErrors", params={"limit": 100})["import_errors"]

    def wait_for_dag(self, dag_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """Wait until the dag-processor has parsed ``dag_id``; return the DAG.

        Raises DagImportError at once when the file named after the DAG (``<dag_id>.py``) has an
        import error, and TimeoutError listing every import error when the DAG does not appear.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.get_dag(dag_id)
            except AirflowApiError as err:
                if err.status != 404:
                    raise
            errors = self.import_errors()
            own = [error for error in errors if _file_stem(error["filename"]) == dag_id]
            if own:
                raise DagImportError(
                    f"DAG {dag_id} failed to import from {own[0]['filename']}:\n"
                    f"{own[0]['stack_trace']}"
                )
            if time.monotonic() > deadline:
                listed = "\n".join(f"{e['filename']}:\n{e['stack_trace']}" for e in errors)
                raise TimeoutError(
                    f"DAG {dag_id} was not parsed within {timeout_s:.0f} s; check that a file "
                    "in the DAG folder defines it and mentions both 'airflow' and 'dag' (the "
                    "dag-processor skips other files), and see the dag-processor log; import "
                    f"errors: {listed or 'none'}"
                )
            time.sleep(1.0)

    def pause(self, dag_id: str) -> None:
        self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": True})

    def unpause(self, dag_id: str) -> None:
        self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": False})

    def trigger(
        self,
        dag_id: str,
        logical_date: dt.datetime | None = None,
        conf: dict[str, Any] | None = None,
        run_id: str | None = None,
    ) -> str:
        """Create a manual run and return its run id.

        With ``logical_date=None`` the run has no logical date, and its tasks see only
        ``run_after`` (the trigger time). A second run with the same logical date returns
        HTTP 409, and a param that fails its schema returns HTTP 400; both raise AirflowApiError.
        """
        body: dict[str, Any] = {
            "logical_date": logical_date.isoformat() if logical_date else None,
            "conf": conf or {},
        }
        if run_id is not None:
            body["dag_run_id"] = run_id
        run = self.request("POST", f"/dags/{dag_id}/dagRuns", json=body)
        logger.info(
            "triggered %s run %s (logical date %s)", dag_id, run["dag_run_id"], logical_date
        )
        return run["dag_run_id"]

    def get_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def list_runs(self, dag_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """Return the DAG's latest runs, newest ``run_after`` first."""
        runs = self.request(
            "GET", f"/dags/{dag_id}/dagRuns", params={"order_by": "-run_after", "limit": limit}
        )
        return runs["dag_runs"]

    def wait_for_run(
        self,
        dag_id: str,
        run_id: str,
        timeout_s: float,
        poll_s: float = POLL_INTERVAL_S,
        check: Callable[[], None] | None = None,
    ) -> str:
        """Poll a run until it succeeds or fails, and return the final state.

        ``check`` is called before each poll, so a caller can stop waiting by raising, for
        example when a service of the stack has exited. Raises TimeoutError, listing each
        task's state, when the run has not finished after ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        last_state = None
        while True:
            if check is not None:
                check()
            state = self.get_run(dag_id, run_id)["state"]
            if state != last_state:
                logger.info("%s run %s is %s", dag_id, run_id, state)
                last_state = state
            if state in TERMINAL_RUN_STATES:
                return state
            if time.monotonic() > deadline:
                tasks = ", ".join(
                    f"{ti['task_id']}={ti['state']}" for ti in self.task_instances(dag_id, run_id)
                )
                raise TimeoutError(
                    f"{dag_id} run {run_id} is still {state} after {timeout_s:.0f} s; "
                    f"tasks: {tasks or 'none'}"
                )
            time.sleep(poll_s)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")[
            "task_instances"
        ]

    def xcom(self, dag_id: str, run_id: str, task_id: str, key: str = "return_value") -> Any:
        """Return the JSON value that a task pushed to XCom (its return value by default)."""
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"
        return self.request("GET", path)["value"]

    def task_log_events(
        self, dag_id: str, run_id: str, task_id: str, try_number: int = 1
    ) -> list[dict[str, Any] | str]:
        """Return a task try's log as the API's list of structured events.

        An event is a dict with ``timestamp``, ``level``, ``event`` (the message) and, on an
        exception, ``error_detail``. A log that the API returns as plain text comes back as a
        list of lines.
        """
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}"
        body = self.request("GET", path, params={"full_content": "true"})
        content = body.get("content", [])
        if isinstance(content, str):
            return content.splitlines()
        return content

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        """Return a task try's log as text: one line per event, plus the traceback of errors."""
        events = self.task_log_events(dag_id, run_id, task_id, try_number)
        return "\n".join(format_log_event(event) for event in events)


def format_log_event(event: dict[str, Any] | str, max_frames: int = MAX_TRACEBACK_FRAMES) -> str:
    """Format one task log event as ``timestamp level message``, with its exception if any.

    Airflow 3 stores the exception of an event in ``error_detail``, structlog's list of
    exception dicts (``exc_type``, ``exc_value``, ``exc_notes``, ``frames``, ``is_cause``),
    raised exception first and its causes after it. They are printed in Python's traceback
    order, each with its last ``max_frames`` frames, so the raised exception comes last.
    """
    if isinstance(event, str):
        return event
    parts = [event.get("timestamp", ""), event.get("level", ""), str(event.get("event", ""))]
    line = " ".join(str(part) for part in parts if part)
    details = event.get("error_detail")
    if not isinstance(details, list) or not details:
        return line
    return "\n".join([line, *_format_exception_chain(details, max_frames, indent="  ")])


def _format_exception_chain(
    details: list[dict[str, Any]], max_frames: int, indent: str
) -> list[str]:
    lines: list[str] = []
    # details[i + 1] is the __cause__ (is_cause) or __context__ of details[i].
    for index in reversed(range(len(details))):
        lines += _format_exception(details[index], max_frames, indent)
        if index > 0:
            link = CAUSE_LINK if details[index].get("is_cause") else CONTEXT_LINK
            lines += ["", indent + link, ""]
    return lines


def _format_exception(detail: dict[str, Any], max_frames: int, indent: str) -> list[str]:
    frames = detail.get("frames") or []
    shown = frames[-max_frames:] if max_frames > 0 else []
    lines = []
    if len(shown) < len(frames):
        lines.append(f"{indent}Traceback (last {len(shown)} of {len(frames)} frames):")
    elif frames:
        lines.append(f"{indent}Traceback:")
    for frame in shown:
        if (frame.get("lineno") or 0) < 0:
            # structlog replaces the middle of a long traceback with one frame like this.
            lines.append(f"{indent}  ... {frame.get('name', '')}")
            continue
        lines.append(
            f'{indent}  File "{frame.get("filename")}", line {frame.get("lineno")}, '
            f"in {frame.get('name')}"
        )
    lines.append(f"{indent}{detail.get('exc_type', 'Exception')}: {detail.get('exc_value', '')}")
    lines += [f"{indent}{note}" for note in detail.get("exc_notes") or []]
    for group in detail.get("exceptions") or []:
        # A member of an exception group is its own chain, one list of exception dicts.
        lines += _format_exception_chain(group, max_frames, indent + "  | ")
    return lines


def _file_stem(filename: str) -> str:
    return filename.rsplit("/", 1)[-1].removesuffix(".py")


def _detail(response: httpx.Response) -> Any:
    try:
        return response.json().get("detail", response.text)
    except ValueError:
        return response.text
