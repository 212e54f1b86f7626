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


def test_embeddings_put_a_paraphrase_nearest() -> None:
    """SmolLM2's pooled hidden states, as /v1/embeddings serves them: a paraphrase is nearer than unrelated text."""
    import queue

    import torch

    from cake_py.cluster.pipeline import local_pipeline
    from cake_py.engine.engine import Engine
    from cake_py.models.hub import resolve_model
    from cake_py.models.pooling import Pooling
    from cake_py.models.sampling import SamplingParams

    source = resolve_model(None)
    engine = Engine(local_pipeline(source, torch.bfloat16), source.tokenizer)
    engine.start()
    texts = [
        "Paris is the capital of France.",
        "The French capital is Paris.",
        "I like to eat bananas for breakfast.",
        "Python is a programming language.",
    ]
    try:
        for kind in ("last", "mean"):
            vectors = []
            for text in texts:
                events: queue.SimpleQueue = queue.SimpleQueue()  # type: ignore[type-arg]
                engine.submit(
                    source.tokenizer.encode(text), SamplingParams(max_tokens=0, pooling=Pooling(kind)), events.put
                )
                vectors.append(torch.frombuffer(bytearray(events.get(timeout=120).embedding), dtype=torch.float32))
            similarity = [float(vectors[0] @ other) for other in vectors[1:]]
            assert similarity[0] > max(similarity[1:]) + 0.05, (kind, similarity)
    finally:
        engine.close()
