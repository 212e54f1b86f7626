"""`include` on GET /v1/responses/{id}, read as POST /v1/responses reads it: any value is accepted (in the query, as
the openai SDK's `include[]` or a repeated `include`), and `message.output_text.logprobs` keeps the logprobs of a
response still being answered (polled, or a background one's events followed); without it they read empty, and a
stored response's are empty either way (the store keeps none). The parameter was ignored: a poll always showed them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from starlette.testclient import TestClient

from cake_py.api.app import create_app
from cake_py.api.background import LiveResponse
from cake_py.api.include import LOGPROBS_INCLUDE
from cake_py.api.response_store import StoredResponse
from cake_py.api.state import ServerState
from cake_py.config import ServeSettings

LOGPROBS = [{"token": "Paris", "logprob": -0.25, "bytes": [80, 97, 114, 105, 115], "top_logprobs": []}]


def part(logprobs: list[dict[str, Any]], text: str = "Paris") -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs}


def message(status: str, logprobs: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "message", "id": "msg_1", "status": status, "role": "assistant", "content": [part(logprobs)]}


def response(response_id: str, status: str, output: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": response_id, "object": "response", "created_at": 0, "status": status, "model": "m", "output": output}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[TestClient, OpenAI, ServerState]]:
    state = ServerState(engine=None, source=None, settings=ServeSettings(rate_limit=0, files_dir=tmp_path))
    with (
        TestClient(create_app(state)) as http,
        OpenAI(base_url=f"{http.base_url}/v1", api_key="unused", http_client=http, max_retries=0) as client,
    ):
        yield http, client, state


def live_response(http: TestClient, opening: dict[str, Any], *, background: bool) -> LiveResponse:
    """A LiveResponse made on the app's event loop, as the routes make theirs."""

    async def make() -> LiveResponse:
        return LiveResponse(opening, [], background=background)

    assert http.portal is not None  # inside the client's `with`
    return http.portal.call(make)


def logprobs_of(body: dict[str, Any]) -> list[Any]:
    return list(body["output"][0]["content"][0]["logprobs"])


def test_a_response_being_answered_keeps_its_logprobs_only_when_included(
    served: tuple[TestClient, OpenAI, ServerState],
) -> None:
    http, client, state = served
    # its message is done (with the logprobs its request asked for), the response not yet stored
    live = live_response(http, response("resp_live", "in_progress", [message("completed", LOGPROBS)]), background=False)
    state.responses.start_live(live)
    url = "/v1/responses/resp_live"
    assert logprobs_of(http.get(url).json()) == []
    assert live.response["output"][0]["content"][0]["logprobs"] == LOGPROBS  # the live object itself is untouched
    retrieved = client.responses.retrieve("resp_live", include=[LOGPROBS_INCLUDE])  # the SDK's include[]
    assert retrieved.output[0].model_dump()["content"][0]["logprobs"] == LOGPROBS
    assert logprobs_of(http.get(url, params=[("include", LOGPROBS_INCLUDE)]).json()) == LOGPROBS
    # any value is accepted, as POST /v1/responses accepts it (Codex sends ones newer than OpenAI's list)
    assert logprobs_of(http.get(url, params=[("include", "reasoning.encrypted_content")]).json()) == []
    mixed = http.get(url, params=[("include[]", "some.future.value"), ("include[]", LOGPROBS_INCLUDE)])
    assert mixed.status_code == 200 and logprobs_of(mixed.json()) == LOGPROBS


def test_a_stored_response_has_none_to_include(served: tuple[TestClient, OpenAI, ServerState]) -> None:
    http, client, state = served
    state.responses.put(StoredResponse(response("resp_done", "completed", [message("completed", [])]), [], []))
    retrieved = client.responses.retrieve("resp_done", include=[LOGPROBS_INCLUDE])
    assert retrieved.status == "completed" and retrieved.output[0].model_dump()["content"][0]["logprobs"] == []
    assert logprobs_of(http.get("/v1/responses/resp_done").json()) == []


def test_a_followed_background_stream_keeps_logprobs_only_when_included(
    served: tuple[TestClient, OpenAI, ServerState],
) -> None:
    http, _, state = served
    opening = response("resp_bg", "in_progress", [])
    live = live_response(http, opening, background=True)
    events: list[dict[str, Any]] = [
        {"type": "response.in_progress", "response": opening},
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**message("in_progress", []), "content": []},
        },
        {"type": "response.content_part.added", "output_index": 0, "content_index": 0, "part": part([], "")},
        {"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": "Paris"},
    ]
    events[-1]["logprobs"] = LOGPROBS
    for number, event in enumerate(events):
        live.record({**event, "sequence_number": number})
    live.finish()  # its events are all there: a follower reads them and ends
    state.responses.start_live(live)

    def delta(params: list[tuple[str, str]]) -> dict[str, Any]:
        answer = http.get("/v1/responses/resp_bg", params=[("stream", "true"), *params])
        assert answer.status_code == 200, answer.text
        sent = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: ")]
        assert [event["type"] for event in sent] == [event["type"] for event in events]
        return sent[-1]

    assert delta([])["logprobs"] == []
    assert delta([("include[]", LOGPROBS_INCLUDE)])["logprobs"] == LOGPROBS
    assert delta([("include", LOGPROBS_INCLUDE), ("include", "anything.else")])["logprobs"] == LOGPROBS
