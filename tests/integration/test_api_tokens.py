"""POST /tokenize, /detokenize and /apply-template against a real uvicorn server on the tiny Llama, in vLLM's and
llama.cpp's shapes: ids are transformers' own, a chat counts what /v1/chat/completions' prompt costs, and text
survives a round trip."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.server import ServerHandle, running_server, tiny_settings

transformers = pytest.importorskip("transformers")

TEXT = "The capital of France is Paris. Déjà vu, naïve café!"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[ServerHandle]:
    with running_server(tiny_settings(tiny_llama)) as handle:
        yield handle


def post(server: ServerHandle, path: str, body: dict[str, Any]) -> httpx.Response:
    # ASCII JSON: a lone surrogate goes out escaped, as JSON allows (httpx's own encoder would refuse it)
    return httpx.post(f"{server.base_url}{path}", content=json.dumps(body).encode(), timeout=60)


def test_a_prompt_is_tokenized_as_transformers_does(server: ServerHandle, tiny_llama: Path) -> None:
    reference = transformers.AutoTokenizer.from_pretrained(tiny_llama)
    answer = post(server, "/tokenize", {"prompt": TEXT, "return_token_strs": True}).json()
    expected = reference(TEXT).input_ids
    assert answer["tokens"] == expected and answer["count"] == len(expected)
    assert answer["token_strs"] == reference.convert_ids_to_tokens(expected)
    assert server.state.engine is not None
    assert answer["max_model_len"] == server.state.engine.context_length


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_a_chat_counts_what_its_completion_prompt_costs(server: ServerHandle, tools: list[Any] | None) -> None:
    extra = {"tools": tools} if tools else {}
    counted = post(server, "/tokenize", {"messages": MESSAGES, **extra}).json()["count"]
    completion = post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, **extra}).json()
    assert counted == completion["usage"]["prompt_tokens"]
    without_prompt = post(server, "/tokenize", {"messages": MESSAGES, "add_generation_prompt": False, **extra})
    assert without_prompt.json()["count"] < counted


def test_llama_cpp_content_and_pieces(server: ServerHandle) -> None:
    assert server.state.source is not None
    tokenizer = server.state.source.tokenizer
    plain = post(server, "/tokenize", {"content": "Hello world"}).json()
    assert plain["tokens"] == tokenizer.encode("Hello world", add_special_tokens=False)
    pieces = post(server, "/tokenize", {"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert [piece["id"] for piece in pieces] == plain["tokens"]
    assert "".join(piece["piece"] for piece in pieces) == "Hello world"
    multibyte = post(server, "/tokenize", {"content": "é", "with_pieces": True}).json()["tokens"]
    assert all(isinstance(piece["piece"], str | list) for piece in multibyte)
    # llama.cpp's content may mix token ids and strings (a 400 before): ids as they are, later strings no BOS
    mixed = post(server, "/tokenize", {"content": [*plain["tokens"], " again"], "add_special": True}).json()
    assert mixed["tokens"] == plain["tokens"] + tokenizer.encode(" again", add_special_tokens=False)
    first = post(server, "/tokenize", {"content": ["Hello world", 7], "add_special": True}).json()["tokens"]
    assert first == [*tokenizer.encode("Hello world", add_special_tokens=True), 7]


def test_detokenize_gives_the_text_back_under_both_names(server: ServerHandle) -> None:
    ids = post(server, "/tokenize", {"prompt": TEXT, "add_special_tokens": False}).json()["tokens"]
    answer = post(server, "/detokenize", {"tokens": ids}).json()
    assert answer == {"prompt": TEXT, "content": TEXT}
    assert post(server, "/detokenize", {"tokens": []}).json()["content"] == ""


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_apply_template_gives_the_prompt_a_chat_is_answered_from(server: ServerHandle, tools: list[Any] | None) -> None:
    """llama.cpp's /apply-template: the text, edited or not, sent to /completion is the chat's own prompt."""
    extra = {"tools": tools} if tools else {}
    answer = post(server, "/apply-template", {"messages": MESSAGES, **extra})
    assert answer.status_code == 200, answer.text
    prompt = answer.json()["prompt"]
    assert "What is the capital of France?" in prompt and ("get_weather" in prompt) == bool(tools)
    counted = post(server, "/tokenize", {"messages": MESSAGES, **extra}).json()["tokens"]
    assert post(server, "/tokenize", {"content": prompt}).json()["tokens"] == counted
    greedy = {"temperature": 0, "max_tokens": 5}
    chat = post(server, "/v1/chat/completions", {"messages": MESSAGES, **greedy, **extra}).json()
    completed = post(server, "/completion", {"prompt": prompt, "n_predict": 5, "temperature": 0}).json()
    assert completed["content"] == chat["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/tokenize", {}, "exactly one of"),
        ("/tokenize", {"prompt": "a", "content": "b"}, "got prompt, content"),
        ("/tokenize", {"content": ["a", 1.5]}, "content must be a string, or token ids and strings"),
        ("/tokenize", {"content": [1, 99999]}, "99999"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {"prompt": "a", "parse_special": False}, "parse_special"),
        ("/tokenize", {"prompt": "a", "with_pieces": "yes"}, "with_pieces"),
        ("/detokenize", {"tokens": "1 2"}, "tokens must be"),
        ("/detokenize", {"tokens": [1, 99999]}, "99999"),
        ("/detokenize", {"tokens": [True]}, "tokens must be"),
        ("/tokenize", {"content": "a\ud800b"}, "surrogate"),
        ("/apply-template", {}, "messages is required"),
        ("/apply-template", {"messages": [{"role": "wizard", "content": "x"}]}, "wizard"),
    ],
)
def test_bad_requests_are_named(server: ServerHandle, path: str, body: dict[str, Any], needle: str) -> None:
    response = post(server, path, body)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]


BRACKETS = (
    "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def test_a_server_chat_template_and_context_are_what_every_route_uses(tiny_llama: Path) -> None:
    """`cake serve --chat-template T --max-model-len 64`: chats are rendered with T, prompts and answers fit in 64
    tokens, and the routes that report the context say 64; a model loaded later renders with its own template."""
    settings = tiny_settings(tiny_llama, chat_template=BRACKETS, max_model_len=64)
    with running_server(settings) as server:
        prompt = post(server, "/apply-template", {"messages": MESSAGES}).json()["prompt"]
        assert prompt == "[system] Be brief.\n[user] What is the capital of France?\n[assistant] "
        counted = post(server, "/tokenize", {"content": prompt}).json()
        assert counted["max_model_len"] == 64
        chat = post(server, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1}).json()
        assert chat["usage"]["prompt_tokens"] == counted["count"]
        models = httpx.get(f"{server.base_url}/v1/models", timeout=30).json()["data"]
        assert models[0]["max_model_len"] == 64
        props = httpx.get(f"{server.base_url}/props", timeout=30).json()
        assert (props["default_generation_settings"]["n_ctx"], props["chat_template"]) == (64, BRACKETS)

        too_long = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 80}]})
        assert too_long.status_code == 400 and too_long.json()["code"] == "context_length_exceeded"
        assert "the server's --max-model-len is 64 tokens" in too_long.json()["error"]
        clipped = post(server, "/v1/completions", {"prompt": "Hello", "max_tokens": 100, "ignore_eos": True}).json()
        assert (clipped["usage"]["total_tokens"], clipped["choices"][0]["finish_reason"]) == (64, "length")

        loaded = httpx.post(f"{server.base_url}/models/load", json={"model_id": str(tiny_llama)}, timeout=120)
        assert loaded.status_code == 200, loaded.text
        own = post(server, "/apply-template", {"messages": MESSAGES}).json()["prompt"]
        assert not own.startswith("[system]")  # the tiny Llama's own template
        assert post(server, "/tokenize", {"content": "a"}).json()["max_model_len"] == 64  # the cap stays


def test_a_request_chat_template_needs_the_server_to_trust_it(server: ServerHandle, tiny_llama: Path) -> None:
    """vLLM's `chat_template` request field: a 400 naming --trust-request-chat-template on a server without it
    (never silently ignored); with it, that request's chat, /tokenize and /apply-template render with it."""
    request = {"messages": MESSAGES, "chat_template": BRACKETS, "max_tokens": 1}
    for path in ("/v1/chat/completions", "/tokenize", "/apply-template"):
        refused = post(server, path, request)
        assert refused.status_code == 400 and "--trust-request-chat-template" in refused.json()["error"], path

    with running_server(tiny_settings(tiny_llama, trust_request_chat_template=True)) as trusting:
        prompt = post(trusting, "/apply-template", request).json()["prompt"]
        assert prompt == "[system] Be brief.\n[user] What is the capital of France?\n[assistant] "
        counted = post(trusting, "/tokenize", request).json()["count"]
        chat = post(trusting, "/v1/chat/completions", request).json()
        assert (
            chat["usage"]["prompt_tokens"]
            == counted
            == len(post(trusting, "/tokenize", {"content": prompt}).json()["tokens"])
        )
        own = post(trusting, "/apply-template", {"messages": MESSAGES}).json()["prompt"]
        assert not own.startswith("[system]")  # the next request without one: the model's own

        broken = post(trusting, "/v1/chat/completions", {**request, "chat_template": "{% for m in messages %}"})
        assert broken.status_code == 400
        assert broken.json()["error"].startswith("the request's chat_template does not compile: line 1")
        for bad in (7, "", ["{{ messages }}"]):
            wrong = post(trusting, "/v1/chat/completions", {**request, "chat_template": bad})
            assert wrong.status_code == 400 and "chat_template must be a Jinja template" in wrong.json()["error"]
