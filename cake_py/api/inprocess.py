"""A request to one of this server's routes from inside the server (the Batch API's requests): an ASGI call with a
JSON body, whose status and JSON answer come back as values."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Message


async def post_json(app: ASGIApp, dispatch: ASGIApp, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POSTs `body` to `path` through `dispatch` (routes and error handlers; `app` is what they find as
    request.app). The caller never goes away: cancelling this call is how it stops."""
    payload = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
        "client": ("batch", 0),
        "server": ("cake", 0),
        "app": app,
        "state": {},
    }
    sent_body = False
    status, chunks = 500, []

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": payload, "more_body": False}
        await asyncio.Event().wait()  # no disconnect: a route watching for one waits until it is cancelled
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await dispatch(scope, receive, send)
    try:
        return status, json.loads(b"".join(chunks))
    except ValueError:
        return 500, {"error": f"the route answered {status} with a body that is not JSON"}
