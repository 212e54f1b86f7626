"""Calling this server's own routes in process: the JSON answer comes back as a value (a large one parsed off the
event loop), with the caller's identity in the request's state."""

from __future__ import annotations

import asyncio
import json

from starlette.types import Receive, Scope, Send

from cake_py.api.inprocess import LARGE_ANSWER_BYTES, post_json
from cake_py.api.middleware import Caller


def test_an_answer_large_or_small_comes_back_parsed_with_the_callers_state() -> None:
    seen: list[dict[str, str]] = []

    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        request = json.loads((await receive())["body"])
        seen.append(scope["state"])
        body = json.dumps({"echo": request, "padding": "x" * request["size"]}).encode()
        await send({"type": "http.response.start", "status": 201, "headers": []})
        await send({"type": "http.response.body", "body": body})

    for size in (10, LARGE_ANSWER_BYTES * 2):
        status, answer = asyncio.run(post_json(route, route, "/x", {"size": size}, caller=Caller("owner", "alice")))
        assert status == 201 and answer["echo"] == {"size": size} and len(answer["padding"]) == size
    assert seen[0] == {"cake_owner": "owner", "cake_key_name": "alice"}


def test_an_answer_that_is_not_json_is_a_500_naming_the_status() -> None:
    async def route(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 502, "headers": []})
        await send({"type": "http.response.body", "body": b"<html>"})

    assert asyncio.run(post_json(route, route, "/x", {})) == (
        500,
        {"error": "the route answered 502 with a body that is not JSON"},
    )
