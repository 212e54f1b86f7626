"""The embedded SmolLM2-135M-Instruct, end to end through `cake run`."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_cake_run_answers_paris() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cake_py.cli", "run", "What is the capital of France?", "--max-tokens", "24"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_engine_answers_paris_in_float32_too() -> None:
    import torch

    from cake_py.engine.oneshot import run_prompt
    from cake_py.models.sampling import SamplingParams

    pieces: list[str] = []
    text = run_prompt(
        None,
        "What is the capital of France?",
        SamplingParams(temperature=0.0, max_tokens=16),
        pieces.append,
        dtype="float32",
        device="cpu",
    )
    assert "Paris" in text
    assert "".join(pieces) == text
    assert torch.get_num_threads() >= 1


def test_json_schema_answer_names_paris() -> None:
    import json

    from cake_py.engine.oneshot import run_prompt
    from cake_py.models.grammar import compiler_for, json_grammar
    from cake_py.models.hub import resolve_model
    from cake_py.models.sampling import SamplingParams

    schema = {
        "type": "object",
        "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
        "required": ["country", "capital"],
        "additionalProperties": False,
    }
    grammar = compiler_for(resolve_model(None).tokenizer).compile(json_grammar(schema))
    text = run_prompt(
        None,
        "What is the capital of France? Answer in JSON.",
        SamplingParams(temperature=0.0, max_tokens=64, grammar=grammar),
        lambda piece: None,
    )
    answer = json.loads(text)
    assert answer["capital"] == "Paris"
