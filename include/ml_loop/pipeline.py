"""The loop's steps as plain functions over small JSON references, in the order the DAG runs them.

Each ``*_step`` function takes and returns only references (URIs, content hashes, counts, ids),
which is what Airflow passes between tasks by XCom. The DAG factory calls one step per task, and
``run_pipeline`` calls them back to back in one process, which the benchmarks use as the
orchestration-free baseline.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from pathlib import Path
from typing import Any

from ml_loop.spec import PipelineSpec, RunConfig

logger = logging.getLogger(__name__)

Ref = dict[str, Any]


def ingest_step(spec: PipelineSpec, run_date: dt.date, config: RunConfig, root: Path) -> Ref:
    from ml_loop.ingest import ingest_window

    partitions = ingest_window(spec, run_date, config.training_window_days, root)
    return {
        "run_date": run_date.isoformat(),
        "partitions": [partition.to_dict() for partition in partitions],
    }


def validate_step(spec: PipelineSpec, ingested: Ref, root: Path) -> Ref:
    from ml_loop.validate import validate_window

    run_date = dt.date.fromisoformat(ingested["run_date"])
    validated = validate_window(spec, ingested["partitions"], run_date, root)
    return {"run_date": ingested["run_date"], "partitions": [ref.to_dict() for ref in validated]}


def process_step(spec: PipelineSpec, validated: Ref, root: Path) -> Ref:
    from ml_loop.process import process_window

    return process_window(spec, validated["partitions"], root).to_dict()


def store_step(spec: PipelineSpec, processed: Ref, validated: Ref, root: Path) -> Ref:
    from ml_loop.store import store_snapshot

    return store_snapshot(spec, processed, validated["partitions"], root).to_dict()


def train_step(
    spec: PipelineSpec,
    snapshot: Ref,
    config: RunConfig,
    root: Path,
    run_tags: dict[str, str] | None = None,
) -> Ref:
    from ml_loop.train import train_model

    return train_model(spec, snapshot["uri"], config, root=root, run_tags=run_tags).to_dict()


def evaluate_step(spec: PipelineSpec, snapshot: Ref, trained: Ref) -> Ref:
    from ml_loop.evaluate import evaluate_candidate

    return evaluate_candidate(spec, snapshot["uri"], trained).to_dict()


def uses_canary(spec: PipelineSpec, evaluation: Ref, config: RunConfig) -> bool:
    """Return True when a candidate that passed the gate goes through a canary first.

    That needs ``deploy.canary_share`` above 0 and a champion to compare with; a forced
    promotion skips the canary.
    """
    return (
        spec.deploy.canary_share > 0
        and bool(evaluation.get("passed"))
        and evaluation.get("champion_version") is not None
        and not config.force_promote
    )


def register_step(
    spec: PipelineSpec,
    snapshot: Ref,
    trained: Ref,
    evaluation: Ref,
    config: RunConfig,
    tags: dict[str, str] | None = None,
) -> Ref:
    """Register the candidate; promote it now unless it goes through a canary first."""
    from ml_loop.registry import DATA_WINDOW_END_TAG, register_candidate

    manifest = json.loads(Path(snapshot["manifest_uri"]).read_text())
    version_tags = {
        "ml_loop.snapshot_version": snapshot["version_id"],
        DATA_WINDOW_END_TAG: manifest["window"]["end"],
        **(tags or {}),
    }
    registration = register_candidate(
        spec.model_name,
        trained,
        evaluation,
        force_promote=config.force_promote,
        promote_on_pass=not uses_canary(spec, evaluation, config),
        tags=version_tags,
    )
    return registration.to_dict()


def deploy_step(
    spec: PipelineSpec,
    registration: Ref,
    evaluation: Ref,
    snapshot: Ref,
    serving_url: str,
    serving_token: str | None = None,
) -> Ref:
    """Serve a promoted candidate, or run the canary of a candidate that is still ``challenger``."""
    from ml_loop.deploy import canary_deploy, deploy_champion

    if not registration["promoted"]:
        return canary_deploy(
            serving_url,
            registration,
            spec.deploy.canary_share,
            spec.deploy.canary_min_requests,
            spec.deploy.canary_max_error_rate_increase,
            timeout_s=spec.deploy.canary_timeout_s,
            token=serving_token,
        )
    return deploy_champion(
        serving_url,
        registration,
        evaluation["smoke_samples"],
        snapshot["uri"],
        token=serving_token,
    )


def run_pipeline(
    spec: PipelineSpec,
    run_date: dt.date,
    config: RunConfig,
    root: Path,
    serving_url: str | None = None,
) -> dict[str, Any]:
    """Run every step back to back in this process; return each step's output and wall time.

    Deploy runs only when ``serving_url`` is given and the gate promoted the candidate.
    """
    timings: dict[str, float] = {}
    outputs: dict[str, Ref] = {}

    def timed(name: str, func, *args) -> Ref:
        start = time.perf_counter()
        outputs[name] = func(*args)
        timings[name] = time.perf_counter() - start
        logger.info("step %s finished in %.2f s", name, timings[name])
        return outputs[name]

    ingested = timed("ingest", ingest_step, spec, run_date, config, root)
    validated = timed("validate", validate_step, spec, ingested, root)
    processed = timed("process", process_step, spec, validated, root)
    snapshot = timed("store", store_step, spec, processed, validated, root)
    trained = timed("train", train_step, spec, snapshot, config, root)
    evaluation = timed("evaluate", evaluate_step, spec, snapshot, trained)
    registration = timed("register", register_step, spec, snapshot, trained, evaluation, config)
    if serving_url and registration["promoted"]:
        timed("deploy", deploy_step, spec, registration, evaluation, snapshot, serving_url)
    return {"outputs": outputs, "timings_s": timings}
