"""The OpenAI surface through the official `openai` client against a real uvicorn server on the tiny Llama."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from cake_py.api import keepalive
from cake_py.models.tokenizer import Tokenizer
from tests.fixtures.server import ServerHandle, running_server, slow_steps, tiny_settings

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
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length", "stop_reason": None}
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


def test_keepalive_comments_are_skipped_by_the_client(
    client: OpenAI, server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keep-alive every millisecond: the raw stream holds comment lines, the SDK reads the same answer."""
    expected = _greedy_chat(client)
    monkeypatch.setattr(keepalive, "KEEPALIVE_S", 0.001)
    slow_steps(monkeypatch, server, 0.02)  # a silence of 20 ms before each token, however fast the machine
    body = {"model": "x", "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "stream": True}
    raw = httpx.post(f"{server.openai_url}/chat/completions", json=body, timeout=60).text
    assert ": keep-alive\n\n" in raw and raw.endswith("data: [DONE]\n\n")
    stream = client.chat.completions.create(
        model="x",
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stream=True,  # type: ignore[arg-type]
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices) == expected


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
    assert completion.choices[0].model_dump()["stop_reason"] == stop  # vLLM's: which stop ended it
    streamed = client.chat.completions.create(
        model="x", messages=MESSAGES, max_tokens=24, temperature=0, stop=[stop], stream=True
    )
    finishing = [choice for chunk in streamed for choice in chunk.choices if choice.finish_reason]
    assert [choice.model_dump()["stop_reason"] for choice in finishing] == [stop]
    legacy = client.completions.create(model="x", prompt="Once upon a time", max_tokens=24, temperature=0)
    assert legacy.choices[0].model_dump()["stop_reason"] is None  # a length finish
    word = re.search(r"[A-Za-z]{2,}", legacy.choices[0].text[1:])
    assert word, legacy.choices[0].text
    ended = client.completions.create(
        model="x", prompt="Once upon a time", max_tokens=24, temperature=0, stop=["NEVER", word.group(0)]
    )
    assert ended.choices[0].model_dump()["stop_reason"] == word.group(0)


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


def test_models_lists_the_served_model_name(client: OpenAI, server: ServerHandle) -> None:
    [model] = client.models.list()
    assert model.id == "tiny-llama" and model.owned_by == "cake"
    assert server.state.engine is not None and server.state.source is not None
    extra = model.model_extra or {}  # vLLM's fields: what was loaded and the context to size prompts to
    assert extra["max_model_len"] == server.state.engine.context_length
    assert extra["root"] == server.state.source.model_id
    assert client.models.retrieve("tiny-llama").model_extra == model.model_extra


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


@pytest.mark.parametrize("stream", [False, True])
def test_logprob_offsets_index_the_text_of_multibyte_characters(server: ServerHandle, stream: bool) -> None:
    """Offsets were summed over each token's text alone, U+FFFD for part of a character: "héllo 日本" (8 characters)
    got offsets up to 9. A token holding part of a character starts where that character starts."""
    prompt = "héllo 日本"
    body = {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1, "stream": stream}
    if stream:
        choices = [c["choices"][0] for c in _sse_chunks(server, "/v1/completions", body) if c["choices"]]
    else:
        response = _post(server, "/v1/completions", body)
        assert response.status_code == 200, response.text
        choices = response.json()["choices"]
    assert "".join(choice["text"] for choice in choices) == prompt
    offsets = [offset for choice in choices if choice["logprobs"] for offset in choice["logprobs"]["text_offset"]]
    tokenizer = _tokenizer(server)
    raw = [tokenizer.token_bytes(token) for token in tokenizer.encode(prompt)]
    assert b"".join(raw) == prompt.encode() and b"\xc3" in raw  # "é" is split across two tokens
    character_of_byte = [index for index, character in enumerate(prompt) for _ in character.encode()]
    starts = itertools.accumulate((len(piece) for piece in raw[:-1]), initial=0)
    assert offsets == [character_of_byte[start] for start in starts]


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
        {"response_format": {"type": "xml"}},
        {"response_format": {"type": "json_schema"}},
        {"functions": [{"name": "f"}]},
    ],
    ids=["unknown_format", "json_schema_without_schema", "functions"],
)
def test_output_constraints_it_cannot_honour_are_a_400(server: ServerHandle, extra: dict[str, object]) -> None:
    body = {"messages": MESSAGES, "max_tokens": 2, **extra}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert next(iter(extra)) in response.json()["error"]
    text = {"messages": MESSAGES, "max_tokens": 2, "response_format": {"type": "text"}}
    assert httpx.post(f"{server.base_url}/v1/chat/completions", json=text, timeout=60).status_code == 200


