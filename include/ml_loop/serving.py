"""Model server that serves the version an MLflow alias points to and follows the alias.

A background task in the app's lifespan checks the alias (``champion`` by default) every
``poll_interval_s`` seconds. When the alias points to a new version, the server loads it in a
worker thread with ``registry.load_model``, which verifies the weights' SHA-256, and then swaps
one reference, so the event loop keeps serving the old version during the load. Each
request reads that reference once, so a request that started on the old model finishes on it and
no request fails during a swap. A version that fails to load (a SHA-256 mismatch, a missing
artifact) is logged, counted in ``/metrics`` and reported by ``GET /version``, and the previous
model keeps serving. When the alias is removed, the server unloads its model and ``/ready``
returns 503.

Endpoints:

- ``GET /health``: 200 while the process is up.
- ``GET /ready``: 200 when a model is loaded, else 503 with the reason.
- ``GET /version``: model name, alias, served version, run id, load time, the last error and the
  canary state.
- ``GET /metrics``: Prometheus text format (``ml_loop_serving_*``, see ``ServerMetrics``).
- ``POST /reload``: check the alias now and return once the check has finished; 200 when the
  server serves what the alias points to, 503 with the error otherwise.
- ``GET /canary``, ``POST /canary {"share": s}``, ``DELETE /canary``: read, start or stop the
  canary, which routes the share ``s`` (0 < s <= 1) of ``/invocations`` requests to the
  ``challenger`` alias (see ``CanaryRouter``).
- ``POST /invocations``: MLflow scoring payloads as JSON, one of ``{"inputs": rows}``,
  ``{"instances": rows}``, and for tabular models ``{"dataframe_split": {"columns": [...],
  "data": [[...], ...]}}`` or ``{"dataframe_records": [{column: value}, ...]}``, with an optional
  ``"ids": [row id, ...]``. Or ``Content-Type: text/csv``: for tabular models a header row of
  feature names (and an optional ``id`` column), for images no header and one row of C*H*W
  values per image. Image rows have shape ``(n, C, H, W)`` or are flat ``(n, C*H*W)``; tabular
  rows have shape ``(n, F)``. Values are raw features, as in the training data. The query
  parameter ``variant=champion|challenger`` bypasses the canary's routing. The response is
  ``{"predictions": [label, ...], "probabilities": [[p, ...], ...], "model_version": "N",
  "variant": "champion" | "challenger", "request_id": "...", "ids": [row id, ...]}``, and
  the header ``X-Request-ID`` repeats the request id (a client's own ``X-Request-ID`` is kept).
  Invalid input returns 400 (malformed body), 415 (unsupported content type) or 422 (invalid
  values) with a message naming the field and the expected form. A body larger than a
  maximum-size batch could need returns 413, and 503 means no model is loaded.

With a token in ``$ML_LOOP_SERVING_TOKEN``, or in the file named by
``$ML_LOOP_SERVING_TOKEN_FILE``, every endpoint except ``/health`` and ``/ready`` requires
``Authorization: Bearer <token>`` and returns 401 with ``WWW-Authenticate: Bearer`` otherwise.
Without a token the server only binds to 127.0.0.1, ::1 or localhost.

Every prediction is written to the prediction log (``ml_loop.prediction_log``) by a background
writer; a failed or dropped write is counted and never fails the request.

Run it with ``python -m ml_loop.serving --model-name NAME``; ``--help`` lists the options. The
tracking server comes from ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import csv
import dataclasses
import datetime as dt
import hmac
import io
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import nn

from ml_loop import prediction_log, registry
from ml_loop.files import DATA_DIR_ENV
from ml_loop.models import ModelIntegrityError, predict_proba

logger = logging.getLogger(__name__)

TENSOR_KEYS = ("inputs", "instances")
DATAFRAME_KEYS = ("dataframe_split", "dataframe_records")
INPUT_KEYS = TENSOR_KEYS + DATAFRAME_KEYS
DATAFRAME_SPLIT_FORM = '{"columns": [name, ...], "data": [[value, ...], ...]}'

DEFAULT_POLL_INTERVAL_S = 10.0
DEFAULT_MAX_BATCH_SIZE = 1024
# Small on purpose: the server shares its machine with the trainer and the scheduler.
DEFAULT_TORCH_THREADS = 2

# Estimated upper bound on the JSON size of one value, used to reject oversized bodies before
# parsing them. A value in dataframe_records also repeats its column name, hence the margin.
MAX_BYTES_PER_VALUE = 64
MIN_BODY_LIMIT_BYTES = 1 << 20
# A version that failed to load is retried by the poller after a delay that doubles per failure,
# up to this many seconds; POST /reload always retries at once.
MAX_RETRY_DELAY_S = 300.0
# While the alias cannot be resolved, log the first failure and then every Nth one.
CHECK_FAILURE_LOG_EVERY = 30

TOKEN_ENV = "ML_LOOP_SERVING_TOKEN"
TOKEN_FILE_ENV = "ML_LOOP_SERVING_TOKEN_FILE"
MIN_TOKEN_LENGTH = 16
LOCAL_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
# Probes stay open so that an orchestrator can check the server without the token.
OPEN_PATHS = frozenset({"/health", "/ready"})
KNOWN_PATHS = frozenset(
    {"/health", "/ready", "/version", "/metrics", "/reload", "/canary", "/invocations"}
)
CHAMPION_VARIANT = "champion"
CHALLENGER_VARIANT = "challenger"
REQUEST_ID_HEADER = "X-Request-ID"
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
IDS_KEY = "ids"
ID_COLUMN = "id"
MAX_ID_LENGTH = 256
JSON_MEDIA_TYPE = "application/json"
CSV_MEDIA_TYPE = "text/csv"
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONFIDENCE_BUCKETS = (0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class PayloadError(ValueError):
    """A scoring request is malformed or its values are invalid; the message is sent back."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


@dataclasses.dataclass(frozen=True)
class InputContract:
    """Input rules of a loaded model: its input shape, optional feature names and batch limit."""

    input_shape: tuple[int, ...]
    feature_names: tuple[str, ...] | None
    max_batch_size: int
    model_label: str

    @classmethod
    def from_config(
        cls, config: dict[str, Any], max_batch_size: int, model_label: str
    ) -> InputContract:
        names = config.get("feature_names")
        return cls(
            input_shape=tuple(int(dim) for dim in config["input_shape"]),
            feature_names=tuple(names) if names else None,
            max_batch_size=max_batch_size,
            model_label=model_label,
        )

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def values_per_row(self) -> int:
        return math.prod(self.input_shape)

    def expected_shapes(self) -> str:
        dims = ", ".join(str(dim) for dim in self.input_shape)
        if self.is_image:
            return f"(n, {dims}) or (n, {self.values_per_row})"
        return f"(n, {dims})"

    def max_body_bytes(self) -> int:
        return (
            MIN_BODY_LIMIT_BYTES + self.max_batch_size * self.values_per_row * MAX_BYTES_PER_VALUE
        )


