"""Tests of how the Airflow client formats task log events, on a recorded Airflow 3.3.2 event."""

from __future__ import annotations

from typing import Any

from local_stack.client import CAUSE_LINK, CONTEXT_LINK, format_log_event

SITE = "/venv/lib/python3.11/site-packages/airflow"


def frame(filename: str, lineno: int, name: str) -> dict[str, Any]:
    return {"filename": filename, "lineno": lineno, "name": name}


def exception(exc_type: str, exc_value: str, frames: list, **fields: Any) -> dict[str, Any]:
    detail = {
        "exc_type": exc_type,
        "exc_value": exc_value,
        "exc_notes": [],
        "syntax_error": None,
        "is_cause": False,
        "frames": frames,
        "is_group": False,
        "exceptions": [],
    }
    detail.update(fields)
    return detail


# The event that Airflow 3.3.2 (task-sdk 1.3.2) logged for a task that ran
# `raise RuntimeError("wrapped") from err` on a failed import, with shortened paths.
FAILED_TASK_EVENT = {
    "timestamp": "2026-12-04T04:54:46.768570Z",
    "event": "Task failed with exception",
    "level": "error",
    "logger": "task",
    "filename": "task_runner.py",
    "lineno": 1676,
    "error_detail": [
        exception(
            "RuntimeError",
            "wrapped",
            [
                frame(
                    f"{SITE}/sdk/execution_time/task_runner.py", 1579, "_run_task_and_map_outcome"
                ),
                frame(f"{SITE}/sdk/execution_time/task_runner.py", 197, "wrapper"),
                frame(f"{SITE}/sdk/execution_time/task_runner.py", 2234, "_execute_task"),
                frame(f"{SITE}/sdk/execution_time/task_runner.py", 197, "wrapper"),
                frame(f"{SITE}/sdk/execution_time/task_runner.py", 2192, "_run_execute_callable"),
                frame(f"{SITE}/sdk/bases/operator.py", 462, "wrapper"),
                frame(f"{SITE}/sdk/bases/decorator.py", 435, "execute"),
                frame(f"{SITE}/sdk/bases/operator.py", 462, "wrapper"),
                frame(f"{SITE}/providers/standard/operators/python.py", 231, "execute"),
                frame(f"{SITE}/providers/standard/operators/python.py", 254, "execute_callable"),
                frame(f"{SITE}/sdk/execution_time/callback_runner.py", 97, "run"),
                frame("/dags/stack_failing.py", 13, "import_missing"),
            ],
        ),
        exception(
            "ModuleNotFoundError",
            "No module named 'ml_loop.no_such_module'",
            [frame("/dags/stack_failing.py", 11, "import_missing")],
            is_cause=True,
        ),
    ],
}


def test_event_shows_exception_chain() -> None:
    text = format_log_event(FAILED_TASK_EVENT)
    lines = text.splitlines()
    assert lines[0] == "2026-12-04T04:54:46.768570Z error Task failed with exception"
    assert "  ModuleNotFoundError: No module named 'ml_loop.no_such_module'" in lines
    assert "  RuntimeError: wrapped" in lines
    assert f"  {CAUSE_LINK}" in lines
    assert lines.index(f"  {CAUSE_LINK}") < lines.index("  RuntimeError: wrapped")
    assert lines[-1] == "  RuntimeError: wrapped"


def test_event_shows_last_frames() -> None:
    lines = format_log_event(FAILED_TASK_EVENT, max_frames=2).splitlines()
    assert "  Traceback (last 2 of 12 frames):" in lines
    assert '    File "/dags/stack_failing.py", line 13, in import_missing' in lines
    assert f'    File "{SITE}/sdk/execution_time/callback_runner.py", line 97, in run' in lines
    assert not any("_run_task_and_map_outcome" in line for line in lines)
    assert "  Traceback:" in lines
    assert '    File "/dags/stack_failing.py", line 11, in import_missing' in lines


def test_event_shows_context_notes_and_groups() -> None:
    inner = exception(
        "KeyError",
        "'epochs'",
        [frame("/dags/a.py", 3, "read")],
        exc_notes=["while reading the run conf"],
    )
    group = exception(
        "ExceptionGroup",
        "2 tasks failed (2 sub-exceptions)",
        [frame("/dags/a.py", 9, "run_all")],
        is_group=True,
        exceptions=[[inner], [exception("ValueError", "bad", [])]],
    )
    event = {
        "event": "Task failed with exception",
        "level": "error",
        "error_detail": [group, exception("OSError", "disk full", [])],
    }
    lines = format_log_event(event).splitlines()
    assert f"  {CONTEXT_LINK}" in lines
    assert "  OSError: disk full" in lines
    assert "  ExceptionGroup: 2 tasks failed (2 sub-exceptions)" in lines
    assert "    | KeyError: 'epochs'" in lines
    assert "    | while reading the run conf" in lines
    assert "    | ValueError: bad" in lines
    assert lines[1] == "  OSError: disk full"


def test_event_marks_skipped_frames() -> None:
    skipped = frame("", -1, "Skipped frames: 40")
    event = {
        "event": "failed",
        "error_detail": [
            exception("RecursionError", "too deep", [skipped, frame("/a.py", 1, "f")])
        ],
    }
    assert "    ... Skipped frames: 40" in format_log_event(event).splitlines()


def test_event_without_exception_is_one_line() -> None:
    event = {"timestamp": "2026-12-04T04:54:46Z", "level": "info", "event": "Filling up the DagBag"}
    assert format_log_event(event) == "2026-12-04T04:54:46Z info Filling up the DagBag"
    assert format_log_event({"event": "x", "error_detail": []}) == "x"
    assert format_log_event("plain text line") == "plain text line"
