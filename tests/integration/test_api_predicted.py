"""OpenAI's Predicted Outputs (`prediction` on /v1/chat/completions) through the official client against a real
uvicorn server on the tiny Llama: the same answer as without it, with the usage's prediction token counts.
(tests/integration/test_real_model.py shows a prediction cutting the steps on the real model.)"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from openai import OpenAI

from cake_py.api.errors import ApiError
from cake_py.api.schemas import predicted_output
from tests.fixtures.server import ServerHandle

MESSAGES: list[Any] = [{"role": "user", "content": "Write out the alphabet."}]


SERVED_MODEL = "tiny_llama"  # the server and client fixtures: tests/integration/conftest.py


def test_a_prediction_gives_the_same_answer_and_counts_its_tokens(client: OpenAI) -> None:
    plain = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=24, temperature=0)
    text = plain.choices[0].message.content or ""
    assert plain.usage is not None and plain.usage.completion_tokens_details is None  # no prediction, no counts
    for prediction in (
        {"type": "content", "content": text},
        {"type": "content", "content": [{"type": "text", "text": text}]},
    ):
        predicted = client.chat.completions.create(
            model="x",
            messages=MESSAGES,
            max_tokens=24,
            temperature=0,
            prediction=prediction,  # type: ignore[arg-type]
        )
        assert predicted.choices[0].message.content == text
        assert predicted.usage is not None and predicted.usage.completion_tokens == 24
        details = predicted.usage.completion_tokens_details
        assert details is not None and details.accepted_prediction_tokens is not None
        assert details.rejected_prediction_tokens is not None
        assert details.accepted_prediction_tokens + details.rejected_prediction_tokens > 0  # it was drafted from


def test_a_streamed_answer_counts_them_in_its_usage_chunk(client: OpenAI) -> None:
    plain = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=16, temperature=0)
    text = plain.choices[0].message.content or ""
    stream = client.chat.completions.create(
        model="x",
        messages=MESSAGES,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        prediction={"type": "content", "content": text},
    )
    chunks = list(stream)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == text
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.accepted_prediction_tokens is not None


@pytest.mark.parametrize(
    ("prediction", "needle"),
    [
        ("abc", "prediction must be"),
        ({"type": "text", "content": "abc"}, "prediction must be"),
        ({"type": "content", "content": 5}, "prediction.content"),
        ({"type": "content", "content": [{"type": "image_url"}]}, "prediction.content"),
        ({"type": "content", "content": "word " * 2000}, "more than the model's context of 512"),
    ],
)
def test_a_bad_prediction_is_named(server: ServerHandle, prediction: Any, needle: str) -> None:
    body = {"messages": MESSAGES, "max_tokens": 2, "prediction": prediction}
    answer = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 400 and needle in answer.json()["error"]


def test_an_empty_prediction_counts_nothing(client: OpenAI) -> None:
    answer = client.chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=4, prediction={"type": "content", "content": ""}
    )
    assert answer.usage is not None and answer.usage.completion_tokens_details is not None
    details = answer.usage.completion_tokens_details
    assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (0, 0)


def test_a_prediction_token_outside_the_vocabulary_is_named() -> None:
    class Tokens:  # a tokenizer whose added token lies past the model's embeddings
        def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
            return [5, 384, 6]

    with pytest.raises(ApiError) as refused:
        predicted_output({"prediction": {"type": "content", "content": "x"}}, Tokens(), 384, 512)  # type: ignore[arg-type]
    assert refused.value.status == 400 and "token id 384" in refused.value.message