def features_from_payload(payload: Any, contract: InputContract) -> np.ndarray:
    """Convert a parsed MLflow scoring payload to a float32 batch of the model's input shape.

    Raises PayloadError, with status 400 for a malformed body and 422 for invalid values.
    """
    if not isinstance(payload, dict):
        raise PayloadError(
            f"request body must be a JSON object with one of the keys {', '.join(INPUT_KEYS)}; "
            f"got a JSON {_json_type(payload)}",
            status_code=400,
        )
    present = [key for key in INPUT_KEYS if key in payload]
    if not present:
        raise PayloadError(
            f"request body has no input key (keys: {sorted(payload)}); expected one of "
            f'{", ".join(INPUT_KEYS)}, for example {{"inputs": [[...], ...]}} with rows of shape '
            f"{contract.expected_shapes()} for {contract.model_label}",
            status_code=400,
        )
    if len(present) > 1:
        raise PayloadError(
            f"request body has {' and '.join(present)}; send exactly one of them", status_code=400
        )
    key = present[0]
    if key in TENSOR_KEYS:
        return _tensor_rows(payload[key], key, contract)
    if contract.is_image:
        raise PayloadError(
            f"{key} is accepted only by tabular models, and {contract.model_label} takes images; "
            f"send inputs with shape {contract.expected_shapes()}"
        )
    if key == "dataframe_split":
        return _dataframe_split(payload[key], contract)
    return _dataframe_records(payload[key], contract)


def _tensor_rows(value: Any, field: str, contract: InputContract) -> np.ndarray:
    _check_batch(value, field, contract)
    array = _numbers(value, field, contract, _index_describer(field))
    shape = contract.input_shape
    if array.shape[1:] == shape:
        return array
    if contract.is_image and array.ndim == 2 and array.shape[1] == contract.values_per_row:
        return np.ascontiguousarray(array.reshape((len(array), *shape)))
    raise PayloadError(
        f"{field} has shape {array.shape}; expected {contract.expected_shapes()} for "
        f"{contract.model_label}"
    )


def _dataframe_split(value: Any, contract: InputContract) -> np.ndarray:
    if not isinstance(value, dict):
        raise PayloadError(
            f"dataframe_split must be a JSON object {DATAFRAME_SPLIT_FORM}; "
            f"got a JSON {_json_type(value)}"
        )
    for part in ("columns", "data"):
        if part not in value:
            raise PayloadError(
                f"dataframe_split.{part} is missing; expected dataframe_split to be "
                f"{DATAFRAME_SPLIT_FORM}"
            )
    columns = value["columns"]
    field = "dataframe_split.data"

    def describe(index: Sequence[int]) -> str:
        text = _index_describer(field)(index)
        if len(index) == 2 and index[1] < len(columns):
            text += f" (column {columns[index[1]]!r})"
        return text

    return _named_columns(
        columns, value["data"], contract, "dataframe_split.columns", field, describe
    )


def _named_columns(
    columns: Any,
    rows: Any,
    contract: InputContract,
    columns_field: str,
    rows_field: str,
    describe: Callable[[Sequence[int]], str],
) -> np.ndarray:
    """Convert rows of values under named columns to the model's feature order."""
    order = _column_order(columns, columns_field, contract)
    _check_batch(rows, rows_field, contract)
    array = _numbers(rows, rows_field, contract, describe)
    if array.ndim != 2 or array.shape[1] != len(columns):
        raise PayloadError(
            f"{rows_field} has shape {array.shape}; expected (n, {len(columns)}), one value per "
            f"name in {columns_field}"
        )
    return np.ascontiguousarray(array[:, order])


def _dataframe_records(value: Any, contract: InputContract) -> np.ndarray:
    field = "dataframe_records"
    _check_batch(value, field, contract)
    for i, record in enumerate(value):
        if not isinstance(record, dict):
            raise PayloadError(
                f"{field}[{i}] must be a JSON object of column name to value; "
                f"got a JSON {_json_type(record)}"
            )
    columns = list(value[0])
    order = _column_order(columns, f"{field}[0]", contract)
    for i, record in enumerate(value):
        if set(record) != set(columns):
            raise PayloadError(
                f"{field}[{i}] has columns {sorted(record)}; expected the columns of "
                f"{field}[0]: {sorted(columns)}"
            )
    rows = [[record[column] for column in columns] for record in value]

    def describe(index: Sequence[int]) -> str:
        if len(index) >= 2:
            return f"{field}[{index[0]}].{columns[index[1]]}"
        return _index_describer(field)(index)

    array = _numbers(rows, field, contract, describe)
    if array.ndim != 2:
        raise PayloadError(
            f"{field} values must be single numbers; got values of shape {array.shape[2:]}"
        )
    return np.ascontiguousarray(array[:, order])


def _column_order(columns: Any, field: str, contract: InputContract) -> list[int]:
    """Return, for each model feature in order, its position among the request's columns."""
    if not isinstance(columns, list) or not all(isinstance(name, str) for name in columns):
        raise PayloadError(f"{field} must be a JSON array of column names (strings)")
    duplicates = sorted(name for name, count in collections.Counter(columns).items() if count > 1)
    if duplicates:
        raise PayloadError(f"{field} names {duplicates} more than once; name each column once")
    (num_features,) = contract.input_shape
    if contract.feature_names is not None:
        missing = [name for name in contract.feature_names if name not in columns]
        unknown = [name for name in columns if name not in contract.feature_names]
        if missing or unknown:
            raise PayloadError(
                f"{field} does not match the features of {contract.model_label}: missing "
                f"{missing}, unknown {unknown}; expected the columns {list(contract.feature_names)}"
            )
        return [columns.index(name) for name in contract.feature_names]
    # A config without "feature_names" (an image model, or weights saved without them) has no
    # names to match, so columns are taken in the order the request gives them.
    if len(columns) != num_features:
        raise PayloadError(
            f"{field} names {len(columns)} columns; expected {num_features} for "
            f"{contract.model_label}, in training order"
        )
    return list(range(num_features))


def _check_batch(value: Any, field: str, contract: InputContract) -> None:
    if not isinstance(value, list):
        raise PayloadError(
            f"{field} must be a JSON array of rows; got a JSON {_json_type(value)}; expected "
            f"shape {contract.expected_shapes()}"
        )
    if not value:
        raise PayloadError(
            f"{field} is empty; expected at least one row of shape {contract.expected_shapes()}"
        )
    if len(value) > contract.max_batch_size:
        raise PayloadError(
            f"{field} has {len(value)} rows, more than the maximum batch size "
            f"{contract.max_batch_size}; split the request into batches of at most "
            f"{contract.max_batch_size} rows"
        )


