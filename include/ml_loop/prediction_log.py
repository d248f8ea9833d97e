"""Prediction log: every prediction the model server makes, as JSON Lines files, and a reader.

Layout under the log folder (``$ML_LOOP_PREDICTION_LOG_DIR``, default ``<data root>/predictions``)::

    <model name>/<YYYY-MM-DD>/part-<time>-<pid>-<seq>.jsonl   one record per predicted row
    <model name>/<YYYY-MM-DD>/part-<time>-<pid>-<seq>.npz     image inputs of that part, if any

``<YYYY-MM-DD>`` is the UTC date of the records' ``time``. ``<time>`` is the UTC time of the flush
(``%Y%m%dT%H%M%S%fZ``), ``<pid>`` the writer's process id and ``<seq>`` a counter of its flushes.
Restarts and several servers therefore add new parts and never rewrite old ones. Each part is
written to a ``.tmp-*`` file in the same folder, fsynced and renamed, so a reader never sees a
partial file. The ``.npz`` is renamed before its ``.jsonl``, so a record never points at a missing
array.

Record schema (one JSON object per line, keys always present):

- ``id`` (str): the row id, from the request's ``ids`` list, else ``<request_id>-<row>``.
  Labels that arrive later join on it.
- ``request_id`` (str): id of the HTTP request; the response carries the same value.
- ``row`` (int): position of the row in its request, from 0.
- ``time`` (str): UTC time the prediction was made, ISO 8601 with microseconds and ``+00:00``.
- ``model_name`` (str), ``model_version`` (str): the registered version that predicted.
- ``variant`` (str): ``champion`` or ``challenger``, the alias whose model made the prediction.
- ``prediction`` (str): the predicted class label.
- ``confidence`` (float): the probability of the predicted class.
- ``probabilities`` (list[float]): the probability of every class, in the model's class order.
- ``inputs`` (list[float] | null): the row's raw features in the model's feature order, for
  tabular models; null for images.
- ``input_ref`` (object | null): for images, ``{"file": "<part>.npz", "key": "x", "index": i}``:
  row ``i`` of the float32 array ``x`` (shape ``(n, C, H, W)``, raw values in [0, 1]) in the
  ``.npz`` beside the ``.jsonl``; null for tabular models.

``PredictionLogWriter`` batches records in a bounded in-memory queue and writes them from a
background thread every ``flush_records`` records or ``flush_interval_s`` seconds, so logging
adds no disk I/O to a request. A full queue drops the new records and counts them; a failed
write (a full disk, a missing folder) is counted, logged once per run of consecutive failures,
and loses that flush's records. Neither ever raises into the request. ``close()`` flushes what
is queued. ``read_predictions`` reads the records of a time window back.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import io
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ml_loop.files import data_root, write_atomic

logger = logging.getLogger(__name__)

LOG_DIR_ENV = "ML_LOOP_PREDICTION_LOG_DIR"
DEFAULT_SUBDIR = "predictions"
PART_PREFIX = "part-"
INPUT_ARRAY_KEY = "x"
DEFAULT_MAX_QUEUED_RECORDS = 100_000
DEFAULT_FLUSH_RECORDS = 1000
DEFAULT_FLUSH_INTERVAL_S = 5.0
# A model name becomes a folder name, so it may not contain path separators or be "." or "..".
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def default_log_dir() -> Path | None:
    """Return ``$ML_LOOP_PREDICTION_LOG_DIR``, else ``$ML_LOOP_DATA_DIR/predictions``, else None."""
    value = os.environ.get(LOG_DIR_ENV)
    if value:
        return Path(value)
    try:
        return data_root() / DEFAULT_SUBDIR
    except RuntimeError:
        return None


def check_model_name(model_name: str) -> str:
    """Return ``model_name`` if it can be a folder name; raise ValueError otherwise."""
    if not MODEL_NAME_PATTERN.fullmatch(model_name) or model_name in {".", ".."}:
        raise ValueError(
            f"model name {model_name!r} cannot name a prediction log folder: expected letters, "
            "digits, '.', '_' and '-', starting with a letter, digit or '_'; rename the model "
            "or turn the prediction log off"
        )
    return model_name


@dataclasses.dataclass
class PredictionBatch:
    """The rows of one request: their records, and for images the input array of those rows."""

    records: list[dict[str, Any]]
    inputs: np.ndarray | None = None


@dataclasses.dataclass
class WriterStats:
    """Counters of a writer since it started; read them with ``PredictionLogWriter.stats()``."""

    written_records: int = 0
    written_parts: int = 0
    dropped_queue_full: int = 0
    dropped_write_failed: int = 0
    write_failures: int = 0


class PredictionLogWriter:
    """Write prediction records of one model to the log folder from a background thread.

    ``submit`` never blocks on I/O and never raises for a full queue or a failed write. Use
    ``start()`` and ``close()``, or the writer as a context manager.
    """

    def __init__(
        self,
        log_dir: str | Path,
        model_name: str,
        *,
        max_queued_records: int = DEFAULT_MAX_QUEUED_RECORDS,
        flush_records: int = DEFAULT_FLUSH_RECORDS,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
    ) -> None:
        if max_queued_records < 1 or flush_records < 1:
            raise ValueError(
                f"max_queued_records={max_queued_records!r} and flush_records={flush_records!r} "
                "are invalid; expected integers >= 1"
            )
        if flush_interval_s <= 0:
            raise ValueError(f"flush_interval_s={flush_interval_s!r} is invalid; expected > 0")
        self.log_dir = Path(log_dir)
        self.model_name = check_model_name(model_name)
        self.max_queued_records = max_queued_records
        self.flush_records = flush_records
        self.flush_interval_s = flush_interval_s
        self._queue: collections.deque[PredictionBatch] = collections.deque()
        self._queued_records = 0
        self._condition = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._stats = WriterStats()
        self._sequence = 0
        self._failing_since: int | None = None
        self._dropping = False
        self._flush_requested = False
        self._writing = False

    def __enter__(self) -> PredictionLogWriter:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        """Start the background thread; calling it again does nothing."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name=f"prediction-log {self.model_name}", daemon=True
        )
        self._thread.start()
        logger.info(
            "prediction log of %s: writing to %s every %d records or %.1f s",
            self.model_name,
            self.model_dir,
            self.flush_records,
            self.flush_interval_s,
        )

    @property
    def model_dir(self) -> Path:
        return self.log_dir / self.model_name

    def submit(self, batch: PredictionBatch) -> bool:
        """Queue one request's records; return False when the queue is full and they are dropped."""
        count = len(batch.records)
        with self._condition:
            if self._closing or self._queued_records + count > self.max_queued_records:
                self._stats.dropped_queue_full += count
                if not self._dropping:
                    # One line per run of drops; the metrics count every dropped record.
                    self._dropping = True
                    logger.warning(
                        "prediction log queue of %s is full (%d records) or closed; dropping "
                        "records until it has room, %d dropped so far",
                        self.model_name,
                        self._queued_records,
                        self._stats.dropped_queue_full,
                    )
                return False
            self._dropping = False
            self._queue.append(batch)
            self._queued_records += count
            if self._queued_records >= self.flush_records:
                self._condition.notify()
        return True

    def stats(self) -> WriterStats:
        with self._condition:
            return dataclasses.replace(self._stats)

    @property
    def queued_records(self) -> int:
        with self._condition:
            return self._queued_records

    def flush(self, timeout_s: float = 30.0) -> None:
        """Write everything queued now and wait until it is on disk (or ``timeout_s`` passes)."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            self._flush_requested = True
            self._condition.notify()
            while (self._queued_records or self._writing) and time.monotonic() < deadline:
                self._condition.wait(timeout=0.05)

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush the queue and stop the thread; later submissions are dropped and counted."""
        with self._condition:
            self._closing = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            if self._thread.is_alive():
                logger.error(
                    "prediction log writer of %s did not finish within %.0f s; %d records may "
                    "be lost",
                    self.model_name,
                    timeout_s,
                    self.queued_records,
                )
            self._thread = None
        stats = self.stats()
        logger.info(
            "prediction log of %s closed: %d records in %d parts written, %d dropped (queue "
            "full), %d lost to %d failed writes",
            self.model_name,
            stats.written_records,
            stats.written_parts,
            stats.dropped_queue_full,
            stats.dropped_write_failed,
            stats.write_failures,
        )

    def _run(self) -> None:
        while True:
            with self._condition:
                deadline = time.monotonic() + self.flush_interval_s
                while not (
                    self._closing
                    or self._flush_requested
                    or self._queued_records >= self.flush_records
                ):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._condition.wait(timeout=remaining)
                batches = list(self._queue)
                self._queue.clear()
                self._queued_records = 0
                self._flush_requested = False
                closing = self._closing
                self._writing = bool(batches)
            if batches:
                try:
                    self._write(batches)
                except Exception as err:
                    # The writer thread must outlive any failure, or logging stops for good.
                    self._record_failure(batches, err)
                finally:
                    with self._condition:
                        self._writing = False
                        self._condition.notify_all()
            if closing:
                return

    def _write(self, batches: list[PredictionBatch]) -> None:
        by_date: dict[str, list[PredictionBatch]] = collections.defaultdict(list)
        for batch in batches:
            by_date[batch.records[0]["time"][:10]].append(batch)
        for date, date_batches in sorted(by_date.items()):
            self._write_part(date, date_batches)
        if self._failing_since is not None:
            logger.info(
                "prediction log writes of %s work again after %d failed writes",
                self.model_name,
                self._stats.write_failures - self._failing_since,
            )
            self._failing_since = None

    def _write_part(self, date: str, batches: list[PredictionBatch]) -> None:
        self._sequence += 1
        now = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        stem = f"{PART_PREFIX}{now}-{os.getpid()}-{self._sequence:06d}"
        folder = self.model_dir / date
        records: list[dict[str, Any]] = []
        arrays: list[np.ndarray] = []
        for batch in batches:
            if batch.inputs is None:
                records.extend(batch.records)
                continue
            offset = sum(len(array) for array in arrays)
            for index, record in enumerate(batch.records):
                ref = {"file": f"{stem}.npz", "key": INPUT_ARRAY_KEY, "index": offset + index}
                records.append({**record, "input_ref": ref})
            arrays.append(np.asarray(batch.inputs, dtype=np.float32))
        if arrays:
            buffer = io.BytesIO()
            np.savez_compressed(buffer, **{INPUT_ARRAY_KEY: np.concatenate(arrays)})
            write_atomic(folder / f"{stem}.npz", lambda handle: handle.write(buffer.getvalue()))
        text = "".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records)
        write_atomic(folder / f"{stem}.jsonl", lambda handle: handle.write(text.encode()))
        with self._condition:
            self._stats.written_records += len(records)
            self._stats.written_parts += 1

    def _record_failure(self, batches: list[PredictionBatch], err: Exception) -> None:
        lost = sum(len(batch.records) for batch in batches)
        with self._condition:
            self._stats.write_failures += 1
            self._stats.dropped_write_failed += lost
            failures = self._stats.write_failures
        if self._failing_since is None:
            self._failing_since = failures - 1
            logger.error(
                "writing the prediction log of %s to %s failed (%s: %s); %d records are lost. "
                "Further failures are counted in the metrics without a log line until a write "
                "works again; check the folder and the free disk space",
                self.model_name,
                self.model_dir,
                type(err).__name__,
                err,
                lost,
            )
        else:
            logger.debug("prediction log write failed again: %s", err)


