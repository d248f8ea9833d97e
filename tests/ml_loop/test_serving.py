"""Model server tests: the real server in a uvicorn subprocess, following real registry aliases."""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from prometheus_client.parser import text_string_to_metric_families

from ml_loop import models, prediction_log, registry, serving
from servers import REPO_ROOT, free_port, wait_for_http

TABULAR_CONFIG = models.model_config(
    "mlp", {"hidden_units": [8]}, [4], ["a", "b", "c"], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 2.0]
)
IMAGE_CONFIG = models.model_config(
    "cnn",
    {"channels": [4, 8], "hidden_units": 16, "dropout": 0.0},
    [1, 8, 8],
    ["zero", "one", "two"],
    [0.5],
    [0.25],
)
PASSED = {"passed": True, "candidate": {"accuracy": 0.95}, "reasons": []}
TABULAR_BATCH_LIMIT = 8


def promote_version(
    tracking_uri: str,
    model_name: str,
    config: dict[str, Any],
    tmp_path: Path,
    seed: int,
    *,
    tamper: bool = False,
    promote: bool = True,
) -> tuple[str, torch.nn.Module]:
    """Log a run with real weights, register it as the champion; return its version and model.

    With ``promote`` false, the version becomes only the challenger.

    With ``tamper``, the uploaded state_dict is another model's while the SHA-256 tag keeps the
    original's, as if the artifact had been replaced after training.
    """
    torch.manual_seed(seed)
    model = models.build_model(config).eval()
    weights_dir = tmp_path / f"weights-{uuid.uuid4().hex[:8]}"
    sha = models.save_weights(model, config, weights_dir)
    if tamper:
        torch.manual_seed(seed + 1000)
        models.save_weights(models.build_model(config), config, weights_dir)
    client = MlflowClient(tracking_uri)
    run_id = client.create_run("0").info.run_id
    client.log_artifacts(run_id, str(weights_dir), models.WEIGHTS_ARTIFACT_DIR)
    client.set_tag(run_id, models.WEIGHTS_SHA_TAG, sha)
    client.set_terminated(run_id)
    reg = registry.register_candidate(
        model_name, {"run_id": run_id}, PASSED, promote_on_pass=promote, tracking_uri=tracking_uri
    )
    return reg.version, model


