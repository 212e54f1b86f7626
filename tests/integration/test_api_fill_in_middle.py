"""OpenAI's `suffix` on /v1/completions (fill in the middle) through the official client against a real uvicorn
server on the tiny Llama given fill-in-the-middle tokens: the prompt is prefix-suffix-middle, the answer what goes
between."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from cake_py.models.tokenizer import Tokenizer
from tests.fixtures.server import ServerHandle

PREFIX, SUFFIX = "def cake(layers):\n    return ", "\n\nprint(cake(3))\n"


SERVED_MODEL = "tiny_llama_fim"  # the server and client fixtures: tests/integration/conftest.py


def test_the_middle_is_the_completion_of_the_prefix_suffix_middle_prompt(
    client: OpenAI, server: ServerHandle, tiny_llama_fim: Path
) -> None:
    tokenizer = Tokenizer.from_folder(tiny_llama_fim)
    assert tokenizer.fill_in_middle is not None
    prefix_id, suffix_id, middle_id = tokenizer.fill_in_middle
    middle = client.completions.create(model="x", prompt=PREFIX, suffix=SUFFIX, max_tokens=12, temperature=0)
    ids = [prefix_id, *tokenizer.encode(PREFIX), suffix_id, *tokenizer.encode(SUFFIX), middle_id]
    expected = client.completions.create(model="x", prompt=ids, max_tokens=12, temperature=0)
    assert middle.choices[0].text == expected.choices[0].text
    assert middle.usage is not None and middle.usage.prompt_tokens == len(ids)
    plain = client.completions.create(model="x", prompt=PREFIX, max_tokens=12, temperature=0)
    assert plain.usage is not None and plain.usage.prompt_tokens == len(tokenizer.encode(PREFIX))
    streamed = client.completions.create(
        model="x", prompt=PREFIX, suffix=SUFFIX, max_tokens=12, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == middle.choices[0].text


def test_a_fill_in_the_middle_marker_ends_the_middle(server: ServerHandle, tiny_llama_fim: Path) -> None:
    tokenizer = Tokenizer.from_folder(tiny_llama_fim)
    assert tokenizer.fill_in_middle is not None
    prefix_id = tokenizer.fill_in_middle[0]
    body = {"prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 4, "logit_bias": {str(prefix_id): 100}}
    answer = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60).json()
    assert answer["choices"][0]["finish_reason"] == "stop" and answer["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize(
    ("extra", "needle"), [({"suffix": 3}, "suffix must be a string"), ({"suffix": "x", "echo": True}, "echo")]
)
def test_bad_suffixes_are_named(server: ServerHandle, extra: dict[str, object], needle: str) -> None:
    answer = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "a", "max_tokens": 2, **extra})
    assert answer.status_code == 400 and needle in answer.json()["error"]
