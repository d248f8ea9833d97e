"""Tests of the drift scenario's pieces: pools, days and windows, specs, labels, the result."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from local_stack.config import StackConfigError
from local_stack.main_job import RESULT_KEYS
from local_stack.scenario import (
    AFTER,
    DRIFTED,
    NORMAL,
    SCENARIO_KEYS,
    SPECS_DIR_ENV,
    STATE_SUBDIR,
    DayClock,
    LabelBook,
    PhaseOutcome,
    PoolSizes,
    ScenarioError,
    build_result,
    day_seconds,
    held_out_date,
    min_champion_age_s,
    monitoring_section,
    plan_phases,
    pooled_accuracy,
    scenario_checks,
    scenario_config,
    wait_for_logged,
    write_scenario_specs,
)
from servers import REPO_ROOT

TODAY = dt.date(2026, 12, 4)
LANDING_DAYS = 5
IDS = [f"mnist-{index:05d}" for index in range(5000)]
T0 = dt.datetime(2026, 12, 4, 10, 0, tzinfo=dt.UTC)


def cohort_of(record_id: str) -> int:
    from ml_loop.landing import cohort_for_id

    return cohort_for_id(record_id, LANDING_DAYS)


@pytest.fixture(scope="module")
def phases():
    return plan_phases(IDS, TODAY, LANDING_DAYS)


def test_held_out_date_is_window_start() -> None:
    assert held_out_date(TODAY) == dt.date(2026, 11, 30)


def test_plan_names_and_kinds(phases) -> None:
    assert [phase.name for phase in phases] == [
        "normal-1",
        "normal-2",
        "drift-1",
        "drift-2",
        "after-1",
        "after-2",
    ]
    assert [phase.kind for phase in phases] == [NORMAL, NORMAL, DRIFTED, DRIFTED, AFTER, AFTER]


def test_plan_measures_held_out_cohort_only(phases) -> None:
    from ml_loop.landing import cohort_for_date

    held = cohort_for_date(held_out_date(TODAY), LANDING_DAYS)
    measured = [i for phase in phases for i in phase.measured]
    assert {cohort_of(IDS[i]) for i in measured} == {held}


def test_plan_unmeasured_are_landed(phases) -> None:
    from ml_loop.landing import cohort_for_date

    held = cohort_for_date(held_out_date(TODAY), LANDING_DAYS)
    unmeasured = [i for phase in phases for i in phase.unmeasured]
    assert len(unmeasured) == sum(PoolSizes().drifted_landed)
    assert held not in {cohort_of(IDS[i]) for i in unmeasured}


def test_plan_pools_disjoint(phases) -> None:
    positions = [i for phase in phases for i in phase.positions]
    assert len(positions) == len(set(positions))


def test_plan_uses_every_held_out_record(phases) -> None:
    from ml_loop.landing import cohort_for_date

    held = cohort_for_date(held_out_date(TODAY), LANDING_DAYS)
    expected = {i for i, record_id in enumerate(IDS) if cohort_of(record_id) == held}
    assert {i for phase in phases for i in phase.measured} == expected


def test_plan_sizes(phases) -> None:
    sizes = {phase.name: (len(phase.measured), len(phase.unmeasured)) for phase in phases}
    assert sizes["normal-1"] == (200, 0)
    assert sizes["drift-1"] == (150, 1900)
    assert sizes["drift-2"] == (100, 200)
    assert sizes["after-1"][0] >= 100
    assert abs(sizes["after-1"][0] - sizes["after-2"][0]) <= 1


def test_plan_pools_mix_classes(phases) -> None:
    """The source is sorted by label, so a pool cut in source order would contain few classes."""
    from ml_loop.datasets import load_source
    from ml_loop.spec import load_spec

    labels = load_source(load_spec("digits")).labels
    for phase in phases:
        assert len({labels[i] for i in phase.measured}) == 10, phase.name


def test_plan_same_for_same_day() -> None:
    assert plan_phases(IDS, TODAY, LANDING_DAYS) == plan_phases(IDS, TODAY, LANDING_DAYS)


def test_plan_other_day_other_cohort(phases) -> None:
    other = plan_phases(IDS, TODAY + dt.timedelta(days=1), LANDING_DAYS)
    assert set(other[0].measured).isdisjoint(phases[0].measured)


def test_plan_too_few_held_out() -> None:
    with pytest.raises(ScenarioError, match="records are held out"):
        plan_phases(IDS[:500], TODAY, LANDING_DAYS)


def test_plan_too_few_landed() -> None:
    sizes = PoolSizes(normal=(1, 1), drifted_held_out=(1, 1), drifted_landed=(5000, 1), min_after=2)
    with pytest.raises(ScenarioError, match="records are landed"):
        plan_phases(IDS, TODAY, LANDING_DAYS, sizes)


def test_request_id_names_day(phases) -> None:
    assert phases[2].request_id("mnist-00001") == "drift-1-mnist-00001"


def test_request_ids_are_safe_file_names(phases) -> None:
    from ml_loop.feedback import SAFE_ID

    for phase in phases:
        assert SAFE_ID.fullmatch(phase.request_id(IDS[phase.positions[0]]))


def test_champion_age_after_drift_days() -> None:
    """drift-1 ends after 3 days and drift-2 after 4: the guardrail lifts between the two."""
    assert min_champion_age_s(45.0) > 4 * 45.0
    assert min_champion_age_s(45.0) < 5 * 45.0


def test_clock_windows_adjacent() -> None:
    clock = DayClock(T0, 60.0)
    assert clock.window(0) == (T0, T0 + dt.timedelta(seconds=60))
    assert clock.window(3)[0] == clock.window(2)[1]


def test_clock_first_day_from_rounds_up() -> None:
    clock = DayClock(T0, 60.0)
    assert clock.first_day_from(T0 + dt.timedelta(seconds=61)) == 2
    assert clock.first_day_from(T0 + dt.timedelta(seconds=120)) == 2
    assert clock.first_day_from(T0 - dt.timedelta(seconds=5)) == 0


def test_monitoring_windows_cover_one_day() -> None:
    """With the scenario's section, the monitor's windows are the day and the day before."""
    from ml_loop.monitor import monitoring_windows
    from ml_loop.spec import load_spec

    clock = DayClock(T0, 45.0)
    base = load_spec("digits").monitoring
    section = monitoring_section({}, clock.day_s)
    monitoring = dataclasses.replace(
        base,
        window_hours=section["window_hours"],
        label_delay_hours=section["label_delay_hours"],
    )
    start, end, labelled_start, labelled_end = monitoring_windows(monitoring, clock.window(3)[1])
    assert (start, end) == clock.window(3)
    assert abs((labelled_start - clock.window(2)[0]).total_seconds()) < 1e-3
    assert abs((labelled_end - clock.window(2)[1]).total_seconds()) < 1e-3


def test_monitoring_section_values() -> None:
    base = yaml.safe_load((REPO_ROOT / "include" / "specs" / "digits.yaml").read_text())
    section = monitoring_section(base["monitoring"], 60.0)
    assert section["schedule"] is None
    assert section["window_hours"] == pytest.approx(60 / 3600)
    assert section["label_delay_hours"] == pytest.approx(60 / 3600)
    assert section["thresholds"] == base["monitoring"]["thresholds"]
    assert section["guardrails"]["cooldown_hours"] == 1.0
    assert section["guardrails"]["min_champion_age_hours"] == pytest.approx(255 / 3600)
    assert section["guardrails"]["max_retrains_per_day"] == 2


def test_monitoring_section_leaves_base() -> None:
    base = {"guardrails": {"cooldown_hours": 12}}
    monitoring_section(base, 60.0)
    assert base == {"guardrails": {"cooldown_hours": 12}}


def test_specs_written_for_every_spec(tmp_path: Path) -> None:
    path = write_scenario_specs(REPO_ROOT / "include" / "specs", tmp_path, 60.0)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in (REPO_ROOT / "include" / "specs").glob("*.yaml"))
    assert path == tmp_path / "digits.yaml"


def test_specs_change_only_monitoring(tmp_path: Path) -> None:
    write_scenario_specs(REPO_ROOT / "include" / "specs", tmp_path, 60.0)
    original = yaml.safe_load((REPO_ROOT / "include" / "specs" / "digits.yaml").read_text())
    copy = yaml.safe_load((tmp_path / "digits.yaml").read_text())
    assert copy["monitoring"]["window_hours"] == pytest.approx(60 / 3600)
    original.pop("monitoring")
    copy.pop("monitoring")
    assert copy == original
    other = REPO_ROOT / "include" / "specs" / "breast_cancer.yaml"
    assert (tmp_path / "breast_cancer.yaml").read_text() == other.read_text()


def test_scenario_spec_loads_same_digest(tmp_path: Path) -> None:
    """The train key leaves monitoring out, so the scenario's spec trains the same model."""
    from ml_loop.spec import load_spec

    path = write_scenario_specs(REPO_ROOT / "include" / "specs", tmp_path, 60.0)
    spec = load_spec(path)
    assert spec.monitoring.window_hours == pytest.approx(60 / 3600)
    assert spec.monitoring.schedule is None
    assert spec.digest() == load_spec("digits").digest()


