"""Stage references passed between tasks."""

from __future__ import annotations

import pytest

from ml_loop.errors import InvalidReferenceError
from ml_loop.ingest import PartitionRef
from ml_loop.registry import Registration

PARTITION = {
    "dataset": "digits",
    "partition_date": "2026-12-04",
    "raw_uri": "/data/raw/digits/2026-12-04/abc",
    "file_count": 3,
    "bytes": 120,
    "content_hash": "abc",
    "source": "landing",
}


def test_ref_roundtrip() -> None:
    ref = PartitionRef.from_dict(PARTITION)
    assert ref.to_dict() == PARTITION


def test_ref_ignores_extra_keys() -> None:
    assert PartitionRef.from_dict({**PARTITION, "note": "x"}).to_dict() == PARTITION


def test_ref_fills_defaulted_fields() -> None:
    without_source = {key: value for key, value in PARTITION.items() if key != "source"}
    assert PartitionRef.from_dict(without_source).source == "landing"


def test_ref_missing_keys_named() -> None:
    partial = {key: value for key, value in PARTITION.items() if key != "raw_uri"}
    with pytest.raises(InvalidReferenceError) as raised:
        PartitionRef.from_dict(partial)
    assert "missing keys ['raw_uri']" in str(raised.value)
    assert "ml_loop.ingest.ingest_partition" in str(raised.value)


def test_registration_versions_as_strings() -> None:
    registration = Registration.from_dict(
        {
            "model_name": "digits-cnn",
            "version": 3,
            "run_id": "r1",
            "promoted": True,
            "forced": False,
            "previous_version": 2,
            "aliases": ("champion",),
        }
    )
    assert registration.version == "3"
    assert registration.previous_version == "2"
    assert registration.aliases == ["champion"]
