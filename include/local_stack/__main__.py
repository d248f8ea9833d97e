"""Command line of the local stack: ``python -m local_stack run [--once] [--scenario drift]``
and ``python -m local_stack airflow ARGS...``."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from local_stack.config import StackConfig, StackConfigError
from local_stack.main_job import run_main_job
from local_stack.scenario import SCENARIO_NAME, day_seconds, run_drift_scenario, scenario_config
from local_stack.stack import LocalStack
from local_stack.supervisor import StackError

REPO_ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m local_stack",
        description=(
            "Run Airflow, MLflow and the model servers on 127.0.0.1 with all state in "
            "ML_LOOP_STATE_DIR (default .stack). Service logs go to <state>/logs/."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="start the stack, land the data, train the digits model once and report",
        description=(
            "Start the stack, land the data, run the DAG train_digits through the scheduler and "
            "print the URLs, the login, the champion model and a curl for a prediction. "
            "Everything stays up until Ctrl-C."
        ),
    )
    run.add_argument(
        "--once",
        action="store_true",
        help="stop everything after the run; exit 0 only if the run succeeded",
    )
    run.add_argument(
        "--scenario",
        choices=[SCENARIO_NAME],
        default=None,
        help="run a scenario instead of the main job: 'drift' plays normal traffic, then "
        "images from a new scanner, through monitoring and one retrain, in its own state "
        "folder <state>/scenario-drift",
    )
    run.add_argument(
        "--dags-folder",
        type=Path,
        default=None,
        help="folder of DAG files to load instead of the repository's dags/",
    )
    airflow = commands.add_parser(
        "airflow",
        help="run the airflow CLI against this stack's home, database and secrets",
        description=(
            "Run `airflow ARGS...` with the environment of the stack's services, for example "
            "`python -m local_stack airflow backfill create --dag-id train_digits ...`. The "
            "stack must have been started once, so that its database and secrets exist."
        ),
    )
    airflow.add_argument("airflow_args", nargs=argparse.REMAINDER, help="arguments for airflow")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.command == "airflow":
        return run_airflow_cli(args.airflow_args)
    try:
        if args.scenario == SCENARIO_NAME:
            config = scenario_config(REPO_ROOT, dags_folder=args.dags_folder)
            day_s = day_seconds()
        else:
            config = StackConfig.from_env(REPO_ROOT, dags_folder=args.dags_folder)
        stack = LocalStack(config)
    except (StackConfigError, StackError) as err:
        logging.getLogger("local_stack").error("%s", err)
        return 2
    try:
        if args.scenario == SCENARIO_NAME:
            return run_drift_scenario(stack, once=args.once, day_s=day_s)
        return run_main_job(stack, once=args.once)
    except KeyboardInterrupt:
        return 130


def run_airflow_cli(airflow_args: list[str]) -> int:
    """Run the airflow CLI with the stack's environment; return its exit code."""
    try:
        env = StackConfig.from_env(REPO_ROOT).env
    except StackConfigError as err:
        logging.getLogger("local_stack").error("%s", err)
        return 2
    airflow = os.path.join(os.path.dirname(sys.executable), "airflow")
    return subprocess.run([airflow, *airflow_args], env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
