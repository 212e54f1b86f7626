"""POST /v1/embeddings through the official `openai` client against a real uvicorn server on the tiny Llama: vectors
equal to transformers' last hidden state pooled, in both encodings, batched, and every bad field named."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from openai import OpenAI

from tests.fixtures.server import ServerHandle, running_server, tiny_settings

transformers = pytest.importorskip("transformers")

TEXTS = ["The capital of France is Paris.", "A cluster splits a model's layers across machines.", "hello"]


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[ServerHandle]:
    with running_server(tiny_settings(tiny_llama, model_name="tiny-llama")) as handle:
        yield handle


@pytest.fixture(scope="module")
def client(server: ServerHandle) -> Iterator[OpenAI]:
    with OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0, timeout=60) as openai_client:
        yield openai_client


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> Any:
    model = transformers.AutoModel.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_llama)

    def embed(text: str, pooling: str = "last", normalize: bool = True) -> list[float]:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = model(ids).last_hidden_state[0]
        vector = hidden[-1] if pooling == "last" else hidden.mean(0)
        return (torch.nn.functional.normalize(vector, dim=0) if normalize else vector).tolist()

    return embed


def post(server: ServerHandle, body: dict[str, Any]) -> httpx.Response:
    # ASCII JSON: a lone surrogate goes out escaped, as JSON allows (httpx's own encoder would refuse it)
    content = json.dumps(body).encode()
    return httpx.post(f"{server.base_url}/v1/embeddings", content=content, timeout=60)


def close(ours: list[float], expected: list[float]) -> bool:
    return torch.allclose(torch.tensor(ours), torch.tensor(expected), rtol=0.0, atol=1e-5)


def test_the_openai_client_gets_transformers_last_hidden_state(
    client: OpenAI, server: ServerHandle, reference: Any
) -> None:
    answer = client.embeddings.create(model="x", input=TEXTS)  # the client asks for base64 and decodes it
    assert answer.object == "list" and answer.model == "tiny-llama"
    assert [item.index for item in answer.data] == [0, 1, 2]
    for item, text in zip(answer.data, TEXTS, strict=True):
        assert item.object == "embedding"
        assert close(item.embedding, reference(text))
    assert server.state.source is not None
    n_tokens = sum(len(server.state.source.tokenizer.encode(text)) for text in TEXTS)
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == n_tokens


def test_float_and_base64_carry_the_same_vector(server: ServerHandle, reference: Any) -> None:
    floats = post(server, {"input": TEXTS[0], "encoding_format": "float"}).json()
    packed = post(server, {"input": TEXTS[0], "encoding_format": "base64"}).json()
    vector = floats["data"][0]["embedding"]
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == vector
    assert len(vector) == 64 and close(vector, reference(TEXTS[0]))
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"]


def test_token_ids_truncation_and_normalize(server: ServerHandle, reference: Any) -> None:
    assert server.state.source is not None
    tokenizer = server.state.source.tokenizer
    ids = tokenizer.encode(TEXTS[1])
    by_ids = post(server, {"input": [ids, ids[:5]]}).json()
    assert by_ids["usage"]["prompt_tokens"] == len(ids) + 5
    assert close(by_ids["data"][0]["embedding"], reference(TEXTS[1]))
    assert by_ids["data"][1]["embedding"] != by_ids["data"][0]["embedding"]
    truncated = post(server, {"input": [ids], "truncate_prompt_tokens": 5}).json()
    assert truncated["usage"]["prompt_tokens"] == 5
    assert truncated["data"][0]["embedding"] == post(server, {"input": [ids[-5:]]}).json()["data"][0]["embedding"]
    raw = post(server, {"input": TEXTS[0], "normalize": False}).json()["data"][0]["embedding"]
    assert close(raw, reference(TEXTS[0], normalize=False))


def test_the_server_pooling_setting_decides(server: ServerHandle, reference: Any) -> None:
    settings = server.state.settings
    server.state.settings = replace(settings, pooling="mean")
    try:
        answer = post(server, {"input": TEXTS[1]}).json()
    finally:
        server.state.settings = settings
    assert close(answer["data"][0]["embedding"], reference(TEXTS[1], pooling="mean"))


def test_embeddings_and_chat_share_the_engine(client: OpenAI, reference: Any) -> None:
    chat = client.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,  # type: ignore[arg-type]
    )
    assert chat.usage is not None and chat.usage.completion_tokens == 4
    assert close(client.embeddings.create(model="x", input="hello").data[0].embedding, reference("hello"))


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, "input must be"),
        ({"input": ""}, "input[0]"),
        ({"input": ["ok", ""]}, "input[1]"),
        ({"input": [[1, 2], "x", 3]}, "input[2]"),
        ({"input": "hi", "encoding_format": "int8"}, "'int8'"),
        ({"input": "hi", "dimensions": 32}, "dimensions (32)"),
        ({"input": [[1, 99999]]}, "99999"),
        ({"input": "hi", "normalize": "yes"}, "normalize"),
        ({"input": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"input": ["x"] * 2049}, "2049"),
        ({"input": "a\ud800b"}, "surrogate (\\ud800)"),
    ],
)
def test_bad_requests_are_named(server: ServerHandle, body: dict[str, Any], needle: str) -> None:
    response = post(server, body)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]


def test_an_input_longer_than_the_context_is_openai_s_400(server: ServerHandle) -> None:
    assert server.state.engine is not None
    context = server.state.engine.context_length
    response = post(server, {"input": [[5] * (context + 1)]})
    assert response.status_code == 400
    assert response.json()["code"] == "context_length_exceeded"
    assert post(server, {"input": [[5] * context]}).status_code == 200  # an embedding may fill the whole context


# ---- llama.cpp's POST /embedding: its request fields and its answer's shape ----


def llama_post(server: ServerHandle, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.base_url}/embedding", json=body, timeout=60)


def test_llama_cpp_embedding_route_answers_in_its_shape(server: ServerHandle, reference: Any) -> None:
    one = llama_post(server, {"content": TEXTS[0]})
    assert one.status_code == 200, one.text
    rows = one.json()
    assert [row["index"] for row in rows] == [0] and len(rows[0]["embedding"]) == 1  # one pooled row per input
    assert close(rows[0]["embedding"][0], reference(TEXTS[0]))  # embd_normalize 2 (Euclidean) by default
    both = llama_post(server, {"input": TEXTS[:2], "content": "ignored when input is sent"}).json()
    assert [row["index"] for row in both] == [0, 1]
    assert close(both[1]["embedding"][0], reference(TEXTS[1]))
    raw = reference(TEXTS[0], normalize=False)
    assert close(llama_post(server, {"content": TEXTS[0], "embd_normalize": -1}).json()[0]["embedding"][0], raw)
    scaled = llama_post(server, {"content": TEXTS[0], "embd_normalize": 0}).json()[0]["embedding"][0]
    assert abs(max(abs(x) for x in scaled) - 32760.0) < 1e-3  # int16's range, as llama.cpp's
    taxicab = llama_post(server, {"content": TEXTS[0], "embd_normalize": 1}).json()[0]["embedding"][0]
    assert abs(sum(abs(x) for x in taxicab) - 1.0) < 1e-6
    cubic = llama_post(server, {"content": TEXTS[0], "embd_normalize": 3}).json()[0]["embedding"][0]
    assert abs(sum(abs(x) ** 3 for x in cubic) - 1.0) < 1e-6
    ids = server.state.source.tokenizer.encode(TEXTS[1]) if server.state.source is not None else []
    assert close(llama_post(server, {"content": ids}).json()[0]["embedding"][0], reference(TEXTS[1]))
    # llama.cpp's POST /embeddings is this route too (its non-OpenAI shape; it was a 404)
    plural = httpx.post(f"{server.base_url}/embeddings", json={"input": TEXTS[0]}, timeout=60)
    assert plural.status_code == 200 and close(plural.json()[0]["embedding"][0], reference(TEXTS[0]))


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({}, '"input" or "content"'),
        ({"content": ""}, "content[0]"),
        ({"content": "hi", "embd_normalize": -2}, "embd_normalize"),
        ({"content": "hi", "embd_normalize": "2"}, "embd_normalize"),
        ({"content": [[1, 99999]]}, "99999"),
    ],
)
def test_llama_cpp_embedding_bad_requests_are_named(server: ServerHandle, body: dict[str, Any], needle: str) -> None:
    response = llama_post(server, body)
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]


def test_truncation_keeps_the_end_of_a_text_of_any_length(server: ServerHandle) -> None:
    """A text longer than the context could hold at any tokenization was refused, though truncate_prompt_tokens asks
    for its last tokens (scores and reranking pass it on too)."""
    assert server.state.engine is not None and server.state.source is not None
    tokenizer, context = server.state.source.tokenizer, server.state.engine.context_length
    assert tokenizer.max_tokens is not None
    text = "The capital of France is Paris. " * (tokenizer.max_tokens * 2)
    refused = post(server, {"input": text})
    assert refused.status_code == 400 and "characters" in refused.json()["error"]  # without truncation: too long
    ids = tokenizer.encode(text, check=False)
    answer = post(server, {"input": text, "truncate_prompt_tokens": -1})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] == context
    expected = post(server, {"input": [ids[-context:]]}).json()["data"][0]["embedding"]
    assert answer.json()["data"][0]["embedding"] == expected
