"""Model server that serves the version an MLflow alias points to and follows the alias.

A background task in the app's lifespan checks the alias (``champion`` by default) every
``poll_interval_s`` seconds. When the alias points to a new version, the server loads it in a
worker thread with ``registry.load_model``, which verifies the weights' SHA-256, and then swaps
one reference. Each request reads that reference once, so a request that started on the old model
finishes on it and no request fails during a swap. A version that fails to load is logged,
counted and reported by ``GET /version``, and the previous model keeps serving. When the alias is
removed, the server unloads its model and ``/ready`` returns 503.

Endpoints:

- ``GET /health``: 200 while the process is up.
- ``GET /ready``: 200 when a model is loaded, else 503 with the reason.
- ``GET /version``: model name, alias, served version, run id, load time and the last error.
- ``POST /reload``: check the alias now and return once the check has finished; 200 when the
  server serves what the alias points to, 503 with the error otherwise.
- ``POST /invocations``: MLflow scoring payloads, one of ``{"inputs": rows}``,
  ``{"instances": rows}``, and for tabular models ``{"dataframe_split": {"columns": [...],
  "data": [[...], ...]}}`` or ``{"dataframe_records": [{column: value}, ...]}``. Image rows have
  shape ``(n, C, H, W)`` or are flat ``(n, C*H*W)``; tabular rows have shape ``(n, F)``. Values are
  raw features, as in the training data. The response is ``{"predictions": [label, ...],
  "probabilities": [[p, ...], ...], "model_version": "N"}``. Invalid input returns 400 (malformed
  body) or 422 (invalid values) with a message naming the field and the expected form. A body
  larger than a maximum-size batch could need returns 413, and 503 means no model is loaded.

Run it with ``python -m ml_loop.serving --model-name NAME``; ``--help`` lists the options. The
tracking server comes from ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from torch import nn

from ml_loop import registry
from ml_loop.models import predict_proba

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
    order = _column_order(columns, "dataframe_split.columns", contract)
    rows = value["data"]
    field = "dataframe_split.data"
    _check_batch(rows, field, contract)

    def describe(index: Sequence[int]) -> str:
        text = _index_describer(field)(index)
        if len(index) == 2 and index[1] < len(columns):
            text += f" (column {columns[index[1]]!r})"
        return text

    array = _numbers(rows, field, contract, describe)
    if array.ndim != 2 or array.shape[1] != len(columns):
        raise PayloadError(
            f"{field} has shape {array.shape}; expected (n, {len(columns)}), one value per name "
            "in dataframe_split.columns"
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
        self, model_name: str, alias: str, tracking_uri: str | None, poll_interval_s: float
    ) -> None:
        self.model_name = model_name
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
        self.not_ready_reason = (
            f"alias {self.alias} of model {self.model_name} is not set; promote a version to "
            f"{self.alias} and POST /reload"
        )
        return self._result(changed=changed, error=None)

    def _record_check_failure(self, err: Exception) -> dict[str, Any]:
        self.check_failures += 1
        self._consecutive_check_failures += 1
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


def _error_response(status_code: int, message: str) -> JSONResponse:
    error_code = {
        413: "REQUEST_TOO_LARGE",
        500: "INTERNAL_ERROR",
        503: "SERVICE_UNAVAILABLE",
    }.get(status_code, "BAD_REQUEST")
    return JSONResponse({"error_code": error_code, "message": message}, status_code=status_code)


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


def _score(
    loaded: LoadedModel, body: bytes, model_name: str, max_batch_size: int
) -> dict[str, Any]:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError) as err:
        raise PayloadError(
            f'request body is not valid JSON ({err}); send a JSON object such as {{"inputs": '
            "[[...], ...]}",
            status_code=400,
        ) from err
    label = f"model {model_name} version {loaded.version}"
    contract = InputContract.from_config(loaded.config, max_batch_size, label)
    features = features_from_payload(payload, contract)
    probabilities = predict_proba(loaded.model, torch.from_numpy(features))
    classes = loaded.config["classes"]
    return {
        "predictions": [classes[i] for i in probabilities.argmax(dim=1).tolist()],
        "probabilities": probabilities.tolist(),
        "model_version": loaded.version,
    }


def create_app(
    model_name: str,
    alias: str = registry.CHAMPION,
    *,
    tracking_uri: str | None = None,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    torch_threads: int | None = None,
) -> FastAPI:
    """Build the model server for ``model_name@alias``.

    ``torch_threads`` sets torch's intra-op thread count for the whole process when given, so the
    server leaves cores to other work on the same machine.
    """
    if poll_interval_s <= 0:
        raise ValueError(f"poll_interval_s={poll_interval_s!r} is invalid; expected seconds > 0")
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size!r} is invalid; expected an integer >= 1")
    follower = AliasFollower(model_name, alias, tracking_uri, poll_interval_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        logger.info(
            "model server starting: following %s@%s every %.1f s, max batch %d, %d torch threads",
            model_name,
            alias,
            poll_interval_s,
            max_batch_size,
            torch.get_num_threads(),
        )
        poller = asyncio.create_task(follower.poll(), name=f"follow {model_name}@{alias}")
        try:
            yield
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            logger.info("model server stopped: %s@%s", model_name, alias)

    app = FastAPI(title=f"ml_loop model server: {model_name}@{alias}", lifespan=lifespan)
    app.state.follower = follower

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
        return follower.describe()

    @app.post("/reload")
    async def reload() -> JSONResponse:
        result = await follower.check(retry_failed=True)
        return JSONResponse(result, status_code=200 if result["error"] is None else 503)

    @app.post("/invocations")
    async def invocations(request: Request) -> JSONResponse:
        # Read the reference once: this request finishes on this model even if a swap happens.
        loaded = follower.current
        if loaded is None:
            return _error_response(503, follower.not_ready_reason)
        label = f"model {model_name} version {loaded.version}"
        body_limit = InputContract.from_config(
            loaded.config, max_batch_size, label
        ).max_body_bytes()
        try:
            body = await _read_body(request, body_limit)
            result = await run_in_threadpool(_score, loaded, body, model_name, max_batch_size)
            # Rendering is inside the try because a non-finite probability fails JSON encoding.
            return JSONResponse(result)
        except PayloadError as err:
            logger.info("rejected invocation (%d): %s", err.status_code, err.message)
            return _error_response(err.status_code, err.message)
        except Exception as err:
            logger.exception("scoring with %s version %s failed", model_name, loaded.version)
            return _error_response(
                500, f"scoring with version {loaded.version} failed: {type(err).__name__}: {err}"
            )

    return app


def main(argv: Sequence[str] | None = None) -> None:
    """Run the model server with uvicorn, one worker process."""
    import uvicorn

    parser = argparse.ArgumentParser(
        prog="python -m ml_loop.serving",
        description="Serve the version an MLflow alias points to, following the alias.",
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
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")
    args = parser.parse_args(argv)

    # MLflow's client retries a failed request 7 times by default, which can hold one alias
    # check and POST /reload for minutes while the tracking server is down. The poller retries
    # on its own, so the server keeps MLflow's retries short unless the environment sets them.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = create_app(
        args.model_name,
        args.alias,
        tracking_uri=args.tracking_uri,
        poll_interval_s=args.poll_interval,
        max_batch_size=args.max_batch_size,
        torch_threads=args.torch_threads,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        workers=1,
        log_level=args.log_level,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
