"""The drift scenario end to end: ``python -m local_stack run --once --scenario drift``.

One real run of the command behind ``make run ONCE=1 SCENARIO=drift``, on free ports of
127.0.0.1 and a temporary state folder: the real scheduler, API server, MLflow server and model
server, the monitoring DAG triggered per scenario day, and one retrain started by the monitoring
DAG's asset event. The module's tests read the final JSON line and the state the run left.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import pytest

from local_stack.scenario import (
    MIN_TIME_BEFORE_MIDNIGHT_S,
    RECOVERY_TOLERANCE,
    SCENARIO_KEYS,
    STATE_SUBDIR,
)
from servers import REPO_ROOT, stack_environ

# Landing, two training runs and six scenario days; on 2 busy cores a training run can take
# several minutes.
SCENARIO_TIMEOUT_S = 2400

# The first test runs the scenario in its fixture, whichever test that is.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(SCENARIO_TIMEOUT_S + 120)]


def seconds_to_midnight() -> float:
    now = dt.datetime.now(dt.UTC)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    return (midnight - now).total_seconds()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run the scenario once; return its exit code, final JSON object and output."""
    if seconds_to_midnight() < MIN_TIME_BEFORE_MIDNIGHT_S:
        pytest.skip("the scenario must run within one UTC day; it is too close to midnight")
    state_dir = tmp_path_factory.mktemp("state")
    environ = stack_environ(
        ML_LOOP_STATE_DIR=str(state_dir),
        PYTHONPATH=f"{REPO_ROOT / 'include'}:{REPO_ROOT / 'plugins'}",
    )
    completed = subprocess.run(
        [sys.executable, "-m", "local_stack", "run", "--once", "--scenario", "drift"],
        cwd=REPO_ROOT,
        env=environ,
        capture_output=True,
        text=True,
        timeout=SCENARIO_TIMEOUT_S,
        check=False,
    )
    lines = completed.stdout.strip().splitlines()
    assert lines, f"no output; stderr ends with:\n{completed.stderr[-4000:]}"
    return {
        "code": completed.returncode,
        "result": json.loads(lines[-1]),
        "stdout": completed.stdout,
        "stderr": completed.stderr,
        "state_dir": state_dir / STATE_SUBDIR,
    }


def phase(scenario: dict, name: str) -> dict:
    return next(item for item in scenario["result"]["phases"] if item["name"] == name)


def test_scenario_exit_code(scenario: dict) -> None:
    assert scenario["code"] == 0, scenario["stderr"][-4000:]


def test_scenario_result_keys(scenario: dict) -> None:
    assert list(scenario["result"]) == list(SCENARIO_KEYS)


def test_scenario_retrain_succeeded(scenario: dict) -> None:
    result = scenario["result"]
    assert result["state"] == "success"
    assert result["dag_id"] == "train_digits"
    assert result["run_id"].startswith("asset_triggered__")


def test_scenario_no_drift_normal_days(scenario: dict) -> None:
    for name in ("normal-1", "normal-2"):
        assert phase(scenario, name)["drift_detected"] is False, name


def test_scenario_no_retrain_normal_days(scenario: dict) -> None:
    for name in ("normal-1", "normal-2"):
        assert phase(scenario, name)["retrain_requested"] is False, name


def test_scenario_drift_first_window(scenario: dict) -> None:
    assert scenario["result"]["drift_detected"] is True
    assert phase(scenario, "drift-1")["drift_detected"] is True


def test_scenario_early_request_held_by_age(scenario: dict) -> None:
    """drift-1 has no drifted labels yet, and the champion-age guardrail holds its request."""
    drift_1 = phase(scenario, "drift-1")
    assert drift_1["retrain_requested"] is False
    assert drift_1["decision"].startswith("skipped (champion_age)")


def test_scenario_one_retrain(scenario: dict) -> None:
    result = scenario["result"]
    assert result["retrain_triggered"] is True
    assert result["retrains"] == 1
    requested = [item["name"] for item in result["phases"] if item["retrain_requested"]]
    assert requested == ["drift-2"]


def test_scenario_guardrail_stops_second(scenario: dict) -> None:
    for name in ("after-1", "after-2"):
        after = phase(scenario, name)
        assert after["retrain_requested"] is False, name
        if after["drift_detected"]:
            assert after["decision"].startswith(("skipped (champion_age)", "skipped (cooldown)"))


def test_scenario_accuracy_drops(scenario: dict) -> None:
    result = scenario["result"]
    assert result["accuracy_during"] <= result["accuracy_before"] - 0.10


def test_scenario_accuracy_recovers(scenario: dict) -> None:
    result = scenario["result"]
    assert result["accuracy_after"] >= result["accuracy_before"] - RECOVERY_TOLERANCE


def test_scenario_after_days_on_new_champion(scenario: dict) -> None:
    result = scenario["result"]
    first = phase(scenario, "normal-1")["served_versions"]
    for name in ("after-1", "after-2"):
        assert phase(scenario, name)["served_versions"] == [result["model_version"]]
    assert first != [result["model_version"]]


def test_scenario_feedback_in_retrain(scenario: dict) -> None:
    """The retrain's snapshot contains drifted feedback rows, the ids of the drift-1 day."""
    import numpy as np

    data_dir = scenario["state_dir"] / "data"
    feedback = [
        path
        for path in (data_dir / "landing_feedback" / "digits").iterdir()
        if not path.name.startswith(".")
    ]
    assert len(feedback) == 1
    assert list(feedback[0].glob("*/drift-1-*.png"))
    snapshot_ids = []
    for snapshot in (data_dir / "snapshots" / "digits").iterdir():
        if snapshot.name.startswith("."):
            continue
        with np.load(snapshot / "data.npz") as arrays:
            snapshot_ids.append([str(item) for item in arrays["ids"]])
    assert len(snapshot_ids) == 2
    assert sum(any(i.startswith("drift-1-") for i in ids) for ids in snapshot_ids) == 1
    assert not any(i.startswith(("after-1-", "after-2-")) for ids in snapshot_ids for i in ids)


def test_scenario_checks_all_pass(scenario: dict) -> None:
    assert scenario["result"]["checks"] == dict.fromkeys(scenario["result"]["checks"], True)


def test_scenario_says_where_it_wrote(scenario: dict) -> None:
    assert scenario["result"]["state_dir"] == str(scenario["state_dir"])
    assert f"all state in {scenario['state_dir']}" in scenario["stdout"]


def test_scenario_state_in_own_folder(scenario: dict) -> None:
    parent = Path(scenario["state_dir"]).parent
    assert sorted(p.name for p in parent.iterdir()) == [STATE_SUBDIR]