def _numbers(
    value: list[Any],
    field: str,
    contract: InputContract,
    describe: Callable[[Sequence[int]], str],
) -> np.ndarray:
    """Convert nested lists of JSON numbers to a finite float32 array; errors name the bad value."""
    try:
        array = np.asarray(value)
    except (ValueError, RecursionError) as err:
        raise PayloadError(
            f"{field} is not a rectangular array: its rows have different lengths or depths; "
            f"expected shape {contract.expected_shapes()} for {contract.model_label}"
        ) from err
    if array.dtype.kind not in "iuf":
        found = _first_non_number(value)
        if found is not None:
            index, item = found
            raise PayloadError(f"{describe(index)} is {json.dumps(item)}; expected a number")
        try:
            array = np.asarray(value, dtype=np.float64)
        except (ValueError, TypeError, OverflowError) as err:
            raise PayloadError(f"{field} could not be read as numbers: {err}") from err
    array = array.astype(np.float64, copy=False)
    _check_finite(array, describe, "a finite number; NaN and infinity are rejected")
    array32 = array.astype(np.float32)
    _check_finite(array32, describe, "a number within the float32 range")
    return array32


def _check_finite(array: np.ndarray, describe: Callable[[Sequence[int]], str], rule: str) -> None:
    invalid = ~np.isfinite(array)
    if invalid.any():
        index = tuple(int(i) for i in np.argwhere(invalid)[0])
        raise PayloadError(f"{describe(index)} is not {rule}")


def _first_non_number(value: Any) -> tuple[tuple[int, ...], Any] | None:
    """Return the index path and value of the first element that is not a JSON number."""
    stack: list[tuple[tuple[int, ...], Any]] = [((), value)]
    while stack:
        index, item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed([((*index, i), child) for i, child in enumerate(item)]))
        elif isinstance(item, bool) or not isinstance(item, int | float):
            return index, item
    return None


def _index_describer(field: str) -> Callable[[Sequence[int]], str]:
    return lambda index: field + "".join(f"[{i}]" for i in index)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def features_from_csv(body: bytes, contract: InputContract) -> tuple[np.ndarray, list[str] | None]:
    """Convert a ``text/csv`` body to a float32 batch and the row ids of an ``id`` column.

    Tabular models take a header row of feature names (matched by name like
    ``dataframe_split.columns``, plus an optional ``id`` column) and one row per record. Image
    models take no header and one row of C*H*W values per image. Raises PayloadError.
    """
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise PayloadError(
            f"CSV body is not UTF-8 ({err}); send UTF-8 text", status_code=400
        ) from err
    try:
        rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    except csv.Error as err:
        raise PayloadError(f"CSV body could not be parsed: {err}", status_code=400) from err
    if contract.is_image:
        if rows and any(_csv_number(cell) is None for cell in rows[0]):
            raise PayloadError(
                f"CSV row 1 contains a value that is not a number: image models take CSV without "
                f"a header row, one row of {contract.values_per_row} values per image for "
                f"{contract.model_label}"
            )
        field = "CSV rows"
        values = _csv_values(rows, lambda i, j: f"CSV row {i + 1}, column {j + 1}")
        return _tensor_rows(values, field, contract), None
    if not rows:
        raise PayloadError(
            "CSV body is empty; expected a header row of feature names and at least one row"
        )
    header = [name.strip() for name in rows[0]]
    data = rows[1:]
    ids = None
    if ID_COLUMN in header:
        position = header.index(ID_COLUMN)
        ids = [row[position].strip() if position < len(row) else "" for row in data]
        header = header[:position] + header[position + 1 :]
        data = [row[:position] + row[position + 1 :] for row in data]

    def name(j: int) -> str:
        return repr(header[j]) if j < len(header) else str(j + 1)

    values = _csv_values(data, lambda i, j: f"CSV row {i + 2}, column {name(j)}")

    def describe(index: Sequence[int]) -> str:
        if len(index) == 2:
            return f"CSV row {index[0] + 2}, column {name(index[1])}"
        return f"CSV row {index[0] + 2}"

    features = _named_columns(header, values, contract, "CSV header", "CSV rows", describe)
    return features, ids


def _csv_values(rows: list[list[str]], describe: Callable[[int, int], str]) -> list[list[float]]:
    values = []
    for i, row in enumerate(rows):
        parsed = []
        for j, cell in enumerate(row):
            number = _csv_number(cell)
            if number is None:
                shown = cell if len(cell) <= 40 else cell[:40] + "..."
                raise PayloadError(f"{describe(i, j)} is {shown!r}; expected a number")
            parsed.append(number)
        values.append(parsed)
    return values


def _csv_number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def row_ids(value: Any, rows: int, request_id: str) -> list[str]:
    """Return the request's ``ids`` as strings, or ``<request_id>-<row>`` when none were sent."""
    if value is None:
        return [f"{request_id}-{row}" for row in range(rows)]
    if not isinstance(value, list):
        raise PayloadError(
            f"ids must be a JSON array of {rows} strings, one per row; got a JSON "
            f"{_json_type(value)}"
        )
    if len(value) != rows:
        raise PayloadError(
            f"ids has {len(value)} entries but the request has {rows} rows; send one id per row"
        )
    ids = []
    for i, item in enumerate(value):
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise PayloadError(f"ids[{i}] is {json.dumps(item)}; expected a string or an integer")
        text = str(item)
        if not 0 < len(text) <= MAX_ID_LENGTH:
            raise PayloadError(
                f"ids[{i}] has {len(text)} characters; expected 1 to {MAX_ID_LENGTH}"
            )
        ids.append(text)
    duplicates = sorted(item for item, count in collections.Counter(ids).items() if count > 1)
    if duplicates:
        shown = duplicates[:5]
        raise PayloadError(f"ids contains {shown} more than once; give each row its own id")
    return ids


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """One loaded version; the server swaps whole instances, never edits one."""

    model: nn.Module
    config: dict[str, Any]
    version: str
    run_id: str
    loaded_at: str


@dataclasses.dataclass
class _LoadFailure:
    count: int
    retry_at: float
    message: str


