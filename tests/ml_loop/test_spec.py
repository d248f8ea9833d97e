"""Pipeline specs and run configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml_loop.errors import SpecError
from ml_loop.spec import RunConfig, list_specs, load_spec


def test_shipped_specs_load() -> None:
    assert list_specs() == ["breast_cancer", "digits"]
    digits = load_spec("digits")
    cancer = load_spec("breast_cancer")
    assert digits.dataset.kind == "images"
    assert digits.dataset.image is not None
    assert cancer.dataset.kind == "tabular"
    assert len(cancer.dataset.feature_names) == 30


def test_digest_changes_with_content(tmp_path: Path) -> None:
    source = load_spec("digits").source_path.read_text()
    edited = tmp_path / "digits.yaml"
    edited.write_text(source.replace("min_accuracy: 0.9", "min_accuracy: 0.8"))
    assert load_spec(edited).digest() != load_spec("digits").digest()


def test_unknown_spec_lists_available() -> None:
    with pytest.raises(SpecError, match="available specs: breast_cancer, digits"):
        load_spec("nope")


def test_invalid_spec_names_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        load_spec("digits").source_path.read_text().replace("test: 0.15", "test: 0.95")
    )
    with pytest.raises(SpecError, match=r"broken\.yaml.*split"):
        load_spec(broken)


def test_run_config_defaults_from_spec() -> None:
    spec = load_spec("digits")
    config = RunConfig.from_params(spec, {})
    assert config.epochs == spec.training.epochs
    assert config.learning_rate == spec.training.learning_rate


def test_run_config_takes_typed_params() -> None:
    config = RunConfig.from_params(load_spec("digits"), {"epochs": 20, "learning_rate": 1})
    assert config.epochs == 20
    assert isinstance(config.learning_rate, float)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"epochs": "20"}, "epochs='20': expected type int, got str"),
        ({"epochs": True}, "epochs=True: expected type int"),
        ({"force_promote": "false"}, "force_promote='false': expected type bool"),
        ({"epochs": 0}, "epochs=0: expected an integer of at least 1"),
        ({"learning_rate": 2.0}, "learning_rate=2.0: expected a number above 0 and at most 1"),
    ],
)
def test_run_config_rejects_bad_param(params: dict, message: str) -> None:
    with pytest.raises(SpecError) as raised:
        RunConfig.from_params(load_spec("digits"), params)
    assert message in str(raised.value)