def iter_predictions(
    log_dir: str | Path,
    model_name: str,
    start: dt.datetime | dt.date,
    end: dt.datetime | dt.date,
    *,
    with_inputs: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yield the records of ``model_name`` whose ``time`` is in ``[start, end)``, oldest part first.

    A date stands for its midnight UTC, and a naive datetime is taken as UTC. With
    ``with_inputs``, each image record also gets ``input_array``: its row of the part's ``.npz``.
    Temporary files of writes in progress are skipped. A line that is not valid JSON raises
    ValueError naming the file and line.
    """
    start_time, end_time = _as_utc(start), _as_utc(end)
    if end_time <= start_time:
        return
    model_dir = Path(log_dir) / check_model_name(model_name)
    day = start_time.date()
    while day <= end_time.date():
        folder = model_dir / day.isoformat()
        if folder.is_dir():
            for path in sorted(folder.glob(f"{PART_PREFIX}*.jsonl")):
                yield from _read_part(path, start_time, end_time, with_inputs)
        day += dt.timedelta(days=1)


def read_predictions(
    log_dir: str | Path,
    model_name: str,
    start: dt.datetime | dt.date,
    end: dt.datetime | dt.date,
    *,
    with_inputs: bool = False,
) -> list[dict[str, Any]]:
    """Return the records of ``model_name`` in ``[start, end)``, sorted by time; see the schema."""
    records = list(iter_predictions(log_dir, model_name, start, end, with_inputs=with_inputs))
    records.sort(key=lambda record: record["time"])
    return records


def load_inputs(log_dir: str | Path, model_name: str, records: Sequence[dict[str, Any]]) -> Any:
    """Return the image inputs of ``records`` as one float32 array ``(n, C, H, W)``, in order."""
    cache: dict[Path, np.ndarray] = {}
    rows = []
    model_dir = Path(log_dir) / check_model_name(model_name)
    for record in records:
        ref = record.get("input_ref")
        if not ref:
            raise ValueError(
                f"prediction {record.get('id')!r} has no input_ref, so its inputs are inline "
                "(tabular models store them in the record's 'inputs')"
            )
        path = model_dir / record["time"][:10] / ref["file"]
        if path not in cache:
            with np.load(path, allow_pickle=False) as data:
                cache[path] = data[ref["key"]]
        rows.append(cache[path][ref["index"]])
    return np.stack(rows) if rows else np.zeros((0,), dtype=np.float32)


def _read_part(
    path: Path, start: dt.datetime, end: dt.datetime, with_inputs: bool
) -> Iterator[dict[str, Any]]:
    arrays: np.ndarray | None = None
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{path} line {number} is not valid JSON: {err}") from err
            if not start <= dt.datetime.fromisoformat(record["time"]) < end:
                continue
            ref = record.get("input_ref")
            if with_inputs and ref:
                if arrays is None:
                    with np.load(path.parent / ref["file"], allow_pickle=False) as data:
                        arrays = data[ref["key"]]
                record["input_array"] = arrays[ref["index"]]
            yield record


def _as_utc(value: dt.datetime | dt.date) -> dt.datetime:
    if not isinstance(value, dt.datetime):
        return dt.datetime.combine(value, dt.time(), tzinfo=dt.UTC)
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)