class AliasFollower:
    """Keep the version an alias points to loaded, and swap to a new one when the alias moves."""

    def __init__(
        self,
        model_name: str,
        alias: str,
        tracking_uri: str | None,
        poll_interval_s: float,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.model_name = model_name
        self.metrics = metrics
        self.alias = alias
        self.tracking_uri = tracking_uri
        self.poll_interval_s = poll_interval_s
        self.current: LoadedModel | None = None
        self.alias_version: str | None = None
        self.last_error: dict[str, Any] | None = None
        self.load_failures = 0
        self.check_failures = 0
        self.not_ready_reason = f"no model loaded yet: the first check of alias {alias} is running"
        self._consecutive_check_failures = 0
        self._failed_versions: dict[str, _LoadFailure] = {}
        self._lock = asyncio.Lock()

    async def poll(self) -> None:
        """Check the alias every ``poll_interval_s`` seconds until cancelled."""
        while True:
            try:
                await self.check(retry_failed=False)
            except Exception:
                # The loop must outlive any bug in one check, or the alias stops being followed.
                logger.exception("alias check of %s@%s failed", self.model_name, self.alias)
            await asyncio.sleep(self.poll_interval_s)

    async def check(self, *, retry_failed: bool) -> dict[str, Any]:
        """Resolve the alias and load its version if it is new; return the outcome.

        With ``retry_failed`` false, a version that failed to load is skipped until its retry
        delay has passed. Checks run one at a time.
        """
        async with self._lock:
            return await self._check(retry_failed)

    async def _check(self, retry_failed: bool) -> dict[str, Any]:
        try:
            target = await asyncio.to_thread(
                registry.get_alias_version, self.model_name, self.alias, self.tracking_uri
            )
        except Exception as err:
            # Any failure to reach the registry leaves the loaded model serving.
            return self._record_check_failure(err)
        if self._consecutive_check_failures:
            logger.info(
                "alias %s@%s resolved again after %d failed checks",
                self.model_name,
                self.alias,
                self._consecutive_check_failures,
            )
            self._consecutive_check_failures = 0
        self.alias_version = target

        if target is None:
            return self._unload()
        if self.current is not None and self.current.version == target:
            return self._result(changed=False, error=None)

        failure = self._failed_versions.get(target)
        if failure is not None and not retry_failed and time.monotonic() < failure.retry_at:
            return self._result(changed=False, error=failure.message)
        try:
            loaded = await asyncio.to_thread(self._load, target)
        except Exception as err:
            # Whatever the load raised, the previous model keeps serving.
            return self._record_load_failure(target, err)

        replaced = self.current
        self.current = loaded
        self._failed_versions.pop(target, None)
        if self.metrics is not None:
            self.metrics.model_loaded(self.alias, loaded)
        logger.info(
            "now serving %s version %s (run %s) for alias %s; replaced version %s",
            self.model_name,
            loaded.version,
            loaded.run_id,
            self.alias,
            replaced.version if replaced else None,
        )
        return self._result(changed=True, error=None)

    def _load(self, version: str) -> LoadedModel:
        model, config, model_version = registry.load_model(
            self.model_name, version, tracking_uri=self.tracking_uri
        )
        # One forward pass on zeros proves the weights fit the input shape before any request
        # reaches them.
        predict_proba(model, torch.zeros((1, *config["input_shape"])))
        return LoadedModel(
            model=model,
            config=config,
            version=str(model_version.version),
            run_id=model_version.run_id,
            loaded_at=_now(),
        )

    def _unload(self) -> dict[str, Any]:
        changed = self.current is not None
        if changed:
            logger.warning(
                "alias %s of %s was removed; unloading version %s, so nothing is served until "
                "the alias is set again",
                self.alias,
                self.model_name,
                self.current.version,
            )
        self.current = None
        if self.metrics is not None:
            self.metrics.model_unloaded(self.alias)
        self.not_ready_reason = (
            f"alias {self.alias} of model {self.model_name} is not set; promote a version to "
            f"{self.alias} and POST /reload"
        )
        return self._result(changed=changed, error=None)

    def reset(self) -> None:
        """Unload the model and forget failures, as if the server had just started."""
        self.current = None
        self.alias_version = None
        self.last_error = None
        self._failed_versions.clear()
        self.not_ready_reason = f"alias {self.alias} is not followed now"
        if self.metrics is not None:
            self.metrics.model_unloaded(self.alias)

    def _record_check_failure(self, err: Exception) -> dict[str, Any]:
        self.check_failures += 1
        self._consecutive_check_failures += 1
        if self.metrics is not None:
            self.metrics.alias_check_failures.labels(self.alias).inc()
        message = (
            f"resolving alias {self.alias} of {self.model_name} failed: {type(err).__name__}: {err}"
        )
        if self._consecutive_check_failures % CHECK_FAILURE_LOG_EVERY == 1:
            logger.error(
                "%s; still serving version %s (%d consecutive failed checks)",
                message,
                self.current.version if self.current else None,
                self._consecutive_check_failures,
            )
        self.last_error = {"version": None, "message": message, "at": _now()}
        if self.current is None:
            self.not_ready_reason = message
        return self._result(changed=False, error=message)

    def _record_load_failure(self, version: str, err: Exception) -> dict[str, Any]:
        self.load_failures += 1
        if self.metrics is not None:
            reason = "integrity" if isinstance(err, ModelIntegrityError) else "error"
            self.metrics.load_failures.labels(self.alias, reason).inc()
        previous = self._failed_versions.get(version)
        count = previous.count + 1 if previous else 1
        delay = min(self.poll_interval_s * 2 ** min(count, 16), MAX_RETRY_DELAY_S)
        message = f"loading {self.model_name} version {version} failed: {type(err).__name__}: {err}"
        self._failed_versions[version] = _LoadFailure(count, time.monotonic() + delay, message)
        logger.error(
            "%s; still serving version %s; failure %d of this version, next automatic retry in "
            "%.0f s",
            message,
            self.current.version if self.current else None,
            count,
            delay,
        )
        self.last_error = {"version": version, "message": message, "at": _now()}
        if self.current is None:
            self.not_ready_reason = message
        return self._result(changed=False, error=message)

    def _result(self, *, changed: bool, error: str | None) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "alias": self.alias,
            "alias_version": self.alias_version,
            "served_version": self.current.version if self.current else None,
            "changed": changed,
            "error": error,
        }

    def describe(self) -> dict[str, Any]:
        """Return the body of ``GET /version``."""
        current = self.current
        return {
            "model_name": self.model_name,
            "alias": self.alias,
            "version": current.version if current else None,
            "run_id": current.run_id if current else None,
            "loaded_at": current.loaded_at if current else None,
            "alias_version": self.alias_version,
            "last_error": self.last_error,
            "load_failures": self.load_failures,
            "check_failures": self.check_failures,
        }


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class ServerMetrics:
    """Prometheus metrics of one app, in a registry of its own; ``GET /metrics`` renders them."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ml_loop_serving_requests",
            "HTTP requests by endpoint, status code and the variant that served them",
            ["endpoint", "status", "variant"],
            registry=self.registry,
        )
        self.errors = Counter(
            "ml_loop_serving_errors",
            "HTTP responses with status >= 400 by endpoint, kind and variant",
            ["endpoint", "kind", "variant"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ml_loop_serving_request_duration_seconds",
            "Time from request start to the end of the response, by endpoint and variant",
            ["endpoint", "variant"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.predictions = Counter(
            "ml_loop_serving_predictions",
            "Predicted rows by model version, variant and predicted class",
            ["model_version", "variant", "predicted_class"],
            registry=self.registry,
        )
        self.confidence = Histogram(
            "ml_loop_serving_prediction_confidence",
            "Probability of the predicted class, per row, by variant",
            ["variant"],
            buckets=CONFIDENCE_BUCKETS,
            registry=self.registry,
        )
        self.model_loads = Counter(
            "ml_loop_serving_model_loads",
            "Versions loaded and swapped in, by alias",
            ["alias"],
            registry=self.registry,
        )
        self.load_failures = Counter(
            "ml_loop_serving_model_load_failures",
            "Versions that failed to load, by alias and reason (integrity: SHA-256 mismatch)",
            ["alias", "reason"],
            registry=self.registry,
        )
        self.alias_check_failures = Counter(
            "ml_loop_serving_alias_check_failures",
            "Failed lookups of the alias in the registry, by alias",
            ["alias"],
            registry=self.registry,
        )
        self.served_version = Gauge(
            "ml_loop_serving_served_version",
            "Version number served for the alias; 0 when none is loaded",
            ["alias"],
            registry=self.registry,
        )
        self.model_info = Gauge(
            "ml_loop_serving_model_info",
            "1 for the version served for each alias, with its run id",
            ["alias", "model_name", "version", "run_id"],
            registry=self.registry,
        )
        self.canary_share = Gauge(
            "ml_loop_serving_canary_share",
            "Share of /invocations requests routed to the challenger; 0 when the canary is off",
            registry=self.registry,
        )
        self.canary_agreement = Counter(
            "ml_loop_serving_canary_agreement_rows",
            "Rows scored by the challenger, by whether the champion predicts the same class",
            ["result"],
            registry=self.registry,
        )
        self._info_labels: dict[str, tuple[str, ...]] = {}
        for alias in (registry.CHAMPION, registry.CHALLENGER):
            self.served_version.labels(alias).set(0)
            self.model_loads.labels(alias)
            self.alias_check_failures.labels(alias)
            for reason in ("integrity", "error"):
                self.load_failures.labels(alias, reason)
        for result in ("agree", "disagree"):
            self.canary_agreement.labels(result)

    def model_loaded(self, alias: str, loaded: LoadedModel) -> None:
        self.model_loads.labels(alias).inc()
        self._set_info(alias, (alias, self.model_name, loaded.version, loaded.run_id))
        number = int(loaded.version) if loaded.version.isdigit() else 0
        self.served_version.labels(alias).set(number)

    def model_unloaded(self, alias: str) -> None:
        self._set_info(alias, None)
        self.served_version.labels(alias).set(0)

    def _set_info(self, alias: str, labels: tuple[str, ...] | None) -> None:
        old = self._info_labels.pop(alias, None)
        if old is not None:
            self.model_info.remove(*old)
        if labels is not None:
            self.model_info.labels(*labels).set(1)
            self._info_labels[alias] = labels

    def observe_rows(
        self, loaded: LoadedModel, variant: str, labels: list[str], confidences: list[float]
    ) -> None:
        for label, count in collections.Counter(labels).items():
            self.predictions.labels(loaded.version, variant, label).inc(count)
        histogram = self.confidence.labels(variant)
        for confidence in confidences:
            histogram.observe(confidence)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PredictionLogCollector(Collector):
    """Read the prediction log writer's counters at scrape time."""

    def __init__(self, writer: prediction_log.PredictionLogWriter) -> None:
        self.writer = writer

    def collect(self) -> Iterator[Any]:
        stats = self.writer.stats()
        written = CounterMetricFamily(
            "ml_loop_serving_prediction_log_records", "Prediction records written to the log"
        )
        written.add_metric([], stats.written_records)
        failures = CounterMetricFamily(
            "ml_loop_serving_prediction_log_write_failures",
            "Flushes of the prediction log that failed to write (their records are lost)",
        )
        failures.add_metric([], stats.write_failures)
        dropped = CounterMetricFamily(
            "ml_loop_serving_prediction_log_dropped_records",
            "Prediction records not logged, by reason (queue_full, write_failed)",
            labels=["reason"],
        )
        dropped.add_metric(["queue_full"], stats.dropped_queue_full)
        dropped.add_metric(["write_failed"], stats.dropped_write_failed)
        queued = GaugeMetricFamily(
            "ml_loop_serving_prediction_log_queued_records",
            "Prediction records waiting in the writer's queue",
        )
        queued.add_metric([], self.writer.queued_records)
        yield from (written, failures, dropped, queued)