def test_a_bad_length_is_named_as_sent(server: ServerHandle) -> None:
    """max_completion_tokens 0 was "max_tokens must be at least 1"; echo with logprobs still allows 0."""
    for key in ("max_completion_tokens", "max_tokens"):
        answer = httpx.post(f"{server.base_url}/v1/chat/completions", json={"messages": MESSAGES, key: 0}, timeout=60)
        assert answer.status_code == 400 and answer.json()["error"] == f"{key} must be at least 1, got 0"
    scored = {"prompt": "The cake", "max_tokens": 0, "echo": True, "logprobs": 1}
    assert httpx.post(f"{server.base_url}/v1/completions", json=scored, timeout=60).status_code == 200


@pytest.mark.parametrize("logprobs", [0, 1, "true"])
def test_chat_logprobs_is_a_boolean_and_completions_a_count(server: ServerHandle, logprobs: object) -> None:
    """Chat took the legacy completions' integer: 0 turned logprobs on and 1 asked for one top logprob."""
    chat = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "logprobs": logprobs})
    assert chat.status_code == 400, chat.text
    assert chat.json()["error"] == f"logprobs must be true or false, got {logprobs!r}"
    if isinstance(logprobs, int):
        completion = _post(server, "/v1/completions", {"prompt": "cake", "max_tokens": 2, "logprobs": logprobs})
        assert completion.status_code == 200, completion.text
        tops = completion.json()["choices"][0]["logprobs"]["top_logprobs"]
        assert [len(top) for top in tops] == [logprobs] * 2


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


def _tokenizer(server: ServerHandle) -> Tokenizer:
    assert server.state.source is not None
    return server.state.source.tokenizer


def _post(server: ServerHandle, route: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}{route}", json=body, timeout=60)


