"""Deploy tests: a real model server subprocess, a real MLflow registry and a snapshot file."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from ml_loop import deploy, models, registry
from ml_loop.errors import DeployError
from servers import REPO_ROOT, free_port, wait_for_http

CONFIG = models.model_config(
    "mlp", {"hidden_units": [8]}, [4], ["a", "b", "c"], [1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 2.0, 2.0]
)
PASSED = {"passed": True, "candidate": {"accuracy": 0.95}, "reasons": []}
SMOKE_IDS = ["r0", "r3", "r5", "r6"]


def register_run(
    tracking_uri: str,
    model_name: str,
    tmp_path: Path,
    seed: int,
    *,
    tamper: bool = False,
    promote: bool = True,
) -> tuple[dict[str, Any], torch.nn.Module]:
    """Log a run with real weights and register it with a passing gate.

    Returns the registration dict and the model. With ``tamper``, the uploaded state_dict is
    another model's while the SHA-256 tag keeps the original's. With ``promote`` false, the
    version becomes only the challenger, as a canary deploy needs.
    """
    torch.manual_seed(seed)
    model = models.build_model(CONFIG).eval()
    weights_dir = tmp_path / f"weights-{uuid.uuid4().hex[:8]}"
    sha = models.save_weights(model, CONFIG, weights_dir)
    if tamper:
        torch.manual_seed(seed + 1000)
        models.save_weights(models.build_model(CONFIG), CONFIG, weights_dir)
    client = MlflowClient(tracking_uri)
    run_id = client.create_run("0").info.run_id
    client.log_artifacts(run_id, str(weights_dir), models.WEIGHTS_ARTIFACT_DIR)
    client.set_tag(run_id, models.WEIGHTS_SHA_TAG, sha)
    client.set_terminated(run_id)
    reg = registry.register_candidate(
        model_name, {"run_id": run_id}, PASSED, promote_on_pass=promote, tracking_uri=tracking_uri
    )
    return reg.to_dict(), model


def write_snapshot(tmp_path: Path) -> tuple[Path, np.ndarray, list[str]]:
    """Write a snapshot folder with ``data.npz`` (x, y, ids, split) of eight tabular records."""
    x = (np.random.default_rng(5).random((8, 4)) * 5).astype(np.float32)
    ids = [f"r{i}" for i in range(len(x))]
    snapshot = tmp_path / f"snapshot-{uuid.uuid4().hex[:8]}"
    snapshot.mkdir()
    np.savez(
        snapshot / "data.npz",
        x=x,
        y=np.zeros(len(x), dtype=np.int64),
        ids=np.array(ids),
        split=np.full(len(x), 2, dtype=np.uint8),
    )
    return snapshot, x, ids


def smoke_samples(model: torch.nn.Module, x: np.ndarray, ids: list[str]) -> list[dict[str, str]]:
    """Return the offline predictions of ``model`` for SMOKE_IDS, as the evaluate step does."""
    rows = [ids.index(record_id) for record_id in SMOKE_IDS]
    probabilities = models.predict_proba(model, torch.from_numpy(x[rows]))
    labels = [CONFIG["classes"][i] for i in probabilities.argmax(dim=1).tolist()]
    return [
        {"id": record_id, "prediction": label}
        for record_id, label in zip(SMOKE_IDS, labels, strict=True)
    ]


@contextlib.contextmanager
def run_model_server(
    model_name: str, tracking_uri: str, log_dir: Path, token: str | None = None
) -> Iterator[str]:
    """Start ``python -m ml_loop.serving`` that checks only on POST /reload; stop it by its pid."""
    port = free_port()
    log_path = log_dir / f"serving-{model_name}.log"
    command = [
        sys.executable,
        "-m",
        "ml_loop.serving",
        "--model-name",
        model_name,
        "--port",
        str(port),
        "--poll-interval",
        "3600",
        "--torch-threads",
        "1",
        "--no-prediction-log",
    ]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PYTHONPATH": str(REPO_ROOT / "include"),
    }
    env.pop("ML_LOOP_SERVING_TOKEN_FILE", None)
    env.pop("ML_LOOP_SERVING_TOKEN", None)
    if token is not None:
        env["ML_LOOP_SERVING_TOKEN"] = token
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


@pytest.fixture(scope="module")
def deploy_server(
    mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    tmp_path = tmp_path_factory.mktemp("deploy-server")
    model_name = f"deploy-{uuid.uuid4().hex[:8]}"
    with run_model_server(model_name, mlflow_server, tmp_path) as url:
        yield {"url": url, "model_name": model_name, "tmp_path": tmp_path}


@pytest.fixture
def served_champion(deploy_server: dict[str, Any], mlflow_tracking: str) -> dict[str, Any]:
    """Promote a fresh version and make the server serve it; return the server and version.

    Depends on ``mlflow_tracking`` so that calls without ``tracking_uri`` reach the test server.
    """
    url, model_name = deploy_server["url"], deploy_server["model_name"]
    reg, _ = register_run(mlflow_tracking, model_name, deploy_server["tmp_path"], seed=100)
    response = httpx.post(f"{url}/reload", timeout=60)
    assert response.json()["served_version"] == reg["version"]
    return {**deploy_server, "old_version": reg["version"]}


def served_version(url: str) -> str | None:
    return httpx.get(f"{url}/version", timeout=10).json()["version"]


def test_deploy_serves_new_version(served_champion: dict[str, Any], mlflow_tracking: str) -> None:
    url, model_name = served_champion["url"], served_champion["model_name"]
    tmp_path = served_champion["tmp_path"]
    reg, model = register_run(mlflow_tracking, model_name, tmp_path, seed=101)
    snapshot, x, ids = write_snapshot(tmp_path)

    result = deploy.deploy_champion(
        url, reg, smoke_samples(model, x, ids), str(snapshot), tracking_uri=mlflow_tracking
    )

    assert result == {"serving_url": url, "served_version": reg["version"]}
    assert served_version(url) == reg["version"]
    assert registry.get_alias_version(model_name, "champion", mlflow_tracking) == reg["version"]


def test_deploy_accepts_npz_path(served_champion: dict[str, Any], mlflow_tracking: str) -> None:
    url, model_name = served_champion["url"], served_champion["model_name"]
    tmp_path = served_champion["tmp_path"]
    reg, model = register_run(mlflow_tracking, model_name, tmp_path, seed=102)
    snapshot, x, ids = write_snapshot(tmp_path)

    result = deploy.deploy_champion(
        url, reg, smoke_samples(model, x, ids), str(snapshot / "data.npz")
    )

    assert result["served_version"] == reg["version"]


def test_deploy_mismatch_rolls_back(served_champion: dict[str, Any], mlflow_tracking: str) -> None:
    url, model_name = served_champion["url"], served_champion["model_name"]
    tmp_path, old_version = served_champion["tmp_path"], served_champion["old_version"]
    reg, model = register_run(mlflow_tracking, model_name, tmp_path, seed=103)
    snapshot, x, ids = write_snapshot(tmp_path)
    samples = smoke_samples(model, x, ids)
    served_label = samples[1]["prediction"]
    wrong_label = next(label for label in CONFIG["classes"] if label != served_label)
    samples[1]["prediction"] = wrong_label

    with pytest.raises(DeployError) as caught:
        deploy.deploy_champion(url, reg, samples, str(snapshot), tracking_uri=mlflow_tracking)

    message = str(caught.value)
    failed_tags = MlflowClient(mlflow_tracking).get_model_version(model_name, reg["version"]).tags
    assert f"{model_name} version {reg['version']} failed" in message
    assert f"r3 (expected {wrong_label!r}, served {served_label!r})" in message
    assert f"champion now points to the restored version {old_version}" in message
    assert registry.get_alias_version(model_name, "champion", mlflow_tracking) == old_version
    assert served_version(url) == old_version
    assert failed_tags[registry.ROLLED_BACK_TAG] == "true"


def test_deploy_tampered_rolls_back(served_champion: dict[str, Any], mlflow_tracking: str) -> None:
    url, model_name = served_champion["url"], served_champion["model_name"]
    tmp_path, old_version = served_champion["tmp_path"], served_champion["old_version"]
    reg, model = register_run(mlflow_tracking, model_name, tmp_path, seed=104, tamper=True)
    snapshot, x, ids = write_snapshot(tmp_path)

    with pytest.raises(DeployError, match=f"could not load version {reg['version']}"):
        deploy.deploy_champion(url, reg, smoke_samples(model, x, ids), str(snapshot))

    assert registry.get_alias_version(model_name, "champion", mlflow_tracking) == old_version
    assert served_version(url) == old_version


def test_deploy_unknown_smoke_id(served_champion: dict[str, Any], mlflow_tracking: str) -> None:
    url, model_name = served_champion["url"], served_champion["model_name"]
    tmp_path, old_version = served_champion["tmp_path"], served_champion["old_version"]
    reg, _ = register_run(mlflow_tracking, model_name, tmp_path, seed=105)
    snapshot, _, _ = write_snapshot(tmp_path)
    samples = [{"id": "r0", "prediction": "a"}, {"id": "missing-7", "prediction": "b"}]

    with pytest.raises(DeployError, match=r"smoke sample ids \['missing-7'\] are not in"):
        deploy.deploy_champion(url, reg, samples, str(snapshot))

    assert registry.get_alias_version(model_name, "champion", mlflow_tracking) == old_version


def test_deploy_server_unreachable(mlflow_tracking: str, tmp_path: Path) -> None:
    model_name = f"deploy-down-{uuid.uuid4().hex[:8]}"
    register_run(mlflow_tracking, model_name, tmp_path, seed=106)
    reg, model = register_run(mlflow_tracking, model_name, tmp_path, seed=107)
    snapshot, x, ids = write_snapshot(tmp_path)
    closed_url = f"http://127.0.0.1:{free_port()}"

    with pytest.raises(DeployError, match="ConnectError") as caught:
        deploy.deploy_champion(
            closed_url, reg, smoke_samples(model, x, ids), str(snapshot), http_timeout_s=2
        )

    assert "champion now points to the restored version 1" in str(caught.value)
    assert registry.get_alias_version(model_name, "champion", mlflow_tracking) == "1"


def test_deploy_without_previous(mlflow_tracking: str, tmp_path: Path) -> None:
    model_name = f"deploy-first-{uuid.uuid4().hex[:8]}"
    reg, model = register_run(mlflow_tracking, model_name, tmp_path, seed=108)
    snapshot, x, ids = write_snapshot(tmp_path)
    samples = [{**sample, "prediction": "not-a-class"} for sample in smoke_samples(model, x, ids)]

    with run_model_server(model_name, mlflow_tracking, tmp_path) as url:
        with pytest.raises(DeployError, match="the champion alias was removed"):
            deploy.deploy_champion(url, reg, samples, str(snapshot))
        ready = httpx.get(f"{url}/ready", timeout=10)

    assert registry.get_alias_version(model_name, "champion", mlflow_tracking) is None
    assert ready.status_code == 503


def test_deploy_not_promoted_does_nothing() -> None:
    reg = registry.Registration("m", "4", "run", False, False, None, ["challenger"]).to_dict()
    closed_url = f"http://127.0.0.1:{free_port()}"

    result = deploy.deploy_champion(closed_url, reg, [], "/nonexistent")

    assert result == {"serving_url": closed_url, "served_version": None}


TOKEN = "deploy-token-" + "z" * 24


def test_deploy_sends_token(mlflow_tracking: str, tmp_path: Path) -> None:
    model_name = f"deploy-auth-{uuid.uuid4().hex[:8]}"
    reg, model = register_run(mlflow_tracking, model_name, tmp_path, seed=110)
    snapshot, x, ids = write_snapshot(tmp_path)

    with run_model_server(model_name, mlflow_tracking, tmp_path, token=TOKEN) as url:
        result = deploy.deploy_champion(
            url, reg, smoke_samples(model, x, ids), str(snapshot), token=TOKEN
        )

    assert result["served_version"] == reg["version"]


def test_deploy_without_token_fails(mlflow_tracking: str, tmp_path: Path) -> None:
    model_name = f"deploy-noauth-{uuid.uuid4().hex[:8]}"
    reg, model = register_run(mlflow_tracking, model_name, tmp_path, seed=111)
    snapshot, x, ids = write_snapshot(tmp_path)

    with (
        run_model_server(model_name, mlflow_tracking, tmp_path, token=TOKEN) as url,
        pytest.raises(DeployError, match="401") as caught,
    ):
        deploy.deploy_champion(url, reg, smoke_samples(model, x, ids), str(snapshot))

    assert TOKEN not in str(caught.value)


class Traffic:
    """Send scoring requests from a thread until stopped; record every status code."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.statuses: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send)

    def _send(self) -> None:
        rng = np.random.default_rng(9)
        with httpx.Client(base_url=self.url, timeout=30, headers=self.headers) as client:
            while not self._stop.is_set():
                rows = (rng.random((4, 4)) * 5).tolist()
                self.statuses.append(client.post("/invocations", json={"inputs": rows}).status_code)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def test_canary_promotes(mlflow_tracking: str, tmp_path: Path) -> None:
    model_name = f"canary-ok-{uuid.uuid4().hex[:8]}"
    champion, _ = register_run(mlflow_tracking, model_name, tmp_path, seed=120)
    candidate, _ = register_run(mlflow_tracking, model_name, tmp_path, seed=121, promote=False)

    with run_model_server(model_name, mlflow_tracking, tmp_path, token=TOKEN) as url:
        assert httpx.post(f"{url}/reload", headers={"Authorization": f"Bearer {TOKEN}"}).is_success
        with Traffic(url, TOKEN) as traffic:
            result = deploy.canary_deploy(
                url,
                candidate,
                share=0.5,
                min_requests=20,
                max_error_rate_increase=0.0,
                max_latency_ratio=None,
                poll_interval_s=0.2,
                timeout_s=120,
                token=TOKEN,
            )
        state = httpx.get(f"{url}/canary", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        served = httpx.get(f"{url}/version", headers={"Authorization": f"Bearer {TOKEN}"}).json()

    tags = MlflowClient(mlflow_tracking).get_model_version(model_name, candidate["version"]).tags
    window = result["window"]
    assert result["decision"] == "promoted"
    assert result["served_version"] == candidate["version"]
    assert window["challenger"]["requests"] >= 20
    assert window["champion"]["requests"] >= 19
    assert window["challenger"]["errors"] == 0
    assert 0 <= window["agreement"] <= 1
    assert set(traffic.statuses) == {200}
    assert (
        registry.get_alias_version(model_name, "champion", mlflow_tracking) == candidate["version"]
    )
    assert (
        registry.get_alias_version(model_name, "previous", mlflow_tracking) == champion["version"]
    )
    assert served["version"] == candidate["version"]
    assert state["enabled"] is False
    assert tags[registry.CANARY_TAG] == "promoted"


def test_canary_too_few_requests(mlflow_tracking: str, tmp_path: Path) -> None:
    model_name = f"canary-idle-{uuid.uuid4().hex[:8]}"
    champion, _ = register_run(mlflow_tracking, model_name, tmp_path, seed=130)
    candidate, _ = register_run(mlflow_tracking, model_name, tmp_path, seed=131, promote=False)

    with run_model_server(model_name, mlflow_tracking, tmp_path) as url:
        httpx.post(f"{url}/reload", timeout=60)
        result = deploy.canary_deploy(
            url, candidate, share=0.5, min_requests=5, timeout_s=1, poll_interval_s=0.2
        )
        state = httpx.get(f"{url}/canary").json()

    tags = MlflowClient(mlflow_tracking).get_model_version(model_name, candidate["version"]).tags
    assert result["decision"] == "rolled_back"
    assert result["served_version"] == champion["version"]
    assert "fewer than the 5 required" in result["reasons"][0]
    assert (
        registry.get_alias_version(model_name, "champion", mlflow_tracking) == champion["version"]
    )
    assert state["enabled"] is False
    assert tags[registry.CANARY_TAG] == "rolled_back"
    assert "fewer than the 5 required" in tags[registry.CANARY_REASON_TAG]


def test_canary_tampered_challenger(mlflow_tracking: str, tmp_path: Path) -> None:
    model_name = f"canary-bad-{uuid.uuid4().hex[:8]}"
    champion, _ = register_run(mlflow_tracking, model_name, tmp_path, seed=140)
    candidate, _ = register_run(
        mlflow_tracking, model_name, tmp_path, seed=141, promote=False, tamper=True
    )

    with run_model_server(model_name, mlflow_tracking, tmp_path) as url:
        httpx.post(f"{url}/reload", timeout=60)
        with Traffic(url) as traffic:
            result = deploy.canary_deploy(url, candidate, share=0.5, min_requests=5)
        served = httpx.get(f"{url}/version").json()

    assert result["decision"] == "rolled_back"
    assert "could not load the challenger" in result["reasons"][0]
    assert "ModelIntegrityError" in result["reasons"][0]
    assert served["version"] == champion["version"]
    assert set(traffic.statuses) <= {200}
    assert (
        registry.get_alias_version(model_name, "champion", mlflow_tracking) == champion["version"]
    )


def test_canary_needs_challenger(mlflow_tracking: str, tmp_path: Path) -> None:
    model_name = f"canary-champ-{uuid.uuid4().hex[:8]}"
    register_run(mlflow_tracking, model_name, tmp_path, seed=150)
    reg, _ = register_run(mlflow_tracking, model_name, tmp_path, seed=151)
    closed_url = f"http://127.0.0.1:{free_port()}"

    with pytest.raises(DeployError, match="is already the champion"):
        deploy.canary_deploy(closed_url, reg, share=0.1)
    with pytest.raises(DeployError, match="share=0 is invalid"):
        deploy.canary_deploy(closed_url, reg, share=0)
