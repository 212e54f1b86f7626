"""Background responses (`background: true`) through the official `openai` client against a real uvicorn server on
the tiny Llama: answered by the server whether or not anyone listens, polled, streamed and resumed from any event,
cancelled; and GET of a response that is still being answered."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from cake_py.api.server import begin_shutdown
from tests.fixtures.server import ServerHandle, running_server, slow_steps, tiny_settings

QUESTION = "What is the capital of France?"
LONG = 1500  # output tokens: with STEP_S before each step, 15 s or more of work, so a cancel lands mid-answer
STEP_S = 0.01  # before each engine step where a test needs its answer under way: a fast machine wrote LONG tokens
# in well under a second, before a poll, a cancel or a shutdown came


SERVED_MODEL = "tiny_llama_long_context"  # the server and client fixtures: tests/integration/conftest.py
SERVED_OPTIONS = {"model_name": "tiny-llama"}


def wait_until_done(client: OpenAI, response_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress"):
            return response
        time.sleep(0.05)
    raise AssertionError(f"{response_id} still {response.status} after {timeout} s")


def generated_tokens(server: ServerHandle) -> int:
    engine = server.state.engine
    assert engine is not None
    return engine.stats.tokens_generated


def stopped_early(server: ServerHandle, tokens_before: int) -> bool:
    """Whether the engine is idle having generated fewer than LONG tokens since `tokens_before` (a run that was not
    stopped is still running after these 10 s: LONG steps of STEP_S take 15 s)."""
    engine = server.state.engine
    assert engine is not None
    deadline = time.monotonic() + 10
    while engine.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    return engine.in_flight == 0 and generated_tokens(server) - tokens_before < LONG


def sse_events(lines: Iterator[str]) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in lines if line.startswith("data: ")]


def first_event(lines: Iterator[str], kind: str) -> dict[str, Any]:
    """The first event of type `kind`, reading no further."""
    for line in lines:
        if line.startswith("data: ") and (event := json.loads(line[6:]))["type"] == kind:
            return event
    raise AssertionError(f"no {kind} event")


def test_a_background_response_is_answered_without_its_request(client: OpenAI) -> None:
    expected = client.responses.create(model="x", input=QUESTION, max_output_tokens=12, temperature=0, store=False)
    started = client.responses.create(model="x", input=QUESTION, max_output_tokens=12, temperature=0, background=True)
    assert started.status == "queued" and started.background is True and started.output == []
    done = wait_until_done(client, started.id)
    assert done.status == expected.status and done.output_text == expected.output_text
    assert done.background is True and done.usage is not None and done.usage.output_tokens == 12
    items = client.responses.input_items.list(started.id)
    assert [item.content[0].text for item in items.data] == [QUESTION]  # type: ignore[union-attr]
    follow_up = client.responses.create(
        model="x", input="And Spain?", previous_response_id=started.id, max_output_tokens=2
    )
    assert follow_up.status == "incomplete"


def test_a_poll_reads_the_answer_as_far_as_it_has_come(
    client: OpenAI, server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_steps(monkeypatch, server, STEP_S)
    started = client.responses.create(model="x", input=QUESTION, max_output_tokens=LONG, temperature=0, background=True)
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(seen) < 3:
        poll = httpx.get(f"{server.base_url}/v1/responses/{started.id}").json()
        if poll["status"] == "queued":  # not begun yet: a loaded machine takes a while to start it
            time.sleep(0.02)
            continue
        if poll["status"] != "in_progress":
            break
        if poll["output"]:
            seen.append(poll["output"][0]["content"][0]["text"])
        time.sleep(0.02)
    client.responses.cancel(started.id)
    assert len(seen) >= 2, seen
    assert all(later.startswith(earlier) for earlier, later in zip(seen, seen[1:], strict=False))


def test_a_background_stream_resumes_after_any_event(client: OpenAI, server: ServerHandle) -> None:
    body = {"input": QUESTION, "max_output_tokens": 16, "temperature": 0, "background": True, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json=body, timeout=60) as raw:
        first = sse_events(raw.iter_lines())
    kinds = [event["type"] for event in first]
    assert kinds[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert first[0]["response"]["status"] == "queued" and kinds[-1] == "response.incomplete"
    assert [event["sequence_number"] for event in first] == list(range(len(first)))
    response_id = first[0]["response"]["id"]
    url = f"{server.base_url}/v1/responses/{response_id}"
    with httpx.stream("GET", url, params={"stream": "true", "starting_after": 5}, timeout=60) as raw:
        assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
        assert sse_events(raw.iter_lines()) == first[6:]
    with client.responses.retrieve(response_id, stream=True) as replay:  # the official client: from the start
        assert [event.type for event in replay] == kinds
    assert httpx.get(url, params={"stream": "true", "starting_after": "x"}).status_code == 400


def test_a_stream_left_early_does_not_stop_a_background_response(client: OpenAI, server: ServerHandle) -> None:
    body = {"input": QUESTION, "max_output_tokens": 24, "temperature": 0, "background": True, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json=body, timeout=60) as raw:
        lines = raw.iter_lines()
        created = first_event(lines, "response.created")
    done = wait_until_done(client, created["response"]["id"])
    assert done.status == "incomplete" and done.usage is not None and done.usage.output_tokens == 24


def test_cancel_stops_a_background_response(
    client: OpenAI, server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_steps(monkeypatch, server, STEP_S)
    before = generated_tokens(server)
    started = client.responses.create(model="x", input=QUESTION, max_output_tokens=LONG, temperature=0, background=True)
    url = f"{server.base_url}/v1/responses/{started.id}"
    followed: list[dict[str, Any]] = []

    def follow() -> None:
        with httpx.stream("GET", url, params={"stream": "true"}, timeout=60) as raw:
            followed.extend(sse_events(raw.iter_lines()))

    follower = threading.Thread(target=follow)
    follower.start()
    deadline = time.monotonic() + 30
    while client.responses.retrieve(started.id).status == "queued" and time.monotonic() < deadline:
        time.sleep(0.01)
    cancelled = client.responses.cancel(started.id)
    assert cancelled.status == "cancelled" and cancelled.background is True
    [message] = cancelled.output
    assert message.status == "incomplete"  # type: ignore[union-attr]
    assert client.responses.retrieve(started.id).status == "cancelled"
    assert client.responses.cancel(started.id).status == "cancelled"  # idempotent
    assert stopped_early(server, before)  # its sequence left the engine
    follower.join(timeout=10)
    assert not follower.is_alive()  # a follower is told the run is over: a last event of this server's own
    last = followed[-1]
    assert last["type"] == "response.cancelled" and last["response"]["status"] == "cancelled"
    assert last["response"]["output"][0]["content"][0]["text"] == message.content[0].text  # type: ignore[union-attr]
    with httpx.stream("GET", url, params={"stream": "true", "starting_after": len(followed) - 2}) as raw:
        assert [event["type"] for event in sse_events(raw.iter_lines())] == ["response.cancelled"]


def test_delete_cancels_a_running_background_response(
    client: OpenAI, server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_steps(monkeypatch, server, STEP_S)
    before = generated_tokens(server)
    started = client.responses.create(model="x", input=QUESTION, max_output_tokens=LONG, temperature=0, background=True)
    url = f"{server.base_url}/v1/responses/{started.id}"
    assert httpx.delete(url).json()["deleted"] is True
    assert httpx.get(url).status_code == 404
    assert stopped_early(server, before)


def test_only_background_responses_are_cancelled_or_streamed_again(client: OpenAI, server: ServerHandle) -> None:
    plain = client.responses.create(model="x", input=QUESTION, max_output_tokens=2)
    url = f"{server.base_url}/v1/responses/{plain.id}"
    refused = httpx.post(f"{url}/cancel")
    assert refused.status_code == 400 and "background" in refused.json()["error"]
    assert httpx.get(url, params={"stream": "true"}).status_code == 400
    assert httpx.post(f"{server.base_url}/v1/responses/resp_nope/cancel").status_code == 404
    finished = client.responses.create(model="x", input=QUESTION, max_output_tokens=2, background=True)
    done = wait_until_done(client, finished.id)
    ended = httpx.post(f"{server.base_url}/v1/responses/{finished.id}/cancel")  # OpenAI: cannot cancel a completed one
    assert ended.status_code == 400 and done.status in ended.json()["error"]


def test_a_response_being_answered_reads_in_progress(
    client: OpenAI, server: ServerHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_steps(monkeypatch, server, STEP_S)
    body = {"input": QUESTION, "max_output_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json=body, timeout=60) as raw:
        lines = raw.iter_lines()
        created = first_event(lines, "response.created")
        url = f"{server.base_url}/v1/responses/{created['response']['id']}"
        assert httpx.get(url).json()["status"] == "in_progress"
        continued = httpx.post(
            f"{server.base_url}/v1/responses", json={"input": "hi", "previous_response_id": created["response"]["id"]}
        )
        assert continued.status_code == 400 and "still being answered" in continued.json()["error"]
    deadline = time.monotonic() + 10
    while httpx.get(url).json()["status"] == "in_progress" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert httpx.get(url).json()["status"] == "cancelled"  # left early: stored as it stood, cancelled


def test_a_server_stopping_cancels_its_background_responses(
    tiny_llama_long_context: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a shutdown signal does (begin_shutdown, then the lifespan's end): running background responses end
    cancelled with the output they had, not failed by the engine's stop."""
    with running_server(tiny_settings(tiny_llama_long_context)) as handle:
        slow_steps(monkeypatch, handle, STEP_S)
        response_id = started_with_output(handle)
        begin_shutdown(handle.state)
        stored = wait_stored(handle, response_id)
    assert stored["status"] == "cancelled" and stored["output"][0]["status"] == "incomplete"
    assert stored["output"][0]["content"][0]["text"]


