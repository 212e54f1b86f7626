"""Records read back from disk: every field of its declared type, or a ValueError naming the field."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from cake_py.api.records import from_record


@dataclass
class Record:
    id: str
    count: int
    ratio: float = 1.0
    when: int | None = None
    done: bool = False
    usage: dict[str, int] = field(default_factory=dict)
    errors: list[dict[str, Any]] | None = None


def test_a_record_of_the_declared_types_is_read() -> None:
    raw = {"id": "a", "count": 2, "ratio": 3, "when": None, "done": True, "usage": {"x": 1}, "errors": [{"k": [1]}]}
    assert from_record(Record, raw) == Record("a", 2, 3, None, True, {"x": 1}, [{"k": [1]}])
    assert from_record(Record, {"id": "a", "count": 0}) == Record("a", 0)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ([1], "not a JSON object but list"),
        ({"id": "a"}, "field 'count' is missing"),
        ({"id": "a", "count": "2"}, "field 'count' is '2'"),
        ({"id": "a", "count": True}, "field 'count' is True"),
        ({"id": "a", "count": 1, "when": 1.5}, "field 'when' is 1.5"),
        ({"id": "a", "count": 1, "usage": None}, "field 'usage' is None"),
        ({"id": "a", "count": 1, "usage": {"x": "1"}}, "field 'usage' is {'x': '1'}"),
        ({"id": "a", "count": 1, "errors": ["x"]}, "field 'errors' is ['x']"),
        ({"id": "a", "count": 1, "extra": 0}, "unknown field 'extra'"),
    ],
)
def test_a_field_of_another_type_is_named(raw: object, needle: str) -> None:
    with pytest.raises(ValueError, match="^" + needle.replace("[", r"\[").replace("(", r"\(")):
        from_record(Record, raw)