def test_config_own_state_folder(tmp_path: Path) -> None:
    config = scenario_config(REPO_ROOT, environ={"ML_LOOP_STATE_DIR": str(tmp_path)})
    assert config.state_dir == tmp_path / STATE_SUBDIR
    assert config.base_environ[SPECS_DIR_ENV] == str(tmp_path / STATE_SUBDIR / "specs")


def test_day_seconds_default() -> None:
    assert day_seconds({}) == 45.0


def test_day_seconds_from_env() -> None:
    assert day_seconds({"ML_LOOP_SCENARIO_DAY_S": "45"}) == 45.0


@pytest.mark.parametrize("raw", ["soon", "29"])
def test_day_seconds_invalid(raw: str) -> None:
    with pytest.raises(StackConfigError, match="ML_LOOP_SCENARIO_DAY_S"):
        day_seconds({"ML_LOOP_SCENARIO_DAY_S": raw})


def test_labels_merge_per_date(tmp_path: Path) -> None:
    from ml_loop.monitor import read_labels
    from ml_loop.spec import load_spec

    book = LabelBook(tmp_path, "digits")
    book.add(TODAY, {"normal-1-a": "3"})
    path = book.add(TODAY, {"normal-2-b": "7"})
    assert path == tmp_path / "feedback" / "digits" / "2026-12-04" / "labels.csv"
    labels = read_labels(load_spec("digits"), [TODAY], tmp_path)
    assert labels == {"normal-1-a": "3", "normal-2-b": "7"}


