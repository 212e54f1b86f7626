"""The OpenAI surface through the official `openai` client against a real uvicorn server on the tiny Llama."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.fixtures.server import ServerHandle, running_server, tiny_settings

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[ServerHandle]:
    with running_server(tiny_settings(tiny_llama, model_name="tiny-llama")) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=60) as openai_client:
        yield openai_client


def _greedy_chat(client: OpenAI, max_tokens: int = 12) -> str:
    completion = client.chat.completions.create(
        model="ignored",
        messages=MESSAGES,
        max_tokens=max_tokens,
        temperature=0,  # type: ignore[arg-type]
    )
    return completion.choices[0].message.content or ""


def test_chat_blocking_counts_prompt_tokens_and_stops_at_max_tokens(client: OpenAI, server: ServerHandle) -> None:
    completion = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=7, temperature=0)  # type: ignore[arg-type]
    assert completion.object == "chat.completion"
    assert completion.model == "tiny-llama"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert server.state.source is not None
    n_prompt = len(server.state.source.tokenizer.encode_chat(MESSAGES))
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (n_prompt, 7)
    assert completion.usage.total_tokens == n_prompt + 7


def test_chat_stream_is_role_deltas_finish_with_usage_then_done(client: OpenAI, server: ServerHandle) -> None:
    expected = _greedy_chat(client)
    body = {"messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # as OpenAI sends it
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    middle = chunks[1:-1]
    assert middle and all(set(chunk["choices"][0]["delta"]) == {"content"} for chunk in middle)
    assert all(chunk["choices"][0]["finish_reason"] is None and "usage" not in chunk for chunk in middle)
    last = chunks[-1]
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    assert last["usage"]["completion_tokens"] == 12
    assert "".join(chunk["choices"][0]["delta"]["content"] for chunk in middle) == expected


def test_chat_stream_through_the_openai_client(client: OpenAI) -> None:
    expected = _greedy_chat(client)
    stream = client.chat.completions.create(
        model="x",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
        usage = chunk.usage or usage
    assert "".join(pieces) == expected
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 12


def test_seed_makes_sampling_reproducible(client: OpenAI) -> None:
    def sample(seed: int) -> str:
        completion = client.chat.completions.create(
            model="x",
            messages=MESSAGES,
            max_tokens=16,
            temperature=1.0,
            seed=seed,  # type: ignore[arg-type]
        )
        return completion.choices[0].message.content or ""

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_stop_string_ends_the_text_before_it(client: OpenAI) -> None:
    text = _greedy_chat(client, max_tokens=24)
    match = re.search(r"[A-Za-z]{2,}", text[1:])
    assert match, f"the tiny model's greedy text {text!r} has no word to stop on"
    stop = match.group(0)
    completion = client.chat.completions.create(
        model="x",
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        stop=[stop],  # type: ignore[arg-type]
    )
    assert completion.choices[0].message.content == text[: text.find(stop)]
    assert completion.choices[0].finish_reason == "stop"


def test_n_choices_with_logprobs(client: OpenAI) -> None:
    completion = client.chat.completions.create(
        model="x",
        messages=MESSAGES,
        max_tokens=5,
        temperature=0.8,
        seed=3,
        n=2,
        logprobs=True,
        top_logprobs=3,  # type: ignore[arg-type]
    )
    assert [choice.index for choice in completion.choices] == [0, 1]
    for choice in completion.choices:
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert len(choice.logprobs.content) == 5
        assert all(len(entry.top_logprobs) == 3 and entry.logprob <= 0 for entry in choice.logprobs.content)
    assert completion.usage is not None and completion.usage.completion_tokens == 10


def test_completions_blocking_and_streaming_agree(client: OpenAI, server: ServerHandle) -> None:
    completion = client.completions.create(model="x", prompt="The cake is", max_tokens=6, temperature=0)
    assert completion.object == "text_completion"
    assert completion.choices[0].finish_reason == "length"
    assert server.state.source is not None
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(server.state.source.tokenizer.encode("The cake is"))
    streamed = client.completions.create(model="x", prompt="The cake is", max_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in streamed) == completion.choices[0].text


def test_models_lists_the_served_model_name(client: OpenAI) -> None:
    assert [model.id for model in client.models.list()] == ["tiny-llama"]


def test_error_classes(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="x", messages=MESSAGES, temperature=-1)  # type: ignore[arg-type]
    assert bad.value.status_code == 400
    assert bad.value.body == "temperature must be between 0 and 100, got -1.0"  # the client unwraps {"error": …}
    long_prompt = [{"role": "user", "content": "cake " * 1000}]
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="x", messages=long_prompt)  # type: ignore[arg-type]
    assert too_long.value.response.json()["code"] == "context_length_exceeded"
    assert "512 tokens" in too_long.value.response.json()["error"]
    with pytest.raises(openai.NotFoundError) as no_image:
        client.images.generate(prompt="a cake", model="x")
    assert no_image.value.body == "No image model loaded"


def test_max_tokens_is_clipped_to_the_room_left_in_the_context(client: OpenAI, server: ServerHandle) -> None:
    assert server.state.source is not None
    token = server.state.source.tokenizer.encode("cake")[0]
    completion = client.completions.create(model="x", prompt=[token] * 505, max_tokens=100, temperature=0)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == 505
    assert completion.usage.completion_tokens <= 7
    if completion.usage.completion_tokens == 7:
        assert completion.choices[0].finish_reason == "length"


def test_each_prompt_of_a_completion_keeps_its_own_room(server: ServerHandle) -> None:
    # A long prompt beside a short one clips only its own max_tokens (the short one used to get the long one's).
    assert server.state.source is not None
    token = server.state.source.tokenizer.encode("cake")[0]
    body = {"prompt": [[token] * 3, [token] * 509], "max_tokens": 20, "temperature": 0}
    response = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    short, long = sorted(response.json()["choices"], key=lambda choice: choice["index"])
    assert short["finish_reason"] == "length" and long["finish_reason"] == "length"
    assert response.json()["usage"]["completion_tokens"] > 20  # the short prompt's 20, plus the long one's 3


@pytest.mark.parametrize(("seed", "n"), [(2**64 - 1, 2), (-(2**63), 1)])
def test_any_64_bit_seed_is_accepted(server: ServerHandle, seed: int, n: int) -> None:
    body = {"messages": MESSAGES, "max_tokens": 2, "seed": seed, "n": n}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == n


def test_a_seed_past_64_bits_is_a_400_naming_it(server: ServerHandle) -> None:
    body = {"messages": MESSAGES, "max_tokens": 2, "seed": 2**64}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert "seed" in response.json()["error"] and str(2**64) in response.json()["error"]


def test_a_tiny_temperature_beside_another_request_harms_neither(client: OpenAI, server: ServerHandle) -> None:
    expected = _greedy_chat(client, max_tokens=8)
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 1e-300}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == expected  # that close to 0 is greedy


def test_streamed_logprob_offsets_match_the_blocking_ones(server: ServerHandle) -> None:
    body = {"prompt": "The cake is", "max_tokens": 12, "temperature": 0, "logprobs": 1}
    blocking = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60).json()
    offsets: list[int] = []
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json={**body, "stream": True}, timeout=60) as sse:
        for line in sse.iter_lines():
            if line.startswith("data: {"):
                logprobs = json.loads(line.removeprefix("data: "))["choices"][0]["logprobs"]
                offsets += logprobs["text_offset"] if logprobs else []
    assert offsets == blocking["choices"][0]["logprobs"]["text_offset"]


def test_a_finished_request_sends_the_engine_no_cancel(server: ServerHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    # A cancel for a finished request used to sit in the engine's inbox and count as queued work (queue_depth).
    engine = server.state.engine
    assert engine is not None
    cancels: list[int] = []
    monkeypatch.setattr(engine, "cancel", cancels.append)
    for stream in (False, True):
        body = {"messages": MESSAGES, "max_tokens": 3, "stream": stream}
        assert httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60).status_code == 200
    assert cancels == []
    assert engine.queue_depth == 0


@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": {"type": "json_object"}},
        {"response_format": {"type": "json_schema"}},
        {"functions": [{"name": "f"}]},
    ],
    ids=["json_object", "json_schema", "functions"],
)
def test_output_constraints_it_cannot_honour_are_a_400(server: ServerHandle, extra: dict[str, object]) -> None:
    body = {"messages": MESSAGES, "max_tokens": 2, **extra}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert next(iter(extra)) in response.json()["error"]
    text = {"messages": MESSAGES, "max_tokens": 2, "response_format": {"type": "text"}}
    assert httpx.post(f"{server.base_url}/v1/chat/completions", json=text, timeout=60).status_code == 200


def test_openai_client_details(client: OpenAI, server: ServerHandle) -> None:
    assert client.models.retrieve("tiny-llama").id == "tiny-llama"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("another-model")
    # The first streamed chunk carries content "" (the SDK's accumulated message is then never None).
    with httpx.stream(
        "POST", f"{server.base_url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, "stream": True}
    ) as sse:
        first = json.loads(next(line for line in sse.iter_lines() if line.startswith("data: ")).removeprefix("data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    # top_p 0 is accepted (greedy); a null max_completion_tokens leaves max_tokens in charge.
    greedy = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=5, top_p=0)  # type: ignore[arg-type]
    assert greedy.choices[0].message.content == _greedy_chat(client, max_tokens=5)
    body = {"messages": MESSAGES, "max_tokens": 3, "max_completion_tokens": None, "temperature": 0}
    answer = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60).json()
    assert answer["usage"]["completion_tokens"] <= 3