def _sse_chunks(server: ServerHandle, route: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every chunk of a stream, checked to end with `data: [DONE]`."""
    with httpx.stream("POST", f"{server.base_url}{route}", json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_logit_bias_steers_the_tokens(server: ServerHandle, route: str) -> None:
    token = _tokenizer(server).encode(" cake")[0]
    body = {"messages": MESSAGES, "prompt": "The cake is", "max_tokens": 4, "temperature": 0}
    body["logit_bias"] = {str(token): 100}
    response = _post(server, route, body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert (choice["message"]["content"] if "message" in choice else choice["text"]) == " cake" * 4


@pytest.mark.parametrize(
    ("bias", "needle"),
    [
        ({"cake": 1}, "'cake'"),
        ({"-1": 1}, "'-1'"),
        ({"384": 1}, "384"),
        ({"5": 101}, "101"),
        ({"5": "1"}, "'1'"),
        ({"0" * 5000 + "99999": 1}, "outside the model's vocabulary"),  # int() refuses 5,000 digits, zeros or not
        ({"\u00b2": 1}, "is not a token id"),
    ],
    ids=lambda value: str(value)[:60],
)
def test_a_bad_logit_bias_is_a_400_naming_it(server: ServerHandle, bias: dict[str, object], needle: str) -> None:
    response = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "logit_bias": bias})
    assert response.status_code == 400
    assert "logit_bias" in response.json()["error"] and needle in response.json()["error"]


def test_a_logit_bias_id_with_leading_zeros_names_the_token(server: ServerHandle) -> None:
    body = {"messages": MESSAGES, "max_tokens": 2, "logit_bias": {"0" * 5000 + "7": 100}, "temperature": 0}
    response = _post(server, "/v1/chat/completions", {**body, "logprobs": True})
    assert response.status_code == 200, response.text
    assert server.state.source is not None
    seven = server.state.source.tokenizer.decode([7])
    assert [entry["token"] for entry in response.json()["choices"][0]["logprobs"]["content"]] == [seven, seven]


def _chat_token_bytes(server: ServerHandle, **extra: Any) -> list[bytes]:
    """The greedy tokens of a chat answer, as their bytes (unique per token of a byte-level BPE)."""
    body = {"messages": MESSAGES, "max_tokens": 16, "temperature": 0, "logprobs": True, **extra}
    response = _post(server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    return [bytes(entry["bytes"]) for entry in response.json()["choices"][0]["logprobs"]["content"]]


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_penalties_stop_greedy_decoding_repeating_itself(server: ServerHandle, penalty: str) -> None:
    plain = _chat_token_bytes(server)
    assert len(set(plain)) < len(plain), f"the tiny model's greedy tokens {plain!r} repeat nothing to penalise"
    # Its logits lie within 2 of each other: a seen token that pays 2 never wins again.
    penalised = _chat_token_bytes(server, **{penalty: 2})
    assert len(set(penalised)) == len(penalised) == 16
    body = {"prompt": "The cake is", "max_tokens": 16, "temperature": 0}
    texts = {
        _post(server, "/v1/completions", {**body, penalty: value}).json()["choices"][0]["text"] for value in (0, 2)
    }
    assert len(texts) == 2  # /v1/completions honours it too


@pytest.mark.parametrize(
    ("field", "value"), [("presence_penalty", 2.5), ("frequency_penalty", -3), ("presence_penalty", "high")]
)
def test_a_penalty_outside_its_range_is_a_400(server: ServerHandle, field: str, value: object) -> None:
    response = _post(server, "/v1/completions", {"prompt": "cake", "max_tokens": 2, field: value})
    assert response.status_code == 400
    assert field in response.json()["error"] and str(value) in response.json()["error"]


def test_completions_echo_the_prompt_as_sent(server: ServerHandle) -> None:
    tokenizer = _tokenizer(server)
    text = "<|im_start|>The  cake is"  # a special token and a double space, that a skip-special decode would lose
    body = {"prompt": text, "max_tokens": 3, "temperature": 0, "echo": True}
    blocking = _post(server, "/v1/completions", body).json()["choices"][0]["text"]
    assert blocking.startswith(text)
    streamed = _sse_chunks(server, "/v1/completions", {**body, "stream": True})
    assert streamed[0]["choices"][0]["text"] == text
    ids = [tokenizer.backend.token_to_id("<|im_start|>"), *tokenizer.encode("The cake")]
    by_ids = _post(server, "/v1/completions", {**body, "prompt": ids}).json()["choices"][0]["text"]
    assert by_ids.startswith("<|im_start|>The cake")


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        ({"suffix": "!"}, 400),
        ({"suffix": ""}, 400),
        ({"best_of": 0}, 400),
        ({"best_of": 2, "n": 3}, 400),
        ({"best_of": 129}, 400),
        ({"n": 129}, 400),
        ({"prompt": ["cake"] * 16, "n": 9}, 400),
        ({"prompt": ["cake"] * 2, "best_of": 65}, 400),
        ({"best_of": 1.5}, 400),
        ({"best_of": 3, "stream": True}, 400),
        ({"best_of": 2, "n": 2, "stream": True}, 200),
        ({"best_of": 1}, 200),
        ({"suffix": None}, 200),
    ],
)
def test_a_suffix_without_fill_in_the_middle_tokens_and_a_bad_best_of_are_refused(
    server: ServerHandle, extra: dict[str, object], status: int
) -> None:
    response = _post(server, "/v1/completions", {"prompt": "cake", "max_tokens": 2, **extra})
    assert response.status_code == status, response.text
    if status == 400:
        error = response.json()["error"]
        assert next(iter(extra)) in error or ("prompts x" in error and "at most 128" in error), error


def test_n_goes_to_openais_128(client: OpenAI) -> None:
    """n was capped at 8 where OpenAI takes up to 128 (pass@k evaluations draw 20-100 samples)."""
    chat = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, n=20, seed=1)
    assert sorted(choice.index for choice in chat.choices) == list(range(20))
    assert chat.usage is not None and 20 <= chat.usage.completion_tokens <= 40  # 1-2 tokens each


def test_best_of_returns_the_choices_with_the_highest_logprob_per_token(server: ServerHandle) -> None:
    """best_of was a 400. Now the n of best_of samples with the highest mean logprob: the same seeded samples, drawn
    as n=4 choices with their logprobs, say which two those are."""
    body = {"prompt": "The cake", "max_tokens": 6, "temperature": 1.5, "seed": 11, "ignore_eos": True}
    drawn = _post(server, "/v1/completions", {**body, "n": 4, "logprobs": 0}).json()["choices"]
    means = [sum(c["logprobs"]["token_logprobs"]) / len(c["logprobs"]["token_logprobs"]) for c in drawn]
    ranked = [drawn[i]["text"] for i in sorted(range(4), key=lambda i: -means[i])]
    assert ranked[:2] != [c["text"] for c in drawn[:2]], "the best two should not be the first two drawn here"
    best = _post(server, "/v1/completions", {**body, "n": 2, "best_of": 4}).json()
    assert [c["text"] for c in best["choices"]] == ranked[:2]
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert all(c["logprobs"] is None for c in best["choices"])  # computed to rank them, not asked for
    assert best["usage"]["completion_tokens"] == 4 * 6  # every sample drawn counts, as OpenAI bills best_of
    with_logprobs = _post(server, "/v1/completions", {**body, "best_of": 4, "logprobs": 1}).json()["choices"]
    assert [c["text"] for c in with_logprobs] == ranked[:1]
    assert len(with_logprobs[0]["logprobs"]["top_logprobs"][0]) == 1
    two_prompts = {**body, "prompt": ["The cake", "The cake"], "best_of": 4}
    assert [c["text"] for c in _post(server, "/v1/completions", two_prompts).json()["choices"]] == ranked[:1] * 2


@pytest.mark.parametrize(
    ("route", "extra"),
    [
        ("/v1/completions", {"stream": "false"}),
        ("/v1/completions", {"echo": "true"}),
        ("/v1/chat/completions", {"stream": 1}),
    ],
)
def test_stream_and_echo_must_be_booleans(server: ServerHandle, route: str, extra: dict[str, object]) -> None:
    body = {"messages": MESSAGES, "prompt": "cake", "max_tokens": 2, **extra}
    response = _post(server, route, body)
    assert response.status_code == 400
    assert next(iter(extra)) in response.json()["error"]


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"stream_options": {"include_usage": True}}, "only allowed when stream is true"),
        ({"stream": True, "stream_options": "usage"}, "stream_options must be an object"),
        ({"stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage"),
        ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "continuous_usage_stats is not"),
    ],
)
def test_bad_stream_options_are_a_400(server: ServerHandle, extra: dict[str, object], needle: str) -> None:
    for route in ("/v1/chat/completions", "/v1/completions"):
        response = _post(server, route, {"messages": MESSAGES, "prompt": "cake", "max_tokens": 2, **extra})
        assert response.status_code == 400
        assert needle in response.json()["error"]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_include_usage_sends_one_last_usage_chunk_with_no_choices(server: ServerHandle, route: str) -> None:
    # Greedy: a sampled end token would end a choice early (about one run in 25 with this tiny model's 2 × 5 draws).
    body = {"messages": MESSAGES, "prompt": "The cake is", "max_tokens": 5, "n": 2, "stream": True, "temperature": 0}
    chunks = _sse_chunks(server, route, {**body, "stream_options": {"include_usage": True}})
    *content, last = chunks
    assert all("usage" not in chunk for chunk in content)
    assert sum(1 for chunk in content if chunk["choices"][0]["finish_reason"]) == 2
    assert last["choices"] == [] and last["id"] == content[0]["id"]
    assert last["usage"]["completion_tokens"] == 10
    quiet = _sse_chunks(server, route, {**body, "stream_options": {"include_usage": False}})
    assert all("usage" not in chunk and chunk["choices"] for chunk in quiet)


def test_include_usage_through_the_openai_client(client: OpenAI) -> None:
    stream = client.chat.completions.create(  # type: ignore[call-overload]
        model="x",
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,  # a sampled end token would end it early
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert [chunk.usage is not None for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_text_parts_of_a_message_are_joined_by_newlines(server: ServerHandle) -> None:
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "World"}]
    body = {"messages": [{"role": "user", "content": parts}], "max_tokens": 1}
    response = _post(server, "/v1/chat/completions", body)
    assert response.status_code == 200, response.text
    tokenizer = _tokenizer(server)
    joined = tokenizer.encode_chat([{"role": "user", "content": "Hello\nWorld"}])
    assert len(joined) != len(tokenizer.encode_chat([{"role": "user", "content": "HelloWorld"}]))
    assert response.json()["usage"]["prompt_tokens"] == len(joined)


def test_an_assistants_refusal_in_the_history_is_its_text(server: ServerHandle) -> None:
    """OpenAI accepts an assistant message's refusal part (as its SDK hands one back); it was a 400."""
    refusal = [{"type": "refusal", "refusal": "I can't"}]
    messages = [*MESSAGES, {"role": "assistant", "content": refusal}, {"role": "user", "content": "Why?"}]
    response = _post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    assert response.status_code == 200, response.text
    as_text = [*MESSAGES, {"role": "assistant", "content": "I can't"}, {"role": "user", "content": "Why?"}]
    assert response.json()["usage"]["prompt_tokens"] == len(_tokenizer(server).encode_chat(as_text))
    for message, needle in (
        ({"role": "user", "content": refusal}, "has a 'refusal' part"),  # only the assistant's
        ({"role": "assistant", "content": [{"type": "refusal", "refusal": None}]}, "refusal must be a string"),
    ):
        refused = _post(server, "/v1/chat/completions", {"messages": [*MESSAGES, message], "max_tokens": 1})
        assert refused.status_code == 400 and needle in refused.json()["error"], refused.text


@pytest.mark.parametrize(("top_k", "status"), [(-1, 200), (0, 200), (-2, 400)])
def test_top_k_minus_one_is_off(server: ServerHandle, top_k: int, status: int) -> None:
    response = _post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2, "top_k": top_k})
    assert response.status_code == status, response.text
    if status == 400:
        assert "top_k" in response.json()["error"] and "-2" in response.json()["error"]


