"""Tests of benchmarks/run.py: figure groups, the results merge and the figure records."""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

import pytest

import containers
import run

DOCKER_RESULT = {
    "median_docker_s": 40.0,
    "median_local_s": 30.0,
    "ratio": 1.333,
    "overhead_s": 9.5,
    "docker_s": [40.0, 41.0, 39.0],
    "local_s": [30.0, 31.0, 29.5],
    "goal_max_overhead_s": 15.0,
    "repeats": 3,
    "epochs": 2,
    "snapshot_rows": 5000,
    "image": "ml-loop-test/train:0123",
    "load_average_at_start": [1.0, 1.0, 1.0],
    "load_average_at_end": [2.0, 1.5, 1.0],
}

TRAINER_RESULT = {
    "epoch_loop": {
        "trainer_samples_per_s": 2100.0,
        "plain_samples_per_s": 2300.0,
        "ratio": 0.91,
        "pair_ratios": [0.9, 0.91, 0.92],
        "cpu_time_ratio": 0.93,
    },
    "end_to_end": {"trainer_samples_per_s": 1800.0, "plain_samples_per_s": 2200.0, "ratio": 0.818},
    "setup": {"repeats": 3, "epochs": 3, "train_rows": 3792, "batch_size": 64},
    "load_average_at_start": [1.0, 1.0, 1.0],
    "load_average_at_end": [2.0, 1.5, 1.0],
}


def test_parse_groups_default() -> None:
    assert run.parse_groups(None) == list(run.FIGURE_GROUPS)


def test_parse_groups_canonical_order() -> None:
    assert run.parse_groups("docker, trainer") == ["trainer", "docker"]


def test_parse_groups_unknown() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="'trainer,gpu'"):
        run.parse_groups("trainer,gpu")


def test_parse_groups_empty() -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        run.parse_groups(" , ")


def test_merge_results_keeps_others(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"kept": {"value": 1, "unit": "s"}, "replaced": {"value": 2}}))

    run.merge_results({"replaced": {"value": 3, "unit": "s"}}, "test machine", path)

    results = json.loads(path.read_text())
    assert results["kept"] == {"value": 1, "unit": "s"}
    assert results["replaced"]["value"] == 3
    assert results["replaced"]["date"] == dt.date.today().isoformat()
    assert results["machine"] == {"value": "test machine", "unit": "description"}
    assert path.read_text().endswith("}\n")


def test_merge_results_new_file(tmp_path: Path) -> None:
    path = tmp_path / "results.json"

    run.merge_results({"figure": {"value": 1, "unit": "s"}}, "test machine", path)

    assert json.loads(path.read_text())["figure"]["value"] == 1


def test_merge_results_invalid_file(tmp_path: Path) -> None:
    path = tmp_path / "results.json"
    path.write_text("{not json")

    with pytest.raises(ValueError, match="invalid results file"):
        run.merge_results({"figure": {"value": 1, "unit": "s"}}, "test machine", path)
    assert path.read_text() == "{not json"


def test_docker_figures_fields() -> None:
    figure = run.docker_figures(DOCKER_RESULT)["docker_backend_overhead_s"]

    assert figure["value"] == 40.0
    assert figure["baseline"] == 30.0
    assert figure["ratio"] == 1.333
    assert figure["overhead_s"] == 9.5
    assert figure["goal"] == "overhead_s of at most 15 s"


def test_trainer_figures_fields() -> None:
    figures = run.trainer_figures(TRAINER_RESULT)
    loop = figures["trainer_samples_per_s"]
    end_to_end = figures["trainer_end_to_end_samples_per_s"]

    assert loop["value"] == 2100.0
    assert loop["baseline"] == 2300.0
    assert loop["ratio"] == 0.91
    assert end_to_end["value"] == 1800.0
    assert end_to_end["baseline"] == 2200.0
    assert end_to_end["ratio"] == 0.818


def test_format_figure_skipped() -> None:
    figure = run.skipped_figure("s", "overhead_s of at most 15 s", "no Docker engine responds")

    assert run.format_figure("docker_backend_overhead_s", figure) == (
        "docker_backend_overhead_s: skipped (no Docker engine responds)"
    )


def test_format_figure_baseline() -> None:
    figure = {"value": 2.0, "unit": "s", "baseline": 1.0, "ratio": 2.0}

    assert run.format_figure("name", figure) == "name: 2.0 s (baseline 1.0, ratio 2.0)"


def test_measure_docker_no_engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/missing.sock")

    figure = run.measure_docker(tmp_path, "http://127.0.0.1:9")["docker_backend_overhead_s"]

    assert figure["skipped"] is True
    assert "no Docker engine responds" in figure["reason"]
    assert figure["goal"] == "overhead_s of at most 15 s"
    assert "value" not in figure


@pytest.mark.docker
def test_measure_docker_missing_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client, reason = containers.connect_engine()
    if client is None:
        pytest.skip(reason)
    client.close()
    monkeypatch.setenv("ML_LOOP_TRAIN_IMAGE", "ml-loop-test/absent:never-built")

    figure = run.measure_docker(tmp_path, "http://127.0.0.1:9")["docker_backend_overhead_s"]

    assert figure["skipped"] is True
    assert "ml-loop-test/absent:never-built" in figure["reason"]
