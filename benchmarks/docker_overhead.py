"""Measure what the docker train backend adds to a training job, against the local backend.

Both sides run the same job through ``TrainOperator.execute``: the digits CNN on one snapshot of
the real digits data (built by landing, ingest, validate, process and store), for ``EPOCHS``
epochs, tracked on the same MLflow server. The local side runs ``python -m ml_loop.train`` as a
subprocess of this process. The docker side runs it in a container from the training image,
with the data root bind-mounted and host networking. The two alternate (local first in even
repeats, docker first in odd ones), so both see the same machine load. The spec is a copy of
``digits.yaml`` with a fresh experiment name, and each job uses its own seed, so each has a new
train key and really trains.

Figures, in wall seconds of ``execute`` from call to return:

- ``local_s`` and ``docker_s``: one value per repeat, and their medians;
- ``overhead_s``: the median of the per-repeat differences docker minus local, with the goal
  ``goal_max_overhead_s`` (15 s: container start, imports from the image, container removal);
- ``ratio``: median docker over median local.

Usage: ``.venv/bin/python benchmarks/docker_overhead.py [--image TAG] [--tracking-uri URI]``.
The image defaults to ``$ML_LOOP_TRAIN_IMAGE`` (for example ``ml-loop-train:latest`` from ``make
train-image``), else to the test image that ``tests/containers.py`` builds from
``Dockerfile.train`` without pulling. Without a tracking URI the script starts the local
stack's MLflow server (``common.mlflow_server``) on a free 127.0.0.1 port in a temporary folder
and stops it at the end. It prints one JSON object, or exits with status 1 and the reason when
no Docker engine responds. ``make bench`` runs the same measurement through ``run.py`` (``--only
docker``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import common

REPEATS = 3
EPOCHS = 2
SEED_BASE = 2000
GOAL_MAX_OVERHEAD_S = 15.0
TRAIN_IMAGE_ENV = "ML_LOOP_TRAIN_IMAGE"
BACKENDS = ("local", "docker")

logger = logging.getLogger("benchmarks.docker_overhead")


class DockerUnavailableError(RuntimeError):
    """No Docker engine responds, or the training image cannot be built on this machine."""


def resolve_image() -> str:
    """Return the training image to run: ``$ML_LOOP_TRAIN_IMAGE``, else the local test image.

    The test image is built by ``tests/containers.py`` from ``Dockerfile.train`` without pulling
    (several minutes the first time, then reused while its inputs are unchanged). Raises
    DockerUnavailableError, with the reason and the way to fix it, when no engine responds or
    the base image cannot be made here.
    """
    if str(common.REPO_ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(common.REPO_ROOT / "tests"))
    import containers

    client, reason = containers.connect_engine()
    if client is None:
        raise DockerUnavailableError(reason)
    try:
        configured = os.environ.get(TRAIN_IMAGE_ENV)
        if configured:
            if not containers.image_exists(client, configured):
                raise DockerUnavailableError(
                    f"the image {configured} of ${TRAIN_IMAGE_ENV} is not on the Docker engine, "
                    "and nothing is pulled; build it with `make train-image` or unset "
                    f"{TRAIN_IMAGE_ENV} to build the test image"
                )
            return configured
        try:
            return containers.ensure_train_image(client, common.REPO_ROOT)
        except containers.PrerequisiteMissingError as err:
            raise DockerUnavailableError(str(err)) from err
    finally:
        client.close()


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


def write_spec(root: Path) -> Path:
    """Write a copy of the digits spec under ``root`` with a fresh experiment and model name.

    The copy lies under the data root, so the docker backend reads it through its bind mount.
    Its own experiment means that a tracking server used before contains no finished run of
    these train keys, which the trainer would return without training.
    """
    import yaml

    from ml_loop.spec import SPECS_DIR

    raw = yaml.safe_load((SPECS_DIR / "digits.yaml").read_text())
    name = f"digits-docker-overhead-{uuid.uuid4().hex[:8]}"
    raw.update(name=name, model_name=name)
    path = root / "specs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(workdir: Path, tracking_uri: str, image: str, repeats: int = REPEATS) -> dict[str, Any]:
    """Time the same job on the local and docker backends, alternated; return the figures.

    The environment variables that the operator reads (data root, tracking URI, image) are set
    for the measurement and restored afterwards.
    """
    root = (workdir / "data").resolve()
    root.mkdir(parents=True, exist_ok=True)
    load_at_start = common.load_average()
    settings = {
        "ML_LOOP_DATA_DIR": str(root),
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        TRAIN_IMAGE_ENV: image,
    }
    # Importing Airflow writes airflow.cfg into AIRFLOW_HOME; keep it out of the user's home.
    if "AIRFLOW_HOME" not in os.environ:
        settings["AIRFLOW_HOME"] = str(workdir.resolve() / "airflow")
    with common.environment(settings):
        from ml_loop.spec import load_spec
        from ml_loop_airflow.train_operator import TrainOperator

        spec_path = write_spec(root)
        snapshot = common.build_snapshot(load_spec(spec_path), root)
        operator = TrainOperator(task_id="train", spec=str(spec_path), snapshot=snapshot)
        seconds: dict[str, list[float]] = {backend: [] for backend in BACKENDS}
        for repeat in range(repeats):
            order = BACKENDS if repeat % 2 == 0 else tuple(reversed(BACKENDS))
            for offset, backend in enumerate(order):
                seed = SEED_BASE + 2 * repeat + offset
                seconds[backend].append(time_job(operator, backend, seed))

    differences = [d - lo for d, lo in zip(seconds["docker"], seconds["local"], strict=True)]
    median_local = statistics.median(seconds["local"])
    median_docker = statistics.median(seconds["docker"])
    overhead = statistics.median(differences)
    return {
        "benchmark": "docker_overhead",
        "machine": common.machine_description(),
        "load_average_at_start": load_at_start,
        "load_average_at_end": common.load_average(),
        "image": image,
        "snapshot_rows": snapshot["rows"],
        "epochs": EPOCHS,
        "repeats": repeats,
        "local_s": [round(value, 2) for value in seconds["local"]],
        "docker_s": [round(value, 2) for value in seconds["docker"]],
        "differences_s": [round(value, 2) for value in differences],
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
        help="training image tag (default: $ML_LOOP_TRAIN_IMAGE, else the test image that "
        "tests/containers.py builds locally)",
    )
    parser.add_argument("--tracking-uri", help="MLflow server (default: start one on 127.0.0.1)")
    parser.add_argument("--workdir", type=Path, help="folder for the data root (default: a temp)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="jobs per backend")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    try:
        image = args.image or resolve_image()
    except DockerUnavailableError as err:
        logger.error("%s", err)
        return 1

    # Airflow's loggers print to stdout, so they go to stderr here and stdout is the JSON alone.
    with (
        contextlib.redirect_stdout(sys.stderr),
        tempfile.TemporaryDirectory(prefix="ml-loop-docker-overhead-") as tmp,
    ):
        workdir = args.workdir or Path(tmp)
        if args.tracking_uri:
            figures = run(workdir, args.tracking_uri, image, args.repeats)
        else:
            with common.mlflow_server(Path(tmp) / "mlflow") as uri:
                figures = run(workdir, uri, image, args.repeats)
    print(json.dumps(figures, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