def test_completions_default_to_16_tokens(server: ServerHandle) -> None:
    ends = {str(token): -100 for token in _tokenizer(server).eos_token_ids}  # nothing ends it early
    response = _post(server, "/v1/completions", {"prompt": "The cake is", "logit_bias": ends})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 16
    assert response.json()["choices"][0]["finish_reason"] == "length"


CONTINUED = [MESSAGES[0], {"role": "assistant", "content": "The capital is"}]


def test_continue_final_message_continues_the_assistants_text(server: ServerHandle) -> None:
    tokenizer = _tokenizer(server)
    expected = tokenizer.encode_chat(CONTINUED, add_generation_prompt=False, continue_final_message=True)
    assert tokenizer.decode(expected, skip_special_tokens=False).endswith("<|im_start|>assistant\nThe capital is")
    body = {"messages": CONTINUED, "max_tokens": 6, "temperature": 0}
    body |= {"add_generation_prompt": False, "continue_final_message": True}
    answer = _post(server, "/v1/chat/completions", body).json()
    assert answer["usage"]["prompt_tokens"] == len(expected)
    same = _post(server, "/v1/completions", {"prompt": expected, "max_tokens": 6, "temperature": 0}).json()
    assert answer["choices"][0]["message"]["content"] == same["choices"][0]["text"]
    closed = _post(server, "/v1/chat/completions", {**body, "continue_final_message": False}).json()
    assert closed["usage"]["prompt_tokens"] == len(tokenizer.encode_chat(CONTINUED, add_generation_prompt=False))


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"continue_final_message": True}, "add_generation_prompt"),  # the default true generation prompt
        ({"continue_final_message": True, "add_generation_prompt": False, "messages": MESSAGES}, "'user'"),
        ({"add_generation_prompt": "no"}, "add_generation_prompt"),
        ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
        ({"chat_template_kwargs": {"messages": []}}, "'messages'"),
    ],
)
def test_bad_chat_template_controls_are_a_400(server: ServerHandle, extra: dict[str, object], needle: str) -> None:
    response = _post(server, "/v1/chat/completions", {"messages": CONTINUED, "max_tokens": 2, **extra})
    assert response.status_code == 400
    assert needle in response.json()["error"]