def test_labels_other_date_other_file(tmp_path: Path) -> None:
    book = LabelBook(tmp_path, "digits")
    book.add(TODAY, {"a": "1"})
    book.add(TODAY + dt.timedelta(days=1), {"b": "2"})
    text = (tmp_path / "feedback" / "digits" / "2026-12-04" / "labels.csv").read_text()
    assert text == "id,label\na,1\n"


def log_predictions(log_dir: Path, ids: list[str]) -> None:
    from ml_loop.prediction_log import PredictionBatch, PredictionLogWriter

    now = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
    records = [
        {
            "id": record_id,
            "request_id": "r1",
            "row": row,
            "time": now,
            "model_name": "digits-cnn",
            "model_version": "1",
            "variant": "champion",
            "prediction": "3",
            "confidence": 0.9,
            "probabilities": [0.1] * 10,
            "inputs": None,
            "input_ref": None,
        }
        for row, record_id in enumerate(ids)
    ]
    with PredictionLogWriter(log_dir, "digits-cnn") as writer:
        writer.submit(PredictionBatch(records, np.zeros((len(ids), 1, 28, 28), np.float32)))


def test_wait_for_logged_finds_ids(tmp_path: Path) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    log_predictions(tmp_path, ["a", "b"])
    wait_for_logged(tmp_path, "digits-cnn", ["a", "b"], start, timeout_s=5)


def test_wait_for_logged_missing_id(tmp_path: Path) -> None:
    start = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    log_predictions(tmp_path, ["a"])
    with pytest.raises(ScenarioError, match="1 of 2 predictions, for example b"):
        wait_for_logged(tmp_path, "digits-cnn", ["a", "b"], start, timeout_s=1)


def outcome(name: str, kind: str, measured: int, correct: int, **found) -> PhaseOutcome:
    defaults = {"drift_detected": kind != NORMAL, "retrain_requested": False}
    return PhaseOutcome(
        name=name,
        kind=kind,
        day=0,
        window_start=T0.isoformat(),
        window_end=T0.isoformat(),
        predictions=measured,
        measured=measured,
        correct=correct,
        **{**defaults, **found},
    )


