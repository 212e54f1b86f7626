"""Keep-alives on a silent stream: written between whole messages, never after the end, skipped by nothing else."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cake_py.api import keepalive
from cake_py.api.keepalive import SSE_COMMENT, KeepAliveResponse
from cake_py.api.streaming import GenerationResponse

SCOPE = {"type": "http", "asgi": {"spec_version": "2.4"}}


async def _never() -> dict[str, Any]:
    raise AssertionError("spec 2.4: the response does not listen for the client")


async def _slow(*pieces: tuple[float, str]) -> AsyncIterator[str]:
    for wait, text in pieces:
        await asyncio.sleep(wait)
        yield text


def _sent(response: Any, fail_on: bytes | None = None) -> list[tuple[float, bytes]]:
    """The body's writes between the start and the end, each with the time it was written."""
    sent: list[tuple[float, dict[str, Any]]] = []

    async def send(message: dict[str, Any]) -> None:
        if fail_on is not None and message.get("body") == fail_on:
            raise OSError("the client is gone")
        sent.append((time.monotonic(), message))

    asyncio.run(response(SCOPE, _never, send))
    assert sent[0][1]["type"] == "http.response.start"
    assert sent[-1][1] == {"type": "http.response.body", "body": b"", "more_body": False}
    return [(when, message["body"]) for when, message in sent[1:-1]]


def _bodies(response: Any, fail_on: bytes | None = None) -> list[bytes]:
    return [body for _, body in _sent(response, fail_on)]


def test_a_silent_stream_gets_comments_between_its_events(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keepalive, "KEEPALIVE_S", 0.05)
    body = _slow((0.0, "data: 1\n\n"), (0.4, "data: 2\n\n"), (0.0, "data: [DONE]\n\n"))
    sent = _sent(KeepAliveResponse(body, media_type="text/event-stream"))
    bodies = [data for _, data in sent]
    assert bodies[0] == b"data: 1\n\n" and bodies[-2:] == [b"data: 2\n\n", b"data: [DONE]\n\n"]
    assert bodies[1:-2] and set(bodies[1:-2]) == {SSE_COMMENT}
    # Each keep-alive comes a whole interval after the write before it, however slow the machine is.
    assert all(later - earlier >= 0.049 for (earlier, _), (later, _) in zip(sent, sent[1:-2], strict=False))


def test_a_stream_that_keeps_talking_gets_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keepalive, "KEEPALIVE_S", 2.0)  # far over the gaps, even on a loaded machine
    body = _slow(*[(0.02, f"data: {n}\n\n") for n in range(10)])
    assert _bodies(KeepAliveResponse(body, media_type="text/event-stream")) == [
        f"data: {n}\n\n".encode() for n in range(10)
    ]


def test_an_ndjson_answer_gets_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keepalive, "KEEPALIVE_S", 0.02)
    body = _slow((0.2, '{"a": 1}\n'))
    assert _bodies(GenerationResponse(body, [], "application/x-ndjson")) == [b'{"a": 1}\n']


def test_a_gone_client_stops_the_keepalives_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keep-alive's failed write ends its task without an error of its own; the body goes on to its end."""
    monkeypatch.setattr(keepalive, "KEEPALIVE_S", 0.02)
    body = _slow((0.2, "data: 1\n\n"))
    assert _bodies(KeepAliveResponse(body, media_type="text/event-stream"), fail_on=SSE_COMMENT) == [b"data: 1\n\n"]