def test_chat_template_kwargs_reach_the_template(server: ServerHandle, monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = _tokenizer(server)
    monkeypatch.setattr(tokenizer, "chat_template", "{{ messages[-1]['content'] }}{{ suffix | default('') }}")
    monkeypatch.setattr(tokenizer, "_template", None)  # compiled again from the template above, then restored
    body = {"messages": MESSAGES, "max_tokens": 1, "chat_template_kwargs": {"suffix": " cake cake"}}
    answer = _post(server, "/v1/chat/completions", body).json()
    assert answer["usage"]["prompt_tokens"] == len(tokenizer.encode(MESSAGES[0]["content"] + " cake cake"))


def _reference_prompt_logprobs(folder: Path, ids: list[int]) -> list[float]:
    """transformers' logprob of each prompt token after the first, given the tokens before it."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [float(logprobs[position, ids[position + 1]]) for position in range(len(ids) - 1)]


def test_echo_with_logprobs_scores_the_prompt_like_transformers(
    client: OpenAI, server: ServerHandle, tiny_llama: Path
) -> None:
    """What lm-evaluation-harness's loglikelihood requests send: echo, logprobs, max_tokens 0."""
    assert server.state.source is not None
    prompt = "The quick brown cake bakes over the river"
    ids = server.state.source.tokenizer.encode(prompt)
    reference = _reference_prompt_logprobs(tiny_llama, ids)
    scored = client.completions.create(model="x", prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert scored.usage is not None and scored.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens is not None and logprobs.token_logprobs is not None
    assert len(logprobs.tokens) == len(ids) and logprobs.token_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx(reference, abs=1e-4)
    assert logprobs.top_logprobs is not None and logprobs.top_logprobs[0] is None
    for top, own in zip(logprobs.top_logprobs[1:], logprobs.token_logprobs[1:], strict=True):
        # Two alternatives, keyed by their text (two tokens with one text collide in OpenAI's legacy format).
        assert 1 <= len(top) <= 2 and own is not None and max(top.values()) >= own - 1e-6
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:k])) for k in range(len(ids))]

    # With a completion after it, and streamed: the prompt's entries come first, then the generated tokens'.
    blocking = client.completions.create(model="x", prompt=ids, max_tokens=3, echo=True, logprobs=0, temperature=0)
    entries = blocking.choices[0].logprobs
    assert entries is not None and entries.token_logprobs is not None
    assert entries.token_logprobs[1 : len(ids)] == pytest.approx(reference, abs=1e-4)
    assert len(entries.token_logprobs) == len(ids) + 3
    stream = client.completions.create(
        model="x", prompt=ids, max_tokens=3, echo=True, logprobs=0, temperature=0, stream=True
    )
    streamed: list[float | None] = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.token_logprobs or []
    assert streamed == pytest.approx(entries.token_logprobs, abs=1e-5)

    # A one-token prompt has nothing to score but is still echoed first, with a null logprob.
    single = client.completions.create(model="x", prompt=ids[:1], max_tokens=1, echo=True, logprobs=0, temperature=0)
    one = single.choices[0].logprobs
    assert one is not None and one.token_logprobs is not None and one.token_logprobs[0] is None
    assert len(one.token_logprobs) == 2 and one.text_offset is not None and one.text_offset[0] == 0

    # max_tokens 0 only scores: without echo and logprobs there is nothing to answer.
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="x", prompt=prompt, max_tokens=0, echo=True)