@contextlib.contextmanager
def run_model_server(
    model_name: str,
    tracking_uri: str,
    log_dir: Path,
    *,
    poll_interval_s: float = 3600,
    max_batch_size: int = 1024,
    extra_args: tuple[str, ...] = (),
    extra_env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Start ``python -m ml_loop.serving`` on a free port; yield its URL; stop it by its pid."""
    port = free_port()
    log_path = log_dir / f"serving-{model_name}-{port}.log"
    command = [
        sys.executable,
        "-m",
        "ml_loop.serving",
        "--model-name",
        model_name,
        "--port",
        str(port),
        "--poll-interval",
        str(poll_interval_s),
        "--max-batch-size",
        str(max_batch_size),
        "--torch-threads",
        "1",
        *extra_args,
    ]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONPATH": str(REPO_ROOT / "include"),
        **(extra_env or {}),
    }
    for name in ("ML_LOOP_SERVING_TOKEN", "ML_LOOP_SERVING_TOKEN_FILE"):
        if name not in (extra_env or {}):
            env.pop(name, None)
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process, log_path, timeout_s=120)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def serve_in_thread(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn in a thread of this process, so a test can reach its state."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port()))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "the in-process server to start")
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until(check: Callable[[], Any], description: str, timeout_s: float = 60) -> Any:
    """Call ``check`` until it returns a truthy value; fail naming ``description`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {description}")
        time.sleep(0.2)


def invoke(url: str, payload: Any) -> httpx.Response:
    return httpx.post(f"{url}/invocations", json=payload, timeout=30)


def invoke_raw(url: str, body: bytes) -> httpx.Response:
    headers = {"content-type": "application/json"}
    return httpx.post(f"{url}/invocations", content=body, headers=headers, timeout=30)


def offline_predictions(model: torch.nn.Module, x: np.ndarray, classes: list[str]) -> tuple:
    probabilities = models.predict_proba(model, torch.from_numpy(x))
    labels = [classes[i] for i in probabilities.argmax(dim=1).tolist()]
    return labels, probabilities.numpy()


@pytest.fixture(scope="module")
def tabular_server(
    mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, torch.nn.Module]]:
    """A server whose tabular champion, version 1, exists before it starts."""
    tmp_path = tmp_path_factory.mktemp("tabular-server")
    model_name = f"serve-mlp-{uuid.uuid4().hex[:8]}"
    version, model = promote_version(mlflow_server, model_name, TABULAR_CONFIG, tmp_path, seed=3)
    assert version == "1"
    with run_model_server(
        model_name,
        mlflow_server,
        tmp_path,
        max_batch_size=TABULAR_BATCH_LIMIT,
        extra_args=("--no-prediction-log",),
    ) as url:
        wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200, "the tabular champion")
        yield url, model


@pytest.fixture(scope="module")
def image_server(
    mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, torch.nn.Module, str]]:
    tmp_path = tmp_path_factory.mktemp("image-server")
    model_name = f"serve-cnn-{uuid.uuid4().hex[:8]}"
    _, model = promote_version(mlflow_server, model_name, IMAGE_CONFIG, tmp_path, seed=4)
    with run_model_server(
        model_name, mlflow_server, tmp_path, extra_args=("--no-prediction-log",)
    ) as url:
        wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200, "the image champion")
        yield url, model, model_name


@pytest.fixture(scope="module")
def following_server(
    mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A server that checks its alias only on POST /reload; each test promotes its own start."""
    tmp_path = tmp_path_factory.mktemp("following-server")
    model_name = f"serve-follow-{uuid.uuid4().hex[:8]}"
    with run_model_server(
        model_name, mlflow_server, tmp_path, extra_args=("--no-prediction-log",)
    ) as url:
        yield {"url": url, "model_name": model_name, "tmp_path": tmp_path}


def reload(url: str) -> httpx.Response:
    return httpx.post(f"{url}/reload", timeout=60)


def metric_samples(text: str) -> list[Any]:
    """Parse Prometheus exposition text into its samples."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def sample_value(samples: list[Any], name: str, labels: dict[str, str] | None = None) -> float:
    """Sum the samples called ``name`` whose labels include ``labels``."""
    wanted = (labels or {}).items()
    return sum(s.value for s in samples if s.name == name and wanted <= s.labels.items())


def test_ready_follows_champion(mlflow_server: str, tmp_path: Path) -> None:
    model_name = f"serve-ready-{uuid.uuid4().hex[:8]}"
    with run_model_server(model_name, mlflow_server, tmp_path, poll_interval_s=0.5) as url:
        before = httpx.get(f"{url}/ready")
        scoring_before = invoke(url, {"inputs": [[1.0, 2.0, 3.0, 4.0]]})
        version, _ = promote_version(mlflow_server, model_name, TABULAR_CONFIG, tmp_path, seed=1)
        after = wait_until(
            lambda: (response := httpx.get(f"{url}/ready")).status_code == 200 and response,
            "the poller to load the new champion",
        )
        described = httpx.get(f"{url}/version").json()

    assert before.status_code == 503
    assert "alias champion" in before.json()["reason"]
    assert scoring_before.status_code == 503
    assert after.json()["version"] == version
    assert described["model_name"] == model_name
    assert described["alias"] == "champion"
    assert described["version"] == version
    assert described["run_id"]
    assert described["loaded_at"]
    assert described["last_error"] is None


def test_health(tabular_server: tuple[str, torch.nn.Module]) -> None:
    url, _ = tabular_server

    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


def test_predictions_match_offline(tabular_server: tuple[str, torch.nn.Module]) -> None:
    url, model = tabular_server
    x = (np.random.default_rng(0).random((6, 4)) * 5).astype(np.float32)

    response = invoke(url, {"inputs": x.tolist()})

    labels, probabilities = offline_predictions(model, x, TABULAR_CONFIG["classes"])
    body = response.json()
    assert response.status_code == 200
    assert body["model_version"] == "1"
    assert body["predictions"] == labels
    assert np.allclose(body["probabilities"], probabilities, atol=1e-6)


def test_payload_formats_agree(tabular_server: tuple[str, torch.nn.Module]) -> None:
    url, _ = tabular_server
    x = (np.random.default_rng(1).random((5, 4)) * 5).astype(np.float32).tolist()
    columns = ["f0", "f1", "f2", "f3"]
    payloads = {
        "instances": {"instances": x},
        "dataframe_split": {"dataframe_split": {"columns": columns, "data": x}},
        "dataframe_records": {
            "dataframe_records": [dict(zip(columns, row, strict=True)) for row in x]
        },
    }

    reference = invoke(url, {"inputs": x}).json()

    for name, payload in payloads.items():
        body = invoke(url, payload).json()
        assert body["predictions"] == reference["predictions"], name
        assert np.allclose(body["probabilities"], reference["probabilities"]), name


TABULAR_BAD_INPUTS = [
    ("wrong shape", {"inputs": [[1, 2, 3]]}, 422, ["inputs has shape (1, 3)", "expected (n, 4)"]),
    ("one row unbatched", {"inputs": [1, 2, 3, 4]}, 422, ["inputs has shape (4,)"]),
    ("string value", {"inputs": [[1, "x", 3, 4]]}, 422, ['inputs[0][1] is "x"', "a number"]),
    ("null value", {"inputs": [[1, 2, None, 4]]}, 422, ["inputs[0][2] is null"]),
    ("boolean value", {"inputs": [[True, False, True, True]]}, 422, ["inputs[0][0] is true"]),
    ("NaN", b'{"inputs": [[1, NaN, 3, 4]]}', 422, ["inputs[0][1] is not a finite number"]),
    ("infinity", b'{"inputs": [[1e400, 2, 3, 4]]}', 422, ["inputs[0][0] is not a finite"]),
    ("float32 overflow", {"inputs": [[1, 2, 3, 1e39]]}, 422, ["inputs[0][3]", "float32 range"]),
    ("ragged", {"inputs": [[1, 2, 3, 4], [1, 2]]}, 422, ["inputs is not a rectangular array"]),
    ("empty", {"inputs": []}, 422, ["inputs is empty", "(n, 4)"]),
    ("too large", {"inputs": [[1, 2, 3, 4]] * 9}, 422, ["9 rows", "maximum batch size 8"]),
    ("not an array", {"inputs": 5}, 422, ["inputs must be a JSON array", "got a JSON number"]),
    ("instances shape", {"instances": [[1, 2]]}, 422, ["instances has shape (1, 2)"]),
    ("missing key", {"rows": [[1, 2, 3, 4]]}, 400, ["no input key", "['rows']", "inputs"]),
    ("two keys", {"inputs": [[1, 2, 3, 4]], "instances": [[1, 2, 3, 4]]}, 400, ["exactly one"]),
    ("not JSON", b'{"inputs": [[1, 2', 400, ["not valid JSON"]),
    ("JSON nested too deep", b"[" * 100_000 + b"]" * 100_000, 400, ["not valid JSON"]),
    ("not an object", [[1, 2, 3, 4]], 400, ["must be a JSON object", "got a JSON array"]),
    (
        "split without data",
        {"dataframe_split": {"columns": ["a", "b", "c", "d"]}},
        422,
        ["dataframe_split.data is missing", '"columns"'],
    ),
    (
        "split column count",
        {"dataframe_split": {"columns": ["a", "b", "c"], "data": [[1, 2, 3]]}},
        422,
        ["dataframe_split.columns names 3 columns", "expected 4"],
    ),
    (
        "split string value",
        {"dataframe_split": {"columns": ["a", "b", "c", "d"], "data": [[1, 2, "x", 4]]}},
        422,
        ["dataframe_split.data[0][2] (column 'c') is \"x\""],
    ),
    (
        "split duplicate column",
        {"dataframe_split": {"columns": ["a", "a", "c", "d"], "data": [[1, 2, 3, 4]]}},
        422,
        ["dataframe_split.columns names ['a'] more than once"],
    ),
    (
        "records columns differ",
        {"dataframe_records": [{"a": 1, "b": 2, "c": 3, "d": 4}, {"a": 1, "b": 2, "c": 3}]},
        422,
        ["dataframe_records[1] has columns ['a', 'b', 'c']"],
    ),
    (
        "records string value",
        {"dataframe_records": [{"a": 1, "b": "x", "c": 3, "d": 4}]},
        422,
        ['dataframe_records[0].b is "x"'],
    ),
    ("records empty", {"dataframe_records": []}, 422, ["dataframe_records is empty"]),
]


@pytest.mark.parametrize(
    ("payload", "status", "fragments"),
    [case[1:] for case in TABULAR_BAD_INPUTS],
    ids=[case[0] for case in TABULAR_BAD_INPUTS],
)
def test_bad_input_rejected(
    tabular_server: tuple[str, torch.nn.Module],
    payload: Any,
    status: int,
    fragments: list[str],
) -> None:
    url, _ = tabular_server

    response = invoke_raw(url, payload) if isinstance(payload, bytes) else invoke(url, payload)

    message = response.json()["message"]
    assert response.status_code == status
    for fragment in fragments:
        assert fragment in message
    assert httpx.get(f"{url}/health").status_code == 200


def test_oversized_body_rejected(tabular_server: tuple[str, torch.nn.Module]) -> None:
    url, _ = tabular_server
    body = b'{"inputs": [' + b" " * (3 << 20) + b"]}"

    response = invoke_raw(url, body)

    assert response.status_code == 413
    assert "request body is larger than" in response.json()["message"]


def test_image_rows_flat_or_shaped(image_server: tuple[str, torch.nn.Module, str]) -> None:
    url, model, _ = image_server
    x = np.random.default_rng(2).random((4, 1, 8, 8)).astype(np.float32)

    shaped = invoke(url, {"inputs": x.tolist()}).json()
    flat = invoke(url, {"inputs": x.reshape(4, 64).tolist()}).json()

    labels, probabilities = offline_predictions(model, x, IMAGE_CONFIG["classes"])
    assert shaped["predictions"] == labels
    assert np.allclose(shaped["probabilities"], probabilities, atol=1e-6)
    assert flat["predictions"] == labels
    assert np.allclose(flat["probabilities"], probabilities, atol=1e-6)


def test_image_wrong_shape_message(image_server: tuple[str, torch.nn.Module, str]) -> None:
    url, _, model_name = image_server

    response = invoke(url, {"inputs": np.zeros((2, 7, 8)).tolist()})

    assert response.status_code == 422
    assert response.json()["message"] == (
        f"inputs has shape (2, 7, 8); expected (n, 1, 8, 8) or (n, 64) for model {model_name} "
        "version 1"
    )


def test_image_dataframe_rejected(image_server: tuple[str, torch.nn.Module, str]) -> None:
    url, _, _ = image_server
    payload = {"dataframe_split": {"columns": ["p0"], "data": [[0.5]]}}

    response = invoke(url, payload)

    assert response.status_code == 422
    assert "accepted only by tabular models" in response.json()["message"]


def test_swap_under_load(following_server: dict[str, Any], mlflow_server: str) -> None:
    url, model_name = following_server["url"], following_server["model_name"]
    tmp_path = following_server["tmp_path"]
    old_version, _ = promote_version(mlflow_server, model_name, TABULAR_CONFIG, tmp_path, seed=11)
    assert reload(url).json()["served_version"] == old_version
    payload = {"inputs": np.ones((16, 4)).tolist()}
    stop = threading.Event()
    served: list[list[str]] = [[], []]
    failures: list[str] = []

    def send(versions: list[str]) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                try:
                    response = client.post("/invocations", json=payload)
                except httpx.HTTPError as err:
                    failures.append(repr(err))
                    continue
                if response.status_code == 200:
                    versions.append(response.json()["model_version"])
                else:
                    failures.append(f"{response.status_code}: {response.text}")

    senders = [threading.Thread(target=send, args=(versions,)) for versions in served]
    for sender in senders:
        sender.start()
    try:
        wait_until(lambda: all(len(versions) >= 5 for versions in served), "requests on v1")
        new_version, _ = promote_version(
            mlflow_server, model_name, TABULAR_CONFIG, tmp_path, seed=12
        )
        swap = reload(url)
        counts = [len(versions) for versions in served]
        wait_until(
            lambda: all(len(v) >= n + 5 for v, n in zip(served, counts, strict=True)),
            "requests after the swap",
        )
    finally:
        stop.set()
        for sender in senders:
            sender.join(timeout=60)

    assert swap.status_code == 200
    assert swap.json()["changed"] is True
    assert swap.json()["served_version"] == new_version
    assert failures == []
    for versions in served:
        assert versions[0] == old_version
        assert versions[-1] == new_version
        switch = versions.index(new_version)
        assert set(versions[switch:]) == {new_version}


def test_tampered_version_rejected(following_server: dict[str, Any], mlflow_server: str) -> None:
    url, model_name = following_server["url"], following_server["model_name"]
    tmp_path = following_server["tmp_path"]
    good_version, _ = promote_version(mlflow_server, model_name, TABULAR_CONFIG, tmp_path, seed=21)
    assert reload(url).status_code == 200
    bad_version, _ = promote_version(
        mlflow_server, model_name, TABULAR_CONFIG, tmp_path, seed=22, tamper=True
    )

    rejected = reload(url)
    described = httpx.get(f"{url}/version").json()
    scoring = invoke(url, {"inputs": [[1.0, 2.0, 3.0, 4.0]]})
    samples = metric_samples(httpx.get(f"{url}/metrics").text)

    log_text = "".join(path.read_text() for path in tmp_path.glob("serving-*.log"))
    assert rejected.status_code == 503
    assert f"version {bad_version} failed: ModelIntegrityError" in rejected.json()["error"]
    assert described["version"] == good_version
    assert described["alias_version"] == bad_version
    assert described["last_error"]["version"] == bad_version
    assert "SHA-256" in described["last_error"]["message"]
    assert described["load_failures"] >= 1
    assert scoring.status_code == 200
    assert scoring.json()["model_version"] == good_version
    assert f"loading {model_name} version {bad_version} failed" in log_text
    integrity = {"alias": "champion", "reason": "integrity"}
    assert sample_value(samples, "ml_loop_serving_model_load_failures_total", integrity) >= 1
    assert sample_value(samples, "ml_loop_serving_served_version", {"alias": "champion"}) == float(
        good_version
    )


def test_alias_removed_unloads(following_server: dict[str, Any], mlflow_server: str) -> None:
    url, model_name = following_server["url"], following_server["model_name"]
    tmp_path = following_server["tmp_path"]
    promote_version(mlflow_server, model_name, TABULAR_CONFIG, tmp_path, seed=31)
    assert reload(url).status_code == 200
    MlflowClient(mlflow_server).delete_registered_model_alias(model_name, "champion")

    unloaded = reload(url)
    ready = httpx.get(f"{url}/ready")
    scoring = invoke(url, {"inputs": [[1.0, 2.0, 3.0, 4.0]]})

    assert unloaded.status_code == 200
    assert unloaded.json()["served_version"] is None
    assert ready.status_code == 503
    assert "alias champion" in ready.json()["reason"]
    assert scoring.status_code == 503


def test_registry_down_keeps_serving(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    model_name = f"serve-down-{uuid.uuid4().hex[:8]}"
    version, _ = promote_version(mlflow_server, model_name, TABULAR_CONFIG, tmp_path, seed=41)
    app = serving.create_app(model_name, tracking_uri=mlflow_server, poll_interval_s=3600)

    with serve_in_thread(app) as url:
        wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200, "the champion")
        app.state.follower.tracking_uri = f"http://127.0.0.1:{free_port()}"
        reload_response = reload(url)
        scoring = invoke(url, {"inputs": [[1.0, 2.0, 3.0, 4.0]]})
        described = httpx.get(f"{url}/version").json()

    assert reload_response.status_code == 503
    assert f"resolving alias champion of {model_name} failed" in reload_response.json()["error"]
    assert scoring.status_code == 200
    assert scoring.json()["model_version"] == version
    assert described["version"] == version
    assert described["check_failures"] == 1
    assert described["last_error"]["version"] is None


def contract(feature_names: list[str] | None = None) -> serving.InputContract:
    config = {**TABULAR_CONFIG, "feature_names": feature_names}
    return serving.InputContract.from_config(config, max_batch_size=4, model_label="model m")


def test_features_reordered_by_name() -> None:
    names = ["f0", "f1", "f2", "f3"]
    split = {"dataframe_split": {"columns": ["f3", "f1", "f0", "f2"], "data": [[3, 1, 0, 2]]}}
    records = {"dataframe_records": [{"f2": 2, "f0": 0, "f3": 3, "f1": 1}]}

    from_split = serving.features_from_payload(split, contract(names))
    from_records = serving.features_from_payload(records, contract(names))

    assert from_split.tolist() == [[0, 1, 2, 3]]
    assert from_records.tolist() == [[0, 1, 2, 3]]
    assert from_split.dtype == np.float32


def test_csv_reordered_by_name() -> None:
    body = b"id,f3,f1,f0,f2\nr1,3,1,0,2\n"

    features, ids = serving.features_from_csv(body, contract(["f0", "f1", "f2", "f3"]))

    assert features.tolist() == [[0, 1, 2, 3]]
    assert ids == ["r1"]


def test_features_unknown_name() -> None:
    split = {"dataframe_split": {"columns": ["f0", "f1", "f2", "x"], "data": [[0, 1, 2, 3]]}}

    with pytest.raises(serving.PayloadError, match=r"missing \['f3'\], unknown \['x'\]"):
        serving.features_from_payload(split, contract(["f0", "f1", "f2", "f3"]))


def test_features_deeply_nested() -> None:
    payload = json.loads("[" * 500 + "]" * 500)

    with pytest.raises(serving.PayloadError) as caught:
        serving.features_from_payload({"inputs": payload}, contract())

    assert caught.value.status_code == 422


def test_create_app_invalid_options() -> None:
    with pytest.raises(ValueError, match="poll_interval_s=0"):
        serving.create_app("m", poll_interval_s=0)
    with pytest.raises(ValueError, match="max_batch_size=0"):
        serving.create_app("m", max_batch_size=0)


TOKEN = "test-token-" + "x" * 24


def test_poller_swap_under_load(mlflow_server: str, tmp_path: Path) -> None:
    model_name = f"serve-poll-{uuid.uuid4().hex[:8]}"
    old_version, _ = promote_version(mlflow_server, model_name, TABULAR_CONFIG, tmp_path, seed=51)
    payload = {"inputs": np.ones((16, 4)).tolist()}
    stop = threading.Event()
    served: list[str] = []
    failures: list[str] = []

    def send() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set():
                try:
                    response = client.post("/invocations", json=payload)
                except httpx.HTTPError as err:
                    failures.append(repr(err))
                    continue
                if response.status_code == 200:
                    served.append(response.json()["model_version"])
                else:
                    failures.append(f"{response.status_code}: {response.text}")

    args = ("--no-prediction-log",)
    with run_model_server(
        model_name, mlflow_server, tmp_path, poll_interval_s=0.3, extra_args=args
    ) as url:
        wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200, "the first champion")
        senders = [threading.Thread(target=send) for _ in range(2)]
        for sender in senders:
            sender.start()
        try:
            wait_until(lambda: len(served) >= 10, "requests on the first champion")
            new_version, _ = promote_version(
                mlflow_server, model_name, TABULAR_CONFIG, tmp_path, seed=52
            )
            wait_until(lambda: served[-1] == new_version, "the poller to swap in the new version")
            count = len(served)
            wait_until(lambda: len(served) >= count + 10, "requests after the swap")
        finally:
            stop.set()
            for sender in senders:
                sender.join(timeout=60)

    assert failures == []
    assert served[0] == old_version
    switch = served.index(new_version)
    assert set(served[:switch]) == {old_version}
    assert served[-1] == new_version


def test_metrics_exposition(mlflow_server: str, tmp_path: Path) -> None:
    model_name = f"serve-metrics-{uuid.uuid4().hex[:8]}"
    version, model = promote_version(mlflow_server, model_name, TABULAR_CONFIG, tmp_path, seed=61)
    app = serving.create_app(model_name, tracking_uri=mlflow_server, poll_interval_s=3600)
    x = (np.random.default_rng(3).random((5, 4)) * 5).astype(np.float32)
    labels, _ = offline_predictions(model, x, TABULAR_CONFIG["classes"])

    with TestClient(app) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, "the champion")
        assert client.post("/invocations", json={"inputs": x.tolist()}).status_code == 200
        assert client.post("/invocations", json={"inputs": [[1, 2]]}).status_code == 422
        response = client.get("/metrics")

    samples = metric_samples(response.text)
    ok = {"endpoint": "/invocations", "status": "200", "variant": "champion"}
    invalid = {"endpoint": "/invocations", "kind": "invalid_input", "variant": "champion"}
    latency = {"endpoint": "/invocations", "variant": "champion"}
    assert response.headers["content-type"].startswith("text/plain")
    assert sample_value(samples, "ml_loop_serving_requests_total", ok) == 1
    assert sample_value(samples, "ml_loop_serving_errors_total", invalid) == 1
    assert sample_value(samples, "ml_loop_serving_request_duration_seconds_count", latency) == 2
    for label in set(labels):
        per_class = {"model_version": version, "variant": "champion", "predicted_class": label}
        assert sample_value(
            samples, "ml_loop_serving_predictions_total", per_class
        ) == labels.count(label)
    assert sample_value(samples, "ml_loop_serving_predictions_total") == 5
    assert sample_value(samples, "ml_loop_serving_prediction_confidence_count") == 5
    assert sample_value(samples, "ml_loop_serving_served_version", {"alias": "champion"}) == 1
    info = {"alias": "champion", "model_name": model_name, "version": version}
    assert sample_value(samples, "ml_loop_serving_model_info", info) == 1
    assert sample_value(samples, "ml_loop_serving_model_load_failures_total") == 0


def test_metrics_registry_per_app() -> None:
    first = serving.create_app("m-one")
    second = serving.create_app("m-two")

    assert first.state.metrics.registry is not second.state.metrics.registry


def test_csv_matches_json(tabular_server: tuple[str, torch.nn.Module]) -> None:
    url, _ = tabular_server
    x = (np.random.default_rng(4).random((3, 4)) * 5).round(3)
    # This model has no feature names, so columns are taken in training order.
    order = [0, 1, 2, 3]
    names = ["f0", "f1", "f2", "f3"]
    lines = [",".join(["id", *[names[i] for i in order]])]
    lines += [",".join([f"row-{n}", *[str(row[i]) for i in order]]) for n, row in enumerate(x)]

    reference = invoke(url, {"inputs": x.tolist()}).json()
    response = httpx.post(
        f"{url}/invocations",
        content="\n".join(lines) + "\n",
        headers={"content-type": "text/csv; charset=utf-8"},
        timeout=30,
    )

    body = response.json()
    assert response.status_code == 200
    assert body["predictions"] == reference["predictions"]
    assert np.allclose(body["probabilities"], reference["probabilities"])
    assert body["ids"] == ["row-0", "row-1", "row-2"]


def test_image_csv_matches_json(image_server: tuple[str, torch.nn.Module, str]) -> None:
    url, _, _ = image_server
    x = np.random.default_rng(5).random((3, 64)).round(4)
    text = "\n".join(",".join(str(value) for value in row) for row in x)

    reference = invoke(url, {"inputs": x.tolist()}).json()
    response = httpx.post(
        f"{url}/invocations", content=text, headers={"content-type": "text/csv"}, timeout=30
    )

    assert response.status_code == 200
    assert response.json()["predictions"] == reference["predictions"]
    assert np.allclose(response.json()["probabilities"], reference["probabilities"])


CSV_BAD_INPUTS = [
    ("not a number", "f0,f1,f2,f3\n1,2,x,4\n", 422, ["CSV row 2, column 'f2' is 'x'"]),
    ("missing column", "f0,f1,f2\n1,2,3\n", 422, ["CSV header names 3 columns", "expected 4"]),
    ("short row", "f0,f1,f2,f3\n1,2,3\n", 422, ["CSV rows has shape (1, 3); expected (n, 4)"]),
    ("empty", "", 422, ["CSV body is empty"]),
    ("header only", "f0,f1,f2,f3\n", 422, ["CSV rows is empty"]),
    ("NaN cell", "f0,f1,f2,f3\n1,nan,3,4\n", 422, ["CSV row 2, column 'f1' is not a finite"]),
    ("too many rows", "f0,f1,f2,f3\n" + "1,2,3,4\n" * 9, 422, ["maximum batch size 8"]),
]


@pytest.mark.parametrize(
    ("body", "status", "fragments"),
    [case[1:] for case in CSV_BAD_INPUTS],
    ids=[case[0] for case in CSV_BAD_INPUTS],
)
def test_csv_bad_input_rejected(
    tabular_server: tuple[str, torch.nn.Module], body: str, status: int, fragments: list[str]
) -> None:
    url, _ = tabular_server

    response = httpx.post(
        f"{url}/invocations", content=body, headers={"content-type": "text/csv"}, timeout=30
    )

    message = response.json()["message"]
    assert response.status_code == status
    for fragment in fragments:
        assert fragment in message


def test_image_csv_header_rejected(image_server: tuple[str, torch.nn.Module, str]) -> None:
    url, _, _ = image_server
    body = ",".join(f"p{i}" for i in range(64)) + "\n" + ",".join(["0.5"] * 64) + "\n"

    response = httpx.post(
        f"{url}/invocations", content=body, headers={"content-type": "text/csv"}, timeout=30
    )

    assert response.status_code == 422
    assert "without a header row" in response.json()["message"]
    assert "64 values per image" in response.json()["message"]


def test_unsupported_media_type(tabular_server: tuple[str, torch.nn.Module]) -> None:
    url, _ = tabular_server

    response = httpx.post(
        f"{url}/invocations", content=b"<x/>", headers={"content-type": "application/xml"}
    )

    assert response.status_code == 415
    assert "text/csv" in response.json()["message"]


def test_garbage_bodies_never_crash(tabular_server: tuple[str, torch.nn.Module]) -> None:
    url, _ = tabular_server
    rng = np.random.default_rng(6)
    bodies = [bytes(rng.integers(0, 256, size=int(n)).astype(np.uint8)) for n in (1, 7, 300)]
    bodies += [
        b"null",
        b'{"inputs": {"a": 1}}',
        b'{"inputs": [[[]]]}',
        b'{"inputs": [["1", "2", "3", "4"]]}',
        b'{"inputs": [[1, 2, 3, 4]], "ids": [[1]]}',
        b'{"dataframe_records": [1, 2]}',
        b'{"dataframe_split": {"columns": [1, 2], "data": 3}}',
        b'{"inputs": [[1e308, -1e308, 0, 0]]}',
        b"\xff\xfe\x00",
    ]
    content_types = ["application/json", "text/csv"]

    statuses = []
    for body in bodies:
        for content_type in content_types:
            response = httpx.post(
                f"{url}/invocations", content=body, headers={"content-type": content_type}
            )
            statuses.append((body[:20], content_type, response.status_code))

    assert [case for case in statuses if case[2] not in (400, 413, 415, 422)] == []
    assert httpx.get(f"{url}/health").status_code == 200


def test_request_and_row_ids(tabular_server: tuple[str, torch.nn.Module]) -> None:
    url, _ = tabular_server
    rows = [[1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0]]

    given = invoke(url, {"inputs": rows, "ids": ["a-1", 17]})
    generated = httpx.post(
        f"{url}/invocations", json={"inputs": rows}, headers={"X-Request-ID": "req-42"}
    )

    assert given.json()["ids"] == ["a-1", "17"]
    assert len(given.json()["request_id"]) == 32
    assert given.headers["x-request-id"] == given.json()["request_id"]
    assert generated.json()["request_id"] == "req-42"
    assert generated.json()["ids"] == ["req-42-0", "req-42-1"]


@pytest.mark.parametrize(
    ("ids", "fragment"),
    [
        (["only-one"], "ids has 1 entries but the request has 2 rows"),
        (["same", "same"], "ids contains ['same'] more than once"),
        ("a,b", "ids must be a JSON array of 2 strings"),
        ([True, "b"], "ids[0] is true"),
        (["", "b"], "ids[0] has 0 characters"),
    ],
    ids=["count", "duplicate", "not a list", "boolean", "empty"],
)
def test_invalid_ids_rejected(
    tabular_server: tuple[str, torch.nn.Module], ids: Any, fragment: str
) -> None:
    url, _ = tabular_server

    response = invoke(url, {"inputs": [[1, 2, 3, 4], [1, 2, 3, 4]], "ids": ids})

    assert response.status_code == 422
    assert fragment in response.json()["message"]


def test_token_required(mlflow_server: str, tmp_path: Path) -> None:
    model_name = f"serve-auth-{uuid.uuid4().hex[:8]}"
    promote_version(mlflow_server, model_name, TABULAR_CONFIG, tmp_path, seed=71)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {"ML_LOOP_SERVING_TOKEN_FILE": str(token_file)}
    good = {"Authorization": f"Bearer {TOKEN}"}
    wrong = {"Authorization": "Bearer " + "y" * 32}
    payload = {"inputs": [[1.0, 2.0, 3.0, 4.0]]}

    with run_model_server(
        model_name, mlflow_server, tmp_path, extra_args=("--no-prediction-log",), extra_env=env
    ) as url:
        wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200, "the champion")
        health = httpx.get(f"{url}/health")
        missing = httpx.post(f"{url}/invocations", json=payload)
        invalid = httpx.post(f"{url}/invocations", json=payload, headers=wrong)
        allowed = httpx.post(f"{url}/invocations", json=payload, headers=good)
        protected = {
            path: httpx.request(method, f"{url}{path}", timeout=60).status_code
            for method, path in [
                ("GET", "/metrics"),
                ("GET", "/version"),
                ("POST", "/reload"),
                ("GET", "/canary"),
                ("GET", "/docs"),
            ]
        }
        metrics = httpx.get(f"{url}/metrics", headers=good)
    log_text = "".join(path.read_text() for path in tmp_path.glob("serving-*.log"))

    assert health.status_code == 200
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert invalid.status_code == 401
    assert 'error="invalid_token"' in invalid.headers["www-authenticate"]
    assert allowed.status_code == 200
    assert protected == dict.fromkeys(protected, 401)
    assert metrics.status_code == 200
    unauthorized = {"endpoint": "/invocations", "kind": "unauthorized"}
    assert (
        sample_value(metric_samples(metrics.text), "ml_loop_serving_errors_total", unauthorized)
        == 2
    )
    assert TOKEN not in log_text
    assert "bearer-token auth on" in log_text


def test_public_host_needs_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("ML_LOOP_SERVING_TOKEN", raising=False)
    monkeypatch.delenv("ML_LOOP_SERVING_TOKEN_FILE", raising=False)

    with pytest.raises(SystemExit) as caught:
        serving.main(["--model-name", "m", "--host", "0.0.0.0"])

    error = capsys.readouterr().err
    assert caught.value.code == 2
    assert "host '0.0.0.0' is rejected without a bearer token" in error
    assert "ML_LOOP_SERVING_TOKEN" in error


def test_local_host_without_token() -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        serving.check_bind_host(host, None)
    serving.check_bind_host("0.0.0.0", TOKEN)


def test_resolve_token(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")

    assert serving.resolve_token({}) is None
    assert serving.resolve_token({"ML_LOOP_SERVING_TOKEN": ""}) is None
    assert serving.resolve_token({"ML_LOOP_SERVING_TOKEN": TOKEN}) == TOKEN
    assert serving.resolve_token({"ML_LOOP_SERVING_TOKEN_FILE": str(token_file)}) == TOKEN


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        ({"ML_LOOP_SERVING_TOKEN": TOKEN, "ML_LOOP_SERVING_TOKEN_FILE": "/x"}, "both"),
        ({"ML_LOOP_SERVING_TOKEN": "short"}, "has 5 characters; expected at least 16"),
        ({"ML_LOOP_SERVING_TOKEN_FILE": "/nonexistent/token"}, "cannot be read"),
    ],
    ids=["both set", "too short", "missing file"],
)
def test_resolve_token_invalid(environ: dict[str, str], fragment: str) -> None:
    with pytest.raises(serving.ServingConfigError, match=fragment) as caught:
        serving.resolve_token(environ)

    assert TOKEN not in str(caught.value)


def test_resolve_token_empty_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("\n")

    with pytest.raises(serving.ServingConfigError, match="is empty"):
        serving.resolve_token({"ML_LOOP_SERVING_TOKEN_FILE": str(token_file)})


def test_predictions_logged(mlflow_server: str, tmp_path: Path) -> None:
    model_name = f"serve-log-{uuid.uuid4().hex[:8]}"
    version, model = promote_version(mlflow_server, model_name, IMAGE_CONFIG, tmp_path, seed=81)
    log_dir = tmp_path / "predictions"
    x = np.random.default_rng(7).random((3, 1, 8, 8)).astype(np.float32)
    labels, probabilities = offline_predictions(model, x, IMAGE_CONFIG["classes"])
    args = ("--prediction-log-dir", str(log_dir), "--prediction-log-flush-interval", "0.2")
    start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)

    responses = []
    for restart in range(2):
        with run_model_server(model_name, mlflow_server, tmp_path, extra_args=args) as url:
            wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200, "the champion")
            payload = {"inputs": x.tolist(), "ids": [f"img-{restart}-{i}" for i in range(3)]}
            responses.append(invoke(url, payload).json())
    end = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1)
    records = prediction_log.read_predictions(log_dir, model_name, start, end, with_inputs=True)

    parts = sorted(log_dir.glob(f"{model_name}/*/part-*.jsonl"))
    assert len(parts) == 2
    assert len(list(log_dir.glob(f"{model_name}/*/part-*.npz"))) == 2
    assert [record["id"] for record in records] == [
        f"img-{r}-{i}" for r in (0, 1) for i in range(3)
    ]
    first = records[0]
    assert first["request_id"] == responses[0]["request_id"]
    assert first["row"] == 0
    assert first["model_name"] == model_name
    assert first["model_version"] == version
    assert first["variant"] == "champion"
    assert [record["prediction"] for record in records[:3]] == labels
    assert first["confidence"] == pytest.approx(float(probabilities[0].max()), abs=1e-6)
    assert np.allclose(first["probabilities"], probabilities[0], atol=1e-6)
    assert first["inputs"] is None
    assert first["input_ref"]["file"] == parts[0].with_suffix(".npz").name
    assert np.array_equal(np.stack([r["input_array"] for r in records[:3]]), x)


def test_log_write_failure_keeps_serving(mlflow_server: str, tmp_path: Path) -> None:
    model_name = f"serve-logfail-{uuid.uuid4().hex[:8]}"
    promote_version(mlflow_server, model_name, TABULAR_CONFIG, tmp_path, seed=82)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log folder should be")
    app = serving.create_app(
        model_name,
        tracking_uri=mlflow_server,
        poll_interval_s=3600,
        prediction_log_dir=blocker,
        prediction_log_options={"flush_records": 1, "max_queued_records": 3},
    )

    with TestClient(app) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, "the champion")
        written = client.post("/invocations", json={"inputs": [[1, 2, 3, 4]]})
        wait_until(lambda: app.state.prediction_log.stats().write_failures, "a failed write")
        too_many = client.post("/invocations", json={"inputs": [[1, 2, 3, 4]] * 4})
        samples = metric_samples(client.get("/metrics").text)

    assert written.status_code == 200
    assert too_many.status_code == 200
    assert sample_value(samples, "ml_loop_serving_prediction_log_write_failures_total") >= 1
    full = {"reason": "queue_full"}
    failed = {"reason": "write_failed"}
    assert sample_value(samples, "ml_loop_serving_prediction_log_dropped_records_total", full) == 4
    assert (
        sample_value(samples, "ml_loop_serving_prediction_log_dropped_records_total", failed) >= 1
    )


def test_canary_routes_share(mlflow_server: str, tmp_path: Path) -> None:
    model_name = f"serve-canary-{uuid.uuid4().hex[:8]}"
    log_dir = tmp_path / "predictions"
    champion, _ = promote_version(mlflow_server, model_name, TABULAR_CONFIG, tmp_path, seed=91)
    challenger, _ = promote_version(
        mlflow_server, model_name, TABULAR_CONFIG, tmp_path, seed=92, promote=False
    )
    app = serving.create_app(
        model_name,
        tracking_uri=mlflow_server,
        poll_interval_s=3600,
        prediction_log_dir=log_dir,
        prediction_log_options={"flush_interval_s": 0.1},
    )
    payload = {"inputs": [[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]]}

    with TestClient(app) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, "the champion")
        invalid = client.post("/canary", json={"share": 1.5})
        enabled = client.post("/canary", json={"share": 0.25})
        variants = [client.post("/invocations", json=payload).json()["variant"] for _ in range(8)]
        forced = client.post("/invocations?variant=challenger", json=payload).json()
        pinned = client.post("/invocations?variant=champion", json=payload).json()
        samples = metric_samples(client.get("/metrics").text)
        disabled = client.delete("/canary")
        after = [client.post("/invocations", json=payload).json()["variant"] for _ in range(4)]
        app.state.prediction_log.flush()
    records = prediction_log.read_predictions(
        log_dir,
        model_name,
        dt.date.today() - dt.timedelta(days=1),
        dt.date.today() + dt.timedelta(days=2),
    )

    assert invalid.status_code == 422
    assert "share=1.5 is invalid" in invalid.json()["message"]
    assert enabled.status_code == 200
    assert enabled.json()["challenger_version"] == challenger
    assert enabled.json()["champion_version"] == champion
    assert variants == ["champion", "champion", "champion", "challenger"] * 2
    assert forced["variant"] == "challenger"
    assert forced["model_version"] == challenger
    assert pinned["model_version"] == champion
    challenger_ok = {"endpoint": "/invocations", "status": "200", "variant": "challenger"}
    assert sample_value(samples, "ml_loop_serving_requests_total", challenger_ok) == 3
    assert sample_value(samples, "ml_loop_serving_canary_share") == 0.25
    # Two routed challenger requests of two rows each were also scored by the champion.
    assert sample_value(samples, "ml_loop_serving_canary_agreement_rows_total") == 4
    assert disabled.json()["enabled"] is False
    assert after == ["champion"] * 4
    by_variant = collections.Counter((r["variant"], r["model_version"]) for r in records)
    assert by_variant == {("champion", champion): 2 * 11, ("challenger", challenger): 2 * 3}


def test_canary_without_challenger(mlflow_server: str, tmp_path: Path) -> None:
    model_name = f"serve-nochal-{uuid.uuid4().hex[:8]}"
    promote_version(mlflow_server, model_name, TABULAR_CONFIG, tmp_path, seed=93)
    MlflowClient(mlflow_server).delete_registered_model_alias(model_name, "challenger")
    app = serving.create_app(model_name, tracking_uri=mlflow_server, poll_interval_s=3600)

    with TestClient(app) as client:
        wait_until(lambda: client.get("/ready").status_code == 200, "the champion")
        response = client.post("/canary", json={"share": 0.5})
        state = client.get("/canary").json()
        forced = client.post("/invocations?variant=challenger", json={"inputs": [[1, 2, 3, 4]]})

    assert response.status_code == 503
    assert "alias challenger" in response.json()["error"]
    assert state["enabled"] is False
    assert forced.status_code == 503
