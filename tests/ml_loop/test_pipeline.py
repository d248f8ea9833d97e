"""The step functions' own decisions (the steps themselves are tested per stage)."""

from __future__ import annotations

import dataclasses

import pytest

from ml_loop.errors import SpecError
from ml_loop.pipeline import uses_canary
from ml_loop.spec import DeploySpec, RunConfig, load_spec

PASSED_WITH_CHAMPION = {"passed": True, "champion_version": "3"}


def canary_spec(share: float):
    spec = load_spec("digits")
    return dataclasses.replace(spec, deploy=DeploySpec(canary_share=share))


def config(spec, **params) -> RunConfig:
    return RunConfig.from_params(spec, params)


def test_canary_off_by_default() -> None:
    spec = load_spec("digits")
    assert uses_canary(spec, PASSED_WITH_CHAMPION, config(spec)) is False


def test_canary_for_passed_candidate_with_champion() -> None:
    spec = canary_spec(0.2)
    assert uses_canary(spec, PASSED_WITH_CHAMPION, config(spec)) is True


def test_canary_needs_a_champion() -> None:
    spec = canary_spec(0.2)
    first_model = {"passed": True, "champion_version": None}
    assert uses_canary(spec, first_model, config(spec)) is False


def test_canary_skipped_for_failed_gate() -> None:
    spec = canary_spec(0.2)
    failed = {"passed": False, "champion_version": "3"}
    assert uses_canary(spec, failed, config(spec)) is False


def test_canary_skipped_for_forced_promotion() -> None:
    spec = canary_spec(0.2)
    assert uses_canary(spec, PASSED_WITH_CHAMPION, config(spec, force_promote=True)) is False


def test_deploy_section_rejects_share_above_one(tmp_path) -> None:
    text = load_spec("digits").source_path.read_text() + "\ndeploy:\n  canary_share: 1.5\n"
    path = tmp_path / "digits.yaml"
    path.write_text(text)
    with pytest.raises(SpecError, match="canary_share"):
        load_spec(path)


def test_deploy_section_leaves_digest_unchanged(tmp_path) -> None:
    text = load_spec("digits").source_path.read_text() + "\ndeploy:\n  canary_share: 0.1\n"
    path = tmp_path / "digits.yaml"
    path.write_text(text)
    spec = load_spec(path)
    assert spec.deploy.canary_share == 0.1
    assert spec.digest() == load_spec("digits").digest()