def test_vllm_end_token_controls(client: OpenAI, server: ServerHandle) -> None:
    """ignore_eos, min_tokens and stop_token_ids (vLLM's extra fields), with the end token forced by logit_bias."""
    assert server.state.source is not None
    eos = min(server.state.source.tokenizer.eos_token_ids)

    def complete(**extra: Any) -> Any:
        body = {"logit_bias": {str(eos): 100}, **extra}
        return client.completions.create(model="x", prompt="Hello", max_tokens=6, temperature=0, extra_body=body)

    assert complete().usage.completion_tokens == 1  # the forced end token, at once
    ignoring = complete(ignore_eos=True)
    assert (ignoring.choices[0].finish_reason, ignoring.usage.completion_tokens) == ("length", 6)
    assert complete(min_tokens=3).usage.completion_tokens == 4  # three others, then the end token
    stopped = client.completions.create(
        model="x", prompt="Hello", max_tokens=6, temperature=0,
        extra_body={"logit_bias": {"7": 100}, "stop_token_ids": [7], "ignore_eos": True},
    )  # fmt: skip
    assert (stopped.choices[0].finish_reason, stopped.usage.completion_tokens) == ("stop", 1)
    for bad in ({"stop_token_ids": [10**9]}, {"min_tokens": 7}, {"min_p": 1.5}, {"ignore_eos": "yes"}):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="x", prompt="Hello", max_tokens=6, extra_body=bad)


def test_include_stop_str_in_output_keeps_the_stop_string(client: OpenAI) -> None:
    """vLLM's include_stop_str_in_output: the text ends with the stop string that ended it, streamed or not."""
    text = _greedy_chat(client, max_tokens=24)
    match = re.search(r"[A-Za-z]{2,}", text[1:])
    assert match, f"the tiny model's greedy text {text!r} has no word to stop on"
    stop = match.group(0)
    asked = {"model": "x", "messages": MESSAGES, "max_tokens": 24, "temperature": 0, "stop": [stop]}
    kept = client.chat.completions.create(**asked, extra_body={"include_stop_str_in_output": True})  # type: ignore[call-overload]
    assert kept.choices[0].message.content == text[: text.find(stop) + len(stop)]
    assert kept.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(
        **asked,
        stream=True,
        extra_body={"include_stop_str_in_output": True},  # type: ignore[call-overload]
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == kept.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**asked, extra_body={"include_stop_str_in_output": 1})  # type: ignore[call-overload]
    assert "include_stop_str_in_output must be true or false" in str(refused.value.body)