def test_an_engine_that_stops_fails_a_background_response_keeping_its_output(
    tiny_llama_long_context: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine stopping alone (a model switch) fails a running background response; what it wrote stays."""
    with running_server(tiny_settings(tiny_llama_long_context)) as handle:
        slow_steps(monkeypatch, handle, STEP_S)
        response_id = started_with_output(handle)
        engine = handle.state.engine
        assert engine is not None
        engine.request_stop()
        stored = wait_stored(handle, response_id)
    assert stored["status"] == "failed" and "engine stopped" in stored["error"]["message"]
    assert stored["output"][0]["status"] == "incomplete" and stored["output"][0]["content"][0]["text"]


def test_replayed_events_leave_logprobs_out_as_the_store_does(client: OpenAI, server: ServerHandle) -> None:
    body = {
        "input": QUESTION,
        "max_output_tokens": 6,
        "background": True,
        "stream": True,
        "include": ["message.output_text.logprobs"],
        "top_logprobs": 3,
    }
    with httpx.stream("POST", f"{server.base_url}/v1/responses", json=body, timeout=60) as raw:
        live = sse_events(raw.iter_lines())
    assert any(event.get("logprobs") for event in live)  # its own stream had them
    url = f"{server.base_url}/v1/responses/{live[0]['response']['id']}"
    with httpx.stream("GET", url, params={"stream": "true"}, timeout=60) as raw:
        replayed = sse_events(raw.iter_lines())
    assert [event["type"] for event in replayed] == [event["type"] for event in live]
    assert 'logprobs":[{' not in json.dumps(replayed, separators=(",", ":"))


def started_with_output(handle: ServerHandle) -> str:
    """A background response answering the tiny model for LONG tokens, once its output has begun."""
    body = {"input": QUESTION, "max_output_tokens": LONG, "temperature": 0, "background": True}
    response_id = str(httpx.post(f"{handle.base_url}/v1/responses", json=body, timeout=60).json()["id"])
    deadline = time.monotonic() + 30
    while not httpx.get(f"{handle.base_url}/v1/responses/{response_id}").json()["output"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return response_id


def wait_stored(handle: ServerHandle, response_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while (stored := handle.state.responses.get(response_id, "")) is None or handle.state.responses.live(
        response_id, ""
    ):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return stored.response
