"""Prediction log tests: a real background writer, real files in tmp_path, and the reader."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ml_loop import prediction_log
from ml_loop.prediction_log import PredictionBatch, PredictionLogWriter

MODEL = "digits-cnn"
DAY = dt.datetime(2026, 3, 4, 10, 0, tzinfo=dt.UTC)


def make_records(count: int, time: dt.datetime = DAY, prefix: str = "r") -> list[dict[str, Any]]:
    """Return ``count`` records in the log's schema, all made at ``time``."""
    return [
        {
            "id": f"{prefix}-{row}",
            "request_id": prefix,
            "row": row,
            "time": time.isoformat(timespec="microseconds"),
            "model_name": MODEL,
            "model_version": "3",
            "variant": "champion",
            "prediction": "7",
            "confidence": 0.9,
            "probabilities": [0.1, 0.9],
            "inputs": [float(row), 1.0],
            "input_ref": None,
        }
        for row in range(count)
    ]


def writer(tmp_path: Path, **options: Any) -> PredictionLogWriter:
    options = {"flush_interval_s": 3600, **options}
    return PredictionLogWriter(tmp_path / "log", MODEL, **options)


def test_flush_on_record_count(tmp_path: Path) -> None:
    log = writer(tmp_path, flush_records=4)
    with log:
        log.submit(PredictionBatch(make_records(2, prefix="a")))
        log.submit(PredictionBatch(make_records(2, prefix="b")))
        wait_for(lambda: log.stats().written_records == 4)
        parts = list((tmp_path / "log" / MODEL / "2026-03-04").glob("part-*.jsonl"))

    assert len(parts) == 1
    lines = parts[0].read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["a-0", "a-1", "b-0", "b-1"]


def test_flush_on_interval(tmp_path: Path) -> None:
    log = writer(tmp_path, flush_records=1000, flush_interval_s=0.1)
    with log:
        log.submit(PredictionBatch(make_records(1)))
        wait_for(lambda: log.stats().written_records == 1)

    assert log.stats().written_parts == 1


def test_close_flushes_queue(tmp_path: Path) -> None:
    log = writer(tmp_path, flush_records=1000)
    log.start()
    log.submit(PredictionBatch(make_records(3)))

    log.close()

    records = prediction_log.read_predictions(
        tmp_path / "log", MODEL, DAY.date(), DAY + dt.timedelta(1)
    )
    assert [record["id"] for record in records] == ["r-0", "r-1", "r-2"]
    assert log.submit(PredictionBatch(make_records(1))) is False


def test_restart_adds_parts(tmp_path: Path) -> None:
    for run in ("first", "second"):
        with writer(tmp_path) as log:
            log.submit(PredictionBatch(make_records(2, prefix=run)))

    records = prediction_log.read_predictions(
        tmp_path / "log", MODEL, DAY.date(), DAY + dt.timedelta(1)
    )
    parts = sorted((tmp_path / "log" / MODEL / "2026-03-04").glob("part-*.jsonl"))
    assert len(parts) == 2
    assert sorted(record["id"] for record in records) == [
        "first-0", "first-1", "second-0", "second-1",
    ]  # fmt: skip


