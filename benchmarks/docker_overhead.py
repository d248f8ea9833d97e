"""Measure what the docker train backend adds to a training job, against the local backend.

Both sides run the same job through ``TrainOperator.execute``: the digits CNN on one snapshot of
the real digits data (built by landing, ingest, validate, process and store), for ``EPOCHS``
epochs, tracked on the same MLflow server. The local side runs ``python -m ml_loop.train`` as a
subprocess of this process. The docker side runs it in a container from the training image,
with the data root bind-mounted and host networking. The two alternate (local first in even
repeats, docker first in odd ones), so both see the same machine load. Each job uses its own
seed, so each has a new train key and really trains.

Figures, in wall seconds of ``execute`` from call to return:

- ``local_s`` and ``docker_s``: one value per repeat, and their medians;
- ``overhead_s``: the median of the per-repeat differences docker minus local, with the goal
  ``goal_max_overhead_s`` (15 s: container start, imports from the image, container removal);
- ``ratio``: median docker over median local.

Usage: ``.venv/bin/python benchmarks/docker_overhead.py [--image TAG] [--tracking-uri URI]``.
The image defaults to ``$ML_LOOP_TRAIN_IMAGE``, else ``ml-loop-train:latest`` (``make
train-image``). Without a tracking URI the script starts ``mlflow server`` on a free 127.0.0.1
port in a temporary folder and stops it at the end. It prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
for folder in ("include", "plugins"):
    if str(REPO_ROOT / folder) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / folder))

REPEATS = 3
EPOCHS = 2
SEED_BASE = 2000
GOAL_MAX_OVERHEAD_S = 15.0
DEFAULT_IMAGE = "ml-loop-train:latest"
BACKENDS = ("local", "docker")

logger = logging.getLogger("benchmarks.docker_overhead")


def machine_description() -> dict[str, Any]:
    from ml_loop.devices import cpu_model_name

    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu_model_name(),
        "cores": os.cpu_count(),
        "memory_gib": round(memory_gib, 1),
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "gpu": "none used (compute.gpus 0)",
    }


def build_snapshot(spec: Any, root: Path) -> dict[str, Any]:
    """Land the digits batches, run ingest to store, and return the SnapshotRef dict."""
    import datetime as dt

    from ml_loop.landing import land_days
    from ml_loop.pipeline import ingest_step, process_step, store_step, validate_step
    from ml_loop.spec import RunConfig

    run_date = dt.date(2026, 11, 5)
    config = RunConfig.from_params(spec, None)
    land_days(spec, run_date, spec.dataset.landing_days, root)
    ingested = ingest_step(spec, run_date, config, root)
    validated = validate_step(spec, ingested, root)
    processed = process_step(spec, validated, root)
    return store_step(spec, processed, validated, root)


def _context(backend: str, seed: int) -> dict[str, Any]:
    run_id = f"bench__{uuid.uuid4().hex[:12]}"
    ti = SimpleNamespace(
        dag_id="bench_docker_overhead",
        task_id="train",
        run_id=run_id,
        try_number=1,
        map_index=-1,
        xcom_push=lambda key, value: None,
    )
    return {
        "ti": ti,
        "run_id": run_id,
        "dag": SimpleNamespace(dag_id=ti.dag_id),
        "dag_run": SimpleNamespace(run_id=run_id, conf={}),
        "params": {"train_backend": backend, "epochs": EPOCHS, "seed": seed},
    }


def time_job(operator: Any, backend: str, seed: int) -> float:
    start = time.perf_counter()
    result = operator.execute(_context(backend, seed))
    elapsed = time.perf_counter() - start
    if result["resumed_from_epoch"] != 0:
        raise RuntimeError(
            f"the {backend} job with seed {seed} resumed from epoch "
            f"{result['resumed_from_epoch']}, so it did not train from scratch; use a new "
            "workdir"
        )
    logger.info("%s backend, seed %d: %.1f s (run %s)", backend, seed, elapsed, result["run_id"])
    return elapsed


def run(workdir: Path, tracking_uri: str, image: str) -> dict[str, Any]:
    """Time the same job on the local and docker backends, alternated; return the figures."""
    root = (workdir / "data").resolve()
    root.mkdir(parents=True, exist_ok=True)
    # Importing Airflow writes airflow.cfg into AIRFLOW_HOME; keep it out of the user's home.
    os.environ.setdefault("AIRFLOW_HOME", str(workdir.resolve() / "airflow"))

    from ml_loop.spec import load_spec
    from ml_loop_airflow.train_operator import TrainOperator

    os.environ["ML_LOOP_DATA_DIR"] = str(root)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ["ML_LOOP_TRAIN_IMAGE"] = image
    spec = load_spec("digits")
    snapshot = build_snapshot(spec, root)
    operator = TrainOperator(task_id="train", spec="digits", snapshot=snapshot)

    seconds: dict[str, list[float]] = {backend: [] for backend in BACKENDS}
    for repeat in range(REPEATS):
        order = BACKENDS if repeat % 2 == 0 else tuple(reversed(BACKENDS))
        for offset, backend in enumerate(order):
            seed = SEED_BASE + 2 * repeat + offset
            seconds[backend].append(time_job(operator, backend, seed))

    differences = [d - lo for d, lo in zip(seconds["docker"], seconds["local"], strict=True)]
    median_local = statistics.median(seconds["local"])
    median_docker = statistics.median(seconds["docker"])
    overhead = statistics.median(differences)
    return {
        "machine": machine_description(),
        "image": image,
        "snapshot_rows": snapshot["rows"],
        "epochs": EPOCHS,
        "repeats": REPEATS,
        "local_s": [round(value, 2) for value in seconds["local"]],
        "docker_s": [round(value, 2) for value in seconds["docker"]],
        "median_local_s": round(median_local, 2),
        "median_docker_s": round(median_docker, 2),
        "overhead_s": round(overhead, 2),
        "ratio": round(median_docker / median_local, 3),
        "goal_max_overhead_s": GOAL_MAX_OVERHEAD_S,
        "meets_goal": overhead <= GOAL_MAX_OVERHEAD_S,
        "note": (
            "wall time of TrainOperator.execute per job; overhead is the median of the "
            "per-repeat differences docker minus local, alternating which backend goes first"
        ),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument(
        "--image",
        default=os.environ.get("ML_LOOP_TRAIN_IMAGE") or DEFAULT_IMAGE,
        help="training image tag (default: $ML_LOOP_TRAIN_IMAGE, else ml-loop-train:latest)",
    )
    parser.add_argument("--tracking-uri", help="MLflow server (default: start one on 127.0.0.1)")
    parser.add_argument("--workdir", type=Path, help="folder for the data root (default: a temp)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    # Airflow's loggers print to stdout, so they go to stderr here and stdout is the JSON alone.
    with (
        contextlib.redirect_stdout(sys.stderr),
        tempfile.TemporaryDirectory(prefix="ml-loop-docker-overhead-") as tmp,
    ):
        workdir = args.workdir or Path(tmp)
        if args.tracking_uri:
            figures = run(workdir, args.tracking_uri, args.image)
        else:
            from trainer_throughput import mlflow_server

            mlflow_dir = Path(tmp) / "mlflow"
            mlflow_dir.mkdir()
            with mlflow_server(mlflow_dir) as uri:
                figures = run(workdir, uri, args.image)
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
