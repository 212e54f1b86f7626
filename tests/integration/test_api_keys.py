"""Several API keys (`--api-key A,B`, `--api-key-file`) on a real server: each key's files, batches, stored chat
completions, stored responses and conversations are its own (another key gets a 404, and its lists leave them out),
a batch's requests and result files belong to its key, each key has its own rate limit, and /metrics counts each
key's usage under its name."""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.fixtures.server import ServerHandle, running_server, tiny_settings

ASK: Any = [{"role": "user", "content": "Tell me about cake."}]


@pytest.fixture(scope="module")
def server(tiny_llama: Path) -> Iterator[ServerHandle]:
    with running_server(tiny_settings(tiny_llama, api_keys=("alice-key", "bob-key"))) as handle:
        yield handle


def client_of(server: ServerHandle, key: str) -> OpenAI:
    return OpenAI(base_url=server.openai_url, api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def alice(server: ServerHandle) -> Iterator[OpenAI]:
    with client_of(server, "alice-key") as client:
        yield client


@pytest.fixture(scope="module")
def bob(server: ServerHandle) -> Iterator[OpenAI]:
    with client_of(server, "bob-key") as client:
        yield client


def test_each_key_is_let_in_and_no_other(server: ServerHandle, alice: OpenAI, bob: OpenAI) -> None:
    for client in (alice, bob):
        assert client.chat.completions.create(model="x", messages=ASK, max_tokens=2).choices
    with client_of(server, "alice-key,bob-key") as both, pytest.raises(openai.AuthenticationError):
        both.models.list()


def test_a_stored_chat_completion_is_its_keys_own(alice: OpenAI, bob: OpenAI) -> None:
    made = alice.chat.completions.create(model="x", messages=ASK, max_tokens=2, store=True)
    assert alice.chat.completions.retrieve(made.id).id == made.id
    assert made.id in [stored.id for stored in alice.chat.completions.list()]
    assert made.id not in [stored.id for stored in bob.chat.completions.list()]
    for call in (
        lambda: bob.chat.completions.retrieve(made.id),
        lambda: bob.chat.completions.messages.list(made.id),
        lambda: bob.chat.completions.update(made.id, metadata={"x": "y"}),
        lambda: bob.chat.completions.delete(made.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert alice.chat.completions.retrieve(made.id).metadata in ({}, None)  # bob's update never reached it


def test_a_stored_response_is_its_keys_own(alice: OpenAI, bob: OpenAI) -> None:
    made = alice.responses.create(model="x", input="Tell me about cake.", max_output_tokens=16)
    assert alice.responses.retrieve(made.id).id == made.id
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(made.id)
    with pytest.raises(openai.BadRequestError) as refused:  # no reading alice's conversation
        bob.responses.create(model="x", input="And then?", previous_response_id=made.id, max_output_tokens=16)
    assert "no stored response" in str(refused.value.body)
    assert alice.responses.create(model="x", input="And then?", previous_response_id=made.id, max_output_tokens=16)


def test_a_conversation_is_its_keys_own(alice: OpenAI, bob: OpenAI) -> None:
    made = alice.conversations.create(items=[{"role": "user", "content": "Tell me about cake."}])
    assert alice.conversations.retrieve(made.id).id == made.id
    for call in (
        lambda: bob.conversations.retrieve(made.id),
        lambda: bob.conversations.update(made.id, metadata={"x": "y"}),
        lambda: bob.conversations.items.list(made.id),
        lambda: bob.conversations.items.create(made.id, items=[{"role": "user", "content": "mine now"}]),
        lambda: bob.conversations.delete(made.id),
        lambda: bob.responses.create(model="x", conversation=made.id, input="And then?", max_output_tokens=2),
        lambda: bob.responses.input_tokens.count(model="x", conversation=made.id, input="And then?"),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert alice.conversations.retrieve(made.id).metadata == {}  # bob's update never reached it
    assert len(alice.conversations.items.list(made.id).data) == 1  # nor his items or his answer
    assert alice.responses.create(model="x", conversation=made.id, input="And then?", max_output_tokens=2)
    assert len(alice.conversations.items.list(made.id).data) == 3


def test_files_and_batches_are_their_keys_own(alice: OpenAI, bob: OpenAI) -> None:
    line = {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions"}
    line["body"] = {"model": "x", "messages": ASK, "max_tokens": 4, "store": True}
    upload = alice.files.create(file=("in.jsonl", io.BytesIO(json.dumps(line).encode() + b"\n")), purpose="batch")
    assert upload.id in [f.id for f in alice.files.list()] and upload.id not in [f.id for f in bob.files.list()]
    for call in (lambda: bob.files.retrieve(upload.id), lambda: bob.files.content(upload.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError):
        bob.files.delete(upload.id)
    with pytest.raises(openai.BadRequestError) as refused:
        bob.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert "no file with id" in str(refused.value.body)

    batch = alice.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    assert batch.id not in [b.id for b in bob.batches.list()]
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.cancel(batch.id)
    deadline = time.monotonic() + 60
    while (batch := alice.batches.retrieve(batch.id)).status != "completed":
        assert time.monotonic() < deadline and batch.status not in ("failed", "cancelled", "expired"), batch.status
        time.sleep(0.05)
    assert batch.output_file_id is not None
    answer = json.loads(alice.files.content(batch.output_file_id).text)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(batch.output_file_id)
    # The batch's request ran as alice's: the completion it stored is hers.
    stored_id = answer["response"]["body"]["id"]
    assert alice.chat.completions.retrieve(stored_id).id == stored_id
    with pytest.raises(openai.NotFoundError):
        bob.chat.completions.retrieve(stored_id)


def test_each_key_has_its_own_rate_limit(tiny_llama: Path) -> None:
    # One a minute: at 60 a minute, a first answer that took a second on a loaded machine refilled alice's bucket
    settings = tiny_settings(tiny_llama, api_keys=("alice-key", "bob-key"), rate_limit=1, rate_burst=1)
    with running_server(settings) as server, client_of(server, "alice-key") as a, client_of(server, "bob-key") as b:
        a.completions.create(model="x", prompt="cake", max_tokens=1)
        with pytest.raises(openai.RateLimitError):
            a.completions.create(model="x", prompt="cake", max_tokens=1)
        assert b.completions.create(model="x", prompt="cake", max_tokens=1).choices  # same address, its own bucket


def key_counts(metrics: str, name: str) -> tuple[float, float, float]:
    """cake_api_key_{requests,prompt_tokens,completion_tokens}_total for the key named `name`."""

    def value(family: str) -> float:
        found = re.search(rf'^cake_api_key_{family}_total{{key="{re.escape(name)}"}} (\S+)$', metrics, re.M)
        return float(found.group(1)) if found else 0.0

    return value("requests"), value("prompt_tokens"), value("completion_tokens")


def test_each_keys_usage_is_counted_under_its_name_and_only_the_admin_reads_every_keys(tiny_llama: Path) -> None:
    """Any key read every other key's name and usage in /metrics: now its own, and the --admin-key all of them."""
    settings = tiny_settings(
        tiny_llama,
        api_keys=("alice-key", "bob-key", "root"),
        api_key_names={"alice-key": "alice", "root": "admin"},
        admin_key="root",
    )
    with running_server(settings) as server, client_of(server, "alice-key") as a, client_of(server, "bob-key") as b:
        one = a.chat.completions.create(model="x", messages=ASK, max_tokens=3, n=2)
        two = a.completions.create(model="x", prompt=["cake", "cake"], max_tokens=4, n=2)  # a prompt given twice
        b.completions.create(model="x", prompt="cake", max_tokens=5)
        text = httpx.get(f"{server.base_url}/metrics", headers={"Authorization": "Bearer root"}).text
        bobs = httpx.get(f"{server.base_url}/metrics", headers={"Authorization": "Bearer bob-key"}).text
        assert one.usage is not None and two.usage is not None
        prompts = one.usage.prompt_tokens + two.usage.prompt_tokens  # as usage counts them: per prompt, not per choice
        generated = one.usage.completion_tokens + two.usage.completion_tokens
        assert key_counts(text, "alice") == (2.0, float(prompts), float(generated))
        bob = hashlib.sha256(b"bob-key").hexdigest()[:12]  # no name given: the first digits of its digest
        assert key_counts(text, bob)[0] == 1.0 and key_counts(text, bob)[2] == 5.0
        assert "alice-key" not in text and "bob-key" not in text
        assert key_counts(bobs, bob)[2] == 5.0 and "alice" not in bobs  # bob's own series, not alice's
        assert "cake_http_requests_total" in bobs  # the server's own figures are everyone's


def test_a_refused_request_with_a_body_left_unread_is_closed(server: ServerHandle) -> None:
    """A client without a key declared a gigabyte and trickled it: the 401 came, and the connection stayed open."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server.base_url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as conn:
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        conn.sendall(f"{head}Content-Length: 1000000000\r\n\r\n{{".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:  # the refusal's head (its body is short and follows)
            answer += conn.recv(65536)
        assert answer.startswith(b"HTTP/1.1 401") and b"connection: close" in answer.lower()
        deadline = time.monotonic() + 10
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                conn.sendall(b" ")  # a byte more of the body, as a trickling client sends
                conn.settimeout(0.2)
                closed = conn.recv(65536) == b""
            except TimeoutError:
                continue
            except ConnectionError:  # reset: closed with the body unread
                closed = True
        assert closed, "the connection stayed open"