def good_outcomes() -> list[PhaseOutcome]:
    return [
        outcome("normal-1", NORMAL, 200, 192),
        outcome("normal-2", NORMAL, 200, 190),
        outcome("drift-1", DRIFTED, 150, 105),
        outcome("drift-2", DRIFTED, 100, 72, retrain_requested=True),
        outcome("after-1", AFTER, 172, 164),
        outcome("after-2", AFTER, 172, 163),
    ]


def base_result() -> dict:
    return {key: None for key in RESULT_KEYS} | {"state": "success", "dag_id": "train_digits"}


def test_pooled_accuracy_weights_by_rows() -> None:
    outcomes = good_outcomes()
    assert pooled_accuracy(outcomes, NORMAL) == pytest.approx(382 / 400)
    assert pooled_accuracy(outcomes, DRIFTED) == pytest.approx(177 / 250)


def test_pooled_accuracy_no_rows() -> None:
    assert pooled_accuracy([outcome("normal-1", NORMAL, 0, 0)], NORMAL) is None


def test_result_has_every_key(tmp_path: Path) -> None:
    result = build_result(base_result(), good_outcomes(), 1, tmp_path)
    assert list(result) == list(SCENARIO_KEYS)
    assert set(RESULT_KEYS) < set(result)
    json.dumps(result)


def test_result_values(tmp_path: Path) -> None:
    result = build_result(base_result(), good_outcomes(), 1, tmp_path)
    assert result["state"] == "success"
    assert result["drift_detected"] is True
    assert result["retrain_triggered"] is True
    assert result["retrains"] == 1
    assert result["accuracy_before"] == pytest.approx(0.955)
    assert result["accuracy_during"] == pytest.approx(0.708)
    assert result["accuracy_after"] == pytest.approx(0.9506, abs=1e-4)
    assert result["phases"][0]["accuracy"] == pytest.approx(0.96)
    assert result["state_dir"] == str(tmp_path)


def test_checks_pass(tmp_path: Path) -> None:
    checks = build_result(base_result(), good_outcomes(), 1, tmp_path)["checks"]
    assert checks == {
        "no_retrain_on_normal_days": True,
        "no_drift_on_normal_days": True,
        "drift_in_first_drifted_window": True,
        "accuracy_dropped": True,
        "one_retrain": True,
        "recovered": True,
    }


def test_check_retrain_on_normal_day(tmp_path: Path) -> None:
    outcomes = good_outcomes()
    outcomes[1].retrain_requested = True
    checks = build_result(base_result(), outcomes, 2, tmp_path)["checks"]
    assert checks["no_retrain_on_normal_days"] is False
    assert checks["one_retrain"] is False


def test_check_drift_found_late(tmp_path: Path) -> None:
    outcomes = good_outcomes()
    outcomes[2].drift_detected = False
    result = build_result(base_result(), outcomes, 1, tmp_path)
    assert result["drift_detected"] is False
    assert result["checks"]["drift_in_first_drifted_window"] is False


def test_check_not_recovered(tmp_path: Path) -> None:
    outcomes = good_outcomes()
    outcomes[4].correct = 150
    outcomes[5].correct = 150
    checks = build_result(base_result(), outcomes, 1, tmp_path)["checks"]
    assert checks["recovered"] is False


def test_check_retrain_count_from_airflow(tmp_path: Path) -> None:
    """One requested decision but two asset-triggered training runs is not one retrain."""
    checks = build_result(base_result(), good_outcomes(), 2, tmp_path)["checks"]
    assert checks["one_retrain"] is False


def test_check_small_drop(tmp_path: Path) -> None:
    outcomes = good_outcomes()
    outcomes[2].correct = 140
    outcomes[3].correct = 95
    checks = scenario_checks(build_result(base_result(), outcomes, 1, tmp_path))
    assert checks["accuracy_dropped"] is False


def test_result_before_any_day(tmp_path: Path) -> None:
    result = build_result(base_result() | {"state": "error"}, [], 0, tmp_path)
    assert result["accuracy_before"] is None
    assert result["drift_detected"] is False
    assert result["retrain_triggered"] is False
    assert result["checks"]["recovered"] is False
    assert result["checks"]["one_retrain"] is False


def test_cli_rejects_unknown_scenario(tmp_path: Path) -> None:
    from local_stack.__main__ import main

    with pytest.raises(SystemExit) as error:
        main(["run", "--once", "--scenario", "flood"])
    assert error.value.code == 2
