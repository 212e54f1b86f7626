"""A request that is large but within the limits costs the event loop little: its checks and conversions run in
builtins or in a thread, never as a Python step per item on the loop.

A body under the size limit holds a million token ids, or a chat of a hundred thousand messages; handled item by
item on the event loop, it stalled every other client's stream for one to three seconds. The cost is counted here in
Python function calls on the event loop's thread (each generator step is one), not in time: the count does not
depend on the machine.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from cake_py.api import inprocess
from cake_py.api.app import create_app
from cake_py.api.server import build_state
from tests.fixtures.server import tiny_settings

MILLION = 1_000_000
LOOP_CALLS = 20_000  # what a request's handling costs in Python calls on the loop, with room to spare
MANY = 100_000
HI = {"role": "user", "content": "hi"}
PARTS = [{"role": "user", "content": [{"type": "text", "text": "hi"}] * MANY}]  # one message of many content parts


def _serve(model: Path, requests: list[tuple[str, dict[str, Any]]]) -> list[tuple[int, int]]:
    """(status, Python calls made on the event loop's thread while answering) of each request, in order."""
    app = create_app(build_state(tiny_settings(model)))

    async def call(path: str, body: bytes) -> int:
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # the client stays
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "state": {},
        }
        await app(scope, receive, send)
        return int(next(message["status"] for message in sent if message["type"] == "http.response.start"))

    async def main() -> list[tuple[int, int]]:
        answers = []
        async with app.router.lifespan_context(app):
            for path, body in requests:
                payload = json.dumps(body).encode()
                calls = 0

                def count(frame: FrameType, event: str, arg: Any) -> None:
                    nonlocal calls
                    calls += event == "call"

                sys.setprofile(count)  # this thread only: the thread pool's work is off the loop
                try:
                    status = await call(path, payload)
                finally:
                    sys.setprofile(None)
                answers.append((status, calls))
        return answers

    return asyncio.run(main())


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/completions", {"prompt": [1] * MILLION + [10**6], "max_tokens": 1}, 400),  # the bad id last
        ("/v1/completions", {"prompt": [[1] * MILLION], "max_tokens": 1}, 400),  # too long for the context
        ("/v1/completions", {"prompt": [1.5] * MILLION, "max_tokens": 1}, 400),  # each number was checked on the loop
        ("/completion", {"prompt": [1] * MILLION + [10**6], "n_predict": 1}, 400),
        ("/completion", {"prompt": [1] * MILLION + [None], "n_predict": 1}, 400),
        ("/v1/embeddings", {"input": [1] * MILLION + [-1]}, 400),
        ("/tokenize", {"content": "a" * MILLION}, 400),  # a string was walked character by character
        ("/tokenize", {"content": [1] * MILLION + ["a", 10**6]}, 400),
        ("/detokenize", {"tokens": [1] * MILLION + [10**6]}, 400),
        ("/detokenize", {"tokens": [1] * 100_000}, 200),
        ("/v1/chat/completions", {"messages": [HI] * MANY, "max_tokens": 1}, 400),  # longer than the context
        ("/v1/chat/completions", {"messages": PARTS}, 400),
        ("/v1/responses", {"input": [HI] * MANY, "max_output_tokens": 16}, 400),
        ("/v1/responses/input_tokens", {"input": [HI] * MANY}, 400),
        (
            "/v1/messages",
            {"model": "x", "max_tokens": 1, "messages": PARTS},
            400,
        ),
        ("/v1/messages/count_tokens", {"model": "x", "messages": [HI] * MANY}, 400),  # more text than a context holds
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_a_large_request_costs_the_event_loop_few_python_calls(
    tiny_llama: Path, path: str, body: dict[str, Any], status: int
) -> None:
    [(answered, calls)] = _serve(tiny_llama, [(path, body)])
    assert answered == status
    assert calls < LOOP_CALLS, f"{calls} Python calls on the event loop"


def test_an_echoed_prompt_with_logprobs_costs_the_event_loop_in_proportion_to_its_length(
    tiny_llama_long_context: Path,
) -> None:
    """Each token's text_offset summed every token before it again: quadratic in the prompt's length (a full context
    of 32,000 tokens held the event loop for half a minute)."""
    body = {"prompt": [5] * 2000, "max_tokens": 1, "echo": True, "logprobs": 0, "temperature": 0}
    [(answered, calls)] = _serve(tiny_llama_long_context, [("/v1/completions", body)])
    assert answered == 200
    assert calls < 20 * 2000, f"{calls} Python calls on the event loop"  # ~5 a token; it was 1,000 a token


GREEDY = {"temperature": 0}  # the same answer with logprobs and without
LONG = {"max_tokens": 200, "min_tokens": 200, **GREEDY}


@pytest.mark.parametrize(
    ("path", "body", "logprobs"),
    [
        ("/v1/chat/completions", {"messages": [HI], "n": 2, **LONG}, {"logprobs": True, "top_logprobs": 20}),
        ("/v1/completions", {"prompt": "hi", "n": 2, **LONG}, {"logprobs": 20}),
        ("/completion", {"prompt": ["hi", "ho"], "n_predict": 200, "ignore_eos": True, **GREEDY}, {"n_probs": 20}),
    ],
    ids=["chat", "completions", "llama.cpp"],
)
def test_a_blocking_answers_logprobs_are_built_off_the_event_loop(
    tiny_llama: Path, path: str, body: dict[str, Any], logprobs: dict[str, Any]
) -> None:
    """2 answers of 200 tokens with 20 alternatives each: 8,400 entries, built on the event loop (8 choices of 1,500
    tokens stalled every other client for almost 5 s). Counted against the same answer without logprobs."""
    [(plain_status, plain), (status, calls)] = _serve(tiny_llama, [(path, body), (path, {**body, **logprobs})])
    assert plain_status == status == 200
    assert calls - plain < 5_000, f"{calls - plain} Python calls on the event loop for the logprobs"


def test_a_translated_request_is_written_off_the_event_loop(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/v1/messages answers through the chat route, as a JSON body it writes: megabytes for a long chat, written
    in a thread (each write's thread is recorded here: the event loop's is the test's own)."""
    threads: list[threading.Thread] = []
    encode = inprocess._encode
    monkeypatch.setattr(inprocess, "_encode", lambda body: threads.append(threading.current_thread()) or encode(body))
    body = {"model": "x", "max_tokens": 1, "messages": [HI]}
    answers = _serve(tiny_llama, [("/v1/messages", body), ("/v1/messages", {**body, "stream": True})])
    assert [status for status, _ in answers] == [200, 200]
    assert len(threads) >= 3  # the blocking chat, the stream's prompt count and its chat
    assert threading.current_thread() not in threads