class ServingConfigError(ValueError):
    """A setting of the model server is invalid, for example a public host without a token."""


def resolve_token(environ: Mapping[str, str] | None = None) -> str | None:
    """Return the bearer token from ``ML_LOOP_SERVING_TOKEN`` or the file in ``..._TOKEN_FILE``.

    Returns None when neither is set (an empty value counts as unset). Raises ServingConfigError
    when both are set, the file cannot be read or is empty, or the token is shorter than
    MIN_TOKEN_LENGTH characters. The error never contains the token.
    """
    environ = os.environ if environ is None else environ
    value = environ.get(TOKEN_ENV) or None
    path = environ.get(TOKEN_FILE_ENV) or None
    if value is not None and path is not None:
        raise ServingConfigError(
            f"both {TOKEN_ENV} and {TOKEN_FILE_ENV} are set; set only one of them"
        )
    source = TOKEN_ENV
    if path is not None:
        source = f"{TOKEN_FILE_ENV} ({path})"
        try:
            value = Path(path).read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ServingConfigError(
                f"{TOKEN_FILE_ENV}={path!r} cannot be read ({type(err).__name__}: {err}); "
                "point it at a file that contains the token"
            ) from err
        if not value:
            raise ServingConfigError(
                f"{TOKEN_FILE_ENV}={path!r} is empty; write the token into the file"
            )
    if value is None:
        return None
    value = value.strip()
    if len(value) < MIN_TOKEN_LENGTH:
        raise ServingConfigError(
            f"the token from {source} has {len(value)} characters; expected at least "
            f"{MIN_TOKEN_LENGTH}, for example from `python -c 'import secrets; "
            "print(secrets.token_urlsafe(32))'`"
        )
    return value


