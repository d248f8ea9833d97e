"""Model server tests: the real server in a uvicorn subprocess, following real registry aliases."""

from __future__ import annotations

import contextlib
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
from mlflow import MlflowClient

from ml_loop import models, registry, serving
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
) -> tuple[str, torch.nn.Module]:
    """Log a run with real weights, register it as the champion; return its version and model.

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
        model_name, {"run_id": run_id}, PASSED, tracking_uri=tracking_uri
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
    ]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONPATH": str(REPO_ROOT / "include"),
    }
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
        model_name, mlflow_server, tmp_path, max_batch_size=TABULAR_BATCH_LIMIT
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
    with run_model_server(model_name, mlflow_server, tmp_path) as url:
        wait_until(lambda: httpx.get(f"{url}/ready").status_code == 200, "the image champion")
        yield url, model, model_name


@pytest.fixture(scope="module")
def following_server(
    mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A server that checks its alias only on POST /reload; each test promotes its own start."""
    tmp_path = tmp_path_factory.mktemp("following-server")
    model_name = f"serve-follow-{uuid.uuid4().hex[:8]}"
    with run_model_server(model_name, mlflow_server, tmp_path) as url:
        yield {"url": url, "model_name": model_name, "tmp_path": tmp_path}


def reload(url: str) -> httpx.Response:
    return httpx.post(f"{url}/reload", timeout=60)


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
