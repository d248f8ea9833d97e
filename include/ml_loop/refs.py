"""The small references each stage returns, and Airflow passes between tasks by XCom."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from ml_loop.errors import InvalidReferenceError


class StageRef:
    """Mixin for a stage's frozen dataclass output: to and from a JSON-ready dict.

    Subclasses set ``producer`` to the function that returns them, which the error for a dict
    with missing keys names.
    """

    producer: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        fields = dataclasses.fields(cls)
        names = [field.name for field in fields]
        missing = [
            field.name
            for field in fields
            if field.name not in data
            and field.default is dataclasses.MISSING
            and field.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise InvalidReferenceError(
                f"invalid {cls.__name__} {dict(data)!r}: missing keys {missing}; pass the dict "
                f"that {cls.producer} returned"
            )
        return cls(**{name: data[name] for name in names if name in data})