def check_bind_host(host: str, token: str | None) -> None:
    """Raise ServingConfigError when ``host`` is reachable from other machines without a token."""
    if token is None and host not in LOCAL_HOSTS:
        raise ServingConfigError(
            f"host {host!r} is rejected without a bearer token, because every client that "
            f"reaches that address could score, reload and read the metrics; set {TOKEN_ENV} "
            f"(or {TOKEN_FILE_ENV}) or bind to 127.0.0.1"
        )


class _AuthMiddleware:
    """Require ``Authorization: Bearer <token>`` on every path except the probes."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self._token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            message = (
                f"{scope['path']} requires the header 'Authorization: Bearer <token>'; the "
                f"token is the server's {TOKEN_ENV}"
            )
            challenge = 'Bearer realm="ml_loop"'
        elif hmac.compare_digest(credentials.strip().encode(), self._token):
            await self.app(scope, receive, send)
            return
        else:
            message = "the bearer token is invalid; send the server's token"
            challenge = 'Bearer realm="ml_loop", error="invalid_token"'
        response = JSONResponse(
            {"error_code": "UNAUTHORIZED", "message": message},
            status_code=401,
            headers={"WWW-Authenticate": challenge},
        )
        await response(scope, receive, send)


class _MetricsMiddleware:
    """Count every request and time it, with the variant the handler stored in its state."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            path = scope["path"]
            endpoint = path if path in KNOWN_PATHS else "other"
            variant = scope.get("state", {}).get("variant", "")
            metrics = self.metrics
            metrics.requests.labels(endpoint, str(status), variant).inc()
            metrics.latency.labels(endpoint, variant).observe(time.perf_counter() - started)
            if status >= 400:
                metrics.errors.labels(endpoint, _error_kind(status), variant).inc()


def _error_kind(status: int) -> str:
    if status == 401:
        return "unauthorized"
    if status in (404, 405):
        return "not_found"
    if status == 503:
        return "unavailable"
    if status >= 500:
        return "internal"
    return "invalid_input"


@dataclasses.dataclass(frozen=True)
class _Route:
    """The model that scores one request, its variant, and the champion to compare it with."""

    loaded: LoadedModel | None
    variant: str
    shadow: LoadedModel | None = None


class CanaryRouter:
    """Route a share of /invocations requests to the challenger alias while the canary is on.

    Routing is deterministic: of every run of requests, request ``n`` goes to the challenger
    when ``floor(n * share)`` grows, so the share is exact over any long run. Requests
    served by the challenger are also scored by the champion, to count how often they agree.
    """

    def __init__(
        self, champion: AliasFollower, challenger: AliasFollower, metrics: ServerMetrics
    ) -> None:
        self.champion = champion
        self.challenger = challenger
        self.metrics = metrics
        self.share = 0.0
        self._routed = 0
        self._poller: asyncio.Task[None] | None = None

    def route(self, forced: str | None) -> _Route:
        champion = self.champion.current
        if forced == CHALLENGER_VARIANT:
            return _Route(self.challenger.current, CHALLENGER_VARIANT)
        if forced == CHAMPION_VARIANT or self.share <= 0:
            return _Route(champion, CHAMPION_VARIANT)
        self._routed += 1
        count = self._routed
        if math.floor(count * self.share) == math.floor((count - 1) * self.share):
            return _Route(champion, CHAMPION_VARIANT)
        challenger = self.challenger.current
        if challenger is None or champion is None or challenger.version == champion.version:
            return _Route(champion, CHAMPION_VARIANT)
        return _Route(challenger, CHALLENGER_VARIANT, shadow=champion)

    async def enable(self, share: float) -> None:
        """Route ``share`` of the requests to the challenger, following its alias from now on."""
        self.share = share
        self._routed = 0
        self.metrics.canary_share.set(share)
        if self._poller is None:
            self._poller = asyncio.create_task(
                self.challenger.poll(), name=f"follow {self.challenger.alias}"
            )
        logger.info("canary on: %.3f of the requests go to %s", share, self.challenger.alias)

    async def disable(self) -> None:
        """Send every request to the champion and unload the challenger."""
        self.share = 0.0
        self.metrics.canary_share.set(0)
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        self.challenger.reset()
        logger.info("canary off: every request goes to %s", self.champion.alias)

    def describe(self) -> dict[str, Any]:
        champion = self.champion.current
        challenger = self.challenger.current
        return {
            "enabled": self.share > 0,
            "share": self.share,
            "champion_version": champion.version if champion else None,
            "challenger_alias": self.challenger.alias,
            "challenger_version": challenger.version if challenger else None,
            "challenger_alias_version": self.challenger.alias_version,
            "challenger_last_error": self.challenger.last_error,
        }


