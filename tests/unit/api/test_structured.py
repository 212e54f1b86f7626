"""Which grammar a request's structured-output fields ask for (api/structured.py), before anything compiles it."""

from __future__ import annotations

from typing import Any

import pytest

from cake_py.api.structured import _requested
from cake_py.models.grammar import json_grammar

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def _built(body: dict[str, Any]) -> str:
    [(_, build)] = _requested(body)
    assert build is not None
    return build()


@pytest.mark.parametrize(
    ("body", "schema"),
    [
        ({"guided_json": SCHEMA}, SCHEMA),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}, SCHEMA),
        ({"response_format": {"type": "json_object"}}, None),
        ({"response_format": {"type": "json_object", "schema": SCHEMA}}, SCHEMA),  # llama.cpp's form
    ],
)
def test_guided_whitespace_pattern_spaces_the_json_vllm_spaces_with_it(body: dict[str, Any], schema: Any) -> None:
    """vLLM takes guided_whitespace_pattern for response_format's JSON as for guided_json's (one GuidedDecodingParams
    holds both): beside response_format it was ignored, so a client asking for compact JSON got spaced JSON."""
    assert _built({**body, "guided_whitespace_pattern": ""}) == json_grammar(schema, whitespace="")
    assert _built(body) == json_grammar(schema)  # without it, the default spacing


def test_guided_whitespace_pattern_leaves_other_kinds_alone() -> None:
    assert _built({"guided_regex": "[0-9]+", "guided_whitespace_pattern": ""}) == _built({"guided_regex": "[0-9]+"})