def test_truncate_prompt_tokens_reads_the_prompts_last_tokens(server: ServerHandle) -> None:
    """vLLM's truncate_prompt_tokens: only the prompt's last k tokens are read (-1: as many as the context holds);
    the answer is the one to those tokens alone."""
    prompt = "one two three four five six seven eight nine ten"
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        cut = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 6, "temperature": 0,
                                                 "truncate_prompt_tokens": 3, "echo": True})  # fmt: skip
        assert cut.status_code == 200, cut.text
        assert cut.json()["usage"]["prompt_tokens"] == 3
        ids = http.post("/tokenize", json={"content": prompt}).json()["tokens"]
        alone = http.post("/v1/completions", json={"prompt": ids[-3:], "max_tokens": 6, "temperature": 0})
        echoed = cut.json()["choices"][0]["text"]
        assert echoed.endswith(alone.json()["choices"][0]["text"])  # the same answer, after the prompt as read
        assert not echoed.startswith("one")  # the echo is the prompt as read, not as sent
        whole = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "truncate_prompt_tokens": -1})
        assert whole.json()["usage"]["prompt_tokens"] == len(ids)
        uncut = http.post(
            "/v1/completions", json={"prompt": prompt, "max_tokens": 1, "truncate_prompt_tokens": 99, "echo": True}
        )
        assert uncut.json()["choices"][0]["text"].startswith(prompt)  # nothing cut: echoed as sent
        chat = http.post(
            "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1, "truncate_prompt_tokens": 4}
        )
        assert chat.status_code == 200 and chat.json()["usage"]["prompt_tokens"] == 4
        # A text longer than the context could ever hold is read, cut to its last tokens, not refused for its length.
        long_text = "one two three " * 2000
        for route, field in (("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")):
            value: object = long_text if field == "prompt" else [{"role": "user", "content": long_text}]
            body = {field: value, "max_tokens": 1, "truncate_prompt_tokens": 8}
            long = http.post(route, json=body)
            assert long.status_code == 200, long.text
            assert long.json()["usage"]["prompt_tokens"] == 8
            everything = http.post(route, json={**body, "truncate_prompt_tokens": -1})
            assert everything.status_code == 200, everything.text  # as many as leave room for one token
            assert everything.json()["usage"]["prompt_tokens"] == server.state.engine.context_length - 1  # type: ignore[union-attr]
            refused = http.post(route, json={**body, "truncate_prompt_tokens": None})
            assert refused.status_code == 400 and refused.json()["code"] == "context_length_exceeded"
        for bad in (0, -2, "3"):
            refused = http.post(
                "/v1/completions", json={"prompt": prompt, "max_tokens": 1, "truncate_prompt_tokens": bad}
            )
            assert refused.status_code == 400 and "truncate_prompt_tokens" in refused.json()["error"]


def test_skip_special_tokens_false_writes_them_out(server: ServerHandle) -> None:
    """vLLM's skip_special_tokens: false writes special tokens the model draws into the text (true, the default,
    leaves them out); a chat's echo is refused, not ignored."""
    assert server.state.source is not None
    tokenizer, special = server.state.source.tokenizer, "<|im_start|>"  # a special token that does not end the text
    special_id = tokenizer.backend.token_to_id(special)
    assert special_id is not None and special_id not in tokenizer.eos_token_ids
    body = {"prompt": "cake", "max_tokens": 2, "logit_bias": {str(special_id): 100}, "temperature": 0}
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        assert http.post("/v1/completions", json=body).json()["choices"][0]["text"] == ""
        shown = http.post("/v1/completions", json={**body, "skip_special_tokens": False}).json()["choices"][0]["text"]
        assert shown == special * 2
        echo = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1, "echo": True})
        assert echo.status_code == 400 and "echo is not supported" in echo.json()["error"]