def _error_response(status_code: int, message: str, request_id: str | None = None) -> JSONResponse:
    error_code = {
        401: "UNAUTHORIZED",
        413: "REQUEST_TOO_LARGE",
        415: "UNSUPPORTED_MEDIA_TYPE",
        500: "INTERNAL_ERROR",
        503: "SERVICE_UNAVAILABLE",
    }.get(status_code, "BAD_REQUEST")
    body: dict[str, Any] = {"error_code": error_code, "message": message}
    headers = None
    if request_id is not None:
        body["request_id"] = request_id
        headers = {REQUEST_ID_HEADER: request_id}
    return JSONResponse(body, status_code=status_code, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = (
        f"request body is larger than {limit} bytes, the most that a batch of the maximum size "
        "can need; send fewer rows per request"
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise PayloadError(too_large, status_code=413)
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadError(too_large, status_code=413)
        chunks.append(chunk)
    return b"".join(chunks)


def _request_id(request: Request) -> str:
    """Return the client's X-Request-ID when it is a safe token, else a new random id."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    if REQUEST_ID_PATTERN.fullmatch(given):
        return given
    return uuid.uuid4().hex


def _media_type(request: Request) -> str:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == CSV_MEDIA_TYPE:
        return CSV_MEDIA_TYPE
    if media_type in ("", JSON_MEDIA_TYPE) or media_type.endswith("+json"):
        return JSON_MEDIA_TYPE
    raise PayloadError(
        f"Content-Type {content_type!r} is not supported; send {JSON_MEDIA_TYPE} (an MLflow "
        f"scoring payload) or {CSV_MEDIA_TYPE}",
        status_code=415,
    )


def _parse_request(
    body: bytes, media_type: str, contract: InputContract, request_id: str
) -> tuple[np.ndarray, list[str]]:
    if media_type == CSV_MEDIA_TYPE:
        features, given_ids = features_from_csv(body, contract)
        if given_ids is not None:
            return features, row_ids(given_ids, len(features), request_id)
        return features, row_ids(None, len(features), request_id)
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise PayloadError(
            f'request body is not valid JSON ({err}); send a JSON object such as {{"inputs": '
            "[[...], ...]}",
            status_code=400,
        ) from err
    features = features_from_payload(payload, contract)
    return features, row_ids(payload.get(IDS_KEY), len(features), request_id)


@dataclasses.dataclass(frozen=True)
class _ScoringContext:
    """Settings of the app that every scoring call needs."""

    model_name: str
    max_batch_size: int
    metrics: ServerMetrics
    writer: prediction_log.PredictionLogWriter | None


def _score(
    context: _ScoringContext,
    route: _Route,
    body: bytes,
    media_type: str,
    request_id: str,
) -> dict[str, Any]:
    """Validate, predict, count and log one request; runs in a worker thread."""
    loaded = route.loaded
    assert loaded is not None
    label = f"model {context.model_name} version {loaded.version}"
    contract = InputContract.from_config(loaded.config, context.max_batch_size, label)
    features, ids = _parse_request(body, media_type, contract, request_id)
    probabilities = predict_proba(loaded.model, torch.from_numpy(features))
    classes = loaded.config["classes"]
    confidences, indices = probabilities.max(dim=1)
    labels = [classes[i] for i in indices.tolist()]
    confidence_list = confidences.tolist()
    probability_rows = probabilities.tolist()
    context.metrics.observe_rows(loaded, route.variant, labels, confidence_list)
    if route.shadow is not None:
        champion_indices = predict_proba(route.shadow.model, torch.from_numpy(features)).argmax(1)
        agree = int((champion_indices == indices).sum())
        context.metrics.canary_agreement.labels("agree").inc(agree)
        context.metrics.canary_agreement.labels("disagree").inc(len(labels) - agree)
    if context.writer is not None:
        _log_predictions(
            context, loaded, route.variant, request_id, ids, features, contract, labels,
            confidence_list, probability_rows,
        )  # fmt: skip
    return {
        "predictions": labels,
        "probabilities": probability_rows,
        "model_version": loaded.version,
        "variant": route.variant,
        "request_id": request_id,
        "ids": ids,
    }


def _log_predictions(
    context: _ScoringContext,
    loaded: LoadedModel,
    variant: str,
    request_id: str,
    ids: list[str],
    features: np.ndarray,
    contract: InputContract,
    labels: list[str],
    confidences: list[float],
    probabilities: list[list[float]],
) -> None:
    now = dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")
    inline = None if contract.is_image else features.tolist()
    records = [
        {
            "id": ids[row],
            "request_id": request_id,
            "row": row,
            "time": now,
            "model_name": context.model_name,
            "model_version": loaded.version,
            "variant": variant,
            "prediction": labels[row],
            "confidence": confidences[row],
            "probabilities": probabilities[row],
            "inputs": None if inline is None else inline[row],
            "input_ref": None,
        }
        for row in range(len(labels))
    ]
    inputs = features if contract.is_image else None
    assert context.writer is not None
    context.writer.submit(prediction_log.PredictionBatch(records, inputs))


def create_app(
    model_name: str,
    alias: str = registry.CHAMPION,
    *,
    tracking_uri: str | None = None,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    torch_threads: int | None = None,
    token: str | None = None,
    prediction_log_dir: str | Path | None = None,
    prediction_log_options: Mapping[str, Any] | None = None,
    canary_share: float = 0.0,
    challenger_alias: str = registry.CHALLENGER,
) -> FastAPI:
    """Build the model server for ``model_name@alias``.

    ``torch_threads`` sets torch's intra-op thread count for the whole process when given, so the
    server leaves cores to other work on the same machine. With ``token``, every endpoint except
    ``/health`` and ``/ready`` requires ``Authorization: Bearer <token>``. With
    ``prediction_log_dir``, every prediction is written to the prediction log there
    (``prediction_log_options`` go to ``PredictionLogWriter``). ``canary_share`` > 0 starts with
    that share of the requests routed to ``challenger_alias``.
    """
    if poll_interval_s <= 0:
        raise ValueError(f"poll_interval_s={poll_interval_s!r} is invalid; expected seconds > 0")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size!r} is invalid; expected an integer >= 1")
    _check_share(canary_share, "canary_share", allow_zero=True)
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise ServingConfigError(
            f"the token has {len(token)} characters; expected at least {MIN_TOKEN_LENGTH}"
        )
    metrics = ServerMetrics(model_name)
    follower = AliasFollower(model_name, alias, tracking_uri, poll_interval_s, metrics)
    challenger = AliasFollower(model_name, challenger_alias, tracking_uri, poll_interval_s, metrics)
    router = CanaryRouter(follower, challenger, metrics)
    writer = None
    if prediction_log_dir is not None:
        writer = prediction_log.PredictionLogWriter(
            prediction_log_dir, model_name, **dict(prediction_log_options or {})
        )
        metrics.registry.register(_PredictionLogCollector(writer))
    context = _ScoringContext(model_name, max_batch_size, metrics, writer)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        logger.info(
            "model server starting: following %s@%s every %.1f s, max batch %d, %d torch "
            "threads, bearer-token auth %s, prediction log %s",
            model_name,
            alias,
            poll_interval_s,
            max_batch_size,
            torch.get_num_threads(),
            "on" if token else "off",
            writer.model_dir if writer else "off",
        )
        if writer is not None:
            writer.start()
        poller = asyncio.create_task(follower.poll(), name=f"follow {model_name}@{alias}")
        if canary_share > 0:
            await router.enable(canary_share)
        try:
            yield
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            await router.disable()
            if writer is not None:
                await asyncio.to_thread(writer.close)
            logger.info("model server stopped: %s@%s", model_name, alias)

    # The generated API docs would need the token too; with auth on they are left out.
    docs = {} if token is None else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title=f"ml_loop model server: {model_name}@{alias}", lifespan=lifespan, **docs)
    app.state.follower = follower
    app.state.router = router
    app.state.metrics = metrics
    app.state.prediction_log = writer
    if token is not None:
        app.add_middleware(_AuthMiddleware, token=token)
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        current = follower.current
        if current is None:
            return JSONResponse(
                {"status": "not ready", "reason": follower.not_ready_reason}, status_code=503
            )
        return JSONResponse(
            {"status": "ready", "model_name": model_name, "version": current.version}
        )

    @app.get("/version")
    async def version() -> dict[str, Any]:
        return {**follower.describe(), "canary": router.describe()}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/reload")
    async def reload() -> JSONResponse:
        result = await follower.check(retry_failed=True)
        if router.share > 0:
            result["challenger"] = await challenger.check(retry_failed=True)
        return JSONResponse(result, status_code=200 if result["error"] is None else 503)

    @app.get("/canary")
    async def canary_state() -> dict[str, Any]:
        return router.describe()

    @app.post("/canary")
    async def canary_on(request: Request) -> JSONResponse:
        try:
            body = json.loads(await _read_body(request, MIN_BODY_LIMIT_BYTES))
            if not isinstance(body, dict) or "share" not in body:
                raise PayloadError('request body must be {"share": s} with 0 < s <= 1')
            share = _check_share(body["share"], "share", allow_zero=False)
        except (ValueError, RecursionError) as err:
            message = err.message if isinstance(err, PayloadError) else f"invalid JSON: {err}"
            return _error_response(422, message)
        await router.enable(share)
        result = await challenger.check(retry_failed=True)
        state = router.describe()
        if challenger.current is None:
            await router.disable()
            error = result["error"] or challenger.not_ready_reason
            return JSONResponse({**state, "enabled": False, "error": error}, status_code=503)
        return JSONResponse(state)

    @app.delete("/canary")
    async def canary_off() -> dict[str, Any]:
        await router.disable()
        return router.describe()

    @app.post("/invocations")
    async def invocations(request: Request) -> JSONResponse:
        request_id = _request_id(request)
        forced = request.query_params.get("variant")
        if forced not in (None, CHAMPION_VARIANT, CHALLENGER_VARIANT):
            return _error_response(
                422,
                f"query parameter variant={forced!r} is invalid; expected {CHAMPION_VARIANT} or "
                f"{CHALLENGER_VARIANT}, or leave it out to let the canary route the request",
                request_id,
            )
        # Routing reads each model reference once, so this request finishes on the models it
        # got even if a swap happens meanwhile.
        route = router.route(forced)
        request.state.variant = route.variant
        loaded = route.loaded
        if loaded is None:
            followed = challenger if route.variant == CHALLENGER_VARIANT else follower
            return _error_response(503, followed.not_ready_reason, request_id)
        label = f"model {model_name} version {loaded.version}"
        body_limit = InputContract.from_config(
            loaded.config, max_batch_size, label
        ).max_body_bytes()
        try:
            media_type = _media_type(request)
            body = await _read_body(request, body_limit)
            result = await run_in_threadpool(_score, context, route, body, media_type, request_id)
            # Rendering is inside the try because a non-finite probability fails JSON encoding.
            return JSONResponse(result, headers={REQUEST_ID_HEADER: request_id})
        except PayloadError as err:
            logger.info("rejected invocation %s (%d): %s", request_id, err.status_code, err.message)
            return _error_response(err.status_code, err.message, request_id)
        except Exception as err:
            logger.exception(
                "scoring request %s with %s version %s failed", request_id, model_name,
                loaded.version,
            )  # fmt: skip
            return _error_response(
                500,
                f"scoring with version {loaded.version} failed: {type(err).__name__}: {err}",
                request_id,
            )

    return app


def _check_share(value: Any, name: str, *, allow_zero: bool) -> float:
    low = "0 <=" if allow_zero else "0 <"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PayloadError(f"{name}={value!r} is invalid; expected a number with {low} {name} <= 1")
    if not (0 <= value <= 1) or (value == 0 and not allow_zero):
        raise PayloadError(f"{name}={value!r} is invalid; expected {low} {name} <= 1")
    return float(value)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the model server with uvicorn, one worker process."""
    import uvicorn

    parser = _argument_parser()
    args = parser.parse_args(argv)
    try:
        token = resolve_token()
        check_bind_host(args.host, token)
        _check_share(args.canary_share, "--canary-share", allow_zero=True)
    except (ServingConfigError, PayloadError) as err:
        parser.error(str(err))
    log_dir = None
    if not args.no_prediction_log:
        log_dir = args.prediction_log_dir or prediction_log.default_log_dir()

    # MLflow's client retries a failed request 7 times by default, which can hold one alias
    # check and POST /reload for minutes while the tracking server is down. The poller retries
    # on its own, so the server keeps MLflow's retries short unless the environment sets them.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if log_dir is None and not args.no_prediction_log:
        logger.warning(
            "prediction log is off: set --prediction-log-dir, %s or %s",
            prediction_log.LOG_DIR_ENV,
            DATA_DIR_ENV,
        )
    try:
        app = create_app(
            args.model_name,
            args.alias,
            tracking_uri=args.tracking_uri,
            poll_interval_s=args.poll_interval,
            max_batch_size=args.max_batch_size,
            torch_threads=args.torch_threads,
            token=token,
            prediction_log_dir=log_dir,
            prediction_log_options={
                "flush_records": args.prediction_log_flush_records,
                "flush_interval_s": args.prediction_log_flush_interval,
                "max_queued_records": args.prediction_log_max_queued,
            },
            canary_share=args.canary_share,
            challenger_alias=args.challenger_alias,
        )
    except ValueError as err:
        parser.error(str(err))
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        workers=1,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
    )


def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ml_loop.serving",
        description=(
            "Serve the version an MLflow alias points to, following the alias. The bearer token "
            f"comes from ${TOKEN_ENV} or the file named by ${TOKEN_FILE_ENV}; without one the "
            "server binds only to localhost."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model-name", required=True, help="registered model name")
    parser.add_argument("--alias", default=registry.CHAMPION, help="alias to follow")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=8000, help="port to bind")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=DEFAULT_POLL_INTERVAL_S,
        help="seconds between alias checks",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help="maximum rows in one request",
    )
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=DEFAULT_TORCH_THREADS,
        help="torch intra-op threads, kept small so the server leaves cores to training",
    )
    parser.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI; when omitted, MLflow reads $MLFLOW_TRACKING_URI",
    )
    parser.add_argument(
        "--canary-share",
        type=float,
        default=0.0,
        help="share of /invocations requests (0 to 1) routed to the challenger alias at start",
    )
    parser.add_argument(
        "--challenger-alias",
        default=registry.CHALLENGER,
        help="alias the canary routes to",
    )
    parser.add_argument(
        "--prediction-log-dir",
        type=Path,
        default=None,
        help=(
            f"folder of the prediction log; default ${prediction_log.LOG_DIR_ENV}, else "
            f"${DATA_DIR_ENV}/predictions, else the log is off"
        ),
    )
    parser.add_argument("--no-prediction-log", action="store_true", help="log no predictions")
    parser.add_argument(
        "--prediction-log-flush-records",
        type=int,
        default=prediction_log.DEFAULT_FLUSH_RECORDS,
        help="write the prediction log when this many records are queued",
    )
    parser.add_argument(
        "--prediction-log-flush-interval",
        type=float,
        default=prediction_log.DEFAULT_FLUSH_INTERVAL_S,
        help="seconds between writes of the prediction log",
    )
    parser.add_argument(
        "--prediction-log-max-queued",
        type=int,
        default=prediction_log.DEFAULT_MAX_QUEUED_RECORDS,
        help="records the prediction log queues before it drops new ones",
    )
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")
    return parser


if __name__ == "__main__":
    main()