def test_queue_full_drops(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = writer(tmp_path, max_queued_records=3, flush_records=1000)
    caplog.set_level(logging.WARNING, logger="ml_loop.prediction_log")

    accepted = log.submit(PredictionBatch(make_records(3)))
    dropped = [log.submit(PredictionBatch(make_records(2))) for _ in range(3)]
    stats = log.stats()

    assert accepted is True
    assert dropped == [False, False, False]
    assert stats.dropped_queue_full == 6
    assert log.queued_records == 3
    assert len([r for r in caplog.records if "queue" in r.getMessage()]) == 1


def test_write_failure_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "log"
    blocker.write_text("a file, so the model folder cannot be created")
    caplog.set_level(logging.INFO, logger="ml_loop.prediction_log")
    log = writer(tmp_path, flush_records=1)
    log.start()
    for count in (1, 2, 3):
        log.submit(PredictionBatch(make_records(count)))
        wait_for(lambda count=count: log.stats().write_failures == count)
    blocker.unlink()
    log.submit(PredictionBatch(make_records(1)))
    wait_for(lambda: log.stats().written_records == 1)
    log.close()

    stats = log.stats()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert stats.write_failures == 3
    assert stats.dropped_write_failed == 6
    assert len(errors) == 1
    assert "NotADirectoryError" in errors[0].getMessage()
    assert "work again after 3 failed writes" in caplog.text


def test_image_inputs_in_npz(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((5, 1, 4, 4)).astype(np.float32)
    first = [dict(r, inputs=None) for r in make_records(2, prefix="a")]
    second = [dict(r, inputs=None) for r in make_records(3, prefix="b")]
    with writer(tmp_path) as log:
        log.submit(PredictionBatch(first, x[:2]))
        log.submit(PredictionBatch(second, x[2:]))
    log_dir = tmp_path / "log"

    records = prediction_log.read_predictions(
        log_dir, MODEL, DAY.date(), DAY + dt.timedelta(1), with_inputs=True
    )

    npz = list((log_dir / MODEL / "2026-03-04").glob("part-*.npz"))
    assert len(npz) == 1
    assert [record["input_ref"]["index"] for record in records] == [0, 1, 2, 3, 4]
    assert records[3]["input_ref"]["file"] == npz[0].name
    assert np.array_equal(np.stack([record["input_array"] for record in records]), x)
    assert np.array_equal(prediction_log.load_inputs(log_dir, MODEL, records[2:]), x[2:])


def test_read_window(tmp_path: Path) -> None:
    times = [
        DAY - dt.timedelta(days=1),
        DAY,
        DAY + dt.timedelta(hours=1),
        DAY + dt.timedelta(days=1),
    ]
    with writer(tmp_path) as log:
        for index, time in enumerate(times):
            log.submit(PredictionBatch(make_records(1, time=time, prefix=f"t{index}")))
    log_dir = tmp_path / "log"

    inside = prediction_log.read_predictions(log_dir, MODEL, DAY, DAY + dt.timedelta(hours=1))
    naive = prediction_log.read_predictions(
        log_dir, MODEL, DAY.replace(tzinfo=None), dt.date(2026, 3, 6)
    )
    empty = prediction_log.read_predictions(log_dir, MODEL, DAY, DAY)

    assert [record["id"] for record in inside] == ["t1-0"]
    assert [record["id"] for record in naive] == ["t1-0", "t2-0", "t3-0"]
    assert empty == []
    assert sorted(p.name for p in (log_dir / MODEL).iterdir()) == [
        "2026-03-03", "2026-03-04", "2026-03-05",
    ]  # fmt: skip


def test_reader_never_sees_partial_file(tmp_path: Path) -> None:
    log = writer(tmp_path, flush_records=50)
    errors: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            for path in (tmp_path / "log").rglob("*.jsonl"):
                for line in path.read_text().splitlines():
                    try:
                        json.loads(line)
                    except ValueError as err:
                        errors.append(f"{path}: {err}")

    reader = threading.Thread(target=read)
    with log:
        reader.start()
        for index in range(40):
            log.submit(PredictionBatch(make_records(25, prefix=f"b{index}")))
        log.flush()
    stop.set()
    reader.join(timeout=30)

    assert errors == []
    assert log.stats().written_records == 1000
    assert list((tmp_path / "log").rglob(".tmp-*")) == []


def test_invalid_model_name(tmp_path: Path) -> None:
    for name in ("../escape", "a/b", "..", ""):
        with pytest.raises(ValueError, match="cannot name a prediction log folder"):
            PredictionLogWriter(tmp_path, name)


def test_invalid_json_line(tmp_path: Path) -> None:
    folder = tmp_path / MODEL / "2026-03-04"
    folder.mkdir(parents=True)
    (folder / "part-1.jsonl").write_text('{"time": "2026-03-04T10:00:00+00:00"}\n{broken\n')

    with pytest.raises(ValueError, match=r"part-1\.jsonl line 2 is not valid JSON"):
        prediction_log.read_predictions(tmp_path, MODEL, DAY.date(), DAY + dt.timedelta(1))


def test_default_log_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ML_LOOP_PREDICTION_LOG_DIR", raising=False)
    monkeypatch.delenv("ML_LOOP_DATA_DIR", raising=False)
    assert prediction_log.default_log_dir() is None
    monkeypatch.setenv("ML_LOOP_DATA_DIR", str(tmp_path))
    assert prediction_log.default_log_dir() == tmp_path / "predictions"
    monkeypatch.setenv("ML_LOOP_PREDICTION_LOG_DIR", str(tmp_path / "elsewhere"))
    assert prediction_log.default_log_dir() == tmp_path / "elsewhere"


def wait_for(check: Any, timeout_s: float = 30) -> None:
    """Wait until ``check()`` is true; fail on timeout."""
    import time

    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail("timed out waiting for the prediction log writer")
        time.sleep(0.02)