def test_a_chat_turn_reports_the_prompt_tokens_the_prefix_cache_gave(client: OpenAI) -> None:
    system = {"role": "system", "content": "You answer questions about European capitals in one short sentence. " * 3}
    first = [system, {"role": "user", "content": "What is the capital of France?"}]
    answer = client.chat.completions.create(model="x", messages=first, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens == 0
    second = [*first, {"role": "assistant", "content": answer.choices[0].message.content or ""}]
    second.append({"role": "user", "content": "And of Spain?"})
    stream = client.chat.completions.create(
        model="x",
        messages=second,
        max_tokens=4,
        temperature=0,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    assert usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


@pytest.fixture(scope="module")
def reasoning_server(tiny_llama_reasoning: Path) -> Iterator[ServerHandle]:
    with running_server(tiny_settings(tiny_llama_reasoning)) as handle:
        yield handle


def test_a_reasoning_models_thinking_is_reasoning_content(reasoning_server: ServerHandle) -> None:
    """The prompt leaves the model thinking: what it writes before </think> (here all of it, the random model never
    closes the block) is reasoning_content, blocking and streamed alike; enable_thinking false makes it content."""
    url = f"{reasoning_server.base_url}/v1/chat/completions"
    body: dict[str, Any] = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    message = httpx.post(url, json=body, timeout=60).json()["choices"][0]["message"]
    assert message["reasoning_content"] and message["content"] is None
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks if chunk["choices"]]
    streamed = "".join(delta.get("reasoning_content", "") for delta in deltas)
    assert streamed.strip() == message["reasoning_content"]
    assert not "".join(delta.get("content") or "" for delta in deltas)
    plain = {**body, "chat_template_kwargs": {"enable_thinking": False}}
    message = httpx.post(url, json=plain, timeout=60).json()["choices"][0]["message"]
    assert message["content"] and "reasoning_content" not in message


@pytest.mark.parametrize(
    "content",
    [[{"type": "text", "text": None}], [{"type": "text", "text": {"a": [1, 2]}}], [{"type": "text", "text": 123}],
     [{"type": "text"}]],
    ids=str,
)  # fmt: skip
def test_a_text_part_whose_text_is_no_string_is_a_400(server: ServerHandle, content: list[Any]) -> None:
    messages = [{"role": "user", "content": content}]
    for route in ("/v1/chat/completions", "/tokenize", "/apply-template"):
        response = _post(server, route, {"messages": messages, "max_tokens": 1})
        assert response.status_code == 400, (route, response.text)
        assert "messages[0]: a text part's text must be a string" in response.json()["error"]


@pytest.mark.parametrize(
    "message",
    [{"role": "user"}, {"role": "user", "content": None}, {"role": "system"}, {"role": "developer", "content": None},
     {"role": "tool", "tool_call_id": "c1"}, {"role": "assistant", "content": None}],
    ids=str,
)  # fmt: skip
def test_a_message_without_content_is_a_400(server: ServerHandle, message: dict[str, Any]) -> None:
    """A user message with no content was read as an empty turn and answered (OpenAI answers a 400)."""
    messages = [message, {"role": "user", "content": "Hi"}][: 1 if message["role"] == "user" else 2]
    for route in ("/v1/chat/completions", "/tokenize", "/apply-template"):
        response = _post(server, route, {"messages": messages, "max_tokens": 1})
        assert response.status_code == 400, (route, response.text)
        assert response.json()["error"].startswith("messages[0].content is required"), response.text


def test_an_assistant_turn_that_calls_tools_may_have_no_content(server: ServerHandle) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]
    response = _post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_number_json_has_no_word_for_is_a_400_before_anything_runs(server: ServerHandle, literal: str) -> None:
    """Python's JSON reads NaN and Infinity (and 1e999 as infinity): kept in a stored message or echoed in an answer,
    they made the answer, or every later read of it, a 500."""
    message = '{"role": "user", "content": "Hi", "name": ' + literal + "}"
    body = '{"messages": [' + message + '], "max_tokens": 1, "store": true}'
    response = httpx.post(f"{server.base_url}/v1/chat/completions", content=body, timeout=60)
    assert response.status_code == 400, response.text
    assert "not valid JSON" in response.json()["error"] and literal.lstrip("-")[:5] in response.json()["error"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "{text}"}]}),
        ("/v1/completions", {"prompt": "{text}"}),
        ("/v1/responses", {"input": "{text}"}),
        ("/v1/messages", {"model": "x", "max_tokens": 4, "messages": [{"role": "user", "content": "{text}"}]}),
        ("/tokenize", {"prompt": "{text}"}),
        ("/v1/embeddings", {"input": "{text}"}),
    ],
)
def test_a_text_no_context_could_hold_is_refused_before_it_is_tokenized(
    server: ServerHandle, path: str, body: dict[str, Any]
) -> None:
    """A 7.5 MB prompt was tokenized whole (seconds, with the GIL held: /health froze; gigabytes) to be refused."""
    text = "cake " * 600_000  # 3 MB
    sent = json.loads(json.dumps(body).replace("{text}", text))
    answer = httpx.post(f"{server.base_url}{path}", json=sent, headers={"anthropic-version": "2023-06-01"}, timeout=60)
    assert answer.status_code == 400, answer.text
    message = json.dumps(answer.json())
    assert "characters" in message and "context" in message, message[:300]
